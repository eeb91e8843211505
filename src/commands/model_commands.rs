//! `tokenize`, `generate` and `score`: the model commands. Each prints, with `--json`,
//! one JSON object on the last line of stdout (a stable interface for scripts).

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;
use serde_json::json;

use starkv_compute::generate::{GenerateParams, generate as run_generation};
use starkv_compute::model::KvCache;
use starkv_compute::sampling::{SamplingParams, argmax, log_prob};

use super::GlobalArgs;

#[derive(Args)]
pub struct TokenizeArgs {
    /// Parse <|im_start|>-style markers as special tokens.
    #[arg(long)]
    special: bool,
    /// Print `{"ids": [...]}`.
    #[arg(long)]
    json: bool,
    text: String,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// The exact prompt text (special markers parsed).
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    raw: Option<String>,
    /// A user message, wrapped in the model's chat template.
    #[arg(long)]
    chat: Option<String>,
    /// System message for --chat (default: the template's own).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the answer contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Print `{"prompt_ids", "ids", "text"}` instead of streaming the text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ScoreArgs {
    /// The exact text to score (special markers parsed).
    #[arg(long)]
    raw: String,
    /// Print `{"ids", "target_logprob", "argmax", "mean_nll"}`.
    #[arg(long)]
    json: bool,
}

pub fn tokenize(global: &GlobalArgs, args: TokenizeArgs) -> Result<ExitCode> {
    let loaded = global.load_model()?;
    let ids = loaded.tokenizer.encode(&args.text, args.special)?;
    if args.json {
        println!("{}", json!({ "ids": ids }));
    } else {
        for id in &ids {
            let piece = String::from_utf8_lossy(loaded.tokenizer.token_bytes(*id));
            println!("{id}\t{piece:?}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn generate(global: &GlobalArgs, args: GenerateArgs) -> Result<ExitCode> {
    let loaded = global.load_model()?;
    let prompt_text = match (&args.raw, &args.chat) {
        (Some(raw), _) => raw.clone(),
        (None, Some(message)) => match loaded.tokenizer.chat_template() {
            Some(template) => template.render(args.system.as_deref(), message),
            None => {
                bail!("this model has no ChatML chat template; use --raw with the exact prompt")
            }
        },
        (None, None) => bail!("give --raw PROMPT or --chat MESSAGE"),
    };
    let prompt_ids = loaded.tokenizer.encode(&prompt_text, true)?;
    if prompt_ids.is_empty() {
        bail!("the prompt is empty");
    }
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop: args.stop.clone(),
    };
    let model = &loaded.model;
    let mut cache = KvCache::new(
        model.config().n_layers,
        model.head_shape(),
        prompt_ids.len() + args.max_tokens,
    );
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let generation = run_generation(
        model,
        &loaded.tokenizer,
        &prompt_ids,
        0,
        &mut cache,
        &params,
        &mut |piece| {
            if args.json {
                return true;
            }
            let res = stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush());
            match res {
                Ok(()) => true,
                Err(e) => {
                    write_error = Some(e);
                    false
                }
            }
        },
    )?;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    if args.json {
        writeln!(
            stdout,
            "{}",
            json!({ "prompt_ids": prompt_ids, "ids": generation.ids, "text": generation.text })
        )?;
    } else {
        writeln!(stdout)?;
        let n = generation.ids.len();
        eprintln!(
            "starkv: {} prompt tokens in {:.2}s ({:.1} tok/s), {n} generated in {:.2}s ({:.1} tok/s), stop: {:?}",
            prompt_ids.len(),
            generation.prefill.as_secs_f64(),
            prompt_ids.len() as f64 / generation.prefill.as_secs_f64(),
            generation.decode.as_secs_f64(),
            n.saturating_sub(1) as f64 / generation.decode.as_secs_f64().max(1e-9),
            generation.stop_reason,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Rows of logits computed at once (each row is a vocabulary of f32).
const SCORE_CHUNK: usize = 256;

pub fn score(global: &GlobalArgs, args: ScoreArgs) -> Result<ExitCode> {
    let loaded = global.load_model()?;
    let ids = loaded.tokenizer.encode(&args.raw, true)?;
    if ids.len() < 2 {
        bail!("scoring needs at least two tokens, got {}", ids.len());
    }
    let model = &loaded.model;
    let mut cache = KvCache::new(model.config().n_layers, model.head_shape(), ids.len());
    let positions: Vec<usize> = (0..ids.len()).collect();
    let hidden = model.forward(&ids, &positions, &mut cache)?;
    let (h, vocab) = (model.config().hidden, model.config().vocab);
    let mut target_logprob = Vec::with_capacity(ids.len() - 1);
    let mut argmaxes = Vec::with_capacity(ids.len());
    for start in (0..ids.len()).step_by(SCORE_CHUNK) {
        let end = (start + SCORE_CHUNK).min(ids.len());
        let logits = model.logits(&hidden[start * h..end * h]);
        for (row, i) in logits.chunks_exact(vocab).zip(start..end) {
            argmaxes.push(argmax(row));
            if let Some(&next) = ids.get(i + 1) {
                target_logprob.push(log_prob(row, next));
            }
        }
    }
    let mean_nll = -target_logprob.iter().sum::<f64>() / target_logprob.len() as f64;
    if args.json {
        println!(
            "{}",
            json!({ "ids": ids, "target_logprob": target_logprob, "argmax": argmaxes, "mean_nll": mean_nll })
        );
    } else {
        println!(
            "{} tokens, mean NLL {mean_nll:.4} nats, perplexity {:.3}",
            ids.len(),
            mean_nll.exp()
        );
    }
    Ok(ExitCode::SUCCESS)
}
