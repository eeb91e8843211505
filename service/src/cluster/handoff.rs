//! Handing a CPU worker's attends to its compute pool without waking a thread.
//!
//! An attend arrives about once per layer of a decode step; between two of them the
//! compute pool's thread goes to sleep, and `rayon::spawn` has to wake it (a futex wake:
//! tens of microseconds on a virtual machine's idle core, measured 28-47 µs per call on
//! the H200 host). Instead, the pool thread that answered a connection's attend stays
//! in the job, polling this hand-off for up to the connection's [`SpinBudget`]; the
//! connection's next attend is then passed to it through memory. Past the budget the
//! thread returns to the pool, and the next attend is spawned as before. At most one
//! thread polls per connection; attends of concurrent queries that find none polling
//! are spawned (and run side by side) as before.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::spin::SpinBudget;

type Job = Box<dyn FnOnce() + Send>;

enum Slot {
    /// No pool thread is polling.
    Idle,
    /// A pool thread polls for the next job.
    Polling,
    /// A job was passed to the polling thread, which has not taken it yet.
    Handed(Job),
}

/// One connection's hand-off to its compute pool.
pub(crate) struct PoolHandoff {
    slot: Mutex<Slot>,
    budget: SpinBudget,
}

impl PoolHandoff {
    pub(crate) fn new(budget: SpinBudget) -> Arc<Self> {
        Arc::new(Self {
            slot: Mutex::new(Slot::Idle),
            budget,
        })
    }

    fn slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `job` on the compute pool: on the thread polling for it if there is one,
    /// else on a spawned one.
    pub(crate) fn submit(self: &Arc<Self>, job: Job) {
        {
            let mut slot = self.slot();
            if matches!(*slot, Slot::Polling) {
                *slot = Slot::Handed(job);
                return;
            }
        }
        let this = self.clone();
        rayon::spawn(move || this.run(job));
    }

    /// A pool thread's loop: the job, then polling for the next one within the budget.
    fn run(&self, first: Job) {
        let mut job = first;
        loop {
            job();
            if self.budget.duration().is_zero() {
                return;
            }
            {
                let mut slot = self.slot();
                if !matches!(*slot, Slot::Idle) {
                    return; // another thread polls (or was handed a job)
                }
                *slot = Slot::Polling;
            }
            let until = Instant::now() + self.budget.duration();
            job = loop {
                if let Ok(mut slot) = self.slot.try_lock() {
                    match std::mem::replace(&mut *slot, Slot::Idle) {
                        Slot::Handed(next) => break next,
                        Slot::Polling if Instant::now() < until => *slot = Slot::Polling,
                        // The budget is spent: the slot is left idle, the next job spawns.
                        Slot::Polling | Slot::Idle => return,
                    }
                }
                // Polite polling: a thread that is ready to run on this core goes first.
                std::thread::yield_now();
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    fn counting_job(runs: &Arc<AtomicUsize>, done: &mpsc::Sender<()>) -> Job {
        let (runs, done) = (runs.clone(), done.clone());
        Box::new(move || {
            runs.fetch_add(1, Ordering::SeqCst);
            done.send(()).expect("report");
        })
    }

    /// Every job runs exactly once, whether it was handed to a polling thread or spawned,
    /// with jobs submitted one at a time (the decode pattern) and in bursts from several
    /// threads (concurrent queries).
    #[test]
    fn every_job_runs_exactly_once() {
        for budget in [SpinBudget::OFF, SpinBudget::from_micros(2_000)] {
            let handoff = PoolHandoff::new(budget);
            let runs = Arc::new(AtomicUsize::new(0));
            let (done, finished) = mpsc::channel();
            for _ in 0..50 {
                handoff.submit(counting_job(&runs, &done));
                finished
                    .recv_timeout(Duration::from_secs(10))
                    .expect("job ran");
                std::thread::sleep(Duration::from_micros(100));
            }
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        for _ in 0..50 {
                            handoff.submit(counting_job(&runs, &done));
                        }
                    });
                }
            });
            for _ in 0..200 {
                finished
                    .recv_timeout(Duration::from_secs(10))
                    .expect("job ran");
            }
            // Past the budget, nothing polls any longer and nothing ran twice.
            std::thread::sleep(Duration::from_millis(20));
            assert!(matches!(*handoff.slot(), Slot::Idle));
            assert_eq!(runs.load(Ordering::SeqCst), 250);
        }
    }

    #[test]
    fn a_job_submitted_while_a_thread_polls_is_handed_to_it() {
        let handoff = PoolHandoff::new(SpinBudget::from_micros(5_000_000));
        let (tx, rx) = mpsc::channel();
        let first_tx = tx.clone();
        handoff.submit(Box::new(move || {
            first_tx.send(std::thread::current().id()).expect("report")
        }));
        let first = rx.recv_timeout(Duration::from_secs(10)).expect("first ran");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(*handoff.slot(), Slot::Polling) {
            assert!(Instant::now() < deadline, "the pool thread never polled");
            std::thread::yield_now();
        }
        handoff.submit(Box::new(move || {
            tx.send(std::thread::current().id()).expect("report")
        }));
        let second = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("second ran");
        assert_eq!(first, second, "the polling thread ran the next job");
    }
}
