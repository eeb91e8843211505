//! The OpenAPI description served at `/openapi.json` (written by hand: the schema
//! generator's UI crate downloads assets at build time, which our CI cannot do).

use serde_json::{Value, json};

fn op(summary: &str, body: Option<&str>) -> Value {
    let mut op = json!({
        "summary": summary,
        "responses": {
            "200": { "description": "OK" },
            "4XX": { "description": "Error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } }
        }
    });
    if let Some(schema) = body {
        op["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } });
    }
    op
}

fn id_param() -> Value {
    json!([{ "name": "id", "in": "path", "required": true, "schema": { "type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$" } }])
}

pub fn spec() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": { "title": "starkv", "version": env!("CARGO_PKG_VERSION"), "description": "Star Attention long-document KV-cache service" },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object", "required": ["code", "message"], "properties": { "code": { "type": "string" }, "message": { "type": "string" } } } } },
                "CreateDocument": { "type": "object", "required": ["text"], "additionalProperties": false, "properties": {
                    "text": { "type": "string", "minLength": 1 }, "id": { "type": "string" }, "block_size": { "type": "integer", "minimum": 1 },
                    "anchor_size": { "type": "integer", "minimum": 1 }, "pin": { "type": "boolean" }, "ttl_seconds": { "type": "integer", "minimum": 0 }, "metadata": { "type": "object" } } },
                "Query": { "type": "object", "required": ["question"], "additionalProperties": false, "properties": {
                    "question": { "type": "string", "minLength": 1 }, "max_tokens": { "type": "integer", "minimum": 1 }, "temperature": { "type": "number", "minimum": 0 },
                    "top_p": { "type": "number", "exclusiveMinimum": true, "minimum": 0, "maximum": 1 }, "top_k": { "type": "integer", "minimum": 0 }, "seed": { "type": "integer" },
                    "stop": { "type": "array", "items": { "type": "string" } }, "stream": { "type": "boolean" } } },
                "Ttl": { "type": "object", "properties": { "ttl_seconds": { "type": "integer", "nullable": true, "minimum": 0 } } },
                "ChatCompletion": { "type": "object", "required": ["model", "messages"], "properties": { "model": { "type": "string" }, "messages": { "type": "array" } } }
            }
        },
        "security": [{ "bearer": [] }],
        "paths": {
            "/v1/documents": { "post": op("Ingest a document (202, background job; ?wait=true waits)", Some("CreateDocument")), "get": op("List documents (offset, limit)", None) },
            "/v1/documents/{id}": { "parameters": id_param(), "get": op("Document state, sizes and times", None), "delete": op("Delete a document", None) },
            "/v1/documents/{id}/pin": { "parameters": id_param(), "post": op("Pin (never evicted)", None) },
            "/v1/documents/{id}/unpin": { "parameters": id_param(), "post": op("Unpin", None) },
            "/v1/documents/{id}/ttl": { "parameters": id_param(), "post": op("Set or clear the idle TTL", Some("Ttl")) },
            "/v1/documents/{id}/query": { "parameters": id_param(), "post": op("Answer a question over the cached document (stream: SSE)", Some("Query")) },
            "/v1/models": { "get": op("OpenAI-compatible: the documents usable as `model`", None) },
            "/v1/chat/completions": { "post": op("OpenAI-compatible chat completion over a cached document", Some("ChatCompletion")) },
            "/v1/admin/stats": { "get": op("Store statistics, the device and its GPU block tier (admin)", None) },
            "/v1/admin/gc": { "post": op("Collect unreferenced blocks (admin)", None) },
            "/healthz": { "get": op("Liveness and the device serving (`device`: cpu or cuda:N)", None) },
            "/readyz": { "get": op("Readiness", None) },
            "/metrics": { "get": op("Prometheus metrics", None) },
            "/openapi.json": { "get": op("This document", None) }
        }
    })
}
