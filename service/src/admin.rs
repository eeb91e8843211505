//! Operator actions on a store, shared by the admin HTTP API and `starkv` run against a
//! stopped server's data directory: eviction by rule, verification and repair.

use serde::{Deserialize, Serialize};
use starkv_cache::{BlockStore, EvictionPolicy};

use crate::{Service, ServiceError, ServiceResult};

/// Which documents to evict. Rules combine: a document goes when any rule selects it.
/// Pinned documents are never evicted by these rules (unpin first, or delete by id).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvictRequest {
    /// Evict least-recently-used documents until the store holds at most this many bytes.
    pub budget_bytes: Option<u64>,
    /// Evict this many least-recently-used documents.
    pub lru: Option<usize>,
    /// Evict documents not used for this many seconds.
    pub older_than_seconds: Option<u64>,
    /// Evict every document of this tenant.
    pub tenant: Option<String>,
}

impl EvictRequest {
    /// The documents the `tenant`, `older_than_seconds` and `lru` rules select among
    /// `docs` (`(last used ms, tenant, document)`, unpinned ones only), each with the
    /// first rule that selects it; `lru` counts in order of last use, oldest first.
    /// Shared by the store's eviction and a cluster coordinator's.
    pub fn select<D>(
        &self,
        docs: impl IntoIterator<Item = (u64, String, D)>,
        now_ms: u64,
    ) -> ServiceResult<Vec<(D, &'static str)>> {
        let older_than_ms = self
            .older_than_seconds
            .map(|s| crate::limits::seconds_to_ms("older_than_seconds", s))
            .transpose()?;
        let mut docs: Vec<_> = docs.into_iter().collect();
        docs.sort_by_key(|d| d.0);
        Ok(docs
            .into_iter()
            .enumerate()
            .filter_map(|(i, (used, tenant, doc))| {
                let rule = if self.tenant.as_deref() == Some(tenant.as_str()) {
                    "tenant"
                } else if older_than_ms.is_some_and(|age| now_ms.saturating_sub(used) >= age) {
                    "older_than"
                } else if self.lru.is_some_and(|n| i < n) {
                    "lru"
                } else {
                    return None;
                };
                Some((doc, rule))
            })
            .collect())
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct EvictOutcome {
    /// `tenant/id@version` of each evicted document, with the rule.
    pub evicted: Vec<(String, String)>,
    pub blocks_deleted: u64,
    pub bytes_freed: u64,
}

pub fn evict(store: &BlockStore, req: &EvictRequest, now_ms: u64) -> ServiceResult<EvictOutcome> {
    if req.budget_bytes.is_none()
        && req.lru.is_none()
        && req.older_than_seconds.is_none()
        && req.tenant.is_none()
    {
        return Err(ServiceError::Invalid(
            "give at least one rule: budget_bytes, lru, older_than_seconds or tenant".into(),
        ));
    }
    let mut out = EvictOutcome::default();
    let docs = store
        .list()
        .into_iter()
        .filter(|d| !d.state.pinned)
        .map(|d| (d.state.last_used_ms, d.tenant.clone(), d.doc));
    let chosen = req.select(docs, now_ms)?;
    for (doc, rule) in chosen {
        let report = store.delete_version(&doc)?;
        out.blocks_deleted += report.blocks_deleted;
        out.bytes_freed += report.bytes_freed;
        out.evicted.push((doc.to_string(), rule.into()));
    }
    if let Some(budget) = req.budget_bytes {
        let previous = store.eviction_policy();
        // Evict down to the budget itself: both watermarks at 100% of it.
        store.set_eviction_policy(EvictionPolicy {
            budget_bytes: Some(budget),
            high_watermark: 1.0,
            low_watermark: 1.0,
            ..previous.clone()
        });
        let report = store.run_eviction();
        store.set_eviction_policy(previous);
        let report = report?;
        out.blocks_deleted += report.blocks_deleted;
        out.bytes_freed += report.bytes_freed;
        out.evicted.extend(
            report
                .evicted
                .into_iter()
                .map(|(d, r)| (d.to_string(), format!("{r:?}"))),
        );
    }
    Ok(out)
}

/// What `verify` found and did. `corruption_found` is what the CLI turns into exit code 4.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyOutcome {
    /// Visible document versions checked.
    pub documents: usize,
    /// Versions with a damaged or missing block (`doc@version: error`).
    pub corrupt: Vec<String>,
    /// Blocks re-encoded from their document's source tokens (with repair).
    pub repaired_blocks: usize,
    /// Why a repair failed, when it did (the damage is still reported above).
    pub repair_error: Option<String>,
    /// Damaged or missing document rows, in the meta instance or their copies.
    pub meta_problems: Vec<String>,
    /// Document rows rewritten from their good copy (with repair).
    pub meta_repaired: usize,
    /// Versions whose manifest is lost in both copies: not served; delete or re-ingest.
    pub lost_documents: Vec<String>,
    /// What the store did to open or keep going since the previous verify (a repaired or
    /// quarantined instance, a released disk reserve).
    pub recoveries: Vec<String>,
    /// Blocks still marked for repair after this run.
    pub repair_pending: u64,
    /// Whether damage was found (blocks, rows, lost manifests, a repaired or quarantined
    /// instance), repaired or not.
    pub corruption_found: bool,
    /// In cluster mode, every worker's verify of its own store (damage on any worker sets
    /// `corruption_found`); absent on a single server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<crate::cluster::WorkerVerify>>,
}

/// `verify` as a running server does it: its own store, and in cluster mode every
/// worker's (all at once), with `repair` repairing wherever damage is found.
pub fn verify_service(service: &Service, repair: bool) -> ServiceResult<VerifyOutcome> {
    let mut out = verify(service.store(), repair.then_some(service))?;
    if let Some(cluster) = service.cluster() {
        let workers = cluster.verify_workers(repair);
        out.corruption_found |= workers.iter().any(|w| w.corruption_found);
        out.workers = Some(workers);
    }
    Ok(out)
}

/// Checks every document's rows (meta instance and copies) and reads every stored block;
/// with `service` (the model loaded), rewrites damaged rows from their good copy and
/// re-encodes every damaged or missing block from its document's source tokens.
pub fn verify(store: &BlockStore, service: Option<&Service>) -> ServiceResult<VerifyOutcome> {
    let mut out = VerifyOutcome::default();
    let meta = store.verify_meta(service.is_some())?;
    out.meta_problems = meta.problems;
    out.meta_repaired = meta.repaired;
    out.lost_documents = meta.lost;
    let damage_recovered = meta.recoveries.iter().any(|r| r.action.lost_data());
    out.recoveries = meta.recoveries.iter().map(ToString::to_string).collect();
    for d in store.list() {
        out.documents += 1;
        if let Err(e) = store.verify_version(&d.doc) {
            out.corrupt.push(format!("{}: {e}", d.doc));
        }
    }
    if let Some(service) = service {
        match service.repair_pending() {
            Ok(n) => out.repaired_blocks = n,
            Err(e) => out.repair_error = Some(e.to_string()),
        }
    }
    out.repair_pending = store.stats().repair_pending;
    out.corruption_found = !out.corrupt.is_empty()
        || !out.meta_problems.is_empty()
        || !out.lost_documents.is_empty()
        || damage_recovered;
    Ok(out)
}
