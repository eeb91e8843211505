//! End-to-end store faults with the real binary: flipped bytes in a stopped server's
//! shard and meta files (table footer, blob payload, blob header, meta table), then the
//! server must start and answer as before, `verify --repair` must say what it found
//! (exit 4) and fix it (the next `verify` exits 0); and a small disk (a tmpfs: 507 under
//! the free-space floor, delete + gc give the space back, restart works).
//!
//! Devices: servers run on `auto` unless `STARKV_DEVICE` says otherwise, so on a GPU host
//! `STARKV_DEVICE=cuda cargo test --release --test integration store_faults` runs these
//! on the GPU.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::service::{QUESTION, Server, document, temp_dir};
use crate::util::{Tmpfs, model_path};

fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_starkv"))
        .args(["--data-dir", dir.to_str().unwrap()])
        .args(["--model", model_path().to_str().unwrap()])
        .args(args)
        .output()
        .expect("starkv")
}

fn shown(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Ingests the harbour document, asks the question, stops the server, and has the
/// offline `gc` flush and compact everything into table and blob files. Returns the
/// answer.
fn stored_harbour(dir: &Path) -> Value {
    let server = Server::start(dir, &[]);
    let (status, doc) = server.json(
        "POST",
        "/v1/documents?wait=true",
        Some(json!({ "id": "harbour", "text": document(None), "block_size": 96 })),
    );
    assert_eq!(status, 200, "{doc}");
    let answer = ask(&server);
    server.kill();
    let out = cli(dir, &["gc", "--json"]);
    assert!(out.status.success(), "{}", shown(&out));
    answer
}

fn ask(server: &Server) -> Value {
    let (status, answer) = server.json(
        "POST",
        "/v1/documents/harbour/query",
        Some(json!({ "question": QUESTION, "max_tokens": 24, "temperature": 0 })),
    );
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["answer"].as_str().unwrap().contains("6194027"),
        "{answer}"
    );
    answer
}

/// Files with `ext` in each instance directory of the store, by directory name.
fn files(dir: &Path, ext: &str) -> Vec<(String, PathBuf)> {
    let store = dir.join("store");
    let mut out = Vec::new();
    for d in std::fs::read_dir(&store).unwrap().filter_map(|e| e.ok()) {
        if !d.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(d.path()).unwrap().filter_map(|e| e.ok()) {
            let p = f.path();
            if p.extension().is_some_and(|e| e == ext)
                && std::fs::metadata(&p).is_ok_and(|m| m.len() > 64)
            {
                out.push((d.file_name().to_string_lossy().into_owned(), p));
            }
        }
    }
    out.sort();
    out
}

fn flip(path: &Path, at: impl FnOnce(usize) -> usize, mask: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = at(bytes.len());
    bytes[i] ^= mask;
    std::fs::write(path, bytes).unwrap();
}

/// Round 1: a flipped byte in the middle of the meta table and of a shard's blob file;
/// round 2: in a shard table's footer (RocksDB: bad magic number at open). Each time the
/// server starts, lists the document, answers exactly as before (damaged blocks are
/// re-encoded from the stored source tokens; the manifest comes back from its copy), and
/// says what happened (stats `recoveries`, verify `corruption_found`).
#[test]
fn store_faults_server_starts_and_answers_with_damaged_shard_and_meta_files() {
    let dir = temp_dir("flips");
    let before = stored_harbour(&dir);

    let (_, meta_table) = files(&dir, "sst")
        .into_iter()
        .find(|(d, _)| d == "meta")
        .expect("a meta table");
    flip(&meta_table, |n| n / 2, 0x5A);
    let (_, blob) = files(&dir, "blob").into_iter().next().expect("a blob file");
    flip(&blob, |n| n / 2, 0x5A);
    restart_and_check(&dir, &before, "meta");

    let out = cli(&dir, &["gc", "--json"]);
    assert!(out.status.success(), "{}", shown(&out));
    // A shard that holds blocks (it has a blob file).
    let blobs = files(&dir, "blob");
    let (_, table) = files(&dir, "sst")
        .into_iter()
        .find(|(d, _)| d.starts_with("shard-") && blobs.iter().any(|(b, _)| b == d))
        .expect("a table of a shard with blocks");
    flip(&table, |n| n - 3, 0x5A);
    restart_and_check(&dir, &before, "quarantined");
}

/// Starts the server on a damaged data directory and checks it serves as `before`, that
/// a recovery mentioning `recovery` is reported, and that verify finds the damage once
/// and then reports the store clean.
fn restart_and_check(dir: &Path, before: &Value, recovery: &str) {
    let server = Server::start(dir, &[]);
    let (_, list) = server.json("GET", "/v1/documents", None);
    assert_eq!(list["total"], 1, "{list}");
    let after = ask(&server);
    assert_eq!(after["answer"], before["answer"], "same greedy answer");
    assert!(
        server.metric("starkv_blocks_repaired_total") >= 1.0,
        "damaged blocks were re-encoded"
    );
    let (_, stats) = server.json("GET", "/v1/admin/stats", None);
    assert!(
        stats["recoveries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains(recovery)),
        "the operator is told ({recovery}): {stats}"
    );
    assert_eq!(stats["lost_documents"], 0, "{stats}");
    let (status, report) = server.json("POST", "/v1/admin/verify", Some(json!({ "repair": true })));
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["corruption_found"], true, "{report}");
    assert_eq!(report["repair_pending"], 0, "{report}");
    let (_, report) = server.json("POST", "/v1/admin/verify", Some(json!({ "repair": true })));
    assert_eq!(
        report["corruption_found"], false,
        "clean after repair: {report}"
    );
    server.kill();
}

/// Offline: a blob header naming another compression type and a shard table with a bad
/// footer. `verify` finds it (exit 4), `verify --repair` finds and repairs it (exit 4,
/// with the repairs in the report), the next `verify` exits 0, and a server then answers
/// without repairing anything.
#[test]
fn store_faults_verify_repair_exits_4_and_recovers() {
    let dir = temp_dir("verify-repair");
    let before = stored_harbour(&dir);
    let tables = files(&dir, "sst");
    let blobs = files(&dir, "blob");
    let (blob_shard, blob) = blobs.first().expect("a blob file");
    // Blob file header: magic (4), version (4), column family (4), flags (1),
    // compression (1): blob compression is off (0); name zstd (7).
    flip(blob, |_| 13, 7);
    let (_, table) = tables
        .iter()
        .find(|(d, _)| d.starts_with("shard-") && d != blob_shard)
        .expect("a table in another shard");
    flip(table, |n| n - 3, 0x5A);

    let out = cli(&dir, &["verify", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "corruption found: {}",
        shown(&out)
    );
    let out = cli(&dir, &["verify", "--repair", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "found and repaired: {}",
        shown(&out)
    );
    let report: Value = serde_json::from_slice(out.stdout.trim_ascii())
        .unwrap_or_else(|e| panic!("the report is on stdout ({e}): {}", shown(&out)));
    assert!(
        report["repaired_blocks"].as_u64().unwrap() > 0 && report["repair_pending"] == 0,
        "{report}"
    );
    let out = cli(&dir, &["verify", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "clean after repair: {}",
        shown(&out)
    );

    let server = Server::start(&dir, &[]);
    let after = ask(&server);
    assert_eq!(after["answer"], before["answer"]);
    assert_eq!(server.metric("starkv_blocks_repaired_total"), 0.0);
}

/// The last block's layer 7 of `doc` in the stopped store under `dir`, decoded, and that
/// block's index.
fn stored_layer(dir: &Path, doc: &str) -> (Vec<f32>, usize) {
    use starkv_cache::{BlockStore, RocksConfig, StoreConfig};
    let store = BlockStore::open_rocks(
        RocksConfig::new(dir.join("store"), 4),
        StoreConfig::default(),
    )
    .expect("opening the stopped store");
    let lease = store.open_doc(doc).expect("the store holds the document");
    let last = lease.manifest().blocks.len() - 1;
    let layer = lease
        .read_layer_uncached(last, 7)
        .expect("a readable layer");
    (layer.to_f32(), last)
}

/// A damaged block of a selectively re-encoded document is repaired with the KV its key
/// names (phase 1 and the re-encoding pass over the whole document), not with phase 1's
/// KV alone: the repaired layer equals the ingested one. With `reencode_ratio` 1 every
/// token after the anchor is re-encoded, so phase 1's KV of the last block differs.
#[test]
fn store_faults_a_reencoded_block_is_repaired_as_it_was_encoded() {
    let dir = temp_dir("repair-reencoded");
    let server = Server::start(&dir, &[]);
    let (status, doc) = server.json(
        "POST",
        "/v1/documents?wait=true",
        Some(json!({ "id": "harbour", "text": document(None), "block_size": 96, "reencode_ratio": 1.0 })),
    );
    assert_eq!(status, 200, "{doc}");
    let before = ask(&server);
    server.kill();
    let (ingested, last) = stored_layer(&dir, "default/harbour");
    crate::cluster::flip_a_stored_block_layer(&dir, "default/harbour", last);

    let out = cli(&dir, &["verify", "--repair", "--json"]);
    assert_eq!(out.status.code(), Some(4), "{}", shown(&out));
    let (repaired, _) = stored_layer(&dir, "default/harbour");
    let scale = ingested.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = ingested
        .iter()
        .zip(&repaired)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    // The same computation on the same machine: equal up to f16 rounding at most.
    assert!(
        worst <= 1e-3 * scale,
        "repaired layer differs from the ingested one by {worst} (values up to {scale})"
    );
    let server = Server::start(&dir, &[]);
    assert_eq!(ask(&server)["answer"], before["answer"]);
}

/// A data directory on a 64 MB tmpfs: under the free-space floor an ingest answers 507
/// with the JSON error body; with a lower floor documents ingest, DELETE + gc give the
/// space back on disk, and the server restarts on the same directory.
#[test]
fn store_faults_small_disk_507_delete_gc_and_restart() {
    let fs = Tmpfs::mount(64);
    let dir = fs.path().to_path_buf();
    let config = |floor: u64| {
        let path = dir.join("starkv.toml");
        std::fs::write(&path, format!("min_free_disk_bytes = {floor}\n")).unwrap();
        path
    };
    let path = config(1 << 30);
    let server = Server::start(&dir, &["--config", path.to_str().unwrap()]);
    let (status, err) = server.json(
        "POST",
        "/v1/documents",
        Some(json!({ "id": "harbour", "text": document(None) })),
    );
    assert_eq!(status, 507, "{err}");
    assert_eq!(err["error"]["code"], "insufficient_storage", "{err}");
    server.kill();

    let path = config(8 << 20);
    let server = Server::start(&dir, &["--config", path.to_str().unwrap()]);
    let (status, doc) = server.json(
        "POST",
        "/v1/documents?wait=true",
        Some(json!({ "id": "harbour", "text": document(None), "block_size": 96 })),
    );
    assert_eq!(status, 200, "{doc}");
    ask(&server);
    let (status, _) = server.json("DELETE", "/v1/documents/harbour", None);
    assert_eq!(status, 200);
    let (status, gc) = server.json("POST", "/v1/admin/gc", None);
    assert_eq!(status, 200, "{gc}");
    let (b, a) = (
        gc["disk_bytes_before"].as_u64().unwrap(),
        gc["disk_bytes_after"].as_u64().unwrap(),
    );
    let stored = doc["stored_bytes"].as_u64().unwrap();
    assert!(
        a + stored / 2 <= b,
        "delete + gc gave back {} of {stored} stored bytes ({gc})",
        b.saturating_sub(a)
    );
    server.kill();
    let server = Server::start(&dir, &["--config", path.to_str().unwrap()]);
    let (status, list) = server.json("GET", "/v1/documents", None);
    assert_eq!((status, list["total"].as_u64()), (200, Some(0)), "{list}");
    server.kill();

    // No floor, and another program fills the disk to the last byte: the ingest cannot
    // be spooled, which is a 507 too (not a 500); space back, the server ingests again.
    let path = config(0);
    let server = Server::start(&dir, &["--config", path.to_str().unwrap()]);
    let filler = dir.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![7u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        while f.write_all(&[7u8]).is_ok() {}
    }
    let (status, err) = server.json(
        "POST",
        "/v1/documents",
        Some(json!({ "id": "harbour", "text": document(None), "block_size": 96 })),
    );
    assert_eq!(status, 507, "{err}");
    assert_eq!(err["error"]["code"], "insufficient_storage", "{err}");
    std::fs::remove_file(&filler).unwrap();
    let (status, doc) = server.json(
        "POST",
        "/v1/documents?wait=true",
        Some(json!({ "id": "harbour", "text": document(None), "block_size": 96 })),
    );
    assert_eq!(status, 200, "{doc}");
    ask(&server);
}
