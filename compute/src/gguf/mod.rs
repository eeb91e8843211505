//! A GGUF (v2, v3) reader over a memory map.
//!
//! The file is mapped once; tensor data is never copied at load time, so opening a model
//! costs page-table entries, not memory. Parsing is defensive: every length read from the
//! file is capped (as llama.cpp does since ggml-org/llama.cpp#19856) so that a corrupt or
//! hostile file yields an [`Error::Gguf`], never an allocation of absurd size or a panic.
//!
//! Format: magic `GGUF`, version, tensor count, metadata count, metadata key/values,
//! tensor infos (name, dims, type, offset), then tensor data at `general.alignment`.

mod reader;
pub mod writer;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::quant::GgmlType;

pub use reader::MetaValue;

/// An opened GGUF file: metadata, tensor directory and the mapped bytes.
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: BTreeMap<String, TensorInfo>,
    /// Tensor names in file order (the directory map is sorted by name).
    tensor_order: Vec<String>,
    data_offset: usize,
    mmap: Arc<Mmap>,
}

/// Bytes owned elsewhere (a memory map or a vector), cheap to clone and share across
/// threads. Model weights are held this way so that they stay in the page cache instead
/// of being copied at load time.
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl SharedBytes {
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        Self {
            owner: Arc::new(bytes),
            start: 0,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }
}

/// Where a tensor lives in the file and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the contiguous (innermost) dimension.
    pub dims: Vec<usize>,
    pub dtype: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn n_bytes(&self) -> usize {
        self.dtype.row_bytes(self.n_elements())
    }
}

/// A tensor's info and its bytes, borrowed from the memory map.
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    pub info: &'a TensorInfo,
    pub data: &'a [u8],
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the mapping is read-only; we document that model files must not be
        // modified while starkv runs (as llama.cpp does).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let parsed = reader::parse(&mmap).map_err(|reason| Error::Gguf {
            path: path.clone(),
            reason,
        })?;
        let mut tensors = BTreeMap::new();
        let mut tensor_order = Vec::with_capacity(parsed.tensors.len());
        for info in parsed.tensors {
            let end = parsed
                .data_offset
                .checked_add(info.offset)
                .and_then(|s| s.checked_add(info.n_bytes()));
            if end.is_none_or(|end| end > mmap.len()) {
                return Err(Error::Gguf {
                    path,
                    reason: format!("tensor `{}` extends past the end of the file", info.name),
                });
            }
            tensor_order.push(info.name.clone());
            if tensors.insert(info.name.clone(), info).is_some() {
                let name = tensor_order.pop().unwrap_or_default();
                return Err(Error::Gguf {
                    path,
                    reason: format!("duplicate tensor `{name}`"),
                });
            }
        }
        Ok(Self {
            path,
            version: parsed.version,
            metadata: parsed.metadata,
            tensors,
            tensor_order,
            data_offset: parsed.data_offset,
            mmap: Arc::new(mmap),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// Tensor infos in file order.
    pub fn tensor_infos(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensor_order.iter().filter_map(|n| self.tensors.get(n))
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let info = self.tensors.get(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            reason: "missing from the GGUF file".into(),
        })?;
        let start = self.data_offset + info.offset;
        Ok(TensorView {
            info,
            data: &self.mmap[start..start + info.n_bytes()],
        })
    }

    /// A tensor's bytes as a shareable handle on the memory map.
    pub fn tensor_bytes(&self, name: &str) -> Result<(TensorInfo, SharedBytes)> {
        let view = self.tensor(name)?;
        let start = self.data_offset + view.info.offset;
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = self.mmap.clone();
        Ok((
            view.info.clone(),
            SharedBytes {
                owner,
                start,
                len: view.data.len(),
            },
        ))
    }

    /// A required metadata value.
    pub fn require(&self, key: &str) -> Result<&MetaValue> {
        self.get(key).ok_or_else(|| Error::Metadata {
            key: key.to_string(),
            reason: "missing".into(),
        })
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.require(key)?
            .as_u64()
            .ok_or_else(|| wrong_type(key, "an unsigned integer"))
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.require(key)?
            .as_f64()
            .map(|v| v as f32)
            .ok_or_else(|| wrong_type(key, "a number"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.require(key)?
            .as_str()
            .ok_or_else(|| wrong_type(key, "a string"))
    }

    /// A string array, such as `tokenizer.ggml.tokens`.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let items = self
            .require(key)?
            .as_array()
            .ok_or_else(|| wrong_type(key, "an array"))?;
        items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| wrong_type(key, "an array of strings"))
            })
            .collect()
    }

    /// An integer array, such as `tokenizer.ggml.token_type`.
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>> {
        let items = self
            .require(key)?
            .as_array()
            .ok_or_else(|| wrong_type(key, "an array"))?;
        items
            .iter()
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| wrong_type(key, "an array of integers"))
            })
            .collect()
    }
}

fn wrong_type(key: &str, expected: &str) -> Error {
    Error::Metadata {
        key: key.to_string(),
        reason: format!("expected {expected}"),
    }
}

#[cfg(test)]
mod tests;
