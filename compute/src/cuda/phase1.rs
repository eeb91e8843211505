//! Phase 1 on the GPU: a block encoded causally over itself with the anchor's KV as a
//! read-only, unmasked prefix; K/V land directly in the block.

use std::sync::Arc;

use super::attention::{AttnOut, SegmentAttention};
use super::block::GpuBlock;
use super::device::Gpu;
use super::kernels::Kernels;
use super::model::{CudaLlama, GpuAttention};
use super::{CudaError, KvDest, Result};

/// Phase-1 attention of one block: causal over itself, unmasked over the anchor (a
/// read-only prefix segment; absent for block 0). K/V land directly in the block.
struct AnchoredBlock<'a> {
    anchor: Option<&'a GpuBlock>,
    block: &'a GpuBlock,
    attn: SegmentAttention,
}

impl GpuAttention for AnchoredBlock<'_> {
    fn begin(&mut self, gpu: &Gpu, m: usize) -> Result<()> {
        let shape = self.block.shape;
        let anchor_len = self.anchor.map_or(0, |a| a.len);
        let splits = gpu.choose_splits(m, shape, anchor_len + m);
        let (anchor, block) = (self.anchor, self.block);
        self.attn.plan(gpu, shape, block.n_layers(), splits, |l| {
            let mut segs = Vec::new();
            if let Some(a) = anchor {
                segs.push(a.segment(l, None));
            }
            segs.push(block.segment(l, Some(0)));
            segs
        })
    }

    fn kv_dest(&mut self, layer: usize) -> KvDest {
        let (k, v) = self.block.layer_ptrs(layer);
        KvDest {
            k,
            v,
            head_stride: (self.block.len * self.block.shape.head_dim) as i64,
            row_stride: self.block.shape.head_dim as i32,
            t0: 0,
            t0_dev: 0,
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
        self.attn
            .attend(gpu, kernels, layer, q, m, AttnOut::Half(out))
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
    encode_block_into(model, &[], tokens, anchor, &block)?;
    Ok(block)
}

/// [`encode_block`] with `lead`, the tokens just before the block, encoded in front of
/// it and dropped: `[anchor | lead | block]`, as [`crate::star::StarConfig`]'s overlap
/// asks. Without a lead it is [`encode_block`].
pub fn encode_block_after(
    model: &mut CudaLlama,
    lead: &[u32],
    tokens: &[u32],
    start: usize,
    anchor: Option<&GpuBlock>,
) -> Result<GpuBlock> {
    if lead.is_empty() {
        return encode_block(model, tokens, start, anchor);
    }
    let Some(lead_start) = start.checked_sub(lead.len()) else {
        return Err(CudaError::Invalid(format!(
            "a lead of {} tokens before position {start}",
            lead.len()
        )));
    };
    let gpu = model.gpu().clone();
    let sequence: Vec<u32> = lead.iter().chain(tokens).copied().collect();
    let encoded = encode_block(model, &sequence, lead_start, anchor)?;
    encoded.rows(&gpu, lead.len()..sequence.len())
}

/// [`encode_block_after`] into a block allocated beforehand (its `start` and `len` say
/// where the tokens sit; the cold loader allocates every block of a query up front).
pub fn encode_block_into(
    model: &mut CudaLlama,
    lead: &[u32],
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
    if !lead.is_empty() {
        let gpu = model.gpu().clone();
        let rows = encode_block_after(model, lead, tokens, block.start, anchor)?;
        return rows.copy_into(&gpu, block);
    }
    let positions: Vec<usize> = (block.start..block.start + block.len).collect();
    let mut attention = AnchoredBlock {
        anchor,
        block,
        attn: SegmentAttention::long_runs(),
    };
    model.forward(tokens, &positions, &mut attention)
}

/// Phase 1 for a whole context, as [`crate::star::Phase1::encode_all`] defines it:
/// block 0 alone (its prefix the anchor) or, with an anchor of several blocks, the anchor
/// alone and the blocks inside it as its rows; every later block over the anchor, after
/// its lead.
pub fn encode_context(
    model: &mut CudaLlama,
    tokens: &[u32],
    config: crate::star::StarConfig,
) -> Result<Vec<Arc<GpuBlock>>> {
    config.validate()?;
    if tokens.is_empty() {
        return Err(CudaError::Invalid("the context is empty".into()));
    }
    let gpu = model.gpu().clone();
    let b = config.block_size;
    let first_len = b.min(tokens.len());
    let anchor_len = config.anchor_size.min(tokens.len());
    let (first, anchor) = if anchor_len <= first_len {
        let first = encode_block(model, &tokens[..first_len], 0, None)?;
        let anchor = first.prefix(&gpu, anchor_len)?;
        (first, anchor)
    } else {
        let anchor = encode_block(model, &tokens[..anchor_len], 0, None)?;
        (anchor.rows(&gpu, 0..first_len)?, anchor)
    };
    let mut out = vec![Arc::new(first)];
    for start in (b..tokens.len()).step_by(b) {
        let range = start..(start + b).min(tokens.len());
        if range.end <= anchor_len {
            out.push(Arc::new(anchor.rows(&gpu, range)?));
            continue;
        }
        let lead = config.lead(range.clone(), anchor_len);
        out.push(Arc::new(encode_block_after(
            model,
            &tokens[lead],
            &tokens[range.clone()],
            start,
            Some(&anchor),
        )?));
    }
    Ok(out)
}
