//! `starkv selftest --device cuda[:N]`: checks the CUDA backend against the CPU reference
//! on fresh random inputs (the seed is printed; `--seed` repeats a run) and prints a
//! PASS/FAIL table (see `starkv_compute::cuda_selftest` for the checks and tolerances).
//! Exit code 0 when every check passes, 1 when one fails, 2 when the device cannot be
//! used (no driver, no GPU, no NVRTC/cuBLAS): never a panic.

use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use clap::Args;

use starkv_compute::cuda::{DeviceChoice, Gpu, HalfType, Selected, select_device};
use starkv_compute::cuda_selftest::{PROMPT, SelftestOptions, print_table, run as run_checks};

use super::GlobalArgs;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DType {
    Bf16,
    F16,
}

#[derive(Args)]
pub struct SelftestArgs {
    /// The backend to check: `cuda`, `cuda:N` (or `auto`: the GPU when there is one).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// The 16-bit type of weights, activations and KV on the GPU.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DType,
    /// Seed of the random inputs (default: from the clock, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Skip the checks on the default (or --model) model (whole-model logits, backend).
    #[arg(long)]
    skip_model: bool,
    /// Skip the random Llama-3.1-8B-shaped 4-layer model (needs ~12 GB of host memory).
    #[arg(long)]
    skip_8b: bool,
}

pub fn run(global: &GlobalArgs, args: SelftestArgs) -> Result<ExitCode> {
    let choice: DeviceChoice = args.device.parse().map_err(|e: String| anyhow!(e))?;
    let ordinal = match select_device(choice) {
        Ok(Selected::Cuda { device }) => {
            println!("starkv selftest on {device}");
            device.ordinal
        }
        Ok(Selected::Cpu { reason }) => {
            eprintln!(
                "starkv selftest: no GPU to check ({reason}); the CPU backend is the reference and is covered by `cargo test`"
            );
            return Ok(ExitCode::from(2));
        }
        Err(e) => {
            eprintln!("starkv selftest: the CUDA backend cannot run on this machine: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let dtype = match args.dtype {
        DType::Bf16 => HalfType::BF16,
        DType::F16 => HalfType::F16,
    };
    let gpu = Gpu::new(ordinal, dtype).context("opening the GPU")?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let loaded = if args.skip_model {
        None
    } else {
        Some(global.load_model()?)
    };
    let model = match &loaded {
        Some(l) => Some((
            "default model (SmolLM2-135M)",
            &l.model,
            l.tokenizer.encode(PROMPT, false)?,
        )),
        None => None,
    };
    let rows = run_checks(
        &gpu,
        SelftestOptions {
            seed,
            model,
            big_model: !args.skip_8b,
            loaded: loaded.as_ref(),
        },
    );
    Ok(if print_table(&rows, &gpu, seed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
