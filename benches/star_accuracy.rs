//! Needle-in-a-haystack accuracy of Star Attention against full attention (issue 3).
//!
//! Why this benchmark: Star Attention's phase 1 lets each block see only the anchor and
//! itself, so it is an approximation of full attention, and the product is only worth
//! having if that approximation keeps retrieval working. The paper reports 97-100% of
//! full-attention accuracy at block = anchor = L/4 on Llama-3.1-8B; this measures what our
//! implementation keeps on the default model (SmolLM2-135M-Instruct, a tiny model whose
//! own full-attention accuracy is far from perfect, so read the star/full ratio).
//!
//! Every case is a generated document (support/niah.rs) at a target context length
//! (chat head + document, measured with the model's tokenizer) with needles at a given
//! depth, asked through exactly the prompt `starkv generate --document --question` uses.
//! Answers are greedy; a case is correct when the answer contains the 7-digit number.
//!
//! Cost model, which decides how contexts are shared: a context is encoded once per
//! configuration and every question about it reuses that encoding. For Star Attention
//! that IS the product (phase 1 once, phase 2 per question). For full attention the first
//! question is prefilled together with the context, as the product does; later questions
//! about the same context continue from the context's KV (cache truncated back to the
//! context), which is mathematically the same computation.
//!
//! Usage: `cargo bench --bench star_accuracy -- --depths 11 --lengths 1024,2048,4096,7168`
//! (`--int8` adds every block size over 8-bit KV, issue 13)
//! (every option also reads an environment variable, see `--help`).

#[path = "support/machine.rs"]
mod machine;
#[path = "support/niah.rs"]
mod niah;
#[path = "support/plot.rs"]
mod plot;
#[path = "support/prompt.rs"]
mod prompt;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use serde_json::json;
use starkv_compute::generate::{GenerateParams, generate};
use starkv_compute::kv8::Kv8Format;
use starkv_compute::model::{KvCache, Llama};
use starkv_compute::sampling::SamplingParams;
use starkv_compute::star::{CpuShard, Phase1, QueryAttention, StarConfig};
use starkv_compute::tokenizer::Tokenizer;

use niah::Task;

#[derive(Parser, Debug)]
#[command(about = "Needle-in-a-haystack accuracy: full attention vs Star Attention")]
struct Args {
    /// Target context lengths in tokens (chat head + document).
    #[arg(
        long,
        env = "STARKV_NIAH_LENGTHS",
        value_delimiter = ',',
        default_values_t = [1024, 2048, 4096, 7168]
    )]
    lengths: Vec<usize>,
    /// Needle depths per length, spread over 0%, 10%, ..., 100% (11 = all of them,
    /// 3 = 0/50/100%). Cost is ~all in prefill: one 7K context takes ~2.5 min over the
    /// three modes on one free core, so the default (6 contexts per length) runs ~27 min
    /// there (39 min measured on 2 cores shared with C++ builds); 11 depths ~1.6 h.
    #[arg(long, env = "STARKV_NIAH_DEPTHS", default_value_t = 3)]
    depths: usize,
    /// Independent haystacks per (length, depth, task).
    #[arg(long, env = "STARKV_NIAH_SEEDS", default_value_t = 1)]
    seeds: u64,
    /// Star Attention block sizes as divisors of L: 4 means b = L/4 (anchor = b).
    #[arg(
        long,
        env = "STARKV_NIAH_DIVISORS",
        value_delimiter = ',',
        default_values_t = [4, 8]
    )]
    divisors: Vec<usize>,
    /// Task kinds to run.
    #[arg(
        long,
        env = "STARKV_NIAH_TASKS",
        value_delimiter = ',',
        default_values_t = [Task::Single, Task::MultiKey]
    )]
    tasks: Vec<Task>,
    /// Greedy tokens generated per answer (enough for "The special magic number for
    /// <key> is <7 digits>.", digits being one token each).
    #[arg(long, env = "STARKV_NIAH_MAX_TOKENS", default_value_t = 24)]
    max_tokens: usize,
    /// Full attention re-prefills context + question for every question, as the product
    /// does, instead of continuing later questions from the context's cached KV (slower;
    /// use it to confirm that the shortcut does not change answers).
    #[arg(long, env = "STARKV_NIAH_FULL_REPREFILL")]
    full_reprefill: bool,
    /// Also run every Star Attention block size over 8-bit KV (`kv_dtype = int8`: one
    /// scale per token and KV head, attended in 8 bits) from the same phase-1 encoding.
    #[arg(long, env = "STARKV_NIAH_INT8")]
    int8: bool,
    /// Also write one JSON line per question (answers, timings) to this file.
    #[arg(long, env = "STARKV_NIAH_JSONL")]
    jsonl: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One way of attending to the context.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Full,
    /// Star Attention with `b = a = ceil(L / divisor)`, over 8-bit KV when `int8`.
    Star {
        divisor: usize,
        int8: bool,
    },
}

impl Mode {
    fn label(self) -> String {
        match self {
            Mode::Full => "full".into(),
            Mode::Star {
                divisor,
                int8: false,
            } => format!("star b=L/{divisor}"),
            Mode::Star {
                divisor,
                int8: true,
            } => format!("star int8 b=L/{divisor}"),
        }
    }
}

/// Correct answers out of questions asked.
#[derive(Clone, Copy, Default, Debug)]
struct Score {
    correct: usize,
    total: usize,
}

impl Score {
    fn add(&mut self, ok: bool) {
        self.correct += usize::from(ok);
        self.total += 1;
    }

    fn rate(self) -> Option<f64> {
        (self.total > 0).then(|| self.correct as f64 / self.total as f64)
    }

    fn cell(self) -> String {
        match self.rate() {
            Some(r) => format!("{:.1}% ({}/{})", 100.0 * r, self.correct, self.total),
            None => "-".into(),
        }
    }
}

/// `star / full` accuracy, or "n/a" when full attention got nothing right.
fn ratio(star: Score, full: Score) -> String {
    match (star.rate(), full.rate()) {
        (Some(s), Some(f)) if f > 0.0 => format!("{:.2}", s / f),
        _ => "n/a".into(),
    }
}

/// Depths as fractions: `n` points of the 0%, 10%, ..., 100% grid, evenly spread.
fn depth_grid(n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![0.5],
        _ => (0..n)
            .map(|i| (i as f64 * 10.0 / (n - 1) as f64).round() / 10.0)
            .collect(),
    }
}

fn params(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        cancel: Default::default(),
        merge: Default::default(),
        logprobs: None,
    }
}

/// Full attention: the first question prefilled with the context (the product's path),
/// the others continuing from the context's cached KV unless `reprefill`. Returns answers
/// and the time spent (prefill and decode of all questions).
fn answer_full(
    model: &Llama,
    tokenizer: &Tokenizer,
    context: &[u32],
    queries: &[Vec<u32>],
    max_tokens: usize,
    reprefill: bool,
) -> Result<(Vec<String>, Duration)> {
    let started = Instant::now();
    let longest = queries.iter().map(Vec::len).max().unwrap_or(0);
    let (n_layers, shape) = (model.config().n_layers, model.head_shape());
    let mut cache = KvCache::new(n_layers, shape, context.len() + longest + max_tokens);
    let mut answers = Vec::with_capacity(queries.len());
    for (i, query) in queries.iter().enumerate() {
        let generation = if i == 0 || reprefill {
            cache.truncate(0);
            let prompt: Vec<u32> = context.iter().chain(query).copied().collect();
            generate(
                model,
                tokenizer,
                &prompt,
                0,
                &mut cache,
                &params(max_tokens),
                &mut |_| true,
            )?
        } else {
            cache.truncate(context.len());
            generate(
                model,
                tokenizer,
                query,
                context.len(),
                &mut cache,
                &params(max_tokens),
                &mut |_| true,
            )?
        };
        answers.push(generation.text);
    }
    Ok((answers, started.elapsed()))
}

/// Star Attention: phase 1 once over the context, phase 2 per question (a fresh query
/// shard each time, over the same cached blocks).
fn answer_star(
    model: &Llama,
    tokenizer: &Tokenizer,
    context: &[u32],
    queries: &[Vec<u32>],
    block_size: usize,
    max_tokens: usize,
    int8: bool,
) -> Result<(Vec<String>, Duration)> {
    let started = Instant::now();
    let (n_layers, shape) = (model.config().n_layers, model.head_shape());
    let mut blocks = Phase1::new(model, context, StarConfig::new(block_size))?.encode_all()?;
    if int8 {
        // What an int8 document holds: one scale per token and KV head (the store's
        // quantiser does the same arithmetic, bit for bit).
        blocks = blocks
            .into_iter()
            .map(|b| b.to_8bit(Kv8Format::Int8))
            .collect();
    }
    let shard = CpuShard::new(blocks.into_iter().map(Arc::new).collect(), shape);
    let mut answers = Vec::with_capacity(queries.len());
    for query in queries {
        let mut attention =
            QueryAttention::new(vec![&shard], n_layers, shape, query.len() + max_tokens);
        let generation = generate(
            model,
            tokenizer,
            query,
            context.len(),
            &mut attention,
            &params(max_tokens),
            &mut |_| true,
        )?;
        answers.push(generation.text);
    }
    Ok((answers, started.elapsed()))
}

/// Per (target length, task) and per depth bucket, a score per mode.
#[derive(Default)]
struct Tally {
    by_cell: BTreeMap<(usize, Task), Vec<Score>>,
    by_depth: BTreeMap<u32, Vec<Score>>,
}

impl Tally {
    fn add(
        &mut self,
        length: usize,
        task: Task,
        depth: f64,
        mode: usize,
        n_modes: usize,
        ok: bool,
    ) {
        let cell = self
            .by_cell
            .entry((length, task))
            .or_insert_with(|| vec![Score::default(); n_modes]);
        cell[mode].add(ok);
        // Buckets of 10%: multi-key distractors sit at arbitrary depths.
        let bucket = (depth * 10.0).round() as u32 * 10;
        let row = self
            .by_depth
            .entry(bucket)
            .or_insert_with(|| vec![Score::default(); n_modes]);
        row[mode].add(ok);
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let run_started = Instant::now();
    let loaded = prompt::load_default_model()?;
    let int8_modes: &[bool] = if args.int8 { &[false, true] } else { &[false] };
    let modes: Vec<Mode> = std::iter::once(Mode::Full)
        .chain(args.divisors.iter().flat_map(|&divisor| {
            int8_modes
                .iter()
                .map(move |&int8| Mode::Star { divisor, int8 })
        }))
        .collect();
    let depths = depth_grid(args.depths);
    let mut bench = Bench {
        model: &loaded.model,
        tokenizer: &loaded.tokenizer,
        head_len: prompt::context_head_len(&loaded.tokenizer)?,
        args: &args,
        modes: &modes,
        tally: Tally::default(),
        jsonl: args.jsonl.as_ref().map(std::fs::File::create).transpose()?,
    };
    // Depth-major order, with the table so far on stderr after each sweep: a run cut
    // short still covers every context length.
    for (i, &depth) in depths.iter().enumerate() {
        for seed in 0..args.seeds {
            for &length in &args.lengths {
                for &task in &args.tasks {
                    bench.run_case(length, depth, seed, task)?;
                }
            }
        }
        if i + 1 < depths.len() {
            let so_far = report(&args, &modes, &depths, &bench.tally, run_started.elapsed());
            eprintln!("\n(partial: depths {:?} done)\n{so_far}\n", &depths[..=i]);
        }
    }
    println!(
        "{}",
        report(&args, &modes, &depths, &bench.tally, run_started.elapsed())
    );
    let chart = accuracy_chart(&modes, &bench.tally);
    let svg = plot::save(&chart, &plot::figures_dir(), "star_accuracy")
        .map_err(|e| anyhow::anyhow!("writing the chart: {e}"))?;
    println!("\nchart: {}", svg.display());
    Ok(())
}

/// Accuracy against block size (x = L / b, full attention at 1), per task and overall.
fn accuracy_chart(modes: &[Mode], tally: &Tally) -> plot::Chart {
    let mut chart = plot::Chart::lines(
        "Needle-in-a-haystack accuracy vs Star Attention block size",
        "blocks per context, L / b (1 = full attention; anchor = block)",
        "questions answered correctly (%)",
    );
    chart.y_unit = plot::Unit::Percent;
    chart.note = format!("cargo bench --bench star_accuracy, {}", machine::utc_now());
    let mut totals: BTreeMap<&str, Vec<Score>> = BTreeMap::new();
    for ((_, task), scores) in &tally.by_cell {
        for name in [task.name(), "all questions"] {
            let total = totals
                .entry(name)
                .or_insert_with(|| vec![Score::default(); modes.len()]);
            for (t, s) in total.iter_mut().zip(scores) {
                t.correct += s.correct;
                t.total += s.total;
            }
        }
    }
    for (name, scores) in &totals {
        for (mode, score) in modes.iter().zip(scores) {
            let (x, series) = match mode {
                Mode::Full => (1.0, name.to_string()),
                Mode::Star {
                    divisor,
                    int8: false,
                } => (*divisor as f64, name.to_string()),
                Mode::Star {
                    divisor,
                    int8: true,
                } => (*divisor as f64, format!("{name}, int8 KV")),
            };
            if let Some(rate) = score.rate() {
                chart.push(&series, x, 100.0 * rate);
            }
        }
    }
    for s in &mut chart.series {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    chart
}

/// Everything a case needs, and where its results go.
struct Bench<'a> {
    model: &'a Llama,
    tokenizer: &'a Tokenizer,
    /// Context tokens before the document (chat head).
    head_len: usize,
    args: &'a Args,
    modes: &'a [Mode],
    tally: Tally,
    jsonl: Option<std::fs::File>,
}

impl Bench<'_> {
    /// Builds one haystack, asks about each of its needles in every mode, scores the
    /// answers and prints a progress line.
    fn run_case(&mut self, length: usize, depth: f64, seed: u64, task: Task) -> Result<()> {
        let tokenizer = self.tokenizer;
        let count_tokens = |s: &str| {
            tokenizer
                .encode(s, false)
                .map_or(usize::MAX, |ids| ids.len())
        };
        let depth_pct = (depth * 100.0).round() as u64;
        let case_seed = niah::seed_of(&[length as u64, depth_pct, seed, task as u64]);
        let budget = length.saturating_sub(self.head_len);
        let case = niah::build_case(case_seed, task, depth, budget, &count_tokens);
        check_case(&case)?;
        let context = prompt::context_ids(tokenizer, &case.document)?;
        let questions = case.questions();
        let queries: Vec<Vec<u32>> = questions
            .iter()
            .map(|q| prompt::query_ids(tokenizer, &q.text))
            .collect::<Result<_>>()?;
        let mut line = format!(
            "[{length} {} depth {depth_pct}% seed {seed}] L={} needles={}:",
            task.name(),
            context.len(),
            case.needles.len()
        );
        let max_tokens = self.args.max_tokens;
        for (mi, &mode) in self.modes.iter().enumerate() {
            let (answers, took) = match mode {
                Mode::Full => answer_full(
                    self.model,
                    tokenizer,
                    &context,
                    &queries,
                    max_tokens,
                    self.args.full_reprefill,
                )?,
                Mode::Star { divisor, int8 } => answer_star(
                    self.model,
                    tokenizer,
                    &context,
                    &queries,
                    context.len().div_ceil(divisor),
                    max_tokens,
                    int8,
                )?,
            };
            let mut marks = String::new();
            for (question, answer) in questions.iter().zip(&answers) {
                let ok = question.is_answered_by(answer);
                marks.push(if ok { '+' } else { '-' });
                self.tally
                    .add(length, task, question.depth, mi, self.modes.len(), ok);
                if let Some(out) = self.jsonl.as_mut() {
                    let record = json!({
                        "length": length, "context_tokens": context.len(),
                        "task": task.name(), "depth": question.depth, "case_depth": depth,
                        "seed": seed, "mode": mode.label(), "question": question.text,
                        "expected": question.expected, "answer": answer, "correct": ok,
                    });
                    writeln!(out, "{record}")?;
                }
            }
            line.push_str(&format!(
                " {} {marks} {:.1}s;",
                mode.label(),
                took.as_secs_f64()
            ));
        }
        eprintln!("{line}");
        Ok(())
    }
}

/// A broken generator would make every score meaningless, so each case is checked:
/// every needle occurs exactly once and the only digits are the needles' numbers.
fn check_case(case: &niah::Case) -> Result<()> {
    for needle in &case.needles {
        let n = case.document.matches(&needle.sentence()).count();
        anyhow::ensure!(n == 1, "needle {:?} occurs {n} times", needle.key);
    }
    let digits = case.document.chars().filter(char::is_ascii_digit).count();
    anyhow::ensure!(
        digits == 7 * case.needles.len(),
        "the haystack holds {digits} digits"
    );
    Ok(())
}

/// The accuracy tables as markdown: per (context length, task), overall, and by depth.
fn report(args: &Args, modes: &[Mode], depths: &[f64], tally: &Tally, took: Duration) -> String {
    let mut lines = vec![
        "## Star Attention NIAH accuracy (SmolLM2-135M-Instruct Q4_1)".to_string(),
        String::new(),
        format!(
            "{} | {} | {:.1} min | depths {:?} % | seeds {} | greedy, {} new tokens | anchor = block",
            machine::utc_now(),
            machine::describe(),
            took.as_secs_f64() / 60.0,
            depths
                .iter()
                .map(|d| (d * 100.0).round() as u32)
                .collect::<Vec<_>>(),
            args.seeds,
            args.max_tokens
        ),
        String::new(),
    ];
    let labels: Vec<String> = modes.iter().map(|m| m.label()).collect();
    let stars: Vec<String> = modes[1..]
        .iter()
        .map(|m| format!("{} / full", m.label().trim_start_matches("star ")))
        .collect();
    lines.push(format!(
        "| context | task | {} | {} |",
        labels.join(" | "),
        stars.join(" | ")
    ));
    lines.push(format!(
        "|---|---|{}{}",
        "---|".repeat(labels.len()),
        "---|".repeat(stars.len())
    ));
    // Accuracy per mode, then each star mode's accuracy relative to full attention.
    let row = |name: &str, task: &str, scores: &[Score]| {
        let accs: Vec<String> = scores.iter().map(|s| s.cell()).collect();
        let ratios: Vec<String> = scores[1..].iter().map(|&s| ratio(s, scores[0])).collect();
        format!(
            "| {name} | {task} | {} | {} |",
            accs.join(" | "),
            ratios.join(" | ")
        )
    };
    for ((length, task), scores) in &tally.by_cell {
        lines.push(row(&length.to_string(), task.name(), scores));
    }
    let sum = |filter: &dyn Fn(Task) -> bool| -> Vec<Score> {
        let mut total = vec![Score::default(); modes.len()];
        for ((_, task), scores) in &tally.by_cell {
            if filter(*task) {
                for (t, s) in total.iter_mut().zip(scores) {
                    t.correct += s.correct;
                    t.total += s.total;
                }
            }
        }
        total
    };
    for task in [Task::Single, Task::MultiKey, Task::MultiValue] {
        if tally.by_cell.keys().any(|&(_, t)| t == task) {
            lines.push(row("**all**", task.name(), &sum(&|t| t == task)));
        }
    }
    lines.push(row("**all**", "**all**", &sum(&|_| true)));
    lines.push(String::new());
    lines.push("By needle depth (asked needle, all lengths and tasks, 10% buckets):".into());
    lines.push(String::new());
    lines.push(format!("| depth | {} |", labels.join(" | ")));
    lines.push(format!("|---|{}", "---|".repeat(labels.len())));
    for (bucket, scores) in &tally.by_depth {
        let accs: Vec<String> = scores.iter().map(|s| s.cell()).collect();
        lines.push(format!("| {bucket}% | {} |", accs.join(" | ")));
    }
    lines.join("\n")
}
