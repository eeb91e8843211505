//! One in-process worker per local device: how `serve` uses every GPU of its host with
//! no remote workers, through the coordinator's code path (placement, catalog, per-layer
//! fan-out, recovery), only without sockets.
//!
//! Each local worker is a [`WorkerNode`] with its own store under
//! `DATA_DIR/local/<i>/`, named `local:<i>` in the catalog; the index, not the device,
//! names it, so a restart with the same device list finds every block where it was.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use starkv_compute::cuda::{DeviceChoice, Selected};

use super::handle::{InProcessWorker, Worker};
use super::worker::{WorkerConfig, WorkerNode};
use crate::{ModelFile, ServiceError, ServiceResult};

/// What every local worker shares.
#[derive(Debug, Clone)]
pub struct LocalWorkersConfig {
    pub data_dir: PathBuf,
    /// The server's model, shared by every worker (one copy of the weights in host
    /// memory; each device gets its own from its backend).
    pub model: ModelFile,
    /// RocksDB shards of each worker's new store.
    pub shards: usize,
    /// Host memory for decoded blocks, split evenly between the workers.
    pub hot_tier_bytes: u64,
    /// GPU-resident tier per device (`None`: half of the device's memory), split evenly
    /// between the workers sharing a device.
    pub gpu_tier_bytes: Option<u64>,
}

/// The devices `serve` runs local workers on: `configured` when it is not empty, else
/// every usable GPU when `device` is `auto` and the host has more than one (a single
/// device needs no workers: the server holds its blocks itself). Never an error: a
/// device listed in `configured` that cannot be used fails when its worker opens.
pub fn local_devices(configured: &[DeviceChoice], device: DeviceChoice) -> Vec<DeviceChoice> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    if device != DeviceChoice::Auto {
        return Vec::new();
    }
    let count = starkv_compute::cuda::probe().map_or(0, |d| d.len());
    let usable: Vec<DeviceChoice> = (0..count)
        .map(DeviceChoice::Cuda)
        .filter(|&d| {
            matches!(
                starkv_compute::cuda::select_device(d),
                Ok(Selected::Cuda { .. })
            )
        })
        .collect();
    if usable.len() > 1 { usable } else { Vec::new() }
}

/// Where local worker `index` keeps its store.
pub fn local_worker_dir(data_dir: &Path, index: usize) -> PathBuf {
    data_dir.join("local").join(index.to_string())
}

/// Opens one worker per entry of `devices` (the shared model onto each device), in
/// parallel.
pub fn open_local_workers(
    config: &LocalWorkersConfig,
    devices: &[DeviceChoice],
) -> ServiceResult<Vec<Box<dyn Worker>>> {
    if devices.is_empty() {
        return Err(ServiceError::Invalid(
            "no local devices to run workers on".into(),
        ));
    }
    let n = devices.len() as u64;
    let configs: Vec<WorkerConfig> = devices
        .iter()
        .enumerate()
        .map(|(i, &device)| {
            let sharing = devices.iter().filter(|&&d| d == device).count() as u64;
            WorkerConfig {
                data_dir: local_worker_dir(&config.data_dir, i),
                model_path: config.model.path().to_path_buf(),
                device,
                shards: config.shards,
                hot_tier_bytes: (config.hot_tier_bytes / n).max(1),
                gpu_tier_bytes: gpu_tier_share(config.gpu_tier_bytes, device, sharing),
            }
        })
        .collect();
    let opened: Vec<ServiceResult<WorkerNode>> = std::thread::scope(|s| {
        let handles: Vec<_> = configs
            .iter()
            .map(|c| s.spawn(move || WorkerNode::open_on(c, config.model.clone())))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ServiceError::Internal(
                        "opening a local worker panicked".into(),
                    ))
                })
            })
            .collect()
    });
    opened
        .into_iter()
        .enumerate()
        .map(|(i, node)| {
            let node = node.map_err(|e| {
                ServiceError::Internal(format!("local worker {i} ({}): {e}", devices[i]))
            })?;
            Ok(
                Box::new(InProcessWorker::new(format!("local:{i}"), Arc::new(node)))
                    as Box<dyn Worker>,
            )
        })
        .collect()
}

/// A worker's share of its device's GPU tier: the configured (or default) budget split
/// between the `sharing` workers on that device, so together they stay within it.
fn gpu_tier_share(configured: Option<u64>, device: DeviceChoice, sharing: u64) -> Option<u64> {
    if sharing <= 1 {
        return configured;
    }
    let per_device = configured.or_else(|| {
        let DeviceChoice::Cuda(n) = device else {
            return None;
        };
        let devices = starkv_compute::cuda::probe().ok()?;
        devices.get(n).map(|d| d.total_memory as u64 / 2)
    })?;
    Some(per_device / sharing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_devices_win_and_a_single_device_needs_no_workers() {
        let two = [DeviceChoice::Cpu, DeviceChoice::Cpu];
        assert_eq!(local_devices(&two, DeviceChoice::Auto), two.to_vec());
        assert!(local_devices(&[], DeviceChoice::Cpu).is_empty());
        assert!(local_devices(&[], DeviceChoice::Cuda(0)).is_empty());
    }

    #[test]
    fn workers_sharing_a_device_split_its_tier() {
        assert_eq!(
            gpu_tier_share(Some(1000), DeviceChoice::Cuda(0), 1),
            Some(1000)
        );
        assert_eq!(
            gpu_tier_share(Some(1000), DeviceChoice::Cuda(0), 4),
            Some(250)
        );
        assert_eq!(gpu_tier_share(None, DeviceChoice::Cpu, 2), None);
    }

    #[test]
    fn worker_dirs_are_named_by_index() {
        let d = local_worker_dir(Path::new("/data"), 3);
        assert_eq!(d, Path::new("/data/local/3"));
    }
}
