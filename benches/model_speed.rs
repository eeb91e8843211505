//! CPU model speed: prefill tokens/s at several lengths and decode tokens/s after a long
//! context, for starkv and for llama.cpp (llama-cpp-python) on the same GGUF with the same
//! thread count, measured in the same run and printed as a table with the ratio.
//!
//! `cargo bench --bench model_speed -- [--sizes 512,2048,8000] [--decode-ctx 8000]
//! [--decode-steps 32] [--repeats 3] [--threads N] [--no-peer]`
//!
//! The peer runs `benches/peers/llama_cpp_speed.py` (needs `pip install llama-cpp-python`,
//! which compiles llama.cpp: about 40 minutes on 2 cores, once).

#[path = "support/stats.rs"]
mod stats;

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use starkv_compute::LoadedModel;
use starkv_compute::fetch::{default_data_dir, ensure_default_model};
use starkv_compute::model::KvCache;
use stats::{median, peer_seconds};

struct Options {
    sizes: Vec<usize>,
    decode_ctx: usize,
    decode_steps: usize,
    repeats: usize,
    threads: usize,
    peer: bool,
}

fn parse_options() -> Result<Options> {
    let mut o = Options {
        sizes: vec![512, 2048, 8000],
        decode_ctx: 8000,
        decode_steps: 32,
        repeats: 3,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        peer: true,
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
            "--no-peer" => o.peer = false,
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
    peer: Option<f64>,
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
    let mut rows = Vec::new();
    for &n in &o.sizes {
        let toks = tokens(n);
        let positions: Vec<usize> = (0..n).collect();
        let mut times = Vec::new();
        for _ in 0..o.repeats {
            let mut cache = KvCache::new(n_layers, shape, n);
            let t = Instant::now();
            let hidden = model.forward(&toks, &positions, &mut cache)?;
            let _ = model.logits(&hidden[hidden.len() - model.config().hidden..]);
            times.push(t.elapsed().as_secs_f64());
        }
        rows.push(Row {
            what: format!("prefill {n} tokens (tok/s)"),
            ours: n as f64 / median(times),
            peer: None,
        });
    }
    {
        let toks = tokens(o.decode_ctx + o.decode_steps);
        let mut cache = KvCache::new(n_layers, shape, toks.len());
        let positions: Vec<usize> = (0..o.decode_ctx).collect();
        model.forward(&toks[..o.decode_ctx], &positions, &mut cache)?;
        let mut times = Vec::new();
        for s in 0..o.decode_steps {
            let p = o.decode_ctx + s;
            let t = Instant::now();
            let hidden = model.forward(&toks[p..p + 1], &[p], &mut cache)?;
            let _ = model.logits(&hidden);
            times.push(t.elapsed().as_secs_f64());
        }
        rows.push(Row {
            what: format!("decode after {} tokens (tok/s)", o.decode_ctx),
            ours: 1.0 / median(times),
            peer: None,
        });
    }
    if o.peer {
        match run_peer(&o, &path) {
            Ok(peer) => {
                for (row, value) in rows.iter_mut().zip(peer) {
                    row.peer = Some(value);
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
        "\nmodel_speed: SmolLM2-135M-Instruct Q4_1, {} threads, {cpu}, medians of {} runs",
        o.threads, o.repeats
    );
    println!("| measurement | starkv | llama.cpp | starkv / llama.cpp |");
    println!("|---|---|---|---|");
    for r in rows {
        let (peer, ratio) = match r.peer {
            Some(p) => (format!("{p:.1}"), format!("{:.2}x", r.ours / p)),
            None => ("n/a".into(), "n/a".into()),
        };
        println!("| {} | {:.1} | {peer} | {ratio} |", r.what, r.ours);
    }
    Ok(())
}

/// Peer throughputs in the same order as our rows.
fn run_peer(o: &Options, model: &std::path::Path) -> Result<Vec<f64>> {
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
    ]);
    let out = cmd.output().context("running python3")?;
    anyhow::ensure!(
        out.status.success(),
        "peer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut values = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let secs = peer_seconds(&v).context("seconds")?;
        let n = v["tokens"].as_u64().context("tokens")? as f64;
        values.push(if v["what"] == "prefill" {
            n / median(secs)
        } else {
            1.0 / median(secs)
        });
    }
    Ok(values)
}
