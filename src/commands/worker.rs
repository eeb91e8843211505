//! `starkv worker`: a shard worker. It owns one device and its own store, encodes the
//! blocks its coordinator places on it and answers per-layer partial attention over
//! them. It accepts only coordinators that know the cluster secret.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use starkv_compute::cuda::DeviceChoice;
use starkv_service::cluster::SpinBudget;
use starkv_service::cluster::server::serve_worker;
use starkv_service::cluster::worker::{WorkerConfig, WorkerNode};

use super::GlobalArgs;

#[derive(Args)]
pub struct WorkerArgs {
    /// Address and port to listen on for the coordinator.
    #[arg(long, env = "STARKV_WORKER_LISTEN", default_value = "127.0.0.1:8701")]
    listen: SocketAddr,
    /// The cluster secret (the coordinator's `cluster_secret`).
    #[arg(long, env = "STARKV_CLUSTER_SECRET")]
    secret: String,
    /// Where the model runs: auto, cpu, cuda, cuda:N.
    #[arg(long, env = "STARKV_DEVICE", default_value = "auto")]
    device: DeviceChoice,
    /// RocksDB shards for a new store.
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// Decoded blocks kept in memory, in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    hot_tier_bytes: u64,
    /// Byte budget of the GPU-resident block tier (default: half the free device memory).
    #[arg(long)]
    gpu_tier_bytes: Option<u64>,
    /// Microseconds a connection polls its socket for the next request before sleeping
    /// on it (0: never; default 2000 on hosts with 4+ hardware threads, else 0).
    #[arg(long, env = "STARKV_CLUSTER_SPIN_US")]
    spin_us: Option<u64>,
}

pub fn run(global: &GlobalArgs, args: WorkerArgs) -> Result<ExitCode> {
    if args.secret.is_empty() {
        bail!("--secret must not be empty: workers accept only coordinators that know it");
    }
    let config = WorkerConfig {
        data_dir: global.data_dir(),
        model_path: global.model_path()?,
        device: args.device,
        shards: args.shards,
        hot_tier_bytes: args.hot_tier_bytes,
        gpu_tier_bytes: args.gpu_tier_bytes,
    };
    let node = Arc::new(WorkerNode::open(&config).context("starting the worker")?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        // Scripts and tests wait for this line.
        println!("starkv worker listening on {}", listener.local_addr()?);
        let secret = Arc::new(args.secret.into_bytes());
        tokio::select! {
            () = serve_worker(listener, node, secret, SpinBudget::resolve(args.spin_us)) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
