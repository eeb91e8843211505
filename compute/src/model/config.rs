//! Llama hyper-parameters, read from GGUF metadata.

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// The shape of a llama-architecture model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    /// Dimensions of each head that RoPE rotates (the first `rope_dim`).
    pub rope_dim: usize,
    pub rms_eps: f32,
    /// Training context length; longer sequences are allowed but flagged by callers.
    pub context_length: usize,
}

impl LlamaConfig {
    /// SmolLM2-135M's shape (the default model).
    pub fn smollm2_135m() -> Self {
        Self {
            n_layers: 30,
            hidden: 576,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            ffn: 1536,
            vocab: 49152,
            rope_theta: 100_000.0,
            rope_dim: 64,
            rms_eps: 1e-5,
            context_length: 8192,
        }
    }

    /// A tiny shape (3 layers, GQA 4/2, head_dim 16) for unit tests on random weights.
    #[cfg(test)]
    pub(crate) fn tiny_for_tests() -> Self {
        Self {
            n_layers: 3,
            hidden: 64,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            ffn: 96,
            vocab: 300,
            rope_theta: 10_000.0,
            rope_dim: 16,
            rms_eps: 1e-5,
            context_length: 1024,
        }
    }

    /// Llama-3.1-8B's shape, for benchmarks on random weights.
    pub fn llama31_8b() -> Self {
        Self {
            n_layers: 32,
            hidden: 4096,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            ffn: 14336,
            vocab: 128_256,
            rope_theta: 500_000.0,
            rope_dim: 128,
            rms_eps: 1e-5,
            context_length: 131_072,
        }
    }

    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(Error::Unsupported(format!(
                "architecture `{arch}` (starkv runs llama-architecture models only)"
            )));
        }
        let get =
            |key: &str| -> Result<usize> { Ok(file.get_u64(&format!("llama.{key}"))? as usize) };
        let hidden = get("embedding_length")?;
        let n_heads = get("attention.head_count")?;
        let n_kv_heads = match file.get("llama.attention.head_count_kv") {
            Some(_) => get("attention.head_count_kv")?,
            None => n_heads,
        };
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 || hidden % n_heads != 0 {
            return Err(Error::Unsupported(format!(
                "head layout: {n_heads} heads, {n_kv_heads} KV heads, hidden {hidden}"
            )));
        }
        let head_dim = match file.get("llama.attention.key_length") {
            Some(_) => get("attention.key_length")?,
            None => hidden / n_heads,
        };
        let rope_dim = match file.get("llama.rope.dimension_count") {
            Some(_) => get("rope.dimension_count")?,
            None => head_dim,
        };
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(Error::Unsupported(format!(
                "rope dimension {rope_dim} with head_dim {head_dim}"
            )));
        }
        if let Some(scaling) = file.get("llama.rope.scaling.type").and_then(|v| v.as_str())
            && scaling != "none"
        {
            return Err(Error::Unsupported(format!("RoPE scaling `{scaling}`")));
        }
        let vocab = match file.get("llama.vocab_size") {
            Some(_) => get("vocab_size")?,
            None => file.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        Ok(Self {
            n_layers: get("block_count")?,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn: get("feed_forward_length")?,
            vocab,
            rope_theta: match file.get("llama.rope.freq_base") {
                Some(_) => file.get_f32("llama.rope.freq_base")?,
                None => 10_000.0,
            },
            rope_dim,
            rms_eps: file.get_f32("llama.attention.layer_norm_rms_epsilon")?,
            context_length: get("context_length")?,
        })
    }
}
