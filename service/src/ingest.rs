//! Ingest: a document's text to stored blocks with Star Attention phase 1 (blocks whose
//! content key is already stored are reused, not re-encoded), published blocks first,
//! manifest last.

use std::sync::Arc;
use std::time::Instant;

use starkv_cache::{BlockStore, DType, DocRef, DocSpec, MergeOptions};
use starkv_compute::backend::BlockId;
use starkv_compute::prompt;
use starkv_compute::star::{BlockKv, StarConfig};

use crate::kv::{KV_LAYOUT_VERSION, from_tensors, to_tensors};
use crate::{Service, ServiceError, ServiceResult};

/// An ingest request, validated by the HTTP layer.
#[derive(Debug, Clone)]
pub struct IngestRequest {
    pub id: String,
    pub tenant: String,
    pub text: String,
    pub block_size: usize,
    pub anchor_size: usize,
    /// Tokens before each block that its phase 1 encodes in front of it and drops
    /// (issue 14; see [`StarConfig`]'s `overlap`).
    pub block_overlap: usize,
    /// How the blocks merge at query time (APE's tempered merge unless exact).
    pub merge: MergeOptions,
    /// Fraction (`0..=1`) of the tokens after the anchor re-encoded with global
    /// attention after phase 1 (issue 14; see [`starkv_compute::star::reencode`]).
    pub reencode_ratio: f32,
    pub pinned: bool,
    pub ttl_ms: Option<u64>,
    /// How the document's KV is stored and held.
    pub kv_dtype: KvDtype,
}

/// The precision of a document's KV, chosen per document at ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// 16 bits: f16 on a CPU host, the GPU's 16-bit type (bf16) on a GPU host.
    #[default]
    F16,
    /// Symmetric int8 with one f16 scale per token and KV head (about 0.52x the bytes of
    /// f16 before compression), held and attended in 8 bits on the CPU.
    Int8,
    /// OCP FP8 E4M3 (e4m3fn) with one f16 scale per token and KV head (the int8 layout,
    /// [`DType::F8`]), held and attended in 8 bits on the CPU and the GPU.
    ///
    /// Why one scale per token and head and not per block and head: measured by
    /// `benches/kv8.rs` (2026-12-02, SmolLM2, a 4K-token needle document, b = 1024),
    /// per-block scales save only the scales' bytes (at rest 0.491x of f16 against
    /// 0.511x; the e4m3 exponent absorbs the scale, so the values' entropy is the same,
    /// 6.71 against 6.73 bits) but double the first-token logit error against f32
    /// (0.45 against 0.23-0.25; int8 per token: 0.09-0.11). Both meet the 0.55x-of-f16
    /// goal; neither reaches 0.55x of bf16 (0.62x and 0.64x).
    Fp8,
}

impl KvDtype {
    /// Every accepted value, as a request spells it.
    pub const NAMES: [&'static str; 3] = ["f16", "int8", "fp8"];

    /// The request's spelling.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F16 => "f16",
            KvDtype::Int8 => "int8",
            KvDtype::Fp8 => "fp8",
        }
    }

    /// Parses a request's value (`f16`, `int8`, `fp8`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f16" => Some(KvDtype::F16),
            "int8" => Some(KvDtype::Int8),
            "fp8" => Some(KvDtype::Fp8),
            _ => None,
        }
    }

    /// The request's spelling of a stored type (`bf16` on a GPU host is the 16-bit
    /// choice too).
    pub fn of_stored(dtype: DType) -> Self {
        match dtype {
            DType::I8 => KvDtype::Int8,
            DType::F8 => KvDtype::Fp8,
            _ => KvDtype::F16,
        }
    }
}

#[derive(Debug, Clone)]
pub struct IngestOutcome {
    pub doc: DocRef,
    pub tokens: usize,
    pub blocks: usize,
    /// Blocks whose content key was already stored (not re-encoded).
    pub reused_blocks: usize,
    pub seconds: f64,
}

impl Service {
    /// Context tokens of a document text (what ingest stores and encodes).
    pub fn document_tokens(&self, text: &str) -> ServiceResult<Vec<u32>> {
        Ok(prompt::document_context(
            &self.model().tokenizer,
            None,
            text,
        )?)
    }

    /// Phase 1: encodes the blocks whose content key is not stored yet, then publishes the
    /// document (blocks first, manifest last). `progress(done, total)` follows the blocks.
    /// With a cluster configured, the blocks are encoded and kept by its workers.
    pub fn ingest(
        &self,
        req: &IngestRequest,
        tokens: Vec<u32>,
        progress: &dyn Fn(usize, usize),
    ) -> ServiceResult<IngestOutcome> {
        if let Some(cluster) = &self.cluster {
            return cluster.ingest(self, req, tokens, progress);
        }
        let dtype = self.stored_dtype(req.kv_dtype);
        self.ingest_part(req, tokens, None, dtype, progress)
    }

    /// The stored type of a document's KV asked as `kv_dtype`: 8 bits, or the device's
    /// 16-bit type on a GPU host (a cold load is then a copy), else f16. Part of every
    /// block key; a cluster's coordinator picks it once and its workers store that type
    /// whatever their device (so CPU and GPU workers can hold one document).
    pub(crate) fn stored_dtype(&self, kv_dtype: KvDtype) -> DType {
        match kv_dtype {
            KvDtype::F16 => crate::cold::kv_dtype(self.backend.stored_half_type()),
            KvDtype::Int8 => DType::I8,
            KvDtype::Fp8 => DType::F8,
        }
    }

    /// Phase 1 of the blocks `part` of a document (block index and the content key the
    /// caller computed; `None`: every block), stored as `dtype` and published as this
    /// store's version of the document. A shard worker keeps its part of a document this
    /// way; a key that differs from the one computed here (another model or KV layout)
    /// is refused.
    pub(crate) fn ingest_part(
        &self,
        req: &IngestRequest,
        tokens: Vec<u32>,
        part: Option<&[(usize, BlockId)]>,
        dtype: DType,
        progress: &dyn Fn(usize, usize),
    ) -> ServiceResult<IngestOutcome> {
        let started = Instant::now();
        let config = StarConfig::with_anchor(req.block_size, req.anchor_size)
            .with_overlap(req.block_overlap);
        let mut encoder = self.backend.phase1(&self.model().model, &tokens, config)?;
        let spec = self.doc_spec(req, &tokens, dtype);
        let spec_dtype = spec.dtype;
        let mut ingest = self.store.begin_ingest(spec)?;
        let anchor_tokens = encoder.anchor_tokens().to_vec();
        let n_blocks = encoder.n_blocks();
        let blocks: Vec<(usize, Option<BlockId>)> = match part {
            None => (0..n_blocks).map(|i| (i, None)).collect(),
            Some(part) => {
                let mut part = part.to_vec();
                part.sort_by_key(|&(i, _)| i);
                part.dedup_by_key(|&mut (i, _)| i);
                if let Some(&(bad, _)) = part.iter().find(|&&(i, _)| i >= n_blocks) {
                    return Err(ServiceError::Invalid(format!(
                        "block {bad} of a document of {n_blocks} blocks"
                    )));
                }
                part.into_iter().map(|(i, k)| (i, Some(k))).collect()
            }
        };
        if req.reencode_ratio > 0.0 {
            return self
                .ingest_reencoded(req, &tokens, &blocks, encoder, ingest, started, progress);
        }
        let mut reused = 0;
        progress(0, blocks.len());
        for (done, &(i, expected)) in blocks.iter().enumerate() {
            let range = encoder.block_range(i);
            let context = plain_key_context(&anchor_tokens, &tokens[encoder.lead_range(i)]);
            let content = ingest.block_key(&context, &tokens[range.clone()], range.start as u64);
            let key = self.dedup.store_key(&req.tenant, content);
            if expected.is_some_and(|k| k != key.0) {
                return Err(ServiceError::Conflict(format!(
                    "block {i}: the content key differs from the coordinator's (another model file or KV layout)"
                )));
            }
            if ingest.reuse_block(key, range.start as u64, range.len() as u32) {
                reused += 1;
            } else {
                // An 8-bit document's blocks are kept resident as stored (8 bits), not as
                // encoded (16 bits on a GPU): every query attends to the same values.
                let quantized = spec_dtype.is_quantized();
                let block = if quantized {
                    encoder.encode_block(i)?
                } else {
                    encoder.encode_block_resident(i, key.0)?
                };
                let tensors = to_tensors(&block, spec_dtype)?;
                ingest.put_block(key, range.start as u64, range.len() as u32, &tensors)?;
                if quantized {
                    self.keep_stored_resident(key.0, range.start, tensors)?;
                }
            }
            progress(done + 1, blocks.len());
        }
        let doc = ingest.commit()?;
        Ok(IngestOutcome {
            doc,
            tokens: tokens.len(),
            blocks: blocks.len(),
            reused_blocks: reused,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// An 8-bit block as written to the store (`tensors`), kept resident on a GPU under
    /// `key` so the first question after the ingest finds it there (phase 1's own output
    /// is 16-bit and not what later queries read). Nothing on the CPU. Best effort: the
    /// block is stored, so a device that cannot take it (out of memory) only logs it.
    fn keep_stored_resident(
        &self,
        key: BlockId,
        start: usize,
        tensors: Vec<starkv_cache::Tensor>,
    ) -> ServiceResult<()> {
        if self.backend.stored_half_type().is_none() {
            return Ok(());
        }
        let layers: Vec<Arc<_>> = tensors.into_iter().map(Arc::new).collect();
        let stored = from_tensors(&layers, start, self.shape(), false)?;
        if let Err(e) = self.backend.keep_resident(key, &stored) {
            tracing::warn!(error = %e, start, "an 8-bit block was stored but not kept on the GPU");
        }
        Ok(())
    }

    /// The store's description of a document: the fingerprints and layout every block
    /// key depends on.
    fn doc_spec(&self, req: &IngestRequest, tokens: &[u32], dtype: DType) -> DocSpec {
        let mut spec = DocSpec::new(req.id.clone(), req.tenant.clone());
        spec.model_fingerprint = self.model_fingerprint().to_vec();
        spec.tokenizer_fingerprint = self.model().tokenizer.fingerprint().to_vec();
        spec.kv_layout_version = KV_LAYOUT_VERSION;
        // Part of every block key (see `stored_dtype`): 8-bit KV is different KV.
        spec.dtype = dtype;
        spec.block_size = req.block_size as u32;
        spec.anchor_size = req.anchor_size as u32;
        spec.block_overlap = req.block_overlap as u32;
        spec.merge = req.merge;
        spec.reencode_ppm = reencode_ppm(req.reencode_ratio);
        spec.source_tokens = tokens.to_vec();
        spec.pinned = req.pinned;
        spec.ttl_ms = req.ttl_ms;
        spec
    }

    /// The key of block `range` of `tokens` of `tenant` (a document of `config`'s anchor
    /// and overlap), stored as `dtype`, as this service's store computes it (model
    /// fingerprint, KV layout, dtype, anchor, the block's lead, block tokens and start,
    /// scoped to the tenant by [`DedupScope`]; for a document re-encoded at
    /// `reencode_ratio` > 0, the whole document in place of the anchor and the lead).
    pub(crate) fn block_key(
        &self,
        tenant: &str,
        tokens: &[u32],
        config: StarConfig,
        reencode_ratio: f32,
        range: std::ops::Range<usize>,
        dtype: DType,
    ) -> BlockId {
        let anchor_size = config.anchor_size;
        let req = IngestRequest {
            id: String::new(),
            tenant: String::new(),
            text: String::new(),
            block_size: range.len().max(1),
            anchor_size,
            block_overlap: config.overlap,
            merge: MergeOptions::default(),
            reencode_ratio: 0.0,
            pinned: false,
            ttl_ms: None,
            kv_dtype: KvDtype::F16,
        };
        let mut spec = self.doc_spec(&req, &[], dtype);
        spec.anchor_size = anchor_size as u32;
        let context = if reencode_ratio > 0.0 {
            reencode_key_context(tokens, reencode_ratio, config.overlap)
        } else {
            let anchor = &tokens[..anchor_size.min(tokens.len())];
            plain_key_context(anchor, &tokens[config.lead(range.clone(), anchor.len())])
        };
        let content =
            BlockStore::block_key(&spec, &context, &tokens[range.clone()], range.start as u64);
        self.dedup.store_key(tenant, content).0
    }
}

/// The ratio a re-encode ratio in millionths stands for: what an ingest re-encodes with
/// (not the caller's own f32), so that a worker given the millionths and a repair
/// reading them from the manifest select the same tokens.
pub(crate) fn reencode_ratio_of(ppm: u32) -> f32 {
    (f64::from(ppm) * 1e-6) as f32
}

/// A re-encode ratio in millionths, as the manifest records it.
pub(crate) fn reencode_ppm(ratio: f32) -> u32 {
    (ratio.clamp(0.0, 1.0) as f64 * 1e6).round() as u32
}

/// What a re-encoded block's key is computed over in place of the anchor tokens: the
/// whole document, the ratio and the overlap (when there is one), since every block's
/// KV now depends on all the tokens before it and on how phase 1 encoded them. The
/// markers are no token ids (ids are below 2^31), so no plain key can collide with it.
fn reencode_key_context(tokens: &[u32], ratio: f32, overlap: usize) -> Vec<u32> {
    let mut context = tokens.to_vec();
    context.extend([u32::MAX, reencode_ppm(ratio)]);
    if overlap > 0 {
        context.extend([LEAD_MARKER, overlap as u32]);
    }
    context
}

/// Marks the lead's part of a key context (no token id: ids are below 2^31).
const LEAD_MARKER: u32 = u32::MAX - 1;

/// What a plain block's key is computed over in place of the anchor tokens: the anchor
/// and, when the block has a lead (see [`StarConfig`]'s overlap), a marker, the lead's
/// length and its tokens, since the block's KV depends on them. Without a lead it is the
/// anchor alone, so the keys of blocks stored before the overlap existed are unchanged.
pub(crate) fn plain_key_context(anchor: &[u32], lead: &[u32]) -> Vec<u32> {
    let mut context = anchor.to_vec();
    if !lead.is_empty() {
        context.extend([LEAD_MARKER, lead.len() as u32]);
        context.extend_from_slice(lead);
    }
    context
}

impl Service {
    /// Ingest with selective re-encoding: phase 1 for every block, then the re-encoding
    /// pass over the whole document (on the backend's device), then the blocks `part`
    /// (index and, from a coordinator, the expected key) stored; blocks already stored
    /// under the same keys (the same document and ratio) are reused. A shard worker
    /// computes the whole document this way and keeps its part: every re-encoded block
    /// depends on all the blocks before it.
    #[allow(clippy::too_many_arguments)]
    fn ingest_reencoded(
        &self,
        req: &IngestRequest,
        tokens: &[u32],
        part: &[(usize, Option<BlockId>)],
        mut encoder: starkv_compute::backend::BlockEncoder<'_>,
        mut ingest: starkv_cache::Ingest,
        started: Instant,
        progress: &dyn Fn(usize, usize),
    ) -> ServiceResult<IngestOutcome> {
        let n_blocks = encoder.n_blocks();
        let whole = part.len() == n_blocks;
        let key_context = reencode_key_context(tokens, req.reencode_ratio, req.block_overlap);
        let mut keys = Vec::with_capacity(n_blocks);
        // Blocks kept here: computed and stored unless already stored.
        let mut kept = vec![false; n_blocks];
        let mut reused = vec![false; n_blocks];
        for i in 0..n_blocks {
            let range = encoder.block_range(i);
            let content =
                ingest.block_key(&key_context, &tokens[range.clone()], range.start as u64);
            keys.push(self.dedup.store_key(&req.tenant, content));
        }
        for &(i, expected) in part {
            if expected.is_some_and(|k| k != keys[i].0) {
                return Err(ServiceError::Conflict(format!(
                    "block {i}: the content key differs from the coordinator's (another model file or KV layout)"
                )));
            }
            let range = encoder.block_range(i);
            kept[i] = true;
            reused[i] = ingest.reuse_block(keys[i], range.start as u64, range.len() as u32);
        }
        // Phase 1, the re-encoding pass and the writes count as one step per block each.
        let total = 3 * n_blocks;
        progress(0, total);
        if (0..n_blocks).any(|i| kept[i] && !reused[i]) {
            let exact_until = req.anchor_size.max(req.block_size);
            let dtype = ingest.spec().dtype;
            // 8-bit documents are kept resident as stored, not as encoded (as in
            // `ingest_part`); a worker's part is not kept (the other blocks are not its
            // own).
            let ids: Vec<BlockId> = keys.iter().map(|k| k.0).collect();
            let keep = (!dtype.is_quantized() && whole).then_some(&ids[..]);
            let keep_stored = dtype.is_quantized() && whole;
            let ranges: Vec<_> = (0..n_blocks).map(|i| encoder.block_range(i)).collect();
            // Blocks arrive one at a time after the pass; a store error stops the rest.
            let mut failed: Option<ServiceError> = None;
            let mut store = |i: usize, block: BlockKv| -> starkv_compute::Result<()> {
                progress(2 * n_blocks + i, total);
                let stored = if reused[i] || !kept[i] {
                    Ok(())
                } else {
                    to_tensors(&block, dtype).and_then(|t| {
                        let range = &ranges[i];
                        ingest
                            .put_block(keys[i], range.start as u64, range.len() as u32, &t)
                            .map_err(ServiceError::from)?;
                        if keep_stored {
                            self.keep_stored_resident(keys[i].0, range.start, t)?;
                        }
                        Ok(())
                    })
                };
                stored.map_err(|e| {
                    failed = Some(e);
                    starkv_compute::Error::Cancelled
                })
            };
            let outcome = encoder.encode_reencoded(
                &self.model().model,
                &self.backend,
                exact_until,
                reencode_ratio_of(reencode_ppm(req.reencode_ratio)),
                keep,
                &mut store,
            );
            if let Some(e) = failed {
                return Err(e);
            }
            outcome?;
            progress(total, total);
        }
        let doc = ingest.commit()?;
        Ok(IngestOutcome {
            doc,
            tokens: tokens.len(),
            blocks: part.len(),
            reused_blocks: reused.iter().filter(|&&r| r).count(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
