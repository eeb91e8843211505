//! Phase 1: blockwise-local context encoding with an anchor block.

use std::ops::Range;

use rayon::prelude::*;

use super::block::BlockKv;
use crate::cpu::attention::{Attended, HeadShape, KvView, Mask, attention, merge_into};
use crate::error::{Error, Result};
use crate::model::{LayerAttention, Llama};

/// Block size `b` and anchor size `a`: `1 <= a <= b` (the paper; the default is `a = b`),
/// or an anchor of several whole blocks (`a = k * b`), the blocks inside it being the
/// anchor's own causal KV. A longer anchor gives every later block more shared context
/// to calibrate its attention against, at `a` tokens of extra attention per block (issue
/// 14 measures what it buys at small blocks).
///
/// `overlap`: up to this many tokens of the text just before a block (after the anchor)
/// are encoded in front of it, `[anchor | lead | block]` at their global positions, and
/// their KV is discarded (it belongs to the block before). A block boundary then no
/// longer cuts a sentence off from its beginning: without it, a needle whose key ends one
/// block and whose number starts the next is a number of no key to every later block
/// (issue 14, H200, 416 paired needle questions: at b = L/16 with 32 tokens single
/// needles went from 0.95x to 0.995x of full attention and multi-key ones from 0.80x to
/// 0.92x, for 0.80x of full attention's ingest time against 0.76x; README "Accuracy at
/// small blocks"). `0` is the paper's phase 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StarConfig {
    pub block_size: usize,
    pub anchor_size: usize,
    pub overlap: usize,
}

impl StarConfig {
    /// `a = b`, no overlap: the paper's setting.
    pub fn new(block_size: usize) -> Self {
        Self::with_anchor(block_size, block_size)
    }

    /// Block size `b` and anchor size `a`, no overlap.
    pub fn with_anchor(block_size: usize, anchor_size: usize) -> Self {
        Self {
            block_size,
            anchor_size,
            overlap: 0,
        }
    }

    /// The same configuration with `overlap` tokens of lead (see [`StarConfig`]).
    pub fn with_overlap(self, overlap: usize) -> Self {
        Self { overlap, ..self }
    }

    /// The lead of the block at `block` (global positions) in a context whose anchor is
    /// `anchor_len` tokens: the tokens encoded in front of it and dropped, the last
    /// `overlap` before it that lie after the anchor. Empty for block 0 and for the blocks
    /// inside the anchor (they see everything before them already).
    pub fn lead(&self, block: Range<usize>, anchor_len: usize) -> Range<usize> {
        if block.start < anchor_len {
            return block.start..block.start;
        }
        block.start.saturating_sub(self.overlap).max(anchor_len)..block.start
    }

    /// The default for a context of `len` tokens (issue 14): an anchor of whole blocks
    /// covering a quarter of the context, at least one block and at most 65536 tokens.
    /// Up to 4 blocks that is `a = b` (the paper's choice, measured at 1.00x / 0.97x of
    /// full attention on single / multi-key needles at b = L/4); at b = L/16 it is
    /// `a = 4b`, which lifted single needles from 0.72x to 1.00x and multi-key from 0.68x
    /// to 0.90-0.93x of full attention on the H200 at no measurable ingest time (README).
    pub fn with_default_anchor(block_size: usize, len: usize) -> Self {
        let b = block_size.max(1);
        let quarter = len.div_ceil(b).div_ceil(4).max(1);
        let most = (MAX_DEFAULT_ANCHOR / b).max(1);
        Self::with_anchor(block_size, block_size * quarter.min(most))
    }

    pub fn validate(&self) -> Result<()> {
        if self.block_size == 0 {
            return Err(Error::InvalidInput("block size must be at least 1".into()));
        }
        let whole_blocks = self.anchor_size.is_multiple_of(self.block_size);
        if self.anchor_size == 0 || (self.anchor_size > self.block_size && !whole_blocks) {
            return Err(Error::InvalidInput(format!(
                "anchor size must be in 1..={} (the block size) or a multiple of it, got {}",
                self.block_size, self.anchor_size
            )));
        }
        Ok(())
    }
}

/// The longest anchor [`StarConfig::with_default_anchor`] picks.
pub const MAX_DEFAULT_ANCHOR: usize = 1 << 16;

/// The overlap an ingest gets unless it asks for another (see [`StarConfig`]): about
/// two needle sentences of lead before each block. 16, 32 and 64 measured alike (0.92x to
/// 0.94x of full attention on multi-key needles at b = L/16, intervals overlapping); 32
/// covers a longer sentence for a cost that vanishes at large blocks (0.4% more phase-1
/// tokens at 8K-token blocks).
pub const DEFAULT_OVERLAP: usize = 32;

/// The longest overlap an ingest may ask for.
pub const MAX_OVERLAP: usize = 1 << 16;

/// Phase-1 encoder for one context.
pub struct Phase1<'m> {
    model: &'m Llama,
    tokens: &'m [u32],
    config: StarConfig,
}

impl<'m> Phase1<'m> {
    pub fn new(model: &'m Llama, tokens: &'m [u32], config: StarConfig) -> Result<Self> {
        config.validate()?;
        if tokens.is_empty() {
            return Err(Error::InvalidInput("the context is empty".into()));
        }
        Ok(Self {
            model,
            tokens,
            config,
        })
    }

    pub fn n_blocks(&self) -> usize {
        self.tokens.len().div_ceil(self.config.block_size)
    }

    /// Token range (= global positions) of block `i` (0-based; the paper's block `i + 1`).
    pub fn block_range(&self, i: usize) -> Range<usize> {
        let b = self.config.block_size;
        i * b..((i + 1) * b).min(self.tokens.len())
    }

    /// The anchor: the first `a` tokens of block 0 (fewer if the context is shorter).
    pub fn anchor_tokens(&self) -> &[u32] {
        &self.tokens[..self.config.anchor_size.min(self.tokens.len())]
    }

    /// Whether block `i` lies inside the anchor (block 0 always does; with `a = k * b`
    /// the first `k` blocks do): its KV is rows of the anchor's own causal encoding.
    pub fn in_anchor(&self, i: usize) -> bool {
        i == 0 || self.block_range(i).end <= self.anchor_tokens().len()
    }

    /// The lead of block `i`: the tokens before it encoded in front of it and dropped
    /// (see [`StarConfig::lead`]; empty without an overlap).
    pub fn lead_range(&self, i: usize) -> Range<usize> {
        self.config
            .lead(self.block_range(i), self.anchor_tokens().len())
    }

    /// Positions of the sequence that encodes block `i`: a block inside the anchor as
    /// part of the anchor alone, at `0..`; any other block as `[anchor | lead | block]`
    /// at `0..a` followed by its lead's and its own global positions, so from block 2
    /// (the paper's c_3) on there is a gap after the anchor.
    pub fn sequence_positions(&self, i: usize) -> Vec<usize> {
        let own = self.block_range(i);
        if self.in_anchor(i) {
            (0..own.end).collect()
        } else {
            let from = self.lead_range(i).start;
            (0..self.anchor_tokens().len())
                .chain(from..own.end)
                .collect()
        }
    }

    /// The anchor's KV, computed alone (it only ever sees itself, so it equals the first
    /// `a` rows of block 0). Use [`BlockKv::prefix`] of block 0 when that is at hand.
    pub fn encode_anchor(&self) -> Result<BlockKv> {
        let anchor = self.anchor_tokens();
        self.encode_tokens(anchor, &(0..anchor.len()).collect::<Vec<_>>(), None)
    }

    /// Encodes block `i` on its own. `anchor` (from [`Phase1::encode_anchor`] or the prefix
    /// of block 0) is the read-only prefix every block but block 0 attends to; its rows are
    /// not part of the result.
    pub fn encode_block(&self, i: usize, anchor: &BlockKv) -> Result<BlockKv> {
        if i >= self.n_blocks() {
            return Err(Error::InvalidInput(format!(
                "block {i} of {}",
                self.n_blocks()
            )));
        }
        let range = self.block_range(i);
        let positions: Vec<usize> = range.clone().collect();
        if i == 0 && self.anchor_tokens().len() <= range.len() {
            return self.encode_tokens(&self.tokens[range], &positions, None);
        }
        if anchor.start != 0 || anchor.len != self.anchor_tokens().len() {
            return Err(Error::InvalidInput(format!(
                "anchor KV covers {} tokens at {}, expected {} at 0",
                anchor.len,
                anchor.start,
                self.anchor_tokens().len()
            )));
        }
        if self.in_anchor(i) {
            return Ok(anchor.rows(range));
        }
        let lead = self.lead_range(i);
        if lead.is_empty() {
            return self.encode_tokens(&self.tokens[range], &positions, Some(anchor));
        }
        // `[anchor | lead | block]`, then the lead's rows dropped.
        let from = lead.start;
        let with_lead: Vec<usize> = (from..range.end).collect();
        let encoded =
            self.encode_tokens(&self.tokens[from..range.end], &with_lead, Some(anchor))?;
        Ok(encoded.rows(lead.len()..with_lead.len()))
    }

    /// Encodes every block: block 0 first (its prefix is the anchor; with an anchor of
    /// several blocks, the anchor first), then all others in parallel.
    pub fn encode_all(&self) -> Result<Vec<BlockKv>> {
        let anchor_len = self.anchor_tokens().len();
        let (first, anchor) = if anchor_len <= self.block_range(0).len() {
            let first = self.encode_block(0, &BlockKv::new(0, 0, self.model.head_shape(), 0))?;
            let anchor = first.prefix(anchor_len);
            (first, anchor)
        } else {
            let anchor = self.encode_anchor()?;
            (anchor.rows(self.block_range(0)), anchor)
        };
        let rest: Vec<BlockKv> = (1..self.n_blocks())
            .into_par_iter()
            .map(|i| self.encode_block(i, &anchor))
            .collect::<Result<_>>()?;
        Ok(std::iter::once(first).chain(rest).collect())
    }

    fn encode_tokens(
        &self,
        tokens: &[u32],
        positions: &[usize],
        anchor: Option<&BlockKv>,
    ) -> Result<BlockKv> {
        let shape = self.model.head_shape();
        let n_layers = self.model.config().n_layers;
        let mut block = BlockKv::new(positions[0], tokens.len(), shape, n_layers);
        let mut attention = AnchoredBlock {
            anchor,
            block: &mut block,
            shape,
        };
        self.model.forward(tokens, positions, &mut attention)?;
        Ok(block)
    }
}

/// Attention of one block's tokens: causal among themselves and, for every block but the
/// first, unmasked over the anchor's KV, merged by log-sum-exp. Keeps the block's own KV.
struct AnchoredBlock<'a> {
    anchor: Option<&'a BlockKv>,
    block: &'a mut BlockKv,
    shape: HeadShape,
}

impl LayerAttention for AnchoredBlock<'_> {
    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let scale = 1.0 / (self.shape.head_dim as f32).sqrt();
        let own = KvView {
            k,
            v,
            len: m,
            row_stride: self.shape.kv_width(),
            head_stride: self.shape.head_dim,
        };
        let mut res = attention(q, m, own, self.shape, Mask::Causal { offset: 0 }, scale);
        if let Some(anchor) = self.anchor {
            let part: Attended = attention(q, m, anchor.view(layer), self.shape, Mask::None, scale);
            merge_into(&mut res, &part, m, self.shape);
        }
        out.copy_from_slice(&res.out);
        self.block.set_layer_from_rows(layer, k, v);
        Ok(())
    }

    fn computes_only(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod default_anchor_tests {
    use super::*;

    #[test]
    fn the_default_anchor_covers_a_quarter_of_the_document_in_whole_blocks() {
        let anchor = |b: usize, len: usize| StarConfig::with_default_anchor(b, len).anchor_size;
        // Up to 4 blocks: one block (a = b), also for a document shorter than a block.
        assert_eq!(anchor(2048, 100), 2048);
        assert_eq!(anchor(2048, 8192), 2048);
        // b = L/8: two blocks; b = L/16: four; b = L/32: eight.
        assert_eq!(anchor(1024, 8192), 2048);
        assert_eq!(anchor(512, 8192), 2048);
        assert_eq!(anchor(256, 8192), 2048);
        // A partial last block counts as a block.
        assert_eq!(anchor(500, 8001), 5 * 500);
        // At most 65536 tokens, in whole blocks, at least one block.
        assert_eq!(anchor(8192, 1 << 20), 8 * 8192);
        assert_eq!(anchor(60_000, 1 << 20), 60_000);
        for (b, len) in [(1, 1), (7, 1000), (4096, 131_072), (65_536, 1 << 22)] {
            let c = StarConfig::with_default_anchor(b, len);
            c.validate().unwrap();
            assert!(c.anchor_size.is_multiple_of(b));
        }
    }
}
