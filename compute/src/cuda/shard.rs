//! A GPU's blocks behind the host-side shard seam ([`AttentionShard`]): one `GpuShard`
//! per GPU of a host answers a layer's Q from any query host with `(O, lse)`.

use std::sync::{Arc, Mutex};

use super::Result;
use super::attention::{AttnOut, SegmentAttention};
use super::block::GpuBlock;
use super::device::{DevBuf, Gpu};
use super::kernels::Kernels;
use crate::partial::{Attended, HeadShape};
use crate::star::{AttentionShard, BlockKv, PendingPartial};

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
    attn: SegmentAttention,
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
        let total: usize = self.blocks.iter().map(|b| b.len).sum();
        // At least two splits: the f32 (O, lse) output is written by the merge kernel.
        let splits = self.gpu.choose_splits(m, s, total).max(2);
        // One layer planned per call: the plan's layer 0 is this call's `layer`.
        let blocks = &self.blocks;
        st.attn.plan(&self.gpu, s, 1, splits, |_| {
            blocks.iter().map(|b| b.segment(layer, None)).collect()
        })?;
        st.attn.attend(
            &self.gpu,
            &self.kernels,
            0,
            q16,
            m,
            AttnOut::F32 { out, lse },
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
