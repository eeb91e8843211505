//! `starkv completions SHELL` and `starkv man`: generated from the clap definitions at
//! run time, so they always list exactly the commands and flags this binary has.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};

use super::Cli;

#[derive(Args)]
#[command(after_help = "\
Examples:
  source <(starkv completions bash)                       # this bash session
  starkv completions bash > ~/.local/share/bash-completion/completions/starkv
  starkv completions zsh > \"${fpath[1]}/_starkv\"
  starkv completions fish > ~/.config/fish/completions/starkv.fish")]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(Args)]
#[command(after_help = "\
Examples:
  starkv man | man -l -
  starkv man --out-dir /usr/local/share/man/man1          # starkv.1, starkv-ingest.1, ...")]
pub struct ManArgs {
    /// Write starkv.1 and one page per command (starkv-serve.1, ...) into this directory
    /// instead of printing starkv.1.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

pub fn completions(args: CompletionsArgs) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    clap_complete::generate(args.shell, &mut Cli::command(), "starkv", &mut out);
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

pub fn man(args: ManArgs) -> Result<ExitCode> {
    let command = Cli::command();
    match args.out_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(command, &dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))?;
        }
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(command).render(&mut out)?;
            out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
