//! Phase 2: the query and the answer over cached blocks, with exact global attention.

use std::sync::Arc;

use rayon::prelude::*;

use super::block::BlockKv;
use crate::cpu::attention::{Mask, attention_source_into};
use crate::error::Result;
use crate::model::{KvPrecision, LayerAttention, LayerKv};
use crate::partial::{Attended, ContextMerge, HeadShape, merge_into};

/// The seam between the query host and a group of cached blocks.
///
/// A shard sees only the query's Q for one layer and answers with the partial attention
/// `(O, lse)` ([`Attended`]) over the context blocks it holds (no mask: all context
/// precedes the query). It never receives the query's K or V, so the query and generated
/// tokens' KV cannot be duplicated across shards. A shard may be a CPU thread, a GPU or a
/// remote host, and may fail (a remote host goes away): a failure is an error for the
/// query host to handle, never a silently smaller merge.
pub trait AttentionShard: Send + Sync {
    /// Starts the partial attention of `q` (`[m][n_heads * head_dim]`) at `layer`. A
    /// shard whose work runs elsewhere (a remote worker, a GPU stream) sends the request
    /// now and returns a [`PendingPartial`] that waits for the answer; a shard computed on
    /// this host's CPU returns one that computes when waited on. The query host starts
    /// every shard before it waits on any, so all shards work at once.
    fn start<'a>(&'a self, layer: usize, q: &'a [f32], m: usize) -> Result<PendingPartial<'a>>;

    /// Context tokens this shard holds.
    fn n_tokens(&self) -> usize;

    /// [`AttentionShard::start`], then wait: one shard on its own.
    fn attend(&self, layer: usize, q: &[f32], m: usize) -> Result<Attended> {
        self.start(layer, q, m)?.wait()
    }

    /// The GPU blocks behind this shard when they live in this process (a GPU of the
    /// host, or an in-process worker's session): a query on the same device attends them
    /// on its own stream, with no host round trip (the same-host device channel of
    /// `docs/cluster.md`). `None`: only [`AttentionShard::start`] reaches the blocks.
    fn local_gpu(&self) -> Option<crate::cuda::star::GpuShard> {
        None
    }

    /// Whether this shard answers for the tempered group of a [`ContextMerge`] (its
    /// scores at `1 / (sqrt(d) T)`, its `lse` in those units): the query host merges it
    /// into the group, which is weighed before it joins the untempered parts.
    fn tempered(&self) -> bool {
        false
    }

    /// Whether a thread of this process's rayon pool may wait on this shard: its answer
    /// is either computed when waited on, on this host's CPU and the pool, or comes from
    /// another process that needs nothing of this one's pool (a remote shard worker whose
    /// reply the waiting thread reads itself). Never true when the answer may come from
    /// work queued on this process's pool or threads (an in-process worker's thread or
    /// device): a pool thread waiting on it could wait behind itself. A query over such
    /// shards alone may run its forward pass on the pool (see
    /// [`LayerAttention::computes_only`]).
    fn computes_here(&self) -> bool {
        false
    }
}

/// A partial attention in flight (see [`AttentionShard::start`]).
pub struct PendingPartial<'a> {
    finish: Box<dyn FnOnce() -> Result<Attended> + Send + 'a>,
    /// The work runs elsewhere (another process or thread) and `finish` only waits.
    arriving: bool,
}

impl<'a> PendingPartial<'a> {
    /// `compute` produces the answer when waited on (a local shard's work).
    pub fn new(compute: impl FnOnce() -> Result<Attended> + Send + 'a) -> Self {
        Self {
            finish: Box::new(compute),
            arriving: false,
        }
    }

    /// Work already running elsewhere: `wait` blocks until its answer arrives. Waited
    /// on the caller's thread, never on a compute pool's (a pool thread blocked on work
    /// that itself needs the pool, e.g. an in-process worker's, would deadlock it).
    pub fn arriving(wait: impl FnOnce() -> Result<Attended> + Send + 'a) -> Self {
        Self {
            finish: Box::new(wait),
            arriving: true,
        }
    }

    /// An answer already at hand.
    pub fn ready(part: Attended) -> Self {
        Self::new(move || Ok(part))
    }

    pub fn wait(self) -> Result<Attended> {
        (self.finish)()
    }
}

/// Cached blocks attended on the CPU.
pub struct CpuShard {
    blocks: Vec<Arc<BlockKv>>,
    shape: HeadShape,
    /// The softmax scale, `1 / sqrt(d)`, or `1 / (sqrt(d) T)` for the tempered group of
    /// [`ContextMerge`].
    scale: f32,
}

impl CpuShard {
    pub fn new(blocks: Vec<Arc<BlockKv>>, shape: HeadShape) -> Self {
        Self {
            blocks,
            shape,
            scale: shape.scale(),
        }
    }

    /// Blocks of the tempered group of `merge`: attended at `1 / (sqrt(d) T)`, their
    /// `lse` in those units (see [`ContextMerge::weigh_group`]).
    pub fn tempered(blocks: Vec<Arc<BlockKv>>, shape: HeadShape, merge: ContextMerge) -> Self {
        Self::scaled(blocks, shape, merge.score_scale())
    }

    /// Blocks attended at softmax scale `score_scale / sqrt(d)` (a shard worker's
    /// session for the tempered group: `1 / T`).
    pub fn scaled(blocks: Vec<Arc<BlockKv>>, shape: HeadShape, score_scale: f32) -> Self {
        Self {
            blocks,
            shape,
            scale: shape.scale() * score_scale,
        }
    }

    /// Every block attended at once on the compute pool, merged in block order (the same
    /// rounding every run). One entry into the pool per call: a shard worker calls this
    /// from a thread outside the pool, where a block-by-block loop pays the pool's wake-up
    /// for each block of each layer.
    fn compute(&self, layer: usize, q: &[f32], m: usize) -> Attended {
        let parts: Vec<Attended> = self
            .blocks
            .par_iter()
            .map(|block| {
                let mut part = Attended::empty(m, self.shape);
                attention_source_into(
                    q,
                    m,
                    block.source(layer),
                    self.shape,
                    Mask::None,
                    self.scale,
                    &mut part.out,
                    &mut part.lse,
                );
                part
            })
            .collect();
        let mut acc = Attended::empty(m, self.shape);
        for part in &parts {
            merge_into(&mut acc, part, m, self.shape);
        }
        acc
    }
}

impl AttentionShard for CpuShard {
    fn start<'a>(&'a self, layer: usize, q: &'a [f32], m: usize) -> Result<PendingPartial<'a>> {
        Ok(PendingPartial::new(move || Ok(self.compute(layer, q, m))))
    }

    fn n_tokens(&self) -> usize {
        self.blocks.iter().map(|b| b.len).sum()
    }

    fn computes_here(&self) -> bool {
        true
    }
}

/// Starts `q` at `layer` on every shard (see [`AttentionShard::start`]); the query host
/// computes its own part, then calls [`merge_pending`].
pub fn start_all<'a>(
    shards: &[&'a dyn AttentionShard],
    layer: usize,
    q: &'a [f32],
    m: usize,
) -> Result<Vec<PendingPartial<'a>>> {
    shards.iter().map(|s| s.start(layer, q, m)).collect()
}

/// Waits for every started shard and merges their answers into `acc`: local shards
/// compute in parallel on the compute pool while remote ones answer, then the remote
/// answers are collected on this thread. Any shard's failure is the result: a merge
/// over fewer shards would be a wrong answer.
pub fn merge_pending(
    pending: Vec<PendingPartial<'_>>,
    acc: &mut Attended,
    m: usize,
    shape: HeadShape,
) -> Result<()> {
    // Merged in the shards' order whatever finishes first (the same rounding every run).
    let (arriving, computed): (Vec<_>, Vec<_>) = pending
        .into_iter()
        .enumerate()
        .partition(|(_, p)| p.arriving);
    let wait = |(i, p): (usize, PendingPartial<'_>)| (i, p.wait());
    let mut parts: Vec<(usize, Result<Attended>)> = if computed.len() <= 1 {
        computed.into_iter().map(wait).collect()
    } else {
        computed.into_par_iter().map(wait).collect()
    };
    parts.extend(arriving.into_iter().map(wait));
    parts.sort_by_key(|&(i, _)| i);
    for (_, part) in parts {
        merge_into(acc, &part?, m, shape);
    }
    Ok(())
}

/// The query host's attention: context shards plus the query and generated tokens' own
/// KV, which lives here and only here, attended causally.
pub struct QueryAttention<'s> {
    shards: Vec<&'s dyn AttentionShard>,
    /// The tempered group of a [`ContextMerge`] (empty for the exact merge): merged among
    /// themselves, weighed, then merged with the rest.
    tempered: Vec<&'s dyn AttentionShard>,
    merge: ContextMerge,
    local: Vec<LayerKv>,
    shape: HeadShape,
}

impl<'s> QueryAttention<'s> {
    pub fn new(
        shards: Vec<&'s dyn AttentionShard>,
        n_layers: usize,
        shape: HeadShape,
        capacity: usize,
    ) -> Self {
        Self {
            shards,
            tempered: Vec::new(),
            merge: ContextMerge::EXACT,
            local: (0..n_layers)
                .map(|_| LayerKv::new(shape, capacity))
                .collect(),
            shape,
        }
    }

    /// Adds the tempered group of `merge`: shards that attend at `1 / (sqrt(d) T)` (e.g.
    /// [`CpuShard::tempered`]); their merged result is weighed by
    /// [`ContextMerge::weigh_group`] before it joins the untempered parts.
    pub fn with_tempered(
        mut self,
        tempered: Vec<&'s dyn AttentionShard>,
        merge: ContextMerge,
    ) -> Self {
        self.tempered = tempered;
        self.merge = merge;
        self
    }

    /// Holds the query's own KV in `precision` (f16 by default, like a [`KvCache`]; f32
    /// for exactness checks). Call before the first forward pass.
    ///
    /// [`KvCache`]: crate::model::KvCache
    pub fn with_precision(mut self, precision: KvPrecision) -> Self {
        self.local = self
            .local
            .iter()
            .map(|l| LayerKv::with_precision(self.shape, l.capacity(), precision))
            .collect();
        self
    }

    /// Context tokens over all shards: the first query token's position.
    pub fn context_len(&self) -> usize {
        self.shards
            .iter()
            .chain(&self.tempered)
            .map(|s| s.n_tokens())
            .sum()
    }

    /// Query and generated tokens held locally.
    pub fn local_len(&self) -> usize {
        self.local.first().map_or(0, LayerKv::len)
    }
}

impl LayerAttention for QueryAttention<'_> {
    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<()> {
        // Remote shards get the query first, so they work while the local part computes.
        let pending = start_all(&self.shards, layer, q, m)?;
        let tempered = start_all(&self.tempered, layer, q, m)?;
        let local = &mut self.local[layer];
        let offset = local.len();
        local.append(k, v);
        let mut acc = Attended::empty(m, self.shape);
        attention_source_into(
            q,
            m,
            local.view(),
            self.shape,
            Mask::Causal { offset },
            self.shape.scale(),
            &mut acc.out,
            &mut acc.lse,
        );
        merge_pending(pending, &mut acc, m, self.shape)?;
        if !self.tempered.is_empty() {
            let mut group = Attended::empty(m, self.shape);
            merge_pending(tempered, &mut group, m, self.shape)?;
            self.merge.weigh_group(&mut group);
            merge_into(&mut acc, &group, m, self.shape);
        }
        out.copy_from_slice(&acc.out);
        Ok(())
    }

    fn computes_only(&self) -> bool {
        self.shards
            .iter()
            .chain(&self.tempered)
            .all(|s| s.computes_here())
    }
}
