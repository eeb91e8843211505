//! Each policy has a test that fails if the policy does nothing.

use std::collections::HashMap;

use starkv_cache::{DType, DocSpec, Error, EvictReason, EvictionPolicy};

use crate::util::*;

fn evicted(stats: &starkv_cache::StoreStats, reason: &str) -> u64 {
    stats
        .evictions
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| *n)
}

#[test]
fn watermarks_evict_least_recently_used_down_to_low_mark() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let mut docs = Vec::new();
        for i in 0..4u32 {
            docs.push(ingest(&e.store, &format!("d{i}"), "t", i * 100_000, 3));
            e.clock.advance(1_000);
        }
        // d0 is the oldest ingest but the most recently used.
        drop(e.store.open_version(&docs[0]).unwrap());
        let total = e.store.stats().store_bytes;
        e.store.set_eviction_policy(EvictionPolicy {
            budget_bytes: Some(total),
            high_watermark: 0.9,
            low_watermark: 0.55,
            ..EvictionPolicy::default()
        });
        let rep = e.store.run_eviction().unwrap();
        let gone: Vec<_> = rep.evicted.iter().map(|(r, _)| r.doc.clone()).collect();
        assert_eq!(gone, vec!["d1", "d2"], "{kind:?}");
        assert!(rep.evicted.iter().all(|(_, r)| *r == EvictReason::Lru));
        let s = e.store.stats();
        assert!(s.store_bytes as f64 <= total as f64 * 0.55, "{kind:?}");
        assert_eq!(evicted(&s, "lru"), 2);
        assert!(rep.bytes_freed > 0 && rep.blocks_deleted == 6);
        verify_doc(&e.store, &docs[0]);
        verify_doc(&e.store, &docs[3]);
        // Below the high mark: nothing more happens.
        assert!(e.store.run_eviction().unwrap().evicted.is_empty());
        // Publishing past the high mark triggers eviction by itself.
        ingest(&e.store, "d4", "t", 400_000, 3);
        ingest(&e.store, "d5", "t", 500_000, 3);
        assert!(evicted(&e.store.stats(), "lru") > 2, "{kind:?}");
        assert!(e.store.contains("d5"));
    }
}

#[test]
fn ttl_expires_idle_documents_only() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let with_ttl = |doc: &str, base: u32, ttl: Option<u64>, pinned: bool| {
            ingest_spec(
                &e.store,
                DocSpec {
                    ttl_ms: ttl,
                    pinned,
                    ..spec(doc, "t", DType::F16, doc_tokens(base, 1))
                },
            )
            .unwrap()
        };
        let a = with_ttl("a", 0, Some(10_000), false);
        let _b = with_ttl("b", 100_000, None, false);
        let _c = with_ttl("c", 200_000, Some(10_000), true);
        let d = with_ttl("d", 300_000, Some(1_000), false);
        e.clock.advance(5_000);
        drop(e.store.open_version(&a).unwrap()); // use at t+5s refreshes a
        // d expired at t+1s: opening it reports not found and removes it.
        assert!(matches!(
            e.store.open_version(&d),
            Err(Error::NotFound { .. })
        ));
        assert!(!e.store.contains("d"));
        e.clock.advance(6_000); // a idle 6 s
        assert!(
            e.store.run_eviction().unwrap().evicted.is_empty(),
            "{kind:?}"
        );
        e.clock.advance(5_000); // a idle 11 s
        let rep = e.store.run_eviction().unwrap();
        assert_eq!(rep.evicted, vec![(a.clone(), EvictReason::Ttl)], "{kind:?}");
        assert!(e.store.contains("b") && e.store.contains("c"));
        assert_eq!(evicted(&e.store.stats(), "ttl"), 2);
    }
}

#[test]
fn pinned_documents_survive_until_unpinned() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let p = ingest(&e.store, "pinned", "t", 0, 2);
        e.store.set_pinned(&p, true).unwrap();
        e.clock.advance(10);
        ingest(&e.store, "other", "t", 100_000, 2);
        e.store.set_eviction_policy(EvictionPolicy {
            budget_bytes: Some(1),
            ..EvictionPolicy::default()
        });
        let rep = e.store.run_eviction().unwrap();
        assert_eq!(rep.evicted.len(), 1);
        assert_eq!(rep.evicted[0].0.doc, "other");
        assert!(e.store.contains("pinned"), "{kind:?}");
        e.store.set_pinned(&p, false).unwrap();
        let rep = e.store.run_eviction().unwrap();
        assert_eq!(rep.evicted, vec![(p, EvictReason::Lru)], "{kind:?}");
        assert_eq!(e.store.stats().store_bytes, 0);
    }
}

#[test]
fn pin_survives_reopen() {
    let e = env(Kind::Rocks, test_config());
    let p = ingest(&e.store, "pinned", "t", 0, 1);
    e.store.set_pinned(&p, true).unwrap();
    let dir = e.dir.unwrap();
    drop(e.store);
    let store =
        starkv_cache::BlockStore::open_rocks(rocks_config(dir.path()), test_config()).unwrap();
    assert!(store.doc_info(&p).unwrap().state.pinned);
}

#[test]
fn tenant_quota_evicts_that_tenants_lru_and_refuses_oversized_documents() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let b0 = ingest(&e.store, "b0", "tenant-b", 900_000, 2);
        let a0 = ingest(&e.store, "a0", "tenant-a", 0, 2);
        let per_doc = e.store.tenant_bytes("tenant-a");
        let mut quotas = HashMap::new();
        quotas.insert("tenant-a".to_string(), per_doc * 5 / 2);
        e.store.set_eviction_policy(EvictionPolicy {
            tenant_quotas: quotas,
            ..EvictionPolicy::default()
        });
        e.clock.advance(10);
        let a1 = ingest(&e.store, "a1", "tenant-a", 100_000, 2);
        e.clock.advance(10);
        assert!(e.store.contains("a0"));
        let a2 = ingest(&e.store, "a2", "tenant-a", 200_000, 2);
        assert!(!e.store.contains("a0"), "{kind:?}: quota not enforced");
        assert!(e.store.contains(&a1.doc) && e.store.contains(&a2.doc));
        assert!(e.store.tenant_bytes("tenant-a") <= per_doc * 5 / 2);
        assert_eq!(evicted(&e.store.stats(), "quota"), 1);
        verify_doc(&e.store, &b0); // other tenant untouched
        let _ = a0;

        // A document that alone exceeds the quota is refused and leaves nothing.
        let blocks_before = e.store.stats().blocks;
        let err = ingest_spec(
            &e.store,
            spec("huge", "tenant-a", DType::F16, doc_tokens(300_000, 8)),
        )
        .unwrap_err();
        assert!(matches!(err, Error::QuotaExceeded { .. }), "{err:?}");
        assert!(!e.store.contains("huge"));
        assert_eq!(e.store.stats().blocks, blocks_before);
        assert_eq!(
            e.store.gc().unwrap().deleted,
            0,
            "refused ingest cleaned up"
        );
    }
}

#[test]
fn delete_by_document_removes_all_versions_even_pinned() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let v1 = ingest_spec(
            &e.store,
            DocSpec {
                keep_previous_versions: true,
                ..spec("doc", "t", DType::F16, doc_tokens(0, 2))
            },
        )
        .unwrap();
        let v2 = ingest_spec(
            &e.store,
            DocSpec {
                keep_previous_versions: true,
                pinned: true,
                ..spec("doc", "t", DType::F16, doc_tokens(10_000, 2))
            },
        )
        .unwrap();
        let other = ingest(&e.store, "other", "t", 0, 2); // shares v1's blocks
        assert_eq!(e.store.versions("doc"), vec![v1, v2]);
        let rep = e.store.delete_doc("doc").unwrap();
        assert_eq!(rep.evicted.len(), 2);
        assert_eq!(rep.blocks_deleted, 2, "{kind:?}: shared blocks kept");
        assert!(!e.store.contains("doc"));
        verify_doc(&e.store, &other);
        assert!(matches!(
            e.store.delete_doc("doc"),
            Err(Error::NotFound { .. })
        ));
    }
}

#[test]
fn existence_checks_do_not_keep_documents_alive() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let old = ingest(&e.store, "old", "t", 0, 2);
        e.clock.advance(1_000);
        let new = ingest(&e.store, "new", "t", 100_000, 2);
        for _ in 0..10 {
            e.clock.advance(1_000);
            assert!(e.store.contains("old"));
            assert!(e.store.doc_info(&old).is_some());
            assert_eq!(e.store.list().len(), 2);
            // A dedup lookup of old's blocks by a new ingest is not a use either.
            let mut ing = e
                .store
                .begin_ingest(spec("probe", "t", DType::F16, doc_tokens(0, 2)))
                .unwrap();
            let toks: Vec<u32> = doc_tokens(0, 1);
            assert!(ing.reuse_block(ing.block_key(&toks, &toks, 0), 0, BLOCK));
        }
        e.store.set_eviction_policy(EvictionPolicy {
            budget_bytes: Some(e.store.stats().store_bytes),
            high_watermark: 0.9,
            low_watermark: 0.6,
            ..EvictionPolicy::default()
        });
        let rep = e.store.run_eviction().unwrap();
        assert_eq!(rep.evicted, vec![(old, EvictReason::Lru)], "{kind:?}");
        verify_doc(&e.store, &new);
    }
}

#[test]
fn leased_documents_are_skipped_by_every_policy() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let r = ingest_spec(
            &e.store,
            DocSpec {
                ttl_ms: Some(10),
                ..spec("held", "t", DType::F16, doc_tokens(0, 2))
            },
        )
        .unwrap();
        let lease = e.store.open_version(&r).unwrap();
        e.clock.advance(1_000_000);
        let mut quotas = HashMap::new();
        quotas.insert("t".to_string(), 1);
        e.store.set_eviction_policy(EvictionPolicy {
            budget_bytes: Some(1),
            tenant_quotas: quotas,
            ..EvictionPolicy::default()
        });
        assert!(
            e.store.run_eviction().unwrap().evicted.is_empty(),
            "{kind:?}"
        );
        verify_lease(&lease).unwrap();
        drop(lease);
        let rep = e.store.run_eviction().unwrap();
        assert_eq!(rep.evicted, vec![(r, EvictReason::Ttl)], "{kind:?}");
    }
}
