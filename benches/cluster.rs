//! Cluster overhead on loopback TCP: a coordinator (this process) with 1..=N shard
//! workers (`starkv worker` processes, each with its own model and store, reached
//! through the real protocol over 127.0.0.1) against one node holding every block, same
//! document, same run.
//!
//! Rows: ingest time; time to first token; phase-2 time per generated token and what
//! the cluster adds to it; bytes moved per generated token (Q out, partial O and lse
//! back) against the document's KV bytes (what moving the KV to the query would cost).
//! Per-token figures are the difference between a query generating `--gen` tokens and
//! one generating a single token, divided by the extra tokens.
//!
//! `cargo bench --bench cluster -- [--tokens 2000] [--block-size 256] [--gen 16]
//! [--workers 3] [--repeats 3] [--threads N] [--worker-threads 1] [--local-workers 2]`
//!
//! A last row runs the same coordinator over `--local-workers` in-process CPU workers
//! (what `serve --devices` runs), with no sockets. A second table splits a worker
//! process's attend call (one per layer and token): round trip, the worker's wait for a
//! thread, its attention, and the rest (network and both ends' hand-offs).

#[path = "support/stats.rs"]
#[allow(dead_code)]
mod stats;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use starkv_cache::{BlockStore, StoreConfig};
use starkv_compute::LoadedModel;
use starkv_compute::fetch::{default_data_dir, ensure_default_model};
use starkv_compute::sampling::SamplingParams;
use starkv_service::cluster::{
    AttendTimes, Cluster, ClusterConfig, LocalWorkersConfig, open_local_workers,
};
use starkv_service::{IngestRequest, QueryRequest, Service};
use stats::median;

const SECRET: &str = "bench-secret";
const QUESTION: &str = "What is the special magic number for the harbour town?";

fn document(target_tokens: usize) -> String {
    let mut text = String::new();
    let mut i = 0usize;
    while text.len() < target_tokens * 5 {
        if i == target_tokens / 16 {
            text.push_str("The special magic number for the harbour town is 6194027. ");
        }
        text.push_str(&format!(
            "The harbour keeper counted {} boats and {} nets on day {}. ",
            i % 13,
            i % 7,
            i % 97
        ));
        i += 1;
    }
    text
}

/// A `starkv worker` process; killed on drop.
struct WorkerProc(Child);

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a worker on a free loopback port; returns it and its address.
fn start_worker(
    model: &std::path::Path,
    dir: &std::path::Path,
    threads: usize,
) -> Result<(WorkerProc, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_starkv"))
        .arg("--data-dir")
        .arg(dir)
        .arg("--model")
        .arg(model)
        .args(["--threads", &threads.to_string(), "worker"])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--secret",
            SECRET,
            "--device",
            "cpu",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("worker stdout")?;
    let proc = WorkerProc(child);
    for line in BufReader::new(stdout).lines() {
        if let Some(addr) = line?.strip_prefix("starkv worker listening on ") {
            return Ok((proc, addr.to_string()));
        }
    }
    anyhow::bail!("the worker exited before listening")
}

/// One configuration's measurements (medians over the repeats).
struct Row {
    name: String,
    ingest_s: f64,
    first_token_s: f64,
    per_token_s: f64,
    bytes_per_token: Option<f64>,
}

fn query(service: &Service, max_tokens: usize) -> Result<starkv_service::QueryOutcome> {
    let req = QueryRequest {
        question: QUESTION.into(),
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        cancel: Default::default(),
        merge: None,
        logprobs: None,
    };
    Ok(service.query("bench/doc", "bench", &req, &mut |_| true)?)
}

#[allow(clippy::too_many_arguments)]
/// Ingest once, then `repeats` pairs of (1-token, `gen`-token) queries.
fn measure(
    name: String,
    service: &Service,
    text: &str,
    tokens: Vec<u32>,
    block_size: usize,
    gen_tokens: usize,
    repeats: usize,
    bytes: &dyn Fn() -> u64,
) -> Result<Row> {
    let req = IngestRequest {
        id: "bench/doc".into(),
        tenant: "bench".into(),
        text: text.into(),
        block_size,
        anchor_size: block_size,
        merge: Default::default(),
        reencode_ratio: 0.0,
        pinned: false,
        ttl_ms: None,
        kv_dtype: Default::default(),
    };
    let t = Instant::now();
    service.ingest(&req, tokens, &|_, _| {})?;
    let ingest_s = t.elapsed().as_secs_f64();
    query(service, 1)?; // warm-up: blocks into memory everywhere
    let (mut first, mut per_token, mut per_token_bytes) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats {
        let b0 = bytes();
        let one = query(service, 1)?;
        let b1 = bytes();
        let many = query(service, gen_tokens)?;
        let b2 = bytes();
        let extra = many
            .generated_tokens
            .saturating_sub(one.generated_tokens)
            .max(1) as f64;
        first.push(one.first_token.as_secs_f64());
        per_token.push((many.total.as_secs_f64() - one.total.as_secs_f64()).max(0.0) / extra);
        per_token_bytes.push(((b2 - b1) as f64 - (b1 - b0) as f64).max(0.0) / extra);
    }
    Ok(Row {
        name,
        ingest_s,
        first_token_s: median(first),
        per_token_s: median(per_token),
        bytes_per_token: (bytes() > 0).then(|| median(per_token_bytes)),
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let get = |name: &str, default: usize| -> Result<usize> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(args.get(i + 1).context("missing value")?.parse()?),
            None => Ok(default),
        }
    };
    let (target, block_size, gen_tokens, max_workers, repeats) = (
        get("--tokens", 2000)?,
        get("--block-size", 256)?,
        get("--gen", 16)?,
        get("--workers", 3)?,
        get("--repeats", 3)?,
    );
    let threads = get(
        "--threads",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    )?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let model_path = ensure_default_model(&default_data_dir(), &mut |m| eprintln!("{m}"))?;
    let open_service = || -> Result<Service> {
        Ok(Service::new(
            LoadedModel::open(&model_path)?,
            &model_path,
            BlockStore::in_memory(4, StoreConfig::default())?,
            1 << 30,
        )?)
    };
    let single = open_service()?;
    let mut text = document(target);
    let mut tokens = single.document_tokens(&text)?;
    while tokens.len() > target {
        let cut = text.len() * target / tokens.len();
        text.truncate(text[..cut].rfind(' ').unwrap_or(cut));
        tokens = single.document_tokens(&text)?;
    }
    let c = single.model().model.config();
    let kv_bytes = tokens.len() * c.n_layers * 2 * c.n_kv_heads * c.head_dim * 2;
    let mut rows = vec![measure(
        "single node".into(),
        &single,
        &text,
        tokens.clone(),
        block_size,
        gen_tokens,
        repeats,
        &|| 0,
    )?];
    drop(single);

    let worker_threads = get("--worker-threads", 1)?;
    let scratch = tempfile::tempdir()?;
    let mut hops = Vec::new();
    for n in 1..=max_workers {
        let mut addresses = Vec::new();
        let mut procs = Vec::new();
        for i in 0..n {
            let dir = scratch.path().join(format!("run-{n}-worker-{i}"));
            let (proc, addr) = start_worker(&model_path, &dir, worker_threads)?;
            procs.push(proc);
            addresses.push(addr);
        }
        let coordinator = open_service()?;
        let cluster = Arc::new(Cluster::connect(
            &ClusterConfig {
                workers: addresses,
                secret: SECRET.into(),
                replicas: 1,
                call_timeout: Duration::from_secs(60),
                encode_timeout: Duration::from_secs(3600),
                catalog_dir: scratch.path().join(format!("catalog-{n}")),
            },
            coordinator.model_fingerprint(),
        )?);
        let coordinator = coordinator.with_cluster(cluster.clone());
        let bytes = || {
            cluster
                .status()
                .iter()
                .map(|w| w.bytes_sent + w.bytes_received)
                .sum()
        };
        rows.push(measure(
            format!("coordinator + {n} worker{}", if n > 1 { "s" } else { "" }),
            &coordinator,
            &text,
            tokens.clone(),
            block_size,
            gen_tokens,
            repeats,
            &bytes,
        )?);
        let mut times = AttendTimes::default();
        for w in cluster.status() {
            times.calls += w.attend.calls;
            times.round_trip_us += w.attend.round_trip_us;
            times.worker_queued_us += w.attend.worker_queued_us;
            times.worker_compute_us += w.attend.worker_compute_us;
        }
        hops.push((rows.last().expect("a row").name.clone(), times));
        drop(coordinator);
        drop(procs);
    }

    // The same coordinator code over in-process workers (what `serve --devices` runs on
    // a multi-GPU host), here two on the CPU: no sockets, no second process.
    let local_workers = get("--local-workers", 2)?;
    if local_workers > 0 {
        let devices = vec![starkv_compute::cuda::DeviceChoice::Cpu; local_workers];
        let workers = open_local_workers(
            &LocalWorkersConfig {
                data_dir: scratch.path().join("local"),
                model: starkv_service::ModelFile::open(&model_path)?,
                shards: 2,
                hot_tier_bytes: 1 << 30,
                gpu_tier_bytes: None,
            },
            &devices,
        )?;
        let cluster = Arc::new(Cluster::with_workers(
            &ClusterConfig {
                workers: Vec::new(),
                secret: String::new(),
                replicas: 1,
                call_timeout: Duration::from_secs(60),
                encode_timeout: Duration::from_secs(3600),
                catalog_dir: scratch.path().join("catalog-local"),
            },
            workers,
        )?);
        let coordinator = open_service()?.with_cluster(cluster);
        rows.push(measure(
            format!("{local_workers} in-process workers"),
            &coordinator,
            &text,
            tokens.clone(),
            block_size,
            gen_tokens,
            repeats,
            &|| 0,
        )?);
    }

    let base = rows[0].per_token_s;
    println!(
        "\ncluster: {} context tokens, block size {block_size}, {gen_tokens} generated tokens, {threads} threads here, {worker_threads} per worker process, loopback TCP, medians of {repeats}; document KV {:.1} MB (f16)",
        tokens.len(),
        kv_bytes as f64 / 1e6
    );
    println!(
        "| configuration | ingest s | first token ms | ms per generated token | added ms per token | bytes moved per token | KV bytes / bytes per token |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let bytes = r
            .bytes_per_token
            .map_or("-".to_string(), |b| format!("{:.0} KB", b / 1e3));
        let ratio = r.bytes_per_token.map_or("-".to_string(), |b| {
            format!("{:.0}x", kv_bytes as f64 / b.max(1.0))
        });
        println!(
            "| {} | {:.2} | {:.0} | {:.1} | {:+.2} | {bytes} | {ratio} |",
            r.name,
            r.ingest_s,
            r.first_token_s * 1e3,
            r.per_token_s * 1e3,
            (r.per_token_s - base) * 1e3,
        );
    }
    // Where an attend call's time goes (one per layer and generated token, per worker
    // holding blocks), over every query of the configuration's measurement.
    println!(
        "\n| configuration | attend calls | round trip µs | worker waits for a thread µs | worker attention µs | network and hand-offs µs |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, t) in &hops {
        let (rt, queued, compute) = (
            t.mean(t.round_trip_us),
            t.mean(t.worker_queued_us),
            t.mean(t.worker_compute_us),
        );
        println!(
            "| {name} | {} | {rt:.0} | {queued:.0} | {compute:.0} | {:.0} |",
            t.calls,
            rt - queued - compute
        );
    }
    Ok(())
}
