//! starkv's service core, between the front ends (HTTP in `starkv_api`, the operator CLI in
//! `starkv_ops`) and the libraries (`starkv_compute`, `starkv_cache`): ingest a document
//! into the store with Star Attention phase 1, answer questions over a stored document with
//! phase 2, the ingest job queue, eviction and verify/repair, and the glue between
//! compute's KV blocks and the store's tensors.
//!
//! Everything here is blocking (model compute, RocksDB); front ends call it from worker
//! threads, never from async tasks. This crate knows nothing about HTTP.

//!
//! Modules, one job each: [`ingest`] (phase 1 into the store), [`query`] (phase 2 over a
//! stored document), [`repair`] (re-encoding blocks that failed verification), `kv` (the
//! glue between compute's blocks and the store's tensors), [`naming`] (tenants and
//! document ids), [`jobs`] (the ingest queue), [`admin`] (eviction, verify), [`allocator`]
//! (glibc tuned for values of tens of MB), `error`.

pub mod admin;
pub mod allocator;
pub mod cluster;
mod cold;
mod error;
pub mod ingest;
pub mod jobs;
mod kv;
pub mod limits;
mod model_file;
pub mod naming;
pub mod query;
pub mod repair;
pub mod scope;
mod stored;

pub use cold::StoreReader;
pub use error::{ServiceError, ServiceResult};
pub use ingest::{IngestOutcome, IngestRequest, KvDtype};
pub use kv::KV_LAYOUT_VERSION;
pub use model_file::ModelFile;
pub use query::{QueryOutcome, QueryRequest};
pub use scope::DedupScope;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use starkv_cache::BlockStore;
use starkv_compute::LoadedModel;
use starkv_compute::backend::{Backend, BlockEncoder};
use starkv_compute::partial::HeadShape;
use starkv_compute::star::StarConfig;

use kv::ReadyBlocks;

/// The loaded model, the device it runs on and the store, shared by all requests.
pub struct Service {
    model: ModelFile,
    backend: Backend,
    store: BlockStore,
    /// Decoded, compute-ready blocks by content key (the store's own hot tier holds
    /// the f16 tensors; this saves the conversion on repeat queries).
    ready: Mutex<ReadyBlocks>,
    /// Shard workers holding the documents' blocks (`None`: this process holds them).
    cluster: Option<Arc<cluster::Cluster>>,
    /// Which documents share stored blocks (default: within a tenant only).
    dedup: DedupScope,
}

impl Service {
    /// A service on the CPU backend (operator tools, benchmarks, tests).
    pub fn new(
        model: LoadedModel,
        model_path: &Path,
        store: BlockStore,
        ready_budget_bytes: usize,
    ) -> ServiceResult<Self> {
        Self::with_backend(model, Backend::cpu(), model_path, store, ready_budget_bytes)
    }

    /// A service whose model runs on `backend` (built from `model.model`).
    pub fn with_backend(
        model: LoadedModel,
        backend: Backend,
        model_path: &Path,
        store: BlockStore,
        ready_budget_bytes: usize,
    ) -> ServiceResult<Self> {
        let model = ModelFile::with_loaded(model, model_path)?;
        Ok(Self::on_model(model, backend, store, ready_budget_bytes))
    }

    /// A service on `model` (shared with whoever else holds it: a server and its
    /// in-process workers), run by `backend` (built from `model.model().model`).
    pub fn on_model(
        model: ModelFile,
        backend: Backend,
        store: BlockStore,
        ready_budget_bytes: usize,
    ) -> Self {
        Self {
            model,
            backend,
            store,
            ready: Mutex::new(ReadyBlocks::new(ready_budget_bytes)),
            cluster: None,
            dedup: DedupScope::default(),
        }
    }

    /// Shares stored blocks as `scope` says (see [`DedupScope`]; the default is
    /// [`DedupScope::Tenant`]). A coordinator and its workers must agree on it.
    pub fn with_dedup_scope(mut self, scope: DedupScope) -> Self {
        self.dedup = scope;
        self
    }

    /// This service as the coordinator of `cluster`: documents are ingested into and
    /// queried from its workers; this process keeps the catalog and runs the model for
    /// the queries' own tokens.
    pub fn with_cluster(mut self, cluster: Arc<cluster::Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// The cluster this service coordinates, if any.
    pub fn cluster(&self) -> Option<&Arc<cluster::Cluster>> {
        self.cluster.as_ref()
    }

    /// SHA-256 of the model file (part of every block key).
    pub fn model_fingerprint(&self) -> &[u8] {
        self.model.fingerprint()
    }

    pub fn store(&self) -> &BlockStore {
        &self.store
    }

    pub fn model_id(&self) -> &str {
        self.model.id()
    }

    pub fn model(&self) -> &LoadedModel {
        self.model.model()
    }

    /// The model file, to share with in-process workers.
    pub fn model_file(&self) -> &ModelFile {
        &self.model
    }

    /// The device the model runs on.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    fn shape(&self) -> HeadShape {
        self.model().model.head_shape()
    }

    /// Whether loaded f16 blocks stay in f16 (the CPU: its attention widens a key tile
    /// at a time; a GPU uploads blocks in its own 16-bit type from f32).
    fn keeps_f16_blocks(&self) -> bool {
        self.backend.stored_half_type().is_none()
    }

    /// Phase 1 of a stored document's source tokens (repairs re-encode from them).
    fn encoder<'a>(
        &'a self,
        tokens: &'a [u32],
        manifest: &starkv_cache::Manifest,
    ) -> ServiceResult<BlockEncoder<'a>> {
        Ok(self
            .backend
            .phase1(&self.model().model, tokens, star_config(manifest))?)
    }

    /// Drops compute-ready copies (e.g. after eviction), host and GPU-resident; the
    /// store's own tiers are separate.
    pub fn forget_ready_blocks(&self) {
        self.ready.lock().expect("ready-block cache lock").clear();
        self.backend.forget_resident();
    }
}

/// Paths the server keeps under its data directory.
pub fn store_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("store")
}

/// The phase-1 configuration a stored document was encoded with: re-encoding one of its
/// blocks (repair, the cold path) must reproduce the stored KV exactly.
pub(crate) fn star_config(manifest: &starkv_cache::Manifest) -> StarConfig {
    StarConfig::with_anchor(manifest.block_size as usize, manifest.anchor_size as usize)
        .with_overlap(manifest.block_overlap as usize)
}
