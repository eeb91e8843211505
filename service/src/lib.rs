//! starkv's service core, between the front ends (HTTP in `starkv_api`, the operator CLI in
//! `starkv_ops`) and the libraries (`starkv_compute`, `starkv_cache`): ingest a document
//! into the store with Star Attention phase 1, answer questions over a stored document with
//! phase 2, the ingest job queue, eviction and verify/repair, and the glue between
//! compute's KV blocks and the store's tensors.
//!
//! Everything here is blocking (model compute, RocksDB); front ends call it from worker
//! threads, never from async tasks. This crate knows nothing about HTTP.

pub mod admin;
mod cold;
mod error;
pub mod jobs;

pub use error::{ServiceError, ServiceResult};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use starkv_cache::{BlockKey, BlockStore, DType, DocRef, DocSpec, Tensor};
use starkv_compute::LoadedModel;
use starkv_compute::backend::{Backend, BlockEncoder, BlockId, StoredContext};
use starkv_compute::cpu::attention::HeadShape;
use starkv_compute::generate::{GenerateParams, StopReason};
use starkv_compute::prompt;
use starkv_compute::sampling::SamplingParams;
use starkv_compute::star::{BlockKv, StarConfig};

/// Layout of stored KV: per layer one tensor `[2 (K, V), kv_heads, tokens, head_dim]`,
/// K rotated at global positions. Part of every block key: changing it re-encodes.
pub const KV_LAYOUT_VERSION: u32 = 1;

/// An ingest request, validated by the HTTP layer.
#[derive(Debug, Clone)]
pub struct IngestRequest {
    pub id: String,
    pub tenant: String,
    pub text: String,
    pub block_size: usize,
    pub anchor_size: usize,
    pub pinned: bool,
    pub ttl_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct IngestOutcome {
    pub doc: DocRef,
    pub tokens: usize,
    pub blocks: usize,
    /// Blocks whose content key was already stored (not re-encoded).
    pub reused_blocks: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone)]
pub struct QueryRequest {
    pub question: String,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct QueryOutcome {
    pub answer: String,
    pub stop_reason: StopReason,
    pub context_tokens: usize,
    pub query_tokens: usize,
    pub generated_tokens: usize,
    pub load: Duration,
    pub first_token: Duration,
    pub total: Duration,
    /// Blocks that failed verification and were re-encoded from the stored source tokens.
    pub repaired_blocks: usize,
    /// Context blocks already resident on the GPU (not loaded; always 0 on the CPU).
    pub resident_blocks: usize,
}

/// The loaded model, the device it runs on and the store, shared by all requests.
pub struct Service {
    model: LoadedModel,
    backend: Backend,
    model_id: String,
    model_fingerprint: Vec<u8>,
    store: BlockStore,
    /// Decoded, compute-ready blocks by content key (the store's own hot tier holds
    /// the f16 tensors; this saves the conversion on repeat queries).
    ready: Mutex<ReadyBlocks>,
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
        let model_fingerprint = file_fingerprint(model_path)?;
        let model_id = model_path
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned());
        Ok(Self {
            model,
            backend,
            model_id,
            model_fingerprint,
            store,
            ready: Mutex::new(ReadyBlocks::new(ready_budget_bytes)),
        })
    }

    pub fn store(&self) -> &BlockStore {
        &self.store
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// The device the model runs on.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    fn shape(&self) -> HeadShape {
        self.model.model.head_shape()
    }

    /// Phase 1 of a stored document's source tokens (repairs re-encode from them).
    fn encoder<'a>(
        &'a self,
        tokens: &'a [u32],
        manifest: &starkv_cache::Manifest,
    ) -> ServiceResult<BlockEncoder<'a>> {
        let config = StarConfig {
            block_size: manifest.block_size as usize,
            anchor_size: manifest.anchor_size as usize,
        };
        Ok(self.backend.phase1(&self.model.model, tokens, config)?)
    }

    /// Context tokens of a document text (what ingest stores and encodes).
    pub fn document_tokens(&self, text: &str) -> ServiceResult<Vec<u32>> {
        Ok(prompt::document_context(&self.model.tokenizer, None, text)?)
    }

    /// Phase 1: encodes the blocks whose content key is not stored yet, then publishes the
    /// document (blocks first, manifest last). `progress(done, total)` follows the blocks.
    pub fn ingest(
        &self,
        req: &IngestRequest,
        tokens: Vec<u32>,
        progress: &dyn Fn(usize, usize),
    ) -> ServiceResult<IngestOutcome> {
        let started = Instant::now();
        let config = StarConfig {
            block_size: req.block_size,
            anchor_size: req.anchor_size,
        };
        let mut encoder = self.backend.phase1(&self.model.model, &tokens, config)?;
        let mut spec = DocSpec::new(req.id.clone(), req.tenant.clone());
        spec.model_fingerprint = self.model_fingerprint.clone();
        spec.tokenizer_fingerprint = self.model.tokenizer.fingerprint().to_vec();
        spec.kv_layout_version = KV_LAYOUT_VERSION;
        // The device's 16-bit type on a GPU host (a cold load is then a copy), else f16.
        spec.dtype = cold::kv_dtype(self.backend.stored_half_type());
        spec.block_size = req.block_size as u32;
        spec.anchor_size = req.anchor_size as u32;
        spec.source_tokens = tokens.clone();
        spec.pinned = req.pinned;
        spec.ttl_ms = req.ttl_ms;
        let spec_dtype = spec.dtype;
        let mut ingest = self.store.begin_ingest(spec)?;
        let anchor_tokens = encoder.anchor_tokens().to_vec();
        let n_blocks = encoder.n_blocks();
        let mut reused = 0;
        progress(0, n_blocks);
        for i in 0..n_blocks {
            let range = encoder.block_range(i);
            let key = ingest.block_key(&anchor_tokens, &tokens[range.clone()], range.start as u64);
            if ingest.reuse_block(key, range.start as u64, range.len() as u32) {
                reused += 1;
            } else {
                let block = encoder.encode_block_resident(i, key.0)?;
                ingest.put_block(
                    key,
                    range.start as u64,
                    range.len() as u32,
                    &to_tensors(&block, spec_dtype)?,
                )?;
            }
            progress(i + 1, n_blocks);
        }
        let doc = ingest.commit()?;
        Ok(IngestOutcome {
            doc,
            tokens: tokens.len(),
            blocks: n_blocks,
            reused_blocks: reused,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Phase 2: answers `req` over the stored blocks of `doc` (which must belong to
    /// `tenant`). A block that fails verification is re-encoded from the stored source
    /// tokens, written back, and used: the answer is unaffected.
    pub fn query(
        &self,
        doc: &str,
        tenant: &str,
        req: &QueryRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> ServiceResult<QueryOutcome> {
        let started = Instant::now();
        let lease = self.store.open_doc(doc)?;
        let manifest = lease.manifest().clone();
        if manifest.tenant != tenant {
            return Err(ServiceError::NotFound(format!("document {doc} not found")));
        }
        if manifest.model_fingerprint != self.model_fingerprint {
            return Err(ServiceError::Conflict(format!(
                "document {doc} was encoded with another model; re-ingest it to query with {}",
                self.model_id
            )));
        }
        let tokens = lease.source_tokens()?;
        let query_ids = prompt::question_query(&self.model.tokenizer, &req.question)?;
        let keys: Vec<BlockId> = manifest.blocks.iter().map(|b| b.key.0).collect();
        let params = GenerateParams {
            max_tokens: req.max_tokens,
            sampling: req.sampling.clone(),
            stop: req.stop.clone(),
        };
        let mut repaired = 0;
        let mut repair: Option<BlockEncoder<'_>> = None;
        // Only blocks the device does not hold come through here: the decoded copy, else
        // the store, else (a failed checksum) a re-encode from the source tokens.
        let mut load = |i: usize| -> ServiceResult<Arc<BlockKv>> {
            let block_ref = &manifest.blocks[i];
            if let Some(ready) = self
                .ready
                .lock()
                .expect("ready-block cache lock")
                .get(&block_ref.key)
            {
                return Ok(ready);
            }
            let kv = match lease.read_block(i) {
                Ok(layers) => from_tensors(&layers, block_ref.start as usize, self.shape())?,
                Err(e) if is_corruption(&e) => {
                    tracing::warn!(doc, block = i, error = %e, "repairing a corrupt block from its source tokens");
                    let encoder = match &mut repair {
                        Some(encoder) => encoder,
                        None => repair.insert(self.encoder(&tokens, &manifest)?),
                    };
                    let kv = encoder.encode_block(i)?;
                    self.store
                        .repair_block(block_ref.key, &to_tensors(&kv, manifest.dtype)?)?;
                    metrics::counter!("starkv_blocks_repaired_total").increment(1);
                    repaired += 1;
                    kv
                }
                Err(e) => return Err(e.into()),
            };
            let kv = Arc::new(kv);
            self.ready
                .lock()
                .expect("ready-block cache lock")
                .insert(block_ref.key, kv.clone());
            Ok(kv)
        };
        let before_answer = started.elapsed();
        let answer = if self.backend.stored_half_type().is_some() {
            // A GPU: missing blocks are read straight into staging and re-encoded at once.
            let config = StarConfig {
                block_size: manifest.block_size as usize,
                anchor_size: manifest.anchor_size as usize,
            };
            let reader = cold::StoreReader::new(&lease);
            let stored = StoredContext {
                tokens: &tokens,
                config,
                reader: &reader,
            };
            let answer = self.backend.answer_stored(
                &self.model,
                &keys,
                &stored,
                &query_ids,
                &params,
                on_text,
            )?;
            repaired += self.repair_unreadable(&answer, &tokens, &manifest)?;
            answer
        } else {
            self.backend
                .answer(&self.model, &keys, &mut load, &query_ids, &params, on_text)?
        };
        drop(lease);
        let generation = answer.generation;
        let load = before_answer + answer.load;
        Ok(QueryOutcome {
            answer: generation.text,
            stop_reason: generation.stop_reason,
            context_tokens: tokens.len(),
            query_tokens: query_ids.len(),
            generated_tokens: generation.ids.len(),
            load,
            first_token: load + generation.prefill,
            total: started.elapsed(),
            repaired_blocks: repaired,
            resident_blocks: answer.resident_blocks,
        })
    }

    /// After a cold load on a GPU: the blocks whose read failed were re-encoded for the
    /// answer; re-encode them once more for the store and write them back. Returns how
    /// many.
    fn repair_unreadable(
        &self,
        answer: &starkv_compute::backend::Answer,
        tokens: &[u32],
        manifest: &starkv_cache::Manifest,
    ) -> ServiceResult<usize> {
        let Some(cold) = &answer.cold else {
            return Ok(0);
        };
        let mut encoder = None;
        for (i, why) in &cold.failed_reads {
            tracing::warn!(doc = %manifest.doc.doc, block = i, error = %why, "repairing an unreadable block from its source tokens");
            let encoder = match &mut encoder {
                Some(e) => e,
                None => encoder.insert(self.encoder(tokens, manifest)?),
            };
            let kv = encoder.encode_block(*i)?;
            self.store
                .repair_block(manifest.blocks[*i].key, &to_tensors(&kv, manifest.dtype)?)?;
            metrics::counter!("starkv_blocks_repaired_total").increment(1);
        }
        Ok(cold.failed_reads.len())
    }

    /// Re-encodes every block the store has marked for repair (a failed checksum) from
    /// the stored source tokens of a document that references it. Returns how many.
    pub fn repair_pending(&self) -> ServiceResult<usize> {
        let mut repaired = 0;
        for item in self.store.repair_queue() {
            let Some((doc, block_ref)) = item.docs.first() else {
                continue;
            };
            let lease = self.store.open_version(doc)?;
            let manifest = lease.manifest().clone();
            let tokens = lease.source_tokens()?;
            let mut encoder = self.encoder(&tokens, &manifest)?;
            let kv =
                encoder.encode_block(block_ref.start as usize / manifest.block_size as usize)?;
            self.store
                .repair_block(item.block, &to_tensors(&kv, manifest.dtype)?)?;
            metrics::counter!("starkv_blocks_repaired_total").increment(1);
            repaired += 1;
        }
        Ok(repaired)
    }

    /// Drops compute-ready copies (e.g. after eviction), host and GPU-resident; the
    /// store's own tiers are separate.
    pub fn forget_ready_blocks(&self) {
        self.ready.lock().expect("ready-block cache lock").clear();
        self.backend.forget_resident();
    }
}

fn is_corruption(e: &starkv_cache::Error) -> bool {
    matches!(
        e,
        starkv_cache::Error::Corrupt { .. } | starkv_cache::Error::MissingBlock { .. }
    )
}

/// SHA-256 of the model file: two servers with the same file share stored blocks.
fn file_fingerprint(path: &Path) -> ServiceResult<Vec<u8>> {
    use std::io::Read;
    let io = |e: std::io::Error| ServiceError::Internal(format!("reading {}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_vec())
}

/// One tensor per layer: `[2, kv_heads, tokens, head_dim]`, K then V.
fn to_tensors(block: &BlockKv, dtype: DType) -> ServiceResult<Vec<Tensor>> {
    let s = block.shape;
    block
        .layers
        .iter()
        .map(|(k, v)| {
            Tensor::kv_layer(
                dtype,
                s.n_kv_heads as u32,
                block.len as u32,
                s.head_dim as u32,
                k,
                v,
            )
            .map_err(|e| ServiceError::Internal(e.to_string()))
        })
        .collect()
}

fn from_tensors(layers: &[Arc<Tensor>], start: usize, shape: HeadShape) -> ServiceResult<BlockKv> {
    let first = layers
        .first()
        .ok_or_else(|| ServiceError::Internal("a stored block has no layers".into()))?;
    let dims = first.shape();
    if dims.len() != 4
        || dims[0] != 2
        || dims[1] as usize != shape.n_kv_heads
        || dims[3] as usize != shape.head_dim
    {
        return Err(ServiceError::Conflict(format!(
            "stored KV shape {dims:?} does not fit the model"
        )));
    }
    let len = dims[2] as usize;
    let mut block = BlockKv::new(start, len, shape, layers.len());
    for (l, t) in layers.iter().enumerate() {
        let mut values = t.to_f32();
        let v = values.split_off(values.len() / 2);
        block.layers[l] = (values, v);
    }
    Ok(block)
}

/// A byte-bounded LRU of compute-ready blocks.
struct ReadyBlocks {
    budget: usize,
    bytes: usize,
    tick: u64,
    entries: HashMap<BlockKey, (Arc<BlockKv>, u64)>,
}

impl ReadyBlocks {
    fn new(budget: usize) -> Self {
        Self {
            budget,
            bytes: 0,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    fn get(&mut self, key: &BlockKey) -> Option<Arc<BlockKv>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(key).map(|(b, t)| {
            *t = tick;
            b.clone()
        })
    }

    fn insert(&mut self, key: BlockKey, block: Arc<BlockKv>) {
        let size = block.n_bytes();
        if size > self.budget {
            return;
        }
        while self.bytes + size > self.budget {
            let Some((&oldest, _)) = self.entries.iter().min_by_key(|(_, (_, t))| *t) else {
                break;
            };
            if let Some((b, _)) = self.entries.remove(&oldest) {
                self.bytes -= b.n_bytes();
            }
        }
        self.tick += 1;
        self.bytes += size;
        if let Some((old, _)) = self.entries.insert(key, (block, self.tick)) {
            self.bytes -= old.n_bytes();
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

/// Paths the server keeps under its data directory.
pub fn store_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("store")
}
