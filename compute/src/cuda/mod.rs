//! The CUDA backend (cudarc 0.19, loaded at run time: nothing CUDA is needed to build).
//!
//! - [`probe`] finds the driver and the GPUs without ever panicking: on a machine with no
//!   NVIDIA driver it returns [`CudaError::Unavailable`].
//! - [`Gpu`] is one device (`device.rs`): a compute stream, a copy stream, cuBLAS and
//!   buffers. The kernels (`kernels/common.cuh` shared by `kernels/elementwise.cu` and
//!   `kernels/attention.cu`) are compiled with NVRTC for the device's architecture at
//!   first use (`kernels.rs`); element-wise launches go through one helper (`launch.rs`),
//!   attention planning and launch live in `attention.rs` ([`SegmentAttention`]); the
//!   one-row products of decode steps, with their norm, RoPE, SwiGLU and residual adds
//!   folded in, in `gemv.rs` (`kernels/gemv.cu`).
//! - [`CudaLlama`] holds a model's weights in f16 or bf16 (dequantised from any GGUF type
//!   on upload, or random on the device) and runs the forward pass: cuBLAS for every
//!   matrix product of several rows (f32 accumulation), own kernels for embedding,
//!   RMSNorm, RoPE, SwiGLU, attention, greedy sampling and one-row (decode) products.
//! - Attention is one tiled flash-style kernel on the tensor cores (mma.sync m16n8k16,
//!   online softmax, natural-log lse) over a table of key segments, each unmasked or
//!   causal with an offset. Phase 1 ([`star::encode_block`]) runs `[anchor | block]` with
//!   the anchor as a read-only prefix segment; phase 2 ([`star::GpuQuery`]) runs the new
//!   tokens over every cached block without a mask plus their own causal part, split over
//!   key chunks and merged by log-sum-exp exactly like Star's CPU merge.
//! - [`star::GpuShard`] implements [`crate::star::AttentionShard`], so each GPU of a host
//!   can hold its own shard of blocks behind the same seam as a CPU thread.
//! - [`star::BlockTier`] keeps hot documents' blocks resident (byte budget, LRU);
//!   [`star::StreamedBlocks`] loads blocks through pinned buffers on the copy stream, one
//!   layer ahead of the computation.

mod attention;
mod block;
pub mod cold;
mod device;
mod gemv;
mod kernels;
mod launch;
mod model;
mod phase1;
mod phase2;
pub mod reencode;
mod shard;
pub mod star;
mod tempered;
mod tier;
mod tma;

#[cfg(test)]
mod tests;

pub use attention::{
    AttnItem, AttnKernels, AttnOut, AttnPlan, AttnScratch, DecodeKernel, Kv8Tile, KvDest,
    LongKernel, PlanPtrs, Segment, SegmentAttention, upload_plans, upload_plans_with_maps,
};
pub use device::{DevBuf, Gpu, HalfType, PinnedBuf, SplitTuning, TableBuf};
pub use gemv::gemv_fits;
pub use kernels::{ATTENTION_SOURCE, COMMON_SOURCE, ELEMENTWISE_SOURCE, GEMV_SOURCE, Kernels};
pub use launch::argmax_scratch_bytes;
pub use model::{CudaLlama, GpuAttention, GpuKvCache};

use std::fmt;
use std::str::FromStr;

/// Errors of the CUDA backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// No usable driver, library or device; the message says which.
    #[error("CUDA unavailable: {0}")]
    Unavailable(String),
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Compute(#[from] crate::Error),
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;

/// For callers outside the CUDA backend (the [`crate::backend`]): compute errors come back
/// as they were, everything else is a device error.
impl From<CudaError> for crate::Error {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Compute(inner) => inner,
            other => crate::Error::Device(other.to_string()),
        }
    }
}

/// A CUDA device as the driver reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub multiprocessors: usize,
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cuda:{} {} (sm_{}{}, {} SMs, {:.1} GiB)",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.multiprocessors,
            self.total_memory as f64 / (1u64 << 30) as f64
        )
    }
}

/// Lists the CUDA devices. Never panics: without a loadable driver, or when the driver
/// fails to initialise, the error says why.
pub fn probe() -> Result<Vec<DeviceInfo>> {
    std::panic::catch_unwind(probe_inner).unwrap_or_else(|_| {
        Err(CudaError::Unavailable(
            "the CUDA driver library loaded but a call into it failed".into(),
        ))
    })
}

fn probe_inner() -> Result<Vec<DeviceInfo>> {
    use cudarc::driver::{result, sys};
    // SAFETY: only tries to dlopen the library.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "no NVIDIA driver library (libcuda.so) could be loaded".into(),
        ));
    }
    result::init().map_err(|e| CudaError::Unavailable(format!("cuInit failed: {e}")))?;
    let count = result::device::get_count()?;
    let mut out = Vec::new();
    for ordinal in 0..count {
        let dev = result::device::get(ordinal)?;
        let attr = |a| unsafe { result::device::get_attribute(dev, a) };
        use sys::CUdevice_attribute as A;
        out.push(DeviceInfo {
            ordinal: ordinal as usize,
            name: result::device::get_name(dev)?,
            compute_capability: (
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ),
            // SAFETY: `dev` came from device::get.
            total_memory: unsafe { result::device::total_mem(dev)? },
            multiprocessors: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize,
        });
    }
    if out.is_empty() {
        return Err(CudaError::Unavailable(
            "the NVIDIA driver loaded but reports no device".into(),
        ));
    }
    Ok(out)
}

/// Checks that NVRTC and cuBLAS can be loaded (the driver alone is not enough).
pub fn check_libraries() -> Result<()> {
    // SAFETY: only try to dlopen the libraries.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "NVRTC (libnvrtc.so, CUDA 13) could not be loaded; install the CUDA 13 runtime libraries or set LD_LIBRARY_PATH".into(),
        ));
    }
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "cuBLAS (libcublas.so.13) could not be loaded; install the CUDA 13 runtime libraries or set LD_LIBRARY_PATH".into(),
        ));
    }
    Ok(())
}

/// `--device auto|cpu|cuda|cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(Self::Cuda)
                    .map_err(|_| format!("`{s}`: expected cuda:N with N a device number")),
                None => Err(format!("`{s}`: expected auto, cpu, cuda or cuda:N")),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The backend a [`DeviceChoice`] resolved to, with a sentence saying why.
#[derive(Debug, Clone, PartialEq)]
pub enum Selected {
    Cpu { reason: String },
    Cuda { device: DeviceInfo },
}

impl fmt::Display for Selected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu { reason } => write!(f, "cpu ({reason})"),
            Self::Cuda { device } => write!(f, "{device}"),
        }
    }
}

/// Resolves `--device`: `auto` picks GPU 0 when the driver, NVRTC and cuBLAS load and a
/// device of compute capability >= 8.0 exists, else the CPU (never an error); `cuda:N`
/// is an error when that GPU cannot be used; `cpu` is always the CPU.
pub fn select_device(choice: DeviceChoice) -> Result<Selected> {
    let usable = |n: usize| -> Result<DeviceInfo> {
        let devices = probe()?;
        let device = devices.get(n).cloned().ok_or_else(|| {
            CudaError::Unavailable(format!(
                "no CUDA device {n} ({} found: {})",
                devices.len(),
                devices
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        check_libraries()?;
        if device.compute_capability.0 < 8 {
            return Err(CudaError::Unavailable(format!(
                "{device}: compute capability 8.0 or newer is needed"
            )));
        }
        Ok(device)
    };
    match choice {
        DeviceChoice::Cpu => Ok(Selected::Cpu {
            reason: "--device cpu".into(),
        }),
        DeviceChoice::Cuda(n) => Ok(Selected::Cuda { device: usable(n)? }),
        DeviceChoice::Auto => Ok(match usable(0) {
            Ok(device) => Selected::Cuda { device },
            Err(e) => Selected::Cpu {
                reason: format!("auto: {e}"),
            },
        }),
    }
}
