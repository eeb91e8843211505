//! Star Attention (Acharya, Jia, Ginsburg; arXiv 2411.17116), as specified in DESIGN.md §1.
//!
//! Phase 1 ([`phase1`]) encodes a context of `L` tokens in blocks of `b`: block 1 alone,
//! every other block as `[anchor | block]` with the anchor (the first `a` tokens of block 1)
//! as a shared read-only prefix, each block at its global positions. A block's KV is a pure
//! function of (model, anchor tokens, block tokens, block start, `a`), so blocks encode in
//! any order, on any thread or host.
//!
//! Phase 2 ([`phase2`]) runs the query and the answer over the cached blocks: each
//! [`AttentionShard`] returns `(O, lse)` of one layer's query over the blocks it holds,
//! without a mask; the query tokens' own KV lives only in the query host's local cache,
//! attended causally; partial results merge exactly by log-sum-exp.

mod block;
pub mod phase1;
pub mod phase2;
pub mod reencode;

pub use block::BlockKv;
pub use phase1::{DEFAULT_OVERLAP, MAX_OVERLAP, Phase1, StarConfig};
pub use phase2::{
    AttentionShard, CpuShard, PendingPartial, QueryAttention, merge_pending, start_all,
};

#[cfg(test)]
mod tests;
