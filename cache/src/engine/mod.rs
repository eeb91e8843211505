//! The storage-engine boundary (modelled on TiKV's `engine_traits`).
//!
//! Everything above this module (codec, manifests, refcounts, eviction, leases) is
//! engine-agnostic and is tested against both implementations:
//! - [`RocksEngine`]: the product. N block shards, each its own RocksDB instance, plus
//!   one meta instance for manifests.
//! - [`MemEngine`]: an in-memory engine for fast tests of the logic above, and for other
//!   crates' tests that should not pay for RocksDB.
//!
//! No RocksDB type appears in this trait; all engines return [`crate::Error`].
//!
//! Semantics every engine must provide:
//! - A [`Batch`] applies atomically to one instance: after a crash either all of its
//!   operations are visible or none.
//! - Writes to one instance become visible to readers in the order they were issued.
//! - `sync: true` on [`Engine::write`] returns only once the batch and every earlier
//!   write to that instance are durable. [`Engine::sync`] makes every earlier write to an
//!   instance durable. Unsynced writes may be lost in a crash (never reordered).
//! - Different instances are independent: there is no ordering between them, which is
//!   why the store syncs every touched shard before it publishes a manifest.

mod mem;
mod rocks;

pub use mem::MemEngine;
pub use rocks::{RocksConfig, RocksEngine, free_disk_bytes};

use crate::error::Result;

/// Which instance a call addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The metadata instance (manifests, document state, repair marks, config).
    Meta,
    /// Block shard `i` (`0..shards()`).
    Shard(usize),
}

/// Key space inside an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    /// Meta rows (only in [`Target::Meta`]).
    Meta,
    /// Encoded block layers, key `block key | u16 BE layer` (only in shards). Large
    /// values; RocksDB keeps them in blob files or SSTs depending on configuration.
    Layers,
    /// One small row per stored block, key = block key (only in shards): lets garbage
    /// collection and accounting scan blocks without touching layer payloads.
    BlockIndex,
    /// Second copies of document rows (manifest, state, source tokens; only in shards):
    /// a document survives the loss or damage of its rows in the meta instance.
    Docs,
}

/// One operation of a batch.
#[derive(Clone, Debug)]
pub enum Op {
    /// Insert or overwrite.
    Put {
        /// Key space.
        space: Space,
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Delete one key.
    Delete {
        /// Key space.
        space: Space,
        /// Key.
        key: Vec<u8>,
    },
    /// Delete every key in `[start, end)`.
    DeleteRange {
        /// Key space.
        space: Space,
        /// First key deleted.
        start: Vec<u8>,
        /// First key kept.
        end: Vec<u8>,
    },
}

/// Operations applied atomically to one instance.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// The operations, applied in order.
    pub ops: Vec<Op>,
}

impl Batch {
    /// Adds a put.
    pub fn put(&mut self, space: Space, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::Put { space, key, value });
    }
    /// Adds a delete.
    pub fn delete(&mut self, space: Space, key: Vec<u8>) {
        self.ops.push(Op::Delete { space, key });
    }
    /// Adds a range delete.
    pub fn delete_range(&mut self, space: Space, start: Vec<u8>, end: Vec<u8>) {
        self.ops.push(Op::DeleteRange { space, start, end });
    }
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A storage engine: one meta instance and `shards()` block instances.
pub trait Engine: Send + Sync + 'static {
    /// Number of block shards.
    fn shards(&self) -> usize;

    /// Applies `batch` atomically to `target`; with `sync`, durably.
    fn write(&self, target: Target, batch: Batch, sync: bool) -> Result<()>;

    /// Makes every earlier write to `target` durable.
    fn sync(&self, target: Target) -> Result<()>;

    /// Looks up one key and hands the value (or `None`) to `f` without copying it
    /// out of the engine where the engine allows.
    fn get(
        &self,
        target: Target,
        space: Space,
        key: &[u8],
        f: &mut dyn FnMut(Option<&[u8]>),
    ) -> Result<()>;

    /// Calls `f` for every key starting with `prefix`, in key order, until it returns
    /// `false`.
    fn scan(
        &self,
        target: Target,
        space: Space,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()>;

    /// Writes memtables out to table/blob files and drops WAL files that are no longer
    /// needed. Not required for durability (synced WAL already is durable); used by
    /// operators before backups and by benchmarks to measure steady-state reads.
    fn flush(&self) -> Result<()>;

    /// Gives the space of deleted keys back to the filesystem: flushes and compacts the
    /// block shards (and rewrites partly dead blob files). Slow; operators' `gc` calls it.
    fn reclaim(&self) -> Result<()> {
        Ok(())
    }

    /// Approximate bytes on disk (or in memory) over all instances, for reporting.
    fn disk_usage(&self) -> Result<u64>;

    /// Free bytes on the filesystem holding the store (`None`: not on a filesystem).
    fn free_disk_bytes(&self) -> Option<u64> {
        None
    }

    /// True while the disk reserve is spent (the disk filled up) and not yet restored:
    /// the store then refuses ingests until deletes and [`Engine::reclaim`] give the
    /// space back.
    fn reserve_spent(&self) -> bool {
        false
    }

    /// What the engine did to keep going after damage or a full disk (repaired or
    /// quarantined instances, a released disk reserve), oldest first.
    fn recoveries(&self) -> Vec<Recovery> {
        Vec::new()
    }

    /// Engine name for logs and reports.
    fn name(&self) -> &'static str;
}

/// One recovery action of the engine (see [`Engine::recoveries`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The instance.
    pub target: Target,
    /// What was done.
    pub action: RecoveryAction,
    /// The error that caused it.
    pub cause: String,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
}

/// What the engine did to an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecoveryAction {
    /// Rebuilt by RocksDB's repair; keys in unreadable tables are lost.
    Repaired,
    /// Moved aside (kept for inspection) and reopened empty: every key is lost.
    Quarantined {
        /// Where the damaged files are now.
        moved_to: String,
    },
    /// The disk was full: the disk reserve file was deleted to make room.
    ReserveReleased {
        /// Bytes given back.
        bytes: u64,
    },
}

impl RecoveryAction {
    /// Whether keys of the instance may have been lost.
    pub fn lost_data(&self) -> bool {
        !matches!(self, RecoveryAction::ReserveReleased { .. })
    }
}

impl std::fmt::Display for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.target {
            Target::Meta => "meta".to_string(),
            Target::Shard(i) => format!("shard {i}"),
        };
        match &self.action {
            RecoveryAction::Repaired => write!(f, "{what}: repaired by RocksDB repair"),
            RecoveryAction::Quarantined { moved_to } => {
                write!(f, "{what}: quarantined to {moved_to} and reopened empty")
            }
            RecoveryAction::ReserveReleased { bytes } => {
                write!(
                    f,
                    "{what}: disk full, released the {bytes}-byte disk reserve"
                )
            }
        }?;
        write!(f, " (cause: {})", self.cause)
    }
}

/// Key of one layer of a block in [`Space::Layers`]: `block key | u16 BE layer`.
pub fn layer_key(key: &crate::key::BlockKey, layer: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(34);
    k.extend_from_slice(&key.0);
    k.extend_from_slice(&layer.to_be_bytes());
    k
}

/// Convenience: copy a value out.
pub(crate) fn get_vec(
    e: &dyn Engine,
    target: Target,
    space: Space,
    key: &[u8],
) -> Result<Option<Vec<u8>>> {
    let mut out = None;
    e.get(target, space, key, &mut |v| out = v.map(<[u8]>::to_vec))?;
    Ok(out)
}
