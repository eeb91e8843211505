//! Star Attention speed against full attention on the same machine, in the same run
//! (issue 3).
//!
//! Two numbers decide whether the product is worth running:
//! (a) ingest: phase 1 (`Phase1::encode_all`, blocks of `b` with the anchor as a shared
//!     read-only prefix) over an ~8K-token context, against a full-attention prefill of
//!     the same context (`model.forward` into a `KvCache`). Phase 1 does the same
//!     projections and MLP work but only block-local attention, and its blocks are
//!     independent (they can go to other threads or hosts);
//! (b) time to first token of a question once the context is encoded: phase 2 over the
//!     cached blocks (`QueryAttention`: forward of the question's tokens, LM head, greedy
//!     pick) against what a service without a KV store does, re-prefilling context +
//!     question with full attention.
//!
//! Timings on a shared machine are noisy, so every measurement is repeated, the median
//! is reported with the spread, the configurations are interleaved within each repeat
//! (a burst of load hits all of them alike), and every comparison is a ratio between
//! numbers taken in the same run. Blocks are in memory: (b) excludes loading them from
//! the store.
//!
//! Usage: `cargo bench --bench star_speed -- --repeats 3 --blocks 2048,1024`.

#[path = "support/machine.rs"]
mod machine;
// Shared with star_accuracy, which uses all of the generator; here it only supplies
// realistic prose for the context.
#[allow(dead_code)]
#[path = "support/niah.rs"]
mod niah;
#[path = "support/prompt.rs"]
mod prompt;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use starkv_compute::model::{KvCache, Llama};
use starkv_compute::sampling::argmax;
use starkv_compute::star::{BlockKv, CpuShard, Phase1, QueryAttention, StarConfig};
use starkv_compute::tokenizer::Tokenizer;

#[derive(Parser, Debug)]
#[command(about = "Star Attention phase-1 ingest and phase-2 TTFT vs full attention")]
struct Args {
    /// Context tokens (chat head + document). The default leaves room for the question
    /// inside the model's 8192-token training context.
    #[arg(long, env = "STARKV_SPEED_CONTEXT", default_value_t = 8160)]
    context: usize,
    /// Query tokens (question + end of the user turn + assistant header).
    #[arg(long, env = "STARKV_SPEED_QUESTION_TOKENS", default_value_t = 30)]
    question_tokens: usize,
    /// Star Attention block sizes (anchor = block).
    #[arg(
        long,
        env = "STARKV_SPEED_BLOCKS",
        value_delimiter = ',',
        default_values_t = [2048, 1024]
    )]
    blocks: Vec<usize>,
    /// Repeats of every measurement; the table shows medians.
    #[arg(long, env = "STARKV_SPEED_REPEATS", default_value_t = 3)]
    repeats: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Repeated measurements of one configuration (seconds, or ratios of seconds).
#[derive(Default, Clone)]
struct Samples(Vec<f64>);

impl Samples {
    fn push(&mut self, took: Duration) {
        self.0.push(took.as_secs_f64());
    }

    fn median(&self) -> f64 {
        let mut s = self.0.clone();
        s.sort_by(f64::total_cmp);
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        }
    }

    /// `"min-max"`, to show how noisy the median is.
    fn spread(&self) -> String {
        let min = self.0.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{min:.2}-{max:.2}")
    }
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    let started = Instant::now();
    let value = f()?;
    Ok((value, started.elapsed()))
}

/// Full-attention prefill of `tokens` from position 0 into a fresh cache.
fn full_prefill(model: &Llama, tokens: &[u32]) -> Result<Vec<f32>> {
    let mut cache = KvCache::new(model.config().n_layers, model.head_shape(), tokens.len());
    let positions: Vec<usize> = (0..tokens.len()).collect();
    Ok(model.forward(tokens, &positions, &mut cache)?)
}

/// The first answer token from the last row of `hidden` (LM head + greedy pick): the
/// end of a time-to-first-token measurement.
fn first_token(model: &Llama, hidden: &[f32]) -> u32 {
    let h = model.config().hidden;
    argmax(&model.logits(&hidden[hidden.len() - h..]))
}

/// Phase 2 over cached blocks: a fresh query shard, the query's forward at positions
/// `L..L+m`, then the first token.
fn star_first_token(
    model: &Llama,
    shard: &CpuShard,
    context_len: usize,
    query: &[u32],
) -> Result<u32> {
    let (n_layers, shape) = (model.config().n_layers, model.head_shape());
    let mut attention = QueryAttention::new(vec![shard], n_layers, shape, query.len());
    let positions: Vec<usize> = (context_len..context_len + query.len()).collect();
    let hidden = model.forward(query, &positions, &mut attention)?;
    Ok(first_token(model, &hidden))
}

/// The longest prefix of a wordy question whose query ids (question + template tail)
/// take at most `target` tokens.
fn question_of(tokenizer: &Tokenizer, target: usize) -> Result<(String, Vec<u32>)> {
    const WORDS: &str = "Which special magic number does the provided text give for the \
        key named in the first paragraph, and where exactly in the document does that \
        sentence appear relative to the other numbers that are mentioned in it?";
    let words: Vec<&str> = WORDS.split_whitespace().collect();
    let mut best = (String::new(), Vec::new());
    for n in 1..=words.len() {
        let question = words[..n].join(" ");
        let ids = prompt::query_ids(tokenizer, &question)?;
        if ids.len() > target {
            break;
        }
        best = (question, ids);
    }
    anyhow::ensure!(!best.1.is_empty(), "no question fits in {target} tokens");
    Ok(best)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let loaded = prompt::load_default_model()?;
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let head_len = prompt::context_head_len(tokenizer)?;
    let count_tokens = |s: &str| {
        tokenizer
            .encode(s, false)
            .map_or(usize::MAX, |ids| ids.len())
    };
    let case = niah::build_case(
        niah::seed_of(&[args.context as u64]),
        niah::Task::Single,
        0.5,
        args.context.saturating_sub(head_len),
        &count_tokens,
    );
    let context = prompt::context_ids(tokenizer, &case.document)?;
    let (question, query) = question_of(tokenizer, args.question_tokens)?;
    let prompt_ids: Vec<u32> = context.iter().chain(&query).copied().collect();
    let l = context.len();
    eprintln!(
        "context {l} tokens, query {} tokens ({question:?}), {} repeats",
        query.len(),
        args.repeats
    );

    // Warm-up: page the weights in and start the thread pool outside any timing.
    full_prefill(model, &context[..64.min(l)])?;

    let mut prefill = Samples::default();
    let mut ingest = vec![Samples::default(); args.blocks.len()];
    let mut reprefill_ttft = Samples::default();
    let mut star_ttft = vec![Samples::default(); args.blocks.len()];
    let mut shards: Vec<Option<CpuShard>> = args.blocks.iter().map(|_| None).collect();
    for repeat in 0..args.repeats {
        // (a) ingest: full prefill of the context, then phase 1 at each block size.
        let (_, took) = timed(|| full_prefill(model, &context))?;
        prefill.push(took);
        eprintln!("repeat {repeat}: full prefill {:.2}s", took.as_secs_f64());
        for (i, &b) in args.blocks.iter().enumerate() {
            let phase1 = Phase1::new(model, &context, StarConfig::new(b))?;
            let (blocks, took) = timed(|| Ok(phase1.encode_all()?))?;
            ingest[i].push(took);
            eprintln!("repeat {repeat}: phase 1 b={b} {:.2}s", took.as_secs_f64());
            let blocks: Vec<Arc<BlockKv>> = blocks.into_iter().map(Arc::new).collect();
            shards[i] = Some(CpuShard::new(blocks, model.head_shape()));
        }
        // (b) time to first token: re-prefill everything, or the query over the blocks.
        let (full_token, took) =
            timed(|| Ok(first_token(model, &full_prefill(model, &prompt_ids)?)))?;
        reprefill_ttft.push(took);
        eprintln!(
            "repeat {repeat}: re-prefill TTFT {:.2}s",
            took.as_secs_f64()
        );
        for (i, shard) in shards.iter().enumerate() {
            let shard = shard.as_ref().expect("encoded above");
            let (token, took) = timed(|| star_first_token(model, shard, l, &query))?;
            star_ttft[i].push(took);
            eprintln!(
                "repeat {repeat}: star b={} TTFT {:.3}s (first token {token}, full {full_token})",
                args.blocks[i],
                took.as_secs_f64()
            );
        }
    }

    println!("## Star Attention speed vs full attention (SmolLM2-135M-Instruct Q4_1, CPU)");
    println!();
    println!(
        "{} | {} | context L = {l} tokens, query m = {} tokens | {} repeats, configurations interleaved",
        machine::utc_now(),
        machine::describe(),
        query.len(),
        args.repeats
    );
    println!();
    println!(
        "| measurement | config | median time | tokens/s | min-max (s) | speed-up vs full: ratio of medians / median of per-repeat ratios |"
    );
    println!("|---|---|---|---|---|---|");
    let ingest_row = |config: &str, s: &Samples| {
        println!(
            "| (a) ingest of the context | {config} | {:.2} s | {:.0} | {} | {} |",
            s.median(),
            l as f64 / s.median(),
            s.spread(),
            speedup(&prefill, s)
        );
    };
    ingest_row("full prefill (KvCache)", &prefill);
    for (b, s) in args.blocks.iter().zip(&ingest) {
        let config = format!("star phase 1, b=a={b} ({} blocks)", l.div_ceil(*b));
        ingest_row(&config, s);
    }
    let ttft_row = |config: &str, s: &Samples| {
        println!(
            "| (b) time to first token | {config} | {:.3} s | - | {} | {} |",
            s.median(),
            s.spread(),
            speedup(&reprefill_ttft, s)
        );
    };
    ttft_row(
        &format!(
            "full re-prefill of context + question ({} tokens)",
            prompt_ids.len()
        ),
        &reprefill_ttft,
    );
    for (b, s) in args.blocks.iter().zip(&star_ttft) {
        ttft_row(&format!("star phase 2 over the cached blocks of b={b}"), s);
    }
    Ok(())
}

/// How many times faster `fast` is than `base`: the ratio of the medians, and the median
/// of the ratios of measurements taken side by side in the same repeat (more robust to
/// load that changes during the run).
fn speedup(base: &Samples, fast: &Samples) -> String {
    let paired = Samples(base.0.iter().zip(&fast.0).map(|(b, f)| b / f).collect());
    format!(
        "{:.2}x / {:.2}x",
        base.median() / fast.median(),
        paired.median()
    )
}
