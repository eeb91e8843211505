//! Split plans and the split merge (issue 13 item 3): decode-shaped attention (at most 16
//! rows per KV head, the one-warp kernel) over ragged segments with key tails, cut into
//! 1 to 64 splits by each plan ([`AttnPlan::new`]'s balanced cuts, [`AttnPlan::tiles`]
//! and [`AttnPlan::per_segment`]) and merged by each merge (one CTA per head, column chunks,
//! as a dependent launch or not), every plan also padded with empty splits as a decode
//! graph pads it, against the CPU's attention per segment + `merge_into` on fresh random
//! inputs. Outputs are poisoned (NaN) before each launch, so an element left unwritten
//! fails. The fused merge (the split CTAs merge their own partials, counting in through
//! per-group counters that the last arrivals put back to zero) runs with its default
//! groups (about sqrt(splits) splits a group), one group of up to 32 splits, and groups
//! of 2 (up to 32 groups); each of its plans runs plainly twice (f32, then 16-bit output,
//! same counters) and then as two captured graphs replayed twice each, outputs poisoned
//! before every replay: a counter left non-zero would leave the output unwritten.
//!
//! Tolerances: those of the other attention rows (O within 2u in f32 and 2.5u in 16 bits,
//! lse within 2e-4): the kernels round P to 16 bits, the merge adds in f32. The merges on
//! the same partials differ only in the order of their f32 sums: within 1e-5.

use std::sync::Arc;
use std::time::Instant;

use super::{
    BIG_SHAPE, Report, Result, Rng, SMOL_SHAPE, from_half, max_abs, ms, rel, round_vec, to_half,
    upload_segment,
};
use crate::cpu::attention::{KvView, Mask, attention};
use crate::cuda::{
    AttnOut, AttnPlan, AttnScratch, Gpu, Segment, SplitTuning, TableBuf, upload_plans,
};
use crate::partial::{Attended, HeadShape, merge_into};

/// The split counts every plan and merge runs at.
const SPLITS: [usize; 10] = [1, 2, 3, 5, 8, 13, 16, 31, 33, 64];

/// Every split-plan and merge check; the GPU's [`SplitTuning`] is restored afterwards.
pub(super) fn checks(gpu: &Arc<Gpu>, rng: &mut Rng, report: &mut Report, u: f64) -> Result<()> {
    let before = gpu.split_tuning();
    let r = run_cases(gpu, rng, report, u);
    gpu.set_split_tuning(before);
    r
}

fn run_cases(gpu: &Arc<Gpu>, rng: &mut Rng, report: &mut Report, u: f64) -> Result<()> {
    let (smol, big) = (SMOL_SHAPE, BIG_SHAPE);
    // (name, shape, query tokens, segments (len, causal offset))
    type Case = (
        &'static str,
        HeadShape,
        usize,
        &'static [(usize, Option<usize>)],
    );
    let cases: [Case; 3] = [
        (
            "d=64, 2 tokens, 4 blocks + local",
            smol,
            2,
            &[
                (1000, None),
                (1000, None),
                (777, None),
                (64, None),
                (41, Some(39)),
            ],
        ),
        (
            "d=128, key tails 100|37|1|23",
            big,
            1,
            &[(100, None), (37, None), (1, None), (23, Some(22))],
        ),
        (
            "d=128, 8K block + local",
            big,
            1,
            &[(8192, None), (5, Some(4))],
        ),
    ];
    let t = |balanced, wide_merge, merge_pdl| SplitTuning {
        balanced,
        tile_cuts: false,
        wide_merge,
        merge_pdl,
        decode_per_sm: 0,
        fused_merge: false,
        merge_group: 0,
    };
    let fused = |merge_group| SplitTuning {
        fused_merge: true,
        merge_group,
        ..t(true, true, false)
    };
    let tunings = [
        ("per-segment, one-CTA merge", t(false, false, false)),
        ("balanced, one-CTA merge", t(true, false, false)),
        ("balanced, column-chunk merge", t(true, true, false)),
        ("balanced, column-chunk merge, PDL", t(true, true, true)),
        (
            "whole-tile cuts, column-chunk merge",
            SplitTuning {
                tile_cuts: true,
                ..t(true, true, false)
            },
        ),
        ("balanced, fused merge", fused(0)),
        ("balanced, fused merge in one group (<= 32)", fused(32)),
        (
            "balanced, fused merge in groups of 2 (<= 32 groups)",
            fused(2),
        ),
    ];
    for (name, shape, m, segments) in cases {
        let inputs = Inputs::random(gpu, rng, shape, m, segments)?;
        // f32 outputs of the balanced plans by merge (one-CTA, column chunks), for the
        // merge-vs-merge row.
        // (index 2: the fused merge, default groups).
        let mut by_merge: [Vec<Vec<f32>>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        for (tname, tuning) in tunings {
            let t0 = Instant::now();
            gpu.set_split_tuning(tuning);
            let mut worst = Worst::default();
            for splits in SPLITS {
                for pad in [0, 7] {
                    let mut plan = AttnPlan::for_gpu(gpu, &inputs.segs, splits);
                    plan.pad_splits(plan.n_splits() + pad);
                    let runs = inputs.attend(gpu, &plan, tuning.fused_merge)?;
                    for got in &runs {
                        worst.add(got, &inputs.want);
                    }
                    let got = &runs[0];
                    if tuning.balanced && !tuning.tile_cuts && !tuning.merge_pdl && pad == 0 {
                        match (tuning.fused_merge, tuning.merge_group) {
                            (false, _) => {
                                by_merge[tuning.wide_merge as usize].push(got.0.out.clone())
                            }
                            (true, 0) => by_merge[2].push(got.0.out.clone()),
                            _ => {}
                        }
                    }
                }
            }
            let what = format!("splits {name}, {tname} (1..64 splits, +7 empty)");
            let elapsed = ms(t0);
            report.check(&format!("{what}: O"), "rel", worst.o, 2.0 * u, elapsed);
            report.check(&format!("{what}: lse"), "max abs", worst.lse, 2e-4, elapsed);
            report.check(
                &format!("{what}: O {}", gpu.dtype.name()),
                "rel",
                worst.half,
                2.5 * u,
                elapsed,
            );
        }
        let diff = by_merge[0]
            .iter()
            .zip(&by_merge[1])
            .map(|(a, b)| rel(b, a))
            .fold(0.0f64, |w, r| if r.is_nan() { f64::NAN } else { w.max(r) });
        report.check(
            &format!("splits {name}: column-chunk vs one-CTA merge (same plans)"),
            "rel",
            diff,
            1e-5,
            0.0,
        );
        let diff = by_merge[1]
            .iter()
            .zip(&by_merge[2])
            .map(|(a, b)| rel(b, a))
            .fold(0.0f64, |w, r| if r.is_nan() { f64::NAN } else { w.max(r) });
        report.check(
            &format!("splits {name}: fused vs column-chunk merge (same plans)"),
            "rel",
            if by_merge[2].len() == by_merge[1].len() {
                diff
            } else {
                f64::NAN
            },
            1e-5,
            0.0,
        );
    }
    Ok(())
}

/// The largest errors over a set of runs (NaN, an unwritten element, sticks).
#[derive(Default)]
struct Worst {
    o: f64,
    lse: f64,
    half: f64,
}

impl Worst {
    fn add(&mut self, got: &(Attended, Vec<f32>), want: &Attended) {
        let up = |w: &mut f64, x: f64| {
            *w = if x.is_nan() || w.is_nan() {
                f64::NAN
            } else {
                w.max(x)
            }
        };
        up(&mut self.o, rel(&got.0.out, &want.out));
        up(&mut self.lse, max_abs(&got.0.lse, &want.lse));
        up(&mut self.half, rel(&got.1, &want.out));
    }
}

/// One case's random query rows and segments on the device, and the CPU's answer.
struct Inputs {
    shape: HeadShape,
    m: usize,
    q: crate::cuda::DevBuf,
    _kv: Vec<(crate::cuda::DevBuf, crate::cuda::DevBuf)>,
    segs: Vec<Segment>,
    want: Attended,
}

impl Inputs {
    fn random(
        gpu: &Arc<Gpu>,
        rng: &mut Rng,
        shape: HeadShape,
        m: usize,
        segments: &[(usize, Option<usize>)],
    ) -> Result<Self> {
        let dt = gpu.dtype;
        let (nh, nkv, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
        let q = round_vec(dt, &rng.vec(m * nh * d, -2.0, 2.0));
        let q_d = gpu.upload_new(&to_half(dt, &q))?;
        let scale = 1.0 / (d as f32).sqrt();
        let mut want = Attended::empty(m, shape);
        let (mut kv, mut segs) = (Vec::new(), Vec::new());
        for &(len, causal) in segments {
            let kk = round_vec(dt, &rng.vec(nkv * len * d, -2.0, 2.0));
            let vv = round_vec(dt, &rng.vec(nkv * len * d, -2.0, 2.0));
            let (seg, bufs) = upload_segment(gpu, &kk, &vv, len, d, causal)?;
            segs.push(seg);
            kv.push(bufs);
            let view = KvView {
                k: &kk,
                v: &vv,
                len,
                row_stride: d,
                head_stride: len * d,
            };
            let mask = causal.map_or(Mask::None, |o| Mask::Causal { offset: o });
            merge_into(
                &mut want,
                &attention(&q, m, view, shape, mask, scale),
                m,
                shape,
            );
        }
        Ok(Self {
            shape,
            m,
            q: q_d,
            _kv: kv,
            segs,
            want,
        })
    }

    /// The plan's f32 output and lse, and its 16-bit output as f32, each written into
    /// NaN-poisoned buffers; with `graphs`, also those of the two launches captured as
    /// graphs and replayed twice each (outputs poisoned again before every replay).
    fn attend(
        &self,
        gpu: &Arc<Gpu>,
        plan: &AttnPlan,
        graphs: bool,
    ) -> Result<Vec<(Attended, Vec<f32>)>> {
        let (m, shape) = (self.m, self.shape);
        let (nh, nkv, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
        let k = gpu.kernels(d)?;
        let mut table = TableBuf::default();
        let p = upload_plans(gpu, &mut table, std::slice::from_ref(plan))?[0];
        let mut scratch = AttnScratch::default();
        let out_d = gpu.upload_new(&vec![f32::NAN; m * nh * d])?;
        let lse_d = gpu.upload_new(&vec![f32::NAN; m * nh])?;
        // 16-bit output, poisoned with all-ones words (NaN in both 16-bit types).
        let oh_d = gpu.upload_new(&vec![0xFFFFu16; m * nh * d])?;
        let f32_out = AttnOut::F32 {
            out: out_d.ptr(),
            lse: lse_d.ptr(),
        };
        let mut run = |out: AttnOut| {
            gpu.attention(
                &k,
                self.q.ptr(),
                m,
                nh,
                nkv,
                p.0,
                p.1,
                p.2,
                out,
                &mut scratch,
            )
        };
        let poison = || -> Result<()> {
            gpu.upload(out_d.ptr(), &vec![f32::NAN; m * nh * d])?;
            gpu.upload(lse_d.ptr(), &vec![f32::NAN; m * nh])?;
            gpu.upload(oh_d.ptr(), &vec![0xFFFFu16; m * nh * d])?;
            Ok(())
        };
        let read = || -> Result<(Attended, Vec<f32>)> {
            let mut got = Attended::empty(m, shape);
            gpu.download(&mut got.out, out_d.ptr())?;
            gpu.download(&mut got.lse, lse_d.ptr())?;
            let mut oh = vec![0u16; m * nh * d];
            gpu.download(&mut oh, oh_d.ptr())?;
            Ok((got, from_half(gpu.dtype, &oh)))
        };
        run(f32_out)?;
        run(AttnOut::Half(oh_d.ptr()))?;
        let mut runs = vec![read()?];
        if graphs {
            let g32 = gpu.capture(|| run(f32_out))?;
            let g16 = gpu.capture(|| run(AttnOut::Half(oh_d.ptr())))?;
            let (Some(g32), Some(g16)) = (g32, g16) else {
                return Err("the driver captured no graph".into());
            };
            for _ in 0..2 {
                poison()?;
                gpu.launch_graph(&g32)?;
                gpu.launch_graph(&g16)?;
                runs.push(read()?);
            }
        }
        Ok(runs)
    }
}
