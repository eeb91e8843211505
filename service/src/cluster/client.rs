//! The coordinator's connection to a remote worker: one persistent TCP connection
//! (TCP_NODELAY), requests numbered and written as they come, replies matched by id, so
//! every layer's Q of every query is in flight at once.
//!
//! Blocking on purpose: the coordinator's callers (the forward pass, ingest threads)
//! are blocking threads, and a blocking socket costs them no hop through an async
//! runtime per layer. There is no reader thread either: a caller waiting for its reply
//! reads the socket itself when no other caller is reading, handing on the replies it
//! reads for others, so a reply reaches its caller with one wake-up (the socket's)
//! instead of two (a reader thread's, then the caller's); that is one per layer, worker
//! and generated token. A broken connection fails every call waiting on it and is
//! re-established (with a fresh handshake) by the next call, so a worker that comes
//! back is used again.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::mem::MaybeUninit;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::handle::{CallError, PendingReply, Worker};
use super::spin::SpinBudget;
use super::wire::{PROTOCOL_VERSION, Reply, Request, read_frame};

type Delivered = Result<Reply, CallError>;

/// A worker at `host:port`.
pub struct RemoteWorker {
    address: String,
    secret: Vec<u8>,
    model_fingerprint: Vec<u8>,
    connect_timeout: Duration,
    spin: SpinBudget,
    conn: Mutex<Option<Arc<Connection>>>,
    sent: AtomicU64,
    received: Arc<AtomicU64>,
    /// Handshakes completed (each a connection, perhaps to a restarted worker).
    connections: AtomicU64,
}

struct Connection {
    address: String,
    spin: SpinBudget,
    writer: Mutex<TcpStream>,
    /// The read half, used by one waiting caller at a time ([`Inbox::reading`]).
    reader: Mutex<TcpStream>,
    inbox: Mutex<Inbox>,
    /// Signalled when a reply is handed on, the reading is given up, or the connection
    /// broke.
    changed: Condvar,
    next_id: AtomicU64,
    received: Arc<AtomicU64>,
}

/// What waiting callers share.
#[derive(Default)]
struct Inbox {
    /// Calls sent and still waited for.
    waiting: HashSet<u64>,
    /// Replies read by another caller, not yet collected.
    ready: HashMap<u64, Delivered>,
    /// A caller is reading the socket.
    reading: bool,
    /// Why the connection broke, once it has.
    broken: Option<String>,
}

/// How a caller's turn at reading the socket ended.
enum Read {
    Mine(Delivered),
    TimedOut,
    Broken,
}

impl Connection {
    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the connection dead and fails every waiting call.
    fn fail(&self, why: &str) {
        // The first reason stands (the shutdown below makes a reader fail too).
        self.inbox().broken.get_or_insert_with(|| why.to_string());
        self.changed.notify_all();
        if let Ok(w) = self.writer.lock() {
            // Also ends a read in progress on the other half.
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether the worker closed its end while nobody was reading (it stopped, or
    /// restarted): a peek that never blocks, so the next call reconnects at once.
    fn closed_by_peer(&self) -> bool {
        let Ok(reader) = self.reader.try_lock() else {
            return false; // a caller is reading: it sees the close itself
        };
        let mut byte = [MaybeUninit::<u8>::uninit(); 1];
        match socket2::SockRef::from(&*reader)
            .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }

    /// Registers call `id` before its request is written.
    fn expect(&self, id: u64) -> Result<(), CallError> {
        let mut inbox = self.inbox();
        if let Some(why) = &inbox.broken {
            return Err(CallError::Unreachable(why.clone()));
        }
        inbox.waiting.insert(id);
        Ok(())
    }

    /// Gives up call `id` (answered, failed or dropped): a late reply is discarded.
    fn forget(&self, id: u64) {
        let mut inbox = self.inbox();
        inbox.waiting.remove(&id);
        inbox.ready.remove(&id);
    }

    /// The reply to call `id`, read by this caller or handed on by another one. A call
    /// not answered within `timeout` fails the whole connection: a worker that does not
    /// answer in time is treated as failed, so nothing else waits on it either.
    fn wait(&self, id: u64, timeout: Duration) -> Delivered {
        let deadline = Instant::now() + timeout;
        let mut inbox = self.inbox();
        loop {
            if let Some(reply) = inbox.ready.remove(&id) {
                return reply;
            }
            if let Some(why) = &inbox.broken {
                return Err(CallError::Unreachable(why.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                drop(inbox);
                self.fail("timed out");
                return Err(CallError::Timeout(timeout));
            }
            if inbox.reading {
                inbox = self
                    .changed
                    .wait_timeout(inbox, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            inbox.reading = true;
            drop(inbox);
            let read = self.read_until(id, deadline);
            inbox = self.inbox();
            inbox.reading = false;
            // Another caller may take over the reading.
            self.changed.notify_all();
            match read {
                Read::Mine(reply) => return reply,
                Read::TimedOut => {
                    // A frame may have been cut short: the stream is out of step.
                    drop(inbox);
                    self.fail("timed out");
                    return Err(CallError::Timeout(timeout));
                }
                Read::Broken => {}
            }
        }
    }

    /// Reads frames until call `id`'s reply, handing on the others' replies.
    fn read_until(&self, id: u64, deadline: Instant) -> Read {
        let mut reader = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            // Poll first: the reply usually comes within the budget, and is then taken
            // without the scheduler's wake-up.
            self.spin.wait_readable(&reader, Some(deadline));
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Read::TimedOut;
            }
            if let Err(e) = reader.set_read_timeout(Some(left)) {
                self.fail(&format!("{}: {e}", self.address));
                return Read::Broken;
            }
            let body = match read_frame(&mut *reader) {
                Ok(body) => body,
                Err(e) if is_timeout(&e) => return Read::TimedOut,
                Err(e) => {
                    self.fail(&format!("{}: {e}", self.address));
                    return Read::Broken;
                }
            };
            self.received
                .fetch_add(body.len() as u64 + 4, Ordering::Relaxed);
            let (rid, reply) = Reply::parse(&body);
            let reply = reply.map_err(|e| CallError::Protocol(e.to_string()));
            if rid == id {
                return Read::Mine(reply);
            }
            let mut inbox = self.inbox();
            if inbox.waiting.contains(&rid) {
                inbox.ready.insert(rid, reply);
                self.changed.notify_all();
            }
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A call in flight; forgotten by its connection when dropped, waited on or not.
struct Call {
    conn: Arc<Connection>,
    id: u64,
}

impl Call {
    fn wait(&self, timeout: Duration) -> Delivered {
        self.conn.wait(self.id, timeout)
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.conn.forget(self.id);
    }
}

impl RemoteWorker {
    /// `model_fingerprint`: the coordinator's; a worker running another model is refused.
    /// A caller waiting for a reply polls the socket for `spin` before sleeping on it.
    pub fn new(
        address: impl Into<String>,
        secret: &[u8],
        model_fingerprint: &[u8],
        connect_timeout: Duration,
        spin: SpinBudget,
    ) -> Self {
        Self {
            address: address.into(),
            secret: secret.to_vec(),
            model_fingerprint: model_fingerprint.to_vec(),
            connect_timeout,
            spin,
            conn: Mutex::new(None),
            sent: AtomicU64::new(0),
            received: Arc::default(),
            connections: AtomicU64::new(0),
        }
    }

    fn connection(&self) -> Result<Arc<Connection>, CallError> {
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = slot.as_ref() {
            if c.inbox().broken.is_none() && !c.closed_by_peer() {
                return Ok(c.clone());
            }
            c.fail(&format!("{}: connection closed", self.address));
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
        let reader = stream.try_clone().map_err(unreachable)?;
        Ok(Connection {
            address: self.address.clone(),
            spin: self.spin,
            writer: Mutex::new(stream),
            reader: Mutex::new(reader),
            inbox: Mutex::default(),
            changed: Condvar::new(),
            next_id: AtomicU64::new(1),
            received: self.received.clone(),
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
        conn.expect(id)?;
        let call = Call { conn, id };
        let frame = req.frame(id);
        let written = call
            .conn
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write_all(&frame);
        if let Err(e) = written {
            call.conn.fail(&format!("{}: {e}", self.address));
            return Err(CallError::Unreachable(format!("{}: {e}", self.address)));
        }
        self.sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
        Ok(PendingReply::new(move |timeout| call.wait(timeout)))
    }

    /// Another process does the work, and the waiting caller reads its own reply.
    fn waits_off_pool(&self) -> bool {
        true
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

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::cluster::wire::ErrorCode;

    const FINGERPRINT: &[u8] = b"model";

    /// Accepts one connection and answers its handshake.
    fn accept(listener: &TcpListener) -> TcpStream {
        let (mut stream, _) = listener.accept().expect("accept");
        let (id, hello) = Request::parse(&read_frame(&mut stream).expect("hello"));
        assert!(matches!(hello, Ok(Request::Hello { .. })));
        let reply = Reply::Hello {
            version: PROTOCOL_VERSION,
            device: "cpu".into(),
            model_fingerprint: FINGERPRINT.to_vec(),
        };
        stream.write_all(&reply.frame(id)).expect("hello reply");
        stream
    }

    /// Answers a `Drop` request with an error naming its document, so a caller can tell
    /// whose reply it got.
    fn answer(stream: &mut TcpStream, id: u64, req: Request) {
        let Request::Drop { doc } = req else {
            panic!("unexpected {req:?}")
        };
        stream
            .write_all(&Reply::error(ErrorCode::NotFound, doc).frame(id))
            .expect("reply");
    }

    fn call(worker: &RemoteWorker, doc: &str) -> Result<Reply, CallError> {
        worker
            .send(Request::Drop { doc: doc.into() })?
            .wait(Duration::from_secs(20))
    }

    fn refused_with(result: Result<Reply, CallError>) -> String {
        match result {
            Err(CallError::Refused { message, .. }) => message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn concurrent_calls_answered_out_of_order_each_get_their_own_reply() {
        // Sleeping readers, and readers that poll their socket first.
        for spin in [SpinBudget::OFF, SpinBudget::from_micros(3_000)] {
            concurrent_calls_with(spin);
        }
    }

    fn concurrent_calls_with(spin: SpinBudget) {
        const CALLS: usize = 8;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let server = std::thread::spawn(move || {
            let mut stream = accept(&listener);
            // Every request is read before any is answered, then answered last first:
            // each reply but the last is read by a caller other than its own.
            let requests: Vec<(u64, Request)> = (0..CALLS)
                .map(|_| {
                    let (id, req) = Request::parse(&read_frame(&mut stream).expect("request"));
                    (id, req.expect("parses"))
                })
                .collect();
            for (id, req) in requests.into_iter().rev() {
                answer(&mut stream, id, req);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let worker = RemoteWorker::new(
            &address,
            b"secret",
            FINGERPRINT,
            Duration::from_secs(5),
            spin,
        );
        std::thread::scope(|s| {
            for i in 0..CALLS {
                let worker = &worker;
                s.spawn(move || {
                    let doc = format!("doc-{i}");
                    assert_eq!(refused_with(call(worker, &doc)), doc);
                });
            }
        });
        server.join().expect("server");
        assert_eq!(worker.connections(), 1);
        let conn = worker
            .conn
            .lock()
            .expect("slot")
            .clone()
            .expect("connected");
        let inbox = conn.inbox();
        assert!(inbox.waiting.is_empty() && inbox.ready.is_empty());
    }

    #[test]
    fn a_connection_the_worker_closed_is_replaced_before_the_next_call() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let (closed_tx, closed_rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let mut stream = accept(&listener);
                let (id, req) = Request::parse(&read_frame(&mut stream).expect("request"));
                answer(&mut stream, id, req.expect("parses"));
                drop(stream); // a worker that stops after answering
                closed_tx.send(()).expect("signal");
            }
        });
        let worker = RemoteWorker::new(
            &address,
            b"secret",
            FINGERPRINT,
            Duration::from_secs(5),
            SpinBudget::OFF,
        );
        assert_eq!(refused_with(call(&worker, "first")), "first");
        closed_rx.recv().expect("closed");
        // Nobody was reading when the worker closed: the next call sees it anyway and
        // reconnects instead of failing on the dead connection.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !worker
            .conn
            .lock()
            .expect("slot")
            .as_ref()
            .is_some_and(|c| c.closed_by_peer())
        {
            assert!(Instant::now() < deadline, "the close never arrived");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(refused_with(call(&worker, "second")), "second");
        assert_eq!(worker.connections(), 2);
        server.join().expect("server");
    }

    #[test]
    fn a_call_not_answered_in_time_fails_the_connection_and_every_waiter() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let server = std::thread::spawn(move || {
            let mut stream = accept(&listener);
            // Reads both requests, answers none, and waits for the coordinator to hang up.
            for _ in 0..2 {
                read_frame(&mut stream).expect("request");
            }
            assert!(read_frame(&mut stream).is_err());
        });
        let worker = RemoteWorker::new(
            &address,
            b"secret",
            FINGERPRINT,
            Duration::from_secs(5),
            SpinBudget::OFF,
        );
        let slow = worker
            .send(Request::Drop { doc: "a".into() })
            .expect("sent");
        let patient = worker
            .send(Request::Drop { doc: "b".into() })
            .expect("sent");
        let waiter = std::thread::spawn(move || patient.wait(Duration::from_secs(60)));
        assert!(matches!(
            slow.wait(Duration::from_millis(200)),
            Err(CallError::Timeout(_))
        ));
        assert!(matches!(
            waiter.join().expect("waiter"),
            Err(CallError::Unreachable(_))
        ));
        server.join().expect("server");
    }
}
