//! Phase 2 on the GPU: the query and generated tokens attend to every context block
//! (resident, streamed from host memory one layer ahead, or both) without a mask, plus
//! their own KV causally, with other shards' partials merged exactly on the host.

use std::sync::Arc;

use cudarc::driver::CudaEvent;

use super::attention::{AttnOut, Segment, SegmentAttention};
use super::block::GpuBlock;
use super::device::{DevBuf, Gpu, PinnedBuf};
use super::kernels::Kernels;
use super::model::{CudaLlama, GpuAttention, GpuKvCache};
use super::shard::GpuShard;
use super::tempered::TemperedGroup;
use super::{CudaError, KvDest, Result};
use crate::partial::{Attended, ContextMerge, HeadShape};
use crate::star::{AttentionShard, BlockKv};

/// Context blocks for a phase-2 query: resident (already on the GPU), streamed from
/// host memory through pinned buffers on the copy stream one layer ahead, or both at
/// once. Mixing is exact: the query attends to every context block without a mask and
/// the partial results merge by log-sum-exp, so the order of blocks does not matter.
pub enum ContextBlocks {
    Resident(Vec<Arc<GpuBlock>>),
    Streamed(StreamedBlocks),
    Mixed {
        resident: Vec<Arc<GpuBlock>>,
        streamed: StreamedBlocks,
    },
}

impl ContextBlocks {
    /// `resident` blocks plus `host` blocks to stream; picks the variant (an empty
    /// streamed set is never built).
    pub fn new(gpu: &Gpu, resident: Vec<Arc<GpuBlock>>, host: Vec<Arc<BlockKv>>) -> Result<Self> {
        if host.is_empty() {
            return Ok(Self::Resident(resident));
        }
        let streamed = StreamedBlocks::new(gpu, host)?;
        Ok(if resident.is_empty() {
            Self::Streamed(streamed)
        } else {
            Self::Mixed { resident, streamed }
        })
    }

    /// Every block: the resident ones first, then the streamed ones.
    fn blocks(&self) -> impl Iterator<Item = &Arc<GpuBlock>> {
        let (resident, streamed): (&[Arc<GpuBlock>], &[Arc<GpuBlock>]) = match self {
            Self::Resident(b) => (b, &[]),
            Self::Streamed(s) => (&[], &s.blocks),
            Self::Mixed { resident, streamed } => (resident, &streamed.blocks),
        };
        resident.iter().chain(streamed)
    }

    fn streamed_mut(&mut self) -> Option<&mut StreamedBlocks> {
        match self {
            Self::Resident(_) => None,
            Self::Streamed(s) | Self::Mixed { streamed: s, .. } => Some(s),
        }
    }
}

/// Blocks being loaded from host memory: layer `l` of every block is converted into a
/// pinned staging buffer and copied on the copy stream; the compute stream waits on that
/// layer's event only when it reaches layer `l`, so loading layer `l + 1` overlaps
/// computing layer `l`.
pub struct StreamedBlocks {
    sources: Vec<Arc<BlockKv>>,
    blocks: Vec<Arc<GpuBlock>>,
    staging: [PinnedBuf; 2],
    staged_event: [Option<CudaEvent>; 2],
    ready: Vec<Option<CudaEvent>>,
    next_layer: usize,
    n_layers: usize,
    /// Bytes copied to the device so far.
    pub bytes_loaded: usize,
}

impl StreamedBlocks {
    pub fn new(gpu: &Gpu, sources: Vec<Arc<BlockKv>>) -> Result<Self> {
        if sources.iter().any(|b| b.is_8bit()) {
            return Err(CudaError::Invalid(
                "an 8-bit block is uploaded whole (GpuBlock::upload), not streamed".into(),
            ));
        }
        // f16 host blocks (a CPU host's loads) are widened once: staging encodes f32.
        let sources: Vec<Arc<BlockKv>> = sources.iter().map(BlockKv::dequantized).collect();
        let n_layers = sources.first().map_or(0, |b| b.layers.len());
        let blocks = sources
            .iter()
            .map(|b| {
                Ok(Arc::new(GpuBlock::alloc(
                    gpu, b.start, b.len, b.shape, n_layers,
                )?))
            })
            .collect::<Result<Vec<_>>>()?;
        let layer_bytes: usize = sources
            .iter()
            .map(|b| b.shape.n_kv_heads * b.len * b.shape.head_dim * 2 * 2)
            .sum();
        Ok(Self {
            staging: [
                PinnedBuf::new(gpu, layer_bytes)?,
                PinnedBuf::new(gpu, layer_bytes)?,
            ],
            staged_event: [None, None],
            ready: (0..n_layers).map(|_| None).collect(),
            next_layer: 0,
            n_layers,
            sources,
            blocks,
            bytes_loaded: 0,
        })
    }

    /// Bytes a full load moves to the device (16-bit K and V of every layer).
    pub fn bytes_total(&self) -> usize {
        self.blocks.iter().map(|b| b.n_bytes()).sum()
    }

    /// Queues the loads of every layer up to `layer` (inclusive).
    pub fn load_through(&mut self, gpu: &Gpu, layer: usize) -> Result<()> {
        while self.next_layer <= layer.min(self.n_layers.saturating_sub(1))
            && self.next_layer < self.n_layers
        {
            let l = self.next_layer;
            let slot = l % 2;
            if let Some(e) = self.staged_event[slot].take() {
                e.synchronize()?;
            }
            let staging = self.staging[slot].as_u16_mut();
            let mut off = 0;
            let mut copies = Vec::new();
            for (src, dst) in self.sources.iter().zip(&self.blocks) {
                let (k, v) = &src.layers[l];
                let (dk, dv) = dst.layer_ptrs(l);
                for (s, d) in [(k, dk), (v, dv)] {
                    gpu.dtype.encode(s, &mut staging[off..off + s.len()]);
                    copies.push((d, off, s.len()));
                    off += s.len();
                }
            }
            gpu.ctx.bind_to_thread()?;
            let base = self.staging[slot].as_ptr() as *const u16;
            for (d, o, n) in copies {
                // SAFETY: pinned staging stays alive and untouched until the event below
                // completes (checked before the slot is reused); d holds n values.
                unsafe {
                    let src = std::slice::from_raw_parts(base.add(o), n);
                    cudarc::driver::result::memcpy_htod_async(d, src, gpu.copy_stream.cu_stream())?;
                }
                self.bytes_loaded += n * 2;
            }
            let event = gpu.ctx.new_event(None)?;
            event.record(&gpu.copy_stream)?;
            self.ready[l] = Some(gpu.ctx.new_event(None)?);
            self.ready[l].as_ref().unwrap().record(&gpu.copy_stream)?;
            self.staged_event[slot] = Some(event);
            self.next_layer += 1;
        }
        Ok(())
    }

    /// Makes the compute stream wait for layer `layer`'s copies (loading it first if
    /// needed, and the next layer ahead).
    pub fn wait_layer(&mut self, gpu: &Gpu, layer: usize) -> Result<()> {
        self.load_through(gpu, layer + 1)?;
        if let Some(e) = &self.ready[layer] {
            gpu.stream.wait(e)?;
        }
        Ok(())
    }

    /// Loads everything and waits: the blocks, now resident.
    pub fn finish(mut self, gpu: &Gpu) -> Result<Vec<Arc<GpuBlock>>> {
        self.load_through(gpu, self.n_layers)?;
        gpu.copy_stream.synchronize()?;
        Ok(self.blocks)
    }
}

/// Phase 2 on one GPU: the query and generated tokens over every context block (no
/// mask) plus their own KV (causal), which lives here and only here.
///
/// Blocks on this GPU are attended in one fused kernel with the query's own KV. Blocks
/// held elsewhere (another GPU, a remote worker) are [`AttentionShard`]s: per layer the
/// rotated Q goes to them first, the local kernel writes its partial `(O, lse)`, and the
/// parts are merged exactly on the host (see [`GpuQuery::with_shards`]).
pub struct GpuQuery {
    context: ContextBlocks,
    /// The shards reached over the device channel (same CUDA context as the query),
    /// and the rest, reached through the host.
    device_shards: Vec<GpuShard>,
    host_shards: Vec<Arc<dyn AttentionShard>>,
    /// Shards answering for the tempered group of the merge (through the host: their
    /// group is weighed there).
    tempered_shards: Vec<Arc<dyn AttentionShard>>,
    shard_scratch: ShardMerge,
    local: GpuKvCache,
    context_len: usize,
    shape: HeadShape,
    n_layers: usize,
    attn: SegmentAttention,
    /// How the context merges (see [`GpuQuery::with_merge`]); the tempered group's
    /// planned attention once a tempered block is present.
    merge: ContextMerge,
    tempered: Option<TemperedGroup>,
    /// Splits every plan is padded to in graph mode.
    graph_splits: usize,
    /// Overrides the automatic split count (tests and benchmarks).
    pub splits: Option<usize>,
    /// Whether a tempered group at `T = 1` may ride in the one plan as weighted keys
    /// ([`GpuQuery::weighted_in_plan`]); false keeps its own launch and host merge (the
    /// selftest compares the two).
    pub weights_in_plan: bool,
}

/// Layer `l`'s segments of the context blocks this GPU attends in its main plan: every
/// block but the tempered group's, or, with `weighted` (`log2 S`, see
/// [`GpuQuery::weighted_in_plan`]), every block with the group's keys biased by it.
fn context_segments(
    context: &ContextBlocks,
    merge: ContextMerge,
    weighted: Option<f32>,
    l: usize,
) -> Vec<Segment> {
    context
        .blocks()
        .filter_map(|b| match (merge.is_tempered(b.start), weighted) {
            (false, _) => Some(b.segment(l, None)),
            (true, Some(w)) => Some(b.segment(l, None).weighted(w)),
            (true, None) => None,
        })
        .collect()
}

impl GpuQuery {
    /// Whether some context block is held in 8 bits (the plan then splits finer:
    /// [`Gpu::choose_splits_for`]).
    fn eight_bit(&self) -> bool {
        self.context.blocks().any(|b| b.is_8bit())
    }

    /// How a step of `m` rows attends a tempered group in its one plan: `Some(log2 S)`,
    /// the bias on each of the group's key scores, when the merge is tempered at `T = 1`
    /// (the group's weight `S` is then the same as that bias: `lse = L + ln S`), no
    /// shard answers for the group (those merge on the host) and the kernel for `m` rows
    /// reads item weights; `None` otherwise (the exact merge, or the group's own launch
    /// and host merge of [`TemperedGroup`]). Why: one launch per layer instead of two and
    /// a host round trip, and a decode step that can be a graph.
    fn weighted_in_plan(&self, gpu: &Gpu, m: usize) -> Option<f32> {
        let merge = self.merge;
        let rows = m * self.shape.group();
        let reads = |kv8| {
            gpu.attention_kernels()
                .reads_weights(rows, self.shape.head_dim, kv8)
        };
        (!merge.is_exact()
            && merge.temperature == 1.0
            && self.tempered_shards.is_empty()
            && self.weights_in_plan
            && reads(self.eight_bit()))
        .then(|| merge.scale.log2())
    }

    /// `capacity`: query plus generated tokens to hold.
    pub fn new(model: &CudaLlama, context: ContextBlocks, capacity: usize) -> Result<Self> {
        let context_len = context.blocks().map(|b| b.len).sum();
        Ok(Self {
            device_shards: Vec::new(),
            host_shards: Vec::new(),
            tempered_shards: Vec::new(),
            shard_scratch: ShardMerge::default(),
            local: GpuKvCache::new(
                model.gpu(),
                model.config().n_layers,
                model.head_shape(),
                capacity,
            )?,
            context,
            context_len,
            shape: model.head_shape(),
            n_layers: model.config().n_layers,
            attn: SegmentAttention::default(),
            merge: ContextMerge::EXACT,
            tempered: None,
            graph_splits: 0,
            splits: None,
            weights_in_plan: true,
        })
    }

    /// Merges the context blocks with `merge` (APE's tempered merge unless exact): the
    /// blocks `merge` tempers are attended in a second launch (see [`TemperedGroup`]);
    /// shards say themselves which group they answer for ([`AttentionShard::tempered`]).
    pub fn with_merge(mut self, merge: ContextMerge) -> Self {
        self.merge = merge;
        self
    }

    /// Changes the merge between steps (benchmarks compare merges on one query).
    pub fn set_merge(&mut self, merge: ContextMerge) {
        self.merge = merge;
    }

    /// Adds context held by other shards (their blocks follow this GPU's in the
    /// context's token count; order does not matter to the merge).
    ///
    /// A shard whose blocks are on this GPU in this process ([`AttentionShard::local_gpu`]
    /// sharing `gpu`'s context: another GPU shard of this device, an in-process worker on
    /// it) is attended on the query's stream; the others through the host.
    pub fn with_shards(mut self, gpu: &Gpu, shards: Vec<Arc<dyn AttentionShard>>) -> Self {
        self.context_len += shards.iter().map(|s| s.n_tokens()).sum::<usize>();
        for shard in shards {
            if shard.tempered() {
                self.tempered_shards.push(shard);
                continue;
            }
            match shard.local_gpu().filter(|g| g.shares_context(gpu)) {
                Some(g) => self.device_shards.push(g),
                None => self.host_shards.push(shard),
            }
        }
        self
    }

    /// Whether any context is held by other shards.
    fn has_shards(&self) -> bool {
        !(self.device_shards.is_empty()
            && self.host_shards.is_empty()
            && self.tempered_shards.is_empty())
    }

    /// Shards reached over the device channel and through the host (tests, logs).
    pub fn shard_paths(&self) -> (usize, usize) {
        let host = self.host_shards.len() + self.tempered_shards.len();
        (self.device_shards.len(), host)
    }

    /// Context tokens: the first query token's position.
    pub fn context_len(&self) -> usize {
        self.context_len
    }

    /// Query and generated tokens held.
    pub fn local_len(&self) -> usize {
        self.local.len()
    }

    /// Layer attention with other shards or a tempered merge. Every part is an f32
    /// `(O, lse)` in one slot of the merge buffers: slot 0 the local kernel's
    /// (untempered keys), then each same-device shard's (launched on this stream: no
    /// copy, no wait), then the untempered host shards' merged on the host, then the
    /// tempered group (this GPU's tempered blocks and the tempered shards, merged and
    /// weighed on the host). Host shards get Q first, so they work while the device does;
    /// one merge kernel writes the 16-bit result.
    fn attend_parts(
        &mut self,
        gpu: &Gpu,
        kernels: &Kernels,
        layer: usize,
        q: u64,
        m: usize,
        out: u64,
    ) -> Result<()> {
        let s = self.shape;
        let (qw, nh) = (s.q_width(), s.n_heads);
        let merge = &mut self.shard_scratch;
        let host: Vec<&dyn AttentionShard> = self.host_shards.iter().map(|s| s.as_ref()).collect();
        let tempered: Vec<&dyn AttentionShard> =
            self.tempered_shards.iter().map(|s| s.as_ref()).collect();
        let (host_pending, tempered_pending) = if host.is_empty() && tempered.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            merge.q16.resize(m * qw, 0);
            merge.q32.resize(m * qw, 0.0);
            gpu.download(&mut merge.q16, q)?;
            gpu.dtype.decode(&merge.q16, &mut merge.q32);
            (
                crate::star::start_all(&host, layer, &merge.q32, m)?,
                crate::star::start_all(&tempered, layer, &merge.q32, m)?,
            )
        };
        let has_group = self.tempered.is_some() || !tempered.is_empty();
        let slots =
            1 + self.device_shards.len() + usize::from(!host.is_empty()) + usize::from(has_group);
        let (o_slot, l_slot) = (m * qw * 4, m * nh * 4);
        let grow = |b: &mut Option<DevBuf>, bytes: usize| DevBuf::grown(gpu, b, bytes);
        let parts_o = grow(&mut merge.out32, slots * o_slot)?;
        let parts_l = grow(&mut merge.lse32, slots * l_slot)?;
        let slot = |i: usize| (parts_o + (i * o_slot) as u64, parts_l + (i * l_slot) as u64);
        let (out0, lse0) = slot(0);
        let local = AttnOut::F32 {
            out: out0,
            lse: lse0,
        };
        self.attn.attend(gpu, kernels, layer, q, m, local)?;
        let mut next = 1;
        for shard in &self.device_shards {
            let (o, l) = slot(next);
            shard.attend_on(gpu, layer, q, m, o, l)?;
            next += 1;
        }
        if !host.is_empty() {
            let mut acc = Attended::empty(m, s);
            crate::star::merge_pending(host_pending, &mut acc, m, s)?;
            let (o, l) = slot(next);
            gpu.upload(o, &acc.out)?;
            gpu.upload(l, &acc.lse)?;
            next += 1;
        }
        if has_group {
            let mut group = Attended::empty(m, s);
            if let Some(local_group) = &mut self.tempered {
                local_group.attend(gpu, kernels, s, layer, q, m, &mut group)?;
            }
            crate::star::merge_pending(tempered_pending, &mut group, m, s)?;
            self.merge.weigh_group(&mut group);
            let (o, l) = slot(next);
            gpu.upload(o, &group.out)?;
            gpu.upload(l, &group.lse)?;
        }
        gpu.merge_partials(
            kernels,
            (parts_o, parts_l),
            slots,
            m,
            nh,
            AttnOut::Half(out),
        )
    }

    /// The context blocks, resident once every layer has been attended (in
    /// [`ContextBlocks::new`]'s order: the resident ones first, then the streamed ones).
    pub fn into_blocks(self, gpu: &Gpu) -> Result<Vec<Arc<GpuBlock>>> {
        match self.context {
            ContextBlocks::Resident(b) => Ok(b),
            ContextBlocks::Streamed(s) => s.finish(gpu),
            ContextBlocks::Mixed {
                mut resident,
                streamed,
            } => {
                resident.extend(streamed.finish(gpu)?);
                Ok(resident)
            }
        }
    }
}

impl GpuAttention for GpuQuery {
    fn begin(&mut self, gpu: &Gpu, m: usize) -> Result<()> {
        self.local.begin(gpu, m)?;
        let offset = self.local.len();
        let total = self.context_len + offset + m;
        let splits = self
            .splits
            .unwrap_or_else(|| gpu.choose_splits_for(m, self.shape, total, self.eight_bit()));
        let weighted = self.weighted_in_plan(gpu, m);
        let (context, local, merge) = (&self.context, &self.local, self.merge);
        self.tempered = None;
        if !self.tempered_shards.is_empty() && merge.is_exact() {
            return Err(CudaError::Invalid(
                "tempered shards need a tempered merge".into(),
            ));
        }
        if weighted.is_none() && context.blocks().any(|b| merge.is_tempered(b.start)) {
            let group = TemperedGroup::new(gpu, merge, self.shape, self.n_layers, splits, |l| {
                let tempered = context.blocks().filter(|b| merge.is_tempered(b.start));
                tempered.map(|b| b.segment(l, None)).collect()
            })?;
            self.tempered = Some(group);
        }
        self.attn.plan(gpu, self.shape, self.n_layers, splits, |l| {
            let mut segs = context_segments(context, merge, weighted, l);
            segs.push(local.segment(l, offset + m, Some(offset)));
            segs
        })
    }

    fn kv_dest(&mut self, layer: usize) -> KvDest {
        self.local.kv_dest(layer)
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
        if let Some(s) = self.context.streamed_mut() {
            s.wait_layer(gpu, layer)?;
        }
        if self.has_shards() || self.tempered.is_some() {
            return self.attend_parts(gpu, kernels, layer, q, m, out);
        }
        self.attn
            .attend(gpu, kernels, layer, q, m, AttnOut::Half(out))
    }

    fn finish(&mut self, m: usize) {
        self.local.finish(m);
    }

    /// Graph mode needs every block resident (no copy events to wait on), no other
    /// shards (their answers come back through the host) and the exact merge (a tempered
    /// group merges on the host).
    fn begin_graph(&mut self, gpu: &Gpu, m: usize) -> Result<bool> {
        let merge = self.merge;
        let weighted = self.weighted_in_plan(gpu, m);
        if self.has_shards()
            || !matches!(self.context, ContextBlocks::Resident(_))
            || (weighted.is_none() && self.context.blocks().any(|b| merge.is_tempered(b.start)))
        {
            return Ok(false);
        }
        self.tempered = None;
        self.local.begin_rows(gpu, m, true)?;
        let offset = self.local.len();
        let total = self.context_len + offset + m;
        let splits = self
            .splits
            .unwrap_or_else(|| gpu.choose_splits_for(m, self.shape, total, self.eight_bit()));
        let (context, local) = (&self.context, &self.local);
        let mut pad = self.graph_splits;
        self.attn
            .plan_padded(gpu, self.shape, self.n_layers, splits, &mut pad, |l| {
                let mut segs = context_segments(context, merge, weighted, l);
                segs.push(local.segment(l, offset + m, Some(offset)));
                segs
            })?;
        self.graph_splits = pad;
        Ok(true)
    }

    fn graph_key(&self) -> Vec<u64> {
        let mut key = self.local.rows_key();
        key.extend(self.attn.graph_key());
        key
    }
}

/// Host and device buffers of [`GpuQuery::attend_with_shards`], reused every layer.
#[derive(Default)]
struct ShardMerge {
    q16: Vec<u16>,
    q32: Vec<f32>,
    out32: Option<DevBuf>,
    lse32: Option<DevBuf>,
}
