//! End-to-end cluster tests: real `starkv worker` processes and a `starkv serve`
//! coordinator on loopback, compared with a single server on the same document.
//!
//! Sized for a loaded 2-core CI machine: a ~600-token document in 16-token blocks (so
//! rendezvous hashing puts blocks on every worker), 8 generated tokens, one thread per
//! process, generous timeouts and no timing assertions.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::service::{QUESTION, Server, document, temp_dir, wait_for};
use crate::util::{model_path, wait_for_listening};

const SECRET: &str = "test-cluster-secret";
const BLOCK_SIZE: u64 = 16;
const MAX_TOKENS: u64 = 8;

/// A `starkv worker` process; killed (SIGKILL) on drop.
struct WorkerProc {
    child: Child,
    addr: String,
}

impl WorkerProc {
    /// Starts a worker on `addr` (`127.0.0.1:0` for any port) with its own data dir.
    fn start(dir: &Path, addr: &str) -> WorkerProc {
        Self::start_with(dir, addr, &[])
    }

    /// [`WorkerProc::start`] with more `starkv worker` arguments.
    fn start_with(dir: &Path, addr: &str, extra: &[&str]) -> WorkerProc {
        let model = model_path();
        let mut child = Command::new(env!("CARGO_BIN_EXE_starkv"))
            .args([
                "--data-dir",
                dir.to_str().unwrap(),
                "--model",
                model.to_str().unwrap(),
                "--threads",
                "1",
                "worker",
                "--listen",
                addr,
                "--secret",
                SECRET,
                "--device",
                "cpu",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting starkv worker");
        let addr = wait_for_listening(&mut child, "starkv worker listening on ", "worker");
        WorkerProc { child, addr }
    }

    /// SIGKILL: no chance to flush or say goodbye.
    fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.addr.clone()
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three workers (each with its own data dir under `dir`) and their coordinator.
fn cluster(dir: &Path, replicas: u32) -> (Vec<WorkerProc>, Server) {
    cluster_with_timeout(dir, replicas, "20000")
}

/// [`cluster`] with the coordinator's per-call timeout `timeout_ms`.
fn cluster_with_timeout(dir: &Path, replicas: u32, timeout_ms: &str) -> (Vec<WorkerProc>, Server) {
    cluster_with(dir, replicas, timeout_ms, None)
}

/// [`cluster_with_timeout`], every process polling its sockets for `spin_us` µs when
/// set (else their default: off on small hosts like CI's).
fn cluster_with(
    dir: &Path,
    replicas: u32,
    timeout_ms: &str,
    spin_us: Option<&str>,
) -> (Vec<WorkerProc>, Server) {
    let worker_spin: Vec<&str> = spin_us.map_or(vec![], |us| vec!["--spin-us", us]);
    let workers: Vec<WorkerProc> = (0..3)
        .map(|i| {
            WorkerProc::start_with(
                &dir.join(format!("worker-{i}")),
                "127.0.0.1:0",
                &worker_spin,
            )
        })
        .collect();
    let list = workers
        .iter()
        .map(|w| w.addr.clone())
        .collect::<Vec<_>>()
        .join(",");
    let replicas = replicas.to_string();
    let mut args = vec![
        "--device",
        "cpu",
        "--workers",
        &list,
        "--cluster-secret",
        SECRET,
        "--replicas",
        &replicas,
        "--worker-timeout-ms",
        timeout_ms,
    ];
    if let Some(us) = spin_us {
        args.extend(["--cluster-spin-us", us]);
    }
    let coordinator = Server::start(&dir.join("coordinator"), &args);
    (workers, coordinator)
}

fn ingest(server: &Server, id: &str, text: &str) -> Value {
    let (status, doc) = server.json(
        "POST",
        "/v1/documents?wait=true",
        Some(json!({ "id": id, "text": text, "block_size": BLOCK_SIZE })),
    );
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["state"], "ready", "{doc}");
    doc
}

fn ask(server: &Server, id: &str) -> Value {
    let (status, answer) = server.json(
        "POST",
        &format!("/v1/documents/{id}/query"),
        Some(json!({ "question": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0 })),
    );
    assert_eq!(status, 200, "{answer}");
    answer
}

/// The worker addresses holding blocks of `id`, and the number of blocks.
fn placement(server: &Server, id: &str) -> (BTreeSet<String>, usize) {
    let (status, doc) = server.json("GET", &format!("/v1/documents/{id}"), None);
    assert_eq!(status, 200, "{doc}");
    let blocks = doc["placement"].as_array().expect("placement").clone();
    let mut holders = BTreeSet::new();
    for b in &blocks {
        let workers = b["workers"].as_array().unwrap();
        assert!(!workers.is_empty(), "a block without a holder: {doc}");
        for w in workers {
            holders.insert(w.as_str().unwrap().to_string());
        }
    }
    (holders, blocks.len())
}

/// The answer of one server holding every block: the reference.
fn single_node_answer(dir: &Path, id: &str, text: &str) -> Value {
    let single = Server::start(&dir.join("single"), &["--device", "cpu"]);
    ingest(&single, id, text);
    let answer = ask(&single, id);
    single.kill();
    answer
}

fn healthy(server: &Server, addr: &str) -> bool {
    let (_, status) = server.json("GET", "/v1/admin/cluster", None);
    status["workers"].as_array().is_some_and(|ws| {
        ws.iter()
            .any(|w| w["address"] == addr && w["healthy"] == true)
    })
}

/// A free loopback port (to restart a worker at the address its coordinator knows).
fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn three_workers_answer_as_one_node_and_survive_a_killed_worker() {
    let dir = temp_dir("cluster-three");
    let text = document(None);
    let want = single_node_answer(&dir, "harbour", &text);

    // Every process polls its sockets before sleeping (a worker also hands its attends to
    // a polling pool thread): the latency paths, exercised even on a small host.
    let (mut workers, coordinator) = cluster_with(&dir, 1, "20000", Some("400"));
    let doc = ingest(&coordinator, "harbour", &text);
    let (holders, n_blocks) = placement(&coordinator, "harbour");
    assert!(n_blocks >= 30, "{doc}");
    let addrs: BTreeSet<String> = workers.iter().map(|w| w.addr.clone()).collect();
    assert_eq!(holders, addrs, "blocks are spread over all three workers");

    let got = ask(&coordinator, "harbour");
    assert_eq!(got["answer"], want["answer"], "cluster vs single node");
    // Concurrent queries share each worker's connection, whose replies are read by
    // whichever waiting caller holds the socket and handed on: each gets its own.
    std::thread::scope(|s| {
        let queries: Vec<_> = (0..3)
            .map(|_| s.spawn(|| ask(&coordinator, "harbour")))
            .collect();
        for q in queries {
            let answer = q.join().expect("query thread");
            assert_eq!(answer["answer"], want["answer"], "concurrent query");
        }
    });
    assert_eq!(
        got["usage"]["cached_context_tokens"],
        want["usage"]["cached_context_tokens"]
    );
    let (_, cluster) = coordinator.json("GET", "/v1/admin/cluster", None);
    let workers_json = cluster["workers"].as_array().unwrap();
    assert_eq!(workers_json.len(), 3, "{cluster}");
    assert!(
        workers_json
            .iter()
            .all(|w| w["healthy"] == true && w["placed_blocks"].as_u64().unwrap() > 0),
        "{cluster}"
    );
    // Each worker answered attend calls (one per layer and step), and its own time on
    // them (waiting for a thread, attention) fits inside the round trip the coordinator
    // measured (microseconds rounded down on each side, hence the slack).
    for w in workers_json {
        let a = &w["attend"];
        let us = |k: &str| a[k].as_f64().unwrap();
        assert!(a["calls"].as_u64().unwrap() >= 30, "{w}");
        assert!(us("mean_worker_compute_us") > 0.0, "{w}");
        assert!(
            us("mean_round_trip_us") + 2.0
                >= us("mean_worker_queued_us") + us("mean_worker_compute_us"),
            "{w}"
        );
    }

    // SIGKILL one worker: its blocks are re-encoded on the others and the answer stays
    // the single-node answer.
    let killed = workers.remove(0).kill();
    let again = ask(&coordinator, "harbour");
    assert_eq!(again["answer"], want["answer"], "after a worker died");
    assert!(again["repaired_blocks"].as_u64().unwrap() > 0, "{again}");
    let (holders, _) = placement(&coordinator, "harbour");
    assert!(!holders.contains(&killed), "placement updated: {holders:?}");
    assert!(coordinator.metric("starkv_worker_failures_total") >= 1.0);

    // Restart it at the same address: health checks find it, new blocks go to it again.
    let back = WorkerProc::start(
        &dir.join("worker-0"),
        &format!("127.0.0.1:{}", port_of(&killed)),
    );
    assert_eq!(back.addr, killed);
    wait_for(
        "the restarted worker to be healthy",
        Duration::from_secs(60),
        || healthy(&coordinator, &killed),
    );
    let edited = document(Some("The lighthouse keeper counted the ships twice a day."));
    ingest(&coordinator, "harbour-2", &edited);
    let (holders, _) = placement(&coordinator, "harbour-2");
    assert!(
        holders.contains(&killed),
        "a worker that came back is used again"
    );
    let answer = ask(&coordinator, "harbour-2");
    assert!(answer["usage"]["generated_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn two_replicas_answer_without_reencoding_when_a_worker_is_down() {
    let dir = temp_dir("cluster-replicas");
    let text = document(None);
    let want = single_node_answer(&dir, "harbour", &text);
    let (mut workers, coordinator) = cluster(&dir, 2);
    ingest(&coordinator, "harbour", &text);
    let (_, doc) = coordinator.json("GET", "/v1/documents/harbour", None);
    for block in doc["placement"].as_array().unwrap() {
        assert_eq!(block["workers"].as_array().unwrap().len(), 2, "{block}");
    }
    workers.remove(1).kill();
    let got = ask(&coordinator, "harbour");
    assert_eq!(got["answer"], want["answer"]);
    assert_eq!(
        got["repaired_blocks"], 0,
        "a replica served, nothing re-encoded"
    );
    assert_eq!(
        coordinator.metric("starkv_cluster_blocks_reencoded_total"),
        0.0
    );
}

#[test]
fn a_worker_killed_during_ingest_loses_nothing_acknowledged() {
    let dir = temp_dir("cluster-kill-ingest");
    let text: String = (0..3)
        .map(|i| format!("Section {i}: {}\n\n", document(None)))
        .collect();
    let want = single_node_answer(&dir, "long", &text);
    let (mut workers, coordinator) = cluster(&dir, 1);
    let (status, job) = coordinator.json(
        "POST",
        "/v1/documents",
        Some(json!({ "id": "long", "text": text, "block_size": BLOCK_SIZE })),
    );
    assert_eq!(status, 202, "{job}");
    // Kill a worker while the blocks are being encoded (or right after: either way the
    // acknowledged ingest must complete and answer exactly).
    std::thread::sleep(Duration::from_millis(300));
    workers.remove(2).kill();
    wait_for("the ingest to finish", Duration::from_secs(600), || {
        let (_, doc) = coordinator.json("GET", "/v1/documents/long", None);
        assert_ne!(doc["state"], "failed", "{doc}");
        doc["state"] == "ready"
    });
    let got = ask(&coordinator, "long");
    assert_eq!(got["answer"], want["answer"]);
}

#[test]
fn a_worker_refuses_a_coordinator_without_the_secret_and_bad_frames() {
    use std::io::{Read, Write};
    let dir = temp_dir("cluster-secret");
    let worker = WorkerProc::start(&dir.join("worker"), "127.0.0.1:0");
    // A coordinator with the wrong secret sees the worker as down and cannot ingest.
    let coordinator = Server::start(
        &dir.join("coordinator"),
        &[
            "--device",
            "cpu",
            "--workers",
            &worker.addr,
            "--cluster-secret",
            "not-the-secret",
        ],
    );
    let (status, err) = coordinator.json(
        "POST",
        "/v1/documents?wait=true",
        Some(json!({ "id": "d", "text": document(None), "block_size": BLOCK_SIZE })),
    );
    assert!(status == 200 || status == 202, "{err}");
    assert_eq!(err["state"], "failed", "{err}");
    assert!(!healthy(&coordinator, &worker.addr));

    // Garbage instead of a handshake: an error frame back, then the connection closes;
    // the worker keeps serving.
    let mut raw = std::net::TcpStream::connect(&worker.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    raw.write_all(&[12, 0, 0, 0, 99, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9])
        .unwrap();
    let mut reply = Vec::new();
    let _ = raw.read_to_end(&mut reply);
    assert!(reply.len() > 13, "an error reply: {reply:?}");
    assert_eq!(reply[4], 127, "error kind");
    // An absurd length prefix: closed without an answer, and the worker still serves.
    let mut raw = std::net::TcpStream::connect(&worker.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    raw.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
    let mut reply = Vec::new();
    let _ = raw.read_to_end(&mut reply);
    assert!(reply.is_empty());
    // A handshake longer than 64 KiB (a valid frame length otherwise): closed unread.
    let mut raw = std::net::TcpStream::connect(&worker.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    raw.write_all(&(1u32 << 20).to_le_bytes()).unwrap();
    let mut reply = Vec::new();
    let _ = raw.read_to_end(&mut reply);
    assert!(reply.is_empty(), "no answer to an oversized handshake");
    assert!(
        TcpListener::bind(&worker.addr).is_err(),
        "the worker still listens"
    );
    assert!(std::net::TcpStream::connect(&worker.addr).is_ok());
}

/// Flips one byte in the middle of layer 7 of the first block a stopped worker holds of
/// `doc`, writing the damaged value back through the store's engine.
fn flip_a_stored_layer(worker_dir: &Path, doc: &str) {
    flip_a_stored_block_layer(worker_dir, doc, 0);
}

/// Flips one byte in the middle of layer 7 of block `index` (in manifest order) of `doc`
/// in the stopped store under `data_dir`, writing the damaged value back through the
/// store's engine.
pub(crate) fn flip_a_stored_block_layer(data_dir: &Path, doc: &str, index: usize) {
    use starkv_cache::engine::{Batch, Space, Target, layer_key};
    use starkv_cache::{BlockStore, RocksConfig, StoreConfig};
    let store = BlockStore::open_rocks(
        RocksConfig::new(data_dir.join("store"), 4),
        StoreConfig::default(),
    )
    .expect("opening the stopped store");
    let lease = store.open_doc(doc).expect("the store holds the document");
    let block = lease.manifest().blocks[index].clone();
    drop(lease);
    let shard = block.key.shard(store.engine().shards());
    let key = layer_key(&block.key, 7);
    let mut value = None;
    store
        .engine()
        .get(Target::Shard(shard), Space::Layers, &key, &mut |v| {
            value = v.map(<[u8]>::to_vec)
        })
        .unwrap();
    let mut value = value.expect("a stored layer");
    let middle = value.len() / 2;
    value[middle] ^= 0x10;
    let mut batch = Batch::default();
    batch.put(Space::Layers, key, value);
    store
        .engine()
        .write(Target::Shard(shard), batch, true)
        .unwrap();
}

#[test]
fn a_bit_flip_in_a_worker_store_is_repaired_by_the_worker() {
    let dir = temp_dir("cluster-flip");
    let text = document(None);
    let want = single_node_answer(&dir, "harbour", &text);
    let (mut workers, coordinator) = cluster(&dir, 1);
    ingest(&coordinator, "harbour", &text);
    let (before, _) = placement(&coordinator, "harbour");
    // Stop worker 0, damage its stored blocks, start it again at the same address.
    let addr = workers.remove(0).kill();
    flip_a_stored_layer(&dir.join("worker-0"), "default/harbour");
    let _back = WorkerProc::start(&dir.join("worker-0"), &addr);
    wait_for(
        "the restarted worker to be healthy",
        Duration::from_secs(60),
        || healthy(&coordinator, &addr),
    );
    let got = ask(&coordinator, "harbour");
    assert_eq!(
        got["answer"], want["answer"],
        "a corrupt block is never served"
    );
    // The worker repaired its own blocks from its copy of the source tokens: nothing
    // moved and the coordinator re-encoded nothing.
    let (after, _) = placement(&coordinator, "harbour");
    assert_eq!(before, after);
    assert_eq!(got["repaired_blocks"], 0, "{got}");
}

#[test]
fn a_stalled_worker_times_out_and_the_answer_is_unchanged() {
    let dir = temp_dir("cluster-stall");
    let text = document(None);
    let want = single_node_answer(&dir, "harbour", &text);
    let (workers, coordinator) = cluster_with_timeout(&dir, 1, "3000");
    ingest(&coordinator, "harbour", &text);
    // SIGSTOP: the worker's sockets stay open but it never answers.
    let pid = workers[1].child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let got = ask(&coordinator, "harbour");
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    assert_eq!(got["answer"], want["answer"], "after a worker stalled");
    assert!(got["repaired_blocks"].as_u64().unwrap() > 0, "{got}");
    let (holders, _) = placement(&coordinator, "harbour");
    assert!(!holders.contains(&workers[1].addr), "{holders:?}");
}

/// `serve --devices cpu,cpu`: one in-process worker per listed device, coordinated as
/// remote workers are (placement, catalog, per-layer fan-out), no socket in between.
#[test]
fn local_device_workers_answer_as_one_node_and_keep_their_blocks_across_restarts() {
    let dir = temp_dir("cluster-local-devices");
    let text = document(None);
    let want = single_node_answer(&dir, "harbour", &text);
    let args = ["--device", "cpu", "--devices", "cpu,cpu", "--threads", "1"];
    let server = Server::start(&dir.join("local"), &args);
    ingest(&server, "harbour", &text);
    let (holders, n_blocks) = placement(&server, "harbour");
    assert!(n_blocks >= 30);
    let expected: BTreeSet<String> = ["local:0", "local:1"].map(String::from).into();
    assert_eq!(
        holders, expected,
        "blocks are spread over both local workers"
    );
    assert_eq!(ask(&server, "harbour")["answer"], want["answer"]);
    let (_, cluster) = server.json("GET", "/v1/admin/cluster", None);
    let workers = cluster["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{cluster}");
    assert!(
        workers
            .iter()
            .all(|w| w["healthy"] == true && w["device"] == "cpu"),
        "{cluster}"
    );
    // Each worker's blocks are in its own store under DATA_DIR/local/<i>.
    for i in 0..2 {
        assert!(dir.join(format!("local/local/{i}/store")).is_dir());
    }
    server.kill();

    // A restart with the same devices finds every block where it was: no re-encoding.
    let server = Server::start(&dir.join("local"), &args);
    let again = ask(&server, "harbour");
    assert_eq!(again["answer"], want["answer"]);
    assert_eq!(again["repaired_blocks"], 0, "{again}");
    assert_eq!(server.metric("starkv_cluster_blocks_reencoded_total"), 0.0);
}

/// An 8-bit document over workers (int8 and fp8): the coordinator picks the stored type
/// and its workers store that type (a worker that keyed its blocks otherwise would refuse
/// the encode: the content keys must match; the 16-bit version of the same text is stored
/// beside it), the document view says so, and the answer is the single node's over the
/// same 8-bit KV.
#[test]
fn an_int8_document_is_stored_in_8_bits_by_the_workers() {
    let dir = temp_dir("cluster-int8");
    let text = document(None);
    let kinds = [("harbour8", "int8"), ("harbourf8", "fp8")];
    let ingest_8bit = |server: &Server, id: &str, dtype: &str| {
        let (status, doc) = server.json(
            "POST",
            "/v1/documents?wait=true",
            Some(json!({ "id": id, "text": text, "block_size": BLOCK_SIZE, "kv_dtype": dtype })),
        );
        assert_eq!(status, 200, "{doc}");
        assert_eq!(doc["state"], "ready", "{doc}");
        doc
    };
    let single = Server::start(&dir.join("single"), &["--device", "cpu"]);
    let mut want = Vec::new();
    for (id, dtype) in kinds {
        ingest_8bit(&single, id, dtype);
        want.push(ask(&single, id));
    }
    single.kill();

    let args = ["--device", "cpu", "--devices", "cpu,cpu", "--threads", "1"];
    let server = Server::start(&dir.join("local"), &args);
    ingest(&server, "harbour", &text);
    for ((id, dtype), want) in kinds.into_iter().zip(want) {
        ingest_8bit(&server, id, dtype);
        let (status, view) = server.json("GET", &format!("/v1/documents/{id}"), None);
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["kv_dtype"], dtype, "{view}");
        assert_eq!(view["stored_dtype"], dtype, "{view}");
        let (holders, _) = placement(&server, id);
        assert_eq!(
            holders.len(),
            2,
            "{dtype}: blocks on both workers: {holders:?}"
        );
        assert_eq!(ask(&server, id)["answer"], want["answer"], "{dtype}");
    }
}

/// Selective global re-encoding over workers: each worker holding blocks computes the
/// whole document (phase 1 and the pass; a re-encoded block depends on every block
/// before it) and keeps its part under the whole-document keys. The answer is the single
/// node's, and a worker that dies is replaced by a re-encode that re-encodes alike.
#[test]
fn a_reencoded_document_over_workers_answers_as_one_node() {
    let dir = temp_dir("cluster-reencode");
    let text = document(None);
    let ingest_reencoded = |server: &Server| {
        let (status, doc) = server.json(
            "POST",
            "/v1/documents?wait=true",
            Some(json!({ "id": "harbour-re", "text": text, "block_size": BLOCK_SIZE, "reencode_ratio": 0.1 })),
        );
        assert_eq!(status, 200, "{doc}");
        assert_eq!(doc["state"], "ready", "{doc}");
        doc
    };
    let single = Server::start(&dir.join("single"), &["--device", "cpu"]);
    ingest_reencoded(&single);
    let want = ask(&single, "harbour-re");
    single.kill();

    let (mut workers, coordinator) = cluster(&dir, 1);
    ingest_reencoded(&coordinator);
    let (holders, _) = placement(&coordinator, "harbour-re");
    assert_eq!(holders.len(), 3, "blocks on every worker: {holders:?}");
    assert_eq!(ask(&coordinator, "harbour-re")["answer"], want["answer"]);

    // Wait until the health checks mark it down: its blocks then have no live holder when
    // the query starts, and are re-encoded (whole document, as at ingest) elsewhere.
    let killed = workers.remove(0).kill();
    wait_for(
        "the killed worker to be marked down",
        Duration::from_secs(60),
        || !healthy(&coordinator, &killed),
    );
    let again = ask(&coordinator, "harbour-re");
    assert_eq!(again["answer"], want["answer"], "after a worker died");
    assert!(again["repaired_blocks"].as_u64().unwrap() > 0, "{again}");
    let (holders, _) = placement(&coordinator, "harbour-re");
    assert!(!holders.contains(&killed), "placement updated: {holders:?}");
}

/// APE's tempered merge over workers: each worker holding blocks after the anchor opens
/// a session for the tempered group (attended at `1 / T`), the coordinator weighs the
/// group and merges it with the untempered parts. The answer is the single node's, with
/// the document's merge and with a query's override.
#[test]
fn a_tempered_merge_over_workers_answers_as_one_node() {
    let dir = temp_dir("cluster-tempered");
    let text = document(None);
    let ingest_tempered = |server: &Server| {
        // An anchor of one block (not the default quarter of the document): most of the
        // document is then in the tempered group, and the merge changes the answer.
        let body = json!({ "id": "harbour", "text": text, "block_size": BLOCK_SIZE,
            "anchor_size": BLOCK_SIZE, "merge_temperature": 0.7, "merge_scale": 2.0 });
        let (status, doc) = server.json("POST", "/v1/documents?wait=true", Some(body));
        assert_eq!(status, 200, "{doc}");
        assert_eq!(doc["state"], "ready", "{doc}");
    };
    let ask_with = |server: &Server, merge: Value| {
        let mut body = json!({ "question": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0 });
        if let (Some(b), Some(m)) = (body.as_object_mut(), merge.as_object()) {
            b.extend(m.clone());
        }
        let (status, answer) = server.json("POST", "/v1/documents/harbour/query", Some(body));
        assert_eq!(status, 200, "{answer}");
        answer["answer"].clone()
    };
    let override_merge = json!({ "merge_temperature": 1.25, "merge_scale": 1.0 });
    let single = Server::start(&dir.join("single"), &["--device", "cpu"]);
    ingest_tempered(&single);
    let want = ask_with(&single, json!({}));
    let want_override = ask_with(&single, override_merge.clone());
    let exact = ask_with(
        &single,
        json!({ "merge_temperature": 1.0, "merge_scale": 1.0 }),
    );
    single.kill();
    // Else this test could not tell a tempered merge from an ignored one.
    assert_ne!(want, exact, "the document's merge changes this answer");

    let args = ["--device", "cpu", "--devices", "cpu,cpu", "--threads", "1"];
    let server = Server::start(&dir.join("local"), &args);
    ingest_tempered(&server);
    assert_eq!(placement(&server, "harbour").0.len(), 2);
    assert_eq!(ask_with(&server, json!({})), want);
    assert_eq!(ask_with(&server, override_merge), want_override);
}

/// Pin, TTL and eviction act on cluster documents (the coordinator's catalog) and free
/// the workers' stores.
#[test]
fn cluster_documents_follow_pin_ttl_and_eviction_rules() {
    let dir = temp_dir("cluster-lifecycle");
    let server = Server::start(&dir, &["--device", "cpu", "--devices", "cpu,cpu"]);
    // Distinct texts: shared blocks would (rightly) outlive one document's eviction.
    for id in ["kept", "brief", "plain"] {
        let text = format!("The {id} harbour master logs every ship. The keeper counts gulls.");
        ingest(&server, id, &text);
    }
    let (status, pinned) = server.json("POST", "/v1/documents/kept/pin", None);
    assert_eq!((status, &pinned["pinned"]), (200, &json!(true)), "{pinned}");
    let (_, doc) = server.json("GET", "/v1/documents/kept", None);
    assert_eq!(doc["pinned"], true, "{doc}");
    let (status, missing) = server.json("POST", "/v1/documents/nothing/pin", None);
    assert_eq!(status, 404, "{missing}");

    // A one-second TTL: the periodic upkeep removes the idle document.
    let (status, ttl) = server.json(
        "POST",
        "/v1/documents/brief/ttl",
        Some(json!({ "ttl_seconds": 1 })),
    );
    assert_eq!(status, 200, "{ttl}");
    wait_for("the TTL to expire", Duration::from_secs(30), || {
        server.json("GET", "/v1/documents/brief", None).0 == 404
    });

    // Rule eviction skips the pinned document and frees the workers' blocks.
    let (status, refused) = server.json(
        "POST",
        "/v1/admin/evict",
        Some(json!({ "budget_bytes": 1 })),
    );
    assert_eq!(status, 400, "{refused}");
    let (status, out) = server.json("POST", "/v1/admin/evict", Some(json!({ "lru": 10 })));
    assert_eq!(status, 200, "{out}");
    let evicted: Vec<&str> = out["evicted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[0].as_str().unwrap())
        .collect();
    assert_eq!(evicted, ["default/plain@1"], "{out}");
    assert!(out["bytes_freed"].as_u64().unwrap() > 0, "{out}");
    assert!(out["blocks_deleted"].as_u64().unwrap() > 0, "{out}");
    assert_eq!(server.json("GET", "/v1/documents/plain", None).0, 404);
    let answer = ask(&server, "kept");
    assert!(answer["usage"]["generated_tokens"].as_u64().unwrap() > 0);
}

/// `POST /v1/admin/verify` on a coordinator verifies every worker's store too: a bit
/// flipped in a local worker's store is reported (with the worker), repaired with
/// `repair`, and the next verify is clean. `GET /v1/admin/stats` sums the workers.
#[test]
fn verify_reaches_every_worker_and_repairs_a_flipped_block() {
    let dir = temp_dir("cluster-verify");
    let text = document(None);
    let args = ["--device", "cpu", "--devices", "cpu,cpu", "--threads", "1"];
    let server = Server::start(&dir, &args);
    ingest(&server, "harbour", &text);
    let want = ask(&server, "harbour");
    let (status, clean) = server.json("POST", "/v1/admin/verify", Some(json!({})));
    assert_eq!(status, 200, "{clean}");
    assert_eq!(clean["corruption_found"], false, "{clean}");
    let workers = clean["workers"].as_array().expect("per-worker results");
    assert_eq!(workers.len(), 2, "{clean}");
    for w in workers {
        assert_eq!(w["documents"], 1, "each worker holds a part: {clean}");
        assert_eq!(w["corruption_found"], false, "{clean}");
        assert!(w["error"].is_null(), "{clean}");
    }

    // The workers' stores, summed next to the coordinator's own (health checks every 2 s).
    wait_for("the workers' stats", Duration::from_secs(30), || {
        let (_, stats) = server.json("GET", "/v1/admin/stats", None);
        stats["cluster"]["documents"] == 2 && stats["cluster"]["stored_bytes"].as_u64() > Some(0)
    });
    let (_, stats) = server.json("GET", "/v1/admin/stats", None);
    let (_, cluster) = server.json("GET", "/v1/admin/cluster", None);
    let sum = |field: &str| -> u64 {
        cluster["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w[field].as_u64().unwrap())
            .sum()
    };
    assert_eq!(stats["cluster"]["workers"], 2, "{stats}");
    assert_eq!(
        stats["cluster"]["blocks"],
        sum("blocks"),
        "{stats} {cluster}"
    );
    assert_eq!(stats["cluster"]["placed_blocks"], sum("placed_blocks"));
    assert_eq!(
        stats["documents"], 0,
        "the coordinator stores no blocks: {stats}"
    );
    server.kill();

    // Damage local:1's part while the server is stopped: the offline verify of the data
    // directory finds it in that worker's store (exit 4), the server's own store clean.
    flip_a_stored_layer(&dir.join("local/1"), "default/harbour");
    let (code, offline) = offline_verify(&dir);
    assert_eq!(code, Some(4), "{offline}");
    let local = |report: &Value, address: &str| -> Value {
        report["workers"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["address"] == address).cloned())
            .unwrap_or_else(|| panic!("no {address} in {report}"))
    };
    assert_eq!(
        local(&offline, "local:1")["corruption_found"],
        true,
        "{offline}"
    );
    assert_eq!(
        local(&offline, "local:0")["corruption_found"],
        false,
        "{offline}"
    );
    assert_eq!(offline["corrupt"], json!([]), "{offline}");
    let server = Server::start(&dir, &args);
    let (status, found) = server.json("POST", "/v1/admin/verify", Some(json!({})));
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["corruption_found"], true, "{found}");
    let by_address = |report: &Value, address: &str| -> Value {
        report["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["address"] == address)
            .cloned()
            .unwrap_or_else(|| panic!("no {address} in {report}"))
    };
    let damaged = by_address(&found, "local:1");
    assert_eq!(damaged["corruption_found"], true, "{found}");
    assert_eq!(damaged["corrupt"].as_array().unwrap().len(), 1, "{found}");
    assert_eq!(by_address(&found, "local:0")["corruption_found"], false);
    assert_eq!(
        found["corrupt"],
        json!([]),
        "the coordinator's own store is clean"
    );

    let (status, repaired) =
        server.json("POST", "/v1/admin/verify", Some(json!({ "repair": true })));
    assert_eq!(status, 200, "{repaired}");
    assert_eq!(
        by_address(&repaired, "local:1")["repaired_blocks"],
        1,
        "{repaired}"
    );
    let (_, after) = server.json("POST", "/v1/admin/verify", Some(json!({})));
    assert_eq!(
        after["corruption_found"], false,
        "clean after the repair: {after}"
    );
    assert_eq!(ask(&server, "harbour")["answer"], want["answer"]);
    server.kill();
    let (code, offline) = offline_verify(&dir);
    assert_eq!(code, Some(0), "clean offline too: {offline}");
    assert_eq!(
        offline["workers"].as_array().map(Vec::len),
        Some(2),
        "{offline}"
    );
}

/// `starkv verify --json` on a stopped server's data directory: exit code and report.
fn offline_verify(data_dir: &Path) -> (Option<i32>, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_starkv"))
        .args(["--data-dir", data_dir.to_str().unwrap(), "verify", "--json"])
        .output()
        .expect("starkv verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "a JSON report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}

/// One worker's entry in `GET /v1/admin/cluster`.
fn worker_status(server: &Server, addr: &str) -> Value {
    let (_, status) = server.json("GET", "/v1/admin/cluster", None);
    status["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["address"] == addr).cloned())
        .unwrap_or_else(|| panic!("no worker {addr} in {status}"))
}

/// A worker that was down while a document was deleted drops its part of it when it
/// comes back; the parts the catalog still places on it stay (and answer unchanged).
#[test]
fn a_worker_that_comes_back_drops_its_stale_parts() {
    let dir = temp_dir("cluster-stale");
    let (mut workers, coordinator) = cluster(&dir, 1);
    // Distinct texts (no shared blocks), both with blocks on every worker.
    let gone_text = document(None).replace("harbour", "valley");
    ingest(&coordinator, "kept", &document(None));
    ingest(&coordinator, "gone", &gone_text);
    let addr = workers[0].addr.clone();
    for id in ["kept", "gone"] {
        assert!(placement(&coordinator, id).0.contains(&addr), "{id}");
    }
    let want = ask(&coordinator, "kept");
    wait_for(
        "worker 0 to report both parts",
        Duration::from_secs(30),
        || worker_status(&coordinator, &addr)["documents"] == 2,
    );
    let before = worker_status(&coordinator, &addr);
    let bytes_before = before["stored_bytes"].as_u64().unwrap();

    // Delete a document while worker 0 is down: its part there cannot be dropped now.
    workers.remove(0).kill();
    let (status, deleted) = coordinator.json("DELETE", "/v1/documents/gone", None);
    assert_eq!(status, 200, "{deleted}");
    wait_for("worker 0 to be seen down", Duration::from_secs(30), || {
        !healthy(&coordinator, &addr)
    });
    let _back = WorkerProc::start(&dir.join("worker-0"), &addr);
    wait_for(
        "the stale part to be dropped",
        Duration::from_secs(60),
        || {
            let w = worker_status(&coordinator, &addr);
            w["healthy"] == true && w["documents"] == 1
        },
    );
    let after = worker_status(&coordinator, &addr);
    assert_eq!(after["stale_parts_dropped"], 1, "{after}");
    assert!(
        after["stored_bytes"].as_u64().unwrap() < bytes_before,
        "{before} -> {after}"
    );
    // The part of `kept` stayed: the same answer, nothing re-encoded.
    let got = ask(&coordinator, "kept");
    assert_eq!(got["answer"], want["answer"]);
    assert_eq!(got["repaired_blocks"], 0, "{got}");
    assert!(placement(&coordinator, "kept").0.contains(&addr));
}
