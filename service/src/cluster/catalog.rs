//! The coordinator's documents: for each, its source tokens, layout and where every
//! block lives. A document enters the catalog only after every worker acknowledged its
//! blocks (blocks first, manifest last, across hosts); each entry is one file written
//! durably (temporary file, fsync, rename), so a crash leaves the old entry or the new.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use starkv_cache::MergeOptions;
use starkv_compute::partial::ContextMerge;

use super::wire::Key;
use crate::jobs::write_durably;

/// A document as the coordinator knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DocEntry {
    /// The store name (`tenant/id`).
    pub doc: String,
    pub tenant: String,
    pub version: u64,
    pub block_size: usize,
    pub anchor_size: usize,
    pub model_fingerprint: String,
    pub created_ms: u64,
    /// Never evicted by a rule or a TTL (a delete still removes it).
    #[serde(default)]
    pub pinned: bool,
    /// Idle milliseconds after which the document expires (`None`: never).
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// The stored KV type's code ([`starkv_cache::DType::code`]) every block of the
    /// document is keyed and stored with. `None` in entries written before it was
    /// recorded: the coordinator's 16-bit default then (see [`DocEntry::dtype`]).
    #[serde(default)]
    pub dtype: Option<u8>,
    /// The document's tempered merge (APE; `None`: the exact merge).
    #[serde(default)]
    pub merge: Option<TemperedMerge>,
    /// Selective global re-encoding at ingest, in millionths of the tokens (0: off; the
    /// default of entries written before it existed). A recovery re-encodes likewise.
    #[serde(default)]
    pub reencode_ppm: u32,
    /// Tokens before each block that its phase 1 encoded in front of it and dropped (0:
    /// none, the default of entries written before it existed). A recovery re-encodes
    /// likewise.
    #[serde(default)]
    pub block_overlap: usize,
    pub tokens: Vec<u32>,
    pub blocks: Vec<BlockEntry>,
}

/// One block: its key, token range and the workers (by address) holding a copy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BlockEntry {
    pub key: String,
    pub start: usize,
    pub len: usize,
    pub holders: Vec<String>,
}

/// A document's tempered merge as the catalog keeps it (see `merge_temperature`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct TemperedMerge {
    pub temperature: f32,
    pub scale: f32,
}

impl From<MergeOptions> for TemperedMerge {
    fn from(m: MergeOptions) -> Self {
        Self {
            temperature: m.temperature(),
            scale: m.scale(),
        }
    }
}

impl DocEntry {
    /// How a query merges the context: `query`'s override, else the document's own
    /// merge (the single node's rule, [`crate::query::document_merge`]).
    pub fn context_merge(&self, query: Option<MergeOptions>) -> ContextMerge {
        let own = self.merge.map_or_else(MergeOptions::default, |m| {
            MergeOptions::new(m.temperature, m.scale)
        });
        crate::query::document_merge(
            query.unwrap_or(own),
            self.anchor_size,
            self.block_size,
            self.block_overlap,
        )
    }

    /// The document's stored KV type; `default` for an entry that does not record it.
    pub fn dtype(&self, default: starkv_cache::DType) -> starkv_cache::DType {
        self.dtype
            .and_then(starkv_cache::DType::from_code)
            .unwrap_or(default)
    }
}

impl BlockEntry {
    pub fn key_bytes(&self) -> Key {
        let mut key = [0u8; 32];
        for (i, b) in key.iter_mut().enumerate() {
            *b = self
                .key
                .get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .unwrap_or(0);
        }
        key
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every document of the cluster, in memory and on disk.
pub struct Catalog {
    dir: PathBuf,
    docs: Mutex<HashMap<String, Arc<DocEntry>>>,
}

impl Catalog {
    /// Opens (creating) `dir` and loads every entry in it.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut docs = HashMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path).map(|b| serde_json::from_slice::<DocEntry>(&b)) {
                Ok(Ok(doc)) => {
                    docs.insert(doc.doc.clone(), Arc::new(doc));
                }
                Ok(Err(e)) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable catalog entry")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable catalog entry")
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            docs: Mutex::new(docs),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<DocEntry>>> {
        self.docs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, doc: &str) -> Option<Arc<DocEntry>> {
        self.lock().get(doc).cloned()
    }

    pub fn list(&self) -> Vec<Arc<DocEntry>> {
        self.lock().values().cloned().collect()
    }

    /// The next version number of `doc`.
    pub fn next_version(&self, doc: &str) -> u64 {
        self.get(doc).map_or(1, |d| d.version + 1)
    }

    /// Makes `entry` the document's current state (durable before it is visible).
    pub fn publish(&self, entry: DocEntry) -> std::io::Result<Arc<DocEntry>> {
        let bytes = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        write_durably(&self.path(&entry.doc), &bytes)?;
        let entry = Arc::new(entry);
        self.lock().insert(entry.doc.clone(), entry.clone());
        Ok(entry)
    }

    pub fn remove(&self, doc: &str) -> std::io::Result<Option<Arc<DocEntry>>> {
        let removed = self.lock().remove(doc);
        match std::fs::remove_file(self.path(doc)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(removed)
    }

    fn path(&self, doc: &str) -> PathBuf {
        // Hex keeps any tenant name safe as a file name.
        self.dir.join(format!("{}.json", hex(doc.as_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_a_reopen_and_removal_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let entry = DocEntry {
            doc: "acme/report".into(),
            tenant: "acme".into(),
            version: 3,
            block_size: 4,
            anchor_size: 4,
            model_fingerprint: "ab".into(),
            created_ms: 1,
            pinned: true,
            ttl_ms: Some(60_000),
            dtype: Some(4),
            merge: Some(TemperedMerge {
                temperature: 1.25,
                scale: 0.5,
            }),
            reencode_ppm: 0,
            block_overlap: 0,
            tokens: vec![1, 2, 3, 4, 5],
            blocks: vec![BlockEntry {
                key: hex(&[0xab; 32]),
                start: 0,
                len: 4,
                holders: vec!["127.0.0.1:1".into()],
            }],
        };
        let catalog = Catalog::open(dir.path()).unwrap();
        assert_eq!(catalog.next_version("acme/report"), 1);
        catalog.publish(entry.clone()).unwrap();
        assert_eq!(entry.blocks[0].key_bytes(), [0xab; 32]);
        let reopened = Catalog::open(dir.path()).unwrap();
        assert_eq!(reopened.get("acme/report").as_deref(), Some(&entry));
        assert_eq!(reopened.next_version("acme/report"), 4);
        reopened.remove("acme/report").unwrap();
        assert!(
            Catalog::open(dir.path())
                .unwrap()
                .get("acme/report")
                .is_none()
        );
    }
}
