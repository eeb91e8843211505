//! A GPU's blocks behind the shard seam ([`AttentionShard`]): one `GpuShard` per GPU of
//! a host answers a layer's Q from any query host with `(O, lse)`.
//!
//! Two ways in. The host path ([`GpuShard::try_attend`], the seam's `start`) takes Q in
//! f32 from the host and hands `(O, lse)` back in host memory: what a remote worker
//! needs. The device path ([`GpuShard::attend_on`]) is the same-host device channel of
//! `docs/cluster.md` for a query running in this process on the same GPU context (an
//! in-process worker sharing the query's GPU): Q, `(O, lse)` and the merge stay on the
//! device, launched on the query's own stream, with no copy and no synchronisation.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, PoisonError};

use super::Result;
use super::attention::{AttnOut, SegmentAttention};
use super::block::GpuBlock;
use super::device::{DevBuf, Gpu, PinnedBuf};
use super::kernels::Kernels;
use crate::partial::{Attended, HeadShape};
use crate::star::{AttentionShard, BlockKv, PendingPartial};

/// Blocks held by one GPU behind the shard seam: attention without a mask over this
/// GPU's blocks, returning `(O, lse)` for an exact merge. Cheap to clone (shared state).
#[derive(Clone)]
pub struct GpuShard(Arc<ShardInner>);

struct ShardInner {
    gpu: Arc<Gpu>,
    kernels: Arc<Kernels>,
    blocks: Vec<Arc<GpuBlock>>,
    shape: HeadShape,
    /// Softmax scale factor: 1, or `1 / T` for the tempered group of a merge.
    score_scale: f32,
    host: Mutex<HostScratch>,
    device: Mutex<DevicePlans>,
}

/// Buffers of the host path, reused call after call.
#[derive(Default)]
struct HostScratch {
    /// Page-locked `[q | out | lse]` in f32: Q goes up and `(O, lse)` come down
    /// asynchronously, so a call waits on its stream once (pageable copies would each
    /// wait, and on a GPU shared by several processes every wait can cost a context
    /// switch).
    staging: Option<PinnedBuf>,
    q32: Option<DevBuf>,
    q16: Option<DevBuf>,
    out: Option<DevBuf>,
    lse: Option<DevBuf>,
    plans: LayerPlans,
}

/// The device path's plans: launched on the caller's stream, so kept apart from the host
/// path's (whose buffers its own stream reuses).
#[derive(Default)]
struct DevicePlans {
    plans: LayerPlans,
    /// Whether this shard's own streams were drained once (its blocks were uploaded on
    /// them; the caller's stream cannot wait on their events).
    drained: bool,
}

/// Every layer planned once per split count (a query plans the prefill's count once and
/// the decode steps' count once, instead of one plan upload per layer and call).
#[derive(Default)]
struct LayerPlans(HashMap<usize, SegmentAttention>);

impl LayerPlans {
    fn for_splits(
        &mut self,
        gpu: &Gpu,
        shape: HeadShape,
        blocks: &[Arc<GpuBlock>],
        splits: usize,
    ) -> Result<&mut SegmentAttention> {
        match self.0.entry(splits) {
            Entry::Occupied(planned) => Ok(planned.into_mut()),
            Entry::Vacant(slot) => {
                let n_layers = blocks.first().map_or(0, |b| b.n_layers());
                let mut attn = SegmentAttention::default();
                attn.plan(gpu, shape, n_layers, splits, |l| {
                    blocks.iter().map(|b| b.segment(l, None)).collect()
                })?;
                Ok(slot.insert(attn))
            }
        }
    }
}

impl GpuShard {
    pub fn new(gpu: Arc<Gpu>, blocks: Vec<Arc<GpuBlock>>, shape: HeadShape) -> Result<Self> {
        Self::scaled(gpu, blocks, shape, 1.0)
    }

    /// Blocks attended at softmax scale `score_scale / sqrt(d)` (`1 / T` for the tempered
    /// group of a [`crate::partial::ContextMerge`]; its `lse` in those units).
    pub fn scaled(
        gpu: Arc<Gpu>,
        blocks: Vec<Arc<GpuBlock>>,
        shape: HeadShape,
        score_scale: f32,
    ) -> Result<Self> {
        let kernels = gpu.kernels(shape.head_dim)?;
        Ok(Self(Arc::new(ShardInner {
            gpu,
            kernels,
            blocks,
            shape,
            score_scale,
            host: Mutex::default(),
            device: Mutex::default(),
        })))
    }

    /// Uploads CPU blocks to `gpu` and serves them.
    pub fn from_cpu_blocks(
        gpu: Arc<Gpu>,
        blocks: &[Arc<BlockKv>],
        shape: HeadShape,
    ) -> Result<Self> {
        let up = blocks
            .iter()
            .map(|b| Ok(Arc::new(GpuBlock::upload(&gpu, b)?)))
            .collect::<Result<Vec<_>>>()?;
        Self::new(gpu, up, shape)
    }

    /// Context tokens held.
    pub fn n_tokens(&self) -> usize {
        self.0.blocks.iter().map(|b| b.len).sum()
    }

    /// Whether `gpu` runs in this shard's CUDA context (the same device, same process):
    /// then [`GpuShard::attend_on`] can launch on `gpu`'s stream over these blocks.
    pub fn shares_context(&self, gpu: &Gpu) -> bool {
        self.0.gpu.ctx.cu_ctx() == gpu.ctx.cu_ctx()
    }

    /// Split count of an attention of `m` rows over this shard's keys. At least two: the
    /// f32 `(O, lse)` output is written by the merge kernel.
    fn splits(&self, gpu: &Gpu, m: usize) -> usize {
        let eight_bit = self.0.blocks.iter().any(|b| b.is_8bit());
        gpu.choose_splits_for(m, self.0.shape, self.n_tokens(), eight_bit)
            .max(2)
    }

    /// The host path: `q` (f32 `[m][n_heads d]`) of `layer` in, `(O, lse)` out, through
    /// this shard's own stream.
    pub fn try_attend(&self, layer: usize, q: &[f32], m: usize) -> Result<Attended> {
        let inner = &*self.0;
        let (gpu, s) = (&*inner.gpu, inner.shape);
        let (qw, nh) = (s.q_width(), s.n_heads);
        let mut st = inner.host.lock().unwrap_or_else(PoisonError::into_inner);
        gpu.ctx.bind_to_thread()?;
        let st = &mut *st;
        let grow = |b: &mut Option<DevBuf>, bytes: usize| DevBuf::grown(gpu, b, bytes);
        let q32 = grow(&mut st.q32, m * qw * 4)?;
        let q16 = grow(&mut st.q16, m * qw * 2)?;
        let out = grow(&mut st.out, m * qw * 4)?;
        let lse = grow(&mut st.lse, m * nh * 4)?;
        let (n_out, n_lse) = (m * qw, m * nh);
        let staged = (2 * n_out + n_lse) * 4;
        if st.staging.as_ref().is_none_or(|p| p.bytes() < staged) {
            st.staging = Some(PinnedBuf::new(gpu, staged.next_power_of_two())?);
        }
        let staging = st.staging.as_mut().expect("sized above");
        staging.as_f32_mut()[..n_out].copy_from_slice(q);
        gpu.upload_pinned(q32, staging, n_out * 4)?;
        gpu.to_half(&inner.kernels, q16, q32, n_out)?;
        let splits = self.splits(gpu, m);
        let attn = st.plans.for_splits(gpu, s, &inner.blocks, splits)?;
        let out32 = AttnOut::F32 { out, lse };
        attn.attend_scaled(gpu, &inner.kernels, layer, q16, m, inner.score_scale, out32)?;
        gpu.download_pinned(staging, n_out * 4, out, n_out * 4)?;
        gpu.download_pinned(staging, 2 * n_out * 4, lse, n_lse * 4)?;
        gpu.synchronize()?;
        let staged = &staging.as_f32_mut()[n_out..];
        let mut res = Attended::empty(m, s);
        res.out.copy_from_slice(&staged[..n_out]);
        res.lse.copy_from_slice(&staged[n_out..n_out + n_lse]);
        Ok(res)
    }

    /// The device path: `q` (16-bit `[m][n_heads d]`, on `gpu`) of `layer` into the f32
    /// `out` (`[m][n_heads d]`) and `lse` (`[n_heads][m]`) on `gpu`, launched on `gpu`'s
    /// execution stream, so it is ordered with the caller's work and needs no
    /// synchronisation. `gpu` must share this shard's context ([`GpuShard::shares_context`]).
    pub fn attend_on(
        &self,
        gpu: &Gpu,
        layer: usize,
        q: u64,
        m: usize,
        out: u64,
        lse: u64,
    ) -> Result<()> {
        let inner = &*self.0;
        if !self.shares_context(gpu) {
            return Err(super::CudaError::Invalid(
                "a device-path attend from another CUDA context".into(),
            ));
        }
        let mut st = inner.device.lock().unwrap_or_else(PoisonError::into_inner);
        if !st.drained {
            inner.gpu.copy_stream.synchronize()?;
            inner.gpu.stream.synchronize()?;
            st.drained = true;
        }
        let splits = self.splits(gpu, m);
        let attn = st
            .plans
            .for_splits(gpu, inner.shape, &inner.blocks, splits)?;
        let out32 = AttnOut::F32 { out, lse };
        attn.attend_scaled(gpu, &inner.kernels, layer, q, m, inner.score_scale, out32)
    }
}

impl AttentionShard for GpuShard {
    fn start<'a>(
        &'a self,
        layer: usize,
        q: &'a [f32],
        m: usize,
    ) -> crate::Result<PendingPartial<'a>> {
        // The attention runs when waited on: the query host starts every shard first.
        Ok(PendingPartial::new(move || {
            self.try_attend(layer, q, m)
                .map_err(|e| crate::Error::Shard {
                    shard: self.0.gpu.info.to_string(),
                    reason: e.to_string(),
                })
        }))
    }

    fn n_tokens(&self) -> usize {
        GpuShard::n_tokens(self)
    }

    fn local_gpu(&self) -> Option<GpuShard> {
        Some(self.clone())
    }
}
