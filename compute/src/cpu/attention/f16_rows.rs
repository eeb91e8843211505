//! Few query rows over f16 keys and values (decoding over an f16 KV cache or f16 blocks):
//! the scores and the value sum are computed straight from the f16 rows, widened in
//! registers (F16C), instead of widening a key tile into a scratch and calling `gemm`.
//!
//! At decode a step reads every cached key and value once and does little arithmetic per
//! byte, so the kernel must cost few instructions per key: one widening per key row per
//! phase (shared by every query row of the tile), accumulators held in registers for up
//! to [`MAX_ROWS`] packed query rows. Arithmetic is f32 on exactly widened values, the
//! same products the tiled path computes (in another summation order). With AVX-512 and
//! rows of whole 16-lane vectors, copies of both loops widen 16 halves per instruction and
//! keep up to four vectors of value sums per query row in registers.

use half::f16;

/// Packed query rows (grouped heads times query tokens) up to which this path is used:
/// one decode token of a model with up to 8 query heads per KV head. Beyond it the
/// tiled `gemm` path amortises its widening over enough rows.
pub const MAX_ROWS: usize = 8;

/// Whether this CPU and shape take the direct path.
pub fn supported(packed: usize, head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        packed <= MAX_ROWS
            && head_dim.is_multiple_of(8)
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (packed, head_dim);
        false
    }
}

/// `scores[p * n + j] = q[p] . k[j]` for `packed` query rows `q` (`[packed][d]`) and `n`
/// key rows starting at `k[0]`, `stride` elements apart. Only call when [`supported`].
pub fn scores(
    q: &[f32],
    packed: usize,
    d: usize,
    k: &[f16],
    stride: usize,
    n: usize,
    scores: &mut [f32],
) {
    assert!(supported(packed, d), "f16_rows::scores: unsupported shape");
    assert!(q.len() >= packed * d && scores.len() >= packed * n);
    assert!(
        n == 0 || k.len() >= (n - 1) * stride + d,
        "f16_rows::scores: keys out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the features were detected by `supported` (and AVX-512 here); bounds were
    // checked above.
    unsafe {
        if wide(d) {
            macro_rules! go {
                ($($p:literal)*) => {
                    match packed {
                        $($p => x86_512::scores::<$p>(q, d, k, stride, n, scores),)*
                        _ => unreachable!(),
                    }
                };
            }
            return go!(1 2 3 4 5 6 7 8);
        }
        macro_rules! go {
            ($($p:literal)*) => {
                match packed {
                    $($p => x86::scores::<$p>(q, d, k, stride, n, scores),)*
                    _ => unreachable!(),
                }
            };
        }
        go!(1 2 3 4 5 6 7 8)
    }
}

/// Whether the AVX-512 copies run: the CPU has AVX-512F and rows are whole 16-lane
/// vectors (a decode step then widens 16 halves per instruction and keeps a whole row of
/// up to 4 x 16 value sums per query row in registers, one pass over the values).
#[cfg(target_arch = "x86_64")]
fn wide(d: usize) -> bool {
    d.is_multiple_of(16) && std::is_x86_feature_detected!("avx512f")
}

/// `acc[p] += sum_j w[p * n + j] * v[j]` for `packed` rows of weights `w` and `n` value
/// rows starting at `v[0]`, `stride` elements apart; `acc` is `[packed][d]`. Only call
/// when [`supported`].
#[allow(clippy::too_many_arguments)]
pub fn accumulate(
    w: &[f32],
    packed: usize,
    n: usize,
    v: &[f16],
    stride: usize,
    d: usize,
    acc: &mut [f32],
) {
    assert!(
        supported(packed, d),
        "f16_rows::accumulate: unsupported shape"
    );
    assert!(w.len() >= packed * n && acc.len() >= packed * d);
    assert!(
        n == 0 || v.len() >= (n - 1) * stride + d,
        "f16_rows::accumulate: values out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the features were detected by `supported` (and AVX-512 here); bounds were
    // checked above.
    unsafe {
        if wide(d) {
            // Column groups of G vectors: P x G accumulators and G value vectors within
            // the 32 registers, as wide as the row allows.
            macro_rules! go {
                ($($p:literal)*) => {
                    match (packed, d % 64 == 0 && packed <= 6, d % 32 == 0) {
                        $(($p, true, _) => x86_512::accumulate::<$p, 4>(w, n, v, stride, d, acc),
                        ($p, false, true) => x86_512::accumulate::<$p, 2>(w, n, v, stride, d, acc),
                        ($p, false, false) => x86_512::accumulate::<$p, 1>(w, n, v, stride, d, acc),)*
                        _ => unreachable!(),
                    }
                };
            }
            return go!(1 2 3 4 5 6 7 8);
        }
        macro_rules! go {
            ($($p:literal)*) => {
                match packed {
                    $($p => x86::accumulate::<$p>(w, n, v, stride, d, acc),)*
                    _ => unreachable!(),
                }
            };
        }
        go!(1 2 3 4 5 6 7 8)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    /// Eight f16 at `p` as eight f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees eight readable f16 at `p`.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// See [`super::scores`]; `P` packed rows, `d` a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores<const P: usize>(
        q: &[f32],
        d: usize,
        k: &[f16],
        stride: usize,
        n: usize,
        out: &mut [f32],
    ) {
        let (qp, kp, op) = (q.as_ptr(), k.as_ptr(), out.as_mut_ptr());
        for j in 0..n {
            let mut acc = [_mm256_setzero_ps(); P];
            for c in (0..d).step_by(8) {
                // SAFETY: key row j holds d elements (checked by the caller); q holds
                // P rows of d.
                unsafe {
                    let kv = load8(kp.add(j * stride + c));
                    for (p, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(p * d + c)), kv, *a);
                    }
                }
            }
            for (p, a) in acc.iter().enumerate() {
                // SAFETY: out holds P rows of n.
                unsafe { *op.add(p * n + j) = hsum(*a) };
            }
        }
    }

    /// See [`super::accumulate`]; `P` packed rows, `d` a multiple of 8.
    // `p` indexes two accumulator arrays and the weights together.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn accumulate<const P: usize>(
        w: &[f32],
        n: usize,
        v: &[f16],
        stride: usize,
        d: usize,
        acc: &mut [f32],
    ) {
        let (wp, vp, ap) = (w.as_ptr(), v.as_ptr(), acc.as_mut_ptr());
        // Two column groups of 8 at a time (up to 6 rows: 2P accumulators, two value
        // vectors and a weight fit the 16 registers) while the keys stream past.
        let mut c = 0;
        while c < d {
            let wide = P <= 6 && c + 16 <= d;
            // SAFETY: acc holds P rows of d; the loads stay inside rows c..c+8(+8).
            unsafe {
                let mut lo = [_mm256_setzero_ps(); P];
                let mut hi = [_mm256_setzero_ps(); P];
                for p in 0..P {
                    lo[p] = _mm256_loadu_ps(ap.add(p * d + c));
                    if wide {
                        hi[p] = _mm256_loadu_ps(ap.add(p * d + c + 8));
                    }
                }
                for j in 0..n {
                    let row = vp.add(j * stride + c);
                    let v0 = load8(row);
                    if wide {
                        let v1 = load8(row.add(8));
                        for p in 0..P {
                            let s = _mm256_broadcast_ss(&*wp.add(p * n + j));
                            lo[p] = _mm256_fmadd_ps(s, v0, lo[p]);
                            hi[p] = _mm256_fmadd_ps(s, v1, hi[p]);
                        }
                    } else {
                        for p in 0..P {
                            let s = _mm256_broadcast_ss(&*wp.add(p * n + j));
                            lo[p] = _mm256_fmadd_ps(s, v0, lo[p]);
                        }
                    }
                }
                for p in 0..P {
                    _mm256_storeu_ps(ap.add(p * d + c), lo[p]);
                    if wide {
                        _mm256_storeu_ps(ap.add(p * d + c + 8), hi[p]);
                    }
                }
            }
            c += if wide { 16 } else { 8 };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_512 {
    use std::arch::x86_64::*;

    use half::f16;

    /// Sixteen f16 at `p` as sixteen f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f16) -> __m512 {
        // SAFETY: the caller guarantees sixteen readable f16 at `p`.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }

    /// See [`super::scores`]; `P` packed rows, `d` a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores<const P: usize>(
        q: &[f32],
        d: usize,
        k: &[f16],
        stride: usize,
        n: usize,
        out: &mut [f32],
    ) {
        let (qp, kp, op) = (q.as_ptr(), k.as_ptr(), out.as_mut_ptr());
        for j in 0..n {
            let mut acc = [_mm512_setzero_ps(); P];
            for c in (0..d).step_by(16) {
                // SAFETY: key row j holds d elements (checked by the caller); q holds
                // P rows of d.
                unsafe {
                    let kv = load16(kp.add(j * stride + c));
                    for (p, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(p * d + c)), kv, *a);
                    }
                }
            }
            for (p, a) in acc.iter().enumerate() {
                // SAFETY: out holds P rows of n.
                unsafe { *op.add(p * n + j) = _mm512_reduce_add_ps(*a) };
            }
        }
    }

    /// See [`super::accumulate`]; `P` packed rows, `d` a multiple of `16 * G`: columns
    /// in groups of `G` vectors, the value rows streamed once per group.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn accumulate<const P: usize, const G: usize>(
        w: &[f32],
        n: usize,
        v: &[f16],
        stride: usize,
        d: usize,
        acc: &mut [f32],
    ) {
        let (wp, vp, ap) = (w.as_ptr(), v.as_ptr(), acc.as_mut_ptr());
        for c in (0..d).step_by(16 * G) {
            // SAFETY: acc holds P rows of d; the loads stay inside columns c..c + 16 G.
            unsafe {
                let mut sums = [[_mm512_setzero_ps(); G]; P];
                for p in 0..P {
                    for g in 0..G {
                        sums[p][g] = _mm512_loadu_ps(ap.add(p * d + c + 16 * g));
                    }
                }
                for j in 0..n {
                    let row = vp.add(j * stride + c);
                    let mut vals = [_mm512_setzero_ps(); G];
                    for g in 0..G {
                        vals[g] = load16(row.add(16 * g));
                    }
                    for p in 0..P {
                        let s = _mm512_set1_ps(*wp.add(p * n + j));
                        for g in 0..G {
                            sums[p][g] = _mm512_fmadd_ps(s, vals[g], sums[p][g]);
                        }
                    }
                }
                for p in 0..P {
                    for g in 0..G {
                        _mm512_storeu_ps(ap.add(p * d + c + 16 * g), sums[p][g]);
                    }
                }
            }
        }
    }
}
