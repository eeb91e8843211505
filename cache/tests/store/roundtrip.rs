use starkv_cache::{
    BlockStore, DType, Error, RocksEngine, StoreConfig, Tensor, codec, engine::Space,
    engine::Target,
};

use crate::util::*;

#[test]
fn every_dtype_roundtrips_on_both_engines_and_survives_reopen() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let mut docs = Vec::new();
        for (i, dtype) in [DType::F32, DType::F16, DType::BF16]
            .into_iter()
            .enumerate()
        {
            let r = ingest_spec(
                &e.store,
                spec(&format!("doc-{i}"), "t", dtype, doc_tokens(i as u32 * 7, 3)),
            )
            .unwrap();
            docs.push(r);
        }
        for r in &docs {
            verify_doc(&e.store, r);
        }
        if kind == Kind::Rocks {
            let dir = e.dir.unwrap();
            drop(e.store);
            let store = BlockStore::open_rocks(rocks_config(dir.path()), test_config()).unwrap();
            assert_eq!(store.list().len(), 3);
            for r in &docs {
                verify_doc(&store, r);
                let lease = store.open_version(r).unwrap();
                assert_eq!(lease.source_tokens().unwrap().len(), 3 * BLOCK as usize);
            }
        }
    }
}

#[test]
fn f32_to_f16_conversion_is_round_to_nearest() {
    let vals = [0.1f32, -2.5, 65504.0, 1e-8, 2.71];
    let t = Tensor::from_f32(DType::F16, vec![5], &vals).unwrap();
    let back = t.to_f32();
    for (a, b) in vals.iter().zip(&back) {
        assert!((a - b).abs() <= a.abs() * 1e-3 + 1e-7, "{a} vs {b}");
    }
    let t = Tensor::from_f32(DType::F32, vec![5], &vals).unwrap();
    assert_eq!(t.to_f32(), vals);
}

#[test]
fn identical_blocks_are_stored_once_and_refcounted() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let a = ingest(&e.store, "a", "t", 0, 4);
        let s1 = e.store.stats();
        // Same base: every block identical (same anchor, tokens, positions).
        let b = ingest(&e.store, "b", "t", 0, 4);
        let s2 = e.store.stats();
        assert_eq!(s2.blocks, s1.blocks, "{kind:?}");
        assert_eq!(s2.blocks_written, s1.blocks_written, "{kind:?}");
        assert_eq!(s2.blocks_deduplicated, 4);
        e.store.delete_doc("a").unwrap();
        // b still complete: shared blocks survived a's deletion.
        verify_doc(&e.store, &b);
        assert!(e.store.open_version(&a).is_err());
        e.store.delete_doc("b").unwrap();
        assert_eq!(e.store.stats().blocks, 0);
        assert_eq!(
            e.store.gc().unwrap().scanned,
            0,
            "{kind:?}: blocks left behind"
        );
    }
}

#[test]
fn hot_tier_counts_hits_and_misses() {
    for kind in KINDS {
        let e = env(
            kind,
            StoreConfig {
                hot_tier_bytes: 1 << 20,
                ..test_config()
            },
        );
        let r = ingest(&e.store, "a", "t", 0, 2);
        let lease = e.store.open_version(&r).unwrap();
        let x = lease.read_layer(1, 2).unwrap();
        let y = lease.read_layer(1, 2).unwrap();
        assert_eq!(x, y);
        let h = e.store.stats().hot;
        assert_eq!((h.hits, h.misses), (1, 1), "{kind:?}");
        assert_eq!(h.bytes, x.byte_len() as u64);
        assert_eq!(e.store.stats().layers_read, 1);
    }
}

#[test]
fn versions_replace_atomically_and_old_readers_keep_reading() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let v1 = ingest(&e.store, "doc", "t", 0, 3);
        let old = e.store.open_doc("doc").unwrap();
        old.source_tokens().unwrap(); // cached in the lease
        let v2 = ingest(&e.store, "doc", "t", 50_000, 2);
        assert_eq!((v1.version, v2.version), (1, 2));
        assert_eq!(e.store.versions("doc"), vec![v2.clone()]);
        assert_eq!(e.store.open_doc("doc").unwrap().doc(), &v2);
        verify_lease(&old).unwrap();
        drop(old);
        verify_doc(&e.store, &v2);
        assert!(matches!(
            e.store.open_version(&v1),
            Err(Error::NotFound { .. })
        ));
        // v1's blocks were freed when the old reader let go.
        assert_eq!(e.store.stats().blocks, 2, "{kind:?}");
    }
}

#[test]
fn shard_count_is_fixed_at_creation() {
    let dir = tempfile::tempdir().unwrap();
    drop(BlockStore::open_rocks(rocks_config(dir.path()), test_config()).unwrap());
    let mut cfg = rocks_config(dir.path());
    cfg.shards = 5;
    assert!(matches!(
        RocksEngine::open(cfg).err(),
        Some(Error::ConfigMismatch(_))
    ));
}

#[test]
fn blocks_spread_over_shards_and_values_carry_headers() {
    let e = env(Kind::Rocks, test_config());
    let r = ingest(&e.store, "a", "t", 0, 12);
    let lease = e.store.open_version(&r).unwrap();
    let mut per = [0usize; 3];
    for b in &lease.manifest().blocks {
        let shard = b.key.shard(3);
        per[shard] += 1;
        let mut info = None;
        e.store
            .engine()
            .get(
                Target::Shard(shard),
                Space::Layers,
                &starkv_cache::engine::layer_key(&b.key, 0),
                &mut |v| info = v.map(|v| codec::verify(v).unwrap().0),
            )
            .unwrap();
        let info = info.unwrap();
        assert_eq!(info.dtype, DType::F16);
        assert_eq!(info.shape, vec![2, KV_HEADS, BLOCK, HEAD_DIM]);
    }
    assert!(per.iter().all(|&n| n > 0), "{per:?}");
}
