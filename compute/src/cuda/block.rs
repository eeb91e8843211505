//! One context block's KV resident on a GPU ([`GpuBlock`]): allocation, upload from and
//! download to a CPU [`BlockKv`], row ranges (the anchor) and its layers as attention
//! segments.

use super::Result;
use super::attention::Segment;
use super::device::{DevBuf, Gpu};
use crate::partial::HeadShape;
use crate::star::BlockKv;

/// One context block's KV on a GPU: per layer K and V head-major `[n_kv][len][d]` in
/// the GPU's 16-bit type, K rotated at the global positions (as [`BlockKv`]).
pub struct GpuBlock {
    pub start: usize,
    pub len: usize,
    pub shape: HeadShape,
    layers: Vec<(DevBuf, DevBuf)>,
}

impl GpuBlock {
    pub fn alloc(
        gpu: &Gpu,
        start: usize,
        len: usize,
        shape: HeadShape,
        n_layers: usize,
    ) -> Result<Self> {
        let bytes = shape.n_kv_heads * len * shape.head_dim * 2;
        let layers = (0..n_layers)
            .map(|_| Ok((gpu.alloc(bytes)?, gpu.alloc(bytes)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            start,
            len,
            shape,
            layers,
        })
    }

    /// Uploads a CPU block (f32, rounded to the GPU's 16-bit type); synchronous copy.
    pub fn upload(gpu: &Gpu, block: &BlockKv) -> Result<Self> {
        let out = Self::alloc(gpu, block.start, block.len, block.shape, block.layers.len())?;
        let mut tmp = Vec::new();
        for (l, (k, v)) in block.layers.iter().enumerate() {
            for (src, dst) in [(k, &out.layers[l].0), (v, &out.layers[l].1)] {
                tmp.resize(src.len(), 0u16);
                gpu.dtype.encode(src, &mut tmp);
                gpu.upload(dst.ptr(), &tmp)?;
            }
        }
        Ok(out)
    }

    /// The block as a CPU [`BlockKv`] (f32), e.g. to write it to the store.
    pub fn download(&self, gpu: &Gpu) -> Result<BlockKv> {
        let mut out = BlockKv::new(self.start, self.len, self.shape, self.layers.len());
        let n = self.shape.n_kv_heads * self.len * self.shape.head_dim;
        let mut tmp = vec![0u16; n];
        for (l, (k, v)) in self.layers.iter().enumerate() {
            let mut kf = vec![0f32; n];
            let mut vf = vec![0f32; n];
            gpu.download(&mut tmp, k.ptr())?;
            gpu.dtype.decode(&tmp, &mut kf);
            gpu.download(&mut tmp, v.ptr())?;
            gpu.dtype.decode(&tmp, &mut vf);
            out.layers[l] = (kf, vf);
        }
        Ok(out)
    }

    /// The first `n` tokens as a block of their own (the anchor from block 0).
    pub fn prefix(&self, gpu: &Gpu, n: usize) -> Result<Self> {
        self.rows(gpu, 0..n.min(self.len))
    }

    /// Tokens `range` (relative to this block's start) as a block of their own: a block
    /// inside an anchor longer than one block is a row range of the anchor's KV.
    pub fn rows(&self, gpu: &Gpu, range: std::ops::Range<usize>) -> Result<Self> {
        let from = range.start.min(self.len);
        let n = range.end.min(self.len).saturating_sub(from);
        let out = Self::alloc(gpu, self.start + from, n, self.shape, self.layers.len())?;
        let d = self.shape.head_dim;
        for (src, dst) in self.layers.iter().zip(&out.layers) {
            for h in 0..self.shape.n_kv_heads {
                let so = ((h * self.len + from) * d * 2) as u64;
                let dof = (h * n * d * 2) as u64;
                gpu.copy_d2d(dst.0.ptr() + dof, src.0.ptr() + so, n * d * 2)?;
                gpu.copy_d2d(dst.1.ptr() + dof, src.1.ptr() + so, n * d * 2)?;
            }
        }
        Ok(out)
    }

    /// Layer `layer` as an attention segment.
    pub fn segment(&self, layer: usize, causal_offset: Option<usize>) -> Segment {
        let (k, v) = &self.layers[layer];
        Segment {
            k: k.ptr(),
            v: v.ptr(),
            head_stride: (self.len * self.shape.head_dim) as i64,
            row_stride: self.shape.head_dim as i32,
            len: self.len,
            causal_offset,
        }
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Device bytes held.
    pub fn n_bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| k.bytes() + v.bytes()).sum()
    }

    pub(super) fn layer_ptrs(&self, layer: usize) -> (u64, u64) {
        (self.layers[layer].0.ptr(), self.layers[layer].1.ptr())
    }
}
