//! `verify` across the cluster: every worker reads every block of its store (with
//! repair, re-encodes the damaged ones from the source tokens it keeps), all workers at
//! once, and the coordinator reports each worker's result next to its own.

use std::time::Instant;

use serde::Serialize;

use super::coordinator::Cluster;
use super::wire::{Reply, Request};

/// One worker's verify, as `POST /v1/admin/verify` reports it under `workers`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct WorkerVerify {
    pub address: String,
    /// Document versions (the worker's parts) checked.
    pub documents: u64,
    /// Parts with a damaged or missing block (`doc@version: error`).
    pub corrupt: Vec<String>,
    /// Blocks the worker re-encoded (with repair).
    pub repaired_blocks: u64,
    /// Damage found on this worker, repaired or not.
    pub corruption_found: bool,
    /// Why the worker's repair failed, when it did.
    pub repair_error: Option<String>,
    /// Why the worker could not be verified (down, timed out, failed); its counts are
    /// then zero and say nothing about its store.
    pub error: Option<String>,
}

impl Cluster {
    /// Runs verify (with `repair`, repair) on every worker at once, the ones marked down
    /// included (a call reconnects; one that fails is reported with its error).
    pub fn verify_workers(&self, repair: bool) -> Vec<WorkerVerify> {
        let sent: Vec<_> = (0..self.addresses.len())
            .map(|w| (w, Instant::now(), self.send(w, Request::Verify { repair })))
            .collect();
        sent.into_iter()
            .map(|(w, t0, pending)| {
                let address = self.addresses[w].clone();
                match self.finish(w, "verify", t0, pending, self.encode_timeout) {
                    Ok(Reply::Verified(v)) => WorkerVerify {
                        address,
                        documents: v.documents,
                        corrupt: v.corrupt,
                        repaired_blocks: v.repaired_blocks,
                        corruption_found: v.corruption_found,
                        repair_error: Some(v.repair_error).filter(|e| !e.is_empty()),
                        error: None,
                    },
                    Ok(other) => WorkerVerify {
                        address,
                        error: Some(format!("answered {other:?} to verify")),
                        ..WorkerVerify::default()
                    },
                    Err(e) => WorkerVerify {
                        address,
                        error: Some(e.to_string()),
                        ..WorkerVerify::default()
                    },
                }
            })
            .collect()
    }
}
