//! 8-bit KV (a document ingested with `kv_dtype = int8`): K or V of one layer of a block as
//! symmetric int8 with f16 scales, held in 8 bits in memory and attended in 8 bits
//! ([`crate::cpu::attention::attention_source_into`] dequantises one key tile at a time
//! into a small scratch inside its loop; the block is never widened as a whole).
//!
//! Why symmetric round-to-nearest with one scale per group of rows of one head: K and V
//! are roughly zero-centred, so a zero point buys little, and a scale per
//! (head, `rows_per_scale` tokens) lets the caller choose between the fewest bytes (one
//! scale per block and head) and the smallest error (one per token and head, the
//! granularity that keeps a token with large values from flattening its neighbours).

/// K or V of one layer: head-major `[n_kv_heads][len][head_dim]` int8, and one scale (an
/// f32 holding an f16 value, as the store keeps it)
/// per `rows_per_scale` consecutive rows (a row is `head_dim` elements of one token and
/// head; `rows_per_scale` divides `len`, so no group spans two heads).
#[derive(Clone, Debug, PartialEq)]
pub struct Kv8 {
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
    pub rows_per_scale: usize,
}

impl Kv8 {
    /// Quantises head-major `x` (rows of `head_dim`) with one scale per `rows_per_scale`
    /// rows: `scale = max|group| / 127`, `q = round(x / scale)`.
    pub fn quantize(x: &[f32], head_dim: usize, rows_per_scale: usize) -> Self {
        let group = (head_dim * rows_per_scale.max(1)).max(1);
        let mut q = vec![0i8; x.len()];
        let scales = x
            .chunks(group)
            .zip(q.chunks_mut(group))
            .map(|(g, qg)| quantize_group(g, qg))
            .collect();
        Self {
            q,
            scales,
            rows_per_scale: rows_per_scale.max(1),
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
        for (o, &v) in out[r * head_dim..(r + 1) * head_dim].iter_mut().zip(src) {
            *o = v as f32 * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_within_half_a_step_per_group() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        };
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
}
