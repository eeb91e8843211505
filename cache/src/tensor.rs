//! Typed tensors: the only kind of value the cache stores.
//!
//! The cache knows nothing about models; a block layer is just a dense little-endian
//! tensor with a dtype and a shape (for KV, conventionally `[2, kv_heads, tokens,
//! head_dim]`: K then V). The element buffer is typed (`Vec<f16>` etc.) rather than
//! `Vec<u8>` so that callers get aligned, zero-copy slices.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::error::{Error, Result};

#[cfg(target_endian = "big")]
compile_error!("starkv-cache stores little-endian tensors by reinterpreting memory");

/// Maximum tensor rank accepted (keeps headers small and bounded).
pub const MAX_RANK: usize = 8;

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    /// IEEE 754 binary32.
    F32 = 0,
    /// IEEE 754 binary16 (the default for KV: half the bytes, lossless for f16 models).
    F16 = 1,
    /// bfloat16.
    BF16 = 2,
    /// Symmetric 8-bit integers with one f16 scale per row of the last dimension
    /// (`x = q * scale`, `scale = f16(max|row| / 127)`): about half the bytes of f16.
    /// The caller picks the scale granularity through the shape (a KV block stored as
    /// `[2, heads, tokens * head_dim]` has one scale per block and head). Raw bytes:
    /// the scales (little-endian f16, one per row), then the elements. (Code 3, an
    /// earlier layout with f32 scales that never left development, is not read.)
    I8 = 4,
}

impl DType {
    /// Bytes per element (for [`DType::I8`], without the per-row scales: see
    /// [`DType::raw_len`]).
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 => 1,
        }
    }

    /// Whether elements carry per-row scales (an 8-bit type).
    pub const fn is_quantized(self) -> bool {
        matches!(self, DType::I8)
    }

    /// Raw bytes of a tensor of `shape` in this type (elements, plus the per-row scales
    /// of a quantised type); `None` on overflow.
    pub fn raw_len(self, shape: &[u32]) -> Option<usize> {
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))?;
        let elements = n.checked_mul(self.size())?;
        if self.is_quantized() {
            elements.checked_add(quant_rows(shape).checked_mul(SCALE_BYTES)?)
        } else {
            Some(elements)
        }
    }

    /// Stable one-byte code used in headers and content keys.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Inverse of [`DType::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            2 => Some(DType::BF16),
            4 => Some(DType::I8),
            _ => None,
        }
    }

    /// Lower-case name (`f32`, `f16`, `bf16`, `int8`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "int8",
        }
    }
}

/// Rows of a quantised tensor: one scale each (a row is the last dimension; a rank-0 or
/// empty-last-dimension tensor has as many rows as the leading dimensions say).
pub(crate) fn quant_rows(shape: &[u32]) -> usize {
    match shape.split_last() {
        None => 1,
        Some((_, lead)) => lead.iter().map(|&d| d as usize).product(),
    }
}

/// Bytes of one row's scale of a [`DType::I8`] tensor (an f16).
pub const SCALE_BYTES: usize = 2;

/// Quantises `row` to symmetric int8 into `q`; returns the scale, an f16:
/// `f16(max|x| / 127)` (0 for an all-zero row, or one too small for an f16), and
/// `q = round(x / scale)` with the rounded scale, clamped to +-127.
pub fn quantize_row_i8(row: &[f32], q: &mut [i8]) -> f16 {
    // The same arithmetic as compute's `kv8::quantize_group`: one quantiser, bit for bit.
    let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = f16::from_f32((amax / 127.0).min(f16::MAX.to_f32()));
    let s = scale.to_f32();
    if s == 0.0 || !s.is_finite() {
        q.fill(0);
        return f16::ZERO;
    }
    for (d, &x) in q.iter_mut().zip(row) {
        *d = (x / s).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// Row `r`'s scale in raw [`DType::I8`] scale bytes.
#[inline]
pub(crate) fn scale_at(scales: &[u8], r: usize) -> f32 {
    f16::from_le_bytes([scales[r * SCALE_BYTES], scales[r * SCALE_BYTES + 1]]).to_f32()
}

/// Dequantised f32 elements of raw [`DType::I8`] bytes (`rows` scales, then the elements,
/// rows of `row_len`) into `dst`.
pub(crate) fn dequantize_i8(raw: &[u8], rows: usize, row_len: usize, dst: &mut [f32]) {
    let (scales, q) = raw.split_at(rows * SCALE_BYTES);
    for (r, (out, qs)) in dst
        .chunks_mut(row_len.max(1))
        .zip(q.chunks(row_len.max(1)))
        .enumerate()
    {
        let s = scale_at(scales, r);
        for (o, &v) in out.iter_mut().zip(qs) {
            *o = (v as i8) as f32 * s;
        }
    }
}

/// Element storage of a [`Tensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// [`DType::I8`]: the raw bytes (per-row f16 scales, then the elements) and the
    /// element count.
    I8 {
        /// Scales (f16, one per row), then the elements.
        raw: Vec<u8>,
        /// Element count.
        numel: usize,
    },
}

impl TensorData {
    /// Zeroed storage of `n` elements in `rows` rows (rows matter only for a quantised
    /// type: one scale each).
    pub fn zeros(dtype: DType, n: usize, rows: usize) -> Self {
        match dtype {
            DType::F32 => TensorData::F32(vec![0.0; n]),
            DType::F16 => TensorData::F16(vec![f16::ZERO; n]),
            DType::BF16 => TensorData::BF16(vec![bf16::ZERO; n]),
            DType::I8 => TensorData::I8 {
                raw: vec![0; n + SCALE_BYTES * rows],
                numel: n,
            },
        }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
            TensorData::I8 { .. } => DType::I8,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::BF16(v) => v.len(),
            TensorData::I8 { numel, .. } => *numel,
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Little-endian element bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            TensorData::F32(v) => bytemuck::cast_slice(v),
            TensorData::F16(v) => bytemuck::cast_slice(v),
            TensorData::BF16(v) => bytemuck::cast_slice(v),
            TensorData::I8 { raw, .. } => raw,
        }
    }

    /// Mutable little-endian element bytes (used by the decoder to fill in place).
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            TensorData::F32(v) => bytemuck::cast_slice_mut(v),
            TensorData::F16(v) => bytemuck::cast_slice_mut(v),
            TensorData::BF16(v) => bytemuck::cast_slice_mut(v),
            TensorData::I8 { raw, .. } => raw,
        }
    }
}

/// A dense tensor with a shape. Invariant: product of `shape` equals the element count.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<u32>,
    data: TensorData,
}

fn numel(shape: &[u32]) -> Result<usize> {
    if shape.len() > MAX_RANK {
        return Err(Error::InvalidArgument(format!(
            "rank {} exceeds {MAX_RANK}",
            shape.len()
        )));
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
        .ok_or_else(|| Error::InvalidArgument("shape overflows usize".into()))
}

impl Tensor {
    /// Wraps existing storage; fails if the shape does not match the element count.
    pub fn new(shape: Vec<u32>, data: TensorData) -> Result<Self> {
        let n = numel(&shape)?;
        if n != data.len() {
            return Err(Error::InvalidArgument(format!(
                "shape {shape:?} has {n} elements, data has {}",
                data.len()
            )));
        }
        if data.as_bytes().len() != data.dtype().raw_len(&shape).unwrap_or(usize::MAX) {
            return Err(Error::InvalidArgument(format!(
                "shape {shape:?} needs {:?} raw bytes of {}, data has {}",
                data.dtype().raw_len(&shape),
                data.dtype().name(),
                data.as_bytes().len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    /// Converts f32 values (row-major for `shape`) to `dtype`. f16 conversion uses the
    /// CPU's F16C instructions when present (round to nearest even); [`DType::I8`]
    /// quantises each row (last dimension) with its own scale.
    pub fn from_f32(dtype: DType, shape: Vec<u32>, values: &[f32]) -> Result<Self> {
        Self::from_f32_parts(dtype, shape, &[values])
    }

    /// Like [`Tensor::from_f32`] with the values given as consecutive parts (e.g. the K
    /// and V buffers of one layer), avoiding a concatenation copy.
    pub fn from_f32_parts(dtype: DType, shape: Vec<u32>, parts: &[&[f32]]) -> Result<Self> {
        let n = numel(&shape)?;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total != n {
            return Err(Error::InvalidArgument(format!(
                "shape {shape:?} has {n} elements, parts have {total}"
            )));
        }
        let rows = quant_rows(&shape);
        let mut data = TensorData::zeros(dtype, n, rows);
        if let TensorData::I8 { raw, .. } = &mut data {
            let values: Vec<f32>;
            let all: &[f32] = if parts.len() == 1 {
                parts[0]
            } else {
                values = parts.concat();
                &values
            };
            let row_len = n.checked_div(rows).unwrap_or(0);
            let (scales, q) = raw.split_at_mut(rows * SCALE_BYTES);
            let q: &mut [i8] = bytemuck::cast_slice_mut(q);
            if row_len > 0 {
                for (r, (row, qr)) in all.chunks(row_len).zip(q.chunks_mut(row_len)).enumerate() {
                    let s = quantize_row_i8(row, qr);
                    scales[r * SCALE_BYTES..(r + 1) * SCALE_BYTES]
                        .copy_from_slice(&s.to_le_bytes());
                }
            }
            return Ok(Tensor { shape, data });
        }
        let mut off = 0;
        for p in parts {
            let r = off..off + p.len();
            match &mut data {
                TensorData::F32(v) => v[r].copy_from_slice(p),
                TensorData::F16(v) => v[r].convert_from_f32_slice(p),
                TensorData::BF16(v) => v[r].convert_from_f32_slice(p),
                TensorData::I8 { .. } => unreachable!("quantised above"),
            }
            off += p.len();
        }
        Ok(Tensor { shape, data })
    }

    /// Convenience for one KV layer: K and V, each `[kv_heads][tokens][head_dim]`, stored
    /// as one tensor of shape `[2, kv_heads, tokens, head_dim]`.
    pub fn kv_layer(
        dtype: DType,
        kv_heads: u32,
        tokens: u32,
        head_dim: u32,
        k: &[f32],
        v: &[f32],
    ) -> Result<Self> {
        Self::from_f32_parts(dtype, vec![2, kv_heads, tokens, head_dim], &[k, v])
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Shape (row-major).
    pub fn shape(&self) -> &[u32] {
        &self.shape
    }

    /// Element storage.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Size of the raw bytes (elements and any scales; what "decoded bytes" means in
    /// metrics).
    pub fn byte_len(&self) -> usize {
        self.data.as_bytes().len()
    }

    /// Little-endian element bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.data.as_bytes()
    }

    /// Widens every element to f32 (dequantises an 8-bit tensor).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            TensorData::I8 { raw, numel } => {
                let rows = quant_rows(&self.shape);
                let mut out = vec![0.0; *numel];
                dequantize_i8(raw, rows, numel.checked_div(rows).unwrap_or(0), &mut out);
                out
            }
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => {
                let mut out = vec![0.0; v.len()];
                v.convert_to_f32_slice(&mut out);
                out
            }
            TensorData::BF16(v) => {
                let mut out = vec![0.0; v.len()];
                v.convert_to_f32_slice(&mut out);
                out
            }
        }
    }

    /// The f16 elements, if this is an f16 tensor.
    pub fn as_f16(&self) -> Option<&[f16]> {
        match &self.data {
            TensorData::F16(v) => Some(v),
            _ => None,
        }
    }

    /// An 8-bit tensor's per-row scales and elements (row-major, a row being the last
    /// dimension), if this is one.
    pub fn as_i8(&self) -> Option<(Vec<f32>, &[i8])> {
        match &self.data {
            TensorData::I8 { raw, .. } => {
                let rows = quant_rows(&self.shape);
                let (scales, q) = raw.split_at(rows * SCALE_BYTES);
                let scales = (0..rows).map(|r| scale_at(scales, r)).collect();
                Some((scales, bytemuck::cast_slice(q)))
            }
            _ => None,
        }
    }

    /// Consumes the tensor and returns shape and storage.
    pub fn into_parts(self) -> (Vec<u32>, TensorData) {
        (self.shape, self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Symmetric round-to-nearest int8: every element is within half a step (`scale / 2`,
    /// `scale = f16(max|row| / 127)`) of its input, or of the clamp at 127 when the f16
    /// rounding made the scale short, plus f32 rounding.
    #[test]
    fn i8_round_trip_error_is_within_half_a_step() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        };
        for (rows, row_len, amp) in [
            (1usize, 1usize, 1.0f32),
            (7, 64, 3.0),
            (33, 128, 40.0),
            (5, 3, 1e-3),
        ] {
            // Rows of different magnitudes, one with an outlier, one all zero.
            let mut vals: Vec<f32> = (0..rows * row_len).map(|_| next() * amp).collect();
            if rows > 2 {
                vals[row_len] = 50.0 * amp;
                vals[2 * row_len..3 * row_len].fill(0.0);
            }
            let t = Tensor::from_f32(DType::I8, vec![rows as u32, row_len as u32], &vals).unwrap();
            assert_eq!(t.byte_len(), rows * row_len + 2 * rows);
            let (scales, _) = t.as_i8().unwrap();
            let back = t.to_f32();
            for r in 0..rows {
                let row = &vals[r * row_len..(r + 1) * row_len];
                let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                // The scale is an f16: within its rounding (2^-11 relative, or half the
                // smallest subnormal step) of amax / 127.
                let exact = amax / 127.0;
                assert!((scales[r] - exact).abs() <= exact / 2048.0 + 3e-8);
                for (x, y) in row.iter().zip(&back[r * row_len..(r + 1) * row_len]) {
                    // Half a step, or the clamp at 127 when the rounded scale is short.
                    let bound = (0.5 * scales[r]).max(amax - 127.0 * scales[r]) * (1.0 + 1e-5);
                    assert!((x - y).abs() <= bound, "row {r}: {x} -> {y}, bound {bound}");
                }
            }
        }
    }

    #[test]
    fn i8_raw_length_counts_the_scales() {
        assert_eq!(
            DType::I8.raw_len(&[2, 3, 5, 8]),
            Some(2 * 3 * 5 * 8 + 2 * 30)
        );
        assert_eq!(DType::I8.raw_len(&[2, 3, 40]), Some(240 + 2 * 6));
        assert_eq!(
            DType::from_code(3),
            None,
            "the f32-scale layout is not read"
        );
        assert_eq!(DType::F16.raw_len(&[2, 3, 40]), Some(480));
        let bad = TensorData::I8 {
            raw: vec![0; 10],
            numel: 10,
        };
        assert!(Tensor::new(vec![2, 5], bad).is_err());
    }
}
