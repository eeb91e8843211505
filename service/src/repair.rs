//! Repair: re-encoding blocks that failed verification from their document's stored
//! source tokens.

use starkv_compute::star::BlockKv;

use crate::kv::to_tensors;
use crate::{Service, ServiceError, ServiceResult};

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
            let kv = self.recompute_blocks(&tokens, &manifest, &[i])?;
            self.store
                .repair_block(item.block, &to_tensors(&kv[0], manifest.dtype)?)?;
            metrics::counter!("starkv_blocks_repaired_total").increment(1);
            repaired += 1;
        }
        Ok(repaired)
    }
}

impl Service {
    /// Blocks `wanted` of a stored document, in that order, computed again from its
    /// source tokens exactly as its ingest computed them: phase 1 (one encoder, the
    /// anchor computed once), or for a selectively re-encoded document phase 1 and one
    /// re-encoding pass over the whole document (every re-encoded block depends on all
    /// the blocks before it; a phase-1 block would not be the KV its key names). That
    /// pass costs a whole document's encode: repairs are rare.
    pub(crate) fn recompute_blocks(
        &self,
        tokens: &[u32],
        manifest: &starkv_cache::Manifest,
        wanted: &[usize],
    ) -> ServiceResult<Vec<BlockKv>> {
        let mut encoder = self.encoder(tokens, manifest)?;
        if manifest.reencode_ppm == 0 {
            return wanted
                .iter()
                .map(|&i| Ok(encoder.encode_block(i)?))
                .collect();
        }
        let exact_until = (manifest.anchor_size.max(manifest.block_size)) as usize;
        let ratio = crate::ingest::reencode_ratio_of(manifest.reencode_ppm);
        let mut found: Vec<Option<BlockKv>> = vec![None; wanted.len()];
        encoder.encode_reencoded(
            &self.model().model,
            &self.backend,
            exact_until,
            ratio,
            None,
            &mut |j, block| {
                if let Some(slot) = wanted.iter().position(|&i| i == j) {
                    found[slot] = Some(block);
                }
                Ok(())
            },
        )?;
        wanted
            .iter()
            .zip(found)
            .map(|(i, block)| {
                block.ok_or_else(|| {
                    ServiceError::Internal(format!("the re-encoding pass produced no block {i}"))
                })
            })
            .collect()
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
        }
        let wanted: Vec<usize> = cold.failed_reads.iter().map(|&(i, _)| i).collect();
        let blocks = self.recompute_blocks(tokens, manifest, &wanted)?;
        for (&i, kv) in wanted.iter().zip(&blocks) {
            self.store
                .repair_block(manifest.blocks[i].key, &to_tensors(kv, manifest.dtype)?)?;
            metrics::counter!("starkv_blocks_repaired_total").increment(1);
        }
        Ok(wanted.len())
    }
}

/// A read failure that re-encoding repairs (as opposed to an I/O or a missing document).
pub(crate) fn is_corruption(e: &starkv_cache::Error) -> bool {
    matches!(
        e,
        starkv_cache::Error::Corrupt { .. } | starkv_cache::Error::MissingBlock { .. }
    )
}
