//! A model file opened once: the loaded model, its name and the SHA-256 of the file (part
//! of every block key). A server and its in-process workers share one (`serve --devices`
//! on a host with several GPUs): one copy of the weights in host memory and one pass
//! over the file to hash it, whatever the number of devices. Each device still gets its
//! own copy of the weights from its backend.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use starkv_compute::LoadedModel;

use crate::{ServiceError, ServiceResult};

/// See the module docs; cloning shares the model.
#[derive(Clone)]
pub struct ModelFile {
    model: Arc<LoadedModel>,
    path: PathBuf,
    id: String,
    fingerprint: Arc<[u8]>,
}

impl std::fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFile")
            .field("path", &self.path)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ModelFile {
    /// Loads and hashes the GGUF file at `path`.
    pub fn open(path: &Path) -> ServiceResult<Self> {
        Self::with_loaded(LoadedModel::open(path)?, path)
    }

    /// `model`, already loaded from `path` (hashed here).
    pub fn with_loaded(model: LoadedModel, path: &Path) -> ServiceResult<Self> {
        Ok(Self {
            model: Arc::new(model),
            path: path.to_path_buf(),
            id: path
                .file_stem()
                .map_or("model".into(), |s| s.to_string_lossy().into_owned()),
            fingerprint: file_fingerprint(path)?.into(),
        })
    }

    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's name without its extension.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// SHA-256 of the file.
    pub fn fingerprint(&self) -> &[u8] {
        &self.fingerprint
    }

    /// Whether `other` shares this one's loaded model (not a second copy).
    pub fn shares_weights_with(&self, other: &ModelFile) -> bool {
        Arc::ptr_eq(&self.model, &other.model)
    }
}

/// SHA-256 of the file at `path`.
fn file_fingerprint(path: &Path) -> ServiceResult<Vec<u8>> {
    use std::io::Read;
    let io = |e: std::io::Error| ServiceError::Internal(format!("reading {}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_vec())
}
