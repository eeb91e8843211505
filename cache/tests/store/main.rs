//! Integration tests of the cache crate, one binary (`cargo test -p starkv-cache`).
//! Every store-level test runs on both engines unless it tests RocksDB specifically.

mod concurrent;
mod crash;
mod disk_full;
mod eviction;
mod faults;
mod integrity;
mod metrics_emitted;
mod read_into;
mod roundtrip;
mod util;
