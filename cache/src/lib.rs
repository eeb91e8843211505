//! Persistent, sharded, content-addressed store of per-block KV tensors.
//!
//! This crate knows nothing about models, tokenizers or HTTP. It stores typed tensors
//! ([`Tensor`]: dtype + shape) grouped into blocks (one tensor per layer) under content
//! keys ([`BlockKey`]) that the caller derives from plain bytes and token ids
//! ([`BlockKeyInput`]), and documents ([`Manifest`]) that list blocks.
//!
//! # Invariants
//!
//! 1. **A manifest becomes visible only after all its blocks are durable.** Blocks are
//!    written to their shards first (each block's layers plus its index row in one
//!    atomic batch), every touched shard's WAL is fsynced, and only then is the manifest
//!    written to the meta instance in one synced batch ([`Ingest::commit`]). A crash at
//!    any point before that batch is durable leaves no visible document; the blocks it
//!    left are unreferenced and are deleted by [`BlockStore::gc`] (run at open).
//! 2. **A checksum mismatch is never returned as data.** Every value carries a header
//!    and a CRC-32 over header and payload (plus zstd's content checksum), verified on every read from the
//!    engine before anything is parsed. A failure is [`Error::Corrupt`] (or
//!    [`Error::MissingBlock`]), is counted (`starkv_cache_checksum_failures_total`) and
//!    marks the block for repair ([`BlockStore::repair_queue`]). Manifests, state rows
//!    and token rows are checksummed too. Repair (re-encoding from the stored source
//!    tokens with the model) belongs to the service; this crate provides the queue,
//!    [`BlockStore::source_tokens`] and [`BlockStore::repair_block`].
//! 3. **A document being read is never removed under the reader.** Readers hold a
//!    [`DocLease`]. Eviction skips leased versions; deleting a leased version hides it
//!    from new readers at once (its manifest is deleted durably) and frees its blocks
//!    when the last lease drops. A crash in between leaves only unreferenced blocks,
//!    which gc removes.
//! 4. **Blocks are deleted only after every manifest naming them is durably gone**, so
//!    a lost (unsynced) block delete can only resurrect an unreferenced block, never
//!    break a document.
//! 5. **Existence checks never keep things alive.** [`BlockStore::contains`],
//!    [`BlockStore::list`], [`BlockStore::doc_info`] and block dedup lookups do not touch
//!    "last used"; only [`BlockStore::open_doc`] / [`BlockStore::open_version`] do.
//!
//! 6. **A document's rows have two copies.** The manifest, state and source-token rows
//!    live in the meta instance and, as a spare, in one shard (`Space::Docs`, the shard
//!    chosen by the document id). Publish writes the copy (synced) before the meta rows;
//!    delete removes the copy (synced) before the meta rows. At open the two are
//!    reconciled (table in `load_index`): a damaged or missing meta row is restored from
//!    its copy, a missing copy is rewritten, and a version unreadable in both places is
//!    *lost*: never listed or served, reported by [`BlockStore::lost_documents`],
//!    [`BlockStore::stats`] and [`BlockStore::verify_meta`] until it is deleted or
//!    re-ingested.
//!
//! # Damage and a full disk
//!
//! - An engine instance RocksDB refuses to open (checksum mismatch, bad magic number,
//!   broken MANIFEST) is repaired with RocksDB's repair or quarantined (moved aside and
//!   reopened empty; see [`RocksEngine`]); the store opens anyway and every action is in
//!   [`StoreStats::recoveries`] and the log. Blocks lost that way are
//!   [`Error::MissingBlock`] on read, i.e. marked for repair; manifests lost that way are
//!   restored from their copies.
//! - A value RocksDB cannot read (a damaged table or blob file) is [`Error::Corrupt`]
//!   like a checksum failure, so it is repaired, not a permanent error.
//! - [`StoreConfig::min_free_disk_bytes`] refuses ingests ([`Error::DiskFull`]) before
//!   the disk is full; [`BlockStore::gc`] compacts so deletes give space back; the engine
//!   keeps a disk reserve file that it releases to open or write the deletes of a store
//!   that filled the disk anyway.
//!
//! # Durability (fsync semantics)
//!
//! | operation | durable when the call returns |
//! |---|---|
//! | [`Ingest::put_block`] | no (WAL write, not fsynced) |
//! | [`Ingest::commit`] | yes: shard WALs fsynced, then manifest batch with `sync` |
//! | delete / eviction | copy removal, then manifest removal, yes (`sync`); block deletes no (see 4.) |
//! | pin / TTL change | yes (`sync`) |
//! | last-used update on open | no (a crash makes the document look older) |
//! | repair mark | no (re-marked on the next failing read) |
//!
//! # Design choices and why
//!
//! - **Shards are separate RocksDB instances** (`shard-NNN/`), plus one `meta/`
//!   instance. Independent WALs, memtables and compactions per shard; shards can live
//!   on different disks; a block never needs a cross-shard batch (a block lives in one
//!   shard, chosen by its key). Only manifest publication needs ordering across
//!   instances, and the sync-then-publish protocol above provides it. Column families of
//!   one DB would give atomic cross-CF batches we do not need, at the price of one
//!   shared WAL and write path. See [`engine`] for the boundary.
//! - **One RocksDB value per (block, layer)**: key `block key | u16 BE layer`, so a
//!   reader streams layer by layer ([`DocLease::read_layer_all_blocks`]) and a block's
//!   layers are contiguous for writes and deletes.
//! - **BlobDB for layer values** (`enable_blob_files`, `min_blob_size` 4 KiB, blob
//!   compression off): values are 100 KiB-8 MiB; in plain SSTs every compaction
//!   rewrites them, with BlobDB they are written once and compaction moves 30-byte
//!   references. Measured with the `cache_store` bench (2-core machine shared with other
//!   builds, so +-30% noise): reads from BlobDB were as fast or faster than from plain
//!   SSTs in every run (1.2-1.4 GB/s vs 0.6-1.2 GB/s one thread, decoded f16), ingest
//!   and churn (ingest + delete with compactions running) were within noise of each
//!   other. Same or better reads plus no value rewriting in compaction: BlobDB.
//!   [`RocksConfig::blob_files`] switches it off for comparison.
//! - **Codec**: byte-shuffled zstd (level 1 by default) with a raw fallback when
//!   compression does not help; see [`codec`] for the layout and the bench for the
//!   shuffle-vs-plain numbers that chose the default.
//! - **Reference counts are derived, not stored**: they are rebuilt from the manifests
//!   at open, so they cannot drift after a crash, and publishing a manifest needs no
//!   read-modify-write of shared counters.
//! - **Hot tier**: a byte-bounded LRU of decoded layers ([`hot::HotTier`]) keyed by
//!   content key; entries can never be stale because blocks are immutable.
//! - **Eviction** ([`eviction`]): TTL (idle), per-tenant quotas, size watermarks with
//!   LRU, pin/unpin, delete by document, gc of unreferenced blocks. Automatic policies
//!   run after every publish (cheap) and on [`BlockStore::run_eviction`] (the service
//!   calls it periodically for TTL).
//! - **Engine boundary** ([`Engine`], after TiKV's `engine_traits`): no RocksDB type
//!   leaks out; [`MemEngine`] runs the same store logic in memory for fast tests.
//! - **Versions**: each publish of a document id creates version n+1 and, unless
//!   [`DocSpec::keep_previous_versions`], removes older versions in the same synced
//!   batch, so readers see either the old or the new document, never neither.
//!
//! # Metrics
//!
//! Emitted through the `metrics` facade; names in [`metrics`]. The same numbers are in
//! [`BlockStore::stats`].

#![warn(missing_docs)]

pub mod clock;
pub mod codec;
pub mod engine;
mod error;
pub mod eviction;
pub mod hot;
pub mod key;
pub mod manifest;
pub mod metrics;
mod store;
mod tensor;

pub use clock::{Clock, ManualClock, SystemClock};
pub use codec::CodecConfig;
pub use engine::{Engine, MemEngine, Recovery, RecoveryAction, RocksConfig, RocksEngine};
pub use error::{CodecError, Error, Result};
pub use eviction::{EvictReason, EvictionPolicy, EvictionReport, GcReport};
pub use hot::HotStats;
pub use key::{BlockKey, BlockKeyInput};
pub use manifest::{BlockRef, DocRef, DocState, Manifest, MergeOptions};
pub use store::{
    BlockStore, DocInfo, DocLease, DocSpec, Ingest, MetaCheck, RepairItem, StoreConfig, StoreStats,
};
pub use tensor::{DType, MAX_RANK, Tensor, TensorData};
