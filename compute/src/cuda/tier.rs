//! The GPU-resident block tier: hot documents' blocks under a byte budget, LRU.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use super::block::GpuBlock;

/// What the resident tier holds: anything that knows its device size.
pub trait TierValue {
    fn tier_bytes(&self) -> usize;
}

impl TierValue for GpuBlock {
    fn tier_bytes(&self) -> usize {
        self.n_bytes()
    }
}

/// The GPU-resident tier: blocks of hot documents kept on the device under a byte
/// budget, least recently used first out. Blocks are shared (`Arc`): an evicted block
/// still in use by a running query stays alive until that query drops it, so a document
/// being queried is never pulled out from under the query.
pub struct BlockTier<K, V = GpuBlock> {
    budget: usize,
    used: usize,
    tick: u64,
    entries: HashMap<K, (Arc<V>, u64)>,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

impl<K: Hash + Eq + Clone, V: TierValue> BlockTier<K, V> {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget: budget_bytes,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
            hits: 0,
            misses: 0,
            evictions: 0,
        }
    }

    pub fn budget_bytes(&self) -> usize {
        self.budget
    }

    pub fn used_bytes(&self) -> usize {
        self.used
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// The block under `key`, marked as most recently used.
    pub fn get(&mut self, key: &K) -> Option<Arc<V>> {
        self.tick += 1;
        match self.entries.get_mut(key) {
            Some((b, t)) => {
                *t = self.tick;
                self.hits += 1;
                Some(b.clone())
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Inserts (or refreshes) a block, evicting least recently used blocks to stay
    /// within the budget. A block larger than the whole budget is not kept.
    pub fn insert(&mut self, key: K, block: Arc<V>) {
        self.tick += 1;
        let bytes = block.tier_bytes();
        if let Some((old, _)) = self.entries.remove(&key) {
            self.used -= old.tier_bytes();
        }
        if bytes > self.budget {
            return;
        }
        while self.used + bytes > self.budget {
            let Some(victim) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            let (b, _) = self.entries.remove(&victim).unwrap();
            self.used -= b.tier_bytes();
            self.evictions += 1;
        }
        self.used += bytes;
        self.entries.insert(key, (block, self.tick));
    }

    /// Forgets every block (the counters stay).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.used = 0;
    }

    pub fn remove(&mut self, key: &K) -> Option<Arc<V>> {
        let (b, _) = self.entries.remove(key)?;
        self.used -= b.tier_bytes();
        Some(b)
    }
}
