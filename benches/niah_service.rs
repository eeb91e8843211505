//! Needle-in-a-haystack accuracy through the running service (issue 14): full attention
//! against Star Attention at several block sizes and ingest options, with confidence
//! intervals, so that a few points of difference can be told from noise.
//!
//! Why through the service: the numbers must describe what users get (the service's
//! prompt, store round trip, device and merge). Full attention is a document ingested as
//! ONE block (`block_size` >= L), which is exactly full attention (DESIGN.md §1), so both
//! sides run the same code path.
//!
//! A configuration is `full` or `L/<d>` (block size `ceil(L / d)`), optionally followed
//! by `:key=value` ingest fields passed through as JSON (`Nb` means N times the block
//! size), e.g. `L/16:anchor_size=2b` or `L/8:kv_dtype=int8`. Cases are generated
//! (support/niah.rs) over the grid of lengths x depths, sweep after sweep with new seeds,
//! until every task has at least `--min-questions` questions; every configuration answers
//! the same questions, so comparisons are paired. Intervals: Wilson 95% for an accuracy,
//! paired bootstrap 95% (2000 resamples of the questions) for a star/full ratio and for
//! the difference of two configurations (`--compare`).
//!
//! Throughput: a server ingests one document at a time (its ingest worker), and on a
//! small model the ingest is mostly the store's work, so several servers on one GPU
//! (`--server A,B,...`, each with its own data directory) answer several times as many
//! questions per minute; a case is ingested, asked and deleted on one server.
//! `--later-configs` are answered only after every case of `--configs` (a bounded run
//! fills the main comparison first); a comparison uses the questions both sides answered.
//!
//!     starkv serve --device cuda --listen 127.0.0.1:8700 &   # any device, any host
//!     cargo bench --bench niah_service -- --server http://127.0.0.1:8700 \
//!         --configs full,L/4,L/8,L/16 --min-questions 200 --csv accuracy.csv
//!
//! The chart (accuracy relative to full attention against ingest time relative to full
//! attention's) takes its x-axis from this run's ingest times, or with `--cost-csv` from
//! the CSV of a separate run that ingested one document at a time (`--concurrency 1`),
//! which measures the cost without the contention of a throughput run. `--replay
//! RUN.jsonl` asks no server: it reports from an earlier run's answers (other pairs,
//! another cost run), with the same numbers that run printed.

#[path = "support/machine.rs"]
mod machine;
#[path = "support/niah.rs"]
mod niah;
#[path = "support/paired.rs"]
mod paired;
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

use niah::{Question, Task};
use paired::{answered, paired, paired_difference, paired_ratio, percent, rate, wilson};

#[derive(Parser, Debug)]
#[command(about = "Needle-in-a-haystack accuracy through a running starkv server")]
struct Args {
    /// Base URLs of running `starkv serve` processes (comma-separated): the cases are
    /// shared among them (each with its own data directory; one GPU may serve several).
    #[arg(
        long,
        env = "STARKV_SERVER",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8700"
    )]
    server: Vec<String>,
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
    /// Configurations answered after every case of `--configs` has been answered in all
    /// of those (what a time-limited run may leave short).
    #[arg(long, value_delimiter = ',')]
    later_configs: Vec<String>,
    /// Paired differences to report, `A~B` (configuration labels): accuracy of A minus
    /// accuracy of B in points over the questions both answered.
    #[arg(long, value_delimiter = ',')]
    compare: Vec<String>,
    /// Minimum questions per task (whole sweeps over lengths x depths are added until
    /// every task has this many).
    #[arg(long, default_value_t = 200)]
    min_questions: usize,
    /// Greedy tokens per answer (multi-value answers hold four 7-digit numbers).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Stop starting new cases after this many seconds and report what was answered
    /// (a bounded run on a lent GPU).
    #[arg(long)]
    deadline_seconds: Option<f64>,
    /// Cases in flight at once, over all servers (each server queues ingests and bounds
    /// queries itself).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Failed cases (an ingest or query error) tolerated before the run stops starting
    /// new ones; the report covers what was answered, and the exit status is non-zero.
    #[arg(long, default_value_t = 3)]
    max_failures: usize,
    /// One JSON line per question and configuration.
    #[arg(long)]
    jsonl: Option<PathBuf>,
    /// Ask no server: report (tables, `--compare`, chart) from the `--jsonl` of an earlier
    /// run, e.g. with other pairs or another cost run; its lines of configurations not
    /// named by `--configs`/`--later-configs` are left out.
    #[arg(long, conflicts_with = "jsonl")]
    replay: Option<PathBuf>,
    /// Accuracy and ingest time per configuration, with intervals.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// The `--csv` of a run that measured ingest cost (one document in flight): the
    /// chart's x-axis is then its ingest time per configuration relative to its `full`.
    #[arg(long)]
    cost_csv: Option<PathBuf>,
    /// Where the chart (accuracy against ingest time) goes, as NAME.csv and NAME.svg
    /// (default: `STARKV_FIGURES_DIR` or target/figures, name `niah_service`).
    #[arg(long)]
    figure: Option<PathBuf>,
    /// The chart's title and note (default: generic ones naming this run).
    #[arg(long)]
    figure_title: Option<String>,
    #[arg(long)]
    figure_note: Option<String>,
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

    /// The ingest options after the block size (`""` for none), the chart's line name.
    fn options(&self) -> &str {
        self.label.split_once(':').map_or("", |(_, o)| o)
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
/// least `min_questions` questions. The cases of a sweep are built on every core (each
/// measures its sentences with the tokenizer, which on a lent GPU host would otherwise
/// hold the servers idle for tens of seconds).
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
    let grid: Vec<(usize, f64)> = args
        .lengths
        .iter()
        .flat_map(|&l| depths.iter().map(move |&d| (l, d)))
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Built per task, then dealt round-robin (one case of each task in turn), so that a
    // run cut short by `--deadline-seconds` covers every task evenly.
    let mut per_task: Vec<Vec<Case>> = Vec::new();
    for task in args.tasks.iter().copied() {
        let mut cases = Vec::new();
        let mut questions = 0;
        let mut seed = 0u64;
        while questions < args.min_questions {
            let build = |&(length, depth): &(usize, f64)| -> Result<Case> {
                let case_seed = niah::seed_of(&[
                    length as u64,
                    (depth * 1000.0).round() as u64,
                    seed,
                    task as u64,
                ]);
                let budget = length.saturating_sub(head_len);
                let case = niah::build_case(case_seed, task, depth, budget, &count_tokens);
                let context_len = prompt::context_ids(tokenizer, &case.document)?.len();
                Ok(Case {
                    index: 0, // set once the tasks are interleaved
                    task,
                    length,
                    context_len,
                    questions: case.questions(),
                    document: case.document,
                })
            };
            let chunk = grid.len().div_ceil(threads).max(1);
            let sweep: Vec<Case> = std::thread::scope(|s| {
                let handles: Vec<_> = grid
                    .chunks(chunk)
                    .map(|part| s.spawn(move || part.iter().map(build).collect::<Vec<_>>()))
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("case builder panicked"))
                    .collect::<Result<Vec<_>>>()
            })?;
            questions += sweep.iter().map(|c| c.questions.len()).sum::<usize>();
            cases.extend(sweep);
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

/// One question's answer in one configuration.
struct Answered {
    question: usize,
    correct: bool,
    answer: String,
}

/// What the run measured, per (case, configuration): each question's outcome and the
/// ingest seconds the server reported.
#[derive(Default)]
struct Results {
    correct: BTreeMap<(usize, usize, usize), bool>,
    ingest_seconds: BTreeMap<(usize, usize), f64>,
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
        .chain(&args.later_configs)
        .map(|s| Config::parse(s))
        .collect::<Result<_>>()?;
    anyhow::ensure!(
        configs.first().is_some_and(|c| c.divisor.is_none()),
        "the first configuration must be `full` (ratios are against it)"
    );
    for (i, c) in configs.iter().enumerate() {
        anyhow::ensure!(
            configs[..i].iter().all(|o| o.label != c.label),
            "configuration {:?} is listed twice",
            c.label
        );
    }
    let compare = parse_compare(&args.compare, &configs)?;
    let costs = args.cost_csv.as_ref().map(read_cost_csv).transpose()?;
    let (cases, results, failures) = match &args.replay {
        Some(path) => {
            let (cases, results) = replay(path, &configs)?;
            (cases, results, Vec::new())
        }
        None => {
            anyhow::ensure!(!args.server.is_empty(), "--server: no server given");
            let loaded = match &args.model {
                Some(p) => starkv_compute::LoadedModel::open(p)?,
                None => prompt::load_default_model()?,
            };
            let cases = build_cases(&args, &loaded.tokenizer)?;
            let (results, failures) = ask(&args, &cases, &configs, started)?;
            (cases, results, failures)
        }
    };
    let n_questions: usize = cases.iter().map(|c| c.questions.len()).sum();
    let report = Report::new(&cases, &configs, &results);
    let least = report.least_answered();
    if least < n_questions {
        eprintln!(
            "stopped early: the least-answered configuration answered {least} of {n_questions} questions"
        );
    }
    println!(
        "{}",
        report.markdown(&args, started.elapsed(), &compare, costs.as_ref())
    );
    if let Some(path) = &args.csv {
        std::fs::write(path, report.csv())?;
    }
    let chart = report.chart(&args, costs.as_ref());
    if chart.series.iter().any(|s| s.name == "full attention") {
        let svg = plot::save(&chart, &dir, &name).map_err(|e| anyhow::anyhow!("{e}"))?;
        eprintln!("chart: {}", svg.display());
    } else {
        eprintln!("chart: nothing answered, none drawn");
    }
    if !failures.is_empty() {
        bail!(
            "{} cases failed (the report covers the others); first: {}",
            failures.len(),
            failures[0]
        );
    }
    Ok(())
}

/// Asks every case in every configuration of the servers (case-major, later
/// configurations last) until done or the deadline; returns the outcomes and the failed
/// cases.
fn ask(
    args: &Args,
    cases: &[Case],
    configs: &[Config],
    started: Instant,
) -> Result<(Results, Vec<String>)> {
    let n_questions: usize = cases.iter().map(|c| c.questions.len()).sum();
    eprintln!(
        "{} cases, {n_questions} questions per configuration, {} configurations ({} later), {} servers ({:.1} s)",
        cases.len(),
        configs.len(),
        args.later_configs.len(),
        args.server.len(),
        started.elapsed().as_secs_f64()
    );
    let clients: Vec<Client> = args
        .server
        .iter()
        .map(|s| Client::new(s, args.api_key.as_deref()))
        .collect();
    let results = Mutex::new(Results::default());
    let jsonl = Mutex::new(args.jsonl.as_ref().map(std::fs::File::create).transpose()?);
    let next = Mutex::new(0usize);
    // Case-major, so that a run stopped by `--deadline-seconds` has answered the same
    // questions in every configuration; the later configurations after all the others.
    let n_main = args.configs.len();
    let work: Vec<(usize, usize)> = (0..cases.len())
        .flat_map(|i| (0..n_main).map(move |c| (c, i)))
        .chain((0..cases.len()).flat_map(|i| (n_main..configs.len()).map(move |c| (c, i))))
        .collect();
    let deadline = args
        .deadline_seconds
        .map(|s| started + Duration::from_secs_f64(s));
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let answers_total = n_questions * configs.len();
    std::thread::scope(|s| {
        for t in 0..args.concurrency.max(1) {
            let client = &clients[t % clients.len()];
            let next = &next;
            let work = &work;
            let (results, jsonl, failures) = (&results, &jsonl, &failures);
            s.spawn(move || {
                loop {
                    if failures.lock().unwrap().len() >= args.max_failures.max(1)
                        || deadline.is_some_and(|d| Instant::now() >= d)
                    {
                        break;
                    }
                    let item = {
                        let mut n = next.lock().unwrap();
                        let item = work.get(*n).copied();
                        *n += 1;
                        item
                    };
                    let Some((ci, i)) = item else { break };
                    let case = &cases[i];
                    match run_case(client, args, case, ci, &configs[ci]) {
                        Ok((answers, seconds)) => {
                            let mut r = results.lock().unwrap();
                            r.ingest_seconds.insert((i, ci), seconds);
                            for a in answers {
                                r.correct.insert((i, a.question, ci), a.correct);
                                if let Some(f) = jsonl.lock().unwrap().as_mut() {
                                    let q = &case.questions[a.question];
                                    let line = json!({
                                        "config": configs[ci].label, "task": case.task.name(),
                                        "case": i, "question_index": a.question,
                                        "length": case.length, "context_tokens": case.context_len,
                                        "depth": q.depth, "question": q.text,
                                        "expected": q.expected, "answer": a.answer,
                                        "correct": a.correct, "ingest_seconds": seconds,
                                    });
                                    let _ = writeln!(f, "{line}");
                                }
                            }
                            let done = r.correct.len();
                            if done % 200 < case.questions.len() {
                                eprintln!(
                                    "{done}/{answers_total} answers ({:.0} s)",
                                    started.elapsed().as_secs_f64()
                                );
                            }
                        }
                        Err(e) => {
                            let what = format!("case {i} in {}: {e:#}", configs[ci].label);
                            eprintln!("FAILED {what}");
                            failures.lock().unwrap().push(what);
                        }
                    }
                }
            });
        }
    });
    Ok((
        results.into_inner().unwrap(),
        failures.into_inner().unwrap(),
    ))
}

/// Cases and outcomes from an earlier run's `--jsonl` (the cases carry only what the
/// report needs: task, length and questions).
fn replay(path: &PathBuf, configs: &[Config]) -> Result<(Vec<Case>, Results)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut cases: Vec<Case> = Vec::new();
    let mut results = Results::default();
    for (n, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))?;
        let field = |k: &str| {
            v.get(k).with_context(|| {
                format!(
                    "{}:{}: no {k:?} (a --jsonl of this bench?)",
                    path.display(),
                    n + 1
                )
            })
        };
        let Some(ci) = configs
            .iter()
            .position(|c| Some(c.label.as_str()) == v["config"].as_str())
        else {
            continue;
        };
        let case = field("case")?.as_u64().context("case")? as usize;
        let qi = field("question_index")?
            .as_u64()
            .context("question_index")? as usize;
        let task =
            <Task as clap::ValueEnum>::from_str(field("task")?.as_str().unwrap_or(""), false)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?;
        while cases.len() <= case {
            cases.push(Case {
                index: cases.len(),
                task,
                length: 0,
                context_len: 0,
                document: String::new(),
                questions: Vec::new(),
            });
        }
        let c = &mut cases[case];
        c.task = task;
        c.length = field("length")?.as_u64().unwrap_or(0) as usize;
        c.context_len = v["context_tokens"].as_u64().unwrap_or(0) as usize;
        while c.questions.len() <= qi {
            c.questions.push(Question {
                text: String::new(),
                expected: Vec::new(),
                depth: f64::NAN,
            });
        }
        c.questions[qi] = Question {
            text: v["question"].as_str().unwrap_or_default().to_string(),
            expected: serde_json::from_value(v["expected"].clone()).unwrap_or_default(),
            depth: v["depth"].as_f64().unwrap_or(f64::NAN),
        };
        let correct = field("correct")?.as_bool().context("correct")?;
        results.correct.insert((case, qi, ci), correct);
        results
            .ingest_seconds
            .insert((case, ci), v["ingest_seconds"].as_f64().unwrap_or(f64::NAN));
    }
    anyhow::ensure!(
        !results.correct.is_empty(),
        "{}: no line of this run's configurations",
        path.display()
    );
    Ok((cases, results))
}

/// `A~B` pairs of configuration indices; a pair naming a configuration this run does not
/// have is left out with a warning (a script may trim its configurations to fit a
/// lent GPU's time without editing the pairs).
fn parse_compare(specs: &[String], configs: &[Config]) -> Result<Vec<(usize, usize)>> {
    let index = |label: &str| configs.iter().position(|c| c.label == label);
    let mut pairs = Vec::new();
    for spec in specs {
        let (a, b) = spec
            .split_once('~')
            .with_context(|| format!("--compare {spec:?}: expected A~B"))?;
        match (index(a), index(b)) {
            (Some(a), Some(b)) => pairs.push((a, b)),
            _ => eprintln!("--compare {spec:?}: not both configurations of this run (left out)"),
        }
    }
    Ok(pairs)
}

/// Ingest seconds per configuration label from a cost run's `--csv` (its `all` rows).
fn read_cost_csv(path: &PathBuf) -> Result<BTreeMap<String, f64>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut out = BTreeMap::new();
    for line in text.lines().skip(1) {
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() == 10 && cells[1] == "all" {
            let seconds: f64 = cells[9]
                .parse()
                .with_context(|| format!("{}: bad ingest seconds in {line:?}", path.display()))?;
            out.insert(cells[0].to_string(), seconds);
        }
    }
    anyhow::ensure!(
        out.contains_key("full"),
        "{}: no `full,all,...` row (not a niah_service --csv?)",
        path.display()
    );
    Ok(out)
}

/// Outcomes per task in a fixed question order: `marks[config][question]`, `None` where
/// that configuration did not answer (a run cut short, a failed case).
type Marks = Vec<Vec<Option<bool>>>;

struct Report<'a> {
    configs: &'a [Config],
    by_task: BTreeMap<Task, Marks>,
    by_task_length: BTreeMap<(Task, usize), Marks>,
    /// By the asked needle's depth, in fifths of the document (0 = 0-20%, ..., 4 =
    /// 80-100%); a multi-key question counts at its own needle's depth.
    by_task_depth: BTreeMap<(Task, usize), Marks>,
    /// Per configuration: ingest seconds summed over the cases that it and `full` both
    /// ingested, and `full`'s over the same cases.
    ingest_vs_full: Vec<(f64, f64)>,
}

impl<'a> Report<'a> {
    fn new(cases: &[Case], configs: &'a [Config], results: &Results) -> Self {
        let mut by_task: BTreeMap<Task, Marks> = BTreeMap::new();
        let mut by_task_length: BTreeMap<(Task, usize), Marks> = BTreeMap::new();
        let mut by_task_depth: BTreeMap<(Task, usize), Marks> = BTreeMap::new();
        for (i, case) in cases.iter().enumerate() {
            let touched = (0..configs.len()).any(|c| results.ingest_seconds.contains_key(&(i, c)));
            if !touched {
                continue;
            }
            for (qi, q) in case.questions.iter().enumerate() {
                let fifth = if q.depth.is_finite() {
                    ((q.depth.clamp(0.0, 1.0) * 5.0) as usize).min(4)
                } else {
                    usize::MAX
                };
                for target in [
                    by_task
                        .entry(case.task)
                        .or_insert_with(|| vec![Vec::new(); configs.len()]),
                    by_task_length
                        .entry((case.task, case.length))
                        .or_insert_with(|| vec![Vec::new(); configs.len()]),
                    by_task_depth
                        .entry((case.task, fifth))
                        .or_insert_with(|| vec![Vec::new(); configs.len()]),
                ] {
                    for (c, col) in target.iter_mut().enumerate() {
                        col.push(results.correct.get(&(i, qi, c)).copied());
                    }
                }
            }
        }
        let ingest_vs_full = (0..configs.len())
            .map(|c| {
                results
                    .ingest_seconds
                    .iter()
                    .filter(|((_, ci), _)| *ci == c)
                    .filter_map(|(&(i, _), &s)| {
                        results.ingest_seconds.get(&(i, 0)).map(|&f| (s, f))
                    })
                    .fold((0.0, 0.0), |(a, b), (s, f)| (a + s, b + f))
            })
            .collect();
        Self {
            configs,
            by_task,
            by_task_length,
            by_task_depth,
            ingest_vs_full,
        }
    }

    /// Questions answered by the configuration that answered fewest.
    fn least_answered(&self) -> usize {
        (0..self.configs.len())
            .map(|c| {
                self.by_task
                    .values()
                    .map(|cols| cols[c].iter().flatten().count())
                    .sum::<usize>()
            })
            .min()
            .unwrap_or(0)
    }

    /// Every task's marks, then all tasks together.
    fn rows(&self) -> Vec<(String, Marks)> {
        let mut all: Marks = vec![Vec::new(); self.configs.len()];
        let mut rows = Vec::new();
        for (task, cols) in &self.by_task {
            rows.push((task.name().to_string(), cols.clone()));
            for (a, c) in all.iter_mut().zip(cols) {
                a.extend(c);
            }
        }
        rows.push(("all".to_string(), all));
        rows
    }

    fn markdown(
        &self,
        args: &Args,
        took: Duration,
        compare: &[(usize, usize)],
        costs: Option<&BTreeMap<String, f64>>,
    ) -> String {
        let counts: Vec<String> = self
            .by_task
            .iter()
            .map(|(t, cols)| {
                let n: Vec<usize> = cols.iter().map(|c| c.iter().flatten().count()).collect();
                let (lo, hi) = (n.iter().min().unwrap_or(&0), n.iter().max().unwrap_or(&0));
                if lo == hi {
                    format!("{} {lo}", t.name())
                } else {
                    format!("{} {lo}-{hi}", t.name())
                }
            })
            .collect();
        let mut out = vec![
            format!(
                "## NIAH accuracy through the service ({} | {} | {:.1} min | {} | questions per configuration: {} | lengths {:?} | {} depths | greedy, {} tokens)",
                machine::utc_now(),
                machine::describe(),
                took.as_secs_f64() / 60.0,
                match &args.replay {
                    Some(p) => format!("replayed from {}", p.display()),
                    None => format!("{} server(s)", args.server.len()),
                },
                counts.join(", "),
                args.lengths,
                args.depths,
                args.max_tokens
            ),
            String::new(),
            "Accuracy with its Wilson 95% interval; ratio to full attention over the questions both answered, with a paired bootstrap 95% interval.".into(),
            String::new(),
        ];
        let labels: Vec<&str> = self.configs.iter().map(|c| c.label.as_str()).collect();
        out.push(format!("| task | {} |", labels.join(" | ")));
        out.push(format!("|---|{}", "---|".repeat(labels.len())));
        for (name, cols) in self.rows() {
            let name = if name == "all" {
                "**all**".into()
            } else {
                name
            };
            out.push(self.row(&name, &cols));
        }
        out.push(format!(
            "| ingest time / full (this run, the cases both ingested) | {} |",
            self.ingest_vs_full
                .iter()
                .map(|&(s, f)| format!("{:.2} ({s:.1} s)", s / f))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
        if let Some(costs) = costs {
            out.push(format!(
                "| ingest time / full (cost run) | {} |",
                self.configs
                    .iter()
                    .map(|c| cost_ratio(costs, &c.label)
                        .map_or("n/a".to_string(), |r| format!("{r:.2}")))
                    .collect::<Vec<_>>()
                    .join(" | ")
            ));
        }
        if !compare.is_empty() {
            out.push(String::new());
            out.push(
                "Paired differences (accuracy of A minus B, points, over the questions both answered; paired bootstrap 95%; the questions only one of them answered right):"
                    .into(),
            );
            out.push(String::new());
            let rows = self.rows();
            out.push(format!(
                "| A - B | {} |",
                rows.iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(" | ")
            ));
            out.push(format!("|---|{}", "---|".repeat(rows.len())));
            for &(a, b) in compare {
                let cells: Vec<String> = rows
                    .iter()
                    .map(|(_, cols)| {
                        let (x, y) = paired(&cols[a], &cols[b]);
                        match paired_difference(&x, &y) {
                            Some((d, lo, hi)) => {
                                // The discordant pairs are all the difference is made of.
                                let only = |p: &[bool], q: &[bool]| {
                                    p.iter().zip(q).filter(|&(&p, &q)| p && !q).count()
                                };
                                format!(
                                    "{d:+.1} [{lo:+.1}, {hi:+.1}] (n {}; only A right {}, only B right {})",
                                    x.len(),
                                    only(&x, &y),
                                    only(&y, &x)
                                )
                            }
                            None => "n/a".into(),
                        }
                    })
                    .collect();
                out.push(format!(
                    "| {} - {} | {} |",
                    self.configs[a].label,
                    self.configs[b].label,
                    cells.join(" | ")
                ));
            }
        }
        out.push(String::new());
        out.push("By context length (accuracy):".into());
        out.push(String::new());
        out.push(format!("| task | length | {} |", labels.join(" | ")));
        out.push(format!("|---|---|{}", "---|".repeat(labels.len())));
        for ((task, length), cols) in &self.by_task_length {
            let cells: Vec<String> = cols.iter().map(|c| percent(&answered(c))).collect();
            out.push(format!(
                "| {} | {length} | {} |",
                task.name(),
                cells.join(" | ")
            ));
        }
        out.push(String::new());
        out.push("By depth of the asked needle (accuracy):".into());
        out.push(String::new());
        out.push(format!("| task | depth | {} |", labels.join(" | ")));
        out.push(format!("|---|---|{}", "---|".repeat(labels.len())));
        for ((task, fifth), cols) in &self.by_task_depth {
            let depth = match fifth {
                0..=4 => format!("{}-{}%", 20 * fifth, 20 * fifth + 20),
                _ => "unknown".into(),
            };
            let cells: Vec<String> = cols.iter().map(|c| percent(&answered(c))).collect();
            out.push(format!(
                "| {} | {depth} | {} |",
                task.name(),
                cells.join(" | ")
            ));
        }
        out.join("\n")
    }

    fn row(&self, name: &str, cols: &Marks) -> String {
        let cells: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let marks = answered(c);
                if marks.is_empty() {
                    return "not answered".to_string();
                }
                let (lo, hi) = wilson(&marks);
                let acc = format!("{} [{:.1}, {:.1}]", percent(&marks), 100.0 * lo, 100.0 * hi);
                if i == 0 {
                    return acc;
                }
                let (star, full) = paired(c, &cols[0]);
                match paired_ratio(&star, &full) {
                    Some((r, lo, hi)) => format!("{acc}; {r:.3} [{lo:.3}, {hi:.3}]"),
                    None => format!("{acc}; n/a"),
                }
            })
            .collect();
        format!("| {name} | {} |", cells.join(" | "))
    }

    /// Accuracy relative to full attention's on the same questions (single and multi-key
    /// needles, what the goal is stated on) against ingest time relative to full
    /// attention's: one line per set of ingest options, its points the block sizes from
    /// small to large, so the trade-off reads off one picture.
    fn chart(&self, args: &Args, costs: Option<&BTreeMap<String, f64>>) -> plot::Chart {
        let mut chart = plot::Chart::lines(
            args.figure_title.as_deref().unwrap_or(
                "Needle accuracy relative to full attention against ingest time (single + multi-key)",
            ),
            match costs {
                Some(_) => "ingest time / full attention's (cost run: one document at a time)",
                None => "ingest time / full attention's (this run)",
            },
            "accuracy / full attention's on the same questions",
        );
        chart.y_unit = plot::Unit::Percent;
        chart.dashed = vec!["goal".into()];
        let goal_tasks = |t: &Task| *t != Task::MultiValue;
        let marks_of = |c: usize| -> Vec<Option<bool>> {
            self.by_task
                .iter()
                .filter(|(t, _)| goal_tasks(t))
                .flat_map(|(_, cols)| cols[c].iter().copied())
                .collect()
        };
        let full = marks_of(0);
        let x_of = |c: usize| match costs {
            Some(costs) => cost_ratio(costs, &self.configs[c].label),
            None => {
                let (s, f) = self.ingest_vs_full[c];
                (f > 0.0).then(|| s / f)
            }
        };
        let mut points: Vec<(String, usize, f64, f64)> = Vec::new();
        let mut sizes = Vec::new();
        for (i, config) in self.configs.iter().enumerate() {
            let (star, base) = paired(&marks_of(i), &full);
            let Some((ratio, _, _)) = paired_ratio(&star, &base) else {
                continue;
            };
            let Some(x) = x_of(i) else {
                eprintln!("chart: no ingest time for {} (left out)", config.label);
                continue;
            };
            sizes.push(star.len());
            let family = match config.divisor {
                None => "full attention".to_string(),
                Some(_) if config.options().is_empty() => "default options".to_string(),
                Some(_) => config.options().replace(':', ", "),
            };
            // Larger divisors (smaller blocks) first along each line.
            let order = usize::MAX - config.divisor.unwrap_or(1);
            points.push((family, order, x, 100.0 * ratio));
        }
        let (lo, hi) = (
            points.iter().map(|p| p.2).fold(f64::INFINITY, f64::min),
            points.iter().map(|p| p.2).fold(f64::NEG_INFINITY, f64::max),
        );
        if lo.is_finite() {
            chart.push("goal (95% of full)", (lo - 0.05).max(0.0), 95.0);
            chart.push("goal (95% of full)", hi + 0.05, 95.0);
        }
        points.sort_by_key(|p| p.1);
        for (family, _, x, y) in points {
            chart.push(&family, x, y);
        }
        let mut divisors: Vec<usize> = self.configs.iter().filter_map(|c| c.divisor).collect();
        divisors.sort_unstable_by(|a, b| b.cmp(a));
        divisors.dedup();
        let labels: Vec<String> = divisors.iter().map(|d| format!("L/{d}")).collect();
        chart.note = args.figure_note.clone().unwrap_or_else(|| {
            format!(
                "{} single + multi-key questions per configuration; points along a line: block sizes {} (smallest first)",
                match (sizes.iter().min(), sizes.iter().max()) {
                    (Some(a), Some(b)) if a != b => format!("{a}-{b}"),
                    (Some(a), _) => a.to_string(),
                    _ => "no".into(),
                },
                labels.join(", ")
            )
        });
        chart
    }

    /// `config,task,questions,accuracy,lo,hi,ratio,ratio_lo,ratio_hi,ingest_seconds`
    /// (ratio over the questions answered by both; ingest seconds summed over the cases
    /// this configuration ingested).
    fn csv(&self) -> String {
        let mut lines = vec![
            "config,task,questions,accuracy,lo,hi,ratio,ratio_lo,ratio_hi,ingest_seconds"
                .to_string(),
        ];
        for (task, cols) in &self.rows() {
            for (i, c) in cols.iter().enumerate() {
                let marks = answered(c);
                let (lo, hi) = wilson(&marks);
                let (star, full) = paired(c, &cols[0]);
                let (r, rlo, rhi) =
                    paired_ratio(&star, &full).unwrap_or((f64::NAN, f64::NAN, f64::NAN));
                lines.push(format!(
                    "{},{task},{},{:.4},{lo:.4},{hi:.4},{r:.4},{rlo:.4},{rhi:.4},{:.3}",
                    self.configs[i].label,
                    marks.len(),
                    rate(&marks),
                    self.ingest_vs_full[i].0
                ));
            }
        }
        lines.join("\n") + "\n"
    }
}

/// A configuration's ingest time relative to `full` in a cost run.
fn cost_ratio(costs: &BTreeMap<String, f64>, label: &str) -> Option<f64> {
    Some(costs.get(label)? / costs.get("full")?)
}
