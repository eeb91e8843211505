//! RocksDB engine: one instance per block shard plus one meta instance.
//!
//! Why separate instances rather than column families of one DB:
//! - Each shard has its own WAL, memtables, flushes and compactions, so a large ingest
//!   into one shard does not stall writes to the others, and shard directories can be
//!   placed on different disks (mount points) without RocksDB's multi-path support.
//! - A shard is the natural unit of the Star Attention split: phase 2 reads a shard's
//!   blocks on one worker; separate instances keep that I/O independent.
//! - The cost is that a write batch cannot span shards. The store does not need that:
//!   it writes each block atomically inside its shard, syncs every touched shard's WAL,
//!   and only then publishes the manifest with a synced batch in the meta instance.
//!   That ordering, not a cross-shard transaction, is what makes a document visible only
//!   once all its blocks are durable.
//!
//! Column families inside a shard: `layers` (large encoded values, RocksDB compression
//! off because values are already zstd-compressed, optionally BlobDB), `index` (one
//! tiny row per block) and `docs` (second copies of document rows). The meta instance has
//! one family `meta` (LZ4).
//!
//! Damage and a full disk (see [`RocksEngine::open`]): an instance RocksDB cannot open
//! because of corruption is repaired (RocksDB's repair) or quarantined (moved under
//! `quarantine/` and reopened empty); the meta instance is read in full at open so damage
//! in it is found then; an instance whose writes stop (a sticky background error after
//! ENOSPC or corruption) is reopened; a disk reserve file is released when the disk is
//! full. Every such action is recorded ([`Engine::recoveries`]) and logged.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, Direction,
    ErrorKind, IteratorMode, LogLevel, Options, ReadOptions, WriteBatch, WriteOptions,
};

use super::{Batch, Engine, Op, Recovery, RecoveryAction, Space, Target};
use crate::error::{Error, Result};

const CF_LAYERS: &str = "layers";
const CF_INDEX: &str = "index";
const CF_META: &str = "meta";
const CF_DOCS: &str = "docs";
/// Where damaged instances are moved (never named `shard-*`, so shard counting ignores it).
const QUARANTINE_DIR: &str = "quarantine";
/// The disk reserve: a file of `reserve_bytes` released when the disk fills, so that the
/// store can still open, delete and compact.
const RESERVE_FILE: &str = "disk-reserve";

/// Settings of the RocksDB engine.
#[derive(Clone, Debug)]
pub struct RocksConfig {
    /// Root directory: `meta/` and `shard-000/`, `shard-001/`, ... below it.
    pub path: PathBuf,
    /// Number of block shards. Fixed at creation: block placement depends on it, so
    /// reopening with a different count is refused.
    pub shards: usize,
    /// Store layer values in BlobDB blob files (see the crate docs for the measurement
    /// behind the default).
    pub blob_files: bool,
    /// Values at least this large go to blob files when `blob_files` is on.
    pub min_blob_size: u64,
    /// Memtable size per shard.
    pub write_buffer_bytes: usize,
    /// Background flush/compaction threads per instance.
    pub background_jobs: i32,
    /// Size of the disk reserve file kept under `path` (0: none). When the disk fills
    /// (an open or a write fails with ENOSPC) the file is deleted, which gives RocksDB the
    /// room to open, write the deletes and compact them; it is recreated once the space
    /// is back.
    pub reserve_bytes: u64,
}

impl RocksConfig {
    /// Defaults for `path` with `shards` shards.
    pub fn new(path: impl Into<PathBuf>, shards: usize) -> Self {
        RocksConfig {
            path: path.into(),
            shards,
            blob_files: true,
            min_blob_size: 4096,
            write_buffer_bytes: 64 << 20,
            background_jobs: 2,
            reserve_bytes: 64 << 20,
        }
    }
}

/// One RocksDB instance. The handle sits behind a lock so that a damaged or stopped
/// instance (RocksDB refuses writes after a failed flush, e.g. on ENOSPC or corruption)
/// can be closed, repaired or quarantined and reopened while the engine lives.
struct Instance {
    target: Target,
    path: PathBuf,
    db: RwLock<Option<DB>>,
    /// Bumped at every (re)open, so concurrent writers reopen a stopped handle once.
    generation: AtomicU64,
}

/// The RocksDB [`Engine`].
pub struct RocksEngine {
    meta: Instance,
    shards: Vec<Instance>,
    cfg: RocksConfig,
    recoveries: Mutex<Vec<Recovery>>,
    reserve_spent: AtomicBool,
}

fn engine_err(context: impl Into<String>, e: rocksdb::Error) -> Error {
    let context = context.into();
    let message = e.into_string();
    if is_no_space(&message) {
        Error::DiskFull { context, message }
    } else if message.starts_with("Corruption") {
        Error::EngineCorruption { context, message }
    } else {
        Error::Engine { context, message }
    }
}

fn is_no_space(message: &str) -> bool {
    message.contains("No space left on device") || message.contains("NoSpace")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn db_options(cfg: &RocksConfig) -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    o.set_max_background_jobs(cfg.background_jobs.max(1));
    // Smooth write-back instead of huge fsyncs at flush time.
    o.set_bytes_per_sync(1 << 20);
    o.set_wal_bytes_per_sync(1 << 20);
    o.set_max_total_wal_size(256 << 20);
    o.set_keep_log_file_num(3);
    o.set_log_level(LogLevel::Warn);
    // Catch on-disk corruption at open rather than at a random later read.
    o.set_paranoid_checks(true);
    o
}

fn descriptors(cfg: &RocksConfig, target: Target) -> Vec<ColumnFamilyDescriptor> {
    match target {
        Target::Meta => {
            let mut meta_cf = Options::default();
            meta_cf.set_compression_type(DBCompressionType::Lz4);
            vec![ColumnFamilyDescriptor::new(CF_META, meta_cf)]
        }
        Target::Shard(_) => {
            let mut layers = Options::default();
            // Values are zstd-compressed by our codec: RocksDB compression would only
            // burn CPU.
            layers.set_compression_type(DBCompressionType::None);
            layers.set_write_buffer_size(cfg.write_buffer_bytes);
            layers.set_target_file_size_base(128 << 20);
            let mut table = BlockBasedOptions::default();
            // Large values occupy their own data block anyway; bigger blocks keep the
            // index small for the plain-SST configuration.
            table.set_block_size(64 << 10);
            layers.set_block_based_table_factory(&table);
            if cfg.blob_files {
                layers.set_enable_blob_files(true);
                layers.set_min_blob_size(cfg.min_blob_size);
                layers.set_blob_file_size(256 << 20);
                layers.set_blob_compression_type(DBCompressionType::None);
                layers.set_enable_blob_gc(true);
            }
            let mut index = Options::default();
            index.set_compression_type(DBCompressionType::Lz4);
            let mut docs = Options::default();
            docs.set_compression_type(DBCompressionType::Lz4);
            vec![
                ColumnFamilyDescriptor::new(CF_LAYERS, layers),
                ColumnFamilyDescriptor::new(CF_INDEX, index),
                ColumnFamilyDescriptor::new(CF_DOCS, docs),
            ]
        }
    }
}

impl RocksEngine {
    /// Opens (creating if needed) the engine under `cfg.path`.
    ///
    /// An instance that RocksDB refuses to open because of on-disk damage (a checksum
    /// mismatch, a bad magic number, a broken MANIFEST) does not stop the engine: it is
    /// repaired or quarantined (see [`RocksEngine::recover`]) and the action is recorded
    /// in [`Engine::recoveries`]. An open that fails for lack of disk space releases the
    /// disk reserve and tries again.
    pub fn open(cfg: RocksConfig) -> Result<Self> {
        if cfg.shards == 0 || cfg.shards > 4096 {
            return Err(Error::InvalidArgument(format!(
                "shard count {} not in 1..=4096",
                cfg.shards
            )));
        }
        std::fs::create_dir_all(&cfg.path).map_err(|source| Error::Io {
            context: "create store directory",
            source,
        })?;
        let existing = count_shard_dirs(&cfg.path)?;
        if existing != 0 && existing != cfg.shards {
            return Err(Error::ConfigMismatch(format!(
                "{} was created with {existing} shards, opened with {}",
                cfg.path.display(),
                cfg.shards
            )));
        }
        let instance = |target: Target, path: PathBuf| Instance {
            target,
            path,
            db: RwLock::new(None),
            generation: AtomicU64::new(0),
        };
        let engine = RocksEngine {
            meta: instance(Target::Meta, cfg.path.join("meta")),
            shards: (0..cfg.shards)
                .map(|i| instance(Target::Shard(i), shard_path(&cfg.path, i)))
                .collect(),
            cfg,
            recoveries: Mutex::new(Vec::new()),
            reserve_spent: AtomicBool::new(false),
        };
        for inst in std::iter::once(&engine.meta).chain(&engine.shards) {
            let db = engine.open_instance(inst)?;
            *inst.db.write().unwrap_or_else(|p| p.into_inner()) = Some(db);
        }
        // The meta instance is small and holds what every document depends on: read all
        // of it once with checksums on, so damage in a data block is found (and
        // repaired) now, not as a failed scan or a 500 later.
        if let Err(e) = engine.check_meta() {
            engine.recover(Target::Meta, &e.to_string())?;
            engine.check_meta()?;
        }
        engine.ensure_reserve();
        Ok(engine)
    }

    /// The configuration this engine was opened with.
    pub fn config(&self) -> &RocksConfig {
        &self.cfg
    }

    fn instance(&self, target: Target) -> Result<&Instance> {
        match target {
            Target::Meta => Ok(&self.meta),
            Target::Shard(i) => self
                .shards
                .get(i)
                .ok_or_else(|| Error::InvalidArgument(format!("no shard {i}"))),
        }
    }

    fn record(&self, target: Target, action: RecoveryAction, cause: &str) {
        tracing::error!(?target, ?action, cause, "store instance recovered");
        self.recoveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Recovery {
                target,
                action,
                cause: cause.to_string(),
                at_ms: now_ms(),
            });
    }

    fn try_open(&self, inst: &Instance) -> std::result::Result<DB, rocksdb::Error> {
        DB::open_cf_descriptors(
            &db_options(&self.cfg),
            &inst.path,
            descriptors(&self.cfg, inst.target),
        )
    }

    /// Opens one instance, recovering from damage and from a full disk.
    fn open_instance(&self, inst: &Instance) -> Result<DB> {
        let first = match self.try_open(inst) {
            Ok(db) => return Ok(db),
            Err(e) => e,
        };
        let message = first.to_string();
        if is_no_space(&message)
            && self.release_reserve(inst.target, &message)
            && let Ok(db) = self.try_open(inst)
        {
            return Ok(db);
        }
        // Damage: a corrupt file, or a MANIFEST that CURRENT names but is gone (a
        // flipped byte in CURRENT). A lock held by another process is neither.
        let damaged = first.kind() == ErrorKind::Corruption
            || (first.kind() == ErrorKind::IOError
                && message.contains("No such file or directory"));
        if !damaged {
            return Err(engine_err(format!("open {}", inst.path.display()), first));
        }
        self.repair_or_quarantine(inst, &message)
    }

    /// Checks every meta row's RocksDB checksums (a full scan).
    fn check_meta(&self) -> Result<()> {
        let guard = self.guard(Target::Meta)?;
        let db = guard.as_ref().expect("checked by guard");
        let cf = cf(db, CF_META)?;
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(true);
        ro.fill_cache(false);
        for item in db.iterator_cf_opt(cf, ro, IteratorMode::Start) {
            item.map_err(|e| engine_err("verify meta", e))?;
        }
        Ok(())
    }

    /// RocksDB's own repair when it can do the job, else quarantine.
    ///
    /// `DB::repair` rebuilds the MANIFEST from the table files it can read and moves
    /// unreadable ones to `lost/`; keys in a lost table are gone (the store sees missing
    /// blocks and re-encodes them, or restores manifests from their copies). It does not
    /// know BlobDB blob files (RocksDB 11: the repairer only registers tables), so a shard
    /// with blob files would come back with dangling blob references and blob file
    /// numbers that new files may reuse. Such a shard is quarantined instead: moved to
    /// `quarantine/` (kept for inspection, reported) and reopened empty; its blocks become
    /// misses that the service re-encodes from the stored source tokens.
    fn repair_or_quarantine(&self, inst: &Instance, cause: &str) -> Result<DB> {
        if !has_blob_files(&inst.path) {
            match DB::repair(&db_options(&self.cfg), &inst.path) {
                Ok(()) => match self.try_open(inst) {
                    Ok(db) => {
                        self.record(inst.target, RecoveryAction::Repaired, cause);
                        return Ok(db);
                    }
                    Err(e) => {
                        tracing::error!(path = %inst.path.display(), error = %e, "open after repair failed")
                    }
                },
                Err(e) => {
                    tracing::error!(path = %inst.path.display(), error = %e, "RocksDB repair failed")
                }
            }
        }
        let name = inst
            .path
            .file_name()
            .map_or("instance".into(), |n| n.to_string_lossy().into_owned());
        let dest_dir = self.cfg.path.join(QUARANTINE_DIR);
        std::fs::create_dir_all(&dest_dir).map_err(|source| Error::Io {
            context: "create quarantine directory",
            source,
        })?;
        let dest = dest_dir.join(format!("{name}-{}", now_ms()));
        std::fs::rename(&inst.path, &dest).map_err(|source| Error::Io {
            context: "quarantine a damaged instance",
            source,
        })?;
        let db = self
            .try_open(inst)
            .map_err(|e| engine_err(format!("open {} after quarantine", inst.path.display()), e))?;
        self.record(
            inst.target,
            RecoveryAction::Quarantined {
                moved_to: dest.display().to_string(),
            },
            cause,
        );
        Ok(db)
    }

    /// Closes a damaged or stopped instance, repairs or quarantines it and reopens it.
    /// Callers (the store, after RocksDB reported corruption) must expect lost keys.
    pub fn recover(&self, target: Target, cause: &str) -> Result<()> {
        let inst = self.instance(target)?;
        let mut slot = inst.db.write().unwrap_or_else(|p| p.into_inner());
        drop(slot.take());
        *slot = Some(self.repair_or_quarantine(inst, cause)?);
        inst.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Closes and reopens an instance that stopped taking writes (RocksDB keeps a failed
    /// background flush or WAL write as a sticky error until the DB is reopened).
    fn reopen(&self, target: Target, seen_generation: u64) -> Result<()> {
        let inst = self.instance(target)?;
        let mut slot = inst.db.write().unwrap_or_else(|p| p.into_inner());
        // Another writer may have reopened it meanwhile: only reopen the handle we saw.
        if inst.generation.load(Ordering::SeqCst) != seen_generation {
            return Ok(());
        }
        drop(slot.take());
        *slot = Some(self.open_instance(inst)?);
        inst.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn guard(&self, target: Target) -> Result<RwLockReadGuard<'_, Option<DB>>> {
        let inst = self.instance(target)?;
        let g = inst.db.read().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            return Err(Error::Engine {
                context: format!("{target:?}"),
                message: "instance is closed (a recovery failed)".into(),
            });
        }
        Ok(g)
    }

    fn reserve_path(&self) -> PathBuf {
        self.cfg.path.join(RESERVE_FILE)
    }

    /// Deletes the disk reserve; true when there was one to delete.
    fn release_reserve(&self, target: Target, cause: &str) -> bool {
        let path = self.reserve_path();
        if self.cfg.reserve_bytes == 0 || std::fs::remove_file(&path).is_err() {
            return false;
        }
        self.reserve_spent.store(true, Ordering::SeqCst);
        self.record(
            target,
            RecoveryAction::ReserveReleased {
                bytes: self.cfg.reserve_bytes,
            },
            cause,
        );
        true
    }

    /// (Re)creates the disk reserve when it is missing and the disk has room for it with
    /// as much to spare again.
    fn ensure_reserve(&self) {
        let n = self.cfg.reserve_bytes;
        let path = self.reserve_path();
        if n == 0 || path.exists() {
            return;
        }
        if free_disk_bytes(&self.cfg.path).is_none_or(|free| free < n.saturating_mul(2)) {
            return;
        }
        let tmp = self.cfg.path.join(format!("{RESERVE_FILE}.tmp"));
        let made = (|| -> std::io::Result<()> {
            let f = std::fs::File::create(&tmp)?;
            // Real blocks (not a sparse file): the point is that the space is taken.
            let chunk = vec![0u8; 1 << 20];
            let mut w = std::io::BufWriter::new(&f);
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                std::io::Write::write_all(&mut w, &chunk[..k])?;
                left -= k as u64;
            }
            std::io::Write::flush(&mut w)?;
            drop(w);
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        match made {
            Ok(()) => self.reserve_spent.store(false, Ordering::SeqCst),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(error = %e, "could not create the disk reserve");
            }
        }
    }
}

/// Free bytes for unprivileged writers on the filesystem holding `path`.
pub fn free_disk_bytes(path: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(path).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

fn has_blob_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".blob"))
    })
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a ColumnFamily> {
    db.cf_handle(name)
        .ok_or_else(|| Error::InvalidArgument(format!("missing column family {name}")))
}

fn cf_name(target: Target, space: Space) -> Result<&'static str> {
    match (target, space) {
        (Target::Meta, Space::Meta) => Ok(CF_META),
        (Target::Shard(_), Space::Layers) => Ok(CF_LAYERS),
        (Target::Shard(_), Space::BlockIndex) => Ok(CF_INDEX),
        (Target::Shard(_), Space::Docs) => Ok(CF_DOCS),
        _ => Err(Error::InvalidArgument(format!(
            "rocks engine: no space {space:?} in {target:?}"
        ))),
    }
}

fn shard_path(root: &Path, i: usize) -> PathBuf {
    root.join(format!("shard-{i:03}"))
}

fn count_shard_dirs(root: &Path) -> Result<usize> {
    let rd = std::fs::read_dir(root).map_err(|source| Error::Io {
        context: "list store directory",
        source,
    })?;
    Ok(rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("shard-"))
        .count())
}

fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

impl RocksEngine {
    fn write_once(&self, target: Target, batch: &Batch, sync: bool) -> Result<()> {
        let generation = self.instance(target)?.generation.load(Ordering::SeqCst);
        let guard = self.guard(target)?;
        let db = guard.as_ref().expect("checked by guard");
        let mut wb = WriteBatch::default();
        for op in &batch.ops {
            match op {
                Op::Put { space, key, value } => {
                    wb.put_cf(cf(db, cf_name(target, *space)?)?, key, value)
                }
                Op::Delete { space, key } => wb.delete_cf(cf(db, cf_name(target, *space)?)?, key),
                Op::DeleteRange { space, start, end } => {
                    wb.delete_range_cf(cf(db, cf_name(target, *space)?)?, start, end)
                }
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        match db.write_opt(wb, &wo) {
            Ok(()) => Ok(()),
            Err(e) => {
                let err = engine_err(format!("write {target:?}"), e);
                // A failed WAL write or background flush is sticky in RocksDB: the
                // instance refuses every later write until it is reopened. Reopen it
                // (after freeing the disk reserve when the disk is full) so that deletes,
                // which give space back, still work.
                drop(guard);
                match &err {
                    Error::DiskFull { message, .. } => {
                        self.release_reserve(target, message);
                        self.reopen(target, generation)?;
                    }
                    Error::EngineCorruption { message, .. } => {
                        self.recover(target, message)?;
                    }
                    _ => return Err(err),
                }
                Err(err)
            }
        }
    }
}

impl Engine for RocksEngine {
    fn shards(&self) -> usize {
        self.shards.len()
    }

    fn write(&self, target: Target, batch: Batch, sync: bool) -> Result<()> {
        match self.write_once(target, &batch, sync) {
            Ok(()) => Ok(()),
            // Retried once on the reopened (or recovered) instance.
            Err(Error::DiskFull { .. } | Error::EngineCorruption { .. }) => {
                self.write_once(target, &batch, sync)
            }
            Err(e) => Err(e),
        }
    }

    fn sync(&self, target: Target) -> Result<()> {
        let guard = self.guard(target)?;
        guard
            .as_ref()
            .expect("checked by guard")
            .flush_wal(true)
            .map_err(|e| engine_err(format!("sync {target:?}"), e))
    }

    fn get(
        &self,
        target: Target,
        space: Space,
        key: &[u8],
        f: &mut dyn FnMut(Option<&[u8]>),
    ) -> Result<()> {
        let guard = self.guard(target)?;
        let db = guard.as_ref().expect("checked by guard");
        let cf = cf(db, cf_name(target, space)?)?;
        let mut ro = ReadOptions::default();
        // Our hot tier caches decoded layers; caching encoded copies in RocksDB's block
        // cache would only evict index blocks.
        ro.fill_cache(space != Space::Layers);
        if space == Space::Layers {
            // Every layer value carries its own CRC-32 (verified by the codec before
            // use); RocksDB's block/blob checksum on top would be the same work twice.
            ro.set_verify_checksums(false);
        }
        let v = db
            .get_pinned_cf_opt(cf, key, &ro)
            .map_err(|e| engine_err(format!("get {target:?}/{space:?}"), e))?;
        f(v.as_deref());
        Ok(())
    }

    fn scan(
        &self,
        target: Target,
        space: Space,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let guard = self.guard(target)?;
        let db = guard.as_ref().expect("checked by guard");
        let cf = cf(db, cf_name(target, space)?)?;
        let it = db.iterator_cf(cf, IteratorMode::From(prefix, Direction::Forward));
        for item in it {
            let (k, v) = item.map_err(|e| engine_err(format!("scan {target:?}/{space:?}"), e))?;
            if !k.starts_with(prefix) || !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let all = std::iter::once((Target::Meta, vec![CF_META])).chain(
            (0..self.shards.len()).map(|i| (Target::Shard(i), vec![CF_LAYERS, CF_INDEX, CF_DOCS])),
        );
        for (target, cfs) in all {
            let guard = self.guard(target)?;
            let db = guard.as_ref().expect("checked by guard");
            for name in cfs {
                db.flush_cf(cf(db, name)?)
                    .map_err(|e| engine_err(format!("flush {name}"), e))?;
            }
            db.flush_wal(true).map_err(|e| engine_err("flush wal", e))?;
        }
        Ok(())
    }

    fn reclaim(&self) -> Result<()> {
        {
            // The meta instance is small: a flush retires its WAL files.
            let guard = self.guard(Target::Meta)?;
            let db = guard.as_ref().expect("checked by guard");
            db.flush_cf(cf(db, CF_META)?)
                .map_err(|e| engine_err("flush meta", e))?;
        }
        for i in 0..self.shards.len() {
            let guard = self.guard(Target::Shard(i))?;
            let db = guard.as_ref().expect("checked by guard");
            for name in [CF_LAYERS, CF_INDEX, CF_DOCS] {
                let cf = cf(db, name)?;
                db.flush_cf(cf)
                    .map_err(|e| engine_err(format!("flush {name}"), e))?;
                // Rewrites every table so deleted keys (and with them the references that
                // keep blob files alive) are dropped; a blob file whose blobs are all
                // garbage is deleted at the end of the compaction.
                let mut opts = rocksdb::CompactOptions::default();
                opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
                db.compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &opts);
            }
            if self.cfg.blob_files {
                // Blob files that still hold some live blobs are only rewritten by blob GC,
                // which by default touches the oldest quarter of the files: for this one
                // full compaction, make every file eligible, so a delete gives its space
                // back even when its blobs share files with documents that stay.
                let layers = cf(db, CF_LAYERS)?;
                let set = |cutoff: &str| {
                    db.set_options_cf(layers, &[("blob_garbage_collection_age_cutoff", cutoff)])
                        .map_err(|e| engine_err("set blob gc cutoff", e))
                };
                set("1.0")?;
                let mut opts = rocksdb::CompactOptions::default();
                opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
                db.compact_range_cf_opt(layers, None::<&[u8]>, None::<&[u8]>, &opts);
                set("0.25")?;
            }
        }
        self.ensure_reserve();
        Ok(())
    }

    fn disk_usage(&self) -> Result<u64> {
        Ok(dir_size(&self.cfg.path))
    }

    fn free_disk_bytes(&self) -> Option<u64> {
        free_disk_bytes(&self.cfg.path)
    }

    fn reserve_spent(&self) -> bool {
        self.reserve_spent.load(Ordering::SeqCst)
    }

    fn recoveries(&self) -> Vec<Recovery> {
        self.recoveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn name(&self) -> &'static str {
        "rocksdb"
    }
}
