//! 8-bit KV on the GPU (issue 13): blocks kept in 8 bits in the tier and attended by the
//! `*_kv8` kernels, against the CPU backend's 8-bit attention (the same int8 or fp8 e4m3
//! values and f16 scales, dequantised exactly in f32) and against the 16-bit kernel on
//! the dequantised values, on random inputs. Every check runs for int8 and for fp8; the
//! fp8 plans of the multi-block cases hold one int8 block too (the format is per item).
//! The kernels widen either format exactly (int8 and e4m3 values are exact in both
//! 16-bit types), so the tolerances are the same for both.
//!
//! Tolerances: the 8-bit kernels apply K's scales to the scores in f32 and fold V's into
//! P before P is rounded to 16 bits, so they round exactly where the 16-bit kernel does:
//! the 16-bit attention rows' tolerances hold (O 2u in f32 and 2.5u in 16 bits, lse 2e-4).
//! Against the 16-bit kernel on the dequantised values rounded to 16 bits (K and V each
//! off by up to u/2), O within 4u and lse within 8u.

use std::sync::Arc;
use std::time::Instant;

use super::{
    BIG_SHAPE, Report, Result, Rng, SMOL_SHAPE, from_half, graph_vs_plain, max_abs, ms, rel,
    round_vec, tiny_config, to_half,
};
use crate::cpu::attention::{KvView, Mask, attention, attention_source_into};
use crate::cuda::star::{ContextBlocks, GpuBlock, GpuQuery, GpuShard};
use crate::cuda::{
    AttnKernels, AttnOut, AttnPlan, AttnScratch, CudaLlama, DecodeKernel, Gpu, Segment,
    SplitTuning, TableBuf, upload_plans,
};
use crate::kv8::{Kv8, Kv8Format};
use crate::model::Llama;
use crate::partial::{Attended, HeadShape, merge_into};
use crate::quant::GgmlType;
use crate::star::{AttentionShard, BlockKv, CpuShard, Phase1, QueryAttention, StarConfig};

/// Random 8-bit blocks of `lens` tokens, `n_layers` layers: values uniform in +-2 times a
/// per-row factor in [0.05, 3] (so the rows' scales differ by up to 60x), quantised with
/// one scale per row, except the block at index 1, with one scale per head (the store's
/// coarser granularity, expanded per row at upload), in `format`; with `mix`, the block at
/// index 2 is int8 whatever `format` (a plan mixing formats).
fn random_blocks(
    rng: &mut Rng,
    shape: HeadShape,
    lens: &[usize],
    n_layers: usize,
    format: Kv8Format,
    mix: bool,
) -> Vec<Arc<BlockKv>> {
    let d = shape.head_dim;
    let mut start = 0;
    let mut out = Vec::new();
    for (bi, &len) in lens.iter().enumerate() {
        let rows_per_scale = if bi == 1 { len } else { 1 };
        let mut one = || {
            let mut x = rng.vec(shape.n_kv_heads * len * d, -2.0, 2.0);
            for row in x.chunks_mut(d) {
                let f = rng.uniform(0.05, 3.0);
                row.iter_mut().for_each(|v| *v *= f);
            }
            let f = if mix && bi == 2 {
                Kv8Format::Int8
            } else {
                format
            };
            Kv8::quantize_as(f, &x, d, rows_per_scale)
        };
        let layers = (0..n_layers).map(|_| (one(), one())).collect();
        out.push(Arc::new(BlockKv::quantized(start, len, shape, layers)));
        start += len;
    }
    out
}

/// Every 8-bit check.
pub(super) fn checks(gpu: &Arc<Gpu>, rng: &mut Rng, report: &mut Report, u: f64) -> Result<()> {
    quantize_check(gpu, rng, report)?;
    let (smol, big) = (SMOL_SHAPE, BIG_SHAPE);
    // (name, shape, query rows m, 8-bit block lengths, local causal length, splits)
    type Case = (
        &'static str,
        HeadShape,
        usize,
        &'static [usize],
        usize,
        usize,
    );
    let cases: [Case; 5] = [
        ("decode, 1 split, d=64", smol, 1, &[700, 512, 33], 40, 1),
        ("decode, 16 splits, d=64", smol, 1, &[1000, 777, 64], 40, 16),
        (
            "decode 8K keys, 64 splits, d=128",
            big,
            1,
            &[4096, 4096],
            5,
            64,
        ),
        (
            "query m=5 (20 rows: 4-warp kernel), d=128",
            big,
            5,
            &[2048, 300, 1500],
            5,
            7,
        ),
        ("query m=30, 1 split, d=64", smol, 30, &[1000, 100], 30, 1),
    ];
    // Both key tiles of the 8-bit kernels run every case, for both formats; the decode
    // cases with split plans both with the split merge fused into the one-warp kernels
    // and with the separate `attn_merge` launch (SplitTuning::fused_merge).
    let default = gpu.attention_kernels();
    let tuning = gpu.split_tuning();
    // Every key tile of the 8-bit kernels (the swapped-operand kernel off), then the
    // swapped-operand decode kernel (up to 8 rows; the m = 5 case falls back to the 8-bit
    // kernels), for 8-bit plans (`swap_kv8`) and as the decode kernel of every plan.
    let kernel_sets: Vec<AttnKernels> = AttnKernels::ALL_KV8
        .into_iter()
        .map(|kv8| AttnKernels {
            kv8,
            swap_kv8: false,
            ..default
        })
        .chain([
            AttnKernels {
                swap_kv8: true,
                ..default
            },
            AttnKernels {
                decode: DecodeKernel::Swap,
                swap_kv8: false,
                ..default
            },
        ])
        .collect();
    for format in [Kv8Format::Int8, Kv8Format::Fp8] {
        for &kernels in &kernel_sets {
            gpu.set_attention_kernels(kernels);
            for (name, shape, m, lens, local, splits) in cases {
                for fused in [true, false] {
                    if !fused && (m > 1 || splits == 1) {
                        continue;
                    }
                    gpu.set_split_tuning(SplitTuning {
                        fused_merge: fused,
                        ..tuning
                    });
                    let name = match (m, fused) {
                        (1, true) => format!("{name}, fused merge"),
                        (1, false) => format!("{name}, attn_merge"),
                        _ => name.to_string(),
                    };
                    let r = mixed_case(
                        gpu, rng, report, u, format, &name, shape, m, lens, local, splits,
                    );
                    if r.is_err() {
                        gpu.set_attention_kernels(default);
                        gpu.set_split_tuning(tuning);
                    }
                    r?;
                }
            }
        }
        gpu.set_attention_kernels(default);
        gpu.set_split_tuning(tuning);
        shard_and_round_trip(gpu, rng, report, u, big, format)?;
        query_checks(gpu, rng, report, u, format)?;
    }
    Ok(())
}

/// How the checks name a format.
/// The device quantiser (`quantize_rows`: what a re-encoded block of an 8-bit document
/// becomes on the cold path) against the host's (`Kv8::quantize_as`, bit for bit the
/// store's): every value byte and scale equal, both formats, head_dim 64 and 128, on rows
/// whose magnitudes span 1e-6 to 3e4 (e4m3 subnormals, subnormal f16 scales), an all-zero
/// row and rows with one outlier 30x the others (which then round to few levels).
fn quantize_check(gpu: &Arc<Gpu>, rng: &mut Rng, report: &mut Report) -> Result<()> {
    let dt = gpu.dtype;
    for d in [64usize, 128] {
        let kern = gpu.kernels(d)?;
        let rows = 300;
        let mut x = Vec::with_capacity(rows * d);
        for r in 0..rows {
            let factor = 10f32.powf(rng.uniform(-6.0, 3.0));
            for j in 0..d {
                let v = match r {
                    0 => 0.0,
                    1 | 2 if j == 5 => factor * 30.0,
                    _ => rng.uniform(-1.0, 1.0) * factor,
                };
                x.push(v);
            }
        }
        let x = round_vec(dt, &x);
        let src = gpu.alloc(rows * d * 2)?;
        gpu.upload(src.ptr(), &to_half(dt, &x))?;
        let dst = gpu.alloc(rows * d + 2 * rows)?;
        for format in [Kv8Format::Int8, Kv8Format::Fp8] {
            let t = Instant::now();
            gpu.quantize_rows(&kern, dst.ptr(), src.ptr(), (rows, d), format)?;
            let mut got = vec![0u8; rows * d + 2 * rows];
            gpu.download(&mut got, dst.ptr())?;
            let want = Kv8::quantize_as(format, &x, d, 1);
            let mut wrong = 0usize;
            for r in 0..rows {
                let scale = half::f16::from_f32(want.scales[r]).to_bits().to_le_bytes();
                let at = rows * d + 2 * r;
                wrong += usize::from(got[at..at + 2] != scale);
                for j in 0..d {
                    wrong += usize::from(got[r * d + j] != want.q[r * d + j] as u8);
                }
            }
            report.check(
                &format!(
                    "quantize_rows ({}, d={d}) == the store's quantiser",
                    format_name(format)
                ),
                "bytes differ",
                wrong as f64,
                0.0,
                ms(t),
            );
        }
    }
    Ok(())
}

fn format_name(format: Kv8Format) -> &'static str {
    match format {
        Kv8Format::Int8 => "int8",
        Kv8Format::Fp8 => "fp8",
    }
}

/// 8-bit blocks plus a 16-bit causal segment (a query's own KV) in one plan: the 8-bit
/// kernel against the CPU's 8-bit attention per block and f32 attention over the local
/// keys, merged.
#[allow(clippy::too_many_arguments)]
fn mixed_case(
    gpu: &Arc<Gpu>,
    rng: &mut Rng,
    report: &mut Report,
    u: f64,
    format: Kv8Format,
    name: &str,
    shape: HeadShape,
    m: usize,
    lens: &[usize],
    local: usize,
    splits: usize,
) -> Result<()> {
    let t = Instant::now();
    let dt = gpu.dtype;
    let (nh, nkv, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    let k = gpu.kernels(d)?;
    let scale = 1.0 / (d as f32).sqrt();
    let q = round_vec(dt, &rng.vec(m * nh * d, -2.0, 2.0));
    let q_d = gpu.upload_new(&to_half(dt, &q))?;
    let blocks = random_blocks(rng, shape, lens, 1, format, true);
    let fname = format_name(format);
    let dev: Vec<GpuBlock> = blocks
        .iter()
        .map(|b| GpuBlock::upload(gpu, b))
        .collect::<Result<_, _>>()?;
    let mut segs: Vec<Segment> = dev.iter().map(|b| b.segment(0, None)).collect();
    let lk = round_vec(dt, &rng.vec(nkv * local * d, -2.0, 2.0));
    let lv = round_vec(dt, &rng.vec(nkv * local * d, -2.0, 2.0));
    let (lk_d, lv_d) = (
        gpu.upload_new(&to_half(dt, &lk))?,
        gpu.upload_new(&to_half(dt, &lv))?,
    );
    let offset = local - m;
    segs.push(Segment {
        k: lk_d.ptr(),
        v: lv_d.ptr(),
        head_stride: (local * d) as i64,
        row_stride: d as i32,
        len: local,
        causal_offset: Some(offset),
        scale_off: 0,
        log2_weight: 0.0,
    });
    let mut want = Attended::empty(m, shape);
    for b in &blocks {
        let mut part = Attended::empty(m, shape);
        let src = b.source(0);
        attention_source_into(
            &q,
            m,
            src,
            shape,
            Mask::None,
            scale,
            &mut part.out,
            &mut part.lse,
        );
        merge_into(&mut want, &part, m, shape);
    }
    let view = KvView {
        k: &lk,
        v: &lv,
        len: local,
        row_stride: d,
        head_stride: local * d,
    };
    let own = attention(&q, m, view, shape, Mask::Causal { offset }, scale);
    merge_into(&mut want, &own, m, shape);

    let plan = AttnPlan::new(&segs, splits);
    if !plan.kv8() {
        return Err("a plan over 8-bit blocks is not marked 8-bit".into());
    }
    let mut table = TableBuf::default();
    let p = upload_plans(gpu, &mut table, std::slice::from_ref(&plan))?[0];
    let mut scratch = AttnScratch::default();
    let out_d = gpu.alloc(m * nh * d * 4)?;
    let lse_d = gpu.alloc(m * nh * 4)?;
    let f32_out = AttnOut::F32 {
        out: out_d.ptr(),
        lse: lse_d.ptr(),
    };
    gpu.attention_kv8(&k, q_d.ptr(), m, nh, nkv, p, f32_out, &mut scratch)?;
    let mut got = Attended::empty(m, shape);
    gpu.download(&mut got.out, out_d.ptr())?;
    gpu.download(&mut got.lse, lse_d.ptr())?;
    let kernel = gpu.attention_kernel_name_kv8(m * nh / nkv, d);
    let name = format!("{fname} [{kernel}] {name}");
    let n = plan.n_splits();
    report.check(
        &format!("{name}: O vs CPU {fname} ({n} splits)"),
        "rel",
        rel(&got.out, &want.out),
        2.0 * u,
        ms(t),
    );
    report.check(
        &format!("{name}: lse vs CPU {fname}"),
        "max abs",
        max_abs(&got.lse, &want.lse),
        2e-4,
        ms(t),
    );
    let oh_d = gpu.alloc(m * nh * d * 2)?;
    gpu.attention_kv8(
        &k,
        q_d.ptr(),
        m,
        nh,
        nkv,
        p,
        AttnOut::Half(oh_d.ptr()),
        &mut scratch,
    )?;
    let mut oh = vec![0u16; m * nh * d];
    gpu.download(&mut oh, oh_d.ptr())?;
    report.check(
        &format!("{name}: O {} out vs CPU {fname}", dt.name()),
        "rel",
        rel(&from_half(dt, &oh), &want.out),
        2.5 * u,
        ms(t),
    );
    Ok(())
}

/// A [`GpuShard`] over 8-bit blocks (the upload, the tier's block, [`SegmentAttention`]'s
/// 8-bit plan) against a [`CpuShard`] over the same blocks and against a GPU shard over
/// the dequantised blocks (the 16-bit kernel); and the blocks' download and row ranges.
///
/// [`SegmentAttention`]: crate::cuda::SegmentAttention
fn shard_and_round_trip(
    gpu: &Arc<Gpu>,
    rng: &mut Rng,
    report: &mut Report,
    u: f64,
    shape: HeadShape,
    format: Kv8Format,
) -> Result<()> {
    let t = Instant::now();
    let dt = gpu.dtype;
    let fname = format_name(format);
    let blocks = random_blocks(rng, shape, &[700, 512, 33], 2, format, false);
    let cpu = CpuShard::new(blocks.clone(), shape);
    let gpu8 = GpuShard::from_cpu_blocks(gpu.clone(), &blocks, shape)?;
    let wide: Vec<Arc<BlockKv>> = blocks.iter().map(|b| b.dequantized()).collect();
    let gpu16 = GpuShard::from_cpu_blocks(gpu.clone(), &wide, shape)?;
    for m in [1, 5] {
        let q = round_vec(dt, &rng.vec(m * shape.q_width(), -2.0, 2.0));
        let want = cpu.attend(1, &q, m)?;
        let got = AttentionShard::attend(&gpu8, 1, &q, m)?;
        let w16 = AttentionShard::attend(&gpu16, 1, &q, m)?;
        let tag = format!("{fname} GpuShard (m={m}, d=128)");
        report.check(
            &format!("{tag} vs CpuShard {fname}: O"),
            "rel",
            rel(&got.out, &want.out),
            2.0 * u,
            ms(t),
        );
        report.check(
            &format!("{tag} vs CpuShard {fname}: lse"),
            "max abs",
            max_abs(&got.lse, &want.lse),
            2e-4,
            ms(t),
        );
        report.check(
            &format!("{tag} vs 16-bit kernel on dequantised: O"),
            "rel",
            rel(&got.out, &w16.out),
            4.0 * u,
            ms(t),
        );
        report.check(
            &format!("{tag} vs 16-bit kernel on dequantised: lse"),
            "max abs",
            max_abs(&got.lse, &w16.lse),
            8.0 * u,
            ms(t),
        );
    }
    // Held in 8 bits (about half a 16-bit block's bytes) and downloaded unchanged.
    let t = Instant::now();
    let b = &blocks[0];
    let up = GpuBlock::upload(gpu, b)?;
    let ratio = up.n_bytes() as f64 / GpuBlock::upload(gpu, &wide[0])?.n_bytes() as f64;
    report.check(
        &format!("{fname} GPU block bytes / 16-bit block bytes (d=128)"),
        "ratio",
        ratio,
        0.5 + 1.0 / 128.0,
        ms(t),
    );
    let back = up.download(gpu)?;
    let rows = up.rows(gpu, 100..333)?.download(gpu)?;
    let mut diff = 0usize;
    let d = shape.head_dim;
    for (l, (k, v)) in b.kv8.as_ref().unwrap().iter().enumerate() {
        let (bk, bv) = &back.kv8.as_ref().unwrap()[l];
        diff += (bk.dequantize(d) != k.dequantize(d)) as usize;
        diff += (bv.dequantize(d) != v.dequantize(d)) as usize;
        // Rows 100..333 of every head.
        let (rk, _) = &rows.kv8.as_ref().unwrap()[l];
        let full = k.dequantize(d);
        let want: Vec<f32> = (0..shape.n_kv_heads)
            .flat_map(|h| full[(h * b.len + 100) * d..(h * b.len + 333) * d].to_vec())
            .collect();
        diff += (rk.dequantize(d) != want) as usize;
    }
    diff += (up.kv8_format() != Some(format)) as usize;
    diff += back
        .kv8
        .as_ref()
        .unwrap()
        .iter()
        .any(|(k, v)| k.format != format || v.format != format) as usize;
    report.check(
        &format!("{fname} GPU block download and row range == uploaded"),
        "mismatch",
        diff as f64,
        0.0,
        ms(t),
    );
    Ok(())
}

/// Phase 2 of the random tiny model over 8-bit blocks: the CPU's blocks from phase 1,
/// quantised, answered on the CPU (8-bit attention) and on the GPU (8-bit tier and
/// kernels), then decode steps, and decode steps replayed from a CUDA graph.
fn query_checks(
    gpu: &Arc<Gpu>,
    rng: &mut Rng,
    report: &mut Report,
    u: f64,
    format: Kv8Format,
) -> Result<()> {
    let t = Instant::now();
    let fname = format_name(format);
    let config = tiny_config();
    let cpu = Llama::random(config.clone(), GgmlType::F32, rng.next());
    let mut model = CudaLlama::upload(gpu.clone(), &cpu)?;
    let vocab = config.vocab;
    let (l, mq, b) = (300usize, 12usize, 64usize);
    let context: Vec<u32> = (0..l).map(|_| rng.below(vocab) as u32).collect();
    let query: Vec<u32> = (0..mq).map(|_| rng.below(vocab) as u32).collect();
    let shape = cpu.head_shape();
    let blocks: Vec<Arc<BlockKv>> = Phase1::new(&cpu, &context, StarConfig::new(b))?
        .encode_all()?
        .into_iter()
        .map(|blk| Arc::new(blk.to_8bit(format)))
        .collect();
    let cpu_shard = CpuShard::new(blocks.clone(), shape);
    let mut qa = QueryAttention::new(vec![&cpu_shard], config.n_layers, shape, mq + 8);
    let positions: Vec<usize> = (l..l + mq).collect();
    let cpu_logits = cpu.logits(&cpu.forward(&query, &positions, &mut qa)?);
    let gblocks: Vec<Arc<GpuBlock>> = blocks
        .iter()
        .map(|blk| GpuBlock::upload(gpu, blk).map(Arc::new))
        .collect::<Result<_, _>>()?;
    let mut gq = GpuQuery::new(&model, ContextBlocks::Resident(gblocks.clone()), mq + 8)?;
    model.forward(&query, &positions, &mut gq)?;
    let gpu_logits = model.logits(mq)?;
    report.check(
        &format!("{fname} blocks: star b={b} query logits GPU vs CPU"),
        "rel",
        rel(&gpu_logits, &cpu_logits),
        8.0 * u,
        ms(t),
    );
    let mut worst = 0f64;
    let mut tok = crate::sampling::argmax(&cpu_logits[(mq - 1) * vocab..]);
    for step in 0..6 {
        let pos = [l + mq + step];
        let lc = cpu.logits(&cpu.forward(&[tok], &pos, &mut qa)?);
        model.forward(&[tok], &pos, &mut gq)?;
        worst = worst.max(rel(&model.logits(1)?, &lc));
        tok = crate::sampling::argmax(&lc);
    }
    report.check(
        &format!("{fname} blocks: star decode 6 steps: logits GPU vs CPU"),
        "rel",
        worst,
        8.0 * u,
        ms(t),
    );
    let t = Instant::now();
    let cap = mq + 16;
    let mut plain_q = GpuQuery::new(&model, ContextBlocks::Resident(gblocks.clone()), cap)?;
    let mut graph_q = GpuQuery::new(&model, ContextBlocks::Resident(gblocks), cap)?;
    let g = graph_vs_plain(gpu, &mut model, &mut plain_q, &mut graph_q, &query, l, 12)?;
    g.report(report, &format!("{fname} blocks: star decode"), ms(t), u);
    Ok(())
}
