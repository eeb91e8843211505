//! The HTTP API (axum). Handlers validate input, check the caller's role and tenant, and
//! run blocking work (model, RocksDB) on worker threads.

mod auth;
mod cluster;
pub(crate) mod documents;
mod error;
mod extract;
mod openai;
mod openapi;
mod query;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Extension, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use starkv_compute::cancel::Cancel;
use tokio::sync::Semaphore;

pub use auth::Principal;
pub use error::ApiError;

use crate::config::{Role, ServerConfig};
use starkv_service::Service;
use starkv_service::jobs::Jobs;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Service>,
    pub jobs: Arc<Jobs>,
    pub config: Arc<ServerConfig>,
    pub queries: Arc<Semaphore>,
    pub metrics: PrometheusHandle,
    /// The most bytes of text one token covers (from the vocabulary): a text of `n` bytes
    /// has at least `n / max_token_bytes` tokens, so length limits apply before tokenising.
    pub max_token_bytes: usize,
    /// Set at shutdown: every running query's cancellation flag is a child of it.
    pub shutdown: Cancel,
}

impl AppState {
    /// The shared state of a server around `service`.
    pub fn new(
        service: Arc<Service>,
        jobs: Arc<Jobs>,
        config: ServerConfig,
        metrics: PrometheusHandle,
    ) -> Self {
        let tokenizer = &service.model().tokenizer;
        let max_token_bytes = (0..tokenizer.vocab_size() as u32)
            .map(|id| tokenizer.token_bytes(id).len())
            .max()
            .unwrap_or(1);
        Self {
            queries: Arc::new(Semaphore::new(config.query_concurrency)),
            config: Arc::new(config),
            service,
            jobs,
            metrics,
            max_token_bytes,
            shutdown: Cancel::new(),
        }
    }
}

/// `Json<T>` whose rejections (malformed JSON, wrong content type, too large) are
/// answered in the API's JSON error shape.
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(value))
    }
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(
            "/v1/documents",
            post(documents::create).get(documents::list),
        )
        .route(
            "/v1/documents/{id}",
            get(documents::show).delete(documents::delete),
        )
        .route("/v1/documents/{id}/pin", post(documents::pin))
        .route("/v1/documents/{id}/unpin", post(documents::unpin))
        .route("/v1/documents/{id}/ttl", post(documents::ttl))
        .route("/v1/documents/{id}/query", post(query::query))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/admin/stats", get(documents::stats))
        .route("/v1/admin/gc", post(documents::gc))
        .route("/v1/admin/evict", post(documents::evict))
        .route("/v1/admin/verify", post(documents::verify))
        .route("/v1/admin/cluster", get(cluster::status))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi_document))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this endpoint",
            )
        })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the request handler panicked",
            )
            .into_response()
        }))
        .with_state(state)
}

/// Liveness, and which device serves (`device`: `cpu` or `cuda:N`; `device_detail`: the
/// GPU's name or why the CPU was chosen). Answers without waiting for the GPU.
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let backend = state.service.backend();
    Json(json!({
        "status": "ok",
        "device": backend.device_id(),
        "device_detail": backend.selected().to_string(),
    }))
}

async fn openapi_document(State(state): State<AppState>) -> impl IntoResponse {
    Json(openapi::spec(&state.config))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    Json(json!({
        "status": "ready",
        "model": state.service.model_id(),
        "ingest_queue_depth": state.jobs.queue_depth(),
        "queries_available": state.queries.available_permits(),
    }))
}

/// Prometheus metrics. They count every tenant's work (dedup, evictions), so with keys
/// configured only a `metrics` or `admin` key reads them.
async fn metrics(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<impl IntoResponse, ApiError> {
    principal.require(Role::Metrics)?;
    let stats = state.service.store().stats();
    metrics::gauge!("starkv_store_documents").set(stats.documents as f64);
    metrics::gauge!("starkv_store_blocks").set(stats.blocks as f64);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    ))
}

/// Runs the Prometheus upkeep and the store's periodic eviction (TTL) until shutdown.
pub fn spawn_upkeep(state: &AppState) {
    let (handle, service) = (state.metrics.clone(), state.service.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
            let service = service.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = service.store().run_eviction() {
                    tracing::warn!(error = %e, "periodic eviction failed");
                }
                if let Some(cluster) = service.cluster()
                    && let Err(e) = cluster.expire(starkv_service::jobs::now_ms())
                {
                    tracing::warn!(error = %e, "expiring cluster documents failed");
                }
            })
            .await;
        }
    });
}

/// Runs blocking work off the async workers, turning a panic into a 500.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|_| {
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "a worker panicked",
        ))
    })
}
