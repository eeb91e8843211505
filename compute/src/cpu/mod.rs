//! The CPU backend: always available, and the reference the GPU backend is checked against.

pub mod attention;
pub mod matmul;
pub mod ops;
pub mod qdot;
