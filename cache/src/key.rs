//! Content-addressed block keys.
//!
//! A block's KV is a pure function of (model, KV layout, dtype, anchor size, anchor
//! tokens, block tokens, block start position) — Star Attention has no prefix chain — so
//! the key is a hash of exactly those inputs. Two documents sharing a block (same
//! anchor, same tokens at the same position) share one stored copy, and editing one
//! block of a document changes one key.
//!
//! The hash is BLAKE3 in `derive_key` mode with a fixed context string (domain
//! separation from the codec checksum) over a canonical byte encoding: every field is
//! fixed-width little-endian or length-prefixed, so no two different inputs share an
//! encoding. Never a language-runtime hash: keys must be identical across processes,
//! hosts and releases (a golden test pins them).

use std::fmt;

use crate::tensor::DType;

const KEY_CONTEXT: &str = "starkv 2026-11 block key v1";

/// 32-byte content key of a block.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey(pub [u8; 32]);

impl BlockKey {
    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Shard index for `shards` shards: the key is uniformly distributed, so its first
    /// eight bytes modulo the shard count balance blocks across shards.
    pub fn shard(&self, shards: usize) -> usize {
        let v = u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes"));
        (v % shards.max(1) as u64) as usize
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // 16 hex digits identify a block in logs without flooding them.
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockKey({})", self.to_hex())
    }
}

/// Everything a block's KV depends on, supplied by the caller as plain bytes and ids.
#[derive(Clone, Copy, Debug)]
pub struct BlockKeyInput<'a> {
    /// Opaque model fingerprint (e.g. a hash of the weights file).
    pub model_fingerprint: &'a [u8],
    /// Version of the caller's KV layout (RoPE convention, tensor order, ...).
    pub kv_layout_version: u32,
    /// Stored element type.
    pub dtype: DType,
    /// Anchor size `a`.
    pub anchor_size: u32,
    /// The anchor's token ids.
    pub anchor_tokens: &'a [u32],
    /// The block's token ids.
    pub block_tokens: &'a [u32],
    /// Global position of the block's first token.
    pub block_start: u64,
}

impl BlockKeyInput<'_> {
    /// Computes the content key.
    pub fn key(&self) -> BlockKey {
        let mut h = blake3::Hasher::new_derive_key(KEY_CONTEXT);
        h.update(&(self.model_fingerprint.len() as u64).to_le_bytes());
        h.update(self.model_fingerprint);
        h.update(&self.kv_layout_version.to_le_bytes());
        h.update(&[self.dtype.code()]);
        h.update(&self.anchor_size.to_le_bytes());
        for ids in [self.anchor_tokens, self.block_tokens] {
            h.update(&(ids.len() as u64).to_le_bytes());
            // Token ids hashed as little-endian u32s regardless of host byte order.
            for id in ids {
                h.update(&id.to_le_bytes());
            }
        }
        h.update(&self.block_start.to_le_bytes());
        BlockKey(*h.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(anchor: &'a [u32], block: &'a [u32]) -> BlockKeyInput<'a> {
        BlockKeyInput {
            model_fingerprint: b"model-fp",
            kv_layout_version: 1,
            dtype: DType::F16,
            anchor_size: anchor.len() as u32,
            anchor_tokens: anchor,
            block_tokens: block,
            block_start: 4096,
        }
    }

    #[test]
    fn golden_key_is_stable_across_processes() {
        // If this changes, every stored block becomes unreachable: bump KEY_CONTEXT on
        // purpose, never by accident.
        let k = input(&[1, 2, 3], &[10, 11, 12, 13]).key();
        assert_eq!(
            k.to_hex(),
            "ff58c5077cc89a50cfb4474820f3ebbc7d8d6e4612d3cadd01706a1a19a32ff8"
        );
    }

    #[test]
    fn every_field_changes_the_key() {
        let base = input(&[1, 2, 3], &[10, 11, 12, 13]);
        let k = base.key();
        let mut v = Vec::new();
        v.push(BlockKeyInput {
            model_fingerprint: b"model-fq",
            ..base
        });
        v.push(BlockKeyInput {
            kv_layout_version: 2,
            ..base
        });
        v.push(BlockKeyInput {
            dtype: DType::BF16,
            ..base
        });
        v.push(BlockKeyInput {
            anchor_size: 4,
            ..base
        });
        v.push(BlockKeyInput {
            block_start: 4097,
            ..base
        });
        // Moving a token between anchor and block must not collide.
        v.push(input(&[1, 2], &[3, 10, 11, 12, 13]));
        v.push(input(&[1, 2, 3], &[10, 11, 12, 14]));
        for other in v {
            assert_ne!(other.key(), k, "{other:?}");
        }
    }
}
