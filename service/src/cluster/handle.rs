//! How the coordinator talks to a worker, wherever it runs: a [`Worker`] takes a
//! request and returns a [`PendingReply`]. The remote implementation
//! ([`super::client::RemoteWorker`]) sends a frame at once and waits for the answer;
//! the in-process one ([`InProcessWorker`]) answers when waited on. The coordinator's
//! code is the same for both.

use std::sync::Arc;
use std::time::Duration;

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
}

/// A worker in this process (one per local device when no remote workers are
/// configured): the same requests and replies, no socket.
pub struct InProcessWorker {
    address: String,
    node: Arc<WorkerNode>,
}

impl InProcessWorker {
    pub fn new(address: impl Into<String>, node: Arc<WorkerNode>) -> Self {
        Self {
            address: address.into(),
            node,
        }
    }
}

impl Worker for InProcessWorker {
    fn address(&self) -> &str {
        &self.address
    }

    fn send(&self, req: Request) -> Result<PendingReply, CallError> {
        if matches!(req, Request::Close { .. } | Request::Drop { .. }) {
            // Callers may not wait for these: answer now.
            let reply = self.node.handle(req);
            return Ok(PendingReply::new(move |_| Ok(reply)));
        }
        let node = self.node.clone();
        // Answered when waited on: the caller starts every worker first, then waits, so
        // in-process workers compute in parallel (on the waiting threads).
        Ok(PendingReply::new(move |_| Ok(node.handle(req))))
    }
}
