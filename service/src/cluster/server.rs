//! The worker's listener: one task per coordinator connection; attends answered on the
//! compute pool (CPU) or the reader's thread (GPU), everything else on blocking threads
//! (model, store); replies written in completion order.
//!
//! A connection must open with [`Request::Hello`] carrying [`PROTOCOL_VERSION`] and the
//! cluster's shared secret; otherwise it gets one error reply and is closed. A frame
//! that does not parse gets an error reply (the connection stays usable: the length
//! prefix kept it in step); a length prefix out of bounds closes the connection, since
//! nothing after it can be trusted. Sessions a connection opened are closed with it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::wire::{ErrorCode, PROTOCOL_VERSION, Reply, Request, WorkerTime, read_frame_async};
use super::worker::WorkerNode;

/// Serves `node` on `listener` until the task is dropped.
pub async fn serve_worker(listener: TcpListener, node: Arc<WorkerNode>, secret: Arc<Vec<u8>>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "worker: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (node, secret) = (node.clone(), secret.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, node, secret).await {
                tracing::info!(%peer, error = %e, "worker: connection ended");
            }
        });
    }
}

async fn connection(
    stream: TcpStream,
    node: Arc<WorkerNode>,
    secret: Arc<Vec<u8>>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.into_split();
    // Handshake: the first frame, checked before anything else is read.
    let body = read_frame_async(&mut reader).await?;
    let (id, hello) = Request::parse(&body);
    let refusal = match hello {
        Ok(Request::Hello { version, .. }) if version != PROTOCOL_VERSION => Some(Reply::error(
            ErrorCode::Version,
            format!("protocol version {version}; this worker speaks {PROTOCOL_VERSION}"),
        )),
        Ok(Request::Hello { secret: given, .. }) if !same_secret(&given, &secret) => Some(
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
        writer.write_all(&refusal.frame(id)).await?;
        return Ok(());
    }
    writer.write_all(&node.hello().frame(id)).await?;

    // A reply is written by the thread that computed it (no hand-off to a writer task
    // per reply, which cost a wake-up per layer and worker), whole frames at a time under
    // the lock, in completion order.
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let runtime = tokio::runtime::Handle::current();
    let opened: Arc<Mutex<HashSet<u64>>> = Arc::default();
    // Every job holds a clone; `recv` returns `None` once the last one has finished.
    let (in_flight, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    let runner = Runner::for_node(&node, &runtime);
    let result = loop {
        let body = match read_frame_async(&mut reader).await {
            Ok(b) => b,
            Err(e) => break Err(e),
        };
        let read_at = Instant::now();
        let (id, parsed) = Request::parse(&body);
        let req = match parsed {
            Ok(r) => r,
            Err(e) => {
                let frame = Reply::error(ErrorCode::BadRequest, e.to_string()).frame(id);
                let _ = writer.lock().await.write_all(&frame).await;
                continue;
            }
        };
        let attend_runner = matches!(req, Request::Attend { .. }).then_some(runner);
        let answer = {
            let (node, opened) = (node.clone(), opened.clone());
            move || answer(&node, &opened, req, read_at).frame(id)
        };
        if let Some(Runner::Inline) = attend_runner {
            let frame = tokio::task::block_in_place(answer);
            // A failed write means the connection is gone: the next read ends the loop.
            let _ = writer.lock().await.write_all(&frame).await;
            continue;
        }
        let job = {
            let (writer, runtime, done) = (writer.clone(), runtime.clone(), in_flight.clone());
            move || {
                let frame = answer();
                let _ = runtime.block_on(async { writer.lock().await.write_all(&frame).await });
                drop(done);
            }
        };
        if let Some(Runner::ComputePool) = attend_runner {
            rayon::spawn(job);
        } else {
            runtime.spawn_blocking(job);
        }
    };
    // Every request read has been answered (or its write failed) before the sessions
    // this connection opened are closed: an open still running would otherwise leave one.
    drop(in_flight);
    let _ = all_done.recv().await;
    let sessions: Vec<u64> = opened.lock().expect("session set").drain().collect();
    for session in sessions {
        node.handle(Request::Close { session });
    }
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
        other => other,
    }
}

/// Where a connection's attends run. An attend is the hot path (one per layer, worker
/// and generated token, ~30 per token), and every hand-off between threads costs a
/// wake-up (tens of µs on an idle core of a virtual machine), so attends skip the
/// blocking pool that every other (long) request goes to.
#[derive(Debug, Clone, Copy)]
enum Runner {
    /// A CPU worker: straight onto the compute pool, whose thread attends (its parallel
    /// loop runs inside the pool, no second entry) and writes the reply itself. Attends
    /// of concurrent queries run side by side, as before.
    ComputePool,
    /// A GPU worker: on the reader's own thread. One device runs a connection's attends
    /// one after the other anyway; the next frame is read when this one is answered.
    Inline,
    /// No multi-threaded runtime to lend the reader's thread: the blocking pool.
    Blocking,
}

impl Runner {
    fn for_node(node: &WorkerNode, runtime: &tokio::runtime::Handle) -> Self {
        if node.attends_on_cpu() {
            Runner::ComputePool
        } else if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            Runner::Inline
        } else {
            Runner::Blocking
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
