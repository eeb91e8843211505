//! The scripting interface: each command prints one JSON object on its last stdout line.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{fixture, last_json_line, model, model_path, starkv, u32s};

#[test]
fn tokenize_json_with_and_without_special_parsing() {
    let out = last_json_line(&starkv(&[
        "tokenize",
        "--special",
        "--json",
        "--",
        "<|im_start|>user\nhi<|im_end|>\n",
    ]));
    assert_eq!(u32s(&out["ids"]), vec![1, 4093, 198, 6004, 2, 198]);
    let out = last_json_line(&starkv(&["tokenize", "--json", "--", "<|im_start|>"]));
    assert_eq!(u32s(&out["ids"]), vec![44, 108, 306, 79, 3738, 108, 46]);
}

#[test]
fn generate_raw_json_matches_llama_cpp_greedy() {
    let vectors = fixture("llama_cpp/greedy.json");
    let case = &vectors["cases"][0];
    assert_eq!(case["name"], "capital");
    let prompt = case["prompt"].as_str().unwrap();
    let out = last_json_line(&starkv(&[
        "generate",
        "--raw",
        prompt,
        "--max-tokens",
        "48",
        "--temperature",
        "0",
        "--device",
        "cpu",
        "--json",
    ]));
    assert_eq!(u32s(&out["prompt_ids"]), u32s(&case["prompt_ids"]));
    // Every step of this case has a top-1 margin above 0.9; the 0.92 step is compared too,
    // and the text must be the decoded ids without the end marker.
    let ids = u32s(&out["ids"]);
    assert_eq!(ids, u32s(&case["greedy_ids"]));
    assert_eq!(
        out["text"].as_str().unwrap(),
        case["greedy_text"].as_str().unwrap()
    );
}

#[test]
fn generate_chat_applies_the_template() {
    let out = last_json_line(&starkv(&[
        "generate",
        "--chat",
        "What is the capital of France? Answer in one sentence.",
        "--max-tokens",
        "4",
        "--json",
    ]));
    let vectors = fixture("llama_cpp/greedy.json");
    assert_eq!(
        u32s(&out["prompt_ids"]),
        u32s(&vectors["cases"][0]["prompt_ids"])
    );
    assert_eq!(u32s(&out["ids"]).len(), 4);
}

#[test]
fn score_json_has_one_logprob_per_next_token() {
    let text = "The quick brown fox jumps over the lazy dog.";
    let out = last_json_line(&starkv(&["score", "--raw", text, "--json"]));
    let ids = u32s(&out["ids"]);
    assert_eq!(ids, model().tokenizer.encode(text, true).unwrap());
    let lp = out["target_logprob"].as_array().unwrap();
    assert_eq!(lp.len(), ids.len() - 1);
    assert!(lp.iter().all(|x| x.as_f64().unwrap() <= 0.0));
}

#[test]
fn bad_arguments_fail_with_a_message_and_exit_code() {
    let out = starkv(&["generate", "--max-tokens", "3"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit with 2");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--raw"));
    let out = starkv(&["generate", "--raw", "hi", "--top-p", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"));
    let out = starkv(&["--model", "/nonexistent.gguf", "tokenize", "--", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.gguf"));
}

/// `--document/--question`: with one block (b >= L) Star Attention is full attention, so
/// greedy answers agree token for token; with several blocks the needle is still found.
#[test]
fn document_question_star_and_full_agree() {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("doc.txt");
    std::fs::write(
        &doc,
        "The village of Lowmere sits on the edge of a wide salt marsh. Its fishermen go out before dawn.\n\
         The special magic number for Lowmere is 4821937. Remember it.\n\
         In winter the marsh freezes and children skate between the reeds.\n",
    )
    .unwrap();
    let doc = doc.to_str().unwrap();
    let question = "What is the special magic number for Lowmere?";
    let run = |attention: &str, block: &str| {
        last_json_line(&starkv(&[
            "generate",
            "--document",
            doc,
            "--question",
            question,
            "--attention",
            attention,
            "--block-size",
            block,
            "--max-tokens",
            "24",
            "--device",
            "cpu",
            "--json",
        ]))
    };
    let full = run("full", "4096");
    let star_one_block = run("star", "4096");
    assert_eq!(full["prompt_ids"], star_one_block["prompt_ids"]);
    assert_eq!(full["ids"], star_one_block["ids"]);
    assert!(
        full["text"].as_str().unwrap().contains("4821937"),
        "{}",
        full["text"]
    );
    let star_blocks = run("star", "16");
    assert!(
        star_blocks["text"].as_str().unwrap().contains("4821937"),
        "{}",
        star_blocks["text"]
    );
}

/// `--device`: a GPU that cannot be used is a clear error and a non-zero exit code, never
/// a panic, for `generate` and for `serve` (flag and STARKV_DEVICE); a malformed value is
/// a usage error. No machine has CUDA device 99.
#[test]
fn an_unusable_device_is_a_clear_error() {
    let out = starkv(&[
        "generate",
        "--device",
        "cuda:99",
        "--raw",
        "hi",
        "--max-tokens",
        "1",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cuda:99"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let out = starkv(&["generate", "--device", "tpu", "--raw", "hi"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit with 2");

    let dir = tempfile::tempdir().unwrap();
    for (flag, env) in [(Some("cuda:99"), None), (None, Some("cuda:99"))] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_starkv"));
        cmd.args(["--model", model_path().to_str().unwrap()])
            .args(["--data-dir", dir.path().to_str().unwrap()])
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_remove("STARKV_DEVICE")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(device) = flag {
            cmd.args(["--device", device]);
        }
        if let Some(device) = env {
            cmd.env("STARKV_DEVICE", device);
        }
        let mut child = cmd.spawn().expect("starting starkv serve");
        // It must exit on its own; a server that came up anyway is killed and fails.
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                panic!("serve --device cuda:99 did not exit");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("cuda:99"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // Nothing was created for the server that did not start.
    assert!(!dir.path().join("store").exists());
}
