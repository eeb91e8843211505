use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use starkv_cache::{EvictionPolicy, StoreConfig};

use crate::util::*;

/// A reader holding a document keeps reading correct data from the engine (hot tier
/// off) while the document is deleted, eviction runs with a zero budget and gc runs.
#[test]
fn reader_holding_a_document_survives_eviction_delete_and_gc() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let r = ingest(&e.store, "held", "t", 0, 6);
        let lease = e.store.open_version(&r).unwrap();
        lease.source_tokens().unwrap(); // cached in the lease for the verifier
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let reader = {
            let stop = stop.clone();
            let rounds = rounds.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) || rounds.load(Ordering::Relaxed) < 3 {
                    verify_lease(&lease).unwrap();
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
                lease
            })
        };
        e.store.set_eviction_policy(EvictionPolicy {
            budget_bytes: Some(1),
            ..EvictionPolicy::default()
        });
        let mut i = 0;
        while rounds.load(Ordering::Relaxed) < 5 || i < 20 {
            // Other documents come and go around it.
            ingest(
                &e.store,
                &format!("churn{i}"),
                "t",
                1_000_000 + i * 10_000,
                2,
            );
            e.store.run_eviction().unwrap();
            e.store.gc().unwrap();
            if i == 3 {
                let rep = e.store.delete_doc("held").unwrap();
                assert_eq!(rep.deferred, 1);
                assert!(!e.store.contains("held"));
            }
            i += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let lease = reader.join().unwrap();
        assert!(rounds.load(Ordering::Relaxed) >= 5);
        verify_lease(&lease).unwrap();
        drop(lease);
        // Last lease gone: the held document's blocks are freed.
        e.store.run_eviction().unwrap();
        assert_eq!(e.store.stats().blocks, 0, "{kind:?}");
        assert_eq!(e.store.gc().unwrap().scanned, 0, "{kind:?}");
    }
}

/// Many readers and writers on one store at once, with the hot tier on.
#[test]
fn parallel_readers_and_writers() {
    let e = env(
        Kind::Rocks,
        StoreConfig {
            hot_tier_bytes: 64 << 10,
            ..test_config()
        },
    );
    let store = e.store.clone();
    std::thread::scope(|s| {
        for w in 0..2u32 {
            let store = store.clone();
            s.spawn(move || {
                for i in 0..10u32 {
                    // Overlapping bases: writers race to store the same blocks.
                    let r = ingest(&store, &format!("w{w}-{i}"), "t", (i % 3) * 50_000, 3);
                    verify_doc(&store, &r);
                }
            });
        }
        for _ in 0..2 {
            let store = store.clone();
            s.spawn(move || {
                for _ in 0..30 {
                    for info in store.list() {
                        if let Ok(l) = store.open_version(&info.doc) {
                            verify_lease(&l).unwrap();
                        }
                    }
                }
            });
        }
    });
    assert_eq!(store.list().len(), 20);
    assert_eq!(store.stats().blocks, 9);
    assert_eq!(store.gc().unwrap().deleted, 0);
}
