//! Busy-polling a socket before sleeping on it: the per-layer wake-ups of the cluster's
//! hot path.
//!
//! A query sends one attend call per layer and worker (30 per generated token for the
//! default model), and each call is two waits on a socket: the worker's connection
//! waiting for the next Q, the coordinator waiting for its (O, lse). A thread that sleeps
//! in the kernel for such a wait is woken by the scheduler when the bytes arrive, which
//! on a virtual machine's idle core costs tens of microseconds (the core halts, the wake
//! is an inter-processor interrupt), twice per call: a few milliseconds per token.
//! Polling the socket without blocking for a bounded time first (the way low-latency
//! RPC stacks and the kernel's own `SO_BUSY_POLL` do) takes the frame on arrival; past
//! the budget the thread sleeps as before, so an idle connection costs nothing.
//!
//! Spinning takes a core from whatever else could run on it, so the automatic budget is
//! zero on hosts with few hardware threads (the coordinator's and workers' compute
//! threads need them) and [`SpinBudget::AUTO_MICROS`] elsewhere.

use std::mem::MaybeUninit;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How long a thread waiting for a frame polls its socket before it sleeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpinBudget(Duration);

impl SpinBudget {
    /// Never poll: every wait sleeps in the kernel.
    pub const OFF: Self = Self(Duration::ZERO);

    /// The automatic budget on a host with enough hardware threads: longer than one
    /// layer of the default model on one CPU thread (~1 ms), so that a decode's waits on
    /// both ends of a call are taken while polling.
    pub const AUTO_MICROS: u64 = 2_000;

    /// Hosts with fewer hardware threads than this poll nothing by default.
    pub const AUTO_MIN_THREADS: usize = 4;

    pub fn from_micros(us: u64) -> Self {
        Self(Duration::from_micros(us))
    }

    /// `configured` when set, else [`SpinBudget::AUTO_MICROS`] on hosts with at least
    /// [`SpinBudget::AUTO_MIN_THREADS`] hardware threads and nothing on smaller ones.
    pub fn resolve(configured: Option<u64>) -> Self {
        match configured {
            Some(us) => Self::from_micros(us),
            None => {
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                if threads >= Self::AUTO_MIN_THREADS {
                    Self::from_micros(Self::AUTO_MICROS)
                } else {
                    Self::OFF
                }
            }
        }
    }

    pub fn micros(self) -> u64 {
        self.0.as_micros() as u64
    }

    pub fn duration(self) -> Duration {
        self.0
    }

    /// Returns once `stream` has something for a read to return (bytes, the peer's
    /// close, an error), or the budget is spent, or `deadline` passed; reads nothing.
    /// The caller's (blocking) read follows, and finds the frame already there when the
    /// poll saw it.
    pub fn wait_readable(self, stream: &TcpStream, deadline: Option<Instant>) {
        if self.0.is_zero() {
            return;
        }
        let start = Instant::now();
        let until = deadline.map_or(start + self.0, |d| d.min(start + self.0));
        let socket = socket2::SockRef::from(stream);
        let mut byte = [MaybeUninit::<u8>::uninit(); 1];
        loop {
            match socket.recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                _ => return,
            }
            if Instant::now() >= until {
                return;
            }
            // Polite polling: a thread that is ready to run on this core goes first.
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (client, server)
    }

    #[test]
    fn auto_is_off_on_small_hosts_and_explicit_budgets_are_kept() {
        assert_eq!(SpinBudget::resolve(Some(0)), SpinBudget::OFF);
        assert_eq!(SpinBudget::resolve(Some(750)).micros(), 750);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let auto = SpinBudget::resolve(None).micros();
        if threads >= SpinBudget::AUTO_MIN_THREADS {
            assert_eq!(auto, SpinBudget::AUTO_MICROS);
        } else {
            assert_eq!(auto, 0);
        }
    }

    #[test]
    fn a_frame_arriving_while_polling_ends_the_poll_and_is_left_for_the_read() {
        let (mut client, server) = pair();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            client.write_all(b"frame").expect("write");
            client
        });
        let started = Instant::now();
        SpinBudget::from_micros(5_000_000).wait_readable(&server, None);
        let waited = started.elapsed();
        // Returned on arrival (not after the 5 s budget), without consuming anything.
        assert!(waited < Duration::from_secs(4), "polled for {waited:?}");
        let mut got = [0u8; 5];
        (&server).read_exact(&mut got).expect("read");
        assert_eq!(&got, b"frame");
        drop(writer.join().expect("writer"));
    }

    #[test]
    fn the_budget_and_the_deadline_bound_the_poll_and_a_close_ends_it() {
        let (client, server) = pair();
        let started = Instant::now();
        SpinBudget::from_micros(30_000).wait_readable(&server, None);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(30),
            "returned early: {waited:?}"
        );
        let started = Instant::now();
        SpinBudget::from_micros(5_000_000)
            .wait_readable(&server, Some(Instant::now() + Duration::from_millis(10)));
        assert!(started.elapsed() < Duration::from_secs(4));
        drop(client);
        let started = Instant::now();
        SpinBudget::from_micros(5_000_000).wait_readable(&server, None);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "a close must end the poll"
        );
        // Off: returns at once.
        let started = Instant::now();
        SpinBudget::OFF.wait_readable(&server, None);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
