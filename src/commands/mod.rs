//! Command-line definition and dispatch.

mod model_commands;
mod ops_commands;
mod selftest;
mod serve;
mod shell;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use starkv_compute::LoadedModel;
use starkv_compute::fetch::{default_data_dir, ensure_default_model};

#[derive(Parser)]
#[command(
    name = "starkv",
    version,
    about = "Star Attention long-document KV-cache service",
    after_help = TOP_LEVEL_HELP
)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(flatten)]
    ops: ops_commands::OpsArgs,
    #[command(subcommand)]
    command: Command,
}

const TOP_LEVEL_HELP: &str = "\
Quick start:
  starkv serve &                                 # 127.0.0.1:8700, default model, ~/.local/share/starkv
  export STARKV_SERVER=http://127.0.0.1:8700
  starkv ingest report.txt --id report
  starkv ask report \"What is the magic number?\"
  starkv ls

Operator commands print tables for people and one JSON line with --json.
Exit codes: 0 success, 1 error, 2 usage error, 3 not found, 4 corrupt data found,
5 server unreachable.";

#[derive(Args)]
struct GlobalArgs {
    /// A llama-architecture GGUF file (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long, global = true, env = "STARKV_MODEL")]
    model: Option<PathBuf>,
    /// Where models and the store live (default: $XDG_DATA_HOME/starkv or ~/.local/share/starkv).
    #[arg(long, global = true, env = "STARKV_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true, env = "STARKV_THREADS")]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the token ids of TEXT.
    Tokenize(model_commands::TokenizeArgs),
    /// Generate text after a prompt.
    Generate(model_commands::GenerateArgs),
    /// Teacher-forced log-probabilities of every token of TEXT.
    Score(model_commands::ScoreArgs),
    /// Write real phase-1 KV blocks of a document to files (store benchmark input).
    #[command(hide = true)]
    DumpKv(model_commands::DumpKvArgs),
    /// Run the HTTP service (with `--workers`: the coordinator of shard workers).
    #[command(after_help = serve::EXAMPLES)]
    Serve(serve::ServeArgs),
    /// Run a shard worker: one device and its own store, serving a coordinator.
    Worker(worker::WorkerArgs),
    /// Operator commands (ingest, ask, ls, show, stats, rm, pin, unpin, ttl, evict, verify, gc).
    #[command(flatten)]
    Ops(ops_commands::OpsCommand),
    /// Check a compute backend against the CPU reference (e.g. `--device cuda`).
    Selftest(selftest::SelftestArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(shell::CompletionsArgs),
    /// Print the man page (roff), or write one page per command with --out-dir.
    Man(shell::ManArgs),
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    if let Some(n) = cli.global.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("configuring the thread pool")?;
    }
    match cli.command {
        Command::Tokenize(args) => model_commands::tokenize(&cli.global, args),
        Command::Generate(args) => model_commands::generate(&cli.global, args),
        Command::Score(args) => model_commands::score(&cli.global, args),
        Command::Selftest(args) => selftest::run(&cli.global, args),
        Command::Serve(args) => serve::run(&cli.global, args),
        Command::Worker(args) => worker::run(&cli.global, args),
        Command::DumpKv(args) => model_commands::dump_kv(&cli.global, args),
        Command::Ops(command) => ops_commands::run(&cli.global, cli.ops, command),
        Command::Completions(args) => shell::completions(args),
        Command::Man(args) => shell::man(args),
    }
}

impl GlobalArgs {
    pub(crate) fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }

    /// `--model`, or the default model's path (fetching it first when absent).
    pub(crate) fn model_path(&self) -> Result<PathBuf> {
        match &self.model {
            Some(path) => Ok(path.clone()),
            None => Ok(ensure_default_model(&self.data_dir(), &mut |msg| {
                eprintln!("starkv: {msg}")
            })?),
        }
    }

    /// Loads `--model`, or the default model (fetching it first when absent).
    pub(crate) fn load_model(&self) -> Result<LoadedModel> {
        let path = match &self.model {
            Some(path) => path.clone(),
            None => ensure_default_model(&self.data_dir(), &mut |msg| eprintln!("starkv: {msg}"))?,
        };
        LoadedModel::open(&path).with_context(|| format!("loading model {}", path.display()))
    }
}
