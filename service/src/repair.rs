//! Repair: re-encoding blocks that failed verification from their document's stored
//! source tokens.

use crate::kv::to_tensors;
use crate::{Service, ServiceResult};

impl Service {
    /// Re-encodes every block the store has marked for repair (a failed checksum) from
    /// the stored source tokens of a document that references it. Returns how many.
    pub fn repair_pending(&self) -> ServiceResult<usize> {
        let mut repaired = 0;
        for item in self.store.repair_queue() {
            let Some((doc, block_ref)) = item.docs.first() else {
                continue;
            };
            let lease = self.store.open_version(doc)?;
            let manifest = lease.manifest().clone();
            let tokens = lease.source_tokens()?;
            let i = block_ref.start as usize / manifest.block_size as usize;
            let kv = self.recompute_block(&tokens, &manifest, i)?;
            self.store
                .repair_block(item.block, &to_tensors(&kv, manifest.dtype)?)?;
            metrics::counter!("starkv_blocks_repaired_total").increment(1);
            repaired += 1;
        }
        Ok(repaired)
    }
}

impl Service {
    /// Block `i` of a stored document, computed again from its source tokens exactly as
    /// its ingest computed it: phase 1, or for a selectively re-encoded document phase 1
    /// and the re-encoding pass over the whole document (every re-encoded block depends
    /// on all the blocks before it; a phase-1 block would not be the KV its key names).
    /// That pass costs a whole document's encode per repaired block: repairs are rare.
    pub(crate) fn recompute_block(
        &self,
        tokens: &[u32],
        manifest: &starkv_cache::Manifest,
        i: usize,
    ) -> ServiceResult<starkv_compute::star::BlockKv> {
        let mut encoder = self.encoder(tokens, manifest)?;
        if manifest.reencode_ppm == 0 {
            return Ok(encoder.encode_block(i)?);
        }
        let exact_until = (manifest.anchor_size.max(manifest.block_size)) as usize;
        let ratio = crate::ingest::reencode_ratio_of(manifest.reencode_ppm);
        let mut found = None;
        encoder.encode_reencoded(
            &self.model().model,
            &self.backend,
            exact_until,
            ratio,
            None,
            &mut |j, block| {
                if j == i {
                    found = Some(block);
                }
                Ok(())
            },
        )?;
        found.ok_or_else(|| {
            crate::ServiceError::Internal(format!("the re-encoding pass produced no block {i}"))
        })
    }
}

impl Service {
    /// After a cold load on a GPU: the blocks whose read failed were re-encoded for the
    /// answer; re-encode them once more for the store and write them back. Returns how
    /// many.
    pub(crate) fn repair_unreadable(
        &self,
        answer: &starkv_compute::backend::Answer,
        tokens: &[u32],
        manifest: &starkv_cache::Manifest,
    ) -> ServiceResult<usize> {
        let Some(cold) = &answer.cold else {
            return Ok(0);
        };
        for (i, why) in &cold.failed_reads {
            tracing::warn!(doc = %manifest.doc.doc, block = i, error = %why, "repairing an unreadable block from its source tokens");
            let kv = self.recompute_block(tokens, manifest, *i)?;
            self.store
                .repair_block(manifest.blocks[*i].key, &to_tensors(&kv, manifest.dtype)?)?;
            metrics::counter!("starkv_blocks_repaired_total").increment(1);
        }
        Ok(cold.failed_reads.len())
    }
}

/// A read failure that re-encoding repairs (as opposed to an I/O or a missing document).
pub(crate) fn is_corruption(e: &starkv_cache::Error) -> bool {
    matches!(
        e,
        starkv_cache::Error::Corrupt { .. } | starkv_cache::Error::MissingBlock { .. }
    )
}
