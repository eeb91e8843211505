//! A cluster document's life after ingest, as operators and clients drive it: pin,
//! TTL, rule-based eviction and TTL expiry. The coordinator's catalog is the truth
//! (pinned and TTL live in each entry); removing a document drops its parts on every
//! worker holding them, so the workers' stores shrink with the catalog.

use crate::admin::{EvictOutcome, EvictRequest};
use crate::jobs::now_ms;
use crate::{ServiceError, ServiceResult};

use super::catalog::DocEntry;
use super::coordinator::Cluster;

/// Why a document was removed by expiry, as eviction reports show it.
const RULE_TTL: &str = "ttl";

impl Cluster {
    /// Pins (never evicted by a rule or a TTL) or unpins `doc` of `tenant`.
    pub fn set_pinned(&self, doc: &str, tenant: &str, pinned: bool) -> ServiceResult<()> {
        self.update(doc, tenant, |e| e.pinned = pinned)
    }

    /// Sets (or with `None` removes) `doc`'s idle time to live.
    pub fn set_ttl(&self, doc: &str, tenant: &str, ttl_ms: Option<u64>) -> ServiceResult<()> {
        self.update(doc, tenant, |e| e.ttl_ms = ttl_ms)
    }

    /// Records a use of `doc` (its idle time starts again).
    pub(crate) fn touch(&self, doc: &str) {
        self.lock_last_used().insert(doc.to_string(), now_ms());
    }

    /// When `entry` was last used: its last query since this coordinator started, else
    /// the later of its creation and the start (so a restart never expires it early).
    pub fn last_used_ms(&self, entry: &DocEntry) -> u64 {
        self.lock_last_used()
            .get(&entry.doc)
            .copied()
            .unwrap_or(entry.created_ms.max(self.opened_ms))
    }

    /// Removes the documents `req`'s rules select (any rule; pinned ones never), oldest
    /// use first, and drops their parts on the workers. `budget_bytes` needs per-document
    /// sizes the coordinator does not keep: it is refused here.
    pub fn evict(&self, req: &EvictRequest, now_ms: u64) -> ServiceResult<EvictOutcome> {
        if req.budget_bytes.is_some() {
            return Err(ServiceError::Invalid(
                "budget_bytes is not supported by a cluster coordinator: use lru, older_than_seconds or tenant".into(),
            ));
        }
        if req.lru.is_none() && req.older_than_seconds.is_none() && req.tenant.is_none() {
            return Err(ServiceError::Invalid(
                "give at least one rule: lru, older_than_seconds or tenant".into(),
            ));
        }
        // Ties in last use go by name, so a run is repeatable.
        let mut docs: Vec<_> = self
            .catalog
            .list()
            .into_iter()
            .filter(|d| !d.pinned)
            .collect();
        docs.sort_by(|a, b| a.doc.cmp(&b.doc));
        let docs = docs
            .into_iter()
            .map(|d| (self.last_used_ms(&d), d.tenant.clone(), d));
        let chosen = req.select(docs, now_ms)?;
        let mut out = EvictOutcome::default();
        for (entry, rule) in chosen {
            self.remove(&entry, rule, &mut out)?;
        }
        Ok(out)
    }

    /// Removes every unpinned document idle for longer than its TTL (the periodic
    /// upkeep calls this).
    pub fn expire(&self, now_ms: u64) -> ServiceResult<EvictOutcome> {
        let mut out = EvictOutcome::default();
        for entry in self.catalog.list() {
            let idle = now_ms.saturating_sub(self.last_used_ms(&entry));
            if !entry.pinned && entry.ttl_ms.is_some_and(|ttl| idle >= ttl) {
                self.remove(&entry, RULE_TTL, &mut out)?;
            }
        }
        Ok(out)
    }

    /// Removes `entry` from the catalog (unless a newer version replaced it meanwhile)
    /// and drops its parts on the workers.
    fn remove(&self, entry: &DocEntry, rule: &str, out: &mut EvictOutcome) -> ServiceResult<()> {
        let _guard = self.lock_placement();
        let current = self.catalog.get(&entry.doc);
        if current.as_ref().is_none_or(|c| c.version != entry.version) {
            return Ok(());
        }
        self.catalog
            .remove(&entry.doc)
            .map_err(|e| ServiceError::Internal(format!("cluster catalog: {e}")))?;
        self.lock_last_used().remove(&entry.doc);
        let (blocks, bytes) = self.drop_parts(entry, &[]);
        out.blocks_deleted += blocks;
        out.bytes_freed += bytes;
        out.evicted
            .push((format!("{}@{}", entry.doc, entry.version), rule.to_string()));
        metrics::counter!("starkv_cluster_documents_removed_total", "rule" => rule.to_string())
            .increment(1);
        tracing::info!(doc = entry.doc, rule, "cluster document removed");
        Ok(())
    }

    /// Rewrites `doc`'s catalog entry with `change` applied (durably, under the
    /// placement lock so an ingest or a recovery cannot interleave).
    fn update(
        &self,
        doc: &str,
        tenant: &str,
        change: impl FnOnce(&mut DocEntry),
    ) -> ServiceResult<()> {
        let _guard = self.lock_placement();
        let current = self
            .document(doc, tenant)
            .ok_or_else(|| ServiceError::NotFound(format!("document {doc} not found")))?;
        let mut entry = (*current).clone();
        change(&mut entry);
        self.catalog
            .publish(entry)
            .map_err(|e| ServiceError::Internal(format!("cluster catalog: {e}")))?;
        Ok(())
    }

    pub(super) fn lock_last_used(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u64>> {
        self.last_used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
