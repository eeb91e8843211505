//! Issue 12 item 8: schemathesis against the real server, driven by the server's own
//! `/openapi.json`: no 5xx, and no status, content type, header or body outside the
//! description. `scripts/test` installs schemathesis (pip) as it does the openai client.
//!
//! Kept short for 2-core CI: a few examples per operation, one worker, a fixed seed, and a
//! configuration whose bounds keep every generated query small (`max_tokens_cap = 4`).

use std::process::Command;

use serde_json::json;

use crate::service::{document, server_with_config, temp_dir};

const CONFIG: &str = r#"
max_tokens_cap = 4
max_question_tokens = 256
ingest_queue = 256
[[api_keys]]
key = "fuzz-admin"
role = "admin"
tenant = "fuzz"
"#;

#[test]
fn schemathesis_finds_no_5xx_and_nothing_outside_the_openapi_document() {
    let dir = temp_dir("schemathesis");
    let server = server_with_config(&dir, CONFIG);
    // The document the description's examples name, so queries reach the model.
    let body = json!({ "id": "report", "text": document(None), "block_size": 128 }).to_string();
    let (status, raw) = server.request(
        "POST",
        "/v1/documents?wait=true",
        Some(body.as_bytes()),
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer fuzz-admin"),
        ],
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&raw));

    // schemathesis keeps a cache folder in its working directory: the test's, not the repo.
    let out = Command::new("python3")
        .current_dir(&dir)
        .args([
            "-c",
            "import sys; from schemathesis.cli import schemathesis; sys.argv[0] = 'st'; \
             sys.exit(schemathesis())",
            "run",
            &format!("http://{}/openapi.json", server.addr),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "6",
            "--seed",
            "12",
            "--workers",
            "1",
            "--request-timeout",
            "120",
            "--header",
            "Authorization: Bearer fuzz-admin",
        ])
        .output()
        .expect("python3 with schemathesis (scripts/test installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Shown with --nocapture: how many cases ran, per operation.
    println!("{stdout}");
    assert!(
        out.status.success(),
        "schemathesis found problems (exit {:?}):\n{stdout}\n{stderr}",
        out.status.code()
    );
    // A run that tested nothing would also exit 0: some "<n> passed" count must be
    // positive (as a whole number: "810 passed" is not "0 passed").
    assert!(
        most_passed(&stdout) > 0,
        "schemathesis tested nothing?\n{stdout}"
    );
    let (status, health) = server.json("GET", "/healthz", None);
    assert_eq!(status, 200, "{health}");
}

/// The largest count `n` in the report's "<n> passed" phrases (0 when there is none).
fn most_passed(report: &str) -> u64 {
    let words: Vec<&str> = report.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[1].trim_end_matches(|c: char| !c.is_alphanumeric()) == "passed")
        .filter_map(|w| w[0].parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn passed_counts_are_read_as_whole_numbers() {
    assert_eq!(
        most_passed("Test cases:\n  810 generated, 810 passed\n"),
        810
    );
    assert_eq!(most_passed("  \u{2705} 6 passed  \u{23ed} 12 skipped"), 6);
    assert_eq!(most_passed("0 generated, 0 passed"), 0);
    assert_eq!(most_passed("nothing ran"), 0);
}
