//! `starkv`: the one user-facing binary. This file only defines the command line and
//! maps results to exit codes; the work lives in the library crates.

mod commands;

use std::process::ExitCode;

use clap::Parser;

use commands::Cli;

fn main() -> ExitCode {
    // Before any thread allocates: stored layers' read buffers are reused, not faulted in.
    starkv_service::allocator::keep_large_buffers();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STARKV_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match commands::run(cli) {
        Ok(code) => code,
        Err(err) => {
            // A closed pipe (`starkv ... | head`) is not an error worth reporting.
            if err.chain().any(|e| {
                e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
