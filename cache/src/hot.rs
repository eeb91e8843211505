//! Hot tier: a byte-bounded LRU of decoded layers in front of the engine.
//!
//! Keyed by (block key, layer). Blocks are content-addressed and immutable, so an entry
//! can never be stale; entries are still dropped when their block is deleted, to give
//! the memory back. Values are `Arc<Tensor>`: a hit costs a refcount increment, and an
//! entry evicted while a reader still holds it stays alive until that reader drops it
//! (the budget bounds the cache's own references, not readers' copies).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::key::BlockKey;
use crate::metrics as m;
use crate::tensor::Tensor;

type Slot = (BlockKey, u16);

struct Entry {
    value: Arc<Tensor>,
    tick: u64,
    bytes: u64,
}

#[derive(Default)]
struct Lru {
    map: HashMap<Slot, Entry>,
    // tick -> slot, oldest first. Ticks are unique (one per access).
    order: BTreeMap<u64, Slot>,
    bytes: u64,
    tick: u64,
}

/// Snapshot of the hot tier's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HotStats {
    /// Lookups served from memory.
    pub hits: u64,
    /// Lookups that went to the engine.
    pub misses: u64,
    /// Bytes currently held (decoded element bytes).
    pub bytes: u64,
    /// Entries currently held.
    pub entries: u64,
    /// The byte budget.
    pub budget: u64,
}

/// Byte-bounded LRU of decoded layers.
pub struct HotTier {
    budget: u64,
    lru: Mutex<Lru>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl HotTier {
    /// A hot tier holding at most `budget` decoded bytes (0 disables it).
    pub fn new(budget: u64) -> Self {
        HotTier {
            budget,
            lru: Mutex::new(Lru::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Looks up a layer, counting a hit or a miss.
    pub fn get(&self, key: &BlockKey, layer: u16) -> Option<Arc<Tensor>> {
        if self.budget == 0 {
            self.misses.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::HOT_MISSES).increment(1);
            return None;
        }
        let mut lru = self.lru.lock().expect("hot tier lock");
        lru.tick += 1;
        let tick = lru.tick;
        let found = lru.map.get_mut(&(*key, layer)).map(|e| {
            let old = std::mem::replace(&mut e.tick, tick);
            (old, e.value.clone())
        });
        match found {
            Some((old, v)) => {
                lru.order.remove(&old);
                lru.order.insert(tick, (*key, layer));
                drop(lru);
                self.hits.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::HOT_HITS).increment(1);
                Some(v)
            }
            None => {
                drop(lru);
                self.misses.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::HOT_MISSES).increment(1);
                None
            }
        }
    }

    /// Inserts a layer, evicting least-recently-used entries to stay within budget.
    /// Values larger than the whole budget are not cached.
    pub fn insert(&self, key: BlockKey, layer: u16, value: Arc<Tensor>) {
        let bytes = value.byte_len() as u64;
        if bytes > self.budget {
            return;
        }
        let mut lru = self.lru.lock().expect("hot tier lock");
        lru.tick += 1;
        let tick = lru.tick;
        if let Some(old) = lru.map.insert((key, layer), Entry { value, tick, bytes }) {
            lru.order.remove(&old.tick);
            lru.bytes -= old.bytes;
        }
        lru.order.insert(tick, (key, layer));
        lru.bytes += bytes;
        while lru.bytes > self.budget {
            let Some((_, slot)) = lru.order.pop_first() else {
                break;
            };
            if let Some(e) = lru.map.remove(&slot) {
                lru.bytes -= e.bytes;
            }
        }
        metrics::gauge!(m::HOT_BYTES).set(lru.bytes as f64);
    }

    /// Drops every cached layer of a block.
    pub fn remove_block(&self, key: &BlockKey, layers: u16) {
        let mut lru = self.lru.lock().expect("hot tier lock");
        for layer in 0..layers {
            if let Some(e) = lru.map.remove(&(*key, layer)) {
                lru.order.remove(&e.tick);
                lru.bytes -= e.bytes;
            }
        }
        metrics::gauge!(m::HOT_BYTES).set(lru.bytes as f64);
    }

    /// Drops everything.
    pub fn clear(&self) {
        let mut lru = self.lru.lock().expect("hot tier lock");
        *lru = Lru::default();
        metrics::gauge!(m::HOT_BYTES).set(0.0);
    }

    /// Counters and occupancy.
    pub fn stats(&self) -> HotStats {
        let lru = self.lru.lock().expect("hot tier lock");
        HotStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: lru.bytes,
            entries: lru.map.len() as u64,
            budget: self.budget,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    fn t(n: usize) -> Arc<Tensor> {
        Arc::new(Tensor::from_f32(DType::F16, vec![n as u32], &vec![1.0; n]).unwrap())
    }

    #[test]
    fn lru_respects_budget_and_recency() {
        let h = HotTier::new(300); // three 100-byte entries
        let k = |i: u8| BlockKey([i; 32]);
        for i in 0..3 {
            h.insert(k(i), 0, t(50));
        }
        assert!(h.get(&k(0), 0).is_some()); // 0 is now most recent
        h.insert(k(3), 0, t(50)); // evicts 1, the least recent
        assert!(h.get(&k(1), 0).is_none());
        assert!(h.get(&k(0), 0).is_some());
        assert!(h.get(&k(2), 0).is_some());
        assert!(h.get(&k(3), 0).is_some());
        let s = h.stats();
        assert_eq!((s.hits, s.misses, s.bytes, s.entries), (4, 1, 300, 3));
        h.insert(k(9), 0, t(1000)); // larger than the budget: ignored
        assert_eq!(h.stats().bytes, 300);
        h.remove_block(&k(0), 1);
        assert_eq!(h.stats().bytes, 200);
    }

    #[test]
    fn zero_budget_disables() {
        let h = HotTier::new(0);
        h.insert(BlockKey([1; 32]), 0, t(1));
        assert!(h.get(&BlockKey([1; 32]), 0).is_none());
        assert_eq!(h.stats().misses, 1);
    }
}
