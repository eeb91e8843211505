//! Stale parts: a worker that was down (or restarted) while its blocks moved elsewhere,
//! or while a document was deleted or re-ingested, still holds its old parts. When the
//! health check finds a worker up on a new connection (it came back, or this
//! coordinator just started), the coordinator lists the worker's documents and drops
//! every part whose document is not in the catalog or whose catalog entry places no
//! block on that worker any more.
//!
//! An encode in flight (an ingest, or a recovery re-encoding blocks) writes its parts
//! before the catalog entry naming them is published, so those documents are tracked
//! ([`Cluster::begin_encode`]) and never dropped; the decision and the drops happen
//! under the same lock an encode takes to register, so none can start in between.

use std::collections::{BTreeSet, HashMap};
use std::sync::{MutexGuard, PoisonError};
use std::time::Instant;

use super::coordinator::Cluster;
use super::handle::CallError;
use super::wire::{Reply, Request};

/// Documents with an encode in progress (how many of each).
pub(super) type InFlight = std::sync::Mutex<HashMap<String, usize>>;

/// While alive, `doc` has an encode in progress: its parts on workers are kept even
/// where the catalog does not name them yet.
pub(super) struct EncodeGuard<'a> {
    cluster: &'a Cluster,
    doc: String,
}

impl Drop for EncodeGuard<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.cluster.lock_in_flight();
        if let Some(n) = in_flight.get_mut(&self.doc) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&self.doc);
            }
        }
    }
}

/// What one reconciliation of a worker did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Stale parts dropped (document names).
    pub dropped: Vec<String>,
    pub blocks_deleted: u64,
    pub bytes_freed: u64,
}

impl Cluster {
    /// Registers an encode of `doc` (before its first `Encode` is sent); the guard ends
    /// it (after the catalog entry is published, or the encode failed).
    pub(super) fn begin_encode(&self, doc: &str) -> EncodeGuard<'_> {
        *self.lock_in_flight().entry(doc.to_string()).or_insert(0) += 1;
        EncodeGuard {
            cluster: self,
            doc: doc.to_string(),
        }
    }

    pub(super) fn lock_in_flight(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops every part worker `w` holds that the catalog no longer places on it.
    pub fn reconcile(&self, w: usize) -> Result<Reconciled, CallError> {
        let t0 = Instant::now();
        let pending = self.send(w, Request::List);
        let docs = match self.finish(w, "list", t0, pending, self.call_timeout)? {
            Reply::Listed { docs } => docs,
            other => {
                return Err(CallError::Protocol(format!("answered {other:?} to list")));
            }
        };
        let address = &self.addresses[w];
        // Held through the drops: no encode can register (and write a part) between
        // the decision and the drop.
        let in_flight = self.lock_in_flight();
        let stale: BTreeSet<String> = docs
            .into_iter()
            .map(|(doc, _)| doc)
            .filter(|doc| {
                !in_flight.contains_key(doc)
                    && !self.catalog.get(doc).is_some_and(|entry| {
                        entry.blocks.iter().any(|b| b.holders.contains(address))
                    })
            })
            .collect();
        let mut out = Reconciled::default();
        for doc in stale {
            let t0 = Instant::now();
            let pending = self.send(w, Request::Drop { doc: doc.clone() });
            match self.finish(w, "drop", t0, pending, self.call_timeout)? {
                Reply::Dropped {
                    blocks_deleted,
                    bytes_freed,
                } => {
                    out.blocks_deleted += blocks_deleted;
                    out.bytes_freed += bytes_freed;
                    out.dropped.push(doc);
                }
                other => {
                    return Err(CallError::Protocol(format!("answered {other:?} to drop")));
                }
            }
        }
        drop(in_flight);
        if !out.dropped.is_empty() {
            tracing::info!(
                worker = address,
                parts = out.dropped.len(),
                bytes_freed = out.bytes_freed,
                "dropped stale document parts"
            );
            metrics::counter!("starkv_cluster_stale_parts_dropped_total", "worker" => address.clone())
                .increment(out.dropped.len() as u64);
        }
        Ok(out)
    }
}
