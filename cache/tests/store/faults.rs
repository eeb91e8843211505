//! Damage on disk: flipped bytes in RocksDB's table, blob, MANIFEST and CURRENT files of
//! the shards and of the meta instance, a blob header naming another compression type,
//! damaged document rows. The store must always open, never return wrong data, report
//! what it did, and end up serving every document again once the damaged blocks are
//! re-encoded (here from the test generator, in the service from the source tokens).

use std::path::{Path, PathBuf};

use starkv_cache::engine::{Batch, Space, Target};
use starkv_cache::{BlockStore, DType, DocRef, Error, RecoveryAction};

use crate::util::*;

/// Documents of the fault tests: (id, token base, blocks).
const DOCS: [(&str, u32, u32); 5] = [
    ("alpha", 0, 3),
    ("beta", 100_000, 2),
    ("gamma", 200_000, 4),
    ("delta", 300_000, 1),
    ("eps", 400_000, 2),
];

/// A RocksDB store with [`DOCS`], flushed so that every shard has table and blob files.
fn build_store(dir: &Path) -> Vec<DocRef> {
    let store = BlockStore::open_rocks(rocks_config(dir), test_config()).unwrap();
    let refs = DOCS
        .iter()
        .map(|(id, base, blocks)| ingest(&store, id, "t", *base, *blocks))
        .collect();
    store.flush().unwrap();
    refs
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// The files RocksDB reads at open or on a lookup: tables, blob files, MANIFEST, CURRENT.
fn damageable_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for d in dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&d)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                n.ends_with(".sst")
                    || n.ends_with(".blob")
                    || n.starts_with("MANIFEST-")
                    || n == "CURRENT"
            })
            .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
            .collect();
        files.sort();
        out.extend(files);
    }
    out
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x5A;
    std::fs::write(path, bytes).unwrap();
}

/// Reads every document; a block that fails verification (or is missing) is re-encoded
/// from the generator, as the service does from the stored source tokens. Returns how
/// many blocks needed that. Panics on wrong data or on any other error.
fn read_all_and_repair(store: &BlockStore, docs: &[DocRef], what: &str) -> usize {
    let mut repaired = 0;
    for r in docs {
        let lease = store
            .open_version(r)
            .unwrap_or_else(|e| panic!("{what}: {r} not served: {e}"));
        let tokens = lease.source_tokens().unwrap();
        for (i, b) in lease.manifest().blocks.clone().iter().enumerate() {
            let expect = layers_for(tokens[b.start as usize], b.tokens, DType::F16);
            match lease.read_block(i) {
                Ok(layers) => {
                    for (l, got) in layers.iter().enumerate() {
                        assert_eq!(**got, expect[l], "{what}: {r} block {i} layer {l}");
                    }
                }
                Err(Error::Corrupt { .. } | Error::MissingBlock { .. }) => {
                    store.repair_block(b.key, &expect).unwrap();
                    repaired += 1;
                }
                Err(e) => panic!("{what}: {r} block {i}: not a repairable error: {e}"),
            }
        }
        verify_lease(&lease).unwrap_or_else(|e| panic!("{what}: {r} after repair: {e}"));
    }
    assert!(store.repair_queue().is_empty(), "{what}: repairs left");
    repaired
}

/// One flipped byte in any table, blob, MANIFEST or CURRENT file of any shard or of the
/// meta instance: the store opens, never serves wrong data, loses no document (the
/// document rows have two copies), and serves everything after the damaged blocks are
/// re-encoded.
#[test]
fn a_flipped_byte_in_any_store_file_never_stops_the_store() {
    let pristine = tempfile::tempdir().unwrap();
    let docs = build_store(pristine.path());
    let files = damageable_files(pristine.path());
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "blob")),
        "the fixture has blob files: {files:?}"
    );
    assert!(
        files
            .iter()
            .any(|f| f.starts_with(pristine.path().join("meta"))
                && f.extension().is_some_and(|e| e == "sst")),
        "the fixture has a meta table: {files:?}"
    );
    let (mut rounds, mut recovered_opens, mut repaired_blocks) = (0, 0, 0);
    for file in &files {
        let len = std::fs::metadata(file).unwrap().len() as usize;
        // Start (magic, headers), middle (data), end (footer, magic number).
        let mut spots = vec![0, len / 2, len.saturating_sub(3)];
        spots.dedup();
        for at in spots {
            rounds += 1;
            let work = tempfile::tempdir().unwrap();
            copy_dir(pristine.path(), work.path());
            let rel = file.strip_prefix(pristine.path()).unwrap();
            flip_byte(&work.path().join(rel), at);
            let what = format!("{} byte {at}", rel.display());
            let store = BlockStore::open_rocks(rocks_config(work.path()), test_config())
                .unwrap_or_else(|e| panic!("{what}: the store did not open: {e}"));
            let stats = store.stats();
            if !stats.recoveries.is_empty() {
                recovered_opens += 1;
            }
            assert_eq!(
                stats.lost_documents,
                0,
                "{what}: {:?}",
                store.lost_documents()
            );
            let listed: Vec<DocRef> = store.list().into_iter().map(|d| d.doc).collect();
            assert_eq!(listed, sorted(&docs), "{what}: every document is listed");
            repaired_blocks += read_all_and_repair(&store, &docs, &what);
            let check = store.verify_meta(false).unwrap();
            assert!(check.problems.is_empty(), "{what}: {:?}", check.problems);
            drop(store);
            // And it opens again, clean.
            let store = BlockStore::open_rocks(rocks_config(work.path()), test_config())
                .unwrap_or_else(|e| panic!("{what}: no second open: {e}"));
            assert!(store.stats().recoveries.is_empty(), "{what}: second open");
            assert_eq!(read_all_and_repair(&store, &docs, &what), 0, "{what}");
        }
    }
    println!(
        "flip test: {rounds} flips in {} files, {recovered_opens} opens repaired or quarantined an instance, {repaired_blocks} blocks re-encoded",
        files.len()
    );
    assert!(
        recovered_opens > 0,
        "some flips must need an instance recovery"
    );
}

fn sorted(docs: &[DocRef]) -> Vec<DocRef> {
    let mut v = docs.to_vec();
    v.sort();
    v
}

/// A blob file whose header names another compression type than the column family's:
/// RocksDB refuses to read from it ("Compression type mismatch"); every block in it is a
/// repairable [`Error::Corrupt`], and a repaired block reads back.
#[test]
fn a_blob_header_with_another_compression_type_is_a_repairable_block() {
    let dir = tempfile::tempdir().unwrap();
    let docs = build_store(dir.path());
    let blob = damageable_files(dir.path())
        .into_iter()
        .find(|f| f.extension().is_some_and(|e| e == "blob"))
        .unwrap();
    // Blob file header: magic (4), version (4), column family (4), flags (1), compression
    // (1), expiration range (16). Blob compression is off: name zstd (7) instead.
    let mut bytes = std::fs::read(&blob).unwrap();
    assert_eq!(
        bytes[13], 0,
        "compression byte of an uncompressed blob file"
    );
    bytes[13] = 7;
    std::fs::write(&blob, bytes).unwrap();
    let store = BlockStore::open_rocks(rocks_config(dir.path()), test_config()).unwrap();
    let mut saw_storage_error = false;
    for r in &docs {
        let lease = store.open_version(r).unwrap();
        for i in 0..lease.num_blocks() {
            if let Err(Error::Corrupt { reason, .. }) = lease.read_block(i) {
                saw_storage_error |= reason.to_string().contains("ompression type");
            }
        }
    }
    assert!(saw_storage_error, "the damaged blob file was read");
    assert!(!store.repair_queue().is_empty());
    let repaired = read_all_and_repair(&store, &docs, "compression type");
    assert!(repaired > 0);
}

fn meta_row_key(store: &BlockStore, tag: u8, doc: &str) -> (Vec<u8>, Vec<u8>) {
    let mut found = None;
    store
        .engine()
        .scan(Target::Meta, Space::Meta, &[tag], &mut |k, v| {
            if k.windows(doc.len()).any(|w| w == doc.as_bytes()) {
                found = Some((k.to_vec(), v.to_vec()));
            }
            true
        })
        .unwrap();
    found.expect("row present")
}

fn put_raw(store: &BlockStore, target: Target, space: Space, key: Vec<u8>, value: Vec<u8>) {
    let mut b = Batch::default();
    b.put(space, key, value);
    store.engine().write(target, b, true).unwrap();
}

fn copy_shard_with(store: &BlockStore, key: &[u8]) -> usize {
    (0..store.engine().shards())
        .find(|&s| {
            let mut hit = false;
            store
                .engine()
                .get(Target::Shard(s), Space::Docs, key, &mut |v| {
                    hit = v.is_some()
                })
                .unwrap();
            hit
        })
        .expect("a copy in some shard")
}

/// A damaged manifest row in meta is restored from its copy; damaged in both places the
/// document is lost: never listed, reported (stats, verify), and deleting or re-ingesting
/// the id clears it.
#[test]
fn a_damaged_manifest_is_restored_from_its_copy_and_a_lost_one_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlockStore::open_rocks(rocks_config(dir.path()), test_config()).unwrap();
    let a = ingest(&store, "a", "t", 0, 2);
    let b = ingest(&store, "b", "t", 50_000, 2);
    let (ka, mut va) = meta_row_key(&store, b'm', "a");
    va[12] ^= 0x40;
    put_raw(&store, Target::Meta, Space::Meta, ka.clone(), va.clone());
    let (kb, mut vb) = meta_row_key(&store, b'm', "b");
    vb[12] ^= 0x40;
    put_raw(&store, Target::Meta, Space::Meta, kb.clone(), vb.clone());
    // b's copy is damaged too.
    let shard_b = copy_shard_with(&store, &kb);
    put_raw(&store, Target::Shard(shard_b), Space::Docs, kb, vb);
    drop(store);

    let store = BlockStore::open_rocks(rocks_config(dir.path()), test_config()).unwrap();
    verify_doc(&store, &a);
    let s = store.stats();
    assert_eq!((s.restored_manifests, s.lost_documents), (1, 1));
    assert!(!store.contains("b"), "a lost manifest is never served");
    assert!(store.open_version(&b).is_err());
    let lost = store.lost_documents();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].0, b);
    let check = store.verify_meta(false).unwrap();
    assert_eq!(check.lost.len(), 1, "{check:?}");
    assert!(check.problems.is_empty(), "a was restored: {check:?}");
    // The restored row is durable: a third open restores nothing.
    drop(store);
    let store = BlockStore::open_rocks(rocks_config(dir.path()), test_config()).unwrap();
    assert_eq!(store.stats().restored_manifests, 0);
    assert_eq!(store.stats().lost_documents, 1, "still reported");
    // Re-ingesting the id replaces the lost version with a newer one.
    let b2 = ingest(&store, "b", "t", 50_000, 2);
    assert!(b2.version > b.version);
    assert_eq!(store.stats().lost_documents, 0);
    verify_doc(&store, &b2);
    drop(store);
    let store = BlockStore::open_rocks(rocks_config(dir.path()), test_config()).unwrap();
    assert_eq!(store.stats().lost_documents, 0);
    verify_doc(&store, &b2);
}

/// The whole meta instance gone (quarantined, or deleted by hand): every document comes
/// back from its copy, with its pin.
#[test]
fn every_document_comes_back_from_the_copies_when_meta_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlockStore::open_rocks(rocks_config(dir.path()), test_config()).unwrap();
    let docs: Vec<DocRef> = DOCS
        .iter()
        .map(|(id, base, blocks)| ingest(&store, id, "t", *base, *blocks))
        .collect();
    store.set_pinned(&docs[1], true).unwrap();
    let gone = store.delete_doc("delta").unwrap();
    assert_eq!(gone.evicted.len(), 1);
    drop(store);
    std::fs::remove_dir_all(dir.path().join("meta")).unwrap();
    let store = BlockStore::open_rocks(rocks_config(dir.path()), test_config()).unwrap();
    let listed: Vec<DocRef> = store.list().into_iter().map(|d| d.doc).collect();
    let expect: Vec<DocRef> = sorted(&docs)
        .into_iter()
        .filter(|d| d.doc != "delta")
        .collect();
    assert_eq!(listed, expect, "deleted documents stay deleted");
    assert_eq!(store.stats().restored_manifests, expect.len() as u64);
    assert!(store.doc_info(&docs[1]).unwrap().state.pinned, "pin kept");
    for d in &expect {
        verify_doc(&store, d);
    }
}

/// The source-token row damaged in meta: read from the copy and rewritten.
#[test]
fn damaged_source_tokens_are_read_from_the_copy() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let a = ingest(&e.store, "a", "t", 0, 2);
        let (k, mut v) = meta_row_key(&e.store, b't', "a");
        let at = v.len() / 2;
        v[at] ^= 1;
        put_raw(&e.store, Target::Meta, Space::Meta, k, v);
        assert_eq!(
            e.store.verify_meta(false).unwrap().problems.len(),
            1,
            "{kind:?}"
        );
        verify_doc(&e.store, &a);
        assert!(
            e.store.verify_meta(false).unwrap().problems.is_empty(),
            "{kind:?}: the meta row was rewritten from the copy"
        );
    }
}

/// A shard that RocksDB cannot open (its MANIFEST truncated) is quarantined, reported,
/// and its blocks become repairable misses.
#[test]
fn a_shard_that_cannot_open_is_quarantined_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let docs = build_store(dir.path());
    let shard = dir.path().join("shard-001");
    let manifest = std::fs::read_dir(&shard)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("MANIFEST-")
        })
        .unwrap();
    let len = std::fs::metadata(&manifest).unwrap().len();
    let mut bytes = std::fs::read(&manifest).unwrap();
    for b in &mut bytes[(len / 3) as usize..(len / 3 + 8) as usize] {
        *b ^= 0xFF;
    }
    std::fs::write(&manifest, bytes).unwrap();
    let store = BlockStore::open_rocks(rocks_config(dir.path()), test_config()).unwrap();
    let rec = store.engine().recoveries();
    assert_eq!(rec.len(), 1, "{rec:?}");
    assert_eq!(rec[0].target, Target::Shard(1));
    let RecoveryAction::Quarantined { moved_to } = &rec[0].action else {
        panic!("a shard with blob files is quarantined: {rec:?}");
    };
    assert!(Path::new(moved_to).exists(), "the damaged files are kept");
    assert_eq!(store.stats().recoveries.len(), 1);
    let check = store.verify_meta(false).unwrap();
    assert_eq!(check.recoveries.len(), 1, "reported once");
    assert!(store.verify_meta(false).unwrap().recoveries.is_empty());
    assert!(read_all_and_repair(&store, &docs, "quarantined shard") > 0);
}
