//! starkv's HTTP service: wires the model runtime (`starkv_compute`) to the block store
//! (`starkv_cache`) behind a REST API.
//!
//! The HTTP-free core (ingest, query, jobs, admin) lives in `starkv_service`; this crate
//! is the HTTP front end:
//! - [`http`]: routes, authentication, the JSON error shape, metrics, OpenAPI.
//!
//! Only this crate (and the binary) knows HTTP and JSON.

pub mod config;
pub mod http;

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusBuilder;
use starkv_cache::{BlockStore, EvictionPolicy, RocksConfig, StoreConfig};
use starkv_compute::LoadedModel;
use starkv_compute::backend::Backend;

pub use config::ServerConfig;

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("model: {0}")]
    Model(#[from] starkv_compute::Error),
    #[error("store: {0}")]
    Store(#[from] starkv_cache::Error),
    #[error("{0}")]
    Service(#[from] starkv_service::ServiceError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("metrics: {0}")]
    Metrics(String),
    /// The configured device cannot be used (e.g. `--device cuda:3` without that GPU).
    #[error("{0}")]
    Device(String),
}

/// The coordinator's cluster: the configured remote workers, or one in-process worker
/// per local device (`local_devices`), checked once before the server accepts requests.
fn open_cluster(
    config: &ServerConfig,
    model: &starkv_service::ModelFile,
    local_devices: &[starkv_compute::cuda::DeviceChoice],
) -> Result<Arc<starkv_service::cluster::Cluster>, StartError> {
    use starkv_service::cluster::{Cluster, ClusterConfig, LocalWorkersConfig};
    let cluster_config = ClusterConfig {
        workers: config.workers.clone(),
        secret: config.cluster_secret.clone().unwrap_or_default(),
        replicas: config.replicas,
        call_timeout: std::time::Duration::from_millis(config.worker_timeout_ms),
        encode_timeout: std::time::Duration::from_secs(config.worker_encode_timeout_secs),
        catalog_dir: config.data_dir.join("cluster"),
        spin: starkv_service::cluster::SpinBudget::resolve(config.cluster_spin_us),
    };
    let cluster = if config.workers.is_empty() {
        if config.replicas > local_devices.len() {
            return Err(config::ConfigError::Invalid(format!(
                "replicas must be in 1..={} (the number of local devices)",
                local_devices.len()
            ))
            .into());
        }
        let workers = starkv_service::cluster::open_local_workers(
            &LocalWorkersConfig {
                data_dir: config.data_dir.clone(),
                model: model.clone(),
                shards: config.shards,
                hot_tier_bytes: config.hot_tier_bytes,
                gpu_tier_bytes: config.gpu_tier_bytes,
            },
            local_devices,
        )?;
        Cluster::with_workers(&cluster_config, workers)?
    } else {
        Cluster::connect(&cluster_config, model.fingerprint())?
    };
    let cluster = Arc::new(cluster);
    cluster.check_health();
    Ok(cluster)
}

/// Loads the model onto the configured device (printing `starkv: device ...` on stderr),
/// opens the store, and serves until SIGINT/SIGTERM. `on_ready` is called with the bound
/// address once the server accepts connections.
pub async fn serve(
    config: ServerConfig,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), StartError> {
    config.validate()?;
    let device = config.device_choice()?;
    let metrics = PrometheusBuilder::new()
        .set_buckets(&[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ])
        .map_err(|e| StartError::Metrics(e.to_string()))?
        .install_recorder()
        .map_err(|e| StartError::Metrics(e.to_string()))?;
    let model_path = match &config.model {
        Some(p) => p.clone(),
        None => starkv_compute::fetch::ensure_default_model(&config.data_dir, &mut |m| {
            tracing::info!("{m}")
        })?,
    };
    let (model, backend, store) = {
        let (model_path, config) = (model_path.clone(), config.clone());
        tokio::task::spawn_blocking(move || -> Result<_, StartError> {
            let model = LoadedModel::open(&model_path)?;
            // Before the store opens: a device that cannot be used fails the start fast.
            let tier = config.gpu_tier_bytes.map(|b| b as usize);
            let backend = Backend::new(&model.model, device, tier).map_err(|e| match e {
                starkv_compute::Error::Device(m) => StartError::Device(m),
                other => StartError::Model(other),
            })?;
            // Operators (and scripts) read which device serves; logged whatever the level.
            eprintln!("starkv: device {}", backend.selected());
            let store_config = StoreConfig {
                hot_tier_bytes: config.hot_tier_bytes,
                min_free_disk_bytes: config.min_free_disk_bytes,
                eviction: EvictionPolicy {
                    budget_bytes: config.store_budget_bytes,
                    ..EvictionPolicy::default()
                },
                ..StoreConfig::default()
            };
            let store = BlockStore::open_rocks(
                RocksConfig::new(starkv_service::store_dir(&config.data_dir), config.shards),
                store_config,
            )?;
            Ok((model, backend, store))
        })
        .await
        .map_err(|e| StartError::Io(std::io::Error::other(e.to_string())))??
    };
    let mut service = starkv_service::Service::with_backend(
        model,
        backend,
        &model_path,
        store,
        config.hot_tier_bytes as usize,
    )?
    .with_dedup_scope(config.dedup_scope()?);
    let local_devices =
        starkv_service::cluster::local_devices(&config.local_device_choices()?, device);
    if !config.workers.is_empty() || !local_devices.is_empty() {
        let cluster = tokio::task::block_in_place(|| {
            open_cluster(&config, service.model_file(), &local_devices)
        })?;
        cluster.spawn_health_checks(std::time::Duration::from_secs(2));
        // Operators (and scripts) read which workers serve.
        for w in cluster.status() {
            eprintln!(
                "starkv: worker {} {}{}",
                w.address,
                if w.health.up { "up" } else { "down" },
                w.health
                    .device
                    .as_deref()
                    .map(|d| format!(" on {d}"))
                    .unwrap_or_default()
            );
        }
        service = service.with_cluster(cluster);
    }
    let service = Arc::new(service);
    let jobs = starkv_service::jobs::Jobs::start(
        service.clone(),
        &config.data_dir.join("ingest-spool"),
        config.ingest_queue,
    )?;
    let state = http::AppState::new(service, jobs, config.clone(), metrics);
    http::spawn_upkeep(&state);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    if config.api_keys.is_empty() {
        tracing::warn!(
            "no API keys configured: authentication is off and starkv listens on loopback only ({addr})"
        );
    }
    on_ready(addr);
    // On SIGTERM/SIGINT: stop accepting, cancel every running query (each stops within a
    // layer or a generation step), and give the connections `shutdown_grace_seconds` to
    // close before returning anyway. Ingests need no waiting: they are spooled and resume
    // at the next start, and documents are published atomically.
    let cancel = state.shutdown.clone();
    let (signalled, on_signal) = tokio::sync::oneshot::channel();
    let server = axum::serve(listener, http::router(state))
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            cancel.cancel();
            let _ = signalled.send(());
        })
        .into_future();
    let grace = std::time::Duration::from_secs(config.shutdown_grace_seconds);
    let deadline = async move {
        match on_signal.await {
            Ok(()) => tokio::time::sleep(grace).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        served = server => served?,
        () = deadline => tracing::warn!(
            grace_seconds = grace.as_secs(),
            "shutdown: connections still open after the grace period; exiting anyway"
        ),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!(
        "shutting down: no new requests; documents are published atomically, so none is half-visible"
    );
}
