//! Selective global re-encoding (issue 14) on the GPU against the CPU: the layer-1 probe
//! that selects the tokens, the selection itself, the re-encoding pass over the same
//! positions, and ratio 1 against full attention's KV.

use std::sync::Arc;
use std::time::Instant;

use super::{Report, Result, Rng, ms, rel, tiny_config};
use crate::backend::{Backend, BlockEncoder};
use crate::cuda::reencode as gpu_re;
use crate::cuda::{CudaLlama, Gpu};
use crate::model::Llama;
use crate::quant::GgmlType;
use crate::star::reencode as cpu_re;
use crate::star::{BlockKv, Phase1, StarConfig};

/// Rows `positions` of every layer's K and V, concatenated (f32).
fn rows(blocks: &[BlockKv], positions: &[usize]) -> Vec<f32> {
    let mut out = Vec::new();
    for &p in positions {
        let b = blocks
            .iter()
            .find(|b| (b.start..b.start + b.len).contains(&p))
            .expect("positions lie in the blocks");
        let row = b.rows(p - b.start..p - b.start + 1);
        for (k, v) in &row.layers {
            out.extend_from_slice(k);
            out.extend_from_slice(v);
        }
    }
    out
}

fn all_kv(blocks: &[BlockKv]) -> Vec<f32> {
    let mut out = Vec::new();
    for b in blocks {
        for (k, v) in &b.layers {
            out.extend_from_slice(k);
            out.extend_from_slice(v);
        }
    }
    out
}

pub(super) fn checks(gpu: &Arc<Gpu>, rng: &mut Rng, report: &mut Report, u: f64) -> Result<()> {
    let config = tiny_config();
    let cpu = Llama::random(config.clone(), GgmlType::F32, rng.next());
    let mut model = CudaLlama::upload(gpu.clone(), &cpu)?;
    let (l, b) = (300usize, 64usize);
    let tokens: Vec<u32> = (0..l).map(|_| rng.below(config.vocab) as u32).collect();
    let phase1 = Phase1::new(&cpu, &tokens, StarConfig::new(b))?.encode_all()?;
    let shape = cpu.head_shape();

    // The probe: layer 1's KV with global attention in layer 0.
    let t = Instant::now();
    let (ck, cv) = cpu_re::layer_one(&cpu, &tokens)?;
    let (gk, gv) = gpu_re::layer_one(&mut model, &tokens)?;
    report.check(
        "re-encode: layer-1 KV of the global probe GPU vs CPU",
        "rel",
        rel(&gk, &ck).max(rel(&gv, &cv)),
        8.0 * u,
        ms(t),
    );

    // The selection from either probe (the ranking is shared code): rounding may swap
    // tokens near the cut, a wrong probe or layout picks unrelated ones (~0.75 differ).
    let want = (l - b).div_ceil(4);
    let (pk, pv) = cpu_re::layer_token_major(&phase1, 1, shape);
    let kvw = shape.kv_width();
    let cpu_sel = cpu_re::most_deviating((&ck, &cv), (&pk, &pv), kvw, b, want);
    let gpu_sel = cpu_re::most_deviating((&gk, &gv), (&pk, &pv), kvw, b, want);
    let common = cpu_sel.iter().filter(|p| gpu_sel.contains(p)).count();
    report.check(
        "re-encode r=0.25: selection GPU vs CPU",
        "differ",
        1.0 - common as f64 / want as f64,
        0.2,
        ms(t),
    );

    // The pass over the same positions, from the same phase-1 blocks.
    let t = Instant::now();
    let mut cpu_blocks = phase1.clone();
    cpu_re::reencode_positions(&cpu, &tokens, &mut cpu_blocks, &cpu_sel)?;
    let mut gpu_blocks = phase1.clone();
    gpu_re::reencode_positions(&mut model, &tokens, &mut gpu_blocks, &cpu_sel)?;
    let (c_rows, g_rows) = (rows(&cpu_blocks, &cpu_sel), rows(&gpu_blocks, &cpu_sel));
    report.check(
        &format!("re-encode r=0.25 ({want} tokens): KV GPU vs CPU"),
        "rel",
        rel(&g_rows, &c_rows),
        8.0 * u,
        ms(t),
    );
    let others: Vec<usize> = (0..l).filter(|p| !cpu_sel.contains(p)).collect();
    report.check(
        "re-encode r=0.25: other tokens' KV unchanged (GPU)",
        "max diff",
        super::max_abs(&rows(&gpu_blocks, &others), &rows(&phase1, &others)),
        0.0,
        ms(t),
    );
    report.check(
        "re-encoding changes the selected KV (CPU)",
        "unchanged",
        (rel(&c_rows, &rows(&phase1, &cpu_sel)) < 1e-3) as u8 as f64,
        0.0,
        ms(t),
    );

    // Ratio 1, selection included: every token after the anchor re-encoded is full
    // attention's KV.
    let t = Instant::now();
    let mut all = phase1.clone();
    let done = gpu_re::reencode(&mut model, &tokens, &mut all, b, 1.0)?;
    let full = Phase1::new(&cpu, &tokens, StarConfig::new(l))?
        .encode_all()?
        .remove(0);
    let full: Vec<BlockKv> = all
        .iter()
        .map(|x| full.rows(x.start..x.start + x.len))
        .collect();
    report.check(
        "re-encode r=1 (GPU) vs full attention KV (CPU)",
        "rel",
        rel(&all_kv(&all), &all_kv(&full)),
        8.0 * u,
        ms(t),
    );
    report.check(
        "re-encode r=1 re-encodes every token after the anchor",
        "missing",
        ((l - b) as f64 - done.tokens as f64).abs(),
        0.0,
        ms(t),
    );
    ingest_path(gpu, &cpu, &tokens, b, report, u)
}

/// The ingest path ([`crate::backend::BlockEncoder::encode_reencoded`] on a GPU backend: phase 1 written
/// into one device copy of the document, re-encoded there, downloaded once), with an
/// anchor of two blocks: against the GPU pass over host blocks (the same phase-1 values
/// and selection, so the same KV) at r = 0.25, and against full attention's KV (CPU) at
/// r = 1.
fn ingest_path(
    gpu: &Arc<Gpu>,
    cpu: &Llama,
    tokens: &[u32],
    b: usize,
    report: &mut Report,
    u: f64,
) -> Result<()> {
    let backend = Backend::on_gpu(gpu.clone(), cpu, Some(64 << 20))?;
    let config = StarConfig::with_anchor(b, 2 * b);
    let exact_until = 2 * b;
    let t = Instant::now();
    let mut enc = backend.phase1(cpu, tokens, config)?;
    let (dev, done) = collected(&mut enc, cpu, &backend, exact_until, 0.25)?;
    let mut enc = backend.phase1(cpu, tokens, config)?;
    let mut host = (0..enc.n_blocks())
        .map(|i| enc.encode_block(i))
        .collect::<crate::error::Result<Vec<_>>>()?;
    let phase1 = host.clone();
    let host_done = backend.reencode(cpu, tokens, &mut host, exact_until, 0.25)?;
    report.check(
        "re-encode r=0.25, a=2b: KV on the device (ingest) vs over host blocks",
        "rel",
        rel(&all_kv(&dev), &all_kv(&host)),
        u / 8.0,
        ms(t),
    );
    report.check(
        "re-encode r=0.25, a=2b: same tokens re-encoded (device vs host)",
        "differ",
        (done.tokens as f64 - host_done.tokens as f64).abs(),
        0.0,
        ms(t),
    );
    report.check(
        "re-encode on the device changes the KV after the anchor",
        "unchanged",
        (rel(&all_kv(&dev), &all_kv(&phase1)) < 1e-3) as u8 as f64,
        0.0,
        ms(t),
    );
    let t = Instant::now();
    let mut enc = backend.phase1(cpu, tokens, config)?;
    let (all, _) = collected(&mut enc, cpu, &backend, exact_until, 1.0)?;
    let full = Phase1::new(cpu, tokens, StarConfig::new(tokens.len()))?
        .encode_all()?
        .remove(0);
    let full: Vec<BlockKv> = all
        .iter()
        .map(|x| full.rows(x.start..x.start + x.len))
        .collect();
    report.check(
        "re-encode r=1, a=2b, on the device (ingest) vs full attention KV (CPU)",
        "rel",
        rel(&all_kv(&all), &all_kv(&full)),
        8.0 * u,
        ms(t),
    );
    Ok(())
}

/// [`BlockEncoder::encode_reencoded`]'s blocks, collected in order.
fn collected(
    enc: &mut BlockEncoder<'_>,
    cpu: &Llama,
    backend: &Backend,
    exact_until: usize,
    ratio: f32,
) -> Result<(Vec<BlockKv>, crate::star::reencode::Reencoded)> {
    let mut blocks = Vec::new();
    let done = enc.encode_reencoded(cpu, backend, exact_until, ratio, None, &mut |i, b| {
        assert_eq!(i, blocks.len(), "blocks arrive in order");
        blocks.push(b);
        Ok(())
    })?;
    Ok((blocks, done))
}

/// Ingest-side cost of re-encoding at the default model's shape (SmolLM2-135M: 30
/// layers, 9 query and 3 KV heads of 64, random weights) for an 8K-token document at
/// b = L/16, a = 4b: full attention (one block) and phase 1 alone (every block
/// downloaded, as a plain ingest) against
/// phase 1 plus the device re-encoding at several ratios (blocks downloaded the same
/// way). Timings only (the store's writes, which dominate a real ingest, are not
/// included); the rows check that every ratio re-encodes the expected token count.
pub(super) fn timings(gpu: &Arc<Gpu>, rng: &mut Rng, report: &mut Report) -> Result<()> {
    let config = crate::model::LlamaConfig {
        vocab: 4096,
        context_length: 16384,
        ..crate::model::LlamaConfig::smollm2_135m()
    };
    let cpu = Llama::random(config.clone(), GgmlType::F32, rng.next());
    let backend = Backend::on_gpu(gpu.clone(), &cpu, Some(256 << 20))?;
    let (l, b) = (8192usize, 512usize);
    let tokens: Vec<u32> = (0..l).map(|_| rng.below(config.vocab) as u32).collect();
    let star = StarConfig::with_anchor(b, 4 * b);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let plain = |backend: &Backend, star: StarConfig| -> Result<f64> {
        let t = Instant::now();
        let mut enc = backend.phase1(&cpu, &tokens, star)?;
        for i in 0..enc.n_blocks() {
            std::hint::black_box(enc.encode_block(i)?);
        }
        Ok(t.elapsed().as_secs_f64())
    };
    let full = StarConfig::new(l);
    plain(&backend, full)?; // warm-up: scratch sized, kernels compiled
    let times = |star| {
        (0..3)
            .map(|_| plain(&backend, star))
            .collect::<Result<Vec<_>>>()
    };
    let whole = median(times(full)?);
    let base = median(times(star)?);
    println!(
        "  8K tokens: full attention (one block) {:.1} ms; b = L/16, a = 4b: phase 1 {:.1} ms (with downloads)",
        whole * 1e3,
        base * 1e3
    );
    for ratio in [0.0f32, 0.02, 0.05, 0.1, 0.25] {
        let mut runs = Vec::new();
        let mut tokens_done = 0;
        for _ in 0..3 {
            let t = Instant::now();
            let mut enc = backend.phase1(&cpu, &tokens, star)?;
            let done =
                enc.encode_reencoded(&cpu, &backend, 4 * b, ratio, None, &mut |_, blk| {
                    std::hint::black_box(blk);
                    Ok(())
                })?;
            runs.push(t.elapsed().as_secs_f64());
            tokens_done = done.tokens;
        }
        let took = median(runs);
        let want = ((l - 4 * b) as f64 * ratio as f64).ceil() as usize;
        report.check(
            &format!(
                "re-encode r={ratio} on the device, 8K SmolLM shape: {:.1} ms = phase 1 + {:.1} ms",
                took * 1e3,
                (took - base) * 1e3
            ),
            "missing",
            (want as f64 - tokens_done as f64).abs(),
            0.0,
            took * 1e3,
        );
    }
    Ok(())
}
