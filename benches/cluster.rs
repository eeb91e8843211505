//! Cluster overhead on loopback TCP: a coordinator (this process) with 1..=N shard
//! workers (`starkv worker` processes, each with its own model and store, reached
//! through the real protocol over 127.0.0.1) against one node holding every block, same
//! document, same run.
//!
//! Rows: ingest time; time to first token; phase-2 time per generated token and what
//! the cluster adds to it; bytes moved per generated token (Q out, partial O and lse
//! back) against the document's KV bytes (what moving the KV to the query would cost).
//! Per-token figures are the difference between a query generating `--gen` tokens and
//! one generating a single token, divided by the extra tokens. Every configuration is set
//! up and ingested first, then measured in `--repeats` rounds that query each in turn, so
//! a drifting host lands on all alike; "added" is the median of the per-round differences
//! with the single node.
//!
//! `cargo bench --bench cluster -- [--tokens 2000] [--block-size 256] [--gen 16]
//! [--workers 3] [--repeats 3] [--threads N] [--worker-threads 1] [--local-workers 2]
//! [--spin-us auto|US[,US...]]`
//!
//! `--spin-us` lists socket-polling budgets (`starkv_service::cluster::spin`): each
//! worker count is measured once per budget, the coordinator and its workers polling
//! alike, so the rows compare them in the same run.
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
    AttendTimes, Cluster, ClusterConfig, LocalWorkersConfig, SpinBudget, open_local_workers,
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
    spin: SpinBudget,
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
            "--spin-us",
            &spin.micros().to_string(),
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

/// One configuration's measurements (medians over the rounds).
struct Row {
    name: String,
    ingest_s: f64,
    first_token_s: f64,
    per_token_s: f64,
    /// Median over the rounds of (this configuration's per-token time - the single
    /// node's in the same round).
    added_s: f64,
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

/// A configuration under test: a service (one node, or a coordinator) and what it
/// needs alive (its worker processes).
struct Config {
    name: String,
    service: Service,
    cluster: Option<Arc<Cluster>>,
    _workers: Vec<WorkerProc>,
    ingest_s: f64,
    first: Vec<f64>,
    per_token: Vec<f64>,
    per_token_bytes: Vec<f64>,
}

impl Config {
    fn new(
        name: String,
        service: Service,
        cluster: Option<Arc<Cluster>>,
        workers: Vec<WorkerProc>,
    ) -> Self {
        Self {
            name,
            service,
            cluster,
            _workers: workers,
            ingest_s: 0.0,
            first: Vec::new(),
            per_token: Vec::new(),
            per_token_bytes: Vec::new(),
        }
    }

    /// Bytes sent to and received from its workers so far.
    fn bytes(&self) -> u64 {
        self.cluster.as_ref().map_or(0, |c| {
            c.status()
                .iter()
                .map(|w| w.bytes_sent + w.bytes_received)
                .sum()
        })
    }

    /// Ingests the document (timed) and warms every tier with one query.
    fn ingest(&mut self, text: &str, tokens: Vec<u32>, block_size: usize) -> Result<()> {
        let req = IngestRequest {
            id: "bench/doc".into(),
            tenant: "bench".into(),
            text: text.into(),
            block_size,
            anchor_size: block_size,
            block_overlap: 0,
            merge: Default::default(),
            reencode_ratio: 0.0,
            pinned: false,
            ttl_ms: None,
            kv_dtype: Default::default(),
        };
        let t = Instant::now();
        self.service.ingest(&req, tokens, &|_, _| {})?;
        self.ingest_s = t.elapsed().as_secs_f64();
        query(&self.service, 1)?;
        Ok(())
    }

    /// One round: a 1-token and a `gen_tokens`-token query.
    fn sample(&mut self, gen_tokens: usize) -> Result<()> {
        let b0 = self.bytes();
        let one = query(&self.service, 1)?;
        let b1 = self.bytes();
        let many = query(&self.service, gen_tokens)?;
        let b2 = self.bytes();
        let extra = many
            .generated_tokens
            .saturating_sub(one.generated_tokens)
            .max(1) as f64;
        self.first.push(one.first_token.as_secs_f64());
        self.per_token
            .push((many.total.as_secs_f64() - one.total.as_secs_f64()).max(0.0) / extra);
        self.per_token_bytes
            .push(((b2 - b1) as f64 - (b1 - b0) as f64).max(0.0) / extra);
        Ok(())
    }

    /// The row, against `base` (the single node's per-token times, round by round).
    fn row(&self, base: &[f64]) -> Row {
        let added = self
            .per_token
            .iter()
            .zip(base)
            .map(|(t, b)| t - b)
            .collect();
        Row {
            name: self.name.clone(),
            ingest_s: self.ingest_s,
            first_token_s: median(self.first.clone()),
            per_token_s: median(self.per_token.clone()),
            added_s: median(added),
            bytes_per_token: self
                .cluster
                .as_ref()
                .map(|_| median(self.per_token_bytes.clone())),
        }
    }
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
    // Every configuration is set up and ingested first, then measured in rounds, each
    // round querying every configuration once in turn: a drift of the host (other load,
    // clocks) lands on all of them alike, and each configuration's added time is the
    // median of its per-round differences with the single node (paired), not the
    // difference of medians taken minutes apart.
    let mut configs = vec![Config::new("single node".into(), single, None, Vec::new())];
    let worker_threads = get("--worker-threads", 1)?;
    let scratch = tempfile::tempdir()?;
    // Each worker count once per socket-polling budget (both ends poll alike).
    let spins: Vec<SpinBudget> = match args.iter().position(|a| a == "--spin-us") {
        Some(i) => args
            .get(i + 1)
            .context("missing value")?
            .split(',')
            .map(|v| -> Result<SpinBudget> {
                Ok(match v {
                    "auto" => SpinBudget::resolve(None),
                    us => SpinBudget::from_micros(us.parse()?),
                })
            })
            .collect::<Result<_>>()?,
        None => vec![SpinBudget::resolve(None)],
    };
    for n in 1..=max_workers {
        for &spin in &spins {
            let mut addresses = Vec::new();
            let mut procs = Vec::new();
            for i in 0..n {
                let dir = scratch
                    .path()
                    .join(format!("run-{n}-{}-worker-{i}", spin.micros()));
                let (proc, addr) = start_worker(&model_path, &dir, worker_threads, spin)?;
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
                    catalog_dir: scratch
                        .path()
                        .join(format!("catalog-{n}-{}", spin.micros())),
                    spin,
                },
                coordinator.model_fingerprint(),
            )?);
            configs.push(Config::new(
                format!(
                    "coordinator + {n} worker{}, polling {} µs",
                    if n > 1 { "s" } else { "" },
                    spin.micros()
                ),
                coordinator.with_cluster(cluster.clone()),
                Some(cluster),
                procs,
            ));
        }
    }

    // The same coordinator code over in-process workers (what `serve --devices` runs on
    // a multi-GPU host), here on the CPU: no sockets, no second process.
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
                spin: SpinBudget::OFF,
            },
            workers,
        )?);
        // No sockets: nothing to count in bytes.
        configs.push(Config::new(
            format!(
                "{local_workers} in-process worker{}",
                if local_workers > 1 { "s" } else { "" }
            ),
            open_service()?.with_cluster(cluster),
            None,
            Vec::new(),
        ));
    }
    for c in &mut configs {
        c.ingest(&text, tokens.clone(), block_size)?;
    }
    for _ in 0..repeats {
        for c in &mut configs {
            c.sample(gen_tokens)?;
        }
    }
    let base = configs[0].per_token.clone();
    let rows: Vec<Row> = configs.iter().map(|c| c.row(&base)).collect();
    let hops: Vec<(String, AttendTimes)> = configs
        .iter()
        .filter_map(|c| {
            let cluster = c.cluster.as_ref()?;
            let mut times = AttendTimes::default();
            for w in cluster.status() {
                times.calls += w.attend.calls;
                times.round_trip_us += w.attend.round_trip_us;
                times.worker_queued_us += w.attend.worker_queued_us;
                times.worker_compute_us += w.attend.worker_compute_us;
            }
            Some((c.name.clone(), times))
        })
        .collect();

    println!(
        "\ncluster: {} context tokens, block size {block_size}, {gen_tokens} generated tokens, {threads} threads here, {worker_threads} per worker process, loopback TCP, medians of {repeats} rounds (each round queries every configuration in turn; added = median of the per-round differences with the single node); document KV {:.1} MB (f16)",
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
            r.added_s * 1e3,
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
