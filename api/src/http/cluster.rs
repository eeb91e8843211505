//! The cluster as operators and clients see it: `GET /v1/admin/cluster` (workers, health,
//! blocks, bytes) and the cluster side of the document endpoints (where each block
//! lives, listing, deletion), used when this server coordinates shard workers.

use axum::Json;
use axum::extract::{Extension, State};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::auth::Principal;
use super::error::ApiError;
use super::{AppState, blocking};
use crate::config::Role;
use starkv_service::cluster::{Cluster, DocEntry};

/// `GET /v1/admin/cluster`.
pub async fn status(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<impl IntoResponse, ApiError> {
    principal.require(Role::Admin)?;
    let Some(cluster) = state.service.cluster().cloned() else {
        return Ok(Json(json!({
            "mode": "single",
            "device": state.service.backend().device_id(),
            "workers": [],
        })));
    };
    let workers = blocking(move || Ok(cluster_json(&cluster))).await?;
    Ok(Json(workers))
}

fn cluster_json(cluster: &Cluster) -> Value {
    let workers: Vec<Value> = cluster
        .status()
        .into_iter()
        .map(|w| {
            json!({
                "address": w.address,
                "healthy": w.health.up,
                "device": w.health.device,
                "documents": w.health.documents,
                "blocks": w.health.blocks,
                "stored_bytes": w.health.stored_bytes,
                "placed_blocks": w.placed_blocks,
                "calls": w.health.calls,
                "failures": w.health.failures,
                "last_error": w.health.last_error,
                "last_seen_ms": w.health.last_seen_ms,
                "stale_parts_dropped": w.health.stale_parts_dropped,
                "bytes_sent": w.bytes_sent,
                "bytes_received": w.bytes_received,
                "attend": {
                    "calls": w.attend.calls,
                    "mean_round_trip_us": w.attend.mean(w.attend.round_trip_us),
                    "mean_worker_queued_us": w.attend.mean(w.attend.worker_queued_us),
                    "mean_worker_compute_us": w.attend.mean(w.attend.worker_compute_us),
                },
            })
        })
        .collect();
    json!({
        "mode": "coordinator",
        "replicas": cluster.replicas(),
        "workers": workers,
    })
}

/// The workers' stores summed (from the last health checks), for `GET /v1/admin/stats`:
/// what the cluster holds beyond the coordinator's own store.
pub fn totals_json(cluster: &Cluster) -> Value {
    let workers = cluster.status();
    let sum = |f: fn(&starkv_service::cluster::WorkerStatus) -> u64| -> u64 {
        workers.iter().map(f).sum()
    };
    json!({
        "workers": workers.len(),
        "healthy_workers": workers.iter().filter(|w| w.health.up).count(),
        "documents": sum(|w| w.health.documents),
        "blocks": sum(|w| w.health.blocks),
        "stored_bytes": sum(|w| w.health.stored_bytes),
        "placed_blocks": sum(|w| w.placed_blocks as u64),
    })
}

/// A cluster document as `GET /v1/documents/{id}` shows it, with `placement`: every
/// block's token range and the workers holding it.
pub fn document_json(id: &str, entry: &DocEntry, last_used_ms: u64) -> Value {
    let placement: Vec<Value> = entry
        .blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            json!({
                "block": i,
                "start": b.start,
                "tokens": b.len,
                "workers": b.holders,
            })
        })
        .collect();
    let mut view = json!({
        "id": id,
        "state": "ready",
        "version": entry.version,
        "blocks": entry.blocks.len(),
        "tokens": entry.tokens.len(),
        "block_size": entry.block_size,
        "anchor_size": entry.anchor_size,
        "created_ms": entry.created_ms,
        "last_used_ms": last_used_ms,
        "pinned": entry.pinned,
        "ttl_ms": entry.ttl_ms,
        "placement": placement,
    });
    // Entries written before the stored type was recorded do not say it.
    if let Some(dtype) = entry.dtype.and_then(starkv_cache::DType::from_code) {
        view["kv_dtype"] = json!(starkv_service::KvDtype::of_stored(dtype).name());
        view["stored_dtype"] = json!(dtype.name());
    }
    view
}
