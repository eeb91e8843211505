//! One context block's KV resident on a GPU ([`GpuBlock`]): allocation, upload from and
//! download to a CPU [`BlockKv`], row ranges (the anchor) and its layers as attention
//! segments. A block of a document stored with 8-bit KV stays in 8 bits here (half the
//! tier's bytes, half the bytes a decode step reads): see [`GpuBlock::upload`].

use super::Result;
use super::attention::Segment;
use super::device::{DevBuf, Gpu};
use super::kernels::Kernels;
use crate::kv8::Kv8Format;
use crate::partial::HeadShape;
use crate::star::BlockKv;

/// One context block's KV on a GPU: per layer K and V head-major `[n_kv][len][d]` in
/// the GPU's 16-bit type, K rotated at the global positions (as [`BlockKv`]). An 8-bit
/// block (`kv8`: its format, int8 or fp8 e4m3) holds per layer K and V each as
/// `[n_kv][len][d]` 8-bit values followed by one IEEE f16 scale per row (`[n_kv][len]`),
/// whatever the store's scale granularity.
pub struct GpuBlock {
    pub start: usize,
    pub len: usize,
    pub shape: HeadShape,
    kv8: Option<Kv8Format>,
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
            kv8: None,
            layers,
        })
    }

    /// An 8-bit block's buffers (contents undefined), values of `format`.
    pub fn alloc_kv8(
        gpu: &Gpu,
        start: usize,
        len: usize,
        shape: HeadShape,
        n_layers: usize,
        format: Kv8Format,
    ) -> Result<Self> {
        let rows = shape.n_kv_heads * len;
        let bytes = rows * shape.head_dim + 2 * rows;
        let layers = (0..n_layers)
            .map(|_| Ok((gpu.alloc(bytes)?, gpu.alloc(bytes)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            start,
            len,
            shape,
            kv8: Some(format),
            layers,
        })
    }

    /// Whether this block is held in 8 bits.
    pub fn is_8bit(&self) -> bool {
        self.kv8.is_some()
    }

    /// The 8-bit format of an 8-bit block.
    pub fn kv8_format(&self) -> Option<Kv8Format> {
        self.kv8
    }

    /// Uploads a CPU block; synchronous copy. An f32 block is rounded to the GPU's
    /// 16-bit type; an 8-bit one ([`BlockKv::is_8bit`]) stays in 8 bits, its scales
    /// repeated per row when the store kept one per group of rows.
    pub fn upload(gpu: &Gpu, block: &BlockKv) -> Result<Self> {
        if let Some(kv8) = &block.kv8 {
            let format = kv8.first().map_or(Kv8Format::Int8, |(k, _)| k.format);
            let out = Self::alloc_kv8(gpu, block.start, block.len, block.shape, kv8.len(), format)?;
            let rows = block.shape.n_kv_heads * block.len;
            let mut bytes = Vec::new();
            for ((k, v), (dk, dv)) in kv8.iter().zip(&out.layers) {
                for (src, dst) in [(k, dk), (v, dv)] {
                    if src.q.len() != rows * block.shape.head_dim
                        || src.scales.len() * src.rows_per_scale < rows
                        || src.format != format
                    {
                        return Err(super::CudaError::Invalid(format!(
                            "an 8-bit block layer of {} {:?} values and {} scales for {rows} rows of {format:?}",
                            src.q.len(),
                            src.format,
                            src.scales.len()
                        )));
                    }
                    bytes.clear();
                    bytes.extend(src.q.iter().map(|&x| x as u8));
                    for r in 0..rows {
                        let s = half::f16::from_f32(src.scales[r / src.rows_per_scale]);
                        bytes.extend_from_slice(&s.to_bits().to_le_bytes());
                    }
                    gpu.upload(dst.ptr(), &bytes)?;
                }
            }
            return Ok(out);
        }
        if block.kv16.is_some() {
            // An f16 host block (a CPU host's load): widened, then stored in the GPU's type.
            return Self::upload(gpu, &std::sync::Arc::new(block.clone()).dequantized());
        }
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

    /// This 16-bit block's values quantised into the 8-bit block `dst` (same rows and
    /// layers; its format), on the device, bit for bit as the store quantises an ingest's
    /// block: what a re-encoded block of an 8-bit document becomes.
    pub fn quantize_into(&self, gpu: &Gpu, kern: &Kernels, dst: &GpuBlock) -> Result<()> {
        let Some(format) = dst.kv8 else {
            return Err(super::CudaError::Invalid(
                "quantize_into needs an 8-bit block".into(),
            ));
        };
        if self.kv8.is_some()
            || self.len != dst.len
            || self.shape != dst.shape
            || self.layers.len() != dst.layers.len()
        {
            return Err(super::CudaError::Invalid(format!(
                "quantize_into: a 16-bit block of {} tokens and {} layers into an 8-bit one of {} and {}",
                self.len,
                self.layers.len(),
                dst.len,
                dst.layers.len()
            )));
        }
        let rows = self.shape.n_kv_heads * self.len;
        for ((k, v), (qk, qv)) in self.layers.iter().zip(&dst.layers) {
            for (src, q) in [(k, qk), (v, qv)] {
                gpu.quantize_rows(
                    kern,
                    q.ptr(),
                    src.ptr(),
                    (rows, self.shape.head_dim),
                    format,
                )?;
            }
        }
        Ok(())
    }

    /// The block as a CPU [`BlockKv`] (f32, or 8-bit with one scale per row for an
    /// 8-bit block), e.g. to write it to the store.
    pub fn download(&self, gpu: &Gpu) -> Result<BlockKv> {
        let n = self.shape.n_kv_heads * self.len * self.shape.head_dim;
        if let Some(format) = self.kv8 {
            let rows = self.shape.n_kv_heads * self.len;
            let mut bytes = vec![0u8; n + 2 * rows];
            let mut layers = Vec::with_capacity(self.layers.len());
            for (k, v) in &self.layers {
                let mut pair = Vec::with_capacity(2);
                for buf in [k, v] {
                    gpu.download(&mut bytes, buf.ptr())?;
                    let q = bytes[..n].iter().map(|&b| b as i8).collect();
                    let scales = bytes[n..]
                        .chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect();
                    pair.push(crate::kv8::Kv8 {
                        q,
                        scales,
                        rows_per_scale: 1,
                        format,
                    });
                }
                let v = pair.pop().unwrap();
                let k = pair.pop().unwrap();
                layers.push((k, v));
            }
            return Ok(BlockKv::quantized(self.start, self.len, self.shape, layers));
        }
        let mut out = BlockKv::new(self.start, self.len, self.shape, self.layers.len());
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
        let d = self.shape.head_dim;
        if let Some(format) = self.kv8 {
            let out = Self::alloc_kv8(
                gpu,
                self.start + from,
                n,
                self.shape,
                self.layers.len(),
                format,
            )?;
            let (src_sc, dst_sc) = (self.scale_off() as u64, out.scale_off() as u64);
            for (src, dst) in self.layers.iter().zip(&out.layers) {
                for (s, t) in [(&src.0, &dst.0), (&src.1, &dst.1)] {
                    for h in 0..self.shape.n_kv_heads {
                        let (sr, dr) = ((h * self.len + from) as u64, (h * n) as u64);
                        gpu.copy_d2d(t.ptr() + dr * d as u64, s.ptr() + sr * d as u64, n * d)?;
                        gpu.copy_d2d(t.ptr() + dst_sc + 2 * dr, s.ptr() + src_sc + 2 * sr, 2 * n)?;
                    }
                }
            }
            return Ok(out);
        }
        let out = Self::alloc(gpu, self.start + from, n, self.shape, self.layers.len())?;
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

    /// Copies this block's rows into `dst` at their own positions (`dst` spans them,
    /// e.g. the whole document for re-encoding on the device). 16-bit blocks only.
    pub fn copy_into(&self, gpu: &Gpu, dst: &GpuBlock) -> Result<()> {
        let inside = self.start >= dst.start && self.start + self.len <= dst.start + dst.len;
        if self.kv8.is_some() || dst.kv8.is_some() || !inside || self.shape != dst.shape {
            return Err(super::CudaError::Invalid(format!(
                "block {}..{} does not fit 16-bit block {}..{}",
                self.start,
                self.start + self.len,
                dst.start,
                dst.start + dst.len
            )));
        }
        let (d, at) = (self.shape.head_dim, self.start - dst.start);
        for (src, out) in self.layers.iter().zip(&dst.layers) {
            for h in 0..self.shape.n_kv_heads {
                let so = (h * self.len * d * 2) as u64;
                let dof = ((h * dst.len + at) * d * 2) as u64;
                gpu.copy_d2d(out.0.ptr() + dof, src.0.ptr() + so, self.len * d * 2)?;
                gpu.copy_d2d(out.1.ptr() + dof, src.1.ptr() + so, self.len * d * 2)?;
            }
        }
        Ok(())
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
            // The low bit of an 8-bit segment's (even) scale offset marks fp8 values.
            scale_off: match self.kv8 {
                None => 0,
                Some(Kv8Format::Int8) => self.scale_off(),
                Some(Kv8Format::Fp8) => self.scale_off() | 1,
            },
            log2_weight: 0.0,
        }
    }

    /// Bytes from an 8-bit layer buffer's start to its scales.
    fn scale_off(&self) -> i64 {
        (self.shape.n_kv_heads * self.len * self.shape.head_dim) as i64
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Device bytes held.
    pub fn n_bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| k.bytes() + v.bytes()).sum()
    }

    /// Layer `layer`'s K and V buffers (phase 1 and the cold path write them in place;
    /// an 8-bit block's hold the values, then their rows' scales: see
    /// [`GpuBlock::segment`]).
    pub(super) fn layer_ptrs(&self, layer: usize) -> (u64, u64) {
        (self.layers[layer].0.ptr(), self.layers[layer].1.ptr())
    }
}
