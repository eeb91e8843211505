//! `POST /v1/documents/{id}/query`: an answer over a stored document, whole or streamed.

use std::convert::Infallible;
use std::time::Instant;

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use starkv_compute::cancel::Cancel;
use starkv_compute::generate::StopReason;
use starkv_compute::prompt;
use starkv_compute::sampling::{MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob};
use starkv_compute::tokenizer::Tokenizer;
use starkv_service::{Service, ServiceError};
use tokio_stream::{Stream, StreamExt};

use super::auth::Principal;
use super::documents::validate_id;
use super::error::ApiError;
use super::extract::ApiPath;
use super::{ApiJson, AppState};
use crate::config::Role;
use starkv_service::{QueryOutcome, QueryRequest};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryBody {
    question: String,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    stream: bool,
    /// Overrides the document's tempered merge for this query (issue 14).
    merge_temperature: Option<f32>,
    merge_scale: Option<f32>,
    /// Each generated token's log-probability and this many most likely alternatives
    /// (0..=20) under the model's distribution.
    logprobs: Option<usize>,
}

/// Validated parameters shared with the OpenAI-compatible endpoint.
pub struct Ask {
    pub store_id: String,
    pub tenant: String,
    pub request: QueryRequest,
}

#[allow(clippy::too_many_arguments)]
pub fn validate_ask(
    state: &AppState,
    principal: &Principal,
    id: &str,
    question: String,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    seed: Option<u64>,
    stop: Vec<String>,
) -> Result<Ask, ApiError> {
    principal.require(Role::Read)?;
    validate_id(id)?;
    if question.trim().is_empty() {
        return Err(ApiError::bad_request("the question is empty"));
    }
    // A question so long that it must have too many tokens is refused before it is
    // tokenised (the exact count is checked on the worker, before any model work).
    let max_question = state.config.max_question_tokens;
    let at_least = question.len() / state.max_token_bytes.max(1);
    if at_least > max_question {
        return Err(question_too_long(
            &format!("at least {at_least}"),
            max_question,
        ));
    }
    let cap = state.config.max_tokens_cap;
    let max_tokens = max_tokens.unwrap_or(256.min(cap));
    if max_tokens == 0 || max_tokens > cap {
        return Err(ApiError::bad_request(format!(
            "`max_tokens` must be in 1..={cap}"
        )));
    }
    let sampling = SamplingParams {
        temperature: temperature.unwrap_or(0.0),
        top_k: top_k.unwrap_or(0),
        top_p: top_p.unwrap_or(1.0),
        seed: seed.unwrap_or(0),
    };
    sampling
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if stop.len() > 8 || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::bad_request(
            "`stop` takes up to 8 non-empty strings of at most 256 bytes",
        ));
    }
    Ok(Ask {
        store_id: starkv_service::naming::store_doc_id(&principal.tenant, id),
        tenant: principal.tenant.clone(),
        request: QueryRequest {
            question,
            max_tokens,
            sampling,
            stop,
            cancel: Cancel::new(),
            merge: None,
            logprobs: None,
        },
    })
}

/// `logprobs` (native) or `top_logprobs` (OpenAI): how many alternatives per token.
pub fn validate_logprobs(name: &str, top: Option<usize>) -> Result<Option<usize>, ApiError> {
    match top {
        Some(n) if n > MAX_TOP_LOGPROBS => Err(ApiError::bad_request(format!(
            "`{name}` must be in 0..={MAX_TOP_LOGPROBS}"
        ))),
        other => Ok(other),
    }
}

/// A token's text as JSON wants it: its bytes, lossily decoded (a token may hold part
/// of a UTF-8 character; `bytes` in the OpenAI shape keeps them exact).
fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    String::from_utf8_lossy(tokenizer.token_bytes(id)).into_owned()
}

/// One JSON object per generated token: `entry(id, logprob)` for the token, with its
/// alternatives under `top_key` in the same shape. The native and the OpenAI answers
/// differ only in those two.
fn logprob_entries(
    logprobs: &[TokenLogprob],
    top_key: &str,
    entry: impl Fn(u32, f32) -> serde_json::Value,
) -> Vec<serde_json::Value> {
    logprobs
        .iter()
        .map(|t| {
            let mut e = entry(t.id, t.logprob);
            e[top_key] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect()
}

/// The native answer's `logprobs`: `[{token, id, logprob, top: [{token, id, logprob}]}]`.
pub fn logprobs_json(tokenizer: &Tokenizer, logprobs: &[TokenLogprob]) -> serde_json::Value {
    logprob_entries(
        logprobs,
        "top",
        |id, logprob| json!({ "token": token_text(tokenizer, id), "id": id, "logprob": logprob }),
    )
    .into()
}

/// OpenAI's `choices[].logprobs`: `{content: [{token, logprob, bytes, top_logprobs}]}`.
pub fn openai_logprobs_json(tokenizer: &Tokenizer, logprobs: &[TokenLogprob]) -> serde_json::Value {
    let content = logprob_entries(logprobs, "top_logprobs", |id, logprob| {
        json!({
            "token": token_text(tokenizer, id),
            "logprob": logprob,
            "bytes": tokenizer.token_bytes(id),
        })
    });
    json!({ "content": content })
}

fn question_too_long(n_tokens: &str, limit: usize) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::BAD_REQUEST,
        "question_too_long",
        format!("the question has {n_tokens} tokens; the limit is {limit} (max_question_tokens)"),
    )
}

/// The exact question length check, on a worker thread: tokenising is cheap next to the
/// query itself, but not free for a long text.
fn check_question_tokens(service: &Service, question: &str, limit: usize) -> Result<(), ApiError> {
    let n = prompt::question_query(&service.model().tokenizer, question)
        .map_err(ServiceError::from)?
        .len();
    if n > limit {
        return Err(question_too_long(&n.to_string(), limit));
    }
    Ok(())
}

/// What a query produced: streamed pieces, then the outcome (or an error).
pub enum Piece {
    Text(String),
    Done(Box<Result<QueryOutcome, ApiError>>),
}

/// A query running on a worker thread: its pieces, in order. Dropping it (the client hung
/// up, so axum dropped the handler's future or the response stream) cancels the work,
/// which stops within a layer or a generation step and frees its query slot.
pub struct RunningQuery {
    rx: tokio::sync::mpsc::Receiver<Piece>,
    cancel: Cancel,
}

impl RunningQuery {
    pub async fn recv(&mut self) -> Option<Piece> {
        self.rx.recv().await
    }
}

impl Stream for RunningQuery {
    type Item = Piece;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Piece>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

impl Drop for RunningQuery {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Runs a query on a worker thread, sending pieces as they are final. Takes a query
/// permit first: over the concurrency limit the answer is 503 with Retry-After. The work
/// is cancelled when the returned [`RunningQuery`] is dropped or the server shuts down.
pub fn start_query(state: &AppState, mut ask: Ask) -> Result<RunningQuery, ApiError> {
    let permit = state.queries.clone().try_acquire_owned().map_err(|_| {
        ApiError::busy(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many queries are running; retry shortly",
            1,
        )
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let cancel = state.shutdown.child();
    ask.request.cancel = cancel.clone();
    let service = state.service.clone();
    let max_question = state.config.max_question_tokens;
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_question_tokens(&service, &ask.request.question, max_question)?;
            service
                .query(&ask.store_id, &ask.tenant, &ask.request, &mut |piece| {
                    tx.blocking_send(Piece::Text(piece.to_string())).is_ok()
                })
                .map_err(ApiError::from)
        }))
        .unwrap_or_else(|_| Err(ApiError::internal("the query panicked")));
        let result = match outcome {
            Ok(o) => {
                let result = if o.stop_reason == StopReason::Cancelled {
                    "cancelled"
                } else {
                    "ok"
                };
                metrics::counter!("starkv_query_total", "result" => result).increment(1);
                metrics::histogram!("starkv_query_seconds").record(started.elapsed().as_secs_f64());
                metrics::histogram!("starkv_query_first_token_seconds")
                    .record(o.first_token.as_secs_f64());
                metrics::histogram!("starkv_query_load_seconds").record(o.load.as_secs_f64());
                metrics::counter!("starkv_generated_tokens_total")
                    .increment(o.generated_tokens as u64);
                let decode = (o.total - o.first_token).as_secs_f64();
                if o.generated_tokens > 1 && decode > 0.0 {
                    metrics::gauge!("starkv_decode_tokens_per_second")
                        .set((o.generated_tokens - 1) as f64 / decode);
                }
                Ok(o)
            }
            Err(e) => {
                let result = if e.code == "cancelled" {
                    "cancelled"
                } else {
                    "error"
                };
                metrics::counter!("starkv_query_total", "result" => result).increment(1);
                Err(e)
            }
        };
        // The slot is free before the client hears the result.
        drop(permit);
        let _ = tx.blocking_send(Piece::Done(Box::new(result)));
    });
    Ok(RunningQuery { rx, cancel })
}

/// Collects a whole answer.
pub async fn finish(mut rx: RunningQuery) -> Result<QueryOutcome, ApiError> {
    while let Some(piece) = rx.recv().await {
        if let Piece::Done(result) = piece {
            return *result;
        }
    }
    Err(ApiError::internal("the query ended without a result"))
}

/// The native answer; `logprobs` only when the query asked for them.
pub fn outcome_json(o: &QueryOutcome, tokenizer: &Tokenizer) -> serde_json::Value {
    let mut body = json!({
        "answer": o.answer,
        "stop_reason": format!("{:?}", o.stop_reason),
        "usage": {
            "cached_context_tokens": o.context_tokens,
            "query_tokens": o.query_tokens,
            "generated_tokens": o.generated_tokens,
        },
        "timings": {
            "load_ms": o.load.as_secs_f64() * 1e3,
            "first_token_ms": o.first_token.as_secs_f64() * 1e3,
            "total_ms": o.total.as_secs_f64() * 1e3,
        },
        "repaired_blocks": o.repaired_blocks,
        "resident_blocks": o.resident_blocks,
    });
    if !o.logprobs.is_empty() {
        body["logprobs"] = logprobs_json(tokenizer, &o.logprobs);
    }
    body
}

pub async fn query(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
    body: Result<ApiJson<QueryBody>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(b) = body?;
    let merge = super::documents::validate_merge(b.merge_temperature, b.merge_scale)?;
    let mut ask = validate_ask(
        &state,
        &principal,
        &id,
        b.question,
        b.max_tokens,
        b.temperature,
        b.top_p,
        b.top_k,
        b.seed,
        b.stop,
    )?;
    ask.request.merge = merge;
    ask.request.logprobs = validate_logprobs("logprobs", b.logprobs)?;
    let service = state.service.clone();
    let mut rx = start_query(&state, ask)?;
    if !b.stream {
        let outcome = finish(rx).await?;
        let mut body = outcome_json(&outcome, &service.model().tokenizer);
        body["id"] = json!(id);
        return Ok(Json(body).into_response());
    }
    // Errors before the first piece (unknown document...) still get a proper status.
    let first = rx.recv().await;
    if let Some(Piece::Done(result)) = &first
        && let Err(e) = result.as_ref()
    {
        return Err(ApiError {
            status: e.status,
            code: e.code,
            message: e.message.clone(),
            retry_after: e.retry_after,
        });
    }
    let head = tokio_stream::iter(first);
    let events = head.chain(rx).map(move |piece| {
        let event = match piece {
            Piece::Text(text) => Event::default()
                .event("token")
                .data(json!({ "text": text }).to_string()),
            Piece::Done(result) => match *result {
                Ok(o) => Event::default()
                    .event("done")
                    .data(outcome_json(&o, &service.model().tokenizer).to_string()),
                Err(e) => Event::default()
                    .event("error")
                    .data(json!({ "error": { "code": e.code, "message": e.message } }).to_string()),
            },
        };
        Ok::<_, Infallible>(event)
    });
    Ok(Sse::new(events).into_response())
}
