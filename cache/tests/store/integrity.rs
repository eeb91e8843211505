use starkv_cache::engine::{Batch, Space, Target, layer_key};
use starkv_cache::{BlockStore, DType, Error};

use crate::util::*;

fn raw_get(store: &BlockStore, shard: usize, key: &[u8]) -> Option<Vec<u8>> {
    let mut out = None;
    store
        .engine()
        .get(Target::Shard(shard), Space::Layers, key, &mut |v| {
            out = v.map(<[u8]>::to_vec)
        })
        .unwrap();
    out
}

fn raw_put(store: &BlockStore, shard: usize, key: &[u8], value: Vec<u8>) {
    let mut b = Batch::default();
    b.put(Space::Layers, key.to_vec(), value);
    store
        .engine()
        .write(Target::Shard(shard), b, false)
        .unwrap();
}

#[test]
fn a_flipped_byte_anywhere_in_a_stored_value_is_a_typed_error() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let r = ingest(&e.store, "a", "t", 0, 1);
        let lease = e.store.open_version(&r).unwrap();
        let block = lease.manifest().blocks[0].clone();
        let shard = block.key.shard(3);
        let lk = layer_key(&block.key, 1);
        let good = raw_get(&e.store, shard, &lk).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 1 << (i % 8);
            raw_put(&e.store, shard, &lk, bad);
            match lease.read_layer(0, 1) {
                Err(Error::Corrupt {
                    block: b, layer, ..
                }) => {
                    assert_eq!((b, layer), (block.key, 1));
                }
                other => panic!("{kind:?} byte {i}: expected Corrupt, got {other:?}"),
            }
        }
        let s = e.store.stats();
        assert_eq!(s.checksum_failures, good.len() as u64, "{kind:?}");
        assert_eq!(s.repair_pending, 1);
        let q = e.store.repair_queue();
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].block, block.key);
        assert_eq!(q[0].docs[0].0, r);
        // Repair: re-encode from the stored source tokens (here: the test generator).
        let tokens = e.store.source_tokens(&r).unwrap();
        let first = tokens[block.start as usize];
        e.store
            .repair_block(block.key, &layers_for(first, block.tokens, DType::F16))
            .unwrap();
        assert!(e.store.repair_queue().is_empty());
        verify_lease(&lease).unwrap();
    }
}

#[test]
fn a_missing_layer_is_an_error_not_a_miss() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let r = ingest(&e.store, "a", "t", 0, 2);
        let lease = e.store.open_version(&r).unwrap();
        let key = lease.manifest().blocks[1].key;
        let mut b = Batch::default();
        b.delete(Space::Layers, layer_key(&key, 3));
        e.store
            .engine()
            .write(Target::Shard(key.shard(3)), b, false)
            .unwrap();
        assert!(matches!(
            lease.read_layer(1, 3),
            Err(Error::MissingBlock { layer: 3, .. })
        ));
        assert!(e.store.verify_version(&r).is_err());
        assert_eq!(e.store.repair_queue()[0].block, key);
    }
}

/// A manifest damaged in meta *and* in its copy (the copy alone restores it: see
/// `faults.rs`) is lost: not served, and its blocks are collected at open.
#[test]
fn corrupt_manifest_is_quarantined_at_open_and_its_blocks_collected() {
    let e = env(Kind::Rocks, test_config());
    let a = ingest(&e.store, "a", "t", 0, 2);
    let b = ingest(&e.store, "b", "t", 90_000, 2);
    // Flip a byte of a's manifest row, in meta and in its copy.
    let mut key = None;
    e.store
        .engine()
        .scan(Target::Meta, Space::Meta, b"m", &mut |k, v| {
            if key.is_none() {
                key = Some((k.to_vec(), v.to_vec()));
            }
            true
        })
        .unwrap();
    let (k, mut v) = key.unwrap();
    v[10] ^= 0x40;
    let mut batch = Batch::default();
    batch.put(Space::Meta, k.clone(), v.clone());
    e.store.engine().write(Target::Meta, batch, true).unwrap();
    for shard in 0..e.store.engine().shards() {
        let mut present = false;
        e.store
            .engine()
            .get(Target::Shard(shard), Space::Docs, &k, &mut |x| {
                present = x.is_some()
            })
            .unwrap();
        if present {
            let mut batch = Batch::default();
            batch.put(Space::Docs, k.clone(), v.clone());
            e.store
                .engine()
                .write(Target::Shard(shard), batch, true)
                .unwrap();
        }
    }
    let dir = e.dir.unwrap();
    drop(e.store);
    let store = BlockStore::open_rocks(rocks_config(dir.path()), test_config()).unwrap();
    assert!(!store.contains("a"), "corrupt manifest must not be served");
    assert!(store.open_version(&a).is_err());
    assert_eq!(store.lost_documents()[0].0, a, "and it is reported");
    verify_doc(&store, &b);
    assert_eq!(store.stats().blocks, 2);
    assert_eq!(
        store.gc().unwrap().scanned,
        2,
        "a's blocks were collected at open"
    );
}

#[test]
fn abandoned_ingest_leaves_nothing_and_gc_collects_orphans() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let keep = ingest(&e.store, "keep", "t", 0, 2);
        {
            let mut ing = e
                .store
                .begin_ingest(spec("gone", "t", DType::F16, doc_tokens(5_000, 3)))
                .unwrap();
            for i in 0..3u32 {
                let toks: Vec<u32> = (0..BLOCK).map(|t| 5_000 + i * 1000 + t).collect();
                let key = ing.block_key(&toks, &toks, (i * BLOCK) as u64);
                ing.put_block(
                    key,
                    (i * BLOCK) as u64,
                    BLOCK,
                    &layers_for(toks[0], BLOCK, DType::F16),
                )
                .unwrap();
            }
            // While the ingest is open its blocks are pending: gc must not take them.
            assert_eq!(e.store.gc().unwrap().deleted, 0);
        } // dropped without commit
        assert!(!e.store.contains("gone"));
        assert_eq!(
            e.store.gc().unwrap().scanned,
            2,
            "{kind:?}: abort cleaned up"
        );

        // An orphan written behind the store's back (what a crash leaves: layers and
        // the index row, no manifest) is collected; referenced blocks are not.
        let key = starkv_cache::BlockKey([0xAB; 32]);
        let shard = key.shard(3);
        let mut b = Batch::default();
        b.put(Space::Layers, layer_key(&key, 0), vec![1, 2, 3]);
        let mut row = 1u16.to_le_bytes().to_vec();
        row.extend_from_slice(&3u64.to_le_bytes());
        row.extend_from_slice(&6u64.to_le_bytes());
        b.put(Space::BlockIndex, key.0.to_vec(), row);
        e.store
            .engine()
            .write(Target::Shard(shard), b, true)
            .unwrap();
        let g = e.store.gc().unwrap();
        assert_eq!((g.scanned, g.deleted), (3, 1), "{kind:?}");
        assert_eq!(e.store.gc().unwrap().scanned, 2);
        let mut left = false;
        e.store
            .engine()
            .get(
                Target::Shard(shard),
                Space::Layers,
                &layer_key(&key, 0),
                &mut |v| left = v.is_some(),
            )
            .unwrap();
        assert!(!left, "orphan layer deleted");
        verify_doc(&e.store, &keep);
    }
}
