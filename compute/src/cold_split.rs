//! Load or re-encode? Both: the split of a cold query's missing context blocks between
//! reading them from the store and re-encoding them from the stored source tokens, at the
//! same time (the idea of "Compute Or Load KV Cache? Why Not Both?", arXiv 2410.03065).
//! Star Attention's blocks are independent (each is a function of the anchor and its own
//! tokens), so any block can go either way and the two workers never wait on each other.
//!
//! The split follows the measured rates without fixing a proportion in advance: both
//! workers take blocks from one queue, the encoder from the front (block 0 first: its
//! prefix is the anchor) and the loader from the back, so the faster one takes more.
//! The only decision is near the end: a worker takes another block only if it would
//! finish it before the other worker could finish all that is left, given each one's time
//! per block (measured in this query, else the estimate it started with). Without that
//! rule the last block could go to the slow side and make the query wait for it.
//!
//! Pure bookkeeping (no device): [`crate::cuda`]'s cold loader drives it; tests run here.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Which worker asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Reads blocks from the store.
    Load,
    /// Re-encodes blocks from their source tokens.
    Encode,
}

#[derive(Debug, Clone, Copy, Default)]
struct Worker {
    /// Seconds per block: measured in this query (mean), else the caller's estimate.
    per_block: Option<f64>,
    measured: (f64, usize),
    /// Expected end of the block in hand (None: idle).
    busy_until: Option<Instant>,
    /// Gone for good (declined, finished, or absent from the start).
    stopped: bool,
}

#[derive(Debug)]
struct State {
    /// Blocks not taken yet (document order); `requeued` ones go to the encoder first.
    pending: std::collections::VecDeque<usize>,
    requeued: Vec<usize>,
    load: Worker,
    encode: Worker,
}

/// The shared queue of one cold query.
#[derive(Debug)]
pub struct SplitQueue {
    state: Mutex<State>,
}

impl SplitQueue {
    /// `blocks` to bring in (any order; the encoder takes them from the front). Estimates
    /// are seconds per block for each side (from earlier queries); a side that is `None`
    /// in `sides` never takes anything.
    pub fn new(
        blocks: Vec<usize>,
        load: Option<f64>,
        encode: Option<f64>,
        sides: (bool, bool),
    ) -> Self {
        let worker = |per_block, present: bool| Worker {
            per_block,
            stopped: !present,
            ..Worker::default()
        };
        Self {
            state: Mutex::new(State {
                pending: blocks.into(),
                requeued: Vec::new(),
                load: worker(load, sides.0),
                encode: worker(encode, sides.1),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next block for `side` at `now`, or `None`: the worker stops for good.
    pub fn next(&self, side: Side, now: Instant) -> Option<usize> {
        let mut s = self.lock();
        let State {
            pending,
            requeued,
            load,
            encode,
        } = &mut *s;
        let (me, other) = match side {
            Side::Load => (load, encode),
            Side::Encode => (encode, load),
        };
        if me.stopped {
            return None;
        }
        if side == Side::Encode
            && let Some(i) = requeued.pop()
        {
            me.busy_until = me.per_block.map(|p| now + Duration::from_secs_f64(p));
            return Some(i);
        }
        let left = pending.len();
        let worth_it = match (me.per_block, other.per_block, other.stopped) {
            (Some(mine), Some(theirs), false) => {
                // Taking one: done at now + mine. Leaving them all to the other side: done
                // once it finishes the block in hand and then all `left`.
                let other_free = other.busy_until.map_or(now, |t| t.max(now));
                now + Duration::from_secs_f64(mine)
                    < other_free + Duration::from_secs_f64(theirs * left as f64)
            }
            _ => true,
        };
        let taken = if !worth_it {
            None
        } else if side == Side::Encode {
            pending.pop_front()
        } else {
            pending.pop_back()
        };
        match taken {
            Some(i) => {
                me.busy_until = me.per_block.map(|p| now + Duration::from_secs_f64(p));
                Some(i)
            }
            None => {
                me.stopped = true;
                me.busy_until = None;
                None
            }
        }
    }

    /// `side` finished a block in `took` (its per-block time from now on: the mean).
    pub fn done(&self, side: Side, took: Duration) {
        let mut s = self.lock();
        let w = match side {
            Side::Load => &mut s.load,
            Side::Encode => &mut s.encode,
        };
        w.measured.0 += took.as_secs_f64();
        w.measured.1 += 1;
        w.per_block = Some(w.measured.0 / w.measured.1 as f64);
        w.busy_until = None;
    }

    /// A block the loader could not read: the encoder takes it next (or, if the encoder
    /// has stopped, whoever drains [`SplitQueue::leftover`]).
    pub fn requeue(&self, block: usize) {
        self.lock().requeued.push(block);
    }

    /// Blocks nobody took (requeued after the encoder stopped; never from `pending`
    /// while a worker is alive, since a worker stops only when the other one will do
    /// them, or when there are none).
    pub fn leftover(&self) -> Vec<usize> {
        let mut s = self.lock();
        let mut out = std::mem::take(&mut s.requeued);
        out.extend(s.pending.drain(..));
        out
    }

    /// Seconds per block each side measured in this query (`None`: it did none).
    pub fn measured(&self) -> (Option<f64>, Option<f64>) {
        let s = self.lock();
        let mean = |w: &Worker| (w.measured.1 > 0).then(|| w.measured.0 / w.measured.1 as f64);
        (mean(&s.load), mean(&s.encode))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates two workers with fixed per-block times on a virtual clock; returns the
    /// finishing time and how many blocks each side did.
    fn simulate(n: usize, load: f64, encode: f64, known: bool) -> (f64, usize, usize) {
        let q = SplitQueue::new(
            (0..n).collect(),
            known.then_some(load),
            known.then_some(encode),
            (true, true),
        );
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        // Event loop: each worker's next free time.
        let (mut free_l, mut free_e) = (Some(0.0f64), Some(0.0f64));
        let (mut nl, mut ne, mut end) = (0, 0, 0.0f64);
        while free_l.is_some() || free_e.is_some() {
            let take_load = match (free_l, free_e) {
                (Some(l), Some(e)) => l <= e,
                (Some(_), None) => true,
                _ => false,
            };
            if take_load {
                let now = free_l.unwrap();
                if nl > 0 {
                    // The previous block finished now.
                    q.done(Side::Load, Duration::from_secs_f64(load));
                }
                match q.next(Side::Load, at(now)) {
                    Some(_) => {
                        free_l = Some(now + load);
                        nl += 1;
                        end = end.max(now + load);
                    }
                    None => free_l = None,
                }
            } else {
                let now = free_e.unwrap();
                if ne > 0 {
                    q.done(Side::Encode, Duration::from_secs_f64(encode));
                }
                match q.next(Side::Encode, at(now)) {
                    Some(_) => {
                        free_e = Some(now + encode);
                        ne += 1;
                        end = end.max(now + encode);
                    }
                    None => free_e = None,
                }
            }
        }
        assert!(q.leftover().is_empty());
        (end, nl, ne)
    }

    /// The best split by brute force: k blocks loaded, the rest encoded.
    fn best(n: usize, load: f64, encode: f64) -> f64 {
        (0..=n)
            .map(|k| (k as f64 * load).max((n - k) as f64 * encode))
            .fold(f64::INFINITY, f64::min)
    }

    #[test]
    fn split_is_optimal_with_known_rates_and_beats_either_side_alone() {
        for n in [1, 2, 3, 4, 8, 16] {
            for (load, encode) in [
                (0.56, 0.35),
                (0.13, 0.35),
                (1.0, 1.0),
                (0.1, 5.0),
                (5.0, 0.1),
            ] {
                let (end, nl, ne) = simulate(n, load, encode, true);
                assert_eq!(nl + ne, n);
                let opt = best(n, load, encode);
                assert!(
                    end <= opt + 1e-9,
                    "n {n} load {load} encode {encode}: {end} vs best {opt} ({nl} loaded)"
                );
                assert!(end <= (n as f64 * load).min(n as f64 * encode) + 1e-9);
            }
        }
    }

    #[test]
    fn unknown_rates_still_split_within_one_block_of_the_best() {
        for n in [2, 4, 16] {
            for (load, encode) in [(0.56, 0.35), (0.13, 0.35), (2.0, 0.5)] {
                let (end, nl, ne) = simulate(n, load, encode, false);
                assert_eq!(nl + ne, n);
                assert!(nl > 0 && ne > 0, "both sides start");
                assert!(end <= best(n, load, encode) + load.max(encode) + 1e-9);
            }
        }
    }

    #[test]
    fn one_side_alone_takes_everything_and_requeued_blocks_reach_the_encoder() {
        let q = SplitQueue::new(vec![3, 5, 7], None, None, (true, false));
        let now = Instant::now();
        assert_eq!(q.next(Side::Encode, now), None);
        assert_eq!(q.next(Side::Load, now), Some(7));
        assert_eq!(q.next(Side::Load, now), Some(5));
        q.requeue(5);
        assert_eq!(q.next(Side::Load, now), Some(3));
        assert_eq!(q.next(Side::Load, now), None);
        assert_eq!(q.leftover(), vec![5]);

        let q = SplitQueue::new(vec![0, 1, 2], None, None, (true, true));
        assert_eq!(q.next(Side::Load, now), Some(2));
        q.requeue(2);
        assert_eq!(q.next(Side::Encode, now), Some(2));
        assert_eq!(q.next(Side::Encode, now), Some(0));
        assert_eq!(q.next(Side::Load, now), Some(1));
        assert_eq!(q.next(Side::Load, now), None);
        assert_eq!(q.next(Side::Encode, now), None);
        assert!(q.leftover().is_empty());
    }
}
