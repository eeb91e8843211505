//! Reading a stored document's blocks for attention: the decoded-block cache first, then
//! the store; a block that fails verification is re-encoded from the document's source
//! tokens, written back (repair) and used, so a reader never sees bad data.

use std::sync::Arc;

use starkv_cache::{DocLease, Manifest};
use starkv_compute::backend::BlockEncoder;
use starkv_compute::star::BlockKv;

use crate::kv::{from_tensors, to_tensors};
use crate::repair::is_corruption;
use crate::{Service, ServiceResult};

/// The blocks of one leased document version, loaded on demand.
pub(crate) struct StoredBlocks<'a> {
    service: &'a Service,
    lease: &'a DocLease,
    manifest: &'a Manifest,
    tokens: &'a [u32],
    repair: Option<BlockEncoder<'a>>,
    /// Blocks re-encoded because they failed verification.
    pub repaired: usize,
}

impl<'a> StoredBlocks<'a> {
    /// `tokens`: the document's source tokens (what a repair re-encodes from).
    pub fn new(
        service: &'a Service,
        lease: &'a DocLease,
        manifest: &'a Manifest,
        tokens: &'a [u32],
    ) -> Self {
        Self {
            service,
            lease,
            manifest,
            tokens,
            repair: None,
            repaired: 0,
        }
    }

    /// Block `i` of the manifest, compute-ready.
    pub fn load(&mut self, i: usize) -> ServiceResult<Arc<BlockKv>> {
        let service = self.service;
        let block_ref = &self.manifest.blocks[i];
        if let Some(ready) = service
            .ready
            .lock()
            .expect("ready-block cache lock")
            .get(&block_ref.key)
        {
            return Ok(ready);
        }
        // Layers on every thread of the pool: one thread decodes far slower than the
        // store delivers (a cold query on 16 cores loaded 4 blocks in 0.33 s on one).
        let kv = match self.lease.read_block_on(i, rayon::current_num_threads()) {
            Ok(layers) => from_tensors(
                &layers,
                block_ref.start as usize,
                service.shape(),
                service.keeps_f16_blocks(),
            )?,
            Err(e) if is_corruption(&e) => {
                tracing::warn!(
                    doc = self.manifest.doc.doc,
                    block = i,
                    error = %e,
                    "repairing a corrupt block from its source tokens"
                );
                let encoder = match &mut self.repair {
                    Some(encoder) => encoder,
                    None => self
                        .repair
                        .insert(service.encoder(self.tokens, self.manifest)?),
                };
                // The block's index in the document (a shard worker's manifest holds
                // only some of the document's blocks).
                let index = block_ref.start as usize / self.manifest.block_size.max(1) as usize;
                let kv = encoder.encode_block(index)?;
                let tensors = to_tensors(&kv, self.manifest.dtype)?;
                service.store.repair_block(block_ref.key, &tensors)?;
                // What the store now holds, in the precision it holds it (8 bits for an
                // int8 document), so a repaired block answers like a loaded one.
                let kv = if self.manifest.dtype.is_quantized() {
                    let layers: Vec<Arc<_>> = tensors.into_iter().map(Arc::new).collect();
                    from_tensors(
                        &layers,
                        block_ref.start as usize,
                        service.shape(),
                        service.keeps_f16_blocks(),
                    )?
                } else {
                    kv
                };
                metrics::counter!("starkv_blocks_repaired_total").increment(1);
                self.repaired += 1;
                kv
            }
            Err(e) => return Err(e.into()),
        };
        let kv = Arc::new(kv);
        service
            .ready
            .lock()
            .expect("ready-block cache lock")
            .insert(block_ref.key, kv.clone());
        Ok(kv)
    }
}
