//! 8-bit KV (a document ingested with `kv_dtype = int8`): K or V of one layer of a block as
//! symmetric int8 with f32 scales, held in 8 bits in memory and attended in 8 bits
//! ([`crate::cpu::attention::attention_source_into`] dequantises one key tile at a time
//! into a small scratch inside its loop; the block is never widened as a whole).
//!
//! Why symmetric round-to-nearest with one scale per group of rows of one head: K and V
//! are roughly zero-centred, so a zero point buys little, and a scale per
//! (head, `rows_per_scale` tokens) lets the caller choose between the fewest bytes (one
//! scale per block and head) and the smallest error (one per token and head, the
//! granularity that keeps a token with large values from flattening its neighbours).

/// K or V of one layer: head-major `[n_kv_heads][len][head_dim]` int8, and one f32 scale
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

/// Quantises one group into `q`; returns its scale (0 for an all-zero group).
pub fn quantize_group(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        q.fill(0);
        return 0.0;
    }
    let scale = amax / 127.0;
    let inv = 127.0 / amax;
    for (d, &v) in q.iter_mut().zip(x) {
        *d = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// Rows `first..first + n` (global row indices, `head * len + token`) of `kv` into `out`
/// (`n * head_dim` f32).
#[inline]
pub(crate) fn dequantize_rows(kv: &Kv8, head_dim: usize, first: usize, n: usize, out: &mut [f32]) {
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
                assert!(
                    (a - b).abs() <= 0.5 * s * (1.0 + 1e-5),
                    "{rows_per_scale}: {a} {b}"
                );
            }
        }
    }
}
