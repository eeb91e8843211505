//! The store side of a cold query on a GPU host: a [`BlockReader`] over a document
//! lease that reads a whole block, several layers at once, verified, straight into the
//! backend's page-locked staging in the GPU's 16-bit type ([`DocLease::read_block_into`]).
//! No f32 block and no decoded host copy is kept: repeats hit the GPU tier.
//!
//! The split between loading and re-encoding happens in the backend
//! ([`starkv_compute::cold_split`]), which sees both workers' rates.

use starkv_cache::{DType, DocLease};
use starkv_compute::backend::BlockReader;
use starkv_compute::cuda::HalfType;

/// Stored type of KV written on a host whose backend reads blocks as `half` (`None`: the
/// CPU, f16): blocks are stored in the type the device computes in, so a cold load is a
/// copy, never a conversion.
pub(crate) fn kv_dtype(half: Option<HalfType>) -> DType {
    match half {
        Some(HalfType::BF16) => DType::BF16,
        Some(HalfType::F16) | None => DType::F16,
    }
}

/// Reads the blocks of one leased document version.
pub(crate) struct StoreReader<'a> {
    lease: &'a DocLease,
    /// Layers read at once per block.
    threads: usize,
}

impl<'a> StoreReader<'a> {
    pub(crate) fn new(lease: &'a DocLease) -> Self {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get().min(16));
        Self { lease, threads }
    }
}

impl BlockReader for StoreReader<'_> {
    fn read_block(&self, block: usize, dtype: HalfType, dst: &mut [u16]) -> Result<(), String> {
        let layers = self
            .lease
            .manifest()
            .blocks
            .get(block)
            .map(|b| b.layers as usize)
            .ok_or_else(|| format!("block {block} is not in the document"))?;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(dst);
        let layer_bytes = bytes.len() / layers.max(1);
        self.lease
            .read_block_into(
                block,
                kv_dtype(Some(dtype)),
                layer_bytes,
                bytes,
                self.threads,
            )
            .map_err(|e| e.to_string())
    }
}
