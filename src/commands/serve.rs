//! `starkv serve`: the HTTP service. Settings: embedded defaults, then `--config FILE`
//! (TOML), then environment variables and flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use starkv_api::ServerConfig;
use starkv_compute::cuda::DeviceChoice;

use super::GlobalArgs;

pub const EXAMPLES: &str = "\
Examples:
  starkv serve                                   # 127.0.0.1:8700, default model, ~/.local/share/starkv
  starkv serve --listen 127.0.0.1:9000 --device cpu
  starkv --data-dir /srv/starkv serve --device cuda:0 --store-budget-bytes 500000000000
  starkv serve --devices cuda:0,cuda:1            # one shard worker per GPU, this server coordinates
  starkv serve --config starkv.toml --listen 0.0.0.0:8700   # any non-loopback address needs [[api_keys]]";

#[derive(Args)]
pub struct ServeArgs {
    /// A TOML config file (see README: every `ServerConfig` field).
    #[arg(long, env = "STARKV_CONFIG")]
    config: Option<PathBuf>,
    /// Address and port to listen on (default 127.0.0.1:8700).
    #[arg(long, env = "STARKV_LISTEN")]
    listen: Option<SocketAddr>,
    /// RocksDB shards for a new store.
    #[arg(long, env = "STARKV_SHARDS")]
    shards: Option<usize>,
    /// Default block size for ingest.
    #[arg(long, env = "STARKV_BLOCK_SIZE")]
    block_size: Option<usize>,
    /// Store byte budget (eviction above it).
    #[arg(long, env = "STARKV_STORE_BUDGET_BYTES")]
    store_budget_bytes: Option<u64>,
    /// Where the model runs: auto (the GPU when CUDA loads, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, env = "STARKV_DEVICE")]
    device: Option<DeviceChoice>,
    /// Shard workers (`host:port`, comma-separated): this server becomes their
    /// coordinator.
    #[arg(long, env = "STARKV_WORKERS", value_delimiter = ',')]
    workers: Option<Vec<String>>,
    /// Local devices to run one in-process shard worker each on (`cuda:0,cuda:1`; `cpu`
    /// and a GPU may repeat). Default: every GPU when `--device auto` finds several.
    #[arg(long, env = "STARKV_DEVICES", value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// The secret the workers check (config key `cluster_secret`).
    #[arg(long, env = "STARKV_CLUSTER_SECRET")]
    cluster_secret: Option<String>,
    /// Copies of every block on distinct workers.
    #[arg(long, env = "STARKV_REPLICAS")]
    replicas: Option<usize>,
    /// Longest wait for a worker's per-layer answer, in milliseconds.
    #[arg(long, env = "STARKV_WORKER_TIMEOUT_MS")]
    worker_timeout_ms: Option<u64>,
    /// Microseconds a query polls a worker's socket before sleeping on it (0: never;
    /// default 2000 on hosts with 4+ hardware threads, else 0).
    #[arg(long, env = "STARKV_CLUSTER_SPIN_US")]
    cluster_spin_us: Option<u64>,
}

pub fn run(global: &GlobalArgs, args: ServeArgs) -> Result<ExitCode> {
    let mut config = ServerConfig::load(args.config.as_deref())?;
    if let Some(dir) = &global.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(model) = &global.model {
        config.model = Some(model.clone());
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(shards) = args.shards {
        config.shards = shards;
    }
    if let Some(b) = args.block_size {
        config.block_size = b;
    }
    if args.store_budget_bytes.is_some() {
        config.store_budget_bytes = args.store_budget_bytes;
    }
    if let Some(device) = args.device {
        config.device = device.to_string();
    }
    if let Some(workers) = args.workers {
        config.workers = workers.into_iter().filter(|w| !w.is_empty()).collect();
    }
    if let Some(devices) = args.devices {
        config.devices = devices.into_iter().filter(|d| !d.is_empty()).collect();
    }
    if args.cluster_secret.is_some() {
        config.cluster_secret = args.cluster_secret;
    }
    if let Some(r) = args.replicas {
        config.replicas = r;
    }
    if let Some(t) = args.worker_timeout_ms {
        config.worker_timeout_ms = t;
    }
    if args.cluster_spin_us.is_some() {
        config.cluster_spin_us = args.cluster_spin_us;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(starkv_api::serve(config, |addr| {
        // Scripts wait for this line (tests parse the port from it).
        println!("starkv listening on http://{addr}");
    }));
    // Dropping a runtime waits for every blocking task; after a shutdown the cancelled
    // ones end within a step, and none may hold the process for longer than this.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    served?;
    Ok(ExitCode::SUCCESS)
}
