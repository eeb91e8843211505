//! Background ingest: a bounded queue, one worker thread, job states, and a spool on disk
//! so that an acknowledged (202) ingest survives a restart.
//!
//! Protocol: the request is written to `spool/` (fsynced) before the 202 is sent; the
//! worker removes the spool file only after the document is published or has failed
//! for good. At start-up every spool file is queued again. The store's own protocol
//! (blocks first, manifest last) guarantees nothing half-written is ever visible.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use starkv_cache::MergeOptions;

use crate::{IngestRequest, Service, ServiceError};

/// Where an ingest job is.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Ingesting {
        blocks_done: usize,
        blocks_total: usize,
    },
    Ready {
        version: u64,
        blocks: usize,
        reused_blocks: usize,
        tokens: usize,
        seconds: f64,
    },
    Failed {
        reason: String,
    },
}

impl JobState {
    pub fn is_terminal(&self) -> bool {
        matches!(self, JobState::Ready { .. } | JobState::Failed { .. })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: String,
    pub tenant: String,
    pub submitted_ms: u64,
    #[serde(flatten)]
    pub state: JobState,
}

/// A queued ingest as spooled on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Spooled {
    id: String,
    tenant: String,
    text: String,
    block_size: usize,
    anchor_size: usize,
    /// Absent in a job spooled before the overlap existed: none.
    #[serde(default)]
    block_overlap: usize,
    /// APE's merge (absent in entries spooled before it existed: exact).
    #[serde(default)]
    merge: Option<(f32, f32)>,
    #[serde(default)]
    reencode_ratio: f32,
    pinned: bool,
    ttl_ms: Option<u64>,
    submitted_ms: u64,
    /// Absent in a job spooled before 8-bit KV existed: f16.
    #[serde(default)]
    kv_dtype: crate::KvDtype,
}

/// Why a job was not accepted.
#[derive(Debug)]
pub enum SubmitError {
    QueueFull,
    Spool(String),
}

pub struct Jobs {
    table: Mutex<HashMap<(String, String), Job>>,
    queue: SyncSender<Spooled>,
    spool_dir: PathBuf,
    changed: tokio::sync::watch::Sender<u64>,
    depth: std::sync::atomic::AtomicUsize,
}

impl Jobs {
    /// Starts the worker and re-queues what the spool holds from a previous run.
    pub fn start(
        service: Arc<Service>,
        spool_dir: &Path,
        capacity: usize,
    ) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(spool_dir)?;
        let (tx, rx) = sync_channel(capacity);
        let (changed, _) = tokio::sync::watch::channel(0);
        let jobs = Arc::new(Self {
            table: Mutex::new(HashMap::new()),
            queue: tx,
            spool_dir: spool_dir.to_path_buf(),
            changed,
            depth: Default::default(),
        });
        let mut pending: Vec<Spooled> = std::fs::read_dir(spool_dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| {
                std::fs::read(e.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
            })
            .collect();
        pending.sort_by_key(|s: &Spooled| s.submitted_ms);
        let worker_jobs = jobs.clone();
        std::thread::Builder::new()
            .name("starkv-ingest".into())
            .spawn(move || worker_jobs.run(service, rx))?;
        for job in pending {
            tracing::info!(
                id = job.id,
                tenant = job.tenant,
                "resuming a spooled ingest"
            );
            jobs.enqueue(job, true)
                .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        }
        Ok(jobs)
    }

    /// Spools and queues an ingest. Returns only after the spool file is durable.
    pub fn submit(&self, req: IngestRequest) -> Result<Job, SubmitError> {
        let spooled = Spooled {
            id: req.id,
            tenant: req.tenant,
            text: req.text,
            block_size: req.block_size,
            anchor_size: req.anchor_size,
            block_overlap: req.block_overlap,
            merge: Some((req.merge.temperature(), req.merge.scale())),
            reencode_ratio: req.reencode_ratio,
            pinned: req.pinned,
            ttl_ms: req.ttl_ms,
            kv_dtype: req.kv_dtype,
            submitted_ms: now_ms(),
        };
        self.enqueue(spooled, false)
    }

    fn enqueue(&self, spooled: Spooled, already_spooled: bool) -> Result<Job, SubmitError> {
        let key = (spooled.tenant.clone(), spooled.id.clone());
        let job = Job {
            id: spooled.id.clone(),
            tenant: spooled.tenant.clone(),
            submitted_ms: spooled.submitted_ms,
            state: JobState::Queued,
        };
        let path = self.spool_path(&spooled.tenant, &spooled.id);
        if !already_spooled {
            write_durably(
                &path,
                &serde_json::to_vec(&spooled).expect("spool entries serialise"),
            )
            .map_err(|e| SubmitError::Spool(e.to_string()))?;
        }
        self.table
            .lock()
            .expect("job table lock")
            .insert(key.clone(), job.clone());
        match self.queue.try_send(spooled) {
            Ok(()) => {
                self.depth.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                metrics::gauge!("starkv_ingest_queue_depth").set(self.queue_depth() as f64);
                self.notify();
                Ok(job)
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                if !already_spooled {
                    let _ = std::fs::remove_file(&path);
                }
                self.table.lock().expect("job table lock").remove(&key);
                Err(SubmitError::QueueFull)
            }
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.depth.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The latest job for a document, if one ran since start-up.
    pub fn get(&self, tenant: &str, id: &str) -> Option<Job> {
        self.table
            .lock()
            .expect("job table lock")
            .get(&(tenant.to_string(), id.to_string()))
            .cloned()
    }

    /// A receiver that changes whenever any job changes state.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn set_state(&self, tenant: &str, id: &str, state: JobState) {
        if let Some(job) = self
            .table
            .lock()
            .expect("job table lock")
            .get_mut(&(tenant.to_string(), id.to_string()))
        {
            job.state = state;
        }
        self.notify();
    }

    fn spool_path(&self, tenant: &str, id: &str) -> PathBuf {
        self.spool_dir.join(format!("{tenant}__{id}.json"))
    }

    fn run(&self, service: Arc<Service>, rx: Receiver<Spooled>) {
        for job in rx {
            self.depth.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            metrics::gauge!("starkv_ingest_queue_depth").set(self.queue_depth() as f64);
            let (tenant, id) = (job.tenant.clone(), job.id.clone());
            let req = IngestRequest {
                id: crate::naming::store_doc_id(&tenant, &id),
                tenant: tenant.clone(),
                text: job.text,
                block_size: job.block_size,
                anchor_size: job.anchor_size,
                block_overlap: job.block_overlap,
                merge: job
                    .merge
                    .map_or_else(Default::default, |(t, s)| MergeOptions::new(t, s)),
                reencode_ratio: job.reencode_ratio,
                pinned: job.pinned,
                ttl_ms: job.ttl_ms,
                kv_dtype: job.kv_dtype,
            };
            let progress = |done: usize, total: usize| {
                self.set_state(
                    &tenant,
                    &id,
                    JobState::Ingesting {
                        blocks_done: done,
                        blocks_total: total,
                    },
                );
            };
            let started = std::time::Instant::now();
            // A panic in model code fails this job, not the worker.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let tokens = service.document_tokens(&req.text)?;
                service.ingest(&req, tokens, &progress)
            }))
            .unwrap_or_else(|_| Err(ServiceError::Internal("ingest panicked".into())));
            let state = match outcome {
                Ok(o) => {
                    metrics::counter!("starkv_ingest_total", "result" => "ok").increment(1);
                    metrics::counter!("starkv_blocks_encoded_total")
                        .increment((o.blocks - o.reused_blocks) as u64);
                    metrics::counter!("starkv_blocks_reused_total")
                        .increment(o.reused_blocks as u64);
                    metrics::counter!("starkv_ingest_tokens_total").increment(o.tokens as u64);
                    metrics::histogram!("starkv_ingest_seconds")
                        .record(started.elapsed().as_secs_f64());
                    JobState::Ready {
                        version: o.doc.version,
                        blocks: o.blocks,
                        reused_blocks: o.reused_blocks,
                        tokens: o.tokens,
                        seconds: o.seconds,
                    }
                }
                Err(e) => {
                    metrics::counter!("starkv_ingest_total", "result" => "failed").increment(1);
                    tracing::warn!(tenant, id, error = %e, "ingest failed");
                    JobState::Failed {
                        reason: e.public_message(),
                    }
                }
            };
            let _ = std::fs::remove_file(self.spool_path(&tenant, &id));
            self.set_state(&tenant, &id, state);
        }
    }
}

pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
