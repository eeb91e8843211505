//! Llama-architecture models.

pub mod config;
pub mod kv;
pub mod llama;

pub use config::LlamaConfig;
pub use kv::{KvCache, KvPrecision, LayerKv};
pub use llama::{LayerAttention, LayerWeights, Llama};

#[cfg(test)]
mod tests;
