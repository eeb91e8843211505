//! Server configuration: embedded defaults, then a TOML file, then environment and flags
//! (applied by the binary).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use starkv_compute::cuda::DeviceChoice;
use starkv_service::DedupScope;

/// What a key may do: admin implies write implies read; `metrics` only reads `/metrics`
/// (for a scraper that should see no document), which admin keys may read too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Write,
    Admin,
    Metrics,
}

impl Role {
    /// Whether a key with this role may do what `needed` is required for.
    pub fn grants(self, needed: Role) -> bool {
        use Role::*;
        match (self, needed) {
            (Admin, _) | (Metrics, Metrics) => true,
            (Metrics, _) | (_, Metrics) => false,
            (Write, Read | Write) | (Read, Read) => true,
            (Read | Write, _) => false,
        }
    }
}

/// A bearer API key, the role it grants and the tenant whose documents it sees.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiKey {
    pub key: String,
    pub role: Role,
    #[serde(default = "default_tenant")]
    pub tenant: String,
}

fn default_tenant() -> String {
    "default".into()
}

/// Everything `starkv serve` can be told. Field docs are the config-file reference.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on. Without API keys only loopback addresses are allowed.
    pub listen: SocketAddr,
    /// Models and the store live here.
    pub data_dir: PathBuf,
    /// A llama GGUF; the default model is fetched when absent.
    pub model: Option<PathBuf>,
    /// RocksDB block shards (fixed when the store is created).
    pub shards: usize,
    /// Default Star Attention block size for ingest.
    pub block_size: usize,
    /// Default anchor size (`None`: the block size).
    pub anchor_size: Option<usize>,
    /// Default `block_overlap` for ingests that do not set one (`None`:
    /// [`starkv_compute::star::DEFAULT_OVERLAP`]): tokens before each block that its
    /// phase 1 encodes in front of it and drops, so a block boundary does not cut a
    /// sentence off from its beginning (issue 14).
    pub block_overlap: Option<usize>,
    /// Default `merge_scale` (APE's scaling factor `S`, at `merge_temperature` 1) for
    /// ingests that set neither merge option and whose context blocks are approximate
    /// (`None`: [`starkv_compute::partial::DEFAULT_MERGE_SCALE`], 0.5, measured better
    /// than the exact merge on needle retrieval at small blocks, issue 14; 1: the exact
    /// merge). An ingest re-encoded in full (`reencode_ratio` 1) keeps the exact merge,
    /// whatever this says.
    pub merge_scale: Option<f32>,
    /// Default `reencode_ratio` for ingests that do not set one (`None`: 0, off).
    /// Selective re-encoding (issue 14) costs ingest time, and its block keys cover the
    /// whole document (no reuse across documents or on re-ingest of an edited one); at
    /// 0.05 it bought no measurable accuracy on the H200 at 8 and 16 blocks per document
    /// (README, 616 paired needle questions), hence off by default. On a cluster's
    /// coordinator it applies too: each worker holding a part of a re-encoded document
    /// computes the whole of it and keeps its part (such an ingest is not spread).
    pub reencode_ratio: Option<f32>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Largest document accepted, in tokens (`None`: the model's `context_length` from the
    /// GGUF, the longest context it was trained for).
    pub max_document_tokens: Option<usize>,
    /// Largest document accepted, in tokens, when the ingest opts in to positions beyond
    /// the model's context (`allow_beyond_context: true`): answers may degrade there.
    pub max_document_tokens_beyond_context: usize,
    /// Largest question accepted, in tokens (longer ones answer 400 before any work).
    pub max_question_tokens: usize,
    /// Cap on `max_tokens` of a query.
    pub max_tokens_cap: usize,
    /// Ingest jobs waiting beyond this answer 429.
    pub ingest_queue: usize,
    /// Queries running at once; more answer 503.
    pub query_concurrency: usize,
    /// Byte budget of the store (`None`: unbounded).
    pub store_budget_bytes: Option<u64>,
    /// In-memory hot tier of decoded blocks.
    pub hot_tier_bytes: u64,
    /// Ingests are refused with 507 while the filesystem of the data directory has less
    /// free space than this (also checked before every block an ingest writes).
    pub min_free_disk_bytes: u64,
    /// Where the model runs: `auto` (the GPU when the CUDA driver, NVRTC and cuBLAS load,
    /// else the CPU), `cpu`, `cuda` or `cuda:N` (an error when that GPU cannot be used).
    pub device: String,
    /// Byte budget of the GPU-resident block tier (`None`: half of the device memory
    /// left free after the weights). Ignored on the CPU.
    pub gpu_tier_bytes: Option<u64>,
    /// Which documents share stored blocks: `tenant` (the default: only documents of one
    /// tenant) or `global` (all tenants; less storage, but a side channel: a tenant can
    /// tell from `reused_blocks` and the ingest time whether another stored a text).
    pub dedup_scope: String,
    /// Seconds a shutdown (SIGTERM, Ctrl-C) waits for running requests, which it cancels,
    /// before the server exits anyway.
    pub shutdown_grace_seconds: u64,
    /// Bearer keys; empty means no authentication (loopback only).
    pub api_keys: Vec<ApiKey>,
    /// Shard workers (`host:port` of `starkv worker` processes). When set, this server is
    /// their coordinator: documents' blocks are encoded and kept by the workers, and a
    /// query sends each layer's Q to them. Empty: this process holds every block.
    pub workers: Vec<String>,
    /// Local devices to run one in-process shard worker each on (`["cuda:0", "cuda:1"]`;
    /// `cpu` may repeat, as may a GPU to share it), when `workers` is empty. Empty: every
    /// GPU of the host when `device` is `auto` and there is more than one, else none (the
    /// server holds every block itself). Each worker keeps its blocks in its own store
    /// under `DATA_DIR/local/<i>/`; the server coordinates them as it would remote ones.
    pub devices: Vec<String>,
    /// The secret every worker checks at the handshake (required with `workers`).
    pub cluster_secret: Option<String>,
    /// Copies of every block, on distinct workers.
    pub replicas: usize,
    /// Longest wait for a worker's per-layer answer (or session open), in milliseconds;
    /// past it the worker counts as failed and its blocks are served elsewhere.
    pub worker_timeout_ms: u64,
    /// Longest wait for a worker to encode its blocks of one document, in seconds.
    pub worker_encode_timeout_secs: u64,
    /// Microseconds a query waiting for a worker's per-layer reply polls the socket
    /// before sleeping (0: never poll). Unset: 2000 on hosts with at least 4 hardware
    /// threads, else 0. Polling saves the scheduler's wake-up per layer and worker at the
    /// cost of a busy core while a query waits.
    pub cluster_spin_us: Option<u64>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8700)),
            data_dir: starkv_compute::fetch::default_data_dir(),
            model: None,
            shards: 4,
            block_size: 2048,
            anchor_size: None,
            block_overlap: None,
            merge_scale: None,
            reencode_ratio: None,
            max_body_bytes: 16 << 20,
            max_document_tokens: None,
            max_document_tokens_beyond_context: 1 << 20,
            max_question_tokens: 4096,
            max_tokens_cap: 1024,
            ingest_queue: 64,
            query_concurrency: 4,
            store_budget_bytes: None,
            hot_tier_bytes: 1 << 30,
            min_free_disk_bytes: 1 << 30,
            device: "auto".into(),
            gpu_tier_bytes: None,
            dedup_scope: "tenant".into(),
            shutdown_grace_seconds: 5,
            api_keys: Vec::new(),
            workers: Vec::new(),
            devices: Vec::new(),
            cluster_secret: None,
            replicas: 1,
            worker_timeout_ms: 30_000,
            worker_encode_timeout_secs: 3600,
            cluster_spin_us: None,
        }
    }
}

/// Errors reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ServerConfig {
    /// Defaults overlaid with `file` (TOML), when given.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = file else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    /// The parsed `device` setting.
    pub fn device_choice(&self) -> Result<DeviceChoice, ConfigError> {
        self.device
            .parse()
            .map_err(|e: String| ConfigError::Invalid(format!("device {e}")))
    }

    /// The parsed `dedup_scope` setting.
    pub fn dedup_scope(&self) -> Result<DedupScope, ConfigError> {
        self.dedup_scope
            .parse()
            .map_err(|e: String| ConfigError::Invalid(format!("dedup_scope {e}")))
    }

    /// The parsed `devices` setting (`auto` is not a device to run a worker on).
    pub fn local_device_choices(&self) -> Result<Vec<DeviceChoice>, ConfigError> {
        self.devices
            .iter()
            .map(|d| match d.parse::<DeviceChoice>() {
                Ok(DeviceChoice::Auto) => Err(ConfigError::Invalid(
                    "devices: list devices (cpu, cuda:N), not auto".into(),
                )),
                Ok(choice) => Ok(choice),
                Err(e) => Err(ConfigError::Invalid(format!("devices: {e}"))),
            })
            .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.device_choice()?;
        let devices = self.local_device_choices()?;
        if !devices.is_empty() && !self.workers.is_empty() {
            return Err(ConfigError::Invalid(
                "devices (local workers) and workers (remote ones) cannot both be set".into(),
            ));
        }
        if devices.contains(&DeviceChoice::Cpu) && devices.iter().any(|d| *d != DeviceChoice::Cpu) {
            // The stored KV type follows the device and is part of every block key.
            return Err(ConfigError::Invalid(
                "devices: list only GPUs or only cpu (CPU and GPU workers store KV in different types)".into(),
            ));
        }
        if !devices.is_empty() && (self.replicas == 0 || self.replicas > devices.len()) {
            return Err(ConfigError::Invalid(format!(
                "replicas must be in 1..={} (the number of local devices)",
                devices.len()
            )));
        }
        if self.dedup_scope()? == DedupScope::Global
            && !(self.workers.is_empty() && devices.is_empty())
        {
            return Err(ConfigError::Invalid(
                "dedup_scope = \"global\" is not supported with workers or devices (they scope block keys to the tenant)"
                    .into(),
            ));
        }
        if self.max_question_tokens == 0
            || self.max_document_tokens == Some(0)
            || self.max_tokens_cap == 0
        {
            return Err(ConfigError::Invalid(
                "max_question_tokens, max_document_tokens and max_tokens_cap must be >= 1".into(),
            ));
        }
        if self.api_keys.is_empty() && !self.listen.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "no api_keys are configured, so starkv only binds to loopback; {} is not a loopback address",
                self.listen
            )));
        }
        if self.block_size == 0
            || self
                .anchor_size
                .is_some_and(|a| a == 0 || a > self.block_size)
        {
            return Err(ConfigError::Invalid(
                "block_size must be >= 1 and anchor_size in 1..=block_size".into(),
            ));
        }
        if self
            .block_overlap
            .is_some_and(|o| o > starkv_compute::star::MAX_OVERLAP)
        {
            return Err(ConfigError::Invalid(format!(
                "block_overlap must be in 0..={}",
                starkv_compute::star::MAX_OVERLAP
            )));
        }
        let scales = crate::http::documents::MERGE_SCALE;
        if self.merge_scale.is_some_and(|s| !scales.contains(&s)) {
            return Err(ConfigError::Invalid(format!(
                "merge_scale must be in {}..={}",
                scales.start(),
                scales.end()
            )));
        }
        if self
            .reencode_ratio
            .is_some_and(|r| !(0.0..=1.0).contains(&r))
        {
            return Err(ConfigError::Invalid(
                "reencode_ratio must be in 0..=1".into(),
            ));
        }
        if !self.workers.is_empty() {
            if self.cluster_secret.as_deref().is_none_or(str::is_empty) {
                return Err(ConfigError::Invalid(
                    "workers are configured but cluster_secret is not: workers accept only a coordinator that knows their secret".into(),
                ));
            }
            if self.replicas == 0 || self.replicas > self.workers.len() {
                return Err(ConfigError::Invalid(format!(
                    "replicas must be in 1..={} (the number of workers)",
                    self.workers.len()
                )));
            }
            let mut seen = std::collections::HashSet::new();
            if let Some(dup) = self.workers.iter().find(|w| !seen.insert(w.as_str())) {
                return Err(ConfigError::Invalid(format!(
                    "worker {dup} is listed twice"
                )));
            }
            if self.worker_timeout_ms == 0 || self.worker_encode_timeout_secs == 0 {
                return Err(ConfigError::Invalid(
                    "worker_timeout_ms and worker_encode_timeout_secs must be >= 1".into(),
                ));
            }
        }
        if self.shards == 0 || self.query_concurrency == 0 || self.ingest_queue == 0 {
            return Err(ConfigError::Invalid(
                "shards, query_concurrency and ingest_queue must be >= 1".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_settings_are_checked() {
        let with = |f: &dyn Fn(&mut ServerConfig)| {
            let mut c = ServerConfig {
                workers: vec!["127.0.0.1:8701".into(), "127.0.0.1:8702".into()],
                cluster_secret: Some("s".into()),
                ..ServerConfig::default()
            };
            f(&mut c);
            c.validate()
        };
        assert!(with(&|_| {}).is_ok());
        assert!(
            with(&|c| c.cluster_secret = None).is_err(),
            "a secret is required"
        );
        assert!(with(&|c| c.cluster_secret = Some(String::new())).is_err());
        assert!(
            with(&|c| c.replicas = 3).is_err(),
            "more replicas than workers"
        );
        assert!(with(&|c| c.replicas = 0).is_err());
        assert!(
            with(&|c| c.workers[1] = c.workers[0].clone()).is_err(),
            "duplicates"
        );
        assert!(with(&|c| c.worker_timeout_ms = 0).is_err());
        let parsed: ServerConfig = toml::from_str(
            "workers = [\"a:1\", \"b:2\"]\ncluster_secret = \"x\"\nreplicas = 2\nworker_timeout_ms = 500\n",
        )
        .unwrap();
        assert_eq!(parsed.workers.len(), 2);
        assert_eq!((parsed.replicas, parsed.worker_timeout_ms), (2, 500));
        assert!(parsed.validate().is_ok());
    }

    #[test]
    fn local_devices_are_checked() {
        let with = |devices: &[&str], f: &dyn Fn(&mut ServerConfig)| {
            let mut c = ServerConfig {
                devices: devices.iter().map(|d| d.to_string()).collect(),
                ..ServerConfig::default()
            };
            f(&mut c);
            c.validate()
        };
        assert!(with(&["cuda:0", "cuda:1"], &|_| {}).is_ok());
        assert!(with(&["cpu", "cpu"], &|c| c.replicas = 2).is_ok());
        assert!(with(&["cpu", "cpu"], &|c| c.replicas = 3).is_err());
        assert!(with(&["auto"], &|_| {}).is_err(), "auto is not a device");
        assert!(with(&["gpu7x"], &|_| {}).is_err());
        assert!(
            with(&["cuda:0", "cpu"], &|_| {}).is_err(),
            "mixed device types"
        );
        assert!(
            with(&["cpu"], &|c| {
                c.workers = vec!["a:1".into()];
                c.cluster_secret = Some("s".into());
            })
            .is_err(),
            "local and remote workers together"
        );
        assert!(with(&["cpu"], &|c| c.dedup_scope = "global".into()).is_err());
    }

    #[test]
    fn roles_grant_what_they_imply_and_metrics_keys_only_metrics() {
        use Role::*;
        let all = [Read, Write, Admin, Metrics];
        let granted = |have: Role| -> Vec<Role> {
            all.into_iter().filter(|&need| have.grants(need)).collect()
        };
        assert_eq!(granted(Read), vec![Read]);
        assert_eq!(granted(Write), vec![Read, Write]);
        assert_eq!(granted(Admin), vec![Read, Write, Admin, Metrics]);
        assert_eq!(granted(Metrics), vec![Metrics]);
    }

    #[test]
    fn defaults_validate_and_bad_limits_do_not() {
        let config = ServerConfig::default();
        config.validate().unwrap();
        assert_eq!(config.dedup_scope().unwrap(), DedupScope::Tenant);
        assert_eq!(config.max_document_tokens, None, "follows the model");
        for toml in [
            "dedup_scope = \"everyone\"",
            "max_question_tokens = 0",
            "max_document_tokens = 0",
            "reencode_ratio = 1.5",
            "reencode_ratio = -0.1",
            "reencode_ratio = nan",
            "merge_scale = 0",
            "merge_scale = 0.01",
            "merge_scale = 65",
            "merge_scale = -0.5",
            "merge_scale = nan",
        ] {
            let config: ServerConfig = toml::from_str(toml).unwrap();
            assert!(config.validate().is_err(), "{toml}");
        }
        let global: ServerConfig = toml::from_str("dedup_scope = \"global\"").unwrap();
        assert_eq!(global.dedup_scope().unwrap(), DedupScope::Global);
        global.validate().unwrap();
        let reencoded: ServerConfig = toml::from_str("reencode_ratio = 0.05").unwrap();
        reencoded.validate().unwrap();
        assert_eq!(reencoded.reencode_ratio, Some(0.05));
        for scale in ["0.015625", "0.5", "1.0", "64"] {
            let toml = format!("merge_scale = {scale}");
            let config: ServerConfig = toml::from_str(&toml).unwrap();
            config.validate().unwrap();
            assert_eq!(config.merge_scale, Some(scale.parse().unwrap()), "{toml}");
        }
        assert_eq!(ServerConfig::default().merge_scale, None);
        // Workers scope block keys to the tenant; a global coordinator would disagree.
        let cluster = "workers = [\"a:1\", \"b:2\"]\ncluster_secret = \"s\"\n";
        let tenant: ServerConfig = toml::from_str(cluster).unwrap();
        tenant.validate().unwrap();
        let mixed: ServerConfig =
            toml::from_str(&format!("dedup_scope = \"global\"\n{cluster}")).unwrap();
        assert!(mixed.validate().is_err());
        let role: ServerConfig =
            toml::from_str("[[api_keys]]\nkey = \"k\"\nrole = \"metrics\"\n").unwrap();
        assert_eq!(role.api_keys[0].role, Role::Metrics);
    }
}
