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
    /// OCP FP8 E4M3 ("e4m3fn": 4 exponent bits, 3 mantissa bits, largest finite 448, no
    /// infinities) with one f16 scale per row of the last dimension, laid out like
    /// [`DType::I8`] (scales, then one byte per element): `x = e4m3(q) * scale`,
    /// `scale = f16(max|row| / 448)`, each element rounded to the nearest e4m3 value
    /// (ties to even, saturating at +-448).
    F8 = 5,
}

impl DType {
    /// Bytes per element (for [`DType::I8`], without the per-row scales: see
    /// [`DType::raw_len`]).
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 | DType::F8 => 1,
        }
    }

    /// Whether elements carry per-row scales (an 8-bit type).
    pub const fn is_quantized(self) -> bool {
        matches!(self, DType::I8 | DType::F8)
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
            5 => Some(DType::F8),
            _ => None,
        }
    }

    /// Lower-case name (`f32`, `f16`, `bf16`, `int8`, `fp8`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "int8",
            DType::F8 => "fp8",
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

/// Bytes of one row's scale of an 8-bit ([`DType::I8`], [`DType::F8`]) tensor (an f16).
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

/// The largest finite e4m3 value (`0x7e`): an fp8 row's largest magnitude maps to it.
pub const E4M3_MAX: f32 = 448.0;

/// Every e4m3 code's value (`0x7f` and `0xff`, the NaNs, read as 0: the quantiser never
/// writes them).
pub(crate) static E4M3_VALUES: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        if i & 0x7f != 0x7f {
            t[i] = float8::F8E4M3::from_bits(i as u8).to_f32();
        }
        i += 1;
    }
    t
};

/// Quantises `row` to e4m3 codes into `q`; returns the scale, an f16:
/// `f16(max|x| / 448)` (0 for an all-zero row, or one too small for an f16), and
/// `q = e4m3(x / scale)` with the rounded scale (round to nearest even, saturating at
/// +-448 where the f16 rounding made the scale short).
pub fn quantize_row_f8(row: &[f32], q: &mut [u8]) -> f16 {
    // The same arithmetic as compute's `kv8::quantize_group_fp8`: one quantiser.
    let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = f16::from_f32((amax / E4M3_MAX).min(f16::MAX.to_f32()));
    let s = scale.to_f32();
    if s == 0.0 || !s.is_finite() {
        q.fill(0);
        return f16::ZERO;
    }
    for (d, &x) in q.iter_mut().zip(row) {
        *d = float8::F8E4M3::from_f32(x / s).to_bits();
    }
    scale
}

/// Row `r`'s scale in raw 8-bit scale bytes.
#[inline]
pub(crate) fn scale_at(scales: &[u8], r: usize) -> f32 {
    f16::from_le_bytes([scales[r * SCALE_BYTES], scales[r * SCALE_BYTES + 1]]).to_f32()
}

/// Dequantised f32 elements of raw 8-bit bytes of `dtype` (`rows` scales, then the
/// elements, rows of `row_len`) into `dst`.
pub(crate) fn dequantize_q8(
    dtype: DType,
    raw: &[u8],
    rows: usize,
    row_len: usize,
    dst: &mut [f32],
) {
    let (scales, q) = raw.split_at(rows * SCALE_BYTES);
    for (r, (out, qs)) in dst
        .chunks_mut(row_len.max(1))
        .zip(q.chunks(row_len.max(1)))
        .enumerate()
    {
        dequantize_row(dtype, qs, scale_at(scales, r), out);
    }
}

/// One row of 8-bit codes of `dtype` times `scale` into `out`.
#[inline]
pub(crate) fn dequantize_row(dtype: DType, q: &[u8], scale: f32, out: &mut [f32]) {
    if dtype == DType::F8 {
        for (o, &v) in out.iter_mut().zip(q) {
            *o = E4M3_VALUES[v as usize] * scale;
        }
    } else {
        for (o, &v) in out.iter_mut().zip(q) {
            *o = (v as i8) as f32 * scale;
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
    /// [`DType::F8`]: laid out as [`TensorData::I8`], e4m3 codes for elements.
    F8 {
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
            DType::F8 => TensorData::F8 {
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
            TensorData::F8 { .. } => DType::F8,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::BF16(v) => v.len(),
            TensorData::I8 { numel, .. } | TensorData::F8 { numel, .. } => *numel,
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
            TensorData::I8 { raw, .. } | TensorData::F8 { raw, .. } => raw,
        }
    }

    /// Mutable little-endian element bytes (used by the decoder to fill in place).
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            TensorData::F32(v) => bytemuck::cast_slice_mut(v),
            TensorData::F16(v) => bytemuck::cast_slice_mut(v),
            TensorData::BF16(v) => bytemuck::cast_slice_mut(v),
            TensorData::I8 { raw, .. } | TensorData::F8 { raw, .. } => raw,
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
        if let TensorData::I8 { raw, .. } | TensorData::F8 { raw, .. } = &mut data {
            let values: Vec<f32>;
            let all: &[f32] = if parts.len() == 1 {
                parts[0]
            } else {
                values = parts.concat();
                &values
            };
            let row_len = n.checked_div(rows).unwrap_or(0);
            let (scales, q) = raw.split_at_mut(rows * SCALE_BYTES);
            if row_len > 0 {
                for (r, (row, qr)) in all.chunks(row_len).zip(q.chunks_mut(row_len)).enumerate() {
                    let s = if dtype == DType::F8 {
                        quantize_row_f8(row, qr)
                    } else {
                        quantize_row_i8(row, bytemuck::cast_slice_mut(qr))
                    };
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
                TensorData::I8 { .. } | TensorData::F8 { .. } => unreachable!("quantised above"),
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
            TensorData::I8 { raw, numel } | TensorData::F8 { raw, numel } => {
                let rows = quant_rows(&self.shape);
                let mut out = vec![0.0; *numel];
                let row_len = numel.checked_div(rows).unwrap_or(0);
                dequantize_q8(self.dtype(), raw, rows, row_len, &mut out);
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

    /// An int8 tensor's per-row scales and elements (row-major, a row being the last
    /// dimension), if this is one.
    pub fn as_i8(&self) -> Option<(Vec<f32>, &[i8])> {
        match &self.data {
            TensorData::I8 { .. } => self
                .as_8bit()
                .map(|(scales, q)| (scales, bytemuck::cast_slice(q))),
            _ => None,
        }
    }

    /// An 8-bit tensor's ([`DType::is_quantized`]: int8 or fp8) per-row scales and
    /// element bytes, if this is one.
    pub fn as_8bit(&self) -> Option<(Vec<f32>, &[u8])> {
        match &self.data {
            TensorData::I8 { raw, .. } | TensorData::F8 { raw, .. } => {
                let rows = quant_rows(&self.shape);
                let (scales, q) = raw.split_at(rows * SCALE_BYTES);
                let scales = (0..rows).map(|r| scale_at(scales, r)).collect();
                Some((scales, q))
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

    /// Uniform values in [-1, 1) from a xorshift64 seeded with `state`.
    fn uniform(mut state: u64) -> impl FnMut() -> f32 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        }
    }

    /// Symmetric round-to-nearest int8: every element is within half a step (`scale / 2`,
    /// `scale = f16(max|row| / 127)`) of its input, or of the clamp at 127 when the f16
    /// rounding made the scale short, plus f32 rounding.
    #[test]
    fn i8_round_trip_error_is_within_half_a_step() {
        let mut next = uniform(0x2545_f491_4f6c_dd1du64);
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

    /// An e4m3 code's value from its bits by the format's definition (bias 7, subnormals
    /// at exponent 0, `0x7f`/`0xff` NaN), in f64: the reference the conversions are
    /// checked against.
    fn e4m3_reference(code: u8) -> f64 {
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let (e, m) = (((code >> 3) & 0xf) as i32, (code & 7) as f64);
        if e == 0 {
            sign * m / 8.0 * 2f64.powi(-6)
        } else {
            sign * (1.0 + m / 8.0) * 2f64.powi(e - 7)
        }
    }

    /// Every one of the 256 codes: the table holds the reference value (the NaNs read as
    /// 0), and encoding a finite value gives its code back (`-0` as `0x80`).
    #[test]
    fn every_e4m3_code_round_trips() {
        for code in 0..=255u8 {
            if code & 0x7f == 0x7f {
                assert_eq!(E4M3_VALUES[code as usize], 0.0);
                continue;
            }
            let x = e4m3_reference(code);
            assert_eq!(E4M3_VALUES[code as usize] as f64, x, "{code:#04x}");
            assert_eq!(
                float8::F8E4M3::from_f32(x as f32).to_bits(),
                code,
                "{code:#04x}"
            );
        }
        assert_eq!(E4M3_VALUES[0x7e], E4M3_MAX);
    }

    /// The encoder against a float64 reference on random inputs: the nearest finite e4m3
    /// value, ties to the even code (mantissa bit 0 clear), and saturation to +-448 above
    /// it (e4m3fn has no infinities). Inputs cover the subnormals, the normal range, the
    /// ties exactly and values past 448.
    #[test]
    fn e4m3_rounds_to_nearest_even_and_saturates() {
        let finite: Vec<(f64, u8)> = (0..=255u8)
            .filter(|c| c & 0x7f != 0x7f)
            .map(|c| (e4m3_reference(c), c))
            .collect();
        let reference = |x: f64| -> u8 {
            if x.abs() >= 448.0 {
                return if x < 0.0 { 0xfe } else { 0x7e };
            }
            let mut best = (f64::INFINITY, 0u8);
            for &(v, c) in &finite {
                if (v == 0.0) && (c == 0x80) != (x.is_sign_negative()) {
                    continue; // zero keeps the input's sign
                }
                let d = (v - x).abs();
                if d < best.0 || (d == best.0 && c & 1 == 0) {
                    best = (d, c);
                }
            }
            best.1
        };
        let mut state = 0x853c_49e6_748f_ea9bu64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut inputs: Vec<f32> = Vec::new();
        for _ in 0..200_000 {
            let r = next();
            // Log-uniform magnitude over 2^-12 .. 2^10, random sign.
            let mag = 2f64.powf(((r >> 11) as f64 / (1u64 << 53) as f64) * 22.0 - 12.0);
            inputs.push(if r & 1 == 0 { mag } else { -mag } as f32);
        }
        // Midpoints between neighbours (exact ties in f32) and the saturation edge.
        for w in finite.windows(2) {
            inputs.push(((w[0].0 + w[1].0) / 2.0) as f32);
        }
        inputs.extend([
            448.0, 449.0, 464.0, 465.0, 1e6, -1e6, -448.0, 0.0, -0.0, 1e-30,
        ]);
        for x in inputs {
            let got = float8::F8E4M3::from_f32(x).to_bits();
            assert_eq!(got, reference(x as f64), "{x:e}: {got:#04x}");
        }
    }

    /// fp8 rows: an f16 scale `max|row| / 448`; each element within half an e4m3 step of
    /// its input (relative 2^-4 in the normal range, `2^-10 * scale` among subnormals),
    /// no NaN code written, and a nonzero element at least
    /// the smallest subnormal step never read as zero.
    #[test]
    fn f8_round_trip_error_is_within_half_a_step() {
        let mut next = uniform(0x2545_f491_4f6c_dd1du64);
        for (rows, row_len, amp) in [
            (1usize, 1usize, 1.0f32),
            (7, 64, 3.0),
            (33, 128, 40.0),
            (5, 3, 1e-3),
        ] {
            let mut vals: Vec<f32> = (0..rows * row_len)
                .map(|_| {
                    let x = next();
                    // Magnitudes over several octaves, as K and V rows have.
                    x * amp * 2f32.powi((next().abs() * 12.0) as i32 - 10)
                })
                .collect();
            if rows > 2 {
                vals[row_len] = 50.0 * amp;
                vals[2 * row_len..3 * row_len].fill(0.0);
            }
            let t = Tensor::from_f32(DType::F8, vec![rows as u32, row_len as u32], &vals).unwrap();
            assert_eq!(t.byte_len(), rows * row_len + 2 * rows);
            let (scales, q) = t.as_8bit().unwrap();
            assert!(q.iter().all(|&c| c & 0x7f != 0x7f), "no NaN codes");
            let back = t.to_f32();
            for r in 0..rows {
                let row = &vals[r * row_len..(r + 1) * row_len];
                let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                let exact = amax / E4M3_MAX;
                assert!((scales[r] - exact).abs() <= exact / 2048.0 + 3e-8);
                let s = scales[r];
                for (x, y) in row.iter().zip(&back[r * row_len..(r + 1) * row_len]) {
                    let bound = (x.abs() / 16.0).max(s / 1024.0) * (1.0 + 1e-5)
                        + (amax - E4M3_MAX * s).max(0.0);
                    assert!((x - y).abs() <= bound, "row {r}: {x} -> {y}, bound {bound}");
                    if x.abs() > s / 512.0 * (1.0 + 1e-5) {
                        assert!(*y != 0.0, "row {r}: {x} read as 0 (scale {s})");
                    }
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
        assert_eq!(DType::F8.raw_len(&[2, 3, 40]), Some(240 + 2 * 6));
        assert_eq!(DType::from_code(5), Some(DType::F8));
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
