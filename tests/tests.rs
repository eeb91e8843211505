//! The one integration-test binary (one link step on 2-core CI machines).
//!
//! Model tests run the real default model, fetched once into the target directory.

mod bench_stats;
mod cli;
mod cluster;
mod hardening;
mod model_vectors;
mod readme;
mod schemathesis;
mod service;
mod shell;
mod store_faults;
mod util;
