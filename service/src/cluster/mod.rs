//! A document spread over many devices and hosts: the query goes to the data
//! (DESIGN.md §6).
//!
//! - [`worker`]: a shard worker (`starkv worker`): encodes the blocks it is given into
//!   its own store and answers per-layer partial attention over them.
//! - [`server`]: the worker's TCP listener; [`client`]: the coordinator's persistent
//!   connection to it; [`wire`]: the binary frames between them.
//! - [`spin`]: polling a socket before sleeping on it (both ends' per-layer waits);
//!   `handoff`: a CPU worker's attends passed to a pool thread still polling for them.
//! - [`handle`]: the [`Worker`] trait the coordinator calls, remote or in-process.
//! - [`lifecycle`]: pin, TTL, eviction and expiry of cluster documents.
//! - [`local`]: one in-process worker per local device (a multi-GPU host, no remote
//!   workers).
//! - [`stale`]: dropping the parts a worker kept while the catalog moved on (it was down).
//! - [`verify`]: the operator's verify (and repair) on every worker.
//! - [`placement`]: rendezvous hashing of block keys over the workers.
//! - [`catalog`]: the coordinator's documents and where each block lives.
//! - [`coordinator`]: distributed phase 1 (blocks first, catalog entry last) and phase 2
//!   (each layer's Q to every worker at once, exact merge here), and fault recovery.

pub mod catalog;
pub mod client;
pub mod coordinator;
pub mod handle;
mod handoff;
pub mod lifecycle;
pub mod local;
pub mod placement;
pub mod server;
pub mod spin;
pub mod stale;
pub mod verify;
pub mod wire;
pub mod worker;

pub use catalog::{BlockEntry, DocEntry};
pub use coordinator::{AttendTimes, Cluster, ClusterConfig, WorkerHealth, WorkerStatus};
pub use handle::{CallError, InProcessWorker, PendingReply, Worker};
pub use local::{LocalWorkersConfig, local_devices, local_worker_dir, open_local_workers};
pub use spin::SpinBudget;
pub use verify::WorkerVerify;
pub use worker::{WorkerConfig, WorkerNode};
