//! Crash safety: a child process (this test binary re-executed in "child writer" mode)
//! ingests, deletes and evicts documents in a loop and is SIGKILLed at random moments.
//! After each kill the parent reopens the store and checks that every visible document
//! is complete and verifies, and that gc leaves no block unreferenced.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use starkv_cache::engine::{Space, Target};
use starkv_cache::{BlockStore, DType, DocSpec, EvictionPolicy, StoreConfig};

use crate::util::*;

const ENV_DIR: &str = "STARKV_CACHE_CRASH_CHILD_DIR";
const ENV_SEED: &str = "STARKV_CACHE_CRASH_CHILD_SEED";
const ITERATIONS: u64 = 32;

fn child_store_config() -> StoreConfig {
    StoreConfig {
        gc_on_open: false,
        ..test_config()
    }
}

/// Child mode: only does something when the parent sets the environment variables.
#[test]
fn child_writer() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return;
    };
    let seed: u64 = std::env::var(ENV_SEED).unwrap().parse().unwrap();
    let store = BlockStore::open_rocks(rocks_config(dir.as_ref()), child_store_config()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    println!("STARKV_CHILD_READY");
    for n in 0.. {
        let doc = format!("doc{}", rng.random_range(0..12u32));
        // Bases from a small pool, so blocks are shared across documents and versions.
        let base = rng.random_range(0..6u32) * 20_000;
        let blocks = rng.random_range(1..6u32);
        let spec = DocSpec {
            keep_previous_versions: rng.random_bool(0.3),
            ..spec(&doc, "t", DType::F16, doc_tokens(base, blocks))
        };
        let _ = ingest_spec(&store, spec);
        match n % 7 {
            3 => {
                let _ = store.delete_doc(&format!("doc{}", rng.random_range(0..12u32)));
            }
            5 => {
                let total = store.stats().store_bytes;
                store.set_eviction_policy(EvictionPolicy {
                    budget_bytes: Some(total * 2 / 3),
                    ..EvictionPolicy::default()
                });
                store.run_eviction().unwrap();
                store.set_eviction_policy(EvictionPolicy::default());
            }
            _ => {}
        }
    }
}

/// Never leave a writer running if an assertion fails mid-test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn referenced(store: &BlockStore) -> HashSet<[u8; 32]> {
    let mut keys = HashSet::new();
    for info in store.list() {
        let lease = store.open_version(&info.doc).unwrap();
        keys.extend(lease.manifest().blocks.iter().map(|b| b.key.0));
    }
    keys
}

fn stored_blocks(store: &BlockStore) -> Vec<[u8; 32]> {
    let mut out = Vec::new();
    for shard in 0..store.engine().shards() {
        store
            .engine()
            .scan(Target::Shard(shard), Space::BlockIndex, &[], &mut |k, _| {
                out.push(k.try_into().unwrap());
                true
            })
            .unwrap();
    }
    out
}

#[test]
fn sigkill_at_random_moments_never_exposes_incomplete_documents() {
    if std::env::var(ENV_DIR).is_ok() {
        return; // we are the child; only child_writer runs here
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    let mut total_docs_seen = 0;
    let mut orphans_collected = 0;
    for iter in 0..ITERATIONS {
        let mut child = KillOnDrop(
            Command::new(&exe)
                .args([
                    "--exact",
                    "crash::child_writer",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(ENV_DIR, dir.path())
                .env(ENV_SEED, iter.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let child = &mut child.0;
        // Start the clock once the child has opened the store, so slow machines still
        // kill it while it writes rather than while it starts.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("STARKV_CHILD_READY") {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                panic!("child exited before opening the store: {:?}", child.wait());
            }
        }
        let delay = Duration::from_millis(rng.random_range(5..200));
        let t0 = Instant::now();
        while t0.elapsed() < delay {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("child exited early: {status}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL on unix
        child.wait().unwrap();

        let store = BlockStore::open_rocks(rocks_config(dir.path()), child_store_config()).unwrap();
        let docs = store.list();
        total_docs_seen += docs.len();
        for info in &docs {
            let lease = store.open_version(&info.doc).unwrap();
            assert_eq!(lease.num_blocks(), info.blocks);
            verify_lease(&lease).unwrap_or_else(|e| panic!("iteration {iter}: {e}"));
        }
        orphans_collected += store.gc().unwrap().deleted;
        let refs = referenced(&store);
        for k in stored_blocks(&store) {
            assert!(refs.contains(&k), "iteration {iter}: orphan block after gc");
        }
        assert_eq!(store.stats().blocks as usize, refs.len());
        assert!(store.repair_queue().is_empty());
    }
    assert!(total_docs_seen > 0, "the child never published anything");
    println!(
        "crash test: {total_docs_seen} document checks, {orphans_collected} orphans collected"
    );
}
