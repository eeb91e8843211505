//! Repeat-query time to first token on a cached long document: starkv (blocks loaded
//! from the RocksDB store, phase 2) against llama.cpp re-prefilling the document and
//! against llama.cpp restoring its own saved state from disk, same machine, same run.
//!
//! `cargo bench --bench repeat_query -- [--tokens 8000[,16000,...]] [--block-size 2048]
//! [--repeats 3] [--peer-reprefills N] [--threads N] [--no-peer]`
//!
//! llama.cpp re-prefills the document `--peer-reprefills` times (default: `--repeats`);
//! its last re-prefill also saves the state it then restores.
//!
//! Prints a table per document length and writes the chart (time to first token against
//! document length) to `target/figures/repeat_query.{csv,svg}`.

#[path = "support/machine.rs"]
mod machine;
#[path = "support/plot.rs"]
mod plot;
#[path = "support/stats.rs"]
mod stats;

use std::path::Path;
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

/// One document length's first-token times (medians, seconds).
struct Row {
    tokens: usize,
    question_tokens: usize,
    cold: f64,
    load: f64,
    warm: f64,
    reprefill: Option<f64>,
    restore: Option<f64>,
    state_bytes: Option<u64>,
    stored_bytes: u64,
}

/// What every document length shares.
struct Setup<'a> {
    service: &'a Service,
    model_path: &'a Path,
    dir: &'a Path,
    block_size: usize,
    repeats: usize,
    peer_reprefills: usize,
    threads: usize,
    peer: bool,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let value = |name: &str| args.iter().position(|a| a == name).map(|i| args.get(i + 1));
    let get = |name: &str, default: usize| -> Result<usize> {
        match value(name) {
            Some(v) => Ok(v.context("missing value")?.parse()?),
            None => Ok(default),
        }
    };
    // `--tokens 2000,4000,8000` measures each length and draws them as lines.
    let lengths: Vec<usize> = match value("--tokens") {
        Some(v) => v
            .context("missing value")?
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()?,
        None => vec![8000],
    };
    let (block_size, repeats) = (get("--block-size", 2048)?, get("--repeats", 3)?);
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
    let setup = Setup {
        service: &service,
        model_path: &model_path,
        dir: dir.path(),
        block_size,
        repeats,
        peer_reprefills: get("--peer-reprefills", repeats)?,
        threads,
        peer,
    };
    let mut rows = Vec::new();
    for &target in &lengths {
        let row = measure(&setup, target)?;
        print_table(&setup, &row);
        rows.push(row);
    }
    let svg = plot::save(&chart(&rows, threads), &plot::figures_dir(), "repeat_query")
        .map_err(|e| anyhow::anyhow!("writing the chart: {e}"))?;
    println!("\nchart: {}", svg.display());
    Ok(())
}

/// Ingests a document of about `target` tokens, then times the first token from the
/// store (both memory tiers dropped), from memory, and llama.cpp's two ways.
fn measure(setup: &Setup<'_>, target: usize) -> Result<Row> {
    let service = setup.service;
    // Trim the filler to the target token count.
    let mut text = document(target);
    let mut context = service.document_tokens(&text)?;
    while context.len() > target {
        let cut = text.len() * target / context.len();
        text.truncate(text[..cut].rfind(' ').unwrap_or(cut));
        context = service.document_tokens(&text)?;
    }
    let id = format!("bench/doc-{target}");
    let req = IngestRequest {
        id: id.clone(),
        tenant: "bench".into(),
        text: text.clone(),
        block_size: setup.block_size,
        anchor_size: setup.block_size,
        block_overlap: 0,
        merge: Default::default(),
        reencode_ratio: 0.0,
        pinned: false,
        ttl_ms: None,
        kv_dtype: Default::default(),
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
        cancel: Default::default(),
        merge: None,
        logprobs: None,
    };
    let mut cold = Vec::new();
    let mut loads = Vec::new();
    for _ in 0..setup.repeats {
        // From the store every time: drop both in-memory tiers first.
        service.forget_ready_blocks();
        service.store().clear_hot_tier();
        let o = service.query(&id, "bench", &query, &mut |_| true)?;
        cold.push(o.first_token.as_secs_f64());
        loads.push(o.load.as_secs_f64());
    }
    let mut warm = Vec::new();
    for _ in 0..setup.repeats {
        let o = service.query(&id, "bench", &query, &mut |_| true)?;
        warm.push(o.first_token.as_secs_f64());
    }
    let question_ids = prompt::question_query(&service.model().tokenizer, question)?;
    let (mut reprefill, mut restore, mut state_bytes) = (None, None, None);
    if setup.peer {
        let ctx_file = setup.dir.join("context.json");
        let q_file = setup.dir.join("question.json");
        std::fs::write(&ctx_file, serde_json::to_string(&context)?)?;
        std::fs::write(&q_file, serde_json::to_string(&question_ids)?)?;
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/peers/llama_cpp_repeat_query.py"
        );
        let out = Command::new("python3")
            .arg(script)
            .arg(setup.model_path)
            .arg(setup.threads.to_string())
            .arg(setup.repeats.to_string())
            .arg(&ctx_file)
            .arg(&q_file)
            .arg(setup.dir.join("llama.state"))
            .arg(setup.peer_reprefills.to_string())
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
                "llama.cpp peer failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let stored_bytes = service
        .store()
        .list()
        .into_iter()
        .filter(|d| d.doc.doc.ends_with(&id))
        .map(|d| d.stored_bytes)
        .sum();
    Ok(Row {
        tokens: context.len(),
        question_tokens: question_ids.len(),
        cold: median(cold),
        load: median(loads),
        warm: median(warm),
        reprefill,
        restore,
        state_bytes,
        stored_bytes,
    })
}

fn print_table(setup: &Setup<'_>, r: &Row) {
    println!(
        "\nrepeat_query: {} context tokens, {} question tokens, block size {}, {} threads, medians of {}",
        r.tokens, r.question_tokens, setup.block_size, setup.threads, setup.repeats
    );
    println!(
        "| time to first token | seconds | llama.cpp re-prefill / this | llama.cpp state restore / this |"
    );
    println!("|---|---|---|---|");
    let row = |name: &str, s: f64| {
        let ratio = |p: Option<f64>| p.map_or("n/a".to_string(), |p| format!("{:.1}x", p / s));
        println!(
            "| {name} | {s:.3} | {} | {} |",
            ratio(r.reprefill),
            ratio(r.restore)
        );
    };
    row("starkv, blocks from RocksDB (cold tiers)", r.cold);
    row("starkv, blocks in memory (warm)", r.warm);
    if let Some(p) = r.reprefill {
        row("llama.cpp re-prefill", p);
    }
    if let Some(p) = r.restore {
        row("llama.cpp state restore from disk", p);
    }
    println!(
        "\nstarkv store: {} bytes stored for the document (f16 KV, zstd); load part of the cold first token: {:.3}s. llama.cpp state file: {} bytes; its re-prefill: median of {}.",
        r.stored_bytes,
        r.load,
        r.state_bytes.map_or("n/a".into(), |b| b.to_string()),
        setup.peer_reprefills.max(1)
    );
}

/// Time to first token against document length: bars for one length, lines for several.
fn chart(rows: &[Row], threads: usize) -> plot::Chart {
    let mut chart = plot::Chart::lines(
        &format!("Time to first token on a cached document (CPU, {threads} threads)"),
        "document length (tokens)",
        "seconds to the first token (log scale)",
    );
    chart.x_unit = plot::Unit::Tokens;
    chart.y_unit = plot::Unit::Seconds;
    chart.log_y = true;
    chart.dashed = vec!["llama.cpp".into()];
    chart.note = format!(
        "cargo bench --bench repeat_query, {}, {}",
        machine::utc_now(),
        machine::describe()
    );
    if rows.len() == 1 {
        chart.kind = plot::Kind::Bars;
        chart.x_label = format!("{}-token document", rows[0].tokens);
    }
    for r in rows {
        let x = r.tokens as f64;
        if let Some(p) = r.reprefill {
            chart.push("llama.cpp re-prefilling document + question", x, p);
        }
        if let Some(p) = r.restore {
            chart.push("llama.cpp restoring its saved state from disk", x, p);
        }
        chart.push("starkv, blocks read from RocksDB (cold)", x, r.cold);
        chart.push("starkv, blocks already in memory (warm)", x, r.warm);
    }
    chart
}
