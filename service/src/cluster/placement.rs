//! Block placement: rendezvous (highest-random-weight) hashing of a block's content key
//! over the cluster's workers.
//!
//! Every worker gets a score `SHA-256(worker address || key)`; a block's preference order
//! is the workers by descending score. The same key always prefers the same workers (so
//! dedup holds across documents), and adding or removing a worker moves only the blocks
//! whose first choices changed. With `replicas = r` a block lives on the first `r` live
//! workers of its order; when one of those is down the next one in the order takes it.

use sha2::{Digest, Sha256};

use super::wire::Key;

/// The workers in `addresses` ordered by preference for `key` (highest score first).
pub fn preference(addresses: &[String], key: &Key) -> Vec<usize> {
    let mut scored: Vec<(u64, usize)> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| (score(a, key), i))
        .collect();
    // Ties (practically impossible) fall back to the configured order.
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, i)| i).collect()
}

/// The first `replicas` workers of `key`'s preference order for which `live` holds.
pub fn place(
    addresses: &[String],
    key: &Key,
    replicas: usize,
    live: &dyn Fn(usize) -> bool,
) -> Vec<usize> {
    preference(addresses, key)
        .into_iter()
        .filter(|&w| live(w))
        .take(replicas)
        .collect()
}

fn score(address: &str, key: &Key) -> u64 {
    let mut h = Sha256::new();
    h.update((address.len() as u32).to_le_bytes());
    h.update(address.as_bytes());
    h.update(key);
    let digest = h.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:8701")).collect()
    }

    fn key(i: u32) -> Key {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        Sha256::digest(k).into()
    }

    #[test]
    fn placement_is_stable_spread_and_moves_only_what_it_must() {
        let three = workers(3);
        let mut per_worker = [0usize; 3];
        for i in 0..600 {
            let first = place(&three, &key(i), 1, &|_| true);
            assert_eq!(first, place(&three, &key(i), 1, &|_| true), "deterministic");
            per_worker[first[0]] += 1;
        }
        assert!(per_worker.iter().all(|&n| n > 150), "{per_worker:?}");
        // A fourth worker takes about a quarter of the blocks, and only from the others.
        let four = workers(4);
        let moved = (0..600)
            .filter(|&i| {
                let before = place(&three, &key(i), 1, &|_| true)[0];
                let after = place(&four, &key(i), 1, &|_| true)[0];
                assert!(
                    after == before || after == 3,
                    "a block moved between old workers"
                );
                after != before
            })
            .count();
        assert!((90..=210).contains(&moved), "{moved}");
    }

    #[test]
    fn replicas_are_distinct_and_a_dead_worker_is_skipped() {
        let five = workers(5);
        for i in 0..100 {
            let two = place(&five, &key(i), 2, &|_| true);
            assert_eq!(two.len(), 2);
            assert_ne!(two[0], two[1]);
            let dead = two[0];
            let without = place(&five, &key(i), 2, &|w| w != dead);
            assert_eq!(without[0], two[1], "the replica becomes the first choice");
            assert!(!without.contains(&dead));
        }
        assert!(place(&five, &key(0), 2, &|_| false).is_empty());
    }
}
