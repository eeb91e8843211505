//! The coordinator: places blocks on workers, publishes a document only after every
//! block is acknowledged, and answers queries by sending each layer's Q to the workers
//! holding the document's blocks (the query's own KV stays here).
//!
//! Faults cost time, never correctness. A worker that is unreachable, times out or
//! answers an error during a query is replaced for that query's blocks: a live replica
//! is used when there is one, else the blocks are re-encoded from the source tokens on
//! the next live worker of their rendezvous order; the catalog records the new holders
//! and the layer is asked again, so the answer is the exact one. A worker that lost its
//! data (it answers "not found") re-encodes the blocks itself. Health checks reconnect
//! to workers that come back; new blocks are placed on them again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use starkv_cache::{DType, DocRef};
use starkv_compute::generate::GenerateParams;
use starkv_compute::partial::{Attended, ContextMerge, HeadShape, merge_into};
use starkv_compute::prompt;
use starkv_compute::star::{AttentionShard, PendingPartial, StarConfig};

use super::catalog::{BlockEntry, Catalog, DocEntry, hex};
use super::client::RemoteWorker;
use super::handle::{CallError, PendingReply, Worker};
use super::placement;
use super::wire::{EncodeRequest, Key, Reply, Request, WorkerTime};
use crate::jobs::now_ms;
use crate::{
    IngestOutcome, IngestRequest, QueryOutcome, QueryRequest, Service, ServiceError, ServiceResult,
};

/// How a coordinator reaches its workers.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Worker addresses (`host:port`), in any order (placement does not depend on it).
    pub workers: Vec<String>,
    /// The shared secret every worker checks at the handshake.
    pub secret: String,
    /// Copies of every block (on distinct workers).
    pub replicas: usize,
    /// Longest wait for a per-layer answer or a session open; past it the worker is
    /// treated as failed for the call.
    pub call_timeout: Duration,
    /// Longest wait for a worker to encode its blocks of one document.
    pub encode_timeout: Duration,
    /// Where the catalog (documents, placement) lives.
    pub catalog_dir: std::path::PathBuf,
    /// How long a query waiting for a remote worker's reply polls the socket before it
    /// sleeps (see [`super::spin`]).
    pub spin: super::spin::SpinBudget,
}

/// What the health check and the calls learned about a worker.
#[derive(Debug, Clone, Default)]
pub struct WorkerHealth {
    pub up: bool,
    pub device: Option<String>,
    pub documents: u64,
    pub blocks: u64,
    pub stored_bytes: u64,
    pub calls: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    pub last_seen_ms: Option<u64>,
    /// Stale document parts dropped on this worker (see [`super::stale`]).
    pub stale_parts_dropped: u64,
}

/// One worker as `GET /v1/admin/cluster` shows it.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    pub address: String,
    pub health: WorkerHealth,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Blocks of the catalog's documents placed on this worker.
    pub placed_blocks: usize,
    /// Where its attend calls (one per layer per query token step) spent their time.
    pub attend: AttendTimes,
}

/// Attend calls to one worker since the coordinator started, and their microseconds
/// summed: the whole round trip (sent until the coordinator took the reply), the
/// worker's wait for a thread after reading the frame, and its compute. The round trip
/// less the worker's two is the network and both ends' hand-offs: what a worker adds
/// per layer beyond the attention itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttendTimes {
    pub calls: u64,
    pub round_trip_us: u64,
    pub worker_queued_us: u64,
    pub worker_compute_us: u64,
}

impl AttendTimes {
    /// Mean microseconds per call of one of the sums (0 before any call).
    pub fn mean(&self, sum: u64) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            sum as f64 / self.calls as f64
        }
    }
}

/// [`AttendTimes`] as it accumulates.
#[derive(Default)]
struct AttendClock {
    calls: AtomicU64,
    round_trip_us: AtomicU64,
    worker_queued_us: AtomicU64,
    worker_compute_us: AtomicU64,
}

impl AttendClock {
    fn record(&self, round_trip: Duration, worker: WorkerTime) {
        let add = |a: &AtomicU64, v: u64| a.fetch_add(v, Ordering::Relaxed);
        add(&self.calls, 1);
        add(
            &self.round_trip_us,
            u64::from(WorkerTime::micros(round_trip)),
        );
        add(&self.worker_queued_us, u64::from(worker.queued_us));
        add(&self.worker_compute_us, u64::from(worker.compute_us));
    }

    fn read(&self) -> AttendTimes {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AttendTimes {
            calls: get(&self.calls),
            round_trip_us: get(&self.round_trip_us),
            worker_queued_us: get(&self.worker_queued_us),
            worker_compute_us: get(&self.worker_compute_us),
        }
    }
}

struct Slot {
    worker: Box<dyn Worker>,
    health: Mutex<WorkerHealth>,
    /// The connection (see [`Worker::connections`]) on which the worker's stale parts
    /// were last dropped; `None`: not since it was last seen down (or ever).
    reconciled: Mutex<Option<u64>>,
    attend: AttendClock,
}

/// A coordinator's view of its workers and documents.
pub struct Cluster {
    slots: Vec<Slot>,
    /// When each document was last queried (in memory: after a restart a document's idle
    /// time counts from the start, so a TTL never expires it early).
    pub(super) last_used: Mutex<HashMap<String, u64>>,
    /// When this coordinator opened its catalog.
    pub(super) opened_ms: u64,
    pub(super) addresses: Vec<String>,
    replicas: usize,
    pub(super) call_timeout: Duration,
    pub(super) encode_timeout: Duration,
    pub(super) catalog: Catalog,
    /// Serialises placement changes (ingest, recovery): a worker's part of a document is
    /// replaced as a whole, so two concurrent changes must not send it different parts.
    placement_lock: Mutex<()>,
    /// Documents with an encode in progress (see [`super::stale`]).
    pub(super) in_flight: super::stale::InFlight,
}

impl Cluster {
    /// A coordinator of remote workers (`config.workers`), which must run the model
    /// whose file hashes to `model_fingerprint`.
    pub fn connect(config: &ClusterConfig, model_fingerprint: &[u8]) -> ServiceResult<Self> {
        let connect_timeout = config.call_timeout.min(Duration::from_secs(5));
        let workers = config
            .workers
            .iter()
            .map(|a| {
                Box::new(RemoteWorker::new(
                    a.clone(),
                    config.secret.as_bytes(),
                    model_fingerprint,
                    connect_timeout,
                    config.spin,
                )) as Box<dyn Worker>
            })
            .collect();
        Self::with_workers(config, workers)
    }

    /// A coordinator of any workers (in-process ones for a single host).
    pub fn with_workers(
        config: &ClusterConfig,
        workers: Vec<Box<dyn Worker>>,
    ) -> ServiceResult<Self> {
        if workers.is_empty() {
            return Err(ServiceError::Invalid(
                "a cluster needs at least one worker".into(),
            ));
        }
        if config.replicas == 0 {
            return Err(ServiceError::Invalid("replicas must be at least 1".into()));
        }
        let catalog = Catalog::open(&config.catalog_dir).map_err(|e| {
            ServiceError::Internal(format!(
                "cluster catalog {}: {e}",
                config.catalog_dir.display()
            ))
        })?;
        Ok(Self {
            addresses: workers.iter().map(|w| w.address().to_string()).collect(),
            slots: workers
                .into_iter()
                .map(|worker| Slot {
                    worker,
                    health: Mutex::new(WorkerHealth {
                        up: true,
                        ..WorkerHealth::default()
                    }),
                    reconciled: Mutex::new(None),
                    attend: AttendClock::default(),
                })
                .collect(),
            last_used: Mutex::new(HashMap::new()),
            opened_ms: now_ms(),
            replicas: config.replicas,
            call_timeout: config.call_timeout,
            encode_timeout: config.encode_timeout,
            catalog,
            placement_lock: Mutex::new(()),
            in_flight: Default::default(),
        })
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Asks every worker for its statistics (all at once), reconnecting to any that came
    /// back. Call it periodically; [`Cluster::spawn_health_checks`] does.
    pub fn check_health(&self) {
        let sent: Vec<_> = (0..self.slots.len())
            .map(|w| self.slots[w].worker.send(Request::Stats))
            .collect();
        for (w, sent) in sent.into_iter().enumerate() {
            match sent.and_then(|p| p.wait(self.call_timeout)) {
                Ok(Reply::Stats {
                    device,
                    documents,
                    blocks,
                    stored_bytes,
                }) => {
                    let mut h = self.health(w);
                    if !h.up {
                        tracing::info!(worker = self.addresses[w], "worker is back");
                    }
                    h.up = true;
                    h.device = Some(device);
                    h.documents = documents;
                    h.blocks = blocks;
                    h.stored_bytes = stored_bytes;
                    h.last_seen_ms = Some(now_ms());
                }
                Ok(other) => self.mark_down(w, &format!("answered {other:?} to a stats request")),
                Err(e) => self.mark_down(w, &e.to_string()),
            }
            let (sent, received) = self.slots[w].worker.bytes();
            let address = self.addresses[w].clone();
            metrics::counter!("starkv_worker_bytes_total", "worker" => address.clone(), "direction" => "sent")
                .absolute(sent);
            metrics::counter!("starkv_worker_bytes_total", "worker" => address.clone(), "direction" => "received")
                .absolute(received);
            metrics::gauge!("starkv_worker_up", "worker" => address).set(self.live(w) as u8 as f64);
        }
        for w in 0..self.slots.len() {
            self.reconcile_if_new(w);
        }
    }

    /// Drops worker `w`'s stale parts when it is up on a connection not reconciled yet
    /// (it came back, restarted, or this coordinator just started).
    fn reconcile_if_new(&self, w: usize) {
        let connection = self.slots[w].worker.connections();
        let done = *self.slots[w]
            .reconciled
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !self.live(w) || done == Some(connection) {
            return;
        }
        match self.reconcile(w) {
            Ok(out) => {
                self.health(w).stale_parts_dropped += out.dropped.len() as u64;
                *self.slots[w]
                    .reconciled
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(connection);
            }
            Err(e) => {
                tracing::info!(worker = self.addresses[w], error = %e, "could not drop stale parts; trying again at the next health check")
            }
        }
    }

    /// Runs [`Cluster::check_health`] every `period` on a thread of its own.
    pub fn spawn_health_checks(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("starkv-cluster-health".into())
            .spawn(move || {
                while let Some(cluster) = weak.upgrade() {
                    cluster.check_health();
                    drop(cluster);
                    std::thread::sleep(period);
                }
            });
    }

    /// Every worker's state, for operators.
    pub fn status(&self) -> Vec<WorkerStatus> {
        let mut placed = vec![0usize; self.slots.len()];
        for doc in self.catalog.list() {
            for block in &doc.blocks {
                for holder in &block.holders {
                    if let Some(w) = self.index_of(holder) {
                        placed[w] += 1;
                    }
                }
            }
        }
        (0..self.slots.len())
            .map(|w| {
                let (bytes_sent, bytes_received) = self.slots[w].worker.bytes();
                WorkerStatus {
                    address: self.addresses[w].clone(),
                    health: self.health(w).clone(),
                    bytes_sent,
                    bytes_received,
                    placed_blocks: placed[w],
                    attend: self.slots[w].attend.read(),
                }
            })
            .collect()
    }

    /// The catalog entry of the store name `doc`, when it belongs to `tenant`.
    pub fn document(&self, doc: &str, tenant: &str) -> Option<Arc<DocEntry>> {
        self.catalog.get(doc).filter(|d| d.tenant == tenant)
    }

    /// Every document of `tenant`.
    pub fn documents(&self, tenant: &str) -> Vec<Arc<DocEntry>> {
        let mut docs: Vec<_> = self
            .catalog
            .list()
            .into_iter()
            .filter(|d| d.tenant == tenant)
            .collect();
        docs.sort_by(|a, b| a.doc.cmp(&b.doc));
        docs
    }

    /// Forgets a document and tells its workers to drop their parts (best effort: a
    /// worker that is down keeps a part no catalog entry refers to until it is dropped
    /// or replaced).
    pub fn delete(&self, doc: &str, tenant: &str) -> ServiceResult<()> {
        let _guard = self.lock_placement();
        if self.document(doc, tenant).is_none() {
            return Err(ServiceError::NotFound(format!("document {doc} not found")));
        }
        let removed = self
            .catalog
            .remove(doc)
            .map_err(|e| ServiceError::Internal(format!("cluster catalog: {e}")))?;
        if let Some(entry) = removed {
            self.drop_parts(&entry, &[]);
        }
        self.lock_last_used().remove(doc);
        Ok(())
    }

    fn health(&self, w: usize) -> std::sync::MutexGuard<'_, WorkerHealth> {
        self.slots[w]
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn live(&self, w: usize) -> bool {
        self.health(w).up
    }

    pub(super) fn mark_down(&self, w: usize, why: &str) {
        let mut h = self.health(w);
        if h.up {
            tracing::warn!(
                worker = self.addresses[w],
                error = why,
                "worker marked down"
            );
        }
        h.up = false;
        h.failures += 1;
        *self.slots[w]
            .reconciled
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        h.last_error = Some(why.to_string());
        metrics::counter!("starkv_worker_failures_total", "worker" => self.addresses[w].clone())
            .increment(1);
    }

    pub(super) fn index_of(&self, address: &str) -> Option<usize> {
        self.addresses.iter().position(|a| a == address)
    }

    pub(super) fn lock_placement(&self) -> std::sync::MutexGuard<'_, ()> {
        self.placement_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `req` to worker `w`, counting the call.
    pub(super) fn send(&self, w: usize, req: Request) -> Result<PendingReply, CallError> {
        self.health(w).calls += 1;
        self.slots[w].worker.send(req)
    }

    /// Waits for a reply, recording its latency under `op`; a failure marks the worker
    /// down unless it only lacks data.
    pub(super) fn finish(
        &self,
        w: usize,
        op: &'static str,
        started: Instant,
        pending: Result<PendingReply, CallError>,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let result = pending.and_then(|p| p.wait(timeout));
        metrics::histogram!("starkv_worker_call_seconds", "worker" => self.addresses[w].clone(), "op" => op)
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = &result
            && !e.is_missing_data()
        {
            self.mark_down(w, &e.to_string());
        }
        result
    }

    /// Phase 1 across the workers: every block is encoded and stored by its `replicas`
    /// workers (all workers at once), then the document is published in the catalog.
    pub(crate) fn ingest(
        &self,
        service: &Service,
        req: &IngestRequest,
        tokens: Vec<u32>,
        progress: &dyn Fn(usize, usize),
    ) -> ServiceResult<IngestOutcome> {
        let started = Instant::now();
        let (b, a) = (req.block_size, req.anchor_size);
        let config = StarConfig::with_anchor(b, a).with_overlap(req.block_overlap);
        config.validate()?;
        if tokens.is_empty() {
            return Err(ServiceError::Invalid("the document has no tokens".into()));
        }
        let n = tokens.len().div_ceil(b);
        let dtype = service.stored_dtype(req.kv_dtype);
        let reencode_ppm = crate::ingest::reencode_ppm(req.reencode_ratio);
        let ranges: Vec<_> = (0..n)
            .map(|i| i * b..((i + 1) * b).min(tokens.len()))
            .collect();
        let keys: Vec<Key> = ranges
            .iter()
            .map(|r| {
                let ratio = req.reencode_ratio;
                service.block_key(&req.tenant, &tokens, config, ratio, r.clone(), dtype)
            })
            .collect();
        let _guard = self.lock_placement();
        // Parts written before the catalog entry is published are not stale.
        let _encoding = self.begin_encode(&req.id);
        let previous = self.catalog.get(&req.id);
        let mut holders: Vec<Vec<usize>> = vec![Vec::new(); n];
        // Blocks each worker acknowledged (its whole part of the document so far).
        let mut parts: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        let mut excluded = vec![false; self.slots.len()];
        let mut reused = 0usize;
        progress(0, n);
        loop {
            let mut new: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for i in 0..n {
                let want = self.replicas - holders[i].len().min(self.replicas);
                if want == 0 {
                    continue;
                }
                let chosen: Vec<usize> = placement::preference(&self.addresses, &keys[i])
                    .into_iter()
                    .filter(|&w| !excluded[w] && self.live(w) && !holders[i].contains(&w))
                    .take(want)
                    .collect();
                if chosen.is_empty() && holders[i].is_empty() {
                    return Err(ServiceError::Unavailable(format!(
                        "no live worker can take block {i}: {}",
                        self.down_summary()
                    )));
                }
                for w in chosen {
                    new.entry(w).or_default().push(i);
                }
            }
            if new.is_empty() {
                break;
            }
            let sent: Vec<_> = new
                .iter()
                .map(|(&w, added)| {
                    let mut part = parts.get(&w).cloned().unwrap_or_default();
                    part.extend(added);
                    part.sort_unstable();
                    let req = Request::Encode(EncodeRequest {
                        doc: req.id.clone(),
                        tenant: req.tenant.clone(),
                        tokens: tokens.clone(),
                        block_size: b as u32,
                        anchor_size: a as u32,
                        dtype: dtype.code(),
                        blocks: part.iter().map(|&i| (i as u32, keys[i])).collect(),
                        reencode_ppm,
                        block_overlap: req.block_overlap as u32,
                    });
                    (w, part, Instant::now(), self.send(w, req))
                })
                .collect();
            for (w, part, t0, pending) in sent {
                match self.finish(w, "encode", t0, pending, self.encode_timeout) {
                    Ok(Reply::Encoded { reused: r, .. }) => {
                        reused += r as usize;
                        for &i in &new[&w] {
                            holders[i].push(w);
                        }
                        parts.insert(w, part);
                        progress(holders.iter().filter(|h| !h.is_empty()).count(), n);
                    }
                    Ok(other) => {
                        self.mark_down(w, &format!("answered {other:?} to an encode request"));
                        excluded[w] = true;
                    }
                    Err(e) => {
                        tracing::warn!(worker = self.addresses[w], error = %e, "encode failed; placing the blocks elsewhere");
                        excluded[w] = true;
                    }
                }
            }
        }
        let entry = DocEntry {
            doc: req.id.clone(),
            tenant: req.tenant.clone(),
            version: self.catalog.next_version(&req.id),
            block_size: b,
            anchor_size: a,
            model_fingerprint: hex(service.model_fingerprint()),
            created_ms: now_ms(),
            pinned: req.pinned,
            ttl_ms: req.ttl_ms,
            dtype: Some(dtype.code()),
            merge: (!req.merge.is_exact()).then(|| req.merge.into()),
            reencode_ppm,
            block_overlap: req.block_overlap,
            blocks: (0..n)
                .map(|i| BlockEntry {
                    key: hex(&keys[i]),
                    start: ranges[i].start,
                    len: ranges[i].len(),
                    holders: holders[i]
                        .iter()
                        .map(|&w| self.addresses[w].clone())
                        .collect(),
                })
                .collect(),
            tokens,
        };
        let entry = self
            .catalog
            .publish(entry)
            .map_err(|e| ServiceError::Internal(format!("cluster catalog: {e}")))?;
        if let Some(previous) = previous {
            let keep: Vec<usize> = parts.keys().copied().collect();
            self.drop_parts(&previous, &keep);
        }
        Ok(IngestOutcome {
            doc: DocRef {
                doc: entry.doc.clone(),
                version: entry.version,
            },
            tokens: entry.tokens.len(),
            blocks: n,
            reused_blocks: reused.min(n),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Tells the holders of `entry`'s blocks, except the workers `keep`, to drop their
    /// parts of the document (best effort).
    /// Tells every worker holding blocks of `entry` (except those in `keep`) to drop its
    /// part, all at once; returns the blocks and bytes they freed. Best effort: a worker
    /// that is down keeps its part until it is dropped or replaced.
    pub(super) fn drop_parts(&self, entry: &DocEntry, keep: &[usize]) -> (u64, u64) {
        let mut workers: Vec<usize> = entry
            .blocks
            .iter()
            .flat_map(|b| b.holders.iter().filter_map(|h| self.index_of(h)))
            .filter(|w| !keep.contains(w))
            .collect();
        workers.sort_unstable();
        workers.dedup();
        let sent: Vec<_> = workers
            .iter()
            .map(|&w| {
                let doc = entry.doc.clone();
                (w, self.send(w, Request::Drop { doc }))
            })
            .collect();
        let (mut blocks, mut bytes) = (0, 0);
        for (w, sent) in sent {
            match sent.and_then(|p| p.wait(self.call_timeout)) {
                Ok(Reply::Dropped {
                    blocks_deleted,
                    bytes_freed,
                }) => {
                    blocks += blocks_deleted;
                    bytes += bytes_freed;
                }
                Ok(other) => {
                    tracing::info!(worker = self.addresses[w], reply = ?other, "unexpected answer to a drop")
                }
                Err(e) => {
                    tracing::info!(worker = self.addresses[w], error = %e, "could not drop a document part")
                }
            }
        }
        (blocks, bytes)
    }

    fn down_summary(&self) -> String {
        let down: Vec<String> = (0..self.slots.len())
            .filter(|&w| !self.live(w))
            .map(|w| {
                format!(
                    "{} ({})",
                    self.addresses[w],
                    self.health(w).last_error.clone().unwrap_or_default()
                )
            })
            .collect();
        if down.is_empty() {
            "every worker failed".into()
        } else {
            format!("down: {}", down.join(", "))
        }
    }

    /// Phase 2 with the context on the workers: opens a session on every worker holding
    /// blocks of `doc`, then generates with the model here, each layer's Q going to all
    /// of them at once.
    pub(crate) fn query(
        self: &Arc<Self>,
        service: &Service,
        doc: &str,
        tenant: &str,
        req: &QueryRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> ServiceResult<QueryOutcome> {
        let started = Instant::now();
        let entry = self
            .document(doc, tenant)
            .ok_or_else(|| ServiceError::NotFound(format!("document {doc} not found")))?;
        self.touch(doc);
        if entry.model_fingerprint != hex(service.model_fingerprint()) {
            return Err(ServiceError::Conflict(format!(
                "document {doc} was encoded with another model; re-ingest it to query with {}",
                service.model_id()
            )));
        }
        let query_ids = prompt::question_query(&service.model().tokenizer, &req.question)?;
        let merge = entry.context_merge(req.merge);
        let params = GenerateParams {
            max_tokens: req.max_tokens,
            sampling: req.sampling.clone(),
            stop: req.stop.clone(),
            cancel: req.cancel.clone(),
            merge,
            logprobs: req.logprobs,
        };
        let shape = service.model().model.head_shape();
        // A recovery re-encodes in the document's stored type.
        let dtype = entry.dtype(service.stored_dtype(crate::KvDtype::F16));
        let shards = self.open_shards(&entry, shape, dtype, merge)?;
        let load = started.elapsed();
        let dyn_shards: Vec<Arc<dyn AttentionShard>> = shards
            .iter()
            .map(|s| s.clone() as Arc<dyn AttentionShard>)
            .collect();
        let answer = service.backend().answer::<ServiceError>(
            service.model(),
            &[],
            &mut |_| {
                Err(ServiceError::Internal(
                    "no local blocks in a cluster query".into(),
                ))
            },
            &dyn_shards,
            &query_ids,
            &params,
            on_text,
        )?;
        let reencoded: usize = shards
            .iter()
            .map(|s| s.reencoded.load(Ordering::Relaxed))
            .sum();
        let generation = answer.generation;
        Ok(QueryOutcome {
            answer: generation.text,
            stop_reason: generation.stop_reason,
            context_tokens: entry.tokens.len(),
            query_tokens: query_ids.len(),
            generated_tokens: generation.ids.len(),
            load,
            first_token: load + generation.prefill,
            total: started.elapsed(),
            repaired_blocks: reencoded,
            resident_blocks: 0,
            logprobs: generation.logprobs,
        })
    }

    /// One shard per worker holding blocks of `entry` (each block from its first live
    /// holder), every session opened at once; failures are recovered before returning.
    /// With a tempered `merge`, a worker holding blocks of both groups gets a session for
    /// each (the tempered one at softmax scale `1 / T`).
    fn open_shards(
        self: &Arc<Self>,
        entry: &Arc<DocEntry>,
        shape: HeadShape,
        dtype: DType,
        merge: ContextMerge,
    ) -> ServiceResult<Vec<Arc<WorkerShard>>> {
        // (worker or None for blocks every holder of which is down, tempered) -> blocks
        let mut groups: BTreeMap<(Option<usize>, bool), Vec<usize>> = BTreeMap::new();
        for (i, block) in entry.blocks.iter().enumerate() {
            let holder = block
                .holders
                .iter()
                .filter_map(|h| self.index_of(h))
                .find(|&w| self.live(w));
            let tempered = merge.is_tempered(block.start);
            groups.entry((holder, tempered)).or_default().push(i);
        }
        let kind = |tempered: bool| ShardKind {
            dtype,
            tempered,
            score_scale: if tempered { merge.score_scale() } else { 1.0 },
        };
        let sent: Vec<_> = groups
            .into_iter()
            .map(|((w, tempered), blocks)| {
                let pending = w.map(|w| {
                    let keys = blocks
                        .iter()
                        .map(|&i| entry.blocks[i].key_bytes())
                        .collect();
                    let req = Request::Open {
                        doc: entry.doc.clone(),
                        keys,
                        score_scale: kind(tempered).score_scale,
                    };
                    (w, Instant::now(), self.send(w, req))
                });
                (tempered, blocks, pending)
            })
            .collect();
        let mut shards = Vec::new();
        for (tempered, blocks, pending) in sent {
            let shard =
                WorkerShard::new(self.clone(), entry, shape, kind(tempered), blocks.clone());
            match pending {
                None => {
                    let e = CallError::Unreachable("every holder is down".into());
                    *shard.lock() = shard.recover(usize::MAX, &blocks, &e)?;
                }
                Some((w, t0, pending)) => {
                    match self.finish(w, "open", t0, pending, self.call_timeout) {
                        Ok(Reply::Opened { session, .. }) => shard.lock().push(Leg {
                            worker: w,
                            session,
                            blocks,
                        }),
                        Ok(other) => {
                            let e = CallError::Protocol(format!("answered {other:?} to open"));
                            self.mark_down(w, &e.to_string());
                            *shard.lock() = shard.recover(w, &blocks, &e)?;
                        }
                        Err(e) => *shard.lock() = shard.recover(w, &blocks, &e)?,
                    }
                }
            }
            shards.push(Arc::new(shard));
        }
        Ok(shards)
    }
}

/// What a [`WorkerShard`]'s sessions are: the stored type its recoveries re-encode in,
/// and the merge group it answers for (a tempered one attends at `score_scale / sqrt(d)`).
#[derive(Debug, Clone, Copy)]
struct ShardKind {
    dtype: DType,
    tempered: bool,
    score_scale: f32,
}

/// A session on one worker over some blocks of a document.
#[derive(Debug, Clone)]
struct Leg {
    worker: usize,
    session: u64,
    blocks: Vec<usize>,
}

/// Blocks of one document held by workers, behind the shard seam. Usually one leg (one
/// worker); after a recovery its blocks may be spread over several.
struct WorkerShard {
    cluster: Arc<Cluster>,
    doc: String,
    shape: HeadShape,
    kind: ShardKind,
    n_tokens: usize,
    legs: Mutex<Vec<Leg>>,
    /// Blocks re-encoded on another worker while this shard served.
    reencoded: AtomicUsize,
}

/// Recoveries tried for one layer before the query fails.
const MAX_RECOVERIES: usize = 4;

impl WorkerShard {
    fn new(
        cluster: Arc<Cluster>,
        entry: &DocEntry,
        shape: HeadShape,
        kind: ShardKind,
        blocks: Vec<usize>,
    ) -> Self {
        Self {
            kind,
            n_tokens: blocks.iter().map(|&i| entry.blocks[i].len).sum(),
            cluster,
            doc: entry.doc.clone(),
            shape,
            legs: Mutex::new(Vec::new()),
            reencoded: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Leg>> {
        self.legs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn attend_request(leg: &Leg, layer: usize, q: &[f32], m: usize) -> Request {
        Request::Attend {
            session: leg.session,
            layer: layer as u32,
            m: m as u32,
            q: q.to_vec(),
        }
    }

    /// The partial result from worker `w`'s reply to an attend sent at `sent`, checked
    /// against the query's shape; its timing goes to the worker's [`AttendTimes`].
    fn partial(
        &self,
        w: usize,
        sent: Instant,
        reply: Reply,
        m: usize,
    ) -> Result<Attended, CallError> {
        match reply {
            Reply::Partial { out, lse, time } => {
                self.cluster.slots[w].attend.record(sent.elapsed(), time);
                metrics::histogram!("starkv_worker_attend_compute_seconds", "worker" => self.cluster.addresses[w].clone())
                    .record(f64::from(time.compute_us) * 1e-6);
                let part = Attended { out, lse };
                if part.fits(m, self.shape) {
                    Ok(part)
                } else {
                    Err(CallError::Protocol(
                        "a partial result of the wrong shape".into(),
                    ))
                }
            }
            other => Err(CallError::Protocol(format!("answered {other:?} to attend"))),
        }
    }

    /// Replaces worker `failed` for `blocks` (failed with `error`): a live replica where
    /// one exists, else a re-encode on the next live worker of each block's order (on
    /// `failed` itself when it is alive but lost the data). Updates the catalog and
    /// returns the new legs, sessions open.
    fn recover(
        &self,
        failed: usize,
        blocks: &[usize],
        error: &CallError,
    ) -> ServiceResult<Vec<Leg>> {
        let cluster = &self.cluster;
        let lost_data = error.is_missing_data();
        tracing::warn!(doc = self.doc, blocks = blocks.len(), error = %error, "recovering blocks of a failed worker");
        let _guard = cluster.lock_placement();
        let mut excluded = vec![false; cluster.slots.len()];
        if !lost_data && failed < excluded.len() {
            excluded[failed] = true;
        }
        for _ in 0..=cluster.slots.len() {
            let entry = cluster.catalog.get(&self.doc).ok_or_else(|| {
                ServiceError::NotFound(format!("document {} was deleted", self.doc))
            })?;
            let usable = |w: usize| !excluded[w] && cluster.live(w);
            // Where each block is read from now, and which workers must encode.
            let mut serve: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            let mut encode: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for &i in blocks {
                let block = &entry.blocks[i];
                let replica = block
                    .holders
                    .iter()
                    .filter_map(|h| cluster.index_of(h))
                    .find(|&w| w != failed && usable(w));
                if let Some(w) = replica {
                    serve.entry(w).or_default().push(i);
                    continue;
                }
                let target = if lost_data && failed < cluster.slots.len() && usable(failed) {
                    Some(failed)
                } else {
                    placement::preference(&cluster.addresses, &block.key_bytes())
                        .into_iter()
                        .find(|&w| w != failed && usable(w))
                };
                let target = target.ok_or_else(|| {
                    ServiceError::Unavailable(format!(
                        "no live worker can take block {i} of {}: {}",
                        self.doc,
                        cluster.down_summary()
                    ))
                })?;
                serve.entry(target).or_default().push(i);
                encode.entry(target).or_default().push(i);
            }
            match self.reencode(&entry, failed, lost_data, &encode) {
                Ok(()) => {}
                Err(w) => {
                    excluded[w] = true;
                    continue;
                }
            }
            match self.open_legs(&serve) {
                Ok(legs) => {
                    let n: usize = encode.values().map(Vec::len).sum();
                    self.reencoded.fetch_add(n, Ordering::Relaxed);
                    metrics::counter!("starkv_cluster_blocks_reencoded_total").increment(n as u64);
                    return Ok(legs);
                }
                Err(w) => excluded[w] = true,
            }
        }
        Err(ServiceError::Unavailable(format!(
            "could not place the blocks of {} on a live worker: {}",
            self.doc,
            cluster.down_summary()
        )))
    }

    /// Sends every target its whole new part of the document and waits; then records the
    /// new holders in the catalog. On a failure returns the worker that failed.
    fn reencode(
        &self,
        entry: &DocEntry,
        failed: usize,
        lost_data: bool,
        encode: &BTreeMap<usize, Vec<usize>>,
    ) -> Result<(), usize> {
        let cluster = &self.cluster;
        if encode.is_empty() {
            return Ok(());
        }
        let _encoding = cluster.begin_encode(&entry.doc);
        let sent: Vec<_> = encode
            .iter()
            .map(|(&w, added)| {
                let address = &cluster.addresses[w];
                let mut part: Vec<usize> = (0..entry.blocks.len())
                    .filter(|&i| entry.blocks[i].holders.contains(address))
                    .chain(added.iter().copied())
                    .collect();
                part.sort_unstable();
                part.dedup();
                let req = Request::Encode(EncodeRequest {
                    doc: entry.doc.clone(),
                    tenant: entry.tenant.clone(),
                    tokens: entry.tokens.clone(),
                    block_size: entry.block_size as u32,
                    anchor_size: entry.anchor_size as u32,
                    dtype: self.kind.dtype.code(),
                    blocks: part
                        .iter()
                        .map(|&i| (i as u32, entry.blocks[i].key_bytes()))
                        .collect(),
                    reencode_ppm: entry.reencode_ppm,
                    block_overlap: entry.block_overlap as u32,
                });
                (w, Instant::now(), cluster.send(w, req))
            })
            .collect();
        let mut first_failure = None;
        for (w, t0, pending) in sent {
            if !matches!(
                cluster.finish(w, "encode", t0, pending, cluster.encode_timeout),
                Ok(Reply::Encoded { .. })
            ) {
                first_failure.get_or_insert(w);
            }
        }
        if let Some(w) = first_failure {
            return Err(w);
        }
        let mut updated = entry.clone();
        let failed_address = cluster.addresses.get(failed).cloned();
        for (&w, added) in encode {
            for &i in added {
                let holders = &mut updated.blocks[i].holders;
                if !lost_data {
                    // The failed worker goes, and so does any other holder that is down
                    // (a block whose every holder was down at the query's start): the
                    // catalog says where a block is served from, and a worker that comes
                    // back drops the parts it no longer holds.
                    holders.retain(|h| {
                        Some(h) != failed_address.as_ref()
                            && cluster.index_of(h).is_some_and(|w| cluster.live(w))
                    });
                }
                if !holders.contains(&cluster.addresses[w]) {
                    holders.push(cluster.addresses[w].clone());
                }
            }
        }
        if let Err(e) = cluster.catalog.publish(updated) {
            tracing::warn!(doc = self.doc, error = %e, "could not record the new placement");
        }
        Ok(())
    }

    /// Opens a session on every worker of `serve`. On a failure returns that worker.
    fn open_legs(&self, serve: &BTreeMap<usize, Vec<usize>>) -> Result<Vec<Leg>, usize> {
        let cluster = &self.cluster;
        let entry = cluster.catalog.get(&self.doc).ok_or(usize::MAX)?;
        let sent: Vec<_> = serve
            .iter()
            .map(|(&w, blocks)| {
                let keys = blocks
                    .iter()
                    .map(|&i| entry.blocks[i].key_bytes())
                    .collect();
                let req = Request::Open {
                    doc: self.doc.clone(),
                    keys,
                    score_scale: self.kind.score_scale,
                };
                (w, blocks.clone(), Instant::now(), cluster.send(w, req))
            })
            .collect();
        let mut legs = Vec::new();
        let mut failure = None;
        for (w, blocks, t0, pending) in sent {
            match cluster.finish(w, "open", t0, pending, cluster.call_timeout) {
                Ok(Reply::Opened { session, .. }) => legs.push(Leg {
                    worker: w,
                    session,
                    blocks,
                }),
                _ => {
                    failure.get_or_insert(w);
                }
            }
        }
        match failure {
            None => Ok(legs),
            Some(w) => {
                close_legs(cluster, &legs);
                Err(w)
            }
        }
    }

    /// Asks the legs for `layer` again after a recovery (synchronously), merging into
    /// `acc`; recovers again (bounded) if a new leg fails too.
    fn retry(
        &self,
        mut legs: Vec<Leg>,
        layer: usize,
        q: &[f32],
        m: usize,
        acc: &mut Attended,
    ) -> starkv_compute::Result<()> {
        for _ in 0..MAX_RECOVERIES {
            let mut failed = Vec::new();
            for leg in &legs {
                let t0 = Instant::now();
                let pending = self
                    .cluster
                    .send(leg.worker, Self::attend_request(leg, layer, q, m));
                let reply = self
                    .cluster
                    .finish(leg.worker, "attend", t0, pending, self.cluster.call_timeout)
                    .and_then(|r| self.partial(leg.worker, t0, r, m));
                match reply {
                    Ok(part) => merge_into(acc, &part, m, self.shape),
                    Err(e) => failed.push((leg.clone(), e)),
                }
            }
            if failed.is_empty() {
                return Ok(());
            }
            legs = Vec::new();
            for (leg, e) in failed {
                let new = self
                    .recover(leg.worker, &leg.blocks, &e)
                    .map_err(shard_error(&self.doc))?;
                self.replace_leg(&leg, &new);
                legs.extend(new);
            }
        }
        Err(starkv_compute::Error::Shard {
            shard: self.doc.clone(),
            reason: "workers kept failing".into(),
        })
    }

    fn replace_leg(&self, old: &Leg, new: &[Leg]) {
        let mut legs = self.lock();
        legs.retain(|l| !(l.worker == old.worker && l.session == old.session));
        legs.extend(new.iter().cloned());
    }
}

fn shard_error(doc: &str) -> impl Fn(ServiceError) -> starkv_compute::Error + '_ {
    move |e| starkv_compute::Error::Shard {
        shard: doc.to_string(),
        reason: e.to_string(),
    }
}

fn close_legs(cluster: &Cluster, legs: &[Leg]) {
    for leg in legs {
        // Not waited for: the worker also closes a connection's sessions when it ends.
        let _ = cluster.send(
            leg.worker,
            Request::Close {
                session: leg.session,
            },
        );
    }
}

impl AttentionShard for WorkerShard {
    fn start<'a>(
        &'a self,
        layer: usize,
        q: &'a [f32],
        m: usize,
    ) -> starkv_compute::Result<PendingPartial<'a>> {
        let legs = self.lock().clone();
        let sent: Vec<_> = legs
            .into_iter()
            .map(|leg| {
                let req = Self::attend_request(&leg, layer, q, m);
                (
                    leg.clone(),
                    Instant::now(),
                    self.cluster.send(leg.worker, req),
                )
            })
            .collect();
        Ok(PendingPartial::arriving(move || {
            let mut acc = Attended::empty(m, self.shape);
            let mut failed = Vec::new();
            for (leg, t0, pending) in sent {
                let reply = self
                    .cluster
                    .finish(leg.worker, "attend", t0, pending, self.cluster.call_timeout)
                    .and_then(|r| self.partial(leg.worker, t0, r, m));
                match reply {
                    Ok(part) => merge_into(&mut acc, &part, m, self.shape),
                    Err(e) => failed.push((leg, e)),
                }
            }
            for (leg, e) in failed {
                let new = self
                    .recover(leg.worker, &leg.blocks, &e)
                    .map_err(shard_error(&self.doc))?;
                self.replace_leg(&leg, &new);
                self.retry(new, layer, q, m, &mut acc)?;
            }
            Ok(acc)
        }))
    }

    fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// An in-process worker's GPU session: the query attends it over the device channel
    /// when it runs on the same GPU. Only a shard of one leg (no recovery spread it) whose
    /// worker lives in this process; anything else goes through [`Self::start`].
    fn tempered(&self) -> bool {
        self.kind.tempered
    }

    /// When every worker of the cluster is remote, a query may wait for its attends on a
    /// pool thread and so run its forward pass inside the pool (each of its parallel loops
    /// then forks there instead of waking the pool and sleeping: ~150 hand-offs per
    /// decode step). Every worker, not just this shard's: a recovery may encode anywhere.
    fn computes_here(&self) -> bool {
        self.cluster.slots.iter().all(|s| s.worker.waits_off_pool())
    }

    fn local_gpu(&self) -> Option<starkv_compute::cuda::star::GpuShard> {
        let legs = self.lock();
        let [leg] = legs.as_slice() else {
            return None;
        };
        let shard = self.cluster.slots[leg.worker]
            .worker
            .local_shard(leg.session)?;
        shard.local_gpu()
    }
}

impl Drop for WorkerShard {
    fn drop(&mut self) {
        let legs = std::mem::take(&mut *self.lock());
        close_legs(&self.cluster, &legs);
    }
}

/// Blocks per worker address over a document (what `GET /v1/documents/{id}` shows).
pub fn placement_summary(entry: &DocEntry) -> HashMap<String, usize> {
    let mut per = HashMap::new();
    for block in &entry.blocks {
        for h in &block.holders {
            *per.entry(h.clone()).or_insert(0) += 1;
        }
    }
    per
}
