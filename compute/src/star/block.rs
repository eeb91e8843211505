//! One context block's keys and values, for every layer.

use crate::cpu::attention::{HeadShape, KvView};

/// The KV of `len` consecutive context tokens starting at global position `start`.
/// Per layer, K and V are head-major `[n_kv_heads][len][head_dim]`, K rotated to the
/// tokens' global positions: exactly what the store keeps and phase 2 attends to.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockKv {
    pub start: usize,
    pub len: usize,
    pub shape: HeadShape,
    /// `(k, v)` per layer.
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl BlockKv {
    /// An empty block of `n_layers` to be filled with [`BlockKv::set_layer_from_rows`].
    pub fn new(start: usize, len: usize, shape: HeadShape, n_layers: usize) -> Self {
        Self {
            start,
            len,
            shape,
            layers: vec![(Vec::new(), Vec::new()); n_layers],
        }
    }

    /// Stores token-major rows `[len][n_kv_heads * head_dim]` as layer `layer`.
    pub fn set_layer_from_rows(&mut self, layer: usize, k_rows: &[f32], v_rows: &[f32]) {
        self.layers[layer] = (
            to_head_major(k_rows, self.len, self.shape),
            to_head_major(v_rows, self.len, self.shape),
        );
    }

    pub fn view(&self, layer: usize) -> KvView<'_> {
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
        }
    }

    /// Bytes of KV held (f32).
    pub fn n_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.len() + v.len()) * 4)
            .sum()
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
