//! How the coordinator talks to a worker, wherever it runs: a [`Worker`] takes a
//! request and returns a [`PendingReply`]. The remote implementation
//! ([`super::client::RemoteWorker`]) sends a frame at once and waits for the answer;
//! the in-process one ([`InProcessWorker`]) answers when waited on. The coordinator's
//! code is the same for both.

use std::sync::{Arc, mpsc};
use std::time::Duration;

use starkv_compute::star::AttentionShard;

use super::wire::{ErrorCode, Reply, Request};
use super::worker::WorkerNode;

/// Why a call to a worker produced no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// No connection (refused, reset, closed).
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The worker answered with an error.
    #[error("refused ({code:?}): {message}")]
    Refused { code: ErrorCode, message: String },
    /// The worker answered something that is not the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl CallError {
    /// The worker is alive and answered, but lacks the data (it can be told to encode).
    pub fn is_missing_data(&self) -> bool {
        matches!(
            self,
            CallError::Refused {
                code: ErrorCode::NotFound,
                ..
            }
        )
    }
}

/// A reply on its way.
pub struct PendingReply(Box<dyn FnOnce(Duration) -> Result<Reply, CallError> + Send>);

impl PendingReply {
    pub fn new(wait: impl FnOnce(Duration) -> Result<Reply, CallError> + Send + 'static) -> Self {
        Self(Box::new(wait))
    }

    /// The reply, an error reply turned into [`CallError::Refused`].
    pub fn wait(self, timeout: Duration) -> Result<Reply, CallError> {
        match (self.0)(timeout)? {
            Reply::Error { code, message } => Err(CallError::Refused { code, message }),
            reply => Ok(reply),
        }
    }
}

/// A shard worker as the coordinator sees it.
pub trait Worker: Send + Sync {
    /// How operators name it (`host:port`, or `local:N`).
    fn address(&self) -> &str;

    /// Sends `req`; wait on the result for the reply.
    fn send(&self, req: Request) -> Result<PendingReply, CallError>;

    /// Bytes sent to and received from this worker so far.
    fn bytes(&self) -> (u64, u64) {
        (0, 0)
    }

    /// Connections established so far: a new one may reach a worker that restarted
    /// (and missed drops meanwhile). An in-process worker never reconnects.
    fn connections(&self) -> u64 {
        0
    }

    /// Whether a thread of this process's compute pool may wait for this worker's
    /// replies: the worker's work runs in another process and the waiting thread reads the
    /// reply itself, so no work queued on this process's pool or threads stands between
    /// the wait and its answer (see [`AttentionShard::computes_here`]). An in-process
    /// worker's encodes and GPU attends run on threads of this process: not such a worker.
    fn waits_off_pool(&self) -> bool {
        false
    }

    /// The shard of an open session when the worker runs in this process (for the
    /// same-device channel; see [`AttentionShard::local_gpu`]).
    fn local_shard(&self, _session: u64) -> Option<Arc<dyn AttentionShard>> {
        None
    }
}

/// A worker in this process (one per local device when no remote workers are
/// configured): the same requests and replies, no socket.
///
/// Work starts when a request is sent, as with a remote worker, so the workers of a
/// host run in parallel: a GPU worker's per-layer attends go to its own thread (short,
/// and serialised on its device anyway; no thread start per layer), encodes and session
/// opens to a thread each (long; a running encode never holds up a query's layers). A
/// CPU worker's attends are the exception: they run when waited on, on the waiting
/// thread, since every CPU worker of the process shares one compute pool anyway.
pub struct InProcessWorker {
    address: String,
    node: Arc<WorkerNode>,
    attends: mpsc::Sender<(Request, mpsc::SyncSender<Reply>)>,
}

impl InProcessWorker {
    pub fn new(address: impl Into<String>, node: Arc<WorkerNode>) -> Self {
        let address = address.into();
        let (tx, rx) = mpsc::channel::<(Request, mpsc::SyncSender<Reply>)>();
        let attend_node = node.clone();
        // Ends when the worker (its sender) is dropped.
        let spawned = std::thread::Builder::new()
            .name(format!("starkv-{address}"))
            .spawn(move || {
                for (req, reply) in rx {
                    let _ = reply.send(attend_node.handle(req));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(worker = address, error = %e, "no attend thread: attends will fail");
        }
        Self {
            address,
            node,
            attends: tx,
        }
    }

    /// Runs `req` on a new thread; the reply arrives through the returned receiver.
    fn spawn(&self, req: Request) -> Result<mpsc::Receiver<Reply>, CallError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let node = self.node.clone();
        std::thread::Builder::new()
            .name(format!("starkv-{}-job", self.address))
            .spawn(move || {
                let _ = tx.send(node.handle(req));
            })
            .map_err(|e| CallError::Unreachable(format!("starting a worker thread: {e}")))?;
        Ok(rx)
    }
}

/// Waits for a reply from an in-process worker's thread.
fn reply_from(rx: mpsc::Receiver<Reply>) -> PendingReply {
    PendingReply::new(move |timeout| match rx.recv_timeout(timeout) {
        Ok(reply) => Ok(reply),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(CallError::Timeout(timeout)),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(CallError::Unreachable(
            "the worker thread stopped without answering".into(),
        )),
    })
}

impl Worker for InProcessWorker {
    fn address(&self) -> &str {
        &self.address
    }

    fn local_shard(&self, session: u64) -> Option<Arc<dyn AttentionShard>> {
        self.node.session_shard(session)
    }

    fn send(&self, req: Request) -> Result<PendingReply, CallError> {
        match req {
            // Callers may not wait for these, and they are quick: answer now.
            Request::Close { .. } | Request::Drop { .. } | Request::Stats => {
                let reply = self.node.handle(req);
                Ok(PendingReply::new(move |_| Ok(reply)))
            }
            // A CPU worker shares this process's compute pool: its attend runs on the
            // waiting thread (the query's), like a single node's blocks, with no hand-off
            // to the attend thread and back (two wake-ups per layer).
            Request::Attend { .. } if self.node.attends_on_cpu() => {
                let node = self.node.clone();
                Ok(PendingReply::new(move |_| Ok(node.handle(req))))
            }
            Request::Attend { .. } => {
                let (tx, rx) = mpsc::sync_channel(1);
                self.attends
                    .send((req, tx))
                    .map_err(|_| CallError::Unreachable("the attend thread stopped".into()))?;
                Ok(reply_from(rx))
            }
            _ => Ok(reply_from(self.spawn(req)?)),
        }
    }
}
