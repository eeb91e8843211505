//! The CUDA side of [`super::Backend`]: the model uploaded once, the resident block tier,
//! and the three entry points (phase 1, phase 2, plain generation) on one GPU.
//!
//! One lock per GPU for the model (its activation scratch is per model): queries, plain
//! generations and ingest blocks take it in turn, so a long generation delays the next
//! request on the same GPU. Running several of them at once on one GPU (a scratch per
//! request, or batching) is a later step. The tier has its own short-held lock, so
//! lookups, statistics and `forget_resident` never wait for a running generation; when
//! both are held, the model lock is taken first.
//!
//! Every entry point binds the GPU's context to the calling thread first: service calls
//! come from arbitrary worker threads and cudarc's raw `result::` calls use the current
//! context.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::{Answer, BlockId, DocumentAnswer, StoredContext, TierStats};
use crate::cuda::cold::{ColdLoad, ColdMode, ColdRates, StagingPool};
use crate::cuda::star::{
    BlockTier, ContextBlocks, GpuBlock, GpuQuery, GpuShard, encode_block, encode_block_after,
    encode_context,
};
use crate::cuda::{CudaError, CudaLlama, Gpu, GpuAttention, GpuKvCache, HalfType};
use crate::error::{Error, Result};
use crate::generate::{GenerateParams, Generation, generate_picked, generate_with};
use crate::model::Llama;
use crate::star::reencode::Reencoded;
use crate::star::{AttentionShard, BlockKv, StarConfig};
use crate::tokenizer::Tokenizer;

pub(super) struct CudaBackend {
    gpu: Arc<Gpu>,
    model: Mutex<CudaLlama>,
    tier: Mutex<BlockTier<BlockId, GpuBlock>>,
    /// Page-locked staging reused by cold loads.
    staging: StagingPool,
    /// Seconds per token of the last cold load's loading and re-encoding (the next one's
    /// starting estimates for the split).
    cold_rates: Mutex<ColdRates>,
    /// The same for documents stored in 8 bits.
    cold_rates8: Mutex<ColdRates>,
}

impl CudaBackend {
    /// Uploads `model`; the tier gets `tier_bytes` or half of the memory left free.
    pub(super) fn new(
        gpu: Arc<Gpu>,
        model: &Llama,
        tier_bytes: Option<usize>,
    ) -> Result<Self, CudaError> {
        gpu.ctx.bind_to_thread()?;
        let uploaded = CudaLlama::upload(gpu.clone(), model)?;
        let budget = match tier_bytes {
            Some(bytes) => bytes,
            None => gpu.mem_info()?.0 / 2,
        };
        tracing::info!(
            device = %gpu.info,
            weights_mb = uploaded.weight_bytes() as f64 / 1e6,
            tier_mb = budget as f64 / 1e6,
            "model uploaded to the GPU"
        );
        Ok(Self {
            gpu,
            model: Mutex::new(uploaded),
            tier: Mutex::new(BlockTier::new(budget)),
            staging: StagingPool::default(),
            cold_rates: Mutex::new(ColdRates::default()),
            cold_rates8: Mutex::new(ColdRates::default()),
        })
    }

    /// The model, with the GPU's context bound to this thread. A panic during an earlier
    /// call does not poison the GPU for good: the next forward pass rewrites all scratch.
    fn lock_model(&self) -> Result<MutexGuard<'_, CudaLlama>> {
        self.gpu.ctx.bind_to_thread().map_err(CudaError::from)?;
        Ok(self.model.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn lock_tier(&self) -> MutexGuard<'_, BlockTier<BlockId, GpuBlock>> {
        self.tier.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn half_type(&self) -> HalfType {
        self.gpu.dtype
    }

    pub(super) fn tier_stats(&self) -> Result<TierStats> {
        let tier = self.lock_tier();
        Ok(TierStats {
            blocks: tier.len(),
            used_bytes: tier.used_bytes(),
            budget_bytes: tier.budget_bytes(),
            hits: tier.hits,
            misses: tier.misses,
            evictions: tier.evictions,
        })
    }

    /// `block` uploaded as it is (8 bits stay 8 bits) and kept in the tier under `key`.
    pub(super) fn keep_resident(&self, key: BlockId, block: &BlockKv) -> Result<Arc<GpuBlock>> {
        let up = {
            let _model = self.lock_model()?;
            Arc::new(GpuBlock::upload(&self.gpu, block)?)
        };
        self.lock_tier().insert(key, up.clone());
        Ok(up)
    }

    pub(super) fn forget_resident(&self) {
        // Freed blocks go back to the device's pool: bind first (best effort).
        let _ = self.gpu.ctx.bind_to_thread();
        self.lock_tier().clear();
    }

    pub(super) fn encoder(&self) -> GpuEncoder<'_> {
        GpuEncoder {
            cuda: self,
            anchor: None,
        }
    }

    /// Selective re-encoding of a document's host blocks on this GPU (see
    /// [`crate::cuda::reencode`]).
    pub(super) fn reencode(
        &self,
        tokens: &[u32],
        blocks: &mut [BlockKv],
        exact_until: usize,
        ratio: f32,
    ) -> Result<Reencoded> {
        let mut model = self.lock_model()?;
        Ok(crate::cuda::reencode::reencode(
            &mut model,
            tokens,
            blocks,
            exact_until,
            ratio,
        )?)
    }

    /// Phase 2: resident blocks from the tier, the others loaded by `load` (without any
    /// GPU lock held) and streamed in one layer ahead; afterwards every block is resident.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn answer<E: From<Error>>(
        &self,
        tokenizer: &Tokenizer,
        keys: &[BlockId],
        load: &mut dyn FnMut(usize) -> Result<Arc<BlockKv>, E>,
        shards: &[Arc<dyn AttentionShard>],
        query: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer, E> {
        let started = Instant::now();
        let found: Vec<Option<Arc<GpuBlock>>> = {
            let mut tier = self.lock_tier();
            keys.iter().map(|k| tier.get(k)).collect()
        };
        // Counted before the loads: 8-bit blocks loaded below join `resident` too.
        let resident_blocks = found.iter().flatten().count();
        let (mut resident, mut host, mut host_keys) = (Vec::new(), Vec::new(), Vec::new());
        for (i, block) in found.into_iter().enumerate() {
            match block {
                Some(b) => resident.push(b),
                None => {
                    params.cancel.check()?;
                    let block = load(i)?;
                    if block.is_8bit() {
                        // Kept in 8 bits in the tier and attended in 8 bits: uploaded
                        // now (half the bytes of a 16-bit block), resident from here on.
                        resident.push(self.keep_resident(keys[i], &block)?);
                    } else {
                        host.push(block);
                        host_keys.push(keys[i]);
                    }
                }
            }
        }
        let load_time = started.elapsed();
        let generation = self.query(
            tokenizer, resident, host, &host_keys, shards, query, params, on_text,
        )?;
        Ok(Answer {
            generation,
            load: load_time,
            resident_blocks,
            cold: None,
        })
    }

    /// Phase 2 over a stored document: resident blocks from the tier, the others brought
    /// in by a cold load (read from the store and re-encoded at once, see
    /// [`crate::cuda::cold`]), all resident afterwards. No host copy of a block is kept.
    pub(super) fn answer_stored(
        &self,
        tokenizer: &Tokenizer,
        keys: &[BlockId],
        stored: &StoredContext<'_>,
        query: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        let started = Instant::now();
        let n_blocks = stored
            .tokens
            .len()
            .div_ceil(stored.config.block_size.max(1));
        if keys.len() != n_blocks {
            return Err(Error::InvalidInput(format!(
                "{} block keys for {} context blocks",
                keys.len(),
                n_blocks
            )));
        }
        let mut all: Vec<Option<Arc<GpuBlock>>> = {
            let mut tier = self.lock_tier();
            keys.iter().map(|k| tier.get(k)).collect()
        };
        let resident_blocks = all.iter().flatten().count();
        let wanted: Vec<usize> = (0..all.len()).filter(|&i| all[i].is_none()).collect();
        let mut cold = None;
        if !wanted.is_empty() {
            // A cold load is not interrupted once it runs (it is one unit of work here);
            // the generation after it checks the flag again before its prefill.
            params.cancel.check()?;
            // 8-bit documents load half the bytes per token: their own rates.
            let rates_of = if stored.kv8.is_some() {
                &self.cold_rates8
            } else {
                &self.cold_rates
            };
            let rates = *rates_of.lock().unwrap_or_else(PoisonError::into_inner);
            let (blocks, stats) = ColdLoad {
                gpu: &self.gpu,
                model: &self.model,
                staging: &self.staging,
                tokens: stored.tokens,
                config: stored.config,
                reader: stored.reader,
                mode: ColdMode::Both,
                rates,
                kv8: stored.kv8,
            }
            .run(&wanted)?;
            {
                let mut r = rates_of.lock().unwrap_or_else(PoisonError::into_inner);
                r.load_s_per_token = stats.rates.load_s_per_token.or(r.load_s_per_token);
                r.encode_s_per_token = stats.rates.encode_s_per_token.or(r.encode_s_per_token);
            }
            tracing::info!(
                loaded = stats.loaded_blocks,
                encoded = stats.encoded_blocks,
                failed_reads = stats.failed_reads.len(),
                load_gb_s =
                    stats.bytes_loaded as f64 / stats.load_busy.as_secs_f64().max(1e-9) / 1e9,
                wall_ms = stats.wall.as_secs_f64() * 1e3,
                "cold load"
            );
            let mut tier = self.lock_tier();
            for (&i, block) in wanted.iter().zip(blocks) {
                tier.insert(keys[i], block.clone());
                all[i] = Some(block);
            }
            cold = Some(stats);
        }
        let all: Vec<Arc<GpuBlock>> = all.into_iter().flatten().collect();
        let load = started.elapsed();
        let mut model = self.lock_model()?;
        let capacity = query.len() + params.max_tokens;
        let mut q =
            GpuQuery::new(&model, ContextBlocks::Resident(all), capacity)?.with_merge(params.merge);
        let start = q.context_len();
        let generation = decode(&mut model, &mut q, tokenizer, query, start, params, on_text)?;
        Ok(Answer {
            generation,
            load,
            resident_blocks,
            cold,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn query(
        &self,
        tokenizer: &Tokenizer,
        resident: Vec<Arc<GpuBlock>>,
        host: Vec<Arc<BlockKv>>,
        host_keys: &[BlockId],
        shards: &[Arc<dyn AttentionShard>],
        query: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let n_resident = resident.len();
        let mut model = self.lock_model()?;
        let context = ContextBlocks::new(&self.gpu, resident, host)?;
        let mut q = GpuQuery::new(&model, context, query.len() + params.max_tokens)?
            .with_shards(&self.gpu, shards.to_vec())
            .with_merge(params.merge);
        let start = q.context_len();
        let generation = match decode(&mut model, &mut q, tokenizer, query, start, params, on_text)
        {
            Ok(g) => g,
            Err(e) => {
                // Copies from pinned host buffers may still be in flight: let them land
                // before the buffers are freed.
                let _ = self.gpu.copy_stream.synchronize();
                return Err(e);
            }
        };
        let blocks = q.into_blocks(&self.gpu)?;
        let mut tier = self.lock_tier();
        for (key, block) in host_keys.iter().zip(&blocks[n_resident..]) {
            tier.insert(*key, block.clone());
        }
        Ok(generation)
    }

    /// The blocks `keys` as a [`GpuShard`]: resident ones from the tier, the others
    /// loaded with `load(i)` (no GPU lock held), uploaded and made resident.
    pub(super) fn shard<E: From<Error>>(
        &self,
        keys: &[BlockId],
        score_scale: f32,
        load: &mut dyn FnMut(usize) -> Result<Arc<BlockKv>, E>,
    ) -> Result<Arc<dyn AttentionShard>, E> {
        let found: Vec<Option<Arc<GpuBlock>>> = {
            let mut tier = self.lock_tier();
            keys.iter().map(|k| tier.get(k)).collect()
        };
        let mut blocks = Vec::with_capacity(keys.len());
        let mut shape = None;
        for (i, block) in found.into_iter().enumerate() {
            let block = match block {
                Some(b) => b,
                None => {
                    let host = load(i)?;
                    let _model = self.lock_model()?;
                    let up = Arc::new(GpuBlock::upload(&self.gpu, &host).map_err(Error::from)?);
                    self.lock_tier().insert(keys[i], up.clone());
                    up
                }
            };
            shape = Some(block.shape);
            blocks.push(block);
        }
        let Some(shape) = shape else {
            return Err(Error::InvalidInput("a shard of no blocks".into()).into());
        };
        let shard =
            GpuShard::scaled(self.gpu.clone(), blocks, shape, score_scale).map_err(Error::from)?;
        Ok(Arc::new(shard))
    }

    pub(super) fn answer_document(
        &self,
        tokenizer: &Tokenizer,
        context: &[u32],
        config: StarConfig,
        query: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<DocumentAnswer> {
        let mut model = self.lock_model()?;
        let started = Instant::now();
        let blocks = encode_context(&mut model, context, config)?;
        self.gpu.synchronize()?;
        let (phase1, n_blocks) = (started.elapsed(), blocks.len());
        let capacity = query.len() + params.max_tokens;
        let mut q = GpuQuery::new(&model, ContextBlocks::Resident(blocks), capacity)?;
        let start = context.len();
        let generation = decode(&mut model, &mut q, tokenizer, query, start, params, on_text)?;
        Ok(DocumentAnswer {
            generation,
            phase1,
            n_blocks,
        })
    }

    pub(super) fn generate_plain(
        &self,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let mut model = self.lock_model()?;
        let n_layers = model.config().n_layers;
        let capacity = prompt.len() + params.max_tokens;
        let mut cache = GpuKvCache::new(&self.gpu, n_layers, model.head_shape(), capacity)?;
        decode(
            &mut model, &mut cache, tokenizer, prompt, 0, params, on_text,
        )
    }
}

/// The shared generation loop with the GPU forward pass as its step.
fn decode(
    model: &mut CudaLlama,
    attention: &mut dyn GpuAttention,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    start_pos: usize,
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    // Greedy without log-probabilities: tokens picked on the device, steps pipelined (the
    // next one launched before this one's pick is read), no logits to the host (while
    // [`Gpu::device_greedy`] is on).
    if params.sampling.temperature == 0.0
        && params.logprobs.is_none()
        && model.gpu().device_greedy()
    {
        let model = RefCell::new(model);
        let attention = RefCell::new(attention);
        let mut prefill = |tokens: &[u32], positions: &[usize]| -> Result<u32> {
            let (mut model, mut attention) = (model.borrow_mut(), attention.borrow_mut());
            model.forward(tokens, positions, &mut **attention)?;
            Ok(model.argmax(1)?[0].0)
        };
        let mut decode = |first: u32,
                          position: usize,
                          steps: usize,
                          on_token: &mut dyn FnMut(u32) -> bool|
         -> Result<()> {
            let (mut model, mut attention) = (model.borrow_mut(), attention.borrow_mut());
            let cancel = &params.cancel;
            model.decode_greedy_pipelined(first, position, steps, &mut **attention, |t, _| {
                on_token(t) && !cancel.is_cancelled()
            })?;
            Ok(())
        };
        return generate_picked(
            &mut prefill,
            &mut decode,
            tokenizer,
            prompt,
            start_pos,
            params,
            on_text,
        );
    }
    let mut step = |tokens: &[u32], positions: &[usize]| -> Result<Vec<f32>> {
        // One token: a decode step (a CUDA graph replay when graphs are on).
        if let (&[token], &[position]) = (tokens, positions) {
            return Ok(model.decode_logits(token, position, attention)?);
        }
        model.forward(tokens, positions, attention)?;
        Ok(model.logits(1)?)
    };
    generate_with(&mut step, tokenizer, prompt, start_pos, params, on_text)
}

/// Phase 1 on the GPU for one context. The anchor stays on the device as a
/// [`GpuBlock`] for the encoder's lifetime (never re-uploaded per block); each encoded
/// block is downloaded into a host [`BlockKv`] for the store.
pub(super) struct GpuEncoder<'a> {
    cuda: &'a CudaBackend,
    anchor: Option<GpuBlock>,
}

impl GpuEncoder<'_> {
    /// Block `range` of `tokens` (block 0 when it starts at 0) after its `lead` (see
    /// [`StarConfig::lead`]); with `keep`, the block also stays resident in the tier
    /// under that key.
    pub(super) fn encode_block(
        &mut self,
        tokens: &[u32],
        (lead, range): (Range<usize>, Range<usize>),
        anchor_tokens: &[u32],
        keep: Option<BlockId>,
    ) -> Result<BlockKv> {
        let cuda = self.cuda;
        let gpu = &cuda.gpu;
        let mut model = cuda.lock_model()?;
        let block = device_block(
            &mut model,
            &mut self.anchor,
            tokens,
            (lead, range),
            anchor_tokens,
        )?;
        let host = block.download(gpu)?;
        drop(model);
        if let Some(key) = keep {
            cuda.lock_tier().insert(key, Arc::new(block));
        }
        Ok(host)
    }

    /// Phase 1 of every block (`ranges`: lead and block, in order, covering `tokens`) written into one
    /// device copy of the document's KV, the selective re-encoding over it on the device
    /// ([`crate::cuda::reencode::reencode_document`]), then each block cut from it,
    /// downloaded and handed to `sink` in order, one at a time (the GPU is free between
    /// blocks, and only one block is in host memory at once); with `keep`, each block also
    /// stays resident under its key. Phase 1's KV never makes a host round trip.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn encode_reencoded(
        &mut self,
        tokens: &[u32],
        ranges: &[(Range<usize>, Range<usize>)],
        anchor_tokens: &[u32],
        exact_until: usize,
        ratio: f32,
        keep: Option<&[BlockId]>,
        sink: &mut dyn FnMut(usize, BlockKv) -> Result<()>,
    ) -> Result<Reencoded> {
        let cuda = self.cuda;
        let gpu = &cuda.gpu;
        let (doc, done) = {
            let mut model = cuda.lock_model()?;
            let (shape, n_layers) = (model.head_shape(), model.config().n_layers);
            let doc = GpuBlock::alloc(gpu, 0, tokens.len(), shape, n_layers)?;
            for range in ranges {
                let block = device_block(
                    &mut model,
                    &mut self.anchor,
                    tokens,
                    range.clone(),
                    anchor_tokens,
                )?;
                block.copy_into(gpu, &doc)?;
            }
            let done = crate::cuda::reencode::reencode_document(
                &mut model,
                tokens,
                &doc,
                exact_until,
                ratio,
            )?;
            (doc, done)
        };
        for (i, (_, range)) in ranges.iter().enumerate() {
            let (block, host) = {
                let _model = cuda.lock_model()?;
                let block = doc.rows(gpu, range.clone())?;
                let host = block.download(gpu)?;
                (block, host)
            };
            if let Some(key) = keep.and_then(|k| k.get(i)) {
                cuda.lock_tier().insert(*key, Arc::new(block));
            } else {
                let _bound = cuda.lock_model()?;
                drop(block);
            }
            sink(i, host)?;
        }
        let _bound = cuda.lock_model()?;
        drop(doc);
        Ok(done)
    }
}

/// Phase 1 of block `range` on the device (block 0 when it starts at 0) after its
/// `lead`, the anchor encoded once into `anchor` and reused.
fn device_block(
    model: &mut CudaLlama,
    anchor: &mut Option<GpuBlock>,
    tokens: &[u32],
    (lead, range): (Range<usize>, Range<usize>),
    anchor_tokens: &[u32],
) -> Result<GpuBlock, CudaError> {
    let gpu = model.gpu().clone();
    // With an anchor of several blocks, the blocks inside it are rows of its KV.
    let inside_long_anchor = anchor_tokens.len() > range.len() && range.end <= anchor_tokens.len();
    if inside_long_anchor {
        if anchor.is_none() {
            *anchor = Some(encode_block(model, anchor_tokens, 0, None)?);
        }
        return anchor.as_ref().expect("set above").rows(&gpu, range);
    }
    if range.start == 0 {
        let block = encode_block(model, &tokens[range], 0, None)?;
        if anchor.is_none() {
            *anchor = Some(block.prefix(&gpu, anchor_tokens.len())?);
        }
        return Ok(block);
    }
    if anchor.is_none() {
        *anchor = Some(encode_block(model, anchor_tokens, 0, None)?);
    }
    let start = range.start;
    encode_block_after(model, &tokens[lead], &tokens[range], start, anchor.as_ref())
}

impl Drop for GpuEncoder<'_> {
    fn drop(&mut self) {
        // The anchor's memory goes back to the device's pool on this thread.
        if self.anchor.is_some() {
            let _ = self.cuda.gpu.ctx.bind_to_thread();
        }
    }
}
