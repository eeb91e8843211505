//! [`BlockStore`]: documents, blocks, leases, eviction and repair over an [`Engine`].
//!
//! All bookkeeping (which documents are visible, block reference counts, leases, sizes)
//! lives in one in-memory [`Index`] behind one mutex, rebuilt at open from the manifests
//! (the source of truth). Reference counts are therefore never stored and can never
//! drift from the manifests after a crash. Layer reads do not take that mutex: a lease
//! pins its manifest (and through it the blocks), so readers only touch the engine and
//! the hot tier.

mod read_into;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::clock::{Clock, SystemClock};
use crate::codec::{self, CodecConfig};
use crate::engine::{Batch, Engine, MemEngine, RocksConfig, RocksEngine, Space, Target, layer_key};
use crate::error::{CodecError, Error, Result};
use crate::eviction::{EvictReason, EvictionPolicy, EvictionReport, GcReport};
use crate::hot::{HotStats, HotTier};
use crate::key::{BlockKey, BlockKeyInput};
use crate::manifest::{
    self, BlockRef, DocRef, DocState, MAX_NAME_LEN, Manifest, doc_row_key, parse_doc_row_key,
};
use crate::metrics as m;
use crate::tensor::{DType, Tensor};

const TAG_MANIFEST: u8 = b'm';
const TAG_STATE: u8 = b's';
const TAG_TOKENS: u8 = b't';
const TAG_REPAIR: u8 = b'r';
const CONFIG_KEY: &[u8] = b"c/config";

/// Store settings (the engine has its own, e.g. [`RocksConfig`]).
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Codec for writes.
    pub codec: CodecConfig,
    /// Hot-tier budget in decoded bytes (0 disables the hot tier).
    pub hot_tier_bytes: u64,
    /// Eviction settings.
    pub eviction: EvictionPolicy,
    /// Collect unreferenced blocks when the store opens (leftovers of crashed ingests).
    pub gc_on_open: bool,
    /// Threads used to encode the layers of one block (1 = inline).
    pub encode_threads: usize,
    /// Refuse ingests ([`Error::DiskFull`]) while the filesystem holding the store has
    /// less free space than this (0: no floor). Checked when an ingest starts and before
    /// every block it writes, so a large ingest stops before the disk is full.
    pub min_free_disk_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            codec: CodecConfig::default(),
            hot_tier_bytes: 1 << 30,
            eviction: EvictionPolicy::default(),
            gc_on_open: true,
            encode_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            min_free_disk_bytes: 0,
        }
    }
}

/// Describes a document being ingested.
#[derive(Clone, Debug)]
pub struct DocSpec {
    /// Caller-chosen document id (1..=1024 bytes).
    pub doc: String,
    /// Owning tenant (0..=1024 bytes).
    pub tenant: String,
    /// Opaque model fingerprint (part of every block key).
    pub model_fingerprint: Vec<u8>,
    /// Opaque tokenizer fingerprint (recorded for repair and validation).
    pub tokenizer_fingerprint: Vec<u8>,
    /// Caller's KV layout version (part of every block key).
    pub kv_layout_version: u32,
    /// Element type of every layer.
    pub dtype: DType,
    /// Block size `b`.
    pub block_size: u32,
    /// Anchor size `a`.
    pub anchor_size: u32,
    /// How the blocks merge at query time (recorded in the manifest; no part of any
    /// block key: the KV does not depend on it).
    pub merge: crate::manifest::MergeOptions,
    /// Re-encoded fraction in millionths (recorded in the manifest; the caller folds it
    /// into the block keys, since the KV depends on it).
    pub reencode_ppm: u32,
    /// Tokens of lead before each block (recorded in the manifest; the caller folds the
    /// lead's tokens into the block keys, since the KV depends on them).
    pub block_overlap: u32,
    /// The document's token ids (kept so blocks can be re-encoded for repair).
    pub source_tokens: Vec<u32>,
    /// Exempt from automatic eviction.
    pub pinned: bool,
    /// Idle time-to-live in milliseconds.
    pub ttl_ms: Option<u64>,
    /// Keep older versions of the same document visible. By default a publish replaces
    /// them atomically (same synced meta batch).
    pub keep_previous_versions: bool,
}

impl DocSpec {
    /// A spec with f16 storage, `a = b`, and empty fingerprints and tokens.
    pub fn new(doc: impl Into<String>, tenant: impl Into<String>) -> Self {
        DocSpec {
            doc: doc.into(),
            tenant: tenant.into(),
            model_fingerprint: Vec::new(),
            tokenizer_fingerprint: Vec::new(),
            kv_layout_version: 1,
            dtype: DType::F16,
            block_size: 2048,
            anchor_size: 2048,
            merge: Default::default(),
            reencode_ppm: 0,
            block_overlap: 0,
            source_tokens: Vec::new(),
            pinned: false,
            ttl_ms: None,
            keep_previous_versions: false,
        }
    }
}

/// A visible document version as listed (never refreshes last use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocInfo {
    /// Which version.
    pub doc: DocRef,
    /// Tenant.
    pub tenant: String,
    /// Number of blocks.
    pub blocks: usize,
    /// Stored element type of its KV.
    pub dtype: DType,
    /// Stored bytes of its blocks (shared blocks counted in full).
    pub stored_bytes: u64,
    /// Decoded bytes of its blocks.
    pub raw_bytes: u64,
    /// Publish time.
    pub created_ms: u64,
    /// Mutable state.
    pub state: DocState,
    /// Readers currently holding it.
    pub leases: u32,
}

/// A block marked for repair, with the documents that reference it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepairItem {
    /// The damaged block.
    pub block: BlockKey,
    /// Visible documents referencing it, with the block's position in each.
    pub docs: Vec<(DocRef, BlockRef)>,
}

/// Store-wide counters and sizes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Visible document versions.
    pub documents: u64,
    /// Unique blocks referenced by manifests (visible or leased-and-deleted).
    pub blocks: u64,
    /// Logical size: unique block bytes plus metadata rows.
    pub store_bytes: u64,
    /// Encoded bytes written to shards.
    pub bytes_written: u64,
    /// Decoded bytes of blocks written.
    pub raw_bytes_written: u64,
    /// Blocks written.
    pub blocks_written: u64,
    /// Blocks deduplicated at ingest.
    pub blocks_deduplicated: u64,
    /// Encoded bytes read from shards.
    pub bytes_read: u64,
    /// Decoded bytes handed to readers.
    pub decoded_bytes_read: u64,
    /// Layer values read from shards.
    pub layers_read: u64,
    /// Verification failures (checksum, header, decompression, missing block).
    pub checksum_failures: u64,
    /// Versions removed, by reason (`ttl`, `lru`, `quota`, `deleted`, `replaced`).
    pub evictions: Vec<(&'static str, u64)>,
    /// Blocks deleted by garbage collection.
    pub gc_blocks: u64,
    /// Blocks marked for repair.
    pub repair_pending: u64,
    /// Document versions whose manifest is unreadable in the meta instance and in its
    /// copy: not served, reported until re-ingested or deleted.
    pub lost_documents: u64,
    /// Manifests restored at open from their copy in a shard (the meta row was damaged
    /// or missing).
    pub restored_manifests: u64,
    /// What the engine did to keep going (repaired or quarantined instances, a released
    /// disk reserve), one line each.
    pub recoveries: Vec<String>,
    /// Hot tier.
    pub hot: HotStats,
}

/// What [`BlockStore::verify_meta`] found in the document rows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetaCheck {
    /// Visible versions checked.
    pub checked: usize,
    /// One line per damaged or missing row (meta or copy).
    pub problems: Vec<String>,
    /// Rows rewritten from their good copy (with `repair`).
    pub repaired: usize,
    /// Versions whose manifest is lost (`doc@version: why`).
    pub lost: Vec<String>,
    /// Engine recoveries not reported by an earlier check.
    pub recoveries: Vec<crate::engine::Recovery>,
}

#[derive(Default)]
struct Counters {
    bytes_written: AtomicU64,
    raw_bytes_written: AtomicU64,
    blocks_written: AtomicU64,
    blocks_dedup: AtomicU64,
    bytes_read: AtomicU64,
    decoded_bytes_read: AtomicU64,
    layers_read: AtomicU64,
    checksum_failures: AtomicU64,
    evictions: [AtomicU64; 5],
    gc_blocks: AtomicU64,
}

fn bump(c: &AtomicU64, name: &'static str, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
    metrics::counter!(name).increment(n);
}

struct DocEntry {
    manifest: Arc<Manifest>,
    state: DocState,
    leases: u32,
    meta_bytes: u64,
}

impl DocEntry {
    fn charge(&self) -> u64 {
        self.manifest.stored_bytes() + self.meta_bytes
    }
    fn evictable(&self) -> bool {
        !self.state.pinned && self.leases == 0
    }
    fn expired(&self, now: u64) -> bool {
        !self.state.pinned
            && self
                .state
                .ttl_ms
                .is_some_and(|ttl| now.saturating_sub(self.state.last_used_ms) >= ttl)
    }
}

struct BlockEntry {
    refs: u32,
    stored_bytes: u64,
    raw_bytes: u64,
    layers: u16,
}

#[derive(Default)]
struct Index {
    docs: BTreeMap<DocRef, DocEntry>,
    /// Removed from view (manifest deleted durably) but still leased.
    doomed: HashMap<DocRef, DocEntry>,
    blocks: HashMap<BlockKey, BlockEntry>,
    /// Blocks an unfinished ingest has written or referenced: never collected.
    pending: HashMap<BlockKey, u32>,
    next_version: HashMap<String, u64>,
    repair: BTreeSet<BlockKey>,
    /// Versions whose manifest could not be read from meta nor from its copy.
    lost: BTreeMap<DocRef, String>,
    restored: u64,
    store_bytes: u64,
    tenant_bytes: HashMap<String, u64>,
    policy: EvictionPolicy,
}

impl Index {
    fn add_doc(&mut self, e: DocEntry) {
        for b in &e.manifest.blocks {
            let be = self.blocks.entry(b.key).or_insert(BlockEntry {
                refs: 0,
                stored_bytes: b.stored_bytes,
                raw_bytes: b.raw_bytes,
                layers: b.layers,
            });
            be.refs += 1;
            if be.refs == 1 {
                self.store_bytes += b.stored_bytes;
            }
        }
        self.store_bytes += e.meta_bytes;
        *self
            .tenant_bytes
            .entry(e.manifest.tenant.clone())
            .or_default() += e.charge();
        let nv = self
            .next_version
            .entry(e.manifest.doc.doc.clone())
            .or_insert(1);
        *nv = (*nv).max(e.manifest.doc.version + 1);
        self.docs.insert(e.manifest.doc.clone(), e);
    }

    /// Drops a removed document's references; returns blocks that can be deleted now.
    fn release(&mut self, e: &DocEntry) -> Vec<(BlockKey, u16, u64)> {
        let mut free = Vec::new();
        for b in &e.manifest.blocks {
            if let Some(be) = self.blocks.get_mut(&b.key) {
                be.refs -= 1;
                if be.refs == 0 {
                    let be = self.blocks.remove(&b.key).expect("present");
                    self.store_bytes -= be.stored_bytes;
                    if !self.pending.contains_key(&b.key) {
                        free.push((b.key, be.layers, be.stored_bytes));
                    }
                }
            }
        }
        self.store_bytes -= e.meta_bytes;
        if let Some(t) = self.tenant_bytes.get_mut(&e.manifest.tenant) {
            *t = t.saturating_sub(e.charge());
            if *t == 0 {
                self.tenant_bytes.remove(&e.manifest.tenant);
            }
        }
        free
    }

    fn entry_mut(&mut self, doc: &DocRef) -> Option<&mut DocEntry> {
        if self.docs.contains_key(doc) {
            self.docs.get_mut(doc)
        } else {
            self.doomed.get_mut(doc)
        }
    }

    fn latest(&self, doc: &str) -> Option<&DocRef> {
        let lo = DocRef {
            doc: doc.to_string(),
            version: 0,
        };
        let hi = DocRef {
            doc: doc.to_string(),
            version: u64::MAX,
        };
        self.docs.range(lo..=hi).next_back().map(|(k, _)| k)
    }

    fn versions(&self, doc: &str) -> Vec<DocRef> {
        let lo = DocRef {
            doc: doc.to_string(),
            version: 0,
        };
        let hi = DocRef {
            doc: doc.to_string(),
            version: u64::MAX,
        };
        self.docs.range(lo..=hi).map(|(k, _)| k.clone()).collect()
    }
}

struct Inner {
    engine: Box<dyn Engine>,
    cfg: StoreConfig,
    clock: Arc<dyn Clock>,
    hot: HotTier,
    idx: Mutex<Index>,
    ctr: Counters,
    /// Engine recoveries already returned by [`BlockStore::verify_meta`].
    recoveries_reported: AtomicUsize,
}

/// The persistent, sharded, content-addressed KV block store. Cheap to clone (shared).
///
/// Invariants (see the crate docs for the reasoning):
/// - A manifest becomes visible only after all its blocks are durable.
/// - A checksum mismatch is never returned as data: it is [`Error::Corrupt`], counted,
///   and the block is marked for repair.
/// - A document held by a [`DocLease`] is never removed from under it: deletion and
///   eviction hide it from new readers and free its blocks when the last lease drops.
#[derive(Clone)]
pub struct BlockStore {
    inner: Arc<Inner>,
}

fn index_row(layers: u16, stored: u64, raw: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(18);
    v.extend_from_slice(&layers.to_le_bytes());
    v.extend_from_slice(&stored.to_le_bytes());
    v.extend_from_slice(&raw.to_le_bytes());
    v
}

fn parse_index_row(v: &[u8]) -> Option<(u16, u64, u64)> {
    if v.len() != 18 {
        return None;
    }
    Some((
        u16::from_le_bytes(v[0..2].try_into().ok()?),
        u64::from_le_bytes(v[2..10].try_into().ok()?),
        u64::from_le_bytes(v[10..18].try_into().ok()?),
    ))
}

fn repair_key(key: &BlockKey) -> Vec<u8> {
    let mut k = vec![TAG_REPAIR];
    k.extend_from_slice(&key.0);
    k
}

fn tokens_row_len(n: u64) -> u64 {
    6 + 8 + 4 * n + 16
}

fn validate_name(what: &str, s: &str, allow_empty: bool) -> Result<()> {
    if (!allow_empty && s.is_empty()) || s.len() > MAX_NAME_LEN {
        return Err(Error::InvalidArgument(format!(
            "{what} must be {}..={MAX_NAME_LEN} bytes",
            if allow_empty { 0 } else { 1 }
        )));
    }
    Ok(())
}

impl BlockStore {
    /// Opens a store over any engine, rebuilding the index from the manifests.
    pub fn open(engine: Box<dyn Engine>, cfg: StoreConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        let shards = engine.shards();
        match manifest_config(engine.as_ref())? {
            Some(n) if n != shards as u64 => {
                return Err(Error::ConfigMismatch(format!(
                    "store has {n} shards, engine opened with {shards}"
                )));
            }
            Some(_) => {}
            None => {
                let mut b = Batch::default();
                b.put(
                    Space::Meta,
                    CONFIG_KEY.to_vec(),
                    (shards as u64).to_le_bytes().to_vec(),
                );
                engine.write(Target::Meta, b, true)?;
            }
        }
        let mut idx = load_index(engine.as_ref())?;
        idx.policy = cfg.eviction.clone();
        let store = BlockStore {
            inner: Arc::new(Inner {
                hot: HotTier::new(cfg.hot_tier_bytes),
                engine,
                clock,
                idx: Mutex::new(idx),
                ctr: Counters::default(),
                recoveries_reported: AtomicUsize::new(0),
                cfg,
            }),
        };
        for r in store.inner.engine.recoveries() {
            tracing::error!(recovery = %r, "the store recovered from damage at open");
        }
        if store.inner.cfg.gc_on_open {
            // Leftovers are harmless: a shard that cannot be scanned now is not a reason
            // to refuse to serve the others.
            if let Err(e) = store.collect_unreferenced() {
                tracing::error!(error = %e, "garbage collection at open failed");
            }
        }
        store.inner.publish_gauges(&store.inner.lock());
        Ok(store)
    }

    /// Opens (creating if needed) a RocksDB-backed store with the system clock.
    pub fn open_rocks(rocks: RocksConfig, cfg: StoreConfig) -> Result<Self> {
        Self::open(
            Box::new(RocksEngine::open(rocks)?),
            cfg,
            Arc::new(SystemClock),
        )
    }

    /// An in-memory store (tests, and callers that must not link RocksDB behaviour).
    pub fn in_memory(shards: usize, cfg: StoreConfig) -> Result<Self> {
        Self::open(Box::new(MemEngine::new(shards)), cfg, Arc::new(SystemClock))
    }

    /// The underlying engine (operators' tools and tests use it for raw access).
    pub fn engine(&self) -> &dyn Engine {
        self.inner.engine.as_ref()
    }

    /// The configuration in effect.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.cfg
    }

    /// Computes the content key of a block for a document being ingested.
    pub fn block_key(
        spec: &DocSpec,
        anchor_tokens: &[u32],
        block_tokens: &[u32],
        block_start: u64,
    ) -> BlockKey {
        BlockKeyInput {
            model_fingerprint: &spec.model_fingerprint,
            kv_layout_version: spec.kv_layout_version,
            dtype: spec.dtype,
            anchor_size: spec.anchor_size,
            anchor_tokens,
            block_tokens,
            block_start,
        }
        .key()
    }

    /// Starts ingesting a new version of `spec.doc`. Nothing becomes visible until
    /// [`Ingest::commit`]; dropping the ingest (or crashing) leaves nothing visible and
    /// its blocks are collected.
    pub fn begin_ingest(&self, spec: DocSpec) -> Result<Ingest> {
        self.check_free_space()?;
        validate_name("document id", &spec.doc, false)?;
        validate_name("tenant", &spec.tenant, true)?;
        // An anchor is at most one block, or whole blocks (Star Attention's a = k * b).
        let anchor_ok = spec.anchor_size <= spec.block_size
            || spec.anchor_size.is_multiple_of(spec.block_size.max(1));
        if !anchor_ok || spec.block_size == 0 {
            return Err(Error::InvalidArgument(format!(
                "need 0 < block size and anchor <= block or a multiple of it (b={}, a={})",
                spec.block_size, spec.anchor_size
            )));
        }
        Ok(Ingest {
            inner: self.inner.clone(),
            spec,
            blocks: Vec::new(),
            pending: Vec::new(),
            touched: BTreeSet::new(),
            done: false,
        })
    }

    /// Free bytes on the store's filesystem (`None` for the in-memory engine).
    pub fn free_disk_bytes(&self) -> Option<u64> {
        self.inner.engine.free_disk_bytes()
    }

    /// [`Error::DiskFull`] when free space is under [`StoreConfig::min_free_disk_bytes`].
    pub fn check_free_space(&self) -> Result<()> {
        self.inner.check_free_space()
    }

    /// Opens the latest visible version of `doc` for reading and marks it used.
    pub fn open_doc(&self, doc: &str) -> Result<DocLease> {
        let latest = {
            let idx = self.inner.lock();
            idx.latest(doc).cloned()
        };
        match latest {
            Some(r) => self.open_version(&r),
            None => Err(Error::NotFound {
                doc: doc.to_string(),
            }),
        }
    }

    /// Opens one version for reading and marks it used. An expired (TTL) version is
    /// removed here and reported as not found, so TTL holds even between eviction runs.
    pub fn open_version(&self, doc: &DocRef) -> Result<DocLease> {
        let now = self.inner.clock.now_ms();
        let mut idx = self.inner.lock();
        let expired = match idx.docs.get(doc) {
            None => {
                return Err(Error::NotFound {
                    doc: doc.to_string(),
                });
            }
            Some(e) => e.expired(now) && e.leases == 0,
        };
        if expired {
            self.inner
                .remove_docs(&mut idx, vec![(doc.clone(), EvictReason::Ttl)], true)?;
            return Err(Error::NotFound {
                doc: doc.to_string(),
            });
        }
        let e = idx.docs.get_mut(doc).expect("checked above");
        e.leases += 1;
        e.state.last_used_ms = now;
        let manifest = e.manifest.clone();
        let state_row = e.state.encode();
        // Unsynced: losing a last-use update in a crash only makes the document look
        // slightly older.
        let mut b = Batch::default();
        b.put(Space::Meta, doc_row_key(TAG_STATE, doc), state_row);
        let res = self.inner.engine.write(Target::Meta, b, false);
        if let Err(err) = res {
            if let Some(e) = idx.docs.get_mut(doc) {
                e.leases -= 1;
            }
            return Err(err);
        }
        Ok(DocLease {
            inner: self.inner.clone(),
            manifest,
            tokens: Default::default(),
        })
    }

    /// Whether a visible version of `doc` exists. Does not count as a use.
    pub fn contains(&self, doc: &str) -> bool {
        self.inner.lock().latest(doc).is_some()
    }

    /// Visible versions of `doc`, oldest first. Does not count as a use.
    pub fn versions(&self, doc: &str) -> Vec<DocRef> {
        self.inner.lock().versions(doc)
    }

    /// Every visible version. Does not count as a use.
    pub fn list(&self) -> Vec<DocInfo> {
        let idx = self.inner.lock();
        idx.docs.values().map(doc_info).collect()
    }

    /// One visible version. Does not count as a use.
    pub fn doc_info(&self, doc: &DocRef) -> Option<DocInfo> {
        self.inner.lock().docs.get(doc).map(doc_info)
    }

    /// Source token ids of a visible version (for re-encoding). Verified like every
    /// stored row.
    pub fn source_tokens(&self, doc: &DocRef) -> Result<Vec<u32>> {
        if !self.inner.lock().docs.contains_key(doc) {
            return Err(Error::NotFound {
                doc: doc.to_string(),
            });
        }
        self.inner.source_tokens(doc)
    }

    /// Pins or unpins a version (pinned versions are exempt from LRU, TTL and quota).
    pub fn set_pinned(&self, doc: &DocRef, pinned: bool) -> Result<()> {
        self.update_state(doc, |s| s.pinned = pinned)
    }

    /// Sets or clears a version's idle TTL.
    pub fn set_ttl(&self, doc: &DocRef, ttl_ms: Option<u64>) -> Result<()> {
        self.update_state(doc, |s| s.ttl_ms = ttl_ms)
    }

    fn update_state(&self, doc: &DocRef, f: impl FnOnce(&mut DocState)) -> Result<()> {
        let mut idx = self.inner.lock();
        let e = idx.docs.get_mut(doc).ok_or_else(|| Error::NotFound {
            doc: doc.to_string(),
        })?;
        let mut s = e.state;
        f(&mut s);
        // The copy first (unsynced: it is the spare), then the meta row, synced.
        let mut c = Batch::default();
        c.put(Space::Docs, doc_row_key(TAG_STATE, doc), s.encode());
        if let Err(err) =
            self.inner
                .engine
                .write(Target::Shard(self.inner.copy_shard(&doc.doc)), c, false)
        {
            tracing::warn!(doc = %doc, %err, "could not update the state copy");
        }
        let mut b = Batch::default();
        b.put(Space::Meta, doc_row_key(TAG_STATE, doc), s.encode());
        // Synced: pin/TTL are operator decisions and must survive a crash.
        self.inner.engine.write(Target::Meta, b, true)?;
        e.state = s;
        Ok(())
    }

    /// Deletes every visible version of `doc` (pinned or not). Leased versions vanish
    /// from view now and free their blocks when released.
    pub fn delete_doc(&self, doc: &str) -> Result<EvictionReport> {
        let mut idx = self.inner.lock();
        let victims: Vec<_> = idx
            .versions(doc)
            .into_iter()
            .map(|r| (r, EvictReason::Deleted))
            .collect();
        let lost = self.inner.forget_lost(&mut idx, doc)?;
        if victims.is_empty() {
            if lost > 0 {
                return Ok(EvictionReport::default());
            }
            return Err(Error::NotFound {
                doc: doc.to_string(),
            });
        }
        self.inner.remove_docs(&mut idx, victims, true)
    }

    /// Deletes one version.
    pub fn delete_version(&self, doc: &DocRef) -> Result<EvictionReport> {
        let mut idx = self.inner.lock();
        if !idx.docs.contains_key(doc) {
            return Err(Error::NotFound {
                doc: doc.to_string(),
            });
        }
        self.inner
            .remove_docs(&mut idx, vec![(doc.clone(), EvictReason::Deleted)], true)
    }

    /// Replaces the eviction policy (takes effect at the next publish or
    /// [`BlockStore::run_eviction`]).
    pub fn set_eviction_policy(&self, policy: EvictionPolicy) {
        self.inner.lock().policy = policy;
    }

    /// The eviction policy in effect.
    pub fn eviction_policy(&self) -> EvictionPolicy {
        self.inner.lock().policy.clone()
    }

    /// Runs every automatic policy now (TTL, tenant quotas, size watermarks).
    pub fn run_eviction(&self) -> Result<EvictionReport> {
        let mut idx = self.inner.lock();
        let plan = self.inner.plan_eviction(&idx, None);
        self.inner.remove_docs(&mut idx, plan, true)
    }

    /// Deletes blocks that no manifest references and no ingest in progress uses
    /// (leftovers of crashed or abandoned ingests), then has the engine give the space of
    /// every deleted key back to the filesystem (compaction; see [`Engine::reclaim`]).
    pub fn gc(&self) -> Result<GcReport> {
        let before = self.inner.engine.disk_usage().unwrap_or(0);
        let mut report = self.collect_unreferenced()?;
        self.inner.engine.reclaim()?;
        let after = self.inner.engine.disk_usage().unwrap_or(0);
        report.disk_bytes_before = before;
        report.disk_bytes_after = after;
        tracing::info!(
            deleted = report.deleted,
            disk_before = before,
            disk_after = after,
            "gc done"
        );
        Ok(report)
    }

    fn collect_unreferenced(&self) -> Result<GcReport> {
        let mut report = GcReport::default();
        for shard in 0..self.inner.engine.shards() {
            let mut found = Vec::new();
            self.inner
                .engine
                .scan(Target::Shard(shard), Space::BlockIndex, &[], &mut |k, v| {
                    if let (Ok(key), Some((layers, stored, _))) =
                        (<[u8; 32]>::try_from(k), parse_index_row(v))
                    {
                        found.push((BlockKey(key), layers, stored));
                    }
                    true
                })?;
            report.scanned += found.len() as u64;
            let mut idx = self.inner.lock();
            let free: Vec<_> = found
                .into_iter()
                .filter(|(k, _, _)| !idx.blocks.contains_key(k) && !idx.pending.contains_key(k))
                .collect();
            report.deleted += free.len() as u64;
            report.bytes_freed += free.iter().map(|f| f.2).sum::<u64>();
            bump(&self.inner.ctr.gc_blocks, m::GC_BLOCKS, free.len() as u64);
            self.inner.delete_blocks(&mut idx, &free)?;
        }
        if report.deleted > 0 {
            tracing::info!(
                deleted = report.deleted,
                bytes = report.bytes_freed,
                "gc removed unreferenced blocks"
            );
        }
        Ok(report)
    }

    /// Blocks marked for repair, with the visible documents that reference them.
    pub fn repair_queue(&self) -> Vec<RepairItem> {
        let idx = self.inner.lock();
        idx.repair
            .iter()
            .map(|k| RepairItem {
                block: *k,
                docs: idx
                    .docs
                    .iter()
                    .flat_map(|(r, e)| {
                        e.manifest
                            .blocks
                            .iter()
                            .filter(|b| b.key == *k)
                            .map(|b| (r.clone(), b.clone()))
                    })
                    .collect(),
            })
            .collect()
    }

    /// Rewrites a damaged block from freshly re-encoded layers and clears its repair
    /// mark. The layers must match what the manifests recorded (count, sizes).
    pub fn repair_block(&self, key: BlockKey, layers: &[Tensor]) -> Result<()> {
        let expect = {
            let idx = self.inner.lock();
            idx.blocks.get(&key).map(|b| b.layers)
        };
        let Some(n) = expect else {
            return Err(Error::InvalidArgument(format!(
                "block {key} is not referenced by any manifest"
            )));
        };
        if layers.len() != n as usize {
            return Err(Error::InvalidArgument(format!(
                "block {key} has {n} layers, got {}",
                layers.len()
            )));
        }
        let shard = key.shard(self.inner.engine.shards());
        let (batch, _, _) = self.inner.encode_block(&key, layers);
        self.inner.engine.write(Target::Shard(shard), batch, true)?;
        self.inner.hot.remove_block(&key, n);
        let mut idx = self.inner.lock();
        idx.repair.remove(&key);
        let mut b = Batch::default();
        b.delete(Space::Meta, repair_key(&key));
        self.inner.engine.write(Target::Meta, b, true)?;
        self.inner.publish_gauges(&idx);
        Ok(())
    }

    /// Reads and verifies every layer of a version without the hot tier (operator
    /// `verify`). Goes on past a damaged block, so every damaged block is marked for
    /// repair; returns the first error.
    pub fn verify_version(&self, doc: &DocRef) -> Result<()> {
        let lease = self.open_version_no_touch(doc)?;
        let mut first = None;
        for b in &lease.manifest.blocks {
            for layer in 0..b.layers {
                if let Err(e) = lease.inner.read_from_engine(&b.key, layer) {
                    first.get_or_insert(e);
                    // Marked for repair; the block's other layers add nothing.
                    break;
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Versions whose manifest is lost (`doc@version`, why), for operators.
    pub fn lost_documents(&self) -> Vec<(DocRef, String)> {
        let idx = self.inner.lock();
        idx.lost
            .iter()
            .map(|(r, w)| (r.clone(), w.clone()))
            .collect()
    }

    /// Checks every visible version's rows in the meta instance and their copies in the
    /// shards (manifest and source tokens; the operator's `verify`). With `repair`, a
    /// damaged or missing row is rewritten from the good one. Also reports lost versions
    /// and the engine's recoveries since the previous check.
    pub fn verify_meta(&self, repair: bool) -> Result<MetaCheck> {
        let mut out = MetaCheck::default();
        let docs: Vec<(DocRef, Arc<Manifest>)> = {
            let idx = self.inner.lock();
            out.lost = idx.lost.iter().map(|(r, w)| format!("{r}: {w}")).collect();
            idx.docs
                .iter()
                .map(|(r, e)| (r.clone(), e.manifest.clone()))
                .collect()
        };
        let engine = self.inner.engine.as_ref();
        for (doc, mf) in docs {
            out.checked += 1;
            let shard = Target::Shard(self.inner.copy_shard(&doc.doc));
            let row = |target: Target, space: Space, tag: u8| {
                crate::engine::get_vec(engine, target, space, &doc_row_key(tag, &doc))
            };
            // Manifest: meta (what the index was built from) against the copy.
            let meta_m = row(Target::Meta, Space::Meta, TAG_MANIFEST);
            let copy_m = row(shard, Space::Docs, TAG_MANIFEST);
            let good_m = |r: &Result<Option<Vec<u8>>>| matches!(r, Ok(Some(v)) if Manifest::decode(v).is_ok_and(|m| m == *mf));
            let (meta_ok, copy_ok) = (good_m(&meta_m), good_m(&copy_m));
            // Tokens: either copy may be the good one.
            let meta_t = row(Target::Meta, Space::Meta, TAG_TOKENS);
            let copy_t = row(shard, Space::Docs, TAG_TOKENS);
            let good_t = |r: &Result<Option<Vec<u8>>>| {
                matches!(r, Ok(Some(v)) if manifest::decode_tokens(v)
                    .is_ok_and(|t| t.len() as u64 == mf.source_tokens))
            };
            let (meta_t_ok, copy_t_ok) = (good_t(&meta_t), good_t(&copy_t));
            let mut meta_fix = Batch::default();
            let mut copy_fix = Batch::default();
            if !meta_ok {
                out.problems
                    .push(format!("{doc}: manifest row in meta damaged or missing"));
                meta_fix.put(Space::Meta, doc_row_key(TAG_MANIFEST, &doc), mf.encode());
            }
            if !copy_ok {
                out.problems
                    .push(format!("{doc}: manifest copy damaged or missing"));
                copy_fix.put(Space::Docs, doc_row_key(TAG_MANIFEST, &doc), mf.encode());
            }
            match (meta_t_ok, copy_t_ok) {
                (true, true) => {}
                (true, false) => {
                    out.problems.push(format!("{doc}: source-token copy damaged or missing"));
                    if let Ok(Some(v)) = meta_t {
                        copy_fix.put(Space::Docs, doc_row_key(TAG_TOKENS, &doc), v);
                    }
                }
                (false, true) => {
                    out.problems.push(format!("{doc}: source-token row in meta damaged or missing"));
                    if let Ok(Some(v)) = copy_t {
                        meta_fix.put(Space::Meta, doc_row_key(TAG_TOKENS, &doc), v);
                    }
                }
                (false, false) => out.problems.push(format!(
                    "{doc}: source tokens unreadable in meta and in the copy (blocks cannot be re-encoded; re-ingest the document)"
                )),
            }
            if repair {
                for (target, batch) in [(Target::Meta, meta_fix), (shard, copy_fix)] {
                    if !batch.is_empty() {
                        out.repaired += batch.ops.len();
                        engine.write(target, batch, true)?;
                    }
                }
            }
        }
        let all = engine.recoveries();
        let seen = self
            .inner
            .recoveries_reported
            .swap(all.len(), Ordering::Relaxed);
        out.recoveries = all.into_iter().skip(seen).collect();
        Ok(out)
    }

    fn open_version_no_touch(&self, doc: &DocRef) -> Result<DocLease> {
        let mut idx = self.inner.lock();
        let e = idx.docs.get_mut(doc).ok_or_else(|| Error::NotFound {
            doc: doc.to_string(),
        })?;
        e.leases += 1;
        Ok(DocLease {
            inner: self.inner.clone(),
            manifest: e.manifest.clone(),
            tokens: Default::default(),
        })
    }

    /// Counters and sizes.
    pub fn stats(&self) -> StoreStats {
        let idx = self.inner.lock();
        let c = &self.inner.ctr;
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            documents: idx.docs.len() as u64,
            blocks: idx.blocks.len() as u64,
            store_bytes: idx.store_bytes,
            bytes_written: ld(&c.bytes_written),
            raw_bytes_written: ld(&c.raw_bytes_written),
            blocks_written: ld(&c.blocks_written),
            blocks_deduplicated: ld(&c.blocks_dedup),
            bytes_read: ld(&c.bytes_read),
            decoded_bytes_read: ld(&c.decoded_bytes_read),
            layers_read: ld(&c.layers_read),
            checksum_failures: ld(&c.checksum_failures),
            evictions: EvictReason::ALL
                .iter()
                .map(|r| (r.as_str(), ld(&c.evictions[r.index()])))
                .collect(),
            gc_blocks: ld(&c.gc_blocks),
            repair_pending: idx.repair.len() as u64,
            lost_documents: idx.lost.len() as u64,
            restored_manifests: idx.restored,
            recoveries: self
                .inner
                .engine
                .recoveries()
                .iter()
                .map(ToString::to_string)
                .collect(),
            hot: self.inner.hot.stats(),
        }
    }

    /// Tenant usage in bytes (shared blocks charged in full to each document).
    pub fn tenant_bytes(&self, tenant: &str) -> u64 {
        self.inner
            .lock()
            .tenant_bytes
            .get(tenant)
            .copied()
            .unwrap_or(0)
    }

    /// Flushes the engine's memtables to files (see [`Engine::flush`]).
    pub fn flush(&self) -> Result<()> {
        self.inner.engine.flush()
    }

    /// Drops every hot-tier entry (benchmarks; memory pressure).
    pub fn clear_hot_tier(&self) {
        self.inner.hot.clear();
    }
}

fn doc_info(e: &DocEntry) -> DocInfo {
    DocInfo {
        doc: e.manifest.doc.clone(),
        tenant: e.manifest.tenant.clone(),
        blocks: e.manifest.blocks.len(),
        dtype: e.manifest.dtype,
        stored_bytes: e.manifest.stored_bytes(),
        raw_bytes: e.manifest.raw_bytes(),
        created_ms: e.manifest.created_ms,
        state: e.state,
        leases: e.leases,
    }
}

fn manifest_config(engine: &dyn Engine) -> Result<Option<u64>> {
    let v = crate::engine::get_vec(engine, Target::Meta, Space::Meta, CONFIG_KEY)?;
    Ok(v.and_then(|v| v.try_into().ok().map(u64::from_le_bytes)))
}

/// A document's manifest row as read from one place: decoded with its row length, or
/// why it could not be.
type ManifestRead = std::result::Result<(Manifest, u64), String>;

/// Every manifest row under `space` of `target`, by the version named in its key.
fn scan_manifests(
    engine: &dyn Engine,
    target: Target,
    space: Space,
) -> Result<BTreeMap<DocRef, ManifestRead>> {
    let mut out = BTreeMap::new();
    engine.scan(target, space, &[TAG_MANIFEST], &mut |k, v| {
        let Some(r) = parse_doc_row_key(k) else {
            tracing::error!(?target, key = ?k, "unparseable manifest key skipped");
            return true;
        };
        let read = match Manifest::decode(v) {
            Ok(mf) if mf.doc == r => Ok((mf, v.len() as u64)),
            Ok(mf) => Err(format!("row names another version ({})", mf.doc)),
            Err(e) => Err(e.to_string()),
        };
        out.insert(r, read);
        true
    })?;
    Ok(out)
}

fn copy_shard_of(engine: &dyn Engine, doc: &str) -> usize {
    let h = blake3::hash(doc.as_bytes());
    let x = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
    (x % engine.shards() as u64) as usize
}

/// Builds the index from the manifests, reconciling the meta rows with their copies in
/// the shards:
///
/// | meta row | copy | outcome |
/// |---|---|---|
/// | readable | any | served; a missing or different copy is rewritten |
/// | damaged | readable | meta rows restored from the copy, served |
/// | damaged | damaged/missing | lost: not served, reported |
/// | missing | readable | restored (meta lost it, e.g. a repaired or quarantined meta instance, or a crash between the two synced writes of a publish), unless a newer version of the id is visible (then the copy is stale and dropped) |
/// | missing | damaged | lost, unless a newer version is visible (stale, dropped) |
fn load_index(engine: &dyn Engine) -> Result<Index> {
    let mut idx = Index::default();
    let mut states = HashMap::new();
    engine.scan(Target::Meta, Space::Meta, &[TAG_STATE], &mut |k, v| {
        match (parse_doc_row_key(k), DocState::decode(v)) {
            (Some(r), Ok(s)) => {
                states.insert(r, (s, v.len() as u64));
            }
            (r, e) => tracing::warn!(?r, err = ?e.err(), "skipping unreadable state row"),
        }
        true
    })?;
    let meta = scan_manifests(engine, Target::Meta, Space::Meta)?;
    let mut copies: BTreeMap<DocRef, (ManifestRead, usize)> = BTreeMap::new();
    for shard in 0..engine.shards() {
        match scan_manifests(engine, Target::Shard(shard), Space::Docs) {
            Ok(found) => copies.extend(found.into_iter().map(|(r, m)| (r, (m, shard)))),
            // The copies are the spare: without them the meta rows still serve.
            Err(e) => {
                tracing::error!(shard, error = %e, "could not read the document copies of a shard")
            }
        }
    }
    let mut newest: HashMap<&str, u64> = HashMap::new();
    for (r, m) in &meta {
        if m.is_ok() {
            let v = newest.entry(r.doc.as_str()).or_default();
            *v = (*v).max(r.version);
        }
    }
    let stale = |r: &DocRef| newest.get(r.doc.as_str()).is_some_and(|&v| v > r.version);

    let mut restore = Batch::default();
    let mut copy_writes: BTreeMap<usize, Batch> = BTreeMap::new();
    let mut accepted: Vec<(Manifest, u64, Option<DocState>)> = Vec::new();
    let all: BTreeSet<&DocRef> = meta.keys().chain(copies.keys()).collect();
    let row = |target: Target, space: Space, tag: u8, r: &DocRef| {
        crate::engine::get_vec(engine, target, space, &doc_row_key(tag, r))
            .ok()
            .flatten()
    };
    for r in all {
        let copy_shard = copy_shard_of(engine, &r.doc);
        match (meta.get(r), copies.get(r)) {
            (Some(Ok((mf, len))), copy) => {
                let copy_matches =
                    matches!(copy, Some((Ok((c, _)), s)) if c == mf && *s == copy_shard);
                if !copy_matches {
                    // A store from before copies existed, a quarantined shard, or damage.
                    let c = copy_writes.entry(copy_shard).or_default();
                    c.put(Space::Docs, doc_row_key(TAG_MANIFEST, r), mf.encode());
                    if let Some(t) = row(Target::Meta, Space::Meta, TAG_TOKENS, r) {
                        c.put(Space::Docs, doc_row_key(TAG_TOKENS, r), t);
                    }
                    if let Some((s, _)) = states.get(r) {
                        c.put(Space::Docs, doc_row_key(TAG_STATE, r), s.encode());
                    }
                }
                accepted.push((mf.clone(), *len, None));
            }
            (None, Some((_, shard))) if stale(r) => {
                // A copy older than a visible version: left over from a replace whose
                // unsynced copy delete was lost.
                let c = copy_writes.entry(*shard).or_default();
                for tag in [TAG_MANIFEST, TAG_STATE, TAG_TOKENS] {
                    c.delete(Space::Docs, doc_row_key(tag, r));
                }
            }
            (meta_row, Some((Ok((c, len)), shard))) => {
                // The tokens are needed to serve and to repair: restore only with them.
                let tokens = row(Target::Shard(*shard), Space::Docs, TAG_TOKENS, r)
                    .filter(|t| manifest::decode_tokens(t).is_ok())
                    .or_else(|| {
                        row(Target::Meta, Space::Meta, TAG_TOKENS, r)
                            .filter(|t| manifest::decode_tokens(t).is_ok())
                    });
                let Some(tokens) = tokens else {
                    idx.lost.insert(
                        r.clone(),
                        "manifest restorable from its copy but the source tokens are unreadable everywhere".into(),
                    );
                    continue;
                };
                let state = row(Target::Shard(*shard), Space::Docs, TAG_STATE, r)
                    .and_then(|s| DocState::decode(&s).ok());
                let why = match meta_row {
                    Some(Err(e)) => format!("meta row damaged: {e}"),
                    _ => "meta row missing".to_string(),
                };
                tracing::error!(doc = %r, why = %why, "manifest restored from its copy in shard {shard}");
                restore.put(Space::Meta, doc_row_key(TAG_MANIFEST, r), c.encode());
                restore.put(Space::Meta, doc_row_key(TAG_TOKENS, r), tokens);
                if let Some(s) = state {
                    restore.put(Space::Meta, doc_row_key(TAG_STATE, r), s.encode());
                }
                idx.restored += 1;
                accepted.push((c.clone(), *len, state));
            }
            (Some(Err(e)), copy) => {
                let why = match copy {
                    Some((Err(ce), _)) => format!("meta row damaged ({e}) and copy damaged ({ce})"),
                    _ => format!("meta row damaged ({e}) and no copy"),
                };
                tracing::error!(doc = %r, why = %why, "manifest lost: the document is not served");
                idx.lost.insert(r.clone(), why);
            }
            (None, Some((Err(ce), _))) => {
                let why = format!("meta row missing and copy damaged ({ce})");
                tracing::error!(doc = %r, why = %why, "manifest lost: the document is not served");
                idx.lost.insert(r.clone(), why);
            }
            (None, None) => {}
        }
    }
    if !restore.is_empty() {
        engine.write(Target::Meta, restore, true)?;
    }
    for (shard, c) in copy_writes {
        if let Err(e) = engine.write(Target::Shard(shard), c, true) {
            tracing::error!(shard, error = %e, "could not rewrite document copies");
        }
    }
    for (mf, len, restored_state) in accepted {
        let (state, state_len) = match restored_state {
            Some(s) => (s, s.encode().len() as u64),
            None => states.get(&mf.doc).copied().unwrap_or((
                DocState {
                    last_used_ms: mf.created_ms,
                    pinned: false,
                    ttl_ms: None,
                },
                0,
            )),
        };
        let meta_bytes = len + state_len + tokens_row_len(mf.source_tokens);
        idx.add_doc(DocEntry {
            manifest: Arc::new(mf),
            state,
            leases: 0,
            meta_bytes,
        });
    }
    // A lost version keeps its number: a new ingest of the id gets a higher one.
    let lost: Vec<DocRef> = idx.lost.keys().cloned().collect();
    for r in lost {
        let nv = idx.next_version.entry(r.doc.clone()).or_insert(1);
        *nv = (*nv).max(r.version + 1);
    }
    engine.scan(Target::Meta, Space::Meta, &[TAG_REPAIR], &mut |k, _| {
        if let Ok(key) = <[u8; 32]>::try_from(&k[1..]) {
            idx.repair.insert(BlockKey(key));
        }
        true
    })?;
    if !idx.lost.is_empty() {
        metrics::counter!(m::CHECKSUM_FAILURES).increment(idx.lost.len() as u64);
    }
    Ok(idx)
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock cannot leave the index half-updated in a way
        // that breaks durability (the engine is the source of truth), so recover.
        self.idx.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_gauges(&self, idx: &Index) {
        metrics::gauge!(m::STORE_BYTES).set(idx.store_bytes as f64);
        metrics::gauge!(m::STORE_BLOCKS).set(idx.blocks.len() as f64);
        metrics::gauge!(m::DOCUMENTS).set(idx.docs.len() as f64);
        metrics::gauge!(m::REPAIR_PENDING).set(idx.repair.len() as f64);
    }

    /// The source tokens from the meta row, else from the copy (then the meta row is
    /// rewritten from it).
    fn source_tokens(&self, doc: &DocRef) -> Result<Vec<u32>> {
        let key = doc_row_key(TAG_TOKENS, doc);
        let engine = self.engine.as_ref();
        let read = |target: Target, space: Space| -> std::result::Result<Vec<u32>, String> {
            match crate::engine::get_vec(engine, target, space, &key) {
                Ok(Some(row)) => manifest::decode_tokens(&row).map_err(|e| e.to_string()),
                Ok(None) => Err("row missing".into()),
                Err(e) => Err(e.to_string()),
            }
        };
        let meta_err = match read(Target::Meta, Space::Meta) {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        bump(&self.ctr.checksum_failures, m::CHECKSUM_FAILURES, 1);
        let copy_shard = Target::Shard(self.copy_shard(&doc.doc));
        match read(copy_shard, Space::Docs) {
            Ok(tokens) => {
                tracing::error!(doc = %doc, error = %meta_err, "source-token row unreadable in meta; using and restoring its copy");
                let mut b = Batch::default();
                b.put(Space::Meta, key.clone(), manifest::encode_tokens(&tokens));
                if let Err(e) = self.engine.write(Target::Meta, b, true) {
                    tracing::error!(doc = %doc, error = %e, "could not restore the source-token row");
                }
                Ok(tokens)
            }
            Err(copy_err) => {
                tracing::error!(doc = %doc, meta = %meta_err, copy = %copy_err, "source tokens unreadable in meta and in the copy");
                Err(Error::CorruptManifest {
                    doc: doc.to_string(),
                    reason: CodecError::Storage(format!(
                        "source tokens unreadable (meta: {meta_err}; copy: {copy_err})"
                    )),
                })
            }
        }
    }

    /// The shard holding the copies of a document id's rows (every version together).
    fn copy_shard(&self, doc: &str) -> usize {
        copy_shard_of(self.engine.as_ref(), doc)
    }

    fn check_free_space(&self) -> Result<()> {
        if self.engine.reserve_spent() {
            return Err(Error::DiskFull {
                context: "ingest".into(),
                message: "the disk filled up and the store is running on its disk reserve; delete documents and run gc".into(),
            });
        }
        let floor = self.cfg.min_free_disk_bytes;
        if floor == 0 {
            return Ok(());
        }
        match self.engine.free_disk_bytes() {
            Some(free) if free < floor => Err(Error::DiskFull {
                context: "ingest".into(),
                message: format!(
                    "{free} bytes free on the store's filesystem, under the floor of {floor} bytes (min_free_disk_bytes); delete documents and run gc"
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Removes lost versions of `doc` (rows in meta and copies); returns how many.
    fn forget_lost(&self, idx: &mut Index, doc: &str) -> Result<usize> {
        let lost: Vec<DocRef> = idx.lost.keys().filter(|r| r.doc == doc).cloned().collect();
        if lost.is_empty() {
            return Ok(0);
        }
        let mut c = Batch::default();
        let mut b = Batch::default();
        for r in &lost {
            for tag in [TAG_MANIFEST, TAG_STATE, TAG_TOKENS] {
                c.delete(Space::Docs, doc_row_key(tag, r));
                b.delete(Space::Meta, doc_row_key(tag, r));
            }
        }
        self.engine
            .write(Target::Shard(self.copy_shard(doc)), c, true)?;
        self.engine.write(Target::Meta, b, true)?;
        for r in &lost {
            idx.lost.remove(r);
        }
        Ok(lost.len())
    }

    /// Encodes a block's layers (in parallel) into one shard batch.
    fn encode_block(&self, key: &BlockKey, layers: &[Tensor]) -> (Batch, u64, u64) {
        let threads = self.cfg.encode_threads.clamp(1, layers.len().max(1));
        let cfg = self.cfg.codec;
        let encoded: Vec<Vec<u8>> = if threads == 1 {
            layers.iter().map(|t| codec::encode(t, &cfg)).collect()
        } else {
            let chunk = layers.len().div_ceil(threads);
            std::thread::scope(|s| {
                let handles: Vec<_> = layers
                    .chunks(chunk)
                    .map(|c| {
                        s.spawn(move || {
                            c.iter().map(|t| codec::encode(t, &cfg)).collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("encode thread panicked"))
                    .collect()
            })
        };
        let raw: u64 = layers.iter().map(|t| t.byte_len() as u64).sum();
        let stored: u64 = encoded.iter().map(|v| v.len() as u64).sum();
        let mut b = Batch::default();
        for (i, v) in encoded.into_iter().enumerate() {
            b.put(Space::Layers, layer_key(key, i as u16), v);
        }
        b.put(
            Space::BlockIndex,
            key.0.to_vec(),
            index_row(layers.len() as u16, stored, raw),
        );
        (b, stored, raw)
    }

    fn mark_repair(&self, key: &BlockKey) {
        let mut idx = self.lock();
        if idx.repair.insert(*key) {
            let mut b = Batch::default();
            b.put(Space::Meta, repair_key(key), Vec::new());
            if let Err(e) = self.engine.write(Target::Meta, b, false) {
                tracing::error!(block = %key, err = %e, "could not persist repair mark");
            }
            self.publish_gauges(&idx);
        }
    }

    /// Reads one layer from the engine, verifying it. Never returns unverified data.
    fn read_from_engine(&self, key: &BlockKey, layer: u16) -> Result<Tensor> {
        let shard = key.shard(self.engine.shards());
        let mut out: Option<std::result::Result<Tensor, CodecError>> = None;
        let mut len = 0usize;
        let got = self.engine.get(
            Target::Shard(shard),
            Space::Layers,
            &layer_key(key, layer),
            &mut |v| {
                if let Some(v) = v {
                    len = v.len();
                    out = Some(codec::decode(v));
                }
            },
        );
        match got {
            Ok(()) => {}
            // RocksDB could not read the value (a damaged table or blob file, e.g. a blob
            // header naming another compression type): like a checksum failure, the
            // block is repairable, not an internal error.
            Err(Error::EngineCorruption { message, .. }) => {
                out = Some(Err(CodecError::Storage(message)));
            }
            Err(e) => return Err(e),
        }
        match out {
            Some(Ok(t)) => {
                bump(&self.ctr.bytes_read, m::BYTES_READ, len as u64);
                bump(&self.ctr.layers_read, m::LAYERS_READ, 1);
                Ok(t)
            }
            Some(Err(reason)) => {
                bump(&self.ctr.checksum_failures, m::CHECKSUM_FAILURES, 1);
                tracing::error!(block = %key, layer, shard, %reason, "stored value failed verification");
                self.mark_repair(key);
                Err(Error::Corrupt {
                    block: *key,
                    layer,
                    shard,
                    reason,
                })
            }
            None => {
                bump(&self.ctr.checksum_failures, m::CHECKSUM_FAILURES, 1);
                tracing::error!(block = %key, layer, shard, "block missing under a visible manifest");
                self.mark_repair(key);
                Err(Error::MissingBlock {
                    block: *key,
                    layer,
                    shard,
                })
            }
        }
    }

    fn read_layer(&self, key: &BlockKey, layer: u16) -> Result<Arc<Tensor>> {
        let t = match self.hot.get(key, layer) {
            Some(t) => t,
            None => {
                let t = Arc::new(self.read_from_engine(key, layer)?);
                self.hot.insert(*key, layer, t.clone());
                t
            }
        };
        bump(
            &self.ctr.decoded_bytes_read,
            m::DECODED_BYTES_READ,
            t.byte_len() as u64,
        );
        Ok(t)
    }

    /// Deletes blocks from their shards (caller checked they are unreferenced and not
    /// pending, under the index lock, which it still holds).
    fn delete_blocks(&self, _idx: &mut Index, blocks: &[(BlockKey, u16, u64)]) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let shards = self.engine.shards();
        let mut per: HashMap<usize, Batch> = HashMap::new();
        for (key, layers, _) in blocks {
            let b = per.entry(key.shard(shards)).or_default();
            for l in 0..*layers {
                b.delete(Space::Layers, layer_key(key, l));
            }
            b.delete(Space::BlockIndex, key.0.to_vec());
            self.hot.remove_block(key, *layers);
        }
        for (shard, b) in per {
            // Unsynced: a lost delete resurrects an unreferenced block, which the next
            // gc removes; it can never resurrect a document.
            self.engine.write(Target::Shard(shard), b, false)?;
        }
        Ok(())
    }

    /// Removes document versions: manifests first (one synced meta batch), then the
    /// blocks whose last reference went away. Leased versions are hidden now and
    /// released by the last lease.
    fn remove_docs(
        &self,
        idx: &mut Index,
        victims: Vec<(DocRef, EvictReason)>,
        write_meta: bool,
    ) -> Result<EvictionReport> {
        let mut report = EvictionReport::default();
        if victims.is_empty() {
            return Ok(report);
        }
        if write_meta {
            // Copies first, synced: a copy outliving its meta rows would be restored at
            // open (a deleted document coming back); meta rows outliving their copy only
            // lose the spare, which open writes again.
            let mut copies: HashMap<usize, Batch> = HashMap::new();
            for (r, _) in &victims {
                let c = copies.entry(self.copy_shard(&r.doc)).or_default();
                for tag in [TAG_MANIFEST, TAG_STATE, TAG_TOKENS] {
                    c.delete(Space::Docs, doc_row_key(tag, r));
                }
            }
            for (shard, c) in copies {
                self.engine.write(Target::Shard(shard), c, true)?;
            }
            let mut b = Batch::default();
            for (r, _) in &victims {
                for tag in [TAG_MANIFEST, TAG_STATE, TAG_TOKENS] {
                    b.delete(Space::Meta, doc_row_key(tag, r));
                }
            }
            self.engine.write(Target::Meta, b, true)?;
        }
        let mut free = Vec::new();
        for (r, reason) in victims {
            let Some(e) = idx.docs.remove(&r) else {
                continue;
            };
            self.ctr.evictions[reason.index()].fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::EVICTIONS, "reason" => reason.as_str()).increment(1);
            tracing::info!(doc = %r, reason = reason.as_str(), "document version removed");
            if e.leases > 0 {
                report.deferred += 1;
                idx.doomed.insert(r.clone(), e);
            } else {
                free.extend(idx.release(&e));
            }
            report.evicted.push((r, reason));
        }
        report.blocks_deleted = free.len() as u64;
        report.bytes_freed = free.iter().map(|f| f.2).sum();
        self.delete_blocks(idx, &free)?;
        self.publish_gauges(idx);
        Ok(report)
    }

    /// Chooses victims for TTL, quotas and watermarks. `protect` is never chosen (the
    /// version being published).
    fn plan_eviction(&self, idx: &Index, protect: Option<&DocRef>) -> Vec<(DocRef, EvictReason)> {
        let now = self.clock.now_ms();
        let policy = &idx.policy;
        let mut chosen: Vec<(DocRef, EvictReason)> = Vec::new();
        let mut taken: HashSet<DocRef> = HashSet::new();
        let candidate = |r: &DocRef, e: &DocEntry| e.evictable() && Some(r) != protect;

        for (r, e) in &idx.docs {
            if candidate(r, e) && e.expired(now) {
                chosen.push((r.clone(), EvictReason::Ttl));
                taken.insert(r.clone());
            }
        }

        // LRU order, oldest first; ties broken by id for determinism.
        let mut lru: Vec<(&DocRef, &DocEntry)> =
            idx.docs.iter().filter(|(r, e)| candidate(r, e)).collect();
        lru.sort_by_key(|(r, e)| (e.state.last_used_ms, (*r).clone()));

        let mut tenant_bytes = idx.tenant_bytes.clone();
        for (r, _) in &chosen {
            let e = &idx.docs[r];
            if let Some(t) = tenant_bytes.get_mut(&e.manifest.tenant) {
                *t = t.saturating_sub(e.charge());
            }
        }
        for (r, e) in &lru {
            if taken.contains(*r) {
                continue;
            }
            let tenant = &e.manifest.tenant;
            let Some(quota) = policy.quota_for(tenant) else {
                continue;
            };
            let used = tenant_bytes.get(tenant).copied().unwrap_or(0);
            if used > quota {
                tenant_bytes.insert(tenant.clone(), used.saturating_sub(e.charge()));
                chosen.push(((*r).clone(), EvictReason::Quota));
                taken.insert((*r).clone());
            }
        }

        if let (Some(high), Some(low)) = (policy.high_bytes(), policy.low_bytes()) {
            // Simulate reference counts so shared blocks are not counted as freed.
            let mut refs: HashMap<BlockKey, u32> = HashMap::new();
            let mut size = idx.store_bytes;
            let mut drop_doc = |e: &DocEntry, size: &mut u64| {
                for b in &e.manifest.blocks {
                    let r = refs
                        .entry(b.key)
                        .or_insert_with(|| idx.blocks.get(&b.key).map_or(0, |x| x.refs));
                    *r = r.saturating_sub(1);
                    if *r == 0 {
                        *size = size.saturating_sub(b.stored_bytes);
                    }
                }
                *size = size.saturating_sub(e.meta_bytes);
            };
            for (r, _) in &chosen {
                drop_doc(&idx.docs[r], &mut size);
            }
            if size > high {
                for (r, e) in &lru {
                    if size <= low {
                        break;
                    }
                    if taken.contains(*r) {
                        continue;
                    }
                    drop_doc(e, &mut size);
                    chosen.push(((*r).clone(), EvictReason::Lru));
                    taken.insert((*r).clone());
                }
            }
        }
        chosen
    }

    fn release_lease(&self, doc: &DocRef) {
        let mut idx = self.lock();
        let Some(e) = idx.entry_mut(doc) else {
            return;
        };
        e.leases -= 1;
        if e.leases == 0 && idx.doomed.contains_key(doc) {
            let e = idx.doomed.remove(doc).expect("present");
            let free = idx.release(&e);
            if let Err(err) = self.delete_blocks(&mut idx, &free) {
                // The manifest is already gone durably; gc will collect the blocks.
                tracing::warn!(doc = %doc, %err, "deferred block delete failed; gc will retry");
            }
            self.publish_gauges(&idx);
        }
    }
}

/// A reader's hold on one document version. While it lives, the version's blocks are
/// never deleted (eviction skips it; deletion hides it from new readers and defers the
/// block deletes to the drop of the last lease).
pub struct DocLease {
    inner: Arc<Inner>,
    manifest: Arc<Manifest>,
    tokens: std::sync::OnceLock<Arc<Vec<u32>>>,
}

impl DocLease {
    /// The version's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Which version this is.
    pub fn doc(&self) -> &DocRef {
        &self.manifest.doc
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.manifest.blocks.len()
    }

    fn block(&self, block: usize, layer: u16) -> Result<&BlockRef> {
        self.manifest
            .blocks
            .get(block)
            .filter(|b| layer < b.layers)
            .ok_or_else(|| Error::OutOfRange {
                doc: self.manifest.doc.clone(),
                block,
                layer,
            })
    }

    /// One layer of one block, verified (hot tier first).
    pub fn read_layer(&self, block: usize, layer: u16) -> Result<Arc<Tensor>> {
        let b = self.block(block, layer)?;
        self.inner.read_layer(&b.key, layer)
    }

    /// Every layer of one block.
    pub fn read_block(&self, block: usize) -> Result<Vec<Arc<Tensor>>> {
        self.read_block_on(block, 1)
    }

    /// Every layer of one block, up to `threads` layers read, verified and decoded at
    /// once (each on its own thread): a cold query on a CPU host reads whole blocks, and
    /// one thread decompresses far slower than the disk and page cache deliver. Same
    /// guarantees as [`DocLease::read_layer`]; the first failure (in layer order among
    /// those read) is returned.
    pub fn read_block_on(&self, block: usize, threads: usize) -> Result<Vec<Arc<Tensor>>> {
        let b = self.block(block, 0)?;
        let (key, layers) = (b.key, b.layers);
        let threads = threads.clamp(1, layers.max(1) as usize);
        if threads == 1 {
            return (0..layers)
                .map(|l| self.inner.read_layer(&key, l))
                .collect();
        }
        let next = AtomicU16::new(0);
        let read: Mutex<Vec<(u16, Result<Arc<Tensor>>)>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    loop {
                        let l = next.fetch_add(1, Ordering::Relaxed);
                        if l >= layers {
                            return;
                        }
                        let result = self.inner.read_layer(&key, l);
                        let failed = result.is_err();
                        if let Ok(mut read) = read.lock() {
                            read.push((l, result));
                        }
                        if failed {
                            // The others finish their layer; no new ones start.
                            next.store(layers, Ordering::Relaxed);
                            return;
                        }
                    }
                });
            }
        });
        let mut read = read
            .into_inner()
            .map_err(|_| Error::InvalidArgument("a read worker panicked".into()))?;
        read.sort_by_key(|(l, _)| *l);
        // The first failure in layer order, else every layer (all were read).
        let tensors: Result<Vec<Arc<Tensor>>> = read.into_iter().map(|(_, r)| r).collect();
        let tensors = tensors?;
        if tensors.len() != layers as usize {
            return Err(Error::InvalidArgument("a read worker stopped early".into()));
        }
        Ok(tensors)
    }

    /// Layer `layer` of every block, in document order (phase 2 streams layer by
    /// layer over all blocks).
    pub fn read_layer_all_blocks(&self, layer: u16) -> Result<Vec<Arc<Tensor>>> {
        (0..self.manifest.blocks.len())
            .map(|i| self.read_layer(i, layer))
            .collect()
    }

    /// Reads one layer bypassing the hot tier (verification, benchmarks).
    pub fn read_layer_uncached(&self, block: usize, layer: u16) -> Result<Tensor> {
        let b = self.block(block, layer)?;
        self.inner.read_from_engine(&b.key, layer)
    }

    /// The version's source token ids, loaded on first call and cached in the lease.
    /// Blocks stay readable after the version is deleted; the token row does not, so a
    /// lease that needs the tokens should load them before it could be deleted.
    pub fn source_tokens(&self) -> Result<Arc<Vec<u32>>> {
        if let Some(t) = self.tokens.get() {
            return Ok(t.clone());
        }
        let t = Arc::new(self.inner.source_tokens(&self.manifest.doc)?);
        Ok(self.tokens.get_or_init(|| t).clone())
    }
}

impl Drop for DocLease {
    fn drop(&mut self) {
        self.inner.release_lease(&self.manifest.doc);
    }
}

/// An ingest in progress: blocks first, manifest last.
///
/// Blocks are written to their shards as they arrive (unsynced). [`Ingest::commit`]
/// syncs every touched shard, then publishes the manifest in one synced meta batch.
/// Until then nothing is visible; the blocks are registered as pending so garbage
/// collection leaves them alone. Dropping without committing deletes the blocks only
/// this ingest needed.
pub struct Ingest {
    inner: Arc<Inner>,
    spec: DocSpec,
    blocks: Vec<BlockRef>,
    /// Every block this ingest registered as pending, with its layer count.
    pending: Vec<(BlockKey, u16)>,
    touched: BTreeSet<usize>,
    done: bool,
}

impl Ingest {
    /// The spec being ingested.
    pub fn spec(&self) -> &DocSpec {
        &self.spec
    }

    /// Content key of a block of this document (see [`BlockKeyInput`]).
    pub fn block_key(&self, anchor_tokens: &[u32], block_tokens: &[u32], start: u64) -> BlockKey {
        BlockStore::block_key(&self.spec, anchor_tokens, block_tokens, start)
    }

    /// References an already stored block without sending its data. Returns `false`
    /// if the block is not stored (the caller must compute it and call
    /// [`Ingest::put_block`]). Lets the service skip the model for known blocks.
    pub fn reuse_block(&mut self, key: BlockKey, start: u64, tokens: u32) -> bool {
        let mut idx = self.inner.lock();
        let Some(be) = idx.blocks.get(&key) else {
            return false;
        };
        let (layers, stored, raw) = (be.layers, be.stored_bytes, be.raw_bytes);
        *idx.pending.entry(key).or_default() += 1;
        drop(idx);
        self.pending.push((key, layers));
        self.blocks.push(BlockRef {
            key,
            start,
            tokens,
            layers,
            raw_bytes: raw,
            stored_bytes: stored,
        });
        bump(&self.inner.ctr.blocks_dedup, m::BLOCKS_DEDUPLICATED, 1);
        true
    }

    /// Adds the next block (document order) with its layers. Stores it unless an
    /// identical block is already referenced by a published manifest. Returns whether
    /// it was written.
    pub fn put_block(
        &mut self,
        key: BlockKey,
        start: u64,
        tokens: u32,
        layers: &[Tensor],
    ) -> Result<bool> {
        if layers.is_empty() || layers.len() > u16::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "a block needs 1..=65535 layers, got {}",
                layers.len()
            )));
        }
        if let Some(t) = layers.iter().find(|t| t.dtype() != self.spec.dtype) {
            return Err(Error::InvalidArgument(format!(
                "layer dtype {} differs from document dtype {}",
                t.dtype().name(),
                self.spec.dtype.name()
            )));
        }
        if self.reuse_block(key, start, tokens) {
            return Ok(false);
        }
        self.inner.check_free_space()?;
        {
            let mut idx = self.inner.lock();
            *idx.pending.entry(key).or_default() += 1;
        }
        self.pending.push((key, layers.len() as u16));
        let shard = key.shard(self.inner.engine.shards());
        let (batch, stored, raw) = self.inner.encode_block(&key, layers);
        self.inner
            .engine
            .write(Target::Shard(shard), batch, false)?;
        self.touched.insert(shard);
        self.blocks.push(BlockRef {
            key,
            start,
            tokens,
            layers: layers.len() as u16,
            raw_bytes: raw,
            stored_bytes: stored,
        });
        let c = &self.inner.ctr;
        bump(&c.bytes_written, m::BYTES_WRITTEN, stored);
        bump(&c.raw_bytes_written, m::RAW_BYTES_WRITTEN, raw);
        bump(&c.blocks_written, m::BLOCKS_WRITTEN, 1);
        Ok(true)
    }

    /// Blocks added so far.
    pub fn blocks(&self) -> &[BlockRef] {
        &self.blocks
    }

    /// Makes the document visible: syncs every touched shard, then publishes the
    /// manifest (replacing older versions unless `keep_previous_versions`) in one
    /// synced meta batch, then applies the eviction policies.
    pub fn commit(mut self) -> Result<DocRef> {
        for &shard in &self.touched {
            self.inner.engine.sync(Target::Shard(shard))?;
        }
        let inner = self.inner.clone();
        let now = inner.clock.now_ms();
        let mut idx = inner.lock();
        let version = idx.next_version.get(&self.spec.doc).copied().unwrap_or(1);
        let doc = DocRef {
            doc: self.spec.doc.clone(),
            version,
        };
        let mf = Manifest {
            doc: doc.clone(),
            tenant: self.spec.tenant.clone(),
            model_fingerprint: self.spec.model_fingerprint.clone(),
            tokenizer_fingerprint: self.spec.tokenizer_fingerprint.clone(),
            kv_layout_version: self.spec.kv_layout_version,
            dtype: self.spec.dtype,
            block_size: self.spec.block_size,
            anchor_size: self.spec.anchor_size,
            source_tokens: self.spec.source_tokens.len() as u64,
            created_ms: now,
            blocks: std::mem::take(&mut self.blocks),
            merge: self.spec.merge,
            reencode_ppm: self.spec.reencode_ppm,
            block_overlap: self.spec.block_overlap,
        };
        let state = DocState {
            last_used_ms: now,
            pinned: self.spec.pinned,
            ttl_ms: self.spec.ttl_ms,
        };
        let (m_row, s_row, t_row) = (
            mf.encode(),
            state.encode(),
            manifest::encode_tokens(&self.spec.source_tokens),
        );
        let meta_bytes = (m_row.len() + s_row.len() + t_row.len()) as u64;
        let entry = DocEntry {
            manifest: Arc::new(mf),
            state,
            leases: 0,
            meta_bytes,
        };

        let replaced: Vec<DocRef> = if self.spec.keep_previous_versions {
            Vec::new()
        } else {
            idx.versions(&doc.doc)
        };
        if let Some(quota) = idx.policy.quota_for(&self.spec.tenant) {
            // Refuse only what eviction could not make room for: the new version plus
            // the tenant's pinned or leased versions that survive the publish.
            let fixed: u64 = idx
                .docs
                .iter()
                .filter(|(r, e)| {
                    e.manifest.tenant == self.spec.tenant && !e.evictable() && !replaced.contains(r)
                })
                .map(|(_, e)| e.charge())
                .sum();
            let needed = fixed + entry.charge();
            if needed > quota {
                return Err(Error::QuotaExceeded {
                    tenant: self.spec.tenant.clone(),
                    needed,
                    quota,
                });
            }
        }

        // Lost versions of this id (manifest unreadable everywhere) go with the publish.
        let lost: Vec<DocRef> = if self.spec.keep_previous_versions {
            Vec::new()
        } else {
            idx.lost
                .keys()
                .filter(|r| r.doc == doc.doc)
                .cloned()
                .collect()
        };
        // The copy first, synced (its blocks are durable already): a copy without its
        // meta rows is restored at open, so a crash here can only publish a complete
        // document, never lose one. Then the meta rows, synced: now it is visible.
        let copy_shard = Target::Shard(inner.copy_shard(&doc.doc));
        let mut c = Batch::default();
        c.put(Space::Docs, doc_row_key(TAG_MANIFEST, &doc), m_row.clone());
        c.put(Space::Docs, doc_row_key(TAG_STATE, &doc), s_row.clone());
        c.put(Space::Docs, doc_row_key(TAG_TOKENS, &doc), t_row.clone());
        inner.engine.write(copy_shard, c, true)?;
        let mut b = Batch::default();
        b.put(Space::Meta, doc_row_key(TAG_MANIFEST, &doc), m_row);
        b.put(Space::Meta, doc_row_key(TAG_STATE, &doc), s_row);
        b.put(Space::Meta, doc_row_key(TAG_TOKENS, &doc), t_row);
        for r in replaced.iter().chain(&lost) {
            for tag in [TAG_MANIFEST, TAG_STATE, TAG_TOKENS] {
                b.delete(Space::Meta, doc_row_key(tag, r));
            }
        }
        if let Err(e) = inner.engine.write(Target::Meta, b, true) {
            // Not published: take the copy back, or open would restore a document whose
            // ingest was reported failed (best effort; it is complete either way).
            let mut c = Batch::default();
            for tag in [TAG_MANIFEST, TAG_STATE, TAG_TOKENS] {
                c.delete(Space::Docs, doc_row_key(tag, &doc));
            }
            if let Err(err) = inner.engine.write(copy_shard, c, true) {
                tracing::warn!(doc = %doc, %err, "could not take back the copy of an unpublished document");
            }
            return Err(e);
        }
        if !replaced.is_empty() || !lost.is_empty() {
            // Unsynced: a copy older than a visible version is dropped at open anyway.
            let mut c = Batch::default();
            for r in replaced.iter().chain(&lost) {
                for tag in [TAG_MANIFEST, TAG_STATE, TAG_TOKENS] {
                    c.delete(Space::Docs, doc_row_key(tag, r));
                }
            }
            if let Err(err) = inner.engine.write(copy_shard, c, false) {
                tracing::warn!(doc = %doc, %err, "could not delete replaced copies; open will");
            }
            for r in &lost {
                idx.lost.remove(r);
            }
        }

        idx.add_doc(entry);
        for (k, _) in self.pending.drain(..) {
            release_pending(&mut idx, &k);
        }
        self.done = true;
        let victims: Vec<_> = replaced
            .into_iter()
            .map(|r| (r, EvictReason::Replaced))
            .collect();
        // The replaced rows went away in the publish batch: only the in-memory part.
        inner.remove_docs(&mut idx, victims, false)?;
        let plan = inner.plan_eviction(&idx, Some(&doc));
        inner.remove_docs(&mut idx, plan, true)?;
        inner.publish_gauges(&idx);
        tracing::debug!(doc = %doc, "document published");
        Ok(doc)
    }
}

fn release_pending(idx: &mut Index, k: &BlockKey) {
    if let Some(n) = idx.pending.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            idx.pending.remove(k);
        }
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut idx = self.inner.lock();
        let mut free = Vec::new();
        for (k, layers) in &self.pending {
            release_pending(&mut idx, k);
            if !idx.pending.contains_key(k) && !idx.blocks.contains_key(k) {
                free.push((*k, *layers, 0));
            }
        }
        free.sort_by_key(|f| f.0);
        free.dedup_by_key(|f| f.0);
        if let Err(e) = self.inner.delete_blocks(&mut idx, &free) {
            tracing::warn!(err = %e, "abandoned ingest cleanup failed; gc will retry");
        }
    }
}
