//! GPU speed: Star Attention phase 1 and phase 2 on the CUDA backend, for SmolLM2-135M's
//! shape and Llama-3.1-8B's shape with random weights generated on the device.
//!
//! Run on a machine with an NVIDIA GPU (CUDA 13 driver, NVRTC and cuBLAS):
//!
//! ```text
//! cargo bench --bench gpu_speed -- [--quick] [--no-torch] [--models smol,8b] [--contexts 8192,32768,131072]
//!                                   [--variants] [--attention-only] [--decode-splits] [--merge-ab]
//! ```
//!
//! Measures, in one run: the roofline (device copy bandwidth, bf16 GEMM rate); phase-1
//! ingest tokens/s at each context with 8K blocks (anchor = block); phase-2 time to first
//! token for a 30-token question over the resident blocks and greedy decode ms/token;
//! the attention kernel's TFLOP/s on the phase-1 shape (8K queries over an 8K anchor plus
//! themselves) and GB/s decoding over the largest context; store-to-GPU load GB/s
//! (f32 host blocks through pinned staging, and raw pinned copies); and, with python3 +
//! torch on the machine, PyTorch's scaled_dot_product_attention on the same attention
//! shapes and a PyTorch full-attention prefill of the same model shape. Prints a
//! markdown table last. Without a GPU it says so and exits 0 (CI stays green).

#[path = "support/plot.rs"]
mod plot;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use starkv_compute::cpu::attention::HeadShape;
use starkv_compute::cuda::star::{
    ContextBlocks, GpuBlock, GpuQuery, StreamedBlocks, encode_context,
};
use starkv_compute::cuda::{
    AttnKernels, AttnOut, AttnPlan, AttnScratch, CudaLlama, DecodeKernel, Gpu, HalfType, Kernels,
    PinnedBuf, Segment, SplitTuning, TableBuf, probe, upload_plans, upload_plans_with_maps,
};
use starkv_compute::kv8::Kv8Format;
use starkv_compute::model::LlamaConfig;
use starkv_compute::partial::ContextMerge;
use starkv_compute::star::StarConfig;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Opts {
    quick: bool,
    /// Only the attention kernel rows, on random K/V (no model, no ingest).
    attention_only: bool,
    /// Only the ingest rows, with the phase-1 configurations compared in the same run:
    /// the paper's (a = b), with the block overlap, the service's defaults (a quarter of
    /// the document as anchor, overlap 32) and full attention (one block).
    ingest_only: bool,
    variants: bool,
    /// Graph decode at other split counts too.
    decode_splits: bool,
    /// The decode-step A/B rows compare only the split merges (the separate `attn_merge`
    /// launch against the merge fused into the attention kernel, by group size), three
    /// rounds.
    merge_ab: bool,
    torch: bool,
    models: Vec<String>,
    contexts: Vec<usize>,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        quick: false,
        attention_only: false,
        ingest_only: false,
        variants: false,
        decode_splits: false,
        merge_ab: false,
        torch: true,
        models: vec!["smol".into(), "8b".into()],
        contexts: vec![8192, 32768, 131_072],
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--quick" => o.quick = true,
            "--no-torch" => o.torch = false,
            "--variants" => o.variants = true,
            "--decode-splits" => o.decode_splits = true,
            "--merge-ab" => o.merge_ab = true,
            "--attention-only" => o.attention_only = true,
            "--ingest-only" => o.ingest_only = true,
            "--models" => {
                i += 1;
                o.models = args[i].split(',').map(str::to_string).collect();
            }
            "--contexts" => {
                i += 1;
                o.contexts = args[i].split(',').filter_map(|s| s.parse().ok()).collect();
            }
            _ => {} // cargo bench passes --bench
        }
        i += 1;
    }
    if o.quick {
        o.contexts = vec![8192, 16384];
    }
    o
}

/// One configuration of the decode step compared in the same run (issue 13 item 3).
struct Variant {
    name: &'static str,
    tuning: SplitTuning,
    decode: DecodeKernel,
    /// The many-CTA greedy pick (`Gpu::set_wide_argmax`).
    wide_argmax: bool,
    /// Whether the attention-only rows time it too (not for the pick alone).
    attention_row: bool,
}

/// The decode-step configurations compared in the same run: the earlier one first (plans
/// cut per segment, the merge one CTA per head, Q staged through shared memory, six CTAs
/// per SM, the one-CTA pick), then the default and each of its choices undone alone.
/// With `merge_ab`: the default (the separate merge launch), the split merge fused into
/// the attention kernel (STARKV_FUSED_MERGE=1), and the fused merge at other group sizes.
fn decode_variants(merge_ab: bool) -> Vec<Variant> {
    let after = SplitTuning {
        balanced: true,
        tile_cuts: false,
        wide_merge: true,
        merge_pdl: false,
        decode_per_sm: 0,
        fused_merge: false,
        merge_group: 0,
    };
    let v = |name, tuning, decode, wide_argmax, attention_row| Variant {
        name,
        tuning,
        decode,
        wide_argmax,
        attention_row,
    };
    let with = |decode_per_sm| SplitTuning {
        decode_per_sm,
        ..after
    };
    let fused = |merge_group| SplitTuning {
        fused_merge: true,
        merge_group,
        ..after
    };
    let default =
        "default: balanced splits, column-chunk merge, Q in registers, 4 CTAs/SM, many-CTA pick";
    let fused_name = "default with the merge fused into the attention kernel (groups of ~sqrt(splits); STARKV_FUSED_MERGE=1)";
    if merge_ab {
        return vec![
            v(default, after, DecodeKernel::W1, true, true),
            v(fused_name, fused(0), DecodeKernel::W1, true, true),
            v(
                "default with the fused merge in groups of 4 splits",
                fused(4),
                DecodeKernel::W1,
                true,
                true,
            ),
        ];
    }
    vec![
        v(
            "before: per-segment splits, one-CTA merge, Q via shared memory, 6 CTAs/SM, one-CTA pick",
            SplitTuning {
                balanced: false,
                wide_merge: false,
                decode_per_sm: 6,
                ..after
            },
            DecodeKernel::W1QSmem,
            false,
            true,
        ),
        v(default, after, DecodeKernel::W1, true, true),
        v(fused_name, fused(0), DecodeKernel::W1, true, true),
        v(
            "default with the one-CTA pick (argmax_rows)",
            after,
            DecodeKernel::W1,
            false,
            false,
        ),
        v(
            "default with 6 CTAs/SM",
            with(6),
            DecodeKernel::W1,
            true,
            true,
        ),
        v(
            "default with 5 CTAs/SM",
            with(5),
            DecodeKernel::W1,
            true,
            true,
        ),
        v(
            "default with 3 CTAs/SM",
            with(3),
            DecodeKernel::W1,
            true,
            true,
        ),
        v(
            "default with per-segment splits",
            SplitTuning {
                balanced: false,
                ..after
            },
            DecodeKernel::W1,
            true,
            true,
        ),
        v(
            "default with whole-tile cuts (STARKV_SPLIT_PLAN=tiles)",
            SplitTuning {
                tile_cuts: true,
                ..after
            },
            DecodeKernel::W1,
            true,
            true,
        ),
        v(
            "default with the merge as a dependent launch",
            SplitTuning {
                merge_pdl: true,
                ..after
            },
            DecodeKernel::W1,
            true,
            true,
        ),
        v(
            "default with Q via shared memory",
            after,
            DecodeKernel::W1QSmem,
            true,
            true,
        ),
        v(
            "default with the swapped-operand attention kernel (STARKV_ATTN_DECODE=swap)",
            after,
            DecodeKernel::Swap,
            true,
            true,
        ),
    ]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// `steps + 1` greedy decode steps of `q` from `(next, pos)` (both advanced), timed one by
/// one; the first (which may capture a graph) is dropped. Seconds per step.
fn greedy_step_times(
    model: &mut CudaLlama,
    q: &mut GpuQuery,
    next: &mut u32,
    pos: &mut usize,
    steps: usize,
) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(steps + 1);
    for _ in 0..steps + 1 {
        let t = Instant::now();
        *next = model.decode_greedy(*next, *pos, q)?.0;
        times.push(t.elapsed().as_secs_f64());
        *pos += 1;
    }
    times.remove(0);
    Ok(times)
}

/// Median seconds per call of `f` over `reps` samples of `batch` back-to-back calls (one
/// synchronisation a sample, so host round trips stay out of short kernels' times).
fn time_gpu_batch(
    gpu: &Gpu,
    reps: usize,
    batch: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    f()?;
    gpu.synchronize()?;
    let mut ts = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        for _ in 0..batch {
            f()?;
        }
        gpu.synchronize()?;
        ts.push(t.elapsed().as_secs_f64() / batch as f64);
    }
    Ok(median(ts))
}

/// Median seconds of `f` (synchronised) over `reps` runs after one warm-up.
fn time_gpu(gpu: &Gpu, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    gpu.synchronize()?;
    let mut ts = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        gpu.synchronize()?;
        ts.push(t.elapsed().as_secs_f64());
    }
    Ok(median(ts))
}

fn model_config(name: &str) -> LlamaConfig {
    match name {
        "8b" => LlamaConfig::llama31_8b(),
        _ => LlamaConfig::smollm2_135m(),
    }
}

fn label(name: &str) -> &'static str {
    match name {
        "8b" => "Llama-3.1-8B shape",
        _ => "SmolLM2-135M shape",
    }
}

struct Tokens(u64);
impl Tokens {
    fn take(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 33) % vocab as u64) as u32
            })
            .collect()
    }
}

fn main() {
    let opts = parse_opts();
    match probe() {
        Err(e) => {
            println!("gpu_speed: no GPU here ({e}); nothing to measure");
            return;
        }
        Ok(devs) => println!("gpu_speed on {}", devs[0]),
    }
    if let Err(e) = run(&opts) {
        eprintln!("gpu_speed failed: {e}");
        std::process::exit(1);
    }
}

fn run(opts: &Opts) -> Result<()> {
    let gpu = Gpu::new(0, HalfType::BF16)?;
    let mut table: Vec<(String, String, String)> = Vec::new();
    let mut add = |what: String, value: String, note: String| {
        println!("  {what}: {value} {note}");
        table.push((what, value, note));
    };
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    // Roofline.
    let (copy_gbs, gemm_tflops) = roofline(&gpu)?;
    add(
        "device copy bandwidth (read+write)".into(),
        format!("{copy_gbs:.0} GB/s"),
        "cuMemcpyDtoD 2 GiB".into(),
    );
    add(
        "bf16 GEMM rate".into(),
        format!("{gemm_tflops:.0} TFLOP/s"),
        "cuBLAS 8192^3, f32 accumulate".into(),
    );

    let torch = if opts.torch {
        run_torch(opts)
    } else {
        BTreeMap::new()
    };
    let tget = |k: &str| torch.get(k).copied();

    // Phase-1 ingest rates for the chart: starkv and, when measured, PyTorch's prefill.
    let mut ingest_chart = plot::Chart::lines(
        &format!(
            "Phase-1 ingest, {} on {} (8K blocks)",
            gpu.dtype.name(),
            gpu.info
        ),
        "context length (tokens)",
        "ingest rate (tokens/s, log scale)",
    );
    ingest_chart.x_unit = plot::Unit::Tokens;
    ingest_chart.y_unit = plot::Unit::Rate;
    ingest_chart.log_x = true;
    ingest_chart.log_y = true;
    ingest_chart.dashed = vec!["PyTorch".into()];
    ingest_chart.note = format!("cargo bench --bench gpu_speed, {date}");
    let mut toks = Tokens(42);
    for name in &opts.models {
        let config = model_config(name);
        let lab = label(name);
        let shape = HeadShape {
            n_heads: config.n_heads,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
        };
        let kern = gpu.kernels(config.head_dim)?;
        let b = 8192;
        let attention = |l: usize, blocks: &[Arc<GpuBlock>], add: &mut Add<'_>| {
            attention_rows(
                &gpu,
                &kern,
                opts,
                name,
                lab,
                shape,
                l,
                blocks,
                gemm_tflops,
                copy_gbs,
                &tget,
                add,
            )
        };
        if opts.attention_only {
            // Random K/V blocks straight on the device: the kernel rows only.
            let l = opts.contexts.iter().copied().max().unwrap_or(131_072);
            attention(l, &random_blocks(&gpu, &kern, shape, l, b)?, &mut add)?;
            continue;
        }
        let t = Instant::now();
        let mut model = CudaLlama::random(gpu.clone(), config.clone(), 7)?;
        println!(
            "{lab}: random weights on the device in {:.1} s ({:.2} GB)",
            t.elapsed().as_secs_f64(),
            model.weight_bytes() as f64 / 1e9
        );
        // One-row products at the 8B shape's two largest weights (their 235 / 117 MB do
        // not fit in L2): the fused decode kernel against cuBLAS at one row, GB/s of
        // weights read, medians of batches of back-to-back calls.
        if name == "8b" {
            for (what, n, kk) in [
                ("gate/up", 2 * config.ffn, config.hidden),
                ("down", config.hidden, config.ffn),
            ] {
                let w = gpu.alloc(n * kk * 2)?;
                gpu.fill_uniform_half(&kern, w.ptr(), n * kk, 5, 0.05)?;
                let x = gpu.alloc(kk * 2)?;
                gpu.fill_uniform_half(&kern, x.ptr(), kk, 6, 1.0)?;
                let y = gpu.alloc(n * 4)?;
                let bytes = (n * kk * 2) as f64;
                let fused = time_gpu_batch(&gpu, 5, 20, || {
                    Ok(gpu.gemv_rows(&kern, y.ptr(), false, w.ptr(), x.ptr(), false, n, kk)?)
                })?;
                let blas = time_gpu_batch(&gpu, 5, 20, || {
                    Ok(gpu.gemm(y.ptr(), true, x.ptr(), w.ptr(), 1, n, kk, 0.0)?)
                })?;
                add(
                    format!("{lab}: one-row product {what} [{n} x {kk}], fused decode kernel"),
                    format!("{:.0} GB/s", bytes / fused / 1e9),
                    format!(
                        "({:.1} us, {:.0}% of copy bandwidth; cuBLAS at one row {:.0} GB/s, {:.1} us)",
                        fused * 1e6,
                        bytes / fused / 1e9 / copy_gbs * 100.0,
                        bytes / blas / 1e9,
                        blas * 1e6
                    ),
                );
            }
        }
        // Warm-up: kernels compiled, cuBLAS heuristics cached.
        let warm = toks.take(1024, config.vocab);
        encode_context(&mut model, &warm, StarConfig::new(512))?;
        gpu.synchronize()?;
        let mut largest = None;
        for &l in &opts.contexts {
            let context = toks.take(l, config.vocab);
            let t = Instant::now();
            let blocks = encode_context(&mut model, &context, StarConfig::new(b))?;
            gpu.synchronize()?;
            let secs = t.elapsed().as_secs_f64();
            let tps = l as f64 / secs;
            let base = tget(&format!("{name}_prefill_{l}"));
            ingest_chart.push(&format!("starkv, {lab}"), l as f64, tps);
            if let Some(bt) = base {
                ingest_chart.push(
                    &format!("PyTorch SDPA prefill, {lab}"),
                    l as f64,
                    l as f64 / bt,
                );
            }
            add(
                format!("{lab}: phase-1 ingest, {}K context, 8K blocks", l / 1024),
                format!("{tps:.0} tok/s"),
                match base {
                    Some(bt) => format!(
                        "({secs:.2} s; PyTorch SDPA full prefill {:.0} tok/s, x{:.2})",
                        l as f64 / bt,
                        bt / secs
                    ),
                    None => format!("({secs:.2} s)"),
                },
            );
            if opts.ingest_only {
                drop(blocks);
                ingest_configs(&mut model, &context, b, secs, &mut add)?;
                continue;
            }
            // Phase 2: 30-token question, then greedy decoding.
            let question = toks.take(30, config.vocab);
            let n_steps = if opts.quick { 8 } else { 24 };
            let mut q = GpuQuery::new(
                &model,
                ContextBlocks::Resident(blocks.clone()),
                // The question, six step series and the split-tuning A/B series (each
                // n_steps + 1 steps), the --decode-splits rows (9 steps each).
                30 + (6 + 3 * decode_variants(opts.merge_ab).len()) * (n_steps + 1) + 6 * 9,
            )?;
            let positions: Vec<usize> = (l..l + 30).collect();
            let t = Instant::now();
            model.forward(&question, &positions, &mut q)?;
            let mut next = model.argmax(1)?[0].0;
            let ttft = t.elapsed().as_secs_f64();
            // Greedy decode, plain launches (forward, then argmax on the GPU), then the
            // same query's next steps as CUDA graph replays (the first step with a new
            // graph runs plainly and captures; the median is over the rest).
            let mut steps = Vec::new();
            let mut pos = l + 30;
            for _ in 0..n_steps {
                let t = Instant::now();
                model.forward(&[next], &[pos], &mut q)?;
                next = model.argmax(1)?[0].0;
                steps.push(t.elapsed().as_secs_f64());
                pos += 1;
            }
            let graphs_were = gpu.decode_graphs();
            gpu.set_decode_graphs(true);
            let replays0 = model.graph_replays();
            let graph_steps = greedy_step_times(&mut model, &mut q, &mut next, &mut pos, n_steps)?;
            let replays = model.graph_replays() - replays0;
            // The captured step replayed back to back (no host work between replays):
            // the device's time per step; the difference to a real step is the host's.
            gpu.synchronize()?;
            let t = Instant::now();
            let replayed = model.replay_decode_graph(n_steps)?;
            gpu.synchronize()?;
            let device_step_ms = replayed.then(|| t.elapsed().as_secs_f64() * 1e3 / n_steps as f64);
            // The same steps pipelined (step i + 1 launched before step i's pick is
            // read): the host's share of a step overlaps the device's work.
            let t = Instant::now();
            let piped = model.decode_greedy_pipelined(next, pos, n_steps, &mut q, |t, _| {
                next = t;
                true
            })?;
            let pipelined_ms = t.elapsed().as_secs_f64() * 1e3 / piped as f64;
            pos += piped;
            // APE's merge at T = 1, S = 0.5 (the service's default for documents of
            // approximate blocks; every block after the first two tempered): its group
            // in the one plan as weighted keys (graphs), and in its own launch with a
            // host merge per layer (no graphs), same query and steps.
            let mut tempered_ms = Vec::new();
            for in_plan in [true, false] {
                q.set_merge(ContextMerge {
                    temperature: 1.0,
                    scale: 0.5,
                    tempered_from: 2 * b,
                });
                q.weights_in_plan = in_plan;
                let t_steps = greedy_step_times(&mut model, &mut q, &mut next, &mut pos, n_steps)?;
                tempered_ms.push(median(t_steps) * 1e3);
            }
            q.set_merge(ContextMerge::EXACT);
            q.weights_in_plan = true;
            // The same as a graph through the cuBLAS products and separate element-wise
            // kernels (STARKV_FUSED_DECODE=0), for the fused one-row kernels' gain.
            let fused_were = gpu.fused_decode();
            gpu.set_fused_decode(false);
            let cublas_steps = greedy_step_times(&mut model, &mut q, &mut next, &mut pos, n_steps)?;
            gpu.set_fused_decode(fused_were);
            // The decode-step configurations as graphs, same run, alternating twice,
            // n_steps steps each after a capture step.
            let (tuning0, kernels0, argmax0) = (
                gpu.split_tuning(),
                gpu.attention_kernels(),
                gpu.wide_argmax(),
            );
            let variants = decode_variants(opts.merge_ab);
            let rounds = if opts.merge_ab { 3 } else { 2 };
            let mut tuned: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
            for _round in 0..rounds {
                for (i, v) in variants.iter().enumerate() {
                    gpu.set_split_tuning(v.tuning);
                    gpu.set_wide_argmax(v.wide_argmax);
                    gpu.set_attention_kernels(AttnKernels {
                        decode: v.decode,
                        ..kernels0
                    });
                    let t_steps =
                        greedy_step_times(&mut model, &mut q, &mut next, &mut pos, n_steps)?;
                    tuned[i].push(median(t_steps) * 1e3);
                }
            }
            gpu.set_split_tuning(tuning0);
            gpu.set_attention_kernels(kernels0);
            gpu.set_wide_argmax(argmax0);
            // The same context length held in int8 (random blocks; a `kv_dtype = int8`
            // document in the GPU tier): whole steps with each 8-bit decode kernel.
            let int8_ms = int8_step_times(&mut model, &kern, shape, (l, b), n_steps, &question)?;
            // With --decode-splits: graph decode at other split counts (the default is
            // Gpu::choose_splits's), 8 steps each after a capture step.
            let mut split_rows = Vec::new();
            if opts.decode_splits {
                let auto = gpu.choose_splits(1, shape, l + 30);
                for splits in [16, 32, 64, 128, auto * 5 / 6, auto * 2 / 3] {
                    q.splits = Some(splits);
                    let t_steps = greedy_step_times(&mut model, &mut q, &mut next, &mut pos, 8)?;
                    split_rows.push((splits, median(t_steps) * 1e3));
                }
                q.splits = None;
            }
            gpu.set_decode_graphs(graphs_were);
            // The decode limit: every weight and the whole KV read once per token, at
            // the device copy rate.
            let kv_bytes = (l + 30) * config.n_layers * config.n_kv_heads * config.head_dim * 4;
            let limit_ms = (model.weight_bytes() + kv_bytes) as f64 / (copy_gbs * 1e9) * 1e3;
            let auto_splits = gpu.choose_splits(1, shape, l + 30);
            add(
                format!(
                    "{lab}: phase-2 TTFT, 30-token question, {}K context",
                    l / 1024
                ),
                format!("{:.1} ms", ttft * 1e3),
                "(resident blocks)".into(),
            );
            let (plain_ms, graph_ms) = (median(steps) * 1e3, median(graph_steps) * 1e3);
            add(
                format!("{lab}: decode, {}K context", l / 1024),
                format!("{plain_ms:.2} ms/token"),
                "(median of greedy steps, argmax on the GPU; plain launches)".into(),
            );
            add(
                format!("{lab}: decode as a CUDA graph, {}K context", l / 1024),
                format!("{graph_ms:.2} ms/token"),
                format!(
                    "(median of {n_steps} greedy steps, {replays} graph replays, {auto_splits} splits; x{:.2} vs plain launches, same run; bytes/bandwidth limit {limit_ms:.2} ms: {:.0}% of it)",
                    plain_ms / graph_ms,
                    limit_ms / graph_ms * 100.0
                ),
            );
            add(
                format!(
                    "{lab}: decode as a CUDA graph, pipelined, {}K context",
                    l / 1024
                ),
                format!("{pipelined_ms:.2} ms/token"),
                format!(
                    "(mean of {n_steps} greedy steps, each launched before the previous pick is read; x{:.2} the sequential graph step, same run; bytes/bandwidth limit {limit_ms:.2} ms: {:.0}% of it)",
                    graph_ms / pipelined_ms,
                    limit_ms / pipelined_ms * 100.0
                ),
            );
            if let Some(dev_ms) = device_step_ms {
                add(
                    format!(
                        "{lab}: decode graph replayed back to back, {}K context",
                        l / 1024
                    ),
                    format!("{dev_ms:.3} ms/token"),
                    format!(
                        "(device time of a step: {n_steps} replays, one synchronisation; a real step {graph_ms:.3} ms, so {:.3} ms of host work and round trip per step; bytes limit {:.0}% of it)",
                        graph_ms - dev_ms,
                        limit_ms / dev_ms * 100.0
                    ),
                );
            }
            add(
                format!(
                    "{lab}: decode as a CUDA graph, {}K context, merge S = 0.5",
                    l / 1024
                ),
                format!("{:.2} ms/token", tempered_ms[0]),
                format!(
                    "(APE at T = 1, the tempered group in the one plan as weighted keys; x{:.2} the exact merge's step, same run; its own launch and host merge per layer: {:.2} ms)",
                    tempered_ms[0] / graph_ms,
                    tempered_ms[1]
                ),
            );
            let int8_kv_bytes = kv_bytes * (config.head_dim + 2) / (2 * config.head_dim);
            let int8_limit_ms =
                (model.weight_bytes() + int8_kv_bytes) as f64 / (copy_gbs * 1e9) * 1e3;
            add(
                format!(
                    "{lab}: decode as a CUDA graph, {}K context, int8 blocks",
                    l / 1024
                ),
                format!("{:.2} ms/token", int8_ms[0]),
                format!(
                    "(random int8 blocks, swapped-operand kernel (the default); 8-bit one-warp kernels {:.2} ms, x{:.2}; bf16 blocks {graph_ms:.2} ms, x{:.2}; faster of 2 alternating runs; bytes limit {int8_limit_ms:.2} ms: {:.0}% of it)",
                    int8_ms[1],
                    int8_ms[1] / int8_ms[0],
                    graph_ms / int8_ms[0],
                    int8_limit_ms / int8_ms[0] * 100.0
                ),
            );
            let cublas_ms = median(cublas_steps) * 1e3;
            add(
                format!(
                    "{lab}: decode as a CUDA graph, cuBLAS products, {}K context",
                    l / 1024
                ),
                format!("{cublas_ms:.2} ms/token"),
                format!(
                    "(STARKV_FUSED_DECODE=0: cuBLAS at one row plus separate norm, RoPE, SwiGLU kernels; fused one-row kernels x{:.2} faster, same run)",
                    cublas_ms / graph_ms
                ),
            );
            for (v, ms) in variants.iter().zip(tuned) {
                add(
                    format!(
                        "{lab}: decode as a CUDA graph, {}K context, {}",
                        l / 1024,
                        v.name
                    ),
                    format!(
                        "{:.2} ms/token",
                        ms.iter().cloned().fold(f64::INFINITY, f64::min)
                    ),
                    format!(
                        "(medians of {n_steps} greedy steps in {} alternating runs: {} ms)",
                        ms.len(),
                        ms.iter()
                            .map(|m| format!("{m:.3}"))
                            .collect::<Vec<_>>()
                            .join(" / ")
                    ),
                );
            }
            for (splits, ms) in split_rows {
                add(
                    format!(
                        "{lab}: decode as a CUDA graph, {}K context, {splits} splits",
                        l / 1024
                    ),
                    format!("{ms:.2} ms/token"),
                    "(--decode-splits: median of 8 greedy steps)".into(),
                );
            }
            largest = Some((l, blocks));
        }
        let Some((l, blocks)) = largest else { continue };
        attention(l, &blocks, &mut add)?;
        // Store-to-GPU: f32 host blocks -> pinned staging (bf16) -> device, layer by layer.
        {
            let n = if name == "8b" { 1 } else { 4 }.min(blocks.len());
            let host: Vec<Arc<starkv_compute::star::BlockKv>> = blocks[..n]
                .iter()
                .map(|b| b.download(&gpu).map(Arc::new))
                .collect::<std::result::Result<_, _>>()?;
            let t = Instant::now();
            let s = StreamedBlocks::new(&gpu, host.clone())?;
            let alloc_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let bytes = s.bytes_total();
            s.finish(&gpu)?;
            let secs = t.elapsed().as_secs_f64();
            add(
                format!("{lab}: store-to-GPU block load ({n} x 8K-token blocks)"),
                format!("{:.1} GB/s", bytes as f64 / secs / 1e9),
                format!(
                    "({:.0} MB bf16 in {:.1} ms incl. f32->bf16 on the host; staging alloc {:.0} ms)",
                    bytes as f64 / 1e6,
                    secs * 1e3,
                    alloc_s * 1e3
                ),
            );
        }
        drop(blocks);
        drop(model);
        gpu.synchronize()?;
    }
    // Raw pinned host-to-device bandwidth.
    {
        let bytes = 1usize << 30;
        let mut pinned = PinnedBuf::new(&gpu, bytes)?;
        pinned
            .as_u16_mut()
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as u16);
        let dst = gpu.alloc(bytes)?;
        let secs = time_gpu(&gpu, 5, || {
            gpu.upload_pinned(dst.ptr(), &pinned, bytes)?;
            Ok(())
        })?;
        add(
            "pinned host-to-device copy".into(),
            format!("{:.1} GB/s", bytes as f64 / secs / 1e9),
            "(1 GiB)".into(),
        );
    }

    println!();
    println!("GPU speed, {} on {} ({date})", gpu.dtype.name(), gpu.info);
    println!();
    println!("| measurement | value | notes |");
    println!("|---|---|---|");
    for (w, v, n) in &table {
        println!("| {w} | {v} | {n} |");
    }
    if !ingest_chart.series.is_empty() {
        let svg = plot::save(&ingest_chart, &plot::figures_dir(), "gpu_ingest")?;
        println!("\nchart: {}", svg.display());
    }
    Ok(())
}

/// A table row sink: (measurement, value, notes).
type Add<'a> = dyn FnMut(String, String, String) + 'a;

/// `l` tokens of random K/V for one layer, in blocks of `b`, straight on the device.
fn random_blocks(
    gpu: &Arc<Gpu>,
    kern: &Kernels,
    shape: HeadShape,
    l: usize,
    b: usize,
) -> Result<Vec<Arc<GpuBlock>>> {
    (0..l.div_ceil(b))
        .map(|i| {
            let len = b.min(l - i * b);
            let block = GpuBlock::alloc(gpu, i * b, len, shape, 1)?;
            let seg = block.segment(0, None);
            let n = shape.n_kv_heads * len * shape.head_dim;
            gpu.fill_uniform_half(kern, seg.k, n, 11 + 2 * i as u64, 1.0)?;
            gpu.fill_uniform_half(kern, seg.v, n, 12 + 2 * i as u64, 1.0)?;
            Ok(Arc::new(block))
        })
        .collect()
}

/// Random 8-bit blocks of `format`, `b` tokens each over `l` tokens, `n_layers` layers
/// (the layout of a `kv_dtype = int8` or `fp8` document in the GPU tier): random bytes
/// for the values (fp8: NaN codes too, which the quantiser never writes; the
/// arithmetic's speed does not depend on them) and small finite f16 scales (random bf16
/// values in +-1 read as f16 stay within +-2). Seeds from `seed`, two per block layer.
fn random_8bit_blocks(
    gpu: &Arc<Gpu>,
    kern: &Kernels,
    (shape, n_layers): (HeadShape, usize),
    (l, b): (usize, usize),
    format: Kv8Format,
    seed: u64,
) -> Result<Vec<Arc<GpuBlock>>> {
    let nkv = shape.n_kv_heads;
    (0..l.div_ceil(b))
        .map(|i| {
            let len = b.min(l - i * b);
            let block = GpuBlock::alloc_kv8(gpu, i * b, len, shape, n_layers, format)?;
            let half_words = (nkv * len * shape.head_dim + 2 * nkv * len) / 2;
            for layer in 0..n_layers {
                let seg = block.segment(layer, None);
                let seed = seed + 2 * (i * n_layers + layer) as u64;
                gpu.fill_uniform_half(kern, seg.k, half_words, seed, 1.0)?;
                gpu.fill_uniform_half(kern, seg.v, half_words, seed + 1, 1.0)?;
            }
            Ok(Arc::new(block))
        })
        .collect()
}

/// Whole greedy decode steps (graphs) over int8 blocks of the same context length: the
/// swapped-operand kernel (`swap_kv8`, the default) against the 8-bit one-warp kernels,
/// alternating twice; medians of `n_steps` steps, the faster round of each.
fn int8_step_times(
    model: &mut CudaLlama,
    kern: &Kernels,
    shape: HeadShape,
    (l, b): (usize, usize),
    n_steps: usize,
    question: &[u32],
) -> Result<[f64; 2]> {
    let gpu = model.gpu().clone();
    let n_layers = model.config().n_layers;
    let blocks = random_8bit_blocks(&gpu, kern, (shape, n_layers), (l, b), Kv8Format::Int8, 1000)?;
    let mut q = GpuQuery::new(
        model,
        ContextBlocks::Resident(blocks),
        question.len() + 4 * (n_steps + 1),
    )?;
    let positions: Vec<usize> = (l..l + question.len()).collect();
    model.forward(question, &positions, &mut q)?;
    let mut next = model.argmax(1)?[0].0;
    let mut pos = l + question.len();
    let kernels0 = gpu.attention_kernels();
    let mut best = [f64::INFINITY; 2];
    for _round in 0..2 {
        for (i, swap_kv8) in [true, false].into_iter().enumerate() {
            gpu.set_attention_kernels(AttnKernels {
                swap_kv8,
                ..kernels0
            });
            let t_steps = greedy_step_times(model, &mut q, &mut next, &mut pos, n_steps)?;
            best[i] = best[i].min(median(t_steps) * 1e3);
        }
    }
    gpu.set_attention_kernels(kernels0);
    Ok(best)
}

/// The attention kernel rows: phase-1 shape TFLOP/s (8K queries over an 8K anchor plus
/// themselves) and decode GB/s over all `blocks`, for the default kernels and, with
/// --variants, every other kernel and split count.
#[allow(clippy::too_many_arguments)]
fn attention_rows(
    gpu: &Arc<Gpu>,
    kern: &Kernels,
    opts: &Opts,
    name: &str,
    lab: &str,
    shape: HeadShape,
    l: usize,
    blocks: &[Arc<GpuBlock>],
    gemm_tflops: f64,
    copy_gbs: f64,
    tget: &dyn Fn(&str) -> Option<f64>,
    add: &mut Add<'_>,
) -> Result<()> {
    let (nh, nkv, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    let mut scratch = AttnScratch::default();
    let mut tb = TableBuf::default();
    let default = gpu.attention_kernels();
    // The default kernels first; with --variants every other long-run kernel on the
    // phase-1 shape and every other decode kernel on the decode shape.
    let mut p1_variants = vec![(default, String::new())];
    let mut dec_variants = vec![(default, String::new())];
    // The swapped-operand decode kernel always, beside the default (its A/B).
    let swap = DecodeKernel::Swap;
    if default.decode != swap {
        dec_variants.push((
            AttnKernels {
                decode: swap,
                ..default
            },
            " (Swap)".into(),
        ));
    }
    if opts.variants {
        for long in AttnKernels::ALL_LONG {
            if long != default.long && (!long.is_hopper() || default.hopper) {
                p1_variants.push((AttnKernels { long, ..default }, format!(" ({long:?})")));
            }
        }
        if default.hopper {
            // The Hopper kernels with their cp.async producer instead of TMA.
            for long in AttnKernels::ALL_LONG.into_iter().filter(|l| l.is_hopper()) {
                let k = AttnKernels {
                    long,
                    tma: false,
                    ..default
                };
                p1_variants.push((k, format!(" ({long:?}, cp.async)")));
            }
        }
        for decode in AttnKernels::ALL_DECODE {
            if decode != default.decode && decode != swap {
                dec_variants.push((AttnKernels { decode, ..default }, format!(" ({decode:?})")));
            }
        }
    }
    let report_kernel = |rows: usize| {
        let name = gpu.attention_kernel_name(rows, d);
        if name.starts_with("attn_fwd_sm90") {
            // Compiled apart (kernels.rs); ptxas reports its registers (PERF_NOTES.md).
            println!("  {name}");
            return;
        }
        let f = kern.get(name);
        println!(
            "  {name}: {} registers, {} bytes local memory",
            f.num_regs().unwrap_or(-1),
            f.local_size_bytes().unwrap_or(-1)
        );
    };
    // Phase-1 attention shape: 8K queries over an 8K anchor plus themselves (causal).
    if blocks.len() >= 2 {
        let m = blocks[1].len;
        let a = blocks[0].len;
        let q = gpu.alloc(m * nh * d * 2)?;
        let o = gpu.alloc(m * nh * d * 2)?;
        gpu.fill_uniform_half(kern, q.ptr(), m * nh * d, 3, 1.0)?;
        let segs = [blocks[0].segment(0, None), blocks[1].segment(0, Some(0))];
        let plan = AttnPlan::new(&segs, 1);
        // With tensor maps, as phase 1 uploads its plans (the Hopper kernels' TMA loads).
        let (p, maps) = upload_plans_with_maps(gpu, &mut tb, &[plan], Some(nkv))?[0];
        for (kernels, vname) in &p1_variants {
            gpu.set_attention_kernels(*kernels);
            report_kernel(m * nh / nkv);
            let secs = time_gpu_batch(gpu, 7, 4, || {
                gpu.attention_maps(
                    kern,
                    q.ptr(),
                    m,
                    nh,
                    nkv,
                    p,
                    maps,
                    AttnOut::Half(o.ptr()),
                    &mut scratch,
                )?;
                Ok(())
            })?;
            let flops = 4.0
                * d as f64
                * nh as f64
                * (m as f64 * a as f64 + m as f64 * (m as f64 + 1.0) / 2.0);
            let tf = flops / secs / 1e12;
            let sd = tget(&format!("{name}_sdpa_p1_tflops"));
            add(
                format!(
                    "{lab}: attention kernel{vname}, phase-1 shape ({}K q, {}K anchor + causal)",
                    m / 1024,
                    a / 1024
                ),
                format!("{tf:.0} TFLOP/s"),
                format!(
                    "({:.2} ms; {:.0}% of GEMM rate{})",
                    secs * 1e3,
                    100.0 * tf / gemm_tflops,
                    sd.map_or(String::new(), |s| format!(
                        "; SDPA {s:.0} TFLOP/s, x{:.2}",
                        tf / s
                    ))
                ),
            );
        }
    }
    // Decode attention over the whole context.
    {
        let q = gpu.alloc(nh * d * 2)?;
        let o = gpu.alloc(nh * d * 2)?;
        gpu.fill_uniform_half(kern, q.ptr(), nh * d, 5, 1.0)?;
        let segs: Vec<Segment> = blocks.iter().map(|b| b.segment(0, None)).collect();
        // With --variants, also other split counts for the default decode kernel.
        let auto = gpu.choose_splits(1, shape, l);
        let mut runs: Vec<(AttnKernels, String, usize)> = dec_variants
            .iter()
            .map(|(k, n)| (*k, n.clone(), auto))
            .collect();
        if opts.variants {
            for f in [4usize, 2] {
                runs.push((default, format!(" ({}/{f} splits)", auto), auto / f));
            }
            runs.push((default, format!(" ({}x2 splits)", auto), auto * 2));
        }
        // One decode attention over `plan`, timed: (seconds, splits).
        let mut time_plan = |plan: AttnPlan| -> Result<(f64, usize)> {
            let n_splits = plan.n_splits();
            let p = upload_plans(gpu, &mut tb, &[plan])?[0];
            let secs = time_gpu_batch(gpu, 15, 20, || {
                gpu.attention(
                    kern,
                    q.ptr(),
                    1,
                    nh,
                    nkv,
                    p.0,
                    p.1,
                    p.2,
                    AttnOut::Half(o.ptr()),
                    &mut scratch,
                )?;
                Ok(())
            })?;
            Ok((secs, n_splits))
        };
        let mut bf16_secs = None;
        for (kernels, vname, splits) in &runs {
            let (kernels, splits) = (*kernels, (*splits).max(1));
            gpu.set_attention_kernels(kernels);
            report_kernel(nh / nkv);
            let (secs, n_splits) = time_plan(AttnPlan::new(&segs, splits))?;
            bf16_secs.get_or_insert(secs);
            let bytes = (l * nkv * d * 2 * 2) as f64;
            let gbs = bytes / secs / 1e9;
            let sd = tget(&format!("{name}_sdpa_decode_gbs"));
            add(
                format!(
                    "{lab}: decode attention{vname} over {}K cached tokens",
                    l / 1024
                ),
                format!("{gbs:.0} GB/s"),
                format!(
                    "({:.3} ms, {n_splits} splits, split + merge; {:.0}% of copy bandwidth{})",
                    secs * 1e3,
                    100.0 * gbs / copy_gbs,
                    sd.map_or(String::new(), |s| format!("; SDPA {s:.0} GB/s"))
                ),
            );
        }
        // The decode-step configurations that change attention, same run, alternating
        // twice, each at its own split count; then the merge alone.
        gpu.set_attention_kernels(default);
        let tuning0 = gpu.split_tuning();
        let variants: Vec<Variant> = decode_variants(opts.merge_ab)
            .into_iter()
            .filter(|v| v.attention_row)
            .collect();
        let mut tuned: Vec<(String, Vec<f64>, usize)> = variants
            .iter()
            .map(|v| (v.name.to_string(), Vec::new(), 0))
            .collect();
        for _round in 0..2 {
            for (i, v) in variants.iter().enumerate() {
                gpu.set_split_tuning(v.tuning);
                gpu.set_attention_kernels(AttnKernels {
                    decode: v.decode,
                    ..default
                });
                let splits = gpu.choose_splits(1, shape, l);
                let (secs, n_splits) = time_plan(AttnPlan::for_gpu(gpu, &segs, splits))?;
                tuned[i].1.push(secs);
                tuned[i].2 = n_splits;
            }
        }
        let bytes = (l * nkv * d * 2 * 2) as f64;
        for (what, secs, n_splits) in &tuned {
            let best = secs.iter().cloned().fold(f64::INFINITY, f64::min);
            add(
                format!(
                    "{lab}: decode attention over {}K cached tokens, {what}",
                    l / 1024
                ),
                format!("{:.0} GB/s", bytes / best / 1e9),
                format!(
                    "({} ms in two alternating runs, {n_splits} splits, split + merge; {:.0}% of copy bandwidth)",
                    secs.iter()
                        .map(|s| format!("{:.4}", s * 1e3))
                        .collect::<Vec<_>>()
                        .join(" / "),
                    100.0 * bytes / best / 1e9 / copy_gbs
                ),
            );
        }
        gpu.set_attention_kernels(default);
        for (what, t) in [("one CTA per head", false), ("column chunks", true)] {
            gpu.set_split_tuning(SplitTuning {
                wide_merge: t,
                merge_pdl: false,
                ..tuning0
            });
            let n = auto;
            let (po, pl) = (
                scratch.o.as_ref().unwrap().ptr(),
                scratch.lse.as_ref().unwrap().ptr(),
            );
            let secs = time_gpu_batch(gpu, 15, 20, || {
                gpu.merge_partials(kern, (po, pl), n, 1, nh, AttnOut::Half(o.ptr()))?;
                Ok(())
            })?;
            add(
                format!("{lab}: split merge alone, {n} splits, {what}"),
                format!("{:.1} us", secs * 1e6),
                "(back-to-back launches of the merge over the last partials)".into(),
            );
        }
        gpu.set_split_tuning(tuning0);
        if let (Some(b16), Some(first)) = (bf16_secs, blocks.first()) {
            gpu.set_attention_kernels(default);
            for format in [Kv8Format::Int8, Kv8Format::Fp8] {
                let len = first.len;
                kv8_decode_rows(gpu, kern, lab, shape, l, len, b16, copy_gbs, add, format)?;
            }
        }
    }
    gpu.set_attention_kernels(default);
    Ok(())
}

/// Decode attention over `l` tokens kept in 8 bits in `format` (`kv_dtype = int8` or
/// `fp8`: int8 or e4m3 K/V and one f16 scale per token and KV head, the 8-bit kernel), at
/// the automatic split count and twice it, against the 16-bit kernel's time `bf16_secs`
/// from the same run. Bytes are what the kernel reads: 8-bit values plus scales.
#[allow(clippy::too_many_arguments)]
fn kv8_decode_rows(
    gpu: &Arc<Gpu>,
    kern: &Kernels,
    lab: &str,
    shape: HeadShape,
    l: usize,
    block_len: usize,
    bf16_secs: f64,
    copy_gbs: f64,
    add: &mut Add<'_>,
    format: Kv8Format,
) -> Result<()> {
    let fname = match format {
        Kv8Format::Int8 => "int8",
        Kv8Format::Fp8 => "fp8",
    };
    let (nh, nkv, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    let blocks = random_8bit_blocks(gpu, kern, (shape, 1), (l, block_len), format, 31)?;
    let segs: Vec<Segment> = blocks.iter().map(|b| b.segment(0, None)).collect();
    let q = gpu.alloc(nh * d * 2)?;
    let o = gpu.alloc(nh * d * 2)?;
    gpu.fill_uniform_half(kern, q.ptr(), nh * d, 5, 1.0)?;
    let (mut scratch, mut tb) = (AttnScratch::default(), TableBuf::default());
    // Each kernel's default count (`choose_splits_for(.., true)`: twice the 16-bit count
    // for the one-warp 8-bit kernels, one wave for the swapped-operand kernel) and the
    // 16-bit kernel's count, side by side.
    let default = gpu.attention_kernels();
    gpu.set_attention_kernels(AttnKernels {
        swap_kv8: false,
        ..default
    });
    let auto = gpu.choose_splits_for(1, shape, l, true);
    gpu.set_attention_kernels(AttnKernels {
        swap_kv8: true,
        ..default
    });
    let auto_swap = gpu.choose_splits_for(1, shape, l, true);
    gpu.set_attention_kernels(default);
    let auto16 = gpu.choose_splits(1, shape, l);
    let mut runs = Vec::new();
    // The one-warp 8-bit kernels (STARKV_ATTN_SWAP8=0) at each key tile, at their
    // split count and at the 16-bit one.
    for kv8 in AttnKernels::ALL_KV8 {
        for (splits, x) in [(auto, ""), (auto16, ", the 16-bit split count")] {
            let k = AttnKernels {
                kv8,
                swap_kv8: false,
                ..default
            };
            runs.push((k, splits, format!(" ({}-key tiles{x})", kv8.keys())));
        }
    }
    // The swapped-operand kernel at its own count (one wave of as many CTAs per SM as
    // fit), the 16-bit count, twice it (the one-warp 8-bit kernels' count) and four times.
    let more = |n: usize| (n * auto16).min(l / 256).clamp(1, 512);
    println!(
        "  attn_fwd_swap: {} CTAs per SM fit (occupancy calculator)",
        kern.swap_ctas_per_sm
    );
    for (splits, x) in [
        (auto_swap, String::new()),
        (auto16, ", the 16-bit split count".to_string()),
        (more(2), ", twice the 16-bit split count".to_string()),
        (more(4), format!(", {} splits", more(4))),
    ] {
        let k = AttnKernels {
            swap_kv8: true,
            ..default
        };
        runs.push((k, splits, format!(" (swapped-operand kernel{x})")));
    }
    for (kernels, splits, what) in runs {
        gpu.set_attention_kernels(kernels);
        let name = gpu.attention_kernel_name_kv8(nh / nkv, d);
        let f = kern.get(name);
        println!(
            "  {name}: {} registers, {} bytes local memory",
            f.num_regs().unwrap_or(-1),
            f.local_size_bytes().unwrap_or(-1)
        );
        let plan = AttnPlan::new(&segs, splits);
        let n_splits = plan.n_splits();
        let p = upload_plans(gpu, &mut tb, &[plan])?[0];
        let secs = time_gpu_batch(gpu, 15, 20, || {
            gpu.attention_kv8(
                kern,
                q.ptr(),
                1,
                nh,
                nkv,
                p,
                AttnOut::Half(o.ptr()),
                &mut scratch,
            )?;
            Ok(())
        })?;
        let bytes = (l * nkv * (d + 2) * 2) as f64;
        let gbs = bytes / secs / 1e9;
        add(
            format!(
                "{lab}: decode attention, {fname} KV{what} over {}K cached tokens",
                l / 1024
            ),
            format!("{:.3} ms", secs * 1e3),
            format!(
                "({:.0} MB read vs {:.0} MB bf16 ({:.3}x); {gbs:.0} GB/s, {:.0}% of copy \
                 bandwidth; {n_splits} splits; x{:.2} the bf16 kernel's speed)",
                bytes / 1e6,
                (l * nkv * d * 4) as f64 / 1e6,
                bytes / (l * nkv * d * 4) as f64,
                100.0 * gbs / copy_gbs,
                bf16_secs / secs
            ),
        );
    }
    gpu.set_attention_kernels(default);
    Ok(())
}

fn roofline(gpu: &Arc<Gpu>) -> Result<(f64, f64)> {
    let bytes = 1usize << 31;
    let a = gpu.alloc(bytes)?;
    let b = gpu.alloc(bytes)?;
    let k = gpu.kernels(64)?;
    gpu.fill_uniform_half(&k, a.ptr(), bytes / 2, 1, 1.0)?;
    let secs = time_gpu(gpu, 10, || {
        gpu.copy_d2d(b.ptr(), a.ptr(), bytes)?;
        Ok(())
    })?;
    let copy = 2.0 * bytes as f64 / secs / 1e9;
    drop((a, b));
    let n = 8192;
    let x = gpu.alloc(n * n * 2)?;
    let w = gpu.alloc(n * n * 2)?;
    let y = gpu.alloc(n * n * 2)?;
    gpu.fill_uniform_half(&k, x.ptr(), n * n, 2, 1.0)?;
    gpu.fill_uniform_half(&k, w.ptr(), n * n, 3, 1.0)?;
    let secs = time_gpu(gpu, 10, || {
        gpu.gemm(y.ptr(), false, x.ptr(), w.ptr(), n, n, n, 0.0)?;
        Ok(())
    })?;
    Ok((copy, 2.0 * (n as f64).powi(3) / secs / 1e12))
}

/// PyTorch baselines (bf16): SDPA on the phase-1 and decode attention shapes, and a
/// full-attention prefill of the same model shape (random weights, one layer's weights
/// reused for every layer: speed does not depend on them). Lines `RESULT key value`.
const TORCH_SCRIPT: &str = r#"
import sys, time, math
import torch
import torch.nn.functional as F
dev = 'cuda'
bf = torch.bfloat16
models = sys.argv[1].split(',')
contexts = [int(x) for x in sys.argv[2].split(',')]
shapes = {'smol': dict(h=576, nh=9, nkv=3, d=64, ffn=1536, nl=30, vocab=49152, theta=1e5),
          '8b': dict(h=4096, nh=32, nkv=8, d=128, ffn=14336, nl=32, vocab=128256, theta=5e5)}
def bench(fn, reps=10, warm=2):
    for _ in range(warm): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) / 1e3)
    ts.sort(); return ts[len(ts) // 2]
def res(k, v):
    print(f"RESULT {k} {v}", flush=True)
print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
for name in models:
    c = shapes[name]; nh, nkv, d = c['nh'], c['nkv'], c['d']
    m = a = 8192
    q = torch.randn(1, nh, m, d, device=dev, dtype=bf)
    k = torch.randn(1, nkv, a + m, d, device=dev, dtype=bf)
    v = torch.randn(1, nkv, a + m, d, device=dev, dtype=bf)
    flops = 4 * d * nh * (m * a + m * (m + 1) / 2)
    try:
        from torch.nn.attention.bias import causal_lower_right
        ke = k.repeat_interleave(nh // nkv, dim=1); ve = v.repeat_interleave(nh // nkv, dim=1)
        mask = causal_lower_right(m, a + m)
        t = bench(lambda: F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask))
        res(f"{name}_sdpa_p1_tflops", flops / t / 1e12)
        del ke, ve
    except Exception as ex:
        print("sdpa phase-1 failed:", ex, flush=True)
    L = max(contexts)
    k = torch.randn(1, nkv, L, d, device=dev, dtype=bf)
    v = torch.randn(1, nkv, L, d, device=dev, dtype=bf)
    q1 = torch.randn(1, nh, 1, d, device=dev, dtype=bf)
    try:
        t = bench(lambda: F.scaled_dot_product_attention(q1, k, v, enable_gqa=True), reps=20)
        res(f"{name}_sdpa_decode_gbs", 2 * L * nkv * d * 2 / t / 1e9)
    except Exception as ex:
        print("sdpa decode failed:", ex, flush=True)
    del k, v, q, q1
    torch.cuda.empty_cache()
    # Full-attention prefill of the model shape.
    h, ffn, nl = c['h'], c['ffn'], c['nl']
    g = torch.Generator(device=dev); g.manual_seed(0)
    def w(r, cc): return (torch.rand(r, cc, device=dev, generator=g, dtype=torch.float32) * 2 - 1).mul_(math.sqrt(3 / cc)).to(bf)
    wqkv = w((nh + 2 * nkv) * d, h); wo = w(h, nh * d); wgu = w(2 * ffn, h); wd = w(h, ffn)
    emb = w(c['vocab'], h); wout = w(c['vocab'], h)
    inv = 1.0 / (c['theta'] ** (torch.arange(0, d, 2, device=dev, dtype=torch.float64) / d))
    def rms(x): return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(bf)
    def rope(x, cos, sin):
        x2 = x.float().unflatten(-1, (d // 2, 2)); a0, a1 = x2[..., 0], x2[..., 1]
        return torch.stack((a0 * cos - a1 * sin, a0 * sin + a1 * cos), -1).flatten(-2).to(bf)
    @torch.no_grad()
    def prefill(tokens):
        L = tokens.shape[0]
        ang = torch.arange(L, device=dev, dtype=torch.float64)[:, None] * inv[None, :]
        cos = ang.cos().float()[None, :, :]; sin = ang.sin().float()[None, :, :]
        x = emb[tokens].float()
        for _ in range(nl):
            qkv = rms(x) @ wqkv.T
            qq = qkv[:, :nh * d].view(L, nh, d).transpose(0, 1)
            kk = qkv[:, nh * d:(nh + nkv) * d].view(L, nkv, d).transpose(0, 1)
            vv = qkv[:, (nh + nkv) * d:].view(L, nkv, d).transpose(0, 1)
            qq = rope(qq, cos, sin); kk = rope(kk, cos, sin)
            o = F.scaled_dot_product_attention(qq[None], kk[None], vv[None], is_causal=True, enable_gqa=True)[0]
            x = x + (o.transpose(0, 1).reshape(L, nh * d) @ wo.T).float()
            gu = rms(x) @ wgu.T
            x = x + ((F.silu(gu[:, :ffn]) * gu[:, ffn:]) @ wd.T).float()
        return (rms(x[-1:]) @ wout.T).float()
    prefill(torch.randint(0, c['vocab'], (1024,), device=dev))
    for L in contexts:
        toks = torch.randint(0, c['vocab'], (L,), device=dev)
        torch.cuda.synchronize(); t0 = time.time(); prefill(toks); torch.cuda.synchronize()
        res(f"{name}_prefill_{L}", time.time() - t0)
        torch.cuda.empty_cache()
    del wqkv, wo, wgu, wd, emb, wout
    torch.cuda.empty_cache()
"#;

fn run_torch(opts: &Opts) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let path = std::env::temp_dir().join("starkv_gpu_speed_torch.py");
    if std::fs::write(&path, TORCH_SCRIPT).is_err() {
        return out;
    }
    let ctx: Vec<String> = opts.contexts.iter().map(|c| c.to_string()).collect();
    println!("PyTorch baselines (python3 {}):", path.display());
    let res = std::process::Command::new("python3")
        .arg(&path)
        .arg(opts.models.join(","))
        .arg(ctx.join(","))
        .env("PYTHONUNBUFFERED", "1")
        .output();
    match res {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            for line in text.lines() {
                println!("  {line}");
                let parts: Vec<&str> = line.split_whitespace().collect();
                if parts.len() == 3
                    && parts[0] == "RESULT"
                    && let Ok(v) = parts[2].parse()
                {
                    out.insert(parts[1].to_string(), v);
                }
            }
            let err = String::from_utf8_lossy(&o.stderr);
            for line in err.lines().rev().take(5) {
                println!("  (stderr) {line}");
            }
        }
        Err(e) => println!("  python3 not available: {e}"),
    }
    out
}

/// Phase-1 ingest of `context` in the configurations issue 14 chose between, each against
/// the paper's (a = b, no overlap: `paper_secs`, measured just before in the same run),
/// and full attention (the context as one block) against the service's defaults.
fn ingest_configs(
    model: &mut CudaLlama,
    context: &[u32],
    b: usize,
    paper_secs: f64,
    add: &mut Add<'_>,
) -> Result<()> {
    let l = context.len();
    let gpu = model.gpu().clone();
    let overlap = starkv_compute::star::DEFAULT_OVERLAP;
    let defaults = StarConfig::with_default_anchor(b, l).with_overlap(overlap);
    let mut timed = |config: StarConfig| -> Result<f64> {
        let t = Instant::now();
        let blocks = encode_context(model, context, config)?;
        gpu.synchronize()?;
        let secs = t.elapsed().as_secs_f64();
        drop(blocks);
        Ok(secs)
    };
    let with_overlap = timed(StarConfig::new(b).with_overlap(overlap))?;
    let service = timed(defaults)?;
    let full = timed(StarConfig::new(l))?;
    let k = l / 1024;
    for (what, secs) in [
        (format!("a = b, overlap {overlap}"), with_overlap),
        (
            format!(
                "service defaults (a = {}b, overlap {overlap})",
                defaults.anchor_size / b
            ),
            service,
        ),
        ("full attention (one block)".to_string(), full),
    ] {
        add(
            format!("phase-1 ingest, {k}K context, 8K blocks: {what}"),
            format!("{:.0} tok/s", l as f64 / secs),
            format!(
                "({secs:.2} s; x{:.3} the time of a = b without overlap, {paper_secs:.2} s; service defaults x{:.2} of full attention's time)",
                secs / paper_secs,
                service / full
            ),
        );
    }
    Ok(())
}
