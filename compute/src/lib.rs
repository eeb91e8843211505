//! starkv's model runtime: GGUF files, the tokenizer, the Llama forward pass, the
//! attention-with-log-sum-exp kernel Star Attention is built on, and sampling.
//!
//! Key decisions:
//! - Weights stay in their GGUF encoding inside the memory map and are dequantised in
//!   small per-thread tiles right before each matrix product ([`cpu::matmul`]).
//! - Attention always returns the output together with its log-sum-exp, so that results
//!   over disjoint key sets (cached blocks, shards, the query's own tokens) merge exactly.
//! - This crate knows nothing about storage or HTTP.

pub mod cpu;
pub mod error;
pub mod gguf;
pub mod model;
pub mod quant;

pub use error::{Error, Result};
