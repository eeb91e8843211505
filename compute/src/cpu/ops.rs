//! Element-wise CPU kernels: RMSNorm, RoPE, SwiGLU and a vectorisable `exp`.
//!
//! Loops are written so that LLVM vectorises them; the hot ones are compiled twice, once
//! for AVX2+FMA (chosen at run time) and once for the baseline target. The `_rows`
//! variants split many tokens' rows over the rayon pool (prefill).

use rayon::prelude::*;

/// Runs `$body` through an AVX-512 or AVX2+FMA copy of itself when the CPU has those
/// features. The body is compiled three times; the path is selected once per call at run
/// time (AVX-512 doubles the vector width of the vectorised loops: the softmax's `exp`).
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? $body
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the feature was just detected on this CPU (it implies
                    // AVX2 and FMA on every CPU that has it).
                    return unsafe { wide($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the features were just detected on this CPU.
                    return unsafe { fast($($arg),*) };
                }
            }
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            portable($($arg),*)
        }
    };
}
#[allow(unused_imports)]
pub(crate) use multiversion;

multiversion! {
    /// `out = x / rms(x) * weight` for every row of `x` (`weight.len()` columns).
    fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let n = weight.len();
        for (row, out_row) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let sum_sq: f32 = sum_of_squares(row);
            let scale = 1.0 / (sum_sq / n as f32 + eps).sqrt();
            for ((o, &v), &w) in out_row.iter_mut().zip(row).zip(weight) {
                *o = v * scale * w;
            }
        }
    }
}

/// Sum of squares with eight independent accumulators (vectorises and keeps precision).
#[inline(always)]
fn sum_of_squares(row: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i] * c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|v| v * v).sum::<f32>()
}

/// Token rows per task when an element-wise step of many tokens (a prefill) is split
/// over the pool: a few rows outweigh a fork, and one row (a decode step) stays on its
/// thread. Each row is computed exactly as on one thread.
const PAR_ROWS: usize = 16;

/// [`rms_norm`] split over the pool by rows.
pub fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let chunk = PAR_ROWS * weight.len();
    if x.len() <= chunk {
        return rms_norm(x, weight, eps, out);
    }
    x.par_chunks(chunk)
        .zip(out.par_chunks_mut(chunk))
        .for_each(|(x, out)| rms_norm(x, weight, eps, out));
}

/// [`swiglu`] over rows of `width`, split over the pool by rows.
pub fn swiglu_rows(gate: &mut [f32], up: &[f32], width: usize) {
    let chunk = PAR_ROWS * width;
    if gate.len() <= chunk {
        return swiglu(gate, up);
    }
    gate.par_chunks_mut(chunk)
        .zip(up.par_chunks(chunk))
        .for_each(|(gate, up)| swiglu(gate, up));
}

/// `x += y` over rows of `width`, split over the pool by rows.
pub fn add_rows(x: &mut [f32], y: &[f32], width: usize) {
    let add = |x: &mut [f32], y: &[f32]| {
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
    };
    let chunk = PAR_ROWS * width;
    if x.len() <= chunk {
        return add(x, y);
    }
    x.par_chunks_mut(chunk)
        .zip(y.par_chunks(chunk))
        .for_each(|(x, y)| add(x, y));
}

multiversion! {
    /// `gate = silu(gate) * up`, in place.
    fn swiglu(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + exp_approx(-*g)) * u;
        }
    }
}

multiversion! {
    /// `s[j] *= scale` for the first `visible` scores, `-inf` for the rest (masked);
    /// returns the maximum (`-inf` when nothing is visible). Sixteen running maxima keep
    /// the loop vectorised.
    fn scale_mask_max(s: &mut [f32], visible: usize, scale: f32) -> f32 {
        let (shown, hidden) = s.split_at_mut(visible.min(s.len()));
        hidden.fill(f32::NEG_INFINITY);
        let mut acc = [f32::NEG_INFINITY; 16];
        let mut chunks = shown.chunks_exact_mut(16);
        for c in &mut chunks {
            for i in 0..16 {
                c[i] *= scale;
                acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
            }
        }
        let mut max = acc.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a));
        for v in chunks.into_remainder() {
            *v *= scale;
            max = max.max(*v);
        }
        max
    }
}

multiversion! {
    /// `x[i] = exp(x[i] - shift)`, returning the sum of the results (sixteen running
    /// sums: one AVX-512 vector, or two AVX2 ones).
    fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
        let mut acc = [0f32; 16];
        let mut chunks = x.chunks_exact_mut(16);
        for c in &mut chunks {
            for i in 0..16 {
                c[i] = exp_approx(c[i] - shift);
                acc[i] += c[i];
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp_approx(*v - shift);
            sum += *v;
        }
        sum
    }
}

/// `exp(x)` accurate to about 2 ulp over the whole f32 range, branch-free so that loops
/// calling it vectorise (libm's `expf` does not). Cephes' range reduction: `x = n ln2 + r`,
/// `|r| <= ln2/2`, a degree-6 polynomial for `exp(r)`, and `2^n` assembled from bits.
/// Underflows to exactly 0 below -87.3 (so `exp(-inf) == 0`, which masking relies on).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x_clamped = x.clamp(-87.336_55, 88.376_26);
    // Round to nearest with the 1.5 * 2^23 trick: branch-free and vectorisable. The
    // sum's low mantissa bits hold n itself (|n| <= 127 < 2^22), read below as an integer:
    // a float-to-int cast (`as`, saturating) would not vectorise under AVX-512.
    const ROUND: f32 = 12_582_912.0;
    let shifted = x_clamped * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x_clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = (p * r * r + r) + 1.0;
    // 2^n for n in [-126, 127]: exponent bits; the clamp keeps n in range.
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let pow2n = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    let res = y * pow2n;
    if x < -87.336_55 { 0.0 } else { res }
}

/// Rotary position embedding in GGML's "normal" (interleaved) pair order, which is what
/// llama GGUF files expect: their Q/K weights were permuted at conversion so that
/// dimension pairs (2i, 2i+1) rotate together. Applied in place to `x`, laid out as
/// `[tokens][heads][head_dim]`, token `t` at position `positions[t]`.
pub struct Rope {
    /// `inv_freq[i]` = `1 / (theta^(2i/rope_dim) * freq_factor[i])`.
    inv_freq: Vec<f64>,
}

impl Rope {
    pub fn new(theta: f32, rope_dim: usize, freq_factors: Option<&[f32]>) -> Self {
        let inv_freq = (0..rope_dim / 2)
            .map(|i| {
                let base = 1.0 / (theta as f64).powf(2.0 * i as f64 / rope_dim as f64);
                base / freq_factors.map_or(1.0, |f| f[i] as f64)
            })
            .collect();
        Self { inv_freq }
    }

    /// `1 / (theta^(2i/rope_dim) * freq_factor[i])` for each rotated pair `i`.
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// cos/sin tables for `positions`, laid out `[token][pair]`; computed in f64 once per
    /// forward call and shared by every layer and head.
    pub fn tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let pairs = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * pairs);
        let mut sin = Vec::with_capacity(positions.len() * pairs);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }

    /// Rotates the first `2 * pairs` dimensions of every head of every token (many
    /// tokens split over the pool by rows, each rotated as on one thread).
    pub fn apply(&self, x: &mut [f32], n_heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
        let (width, pairs) = (n_heads * head_dim, self.inv_freq.len());
        if x.len() <= PAR_ROWS * width {
            return self.apply_serial(x, n_heads, head_dim, cos, sin);
        }
        x.par_chunks_mut(PAR_ROWS * width)
            .zip(cos.par_chunks(PAR_ROWS * pairs))
            .zip(sin.par_chunks(PAR_ROWS * pairs))
            .for_each(|((x, cos), sin)| self.apply_serial(x, n_heads, head_dim, cos, sin));
    }

    fn apply_serial(
        &self,
        x: &mut [f32],
        n_heads: usize,
        head_dim: usize,
        cos: &[f32],
        sin: &[f32],
    ) {
        let pairs = self.inv_freq.len();
        for (t, token) in x.chunks_exact_mut(n_heads * head_dim).enumerate() {
            let (c, s) = (
                &cos[t * pairs..(t + 1) * pairs],
                &sin[t * pairs..(t + 1) * pairs],
            );
            for head in token.chunks_exact_mut(head_dim) {
                for i in 0..pairs {
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * c[i] - b * s[i];
                    head[2 * i + 1] = a * s[i] + b * c[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_accurate_over_the_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp_approx(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-1000.0), 0.0);
        assert_eq!(exp_approx(0.0), 1.0);
    }

    #[test]
    fn exp_shifted_sum_matches_f64() {
        let mut x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.77).sin() * 9.0).collect();
        let shift = 3.5;
        let want: f64 = x.iter().map(|&v| (v as f64 - shift as f64).exp()).sum();
        let got = exp_shifted_sum(&mut x, shift);
        assert!(((got as f64 - want) / want).abs() < 1e-6);
    }

    /// Scaled, masked scores and their maximum equal a scalar loop's, exactly, for
    /// every visible count around the vector width.
    #[test]
    fn scale_mask_max_equals_the_scalar_loop() {
        let scale = 0.125f32;
        for n in [0usize, 1, 15, 16, 17, 40, 256] {
            let x: Vec<f32> = (0..n)
                .map(|i| (i as f32 * 0.73).sin() * 20.0 - 3.0)
                .collect();
            for visible in [0, 1, n / 2, n.saturating_sub(1), n, n + 5] {
                let mut got = x.clone();
                let max = scale_mask_max(&mut got, visible, scale);
                let mut want = x.clone();
                let mut want_max = f32::NEG_INFINITY;
                for (j, v) in want.iter_mut().enumerate() {
                    *v = if j < visible {
                        *v * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                    want_max = want_max.max(*v);
                }
                assert_eq!(got, want, "n={n} visible={visible}");
                assert_eq!(max, want_max, "n={n} visible={visible}");
            }
        }
    }

    #[test]
    fn rms_norm_matches_f64() {
        let x: Vec<f32> = (0..48)
            .map(|i| (i as f32 * 1.3).cos() * 2.0 + 0.1)
            .collect();
        let w: Vec<f32> = (0..24).map(|i| 0.5 + i as f32 * 0.01).collect();
        let mut out = vec![0f32; 48];
        rms_norm(&x, &w, 1e-5, &mut out);
        for r in 0..2 {
            let row = &x[r * 24..(r + 1) * 24];
            let ms: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 24.0;
            for i in 0..24 {
                let want = row[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
                assert!(
                    (out[r * 24 + i] as f64 - want).abs() < 1e-5,
                    "row {r} col {i}"
                );
            }
        }
    }

    /// The row-parallel variants give exactly the one-thread results, on shapes both
    /// under and over one task's rows (with a partial last task).
    #[test]
    fn row_parallel_steps_equal_the_serial_ones() {
        let width = 24;
        for rows in [1usize, PAR_ROWS, 3 * PAR_ROWS + 5] {
            let n = rows * width;
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let y: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let w: Vec<f32> = (0..width).map(|i| 0.5 + i as f32 * 0.03).collect();
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            rms_norm(&x, &w, 1e-5, &mut a);
            rms_norm_rows(&x, &w, 1e-5, &mut b);
            assert_eq!(a, b, "rms_norm, {rows} rows");
            let (mut a, mut b) = (x.clone(), x.clone());
            swiglu(&mut a, &y);
            swiglu_rows(&mut b, &y, width);
            assert_eq!(a, b, "swiglu, {rows} rows");
            let mut b = x.clone();
            add_rows(&mut b, &y, width);
            let a: Vec<f32> = x.iter().zip(&y).map(|(p, q)| p + q).collect();
            assert_eq!(a, b, "add, {rows} rows");
            let (heads, dim) = (3, 8);
            let rope = Rope::new(10000.0, dim, None);
            let positions: Vec<usize> = (0..n / (heads * dim)).map(|t| t * 37).collect();
            let (c, s) = rope.tables(&positions);
            let (mut a, mut b) = (x.clone(), x.clone());
            rope.apply_serial(&mut a, heads, dim, &c, &s);
            rope.apply(&mut b, heads, dim, &c, &s);
            assert_eq!(a, b, "rope, {rows} rows");
        }
    }

    /// RoPE against a direct f64 evaluation of the rotation, at large positions where
    /// angle errors would show.
    #[test]
    fn rope_matches_f64_reference() {
        let (heads, dim, theta) = (3, 8, 10000.0f32);
        let positions = [0usize, 1, 17, 4095, 8191];
        let x: Vec<f32> = (0..positions.len() * heads * dim)
            .map(|i| (i as f32 * 0.31).sin())
            .collect();
        let rope = Rope::new(theta, dim, None);
        let (c, s) = rope.tables(&positions);
        let mut y = x.clone();
        rope.apply(&mut y, heads, dim, &c, &s);
        for (t, &p) in positions.iter().enumerate() {
            for h in 0..heads {
                for i in 0..dim / 2 {
                    let base = t * heads * dim + h * dim;
                    let angle = p as f64 / (theta as f64).powf(2.0 * i as f64 / dim as f64);
                    let (a, b) = (x[base + 2 * i] as f64, x[base + 2 * i + 1] as f64);
                    let want0 = a * angle.cos() - b * angle.sin();
                    let want1 = a * angle.sin() + b * angle.cos();
                    assert!((y[base + 2 * i] as f64 - want0).abs() < 1e-5);
                    assert!((y[base + 2 * i + 1] as f64 - want1).abs() < 1e-5);
                }
            }
        }
    }
}
