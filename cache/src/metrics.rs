//! Metric names emitted through the `metrics` facade.
//!
//! The crate never installs a recorder: the binary (api) installs the Prometheus
//! exporter; tests use `metrics::with_local_recorder`. Labels are low-cardinality only
//! (eviction reason); document ids never become labels. The same numbers are available
//! without a recorder from [`crate::BlockStore::stats`].

/// Counter: encoded bytes written to shards.
pub const BYTES_WRITTEN: &str = "starkv_cache_bytes_written_total";
/// Counter: decoded (raw element) bytes of the blocks written.
pub const RAW_BYTES_WRITTEN: &str = "starkv_cache_raw_bytes_written_total";
/// Counter: blocks written (deduplicated blocks are not counted).
pub const BLOCKS_WRITTEN: &str = "starkv_cache_blocks_written_total";
/// Counter: blocks deduplicated at ingest (already stored).
pub const BLOCKS_DEDUPLICATED: &str = "starkv_cache_blocks_deduplicated_total";
/// Counter: encoded bytes read from shards (hot-tier hits excluded).
pub const BYTES_READ: &str = "starkv_cache_bytes_read_total";
/// Counter: decoded bytes returned to readers (hot-tier hits included).
pub const DECODED_BYTES_READ: &str = "starkv_cache_decoded_bytes_read_total";
/// Counter: layer values read from shards.
pub const LAYERS_READ: &str = "starkv_cache_layers_read_total";
/// Counter: hot-tier hits.
pub const HOT_HITS: &str = "starkv_cache_hot_hits_total";
/// Counter: hot-tier misses.
pub const HOT_MISSES: &str = "starkv_cache_hot_misses_total";
/// Gauge: bytes held by the hot tier.
pub const HOT_BYTES: &str = "starkv_cache_hot_bytes";
/// Counter: values that failed verification (checksum, header, decompression) or
/// blocks missing under a visible manifest.
pub const CHECKSUM_FAILURES: &str = "starkv_cache_checksum_failures_total";
/// Counter, label `reason` (`ttl`, `lru`, `quota`, `deleted`, `replaced`): document
/// versions removed.
pub const EVICTIONS: &str = "starkv_cache_evictions_total";
/// Counter: unreferenced blocks deleted by garbage collection.
pub const GC_BLOCKS: &str = "starkv_cache_gc_blocks_total";
/// Gauge: logical store size in bytes (unique stored blocks + metadata rows).
pub const STORE_BYTES: &str = "starkv_cache_store_bytes";
/// Gauge: unique stored blocks referenced by manifests.
pub const STORE_BLOCKS: &str = "starkv_cache_store_blocks";
/// Gauge: visible document versions.
pub const DOCUMENTS: &str = "starkv_cache_documents";
/// Gauge: blocks marked for repair.
pub const REPAIR_PENDING: &str = "starkv_cache_repair_pending";
