//! Dot products of one quantised weight row with f32 activations, for decoding.
//!
//! Decoding reads every weight once per token, so these loops must cost few instructions
//! per weight. Both use the block factorisation
//! `sum_j (d q_j + m) x_j = d * sum_j q_j x_j + m * sum_j x_j`, with `sum_j x_j` per block
//! computed once per activation row ([`block_sums`]) and shared by all weight rows. The
//! AVX2 paths are written with intrinsics (compilers do not vectorise nibble unpacking
//! well); the portable paths compute the same sums in scalar code. Arithmetic is f32 on
//! exactly dequantised weights, unlike llama.cpp, which quantises activations to 8 bits.

/// Sums of `x` over consecutive 32-element blocks.
pub fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks(32).map(|c| c.iter().sum()).collect()
}

/// f16 to f32 for block scales, inlined (a call inside the dot loops would spill the
/// vector accumulators). Exact for normal and subnormal values: shifting the exponent
/// and mantissa into f32 position and multiplying by 2^112 re-biases the exponent.
/// Infinities and NaNs, which never occur as scales, map to finite values.
#[inline(always)]
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits & 0x8000) << 16;
    let magnitude = f32::from_bits(u32::from(bits & 0x7FFF) << 13) * f32::from_bits(0x7780_0000);
    f32::from_bits(magnitude.to_bits() | sign)
}

#[inline(always)]
fn scale(blk: &[u8], at: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([blk[at], blk[at + 1]]))
}

/// Q4_1 row (20-byte blocks: d, m, 16 bytes of nibbles) times `x`; `xsum` from [`block_sums`].
pub fn dot_q4_1(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    debug_assert_eq!(row.len(), x.len() / 32 * 20);
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2, FMA and F16C were detected; lengths are checked by the caller's shapes.
        return unsafe { x86::dot_q4_1(row, x, xsum) };
    }
    let mut total = 0f32;
    for ((blk, xs), &sx) in row.chunks_exact(20).zip(x.chunks_exact(32)).zip(xsum) {
        let qx: f32 = (0..16)
            .map(|j| (blk[4 + j] & 0x0F) as f32 * xs[j] + (blk[4 + j] >> 4) as f32 * xs[j + 16])
            .sum();
        total += scale(blk, 0) * qx + scale(blk, 2) * sx;
    }
    total
}

/// Q8_0 row (34-byte blocks: d, 32 signed bytes) times `x`.
pub fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
    debug_assert_eq!(row.len(), x.len() / 32 * 34);
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2, FMA and F16C were detected; lengths are checked by the caller's shapes.
        return unsafe { x86::dot_q8_0(row, x) };
    }
    let mut total = 0f32;
    for (blk, xs) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
        let qx: f32 = (0..32).map(|j| (blk[2 + j] as i8) as f32 * xs[j]).sum();
        total += scale(blk, 0) * qx;
    }
    total
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The f16 pair at `blk[0..4]` (d, then m for Q4_1) as f32 lanes 0 and 1.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales(blk: &[u8]) -> __m128 {
        let bits = i32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
        _mm_cvtph_ps(_mm_cvtsi32_si128(bits))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        let n_blocks = x.len() / 32;
        assert!(row.len() >= n_blocks * 20 && xsum.len() >= n_blocks);
        let mask = _mm_set1_epi8(0x0F);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut offset = 0f32;
        for b in 0..n_blocks {
            let blk = &row[b * 20..b * 20 + 20];
            // SAFETY: the block holds 16 nibble bytes at 4..20 and x holds 32 values at b*32.
            unsafe {
                let qs = _mm_loadu_si128(blk.as_ptr().add(4) as *const __m128i);
                let lo = _mm_and_si128(qs, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
                let xp = x.as_ptr().add(b * 32);
                let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
                let q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                let q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
                let s01 = _mm256_fmadd_ps(
                    q1,
                    _mm256_loadu_ps(xp.add(8)),
                    _mm256_mul_ps(q0, _mm256_loadu_ps(xp)),
                );
                let s23 = _mm256_fmadd_ps(
                    q3,
                    _mm256_loadu_ps(xp.add(24)),
                    _mm256_mul_ps(q2, _mm256_loadu_ps(xp.add(16))),
                );
                let dm = scales(blk);
                let d = _mm256_broadcastss_ps(dm);
                acc0 = _mm256_fmadd_ps(d, s01, acc0);
                acc1 = _mm256_fmadd_ps(d, s23, acc1);
                offset += _mm_cvtss_f32(_mm_movehdup_ps(dm)) * xsum[b];
            }
        }
        // SAFETY: plain register arithmetic under the enabled features.
        unsafe { hsum(_mm256_add_ps(acc0, acc1)) + offset }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
        let n_blocks = x.len() / 32;
        assert!(row.len() >= n_blocks * 34);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for b in 0..n_blocks {
            let blk = &row[b * 34..b * 34 + 34];
            // SAFETY: the block holds 32 quant bytes at 2..34 and x holds 32 values at b*32.
            unsafe {
                let qp = blk.as_ptr().add(2);
                let xp = x.as_ptr().add(b * 32);
                let q = |i: usize| {
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        qp.add(8 * i) as *const __m128i
                    )))
                };
                let s01 = _mm256_fmadd_ps(
                    q(1),
                    _mm256_loadu_ps(xp.add(8)),
                    _mm256_mul_ps(q(0), _mm256_loadu_ps(xp)),
                );
                let s23 = _mm256_fmadd_ps(
                    q(3),
                    _mm256_loadu_ps(xp.add(24)),
                    _mm256_mul_ps(q(2), _mm256_loadu_ps(xp.add(16))),
                );
                let d = _mm256_set1_ps(super::scale(blk, 0));
                acc0 = _mm256_fmadd_ps(d, s01, acc0);
                acc1 = _mm256_fmadd_ps(d, s23, acc1);
            }
        }
        // SAFETY: plain register arithmetic under the enabled features.
        unsafe { hsum(_mm256_add_ps(acc0, acc1)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{GgmlType, dequantize};

    #[test]
    fn inline_f16_conversion_is_exact_for_finite_values() {
        for bits in 0u16..=u16::MAX {
            let h = half::f16::from_bits(bits);
            if h.is_finite() {
                assert_eq!(
                    f16_bits_to_f32(bits).to_bits(),
                    h.to_f32().to_bits(),
                    "bits {bits:#06x}"
                );
            }
        }
    }

    fn random_blocks(dtype: GgmlType, n: usize, seed: usize) -> Vec<u8> {
        let mut bytes: Vec<u8> = (0..dtype.row_bytes(n))
            .map(|i| (((i + seed) * 2_654_435_761usize) >> 11) as u8)
            .collect();
        for (b, blk) in bytes.chunks_exact_mut(dtype.block_bytes()).enumerate() {
            let d = half::f16::from_f32(0.003 * (b % 7) as f32 - 0.01).to_le_bytes();
            blk[0..2].copy_from_slice(&d);
            if dtype == GgmlType::Q4_1 {
                blk[2..4]
                    .copy_from_slice(&half::f16::from_f32(-0.02 * (b % 3) as f32).to_le_bytes());
            }
        }
        bytes
    }

    /// Both dot products (whichever path this CPU takes) against a float64 dot of the
    /// dequantised row, on random blocks.
    #[test]
    fn quantised_dots_match_dequantised_float64() {
        for dtype in [GgmlType::Q4_1, GgmlType::Q8_0] {
            for (n, seed) in [(32, 1), (576, 2), (1536, 3)] {
                let row = random_blocks(dtype, n, seed);
                let x: Vec<f32> = (0..n)
                    .map(|i| ((i * 37 + seed) % 101) as f32 / 50.0 - 1.0)
                    .collect();
                let mut w = vec![0f32; n];
                dequantize(dtype, &row, &mut w);
                let want: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                let got = match dtype {
                    GgmlType::Q4_1 => dot_q4_1(&row, &x, &block_sums(&x)),
                    _ => dot_q8_0(&row, &x),
                };
                let mag: f64 = w
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum();
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * mag.max(1e-3),
                    "{dtype:?} n={n}: {got} vs {want}"
                );
            }
        }
    }
}
