//! Operator commands. Each runs against a running server through its HTTP API
//! ([`Target::Server`]) or directly on a stopped server's data directory
//! ([`Target::Local`]); both return the same JSON reports, which the binary prints as
//! JSON (`--json`) or through [`render`] for people.

pub mod render;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use starkv_cache::{BlockStore, RocksConfig, StoreConfig};
use starkv_service::admin::{self, EvictRequest};

/// Why an operator command failed; [`OpsError::exit_code`] gives scripts something to test.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("cannot reach the server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the server answered {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    /// The verify report, which names the corrupt documents.
    #[error("verification found corrupt data in {} document(s); `starkv verify --repair` re-encodes it", corrupt_count(.0))]
    Corrupt(Value),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Other(String),
}

impl OpsError {
    /// 1 general failure, 3 not found, 4 corrupt data found, 5 server unreachable.
    pub fn exit_code(&self) -> u8 {
        match self {
            OpsError::NotFound(_) => 3,
            OpsError::Api { status: 404, .. } => 3,
            OpsError::Corrupt(_) => 4,
            OpsError::Unreachable { .. } => 5,
            _ => 1,
        }
    }
}

fn corrupt_count(report: &Value) -> usize {
    report["corrupt"].as_array().map_or(0, Vec::len)
}

impl From<starkv_cache::Error> for OpsError {
    fn from(e: starkv_cache::Error) -> Self {
        match e {
            starkv_cache::Error::NotFound { .. } => OpsError::NotFound(e.to_string()),
            other => OpsError::Other(other.to_string()),
        }
    }
}

impl From<starkv_service::ServiceError> for OpsError {
    fn from(e: starkv_service::ServiceError) -> Self {
        match e {
            starkv_service::ServiceError::NotFound(m) => OpsError::NotFound(m),
            starkv_service::ServiceError::Invalid(m) => OpsError::Invalid(m),
            other => OpsError::Other(other.to_string()),
        }
    }
}

pub type OpsResult<T = Value> = Result<T, OpsError>;

/// Where commands act.
pub enum Target {
    Server {
        base: String,
        key: Option<String>,
        agent: ureq::Agent,
    },
    Local {
        data_dir: PathBuf,
        tenant: String,
    },
}

impl Target {
    pub fn server(url: &str, key: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(3600)))
            .build()
            .into();
        Target::Server {
            base: url.trim_end_matches('/').to_string(),
            key,
            agent,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> OpsResult<Value> {
        let Target::Server { base, key, agent } = self else {
            return Err(OpsError::Invalid("this command needs --server URL".into()));
        };
        let url = format!("{base}{path}");
        let auth = key.as_ref().map(|k| format!("Bearer {k}"));
        let result = match (method, body) {
            ("GET", _) => with_auth(agent.get(&url), &auth).call(),
            ("DELETE", _) => with_auth(agent.delete(&url), &auth).call(),
            (_, Some(b)) => with_auth(agent.post(&url), &auth).send_json(b),
            (_, None) => with_auth(agent.post(&url), &auth).send_empty(),
        };
        let mut res = result.map_err(|e| OpsError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let status = res.status().as_u16();
        let value: Value = res.body_mut().read_json().unwrap_or(Value::Null);
        if status >= 400 {
            return Err(OpsError::Api {
                status,
                code: value["error"]["code"].as_str().unwrap_or("unknown").into(),
                message: value["error"]["message"].as_str().unwrap_or("").into(),
            });
        }
        Ok(value)
    }

    /// Opens the store of a stopped server (RocksDB refuses while the server holds it).
    fn store(&self) -> OpsResult<(BlockStore, &str)> {
        let Target::Local { data_dir, tenant } = self else {
            unreachable!("local only")
        };
        Ok((open_store(data_dir)?, tenant))
    }
}

/// Opens the store under `data_dir` (a server's, or a worker's) while nothing runs on it.
fn open_store(data_dir: &Path) -> OpsResult<BlockStore> {
    let path = starkv_service::store_dir(data_dir);
    let shards = count_shards(&path)?;
    BlockStore::open_rocks(RocksConfig::new(&path, shards), StoreConfig::default()).map_err(|e| {
        OpsError::Other(format!(
            "opening the store at {} (is a server running on it? use --server): {e}",
            path.display()
        ))
    })
}

fn with_auth<B>(req: ureq::RequestBuilder<B>, auth: &Option<String>) -> ureq::RequestBuilder<B> {
    match auth {
        Some(a) => req.header("Authorization", a),
        None => req,
    }
}

fn count_shards(store: &Path) -> OpsResult<usize> {
    let entries = std::fs::read_dir(store)
        .map_err(|e| OpsError::NotFound(format!("no store at {}: {e}", store.display())))?;
    let n = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("shard-"))
        .count();
    if n == 0 {
        return Err(OpsError::NotFound(format!(
            "no store shards under {}",
            store.display()
        )));
    }
    Ok(n)
}

fn store_id(tenant: &str, id: &str) -> String {
    starkv_service::naming::store_doc_id(tenant, id)
}

/// `ingest FILE`: submits a document and follows its progress to the end.
pub fn ingest(
    target: &Target,
    id: &str,
    text: &str,
    block_size: Option<usize>,
    kv_dtype: Option<&str>,
    progress: bool,
) -> OpsResult {
    let mut body = json!({ "id": id, "text": text });
    if let Some(b) = block_size {
        body["block_size"] = json!(b);
    }
    if let Some(d) = kv_dtype {
        body["kv_dtype"] = json!(d);
    }
    target.call("POST", "/v1/documents", Some(&body))?;
    let bar = progress.then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} blocks")
                .expect("template"),
        );
        bar.set_message(format!("encoding {id}"));
        bar
    });
    loop {
        let doc = target.call("GET", &format!("/v1/documents/{id}"), None)?;
        if let Some(bar) = &bar {
            bar.set_length(doc["blocks_total"].as_u64().unwrap_or(0));
            bar.set_position(doc["blocks_done"].as_u64().unwrap_or(0));
        }
        match doc["state"].as_str() {
            Some("ready") | Some("failed") => {
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
                if doc["state"] == "failed" {
                    return Err(OpsError::Other(format!("ingest failed: {}", doc["reason"])));
                }
                return Ok(doc);
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `ask DOC QUESTION`: streams the answer to `out` as it is generated; the report is the
/// server's final event (usage, timings, and each token's log-probability with
/// `logprobs` runners-up when asked).
pub fn ask(
    target: &Target,
    id: &str,
    question: &str,
    max_tokens: usize,
    logprobs: Option<usize>,
    out: &mut dyn std::io::Write,
) -> OpsResult {
    let Target::Server { base, key, agent } = target else {
        return Err(OpsError::Invalid(
            "ask needs a running server: --server URL".into(),
        ));
    };
    let url = format!("{base}/v1/documents/{id}/query");
    let mut body = json!({ "question": question, "max_tokens": max_tokens, "stream": true });
    if let Some(n) = logprobs {
        body["logprobs"] = json!(n);
    }
    let auth = key.as_ref().map(|k| format!("Bearer {k}"));
    let mut res = with_auth(agent.post(&url), &auth)
        .send_json(&body)
        .map_err(|e| OpsError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    if res.status().as_u16() >= 400 {
        let status = res.status().as_u16();
        let value: Value = res.body_mut().read_json().unwrap_or(Value::Null);
        return Err(OpsError::Api {
            status,
            code: value["error"]["code"].as_str().unwrap_or("unknown").into(),
            message: value["error"]["message"].as_str().unwrap_or("").into(),
        });
    }
    let reader = std::io::BufReader::new(res.body_mut().as_reader());
    let mut event = String::new();
    for line in reader.lines() {
        let line = line.map_err(|e| OpsError::Other(e.to_string()))?;
        if let Some(name) = line.strip_prefix("event: ") {
            event = name.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            let value: Value = serde_json::from_str(data).unwrap_or(Value::Null);
            match event.as_str() {
                "token" => {
                    let _ = out.write_all(value["text"].as_str().unwrap_or("").as_bytes());
                    let _ = out.flush();
                }
                "done" => return Ok(value),
                "error" => {
                    return Err(OpsError::Api {
                        status: 500,
                        code: value["error"]["code"].as_str().unwrap_or("unknown").into(),
                        message: value["error"]["message"].as_str().unwrap_or("").into(),
                    });
                }
                _ => {}
            }
        }
    }
    Err(OpsError::Other("the answer stream ended early".into()))
}

pub fn list(target: &Target) -> OpsResult {
    if let Target::Server { .. } = target {
        return target.call("GET", "/v1/documents?limit=1000", None);
    }
    let (store, tenant) = target.store()?;
    let prefix = format!("{tenant}/");
    let mut infos: Vec<_> = store
        .list()
        .into_iter()
        .filter(|d| d.tenant == tenant)
        .collect();
    infos.sort_by(|a, b| a.doc.doc.cmp(&b.doc.doc));
    // Token counts come from each version's stored source tokens (one small read each).
    let docs: Vec<Value> = infos
        .into_iter()
        .map(|d| {
            json!({
                "id": d.doc.doc.strip_prefix(&prefix).unwrap_or(&d.doc.doc),
                "version": d.doc.version,
                "tokens": store.source_tokens(&d.doc).ok().map(|t| t.len()),
                "blocks": d.blocks,
                "stored_bytes": d.stored_bytes,
                "pinned": d.state.pinned,
                "last_used_ms": d.state.last_used_ms,
                "ttl_ms": d.state.ttl_ms,
            })
        })
        .collect();
    Ok(json!({ "total": docs.len(), "documents": docs }))
}

pub fn show(target: &Target, id: &str) -> OpsResult {
    if let Target::Server { .. } = target {
        return target.call("GET", &format!("/v1/documents/{id}"), None);
    }
    let (store, tenant) = target.store()?;
    let doc = latest(&store, tenant, id)?;
    let info = store
        .doc_info(&doc)
        .ok_or_else(|| OpsError::NotFound(format!("document {id} not found")))?;
    let tokens = store.source_tokens(&doc).ok().map(|t| t.len());
    Ok(json!({
        "id": id, "state": "ready", "version": info.doc.version, "tokens": tokens, "blocks": info.blocks, "stored_bytes": info.stored_bytes,
        "raw_bytes": info.raw_bytes, "created_ms": info.created_ms, "last_used_ms": info.state.last_used_ms,
        "pinned": info.state.pinned, "ttl_ms": info.state.ttl_ms,
        "kv_dtype": starkv_service::KvDtype::of_stored(info.dtype).name(), "stored_dtype": info.dtype.name(),
    }))
}

fn latest(store: &BlockStore, tenant: &str, id: &str) -> OpsResult<starkv_cache::DocRef> {
    store
        .versions(&store_id(tenant, id))
        .into_iter()
        .max_by_key(|v| v.version)
        .ok_or_else(|| OpsError::NotFound(format!("document {id} not found")))
}

pub fn stats(target: &Target) -> OpsResult {
    if let Target::Server { .. } = target {
        return target.call("GET", "/v1/admin/stats", None);
    }
    let (store, _) = target.store()?;
    let s = store.stats();
    Ok(json!({
        "documents": s.documents, "blocks": s.blocks, "store_bytes": s.store_bytes, "checksum_failures": s.checksum_failures,
        "repair_pending": s.repair_pending, "disk_bytes": store.engine().disk_usage().ok(),
        "lost_documents": s.lost_documents, "restored_manifests": s.restored_manifests, "recoveries": s.recoveries,
    }))
}

pub fn remove(target: &Target, id: &str) -> OpsResult {
    if let Target::Server { .. } = target {
        return target.call("DELETE", &format!("/v1/documents/{id}"), None);
    }
    let (store, tenant) = target.store()?;
    latest(&store, tenant, id)?;
    let report = store.delete_doc(&store_id(tenant, id))?;
    Ok(
        json!({ "id": id, "deleted": true, "blocks_deleted": report.blocks_deleted, "bytes_freed": report.bytes_freed }),
    )
}

pub fn set_pin(target: &Target, id: &str, pinned: bool) -> OpsResult {
    if let Target::Server { .. } = target {
        let action = if pinned { "pin" } else { "unpin" };
        return target.call("POST", &format!("/v1/documents/{id}/{action}"), None);
    }
    let (store, tenant) = target.store()?;
    store.set_pinned(&latest(&store, tenant, id)?, pinned)?;
    Ok(json!({ "id": id, "pinned": pinned }))
}

pub fn set_ttl(target: &Target, id: &str, ttl_seconds: Option<u64>) -> OpsResult {
    if let Target::Server { .. } = target {
        return target.call(
            "POST",
            &format!("/v1/documents/{id}/ttl"),
            Some(&json!({ "ttl_seconds": ttl_seconds })),
        );
    }
    let ttl_ms = ttl_seconds
        .map(|s| starkv_service::limits::seconds_to_ms("ttl_seconds", s))
        .transpose()?;
    let (store, tenant) = target.store()?;
    store.set_ttl(&latest(&store, tenant, id)?, ttl_ms)?;
    Ok(json!({ "id": id, "ttl_seconds": ttl_seconds }))
}

pub fn evict(target: &Target, req: &EvictRequest) -> OpsResult {
    if let Target::Server { .. } = target {
        return target.call(
            "POST",
            "/v1/admin/evict",
            Some(&serde_json::to_value(req).expect("serialisable")),
        );
    }
    let (store, _) = target.store()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Ok(serde_json::to_value(admin::evict(&store, req, now)?).expect("serialisable"))
}

/// `verify [--repair]`; corrupt data found is exit code 4 (with the report), repaired or not.
pub fn verify(target: &Target, repair: bool, model: Option<&Path>) -> OpsResult {
    let report = match target {
        Target::Server { .. } => target.call(
            "POST",
            "/v1/admin/verify",
            Some(&json!({ "repair": repair })),
        )?,
        Target::Local { data_dir, .. } => {
            let mut out = verify_store(&open_store(data_dir)?, repair, model)?;
            let workers = verify_local_workers(data_dir, repair, model)?;
            if !workers.is_empty() {
                out.corruption_found |= workers.iter().any(|w| w.corruption_found);
                out.workers = Some(workers);
            }
            serde_json::to_value(out).expect("serialisable")
        }
    };
    // Exit code 4 whenever damage was found, repaired or not (the README's promise:
    // "4 corrupt data found"); the report says what was repaired.
    if report["corruption_found"].as_bool().unwrap_or(false) {
        return Err(OpsError::Corrupt(report));
    }
    Ok(report)
}

/// The offline verify of one store; with `repair` and the model, damaged blocks are
/// re-encoded from the source tokens its documents keep.
fn verify_store(
    store: &BlockStore,
    repair: bool,
    model: Option<&Path>,
) -> OpsResult<admin::VerifyOutcome> {
    let service = match (repair, model) {
        (true, Some(path)) => {
            let loaded = starkv_compute::LoadedModel::open(path)
                .map_err(|e| OpsError::Other(e.to_string()))?;
            Some(starkv_service::Service::new(
                loaded,
                path,
                store.clone(),
                0,
            )?)
        }
        _ => None,
    };
    Ok(admin::verify(store, service.as_ref())?)
}

/// The stores of a stopped server's in-process shard workers (`DATA_DIR/local/<i>/`,
/// named `local:<i>` as the running server names them), each verified like the
/// server's own; a store that cannot be opened is reported, not skipped.
fn verify_local_workers(
    data_dir: &Path,
    repair: bool,
    model: Option<&Path>,
) -> OpsResult<Vec<starkv_service::cluster::WorkerVerify>> {
    let mut workers = Vec::new();
    for index in 0.. {
        let dir = starkv_service::cluster::local_worker_dir(data_dir, index);
        if !dir.is_dir() {
            break;
        }
        let address = format!("local:{index}");
        let verified = open_store(&dir).and_then(|store| verify_store(&store, repair, model));
        workers.push(match verified {
            Ok(out) => starkv_service::cluster::WorkerVerify {
                address,
                documents: out.documents as u64,
                corrupt: out.corrupt,
                repaired_blocks: out.repaired_blocks as u64,
                corruption_found: out.corruption_found,
                repair_error: out.repair_error,
                error: None,
            },
            Err(e) => starkv_service::cluster::WorkerVerify {
                address,
                documents: 0,
                corrupt: Vec::new(),
                repaired_blocks: 0,
                corruption_found: false,
                repair_error: None,
                error: Some(e.to_string()),
            },
        });
    }
    Ok(workers)
}

pub fn gc(target: &Target) -> OpsResult {
    if let Target::Server { .. } = target {
        return target.call("POST", "/v1/admin/gc", None);
    }
    let (store, _) = target.store()?;
    let r = store.gc()?;
    Ok(
        json!({ "scanned": r.scanned, "deleted": r.deleted, "bytes_freed": r.bytes_freed,
               "disk_bytes_before": r.disk_bytes_before, "disk_bytes_after": r.disk_bytes_after }),
    )
}

/// `cluster`: a coordinator's shard workers (health, what each holds, traffic).
pub fn cluster(target: &Target) -> OpsResult {
    match target {
        Target::Server { .. } => target.call("GET", "/v1/admin/cluster", None),
        Target::Local { .. } => Err(OpsError::Invalid(
            "cluster needs a running server: --server URL".into(),
        )),
    }
}
