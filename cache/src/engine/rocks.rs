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
//! off because values are already zstd-compressed, optionally BlobDB) and `index` (one
//! tiny row per block). The meta instance has one family `meta` (LZ4).

use std::path::{Path, PathBuf};

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, Direction,
    IteratorMode, LogLevel, Options, ReadOptions, WriteBatch, WriteOptions,
};

use super::{Batch, Engine, Op, Space, Target};
use crate::error::{Error, Result};

const CF_LAYERS: &str = "layers";
const CF_INDEX: &str = "index";
const CF_META: &str = "meta";

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
        }
    }
}

/// The RocksDB [`Engine`].
pub struct RocksEngine {
    meta: DB,
    shards: Vec<DB>,
    cfg: RocksConfig,
}

fn engine_err(context: impl Into<String>, e: rocksdb::Error) -> Error {
    Error::Engine {
        context: context.into(),
        message: e.into_string(),
    }
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

impl RocksEngine {
    /// Opens (creating if needed) the engine under `cfg.path`.
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
        let base = db_options(&cfg);

        let mut meta_cf = Options::default();
        meta_cf.set_compression_type(DBCompressionType::Lz4);
        let meta_path = cfg.path.join("meta");
        let meta = DB::open_cf_descriptors(
            &base,
            &meta_path,
            vec![ColumnFamilyDescriptor::new(CF_META, meta_cf)],
        )
        .map_err(|e| engine_err(format!("open {}", meta_path.display()), e))?;

        let mut shards = Vec::with_capacity(cfg.shards);
        for i in 0..cfg.shards {
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
            let path = shard_path(&cfg.path, i);
            let db = DB::open_cf_descriptors(
                &base,
                &path,
                vec![
                    ColumnFamilyDescriptor::new(CF_LAYERS, layers),
                    ColumnFamilyDescriptor::new(CF_INDEX, index),
                ],
            )
            .map_err(|e| engine_err(format!("open {}", path.display()), e))?;
            shards.push(db);
        }
        Ok(RocksEngine { meta, shards, cfg })
    }

    /// The configuration this engine was opened with.
    pub fn config(&self) -> &RocksConfig {
        &self.cfg
    }

    fn resolve(&self, target: Target, space: Space) -> Result<(&DB, &ColumnFamily)> {
        let (db, name) = match (target, space) {
            (Target::Meta, Space::Meta) => (&self.meta, CF_META),
            (Target::Shard(i), Space::Layers) if i < self.shards.len() => {
                (&self.shards[i], CF_LAYERS)
            }
            (Target::Shard(i), Space::BlockIndex) if i < self.shards.len() => {
                (&self.shards[i], CF_INDEX)
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "rocks engine: no space {space:?} in {target:?}"
                )));
            }
        };
        let cf = db
            .cf_handle(name)
            .ok_or_else(|| Error::InvalidArgument(format!("missing column family {name}")))?;
        Ok((db, cf))
    }

    fn db(&self, target: Target) -> Result<&DB> {
        match target {
            Target::Meta => Ok(&self.meta),
            Target::Shard(i) => self
                .shards
                .get(i)
                .ok_or_else(|| Error::InvalidArgument(format!("no shard {i}"))),
        }
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

impl Engine for RocksEngine {
    fn shards(&self) -> usize {
        self.shards.len()
    }

    fn write(&self, target: Target, batch: Batch, sync: bool) -> Result<()> {
        let db = self.db(target)?;
        let mut wb = WriteBatch::default();
        for op in batch.ops {
            match op {
                Op::Put { space, key, value } => {
                    let (_, cf) = self.resolve(target, space)?;
                    wb.put_cf(cf, key, value);
                }
                Op::Delete { space, key } => {
                    let (_, cf) = self.resolve(target, space)?;
                    wb.delete_cf(cf, key);
                }
                Op::DeleteRange { space, start, end } => {
                    let (_, cf) = self.resolve(target, space)?;
                    wb.delete_range_cf(cf, start, end);
                }
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        db.write_opt(wb, &wo)
            .map_err(|e| engine_err(format!("write {target:?}"), e))
    }

    fn sync(&self, target: Target) -> Result<()> {
        self.db(target)?
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
        let (db, cf) = self.resolve(target, space)?;
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
        let (db, cf) = self.resolve(target, space)?;
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
        let all = std::iter::once((&self.meta, vec![CF_META]))
            .chain(self.shards.iter().map(|db| (db, vec![CF_LAYERS, CF_INDEX])));
        for (db, cfs) in all {
            for name in cfs {
                let cf = db.cf_handle(name).ok_or_else(|| {
                    Error::InvalidArgument(format!("missing column family {name}"))
                })?;
                db.flush_cf(cf)
                    .map_err(|e| engine_err(format!("flush {name}"), e))?;
            }
            db.flush_wal(true).map_err(|e| engine_err("flush wal", e))?;
        }
        Ok(())
    }

    fn disk_usage(&self) -> Result<u64> {
        Ok(dir_size(&self.cfg.path))
    }

    fn name(&self) -> &'static str {
        "rocksdb"
    }
}
