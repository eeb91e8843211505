//! CPU model speed: prefill tokens/s at several lengths and decode tokens/s after a long
//! context, for starkv and for llama.cpp (llama-cpp-python) on the same GGUF with the same
//! thread count, measured in the same run and printed as a table with the ratio.
//!
//! `cargo bench --bench model_speed -- [--sizes 512,2048,8000] [--decode-ctx 8000]
//! [--decode-steps 32] [--repeats 3] [--threads N] [--kv f16|f32] [--no-peer]
//! [--peer-flash-attn off,on] [--attention-only]`
//!
//! When the decode context is the last prefill size, the decode steps continue after the
//! last prefill of it (both sides), so the context is not prefilled a second time.
//!
//! The decode row is split into the time spent in attention (over the KV cache, `--kv`:
//! f16 by default, as llama.cpp holds it) and the rest (the quantised weight products,
//! norms, RoPE, the LM head): the profile that says which one to optimise.
//!
//! The peer runs `benches/peers/llama_cpp_speed.py` (needs `pip install llama-cpp-python`,
//! which compiles llama.cpp: about 40 minutes on 2 cores, once), once per flash-attention
//! setting in `--peer-flash-attn` (default `off,on`: llama-cpp-python's default is off,
//! llama.cpp's own `auto` turns it on for a CPU); each row compares with the faster one.

#[path = "support/stats.rs"]
mod stats;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use starkv_compute::LoadedModel;
use starkv_compute::fetch::{default_data_dir, ensure_default_model};
use starkv_compute::model::{KvCache, KvPrecision, LayerAttention};
use starkv_compute::partial::HeadShape;
use stats::{median, peer_seconds};

struct Options {
    sizes: Vec<usize>,
    decode_ctx: usize,
    decode_steps: usize,
    repeats: usize,
    threads: usize,
    kv: KvPrecision,
    peer: bool,
    peer_flash_attn: String,
    attention_only: bool,
}

fn parse_options() -> Result<Options> {
    let mut o = Options {
        sizes: vec![512, 2048, 8000],
        decode_ctx: 8000,
        decode_steps: 32,
        repeats: 3,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        kv: KvPrecision::F16,
        peer: true,
        peer_flash_attn: "off,on".into(),
        attention_only: false,
    };
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().context("missing value").cloned();
        match a.as_str() {
            "--sizes" => {
                o.sizes = value()?
                    .split(',')
                    .map(|s| s.parse())
                    .collect::<Result<_, _>>()?
            }
            "--decode-ctx" => o.decode_ctx = value()?.parse()?,
            "--decode-steps" => o.decode_steps = value()?.parse()?,
            "--repeats" => o.repeats = value()?.parse()?,
            "--threads" => o.threads = value()?.parse()?,
            "--kv" => {
                o.kv = match value()?.as_str() {
                    "f16" => KvPrecision::F16,
                    "f32" => KvPrecision::F32,
                    other => anyhow::bail!("--kv takes f16 or f32, not {other}"),
                }
            }
            "--no-peer" => o.peer = false,
            "--peer-flash-attn" => o.peer_flash_attn = value()?,
            "--attention-only" => o.attention_only = true,
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    Ok(o)
}

/// Ordinary vocabulary ids, the same sequence the peer script uses.
fn tokens(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919) % 40000 + 100) as u32).collect()
}

struct Row {
    what: String,
    ours: f64,
    /// The peer's best value and the flash-attention setting that gave it.
    peer: Option<(f64, String)>,
    /// Whether the peer has this row (the decode split is ours alone).
    compared: bool,
}

/// A KV cache that adds up the time its attention takes.
struct TimedCache {
    cache: KvCache,
    attention: Duration,
}

impl LayerAttention for TimedCache {
    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> starkv_compute::Result<()> {
        let t = Instant::now();
        let result = self.cache.attend(layer, q, k, v, m, out);
        self.attention += t.elapsed();
        result
    }

    fn computes_only(&self) -> bool {
        self.cache.computes_only()
    }
}

fn main() -> Result<()> {
    let o = parse_options()?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(o.threads)
        .build_global()?;
    let path = ensure_default_model(&default_data_dir(), &mut |m| eprintln!("{m}"))?;
    let loaded = LoadedModel::open(&path)?;
    let model = &loaded.model;
    let (n_layers, shape) = (model.config().n_layers, model.head_shape());
    if o.attention_only {
        return attention_only(&o, n_layers, shape);
    }
    let mut rows = Vec::new();
    // Decode continues after the last prefill when that prefilled the decode context.
    let continue_decode = o.sizes.last() == Some(&o.decode_ctx);
    let total = o.decode_ctx + o.decode_steps;
    let mut decode_cache = None;
    for (i, &n) in o.sizes.iter().enumerate() {
        let toks = tokens(n);
        let positions: Vec<usize> = (0..n).collect();
        let mut times = Vec::new();
        for r in 0..o.repeats {
            let keep = continue_decode && i + 1 == o.sizes.len() && r + 1 == o.repeats;
            let mut cache = TimedCache {
                cache: KvCache::with_precision(n_layers, shape, if keep { total } else { n }, o.kv),
                attention: Duration::ZERO,
            };
            let t = Instant::now();
            let hidden = model.forward(&toks, &positions, &mut cache)?;
            let _ = model.logits(&hidden[hidden.len() - model.config().hidden..]);
            times.push(t.elapsed().as_secs_f64());
            if keep {
                decode_cache = Some(cache);
            }
        }
        rows.push(Row {
            what: format!("prefill {n} tokens (tok/s)"),
            ours: n as f64 / median(times),
            peer: None,
            compared: true,
        });
    }
    {
        let toks = tokens(total);
        let mut cache = match decode_cache {
            Some(cache) => cache,
            None => {
                let mut cache = TimedCache {
                    cache: KvCache::with_precision(n_layers, shape, total, o.kv),
                    attention: Duration::ZERO,
                };
                let positions: Vec<usize> = (0..o.decode_ctx).collect();
                model.forward(&toks[..o.decode_ctx], &positions, &mut cache)?;
                cache
            }
        };
        let (mut times, mut attention) = (Vec::new(), Vec::new());
        for s in 0..o.decode_steps {
            let p = o.decode_ctx + s;
            cache.attention = Duration::ZERO;
            let t = Instant::now();
            let hidden = model.forward(&toks[p..p + 1], &[p], &mut cache)?;
            let _ = model.logits(&hidden);
            times.push(t.elapsed().as_secs_f64());
            attention.push(cache.attention.as_secs_f64());
        }
        let (step, attn) = (median(times.clone()), median(attention));
        rows.push(Row {
            what: format!("decode after {} tokens (tok/s)", o.decode_ctx),
            ours: 1.0 / step,
            peer: None,
            compared: true,
        });
        rows.push(Row {
            what: "decode step: attention (ms)".into(),
            ours: attn * 1e3,
            peer: None,
            compared: false,
        });
        rows.push(Row {
            what: "decode step: the rest, weight products (ms)".into(),
            ours: (step - attn) * 1e3,
            peer: None,
            compared: false,
        });
    }
    let mut peer_detail = Vec::new();
    if o.peer {
        match run_peer(&o, &path) {
            Ok(peer) => {
                for (row, values) in rows.iter_mut().filter(|r| r.compared).zip(peer) {
                    peer_detail.push(format!(
                        "{}: {}",
                        row.what,
                        values
                            .iter()
                            .map(|(v, fa)| format!("flash-attn {fa} {v:.1}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                    row.peer = values.into_iter().max_by(|a, b| a.0.total_cmp(&b.0));
                }
            }
            Err(e) => eprintln!("llama.cpp peer not measured: {e:#}"),
        }
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "\nmodel_speed: SmolLM2-135M-Instruct Q4_1, {} threads, {cpu}, medians of {} runs, \
         KV cache {:?}",
        o.threads, o.repeats, o.kv
    );
    println!(
        "| measurement | starkv | llama.cpp (faster flash-attn setting) | starkv / llama.cpp |"
    );
    println!("|---|---|---|---|");
    for r in rows {
        let (peer, ratio) = match &r.peer {
            Some((p, fa)) => (
                format!("{p:.1} (flash-attn {fa})"),
                format!("{:.2}x", r.ours / p),
            ),
            None => ("n/a".into(), "n/a".into()),
        };
        println!("| {} | {:.1} | {peer} | {ratio} |", r.what, r.ours);
    }
    if !peer_detail.is_empty() {
        println!("\nllama.cpp, each setting: {}", peer_detail.join("; "));
    }
    Ok(())
}

/// Peer throughputs in the same order as our rows, each with every flash-attention
/// setting measured (value, setting).
fn run_peer(o: &Options, model: &std::path::Path) -> Result<Vec<Vec<(f64, String)>>> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/peers/llama_cpp_speed.py"
    );
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .arg(model)
        .arg(o.threads.to_string())
        .arg(o.repeats.to_string());
    cmd.args(o.sizes.iter().map(|s| s.to_string()));
    cmd.args([
        "--decode".to_string(),
        o.decode_ctx.to_string(),
        o.decode_steps.to_string(),
        "--flash-attn".to_string(),
        o.peer_flash_attn.clone(),
    ]);
    let out = cmd.output().context("running python3")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(info) = stderr.lines().find(|l| l.contains("CPU :")) {
        eprintln!("llama.cpp system info: {info}");
    }
    anyhow::ensure!(
        out.status.success(),
        "peer failed ({}): {stderr}",
        out.status
    );
    // Rows in our order: each prefill size, then decode.
    let keys: Vec<(&str, usize)> = o
        .sizes
        .iter()
        .map(|&n| ("prefill", n))
        .chain([("decode", o.decode_ctx)])
        .collect();
    let mut values = vec![Vec::new(); keys.len()];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let secs = peer_seconds(&v).context("seconds")?;
        let n = v["tokens"].as_u64().context("tokens")? as usize;
        let what = v["what"].as_str().context("what")?;
        let fa = v["flash_attn"].as_str().unwrap_or("off").to_string();
        let value = if what == "prefill" {
            n as f64 / median(secs)
        } else {
            1.0 / median(secs)
        };
        if let Some(i) = keys.iter().position(|&k| k == (what, n)) {
            values[i].push((value, fa));
        }
    }
    anyhow::ensure!(
        values.iter().all(|v| !v.is_empty()),
        "peer printed no value for some rows: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(values)
}

/// Decode attention alone over `decode_ctx` cached tokens of random values, every layer,
/// with an f32 and an f16 cache (the model's shapes; no weights involved).
fn attention_only(o: &Options, n_layers: usize, shape: HeadShape) -> Result<()> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut random = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    };
    let ctx = o.decode_ctx;
    let (k, v) = (
        random(ctx * shape.kv_width()),
        random(ctx * shape.kv_width()),
    );
    let q = random(shape.q_width());
    let (k1, v1) = (random(shape.kv_width()), random(shape.kv_width()));
    let mut out = vec![0f32; shape.q_width()];
    println!(
        "\nmodel_speed --attention-only: decode attention over {ctx} tokens, {n_layers} \
         layers, {} threads, medians of {} steps",
        o.threads, o.decode_steps
    );
    println!("| KV cache | ms per decode step | speed vs f32 |");
    println!("|---|---|---|");
    let mut f32_ms = None;
    for precision in [KvPrecision::F32, KvPrecision::F16] {
        let capacity = ctx + o.decode_steps;
        let mut cache = KvCache::with_precision(n_layers, shape, capacity, precision);
        for layer in 0..n_layers {
            cache.layer_mut(layer).append(&k, &v);
        }
        let mut times = Vec::new();
        for _ in 0..o.decode_steps {
            let t = Instant::now();
            for layer in 0..n_layers {
                cache.attend(layer, &q, &k1, &v1, 1, &mut out)?;
            }
            times.push(t.elapsed().as_secs_f64());
        }
        let ms = median(times) * 1e3;
        let base = *f32_ms.get_or_insert(ms);
        println!("| {precision:?} | {ms:.2} | {:.2}x |", base / ms);
    }
    Ok(())
}
