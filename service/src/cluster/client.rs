//! The coordinator's connection to a remote worker: one persistent TCP connection
//! (TCP_NODELAY), requests numbered and written as they come, replies matched by id on a
//! reader thread, so every layer's Q of every query is in flight at once.
//!
//! Blocking on purpose: the coordinator's callers (the forward pass, ingest threads)
//! are blocking threads, and a blocking socket costs them no hop through an async
//! runtime per layer. A broken connection fails every call waiting on it and is
//! re-established (with a fresh handshake) by the next call, so a worker that comes
//! back is used again.

use std::collections::HashMap;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::handle::{CallError, PendingReply, Worker};
use super::wire::{PROTOCOL_VERSION, Reply, Request, read_frame};

type Waiters = Mutex<HashMap<u64, SyncSender<Result<Reply, CallError>>>>;

/// A worker at `host:port`.
pub struct RemoteWorker {
    address: String,
    secret: Vec<u8>,
    model_fingerprint: Vec<u8>,
    connect_timeout: Duration,
    conn: Mutex<Option<Arc<Connection>>>,
    sent: AtomicU64,
    received: Arc<AtomicU64>,
    /// Handshakes completed (each a connection, perhaps to a restarted worker).
    connections: AtomicU64,
}

struct Connection {
    writer: Mutex<TcpStream>,
    waiters: Arc<Waiters>,
    next_id: AtomicU64,
    broken: Arc<AtomicBool>,
}

impl Connection {
    /// Marks the connection dead and fails every waiting call.
    fn fail(&self, why: &str) {
        self.broken.store(true, Ordering::SeqCst);
        if let Ok(w) = self.writer.lock() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        fail_all(&self.waiters, why);
    }
}

fn fail_all(waiters: &Waiters, why: &str) {
    let drained: Vec<_> = waiters
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain()
        .collect();
    for (_, tx) in drained {
        let _ = tx.try_send(Err(CallError::Unreachable(why.to_string())));
    }
}

impl RemoteWorker {
    /// `model_fingerprint`: the coordinator's; a worker running another model is refused.
    pub fn new(
        address: impl Into<String>,
        secret: &[u8],
        model_fingerprint: &[u8],
        connect_timeout: Duration,
    ) -> Self {
        Self {
            address: address.into(),
            secret: secret.to_vec(),
            model_fingerprint: model_fingerprint.to_vec(),
            connect_timeout,
            conn: Mutex::new(None),
            sent: AtomicU64::new(0),
            received: Arc::default(),
            connections: AtomicU64::new(0),
        }
    }

    fn connection(&self) -> Result<Arc<Connection>, CallError> {
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = slot.as_ref()
            && !c.broken.load(Ordering::SeqCst)
        {
            return Ok(c.clone());
        }
        *slot = None;
        let conn = Arc::new(self.connect()?);
        self.connections.fetch_add(1, Ordering::SeqCst);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    fn connect(&self) -> Result<Connection, CallError> {
        let unreachable =
            |e: std::io::Error| CallError::Unreachable(format!("{}: {e}", self.address));
        let addr = self
            .address
            .to_socket_addrs()
            .map_err(unreachable)?
            .next()
            .ok_or_else(|| CallError::Unreachable(format!("{}: no address", self.address)))?;
        let mut stream =
            TcpStream::connect_timeout(&addr, self.connect_timeout).map_err(unreachable)?;
        stream.set_nodelay(true).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(self.connect_timeout))
            .map_err(unreachable)?;
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
            secret: self.secret.clone(),
        };
        stream.write_all(&hello.frame(0)).map_err(unreachable)?;
        let body = read_frame(&mut stream).map_err(unreachable)?;
        match Reply::parse(&body).1 {
            Ok(Reply::Hello {
                version,
                model_fingerprint,
                ..
            }) => {
                if version != PROTOCOL_VERSION {
                    return Err(CallError::Protocol(format!(
                        "{} speaks protocol {version}, this coordinator {PROTOCOL_VERSION}",
                        self.address
                    )));
                }
                if model_fingerprint != self.model_fingerprint {
                    return Err(CallError::Refused {
                        code: super::wire::ErrorCode::BadRequest,
                        message: format!("{} runs another model file", self.address),
                    });
                }
            }
            Ok(Reply::Error { code, message }) => return Err(CallError::Refused { code, message }),
            Ok(other) => return Err(CallError::Protocol(format!("handshake answered {other:?}"))),
            Err(e) => return Err(CallError::Protocol(e.to_string())),
        }
        stream.set_read_timeout(None).map_err(unreachable)?;
        let mut reader = stream.try_clone().map_err(unreachable)?;
        let waiters: Arc<Waiters> = Arc::default();
        let broken = Arc::new(AtomicBool::new(false));
        let (w, b, received) = (waiters.clone(), broken.clone(), self.received.clone());
        let address = self.address.clone();
        std::thread::Builder::new()
            .name(format!("starkv-worker-{address}"))
            .spawn(move || {
                loop {
                    let body = match read_frame(&mut reader) {
                        Ok(body) => body,
                        Err(e) => {
                            b.store(true, Ordering::SeqCst);
                            fail_all(&w, &format!("{address}: {e}"));
                            return;
                        }
                    };
                    received.fetch_add(body.len() as u64 + 4, Ordering::Relaxed);
                    let (id, reply) = Reply::parse(&body);
                    let waiter = w.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
                    if let Some(tx) = waiter {
                        let _ = tx.try_send(reply.map_err(|e| CallError::Protocol(e.to_string())));
                    }
                }
            })
            .map_err(unreachable)?;
        Ok(Connection {
            writer: Mutex::new(stream),
            waiters,
            next_id: AtomicU64::new(1),
            broken,
        })
    }
}

impl Worker for RemoteWorker {
    fn address(&self) -> &str {
        &self.address
    }

    fn send(&self, req: Request) -> Result<PendingReply, CallError> {
        let conn = self.connection()?;
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(1);
        conn.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, tx);
        let frame = req.frame(id);
        let written = conn
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write_all(&frame);
        if let Err(e) = written {
            conn.fail(&format!("{}: {e}", self.address));
            return Err(CallError::Unreachable(format!("{}: {e}", self.address)));
        }
        self.sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
        // The reader may have failed every waiter just before this one was registered.
        if conn.broken.load(Ordering::SeqCst)
            && conn
                .waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id)
                .is_some()
        {
            return Err(CallError::Unreachable(format!(
                "{}: connection closed",
                self.address
            )));
        }
        Ok(PendingReply::new(move |timeout| {
            match rx.recv_timeout(timeout) {
                Ok(reply) => reply,
                Err(RecvTimeoutError::Timeout) => {
                    // A worker that does not answer in time is treated as failed: the
                    // connection is dropped so nothing else waits on it either.
                    conn.waiters
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&id);
                    conn.fail("timed out");
                    Err(CallError::Timeout(timeout))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    Err(CallError::Unreachable("connection closed".into()))
                }
            }
        }))
    }

    fn bytes(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}
