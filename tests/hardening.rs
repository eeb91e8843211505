//! Issue 12, tried as a hostile but careful user would: no cross-tenant signal, no client
//! number that overflows, every 4xx in JSON, documents within the model's context unless
//! opted in, abandoned queries that free their slots, and a bounded shutdown. Each test
//! failed before its fix (see the issue for what was observed).

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::service::{JSON_CT, QUESTION, Server, document, server_with_config, temp_dir, wait_for};

/// Sends `body` as JSON with an optional bearer key; status and parsed JSON body.
fn call(
    server: &Server,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![JSON_CT];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth));
    }
    let bytes = body.map(|b| b.to_string().into_bytes());
    let (status, raw) = server.request(method, path, bytes.as_deref(), &headers);
    let value = serde_json::from_slice(&raw).unwrap_or_else(
        |_| json!({ "not_json": String::from_utf8_lossy(&raw[..raw.len().min(300)]) }),
    );
    (status, value)
}

/// A 4xx in the README's shape: `status`, JSON `{"error": {"code", "message"}}`.
fn assert_json_error(answer: &(u16, Value), status: u16, what: &str) {
    let (got, body) = answer;
    assert_eq!(*got, status, "{what}: {body}");
    assert!(
        body["error"]["code"].is_string() && body["error"]["message"].is_string(),
        "{what}: not the JSON error shape: {body}"
    );
}

const TENANT_KEYS: &str = r#"
[[api_keys]]
key = "writer-a"
role = "write"
tenant = "a"
[[api_keys]]
key = "reader-a"
role = "read"
tenant = "a"
[[api_keys]]
key = "writer-b"
role = "write"
tenant = "b"
[[api_keys]]
key = "scraper"
role = "metrics"
tenant = "ops"
[[api_keys]]
key = "root"
role = "admin"
tenant = "ops"
"#;

/// Issue 12 item 1: tenant B posting tenant A's text learns nothing (a fresh ingest,
/// `reused_blocks` 0); a tenant's own re-ingest still reuses its blocks; `global` dedup is
/// an explicit option; /metrics needs a `metrics` or admin key once keys are configured.
#[test]
fn tenants_share_no_blocks_and_metrics_need_a_key() {
    let dir = temp_dir("tenant-dedup");
    let server = server_with_config(&dir, TENANT_KEYS);
    // Small blocks, as an attacker guessing a secret would use.
    let secret = "Account notes. The vault PIN for the harbour office is 48213. Keep it safe.";
    let ingest = |key: &str, id: &str, text: &str| {
        let (status, doc) = call(
            &server,
            Some(key),
            "POST",
            "/v1/documents?wait=true",
            Some(json!({ "id": id, "text": text, "block_size": 8 })),
        );
        assert_eq!(status, 200, "{doc}");
        assert_eq!(doc["state"], "ready", "{doc}");
        (
            doc["blocks"].as_u64().unwrap(),
            doc["reused_blocks"].as_u64().unwrap(),
        )
    };
    let (blocks, reused) = ingest("writer-a", "notes", secret);
    assert!(blocks >= 3, "{blocks} blocks");
    assert_eq!(reused, 0);
    let (b_blocks, b_reused) = ingest("writer-b", "guess", secret);
    assert_eq!(b_blocks, blocks);
    assert_eq!(
        b_reused, 0,
        "tenant b must not learn that tenant a stored this text"
    );
    let (_, a_reused) = ingest("writer-a", "notes-copy", secret);
    assert_eq!(a_reused, blocks, "a tenant's own blocks are still reused");

    // /metrics: public before; now a metrics or admin key.
    assert_json_error(&call(&server, None, "GET", "/metrics", None), 401, "no key");
    assert_json_error(
        &call(&server, Some("reader-a"), "GET", "/metrics", None),
        403,
        "a read key",
    );
    for key in ["scraper", "root"] {
        let auth = format!("Bearer {key}");
        let (status, raw) = server.request("GET", "/metrics", None, &[("Authorization", &auth)]);
        assert_eq!(status, 200, "{key}");
        assert!(
            String::from_utf8_lossy(&raw).contains("starkv_blocks_reused_total"),
            "{key}: {}",
            String::from_utf8_lossy(&raw)
        );
    }
    // A metrics key reads metrics only.
    assert_json_error(
        &call(&server, Some("scraper"), "GET", "/v1/documents", None),
        403,
        "a metrics key listing documents",
    );
    // Health and readiness stay open (load balancers probe them without keys).
    assert_eq!(call(&server, None, "GET", "/healthz", None).0, 200);
    assert_eq!(call(&server, None, "GET", "/readyz", None).0, 200);
    server.kill();

    // `dedup_scope = "global"`: the operator's explicit choice to share across tenants.
    let server = server_with_config(&dir, &format!("dedup_scope = \"global\"\n{TENANT_KEYS}"));
    let other = "Shared glossary. A harbour is a sheltered body of water for ships.";
    let (status, doc) = call(
        &server,
        Some("writer-a"),
        "POST",
        "/v1/documents?wait=true",
        Some(json!({ "id": "glossary", "text": other, "block_size": 8 })),
    );
    assert_eq!(status, 200, "{doc}");
    let (status, doc_b) = call(
        &server,
        Some("writer-b"),
        "POST",
        "/v1/documents?wait=true",
        Some(json!({ "id": "glossary", "text": other, "block_size": 8 })),
    );
    assert_eq!(status, 200, "{doc_b}");
    assert_eq!(doc_b["reused_blocks"], doc["blocks"], "{doc_b}");
}

/// Issue 12 item 5: numbers that would overflow when turned into milliseconds or added to
/// a timestamp are refused with 400, and nothing is evicted by them.
#[test]
fn client_numbers_out_of_range_get_400_and_change_nothing() {
    let dir = temp_dir("overflow");
    let server = Server::start(&dir, &["--device", "cpu"]);
    let text = "The tide tables are posted at the harbour office every Monday.";
    // 18446744073709552 s * 1000 wrapped to 384 ms.
    let answer = call(
        &server,
        None,
        "POST",
        "/v1/documents",
        Some(json!({ "id": "wrapped", "text": text, "ttl_seconds": 18_446_744_073_709_552u64 })),
    );
    assert_json_error(&answer, 400, "ttl_seconds that overflows");
    assert!(
        answer.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ttl_seconds"),
        "{}",
        answer.1
    );
    assert_eq!(
        call(&server, None, "GET", "/v1/documents/wrapped", None).0,
        404
    );

    // The largest accepted TTL (100 years) is kept as given.
    let (status, doc) = call(
        &server,
        None,
        "POST",
        "/v1/documents?wait=true",
        Some(
            json!({ "id": "tides", "text": text, "ttl_seconds": 3_153_600_000u64, "block_size": 16 }),
        ),
    );
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["ttl_ms"], 3_153_600_000_000u64, "{doc}");
    let answer = call(
        &server,
        None,
        "POST",
        "/v1/documents/tides/ttl",
        Some(json!({ "ttl_seconds": u64::MAX })),
    );
    assert_json_error(&answer, 400, "a TTL of u64::MAX seconds");
    // u64::MAX seconds of age made every unpinned document old enough.
    let answer = call(
        &server,
        None,
        "POST",
        "/v1/admin/evict",
        Some(json!({ "older_than_seconds": u64::MAX })),
    );
    assert_json_error(&answer, 400, "older_than_seconds of u64::MAX");
    let (status, doc) = call(&server, None, "GET", "/v1/documents/tides", None);
    assert_eq!(
        status, 200,
        "nothing may be evicted by a refused rule: {doc}"
    );
    assert_eq!(doc["ttl_ms"], 3_153_600_000_000u64, "{doc}");
    // Pagination arithmetic at the edge of usize.
    let (status, list) = call(
        &server,
        None,
        "GET",
        &format!("/v1/documents?offset={}&limit=1000", u64::MAX),
        None,
    );
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["documents"], json!([]), "{list}");
    assert!(list["next_offset"].is_null(), "{list}");
}

/// Issue 12 item 7: bad query strings and paths answer in JSON, `.` and `..` are not ids,
/// and a text too long for any token count is refused without being tokenised.
#[test]
fn every_4xx_is_json_and_long_texts_are_refused_before_tokenising() {
    let dir = temp_dir("json-4xx");
    let server = Server::start(&dir, &["--device", "cpu"]);
    let cases: Vec<(&str, &str, Option<Value>)> = vec![
        ("GET", "/v1/documents?offset=-1", None),
        ("GET", "/v1/documents?limit=many", None),
        (
            "POST",
            "/v1/documents?wait=maybe",
            Some(json!({ "text": "hello" })),
        ),
        ("GET", "/v1/documents/%FF%FE", None),
        ("DELETE", "/v1/documents/%C3%28", None),
        (
            "POST",
            "/v1/documents/%FF/query",
            Some(json!({ "question": "q" })),
        ),
        (
            "POST",
            "/v1/documents",
            Some(json!({ "id": ".", "text": "x" })),
        ),
        (
            "POST",
            "/v1/documents",
            Some(json!({ "id": "..", "text": "x" })),
        ),
        ("GET", "/v1/documents/..", None),
        ("GET", "/v1/documents/.", None),
    ];
    for (method, path, body) in cases {
        let answer = call(&server, None, method, path, body);
        assert_json_error(&answer, 400, &format!("{method} {path}"));
    }
    // Ids that merely contain dots are fine.
    let (status, doc) = call(
        &server,
        None,
        "POST",
        "/v1/documents?wait=true",
        Some(json!({ "id": "..notes.v2", "text": "Dots are fine inside ids.", "block_size": 16 })),
    );
    assert_eq!(status, 200, "{doc}");

    // 15 MB of text is under the body limit (16 MB) but far over the model's context:
    // refused from its length alone ("at least N tokens"), not after tokenising it.
    let huge = "harbour ".repeat(15 << 17);
    let answer = call(
        &server,
        None,
        "POST",
        "/v1/documents",
        Some(json!({ "id": "huge", "text": huge })),
    );
    assert_json_error(&answer, 413, "a 15 MB text");
    let message = answer.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("at least"), "{message}");
    let (status, health) = call(&server, None, "GET", "/healthz", None);
    assert_eq!(status, 200, "{health}");
}

/// Issue 12 item 9: the default model was trained on 8,192 positions; a longer document
/// is refused with a 413 that names the limit, unless the ingest opts in, and then the
/// answer says the document runs past the model's context.
#[test]
fn documents_beyond_the_model_context_need_an_opt_in() {
    let dir = temp_dir("beyond-context");
    let server = Server::start(&dir, &["--device", "cpu"]);
    // About 10,000 tokens: past the default model's context_length (8192).
    let long: String = (0..15)
        .map(|i| format!("Section {i}: {}\n\n", document(None)))
        .collect();
    let answer = call(
        &server,
        None,
        "POST",
        "/v1/documents",
        Some(json!({ "id": "long", "text": long, "block_size": 1024 })),
    );
    assert_json_error(&answer, 413, "a document past the model's context");
    assert_eq!(answer.1["error"]["code"], "document_beyond_model_context");
    let message = answer.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("8192"), "the limit is named: {message}");
    assert!(message.contains("allow_beyond_context"), "{message}");
    assert_eq!(
        call(&server, None, "GET", "/v1/documents/long", None).0,
        404
    );

    let (status, doc) = call(
        &server,
        None,
        "POST",
        "/v1/documents",
        Some(json!({
            "id": "long", "text": long, "block_size": 1024, "allow_beyond_context": true
        })),
    );
    assert_eq!(status, 202, "{doc}");
    assert_eq!(doc["beyond_context"], true, "{doc}");
    assert_eq!(doc["model_context_length"], 8192, "{doc}");
    assert!(
        doc["warning"].as_str().is_some_and(|w| w.contains("8192")),
        "{doc}"
    );
    // Not waited for: encoding 10,000 tokens on 2 CPU cores is not what this tests.
    server.kill();
}

/// A question of `n` paragraphs of the test document: about 700 tokens each.
fn long_question(n: usize) -> String {
    let mut q: String = (0..n).map(|_| document(None) + "\n\n").collect();
    q.push_str(QUESTION);
    q
}

fn queries_available(server: &Server) -> Value {
    server.json("GET", "/readyz", None).1["queries_available"].clone()
}

/// Issue 12 item 2: questions past `max_question_tokens` are refused up front; clients
/// that hang up during a long prefill free their query slots (the work is cancelled within
/// a layer), and SIGTERM stops the server within its grace period, cancelling what runs.
#[test]
fn abandoned_queries_free_their_slots_and_sigterm_stops_the_server() {
    let dir = temp_dir("abandoned");
    let mut server = server_with_config(
        &dir,
        "query_concurrency = 2\nmax_question_tokens = 4096\nshutdown_grace_seconds = 2\n",
    );
    let (status, doc) = server.json(
        "POST",
        "/v1/documents?wait=true",
        Some(json!({ "id": "harbour", "text": document(None), "block_size": 128 })),
    );
    assert_eq!(status, 200, "{doc}");

    // 100 KB questions are refused before any model work.
    for question in ["Why? ".repeat(20_000), long_question(7)] {
        let answer = call(
            &server,
            None,
            "POST",
            "/v1/documents/harbour/query",
            Some(json!({ "question": question, "max_tokens": 1 })),
        );
        assert_json_error(&answer, 400, "a question past max_question_tokens");
        assert_eq!(
            answer.1["error"]["code"], "question_too_long",
            "{}",
            answer.1
        );
    }
    assert_eq!(queries_available(&server), 2);

    // Two clients ask long questions (a prefill of ~3,500 tokens: tens of seconds on 2
    // cores) and hang up as soon as their queries hold the slots.
    let ask = json!({ "question": long_question(5), "max_tokens": 1000 }).to_string();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            server.send(
                "POST",
                "/v1/documents/harbour/query",
                Some(ask.as_bytes()),
                &[JSON_CT],
            )
        })
        .collect();
    wait_for("both slots to be taken", Duration::from_secs(60), || {
        queries_available(&server) == 0
    });
    drop(clients);
    wait_for(
        "the abandoned queries to free their slots",
        Duration::from_secs(120),
        || queries_available(&server) == 2,
    );
    let cancelled = server.metric("starkv_query_total{result=\"cancelled\"}");
    assert_eq!(
        cancelled, 2.0,
        "both abandoned queries must be cancelled, not run to the end"
    );
    let (status, answer) = server.json(
        "POST",
        "/v1/documents/harbour/query",
        Some(json!({ "question": QUESTION, "max_tokens": 24 })),
    );
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["answer"].as_str().unwrap().contains("6194027"),
        "{answer}"
    );

    // SIGTERM while a long query runs and its client waits: the query is cancelled, the
    // client gets a JSON 503, and the process exits (cleanly) within the grace period.
    let client = server.send(
        "POST",
        "/v1/documents/harbour/query",
        Some(ask.as_bytes()),
        &[JSON_CT],
    );
    wait_for("the long query to start", Duration::from_secs(60), || {
        queries_available(&server) == 1
    });
    let pid = server.child.id().to_string();
    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = loop {
        if let Some(exit) = server.child.try_wait().expect("waiting for the server") {
            break exit;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(30),
            "the server did not stop within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "exit status after SIGTERM: {exit}");
    let mut raw = Vec::new();
    let mut client = client;
    let _ = client.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("\"cancelled\""), "{text}");
}
