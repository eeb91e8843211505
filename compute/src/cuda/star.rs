//! Star Attention on the GPU, gathered under one path for callers: the resident block
//! ([`GpuBlock`], `block.rs`), phase-1 encoding (`phase1.rs`), phase-2 queries over
//! resident or streamed blocks (`phase2.rs`), a GPU shard behind
//! [`crate::star::AttentionShard`] (`shard.rs`) and the resident block tier (`tier.rs`).

pub use super::block::GpuBlock;
pub use super::phase1::{encode_block, encode_block_after, encode_block_into, encode_context};
pub use super::phase2::{ContextBlocks, GpuQuery, StreamedBlocks};
pub use super::shard::GpuShard;
pub use super::tier::{BlockTier, TierValue};
