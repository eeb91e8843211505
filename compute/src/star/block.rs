//! One context block's keys and values, for every layer.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::cpu::attention::{HeadShape, Kv8View, Kv16View, KvSource, KvView};
use crate::kv8::Kv8;

/// The KV of `len` consecutive context tokens starting at global position `start`.
/// Per layer, K and V are head-major `[n_kv_heads][len][head_dim]`, K rotated to the
/// tokens' global positions: exactly what the store keeps and phase 2 attends to.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockKv {
    pub start: usize,
    pub len: usize,
    pub shape: HeadShape,
    /// `(k, v)` per layer, f32 (empty for a block held in 8 bits).
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
    /// `(k, v)` per layer in 8 bits, for a document stored with 8-bit KV; attended in 8
    /// bits on the CPU ([`BlockKv::source`]) and on a GPU (`GpuBlock::upload` keeps them
    /// in 8 bits); [`BlockKv::dequantized`] widens them (tests, comparisons).
    pub kv8: Option<Vec<(Kv8, Kv8)>>,
    /// `(k, v)` per layer in f16, for a block loaded from an f16 store on a CPU host: kept
    /// in the stored precision (half the memory of f32, no conversion at load) and widened
    /// one key tile at a time by the attention kernel.
    pub kv16: Option<Vec<(Vec<f16>, Vec<f16>)>>,
}

impl BlockKv {
    /// An empty block of `n_layers` to be filled with [`BlockKv::set_layer_from_rows`].
    pub fn new(start: usize, len: usize, shape: HeadShape, n_layers: usize) -> Self {
        Self {
            start,
            len,
            shape,
            layers: vec![(Vec::new(), Vec::new()); n_layers],
            kv8: None,
            kv16: None,
        }
    }

    /// A block held in 8 bits: `(k, v)` per layer.
    pub fn quantized(start: usize, len: usize, shape: HeadShape, layers: Vec<(Kv8, Kv8)>) -> Self {
        Self {
            start,
            len,
            shape,
            layers: vec![(Vec::new(), Vec::new()); layers.len()],
            kv8: Some(layers),
            kv16: None,
        }
    }

    /// This f32 block in 8 bits as `format`, one scale per row (token and KV head): what
    /// the store keeps for a document of `kv_dtype` int8 or fp8.
    pub fn to_8bit(&self, format: crate::kv8::Kv8Format) -> Self {
        let d = self.shape.head_dim;
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| {
                (
                    Kv8::quantize_as(format, k, d, 1),
                    Kv8::quantize_as(format, v, d, 1),
                )
            })
            .collect();
        Self::quantized(self.start, self.len, self.shape, layers)
    }

    /// A block held in f16: `(k, v)` per layer, head-major like the f32 layers.
    pub fn half(
        start: usize,
        len: usize,
        shape: HeadShape,
        layers: Vec<(Vec<f16>, Vec<f16>)>,
    ) -> Self {
        Self {
            start,
            len,
            shape,
            layers: vec![(Vec::new(), Vec::new()); layers.len()],
            kv8: None,
            kv16: Some(layers),
        }
    }

    /// Whether this block is held in 8 bits.
    pub fn is_8bit(&self) -> bool {
        self.kv8.is_some()
    }

    /// Layers of this block (either representation).
    pub fn n_layers(&self) -> usize {
        match (&self.kv8, &self.kv16) {
            (Some(kv8), _) => kv8.len(),
            (None, Some(kv16)) => kv16.len(),
            (None, None) => self.layers.len(),
        }
    }

    /// This block with f32 layers: itself when it is f32, else its 8-bit values widened
    /// (for comparisons: no device path widens an 8-bit block any more).
    pub fn dequantized(self: &std::sync::Arc<Self>) -> std::sync::Arc<Self> {
        if let Some(kv16) = &self.kv16 {
            let mut out = BlockKv::new(self.start, self.len, self.shape, kv16.len());
            let widen = |x: &[f16]| {
                let mut y = vec![0f32; x.len()];
                x.convert_to_f32_slice(&mut y);
                y
            };
            for (l, (k, v)) in kv16.iter().enumerate() {
                out.layers[l] = (widen(k), widen(v));
            }
            return std::sync::Arc::new(out);
        }
        let Some(kv8) = &self.kv8 else {
            return self.clone();
        };
        let d = self.shape.head_dim;
        let mut out = BlockKv::new(self.start, self.len, self.shape, kv8.len());
        for (l, (k, v)) in kv8.iter().enumerate() {
            out.layers[l] = (k.dequantize(d), v.dequantize(d));
        }
        std::sync::Arc::new(out)
    }

    /// Layer `layer`'s keys and values as the CPU attention kernel reads them.
    pub fn source(&self, layer: usize) -> KvSource<'_> {
        match &self.kv8 {
            Some(kv8) => {
                let (k, v) = &kv8[layer];
                KvSource::I8(Kv8View {
                    k,
                    v,
                    first: 0,
                    len: self.len,
                    block_len: self.len,
                    head_dim: self.shape.head_dim,
                })
            }
            None => match &self.kv16 {
                Some(kv16) => {
                    let (k, v) = &kv16[layer];
                    KvSource::F16(Kv16View {
                        k,
                        v,
                        len: self.len,
                        row_stride: self.shape.head_dim,
                        head_stride: self.len * self.shape.head_dim,
                    })
                }
                None => KvSource::F32(self.view(layer)),
            },
        }
    }

    /// Stores token-major rows `[len][n_kv_heads * head_dim]` as layer `layer`.
    pub fn set_layer_from_rows(&mut self, layer: usize, k_rows: &[f32], v_rows: &[f32]) {
        self.layers[layer] = (
            to_head_major(k_rows, self.len, self.shape),
            to_head_major(v_rows, self.len, self.shape),
        );
    }

    /// Layer `layer` of an f32 block (a phase-1 block; see [`BlockKv::source`]).
    pub fn view(&self, layer: usize) -> KvView<'_> {
        debug_assert!(
            self.kv8.is_none() && self.kv16.is_none(),
            "an 8-bit or f16 block has no f32 view"
        );
        let (k, v) = &self.layers[layer];
        KvView {
            k,
            v,
            len: self.len,
            row_stride: self.shape.head_dim,
            head_stride: self.len * self.shape.head_dim,
        }
    }

    /// The first `n` tokens of this block as a block of their own (the anchor is the
    /// first `a` rows of block 1).
    pub fn prefix(&self, n: usize) -> BlockKv {
        self.rows(0..n.min(self.len))
    }

    /// Tokens `range` (relative to this block's start) as a block of their own, at their
    /// own global positions: a block that lies inside an anchor longer than one block is
    /// a row range of the anchor's KV.
    pub fn rows(&self, range: std::ops::Range<usize>) -> BlockKv {
        if self.kv8.is_some() || self.kv16.is_some() {
            return std::sync::Arc::new(self.clone()).dequantized().rows(range);
        }
        let (from, to) = (
            range.start.min(self.len),
            range.end.min(self.len).max(range.start),
        );
        let d = self.shape.head_dim;
        let cut = |x: &Vec<f32>| -> Vec<f32> {
            (0..self.shape.n_kv_heads)
                .flat_map(|h| {
                    x[(h * self.len + from) * d..(h * self.len + to) * d]
                        .iter()
                        .copied()
                })
                .collect()
        };
        BlockKv {
            start: self.start + from,
            len: to - from,
            shape: self.shape,
            layers: self.layers.iter().map(|(k, v)| (cut(k), cut(v))).collect(),
            kv8: None,
            kv16: None,
        }
    }

    /// Bytes of KV held (f32, f16, or the 8-bit elements and their scales).
    pub fn n_bytes(&self) -> usize {
        let f32_bytes: usize = self
            .layers
            .iter()
            .map(|(k, v)| (k.len() + v.len()) * 4)
            .sum();
        let kv8_bytes: usize = self
            .kv8
            .iter()
            .flatten()
            .map(|(k, v)| k.n_bytes() + v.n_bytes())
            .sum();
        let kv16_bytes: usize = self
            .kv16
            .iter()
            .flatten()
            .map(|(k, v)| (k.len() + v.len()) * 2)
            .sum();
        f32_bytes + kv8_bytes + kv16_bytes
    }
}

fn to_head_major(rows: &[f32], len: usize, shape: HeadShape) -> Vec<f32> {
    let (d, w) = (shape.head_dim, shape.kv_width());
    let mut out = vec![0f32; len * w];
    for t in 0..len {
        for h in 0..shape.n_kv_heads {
            out[(h * len + t) * d..(h * len + t + 1) * d]
                .copy_from_slice(&rows[t * w + h * d..t * w + (h + 1) * d]);
        }
    }
    out
}
