//! How a document and a question become context and query tokens.
//!
//! As in the paper, the chat template's head (system message, start of the user turn) and
//! the document form the context; the question, the end of the user turn and the
//! assistant header form the query. Documents and questions are user text: special-token
//! markers inside them stay text. The CLI, the service and the benchmarks all build
//! prompts here, so a document ingested by the service is the context a query expects.

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

fn template_parts(tokenizer: &Tokenizer, system: Option<&str>) -> Result<(String, String)> {
    let template = tokenizer.chat_template().ok_or_else(|| {
        Error::Unsupported(
            "the model has no ChatML chat template, so documents cannot be framed as a chat".into(),
        )
    })?;
    Ok(template.user_turn(system))
}

/// Context tokens: the chat head followed by the document.
pub fn document_context(
    tokenizer: &Tokenizer,
    system: Option<&str>,
    document: &str,
) -> Result<Vec<u32>> {
    let (head, _) = template_parts(tokenizer, system)?;
    let mut ids = tokenizer.encode(&head, true)?;
    ids.extend(tokenizer.encode(document, false)?);
    Ok(ids)
}

/// Query tokens: a blank line, the question, the end of the user turn, the assistant header.
pub fn question_query(tokenizer: &Tokenizer, question: &str) -> Result<Vec<u32>> {
    let (_, tail) = template_parts(tokenizer, None)?;
    let mut ids = tokenizer.encode(&format!("\n\n{question}"), false)?;
    ids.extend(tokenizer.encode(&tail, true)?);
    Ok(ids)
}
