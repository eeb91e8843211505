//! Per-layer key/value storage for a growing sequence, and plain causal attention over it.

use super::llama::LayerAttention;
use crate::cpu::attention::{HeadShape, KvView, Mask, attention_into};
use crate::error::Result;

/// Keys and values of one layer, head-major: element `(head, token, i)` is at
/// `head * capacity * head_dim + token * head_dim + i`, so each head's keys are one
/// contiguous `[len][head_dim]` matrix for the attention kernel.
#[derive(Clone)]
pub struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
    capacity: usize,
    shape: HeadShape,
}

impl LayerKv {
    pub fn new(shape: HeadShape, capacity: usize) -> Self {
        let n = shape.n_kv_heads * capacity * shape.head_dim;
        Self {
            k: vec![0.0; n],
            v: vec![0.0; n],
            len: 0,
            capacity,
            shape,
        }
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
                self.k[dst..dst + d].copy_from_slice(&k[src..src + d]);
                self.v[dst..dst + d].copy_from_slice(&v[src..src + d]);
            }
        }
        self.len += m;
    }

    fn grow(&mut self, capacity: usize) {
        let mut next = LayerKv::new(self.shape, capacity);
        let d = self.shape.head_dim;
        for h in 0..self.shape.n_kv_heads {
            let (src, dst) = (h * self.capacity * d, h * capacity * d);
            next.k[dst..dst + self.len * d].copy_from_slice(&self.k[src..src + self.len * d]);
            next.v[dst..dst + self.len * d].copy_from_slice(&self.v[src..src + self.len * d]);
        }
        next.len = self.len;
        *self = next;
    }

    /// Drops every token from `len` on (used to roll back or to reuse a prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn view(&self) -> KvView<'_> {
        KvView {
            k: &self.k,
            v: &self.v,
            len: self.len,
            row_stride: self.shape.head_dim,
            head_stride: self.capacity * self.shape.head_dim,
        }
    }

    /// Keys of `head` as a contiguous `[len][head_dim]` slice.
    pub fn head_k(&self, head: usize) -> &[f32] {
        let d = self.shape.head_dim;
        &self.k[head * self.capacity * d..head * self.capacity * d + self.len * d]
    }

    pub fn head_v(&self, head: usize) -> &[f32] {
        let d = self.shape.head_dim;
        &self.v[head * self.capacity * d..head * self.capacity * d + self.len * d]
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
    pub fn new(n_layers: usize, shape: HeadShape, capacity: usize) -> Self {
        Self {
            layers: (0..n_layers)
                .map(|_| LayerKv::new(shape, capacity))
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
        attention_into(
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
}
