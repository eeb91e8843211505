//! Metrics go through the `metrics` facade (checked with a thread-local recorder, never
//! a global one).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use starkv_cache::engine::{Batch, Space, Target, layer_key};
use starkv_cache::metrics as names;
use starkv_cache::{EvictionPolicy, StoreConfig};

use crate::util::*;

#[derive(Default)]
struct TestRecorder {
    values: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl TestRecorder {
    fn slot(&self, key: &Key) -> Arc<AtomicU64> {
        let mut name = key.name().to_string();
        for l in key.labels() {
            name.push_str(&format!("{{{}={}}}", l.key(), l.value()));
        }
        self.values.lock().unwrap().entry(name).or_default().clone()
    }
    fn counter(&self, name: &str) -> u64 {
        self.values
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |v| v.load(Ordering::Relaxed))
    }
    fn gauge(&self, name: &str) -> f64 {
        f64::from_bits(self.counter(name))
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.slot(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.slot(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[test]
fn store_emits_the_documented_metrics() {
    let rec = TestRecorder::default();
    metrics::with_local_recorder(&rec, || {
        let e = env(
            Kind::Rocks,
            StoreConfig {
                hot_tier_bytes: 1 << 20,
                ..test_config()
            },
        );
        let r = ingest(&e.store, "a", "t", 0, 2);
        ingest(&e.store, "b", "t", 0, 2); // deduplicated
        let lease = e.store.open_version(&r).unwrap();
        lease.read_layer(0, 0).unwrap();
        lease.read_layer(0, 0).unwrap();
        // Corrupt one stored value and read it uncached.
        let key = lease.manifest().blocks[1].key;
        let mut b = Batch::default();
        b.put(Space::Layers, layer_key(&key, 2), vec![0; 64]);
        e.store
            .engine()
            .write(Target::Shard(key.shard(3)), b, false)
            .unwrap();
        assert!(lease.read_layer(1, 2).is_err());
        drop(lease);
        e.store.set_eviction_policy(EvictionPolicy {
            budget_bytes: Some(1),
            ..EvictionPolicy::default()
        });
        e.store.run_eviction().unwrap();

        assert_eq!(rec.counter(names::BLOCKS_WRITTEN), 2);
        assert_eq!(rec.counter(names::BLOCKS_DEDUPLICATED), 2);
        assert!(rec.counter(names::BYTES_WRITTEN) > 0);
        assert_eq!(
            rec.counter(names::RAW_BYTES_WRITTEN),
            2 * LAYERS as u64 * (2 * KV_HEADS * BLOCK * HEAD_DIM * 2) as u64
        );
        assert_eq!(rec.counter(names::HOT_HITS), 1);
        assert_eq!(rec.counter(names::HOT_MISSES), 2);
        assert_eq!(rec.counter(names::LAYERS_READ), 1);
        assert!(rec.counter(names::BYTES_READ) > 0);
        assert_eq!(rec.counter(names::CHECKSUM_FAILURES), 1);
        assert_eq!(
            rec.counter(&format!("{}{{reason=lru}}", names::EVICTIONS)),
            2
        );
        assert_eq!(rec.gauge(names::STORE_BYTES), 0.0);
        assert_eq!(rec.gauge(names::DOCUMENTS), 0.0);
    });
}
