//! Matrix products against weight matrices kept in their file encoding.
//!
//! Weights stay quantised in memory (the GGUF memory map): SmolLM2-135M takes 85 MB this
//! way instead of 540 MB as f32, and a decode step reads 6x fewer bytes. Each product is
//! split into tasks of `ROW_CHUNK` weight rows; a task dequantises its rows into a small
//! per-thread f32 scratch (which stays in L2) and multiplies with the `gemm` crate. The
//! dequantisation costs one pass over the weights per `M_CHUNK` activation rows, which is
//! negligible next to the `M_CHUNK` multiply-adds per weight that follow.

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

use super::qdot;
use crate::gguf::SharedBytes;
use crate::quant::{GgmlType, dequantize};

/// Weight rows handled by one task.
const ROW_CHUNK: usize = 64;
/// Activation rows multiplied per dequantisation of a weight chunk.
const M_CHUNK: usize = 512;

/// A weight matrix of `rows` x `cols` (each row contiguous, `cols` inputs), as stored.
#[derive(Clone)]
pub struct Matrix {
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    bytes: SharedBytes,
}

impl Matrix {
    /// `bytes` must hold exactly `rows * cols` elements of `dtype`.
    pub fn new(dtype: GgmlType, rows: usize, cols: usize, bytes: SharedBytes) -> Self {
        assert_eq!(
            bytes.as_slice().len(),
            dtype.row_bytes(cols) * rows,
            "matrix byte size"
        );
        Self {
            dtype,
            rows,
            cols,
            bytes,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> GgmlType {
        self.dtype
    }

    fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols)
    }

    /// Dequantises row `r` into `out` (`cols` values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        dequantize(
            self.dtype,
            &self.bytes.as_slice()[r * rb..(r + 1) * rb],
            out,
        );
    }

    /// The whole matrix as f32, row-major (for uploading to other backends).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        dequantize(self.dtype, self.bytes.as_slice(), &mut out);
        out
    }

    /// `y[m x rows] = x[m x cols] * W^T`, overwriting `y`.
    pub fn matmul_t(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let (k, n) = (self.cols, self.rows);
        assert_eq!(x.len(), m * k, "matmul_t: x shape");
        assert_eq!(y.len(), m * n, "matmul_t: y shape");
        let y_ptr = SyncPtr(y.as_mut_ptr());
        if m <= SMALL_M {
            return self.matvec(x, m, y_ptr);
        }
        // Tasks over (activation chunk, weight-row chunk) pairs, so that every thread has
        // work even when a matrix has few rows (576 on SmolLM2: 9 chunks of 64 rows would
        // leave most of 16 threads idle).
        let m_chunks = m.div_ceil(M_CHUNK);
        let rc = rows_per_task(n, m_chunks, ROW_CHUNK);
        let r_chunks = n.div_ceil(rc);
        (0..m_chunks * r_chunks).into_par_iter().for_each(|task| {
            let (m0, r0) = ((task / r_chunks) * M_CHUNK, (task % r_chunks) * rc);
            let (mb, rn) = (M_CHUNK.min(m - m0), rc.min(n - r0));
            let x_chunk = &x[m0 * k..(m0 + mb) * k];
            with_scratch(rn * k, |w| {
                let rb = self.row_bytes();
                dequantize(
                    self.dtype,
                    &self.bytes.as_slice()[r0 * rb..(r0 + rn) * rb],
                    w,
                );
                // SAFETY: tasks write disjoint blocks (rows m0..m0 + mb, columns
                // r0..r0 + rn) of `y`, which outlives the parallel loop.
                unsafe {
                    let dst = y_ptr.get().add(m0 * n + r0);
                    gemm_f32(
                        mb,
                        rn,
                        k,
                        dst,
                        n,
                        x_chunk.as_ptr(),
                        k,
                        w.as_ptr(),
                        Transpose::Yes(k),
                    );
                }
            });
        });
    }
}

/// Weight rows per task: `max_rows`, halved (down to 16) until there are at least four
/// tasks per thread over `n` rows and `m_chunks` activation chunks.
fn rows_per_task(n: usize, m_chunks: usize, max_rows: usize) -> usize {
    let want = 4 * rayon::current_num_threads();
    let mut rows = max_rows;
    while rows > 16 && m_chunks * n.div_ceil(rows) < want {
        rows /= 2;
    }
    rows
}

impl Matrix {
    /// Few activation rows (decoding): each weight row is read once from memory and
    /// dotted with every activation row straight from its encoding, without a scratch
    /// copy; decoding is bound by weight bytes, so fewer bytes is what matters.
    fn matvec(&self, x: &[f32], m: usize, y: SyncPtr) {
        matvecs(&[(self, y)], x, m);
    }
}

/// `y_i = x W_i^T` for several matrices of the same input width, overwriting each `y_i`:
/// with few activation rows (decoding) as one parallel loop over all their rows, so a
/// decode step forks once for Q, K and V (and once for gate and up) instead of per matrix.
pub fn matmul_t_many(products: &mut [(&Matrix, &mut [f32])], x: &[f32], m: usize) {
    if m > SMALL_M {
        for (w, y) in products.iter_mut() {
            w.matmul_t(x, m, y);
        }
        return;
    }
    let targets: Vec<(&Matrix, SyncPtr)> = products
        .iter_mut()
        .map(|(w, y)| {
            assert_eq!(x.len(), m * w.cols, "matmul_t_many: x shape");
            assert_eq!(y.len(), m * w.rows, "matmul_t_many: y shape");
            (*w, SyncPtr(y.as_mut_ptr()))
        })
        .collect();
    matvecs(&targets, x, m);
}

/// The direct path of [`Matrix::matvec`] over several matrices sharing `x`: tasks of a
/// few rows of one matrix each.
fn matvecs(targets: &[(&Matrix, SyncPtr)], x: &[f32], m: usize) {
    let k = targets[0].0.cols;
    let sums: Vec<Vec<f32>> = x.chunks_exact(k).map(qdot::block_sums).collect();
    let total: usize = targets.iter().map(|(w, _)| w.rows).sum();
    let rc = rows_per_task(total, 1, ROW_CHUNK);
    let tasks: Vec<(usize, usize)> = targets
        .iter()
        .enumerate()
        .flat_map(|(t, (w, _))| (0..w.rows).step_by(rc).map(move |r0| (t, r0)))
        .collect();
    tasks.par_iter().for_each(|&(t, r0)| {
        let (w, y) = targets[t];
        let (n, rb, data) = (w.rows, w.row_bytes(), w.bytes.as_slice());
        for r in r0..(r0 + rc).min(n) {
            let row = &data[r * rb..(r + 1) * rb];
            for i in 0..m {
                let value = dot_row(w.dtype, row, &x[i * k..(i + 1) * k], &sums[i]);
                // SAFETY: each task writes only its own rows' columns r of its `y`.
                unsafe { *y.get().add(i * n + r) = value };
            }
        }
    });
}

/// Activation rows up to which products take the direct dot-product path.
const SMALL_M: usize = 4;

/// Dot product of one encoded weight row with `x`.
fn dot_row(dtype: GgmlType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    match dtype {
        GgmlType::Q4_1 => qdot::dot_q4_1(row, x, xsum),
        GgmlType::Q8_0 => qdot::dot_q8_0(row, x),
        GgmlType::F32 => dot_f32_bytes(row, x),
        _ => {
            let mut buf = [0f32; 1024];
            let mut total = 0.0;
            let block = dtype.block_size().max(1);
            // Chunks of whole blocks that fit the stack buffer.
            let per_chunk = 1024 / block * block;
            for (start, xs) in (0..x.len()).step_by(per_chunk).zip(x.chunks(per_chunk)) {
                let (b0, b1) = (dtype.row_bytes(start), dtype.row_bytes(start + xs.len()));
                dequantize(dtype, &row[b0..b1], &mut buf[..xs.len()]);
                total += dot_f32(&buf[..xs.len()], xs);
            }
            total
        }
    }
}

super::ops::multiversion! {
    /// f32 row (as little-endian bytes) times f32.
    fn dot_f32_bytes(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        let mut chunks = row.chunks_exact(64).zip(x.chunks_exact(16));
        for (b, xs) in &mut chunks {
            for j in 0..16 {
                acc[j] += f32::from_le_bytes([b[4 * j], b[4 * j + 1], b[4 * j + 2], b[4 * j + 3]]) * xs[j];
            }
        }
        let done = x.len() / 16 * 16;
        let tail: f32 = row[done * 4..]
            .chunks_exact(4)
            .zip(&x[done..])
            .map(|(b, v)| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * v)
            .sum();
        acc.iter().sum::<f32>() + tail
    }
}

super::ops::multiversion! {
    fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        let mut chunks = a.chunks_exact(16).zip(b.chunks_exact(16));
        for (xa, xb) in &mut chunks {
            for j in 0..16 {
                acc[j] += xa[j] * xb[j];
            }
        }
        let done = a.len() / 16 * 16;
        acc.iter().sum::<f32>() + a[done..].iter().zip(&b[done..]).map(|(x, y)| x * y).sum::<f32>()
    }
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: used only to hand disjoint output regions to rayon tasks.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// How the right-hand operand of [`gemm_f32`] is laid out.
#[derive(Clone, Copy)]
pub enum Transpose {
    /// `rhs` is `[k x n]` with row stride given.
    No(usize),
    /// `rhs` is stored as `[n x k]` with row stride given; the product uses its transpose.
    Yes(usize),
}

/// `dst[m x n] (row stride dst_rs) = lhs[m x k] (row stride lhs_rs) * rhs`, single-threaded.
///
/// # Safety
/// All pointers must be valid for the given shapes and strides, and `dst` must not alias
/// the inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    rhs_layout: Transpose,
) {
    // SAFETY: forwarded from the caller.
    unsafe { gemm_raw(m, n, k, dst, dst_rs, lhs, lhs_rs, rhs, rhs_layout, false) }
}

/// `dst += lhs * rhs` (accumulating variant of [`gemm_f32`]).
///
/// # Safety
/// As for [`gemm_f32`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32_acc(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    rhs_layout: Transpose,
) {
    // SAFETY: forwarded from the caller.
    unsafe { gemm_raw(m, n, k, dst, dst_rs, lhs, lhs_rs, rhs, rhs_layout, true) }
}

/// The one call into the `gemm` crate: `dst = [dst +] lhs * rhs`, row-major, one thread.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    rhs_layout: Transpose,
    accumulate: bool,
) {
    let (rhs_cs, rhs_rs) = match rhs_layout {
        Transpose::No(rs) => (1, rs as isize),
        Transpose::Yes(rs) => (rs as isize, 1),
    };
    let alpha = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: forwarded from the callers, whose contracts cover every pointer and stride.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            1,
            lhs_rs as isize,
            rhs,
            rhs_cs,
            rhs_rs,
            alpha,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::encode_float;

    fn naive(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
            }
        }
        y
    }

    /// The direct small-m path and the tiled path agree with the dequantised weights for
    /// every encoding (the default model uses Q4_1 and Q8_0).
    #[test]
    fn quantised_products_match_dequantised_reference() {
        let cases = [
            (GgmlType::Q4_1, 20usize),
            (GgmlType::Q8_0, 34),
            (GgmlType::Q4_0, 18),
            (GgmlType::F16, 64),
            (GgmlType::Q4K, 144),
            (GgmlType::Q6K, 210),
        ];
        for (dtype, _) in cases {
            let (n, k) = (70, 512);
            let n_bytes = dtype.row_bytes(k) * n;
            // Random bytes are valid blocks once the f16 scales are made finite and small.
            let mut bytes: Vec<u8> = (0..n_bytes)
                .map(|i| ((i * 2_654_435_761usize) >> 7) as u8)
                .collect();
            let scale = half::f16::from_f32(0.01).to_le_bytes();
            let bs = dtype.block_bytes();
            for blk in bytes.chunks_exact_mut(bs) {
                match dtype {
                    GgmlType::Q4_1 | GgmlType::Q4K => {
                        blk[0..2].copy_from_slice(&scale);
                        blk[2..4].copy_from_slice(&scale);
                    }
                    GgmlType::Q8_0 | GgmlType::Q4_0 => blk[0..2].copy_from_slice(&scale),
                    GgmlType::Q6K => blk[bs - 2..].copy_from_slice(&scale),
                    GgmlType::F16 => blk.copy_from_slice(
                        &half::f16::from_f32((blk[0] as f32 - 128.0) / 64.0).to_le_bytes(),
                    ),
                    _ => {}
                }
            }
            let matrix = Matrix::new(dtype, n, k, SharedBytes::from_vec(bytes));
            let w = matrix.to_f32();
            for m in [1, 3, 9] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
                    .collect();
                let mut y = vec![f32::NAN; m * n];
                matrix.matmul_t(&x, m, &mut y);
                let want = naive(&x, &w, m, n, k);
                for (a, b) in y.iter().zip(&want) {
                    assert!(
                        (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                        "{dtype:?} m={m}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Shapes straddle the chunk sizes so that every edge path runs.
    #[test]
    fn matmul_t_matches_f64_reference() {
        for &(m, n, k) in &[(1, 5, 32), (3, 64, 64), (7, 130, 96), (600, 70, 64)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104_729) % 997) as f32 / 498.0 - 1.0)
                .collect();
            let matrix = Matrix::new(
                GgmlType::F32,
                n,
                k,
                SharedBytes::from_vec(encode_float(GgmlType::F32, &w).unwrap()),
            );
            let mut y = vec![f32::NAN; m * n];
            matrix.matmul_t(&x, m, &mut y);
            let want = naive(&x, &w, m, n, k);
            for (a, b) in y.iter().zip(&want) {
                assert!(
                    (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "({m},{n},{k}): {a} vs {b}"
                );
            }
        }
    }

    /// Several matrices of one input width (different row counts, encodings whose rows
    /// split into tasks unevenly) in one call: each output equals the f64 reference.
    #[test]
    fn many_products_in_one_loop_match_the_f64_reference() {
        let k = 96;
        let encode = |dtype: GgmlType, n: usize, seed: usize| {
            let w: Vec<f32> = (0..n * k)
                .map(|i| (((i + seed) * 7919) % 997) as f32 / 498.0 - 1.0)
                .collect();
            let matrix = Matrix::new(
                dtype,
                n,
                k,
                SharedBytes::from_vec(encode_float(dtype, &w).unwrap()),
            );
            let dense = matrix.to_f32();
            (matrix, dense)
        };
        let shapes = [
            (GgmlType::F32, 70),
            (GgmlType::F16, 5),
            (GgmlType::F32, 130),
        ];
        let mats: Vec<(Matrix, Vec<f32>)> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(dtype, n))| encode(dtype, n, i))
            .collect();
        for m in [1usize, 3, 9] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let mut ys: Vec<Vec<f32>> = mats
                .iter()
                .map(|(w, _)| vec![f32::NAN; m * w.rows()])
                .collect();
            {
                let mut products: Vec<(&Matrix, &mut [f32])> = mats
                    .iter()
                    .zip(ys.iter_mut())
                    .map(|((w, _), y)| (w, y.as_mut_slice()))
                    .collect();
                matmul_t_many(&mut products, &x, m);
            }
            for ((w, dense), y) in mats.iter().zip(&ys) {
                let want = naive(&x, dense, m, w.rows(), k);
                for (a, b) in y.iter().zip(&want) {
                    assert!(
                        (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                        "m={m}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
