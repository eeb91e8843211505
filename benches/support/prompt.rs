//! Model loading and prompt construction shared by the Star Attention benchmarks.
//!
//! Prompts come from `starkv_compute::prompt`, the code `starkv generate --document F
//! --question Q` and the service use, so that benchmark numbers describe the product and
//! not a friendlier variant of it: the chat template's head and the document form the
//! context (the system prompt and the start of the user turn sit in the anchor), and a
//! blank line, the question, the end of the user turn and the assistant header form the
//! query.

use anyhow::{Context, Result};
use starkv_compute::fetch::{default_data_dir, ensure_default_model};
use starkv_compute::tokenizer::Tokenizer;
use starkv_compute::{LoadedModel, prompt};

/// Opens the default model (SmolLM2-135M-Instruct Q4_1), fetching it on first use.
pub fn load_default_model() -> Result<LoadedModel> {
    let path = ensure_default_model(&default_data_dir(), &mut |m| eprintln!("{m}"))?;
    LoadedModel::open(&path).with_context(|| format!("opening {}", path.display()))
}

/// Tokens the context takes before the document (the template's default system prompt
/// and the user header), to size documents to a target context length.
pub fn context_head_len(tokenizer: &Tokenizer) -> Result<usize> {
    Ok(prompt::document_context(tokenizer, None, "")?.len())
}

/// Context ids for a document, with the template's default system prompt.
pub fn context_ids(tokenizer: &Tokenizer, document: &str) -> Result<Vec<u32>> {
    Ok(prompt::document_context(tokenizer, None, document)?)
}

/// Query ids for a question.
pub fn query_ids(tokenizer: &Tokenizer, question: &str) -> Result<Vec<u32>> {
    Ok(prompt::question_query(tokenizer, question)?)
}
