//! starkv's model runtime: GGUF files, the tokenizer, the Llama forward pass, the
//! attention-with-log-sum-exp kernel Star Attention is built on, and sampling.
//!
//! Key decisions:
//! - Weights stay in their GGUF encoding inside the memory map and are dequantised in
//!   small per-thread tiles right before each matrix product ([`cpu::matmul`]).
//! - Attention always returns the output together with its log-sum-exp, so that results
//!   over disjoint key sets (cached blocks, shards, the query's own tokens) merge exactly.
//! - One [`backend::Backend`] runs the model on the device `--device` chose (the CPU, or
//!   a GPU through [`cuda`]), so the service and the command line never branch on it.
//! - This crate knows nothing about storage or HTTP.

pub mod backend;
pub mod cancel;
pub mod cold_split;
pub mod cpu;
pub mod cuda;
#[cfg(feature = "selftest")]
pub mod cuda_selftest;
pub mod error;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod kv8;
pub mod model;
pub mod partial;
pub mod prompt;
pub mod quant;
pub mod sampling;
pub mod star;
pub mod tokenizer;

pub use error::{Error, Result};

use std::path::Path;

/// A model file loaded for inference: weights and tokenizer.
pub struct LoadedModel {
    pub model: model::Llama,
    pub tokenizer: tokenizer::Tokenizer,
}

impl LoadedModel {
    /// Opens a llama-architecture GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = gguf::GgufFile::open(path)?;
        Ok(Self {
            model: model::Llama::from_gguf(&file)?,
            tokenizer: tokenizer::Tokenizer::from_gguf(&file)?,
        })
    }
}
