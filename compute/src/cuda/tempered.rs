//! APE's tempered merge on one GPU (issue 14; the math is [`ContextMerge`]'s).
//!
//! The query's untempered keys (the anchor's blocks and its own causal KV) and the
//! tempered group (every other context block) are attended by two launches of the same
//! kernel over disjoint key sets, the second at softmax scale `1 / (sqrt(d) T)`; each
//! writes its f32 `(O, lse)`, and the host weighs the group and merges the two exactly,
//! as [`super::phase2::GpuQuery`] merges other shards. The keys are read once, as in the
//! exact merge; the extra cost is one launch and a small round trip per layer.

use super::Result;
use super::attention::{AttnOut, Segment, SegmentAttention};
use super::device::{DevBuf, Gpu};
use super::kernels::Kernels;
use crate::partial::{Attended, ContextMerge, HeadShape, merge_into};

/// The tempered group's planned attention and the f32 buffers, reused every layer.
pub(super) struct TemperedGroup {
    merge: ContextMerge,
    attn: SegmentAttention,
    /// f32 `(O, lse)` of the untempered part, then of the tempered group.
    plain: (Option<DevBuf>, Option<DevBuf>),
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
            plain: (None, None),
            group: (None, None),
        })
    }

    /// Layer `layer`'s attention of `q` (`m` rows): the untempered keys `plain` plans,
    /// the tempered group, weighed and merged; the result goes to `out` in the GPU's
    /// 16-bit type.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend(
        &mut self,
        gpu: &Gpu,
        kernels: &Kernels,
        shape: HeadShape,
        layer: usize,
        q: u64,
        m: usize,
        plain: &mut SegmentAttention,
        out: u64,
    ) -> Result<()> {
        let (qw, nh) = (shape.q_width(), shape.n_heads);
        let grow = |b: &mut Option<DevBuf>, bytes: usize| -> Result<u64> {
            if b.as_ref().is_none_or(|x| x.bytes() < bytes) {
                *b = Some(gpu.alloc(bytes)?);
            }
            Ok(b.as_ref().map_or(0, DevBuf::ptr))
        };
        let (po, pl) = (
            grow(&mut self.plain.0, m * qw * 4)?,
            grow(&mut self.plain.1, m * nh * 4)?,
        );
        let (go, gl) = (
            grow(&mut self.group.0, m * qw * 4)?,
            grow(&mut self.group.1, m * nh * 4)?,
        );
        let f32_out = |out, lse| AttnOut::F32 { out, lse };
        plain.attend(gpu, kernels, layer, q, m, f32_out(po, pl))?;
        let scale = self.merge.score_scale();
        (self.attn).attend_scaled(gpu, kernels, layer, q, m, scale, f32_out(go, gl))?;
        let (mut acc, mut group) = (Attended::empty(m, shape), Attended::empty(m, shape));
        gpu.download(&mut acc.out, po)?;
        gpu.download(&mut acc.lse, pl)?;
        gpu.download(&mut group.out, go)?;
        gpu.download(&mut group.lse, gl)?;
        self.merge.weigh_group(&mut group);
        merge_into(&mut acc, &group, m, shape);
        gpu.upload(po, &acc.out)?;
        gpu.to_half(kernels, out, po, m * qw)
    }
}
