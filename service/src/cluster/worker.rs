//! A shard worker's side of the protocol: encode the blocks it is given (anchor computed
//! once per document and request), keep them in its own store, and answer per-layer
//! partial attention over them from its device's hot tier.
//!
//! A worker is a [`Service`] (model, device, store, decoded-block cache) without HTTP;
//! its part of a document is an ordinary stored document (same name as at the
//! coordinator, holding only the worker's blocks and the whole source tokens), so the
//! store's guarantees (blocks first, manifest last; checksums; repair from the source
//! tokens) hold on every worker unchanged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use starkv_cache::{DType, DocLease};
use starkv_compute::star::AttentionShard;

use super::wire::{
    EncodeRequest, ErrorCode, Key, PROTOCOL_VERSION, Reply, Request, VerifyCounts, WorkerTime,
};
use crate::stored::StoredBlocks;
use crate::{IngestRequest, Service, ServiceError, ServiceResult};

/// Sessions unused this long are closed (their coordinator went away without closing).
const SESSION_IDLE: Duration = Duration::from_secs(600);

/// One worker: its service and the attention sessions coordinators opened.
pub struct WorkerNode {
    service: Arc<Service>,
    sessions: Mutex<HashMap<u64, Session>>,
    next_session: AtomicU64,
}

struct Session {
    shard: Arc<dyn AttentionShard>,
    /// Keeps the document version (and so its blocks) from eviction while in use.
    _lease: DocLease,
    last_used: Instant,
}

/// What `starkv worker` is told.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub data_dir: std::path::PathBuf,
    pub model_path: std::path::PathBuf,
    pub device: starkv_compute::cuda::DeviceChoice,
    /// RocksDB shards of a new store.
    pub shards: usize,
    /// Decoded blocks kept in memory.
    pub hot_tier_bytes: u64,
    /// GPU-resident block tier (`None`: half the free device memory).
    pub gpu_tier_bytes: Option<u64>,
}

impl WorkerNode {
    /// Loads the model onto the configured device (printing `starkv: device ...` on
    /// stderr) and opens the worker's own store under `data_dir`.
    pub fn open(config: &WorkerConfig) -> ServiceResult<Self> {
        Self::open_on(config, crate::ModelFile::open(&config.model_path)?)
    }

    /// [`WorkerNode::open`] on a model already loaded (`config.model_path` is not read):
    /// in-process workers share their server's.
    pub fn open_on(config: &WorkerConfig, model: crate::ModelFile) -> ServiceResult<Self> {
        let backend = starkv_compute::backend::Backend::new(
            &model.model().model,
            config.device,
            config.gpu_tier_bytes.map(|b| b as usize),
        )?;
        eprintln!("starkv: device {}", backend.selected());
        let store = starkv_cache::BlockStore::open_rocks(
            starkv_cache::RocksConfig::new(crate::store_dir(&config.data_dir), config.shards),
            starkv_cache::StoreConfig {
                hot_tier_bytes: config.hot_tier_bytes,
                ..starkv_cache::StoreConfig::default()
            },
        )?;
        let service = Service::on_model(model, backend, store, config.hot_tier_bytes as usize);
        Ok(Self::new(Arc::new(service)))
    }

    pub fn new(service: Arc<Service>) -> Self {
        Self {
            service,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
        }
    }

    pub fn service(&self) -> &Service {
        &self.service
    }

    /// Whether this worker attends on CPU threads (its blocks in host memory, its
    /// attention on the process's compute pool) rather than on a GPU.
    pub fn attends_on_cpu(&self) -> bool {
        matches!(
            self.service.backend().selected(),
            starkv_compute::cuda::Selected::Cpu { .. }
        )
    }

    /// The handshake's answer (the secret is checked by the transport).
    pub fn hello(&self) -> Reply {
        Reply::Hello {
            version: PROTOCOL_VERSION,
            device: self.service.backend().device_id(),
            model_fingerprint: self.service.model_fingerprint().to_vec(),
        }
    }

    /// Answers one request (after the handshake). Never panics on bad input: every
    /// failure is an error reply.
    pub fn handle(&self, req: Request) -> Reply {
        let result = match req {
            Request::Hello { .. } => Ok(self.hello()),
            Request::Encode(e) => self.encode(e),
            Request::Open {
                doc,
                keys,
                score_scale,
            } => self.open_session(&doc, &keys, score_scale),
            Request::Attend {
                session,
                layer,
                m,
                q,
            } => self.attend(session, layer as usize, m as usize, &q),
            Request::Close { session } => {
                self.lock().remove(&session);
                Ok(Reply::Closed)
            }
            Request::Stats => Ok(self.stats()),
            Request::Drop { doc } => self.drop_doc(&doc),
            Request::Verify { repair } => self.verify(repair),
            Request::List => Ok(self.list()),
        };
        result.unwrap_or_else(|e| {
            let code = match &e {
                ServiceError::NotFound(_) => ErrorCode::NotFound,
                ServiceError::Invalid(_) => ErrorCode::BadRequest,
                _ => ErrorCode::Internal,
            };
            Reply::error(code, e.to_string())
        })
    }

    /// The shard of open session `session` (an in-process worker's, for the coordinator's
    /// device channel); touches it like an attend.
    pub(crate) fn session_shard(&self, session: u64) -> Option<Arc<dyn AttentionShard>> {
        let mut sessions = self.lock();
        let s = sessions.get_mut(&session)?;
        s.last_used = Instant::now();
        Some(s.shard.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Session>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn encode(&self, e: EncodeRequest) -> ServiceResult<Reply> {
        if e.tokens.is_empty() || e.blocks.is_empty() {
            return Err(ServiceError::Invalid(
                "an encode request needs tokens and blocks".into(),
            ));
        }
        let req = IngestRequest {
            id: e.doc,
            tenant: e.tenant,
            text: String::new(),
            block_size: e.block_size as usize,
            anchor_size: e.anchor_size as usize,
            block_overlap: e.block_overlap as usize,
            merge: Default::default(),
            reencode_ratio: crate::ingest::reencode_ratio_of(e.reencode_ppm),
            pinned: false,
            ttl_ms: None,
            // Informational: the stored type is `dtype` below, the coordinator's choice.
            kv_dtype: crate::KvDtype::F16,
        };
        let dtype = DType::from_code(e.dtype)
            .filter(|d| matches!(d, DType::F16 | DType::BF16 | DType::I8 | DType::F8))
            .ok_or_else(|| {
                ServiceError::Invalid(format!("KV type code {} cannot be stored", e.dtype))
            })?;
        let part: Vec<(usize, Key)> = e.blocks.iter().map(|&(i, k)| (i as usize, k)).collect();
        let outcome = self
            .service
            .ingest_part(&req, e.tokens, Some(&part), dtype, &|_, _| {})?;
        let stored_bytes = self
            .service
            .store()
            .doc_info(&outcome.doc)
            .map_or(0, |i| i.stored_bytes);
        Ok(Reply::Encoded {
            encoded: (outcome.blocks - outcome.reused_blocks) as u32,
            reused: outcome.reused_blocks as u32,
            stored_bytes,
        })
    }

    fn open_session(&self, doc: &str, keys: &[Key], score_scale: f32) -> ServiceResult<Reply> {
        if keys.is_empty() {
            return Err(ServiceError::Invalid("a session needs blocks".into()));
        }
        if !(score_scale.is_finite() && score_scale > 0.0) {
            return Err(ServiceError::Invalid(format!(
                "a session's score scale must be positive and finite, not {score_scale}"
            )));
        }
        self.lock()
            .retain(|_, s| s.last_used.elapsed() < SESSION_IDLE);
        let service = &self.service;
        let lease = service.store().open_doc(doc)?;
        let manifest = lease.manifest().clone();
        let index: HashMap<Key, usize> = manifest
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| (b.key.0, i))
            .collect();
        let positions = keys
            .iter()
            .map(|k| {
                index.get(k).copied().ok_or_else(|| {
                    ServiceError::NotFound(format!("this worker does not hold a block of {doc}"))
                })
            })
            .collect::<ServiceResult<Vec<usize>>>()?;
        let tokens = lease.source_tokens()?;
        let shard = {
            let mut stored = StoredBlocks::new(service, &lease, &manifest, &tokens[..]);
            service
                .backend()
                .shard(service.model(), keys, score_scale, &mut |i: usize| {
                    stored.load(positions[i])
                })?
        };
        let tokens = shard.n_tokens() as u64;
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            session,
            Session {
                shard,
                _lease: lease,
                last_used: Instant::now(),
            },
        );
        Ok(Reply::Opened { session, tokens })
    }

    fn attend(&self, session: u64, layer: usize, m: usize, q: &[f32]) -> ServiceResult<Reply> {
        let shard = {
            let mut sessions = self.lock();
            let s = sessions
                .get_mut(&session)
                .ok_or_else(|| ServiceError::NotFound(format!("no session {session}")))?;
            s.last_used = Instant::now();
            s.shard.clone()
        };
        let model = &self.service.model().model;
        let shape = model.head_shape();
        if m == 0 || q.len() != m * shape.q_width() || layer >= model.config().n_layers {
            return Err(ServiceError::Invalid(format!(
                "attend: layer {layer}, {m} rows, {} values do not fit the model",
                q.len()
            )));
        }
        let part = shard.attend(layer, q, m)?;
        Ok(Reply::Partial {
            out: part.out,
            lse: part.lse,
            // Filled in by the transport, which sees the whole of the worker's time.
            time: WorkerTime::default(),
        })
    }

    fn stats(&self) -> Reply {
        let stats = self.service.store().stats();
        Reply::Stats {
            device: self.service.backend().device_id(),
            documents: stats.documents,
            blocks: stats.blocks,
            stored_bytes: stats.store_bytes,
        }
    }

    /// The operator's verify on this worker's store (with `repair`, the damaged blocks
    /// are re-encoded from the source tokens each part keeps).
    fn verify(&self, repair: bool) -> ServiceResult<Reply> {
        let service = &*self.service;
        let out = crate::admin::verify(service.store(), repair.then_some(service))?;
        Ok(Reply::Verified(VerifyCounts {
            documents: out.documents as u64,
            corrupt: out.corrupt,
            repaired_blocks: out.repaired_blocks as u64,
            corruption_found: out.corruption_found,
            repair_error: out.repair_error.unwrap_or_default(),
        }))
    }

    fn list(&self) -> Reply {
        Reply::Listed {
            docs: self
                .service
                .store()
                .list()
                .into_iter()
                .map(|d| (d.doc.doc, d.doc.version))
                .collect(),
        }
    }

    fn drop_doc(&self, doc: &str) -> ServiceResult<Reply> {
        match self.service.store().delete_doc(doc) {
            Ok(report) => Ok(Reply::Dropped {
                blocks_deleted: report.blocks_deleted,
                bytes_freed: report.bytes_freed,
            }),
            Err(starkv_cache::Error::NotFound { .. }) => Ok(Reply::Dropped {
                blocks_deleted: 0,
                bytes_freed: 0,
            }),
            Err(e) => Err(e.into()),
        }
    }
}
