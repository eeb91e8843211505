//! The Llama model: weights and the forward pass, in one readable file.
//!
//! Block: `x += Wo · attn(rope(Wq · n1(x)), rope(Wk · n1(x)), Wv · n1(x))`, then
//! `x += Wdown · (silu(Wgate · n2(x)) * Wup · n2(x))`; a final RMSNorm and the LM head
//! (tied to the token embedding when `output.weight` is absent, as in SmolLM2).
//!
//! Attention is delegated to a [`LayerAttention`] so that the same forward pass serves
//! plain causal decoding with a KV cache, Star Attention's blockwise phase 1 and its
//! sharded phase 2: the model computes Q, K and V and never decides which keys they meet.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::LlamaConfig;
use crate::cpu::attention::HeadShape;
use crate::cpu::matmul::{Matrix, matmul_t_many};
use crate::cpu::ops::{Rope, add_rows, rms_norm_rows, swiglu_rows};
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, SharedBytes};
use crate::quant::{GgmlType, encode_float};

/// Decides which keys a layer's new tokens attend to.
pub trait LayerAttention: Send {
    /// Attention of `m` new tokens at layer `layer`. `q` is `[m][n_heads * head_dim]`,
    /// `k` and `v` are `[m][n_kv_heads * head_dim]` (K already rotated to the tokens'
    /// positions); the result goes to `out`, `[m][n_heads * head_dim]`. Fails when a
    /// part of the keys cannot be attended (a shard of a cluster is gone).
    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<()>;

    /// Whether the forward pass should stop before its next layer (the caller cancelled:
    /// see [`crate::cancel::Cancel`]); it then fails with [`Error::Cancelled`].
    fn cancelled(&self) -> bool {
        false
    }

    /// Whether `attend` only computes, here and on the rayon pool, and never waits for
    /// another thread, process or device. The forward pass then runs on a pool thread, so
    /// each of its parallel loops (five per layer) forks and joins inside the pool
    /// instead of handing its work to the pool and sleeping until it is done: two thread
    /// wake-ups per loop, which at 16 threads cost a decode step more than its products.
    /// An `attend` that waits must answer `false` (the default): on a pool thread it could
    /// wait for work queued behind itself (see [`crate::star::PendingPartial::arriving`]).
    fn computes_only(&self) -> bool {
        false
    }
}

/// One block's weights, borrowed (see [`Llama::layer_weights`]).
pub struct LayerWeights<'a> {
    pub attn_norm: &'a [f32],
    pub wq: &'a Matrix,
    pub wk: &'a Matrix,
    pub wv: &'a Matrix,
    pub wo: &'a Matrix,
    pub ffn_norm: &'a [f32],
    pub w_gate: &'a Matrix,
    pub w_up: &'a Matrix,
    pub w_down: &'a Matrix,
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    ffn_norm: Vec<f32>,
    w_gate: Matrix,
    w_up: Matrix,
    w_down: Matrix,
}

/// A loaded llama-architecture model.
pub struct Llama {
    config: LlamaConfig,
    embed: Matrix,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    output: Matrix,
    rope: Rope,
}

impl Llama {
    /// Loads the weights of `file` (kept in their file encoding, see [`Matrix`]).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let config = LlamaConfig::from_gguf(file)?;
        let c = &config;
        if file.has_tensor("blk.0.attn_q.bias") {
            return Err(Error::Unsupported(
                "attention biases (not a plain llama model)".into(),
            ));
        }
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Matrix> {
            let (info, bytes) = file.tensor_bytes(name)?;
            if info.dims != [cols, rows] {
                return Err(Error::Tensor {
                    name: name.into(),
                    reason: format!("shape {:?}, expected [{cols}, {rows}]", info.dims),
                });
            }
            Ok(Matrix::new(info.dtype, rows, cols, bytes))
        };
        let vector = |name: &str, len: usize| -> Result<Vec<f32>> {
            let (info, bytes) = file.tensor_bytes(name)?;
            if info.dims != [len] {
                return Err(Error::Tensor {
                    name: name.into(),
                    reason: format!("shape {:?}, expected [{len}]", info.dims),
                });
            }
            let mut out = vec![0f32; len];
            Matrix::new(info.dtype, 1, len, bytes).row_into(0, &mut out);
            Ok(out)
        };
        let (q_w, kv_w) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let p = |t: &str| format!("blk.{i}.{t}.weight");
            layers.push(Layer {
                attn_norm: vector(&p("attn_norm"), c.hidden)?,
                wq: matrix(&p("attn_q"), q_w, c.hidden)?,
                wk: matrix(&p("attn_k"), kv_w, c.hidden)?,
                wv: matrix(&p("attn_v"), kv_w, c.hidden)?,
                wo: matrix(&p("attn_output"), c.hidden, q_w)?,
                ffn_norm: vector(&p("ffn_norm"), c.hidden)?,
                w_gate: matrix(&p("ffn_gate"), c.ffn, c.hidden)?,
                w_up: matrix(&p("ffn_up"), c.ffn, c.hidden)?,
                w_down: matrix(&p("ffn_down"), c.hidden, c.ffn)?,
            });
        }
        let embed = matrix("token_embd.weight", c.vocab, c.hidden)?;
        let output = if file.has_tensor("output.weight") {
            matrix("output.weight", c.vocab, c.hidden)?
        } else {
            embed.clone()
        };
        let freq_factors = if file.has_tensor("rope_freqs.weight") {
            Some(vector("rope_freqs.weight", c.rope_dim / 2)?)
        } else {
            None
        };
        let rope = Rope::new(c.rope_theta, c.rope_dim, freq_factors.as_deref());
        Ok(Self {
            output_norm: vector("output_norm.weight", c.hidden)?,
            config,
            embed,
            layers,
            output,
            rope,
        })
    }

    /// A model of any llama shape with random weights stored as `dtype` (a float type),
    /// for tests and for benchmarks at scale: speed does not depend on weight values.
    /// Weights are drawn uniformly with a fan-in scale so activations stay in range.
    pub fn random(config: LlamaConfig, dtype: GgmlType, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let c = &config;
        let mut matrix = |rows: usize, cols: usize| {
            let bound = (3.0 / cols as f32).sqrt();
            let values: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let bytes = encode_float(dtype, &values).expect("random models use float weight types");
            Matrix::new(dtype, rows, cols, SharedBytes::from_vec(bytes))
        };
        let (q_w, kv_w) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let layers = (0..c.n_layers)
            .map(|_| Layer {
                attn_norm: vec![1.0; c.hidden],
                wq: matrix(q_w, c.hidden),
                wk: matrix(kv_w, c.hidden),
                wv: matrix(kv_w, c.hidden),
                wo: matrix(c.hidden, q_w),
                ffn_norm: vec![1.0; c.hidden],
                w_gate: matrix(c.ffn, c.hidden),
                w_up: matrix(c.ffn, c.hidden),
                w_down: matrix(c.hidden, c.ffn),
            })
            .collect();
        let embed = matrix(c.vocab, c.hidden);
        let output = matrix(c.vocab, c.hidden);
        let mut norm_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let output_norm = (0..c.hidden)
            .map(|_| norm_rng.random_range(0.5..1.5))
            .collect();
        let rope = Rope::new(c.rope_theta, c.rope_dim, None);
        Self {
            config,
            embed,
            layers,
            output_norm,
            output,
            rope,
        }
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Borrowed weights of block `i`, for other backends to upload.
    pub fn layer_weights(&self, i: usize) -> LayerWeights<'_> {
        let l = &self.layers[i];
        LayerWeights {
            attn_norm: &l.attn_norm,
            wq: &l.wq,
            wk: &l.wk,
            wv: &l.wv,
            wo: &l.wo,
            ffn_norm: &l.ffn_norm,
            w_gate: &l.w_gate,
            w_up: &l.w_up,
            w_down: &l.w_down,
        }
    }

    /// Token embedding `[vocab][hidden]`.
    pub fn embedding(&self) -> &Matrix {
        &self.embed
    }

    /// LM head `[vocab][hidden]` (the embedding itself when tied).
    pub fn output(&self) -> &Matrix {
        &self.output
    }

    pub fn output_norm(&self) -> &[f32] {
        &self.output_norm
    }

    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    pub fn head_shape(&self) -> HeadShape {
        HeadShape {
            n_heads: self.config.n_heads,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Runs `tokens` (at `positions`) through every block and the final norm; returns the
    /// normalised hidden states `[m][hidden]`. `attention` decides what the tokens see.
    pub fn forward(
        &self,
        tokens: &[u32],
        positions: &[usize],
        attention: &mut dyn LayerAttention,
    ) -> Result<Vec<f32>> {
        if attention.computes_only() {
            on_pool(|| self.forward_here(tokens, positions, attention))
        } else {
            self.forward_here(tokens, positions, attention)
        }
    }

    /// [`Llama::forward`] on the calling thread.
    fn forward_here(
        &self,
        tokens: &[u32],
        positions: &[usize],
        attention: &mut dyn LayerAttention,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let m = tokens.len();
        if positions.len() != m {
            return Err(Error::InvalidInput(format!(
                "{m} tokens but {} positions",
                positions.len()
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary ({})",
                c.vocab
            )));
        }
        let (h, qw, kvw) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let mut x = vec![0f32; m * h];
        for (row, &t) in x.chunks_exact_mut(h).zip(tokens) {
            self.embed.row_into(t as usize, row);
        }
        let (cos, sin) = self.rope.tables(positions);
        let mut xn = vec![0f32; m * h];
        let (mut q, mut k, mut v) = (vec![0f32; m * qw], vec![0f32; m * kvw], vec![0f32; m * kvw]);
        let mut attn = vec![0f32; m * qw];
        let mut proj = vec![0f32; m * h];
        let (mut gate, mut up) = (vec![0f32; m * c.ffn], vec![0f32; m * c.ffn]);
        for (li, layer) in self.layers.iter().enumerate() {
            if attention.cancelled() {
                return Err(Error::Cancelled);
            }
            rms_norm_rows(&x, &layer.attn_norm, c.rms_eps, &mut xn);
            matmul_t_many(
                &mut [
                    (&layer.wq, &mut q),
                    (&layer.wk, &mut k),
                    (&layer.wv, &mut v),
                ],
                &xn,
                m,
            );
            self.rope.apply(&mut q, c.n_heads, c.head_dim, &cos, &sin);
            self.rope
                .apply(&mut k, c.n_kv_heads, c.head_dim, &cos, &sin);
            attention.attend(li, &q, &k, &v, m, &mut attn)?;
            layer.wo.matmul_t(&attn, m, &mut proj);
            add_rows(&mut x, &proj, h);
            rms_norm_rows(&x, &layer.ffn_norm, c.rms_eps, &mut xn);
            matmul_t_many(
                &mut [(&layer.w_gate, &mut gate), (&layer.w_up, &mut up)],
                &xn,
                m,
            );
            swiglu_rows(&mut gate, &up, c.ffn);
            layer.w_down.matmul_t(&gate, m, &mut proj);
            add_rows(&mut x, &proj, h);
        }
        rms_norm_rows(&x.clone(), &self.output_norm, c.rms_eps, &mut x);
        Ok(x)
    }

    /// LM head: logits `[rows][vocab]` for normalised hidden states `[rows][hidden]`.
    pub fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        let rows = hidden.len() / self.config.hidden;
        let mut out = vec![0f32; rows * self.config.vocab];
        on_pool(|| self.output.matmul_t(hidden, rows, &mut out));
        out
    }

    /// Dequantised weights for the float64 reference in tests.
    #[cfg(test)]
    pub(crate) fn dense_weights(&self) -> DenseWeights {
        let dense = |m: &Matrix| {
            let mut out = vec![0f32; m.rows() * m.cols()];
            for (r, row) in out.chunks_exact_mut(m.cols()).enumerate() {
                m.row_into(r, row);
            }
            out
        };
        DenseWeights {
            embed: dense(&self.embed),
            output: dense(&self.output),
            output_norm: self.output_norm.clone(),
            layers: self
                .layers
                .iter()
                .map(|l| {
                    [
                        l.attn_norm.clone(),
                        dense(&l.wq),
                        dense(&l.wk),
                        dense(&l.wv),
                        dense(&l.wo),
                        l.ffn_norm.clone(),
                        dense(&l.w_gate),
                        dense(&l.w_up),
                        dense(&l.w_down),
                    ]
                })
                .collect(),
        }
    }
}

#[cfg(test)]
pub(crate) struct DenseWeights {
    pub embed: Vec<f32>,
    pub output: Vec<f32>,
    pub output_norm: Vec<f32>,
    /// attn_norm, wq, wk, wv, wo, ffn_norm, gate, up, down.
    pub layers: Vec<[Vec<f32>; 9]>,
}

/// Runs `f` on a thread of the global rayon pool (directly when already on one).
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let mut result = None;
    rayon::scope(|_| result = Some(f()));
    result.expect("the scope ran the closure")
}
