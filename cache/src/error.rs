//! The one error type of the crate.
//!
//! Every backend (RocksDB, in-memory) and every layer (codec, manifest, store) returns
//! [`Error`]. Variants carry the context an operator needs to act (which block, which
//! layer, which shard) so that callers never have to parse messages.

use crate::key::BlockKey;
use crate::manifest::DocRef;

/// Result alias for the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A stored value failed verification (checksum, header or decompression). The data
    /// is never returned; the block has been counted and marked for repair.
    #[error("corrupt block {block} layer {layer} in shard {shard}: {reason}")]
    Corrupt {
        /// Content key of the block.
        block: BlockKey,
        /// Layer index inside the block.
        layer: u16,
        /// Shard the value lives in.
        shard: usize,
        /// What failed.
        reason: CodecError,
    },
    /// A block referenced by a visible manifest is absent from its shard. This breaks
    /// the store's invariant, so it is treated like corruption (counted, marked for
    /// repair) rather than as a cache miss.
    #[error("block {block} layer {layer} missing from shard {shard}")]
    MissingBlock {
        /// Content key of the block.
        block: BlockKey,
        /// Layer index inside the block.
        layer: u16,
        /// Shard that should hold it.
        shard: usize,
    },
    /// A manifest or token row failed verification; the document is not served.
    #[error("corrupt manifest for {doc}: {reason}")]
    CorruptManifest {
        /// Document (or the raw key, when the document cannot be decoded).
        doc: String,
        /// What failed.
        reason: CodecError,
    },
    /// No visible document with this id (or version).
    #[error("document {doc} not found")]
    NotFound {
        /// The requested document.
        doc: String,
    },
    /// Publishing would put the tenant over its byte quota even after evicting every
    /// evictable document of that tenant.
    #[error("tenant {tenant} quota exceeded: {needed} bytes needed, quota {quota}")]
    QuotaExceeded {
        /// Tenant name.
        tenant: String,
        /// Bytes the tenant would hold after the publish.
        needed: u64,
        /// The tenant's quota.
        quota: u64,
    },
    /// The caller passed something inconsistent (shape, ids, indices).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Block index or layer index outside the document.
    #[error("{doc}: block {block} layer {layer} out of range")]
    OutOfRange {
        /// Document.
        doc: DocRef,
        /// Block index requested.
        block: usize,
        /// Layer requested.
        layer: u16,
    },
    /// The store on disk was created with different settings (e.g. shard count).
    #[error("store configuration mismatch: {0}")]
    ConfigMismatch(String),
    /// The storage engine failed (RocksDB error text, I/O).
    #[error("storage engine error in {context}: {message}")]
    Engine {
        /// Which instance or operation.
        context: String,
        /// The engine's message.
        message: String,
    },
    /// The storage engine found on-disk damage (RocksDB `Corruption`: a table or blob
    /// file checksum, magic number or header). Reads of a block value that fail this way
    /// are reported as [`Error::Corrupt`] instead, so the block is repaired.
    #[error("storage engine found corruption in {context}: {message}")]
    EngineCorruption {
        /// Which instance or operation.
        context: String,
        /// The engine's message.
        message: String,
    },
    /// The disk is full, or free space is under the configured floor: writes are refused
    /// (deletes still work).
    #[error("disk full in {context}: {message}")]
    DiskFull {
        /// Which instance or operation.
        context: String,
        /// What was found.
        message: String,
    },
    /// zstd or filesystem I/O failure outside the engine.
    #[error("i/o error in {context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Why a stored value was rejected. Kept separate from [`Error`] so the codec can be
/// used (and tested) without knowing which block a value belongs to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The value is shorter than the smallest valid encoding.
    #[error("value truncated ({len} bytes)")]
    Truncated {
        /// Length found.
        len: usize,
    },
    /// The checksum over header and payload does not match.
    #[error("checksum mismatch")]
    ChecksumMismatch,
    /// Magic bytes are wrong (not a starkv value).
    #[error("bad magic")]
    BadMagic,
    /// Written by a newer (or unknown) layout version.
    #[error("unsupported layout version {0}")]
    UnsupportedVersion(u16),
    /// A header field is out of range.
    #[error("bad header: {0}")]
    BadHeader(&'static str),
    /// zstd refused the payload or it decoded to the wrong length.
    #[error("decompression failed: {0}")]
    Decompress(String),
    /// The storage engine could not read the value (a damaged table or blob file,
    /// e.g. a blob header whose compression type does not match the column family).
    #[error("storage engine: {0}")]
    Storage(String),
}
