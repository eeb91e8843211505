//! The one error type of the compute crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
///
/// Variants carry the context a user needs to act (which file, which tensor, which key),
/// so that callers at the edge can print them as they are.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid GGUF file: {reason}")]
    Gguf { path: PathBuf, reason: String },
    #[error("GGUF metadata key `{key}`: {reason}")]
    Metadata { key: String, reason: String },
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("model fetch failed: {0}")]
    Fetch(String),
    /// The compute device (a GPU) cannot be used or failed; the message says which and why.
    #[error("device: {0}")]
    Device(String),
    /// A shard of context blocks (a GPU, a remote worker) could not answer a layer's
    /// query; `shard` names it. The query fails rather than merging fewer parts.
    #[error("shard {shard}: {reason}")]
    Shard { shard: String, reason: String },
    /// The caller cancelled the work (see [`crate::cancel::Cancel`]).
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
