//! Query: phase 2 over a stored document. Blocks come from the device's resident tier,
//! the decoded-block cache or the store; a block that fails verification is re-encoded
//! from the stored source tokens (repair) and the answer is unaffected.

use std::time::{Duration, Instant};

use starkv_cache::{Manifest, MergeOptions};
use starkv_compute::backend::{BlockId, StoredContext};
use starkv_compute::cancel::Cancel;
use starkv_compute::generate::{GenerateParams, StopReason};
use starkv_compute::partial::{ContextMerge, DEFAULT_MERGE_SCALE};
use starkv_compute::prompt;
use starkv_compute::sampling::{SamplingParams, TokenLogprob};

use crate::stored::StoredBlocks;
use crate::{Service, ServiceError, ServiceResult};

#[derive(Debug, Clone)]
pub struct QueryRequest {
    pub question: String,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Set by the caller to stop the query's work (its client hung up, shutdown).
    pub cancel: Cancel,
    /// Overrides the document's merge options for this query (`None`: the manifest's).
    pub merge: Option<MergeOptions>,
    /// Each generated token's log-probability and this many alternatives (`None`: none).
    pub logprobs: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct QueryOutcome {
    pub answer: String,
    pub stop_reason: StopReason,
    pub context_tokens: usize,
    pub query_tokens: usize,
    pub generated_tokens: usize,
    pub load: Duration,
    pub first_token: Duration,
    pub total: Duration,
    /// Blocks that failed verification and were re-encoded from the stored source tokens.
    pub repaired_blocks: usize,
    /// Context blocks already resident on the GPU (not loaded; always 0 on the CPU).
    pub resident_blocks: usize,
    /// One per generated token when [`QueryRequest::logprobs`] asked for them.
    pub logprobs: Vec<TokenLogprob>,
}

impl Service {
    /// Phase 2: answers `req` over the stored blocks of `doc` (which must belong to
    /// `tenant`). A block that fails verification is re-encoded from the stored source
    /// tokens, written back, and used: the answer is unaffected.
    pub fn query(
        &self,
        doc: &str,
        tenant: &str,
        req: &QueryRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> ServiceResult<QueryOutcome> {
        if let Some(cluster) = &self.cluster {
            return cluster.query(self, doc, tenant, req, on_text);
        }
        let started = Instant::now();
        let lease = self.store.open_doc(doc)?;
        let manifest = lease.manifest().clone();
        if manifest.tenant != tenant {
            return Err(ServiceError::NotFound(format!("document {doc} not found")));
        }
        if manifest.model_fingerprint != self.model_fingerprint() {
            return Err(ServiceError::Conflict(format!(
                "document {doc} was encoded with another model; re-ingest it to query with {}",
                self.model_id()
            )));
        }
        let tokens = lease.source_tokens()?;
        let query_ids = prompt::question_query(&self.model().tokenizer, &req.question)?;
        let keys: Vec<BlockId> = manifest.blocks.iter().map(|b| b.key.0).collect();
        let params = GenerateParams {
            max_tokens: req.max_tokens,
            sampling: req.sampling.clone(),
            stop: req.stop.clone(),
            cancel: req.cancel.clone(),
            merge: context_merge(&manifest, req.merge),
            logprobs: req.logprobs,
        };
        let before_answer = started.elapsed();
        let mut repaired = 0;
        // On a GPU the cold path loads the missing blocks and re-encodes others at once (an
        // 8-bit document's loaded in 8 bits, kept so in the GPU tier and attended by the
        // 8-bit kernels; split only with `STARKV_COLD_SPLIT8=1`). Its phase-1 re-encoding
        // would undo a document's selective re-encoding: such documents go through
        // `answer` below.
        let answer = if self.backend.stored_half_type().is_some() && manifest.reencode_ppm == 0 {
            // A GPU: missing blocks are read straight into staging and re-encoded at once.
            let config = crate::star_config(&manifest);
            let reader = crate::cold::StoreReader::new(&lease);
            let stored = StoredContext {
                tokens: &tokens,
                config,
                reader: &reader,
                kv8: crate::kv::kv8_format(manifest.dtype),
            };
            let answer = self.backend.answer_stored(
                self.model(),
                &keys,
                &stored,
                &query_ids,
                &params,
                on_text,
            )?;
            repaired += self.repair_unreadable(&answer, &tokens, &manifest)?;
            answer
        } else {
            // Only blocks the device does not hold come through `load`.
            let mut stored = StoredBlocks::new(self, &lease, &manifest, &tokens[..]);
            let mut load = |i: usize| stored.load(i);
            let answer = self.backend.answer(
                self.model(),
                &keys,
                &mut load,
                &[],
                &query_ids,
                &params,
                on_text,
            )?;
            repaired += stored.repaired;
            answer
        };
        drop(lease);
        let generation = answer.generation;
        let load = before_answer + answer.load;
        Ok(QueryOutcome {
            answer: generation.text,
            stop_reason: generation.stop_reason,
            context_tokens: tokens.len(),
            query_tokens: query_ids.len(),
            generated_tokens: generation.ids.len(),
            load,
            first_token: load + generation.prefill,
            total: started.elapsed(),
            repaired_blocks: repaired,
            resident_blocks: answer.resident_blocks,
            logprobs: generation.logprobs,
        })
    }
}

/// The merge a query over `manifest` runs: the query's override or the document's
/// options, over the groups of [`document_merge`].
fn context_merge(manifest: &Manifest, query: Option<MergeOptions>) -> ContextMerge {
    let options = query.unwrap_or(manifest.merge);
    document_merge(
        options,
        manifest.anchor_size as usize,
        manifest.block_size as usize,
        manifest.block_overlap as usize,
    )
}

/// How a document's context merges under `options`: the blocks whose KV is exact stay
/// untempered, the approximate ones after them form APE's tempered group. One rule for a
/// single node's manifest and a cluster's catalog entry.
///
/// Block 0 and the anchor's blocks are encoded causally on their own, so they are exact.
/// A later block starting at `s` is encoded as `[anchor | lead | block]`, its lead the
/// `overlap` tokens before it but never the anchor's own (`StarConfig::lead`): when the
/// lead reaches back to the anchor's end (`s - overlap <= anchor`) that is the block's
/// whole causal prefix and its KV is exact too (with a whole-block anchor and any
/// overlap, at least the block right after the anchor). Tempering an exact block would
/// only bias it (measured: +1.4 points of multi-key retrieval at b = L/16 on the H200
/// when the block after the anchor is left out of the group), so the group starts at the
/// first block with `s > anchor + overlap`; blocks start at multiples of the block size.
pub(crate) fn document_merge(
    options: MergeOptions,
    anchor_size: usize,
    block_size: usize,
    block_overlap: usize,
) -> ContextMerge {
    let b = block_size.max(1);
    ContextMerge {
        temperature: options.temperature(),
        scale: options.scale(),
        tempered_from: ((anchor_size + block_overlap) / b + 1) * b,
    }
}

/// The merge an ingest records: the request's own options when it gives any, else the
/// default for its KV. Every token re-encoded with global attention
/// (`reencode_ratio >= 1`) is full attention's KV, which the exact merge reproduces;
/// any other document's blocks after the anchor are approximate and get APE's scaling
/// factor, the server's `server_scale` or else [`DEFAULT_MERGE_SCALE`] (at `T = 1`). One
/// rule for every ingest path.
pub fn ingest_merge(
    requested: Option<MergeOptions>,
    server_scale: Option<f32>,
    reencode_ratio: f32,
) -> MergeOptions {
    requested.unwrap_or_else(|| {
        if reencode_ratio >= 1.0 {
            MergeOptions::default()
        } else {
            MergeOptions::new(1.0, server_scale.unwrap_or(DEFAULT_MERGE_SCALE))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_blocks_with_approximate_kv_are_tempered() {
        let tempered = MergeOptions::new(0.8, 0.5);
        let from = |a, b, o| document_merge(tempered, a, b, o).tempered_from;
        // Whole-block anchors: the anchor's blocks and the exact one after them.
        assert_eq!(from(64, 64, 0), 128);
        assert_eq!(from(256, 64, 0), 320);
        assert_eq!(from(256, 64, 32), 320);
        // An anchor inside block 0: block 1 is already approximate, unless its lead
        // reaches back to the anchor's end.
        assert_eq!(from(16, 64, 0), 64);
        assert_eq!(from(1, 64, 32), 64);
        assert_eq!(from(16, 64, 48), 128);
        // A lead of two blocks makes the two blocks after a one-block anchor exact; one
        // as long as the document makes every block exact.
        assert_eq!(from(64, 64, 128), 256);
        assert_eq!(from(64, 64, 10_000), 10_112);
        // Every block the rule calls exact has a lead reaching the anchor, and the first
        // tempered one does not (StarConfig::lead), over a grid of sizes.
        for (a, b) in [
            (1, 64),
            (16, 64),
            (64, 64),
            (128, 64),
            (256, 64),
            (512, 128),
        ] {
            for o in [0, 1, 32, 63, 64, 65, 200] {
                let config = starkv_compute::star::StarConfig::with_anchor(b, a).with_overlap(o);
                let t = from(a, b, o);
                assert_eq!(t % b, 0, "a {a} b {b} o {o}");
                for s in (b..t + 4 * b).step_by(b) {
                    let lead = config.lead(s..s + b, a);
                    let exact = s <= a || lead.start == a;
                    assert_eq!(exact, s < t, "a {a} b {b} o {o} block at {s}");
                }
            }
        }
        let merge = document_merge(tempered, 64, 64, 32);
        assert_eq!((merge.temperature, merge.scale), (0.8, 0.5));
        assert!(!merge.is_tempered(64) && merge.is_tempered(128));
        // The exact merge tempers nothing, wherever the group would start.
        let exact = document_merge(MergeOptions::default(), 64, 64, 0);
        assert!(exact.is_exact() && !exact.is_tempered(128));
    }

    #[test]
    fn an_ingest_without_merge_options_gets_the_default_for_its_kv() {
        let half = MergeOptions::new(1.0, DEFAULT_MERGE_SCALE);
        assert_eq!(DEFAULT_MERGE_SCALE, 0.5);
        // Approximate blocks: S from the server, else the default.
        assert_eq!(ingest_merge(None, None, 0.0), half);
        assert_eq!(ingest_merge(None, None, 0.5), half);
        assert_eq!(
            ingest_merge(None, Some(0.7), 0.0),
            MergeOptions::new(1.0, 0.7)
        );
        assert!(ingest_merge(None, Some(1.0), 0.0).is_exact());
        // Every token re-encoded: full attention's KV, the exact merge whatever the server.
        assert!(ingest_merge(None, None, 1.0).is_exact());
        assert!(ingest_merge(None, Some(0.25), 1.0).is_exact());
        // The request's own options win over every default.
        let asked = MergeOptions::new(0.7, 2.0);
        assert_eq!(ingest_merge(Some(asked), Some(0.25), 0.0), asked);
        assert_eq!(ingest_merge(Some(asked), None, 1.0), asked);
        let exact = MergeOptions::default();
        assert_eq!(ingest_merge(Some(exact), None, 0.0), exact);
    }
}
