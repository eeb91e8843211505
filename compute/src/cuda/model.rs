//! The Llama forward pass on one GPU, mirroring [`crate::model::Llama::forward`].
//!
//! Per block: RMSNorm (f32 residual in, 16-bit out) -> one fused QKV product (f32 out) ->
//! RoPE + split (rotated Q, K and V in 16-bit, K/V written straight to where the
//! attention implementation keeps them) -> attention -> output projection added to the
//! residual by cuBLAS (beta = 1) -> RMSNorm -> fused gate/up product -> SwiGLU -> down
//! projection added to the residual. Weights are uploaded once as f16/bf16. A one-token
//! step (decoding) instead runs four fused one-row products per block (`gemv.rs`: QKV
//! with its norm and RoPE, the output projection into the residual, gate/up with its norm
//! and SwiGLU, the down projection into the residual) around attention.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaGraph};

use super::attention::{AttnOut, KvDest, Segment, SegmentAttention};
use super::device::{DevBuf, Gpu, PinnedBuf};
use super::gemv::gemv_fits;
use super::kernels::Kernels;
use super::launch::argmax_scratch_bytes;
use super::{CudaError, Result};
use crate::cpu::matmul::Matrix;
use crate::model::{Llama, LlamaConfig};
use crate::partial::HeadShape;

/// Decides which keys a layer's new tokens attend to, on the GPU (the device
/// counterpart of [`crate::model::LayerAttention`]).
pub trait GpuAttention {
    /// Called once per forward pass before the first layer, for `m` new tokens.
    fn begin(&mut self, gpu: &Gpu, m: usize) -> Result<()>;
    /// Where layer `layer` writes the new tokens' rotated K and V.
    fn kv_dest(&mut self, layer: usize) -> KvDest;
    /// Attention of the rotated `q` (16-bit `[m][n_heads * head_dim]`) into `out` (same
    /// layout); the new K/V are already at [`GpuAttention::kv_dest`].
    fn attend(
        &mut self,
        gpu: &Gpu,
        kernels: &Kernels,
        layer: usize,
        q: u64,
        m: usize,
        out: u64,
    ) -> Result<()>;
    /// Called after the last layer.
    fn finish(&mut self, m: usize);

    /// [`GpuAttention::begin`] for a decode step replayed from a captured CUDA graph:
    /// every value that changes from step to step (the KV row, the plans) goes to device
    /// memory at an address that stays put, and the split count stays fixed while it can.
    /// Returns false, having done nothing, when this attention cannot run in a graph
    /// (blocks still streaming in, shards on other devices); the caller then uses
    /// `begin` and plain launches.
    fn begin_graph(&mut self, gpu: &Gpu, m: usize) -> Result<bool> {
        let _ = (gpu, m);
        Ok(false)
    }

    /// After [`GpuAttention::begin_graph`]: every address and size the attention's
    /// launches bake in. A captured graph is replayed only while this key is unchanged.
    fn graph_key(&self) -> Vec<u64> {
        Vec::new()
    }
}

/// A decode step captured as a CUDA graph, with the key of everything it bakes in.
struct DecodeGraph {
    key: Vec<u64>,
    graph: CudaGraph,
}

// SAFETY: the graph is only launched or dropped through `&mut CudaLlama` (one thread at a
// time); CUDA graph execs may be used from any thread when access is serialised.
unsafe impl Send for DecodeGraph {}
unsafe impl Sync for DecodeGraph {}

/// Where a decode step's input token comes from.
enum StepToken {
    /// Uploaded from the host.
    Host(u32),
    /// The previous step's greedy pick, still on the device.
    Picked,
}

/// Device buffers of a decode step's head, at fixed addresses for graph replay.
struct DecodeBufs {
    /// The last hidden state in the 16-bit type.
    hn: DevBuf,
    /// f32 logits `[vocab]`.
    logits: DevBuf,
    /// The greedy pick: token id (u32) then the logits' log-sum-exp (f32).
    pick: DevBuf,
    /// The many-CTA pick's counter (zero between launches) and partials.
    argmax: DevBuf,
    /// Page-locked landing place of `pick` for pipelined steps, and the event recorded
    /// after its copy (allocated once: a pinned allocation costs more than a step).
    pick_host: PinnedBuf,
    pick_landed: CudaEvent,
}

struct GpuLayer {
    attn_norm: DevBuf,
    w_qkv: DevBuf,
    wo: DevBuf,
    ffn_norm: DevBuf,
    w_gu: DevBuf,
    w_down: DevBuf,
}

/// Activation buffers for up to `cap` tokens.
#[derive(Default)]
struct Scratch {
    cap: usize,
    bufs: Vec<DevBuf>,
}

/// A llama-architecture model resident on one GPU.
pub struct CudaLlama {
    gpu: Arc<Gpu>,
    kernels: Arc<Kernels>,
    config: LlamaConfig,
    layers: Vec<GpuLayer>,
    embed: DevBuf,
    output: DevBuf,
    output_norm: DevBuf,
    inv_freq: DevBuf,
    pairs: usize,
    scratch: Scratch,
    /// Rows of the last forward pass (the normalised hidden states in scratch).
    last_m: usize,
    decode: Option<DecodeBufs>,
    graph: Option<DecodeGraph>,
    graph_replays: u64,
}

// Scratch buffer indices.
const X: usize = 0;
const XN: usize = 1;
const QKV: usize = 2;
const Q: usize = 3;
const ATT: usize = 4;
const GU: usize = 5;
const ACT: usize = 6;
const COS: usize = 7;
const SIN: usize = 8;
const POS: usize = 9;
const TOK: usize = 10;
const HID: usize = 11;

impl CudaLlama {
    /// Uploads `model`'s weights (dequantised, then rounded to the GPU's 16-bit type).
    pub fn upload(gpu: Arc<Gpu>, model: &Llama) -> Result<Self> {
        let c = model.config().clone();
        let kernels = gpu.kernels(c.head_dim)?;
        let dt = gpu.dtype;
        let half = |ms: &[&Matrix]| -> Result<DevBuf> {
            let n: usize = ms.iter().map(|m| m.rows() * m.cols()).sum();
            let buf = gpu.alloc(n * 2)?;
            let mut off = 0u64;
            for m in ms {
                let f = m.to_f32();
                let mut h = vec![0u16; f.len()];
                dt.encode(&f, &mut h);
                gpu.upload(buf.ptr() + off, &h)?;
                off += (h.len() * 2) as u64;
            }
            Ok(buf)
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let w = model.layer_weights(i);
            layers.push(GpuLayer {
                attn_norm: gpu.upload_new(w.attn_norm)?,
                w_qkv: half(&[w.wq, w.wk, w.wv])?,
                wo: half(&[w.wo])?,
                ffn_norm: gpu.upload_new(w.ffn_norm)?,
                w_gu: half(&[w.w_gate, w.w_up])?,
                w_down: half(&[w.w_down])?,
            });
        }
        let inv_freq = model.rope().inv_freq().to_vec();
        let out = Self {
            embed: half(&[model.embedding()])?,
            output: half(&[model.output()])?,
            output_norm: gpu.upload_new(model.output_norm())?,
            pairs: inv_freq.len(),
            inv_freq: gpu.upload_new(&inv_freq)?,
            layers,
            kernels,
            config: c,
            gpu,
            scratch: Scratch::default(),
            last_m: 0,
            decode: None,
            graph: None,
            graph_replays: 0,
        };
        out.gpu.synchronize()?;
        Ok(out)
    }

    /// A model of any llama shape with random weights generated on the device (uniform
    /// with a fan-in scale like [`Llama::random`]; not the same values): for benchmarks at
    /// scale, where speed does not depend on weight values and no host copy is needed.
    pub fn random(gpu: Arc<Gpu>, config: LlamaConfig, seed: u64) -> Result<Self> {
        let c = config;
        let kernels = gpu.kernels(c.head_dim)?;
        let mut next_seed = seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let mut matrix = |rows: usize, cols: usize| -> Result<DevBuf> {
            let buf = gpu.alloc(rows * cols * 2)?;
            next_seed = next_seed.wrapping_add(0x9E37_79B9);
            gpu.fill_uniform_half(
                &kernels,
                buf.ptr(),
                rows * cols,
                next_seed,
                (3.0 / cols as f32).sqrt(),
            )?;
            Ok(buf)
        };
        let (qw, kvw) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let ones = vec![1f32; c.hidden];
        let mut layers = Vec::with_capacity(c.n_layers);
        for _ in 0..c.n_layers {
            layers.push(GpuLayer {
                attn_norm: gpu.upload_new(&ones)?,
                w_qkv: matrix(qw + 2 * kvw, c.hidden)?,
                wo: matrix(c.hidden, qw)?,
                ffn_norm: gpu.upload_new(&ones)?,
                w_gu: matrix(2 * c.ffn, c.hidden)?,
                w_down: matrix(c.hidden, c.ffn)?,
            });
        }
        let embed = matrix(c.vocab, c.hidden)?;
        let output = matrix(c.vocab, c.hidden)?;
        let output_norm = gpu.alloc(c.hidden * 4)?;
        gpu.fill_uniform_f32(
            &kernels,
            output_norm.ptr(),
            c.hidden,
            seed ^ 0x5eed,
            0.5,
            1.5,
        )?;
        let rope = crate::cpu::ops::Rope::new(c.rope_theta, c.rope_dim, None);
        let inv_freq = rope.inv_freq().to_vec();
        let out = Self {
            embed,
            output,
            output_norm,
            pairs: inv_freq.len(),
            inv_freq: gpu.upload_new(&inv_freq)?,
            layers,
            kernels,
            config: c,
            gpu,
            scratch: Scratch::default(),
            last_m: 0,
            decode: None,
            graph: None,
            graph_replays: 0,
        };
        out.gpu.synchronize()?;
        Ok(out)
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    pub fn kernels(&self) -> &Arc<Kernels> {
        &self.kernels
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn head_shape(&self) -> HeadShape {
        HeadShape {
            n_heads: self.config.n_heads,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attn_norm.bytes()
                    + l.w_qkv.bytes()
                    + l.wo.bytes()
                    + l.ffn_norm.bytes()
                    + l.w_gu.bytes()
                    + l.w_down.bytes()
            })
            .sum();
        l + self.embed.bytes() + self.output.bytes() + self.output_norm.bytes()
    }

    fn ensure_scratch(&mut self, m: usize) -> Result<()> {
        if self.scratch.cap >= m && !self.scratch.bufs.is_empty() {
            return Ok(());
        }
        let c = &self.config;
        let cap = m.max(16).next_power_of_two().max(m);
        let (qw, kvw) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let sizes = [
            cap * c.hidden * 4,          // X
            cap * c.hidden * 2,          // XN
            cap * (qw + 2 * kvw) * 4,    // QKV
            cap * qw * 2,                // Q
            cap * qw * 2,                // ATT
            cap * 2 * c.ffn * 4,         // GU
            cap * c.ffn * 2,             // ACT
            cap * self.pairs.max(1) * 4, // COS
            cap * self.pairs.max(1) * 4, // SIN
            cap * 4,                     // POS
            cap * 4,                     // TOK
            cap * c.hidden * 4,          // HID (normalised output, f32)
        ];
        self.gpu.synchronize()?;
        self.scratch.bufs.clear();
        // The captured decode step used the old buffers.
        self.graph = None;
        for s in sizes {
            self.scratch.bufs.push(self.gpu.alloc(s)?);
        }
        self.scratch.cap = cap;
        Ok(())
    }

    /// Whether a forward pass of `m` tokens runs through the fused one-row kernels
    /// (`gemv.rs`): one token, [`Gpu::fused_decode`] on, and every product's input
    /// within what those kernels stage.
    fn fused(&self, m: usize) -> bool {
        let c = &self.config;
        m == 1
            && self.gpu.fused_decode()
            && [c.hidden, c.n_heads * c.head_dim, c.ffn]
                .into_iter()
                .all(gemv_fits)
    }

    fn buf(&self, i: usize) -> u64 {
        self.scratch.bufs[i].ptr()
    }

    /// Runs `tokens` at `positions` through every block and the final norm. The
    /// normalised hidden states stay on the device for [`CudaLlama::logits`],
    /// [`CudaLlama::argmax`] or [`CudaLlama::hidden`]. Asynchronous: returns once queued.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        positions: &[usize],
        attention: &mut dyn GpuAttention,
    ) -> Result<()> {
        let m = tokens.len();
        let c = self.config.clone();
        if positions.len() != m {
            return Err(CudaError::Invalid(format!(
                "{m} tokens but {} positions",
                positions.len()
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(CudaError::Invalid(format!(
                "token id {bad} is outside the vocabulary ({})",
                c.vocab
            )));
        }
        if m == 0 {
            self.last_m = 0;
            return Ok(());
        }
        self.prepare(tokens, positions)?;
        attention.begin(&self.gpu, m)?;
        self.launch_layers(m, attention)?;
        attention.finish(m);
        self.last_m = m;
        Ok(())
    }

    /// Sizes the activation buffers and uploads the tokens and their positions.
    fn prepare(&mut self, tokens: &[u32], positions: &[usize]) -> Result<()> {
        self.ensure_scratch(tokens.len())?;
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        self.gpu.upload(self.buf(POS), &pos)?;
        self.gpu.upload(self.buf(TOK), tokens)?;
        Ok(())
    }

    /// Queues every launch of a forward pass of `m` prepared tokens (the attention
    /// planned): embedding, RoPE tables, the blocks, the final norm. Nothing here
    /// allocates, uploads or synchronises, so a decode step can be captured as a graph.
    fn launch_layers(&mut self, m: usize, attention: &mut dyn GpuAttention) -> Result<()> {
        let c = self.config.clone();
        let gpu = self.gpu.clone();
        let k = self.kernels.clone();
        let (h, nh, nkv, d) = (c.hidden, c.n_heads, c.n_kv_heads, c.head_dim);
        let (qw, kvw) = (nh * d, nkv * d);
        gpu.embed(&k, self.buf(X), self.embed.ptr(), self.buf(TOK), m, h)?;
        gpu.rope_table(
            &k,
            self.buf(COS),
            self.buf(SIN),
            self.buf(POS),
            self.inv_freq.ptr(),
            m,
            self.pairs,
        )?;
        if self.fused(m) {
            for (li, layer) in self.layers.iter().enumerate() {
                // Four one-row products with their norms, RoPE, SwiGLU and residual adds
                // folded in (gemv.rs), plus attention.
                let dest = attention.kv_dest(li);
                gpu.gemv_qkv_rope(
                    &k,
                    self.buf(Q),
                    &dest,
                    layer.w_qkv.ptr(),
                    self.buf(X),
                    layer.attn_norm.ptr(),
                    c.rms_eps,
                    h,
                    self.buf(COS),
                    self.buf(SIN),
                    (nh, nkv, d, self.pairs),
                )?;
                attention.attend(&gpu, &k, li, self.buf(Q), m, self.buf(ATT))?;
                gpu.gemv_rows(
                    &k,
                    self.buf(X),
                    true,
                    layer.wo.ptr(),
                    self.buf(ATT),
                    false,
                    h,
                    qw,
                )?;
                gpu.gemv_swiglu(
                    &k,
                    self.buf(ACT),
                    layer.w_gu.ptr(),
                    self.buf(X),
                    layer.ffn_norm.ptr(),
                    c.rms_eps,
                    h,
                    c.ffn,
                )?;
                gpu.gemv_rows(
                    &k,
                    self.buf(X),
                    true,
                    layer.w_down.ptr(),
                    self.buf(ACT),
                    false,
                    h,
                    c.ffn,
                )?;
            }
            return gpu.rms_norm(
                &k,
                self.buf(HID),
                true,
                self.buf(X),
                self.output_norm.ptr(),
                m,
                h,
                c.rms_eps,
            );
        }
        for (li, layer) in self.layers.iter().enumerate() {
            gpu.rms_norm(
                &k,
                self.buf(XN),
                false,
                self.buf(X),
                layer.attn_norm.ptr(),
                m,
                h,
                c.rms_eps,
            )?;
            gpu.gemm(
                self.buf(QKV),
                true,
                self.buf(XN),
                layer.w_qkv.ptr(),
                m,
                qw + 2 * kvw,
                h,
                0.0,
            )?;
            let dest = attention.kv_dest(li);
            gpu.rope_split(
                &k,
                self.buf(Q),
                &dest,
                self.buf(QKV),
                self.buf(COS),
                self.buf(SIN),
                m,
                nh,
                nkv,
                d,
                self.pairs,
            )?;
            attention.attend(&gpu, &k, li, self.buf(Q), m, self.buf(ATT))?;
            gpu.gemm(
                self.buf(X),
                true,
                self.buf(ATT),
                layer.wo.ptr(),
                m,
                h,
                qw,
                1.0,
            )?;
            gpu.rms_norm(
                &k,
                self.buf(XN),
                false,
                self.buf(X),
                layer.ffn_norm.ptr(),
                m,
                h,
                c.rms_eps,
            )?;
            gpu.gemm(
                self.buf(GU),
                true,
                self.buf(XN),
                layer.w_gu.ptr(),
                m,
                2 * c.ffn,
                h,
                0.0,
            )?;
            gpu.swiglu(&k, self.buf(ACT), self.buf(GU), m, c.ffn)?;
            gpu.gemm(
                self.buf(X),
                true,
                self.buf(ACT),
                layer.w_down.ptr(),
                m,
                h,
                c.ffn,
                1.0,
            )?;
        }
        gpu.rms_norm(
            &k,
            self.buf(HID),
            true,
            self.buf(X),
            self.output_norm.ptr(),
            m,
            h,
            c.rms_eps,
        )
    }

    /// One decode step: `token` at `position` through every block, the LM head and the
    /// greedy pick, all on the device. When graphs are on ([`Gpu::decode_graphs`]) and
    /// the attention can be replayed ([`GpuAttention::begin_graph`]), the step's launches
    /// run as one captured CUDA graph: the first step with a new key runs them plainly
    /// (sizing every buffer they use: nothing may be allocated during a capture), then
    /// captures them; later steps with the same key replay the graph. Otherwise plain
    /// launches. Either way the results match [`CudaLlama::forward`] then
    /// [`CudaLlama::logits`] / [`CudaLlama::argmax`] (the selftest checks it).
    fn decode_launch(
        &mut self,
        token: u32,
        position: usize,
        attention: &mut dyn GpuAttention,
    ) -> Result<()> {
        self.decode_enqueue(StepToken::Host(token), position, attention)?;
        attention.finish(1);
        Ok(())
    }

    /// The launches of [`CudaLlama::decode_launch`] without `attention.finish`: the
    /// step's KV row is written but not yet kept (the pipelined loop keeps it once the
    /// step before has not stopped the generation).
    fn decode_enqueue(
        &mut self,
        token: StepToken,
        position: usize,
        attention: &mut dyn GpuAttention,
    ) -> Result<()> {
        self.ensure_decode_bufs()?;
        match token {
            StepToken::Host(token) => {
                if token as usize >= self.config.vocab {
                    return Err(CudaError::Invalid(format!(
                        "token id {token} is outside the vocabulary ({})",
                        self.config.vocab
                    )));
                }
                self.prepare(&[token], &[position])?;
            }
            StepToken::Picked => {
                // The previous step's greedy pick (its first word, the token id),
                // copied on the device: no host round trip between the steps.
                self.ensure_scratch(1)?;
                self.gpu.upload(self.buf(POS), &[position as i32])?;
                let pick = self.decode.as_ref().expect("sized above").pick.ptr();
                self.gpu.copy_d2d(self.buf(TOK), pick, 4)?;
            }
        }
        let gpu = self.gpu.clone();
        let graphed = gpu.decode_graphs() && attention.begin_graph(&gpu, 1)?;
        if !graphed {
            attention.begin(&gpu, 1)?;
            self.launch_decode(attention)?;
        } else {
            let key = self.graph_key(attention);
            match &self.graph {
                Some(g) if g.key == key => {
                    gpu.launch_graph(&g.graph)?;
                    self.graph_replays += 1;
                }
                _ => {
                    self.graph = None;
                    self.launch_decode(attention)?;
                    let key = self.graph_key(attention);
                    self.graph = self.capture(attention, key)?;
                }
            }
        }
        self.last_m = 1;
        Ok(())
    }

    /// The launches of one decode step after the blocks: the LM head on the last hidden
    /// state and the greedy pick, into the fixed decode buffers.
    fn launch_decode(&mut self, attention: &mut dyn GpuAttention) -> Result<()> {
        self.launch_layers(1, attention)?;
        let c = &self.config;
        let bufs = self.decode.as_ref().expect("sized by ensure_decode_bufs");
        if self.fused(1) {
            // The LM head rounds the f32 hidden state to 16-bit while staging it.
            self.gpu.gemv_rows(
                &self.kernels,
                bufs.logits.ptr(),
                false,
                self.output.ptr(),
                self.buf(HID),
                true,
                c.vocab,
                c.hidden,
            )?;
        } else {
            self.gpu
                .to_half(&self.kernels, bufs.hn.ptr(), self.buf(HID), c.hidden)?;
            self.gpu.gemm(
                bufs.logits.ptr(),
                true,
                bufs.hn.ptr(),
                self.output.ptr(),
                1,
                c.vocab,
                c.hidden,
                0.0,
            )?;
        }
        let pick = bufs.pick.ptr();
        if self.gpu.wide_argmax() {
            let scratch = bufs.argmax.ptr();
            return self.gpu.argmax_one(
                &self.kernels,
                pick,
                pick + 4,
                bufs.logits.ptr(),
                c.vocab,
                scratch,
            );
        }
        self.gpu
            .argmax(&self.kernels, pick, pick + 4, bufs.logits.ptr(), 1, c.vocab)
    }

    fn ensure_decode_bufs(&mut self) -> Result<()> {
        if self.decode.is_none() {
            let c = &self.config;
            let argmax = self
                .gpu
                .upload_new(&vec![0u8; argmax_scratch_bytes(c.vocab)])?;
            self.decode = Some(DecodeBufs {
                hn: self.gpu.alloc(c.hidden * 2)?,
                logits: self.gpu.alloc(c.vocab * 4)?,
                pick: self.gpu.alloc(8)?,
                argmax,
                pick_host: PinnedBuf::new(&self.gpu, 8)?,
                pick_landed: self.gpu.ctx.new_event(None)?,
            });
        }
        Ok(())
    }

    /// The model's side of a decode graph's key (activation and decode buffers, kernel
    /// choice) followed by the attention's.
    fn graph_key(&self, attention: &dyn GpuAttention) -> Vec<u64> {
        let mut key: Vec<u64> = self.scratch.bufs.iter().map(DevBuf::ptr).collect();
        if let Some(b) = &self.decode {
            key.extend([b.hn.ptr(), b.logits.ptr(), b.pick.ptr(), b.argmax.ptr()]);
        }
        key.push(self.gpu.wide_argmax() as u64);
        key.push(self.gpu.attention_kernels().code());
        key.push(self.gpu.split_tuning().code());
        key.push(self.fused(1) as u64);
        key.push(u64::MAX); // separator
        key.extend(attention.graph_key());
        key
    }

    /// Captures one decode step's launches (already run once plainly with the same key)
    /// as a graph. A capture the driver refuses turns graphs off for this GPU (the
    /// step's results, from the plain run, stand).
    fn capture(
        &mut self,
        attention: &mut dyn GpuAttention,
        key: Vec<u64>,
    ) -> Result<Option<DecodeGraph>> {
        let gpu = self.gpu.clone();
        match gpu.capture(|| self.launch_decode(attention)) {
            Ok(Some(graph)) => Ok(Some(DecodeGraph { key, graph })),
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!(
                    "CUDA graph capture of a decode step failed ({e}); decoding without graphs"
                );
                gpu.set_decode_graphs(false);
                Ok(None)
            }
        }
    }

    /// [`CudaLlama::decode_launch`], then the greedy pick: the argmax token and the
    /// log-sum-exp of its logits (what [`CudaLlama::argmax`] returns for one row).
    pub fn decode_greedy(
        &mut self,
        token: u32,
        position: usize,
        attention: &mut dyn GpuAttention,
    ) -> Result<(u32, f32)> {
        self.decode_launch(token, position, attention)?;
        self.decode_pick()
    }

    /// The greedy pick of the last decode step ([`CudaLlama::decode_greedy`] or
    /// [`CudaLlama::decode_logits`]): argmax token and log-sum-exp.
    pub fn decode_pick(&self) -> Result<(u32, f32)> {
        let Some(bufs) = &self.decode else {
            return Err(CudaError::Invalid("no decode step has run".into()));
        };
        let mut pick = [0u32; 2];
        self.gpu.download(&mut pick, bufs.pick.ptr())?;
        Ok((pick[0], f32::from_bits(pick[1])))
    }

    /// Greedy decoding of up to `max_steps` tokens, the first step fed `first` at
    /// `position`: what [`CudaLlama::decode_greedy`] in a loop gives, token for token,
    /// but pipelined. Step `i + 1` is planned, uploaded and launched while step `i` runs
    /// (its input token is step `i`'s pick, copied on the device), and only then does the
    /// host wait for step `i`'s pick, so the device never waits for the host between
    /// steps (the host's share of a sequential step: its uploads, the pick's round trip
    /// and the graph launch, 0.06-0.15 ms on the H200). `on_token(token, lse)` sees each
    /// token in order and returns false to stop; the step already launched after a stop
    /// is dropped (its KV row is not kept). Returns the number of tokens decoded.
    pub fn decode_greedy_pipelined(
        &mut self,
        first: u32,
        position: usize,
        max_steps: usize,
        attention: &mut dyn GpuAttention,
        mut on_token: impl FnMut(u32, f32) -> bool,
    ) -> Result<usize> {
        if max_steps == 0 {
            return Ok(0);
        }
        self.decode_enqueue(StepToken::Host(first), position, attention)?;
        attention.finish(1);
        let gpu = self.gpu.clone();
        for done in 1.. {
            {
                let bufs = self.decode.as_mut().expect("sized by the first step");
                gpu.download_pinned(&mut bufs.pick_host, 0, bufs.pick.ptr(), 8)?;
                bufs.pick_landed.record(&gpu.stream)?;
            }
            let more = done < max_steps;
            if more {
                self.decode_enqueue(StepToken::Picked, position + done, attention)?;
            }
            let bufs = self.decode.as_mut().expect("sized by the first step");
            bufs.pick_landed.synchronize()?;
            let word = bufs.pick_host.as_f32_mut();
            let (token, lse) = (word[0].to_bits(), word[1]);
            if !on_token(token, lse) || !more {
                return Ok(done);
            }
            attention.finish(1);
        }
        unreachable!("the loop returns")
    }

    /// Launches the last captured decode graph `n` times back to back, with no host work
    /// between them (same token, same position: each replay rewrites the same KV row).
    /// For benchmarks: the device-side time of a decode step, against which a real
    /// step's time shows the host's share (uploads, the pick's round trip, the launch).
    /// Returns false, having launched nothing, when no graph has been captured.
    pub fn replay_decode_graph(&mut self, n: usize) -> Result<bool> {
        let Some(g) = &self.graph else {
            return Ok(false);
        };
        for _ in 0..n {
            self.gpu.launch_graph(&g.graph)?;
        }
        Ok(true)
    }

    /// Decode steps replayed from a captured graph so far (benchmarks and the selftest
    /// check that graphs ran).
    pub fn graph_replays(&self) -> u64 {
        self.graph_replays
    }

    /// [`CudaLlama::decode_launch`], then the step's logits `[vocab]` (for samplers on
    /// the host).
    pub fn decode_logits(
        &mut self,
        token: u32,
        position: usize,
        attention: &mut dyn GpuAttention,
    ) -> Result<Vec<f32>> {
        self.decode_launch(token, position, attention)?;
        let mut out = vec![0f32; self.config.vocab];
        let ptr = self.decode.as_ref().expect("sized").logits.ptr();
        self.gpu.download(&mut out, ptr)?;
        Ok(out)
    }

    /// The normalised hidden states of the last forward pass, `[m][hidden]`.
    pub fn hidden(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.last_m * self.config.hidden];
        self.gpu.download(&mut out, self.buf(HID))?;
        Ok(out)
    }

    /// Logits `[rows][vocab]` of the last `rows` tokens of the last forward pass (the LM
    /// head runs in 16-bit with f32 accumulation).
    pub fn logits(&mut self, rows: usize) -> Result<Vec<f32>> {
        let (buf, rows) = self.logits_device(rows)?;
        let mut out = vec![0f32; rows * self.config.vocab];
        self.gpu.download(&mut out, buf.ptr())?;
        Ok(out)
    }

    fn logits_device(&mut self, rows: usize) -> Result<(DevBuf, usize)> {
        let c = &self.config;
        let rows = rows.min(self.last_m);
        let first = self.last_m - rows;
        let hn = self.gpu.alloc(rows * c.hidden * 2)?;
        self.gpu.to_half(
            &self.kernels,
            hn.ptr(),
            self.buf(HID) + (first * c.hidden * 4) as u64,
            rows * c.hidden,
        )?;
        let out = self.gpu.alloc(rows * c.vocab * 4)?;
        self.gpu.gemm(
            out.ptr(),
            true,
            hn.ptr(),
            self.output.ptr(),
            rows,
            c.vocab,
            c.hidden,
            0.0,
        )?;
        self.gpu.synchronize()?;
        Ok((out, rows))
    }

    /// Greedy sampling on the device: per row of the last `rows` tokens, the argmax token
    /// and the log-sum-exp of its logits (only these cross to the host).
    pub fn argmax(&mut self, rows: usize) -> Result<Vec<(u32, f32)>> {
        let (logits, rows) = self.logits_device(rows)?;
        let idx = self.gpu.alloc(rows * 4)?;
        let lse = self.gpu.alloc(rows * 4)?;
        self.gpu.argmax(
            &self.kernels,
            idx.ptr(),
            lse.ptr(),
            logits.ptr(),
            rows,
            self.config.vocab,
        )?;
        let mut i = vec![0u32; rows];
        let mut l = vec![0f32; rows];
        self.gpu.download(&mut i, idx.ptr())?;
        self.gpu.download(&mut l, lse.ptr())?;
        Ok(i.into_iter().zip(l).collect())
    }
}

/// Plain causal attention with a KV cache on the device (the counterpart of
/// [`crate::model::KvCache`]): K/V head-major `[n_kv][capacity][head_dim]` per layer.
pub struct GpuKvCache {
    layers: Vec<(DevBuf, DevBuf)>,
    len: usize,
    capacity: usize,
    shape: HeadShape,
    attn: SegmentAttention,
    /// Graph mode: the next token's row (`len`) on the device, read by RoPE's K/V write.
    t0_dev: Option<DevBuf>,
    graph_mode: bool,
    /// Splits every plan is padded to in graph mode.
    graph_splits: usize,
}

impl GpuKvCache {
    pub fn new(gpu: &Gpu, n_layers: usize, shape: HeadShape, capacity: usize) -> Result<Self> {
        let bytes = shape.n_kv_heads * capacity * shape.head_dim * 2;
        let layers = (0..n_layers)
            .map(|_| Ok((gpu.alloc(bytes)?, gpu.alloc(bytes)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            len: 0,
            capacity,
            shape,
            attn: SegmentAttention::default(),
            t0_dev: None,
            graph_mode: false,
            graph_splits: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets tokens from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The keys of layer `layer` as an attention segment (`causal`: for new tokens that
    /// follow them).
    pub fn segment(&self, layer: usize, len: usize, causal_offset: Option<usize>) -> Segment {
        let (k, v) = &self.layers[layer];
        Segment {
            k: k.ptr(),
            v: v.ptr(),
            head_stride: (self.capacity * self.shape.head_dim) as i64,
            row_stride: self.shape.head_dim as i32,
            len,
            causal_offset,
            scale_off: 0,
            log2_weight: 0.0,
        }
    }

    /// K and V of `layer` for tokens `0..len` as f32 head-major `[n_kv][len][d]`.
    pub fn download_layer(&self, gpu: &Gpu, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let d = self.shape.head_dim;
        let mut out = (
            vec![0f32; self.shape.n_kv_heads * self.len * d],
            vec![0f32; self.shape.n_kv_heads * self.len * d],
        );
        let mut tmp = vec![0u16; self.len * d];
        for h in 0..self.shape.n_kv_heads {
            for (which, dst) in [(0, &mut out.0), (1, &mut out.1)] {
                let buf = if which == 0 {
                    &self.layers[layer].0
                } else {
                    &self.layers[layer].1
                };
                gpu.download(&mut tmp, buf.ptr() + (h * self.capacity * d * 2) as u64)?;
                gpu.dtype
                    .decode(&tmp, &mut dst[h * self.len * d..(h + 1) * self.len * d]);
            }
        }
        Ok(out)
    }
}

impl GpuKvCache {
    /// Checks that `m` more tokens fit and sets where their K/V rows go: by value, or
    /// (`graph`) through the device word [`KvDest::t0_dev`], uploaded here.
    pub(super) fn begin_rows(&mut self, gpu: &Gpu, m: usize, graph: bool) -> Result<()> {
        if self.len + m > self.capacity {
            return Err(CudaError::Invalid(format!(
                "GPU KV cache holds {} tokens: {} + {m} do not fit",
                self.capacity, self.len
            )));
        }
        self.graph_mode = graph;
        if graph {
            if self.t0_dev.is_none() {
                self.t0_dev = Some(gpu.alloc(4)?);
            }
            let word = self.t0_dev.as_ref().map_or(0, DevBuf::ptr);
            gpu.upload(word, &[self.len as i32])?;
        }
        Ok(())
    }

    /// The KV side of a graph key: the row word and every layer's K/V address.
    pub(super) fn rows_key(&self) -> Vec<u64> {
        let mut key = vec![
            self.t0_dev.as_ref().map_or(0, DevBuf::ptr),
            self.capacity as u64,
        ];
        key.extend(self.layers.iter().flat_map(|(k, v)| [k.ptr(), v.ptr()]));
        key
    }
}

impl GpuAttention for GpuKvCache {
    fn begin(&mut self, gpu: &Gpu, m: usize) -> Result<()> {
        self.begin_rows(gpu, m, false)?;
        let splits = gpu.choose_splits(m, self.shape, self.len + m);
        let this = &*self;
        let segments: Vec<Segment> = (0..this.layers.len())
            .map(|l| this.segment(l, this.len + m, Some(this.len)))
            .collect();
        self.attn
            .plan(gpu, self.shape, segments.len(), splits, |l| {
                vec![segments[l]]
            })
    }

    fn kv_dest(&mut self, layer: usize) -> KvDest {
        let (k, v) = &self.layers[layer];
        KvDest {
            k: k.ptr(),
            v: v.ptr(),
            head_stride: (self.capacity * self.shape.head_dim) as i64,
            row_stride: self.shape.head_dim as i32,
            t0: self.len as i32,
            t0_dev: match (&self.t0_dev, self.graph_mode) {
                (Some(word), true) => word.ptr(),
                _ => 0,
            },
        }
    }

    fn attend(
        &mut self,
        gpu: &Gpu,
        kernels: &Kernels,
        layer: usize,
        q: u64,
        m: usize,
        out: u64,
    ) -> Result<()> {
        self.attn
            .attend(gpu, kernels, layer, q, m, AttnOut::Half(out))
    }

    fn finish(&mut self, m: usize) {
        self.len += m;
    }

    fn begin_graph(&mut self, gpu: &Gpu, m: usize) -> Result<bool> {
        self.begin_rows(gpu, m, true)?;
        let splits = gpu.choose_splits(m, self.shape, self.len + m);
        let this = &*self;
        let segments: Vec<Segment> = (0..this.layers.len())
            .map(|l| this.segment(l, this.len + m, Some(this.len)))
            .collect();
        let mut pad = self.graph_splits;
        self.attn
            .plan_padded(gpu, self.shape, segments.len(), splits, &mut pad, |l| {
                vec![segments[l]]
            })?;
        self.graph_splits = pad;
        Ok(true)
    }

    fn graph_key(&self) -> Vec<u64> {
        let mut key = self.rows_key();
        key.extend(self.attn.graph_key());
        key
    }
}
