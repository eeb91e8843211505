//! The worker's listener: one thread per coordinator connection, reading frames with
//! blocking reads (polled first, [`super::spin`]); attends answered on the compute pool
//! (CPU) or the connection's thread (GPU), everything else on blocking threads (model,
//! store); replies written in completion order by the threads that computed them.
//!
//! A connection must open with [`Request::Hello`] carrying [`PROTOCOL_VERSION`] and the
//! cluster's shared secret; otherwise it gets one error reply and is closed. A frame
//! that does not parse gets an error reply (the connection stays usable: the length
//! prefix kept it in step); a length prefix out of bounds closes the connection, since
//! nothing after it can be trusted. Sessions a connection opened are closed with it.

use std::collections::HashSet;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use super::handoff::PoolHandoff;
use super::spin::SpinBudget;
use super::wire::{
    ErrorCode, PROTOCOL_VERSION, Reply, Request, WorkerTime, read_frame, read_frame_within,
};
use super::worker::WorkerNode;

/// Longest wait for a new connection's handshake, and the largest handshake frame read
/// (a peer that has not shown the secret gets no large allocation or idle thread).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_MAX_BYTES: usize = 64 << 10;

/// Connections served at once (each holds a thread); past it a new connection is closed
/// unanswered. A coordinator opens one per worker, so only a flood reaches it.
const MAX_CONNECTIONS: usize = 256;

/// One connection's place under [`MAX_CONNECTIONS`], given back when dropped.
struct Admitted(Arc<AtomicUsize>);

impl Admitted {
    fn try_new(open: &Arc<AtomicUsize>) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_CONNECTIONS).then_some(n + 1)
        })
        .ok()
        .map(|_| Self(open.clone()))
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `node` on `listener` until the task is dropped. Each connection runs on a
/// thread of its own (blocking reads, polled for `spin` first: see [`super::spin`]);
/// the listener only accepts.
pub async fn serve_worker(
    listener: TcpListener,
    node: Arc<WorkerNode>,
    secret: Arc<Vec<u8>>,
    spin: SpinBudget,
) {
    let runtime = tokio::runtime::Handle::current();
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "worker: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let stream = match stream.into_std().and_then(|s| {
            s.set_nonblocking(false)?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "worker: connection not usable");
                continue;
            }
        };
        let Some(admitted) = Admitted::try_new(&open) else {
            tracing::warn!(%peer, "worker: {MAX_CONNECTIONS} connections open; refused");
            continue;
        };
        let (node, secret, runtime) = (node.clone(), secret.clone(), runtime.clone());
        let spawned = std::thread::Builder::new()
            .name("starkv-worker-conn".into())
            .spawn(move || {
                let _admitted = admitted;
                if let Err(e) = connection(stream, &node, &secret, spin, &runtime) {
                    tracing::info!(%peer, error = %e, "worker: connection ended");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(%peer, error = %e, "worker: no thread for a connection");
        }
    }
}

fn connection(
    stream: TcpStream,
    node: &Arc<WorkerNode>,
    secret: &[u8],
    spin: SpinBudget,
    runtime: &tokio::runtime::Handle,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    // A coordinator whose host vanished without closing (no FIN) is noticed within about
    // two and a half minutes, and its sessions and this thread are released.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
    // Handshake: the first frame, small and within a time limit, checked before anything
    // else is read.
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let body = read_frame_within(&mut &stream, HANDSHAKE_MAX_BYTES)?;
    let (id, hello) = Request::parse(&body);
    let refusal = match hello {
        Ok(Request::Hello { version, .. }) if version != PROTOCOL_VERSION => Some(Reply::error(
            ErrorCode::Version,
            format!("protocol version {version}; this worker speaks {PROTOCOL_VERSION}"),
        )),
        Ok(Request::Hello { secret: given, .. }) if !same_secret(&given, secret) => Some(
            Reply::error(ErrorCode::Unauthorized, "wrong cluster secret"),
        ),
        Ok(Request::Hello { .. }) => None,
        Ok(_) => Some(Reply::error(
            ErrorCode::Unauthorized,
            "the first request must be a handshake",
        )),
        Err(e) => Some(Reply::error(ErrorCode::BadRequest, e.to_string())),
    };
    if let Some(refusal) = refusal {
        (&stream).write_all(&refusal.frame(id))?;
        return Ok(());
    }
    (&stream).write_all(&node.hello().frame(id))?;
    stream.set_read_timeout(None)?;

    // A reply is written by the thread that computed it (no hand-off to a writer per
    // reply, which cost a wake-up per layer and worker), whole frames at a time under the
    // lock, in completion order.
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let opened: Arc<Mutex<HashSet<u64>>> = Arc::default();
    // Every job holds a sender; `recv` fails once the last one has finished.
    let (in_flight, all_done) = std::sync::mpsc::channel::<()>();
    let runner = Runner::for_node(node);
    let pool = PoolHandoff::new(spin);
    let result = loop {
        spin.wait_readable(&stream, None);
        let body = match read_frame(&mut &stream) {
            Ok(b) => b,
            Err(e) => break Err(e),
        };
        let read_at = Instant::now();
        let (id, parsed) = Request::parse(&body);
        let req = match parsed {
            Ok(r) => r,
            Err(e) => {
                let frame = Reply::error(ErrorCode::BadRequest, e.to_string()).frame(id);
                write_reply(&writer, &frame);
                continue;
            }
        };
        let attend_runner = matches!(req, Request::Attend { .. }).then_some(runner);
        let answer = {
            let (node, opened) = (node.clone(), opened.clone());
            move || answer(&node, &opened, req, read_at).frame(id)
        };
        if let Some(Runner::Inline) = attend_runner {
            write_reply(&writer, &answer());
            continue;
        }
        let job = {
            let (writer, done) = (writer.clone(), in_flight.clone());
            move || {
                write_reply(&writer, &answer());
                drop(done);
            }
        };
        if let Some(Runner::ComputePool) = attend_runner {
            pool.submit(Box::new(job));
        } else {
            // Long requests (encode, open, verify): the runtime's bounded blocking pool.
            drop(runtime.spawn_blocking(job));
        }
    };
    // Every request read has been answered (or its write failed) before the sessions
    // this connection opened are closed: an open still running would otherwise leave one.
    drop(in_flight);
    let _ = all_done.recv();
    let sessions: Vec<u64> = opened.lock().expect("session set").drain().collect();
    for session in sessions {
        node.handle(Request::Close { session });
    }
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
        other => other,
    }
}

/// Writes one whole reply frame. A failed write means the connection is gone: the
/// connection's next read ends its loop.
fn write_reply(writer: &Mutex<TcpStream>, frame: &[u8]) {
    let _ = writer
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .write_all(frame);
}

/// Where a connection's attends run. An attend is the hot path (one per layer, worker
/// and generated token, ~30 per token), and every hand-off between threads costs a
/// wake-up (tens of µs on an idle core of a virtual machine), so attends skip the
/// blocking pool that every other (long) request goes to.
#[derive(Debug, Clone, Copy)]
enum Runner {
    /// A CPU worker: straight onto the compute pool, whose thread attends (its parallel
    /// loop runs inside the pool, no second entry) and writes the reply itself, handed
    /// to the pool thread that answered the previous attend while it still polls for the
    /// next ([`PoolHandoff`]). Attends of concurrent queries run side by side.
    ComputePool,
    /// A GPU worker: on the connection's own thread. One device runs a connection's
    /// attends one after the other anyway; the next frame is read when this one is
    /// answered.
    Inline,
}

impl Runner {
    fn for_node(node: &WorkerNode) -> Self {
        if node.attends_on_cpu() {
            Runner::ComputePool
        } else {
            Runner::Inline
        }
    }
}

/// Answers one request read at `read_at`, panics included (an error reply); an attend's
/// reply carries the worker's own time, and the connection's set of open sessions
/// follows opens and closes.
fn answer(
    node: &WorkerNode,
    opened: &Mutex<HashSet<u64>>,
    req: Request,
    read_at: Instant,
) -> Reply {
    if let Request::Close { session } = &req {
        opened.lock().expect("session set").remove(session);
    }
    let taken = Instant::now();
    let mut reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| node.handle(req)))
        .unwrap_or_else(|_| Reply::error(ErrorCode::Internal, "the worker panicked"));
    if let Reply::Partial { time, .. } = &mut reply {
        *time = WorkerTime {
            queued_us: WorkerTime::micros(taken - read_at),
            compute_us: WorkerTime::micros(taken.elapsed()),
        };
    }
    if let Reply::Opened { session, .. } = &reply {
        opened.lock().expect("session set").insert(*session);
    }
    reply
}

/// Compares secrets without an early exit on the first differing byte.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_past_the_limit_are_not_admitted_and_places_come_back() {
        let open = Arc::new(AtomicUsize::new(0));
        let admitted: Vec<Admitted> = (0..MAX_CONNECTIONS)
            .map(|_| Admitted::try_new(&open).expect("a place"))
            .collect();
        assert!(Admitted::try_new(&open).is_none());
        drop(admitted);
        assert_eq!(open.load(Ordering::Acquire), 0);
        assert!(Admitted::try_new(&open).is_some());
    }
}
