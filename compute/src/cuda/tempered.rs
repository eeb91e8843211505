//! APE's tempered merge on one GPU (issue 14; the math is [`ContextMerge`]'s).
//!
//! The query's untempered keys (the anchor's blocks and its own causal KV) and the
//! tempered group (every other context block) are attended by two launches of the same
//! kernel over disjoint key sets, the second at softmax scale `1 / (sqrt(d) T)`. The
//! group's f32 `(O, lse)` goes to the host, where the tempered shards of workers join it
//! and it is weighed; [`super::phase2::GpuQuery`] then merges it with the untempered
//! parts on the device. The keys are read once, as in the exact merge; the extra cost is
//! one launch and a small round trip per layer.
//!
//! At `T = 1` (the service's default merge, `S = 0.5`) the group's weight `S` equals a
//! bias of `ln S` on each of its keys' scores, so [`super::phase2::GpuQuery`] puts the
//! group in its one plan as weighted keys instead (one launch, no round trip, decode
//! steps as graphs) whenever no shard answers for the group and the kernel for the
//! step's rows reads item weights; this launch remains for `T != 1` and those cases.

use super::Result;
use super::attention::{AttnOut, Segment, SegmentAttention};
use super::device::{DevBuf, Gpu};
use super::kernels::Kernels;
use crate::partial::{Attended, ContextMerge, HeadShape, merge_into};

/// The tempered group's planned attention and the f32 buffers, reused every layer.
pub(super) struct TemperedGroup {
    merge: ContextMerge,
    attn: SegmentAttention,
    /// f32 `(O, lse)` of the tempered group.
    group: (Option<DevBuf>, Option<DevBuf>),
}

impl TemperedGroup {
    /// Plans every layer's attention over the tempered blocks' segments
    /// (`segments(layer)`), in `splits` splits.
    pub(super) fn new(
        gpu: &Gpu,
        merge: ContextMerge,
        shape: HeadShape,
        n_layers: usize,
        splits: usize,
        segments: impl FnMut(usize) -> Vec<Segment>,
    ) -> Result<Self> {
        let mut attn = SegmentAttention::default();
        attn.plan(gpu, shape, n_layers, splits, segments)?;
        Ok(Self {
            merge,
            attn,
            group: (None, None),
        })
    }

    /// The tempered group's attention of `q` (`m` rows) at layer `layer`, at the
    /// tempered softmax scale, merged into `group` (host memory: the query host adds the
    /// tempered shards' parts and weighs the group; see [`super::phase2::GpuQuery`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend(
        &mut self,
        gpu: &Gpu,
        kernels: &Kernels,
        shape: HeadShape,
        layer: usize,
        q: u64,
        m: usize,
        group: &mut Attended,
    ) -> Result<()> {
        let (qw, nh) = (shape.q_width(), shape.n_heads);
        let grow = |b: &mut Option<DevBuf>, bytes: usize| DevBuf::grown(gpu, b, bytes);
        let (go, gl) = (
            grow(&mut self.group.0, m * qw * 4)?,
            grow(&mut self.group.1, m * nh * 4)?,
        );
        let scale = self.merge.score_scale();
        let out = AttnOut::F32 { out: go, lse: gl };
        (self.attn).attend_scaled(gpu, kernels, layer, q, m, scale, out)?;
        let mut part = Attended::empty(m, shape);
        gpu.download(&mut part.out, go)?;
        gpu.download(&mut part.lse, gl)?;
        merge_into(group, &part, m, shape);
        Ok(())
    }
}
