//! 8-bit KV (a document ingested with `kv_dtype = int8` or `fp8`): K or V of one layer of
//! a block as symmetric int8 or as OCP FP8 E4M3 codes ([`Kv8Format`]) with f16 scales,
//! held in 8 bits in memory and attended in 8 bits
//! ([`crate::cpu::attention::attention_source_into`] dequantises one key tile at a time
//! into a small scratch inside its loop; the block is never widened as a whole).
//!
//! Why symmetric round-to-nearest with one scale per group of rows of one head: K and V
//! are roughly zero-centred, so a zero point buys little, and a scale per
//! (head, `rows_per_scale` tokens) lets the caller choose between the fewest bytes (one
//! scale per block and head) and the smallest error (one per token and head, the
//! granularity that keeps a token with large values from flattening its neighbours).

/// What an 8-bit value means: `value = decode(q) * scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Kv8Format {
    /// Symmetric int8 (`decode(q) = q`, `|q| <= 127`).
    #[default]
    Int8,
    /// OCP FP8 E4M3 ("e4m3fn": 4 exponent bits, bias 7, 3 mantissa bits, largest finite
    /// 448, no infinities), the code's bits held in `q`'s bytes. Every e4m3 value is
    /// exact in f16 and in bf16, so a device widens it without rounding.
    Fp8,
}

/// The largest finite e4m3 value: a group's largest magnitude maps to it.
pub const E4M3_MAX: f32 = 448.0;

/// Every e4m3 code's value (the NaN codes `0x7f` and `0xff` read as 0: never written).
pub static E4M3_VALUES: [f32; 256] = {
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

/// K or V of one layer: head-major `[n_kv_heads][len][head_dim]` 8-bit values of
/// `format` (int8, or e4m3 codes' bits), and one scale (an f32 holding an f16 value, as
/// the store keeps it) per `rows_per_scale` consecutive rows (a row is `head_dim`
/// elements of one token and head; `rows_per_scale` divides `len`, so no group spans two
/// heads).
#[derive(Clone, Debug, PartialEq)]
pub struct Kv8 {
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
    pub rows_per_scale: usize,
    pub format: Kv8Format,
}

impl Kv8 {
    /// Quantises head-major `x` (rows of `head_dim`) to int8 with one scale per
    /// `rows_per_scale` rows: `scale = max|group| / 127`, `q = round(x / scale)`.
    pub fn quantize(x: &[f32], head_dim: usize, rows_per_scale: usize) -> Self {
        Self::quantize_as(Kv8Format::Int8, x, head_dim, rows_per_scale)
    }

    /// Quantises head-major `x` (rows of `head_dim`) to `format` with one scale per
    /// `rows_per_scale` rows ([`quantize_group`], [`quantize_group_fp8`]).
    pub fn quantize_as(
        format: Kv8Format,
        x: &[f32],
        head_dim: usize,
        rows_per_scale: usize,
    ) -> Self {
        let group = (head_dim * rows_per_scale.max(1)).max(1);
        let mut q = vec![0i8; x.len()];
        let scales = x
            .chunks(group)
            .zip(q.chunks_mut(group))
            .map(|(g, qg)| match format {
                Kv8Format::Int8 => quantize_group(g, qg),
                Kv8Format::Fp8 => quantize_group_fp8(g, bytemuck::cast_slice_mut(qg)),
            })
            .collect();
        Self {
            q,
            scales,
            rows_per_scale: rows_per_scale.max(1),
            format,
        }
    }

    /// The f32 values (for devices that compute in 16 or 32 bits).
    pub fn dequantize(&self, head_dim: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.q.len()];
        dequantize_rows(self, head_dim, 0, self.q.len() / head_dim.max(1), &mut out);
        out
    }

    /// Bytes held (elements and scales).
    pub fn n_bytes(&self) -> usize {
        self.q.len() + 4 * self.scales.len()
    }
}

/// Quantises one group into `q`; returns its scale, a value an f16 holds exactly (the
/// store keeps scales as f16): `f16(max|x| / 127)`, 0 for an all-zero group (or one too
/// small for an f16), and `q = round(x / scale)` clamped to +-127.
pub fn quantize_group(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = half::f16::from_f32((amax / 127.0).min(half::f16::MAX.to_f32())).to_f32();
    if scale == 0.0 || !scale.is_finite() {
        q.fill(0);
        return 0.0;
    }
    for (d, &v) in q.iter_mut().zip(x) {
        *d = (v / scale).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// Quantises one group to e4m3 codes into `q`; returns its scale, a value an f16 holds
/// exactly: `f16(max|x| / 448)`, 0 for an all-zero group (or one too small for an f16),
/// and `q = e4m3(x / scale)` (round to nearest even, saturating at +-448 where the f16
/// rounding made the scale short). Bit for bit the store's `quantize_row_f8`.
pub fn quantize_group_fp8(x: &[f32], q: &mut [u8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = half::f16::from_f32((amax / E4M3_MAX).min(half::f16::MAX.to_f32())).to_f32();
    if scale == 0.0 || !scale.is_finite() {
        q.fill(0);
        return 0.0;
    }
    for (d, &v) in q.iter_mut().zip(x) {
        *d = float8::F8E4M3::from_f32(v / scale).to_bits();
    }
    scale
}

/// An e4m3 code's value by integer arithmetic and selects, which vectorise (a table
/// lookup does not: through [`E4M3_VALUES`] the CPU's 8-bit attention over fp8 ran at
/// 0.82x the f32 path, `benches/kv8.rs`). A normal code's exponent and mantissa bits
/// shifted into an f32 with the exponent rebased (+120) are its value; a subnormal one
/// (exponent field 0) is built as `2^-6 * (1 + m / 8)` and `2^-6` subtracted, exactly
/// `m * 2^-9`. The NaN codes (never written) read as +-480.
#[inline(always)]
pub fn e4m3_to_f32(code: u8) -> f32 {
    let c = code as u32;
    let em = c & 0x7f;
    let sub = em < 8;
    let bits = (em << 20) + if sub { 121 << 23 } else { 120 << 23 };
    let v = f32::from_bits(bits) - if sub { 1.0 / 64.0 } else { 0.0 };
    f32::from_bits(v.to_bits() | ((c & 0x80) << 24))
}

/// Rows `first..first + n` (global row indices, `head * len + token`) of `kv` into `out`
/// (`n * head_dim` f32).
pub(crate) fn dequantize_rows(kv: &Kv8, head_dim: usize, first: usize, n: usize, out: &mut [f32]) {
    // The build targets baseline x86-64 (SSE2), where widening i8 to f32 takes several
    // shuffles; with AVX2 (detected once, cached) the same loop vectorises 8 wide.
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { dequantize_rows_avx2(kv, head_dim, first, n, out) };
    }
    dequantize_rows_portable(kv, head_dim, first, n, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dequantize_rows_avx2(kv: &Kv8, head_dim: usize, first: usize, n: usize, out: &mut [f32]) {
    dequantize_rows_portable(kv, head_dim, first, n, out)
}

#[inline(always)]
fn dequantize_rows_portable(kv: &Kv8, head_dim: usize, first: usize, n: usize, out: &mut [f32]) {
    for r in 0..n {
        let row = first + r;
        let s = kv.scales[row / kv.rows_per_scale];
        let src = &kv.q[row * head_dim..(row + 1) * head_dim];
        let dst = &mut out[r * head_dim..(r + 1) * head_dim];
        match kv.format {
            Kv8Format::Int8 => {
                for (o, &v) in dst.iter_mut().zip(src) {
                    *o = v as f32 * s;
                }
            }
            Kv8Format::Fp8 => {
                for (o, &v) in dst.iter_mut().zip(src) {
                    *o = e4m3_to_f32(v as u8) * s;
                }
            }
        }
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

    #[test]
    fn round_trip_error_is_within_half_a_step_per_group() {
        let mut next = uniform(0x9e37_79b9_7f4a_7c15u64);
        let (heads, len, d) = (3, 24, 16);
        for rows_per_scale in [1, 8, len] {
            let mut x: Vec<f32> = (0..heads * len * d).map(|_| next() * 4.0).collect();
            x[5 * d + 3] = 90.0; // an outlier in one row of head 0
            let kv = Kv8::quantize(&x, d, rows_per_scale);
            assert_eq!(kv.scales.len(), heads * len / rows_per_scale);
            let back = kv.dequantize(d);
            for (i, (a, b)) in x.iter().zip(&back).enumerate() {
                let s = kv.scales[i / d / rows_per_scale];
                assert_eq!(half::f16::from_f32(s).to_f32(), s, "an f16 scale");
                // Half a step, plus the clamp at 127 when the f16 scale rounded down
                // (2^-11 relative: these scales are normal f16 values).
                let bound = s * (0.5 + 127.0 / 2048.0);
                assert!((a - b).abs() <= bound, "{rows_per_scale}: {a} {b}");
            }
        }
    }

    /// fp8 groups: f16 scales `max|group| / 448`, every value within half an e4m3 step
    /// (relative 2^-4 in the normal range, `2^-10 * scale` among subnormals) of its input,
    /// the largest magnitude within 2^-4 of itself, and no nonzero value above the
    /// smallest subnormal step read as zero; the same codes and scales as the store's
    /// quantiser would give (checked in service's kv tests).
    #[test]
    fn fp8_round_trip_error_is_within_half_a_step_per_group() {
        let mut next = uniform(0x9e37_79b9_7f4a_7c15u64);
        let (heads, len, d) = (3, 24, 16);
        for rows_per_scale in [1, 8, len] {
            let mut x: Vec<f32> = (0..heads * len * d)
                .map(|_| next() * 4.0 * 2f32.powi((next().abs() * 10.0) as i32 - 8))
                .collect();
            x[5 * d + 3] = 90.0; // an outlier in one row of head 0
            x[7 * d..8 * d].fill(0.0); // an all-zero row
            let kv = Kv8::quantize_as(Kv8Format::Fp8, &x, d, rows_per_scale);
            assert_eq!(kv.scales.len(), heads * len / rows_per_scale);
            assert!(kv.q.iter().all(|&c| c as u8 & 0x7f != 0x7f), "no NaN codes");
            let back = kv.dequantize(d);
            for (i, (a, b)) in x.iter().zip(&back).enumerate() {
                let s = kv.scales[i / d / rows_per_scale];
                assert_eq!(half::f16::from_f32(s).to_f32(), s, "an f16 scale");
                let bound = (a.abs() / 16.0).max(s / 1024.0) * (1.0 + 1e-5)
                    // the saturation at 448 when the f16 scale rounded down
                    + (a.abs() - E4M3_MAX * s).max(0.0);
                assert!(
                    (a - b).abs() <= bound,
                    "{rows_per_scale}: {a} {b} (scale {s})"
                );
                if a.abs() > s / 512.0 * (1.0 + 1e-5) {
                    assert!(*b != 0.0, "{rows_per_scale}: {a} read as 0 (scale {s})");
                }
            }
        }
        // The table and the arithmetic decoder agree with the crate's decoder on every
        // finite code, signed zeros included.
        for c in 0..=255u8 {
            if c & 0x7f != 0x7f {
                let want = float8::F8E4M3::from_bits(c).to_f32();
                assert_eq!(
                    E4M3_VALUES[c as usize].to_bits(),
                    want.to_bits(),
                    "{c:#04x}"
                );
                assert_eq!(e4m3_to_f32(c).to_bits(), want.to_bits(), "{c:#04x}");
            }
        }
    }
}
