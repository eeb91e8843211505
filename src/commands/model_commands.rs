//! `tokenize`, `generate` and `score`: the model commands. Each prints, with `--json`,
//! one JSON object on the last line of stdout (a stable interface for scripts).
//! `generate` runs on the device `--device` picks (through `starkv_compute::backend`) and
//! says which on stderr; `score` and `dump-kv` stay on the CPU (reference outputs).

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use starkv_compute::backend::Backend;
use starkv_compute::cuda::DeviceChoice;
use starkv_compute::generate::GenerateParams;
use starkv_compute::model::KvCache;
use starkv_compute::sampling::{SamplingParams, argmax, log_prob};
use starkv_compute::star::{Phase1, StarConfig};
use starkv_compute::{LoadedModel, prompt};

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

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttentionMode {
    /// Plain causal attention over the whole prompt.
    Full,
    /// Star Attention: the context in blocks with an anchor, then the query over all blocks.
    Star,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// The exact prompt text (special markers parsed).
    #[arg(long, conflicts_with_all = ["chat", "document"], required_unless_present_any = ["chat", "document"])]
    raw: Option<String>,
    /// A user message, wrapped in the model's chat template.
    #[arg(long, conflicts_with = "document")]
    chat: Option<String>,
    /// A document file: the chat head and the document form the context...
    #[arg(long, requires = "question")]
    document: Option<std::path::PathBuf>,
    /// ...and the question, the end of the user turn and the assistant header the query.
    #[arg(long, requires = "document")]
    question: Option<String>,
    /// How the context is attended (default: star with --document, full otherwise).
    #[arg(long, value_enum)]
    attention: Option<AttentionMode>,
    /// Star Attention block size in tokens.
    #[arg(long, default_value_t = 2048)]
    block_size: usize,
    /// Star Attention anchor size in tokens (default: whole blocks covering a quarter of
    /// the document, one block for documents of up to 4 blocks).
    #[arg(long)]
    anchor_size: Option<usize>,
    /// Tokens before each block (after the anchor) encoded in front of it and dropped,
    /// as the service's `block_overlap` (0: the paper's phase 1).
    #[arg(long, default_value_t = starkv_compute::star::DEFAULT_OVERLAP)]
    block_overlap: usize,
    /// System message for --chat (default: the template's own).
    #[arg(long)]
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
    /// Where the model runs: auto (the GPU when CUDA loads, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
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
    let (context_ids, query_ids) = prompt_tokens(&loaded, &args)?;
    let attention = args.attention.unwrap_or(if args.document.is_some() {
        AttentionMode::Star
    } else {
        AttentionMode::Full
    });
    if attention == AttentionMode::Star && args.document.is_none() {
        bail!("--attention star needs the --document FILE --question TEXT form");
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
        cancel: Default::default(),
        merge: Default::default(),
        logprobs: None,
    };
    params.sampling.validate()?;
    let backend = Backend::new(&loaded.model, args.device, None)?;
    eprintln!("starkv: device {}", backend.selected());
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let mut on_text = |piece: &str| {
        if args.json {
            return true;
        }
        match stdout
            .write_all(piece.as_bytes())
            .and_then(|_| stdout.flush())
        {
            Ok(()) => true,
            Err(e) => {
                write_error = Some(e);
                false
            }
        }
    };
    let generation = match attention {
        AttentionMode::Full => {
            let prompt: Vec<u32> = context_ids.iter().chain(&query_ids).copied().collect();
            backend.generate_plain(&loaded, &prompt, &params, &mut on_text)?
        }
        AttentionMode::Star => {
            let config = match args.anchor_size {
                Some(anchor_size) => StarConfig::with_anchor(args.block_size, anchor_size),
                None => StarConfig::with_default_anchor(args.block_size, context_ids.len()),
            }
            .with_overlap(args.block_overlap);
            let answer = backend.answer_document(
                &loaded,
                &context_ids,
                config,
                &query_ids,
                &params,
                &mut on_text,
            )?;
            eprintln!(
                "starkv: phase 1 encoded {} context tokens in {} blocks in {:.2}s",
                context_ids.len(),
                answer.n_blocks,
                answer.phase1.as_secs_f64()
            );
            answer.generation
        }
    };
    if let Some(e) = write_error {
        return Err(e.into());
    }
    let prompt_ids: Vec<u32> = context_ids.iter().chain(&query_ids).copied().collect();
    let mut stdout = std::io::stdout().lock();
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
            "starkv: {} prompt tokens, first token after {:.2}s, {n} generated in {:.2}s ({:.1} tok/s), stop: {:?}",
            prompt_ids.len(),
            generation.prefill.as_secs_f64(),
            generation.decode.as_secs_f64(),
            n.saturating_sub(1) as f64 / generation.decode.as_secs_f64().max(1e-9),
            generation.stop_reason,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `(context, query)` token ids. With --raw or --chat the whole prompt is the query (the
/// context is empty); with --document the chat head and the document are the context and
/// the question, the end of the user turn and the assistant header are the query.
fn prompt_tokens(loaded: &LoadedModel, args: &GenerateArgs) -> Result<(Vec<u32>, Vec<u32>)> {
    let tokenizer = &loaded.tokenizer;
    let template = || {
        tokenizer.chat_template().ok_or_else(|| {
            anyhow::anyhow!(
                "this model has no ChatML chat template; use --raw with the exact prompt"
            )
        })
    };
    let (context, query) = match (&args.raw, &args.chat, &args.document, &args.question) {
        (Some(raw), ..) => (Vec::new(), tokenizer.encode(raw, true)?),
        (None, Some(message), ..) => (
            Vec::new(),
            tokenizer.encode(&template()?.render(args.system.as_deref(), message), true)?,
        ),
        (None, None, Some(path), Some(question)) => {
            let document = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let context = prompt::document_context(tokenizer, args.system.as_deref(), &document)?;
            (context, prompt::question_query(tokenizer, question)?)
        }
        _ => bail!("give --raw PROMPT, --chat MESSAGE, or --document FILE --question TEXT"),
    };
    if context.len() + query.len() == 0 {
        bail!("the prompt is empty");
    }
    Ok((context, query))
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

#[derive(Args)]
pub struct DumpKvArgs {
    /// Text file to encode (its chat-framed context, as the service ingests it).
    #[arg(long)]
    document: std::path::PathBuf,
    #[arg(long, default_value_t = 2048)]
    block_size: usize,
    /// Output folder: one `block-N.f32` (little-endian, `[layer][k|v][kv_head][token][head_dim]`)
    /// and `block-N.txt` (shape) per block, the format `benches/cache_store.rs --kv-dir` reads.
    #[arg(long)]
    out: std::path::PathBuf,
}

/// Writes real phase-1 KV blocks of a document, for the store benchmark.
pub fn dump_kv(global: &GlobalArgs, args: DumpKvArgs) -> Result<ExitCode> {
    let loaded = global.load_model()?;
    let text = std::fs::read_to_string(&args.document)
        .with_context(|| format!("reading {}", args.document.display()))?;
    let context = prompt::document_context(&loaded.tokenizer, None, &text)?;
    let blocks =
        Phase1::new(&loaded.model, &context, StarConfig::new(args.block_size))?.encode_all()?;
    std::fs::create_dir_all(&args.out)?;
    for (i, block) in blocks.iter().enumerate() {
        let mut bytes = Vec::with_capacity(block.n_bytes());
        for (k, v) in &block.layers {
            for x in k.iter().chain(v) {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        std::fs::write(args.out.join(format!("block-{i}.f32")), bytes)?;
        let s = block.shape;
        let shape = format!(
            "layers={}\nkv_heads={}\ntokens={}\nhead_dim={}\n",
            block.layers.len(),
            s.n_kv_heads,
            block.len,
            s.head_dim
        );
        std::fs::write(args.out.join(format!("block-{i}.txt")), shape)?;
    }
    eprintln!(
        "starkv: wrote {} blocks of {} context tokens to {}",
        blocks.len(),
        context.len(),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
