//! The model on the compute device `--device` chose: one entry point for Star Attention
//! phase 1 (encode a block), phase 2 (answer over cached blocks) and plain generation,
//! whichever device runs them.
//!
//! - CPU: the [`Llama`] forward pass with [`Phase1`], [`CpuShard`], [`QueryAttention`]
//!   and [`KvCache`]; always available, and what every test without a GPU runs.
//! - CUDA ([`cuda`]): the weights uploaded once as a [`crate::cuda::CudaLlama`], and a
//!   GPU-resident tier of context blocks keyed by their content keys, so a repeated
//!   question over the same document attends to blocks already on the device and only the
//!   missing ones are streamed in.
//!
//! Callers keep the [`Llama`] and the [`Tokenizer`] (a [`LoadedModel`]) and pass them to
//! every call: the CPU path runs on them, the GPU path takes only the token geometry and
//! the tokenizer from them. They must be the model the backend was built from.
//!
//! Device selection never panics: `auto` falls back to the CPU with a reason (see
//! [`Backend::selected`]), an explicit `cuda:N` that cannot be used is an
//! [`Error::Device`].

mod cuda;

#[cfg(test)]
mod tests;

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::LoadedModel;
use crate::cuda::{CudaError, DeviceChoice, Gpu, HalfType, Selected, select_device};
use crate::error::{Error, Result};
use crate::generate::{GenerateParams, Generation, generate};
use crate::model::{KvCache, Llama};
use crate::partial::HeadShape;
use crate::star::reencode::Reencoded;
use crate::star::{AttentionShard, BlockKv, CpuShard, Phase1, QueryAttention, StarConfig};

pub use crate::cuda::cold::{BlockReader, ColdStats};

/// A block's content key (the store's `BlockKey` bytes): what the GPU tier is keyed by.
pub type BlockId = [u8; 32];

/// The compute device and whatever lives on it.
pub struct Backend {
    selected: Selected,
    device: Device,
}

// The service shares one backend between all its worker threads.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<Backend>();
};

enum Device {
    Cpu,
    Cuda(Box<cuda::CudaBackend>),
}

/// The result of [`Backend::answer`].
#[derive(Debug, Clone)]
pub struct Answer {
    pub generation: Generation,
    /// Time until the context could be attended: looking blocks up and loading the
    /// missing ones (the `load` callback).
    pub load: Duration,
    /// Context blocks that were already resident on the device (0 on the CPU).
    pub resident_blocks: usize,
    /// What the cold load did ([`Backend::answer_stored`] when blocks were missing).
    pub cold: Option<ColdStats>,
}

/// A stored document for [`Backend::answer_stored`]: its source tokens and Star
/// configuration (to re-encode blocks) and a reader of its stored blocks.
pub struct StoredContext<'a> {
    pub tokens: &'a [u32],
    pub config: StarConfig,
    pub reader: &'a dyn BlockReader,
    /// The blocks' 8-bit format for a document stored in 8 bits (`kv_dtype` int8 or
    /// fp8): loaded in 8 bits (with `Gpu::cold_split8`, split with re-encoded blocks
    /// quantised on the device); `None`: 16-bit.
    pub kv8: Option<crate::kv8::Kv8Format>,
}

/// The result of [`Backend::answer_document`].
#[derive(Debug, Clone)]
pub struct DocumentAnswer {
    pub generation: Generation,
    /// Phase 1 of the whole context.
    pub phase1: Duration,
    pub n_blocks: usize,
}

/// The GPU-resident block tier's counters (see [`crate::cuda::star::BlockTier`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierStats {
    pub blocks: usize,
    pub used_bytes: usize,
    pub budget_bytes: usize,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

impl Backend {
    /// The CPU backend, chosen by the caller (not by `--device`).
    pub fn cpu() -> Self {
        Self {
            selected: Selected::Cpu {
                reason: "requested".into(),
            },
            device: Device::Cpu,
        }
    }

    /// Resolves `choice` and, for a GPU, uploads `model` to it. `gpu_tier_bytes` bounds
    /// the resident block tier (default: half of the device memory still free after the
    /// weights). `auto` never fails: when the GPU it found cannot be opened, the CPU is
    /// used and [`Backend::selected`] says why.
    pub fn new(model: &Llama, choice: DeviceChoice, gpu_tier_bytes: Option<usize>) -> Result<Self> {
        let device = match select_device(choice) {
            Ok(Selected::Cpu { reason }) => return Ok(Self::cpu_because(reason)),
            Ok(Selected::Cuda { device }) => device,
            Err(e) => return Err(Error::Device(format!("--device {choice}: {e}"))),
        };
        let opened = guarded(|| {
            let gpu = Gpu::new(device.ordinal, HalfType::BF16)?;
            Self::open_gpu(gpu, model, gpu_tier_bytes)
        });
        match opened {
            Ok(backend) => Ok(backend),
            Err(e) if choice == DeviceChoice::Auto => Ok(Self::cpu_because(format!(
                "auto: {device} could not be used: {e}"
            ))),
            Err(e) => Err(Error::Device(format!("--device {choice}: {e}"))),
        }
    }

    /// The CUDA backend on an opened GPU (any 16-bit type; `new` uses bf16).
    pub fn on_gpu(gpu: Arc<Gpu>, model: &Llama, gpu_tier_bytes: Option<usize>) -> Result<Self> {
        Ok(guarded(|| Self::open_gpu(gpu, model, gpu_tier_bytes))?)
    }

    fn open_gpu(
        gpu: Arc<Gpu>,
        model: &Llama,
        gpu_tier_bytes: Option<usize>,
    ) -> Result<Self, CudaError> {
        let device = gpu.info.clone();
        let cuda = cuda::CudaBackend::new(gpu, model, gpu_tier_bytes)?;
        Ok(Self {
            selected: Selected::Cuda { device },
            device: Device::Cuda(Box::new(cuda)),
        })
    }

    fn cpu_because(reason: String) -> Self {
        Self {
            selected: Selected::Cpu { reason },
            device: Device::Cpu,
        }
    }

    /// Which device runs the model, and why (`Display`: the sentence to log).
    pub fn selected(&self) -> &Selected {
        &self.selected
    }

    /// `cpu` or `cuda:N`.
    pub fn device_id(&self) -> String {
        match &self.selected {
            Selected::Cpu { .. } => "cpu".into(),
            Selected::Cuda { device } => format!("cuda:{}", device.ordinal),
        }
    }

    /// The resident tier's counters (`None` on the CPU).
    pub fn tier_stats(&self) -> Option<TierStats> {
        match &self.device {
            Device::Cpu => None,
            Device::Cuda(c) => c.tier_stats().ok(),
        }
    }

    /// Keeps `block`, as stored, resident under `key` on a GPU (an 8-bit document's block
    /// right after its ingest wrote it: phase 1's own output is 16-bit, and the tier
    /// must hold what the store holds), so the first question finds it there. Nothing on
    /// the CPU, whose loads go through the service's decoded-block cache.
    pub fn keep_resident(&self, key: BlockId, block: &BlockKv) -> Result<()> {
        match &self.device {
            Device::Cpu => Ok(()),
            Device::Cuda(c) => guarded(|| c.keep_resident(key, block).map(drop)),
        }
    }

    /// Drops every resident block (e.g. to measure loads from the store, or after a
    /// block was repaired); running queries keep the blocks they hold.
    pub fn forget_resident(&self) {
        if let Device::Cuda(c) = &self.device {
            c.forget_resident();
        }
    }

    /// Selective global re-encoding of a document's phase-1 blocks (all of them, in
    /// order, in host memory), in place: see [`crate::star::reencode`]. On a GPU the pass
    /// runs there ([`crate::cuda::reencode`]); env `STARKV_REENCODE_DEVICE=cpu` runs it on
    /// the CPU model instead (A/B runs).
    pub fn reencode(
        &self,
        model: &Llama,
        tokens: &[u32],
        blocks: &mut [BlockKv],
        exact_until: usize,
        ratio: f32,
    ) -> Result<Reencoded> {
        let on_cpu = matches!(
            std::env::var("STARKV_REENCODE_DEVICE").as_deref(),
            Ok("cpu")
        );
        match &self.device {
            Device::Cuda(c) if !on_cpu => {
                guarded(|| c.reencode(tokens, blocks, exact_until, ratio))
            }
            _ => crate::star::reencode::reencode(model, tokens, blocks, exact_until, ratio),
        }
    }

    /// Phase 1 for `tokens`, one block at a time in any order (see [`BlockEncoder`]).
    pub fn phase1<'a>(
        &'a self,
        model: &'a Llama,
        tokens: &'a [u32],
        config: StarConfig,
    ) -> Result<BlockEncoder<'a>> {
        let phase1 = Phase1::new(model, tokens, config)?;
        let device = match &self.device {
            Device::Cpu => EncoderDevice::Cpu {
                anchor: None,
                shape: model.head_shape(),
            },
            Device::Cuda(c) => EncoderDevice::Cuda(c.encoder()),
        };
        Ok(BlockEncoder {
            phase1,
            tokens,
            device,
        })
    }

    /// Phase 2: answers `query` (question and assistant header, at the positions right
    /// after the context) over the context blocks `keys` (in document order) and the
    /// context held by `shards` (other devices or hosts), generating with `params`.
    /// `load(i)` supplies block `i` from host memory; it is called only for blocks the
    /// device does not hold (on the CPU: for every block), never while the GPU is locked,
    /// so it may itself encode blocks (repair). Every layer's Q goes to all shards at
    /// once; their partial results merge exactly with this device's part.
    #[allow(clippy::too_many_arguments)]
    pub fn answer<E: From<Error>>(
        &self,
        loaded: &LoadedModel,
        keys: &[BlockId],
        load: &mut dyn FnMut(usize) -> Result<Arc<BlockKv>, E>,
        shards: &[Arc<dyn AttentionShard>],
        query: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer, E> {
        match &self.device {
            Device::Cpu => {
                let started = Instant::now();
                let blocks = (0..keys.len())
                    .map(|i| {
                        params.cancel.check()?;
                        load(i)
                    })
                    .collect::<Result<_, E>>()?;
                let load = started.elapsed();
                let generation = cpu_answer(loaded, blocks, shards, query, params, on_text)?;
                Ok(Answer {
                    generation,
                    load,
                    resident_blocks: 0,
                    cold: None,
                })
            }
            Device::Cuda(c) => guarded(|| {
                c.answer(
                    &loaded.tokenizer,
                    keys,
                    load,
                    shards,
                    query,
                    params,
                    on_text,
                )
            }),
        }
    }

    /// The blocks `keys` on this device as one [`AttentionShard`] (what a shard worker
    /// serves), attended at softmax scale `score_scale / sqrt(d)` (1, or `1 / T` for the
    /// tempered group of a [`ContextMerge`]): on the CPU the loaded blocks themselves; on
    /// a GPU the resident copies, the others loaded with `load(i)`, uploaded and kept
    /// resident.
    pub fn shard<E: From<Error>>(
        &self,
        loaded: &LoadedModel,
        keys: &[BlockId],
        score_scale: f32,
        load: &mut dyn FnMut(usize) -> Result<Arc<BlockKv>, E>,
    ) -> Result<Arc<dyn AttentionShard>, E> {
        match &self.device {
            Device::Cpu => {
                let blocks = (0..keys.len()).map(&mut *load).collect::<Result<_, E>>()?;
                let shape = loaded.model.head_shape();
                Ok(Arc::new(CpuShard::scaled(blocks, shape, score_scale)))
            }
            Device::Cuda(c) => guarded(|| c.shard(keys, score_scale, load)),
        }
    }

    /// The 16-bit type this backend reads stored blocks in, when it has a cold path
    /// ([`Backend::answer_stored`]): the GPU's type on a GPU, `None` on the CPU (which
    /// takes f32 blocks through [`Backend::answer`]'s `load`). Stores written on this
    /// host should keep blocks in this type: loading is then a copy.
    pub fn stored_half_type(&self) -> Option<HalfType> {
        match &self.device {
            Device::Cpu => None,
            Device::Cuda(c) => Some(c.half_type()),
        }
    }

    /// Phase 2 over a stored document on a GPU: the blocks that are not resident are
    /// read from the store (through `stored.reader`, straight into page-locked staging)
    /// and re-encoded from the source tokens at the same time, split by the measured
    /// rates; a block that cannot be read is re-encoded. A document stored in 8 bits
    /// (`stored.kv8`) is loaded in 8 bits, its re-encoded blocks quantised as the store
    /// quantises (split only with `Gpu::cold_split8`). On the CPU this is an error: use
    /// [`Backend::answer`] (see [`Backend::stored_half_type`]).
    pub fn answer_stored(
        &self,
        loaded: &LoadedModel,
        keys: &[BlockId],
        stored: &StoredContext<'_>,
        query: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        match &self.device {
            Device::Cpu => Err(Error::Device(
                "answer_stored needs a GPU; the CPU answers through answer()".into(),
            )),
            Device::Cuda(c) => {
                guarded(|| c.answer_stored(&loaded.tokenizer, keys, stored, query, params, on_text))
            }
        }
    }

    /// Phase 1 of `context` and phase 2 of `query` in one go, nothing cached (`generate
    /// --document`): on the GPU the blocks never leave the device.
    pub fn answer_document(
        &self,
        loaded: &LoadedModel,
        context: &[u32],
        config: StarConfig,
        query: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<DocumentAnswer> {
        // Checks the configuration and the context the same way on every device.
        let phase1 = Phase1::new(&loaded.model, context, config)?;
        match &self.device {
            Device::Cpu => {
                let started = Instant::now();
                let blocks: Vec<Arc<BlockKv>> =
                    phase1.encode_all()?.into_iter().map(Arc::new).collect();
                let (phase1, n_blocks) = (started.elapsed(), blocks.len());
                let generation = cpu_answer(loaded, blocks, &[], query, params, on_text)?;
                Ok(DocumentAnswer {
                    generation,
                    phase1,
                    n_blocks,
                })
            }
            Device::Cuda(c) => guarded(|| {
                c.answer_document(&loaded.tokenizer, context, config, query, params, on_text)
            }),
        }
    }

    /// Plain causal generation after `prompt` at positions `0..` (`generate --raw`,
    /// `--chat`, `--attention full`).
    pub fn generate_plain(
        &self,
        loaded: &LoadedModel,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        match &self.device {
            Device::Cpu => {
                let model = &loaded.model;
                let mut cache = KvCache::new(
                    model.config().n_layers,
                    model.head_shape(),
                    prompt.len() + params.max_tokens,
                );
                generate(
                    model,
                    &loaded.tokenizer,
                    prompt,
                    0,
                    &mut cache,
                    params,
                    on_text,
                )
            }
            Device::Cuda(c) => {
                guarded(|| c.generate_plain(&loaded.tokenizer, prompt, params, on_text))
            }
        }
    }
}

/// Phase 2 on the CPU over `blocks` (in any order) and the context of `shards`.
fn cpu_answer(
    loaded: &LoadedModel,
    blocks: Vec<Arc<BlockKv>>,
    shards: &[Arc<dyn AttentionShard>],
    query: &[u32],
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    let model = &loaded.model;
    let (n_layers, shape) = (model.config().n_layers, model.head_shape());
    let merge = params.merge;
    // Shards of workers answer for either group (see `AttentionShard::tempered`).
    let (remote_tempered, remote_plain): (Vec<_>, Vec<_>) = shards
        .iter()
        .map(|s| s.as_ref())
        .partition(|s| s.tempered());
    if merge.is_exact() && !remote_tempered.is_empty() {
        return Err(Error::InvalidInput(
            "tempered shards need a tempered merge".into(),
        ));
    }
    let (tempered, plain): (Vec<_>, Vec<_>) =
        blocks.into_iter().partition(|b| merge.is_tempered(b.start));
    let shard = CpuShard::new(plain, shape);
    let tempered = CpuShard::tempered(tempered, shape, merge);
    let mut all: Vec<&dyn AttentionShard> = Vec::with_capacity(shards.len() + 1);
    if shard.n_tokens() > 0 {
        all.push(&shard);
    }
    all.extend(remote_plain);
    let mut group: Vec<&dyn AttentionShard> = Vec::with_capacity(remote_tempered.len() + 1);
    if tempered.n_tokens() > 0 {
        group.push(&tempered);
    }
    group.extend(remote_tempered);
    let capacity = query.len() + params.max_tokens;
    let mut attention = QueryAttention::new(all, n_layers, shape, capacity);
    if !group.is_empty() {
        attention = attention.with_tempered(group, merge);
    }
    let context_len = attention.context_len();
    generate(
        model,
        &loaded.tokenizer,
        query,
        context_len,
        &mut attention,
        params,
        on_text,
    )
}

/// Phase 1 of one context, block by block in any order (ingest encodes the blocks whose
/// key is not stored yet; repair encodes one). Block 0 is encoded alone; every other
/// block as `[anchor | block]`. The anchor's KV is computed once, lazily: the prefix of
/// block 0 when block 0 was encoded first, else the anchor tokens encoded alone.
pub struct BlockEncoder<'a> {
    phase1: Phase1<'a>,
    tokens: &'a [u32],
    device: EncoderDevice<'a>,
}

enum EncoderDevice<'a> {
    Cpu {
        anchor: Option<BlockKv>,
        shape: HeadShape,
    },
    Cuda(cuda::GpuEncoder<'a>),
}

impl BlockEncoder<'_> {
    pub fn n_blocks(&self) -> usize {
        self.phase1.n_blocks()
    }

    /// Token range (= global positions) of block `i`.
    pub fn block_range(&self, i: usize) -> Range<usize> {
        self.phase1.block_range(i)
    }

    /// The tokens encoded in front of block `i` and dropped (see [`StarConfig`]'s
    /// overlap; empty without one).
    pub fn lead_range(&self, i: usize) -> Range<usize> {
        self.phase1.lead_range(i)
    }

    pub fn anchor_tokens(&self) -> &[u32] {
        self.phase1.anchor_tokens()
    }

    /// Block `i`'s KV in host memory (for the store), whichever device computed it.
    pub fn encode_block(&mut self, i: usize) -> Result<BlockKv> {
        self.encode(i, None)
    }

    /// [`BlockEncoder::encode_block`], and on a GPU also keeps the encoded block in the
    /// resident tier under `key`, so the first question after an ingest finds it there.
    /// The resident copy is the encoder's 16-bit output; the store's f16 copy converts
    /// back to the same values wherever they lie in f16's normal range.
    pub fn encode_block_resident(&mut self, i: usize, key: BlockId) -> Result<BlockKv> {
        self.encode(i, Some(key))
    }

    /// Every block through phase 1, then selective global re-encoding of the `ratio` of
    /// the tokens at `exact_until..` (see [`crate::star::reencode`]); each of the
    /// document's blocks then goes to `sink(i, block)`, in order (for the store). On a GPU
    /// phase 1's KV stays on the device for the pass, and the blocks are downloaded one
    /// at a time (with `keep`, one key per block, they also stay resident); env
    /// `STARKV_REENCODE_DEVICE=cpu` runs the pass on the CPU model over downloaded blocks
    /// instead (A/B runs), and `STARKV_REENCODE_DEVICE=host` on the GPU over host blocks
    /// (the older path, which uploads phase 1's KV again).
    pub fn encode_reencoded(
        &mut self,
        model: &Llama,
        backend: &Backend,
        exact_until: usize,
        ratio: f32,
        keep: Option<&[BlockId]>,
        sink: &mut dyn FnMut(usize, BlockKv) -> Result<()>,
    ) -> Result<Reencoded> {
        let n = self.n_blocks();
        if keep.is_some_and(|k| k.len() != n) {
            return Err(Error::InvalidInput(format!(
                "{} keys for {n} blocks",
                keep.map_or(0, <[BlockId]>::len)
            )));
        }
        let on_device = std::env::var("STARKV_REENCODE_DEVICE").is_err();
        if let (EncoderDevice::Cuda(enc), true) = (&mut self.device, on_device) {
            let ranges: Vec<(Range<usize>, Range<usize>)> = (0..n)
                .map(|i| (self.phase1.lead_range(i), self.phase1.block_range(i)))
                .collect();
            let anchor_len = self.phase1.anchor_tokens().len();
            let (tokens, anchor_tokens) = (self.tokens, &self.tokens[..anchor_len]);
            return guarded(|| {
                enc.encode_reencoded(
                    tokens,
                    &ranges,
                    anchor_tokens,
                    exact_until,
                    ratio,
                    keep,
                    sink,
                )
            });
        }
        let mut blocks = (0..n)
            .map(|i| self.encode(i, None))
            .collect::<Result<Vec<_>>>()?;
        let done = backend.reencode(model, self.tokens, &mut blocks, exact_until, ratio)?;
        for (i, block) in blocks.into_iter().enumerate() {
            sink(i, block)?;
        }
        Ok(done)
    }

    fn encode(&mut self, i: usize, keep: Option<BlockId>) -> Result<BlockKv> {
        if i >= self.n_blocks() {
            return Err(Error::InvalidInput(format!(
                "block {i} of {}",
                self.n_blocks()
            )));
        }
        let anchor_len = self.phase1.anchor_tokens().len();
        match &mut self.device {
            EncoderDevice::Cpu { anchor, shape } => {
                if i == 0 && anchor_len <= self.phase1.block_range(0).len() {
                    let none = BlockKv::new(0, 0, *shape, 0);
                    let block = self.phase1.encode_block(0, &none)?;
                    if anchor.is_none() {
                        *anchor = Some(block.prefix(anchor_len));
                    }
                    return Ok(block);
                }
                if anchor.is_none() {
                    *anchor = Some(self.phase1.encode_anchor()?);
                }
                let anchor = anchor.as_ref().expect("set above");
                self.phase1.encode_block(i, anchor)
            }
            EncoderDevice::Cuda(enc) => {
                let ranges = (self.phase1.lead_range(i), self.phase1.block_range(i));
                let anchor_tokens = &self.tokens[..anchor_len];
                guarded(|| enc.encode_block(self.tokens, ranges, anchor_tokens, keep))
            }
        }
    }
}

/// Runs `f`, turning a panic (a bug in a device call, a driver library missing a symbol)
/// into an error: a failing GPU call must fail one request, never the server.
fn guarded<T, E: From<Error>>(f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(Error::Device(format!("a device call panicked: {what}")).into())
    })
}
