//! Per-layer key/value storage for a growing sequence, and plain causal attention over it.
//!
//! Keys and values are held in f16 by default, as llama.cpp holds them: a decode step
//! at long context reads the whole cache once per layer, so half the bytes is close to
//! half the attention time. The attention kernel widens one key tile at a time, so the
//! only rounding is the one f16 store of each projected row. [`KvPrecision::F32`] keeps
//! the projections exact (float64-reference and exactness tests).

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::llama::LayerAttention;
use crate::cpu::attention::{HeadShape, Kv16View, KvSource, KvView, Mask, attention_source_into};
use crate::error::Result;

/// The element type a KV cache holds keys and values in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvPrecision {
    /// f16 (llama.cpp's default): half the bytes of f32 for every decode step to read.
    #[default]
    F16,
    /// f32: the projections exactly (references, exactness tests).
    F32,
}

/// Head-major key and value rows in the cache's precision.
#[derive(Clone)]
enum Rows {
    F32 { k: Vec<f32>, v: Vec<f32> },
    F16 { k: Vec<f16>, v: Vec<f16> },
}

impl Rows {
    fn zeroed(precision: KvPrecision, n: usize) -> Self {
        match precision {
            KvPrecision::F32 => Rows::F32 {
                k: vec![0.0; n],
                v: vec![0.0; n],
            },
            KvPrecision::F16 => Rows::F16 {
                k: vec![f16::ZERO; n],
                v: vec![f16::ZERO; n],
            },
        }
    }

    fn precision(&self) -> KvPrecision {
        match self {
            Rows::F32 { .. } => KvPrecision::F32,
            Rows::F16 { .. } => KvPrecision::F16,
        }
    }

    /// Writes `src_k`/`src_v` (f32) at element `dst` (rounded to f16 when held so).
    fn write(&mut self, dst: usize, src_k: &[f32], src_v: &[f32]) {
        let n = src_k.len();
        match self {
            Rows::F32 { k, v } => {
                k[dst..dst + n].copy_from_slice(src_k);
                v[dst..dst + n].copy_from_slice(src_v);
            }
            Rows::F16 { k, v } => {
                k[dst..dst + n].convert_from_f32_slice(src_k);
                v[dst..dst + n].convert_from_f32_slice(src_v);
            }
        }
    }

    /// Copies `n` elements from `self[src..]` to `into[dst..]` (same precision).
    fn copy_to(&self, src: usize, n: usize, into: &mut Rows, dst: usize) {
        match (self, into) {
            (Rows::F32 { k, v }, Rows::F32 { k: k2, v: v2 }) => {
                k2[dst..dst + n].copy_from_slice(&k[src..src + n]);
                v2[dst..dst + n].copy_from_slice(&v[src..src + n]);
            }
            (Rows::F16 { k, v }, Rows::F16 { k: k2, v: v2 }) => {
                k2[dst..dst + n].copy_from_slice(&k[src..src + n]);
                v2[dst..dst + n].copy_from_slice(&v[src..src + n]);
            }
            _ => unreachable!("a layer's rows keep one precision"),
        }
    }

    /// Elements `range` of K (`which == 0`) or V, widened to f32.
    fn widened(&self, which: usize, range: std::ops::Range<usize>) -> Vec<f32> {
        match self {
            Rows::F32 { k, v } => (if which == 0 { k } else { v })[range].to_vec(),
            Rows::F16 { k, v } => {
                let x = &(if which == 0 { k } else { v })[range];
                let mut out = vec![0f32; x.len()];
                x.convert_to_f32_slice(&mut out);
                out
            }
        }
    }
}

/// Keys and values of one layer, head-major: element `(head, token, i)` is at
/// `head * capacity * head_dim + token * head_dim + i`, so each head's keys are one
/// contiguous `[len][head_dim]` matrix for the attention kernel.
#[derive(Clone)]
pub struct LayerKv {
    rows: Rows,
    len: usize,
    capacity: usize,
    shape: HeadShape,
}

impl LayerKv {
    /// An empty layer held in f16 (the default precision).
    pub fn new(shape: HeadShape, capacity: usize) -> Self {
        Self::with_precision(shape, capacity, KvPrecision::default())
    }

    pub fn with_precision(shape: HeadShape, capacity: usize, precision: KvPrecision) -> Self {
        let n = shape.n_kv_heads * capacity * shape.head_dim;
        Self {
            rows: Rows::zeroed(precision, n),
            len: 0,
            capacity,
            shape,
        }
    }

    pub fn precision(&self) -> KvPrecision {
        self.rows.precision()
    }

    /// Tokens this layer holds before it grows.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends token-major rows `[m][n_kv_heads * head_dim]`.
    pub fn append(&mut self, k: &[f32], v: &[f32]) {
        let (d, kvw) = (self.shape.head_dim, self.shape.kv_width());
        let m = k.len() / kvw;
        if self.len + m > self.capacity {
            self.grow((self.len + m).max(self.capacity * 2).max(16));
        }
        for t in 0..m {
            for h in 0..self.shape.n_kv_heads {
                let dst = h * self.capacity * d + (self.len + t) * d;
                let src = t * kvw + h * d;
                self.rows.write(dst, &k[src..src + d], &v[src..src + d]);
            }
        }
        self.len += m;
    }

    fn grow(&mut self, capacity: usize) {
        let mut next = LayerKv::with_precision(self.shape, capacity, self.precision());
        let d = self.shape.head_dim;
        for h in 0..self.shape.n_kv_heads {
            let (src, dst) = (h * self.capacity * d, h * capacity * d);
            self.rows.copy_to(src, self.len * d, &mut next.rows, dst);
        }
        next.len = self.len;
        *self = next;
    }

    /// Drops every token from `len` on (used to roll back or to reuse a prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The cached keys and values as the attention kernel reads them.
    pub fn view(&self) -> KvSource<'_> {
        let (row_stride, head_stride) = (self.shape.head_dim, self.capacity * self.shape.head_dim);
        match &self.rows {
            Rows::F32 { k, v } => KvSource::F32(KvView {
                k,
                v,
                len: self.len,
                row_stride,
                head_stride,
            }),
            Rows::F16 { k, v } => KvSource::F16(Kv16View {
                k,
                v,
                len: self.len,
                row_stride,
                head_stride,
            }),
        }
    }

    fn head_range(&self, head: usize) -> std::ops::Range<usize> {
        let d = self.shape.head_dim;
        head * self.capacity * d..head * self.capacity * d + self.len * d
    }

    /// Keys of `head` as a `[len][head_dim]` f32 matrix (widened when held in f16).
    pub fn head_k(&self, head: usize) -> Vec<f32> {
        self.rows.widened(0, self.head_range(head))
    }

    /// Values of `head`, as [`LayerKv::head_k`].
    pub fn head_v(&self, head: usize) -> Vec<f32> {
        self.rows.widened(1, self.head_range(head))
    }
}

/// A whole model's KV cache for one sequence; attending through it is ordinary causal
/// (full) attention: each new token sees every cached token and the new tokens before it.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    shape: HeadShape,
    scale: f32,
}

impl KvCache {
    /// A cache held in f16 (the default precision).
    pub fn new(n_layers: usize, shape: HeadShape, capacity: usize) -> Self {
        Self::with_precision(n_layers, shape, capacity, KvPrecision::default())
    }

    pub fn with_precision(
        n_layers: usize,
        shape: HeadShape,
        capacity: usize,
        precision: KvPrecision,
    ) -> Self {
        Self {
            layers: (0..n_layers)
                .map(|_| LayerKv::with_precision(shape, capacity, precision))
                .collect(),
            shape,
            scale: 1.0 / (shape.head_dim as f32).sqrt(),
        }
    }

    /// Tokens cached (the position the next token takes in a contiguous sequence).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn layer(&self, i: usize) -> &LayerKv {
        &self.layers[i]
    }

    /// Layer `i` to append to directly (benchmarks fill a cache without a forward pass).
    pub fn layer_mut(&mut self, i: usize) -> &mut LayerKv {
        &mut self.layers[i]
    }

    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|l| l.truncate(len));
    }
}

impl LayerAttention for KvCache {
    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let kv = &mut self.layers[layer];
        let offset = kv.len();
        kv.append(k, v);
        let mut lse = vec![0.0; m * self.shape.n_heads];
        attention_source_into(
            q,
            m,
            kv.view(),
            self.shape,
            Mask::Causal { offset },
            self.scale,
            out,
            &mut lse,
        );
        Ok(())
    }

    fn computes_only(&self) -> bool {
        true
    }
}
