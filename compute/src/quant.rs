//! GGML tensor types and their dequantisation to f32.
//!
//! Block layouts mirror ggml (`ggml/src/ggml-common.h`) and the dequantisers mirror
//! `dequantize_row_*` in `ggml/src/ggml-quants.c` (ggml-org/llama.cpp at b4000 or later; the
//! formats have been stable since GGUF v2). Each block struct is `#[repr(C)]` with a
//! compile-time size assertion, so that `bytemuck` can view mapped file bytes as blocks
//! without copying. Tests check every type against values produced by the independent
//! `gguf` Python package (see `fixtures/quant_reference.json`).

use bytemuck::{Pod, Zeroable};
use half::{bf16, f16};

/// The tensor types starkv reads. Discriminants are GGML's type ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q8_0 = 8,
    Q4K = 12,
    Q6K = 14,
    BF16 = 30,
}

impl GgmlType {
    pub fn from_u32(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
            Self::Q4K | Self::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => size_of::<BlockQ4_0>(),
            Self::Q4_1 => size_of::<BlockQ4_1>(),
            Self::Q8_0 => size_of::<BlockQ8_0>(),
            Self::Q4K => size_of::<BlockQ4K>(),
            Self::Q6K => size_of::<BlockQ6K>(),
        }
    }

    /// Bytes taken by `n` elements (`n` must be a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.block_bytes()
    }
}

pub const QK_K: usize = 256;

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; 16],
}

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

const _: () = assert!(size_of::<BlockQ4_0>() == 18);
const _: () = assert!(size_of::<BlockQ4_1>() == 20);
const _: () = assert!(size_of::<BlockQ8_0>() == 34);
const _: () = assert!(size_of::<BlockQ4K>() == 144);
const _: () = assert!(size_of::<BlockQ6K>() == 210);

/// Dequantises `src` (encoded `dtype`, exactly `out.len()` elements) into `out`.
///
/// Panics if the byte length does not match: callers slice rows out of validated tensors,
/// so a mismatch is a bug in starkv, not bad input.
pub fn dequantize(dtype: GgmlType, src: &[u8], out: &mut [f32]) {
    assert_eq!(
        src.len(),
        dtype.row_bytes(out.len()),
        "dequantize: byte length mismatch for {dtype:?}"
    );
    match dtype {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => blocks::<BlockQ4_0>(src, out, 32, dequant_q4_0),
        GgmlType::Q4_1 => blocks::<BlockQ4_1>(src, out, 32, dequant_q4_1),
        GgmlType::Q8_0 => blocks::<BlockQ8_0>(src, out, 32, dequant_q8_0),
        GgmlType::Q4K => blocks::<BlockQ4K>(src, out, QK_K, dequant_q4k),
        GgmlType::Q6K => blocks::<BlockQ6K>(src, out, QK_K, dequant_q6k),
    }
}

fn blocks<B: Pod>(src: &[u8], out: &mut [f32], n: usize, f: fn(&B, &mut [f32])) {
    // GGUF data is only 32-byte aligned per tensor and blocks are 2-byte aligned structs;
    // `pod_read_unaligned` keeps this sound for any slice the caller passes.
    let size = size_of::<B>();
    for (chunk, o) in src.chunks_exact(size).zip(out.chunks_exact_mut(n)) {
        let block: B = bytemuck::pod_read_unaligned(chunk);
        f(&block, o);
    }
}

/// ggml-quants.c `dequantize_row_q4_0`.
fn dequant_q4_0(b: &BlockQ4_0, y: &mut [f32]) {
    let d = b.d.to_f32();
    for j in 0..16 {
        y[j] = ((b.qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// ggml-quants.c `dequantize_row_q4_1`.
fn dequant_q4_1(b: &BlockQ4_1, y: &mut [f32]) {
    let d = b.d.to_f32();
    let m = b.m.to_f32();
    for j in 0..16 {
        y[j] = (b.qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (b.qs[j] >> 4) as f32 * d + m;
    }
}

/// ggml-quants.c `dequantize_row_q8_0`.
fn dequant_q8_0(b: &BlockQ8_0, y: &mut [f32]) {
    let d = b.d.to_f32();
    for (o, &q) in y.iter_mut().zip(b.qs.iter()) {
        *o = q as f32 * d;
    }
}

/// ggml-quants.c `get_scale_min_k4`: unpacks the 6-bit scale and min of sub-block `j`.
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// ggml-quants.c `dequantize_row_q4_K`.
fn dequant_q4k(b: &BlockQ4K, y: &mut [f32]) {
    let d = b.d.to_f32();
    let min = b.dmin.to_f32();
    for (chunk, (q, out)) in
        b.qs.chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
    {
        let (sc1, m1) = scale_min_k4(2 * chunk, &b.scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, &b.scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// ggml-quants.c `dequantize_row_q6_K`.
fn dequant_q6k(b: &BlockQ6K, y: &mut [f32]) {
    let d = b.d.to_f32();
    for half_idx in 0..2 {
        let ql = &b.ql[64 * half_idx..64 * half_idx + 64];
        let qh = &b.qh[32 * half_idx..32 * half_idx + 32];
        let sc = &b.scales[8 * half_idx..8 * half_idx + 8];
        let out = &mut y[128 * half_idx..128 * half_idx + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * sc[is] as f32 * q1 as f32;
            out[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
            out[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
            out[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
        }
    }
}

/// Encodes f32 values as `dtype` for the float types (used to build random-weight models
/// and fixtures). Quantised types are only ever read.
pub fn encode_float(dtype: GgmlType, values: &[f32]) -> Option<Vec<u8>> {
    Some(match dtype {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlType::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
