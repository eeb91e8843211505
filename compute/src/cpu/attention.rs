//! Attention with its log-sum-exp, the kernel Star Attention is built on.
//!
//! For every head and query row the kernel returns the softmax-weighted sum of values `O`
//! and the natural-log log-sum-exp `lse` of the scaled scores. Two results over disjoint
//! key sets merge exactly into the result over their union (see [`merge_into`]), which is
//! how context blocks, shards and a query's own tokens are combined.
//!
//! Work is split over (KV head, tile of `Q_TILE` query rows); each task walks the keys in
//! tiles of `K_TILE` with an online softmax (running max and sum), computing scores and
//! the value update with `gemm`, so memory use is independent of the key count.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::matmul::{Transpose, gemm_f32, gemm_f32_acc};
use super::ops::{exp_shifted_sum, scale_mask_max};
use crate::kv8::{Kv8, dequantize_rows};
pub use crate::partial::{Attended, HeadShape, merge_into};

const Q_TILE: usize = 32;
const K_TILE: usize = 256;
/// Keys per chunk when a few query rows are split over the keys (see `attention_into`).
const SPLIT_CHUNK: usize = 512;

/// Borrowed keys and values: element `(head, token, i)` is at
/// `head * head_stride + token * row_stride + i`, for tokens `0..len`.
///
/// Two layouts occur: token-major rows straight out of the projections
/// (`row_stride = n_kv * head_dim`, `head_stride = head_dim`) and head-major cache storage
/// (`row_stride = head_dim`, `head_stride = capacity * head_dim`).
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub len: usize,
    pub row_stride: usize,
    pub head_stride: usize,
}

/// Borrowed 8-bit keys and values of one block layer (head-major `[heads][block_len]
/// [head_dim]` with per-row-group scales, see [`Kv8`]): tokens `first..first + len`.
#[derive(Clone, Copy)]
pub struct Kv8View<'a> {
    pub k: &'a Kv8,
    pub v: &'a Kv8,
    pub first: usize,
    pub len: usize,
    pub block_len: usize,
    pub head_dim: usize,
}

/// Borrowed f16 keys and values of one block layer (a block loaded from an f16 store on
/// a CPU host, kept in the stored precision): the layout of [`KvView`].
#[derive(Clone, Copy)]
pub struct Kv16View<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub len: usize,
    pub row_stride: usize,
    pub head_stride: usize,
}

/// Keys and values in the precision they are held in.
#[derive(Clone, Copy)]
pub enum KvSource<'a> {
    F32(KvView<'a>),
    /// Dequantised one key tile at a time inside the attention loop.
    I8(Kv8View<'a>),
    /// Widened to f32 one key tile at a time inside the attention loop (half the bytes
    /// read of f32; exact: every f16 is an f32).
    F16(Kv16View<'a>),
}

impl<'a> KvSource<'a> {
    fn len(&self) -> usize {
        match self {
            KvSource::F32(v) => v.len,
            KvSource::I8(v) => v.len,
            KvSource::F16(v) => v.len,
        }
    }

    /// Tokens `c0..c0 + n` of this source.
    fn chunk(&self, c0: usize, n: usize) -> Self {
        match *self {
            KvSource::F32(kv) => KvSource::F32(KvView {
                k: &kv.k[c0 * kv.row_stride..],
                v: &kv.v[c0 * kv.row_stride..],
                len: n,
                ..kv
            }),
            KvSource::I8(kv) => KvSource::I8(Kv8View {
                first: kv.first + c0,
                len: n,
                ..kv
            }),
            KvSource::F16(kv) => KvSource::F16(Kv16View {
                k: &kv.k[c0 * kv.row_stride..],
                v: &kv.v[c0 * kv.row_stride..],
                len: n,
                ..kv
            }),
        }
    }
}

/// Which keys a query row may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mask {
    /// Every key (context blocks seen from later tokens).
    None,
    /// Query row `i` sees keys `0..=i + offset` (a sequence continuing after `offset` keys).
    Causal { offset: usize },
}

/// Computes attention of `q` (`[m][n_heads * head_dim]`) over `kv` with `mask`, scaling
/// scores by `scale`.
pub fn attention(
    q: &[f32],
    m: usize,
    kv: KvView<'_>,
    shape: HeadShape,
    mask: Mask,
    scale: f32,
) -> Attended {
    let mut res = Attended::empty(m, shape);
    attention_into(q, m, kv, shape, mask, scale, &mut res.out, &mut res.lse);
    res
}

/// As [`attention`], writing into `out` and `lse` (previous contents are overwritten).
#[allow(clippy::too_many_arguments)]
pub fn attention_into(
    q: &[f32],
    m: usize,
    kv: KvView<'_>,
    shape: HeadShape,
    mask: Mask,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
) {
    attention_source_into(q, m, KvSource::F32(kv), shape, mask, scale, out, lse)
}

/// As [`attention_into`] over keys and values in either precision: 8-bit ones are
/// dequantised one key tile at a time into a per-task scratch of `K_TILE` rows.
#[allow(clippy::too_many_arguments)]
pub fn attention_source_into(
    q: &[f32],
    m: usize,
    kv: KvSource<'_>,
    shape: HeadShape,
    mask: Mask,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let d = shape.head_dim;
    assert_eq!(q.len(), m * shape.q_width(), "attention: q shape");
    assert_eq!(out.len(), m * shape.q_width(), "attention: out shape");
    assert_eq!(lse.len(), m * shape.n_heads, "attention: lse shape");
    assert!(
        shape.n_heads.is_multiple_of(shape.n_kv_heads),
        "attention: heads not a multiple of kv heads"
    );
    match kv {
        KvSource::F32(kv) if kv.len > 0 => {
            let last = (shape.n_kv_heads - 1) * kv.head_stride + (kv.len - 1) * kv.row_stride + d;
            assert!(
                kv.k.len() >= last && kv.v.len() >= last,
                "attention: kv view out of bounds"
            );
        }
        KvSource::F16(kv) if kv.len > 0 => {
            let last = (shape.n_kv_heads - 1) * kv.head_stride + (kv.len - 1) * kv.row_stride + d;
            assert!(
                kv.k.len() >= last && kv.v.len() >= last,
                "attention: f16 kv view out of bounds"
            );
        }
        KvSource::I8(kv) => {
            let rows = shape.n_kv_heads * kv.block_len;
            assert!(
                kv.head_dim == d
                    && kv.first + kv.len <= kv.block_len
                    && kv.k.q.len() == rows * d
                    && kv.v.q.len() == rows * d
                    && kv.k.scales.len() * kv.k.rows_per_scale >= rows
                    && kv.v.scales.len() * kv.v.rows_per_scale >= rows,
                "attention: 8-bit kv view out of bounds"
            );
        }
        _ => {}
    }
    let kv_len = kv.len();
    let n_tiles = m.div_ceil(Q_TILE);
    // Few query rows over many keys (decoding): (KV head, tile) tasks are too few to keep
    // every thread busy, so the keys are split into chunks attended in parallel and their
    // (O, lse) merged exactly, as flash-decoding does.
    let n_chunks = kv_len.div_ceil(SPLIT_CHUNK);
    let splittable = match mask {
        Mask::None => true,
        // Every chunk must start at a key row 0 can see, so each chunk's mask is causal
        // with a non-negative offset.
        Mask::Causal { offset } => (n_chunks.max(1) - 1) * SPLIT_CHUNK <= offset,
    };
    if shape.n_kv_heads * n_tiles < 2 * rayon::current_num_threads() && n_chunks >= 2 && splittable
    {
        // One task per (chunk, KV head, query tile), flat (no nested parallel loops):
        // each writes its own partial result, merged exactly in chunk order.
        let tasks_per_chunk = shape.n_kv_heads * n_tiles;
        let mut parts: Vec<Attended> = (0..n_chunks).map(|_| Attended::empty(m, shape)).collect();
        let ptrs: Vec<(SyncPtr, SyncPtr)> = parts
            .iter_mut()
            .map(|p| (SyncPtr(p.out.as_mut_ptr()), SyncPtr(p.lse.as_mut_ptr())))
            .collect();
        (0..n_chunks * tasks_per_chunk)
            .into_par_iter()
            .for_each(|task| {
                let (c, rest) = (task / tasks_per_chunk, task % tasks_per_chunk);
                let (kv_head, tile) = (rest / n_tiles, rest % n_tiles);
                let c0 = c * SPLIT_CHUNK;
                let chunk = kv.chunk(c0, SPLIT_CHUNK.min(kv_len - c0));
                let chunk_mask = match mask {
                    Mask::None => Mask::None,
                    Mask::Causal { offset } => Mask::Causal {
                        offset: offset - c0,
                    },
                };
                let q0 = tile * Q_TILE;
                let rows = Q_TILE.min(m - q0);
                let (out_c, lse_c) = ptrs[c];
                // SAFETY: each task owns rows q0..q0 + rows of the query heads of
                // `kv_head` in chunk c's partial result, which outlives the loop.
                unsafe {
                    attend_tile(
                        q, q0, rows, kv_head, chunk, shape, chunk_mask, scale, out_c, lse_c, m,
                    )
                };
            });
        let mut acc = Attended::empty(m, shape);
        for part in &parts {
            merge_into(&mut acc, part, m, shape);
        }
        out.copy_from_slice(&acc.out);
        lse.copy_from_slice(&acc.lse);
        return;
    }
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let lse_ptr = SyncPtr(lse.as_mut_ptr());
    (0..shape.n_kv_heads * n_tiles)
        .into_par_iter()
        .for_each(|task| {
            let (kv_head, tile) = (task / n_tiles, task % n_tiles);
            let q0 = tile * Q_TILE;
            let rows = Q_TILE.min(m - q0);
            // SAFETY: each task owns rows q0..q0 + rows of the query heads of `kv_head`.
            unsafe {
                attend_tile(
                    q, q0, rows, kv_head, kv, shape, mask, scale, out_ptr, lse_ptr, m,
                )
            };
        });
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: only used to give rayon tasks disjoint output regions.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// One (KV head, query tile) of the online-softmax loop. The query heads that share the KV
/// head (grouped-query attention) are packed into one `[group * rows][head_dim]` matrix,
/// so each key and value tile is read once for the whole group.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_tile(
    q: &[f32],
    q0: usize,
    rows: usize,
    kv_head: usize,
    kv: KvSource<'_>,
    shape: HeadShape,
    mask: Mask,
    scale: f32,
    out: SyncPtr,
    lse: SyncPtr,
    m: usize,
) {
    let kv_len = kv.len();
    let d = shape.head_dim;
    let qw = shape.q_width();
    let group = shape.group();
    let packed = group * rows;
    // Row `g * rows + r` is query token q0 + r of head kv_head * group + g.
    let mut q_pack = vec![0f32; packed * d];
    for g in 0..group {
        let h = kv_head * group + g;
        for r in 0..rows {
            let src = (q0 + r) * qw + h * d;
            q_pack[(g * rows + r) * d..(g * rows + r + 1) * d].copy_from_slice(&q[src..src + d]);
        }
    }
    // Keys visible to the last row of the tile bound the loop.
    let n_keys = match mask {
        Mask::None => kv_len,
        Mask::Causal { offset } => kv_len.min(q0 + rows + offset),
    };
    let mut acc = vec![0f32; packed * d];
    let mut row_max = vec![f32::NEG_INFINITY; packed];
    let mut row_sum = vec![0f32; packed];
    let mut scores = vec![0f32; packed * K_TILE];
    // Few rows over f16 keys (decoding): scores and values straight from the f16 rows.
    let direct = match kv {
        KvSource::F16(kv) if f16_rows::supported(packed, d) => Some(kv),
        _ => None,
    };
    // Otherwise an 8-bit or f16 source is widened tile by tile into this scratch.
    let mut tile_buf = match kv {
        KvSource::I8(_) | KvSource::F16(_) if direct.is_none() => {
            vec![0f32; K_TILE.min(n_keys) * d]
        }
        _ => Vec::new(),
    };
    for k0 in (0..n_keys).step_by(K_TILE) {
        let kc = K_TILE.min(n_keys - k0);
        let direct_base = direct.map(|kv| (kv, kv_head * kv.head_stride + k0 * kv.row_stride));
        // Keys k0..k0 + kc of this head: a pointer and a row stride.
        let tile = |which: usize, buf: &mut Vec<f32>| -> (*const f32, usize) {
            match kv {
                KvSource::F32(kv) => {
                    let x = if which == 0 { kv.k } else { kv.v };
                    (
                        x[kv_head * kv.head_stride + k0 * kv.row_stride..].as_ptr(),
                        kv.row_stride,
                    )
                }
                KvSource::I8(kv) => {
                    let x = if which == 0 { kv.k } else { kv.v };
                    let first = kv_head * kv.block_len + kv.first + k0;
                    dequantize_rows(x, d, first, kc, &mut buf[..kc * d]);
                    (buf.as_ptr(), d)
                }
                KvSource::F16(kv) => {
                    let x = if which == 0 { kv.k } else { kv.v };
                    let base = kv_head * kv.head_stride + k0 * kv.row_stride;
                    for r in 0..kc {
                        let row = &x[base + r * kv.row_stride..][..d];
                        row.convert_to_f32_slice(&mut buf[r * d..(r + 1) * d]);
                    }
                    (buf.as_ptr(), d)
                }
            }
        };
        if let Some((kv, base)) = direct_base {
            f16_rows::scores(
                &q_pack,
                packed,
                d,
                &kv.k[base..],
                kv.row_stride,
                kc,
                &mut scores,
            );
        } else {
            let (k_ptr, k_stride) = tile(0, &mut tile_buf);
            // SAFETY: shapes were checked by the caller; scores holds packed x kc.
            unsafe {
                gemm_f32(
                    packed,
                    kc,
                    d,
                    scores.as_mut_ptr(),
                    kc,
                    q_pack.as_ptr(),
                    d,
                    k_ptr,
                    Transpose::Yes(k_stride),
                );
            }
        }
        for p in 0..packed {
            let r = p % rows;
            let s = &mut scores[p * kc..(p + 1) * kc];
            let visible = match mask {
                Mask::None => kc,
                Mask::Causal { offset } => (q0 + r + offset + 1).saturating_sub(k0).min(kc),
            };
            let tile_max = scale_mask_max(s, visible, scale);
            let new_max = row_max[p].max(tile_max);
            if new_max == f32::NEG_INFINITY {
                // Nothing visible yet: keep the zero accumulator, zero this row's weights.
                s.fill(0.0);
                continue;
            }
            let correction = super::ops::exp_approx(row_max[p] - new_max);
            let tile_sum = exp_shifted_sum(s, new_max);
            row_sum[p] = row_sum[p] * correction + tile_sum;
            row_max[p] = new_max;
            if correction != 1.0 {
                for a in &mut acc[p * d..(p + 1) * d] {
                    *a *= correction;
                }
            }
        }
        if let Some((kv, base)) = direct_base {
            f16_rows::accumulate(
                &scores,
                packed,
                kc,
                &kv.v[base..],
                kv.row_stride,
                d,
                &mut acc,
            );
            continue;
        }
        let (v_ptr, v_stride) = tile(1, &mut tile_buf);
        // SAFETY: as above; acc holds packed x d.
        unsafe {
            gemm_f32_acc(
                packed,
                d,
                kc,
                acc.as_mut_ptr(),
                d,
                scores.as_ptr(),
                kc,
                v_ptr,
                Transpose::No(v_stride),
            );
        }
    }
    for p in 0..packed {
        let (g, r) = (p / rows, p % rows);
        let (h, i) = (kv_head * group + g, q0 + r);
        let (value, inv) = if row_sum[p] > 0.0 {
            (row_max[p] + row_sum[p].ln(), 1.0 / row_sum[p])
        } else {
            (f32::NEG_INFINITY, 0.0)
        };
        // SAFETY: this task owns row i of head h.
        unsafe {
            *lse.get().add(h * m + i) = value;
            let dst = out.get().add(i * qw + h * d);
            for c in 0..d {
                *dst.add(c) = acc[p * d + c] * inv;
            }
        }
    }
}

mod f16_rows;

#[cfg(test)]
mod tests;
