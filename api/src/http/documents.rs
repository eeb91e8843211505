//! Document lifecycle: ingest, status, listing, deletion, pin/unpin, TTL; admin stats/gc.

use std::time::Duration;

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Principal;
use super::error::ApiError;
use super::extract::{ApiPath, ApiQuery};
use super::{ApiJson, AppState, blocking};
use crate::config::Role;
use starkv_cache::MergeOptions;
use starkv_compute::star::{DEFAULT_OVERLAP, MAX_OVERLAP, StarConfig};
use starkv_service::jobs::{Job, JobState, SubmitError};
use starkv_service::limits::seconds_to_ms;
use starkv_service::query::ingest_merge;
use starkv_service::{IngestRequest, KvDtype};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDocument {
    text: String,
    id: Option<String>,
    block_size: Option<usize>,
    anchor_size: Option<usize>,
    /// Tokens before each block encoded in front of it and dropped (issue 14).
    block_overlap: Option<usize>,
    #[serde(default)]
    pin: bool,
    ttl_seconds: Option<u64>,
    #[serde(default)]
    metadata: Option<Value>,
    /// Ingest even when the document is longer than the model's context_length.
    #[serde(default)]
    allow_beyond_context: bool,
    /// APE's tempered merge of the context blocks at query time (issue 14).
    merge_temperature: Option<f32>,
    merge_scale: Option<f32>,
    /// KV precision: `f16` (default), `int8` or `fp8`.
    kv_dtype: Option<String>,
    /// Fraction of the tokens after the anchor re-encoded with global attention.
    reencode_ratio: Option<f32>,
}

/// Accepted range of `merge_temperature` (bounds exact in f32 and f64, so the OpenAPI
/// description and the check agree to the last bit).
pub const MERGE_TEMPERATURE: std::ops::RangeInclusive<f32> = 0.0625..=4.0;
/// Accepted range of `merge_scale`.
pub const MERGE_SCALE: std::ops::RangeInclusive<f32> = 0.015625..=64.0;

/// `merge_temperature` and `merge_scale` of an ingest or a query: `None` when neither is
/// given (the default applies: [`ingest_merge`]'s for an ingest, the document's for a
/// query), else both checked against their ranges (a missing one is 1).
pub fn validate_merge(
    temperature: Option<f32>,
    scale: Option<f32>,
) -> Result<Option<MergeOptions>, ApiError> {
    if temperature.is_none() && scale.is_none() {
        return Ok(None);
    }
    let (t, s) = (temperature.unwrap_or(1.0), scale.unwrap_or(1.0));
    if !MERGE_TEMPERATURE.contains(&t) {
        return Err(ApiError::bad_request(format!(
            "`merge_temperature` must be in {}..={}",
            MERGE_TEMPERATURE.start(),
            MERGE_TEMPERATURE.end()
        )));
    }
    if !MERGE_SCALE.contains(&s) {
        return Err(ApiError::bad_request(format!(
            "`merge_scale` must be in {}..={}",
            MERGE_SCALE.start(),
            MERGE_SCALE.end()
        )));
    }
    Ok(Some(MergeOptions::new(t, s)))
}

#[derive(Deserialize)]
pub struct WaitParam {
    #[serde(default)]
    wait: bool,
}

/// Document ids (see [`starkv_service::naming::validate_doc_id`]).
pub fn validate_id(id: &str) -> Result<(), ApiError> {
    Ok(starkv_service::naming::validate_doc_id(id)?)
}

fn store_id(principal: &Principal, id: &str) -> String {
    starkv_service::naming::store_doc_id(&principal.tenant, id)
}

pub async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiQuery(params): ApiQuery<WaitParam>,
    body: Result<ApiJson<CreateDocument>, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    principal.require(Role::Write)?;
    // Before anything is tokenised or spooled: 507 while the disk is under the floor.
    state
        .service
        .store()
        .check_free_space()
        .map_err(starkv_service::ServiceError::from)?;
    let ApiJson(body) = body?;
    let id = match body.id {
        Some(id) => id,
        None => format!("doc-{:016x}", rand_id()),
    };
    validate_id(&id)?;
    if body.text.trim().is_empty() {
        return Err(ApiError::bad_request("`text` is empty"));
    }
    let _ = body.metadata;
    let block_size = body.block_size.unwrap_or(state.config.block_size);
    if block_size == 0 || block_size > MAX_BLOCK_SIZE {
        return Err(ApiError::bad_request(format!(
            "`block_size` must be in 1..={MAX_BLOCK_SIZE}"
        )));
    }
    if body
        .anchor_size
        .is_some_and(|a| a == 0 || a > 1 << 16 || (a > block_size && !a.is_multiple_of(block_size)))
    {
        return Err(ApiError::bad_request(
            "`anchor_size` must be in 1..=block_size, or a multiple of block_size up to 65536",
        ));
    }
    let block_overlap = body
        .block_overlap
        .or(state.config.block_overlap)
        .unwrap_or(DEFAULT_OVERLAP);
    if block_overlap > MAX_OVERLAP {
        return Err(ApiError::bad_request(format!(
            "`block_overlap` must be in 0..={MAX_OVERLAP}"
        )));
    }
    let requested_merge = validate_merge(body.merge_temperature, body.merge_scale)?;
    let kv_dtype = match body.kv_dtype.as_deref() {
        None => KvDtype::F16,
        Some(name) => KvDtype::parse(name).ok_or_else(|| {
            ApiError::bad_request(format!(
                "`kv_dtype` must be one of {}",
                KvDtype::NAMES.join(", ")
            ))
        })?,
    };
    let reencode_ratio = body
        .reencode_ratio
        .or(state.config.reencode_ratio)
        .unwrap_or(0.0);
    if !(0.0..=1.0).contains(&reencode_ratio) {
        return Err(ApiError::bad_request("`reencode_ratio` must be in 0..=1"));
    }
    let merge = ingest_merge(requested_merge, state.config.merge_scale, reencode_ratio);
    let ttl_ms = body
        .ttl_seconds
        .map(|s| seconds_to_ms("ttl_seconds", s))
        .transpose()?;
    if let Some(job) = state.jobs.get(&principal.tenant, &id)
        && !job.state.is_terminal()
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("document {id} is already being ingested"),
        ));
    }
    let limits = DocumentLimits::new(&state, body.allow_beyond_context);
    // A text so long that it must have too many tokens is refused before it is tokenised.
    limits.check_bytes(body.text.len())?;
    // Tokenise up front so oversized documents are refused before they are acknowledged.
    let service = state.service.clone();
    let text = body.text;
    let (text, n_tokens) = blocking(move || {
        let n = service.document_tokens(&text)?.len();
        Ok((text, n))
    })
    .await?;
    limits.check_tokens(n_tokens)?;
    // A configured default anchor never exceeds a document's own smaller block; without
    // one, whole blocks covering a quarter of the document (`a = b` up to 4 blocks, issue
    // 14's measured choice for smaller blocks).
    let anchor_size = body
        .anchor_size
        .unwrap_or_else(|| match state.config.anchor_size {
            Some(a) => a.min(block_size),
            None => StarConfig::with_default_anchor(block_size, n_tokens).anchor_size,
        });
    let req = IngestRequest {
        id: id.clone(),
        tenant: principal.tenant.clone(),
        text,
        block_size,
        anchor_size,
        block_overlap,
        merge,
        reencode_ratio,
        pinned: body.pin,
        ttl_ms,
        kv_dtype,
    };
    let mut changes = state.jobs.subscribe();
    match state.jobs.submit(req) {
        Ok(_) => {}
        Err(SubmitError::QueueFull) => {
            return Err(ApiError::busy(
                StatusCode::TOO_MANY_REQUESTS,
                "the ingest queue is full",
                5,
            ));
        }
        // The disk filled between the free-space check and the spool write.
        Err(SubmitError::Spool(e)) if e.contains("No space left on device") => {
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                "the disk is full: the ingest could not be spooled; delete documents and run gc",
            ));
        }
        Err(SubmitError::Spool(e)) => {
            tracing::error!(error = e, "spooling an ingest failed");
            return Err(ApiError::internal(
                "the ingest could not be spooled; the server log has the details",
            ));
        }
    }
    let beyond_context = limits.beyond_context(n_tokens);
    if params.wait {
        loop {
            let job = state.jobs.get(&principal.tenant, &id);
            if job.as_ref().is_some_and(|j| j.state.is_terminal()) {
                let (status, mut body) = document_view(&state, &principal, &id).await?;
                beyond_context.annotate(&mut body);
                return Ok((status, Json(body)));
            }
            if tokio::time::timeout(Duration::from_secs(600), changes.changed())
                .await
                .is_err()
            {
                break;
            }
        }
    }
    let (_, mut body) = document_view(&state, &principal, &id).await?;
    beyond_context.annotate(&mut body);
    Ok((StatusCode::ACCEPTED, Json(body)))
}

/// The largest block size an ingest may ask for.
pub const MAX_BLOCK_SIZE: usize = 1 << 16;

/// How long a document may be: the model's trained context unless the ingest opts in
/// (`allow_beyond_context`), and the operator's caps.
struct DocumentLimits {
    /// The model's `context_length` (from the GGUF).
    context_length: usize,
    /// The cap that applies to this ingest.
    cap: usize,
    /// Whether `cap` is the model's context (the refusal then says how to opt in).
    cap_is_context: bool,
    /// No token covers more bytes than this (from the vocabulary).
    max_token_bytes: usize,
}

impl DocumentLimits {
    fn new(state: &AppState, allow_beyond_context: bool) -> Self {
        let context_length = state.service.model().model.config().context_length;
        let ordinary = state.config.max_document_tokens.unwrap_or(context_length);
        let (cap, cap_is_context) = if allow_beyond_context {
            (
                state
                    .config
                    .max_document_tokens_beyond_context
                    .max(ordinary),
                false,
            )
        } else {
            (ordinary, state.config.max_document_tokens.is_none())
        };
        Self {
            context_length,
            cap,
            cap_is_context,
            max_token_bytes: state.max_token_bytes.max(1),
        }
    }

    /// Refuses a text whose byte length alone proves it has more tokens than the cap
    /// (each token covers at most `max_token_bytes` bytes), without tokenising it.
    fn check_bytes(&self, text_bytes: usize) -> Result<(), ApiError> {
        let at_least = text_bytes / self.max_token_bytes;
        if at_least > self.cap {
            return Err(self.refusal(&format!("at least {at_least}")));
        }
        Ok(())
    }

    fn check_tokens(&self, n_tokens: usize) -> Result<(), ApiError> {
        if n_tokens > self.cap {
            return Err(self.refusal(&n_tokens.to_string()));
        }
        Ok(())
    }

    fn refusal(&self, n_tokens: &str) -> ApiError {
        if self.cap_is_context {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "document_beyond_model_context",
                format!(
                    "the document has {n_tokens} tokens; the model's context_length is {} \
                     (it was never trained on later positions, so answers there are \
                     unreliable); send `allow_beyond_context: true` to ingest it anyway",
                    self.context_length
                ),
            )
        } else {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "document_too_large",
                format!(
                    "the document has {n_tokens} tokens; the limit is {}",
                    self.cap
                ),
            )
        }
    }

    fn beyond_context(&self, n_tokens: usize) -> BeyondContext {
        BeyondContext {
            context_length: (n_tokens > self.context_length).then_some(self.context_length),
        }
    }
}

/// Said in the ingest's answer when the document runs past the model's context.
struct BeyondContext {
    context_length: Option<usize>,
}

impl BeyondContext {
    fn annotate(&self, body: &mut Value) {
        if let Some(context_length) = self.context_length {
            body["beyond_context"] = json!(true);
            body["model_context_length"] = json!(context_length);
            body["warning"] = json!(format!(
                "the document is longer than the model's context_length ({context_length}): \
                 answers that depend on text past it are unreliable"
            ));
        }
    }
}

/// The document as the API shows it: the ingest job's state when one ran since start-up
/// and is not ready, else the stored document.
async fn document_view(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<(StatusCode, Value), ApiError> {
    let job = state.jobs.get(&principal.tenant, id);
    let service = state.service.clone();
    let sid = store_id(principal, id);
    let tenant = principal.tenant.clone();
    if let Some(cluster) = service.cluster() {
        let entry = cluster.document(&sid, &tenant);
        return match (job, entry) {
            (Some(job), _) if !matches!(job.state, JobState::Ready { .. }) => {
                Ok(job_view(&job, id))
            }
            (_, Some(entry)) => {
                let last_used_ms = cluster.last_used_ms(&entry);
                Ok((
                    StatusCode::OK,
                    super::cluster::document_json(id, &entry, last_used_ms),
                ))
            }
            (_, None) => Err(ApiError::not_found(format!("document {id} not found"))),
        };
    }
    let (stored, lost) = blocking(move || {
        let store = service.store();
        let stored = store
            .versions(&sid)
            .into_iter()
            .max_by_key(|v| v.version)
            .and_then(|v| store.doc_info(&v))
            .filter(|i| i.tenant == tenant);
        // The store id carries the tenant, so a lost version of it is the caller's.
        let lost = store.lost_documents().iter().any(|(r, _)| r.doc == sid);
        Ok((stored, lost))
    })
    .await?;
    match (job, stored) {
        (Some(job), _) if !matches!(job.state, JobState::Ready { .. }) => Ok(job_view(&job, id)),
        (job, Some(info)) => {
            let mut body = json!({
                "id": id,
                "state": "ready",
                "version": info.doc.version,
                "blocks": info.blocks,
                "kv_dtype": KvDtype::of_stored(info.dtype).name(),
                "stored_dtype": info.dtype.name(),
                "stored_bytes": info.stored_bytes,
                "raw_bytes": info.raw_bytes,
                "created_ms": info.created_ms,
                "last_used_ms": info.state.last_used_ms,
                "pinned": info.state.pinned,
                "ttl_ms": info.state.ttl_ms,
                "active_queries": info.leases,
            });
            if let Some(job) = job
                && let JobState::Ready {
                    reused_blocks,
                    tokens,
                    seconds,
                    ..
                } = job.state
            {
                body["reused_blocks"] = json!(reused_blocks);
                body["tokens"] = json!(tokens);
                body["ingest_seconds"] = json!(seconds);
            }
            Ok((StatusCode::OK, body))
        }
        // A stored manifest unreadable in both of its copies: reported, never `ready`.
        (_, None) if lost => Ok((
            StatusCode::OK,
            json!({
                "id": id,
                "state": "failed",
                "reason": "the stored document is damaged beyond repair (its manifest is unreadable); re-ingest it",
            }),
        )),
        (_, None) => Err(ApiError::not_found(format!("document {id} not found"))),
    }
}

pub async fn show(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    principal.require(Role::Read)?;
    validate_id(&id)?;
    let (status, body) = document_view(&state, &principal, &id).await?;
    Ok((status, Json(body)))
}

#[derive(Deserialize)]
pub struct ListParams {
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiQuery(p): ApiQuery<ListParams>,
) -> Result<impl IntoResponse, ApiError> {
    principal.require(Role::Read)?;
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad_request("`limit` must be in 1..=1000"));
    }
    let service = state.service.clone();
    let tenant = principal.tenant.clone();
    if let Some(cluster) = service.cluster() {
        let docs = cluster.documents(&tenant);
        let total = docs.len();
        let prefix = format!("{}/", principal.tenant);
        let items: Vec<Value> = docs
            .iter()
            .skip(p.offset)
            .take(limit)
            .map(|d| {
                json!({
                    "id": d.doc.strip_prefix(&prefix).unwrap_or(&d.doc),
                    "version": d.version,
                    "blocks": d.blocks.len(),
                    "tokens": d.tokens.len(),
                    "pinned": d.pinned,
                    "last_used_ms": cluster.last_used_ms(d),
                })
            })
            .collect();
        let next = (p.offset + limit < total).then_some(p.offset + limit);
        return Ok(Json(
            json!({ "documents": items, "total": total, "offset": p.offset, "next_offset": next }),
        ));
    }
    let mut docs = blocking(move || {
        Ok(service
            .store()
            .list()
            .into_iter()
            .filter(|d| d.tenant == tenant)
            .collect::<Vec<_>>())
    })
    .await?;
    docs.sort_by(|a, b| a.doc.doc.cmp(&b.doc.doc));
    let total = docs.len();
    let prefix = format!("{}/", principal.tenant);
    let items: Vec<Value> = docs
        .into_iter()
        .skip(p.offset)
        .take(limit)
        .map(|d| {
            json!({
                "id": d.doc.doc.strip_prefix(&prefix).unwrap_or(&d.doc.doc),
                "version": d.doc.version,
                "blocks": d.blocks,
                "stored_bytes": d.stored_bytes,
                "pinned": d.state.pinned,
                "last_used_ms": d.state.last_used_ms,
            })
        })
        .collect();
    let next = p.offset.checked_add(limit).filter(|&next| next < total);
    Ok(Json(
        json!({ "documents": items, "total": total, "offset": p.offset, "next_offset": next }),
    ))
}

/// Runs `f` on the latest version of the caller's document `id`.
async fn with_doc<T: Send + 'static>(
    state: &AppState,
    principal: &Principal,
    id: String,
    f: impl FnOnce(&starkv_cache::BlockStore, starkv_cache::DocRef) -> Result<T, ApiError>
    + Send
    + 'static,
) -> Result<T, ApiError> {
    validate_id(&id)?;
    let service = state.service.clone();
    let sid = store_id(principal, &id);
    let tenant = principal.tenant.clone();
    blocking(move || {
        let store = service.store();
        let doc = store
            .versions(&sid)
            .into_iter()
            .max_by_key(|v| v.version)
            .filter(|v| store.doc_info(v).is_some_and(|i| i.tenant == tenant))
            .ok_or_else(|| ApiError::not_found(format!("document {id} not found")))?;
        f(store, doc)
    })
    .await
}

pub async fn delete(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    principal.require(Role::Write)?;
    let shown = id.clone();
    if let Some(cluster) = state.service.cluster().cloned() {
        validate_id(&id)?;
        let (sid, tenant) = (store_id(&principal, &id), principal.tenant.clone());
        blocking(move || Ok(cluster.delete(&sid, &tenant)?)).await?;
        metrics::counter!("starkv_documents_deleted_total").increment(1);
        return Ok(Json(json!({ "id": shown, "deleted": true })));
    }
    with_doc(&state, &principal, id, |store, doc| {
        store
            .delete_doc(&doc.doc)
            .map_err(starkv_service::ServiceError::from)?;
        Ok(())
    })
    .await?;
    metrics::counter!("starkv_documents_deleted_total").increment(1);
    Ok(Json(json!({ "id": shown, "deleted": true })))
}

pub async fn pin(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    set_pin(state, principal, id, true).await
}

pub async fn unpin(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    set_pin(state, principal, id, false).await
}

async fn set_pin(
    state: AppState,
    principal: Principal,
    id: String,
    pinned: bool,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Write)?;
    let shown = id.clone();
    if let Some(cluster) = state.service.cluster().cloned() {
        validate_id(&id)?;
        let (sid, tenant) = (store_id(&principal, &id), principal.tenant.clone());
        blocking(move || Ok(cluster.set_pinned(&sid, &tenant, pinned)?)).await?;
        return Ok(Json(json!({ "id": shown, "pinned": pinned })));
    }
    with_doc(&state, &principal, id, move |store, doc| {
        store
            .set_pinned(&doc, pinned)
            .map_err(starkv_service::ServiceError::from)?;
        Ok(())
    })
    .await?;
    Ok(Json(json!({ "id": shown, "pinned": pinned })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtlBody {
    /// Idle seconds after which the document expires; `null` removes the TTL.
    ttl_seconds: Option<u64>,
}

pub async fn ttl(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
    body: Result<ApiJson<TtlBody>, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    principal.require(Role::Write)?;
    let ApiJson(body) = body?;
    let shown = id.clone();
    let ttl_ms = body
        .ttl_seconds
        .map(|s| seconds_to_ms("ttl_seconds", s))
        .transpose()?;
    if let Some(cluster) = state.service.cluster().cloned() {
        validate_id(&id)?;
        let (sid, tenant) = (store_id(&principal, &id), principal.tenant.clone());
        blocking(move || Ok(cluster.set_ttl(&sid, &tenant, ttl_ms)?)).await?;
        return Ok(Json(
            json!({ "id": shown, "ttl_seconds": body.ttl_seconds }),
        ));
    }
    with_doc(&state, &principal, id, move |store, doc| {
        store
            .set_ttl(&doc, ttl_ms)
            .map_err(starkv_service::ServiceError::from)?;
        Ok(())
    })
    .await?;
    Ok(Json(
        json!({ "id": shown, "ttl_seconds": body.ttl_seconds }),
    ))
}

pub async fn stats(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<impl IntoResponse, ApiError> {
    principal.require(Role::Admin)?;
    let service = state.service.clone();
    let (s, cluster) = blocking(move || {
        Ok((
            service.store().stats(),
            service.cluster().map(|c| super::cluster::totals_json(c)),
        ))
    })
    .await?;
    let backend = state.service.backend();
    let gpu_tier = backend.tier_stats().map(|t| {
        json!({
            "blocks": t.blocks,
            "used_bytes": t.used_bytes,
            "budget_bytes": t.budget_bytes,
            "hits": t.hits,
            "misses": t.misses,
            "evictions": t.evictions,
        })
    });
    let mut body = json!({
        "device": backend.device_id(),
        "device_detail": backend.selected().to_string(),
        "gpu_tier": gpu_tier,
        "documents": s.documents,
        "blocks": s.blocks,
        "store_bytes": s.store_bytes,
        "bytes_written": s.bytes_written,
        "blocks_written": s.blocks_written,
        "blocks_deduplicated": s.blocks_deduplicated,
        "bytes_read": s.bytes_read,
        "checksum_failures": s.checksum_failures,
        "evictions": s.evictions.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "gc_blocks": s.gc_blocks,
        "repair_pending": s.repair_pending,
        "lost_documents": s.lost_documents,
        "restored_manifests": s.restored_manifests,
        "recoveries": s.recoveries,
        "free_disk_bytes": state.service.store().free_disk_bytes(),
        "ingest_queue_depth": state.jobs.queue_depth(),
    });
    if let Some(cluster) = cluster {
        body["cluster"] = cluster;
    }
    Ok(Json(body))
}

pub async fn gc(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<impl IntoResponse, ApiError> {
    principal.require(Role::Admin)?;
    let service = state.service.clone();
    let report = blocking(move || {
        service
            .store()
            .gc()
            .map_err(|e| starkv_service::ServiceError::from(e).into())
    })
    .await?;
    Ok(Json(
        json!({ "scanned": report.scanned, "deleted": report.deleted, "bytes_freed": report.bytes_freed,
                "disk_bytes_before": report.disk_bytes_before, "disk_bytes_after": report.disk_bytes_after }),
    ))
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

pub async fn evict(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<ApiJson<starkv_service::admin::EvictRequest>, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    principal.require(Role::Admin)?;
    let ApiJson(req) = body?;
    let service = state.service.clone();
    let out = blocking(move || {
        let now = starkv_service::jobs::now_ms();
        Ok(match service.cluster() {
            Some(cluster) => cluster.evict(&req, now)?,
            None => starkv_service::admin::evict(service.store(), &req, now)?,
        })
    })
    .await?;
    for (_, rule) in &out.evicted {
        metrics::counter!("starkv_operator_evictions_total", "rule" => rule.clone()).increment(1);
    }
    Ok(Json(serde_json::to_value(out).expect("reports serialise")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyBody {
    #[serde(default)]
    repair: bool,
}

pub async fn verify(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<ApiJson<VerifyBody>, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    principal.require(Role::Admin)?;
    let ApiJson(req) = body?;
    let service = state.service.clone();
    let out =
        blocking(move || Ok(starkv_service::admin::verify_service(&service, req.repair)?)).await?;
    Ok(Json(serde_json::to_value(out).expect("reports serialise")))
}

/// A document whose ingest job has not published it: the job's state, 200 when it failed
/// (the answer is final), 202 while it is queued or running.
fn job_view(job: &Job, id: &str) -> (StatusCode, Value) {
    let status = if matches!(job.state, JobState::Failed { .. }) {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let mut body = serde_json::to_value(job).expect("jobs serialise");
    body["id"] = json!(id);
    (status, body)
}
