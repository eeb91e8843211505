//! The OpenAPI description served at `/openapi.json` (written by hand: the schema
//! generator's UI crate downloads assets at build time, which our CI cannot do).
//!
//! It is meant to be exact: every status an operation answers, the bounds the server
//! enforces (some from the running configuration, e.g. `max_tokens`), and which
//! operations need a bearer key. The test suite runs schemathesis against the real server
//! with it (`tests/schemathesis.rs`): no 5xx, no response outside this description.

use serde_json::{Value, json};

use crate::config::ServerConfig;
use starkv_compute::partial::DEFAULT_MERGE_SCALE;
use starkv_compute::sampling::MAX_TOP_LOGPROBS;
use starkv_service::limits::MAX_SECONDS;

use super::documents::{MAX_BLOCK_SIZE, MERGE_SCALE, MERGE_TEMPERATURE};

fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn json_content(schema: Value) -> Value {
    json!({ "application/json": { "schema": schema } })
}

/// The error answer of every 4xx (and of the 5xx listed per operation).
fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": json_content(schema("Error")) })
}

/// 503/429 answers: the JSON error and `Retry-After` in whole seconds.
fn busy_response(description: &str) -> Value {
    json!({
        "description": description,
        "headers": { "Retry-After": { "schema": { "type": "integer", "minimum": 1 } } },
        "content": json_content(schema("Error")),
    })
}

/// An operation: `ok` lists its success answers (status, description, content), plus
/// the 4XX error shape; `extra` adds statuses such as 503.
fn op(summary: &str, ok: Vec<(&str, &str, Value)>, extra: Vec<(&str, Value)>) -> Value {
    let mut responses = serde_json::Map::new();
    for (status, description, content) in ok {
        responses.insert(
            status.into(),
            json!({ "description": description, "content": content }),
        );
    }
    responses.insert(
        "4XX".into(),
        error_response("Invalid request, missing or insufficient key, not found, too large"),
    );
    for (status, response) in extra {
        responses.insert(status.into(), response);
    }
    json!({ "summary": summary, "responses": responses })
}

fn with_body(mut op: Value, body: &str) -> Value {
    op["requestBody"] = json!({ "required": true, "content": json_content(schema(body)) });
    op
}

fn with_params(mut op: Value, params: Value) -> Value {
    op["parameters"] = params;
    op
}

/// No bearer key needed (health checks and this document).
fn public(mut op: Value) -> Value {
    op["security"] = json!([]);
    op
}

/// Document ids: 1-128 characters of `[A-Za-z0-9._-]`, other than `.` and `..`.
const ID_PATTERN: &str = r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,127}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}|\.\.[A-Za-z0-9._-]{1,126})$";

fn id_param() -> Value {
    json!([{
        "name": "id", "in": "path", "required": true,
        "schema": { "type": "string", "pattern": ID_PATTERN, "example": "report" }
    }])
}

fn schemas(config: &ServerConfig) -> Value {
    let cap = config.max_tokens_cap;
    let u64_max = u64::MAX;
    let integer = |min: u64, max: u64| json!({ "type": "integer", "minimum": min, "maximum": max });
    let seconds = integer(0, MAX_SECONDS);
    let nullable_seconds =
        json!({ "type": "integer", "minimum": 0, "maximum": MAX_SECONDS, "nullable": true });
    let text = json!({ "type": "string", "minLength": 1, "pattern": "\\S" });
    // The merge options of an ingest (with their defaults) and of a query (an override).
    let merge_groups = "the context blocks whose KV is approximate form APE's tempered group (issue 14): every block after the anchor, except the block right after an anchor of whole blocks (anchor_size >= block_size), which is encoded after the whole anchor and so is exact";
    let merge_temperature_of = |default: &str| {
        json!({
            "type": "number", "minimum": MERGE_TEMPERATURE.start(), "maximum": MERGE_TEMPERATURE.end(),
            "description": format!("APE's temperature T: {merge_groups}; the group is attended at softmax scale 1/(sqrt(d) T); 1 (with merge_scale 1) is Star Attention's exact merge; {default}")
        })
    };
    let merge_scale_of = |default: &str| {
        json!({
            "type": "number", "minimum": MERGE_SCALE.start(), "maximum": MERGE_SCALE.end(),
            "description": format!("APE's scaling factor S: the tempered group enters the merge with lse T*L + ln S; {default}")
        })
    };
    let merge_temperature = merge_temperature_of(
        "default: 1 (a missing one of the two merge fields is 1 when the other is given)",
    );
    let merge_scale = merge_scale_of(&format!(
        "default when neither merge field is given: 1 (the exact merge) when reencode_ratio is 1 (the KV is full attention's), else the server's merge_scale, else {DEFAULT_MERGE_SCALE} (measured better than the exact merge on needle retrieval at small blocks); 1 when only merge_temperature is given"
    ));
    let query_merge = "default: the document's merge when neither merge field is given (a missing one of the two is 1 when the other is)";
    let query_merge_temperature = merge_temperature_of(query_merge);
    let query_merge_scale = merge_scale_of(query_merge);
    let cluster_totals = json!({
        "type": "object",
        "description": "cluster mode only: the workers' stores summed, from the last health checks (documents counts each worker's part of a document)",
        "required": ["workers", "healthy_workers", "documents", "blocks", "stored_bytes", "placed_blocks"],
        "properties": {
            "workers": { "type": "integer", "minimum": 1 },
            "healthy_workers": { "type": "integer", "minimum": 0 },
            "documents": { "type": "integer", "minimum": 0 },
            "blocks": { "type": "integer", "minimum": 0 },
            "stored_bytes": { "type": "integer", "minimum": 0 },
            "placed_blocks": { "type": "integer", "minimum": 0 }
        }
    });
    let worker_verify = json!({
        "type": "object",
        "required": ["address", "documents", "corrupt", "repaired_blocks", "corruption_found"],
        "properties": {
            "address": { "type": "string" },
            "documents": { "type": "integer", "minimum": 0 },
            "corrupt": { "type": "array", "items": { "type": "string" } },
            "repaired_blocks": { "type": "integer", "minimum": 0 },
            "corruption_found": { "type": "boolean" },
            "repair_error": { "type": "string", "nullable": true },
            "error": { "type": "string", "nullable": true, "description": "why the worker could not be verified (down, timed out)" }
        }
    });
    // Built apart: one json! literal this deep reaches the macro recursion limit.
    let token_logprob = json!({
        "type": "object", "required": ["token", "id", "logprob"],
        "properties": {
            "token": { "type": "string" },
            "id": { "type": "integer", "minimum": 0 },
            "logprob": { "type": "number", "maximum": 0 }
        }
    });
    let mut generated = token_logprob.clone();
    generated["required"] = json!(["token", "id", "logprob", "top"]);
    generated["properties"]["top"] =
        json!({ "type": "array", "maxItems": MAX_TOP_LOGPROBS, "items": token_logprob });
    let answer_logprobs = json!({
        "type": "array",
        "description": "one per generated token, when the query asked for logprobs",
        "items": generated
    });
    json!({
        "Error": {
            "type": "object", "required": ["error"],
            "properties": { "error": {
                "type": "object", "required": ["code", "message"],
                "properties": { "code": { "type": "string" }, "message": { "type": "string" } }
            } }
        },
        "CreateDocument": {
            "type": "object", "required": ["text"], "additionalProperties": false,
            "properties": {
                "text": text,
                "id": { "type": "string", "pattern": ID_PATTERN },
                "block_size": integer(1, MAX_BLOCK_SIZE as u64),
                "anchor_size": {
                    "type": "integer", "minimum": 1, "maximum": MAX_BLOCK_SIZE,
                    "description": "at most block_size, or a multiple of block_size; default: the server's anchor_size, else whole blocks covering a quarter of the document (one block for documents of up to 4 blocks)"
                },
                "block_overlap": {
                    "type": "integer", "minimum": 0, "maximum": starkv_compute::star::MAX_OVERLAP,
                    "description": format!("tokens before each block (after the anchor) encoded in front of it and dropped, so that a block boundary does not cut a sentence off from its beginning; 0: the paper's phase 1; default: the server's block_overlap, else {}", starkv_compute::star::DEFAULT_OVERLAP)
                },
                "pin": { "type": "boolean" },
                "ttl_seconds": seconds,
                "metadata": { "type": "object", "nullable": true },
                "allow_beyond_context": {
                    "type": "boolean",
                    "description": "ingest a document longer than the model's context_length"
                },
                "merge_temperature": merge_temperature,
                "merge_scale": merge_scale,
                "kv_dtype": {
                    "type": "string", "enum": starkv_service::KvDtype::NAMES,
                    "description": "KV precision: f16 (default; bf16 on a GPU host), int8 (symmetric, one scale per token and KV head: about half the bytes) or fp8 (OCP FP8 E4M3, one scale per token and KV head: about half the bytes)"
                },
                "reencode_ratio": {
                    "type": "number", "minimum": 0, "maximum": 1,
                    "description": "fraction of the tokens after the anchor whose KV is recomputed with global attention at ingest (selective re-encoding, issue 14); 0 is plain Star Attention; default: the server's reencode_ratio setting (0 unless configured)"
                }
            }
        },
        "Document": {
            "type": "object", "required": ["id", "state"],
            "properties": {
                "id": { "type": "string" },
                "state": { "type": "string", "enum": ["queued", "ingesting", "ready", "failed"] },
                "blocks_done": { "type": "integer", "minimum": 0 },
                "blocks_total": { "type": "integer", "minimum": 0 },
                "reason": { "type": "string" },
                "version": { "type": "integer", "minimum": 0 },
                "blocks": { "type": "integer", "minimum": 0 },
                "kv_dtype": { "type": "string", "enum": starkv_service::KvDtype::NAMES },
                "stored_dtype": { "type": "string", "enum": ["f16", "bf16", "int8", "fp8"] },
                "reused_blocks": { "type": "integer", "minimum": 0 },
                "tokens": { "type": "integer", "minimum": 0 },
                "stored_bytes": { "type": "integer", "minimum": 0 },
                "raw_bytes": { "type": "integer", "minimum": 0 },
                "pinned": { "type": "boolean" },
                "ttl_ms": { "type": "integer", "minimum": 0, "nullable": true },
                "beyond_context": { "type": "boolean" },
                "model_context_length": { "type": "integer", "minimum": 1 },
                "warning": { "type": "string" }
            }
        },
        "DocumentList": {
            "type": "object", "required": ["documents", "total", "offset", "next_offset"],
            "properties": {
                "documents": { "type": "array", "items": {
                    "type": "object", "required": ["id", "version", "blocks"],
                    "properties": {
                        "id": { "type": "string" },
                        "version": { "type": "integer" },
                        "blocks": { "type": "integer" },
                        "stored_bytes": { "type": "integer" },
                        "pinned": { "type": "boolean" },
                        "last_used_ms": { "type": "integer" }
                    }
                } },
                "total": { "type": "integer", "minimum": 0 },
                "offset": { "type": "integer", "minimum": 0 },
                "next_offset": { "type": "integer", "minimum": 0, "nullable": true }
            }
        },
        "Deleted": {
            "type": "object", "required": ["id", "deleted"],
            "properties": { "id": { "type": "string" }, "deleted": { "type": "boolean" } }
        },
        "Pinned": {
            "type": "object", "required": ["id", "pinned"],
            "properties": { "id": { "type": "string" }, "pinned": { "type": "boolean" } }
        },
        "Ttl": {
            "type": "object", "additionalProperties": false,
            "properties": { "ttl_seconds": nullable_seconds }
        },
        "TtlSet": {
            "type": "object", "required": ["id", "ttl_seconds"],
            "properties": { "id": { "type": "string" }, "ttl_seconds": nullable_seconds }
        },
        "Query": {
            "type": "object", "required": ["question"], "additionalProperties": false,
            "properties": {
                "question": {
                    "type": "string", "minLength": 1, "pattern": "\\S",
                    "description": format!("at most {} tokens (max_question_tokens)", config.max_question_tokens)
                },
                "max_tokens": integer(1, cap as u64),
                "temperature": { "type": "number", "minimum": 0, "maximum": f32::MAX },
                "top_p": { "type": "number", "minimum": 0, "exclusiveMinimum": true, "maximum": 1 },
                "top_k": { "type": "integer", "minimum": 0 },
                "seed": integer(0, u64_max),
                "stop": {
                    "type": "array", "maxItems": 8,
                    "items": { "type": "string", "minLength": 1, "description": "at most 256 bytes" }
                },
                "stream": { "type": "boolean" },
                "merge_temperature": query_merge_temperature,
                "merge_scale": query_merge_scale,
                "logprobs": {
                    "type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                    "description": "report each generated token's log-probability and this many most likely alternatives (under the model's distribution, before temperature, top-k and top-p)"
                }
            }
        },
        "Answer": {
            "type": "object", "required": ["answer", "stop_reason", "usage", "timings"],
            "properties": {
                "id": { "type": "string" },
                "answer": { "type": "string" },
                "stop_reason": { "type": "string" },
                "usage": { "type": "object", "required": ["cached_context_tokens", "query_tokens", "generated_tokens"] },
                "timings": { "type": "object" },
                "repaired_blocks": { "type": "integer", "minimum": 0 },
                "resident_blocks": { "type": "integer", "minimum": 0 },
                "logprobs": answer_logprobs
            }
        },
        "ChatCompletion": {
            "type": "object", "required": ["model", "messages"],
            "properties": {
                "model": { "type": "string" },
                "messages": { "type": "array", "items": {
                    "type": "object", "required": ["role", "content"],
                    "properties": {
                        "role": { "type": "string" },
                        "content": { "oneOf": [
                            { "type": "string" },
                            { "type": "array", "items": { "type": "object", "properties": { "text": { "type": "string", "nullable": true } } } }
                        ] }
                    }
                } },
                "max_tokens": { "type": "integer", "minimum": 1, "maximum": cap, "nullable": true },
                "max_completion_tokens": { "type": "integer", "minimum": 1, "maximum": cap, "nullable": true },
                "temperature": { "type": "number", "minimum": 0, "maximum": f32::MAX, "nullable": true },
                "top_p": { "type": "number", "minimum": 0, "exclusiveMinimum": true, "maximum": 1, "nullable": true },
                "seed": { "type": "integer", "minimum": 0, "maximum": u64_max, "nullable": true },
                "stop": { "nullable": true, "oneOf": [
                    { "type": "string", "minLength": 1 },
                    { "type": "array", "maxItems": 8, "items": { "type": "string", "minLength": 1 } }
                ] },
                "stream": { "type": "boolean" },
                "document": { "type": "string", "nullable": true, "pattern": ID_PATTERN },
                "logprobs": { "type": "boolean" },
                "top_logprobs": { "type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS, "nullable": true, "description": "needs logprobs: true" }
            }
        },
        "ChatCompletionAnswer": {
            "type": "object", "required": ["id", "object", "choices"],
            "properties": {
                "id": { "type": "string" },
                "object": { "type": "string", "enum": ["chat.completion"] },
                "choices": { "type": "array" },
                "usage": { "type": "object" }
            }
        },
        "Models": {
            "type": "object", "required": ["object", "data"],
            "properties": { "object": { "type": "string" }, "data": { "type": "array", "items": {
                "type": "object", "required": ["id", "object"],
                "properties": { "id": { "type": "string" }, "object": { "type": "string" } }
            } } }
        },
        "Evict": {
            "type": "object", "additionalProperties": false,
            "description": "at least one rule",
            "properties": {
                "budget_bytes": integer(0, u64_max),
                "lru": { "type": "integer", "minimum": 0 },
                "older_than_seconds": seconds,
                "tenant": { "type": "string" }
            }
        },
        "Evicted": {
            "type": "object", "required": ["evicted", "blocks_deleted", "bytes_freed"],
            "properties": {
                "evicted": { "type": "array" },
                "blocks_deleted": { "type": "integer", "minimum": 0 },
                "bytes_freed": { "type": "integer", "minimum": 0 }
            }
        },
        "Verify": {
            "type": "object", "additionalProperties": false,
            "properties": { "repair": { "type": "boolean" } }
        },
        "Verified": {
            "type": "object", "required": ["documents", "corrupt", "repaired_blocks", "corruption_found"],
            "properties": {
                "documents": { "type": "integer", "minimum": 0 },
                "corrupt": { "type": "array", "items": { "type": "string" } },
                "repaired_blocks": { "type": "integer", "minimum": 0 },
                "corruption_found": { "type": "boolean" },
                "workers": {
                    "type": "array",
                    "description": "cluster mode only: each worker's verify of its own store",
                    "items": worker_verify
                }
            }
        },
        "Collected": {
            "type": "object", "required": ["scanned", "deleted", "bytes_freed"],
            "properties": {
                "scanned": { "type": "integer", "minimum": 0 },
                "deleted": { "type": "integer", "minimum": 0 },
                "bytes_freed": { "type": "integer", "minimum": 0 }
            }
        },
        "Stats": {
            "type": "object", "required": ["device", "documents", "blocks"],
            "properties": {
                "cluster": cluster_totals
            }
        },
        "Cluster": {
            "type": "object", "required": ["mode", "workers"],
            "properties": {
                "mode": { "type": "string", "enum": ["single", "coordinator"] },
                "workers": { "type": "array", "items": { "type": "object" } }
            }
        },
        "Health": {
            "type": "object", "required": ["status", "device", "device_detail"],
            "properties": {
                "status": { "type": "string", "enum": ["ok"] },
                "device": { "type": "string" },
                "device_detail": { "type": "string" }
            }
        },
        "Ready": {
            "type": "object", "required": ["status", "model", "ingest_queue_depth", "queries_available"],
            "properties": {
                "status": { "type": "string", "enum": ["ready"] },
                "model": { "type": "string" },
                "ingest_queue_depth": { "type": "integer", "minimum": 0 },
                "queries_available": { "type": "integer", "minimum": 0 }
            }
        }
    })
}

/// The description of this server, with the bounds of its configuration.
pub fn spec(config: &ServerConfig) -> Value {
    let json_of = |name: &str| json_content(schema(name));
    let sse = json!({ "type": "string", "description": "server-sent events" });
    let answer_content = json!({
        "application/json": { "schema": schema("Answer") },
        "text/event-stream": { "schema": sse },
    });
    let chat_content = json!({
        "application/json": { "schema": schema("ChatCompletionAnswer") },
        "text/event-stream": { "schema": sse },
    });
    let query_busy = || {
        vec![
            (
                "503",
                busy_response("Every query slot is busy (Retry-After), or the query was cancelled"),
            ),
            ("507", error_response("The store is over its quota")),
        ]
    };
    let document_ok = || {
        vec![
            (
                "200",
                "The document (ready, or failed with a reason)",
                json_of("Document"),
            ),
            ("202", "Queued or ingesting", json_of("Document")),
        ]
    };
    let wait = json!([{
        "name": "wait", "in": "query", "required": false,
        "description": "wait until the ingest is ready or failed (200) instead of answering 202",
        "schema": { "type": "boolean" }
    }]);
    let page = json!([
        { "name": "offset", "in": "query", "required": false, "schema": { "type": "integer", "minimum": 0 } },
        { "name": "limit", "in": "query", "required": false, "schema": { "type": "integer", "minimum": 1, "maximum": 1000 } }
    ]);
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "starkv",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Star Attention long-document KV-cache service"
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": schemas(config)
        },
        "security": [{ "bearer": [] }],
        "paths": {
            "/v1/documents": {
                "post": with_params(with_body(op(
                    "Ingest a document: a background job (202); ?wait=true waits (200)",
                    document_ok(),
                    vec![("507", error_response("The store is over its quota"))],
                ), "CreateDocument"), wait),
                "get": with_params(op(
                    "List documents",
                    vec![("200", "A page of documents", json_of("DocumentList"))],
                    vec![],
                ), page)
            },
            "/v1/documents/{id}": {
                "parameters": id_param(),
                "get": op("Document state, sizes and times", document_ok(), vec![]),
                "delete": op("Delete a document", vec![("200", "Deleted", json_of("Deleted"))], vec![])
            },
            "/v1/documents/{id}/pin": {
                "parameters": id_param(),
                "post": op("Pin (never evicted)", vec![("200", "Pinned", json_of("Pinned"))], vec![])
            },
            "/v1/documents/{id}/unpin": {
                "parameters": id_param(),
                "post": op("Unpin", vec![("200", "Unpinned", json_of("Pinned"))], vec![])
            },
            "/v1/documents/{id}/ttl": {
                "parameters": id_param(),
                "post": with_body(op(
                    "Set (or with null clear) the idle TTL",
                    vec![("200", "The TTL", json_of("TtlSet"))],
                    vec![],
                ), "Ttl")
            },
            "/v1/documents/{id}/query": {
                "parameters": id_param(),
                "post": with_body(op(
                    "Answer a question over the cached document (stream: server-sent events)",
                    vec![("200", "The answer", answer_content)],
                    query_busy(),
                ), "Query")
            },
            "/v1/models": {
                "get": op(
                    "OpenAI-compatible: the documents usable as `model`",
                    vec![("200", "The documents", json_of("Models"))],
                    vec![],
                )
            },
            "/v1/chat/completions": {
                "post": with_body(op(
                    "OpenAI-compatible chat completion over a cached document",
                    vec![("200", "The completion", chat_content)],
                    query_busy(),
                ), "ChatCompletion")
            },
            "/v1/admin/stats": {
                "get": op(
                    "Store statistics, the device and its GPU block tier (admin)",
                    vec![("200", "Statistics", json_of("Stats"))],
                    vec![],
                )
            },
            "/v1/admin/cluster": {
                "get": op(
                    "The shard workers this server coordinates, their health and blocks (admin)",
                    vec![("200", "Cluster status", json_of("Cluster"))],
                    vec![],
                )
            },
            "/v1/admin/gc": {
                "post": op(
                    "Collect unreferenced blocks (admin)",
                    vec![("200", "What was collected", json_of("Collected"))],
                    vec![],
                )
            },
            "/v1/admin/evict": {
                "post": with_body(op(
                    "Evict documents by rule; pinned documents are kept (admin)",
                    vec![("200", "What was evicted", json_of("Evicted"))],
                    vec![],
                ), "Evict")
            },
            "/v1/admin/verify": {
                "post": with_body(op(
                    "Check every stored block; with repair, re-encode failed ones (admin)",
                    vec![("200", "What was found", json_of("Verified"))],
                    vec![],
                ), "Verify")
            },
            "/metrics": {
                "get": op(
                    "Prometheus metrics (a metrics or admin key when keys are configured)",
                    vec![("200", "Prometheus text format", json!({ "text/plain": { "schema": { "type": "string" } } }))],
                    vec![],
                )
            },
            "/healthz": {
                "get": public(op(
                    "Liveness and the device serving (`device`: cpu or cuda:N)",
                    vec![("200", "Alive", json_of("Health"))],
                    vec![],
                ))
            },
            "/readyz": {
                "get": public(op(
                    "Readiness",
                    vec![("200", "Ready", json_of("Ready"))],
                    vec![],
                ))
            },
            "/openapi.json": {
                "get": public(op(
                    "This document",
                    vec![("200", "OpenAPI 3.0", json!({ "application/json": { "schema": { "type": "object" } } }))],
                    vec![],
                ))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_states_the_configured_bounds_and_public_operations() {
        let config = ServerConfig {
            max_tokens_cap: 77,
            ..ServerConfig::default()
        };
        let doc = spec(&config);
        let schemas = &doc["components"]["schemas"];
        assert_eq!(schemas["Query"]["properties"]["max_tokens"]["maximum"], 77);
        assert_eq!(
            schemas["CreateDocument"]["properties"]["block_size"]["maximum"],
            MAX_BLOCK_SIZE
        );
        assert_eq!(schemas["Query"]["properties"]["seed"]["maximum"], u64::MAX);
        // The ingest's merge_scale states its default; the query's defers to the document.
        let merge_scale = |s: &str| schemas[s]["properties"]["merge_scale"]["description"].clone();
        let ingest = merge_scale("CreateDocument");
        assert!(ingest.as_str().unwrap().contains("else 0.5"), "{ingest}");
        let query = merge_scale("Query");
        assert!(
            query.as_str().unwrap().contains("the document's merge"),
            "{query}"
        );
        assert_eq!(
            schemas["CreateDocument"]["properties"]["ttl_seconds"]["maximum"],
            MAX_SECONDS
        );
        let paths = &doc["paths"];
        assert!(paths["/v1/documents"]["post"]["responses"]["202"].is_object());
        for public in ["/healthz", "/readyz", "/openapi.json"] {
            assert_eq!(paths[public]["get"]["security"], json!([]), "{public}");
        }
        assert!(
            paths["/metrics"]["get"]["security"].is_null(),
            "needs a key"
        );
        for admin in ["/v1/admin/evict", "/v1/admin/verify", "/v1/admin/gc"] {
            assert!(paths[admin]["post"].is_object(), "{admin}");
        }
        assert!(paths["/v1/admin/cluster"]["get"].is_object());
    }

    #[test]
    fn the_id_pattern_is_the_servers_rule() {
        // The pattern as a plain matcher (no regex crate here): its three alternatives.
        let server_accepts = |id: &str| super::super::documents::validate_id(id).is_ok();
        for id in [
            "a", "report", "..x", ".a", "...", "a..", "-", "_", "a.b-c_d", ".-",
        ] {
            assert!(server_accepts(id), "{id}");
            assert!(pattern_matches(id), "{id}");
        }
        for id in [".", "..", "", "a/b", "é", "a b"] {
            assert!(!server_accepts(id), "{id}");
            assert!(!pattern_matches(id), "{id}");
        }
        let long = "a".repeat(128);
        assert!(server_accepts(&long) && pattern_matches(&long));
        let too_long = "a".repeat(129);
        assert!(!server_accepts(&too_long) && !pattern_matches(&too_long));
    }

    /// [`ID_PATTERN`] spelled out: `[A-Za-z0-9_-]` then up to 127 of `[A-Za-z0-9._-]`;
    /// or `.` and a non-dot then up to 126; or `..` and 1 to 126 more.
    fn pattern_matches(id: &str) -> bool {
        let any = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
        let no_dot = |b: u8| any(b) && b != b'.';
        let b = id.as_bytes();
        let all_any = |s: &[u8]| s.iter().all(|&c| any(c));
        match b {
            [first, rest @ ..] if no_dot(*first) => rest.len() <= 127 && all_any(rest),
            [b'.', second, rest @ ..] if no_dot(*second) => rest.len() <= 126 && all_any(rest),
            [b'.', b'.', rest @ ..] => (1..=126).contains(&rest.len()) && all_any(rest),
            _ => false,
        }
    }
}
