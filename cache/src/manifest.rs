//! Document manifests: what a document version is made of.
//!
//! A manifest is immutable once published. The mutable parts of a document (last use,
//! pin, TTL) live in a separate small [`DocState`] row so that touching a document never
//! rewrites its manifest, and the source token ids (large: 4 bytes per token) live in a
//! third row so that opening the store scans only the small rows.
//!
//! Encoding: an explicit little-endian binary format, each row starting with a 4-byte
//! magic and a u16 format version and ending with BLAKE3(row)[..16]. Explicit binary
//! rather than JSON: no serde dependency in the storage crate, exact round-trips of
//! fingerprints and ids, and a checksum like every other stored value (a manifest is
//! never served corrupt either).

use std::fmt;

use crate::error::CodecError;
use crate::key::BlockKey;
use crate::tensor::DType;

/// Current manifest format version.
pub const MANIFEST_VERSION: u16 = 1;
const MAGIC_MANIFEST: &[u8; 4] = b"SKVM";
const MAGIC_STATE: &[u8; 4] = b"SKVS";
const MAGIC_TOKENS: &[u8; 4] = b"SKVT";
const CHECKSUM_LEN: usize = 16;
/// Longest accepted document id or tenant name, in bytes.
pub const MAX_NAME_LEN: usize = 1024;

/// One published version of a document.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocRef {
    /// Caller-chosen document id.
    pub doc: String,
    /// Version number assigned by the store at publish (1, 2, ...).
    pub version: u64,
}

impl fmt::Display for DocRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.doc, self.version)
    }
}

/// How a document's context blocks merge at query time (issue 14): APE's temperature
/// `T` and scaling factor `S` (`T = S = 1`: Star Attention's exact merge). Kept as f32
/// bit patterns so that the manifest stays `Eq`; the stored KV does not depend on it,
/// so it is no part of any block key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MergeOptions {
    temperature: u32,
    scale: u32,
}

impl MergeOptions {
    /// The merge at temperature `T` and scaling factor `S` (the caller validates them).
    pub fn new(temperature: f32, scale: f32) -> Self {
        Self {
            temperature: temperature.to_bits(),
            scale: scale.to_bits(),
        }
    }

    /// The temperature `T`.
    pub fn temperature(&self) -> f32 {
        f32::from_bits(self.temperature)
    }

    /// The scaling factor `S`.
    pub fn scale(&self) -> f32 {
        f32::from_bits(self.scale)
    }

    /// `T = S = 1`.
    pub fn is_exact(&self) -> bool {
        self.temperature() == 1.0 && self.scale() == 1.0
    }
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self::new(1.0, 1.0)
    }
}

/// A block as referenced by a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRef {
    /// Content key.
    pub key: BlockKey,
    /// Global position of the block's first token.
    pub start: u64,
    /// Number of tokens in the block.
    pub tokens: u32,
    /// Number of layers stored.
    pub layers: u16,
    /// Decoded (raw element) bytes over all layers.
    pub raw_bytes: u64,
    /// Stored (encoded) bytes over all layers.
    pub stored_bytes: u64,
}

/// The immutable description of a document version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Which document version this is.
    pub doc: DocRef,
    /// Owning tenant (quotas are per tenant).
    pub tenant: String,
    /// Opaque model fingerprint supplied by the caller.
    pub model_fingerprint: Vec<u8>,
    /// Opaque tokenizer fingerprint supplied by the caller.
    pub tokenizer_fingerprint: Vec<u8>,
    /// Caller's KV layout version (also part of every block key).
    pub kv_layout_version: u32,
    /// Element type of every layer.
    pub dtype: DType,
    /// Block size `b`.
    pub block_size: u32,
    /// Anchor size `a`.
    pub anchor_size: u32,
    /// Number of source tokens (the ids are stored in their own row).
    pub source_tokens: u64,
    /// Publish time, ms since the Unix epoch.
    pub created_ms: u64,
    /// The blocks in document order.
    pub blocks: Vec<BlockRef>,
    /// How the blocks merge at query time (a trailing field: rows written before it
    /// decode as the exact merge).
    pub merge: MergeOptions,
    /// Fraction of the tokens after the anchor re-encoded with global attention at
    /// ingest, in millionths (issue 14; 0: plain Star Attention; a trailing field too).
    pub reencode_ppm: u32,
    /// Tokens before each block (after the anchor) that its phase 1 encoded in front of
    /// it and dropped (issue 14; 0: the paper's phase 1; a trailing field too). Needed to
    /// re-encode a block exactly as it was stored.
    pub block_overlap: u32,
}

impl Manifest {
    /// Sum of the blocks' stored bytes (what the document costs its tenant).
    pub fn stored_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.stored_bytes).sum()
    }

    /// Sum of the blocks' decoded bytes.
    pub fn raw_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.raw_bytes).sum()
    }
}

/// Mutable per-document state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DocState {
    /// Last time a reader opened the document (ms since epoch). Existence checks and
    /// listings never update it.
    pub last_used_ms: u64,
    /// Pinned documents are exempt from every automatic policy (LRU, TTL, quota).
    pub pinned: bool,
    /// Idle time-to-live: the document expires once `now - last_used_ms >= ttl_ms`.
    pub ttl_ms: Option<u64>,
}

struct W(Vec<u8>);

impl W {
    fn new(magic: &[u8; 4]) -> Self {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(magic);
        v.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        W(v)
    }
    fn u8(&mut self, x: u8) {
        self.0.push(x);
    }
    fn u16(&mut self, x: u16) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    fn u32(&mut self, x: u32) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    fn u64(&mut self, x: u64) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn finish(mut self) -> Vec<u8> {
        let h = blake3::hash(&self.0);
        self.0.extend_from_slice(&h.as_bytes()[..CHECKSUM_LEN]);
        self.0
    }
}

struct R<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> R<'a> {
    /// Verifies checksum, magic and version; positions after the version.
    fn open(row: &'a [u8], magic: &[u8; 4]) -> Result<Self, CodecError> {
        if row.len() < 6 + CHECKSUM_LEN {
            return Err(CodecError::Truncated { len: row.len() });
        }
        let (body, sum) = row.split_at(row.len() - CHECKSUM_LEN);
        if &blake3::hash(body).as_bytes()[..CHECKSUM_LEN] != sum {
            return Err(CodecError::ChecksumMismatch);
        }
        if &body[..4] != magic {
            return Err(CodecError::BadMagic);
        }
        let v = u16::from_le_bytes([body[4], body[5]]);
        if v != MANIFEST_VERSION {
            return Err(CodecError::UnsupportedVersion(v));
        }
        Ok(R { b: body, pos: 6 })
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(CodecError::BadHeader("field past end"))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn bytes(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, CodecError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| CodecError::BadHeader("utf-8"))
    }
    fn at_end(&self) -> bool {
        self.pos == self.b.len()
    }
    fn end(&self) -> Result<(), CodecError> {
        if self.pos == self.b.len() {
            Ok(())
        } else {
            Err(CodecError::BadHeader("trailing bytes"))
        }
    }
}

impl Manifest {
    /// Encodes the manifest row.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W::new(MAGIC_MANIFEST);
        w.bytes(self.doc.doc.as_bytes());
        w.u64(self.doc.version);
        w.bytes(self.tenant.as_bytes());
        w.bytes(&self.model_fingerprint);
        w.bytes(&self.tokenizer_fingerprint);
        w.u32(self.kv_layout_version);
        w.u8(self.dtype.code());
        w.u32(self.block_size);
        w.u32(self.anchor_size);
        w.u64(self.source_tokens);
        w.u64(self.created_ms);
        w.u32(self.blocks.len() as u32);
        for b in &self.blocks {
            w.0.extend_from_slice(&b.key.0);
            w.u64(b.start);
            w.u32(b.tokens);
            w.u16(b.layers);
            w.u64(b.raw_bytes);
            w.u64(b.stored_bytes);
        }
        w.u32(self.merge.temperature);
        w.u32(self.merge.scale);
        w.u32(self.reencode_ppm);
        w.u32(self.block_overlap);
        w.finish()
    }

    /// Verifies and decodes a manifest row.
    pub fn decode(row: &[u8]) -> Result<Self, CodecError> {
        let mut r = R::open(row, MAGIC_MANIFEST)?;
        let doc = r.string()?;
        let version = r.u64()?;
        let tenant = r.string()?;
        let model_fingerprint = r.bytes()?.to_vec();
        let tokenizer_fingerprint = r.bytes()?.to_vec();
        let kv_layout_version = r.u32()?;
        let dtype = DType::from_code(r.u8()?).ok_or(CodecError::BadHeader("dtype"))?;
        let block_size = r.u32()?;
        let anchor_size = r.u32()?;
        let source_tokens = r.u64()?;
        let created_ms = r.u64()?;
        let n = r.u32()? as usize;
        // Each block ref is 62 bytes: bound the allocation by what the row can hold.
        if n > row.len() / 62 {
            return Err(CodecError::BadHeader("block count"));
        }
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            let key = BlockKey(r.take(32)?.try_into().expect("32"));
            blocks.push(BlockRef {
                key,
                start: r.u64()?,
                tokens: r.u32()?,
                layers: r.u16()?,
                raw_bytes: r.u64()?,
                stored_bytes: r.u64()?,
            });
        }
        let merge = if r.at_end() {
            MergeOptions::default()
        } else {
            MergeOptions {
                temperature: r.u32()?,
                scale: r.u32()?,
            }
        };
        let reencode_ppm = if r.at_end() { 0 } else { r.u32()? };
        let block_overlap = if r.at_end() { 0 } else { r.u32()? };
        r.end()?;
        Ok(Manifest {
            doc: DocRef { doc, version },
            tenant,
            model_fingerprint,
            tokenizer_fingerprint,
            kv_layout_version,
            dtype,
            block_size,
            anchor_size,
            source_tokens,
            created_ms,
            blocks,
            merge,
            reencode_ppm,
            block_overlap,
        })
    }
}

impl DocState {
    /// Encodes the state row.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W::new(MAGIC_STATE);
        w.u64(self.last_used_ms);
        w.u8(self.pinned as u8);
        w.u64(self.ttl_ms.map_or(u64::MAX, |t| t.min(u64::MAX - 1)));
        w.finish()
    }

    /// Verifies and decodes a state row.
    pub fn decode(row: &[u8]) -> Result<Self, CodecError> {
        let mut r = R::open(row, MAGIC_STATE)?;
        let last_used_ms = r.u64()?;
        let pinned = r.u8()? != 0;
        let ttl = r.u64()?;
        r.end()?;
        Ok(DocState {
            last_used_ms,
            pinned,
            ttl_ms: (ttl != u64::MAX).then_some(ttl),
        })
    }
}

/// Encodes the source-token row.
pub fn encode_tokens(tokens: &[u32]) -> Vec<u8> {
    let mut w = W::new(MAGIC_TOKENS);
    w.u64(tokens.len() as u64);
    w.0.reserve(tokens.len() * 4 + CHECKSUM_LEN);
    for t in tokens {
        w.u32(*t);
    }
    w.finish()
}

/// Verifies and decodes the source-token row.
pub fn decode_tokens(row: &[u8]) -> Result<Vec<u32>, CodecError> {
    let mut r = R::open(row, MAGIC_TOKENS)?;
    let n = r.u64()? as usize;
    let raw = r.take(n.checked_mul(4).ok_or(CodecError::BadHeader("count"))?)?;
    r.end()?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
        .collect())
}

/// Meta-row key of a document version: `tag | u16 BE len | id | u64 BE version`, so a
/// prefix scan over `tag | len | id` lists a document's versions in order.
pub(crate) fn doc_row_key(tag: u8, doc: &DocRef) -> Vec<u8> {
    let mut k = Vec::with_capacity(11 + doc.doc.len());
    k.push(tag);
    k.extend_from_slice(&(doc.doc.len() as u16).to_be_bytes());
    k.extend_from_slice(doc.doc.as_bytes());
    k.extend_from_slice(&doc.version.to_be_bytes());
    k
}

/// Inverse of [`doc_row_key`] (without the tag check).
pub(crate) fn parse_doc_row_key(k: &[u8]) -> Option<DocRef> {
    if k.len() < 11 {
        return None;
    }
    let n = u16::from_be_bytes([k[1], k[2]]) as usize;
    if k.len() != 3 + n + 8 {
        return None;
    }
    let doc = String::from_utf8(k[3..3 + n].to_vec()).ok()?;
    let version = u64::from_be_bytes(k[3 + n..].try_into().ok()?);
    Some(DocRef { doc, version })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            doc: DocRef {
                doc: "tenant-a/report.pdf".into(),
                version: 3,
            },
            tenant: "tenant-a".into(),
            model_fingerprint: vec![1, 2, 3],
            tokenizer_fingerprint: vec![4, 5],
            kv_layout_version: 1,
            dtype: DType::BF16,
            block_size: 2048,
            anchor_size: 2048,
            source_tokens: 5000,
            created_ms: 1_700_000_000_000,
            blocks: (0..3)
                .map(|i| BlockRef {
                    key: BlockKey([i as u8; 32]),
                    start: i * 2048,
                    tokens: 2048,
                    layers: 30,
                    raw_bytes: 100 + i,
                    stored_bytes: 80 + i,
                })
                .collect(),
            merge: MergeOptions::new(0.7, 0.9),
            reencode_ppm: 100_000,
            block_overlap: 32,
        }
    }

    /// A row written before the merge options existed decodes as the exact merge.
    #[test]
    fn rows_without_merge_options_decode_as_exact() {
        let mut m = manifest();
        m.merge = MergeOptions::default();
        m.reencode_ppm = 0;
        m.block_overlap = 0;
        let row = m.encode();
        // Drop the four trailing u32 and re-seal the checksum.
        let body = &row[..row.len() - CHECKSUM_LEN - 16];
        let mut old = body.to_vec();
        old.extend_from_slice(&blake3::hash(body).as_bytes()[..CHECKSUM_LEN]);
        assert_eq!(Manifest::decode(&old).unwrap(), m);
        let tempered = manifest();
        assert_eq!(Manifest::decode(&tempered.encode()).unwrap(), tempered);
        assert!(!tempered.merge.is_exact() && m.merge.is_exact());
        // A row written before the block overlap existed keeps its other trailing fields
        // and decodes with no overlap.
        let row = tempered.encode();
        let body = &row[..row.len() - CHECKSUM_LEN - 4];
        let mut old = body.to_vec();
        old.extend_from_slice(&blake3::hash(body).as_bytes()[..CHECKSUM_LEN]);
        let decoded = Manifest::decode(&old).unwrap();
        assert_eq!(decoded.block_overlap, 0);
        assert_eq!(
            Manifest {
                block_overlap: tempered.block_overlap,
                ..decoded
            },
            tempered
        );
    }

    #[test]
    fn rows_roundtrip_and_detect_flips() {
        let m = manifest();
        let row = m.encode();
        assert_eq!(Manifest::decode(&row).unwrap(), m);
        for i in 0..row.len() {
            let mut c = row.clone();
            c[i] ^= 0x10;
            assert!(Manifest::decode(&c).is_err(), "byte {i}");
        }
        for s in [
            DocState {
                last_used_ms: 5,
                pinned: true,
                ttl_ms: Some(60_000),
            },
            DocState {
                last_used_ms: 0,
                pinned: false,
                ttl_ms: None,
            },
        ] {
            assert_eq!(DocState::decode(&s.encode()).unwrap(), s);
        }
        let toks: Vec<u32> = (0..1000).map(|i| i * 31).collect();
        assert_eq!(decode_tokens(&encode_tokens(&toks)).unwrap(), toks);
        let k = doc_row_key(b'm', &m.doc);
        assert_eq!(parse_doc_row_key(&k).unwrap(), m.doc);
    }
}
