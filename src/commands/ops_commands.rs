//! Operator commands: against a running server (`--server URL`) or a stopped server's
//! data directory (`--data-dir`). People get tables and one-line summaries
//! (`starkv_ops::render`); `--json` prints the report as one JSON line for scripts.
//! Exit codes: 0 ok, 1 error, 3 not found, 4 corrupt data found, 5 server unreachable.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;
use starkv_ops::render::{self, Style};
use starkv_ops::{OpsError, Target};
use starkv_service::admin::EvictRequest;

use super::GlobalArgs;

#[derive(Args)]
pub struct OpsArgs {
    /// A running server, e.g. http://127.0.0.1:8700 (default: work on --data-dir directly).
    #[arg(long, global = true, env = "STARKV_SERVER")]
    server: Option<String>,
    /// Bearer key for --server.
    #[arg(long, global = true, env = "STARKV_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Tenant whose documents local commands act on.
    #[arg(long, global = true, default_value = "default")]
    tenant: String,
    /// Print the report as JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
pub enum OpsCommand {
    /// Ingest a text file as a document (needs --server), with a progress bar.
    #[command(after_help = INGEST_EXAMPLES)]
    Ingest {
        /// The text file to ingest (UTF-8).
        file: std::path::PathBuf,
        /// Document id (default: the file name).
        #[arg(long)]
        id: Option<String>,
        /// Tokens per block (default: the server's `block_size`).
        #[arg(long)]
        block_size: Option<usize>,
        /// KV precision: f16 (the default; bf16 on a GPU host), int8 or fp8 (e4m3; each
        /// about half the bytes).
        #[arg(long, value_parser = starkv_service::KvDtype::NAMES)]
        kv_dtype: Option<String>,
    },
    /// Ask a question about a document (needs --server); the answer streams to stdout.
    #[command(after_help = ASK_EXAMPLES)]
    Ask {
        /// The document's id.
        doc: String,
        /// The question, in one shell word (quote it).
        question: String,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// After the answer, each token's probability and this many runners-up (0-20).
        #[arg(long, value_name = "N")]
        logprobs: Option<usize>,
    },
    /// List documents.
    Ls,
    /// Show one document.
    Show { doc: String },
    /// Store statistics.
    Stats,
    /// Delete a document.
    Rm { doc: String },
    /// Pin a document (never evicted by policies).
    Pin { doc: String },
    /// Unpin a document.
    Unpin { doc: String },
    /// Set a document's idle TTL in seconds (`none` clears it).
    Ttl { doc: String, seconds: String },
    /// Evict documents by rule (pinned documents are kept).
    Evict {
        /// Evict LRU documents down to this many stored bytes.
        #[arg(long)]
        budget_bytes: Option<u64>,
        /// Evict the N least recently used documents.
        #[arg(long)]
        lru: Option<usize>,
        /// Evict documents unused for this many seconds.
        #[arg(long)]
        older_than: Option<u64>,
        /// Evict every document of this tenant.
        #[arg(long = "evict-tenant")]
        evict_tenant: Option<String>,
    },
    /// Verify every stored block; --repair re-encodes corrupt blocks with the model.
    Verify {
        /// Re-encode every corrupt block from its document's stored tokens.
        #[arg(long)]
        repair: bool,
    },
    /// Delete blocks no document references.
    Gc,
    /// A coordinator's shard workers: health, documents, blocks and bytes each (needs --server).
    Cluster,
}

const INGEST_EXAMPLES: &str = "\
Examples:
  export STARKV_SERVER=http://127.0.0.1:8700
  starkv ingest report.txt                       # id \"report.txt\", progress bar
  starkv ingest report.txt --id report --block-size 1024
  starkv ingest report.txt --json                # one JSON line: state, tokens, blocks";

const ASK_EXAMPLES: &str = "\
Examples:
  export STARKV_SERVER=http://127.0.0.1:8700
  starkv ask report \"What is the magic number?\"
  starkv ask report \"Summarise section 2.\" --max-tokens 512
  starkv ask report \"What is the magic number?\" --logprobs 2   # how sure, token by token
  starkv ask report \"What is the magic number?\" --json   # usage and timings only";

/// How a successful report is shown to a person.
#[derive(Clone, Copy)]
enum View {
    Ingest,
    /// Streamed to stdout; then a line of timings (and the tokens' probabilities).
    Answer,
    Documents,
    Document,
    Stats,
    Change,
    Evict,
    Verify,
    Gc,
    Cluster,
}

pub fn run(global: &GlobalArgs, args: OpsArgs, command: OpsCommand) -> Result<ExitCode> {
    let target = match &args.server {
        Some(url) => Target::server(url, args.api_key.clone()),
        None => Target::Local {
            data_dir: global.data_dir(),
            tenant: args.tenant.clone(),
        },
    };
    let (result, view): (Result<Value, OpsError>, View) = match command {
        OpsCommand::Ingest {
            file,
            id,
            block_size,
            kv_dtype,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let id = id.unwrap_or_else(|| {
                file.file_name().map_or("document".into(), |n| {
                    n.to_string_lossy().replace(
                        |c: char| !c.is_ascii_alphanumeric() && c != '.' && c != '-',
                        "_",
                    )
                })
            });
            let result = starkv_ops::ingest(
                &target,
                &id,
                &text,
                block_size,
                kv_dtype.as_deref(),
                !args.json,
            );
            (result, View::Ingest)
        }
        OpsCommand::Ask {
            doc,
            question,
            max_tokens,
            logprobs,
        } => {
            let mut stdout = std::io::stdout().lock();
            let mut sink = std::io::sink();
            let out: &mut dyn Write = if args.json { &mut sink } else { &mut stdout };
            let result = starkv_ops::ask(&target, &doc, &question, max_tokens, logprobs, out);
            if !args.json {
                println!();
            }
            (result, View::Answer)
        }
        OpsCommand::Ls => (starkv_ops::list(&target), View::Documents),
        OpsCommand::Show { doc } => (starkv_ops::show(&target, &doc), View::Document),
        OpsCommand::Stats => (starkv_ops::stats(&target), View::Stats),
        OpsCommand::Rm { doc } => (starkv_ops::remove(&target, &doc), View::Change),
        OpsCommand::Pin { doc } => (starkv_ops::set_pin(&target, &doc, true), View::Change),
        OpsCommand::Unpin { doc } => (starkv_ops::set_pin(&target, &doc, false), View::Change),
        OpsCommand::Ttl { doc, seconds } => {
            let result = match seconds.as_str() {
                "none" => starkv_ops::set_ttl(&target, &doc, None),
                s => match s.parse() {
                    Ok(n) => starkv_ops::set_ttl(&target, &doc, Some(n)),
                    Err(_) => Err(OpsError::Invalid(format!(
                        "TTL must be a number of seconds or `none`, got `{s}`"
                    ))),
                },
            };
            (result, View::Change)
        }
        OpsCommand::Evict {
            budget_bytes,
            lru,
            older_than,
            evict_tenant,
        } => {
            let req = EvictRequest {
                budget_bytes,
                lru,
                older_than_seconds: older_than,
                tenant: evict_tenant,
            };
            (starkv_ops::evict(&target, &req), View::Evict)
        }
        OpsCommand::Verify { repair } => {
            let model = if repair && args.server.is_none() {
                Some(global.model_path()?)
            } else {
                None
            };
            (
                starkv_ops::verify(&target, repair, model.as_deref()),
                View::Verify,
            )
        }
        OpsCommand::Gc => (starkv_ops::gc(&target), View::Gc),
        OpsCommand::Cluster => (starkv_ops::cluster(&target), View::Cluster),
    };
    let style = Style::for_stdout();
    let mut stdout = std::io::stdout().lock();
    match result {
        Ok(report) => {
            if args.json {
                writeln!(stdout, "{report}")?;
            } else {
                stdout.write_all(human(view, &report, style).as_bytes())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            // Corrupt data is a finding, not a failure to run: the report still prints.
            if let OpsError::Corrupt(report) = &e {
                if args.json {
                    writeln!(stdout, "{report}")?;
                } else {
                    stdout.write_all(render::verify_summary(report, style).as_bytes())?;
                }
            }
            stdout.flush()?;
            eprintln!("error: {e}");
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}

/// The report as people read it.
fn human(view: View, report: &Value, style: Style) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    match view {
        View::Ingest => render::ingest_summary(report),
        View::Answer => render::answer_footer(report, style),
        View::Documents => render::documents_table(report, now, style),
        View::Document => render::document_detail(report, now, style),
        View::Stats => render::stats_report(report, style),
        View::Change => render::change_summary(report),
        View::Evict => render::evict_summary(report, style),
        View::Verify => render::verify_summary(report, style),
        View::Gc => render::gc_summary(report),
        View::Cluster => render::cluster_table(report, now, style),
    }
}
