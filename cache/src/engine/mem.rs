//! In-memory engine: a `BTreeMap` per (instance, space).
//!
//! Everything is "durable" the moment it is written (there is no disk), so it cannot
//! test crash safety; the RocksDB engine's tests do that.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use super::{Batch, Engine, Op, Space, Target};
use crate::error::{Error, Result};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// In-memory [`Engine`].
pub struct MemEngine {
    shards: usize,
    maps: RwLock<HashMap<(Target, Space), Map>>,
}

impl MemEngine {
    /// Creates an empty engine with `shards` block shards.
    pub fn new(shards: usize) -> Self {
        MemEngine {
            shards: shards.max(1),
            maps: RwLock::new(HashMap::new()),
        }
    }

    fn check(&self, target: Target, space: Space) -> Result<()> {
        let ok = match (target, space) {
            (Target::Meta, Space::Meta) => true,
            (Target::Shard(i), Space::Layers | Space::BlockIndex | Space::Docs) => i < self.shards,
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "mem engine: no space {space:?} in {target:?}"
            )))
        }
    }
}

impl Engine for MemEngine {
    fn shards(&self) -> usize {
        self.shards
    }

    fn write(&self, target: Target, batch: Batch, _sync: bool) -> Result<()> {
        for op in &batch.ops {
            let space = match op {
                Op::Put { space, .. }
                | Op::Delete { space, .. }
                | Op::DeleteRange { space, .. } => *space,
            };
            self.check(target, space)?;
        }
        let mut maps = self.maps.write().expect("mem engine lock");
        for op in batch.ops {
            match op {
                Op::Put { space, key, value } => {
                    maps.entry((target, space)).or_default().insert(key, value);
                }
                Op::Delete { space, key } => {
                    if let Some(m) = maps.get_mut(&(target, space)) {
                        m.remove(&key);
                    }
                }
                Op::DeleteRange { space, start, end } => {
                    if let Some(m) = maps.get_mut(&(target, space)) {
                        let doomed: Vec<Vec<u8>> =
                            m.range(start..end).map(|(k, _)| k.clone()).collect();
                        for k in doomed {
                            m.remove(&k);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn sync(&self, _target: Target) -> Result<()> {
        Ok(())
    }

    fn get(
        &self,
        target: Target,
        space: Space,
        key: &[u8],
        f: &mut dyn FnMut(Option<&[u8]>),
    ) -> Result<()> {
        self.check(target, space)?;
        let maps = self.maps.read().expect("mem engine lock");
        f(maps
            .get(&(target, space))
            .and_then(|m| m.get(key))
            .map(Vec::as_slice));
        Ok(())
    }

    fn scan(
        &self,
        target: Target,
        space: Space,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        self.check(target, space)?;
        let maps = self.maps.read().expect("mem engine lock");
        if let Some(m) = maps.get(&(target, space)) {
            for (k, v) in m.range(prefix.to_vec()..) {
                if !k.starts_with(prefix) || !f(k, v) {
                    break;
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn disk_usage(&self) -> Result<u64> {
        let maps = self.maps.read().expect("mem engine lock");
        Ok(maps
            .values()
            .flat_map(|m| m.iter())
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum())
    }

    fn name(&self) -> &'static str {
        "mem"
    }
}
