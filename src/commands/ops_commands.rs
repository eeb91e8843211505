//! Operator commands: against a running server (`--server URL`) or a stopped server's
//! data directory (`--data-dir`). `--json` prints the report as one JSON line.
//! Exit codes: 0 ok, 1 error, 3 not found, 4 corrupt data found, 5 server unreachable.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;
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
    Ingest {
        file: std::path::PathBuf,
        /// Document id (default: the file name).
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        block_size: Option<usize>,
    },
    /// Ask a question about a document (needs --server); the answer streams to stdout.
    Ask {
        doc: String,
        question: String,
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
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
        #[arg(long)]
        repair: bool,
    },
    /// Delete blocks no document references.
    Gc,
}

pub fn run(global: &GlobalArgs, args: OpsArgs, command: OpsCommand) -> Result<ExitCode> {
    let target = match &args.server {
        Some(url) => Target::server(url, args.api_key.clone()),
        None => Target::Local {
            data_dir: global.data_dir(),
            tenant: args.tenant.clone(),
        },
    };
    let result: Result<Value, OpsError> = match command {
        OpsCommand::Ingest {
            file,
            id,
            block_size,
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
            starkv_ops::ingest(&target, &id, &text, block_size, !args.json)
        }
        OpsCommand::Ask {
            doc,
            question,
            max_tokens,
        } => {
            let mut stdout = std::io::stdout().lock();
            let mut sink = std::io::sink();
            let out: &mut dyn Write = if args.json { &mut sink } else { &mut stdout };
            let result = starkv_ops::ask(&target, &doc, &question, max_tokens, out);
            if !args.json {
                println!();
            }
            result
        }
        OpsCommand::Ls => starkv_ops::list(&target),
        OpsCommand::Show { doc } => starkv_ops::show(&target, &doc),
        OpsCommand::Stats => starkv_ops::stats(&target),
        OpsCommand::Rm { doc } => starkv_ops::remove(&target, &doc),
        OpsCommand::Pin { doc } => starkv_ops::set_pin(&target, &doc, true),
        OpsCommand::Unpin { doc } => starkv_ops::set_pin(&target, &doc, false),
        OpsCommand::Ttl { doc, seconds } => match seconds.as_str() {
            "none" => starkv_ops::set_ttl(&target, &doc, None),
            s => match s.parse() {
                Ok(n) => starkv_ops::set_ttl(&target, &doc, Some(n)),
                Err(_) => Err(OpsError::Invalid(format!(
                    "TTL must be a number of seconds or `none`, got `{s}`"
                ))),
            },
        },
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
            starkv_ops::evict(&target, &req)
        }
        OpsCommand::Verify { repair } => {
            let model = if repair && args.server.is_none() {
                Some(global.model_path()?)
            } else {
                None
            };
            starkv_ops::verify(&target, repair, model.as_deref())
        }
        OpsCommand::Gc => starkv_ops::gc(&target),
    };
    match result {
        Ok(report) => {
            if args.json {
                println!("{report}");
            } else if !report.is_null() && report.get("answer").is_none() {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}
