//! The store side of a cold query on a GPU host: a [`BlockReader`] over a document
//! lease that reads a whole block, several layers at once, verified, straight into the
//! backend's page-locked staging in the GPU's 16-bit type, or as stored for an 8-bit
//! document ([`DocLease::read_block_into`]). No f32 block and no decoded host copy is
//! kept: repeats hit the GPU tier.
//!
//! The split between loading and re-encoding happens in the backend
//! ([`starkv_compute::cold_split`]), which sees both workers' rates.

use starkv_cache::{DType, DocLease};
use starkv_compute::backend::BlockReader;
use starkv_compute::cuda::HalfType;
use starkv_compute::kv8::Kv8Format;

/// Stored type of KV written on a host whose backend reads blocks as `half` (`None`: the
/// CPU, f16): blocks are stored in the type the device computes in, so a cold load is a
/// copy, never a conversion.
pub(crate) fn kv_dtype(half: Option<HalfType>) -> DType {
    match half {
        Some(HalfType::BF16) => DType::BF16,
        Some(HalfType::F16) | None => DType::F16,
    }
}

/// Reads the blocks of one leased document version (the cold path's reader; public for
/// the `cold_path` benchmark, which measures this reader).
pub struct StoreReader<'a> {
    lease: &'a DocLease,
    /// Layers read at once per block.
    threads: usize,
}

impl<'a> StoreReader<'a> {
    /// Up to 16 layers at once (one per core).
    pub fn new(lease: &'a DocLease) -> Self {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get().min(16));
        Self::with_threads(lease, threads)
    }

    /// `threads` layers at once.
    pub fn with_threads(lease: &'a DocLease, threads: usize) -> Self {
        Self { lease, threads }
    }
}

impl StoreReader<'_> {
    /// Every layer of `block` as `want` into `dst` (whole layers, one after another).
    fn read(&self, block: usize, want: DType, dst: &mut [u8]) -> Result<(), String> {
        let layers = self
            .lease
            .manifest()
            .blocks
            .get(block)
            .map(|b| b.layers as usize)
            .ok_or_else(|| format!("block {block} is not in the document"))?;
        let layer_bytes = dst.len() / layers.max(1);
        self.lease
            .read_block_into(block, want, layer_bytes, dst, self.threads)
            .map_err(|e| e.to_string())
    }
}

impl BlockReader for StoreReader<'_> {
    fn read_block(&self, block: usize, dtype: HalfType, dst: &mut [u16]) -> Result<(), String> {
        self.read(block, kv_dtype(Some(dtype)), bytemuck::cast_slice_mut(dst))
    }

    fn read_block_8bit(
        &self,
        block: usize,
        format: Kv8Format,
        dst: &mut [u8],
    ) -> Result<(), String> {
        self.read(block, crate::kv::kv8_dtype(format), dst)
    }
}
