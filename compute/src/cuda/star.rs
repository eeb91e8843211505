//! Star Attention on the GPU: phase-1 block encoding, phase-2 queries over resident or
//! streamed blocks, a GPU shard behind [`AttentionShard`], and the resident block tier.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaEvent;

use super::gpu::{
    AttnOut, AttnPlan, AttnScratch, DevBuf, Gpu, Kernels, KvDest, PinnedBuf, Segment, TableBuf,
    upload_plans,
};
use super::model::{CudaLlama, GpuAttention, GpuKvCache};
use super::{CudaError, Result};
use crate::partial::{Attended, HeadShape};
use crate::star::{AttentionShard, BlockKv, PendingPartial};

/// One context block's KV on a GPU: per layer K and V head-major `[n_kv][len][d]` in
/// the GPU's 16-bit type, K rotated at the global positions (as [`BlockKv`]).
pub struct GpuBlock {
    pub start: usize,
    pub len: usize,
    pub shape: HeadShape,
    layers: Vec<(DevBuf, DevBuf)>,
}

impl GpuBlock {
    pub fn alloc(
        gpu: &Gpu,
        start: usize,
        len: usize,
        shape: HeadShape,
        n_layers: usize,
    ) -> Result<Self> {
        let bytes = shape.n_kv_heads * len * shape.head_dim * 2;
        let layers = (0..n_layers)
            .map(|_| Ok((gpu.alloc(bytes)?, gpu.alloc(bytes)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            start,
            len,
            shape,
            layers,
        })
    }

    /// Uploads a CPU block (f32, rounded to the GPU's 16-bit type); synchronous copy.
    pub fn upload(gpu: &Gpu, block: &BlockKv) -> Result<Self> {
        let out = Self::alloc(gpu, block.start, block.len, block.shape, block.layers.len())?;
        let mut tmp = Vec::new();
        for (l, (k, v)) in block.layers.iter().enumerate() {
            for (src, dst) in [(k, &out.layers[l].0), (v, &out.layers[l].1)] {
                tmp.resize(src.len(), 0u16);
                gpu.dtype.encode(src, &mut tmp);
                gpu.upload(dst.ptr(), &tmp)?;
            }
        }
        Ok(out)
    }

    /// The block as a CPU [`BlockKv`] (f32), e.g. to write it to the store.
    pub fn download(&self, gpu: &Gpu) -> Result<BlockKv> {
        let mut out = BlockKv::new(self.start, self.len, self.shape, self.layers.len());
        let n = self.shape.n_kv_heads * self.len * self.shape.head_dim;
        let mut tmp = vec![0u16; n];
        for (l, (k, v)) in self.layers.iter().enumerate() {
            let mut kf = vec![0f32; n];
            let mut vf = vec![0f32; n];
            gpu.download(&mut tmp, k.ptr())?;
            gpu.dtype.decode(&tmp, &mut kf);
            gpu.download(&mut tmp, v.ptr())?;
            gpu.dtype.decode(&tmp, &mut vf);
            out.layers[l] = (kf, vf);
        }
        Ok(out)
    }

    /// The first `n` tokens as a block of their own (the anchor from block 0).
    pub fn prefix(&self, gpu: &Gpu, n: usize) -> Result<Self> {
        self.rows(gpu, 0..n.min(self.len))
    }

    /// Tokens `range` (relative to this block's start) as a block of their own: a block
    /// inside an anchor longer than one block is a row range of the anchor's KV.
    pub fn rows(&self, gpu: &Gpu, range: std::ops::Range<usize>) -> Result<Self> {
        let from = range.start.min(self.len);
        let n = range.end.min(self.len).saturating_sub(from);
        let out = Self::alloc(gpu, self.start + from, n, self.shape, self.layers.len())?;
        let d = self.shape.head_dim;
        for (src, dst) in self.layers.iter().zip(&out.layers) {
            for h in 0..self.shape.n_kv_heads {
                let so = ((h * self.len + from) * d * 2) as u64;
                let dof = (h * n * d * 2) as u64;
                gpu.copy_d2d(dst.0.ptr() + dof, src.0.ptr() + so, n * d * 2)?;
                gpu.copy_d2d(dst.1.ptr() + dof, src.1.ptr() + so, n * d * 2)?;
            }
        }
        Ok(out)
    }

    /// Layer `layer` as an attention segment.
    pub fn segment(&self, layer: usize, causal_offset: Option<usize>) -> Segment {
        let (k, v) = &self.layers[layer];
        Segment {
            k: k.ptr(),
            v: v.ptr(),
            head_stride: (self.len * self.shape.head_dim) as i64,
            row_stride: self.shape.head_dim as i32,
            len: self.len,
            causal_offset,
        }
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Device bytes held.
    pub fn n_bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| k.bytes() + v.bytes()).sum()
    }

    pub(super) fn layer_ptrs(&self, layer: usize) -> (u64, u64) {
        (self.layers[layer].0.ptr(), self.layers[layer].1.ptr())
    }
}

/// Phase-1 attention of one block: causal over itself, unmasked over the anchor (a
/// read-only prefix segment; absent for block 0). K/V land directly in the block.
struct AnchoredBlock<'a> {
    anchor: Option<&'a GpuBlock>,
    block: &'a GpuBlock,
    table: TableBuf,
    plans: Vec<(u64, u64, usize)>,
    scratch: AttnScratch,
}

impl GpuAttention for AnchoredBlock<'_> {
    fn begin(&mut self, gpu: &Gpu, m: usize) -> Result<()> {
        let shape = self.block.shape;
        let anchor_len = self.anchor.map_or(0, |a| a.len);
        let splits = gpu.choose_splits(m, shape, anchor_len + m);
        let plans: Vec<AttnPlan> = (0..self.block.n_layers())
            .map(|l| {
                let mut segs = Vec::new();
                if let Some(a) = self.anchor {
                    segs.push(a.segment(l, None));
                }
                segs.push(self.block.segment(l, Some(0)));
                AttnPlan::new(&segs, splits)
            })
            .collect();
        self.plans = upload_plans(gpu, &mut self.table, &plans)?;
        Ok(())
    }

    fn kv_dest(&mut self, layer: usize) -> KvDest {
        let (k, v) = self.block.layer_ptrs(layer);
        KvDest {
            k,
            v,
            head_stride: (self.block.len * self.block.shape.head_dim) as i64,
            row_stride: self.block.shape.head_dim as i32,
            t0: 0,
        }
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
        let (items, splits, n) = self.plans[layer];
        let s = self.block.shape;
        gpu.attention(
            kernels,
            q,
            m,
            s.n_heads,
            s.n_kv_heads,
            items,
            splits,
            n,
            AttnOut::Half(out),
            &mut self.scratch,
        )
    }

    fn finish(&mut self, _m: usize) {}
}

/// Phase 1 for block `tokens` at global positions `start..start + len`: block 0 is
/// encoded alone (`anchor = None`), every other block as `[anchor | block]` with the
/// anchor's KV as a read-only prefix (see [`crate::star::Phase1`]). Asynchronous.
pub fn encode_block(
    model: &mut CudaLlama,
    tokens: &[u32],
    start: usize,
    anchor: Option<&GpuBlock>,
) -> Result<GpuBlock> {
    if tokens.is_empty() {
        return Err(CudaError::Invalid("empty block".into()));
    }
    let gpu = model.gpu().clone();
    let block = GpuBlock::alloc(
        &gpu,
        start,
        tokens.len(),
        model.head_shape(),
        model.config().n_layers,
    )?;
    encode_block_into(model, tokens, anchor, &block)?;
    Ok(block)
}

/// [`encode_block`] into a block allocated beforehand (its `start` and `len` say where
/// the tokens sit; the cold loader allocates every block of a query up front).
pub fn encode_block_into(
    model: &mut CudaLlama,
    tokens: &[u32],
    anchor: Option<&GpuBlock>,
    block: &GpuBlock,
) -> Result<()> {
    if tokens.is_empty() || tokens.len() != block.len {
        return Err(CudaError::Invalid(format!(
            "{} tokens for a block of {}",
            tokens.len(),
            block.len
        )));
    }
    let positions: Vec<usize> = (block.start..block.start + block.len).collect();
    let mut attention = AnchoredBlock {
        anchor,
        block,
        table: TableBuf::default(),
        plans: Vec::new(),
        scratch: AttnScratch::default(),
    };
    model.forward(tokens, &positions, &mut attention)
}

/// Phase 1 for a whole context: blocks of `block_size`, anchor of `anchor_size` tokens
/// (the first `a` rows of block 0).
pub fn encode_context(
    model: &mut CudaLlama,
    tokens: &[u32],
    block_size: usize,
    anchor_size: usize,
) -> Result<Vec<Arc<GpuBlock>>> {
    let config = crate::star::StarConfig {
        block_size,
        anchor_size,
    };
    config.validate()?;
    if tokens.is_empty() {
        return Err(CudaError::Invalid("the context is empty".into()));
    }
    let b = block_size;
    let first = encode_block(model, &tokens[..b.min(tokens.len())], 0, None)?;
    let anchor = first.prefix(model.gpu(), anchor_size.min(tokens.len()))?;
    let mut out = vec![Arc::new(first)];
    for start in (b..tokens.len()).step_by(b) {
        let end = (start + b).min(tokens.len());
        out.push(Arc::new(encode_block(
            model,
            &tokens[start..end],
            start,
            Some(&anchor),
        )?));
    }
    Ok(out)
}

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
    shards: Vec<Arc<dyn AttentionShard>>,
    shard_scratch: ShardMerge,
    local: GpuKvCache,
    context_len: usize,
    shape: HeadShape,
    n_layers: usize,
    table: TableBuf,
    plans: Vec<(u64, u64, usize)>,
    scratch: AttnScratch,
    /// Overrides the automatic split count (tests and benchmarks).
    pub splits: Option<usize>,
}

impl GpuQuery {
    /// `capacity`: query plus generated tokens to hold.
    pub fn new(model: &CudaLlama, context: ContextBlocks, capacity: usize) -> Result<Self> {
        let context_len = context.blocks().map(|b| b.len).sum();
        Ok(Self {
            shards: Vec::new(),
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
            table: TableBuf::default(),
            plans: Vec::new(),
            scratch: AttnScratch::default(),
            splits: None,
        })
    }

    /// Adds context held by other shards (their blocks follow this GPU's in the
    /// context's token count; order does not matter to the merge).
    pub fn with_shards(mut self, shards: Vec<Arc<dyn AttentionShard>>) -> Self {
        self.context_len += shards.iter().map(|s| s.n_tokens()).sum::<usize>();
        self.shards = shards;
        self
    }

    /// Context tokens: the first query token's position.
    pub fn context_len(&self) -> usize {
        self.context_len
    }

    /// Query and generated tokens held.
    pub fn local_len(&self) -> usize {
        self.local.len()
    }

    /// Layer attention with other shards: Q to the host and to every shard, the local
    /// kernel's `(O, lse)` in f32, the exact merge on the host, the result back as 16-bit.
    #[allow(clippy::too_many_arguments)]
    fn attend_with_shards(
        &mut self,
        gpu: &Gpu,
        kernels: &Kernels,
        layer: usize,
        q: u64,
        m: usize,
        out: u64,
        plan: (u64, u64, usize),
    ) -> Result<()> {
        let s = self.shape;
        let (qw, nh) = (s.q_width(), s.n_heads);
        let merge = &mut self.shard_scratch;
        merge.q16.resize(m * qw, 0);
        merge.q32.resize(m * qw, 0.0);
        gpu.download(&mut merge.q16, q)?;
        gpu.dtype.decode(&merge.q16, &mut merge.q32);
        let shards: Vec<&dyn AttentionShard> = self.shards.iter().map(|s| s.as_ref()).collect();
        let pending = crate::star::start_all(&shards, layer, &merge.q32, m)?;
        let grow = |b: &mut Option<DevBuf>, bytes: usize| -> Result<u64> {
            if b.as_ref().is_none_or(|x| x.bytes() < bytes) {
                *b = Some(gpu.alloc(bytes)?);
            }
            Ok(b.as_ref().map_or(0, DevBuf::ptr))
        };
        let out32 = grow(&mut merge.out32, m * qw * 4)?;
        let lse32 = grow(&mut merge.lse32, m * nh * 4)?;
        let (items, splits, n) = plan;
        gpu.attention(
            kernels,
            q,
            m,
            nh,
            s.n_kv_heads,
            items,
            splits,
            n,
            AttnOut::F32 {
                out: out32,
                lse: lse32,
            },
            &mut self.scratch,
        )?;
        let mut acc = Attended::empty(m, s);
        gpu.download(&mut acc.out, out32)?;
        gpu.download(&mut acc.lse, lse32)?;
        crate::star::merge_pending(pending, &mut acc, m, s)?;
        gpu.upload(out32, &acc.out)?;
        gpu.to_half(kernels, out, out32, m * qw)?;
        Ok(())
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
            .unwrap_or_else(|| gpu.choose_splits(m, self.shape, total));
        let plans: Vec<AttnPlan> = (0..self.n_layers)
            .map(|l| {
                let mut segs: Vec<Segment> =
                    self.context.blocks().map(|b| b.segment(l, None)).collect();
                segs.push(self.local.segment(l, offset + m, Some(offset)));
                AttnPlan::new(&segs, splits)
            })
            .collect();
        self.plans = upload_plans(gpu, &mut self.table, &plans)?;
        Ok(())
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
        let (items, splits, n) = self.plans[layer];
        if !self.shards.is_empty() {
            return self.attend_with_shards(gpu, kernels, layer, q, m, out, (items, splits, n));
        }
        gpu.attention(
            kernels,
            q,
            m,
            self.shape.n_heads,
            self.shape.n_kv_heads,
            items,
            splits,
            n,
            AttnOut::Half(out),
            &mut self.scratch,
        )
    }

    fn finish(&mut self, m: usize) {
        self.local.finish(m);
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

/// Blocks held by one GPU behind the host-side shard seam: `attend` takes a layer's Q
/// (f32, from any query host), runs the unmasked attention over this GPU's blocks and
/// returns `(O, lse)` for an exact merge. One `GpuShard` per GPU of a host.
pub struct GpuShard {
    gpu: Arc<Gpu>,
    kernels: Arc<Kernels>,
    blocks: Vec<Arc<GpuBlock>>,
    shape: HeadShape,
    state: Mutex<ShardScratch>,
}

#[derive(Default)]
struct ShardScratch {
    q32: Option<DevBuf>,
    q16: Option<DevBuf>,
    out: Option<DevBuf>,
    lse: Option<DevBuf>,
    table: TableBuf,
    attn: AttnScratch,
}

impl GpuShard {
    pub fn new(gpu: Arc<Gpu>, blocks: Vec<Arc<GpuBlock>>, shape: HeadShape) -> Result<Self> {
        let kernels = gpu.kernels(shape.head_dim)?;
        Ok(Self {
            gpu,
            kernels,
            blocks,
            shape,
            state: Mutex::new(ShardScratch::default()),
        })
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

    pub fn try_attend(&self, layer: usize, q: &[f32], m: usize) -> Result<Attended> {
        let s = self.shape;
        let (qw, nh) = (s.q_width(), s.n_heads);
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.gpu.ctx.bind_to_thread()?;
        let st = &mut *st;
        let grow = |b: &mut Option<DevBuf>, bytes: usize| -> Result<u64> {
            if b.as_ref().is_none_or(|x| x.bytes() < bytes) {
                *b = Some(self.gpu.alloc(bytes)?);
            }
            Ok(b.as_ref().unwrap().ptr())
        };
        let q32 = grow(&mut st.q32, m * qw * 4)?;
        let q16 = grow(&mut st.q16, m * qw * 2)?;
        let out = grow(&mut st.out, m * qw * 4)?;
        let lse = grow(&mut st.lse, m * nh * 4)?;
        self.gpu.upload(q32, q)?;
        self.gpu.to_half(&self.kernels, q16, q32, m * qw)?;
        let segs: Vec<Segment> = self.blocks.iter().map(|b| b.segment(layer, None)).collect();
        let total: usize = self.blocks.iter().map(|b| b.len).sum();
        let splits = self.gpu.choose_splits(m, s, total).max(2);
        let plan = AttnPlan::new(&segs, splits);
        let p = upload_plans(&self.gpu, &mut st.table, &[plan])?[0];
        self.gpu.attention(
            &self.kernels,
            q16,
            m,
            nh,
            s.n_kv_heads,
            p.0,
            p.1,
            p.2,
            AttnOut::F32 { out, lse },
            &mut st.attn,
        )?;
        let mut res = Attended::empty(m, s);
        self.gpu.download(&mut res.out, out)?;
        self.gpu.download(&mut res.lse, lse)?;
        Ok(res)
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
                    shard: self.gpu.info.to_string(),
                    reason: e.to_string(),
                })
        }))
    }

    fn n_tokens(&self) -> usize {
        self.blocks.iter().map(|b| b.len).sum()
    }
}

/// What the resident tier holds: anything that knows its device size.
pub trait TierValue {
    fn tier_bytes(&self) -> usize;
}

impl TierValue for GpuBlock {
    fn tier_bytes(&self) -> usize {
        self.n_bytes()
    }
}

/// The GPU-resident tier: blocks of hot documents kept on the device under a byte
/// budget, least recently used first out. Blocks are shared (`Arc`): an evicted block
/// still in use by a running query stays alive until that query drops it, so a document
/// being queried is never pulled out from under the query.
pub struct BlockTier<K, V = GpuBlock> {
    budget: usize,
    used: usize,
    tick: u64,
    entries: HashMap<K, (Arc<V>, u64)>,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

impl<K: Hash + Eq + Clone, V: TierValue> BlockTier<K, V> {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget: budget_bytes,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
            hits: 0,
            misses: 0,
            evictions: 0,
        }
    }

    pub fn budget_bytes(&self) -> usize {
        self.budget
    }

    pub fn used_bytes(&self) -> usize {
        self.used
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// The block under `key`, marked as most recently used.
    pub fn get(&mut self, key: &K) -> Option<Arc<V>> {
        self.tick += 1;
        match self.entries.get_mut(key) {
            Some((b, t)) => {
                *t = self.tick;
                self.hits += 1;
                Some(b.clone())
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Inserts (or refreshes) a block, evicting least recently used blocks to stay
    /// within the budget. A block larger than the whole budget is not kept.
    pub fn insert(&mut self, key: K, block: Arc<V>) {
        self.tick += 1;
        let bytes = block.tier_bytes();
        if let Some((old, _)) = self.entries.remove(&key) {
            self.used -= old.tier_bytes();
        }
        if bytes > self.budget {
            return;
        }
        while self.used + bytes > self.budget {
            let Some(victim) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            let (b, _) = self.entries.remove(&victim).unwrap();
            self.used -= b.tier_bytes();
            self.evictions += 1;
        }
        self.used += bytes;
        self.entries.insert(key, (block, self.tick));
    }

    /// Forgets every block (the counters stay).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.used = 0;
    }

    pub fn remove(&mut self, key: &K) -> Option<Arc<V>> {
        let (b, _) = self.entries.remove(key)?;
        self.used -= b.tier_bytes();
        Some(b)
    }
}
