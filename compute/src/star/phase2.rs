//! Phase 2: the query and the answer over cached blocks, with exact global attention.

use std::sync::Arc;

use super::block::BlockKv;
use crate::cpu::attention::{Attended, HeadShape, Mask, attention, attention_into, merge_into};
use crate::model::{LayerAttention, LayerKv};

/// The seam between the query host and a group of cached blocks.
///
/// A shard sees only the query's Q for one layer and answers with the partial attention
/// `(O, lse)` over the context blocks it holds (no mask: all context precedes the query).
/// It never receives the query's K or V, so the query and generated tokens' KV cannot be
/// duplicated across shards. A shard may be a CPU thread, a GPU or a remote host.
pub trait AttentionShard: Send + Sync {
    /// `q` is `[m][n_heads * head_dim]`; the result follows [`Attended`]'s layout.
    fn attend(&self, layer: usize, q: &[f32], m: usize) -> Attended;

    /// Context tokens this shard holds.
    fn n_tokens(&self) -> usize;
}

/// Cached blocks attended on the CPU.
pub struct CpuShard {
    blocks: Vec<Arc<BlockKv>>,
    shape: HeadShape,
}

impl CpuShard {
    pub fn new(blocks: Vec<Arc<BlockKv>>, shape: HeadShape) -> Self {
        Self { blocks, shape }
    }
}

impl AttentionShard for CpuShard {
    fn attend(&self, layer: usize, q: &[f32], m: usize) -> Attended {
        let scale = 1.0 / (self.shape.head_dim as f32).sqrt();
        let mut acc = Attended::empty(m, self.shape);
        for block in &self.blocks {
            let part = attention(q, m, block.view(layer), self.shape, Mask::None, scale);
            merge_into(&mut acc, &part, m, self.shape);
        }
        acc
    }

    fn n_tokens(&self) -> usize {
        self.blocks.iter().map(|b| b.len).sum()
    }
}

/// The query host's attention: context shards plus the query and generated tokens' own
/// KV, which lives here and only here, attended causally.
pub struct QueryAttention<'s> {
    shards: Vec<&'s dyn AttentionShard>,
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
            local: (0..n_layers)
                .map(|_| LayerKv::new(shape, capacity))
                .collect(),
            shape,
        }
    }

    /// Context tokens over all shards: the first query token's position.
    pub fn context_len(&self) -> usize {
        self.shards.iter().map(|s| s.n_tokens()).sum()
    }

    /// Query and generated tokens held locally.
    pub fn local_len(&self) -> usize {
        self.local.first().map_or(0, LayerKv::len)
    }
}

impl LayerAttention for QueryAttention<'_> {
    fn attend(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32], m: usize, out: &mut [f32]) {
        let scale = 1.0 / (self.shape.head_dim as f32).sqrt();
        let local = &mut self.local[layer];
        let offset = local.len();
        local.append(k, v);
        let mut acc = Attended::empty(m, self.shape);
        attention_into(
            q,
            m,
            local.view(),
            self.shape,
            Mask::Causal { offset },
            scale,
            &mut acc.out,
            &mut acc.lse,
        );
        for shard in &self.shards {
            merge_into(&mut acc, &shard.attend(layer, q, m), m, self.shape);
        }
        out.copy_from_slice(&acc.out);
    }
}
