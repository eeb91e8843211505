//! Needle-in-a-haystack accuracy through the running service (issue 14): full attention
//! against Star Attention at several block sizes and ingest options, with confidence
//! intervals, so that a few points of difference can be told from noise.
//!
//! Why through the service: the numbers must describe what users get (the service's
//! prompt, store round trip, device and merge), and a server on a GPU host answers the
//! several hundred questions per mode this needs in about a minute. Full attention is a
//! document ingested as ONE block (`block_size` >= L), which is exactly full attention
//! (DESIGN.md §1), so both sides run the same code path.
//!
//! A configuration is `full` or `L/<d>` (block size `ceil(L / d)`), optionally followed
//! by `:key=value` ingest fields passed through as JSON (`Nb` means N times the block
//! size), e.g. `L/16:anchor_size=2b`. Cases are generated (support/niah.rs) over the
//! grid of lengths x depths, sweep after sweep with new seeds, until every task has at
//! least `--min-questions` questions; every configuration answers the same questions, so
//! ratios are paired. Intervals: Wilson 95% for an accuracy, paired bootstrap 95% (2000
//! resamples of the questions) for a star/full ratio.
//!
//!     starkv serve --device cuda --listen 127.0.0.1:8700 &   # any device, any host
//!     cargo bench --bench niah_service -- --server http://127.0.0.1:8700 \
//!         --configs full,L/4,L/8,L/16 --min-questions 200 --csv accuracy.csv --svg accuracy.svg

#[path = "support/machine.rs"]
mod machine;
#[path = "support/niah.rs"]
mod niah;
#[path = "support/plot.rs"]
mod plot;
#[allow(dead_code)] // shared with star_accuracy, which also builds query ids itself
#[path = "support/prompt.rs"]
mod prompt;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use starkv_compute::tokenizer::Tokenizer;

use niah::{Question, SplitMix64, Task};

#[derive(Parser, Debug)]
#[command(about = "Needle-in-a-haystack accuracy through a running starkv server")]
struct Args {
    /// Base URL of a running `starkv serve`.
    #[arg(long, env = "STARKV_SERVER", default_value = "http://127.0.0.1:8700")]
    server: String,
    /// Bearer key, when the server has keys configured (write role).
    #[arg(long, env = "STARKV_API_KEY")]
    api_key: Option<String>,
    /// GGUF whose tokenizer sizes the documents (the server's model; default: the
    /// default model, fetched if absent).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Target context lengths in tokens (chat head + document).
    #[arg(long, value_delimiter = ',', default_values_t = [1024, 2048, 4096, 8000])]
    lengths: Vec<usize>,
    /// Depths of the asked needle per length, evenly over 0..=100%.
    #[arg(long, default_value_t = 6)]
    depths: usize,
    /// Tasks to run.
    #[arg(long, value_delimiter = ',', default_values_t = [Task::Single, Task::MultiKey, Task::MultiValue])]
    tasks: Vec<Task>,
    /// Configurations (see the module docs); the first must be `full`.
    #[arg(long, value_delimiter = ',', default_values_t = ["full".to_string(), "L/4".into(), "L/8".into(), "L/16".into()])]
    configs: Vec<String>,
    /// Minimum questions per task (whole sweeps over lengths x depths are added until
    /// every task has this many).
    #[arg(long, default_value_t = 200)]
    min_questions: usize,
    /// Greedy tokens per answer (multi-value answers hold four 7-digit numbers).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Stop starting new cases after this many seconds and report what was answered in
    /// every configuration (a bounded run on a lent GPU).
    #[arg(long)]
    deadline_seconds: Option<f64>,
    /// Cases in flight at once (the server queues ingests and bounds queries itself).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// One JSON line per question and configuration.
    #[arg(long)]
    jsonl: Option<PathBuf>,
    /// Accuracy and ingest time per configuration, with intervals.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Where the chart (accuracy against ingest time) goes, as NAME.csv and NAME.svg
    /// (default: `STARKV_FIGURES_DIR` or target/figures, name `niah_service`).
    #[arg(long)]
    figure: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A way of ingesting the document: its block size and extra ingest fields.
#[derive(Debug, Clone)]
struct Config {
    label: String,
    /// `None`: one block (full attention); `Some(d)`: `ceil(L / d)`.
    divisor: Option<usize>,
    /// Extra ingest fields; a value `Nb` is N times the block size.
    fields: Vec<(String, String)>,
}

impl Config {
    fn parse(spec: &str) -> Result<Self> {
        let mut parts = spec.split(':');
        let head = parts.next().unwrap_or_default();
        let divisor = match head {
            "full" => None,
            _ => match head.strip_prefix("L/").map(str::parse::<usize>) {
                Some(Ok(d)) if d >= 1 => Some(d),
                _ => bail!("configuration {spec:?}: expected `full` or `L/<d>`"),
            },
        };
        let fields = parts
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .with_context(|| format!("configuration {spec:?}: {kv:?} is not key=value"))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            label: spec.to_string(),
            divisor,
            fields,
        })
    }

    /// The ingest body for a context of `context_len` tokens.
    fn ingest_body(&self, id: &str, text: &str, context_len: usize) -> Result<Value> {
        // 65536 is the service's largest block: one block is full attention for any
        // document the default model accepts.
        let block = self.divisor.map_or(65536, |d| context_len.div_ceil(d));
        let mut body = json!({"id": id, "text": text, "block_size": block});
        for (k, v) in &self.fields {
            let value = if let Some(n) = v.strip_suffix('b').and_then(|n| n.parse::<usize>().ok()) {
                json!(n * block)
            } else if let Ok(n) = v.parse::<i64>() {
                json!(n)
            } else if let Ok(x) = v.parse::<f64>() {
                json!(x)
            } else if let Ok(b) = v.parse::<bool>() {
                json!(b)
            } else {
                json!(v)
            };
            body[k.as_str()] = value;
        }
        Ok(body)
    }
}

/// One generated case: its document, context length and questions.
struct Case {
    index: usize,
    task: Task,
    length: usize,
    context_len: usize,
    document: String,
    questions: Vec<Question>,
}

/// Cases over lengths x depths, sweep after sweep (new seeds), until each task has at
/// least `min_questions` questions.
fn build_cases(args: &Args, tokenizer: &Tokenizer) -> Result<Vec<Case>> {
    let head_len = prompt::context_head_len(tokenizer)?;
    let count_tokens = |s: &str| {
        tokenizer
            .encode(s, false)
            .map_or(usize::MAX, |ids| ids.len())
    };
    let depths: Vec<f64> = match args.depths {
        0 | 1 => vec![0.5],
        n => (0..n).map(|i| i as f64 / (n - 1) as f64).collect(),
    };
    // Built per task, then dealt round-robin (one case of each task in turn), so that a
    // run cut short by `--deadline-seconds` covers every task evenly.
    let mut per_task: Vec<Vec<Case>> = Vec::new();
    for task in args.tasks.iter().copied() {
        let mut cases = Vec::new();
        let mut questions = 0;
        let mut seed = 0u64;
        while questions < args.min_questions {
            for &length in &args.lengths {
                for &depth in &depths {
                    let case_seed = niah::seed_of(&[
                        length as u64,
                        (depth * 1000.0).round() as u64,
                        seed,
                        task as u64,
                    ]);
                    let budget = length.saturating_sub(head_len);
                    let case = niah::build_case(case_seed, task, depth, budget, &count_tokens);
                    let context_len = prompt::context_ids(tokenizer, &case.document)?.len();
                    let qs = case.questions();
                    questions += qs.len();
                    cases.push(Case {
                        index: 0, // set once the tasks are interleaved
                        task,
                        length,
                        context_len,
                        document: case.document,
                        questions: qs,
                    });
                }
            }
            seed += 1;
        }
        per_task.push(cases);
    }
    Ok(interleave(per_task))
}

/// Deals the cases of each task round-robin (first of each task, second of each, ...),
/// numbering them in the new order.
fn interleave(per_task: Vec<Vec<Case>>) -> Vec<Case> {
    let mut queues: Vec<std::vec::IntoIter<Case>> =
        per_task.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::new();
    loop {
        let before = out.len();
        for q in &mut queues {
            if let Some(mut case) = q.next() {
                case.index = out.len();
                out.push(case);
            }
        }
        if out.len() == before {
            return out;
        }
    }
}

/// A small client for the service's documents API.
struct Client {
    base: String,
    auth: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    fn new(base: &str, api_key: Option<&str>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .into();
        Self {
            base: base.trim_end_matches('/').to_string(),
            auth: api_key.map(|k| format!("Bearer {k}")),
            agent,
        }
    }

    /// POSTs `body`, retrying while the server says it is busy (429, 503).
    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        for attempt in 0.. {
            let mut req = self.agent.post(&url);
            if let Some(a) = &self.auth {
                req = req.header("Authorization", a);
            }
            let mut res = req.send_json(body).with_context(|| format!("POST {url}"))?;
            let status = res.status().as_u16();
            let value: Value = res.body_mut().read_json().unwrap_or(Value::Null);
            match status {
                200..=299 => return Ok(value),
                429 | 503 if attempt < 600 => std::thread::sleep(Duration::from_millis(100)),
                _ => bail!("POST {url}: HTTP {status}: {value}"),
            }
        }
        unreachable!("the retry loop returns")
    }

    fn delete(&self, path: &str) -> Result<()> {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.delete(&url);
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let status = req
            .call()
            .with_context(|| format!("DELETE {url}"))?
            .status();
        anyhow::ensure!(status.is_success(), "DELETE {url}: HTTP {status}");
        Ok(())
    }
}

/// The outcome of one question in one configuration.
#[derive(Debug, Clone)]
struct Outcome {
    case: usize,
    question: usize,
    config: usize,
    correct: bool,
}

/// What the run measured: every question's outcome and each configuration's ingest time.
#[derive(Default)]
struct Results {
    outcomes: Vec<Outcome>,
    /// Seconds of ingest per configuration (summed over cases, as the server reports).
    ingest_seconds: BTreeMap<usize, f64>,
}

/// One question's answer in one configuration.
struct Answered {
    question: usize,
    correct: bool,
    answer: String,
}

/// Ingests `case` in `config`, asks every question, deletes the document; returns the
/// answers and the ingest seconds the server reported.
fn run_case(
    client: &Client,
    args: &Args,
    case: &Case,
    config_index: usize,
    config: &Config,
) -> Result<(Vec<Answered>, f64)> {
    let id = format!("niah-{}-{config_index}", case.index);
    let body = config.ingest_body(&id, &case.document, case.context_len)?;
    let ingested = client.post("/v1/documents?wait=true", &body)?;
    if ingested["state"] != "ready" {
        bail!("ingest of {id} did not finish: {ingested}");
    }
    let seconds = ingested["ingest_seconds"].as_f64().unwrap_or(f64::NAN);
    let mut answers = Vec::with_capacity(case.questions.len());
    for (qi, q) in case.questions.iter().enumerate() {
        let res = client.post(
            &format!("/v1/documents/{id}/query"),
            &json!({"question": q.text, "max_tokens": args.max_tokens, "temperature": 0.0}),
        )?;
        let answer = res["answer"].as_str().unwrap_or_default().to_string();
        answers.push(Answered {
            question: qi,
            correct: q.is_answered_by(&answer),
            answer,
        });
    }
    client.delete(&format!("/v1/documents/{id}"))?;
    Ok((answers, seconds))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let (dir, name) = match &args.figure {
        Some(p) => (
            p.parent().map_or_else(|| PathBuf::from("."), PathBuf::from),
            p.file_stem()
                .map_or("niah_service".into(), |s| s.to_string_lossy().into_owned()),
        ),
        None => (plot::figures_dir(), "niah_service".to_string()),
    };
    // `--csv X.csv --figure X` would write the chart's CSV over the table's.
    let chart_csv = dir.join(format!("{name}.csv"));
    if args.csv.as_ref().is_some_and(|c| *c == chart_csv) {
        bail!(
            "--csv {} is also the chart's data file (--figure); pick another name",
            chart_csv.display()
        );
    }
    let configs: Vec<Config> = args
        .configs
        .iter()
        .map(|s| Config::parse(s))
        .collect::<Result<_>>()?;
    anyhow::ensure!(
        configs.first().is_some_and(|c| c.divisor.is_none()),
        "the first configuration must be `full` (ratios are against it)"
    );
    let loaded = match &args.model {
        Some(p) => starkv_compute::LoadedModel::open(p)?,
        None => prompt::load_default_model()?,
    };
    let cases = build_cases(&args, &loaded.tokenizer)?;
    let n_questions: usize = cases.iter().map(|c| c.questions.len()).sum();
    eprintln!(
        "{} cases, {n_questions} questions per configuration, {} configurations",
        cases.len(),
        configs.len()
    );
    let client = Client::new(&args.server, args.api_key.as_deref());
    let results = Mutex::new(Results::default());
    let jsonl = Mutex::new(args.jsonl.as_ref().map(std::fs::File::create).transpose()?);
    let next = Mutex::new(0usize);
    // Case-major, so that a run stopped by `--deadline-seconds` has answered the same
    // questions in every configuration (the report keeps only complete questions).
    let work: Vec<(usize, usize)> = (0..cases.len())
        .flat_map(|i| (0..configs.len()).map(move |c| (c, i)))
        .collect();
    let deadline = args
        .deadline_seconds
        .map(|s| started + Duration::from_secs_f64(s));
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..args.concurrency.max(1) {
            s.spawn(|| {
                loop {
                    let item = {
                        let mut n = next.lock().unwrap();
                        let item = work.get(*n).copied();
                        *n += 1;
                        item
                    };
                    let Some((ci, i)) = item else { break };
                    if first_error.lock().unwrap().is_some()
                        || deadline.is_some_and(|d| Instant::now() >= d)
                    {
                        break;
                    }
                    let case = &cases[i];
                    match run_case(&client, &args, case, ci, &configs[ci]) {
                        Ok((answers, seconds)) => {
                            let mut r = results.lock().unwrap();
                            *r.ingest_seconds.entry(ci).or_default() += seconds;
                            for Answered {
                                question: qi,
                                correct: ok,
                                answer,
                            } in answers
                            {
                                r.outcomes.push(Outcome {
                                    case: i,
                                    question: qi,
                                    config: ci,
                                    correct: ok,
                                });
                                if let Some(f) = jsonl.lock().unwrap().as_mut() {
                                    let q = &case.questions[qi];
                                    let line = json!({
                                        "config": configs[ci].label, "task": case.task.name(),
                                        "length": case.length, "context_tokens": case.context_len,
                                        "depth": q.depth, "question": q.text,
                                        "expected": q.expected, "answer": answer, "correct": ok,
                                    });
                                    let _ = writeln!(f, "{line}");
                                }
                            }
                            let done = r.outcomes.len();
                            if done % 100 < case.questions.len() {
                                eprintln!(
                                    "{done}/{} answers ({:.0} s)",
                                    n_questions * configs.len(),
                                    started.elapsed().as_secs_f64()
                                );
                            }
                        }
                        Err(e) => {
                            first_error.lock().unwrap().get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    let results = results.into_inner().unwrap();
    let report = Report::new(&cases, &configs, &results);
    let answered = report.complete_questions();
    if answered < n_questions {
        eprintln!(
            "stopped at the deadline: {answered} of {n_questions} questions answered in every configuration"
        );
    }
    println!("{}", report.markdown(&args, started.elapsed(), answered));
    if let Some(path) = &args.csv {
        std::fs::write(path, report.csv())?;
    }
    let svg = plot::save(&report.chart(), &dir, &name).map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!("chart: {}", svg.display());
    Ok(())
}

/// Paired outcomes per task: `correct[config][question]` over the same questions.
struct Report<'a> {
    configs: &'a [Config],
    by_task: BTreeMap<Task, Vec<Vec<bool>>>,
    by_task_length: BTreeMap<(Task, usize), Vec<Vec<bool>>>,
    ingest_seconds: Vec<f64>,
}

impl<'a> Report<'a> {
    fn new(cases: &[Case], configs: &'a [Config], results: &Results) -> Self {
        // Questions in a fixed order (case, question), so index j means the same
        // question in every configuration.
        let mut table: BTreeMap<(usize, usize), Vec<Option<bool>>> = BTreeMap::new();
        for o in &results.outcomes {
            table
                .entry((o.case, o.question))
                .or_insert_with(|| vec![None; configs.len()])[o.config] = Some(o.correct);
        }
        let mut by_task: BTreeMap<Task, Vec<Vec<bool>>> = BTreeMap::new();
        let mut by_task_length: BTreeMap<(Task, usize), Vec<Vec<bool>>> = BTreeMap::new();
        for ((case, _), marks) in &table {
            let Some(marks) = marks.iter().copied().collect::<Option<Vec<bool>>>() else {
                continue;
            };
            let c = &cases[*case];
            for target in [
                by_task
                    .entry(c.task)
                    .or_insert_with(|| vec![Vec::new(); configs.len()]),
                by_task_length
                    .entry((c.task, c.length))
                    .or_insert_with(|| vec![Vec::new(); configs.len()]),
            ] {
                for (col, &m) in target.iter_mut().zip(&marks) {
                    col.push(m);
                }
            }
        }
        Self {
            configs,
            by_task,
            by_task_length,
            ingest_seconds: (0..configs.len())
                .map(|c| results.ingest_seconds.get(&c).copied().unwrap_or(f64::NAN))
                .collect(),
        }
    }

    /// Questions answered in every configuration.
    fn complete_questions(&self) -> usize {
        self.by_task.values().map(|cols| cols[0].len()).sum()
    }

    fn markdown(&self, args: &Args, took: Duration, n_questions: usize) -> String {
        let mut out = vec![
            format!(
                "## NIAH accuracy through the service ({} | {} | {:.1} min | {n_questions} questions per configuration | lengths {:?} | {} depths | greedy, {} tokens)",
                machine::utc_now(),
                machine::describe(),
                took.as_secs_f64() / 60.0,
                args.lengths,
                args.depths,
                args.max_tokens
            ),
            String::new(),
            "Accuracy with its Wilson 95% interval; ratio to full attention with a paired bootstrap 95% interval.".into(),
            String::new(),
        ];
        let labels: Vec<&str> = self.configs.iter().map(|c| c.label.as_str()).collect();
        out.push(format!("| task | questions | {} |", labels.join(" | ")));
        out.push(format!("|---|---|{}", "---|".repeat(labels.len())));
        let mut all: Vec<Vec<bool>> = vec![Vec::new(); self.configs.len()];
        for (task, cols) in &self.by_task {
            out.push(self.row(task.name(), cols));
            for (a, c) in all.iter_mut().zip(cols) {
                a.extend(c);
            }
        }
        out.push(self.row("**all**", &all));
        let full_ingest = self.ingest_seconds[0];
        out.push(format!(
            "| ingest seconds (sum) | | {} |",
            self.ingest_seconds
                .iter()
                .map(|s| format!("{s:.2} ({:.2}x full)", s / full_ingest))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
        out.push(String::new());
        out.push("By context length (accuracy):".into());
        out.push(String::new());
        out.push(format!(
            "| task | length | questions | {} |",
            labels.join(" | ")
        ));
        out.push(format!("|---|---|---|{}", "---|".repeat(labels.len())));
        for ((task, length), cols) in &self.by_task_length {
            let cells: Vec<String> = cols.iter().map(|c| percent(c)).collect();
            out.push(format!(
                "| {} | {length} | {} | {} |",
                task.name(),
                cols[0].len(),
                cells.join(" | ")
            ));
        }
        out.join("\n")
    }

    fn row(&self, name: &str, cols: &[Vec<bool>]) -> String {
        let cells: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (lo, hi) = wilson(c);
                let acc = format!("{} [{:.1}, {:.1}]", percent(c), 100.0 * lo, 100.0 * hi);
                if i == 0 {
                    return acc;
                }
                match paired_ratio(c, &cols[0]) {
                    Some((r, lo, hi)) => format!("{acc}; {r:.3} [{lo:.3}, {hi:.3}]"),
                    None => format!("{acc}; n/a"),
                }
            })
            .collect();
        format!("| {name} | {} | {} |", cols[0].len(), cells.join(" | "))
    }

    /// Accuracy on single and multi-key needles (what the goal is stated on)
    /// against ingest time relative to full attention: one line per ingest option, its
    /// points the block sizes, so the trade-off reads off one picture.
    fn chart(&self) -> plot::Chart {
        let mut chart = plot::Chart::lines(
            "Needle accuracy against ingest cost (single + multi-key needles)",
            "ingest time / full-attention prefill",
            "accuracy",
        );
        chart.y_unit = plot::Unit::Percent;
        chart.note = format!(
            "{} questions per configuration; points left to right: smaller blocks to larger (L/16 ... L/4), full = one block",
            self.by_task
                .iter()
                .filter(|(t, _)| **t != Task::MultiValue)
                .map(|(_, c)| c[0].len())
                .sum::<usize>()
        );
        let full = self.ingest_seconds[0];
        let mut points: Vec<(String, f64, f64)> = Vec::new();
        for (i, config) in self.configs.iter().enumerate() {
            let marks: Vec<bool> = self
                .by_task
                .iter()
                .filter(|(t, _)| **t != Task::MultiValue)
                .flat_map(|(_, cols)| cols[i].iter().copied())
                .collect();
            if marks.is_empty() {
                continue;
            }
            let family = match config.divisor {
                None => "full attention".to_string(),
                Some(_) => match config.label.split_once(':') {
                    Some((_, options)) => options.replace(':', ", "),
                    None => "star, anchor = block".to_string(),
                },
            };
            points.push((family, self.ingest_seconds[i] / full, 100.0 * rate(&marks)));
        }
        points.sort_by(|a, b| a.1.total_cmp(&b.1));
        for (family, x, y) in points {
            chart.push(&family, x, y);
        }
        chart
    }

    /// `config,task,questions,accuracy,lo,hi,ratio,ratio_lo,ratio_hi,ingest_seconds`.
    fn csv(&self) -> String {
        let mut lines = vec![
            "config,task,questions,accuracy,lo,hi,ratio,ratio_lo,ratio_hi,ingest_seconds"
                .to_string(),
        ];
        let mut all: Vec<Vec<bool>> = vec![Vec::new(); self.configs.len()];
        let mut rows: Vec<(String, Vec<Vec<bool>>)> = Vec::new();
        for (task, cols) in &self.by_task {
            rows.push((task.name().into(), cols.clone()));
            for (a, c) in all.iter_mut().zip(cols) {
                a.extend(c);
            }
        }
        rows.push(("all".into(), all));
        for (task, cols) in &rows {
            for (i, c) in cols.iter().enumerate() {
                let (lo, hi) = wilson(c);
                let (r, rlo, rhi) =
                    paired_ratio(c, &cols[0]).unwrap_or((f64::NAN, f64::NAN, f64::NAN));
                lines.push(format!(
                    "{},{task},{},{:.4},{lo:.4},{hi:.4},{r:.4},{rlo:.4},{rhi:.4},{:.3}",
                    self.configs[i].label,
                    c.len(),
                    rate(c),
                    self.ingest_seconds[i]
                ));
            }
        }
        lines.join("\n") + "\n"
    }
}

fn rate(marks: &[bool]) -> f64 {
    marks.iter().filter(|&&m| m).count() as f64 / marks.len().max(1) as f64
}

fn percent(marks: &[bool]) -> String {
    format!(
        "{:.1}% ({}/{})",
        100.0 * rate(marks),
        marks.iter().filter(|&&m| m).count(),
        marks.len()
    )
}

/// Wilson score interval at 95% for a proportion (sound near 0% and 100%, unlike the
/// normal approximation).
fn wilson(marks: &[bool]) -> (f64, f64) {
    let n = marks.len() as f64;
    if n == 0.0 {
        return (f64::NAN, f64::NAN);
    }
    let z = 1.959_964;
    let p = rate(marks);
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / (1.0 + z * z / n);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// `rate(star) / rate(full)` over the same questions, with a paired bootstrap 95%
/// interval (questions resampled together, so the correlation between modes counts).
fn paired_ratio(star: &[bool], full: &[bool]) -> Option<(f64, f64, f64)> {
    let n = star.len();
    if n == 0 || n != full.len() || rate(full) == 0.0 {
        return None;
    }
    let mut rng = SplitMix64::new(0xB007_57A9);
    let mut ratios: Vec<f64> = (0..2000)
        .filter_map(|_| {
            let (mut s, mut f) = (0usize, 0usize);
            for _ in 0..n {
                let j = rng.below(n);
                s += usize::from(star[j]);
                f += usize::from(full[j]);
            }
            (f > 0).then(|| s as f64 / f as f64)
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
    Some((rate(star) / rate(full), at(0.025), at(0.975)))
}
