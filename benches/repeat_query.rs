//! Repeat-query time to first token on a cached long document: starkv (blocks loaded
//! from the RocksDB store, phase 2) against llama.cpp re-prefilling the document and
//! against llama.cpp restoring its own saved state from disk, same machine, same run.
//!
//! `cargo bench --bench repeat_query -- [--tokens 8000] [--block-size 2048] [--repeats 3]
//! [--threads N] [--no-peer]`

#[path = "support/stats.rs"]
mod stats;

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use starkv_cache::{BlockStore, RocksConfig, StoreConfig};
use starkv_compute::LoadedModel;
use starkv_compute::fetch::{default_data_dir, ensure_default_model};
use starkv_compute::prompt;
use starkv_compute::sampling::SamplingParams;
use starkv_service::{IngestRequest, QueryRequest, Service};
use stats::{median, peer_seconds};

/// Deterministic filler prose with a fact in the middle.
fn document(target_tokens: usize) -> String {
    let subjects = [
        "The harbour",
        "A lighthouse keeper",
        "The market",
        "An old ferry",
        "The council",
        "A fisherman",
    ];
    let verbs = [
        "watched",
        "repaired",
        "counted",
        "painted",
        "described",
        "remembered",
    ];
    let objects = [
        "the nets",
        "the winter storms",
        "the salt flats",
        "a row of boats",
        "the quiet square",
        "the tide tables",
    ];
    let mut text = String::new();
    let mut i = 0usize;
    while text.len() < target_tokens * 5 {
        if i == 700 {
            text.push_str("The special magic number for the harbour town is 6194027. ");
        }
        text.push_str(&format!(
            "{} {} {} on day {}. ",
            subjects[i % 6],
            verbs[(i / 6) % 6],
            objects[(i / 36) % 6],
            i % 97
        ));
        i += 1;
    }
    text
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let get = |name: &str, default: usize| -> Result<usize> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(args.get(i + 1).context("missing value")?.parse()?),
            None => Ok(default),
        }
    };
    let (target, block_size, repeats) = (
        get("--tokens", 8000)?,
        get("--block-size", 2048)?,
        get("--repeats", 3)?,
    );
    let threads = get(
        "--threads",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    )?;
    let peer = !args.iter().any(|a| a == "--no-peer");
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let model_path = ensure_default_model(&default_data_dir(), &mut |m| eprintln!("{m}"))?;
    let dir = tempfile::tempdir()?;
    let store = BlockStore::open_rocks(
        RocksConfig::new(dir.path().join("store"), 4),
        StoreConfig::default(),
    )?;
    let service = Service::new(LoadedModel::open(&model_path)?, &model_path, store, 0)?;
    // Trim the filler to the target token count.
    let mut text = document(target);
    let mut context = service.document_tokens(&text)?;
    while context.len() > target {
        let cut = text.len() * target / context.len();
        text.truncate(text[..cut].rfind(' ').unwrap_or(cut));
        context = service.document_tokens(&text)?;
    }
    let req = IngestRequest {
        id: "bench/doc".into(),
        tenant: "bench".into(),
        text: text.clone(),
        block_size,
        anchor_size: block_size,
        pinned: false,
        ttl_ms: None,
    };
    let t = Instant::now();
    service.ingest(&req, context.clone(), &|_, _| {})?;
    eprintln!(
        "ingested {} tokens in {:.1}s",
        context.len(),
        t.elapsed().as_secs_f64()
    );
    let question = "What is the special magic number for the harbour town?";
    let query = QueryRequest {
        question: question.into(),
        max_tokens: 1,
        sampling: SamplingParams::greedy(),
        stop: vec![],
    };
    let mut cold = Vec::new();
    let mut loads = Vec::new();
    for _ in 0..repeats {
        // From the store every time: drop both in-memory tiers first.
        service.forget_ready_blocks();
        service.store().clear_hot_tier();
        let o = service.query("bench/doc", "bench", &query, &mut |_| true)?;
        cold.push(o.first_token.as_secs_f64());
        loads.push(o.load.as_secs_f64());
    }
    let mut warm = Vec::new();
    for _ in 0..repeats {
        let o = service.query("bench/doc", "bench", &query, &mut |_| true)?;
        warm.push(o.first_token.as_secs_f64());
    }
    let question_ids = prompt::question_query(&service.model().tokenizer, question)?;
    let (mut reprefill, mut restore, mut state_bytes) = (None, None, None);
    if peer {
        let ctx_file = dir.path().join("context.json");
        let q_file = dir.path().join("question.json");
        std::fs::write(&ctx_file, serde_json::to_string(&context)?)?;
        std::fs::write(&q_file, serde_json::to_string(&question_ids)?)?;
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/peers/llama_cpp_repeat_query.py"
        );
        let out = Command::new("python3")
            .arg(script)
            .arg(&model_path)
            .arg(threads.to_string())
            .arg(repeats.to_string())
            .arg(&ctx_file)
            .arg(&q_file)
            .arg(dir.path().join("llama.state"))
            .output()?;
        if out.status.success() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let v: serde_json::Value = serde_json::from_str(line)?;
                let secs = peer_seconds(&v).context("seconds")?;
                match v["what"].as_str() {
                    Some("reprefill") => reprefill = Some(median(secs)),
                    Some("state_restore") => {
                        restore = Some(median(secs));
                        state_bytes = v["state_bytes"].as_u64();
                    }
                    _ => {}
                }
            }
        } else {
            eprintln!(
                "llama.cpp peer failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let stats = service.store().stats();
    println!(
        "\nrepeat_query: {} context tokens, {} question tokens, block size {block_size}, {threads} threads, medians of {repeats}",
        context.len(),
        question_ids.len()
    );
    println!(
        "| time to first token | seconds | llama.cpp re-prefill / this | llama.cpp state restore / this |"
    );
    println!("|---|---|---|---|");
    let row = |name: &str, s: f64| {
        let ratio = |p: Option<f64>| p.map_or("n/a".to_string(), |p| format!("{:.1}x", p / s));
        println!(
            "| {name} | {s:.3} | {} | {} |",
            ratio(reprefill),
            ratio(restore)
        );
    };
    row("starkv, blocks from RocksDB (cold tiers)", median(cold));
    row("starkv, blocks in memory (warm)", median(warm));
    if let Some(p) = reprefill {
        row("llama.cpp re-prefill", p);
    }
    if let Some(p) = restore {
        row("llama.cpp state restore from disk", p);
    }
    println!(
        "\nstarkv store: {} bytes stored for the document (f16 KV, zstd); load part of the cold first token: {:.3}s. llama.cpp state file: {} bytes.",
        stats.store_bytes,
        median(loads),
        state_bytes.map_or("n/a".into(), |b| b.to_string())
    );
    Ok(())
}
