//! Selective global re-encoding on the GPU (issue 14; the algorithm, its selection rule
//! and its CPU version are [`crate::star::reencode`]).
//!
//! 1. Selection: the document's tokens through layer 0 with plain causal attention (a
//!    [`GpuKvCache`] of two layers), stopped once layer 1's K and V are written; the
//!    ranking against phase 1's layer-1 KV is the CPU's ([`most_deviating`]).
//! 2. Re-encoding: the selected tokens through every layer. Each layer's new K/V rows
//!    land in a compact buffer, are scattered to their positions in a device copy of the
//!    document's KV (phase 1's, uploaded once), and each token attends to the document's
//!    keys up to its own position. That limit differs per row, which the segment kernels
//!    cannot express, so `kernels/reencode.cu` holds its own (CUDA-core) attention kernel
//!    and the scatter; NVRTC compiles it here, once per context, 16-bit type and head
//!    dimension.
//!
//! The compact buffers hold every layer's new rows at the end; only they are downloaded.
//!
//! Two entries: [`reencode`] over host blocks (uploads phase 1's KV of the whole document
//! first: a round trip of every block, which costs more than the pass on a small model)
//! and [`reencode_document`] over a document whose phase-1 KV is still on the device
//! (the ingest path: phase 1 writes into it, the store gets one download of the result).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

use super::attention::KvDest;
use super::block::GpuBlock;
use super::device::{DevBuf, Gpu, HalfType};
use super::kernels::{COMMON_SOURCE, Kernels};
use super::model::{CudaLlama, GpuAttention, GpuKvCache};
use super::{CudaError, Result};
use crate::partial::HeadShape;
use crate::star::BlockKv;
use crate::star::reencode::{Reencoded, check_positions, layer_token_major, most_deviating, plan};

/// The kernel source (see the module doc).
pub const REENCODE_SOURCE: &str = include_str!("kernels/reencode.cu");

/// Threads of one `reencode_attn` CTA (`RE_WARPS` warps in the source).
const ATTN_THREADS: u32 = 128;

struct ReencodeKernels {
    scatter: CudaFunction,
    attn: CudaFunction,
}

type KernelCache = Mutex<HashMap<(usize, HalfType, usize), Arc<ReencodeKernels>>>;

/// The compiled kernels for `gpu` and `head_dim`. Keyed by the context's address: the
/// cached module holds the context, so the address is not reused while it is cached.
fn kernels(gpu: &Gpu, head_dim: usize) -> Result<Arc<ReencodeKernels>> {
    static CACHE: OnceLock<KernelCache> = OnceLock::new();
    let key = (Arc::as_ptr(&gpu.ctx) as usize, gpu.dtype, head_dim);
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    if let Some(k) = cache.get(&key) {
        return Ok(k.clone());
    }
    let mut options = vec![format!("-DHEAD_DIM={head_dim}"), "--std=c++17".into()];
    if gpu.dtype == HalfType::BF16 {
        options.push("-DDT_BF16".into());
    }
    let text = format!("{COMMON_SOURCE}\n#line 1 \"reencode.cu\"\n{REENCODE_SOURCE}");
    let ptx = compile_ptx_with_opts(
        text,
        CompileOptions {
            arch: Some(gpu.arch),
            options,
            name: Some("starkv_reencode.cu".into()),
            ..Default::default()
        },
    )
    .map_err(|e| CudaError::Nvrtc(format!("reencode.cu: {e}")))?;
    let module = gpu.ctx.load_module(ptx)?;
    let k = Arc::new(ReencodeKernels {
        scatter: module.load_function("reencode_scatter")?,
        attn: module.load_function("reencode_attn")?,
    });
    cache.insert(key, k.clone());
    Ok(k)
}

/// [`crate::star::reencode::reencode`] on the GPU: re-encodes the `ratio` of the tokens
/// at `exact_until..` whose phase-1 KV deviates most, in place in `blocks` (every block
/// of the document, in order, in host memory).
pub fn reencode(
    model: &mut CudaLlama,
    tokens: &[u32],
    blocks: &mut [BlockKv],
    exact_until: usize,
    ratio: f32,
) -> Result<Reencoded> {
    let (candidates, want) = plan(tokens, blocks, exact_until, ratio)?;
    if want == 0 || model.config().n_layers < 2 {
        return Ok(Reencoded {
            tokens: 0,
            candidates,
        });
    }
    let shape = model.head_shape();
    let (k1, v1) = layer_one(model, tokens)?;
    let (pk, pv) = layer_token_major(blocks, 1, shape);
    let selected = most_deviating((&k1, &v1), (&pk, &pv), shape.kv_width(), exact_until, want);
    reencode_positions(model, tokens, blocks, &selected)?;
    Ok(Reencoded {
        tokens: selected.len(),
        candidates,
    })
}

/// Layer 0 through [`GpuKvCache`]'s causal attention; stops at layer 1's attention, once
/// its K and V are written.
struct LayerOneProbe {
    cache: GpuKvCache,
}

impl GpuAttention for LayerOneProbe {
    fn begin(&mut self, gpu: &Gpu, m: usize) -> Result<()> {
        self.cache.begin(gpu, m)
    }

    fn kv_dest(&mut self, layer: usize) -> KvDest {
        self.cache.kv_dest(layer)
    }

    fn attend(
        &mut self,
        gpu: &Gpu,
        kernels: &Kernels,
        layer: usize,
        q: u64,
        m: usize,
        out: u64,
    ) -> Result<()> {
        if layer >= 1 {
            return Err(CudaError::Compute(crate::Error::Cancelled));
        }
        self.cache.attend(gpu, kernels, layer, q, m, out)
    }

    fn finish(&mut self, m: usize) {
        self.cache.finish(m)
    }
}

/// Layer 1's K and V of every token (token-major `[L][kv_width]`, f32) under full causal
/// attention in layer 0 (what [`crate::star::reencode::layer_one`] computes on the CPU).
pub fn layer_one(model: &mut CudaLlama, tokens: &[u32]) -> Result<(Vec<f32>, Vec<f32>)> {
    let (shape, n) = (model.head_shape(), tokens.len());
    if model.config().n_layers < 2 || n == 0 {
        return Err(CudaError::Invalid(
            "layer 1 of an empty document or a one-layer model".into(),
        ));
    }
    let gpu = model.gpu().clone();
    let mut probe = LayerOneProbe {
        cache: GpuKvCache::new(&gpu, 2, shape, n)?,
    };
    let positions: Vec<usize> = (0..n).collect();
    match model.forward(tokens, &positions, &mut probe) {
        Err(CudaError::Compute(crate::Error::Cancelled)) => {}
        Err(e) => return Err(e),
        Ok(()) => return Err(CudaError::Invalid("the probe ran past layer 1".into())),
    }
    probe.cache.finish(n);
    let (k, v) = probe.cache.download_layer(&gpu, 1)?;
    Ok((token_major(&k, shape, n), token_major(&v, shape, n)))
}

/// `[n_kv][n][d]` to `[n][n_kv * d]`.
fn token_major(x: &[f32], shape: HeadShape, n: usize) -> Vec<f32> {
    let (d, kvw) = (shape.head_dim, shape.kv_width());
    let mut out = vec![0f32; n * kvw];
    for h in 0..shape.n_kv_heads {
        for t in 0..n {
            let src = (h * n + t) * d;
            out[t * kvw + h * d..t * kvw + (h + 1) * d].copy_from_slice(&x[src..src + d]);
        }
    }
    out
}

/// The selected tokens' pass: new K/V rows to `fresh`, scattered into `doc`, attention
/// with a limit per row.
struct SelectedRows<'a> {
    kernels: &'a ReencodeKernels,
    /// Per layer: the document's K and V (device pointers), `[n_kv][len][d]`.
    doc: &'a [(u64, u64)],
    /// Per layer: the selected tokens' new K and V, `[n_kv][m][d]`.
    fresh: &'a [(DevBuf, DevBuf)],
    /// The selected positions (i32, increasing).
    positions: u64,
    len: usize,
    m: usize,
    shape: HeadShape,
}

impl GpuAttention for SelectedRows<'_> {
    fn begin(&mut self, _gpu: &Gpu, m: usize) -> Result<()> {
        if m != self.m {
            return Err(CudaError::Invalid(format!(
                "{m} tokens for {} re-encoded positions",
                self.m
            )));
        }
        Ok(())
    }

    fn kv_dest(&mut self, layer: usize) -> KvDest {
        let (k, v) = &self.fresh[layer];
        KvDest {
            k: k.ptr(),
            v: v.ptr(),
            head_stride: (self.m * self.shape.head_dim) as i64,
            row_stride: self.shape.head_dim as i32,
            t0: 0,
            t0_dev: 0,
        }
    }

    fn attend(
        &mut self,
        gpu: &Gpu,
        _kernels: &Kernels,
        layer: usize,
        q: u64,
        m: usize,
        out: u64,
    ) -> Result<()> {
        let ((dk, dv), (fk, fv)) = (self.doc[layer], &self.fresh[layer]);
        let (fk, fv) = (fk.ptr(), fv.ptr());
        let (m_i, len_i) = (m as i32, self.len as i32);
        let shape = self.shape;
        let stream = gpu.exec_stream();
        let mut b = stream.launch_builder(&self.kernels.scatter);
        b.arg(&dk)
            .arg(&dv)
            .arg(&fk)
            .arg(&fv)
            .arg(&self.positions)
            .arg(&m_i)
            .arg(&len_i);
        // SAFETY: doc holds n_kv x len rows and fresh n_kv x m rows of head_dim values;
        // every position is below len (checked by the caller).
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (m as u32, shape.n_kv_heads as u32, 1),
                block_dim: (shape.head_dim as u32, 1, 1),
                shared_mem_bytes: 0,
            })?
        };
        let scale_log2 = (1.0 / (shape.head_dim as f64).sqrt() * std::f64::consts::LOG2_E) as f32;
        let (nh_i, nkv_i) = (shape.n_heads as i32, shape.n_kv_heads as i32);
        let mut b = stream.launch_builder(&self.kernels.attn);
        b.arg(&out)
            .arg(&q)
            .arg(&dk)
            .arg(&dv)
            .arg(&self.positions)
            .arg(&m_i)
            .arg(&nh_i)
            .arg(&nkv_i)
            .arg(&len_i)
            .arg(&scale_log2);
        // SAFETY: q and out hold m rows of n_heads x head_dim values; the document as above.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (m as u32, shape.n_heads as u32, 1),
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: 0,
            })?
        };
        Ok(())
    }

    fn finish(&mut self, _m: usize) {}
}

/// [`crate::star::reencode::reencode_positions`] on the GPU: the tokens at `positions`
/// (increasing) through every layer with attention over all tokens up to their own
/// position; their new KV replaces phase 1's in `blocks`.
pub fn reencode_positions(
    model: &mut CudaLlama,
    tokens: &[u32],
    blocks: &mut [BlockKv],
    positions: &[usize],
) -> Result<()> {
    plan(tokens, blocks, 0, 0.0)?;
    check_positions(positions, tokens.len())?;
    if positions.is_empty() {
        return Ok(());
    }
    let gpu = model.gpu().clone();
    let (shape, n_layers) = (model.head_shape(), model.config().n_layers);
    let (len, m, d) = (tokens.len(), positions.len(), shape.head_dim);
    // Phase 1's KV of the whole document, head-major per layer.
    let doc_bytes = shape.n_kv_heads * len * d * 2;
    let mut host = vec![0f32; shape.n_kv_heads * len * d];
    let mut half = vec![0u16; host.len()];
    let mut doc = Vec::with_capacity(n_layers);
    for l in 0..n_layers {
        let pair = (gpu.alloc(doc_bytes)?, gpu.alloc(doc_bytes)?);
        for (which, dst) in [(0, &pair.0), (1, &pair.1)] {
            for b in blocks.iter() {
                let src = if which == 0 {
                    &b.layers[l].0
                } else {
                    &b.layers[l].1
                };
                for h in 0..shape.n_kv_heads {
                    let at = (h * len + b.start) * d;
                    host[at..at + b.len * d]
                        .copy_from_slice(&src[h * b.len * d..(h + 1) * b.len * d]);
                }
            }
            gpu.dtype.encode(&host, &mut half);
            gpu.upload(dst.ptr(), &half)?;
            // The upload stages the host data before returning: `half` may be reused.
        }
        doc.push(pair);
    }
    let ptrs: Vec<(u64, u64)> = doc.iter().map(|(k, v)| (k.ptr(), v.ptr())).collect();
    let fresh = selected_pass(model, tokens, &ptrs, positions)?;
    // Every layer's new rows, into the blocks.
    let mut tmp = vec![0u16; shape.n_kv_heads * m * d];
    let (mut kf, mut vf) = (vec![0f32; tmp.len()], vec![0f32; tmp.len()]);
    for (l, (fk, fv)) in fresh.iter().enumerate() {
        gpu.download(&mut tmp, fk.ptr())?;
        gpu.dtype.decode(&tmp, &mut kf);
        gpu.download(&mut tmp, fv.ptr())?;
        gpu.dtype.decode(&tmp, &mut vf);
        let mut bi = 0;
        for (t, &p) in positions.iter().enumerate() {
            while blocks[bi].start + blocks[bi].len <= p {
                bi += 1;
            }
            let b = &mut blocks[bi];
            let (r, blen) = (p - b.start, b.len);
            let (bk, bv) = &mut b.layers[l];
            for h in 0..shape.n_kv_heads {
                let (dst, src) = ((h * blen + r) * d, (h * m + t) * d);
                bk[dst..dst + d].copy_from_slice(&kf[src..src + d]);
                bv[dst..dst + d].copy_from_slice(&vf[src..src + d]);
            }
        }
    }
    Ok(())
}

/// The selected tokens through every layer over the document's KV `doc` (per layer
/// device pointers, `[n_kv][len][d]`, `len = tokens.len()`): each layer's new rows are
/// scattered into `doc` before that layer's attention, so afterwards `doc` holds the
/// re-encoded KV. Returns the compact per-layer copies of the new rows, `[n_kv][m][d]`.
fn selected_pass(
    model: &mut CudaLlama,
    tokens: &[u32],
    doc: &[(u64, u64)],
    positions: &[usize],
) -> Result<Vec<(DevBuf, DevBuf)>> {
    let gpu = model.gpu().clone();
    let (shape, n_layers) = (model.head_shape(), model.config().n_layers);
    let (len, m, d) = (tokens.len(), positions.len(), shape.head_dim);
    if doc.len() != n_layers {
        return Err(CudaError::Invalid(format!(
            "{} document layers for a model of {n_layers}",
            doc.len()
        )));
    }
    let kernels = kernels(&gpu, d)?;
    let fresh_bytes = shape.n_kv_heads * m * d * 2;
    let fresh = (0..n_layers)
        .map(|_| Ok((gpu.alloc(fresh_bytes)?, gpu.alloc(fresh_bytes)?)))
        .collect::<Result<Vec<_>>>()?;
    let pos_i32: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
    let pos_dev = gpu.upload_new(&pos_i32)?;
    let ids: Vec<u32> = positions.iter().map(|&p| tokens[p]).collect();
    let mut pass = SelectedRows {
        kernels: &kernels,
        doc,
        fresh: &fresh,
        positions: pos_dev.ptr(),
        len,
        m,
        shape,
    };
    model.forward(&ids, positions, &mut pass)?;
    Ok(fresh)
}

/// [`reencode`] over a document whose phase-1 KV is already on the device (`doc`: one
/// 16-bit block of every token, start 0), in place there: no host copy of phase 1 and no
/// upload. The ingest path: phase 1 writes its blocks into `doc` on the device, this
/// pass fixes the selected rows, and the blocks are downloaded once for the store
/// ([`GpuBlock::download_split`]), as without re-encoding. Selection and pass are those
/// of [`reencode`] (the same positions and KV from the same phase-1 values).
pub fn reencode_document(
    model: &mut CudaLlama,
    tokens: &[u32],
    doc: &GpuBlock,
    exact_until: usize,
    ratio: f32,
) -> Result<Reencoded> {
    if doc.start != 0 || doc.len != tokens.len() || doc.is_8bit() {
        return Err(CudaError::Invalid(format!(
            "re-encoding needs the whole document's 16-bit KV ({} of {} tokens)",
            doc.len,
            tokens.len()
        )));
    }
    if !(0.0..=1.0).contains(&ratio) {
        return Err(CudaError::Invalid(format!(
            "re-encode ratio {ratio} is outside 0..=1"
        )));
    }
    let candidates = tokens.len().saturating_sub(exact_until);
    let want = ((candidates as f64) * ratio as f64).ceil() as usize;
    let n_layers = model.config().n_layers;
    if want == 0 || n_layers < 2 {
        return Ok(Reencoded {
            tokens: 0,
            candidates,
        });
    }
    let (gpu, shape) = (model.gpu().clone(), model.head_shape());
    let (k1, v1) = layer_one(model, tokens)?;
    let (pk, pv) = doc_layer_token_major(&gpu, doc, 1)?;
    let selected = most_deviating((&k1, &v1), (&pk, &pv), shape.kv_width(), exact_until, want);
    let ptrs: Vec<(u64, u64)> = (0..n_layers).map(|l| doc.layer_ptrs(l)).collect();
    selected_pass(model, tokens, &ptrs, &selected)?;
    Ok(Reencoded {
        tokens: selected.len(),
        candidates,
    })
}

/// Layer `layer` of a device block as f32 token-major `[len][kv_width]`.
fn doc_layer_token_major(gpu: &Gpu, doc: &GpuBlock, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let (shape, n) = (doc.shape, doc.len);
    let (k, v) = doc.layer_ptrs(layer);
    let mut tmp = vec![0u16; shape.n_kv_heads * n * shape.head_dim];
    let mut x = vec![0f32; tmp.len()];
    let mut out = Vec::with_capacity(2);
    for ptr in [k, v] {
        gpu.download(&mut tmp, ptr)?;
        gpu.dtype.decode(&tmp, &mut x);
        out.push(token_major(&x, shape, n));
    }
    let v = out.pop().expect("two");
    let k = out.pop().expect("two");
    Ok((k, v))
}

#[cfg(test)]
mod tests {
    use super::REENCODE_SOURCE;

    /// Every kernel this module loads is declared in its source (a missing one would
    /// fail only at run time, on a GPU).
    #[test]
    fn the_source_declares_both_kernels() {
        for name in ["reencode_scatter", "reencode_attn"] {
            let plain = format!("extern \"C\" __global__ void {name}(");
            let bounded = format!("__launch_bounds__(32 * RE_WARPS) {name}(");
            assert!(
                REENCODE_SOURCE.contains(&plain) || REENCODE_SOURCE.contains(&bounded),
                "{name} is not declared in reencode.cu"
            );
        }
    }
}
