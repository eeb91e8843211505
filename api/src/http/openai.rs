//! OpenAI-compatible `/v1/models` and `/v1/chat/completions`, so the official clients
//! work unchanged: the `model` of a request names a cached document (the document ids
//! are listed by `/v1/models`), and the last user message is the question.

use std::convert::Infallible;

use axum::Json;
use axum::extract::{Extension, State};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use super::auth::Principal;
use super::error::ApiError;
use super::query::{
    Piece, finish, openai_logprobs_json, start_query, validate_ask, validate_logprobs,
};
use super::{ApiJson, AppState, blocking};
use crate::config::Role;
use starkv_service::jobs::now_ms;

#[derive(Deserialize)]
pub struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    /// Alternative to `model`: the document to answer from (`extra_body`).
    document: Option<String>,
    /// Each generated token's log-probability (`choices[].logprobs.content`)...
    #[serde(default)]
    logprobs: bool,
    /// ... and this many most likely alternatives per token (0..=20; needs `logprobs`).
    top_logprobs: Option<usize>,
}

#[derive(Deserialize)]
pub struct Message {
    role: String,
    content: Content,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

pub async fn models(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<impl IntoResponse, ApiError> {
    principal.require(Role::Read)?;
    let service = state.service.clone();
    let tenant = principal.tenant.clone();
    let docs = blocking(move || {
        Ok(service
            .store()
            .list()
            .into_iter()
            .filter(|d| d.tenant == tenant)
            .collect::<Vec<_>>())
    })
    .await?;
    let prefix = format!("{}/", principal.tenant);
    let data: Vec<Value> = docs
        .iter()
        .map(|d| {
            json!({
                "id": d.doc.doc.strip_prefix(&prefix).unwrap_or(&d.doc.doc),
                "object": "model",
                "created": d.created_ms / 1000,
                "owned_by": "starkv",
            })
        })
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<ApiJson<ChatRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(req) = body?;
    let question = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| match &m.content {
            Content::Text(t) => t.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.text.clone())
                .collect::<Vec<_>>()
                .join("\n"),
        })
        .ok_or_else(|| ApiError::bad_request("`messages` needs a user message (the question)"))?;
    let document = req.document.clone().unwrap_or_else(|| req.model.clone());
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let ask = validate_ask(
        &state,
        &principal,
        &document,
        question,
        req.max_completion_tokens.or(req.max_tokens),
        req.temperature,
        req.top_p,
        None,
        req.seed,
        stop,
    )?;
    let mut ask = ask;
    ask.request.logprobs = match (req.logprobs, req.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::bad_request(
                "`top_logprobs` needs `logprobs: true`",
            ));
        }
        (false, None) => None,
        (true, top) => validate_logprobs("top_logprobs", top.or(Some(0)))?,
    };
    let service = state.service.clone();
    let logprobs = move |o: &starkv_service::QueryOutcome| {
        if o.logprobs.is_empty() {
            Value::Null
        } else {
            openai_logprobs_json(&service.model().tokenizer, &o.logprobs)
        }
    };
    let mut rx = start_query(&state, ask)?;
    let id = format!("chatcmpl-{:x}", now_ms());
    let created = now_ms() / 1000;
    let model = req.model.clone();
    if !req.stream {
        let o = finish(rx).await?;
        let finish_reason = if matches!(
            o.stop_reason,
            starkv_compute::generate::StopReason::MaxTokens
        ) {
            "length"
        } else {
            "stop"
        };
        return Ok(Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": o.answer },
                "logprobs": logprobs(&o),
                "finish_reason": finish_reason,
            }],
            "usage": {
                "prompt_tokens": o.context_tokens + o.query_tokens,
                "completion_tokens": o.generated_tokens,
                "total_tokens": o.context_tokens + o.query_tokens + o.generated_tokens,
            },
        }))
        .into_response());
    }
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
    // Streamed pieces are text, not tokens (a piece may hold back part of a character):
    // the tokens' logprobs come whole in the last chunk, beside its finish_reason.
    let chunk = move |delta: Value, finish: Option<&str>, logprobs: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{ "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish }],
        })
        .to_string()
    };
    let opening = Event::default().data(chunk(
        json!({ "role": "assistant", "content": "" }),
        None,
        Value::Null,
    ));
    let events = tokio_stream::iter(first)
        .chain(rx)
        .map(move |piece| match piece {
            Piece::Text(text) => {
                Event::default().data(chunk(json!({ "content": text }), None, Value::Null))
            }
            Piece::Done(result) => {
                let finish = match result.as_ref() {
                    Ok(o)
                        if matches!(
                            o.stop_reason,
                            starkv_compute::generate::StopReason::MaxTokens
                        ) =>
                    {
                        "length"
                    }
                    _ => "stop",
                };
                let lp = result.as_ref().as_ref().map_or(Value::Null, &logprobs);
                Event::default().data(chunk(json!({}), Some(finish), lp))
            }
        });
    let all = tokio_stream::iter([opening])
        .chain(events)
        .chain(tokio_stream::once(Event::default().data("[DONE]")))
        .map(Ok::<_, Infallible>);
    Ok(Sse::new(all).into_response())
}
