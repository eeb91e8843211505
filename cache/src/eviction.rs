//! Eviction policy settings and reports.
//!
//! The unit of eviction is a document version. Blocks are freed by reference counting
//! when no remaining manifest names them (and by garbage collection for blocks that no
//! manifest ever named, e.g. after a crashed ingest).
//!
//! Order of the automatic passes (each skips pinned documents and documents held by a
//! lease):
//! 1. TTL: idle documents whose `now - last_used >= ttl`.
//! 2. Tenant quotas: least-recently-used documents of a tenant over its quota until it
//!    fits. A tenant is charged the full stored size of each of its documents, even for
//!    blocks shared with other documents, so that its usage does not depend on what
//!    other tenants store.
//! 3. Size budget: when the logical store size exceeds `high_watermark * budget`, the
//!    globally least-recently-used documents until it is at most `low_watermark *
//!    budget`. The gap between the marks makes eviction run in batches instead of on
//!    every write.
//!
//! "Last use" is updated only when a reader opens a document (takes a lease); listing,
//! existence checks and block-dedup lookups never refresh it, so probing cannot keep a
//! document alive.

use std::collections::HashMap;

use crate::manifest::DocRef;

/// Why a document version was removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EvictReason {
    /// Idle longer than its TTL.
    Ttl,
    /// Least recently used while the store was over its high watermark.
    Lru,
    /// Least recently used of a tenant over its quota.
    Quota,
    /// Deleted on request.
    Deleted,
    /// Superseded by a newer version of the same document.
    Replaced,
}

impl EvictReason {
    /// Metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            EvictReason::Ttl => "ttl",
            EvictReason::Lru => "lru",
            EvictReason::Quota => "quota",
            EvictReason::Deleted => "deleted",
            EvictReason::Replaced => "replaced",
        }
    }

    pub(crate) const ALL: [EvictReason; 5] = [
        EvictReason::Ttl,
        EvictReason::Lru,
        EvictReason::Quota,
        EvictReason::Deleted,
        EvictReason::Replaced,
    ];

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Operator-controlled eviction settings.
#[derive(Clone, Debug, PartialEq)]
pub struct EvictionPolicy {
    /// Logical byte budget of the store (`None`: unbounded).
    pub budget_bytes: Option<u64>,
    /// Fraction of the budget above which LRU eviction starts.
    pub high_watermark: f64,
    /// Fraction of the budget LRU eviction brings the store down to.
    pub low_watermark: f64,
    /// Per-tenant byte quotas.
    pub tenant_quotas: HashMap<String, u64>,
    /// Quota for tenants not listed in `tenant_quotas` (`None`: unlimited).
    pub default_tenant_quota: Option<u64>,
}

impl Default for EvictionPolicy {
    fn default() -> Self {
        EvictionPolicy {
            budget_bytes: None,
            high_watermark: 0.90,
            low_watermark: 0.75,
            tenant_quotas: HashMap::new(),
            default_tenant_quota: None,
        }
    }
}

impl EvictionPolicy {
    /// The quota that applies to `tenant`.
    pub fn quota_for(&self, tenant: &str) -> Option<u64> {
        self.tenant_quotas
            .get(tenant)
            .copied()
            .or(self.default_tenant_quota)
    }

    pub(crate) fn high_bytes(&self) -> Option<u64> {
        self.budget_bytes
            .map(|b| (b as f64 * self.high_watermark.clamp(0.0, 1.0)) as u64)
    }

    pub(crate) fn low_bytes(&self) -> Option<u64> {
        let low = self
            .low_watermark
            .clamp(0.0, self.high_watermark.clamp(0.0, 1.0));
        self.budget_bytes.map(|b| (b as f64 * low) as u64)
    }
}

/// What one eviction run (or delete) removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EvictionReport {
    /// Document versions removed, with the reason.
    pub evicted: Vec<(DocRef, EvictReason)>,
    /// Blocks deleted from shards (refcount reached zero).
    pub blocks_deleted: u64,
    /// Stored bytes of those blocks.
    pub bytes_freed: u64,
    /// Versions removed from view but still held by a reader; their blocks are freed
    /// when the last lease drops.
    pub deferred: u64,
}

/// What a garbage-collection pass found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blocks found in the shard indexes.
    pub scanned: u64,
    /// Unreferenced blocks deleted.
    pub deleted: u64,
    /// Their stored bytes.
    pub bytes_freed: u64,
    /// Bytes the store took on disk before gc (0 when unknown).
    pub disk_bytes_before: u64,
    /// Bytes it takes after gc and the compaction that gives deleted keys' space back.
    pub disk_bytes_after: u64,
}
