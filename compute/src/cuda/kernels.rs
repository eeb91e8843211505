//! The kernel sources and their run-time compilation: NVRTC compiles `elementwise.cu`,
//! `attention.cu` and `gemv.cu` (each after the shared `common.cuh`; the attention sources
//! after `attn_common.cuh` too) for the device's architecture, the 16-bit type and the
//! head dimension, once per head dimension; on a Hopper GPU, on the first launch of a
//! Hopper attention kernel, also `attention_sm90.cu` (head_dim 128) for `compute_90a`
//! (wgmma, setmaxnreg: code for 9.0 devices only; compiled apart, and only when used, so
//! that processes that never run it never pay its compile).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, sys as drv_sys};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

use super::attention::{kv8_smem, pipe_smem, sm90_smem, swap_smem};
use super::device::{Gpu, HalfType};
use super::gemv::GEMV_SMEM_MAX;
use super::{CudaError, Result};

/// What every kernel source shares: types, 16-bit conversions, reductions.
pub const COMMON_SOURCE: &str = include_str!("kernels/common.cuh");
/// Embedding, RMSNorm, RoPE, SwiGLU, conversions, fills, argmax, layout changes.
pub const ELEMENTWISE_SOURCE: &str = include_str!("kernels/elementwise.cu");
/// What the attention sources share: the key items, their walk, the output rows.
pub const ATTN_COMMON_SOURCE: &str = include_str!("kernels/attn_common.cuh");
/// The attention kernels and the split merge.
pub const ATTENTION_SOURCE: &str = include_str!("kernels/attention.cu");
/// The Hopper (sm_90a) long-run attention kernel, `attn_fwd_sm90`.
pub const ATTENTION_SM90_SOURCE: &str = include_str!("kernels/attention_sm90.cu");

/// One-row matrix products of decode steps, with their fused norm, RoPE, SwiGLU and
/// residual epilogues.
pub const GEMV_SOURCE: &str = include_str!("kernels/gemv.cu");

/// Kernels defined in `elementwise.cu`.
pub(crate) const ELEMENTWISE_KERNELS: &[&str] = &[
    "embed_rows",
    "rms_norm_h",
    "rms_norm_f",
    "rope_table",
    "rope_split",
    "swiglu_h",
    "to_h16",
    "to_f32",
    "fill_uniform_h",
    "fill_uniform_f",
    "argmax_rows",
    "argmax_wide",
    "rows_to_heads",
    "quantize_rows",
];

/// Kernels defined in `attention.cu`.
pub(crate) const ATTENTION_KERNELS: &[&str] = &[
    "attn_fwd_simple",
    "attn_fwd_w1",
    "attn_fwd_w1_qsmem",
    "attn_fwd_m32",
    "attn_fwd_m32n32",
    "attn_fwd_p1n32",
    "attn_fwd_simple_kv8",
    "attn_fwd_w1_kv8",
    "attn_fwd_simple_kv8_n64",
    "attn_fwd_w1_kv8_n64",
    "attn_fwd_swap",
    "attn_fwd_w1_fm",
    "attn_fwd_w1_kv8_fm",
    "attn_fwd_w1_kv8_n64_fm",
    "attn_merge",
];

/// Kernels defined in `gemv.cu`.
pub(crate) const GEMV_KERNELS: &[&str] = &["gemv_qkv_rope", "gemv_swiglu", "gemv_rows"];

/// The sources NVRTC compiles, by file name, with the shared text each follows (after
/// `common.cuh`) and the kernels each defines.
pub(crate) const SOURCES: [(&str, &str, &str, &[&str]); 3] = [
    (
        "elementwise.cu",
        "",
        ELEMENTWISE_SOURCE,
        ELEMENTWISE_KERNELS,
    ),
    (
        "attention.cu",
        ATTN_COMMON_SOURCE,
        ATTENTION_SOURCE,
        ATTENTION_KERNELS,
    ),
    ("gemv.cu", "", GEMV_SOURCE, GEMV_KERNELS),
];

/// The configurations of `attention_sm90.cu` (all with two K/V stages), each compiled
/// apart on its first use: its `S9_ONLY` number, its cp.async and TMA kernels, and its
/// keys per tile.
pub(crate) const SM90_CONFIGS: [(u32, &str, &str, usize); 3] = [
    (1, "attn_fwd_sm90_v2", "attn_fwd_sm90_v2_tma", 128),
    (2, "attn_fwd_sm90_pp", "attn_fwd_sm90_pp_tma", 128),
    (3, "attn_fwd_sm90_pp176", "attn_fwd_sm90_pp176_tma", 176),
];

/// The kernels of one (16-bit type, head dimension) pair.
pub struct Kernels {
    pub head_dim: usize,
    funcs: HashMap<&'static str, CudaFunction>,
    /// How many `attn_fwd_swap` CTAs (one warp, its shared-memory ring) an SM holds at
    /// once (the driver's occupancy calculator; 0 when it gave no answer): the split
    /// count of its decodes fills one wave of them ([`Gpu::choose_splits_for`]).
    pub swap_ctas_per_sm: usize,
}

impl Kernels {
    pub fn get(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }
}

impl Gpu {
    /// The kernels for attention heads of `head_dim` (compiled on first use).
    pub fn kernels(&self, head_dim: usize) -> Result<Arc<Kernels>> {
        if !head_dim.is_multiple_of(16) || head_dim > 256 || head_dim == 0 {
            return Err(CudaError::Invalid(format!(
                "head_dim {head_dim}: the CUDA attention kernel needs a multiple of 16 up to 256"
            )));
        }
        let mut cache = self.kernels.lock().unwrap();
        if let Some(k) = cache.get(&head_dim) {
            return Ok(k.clone());
        }
        let options = self.compile_options(head_dim);
        let mut funcs = HashMap::new();
        for (file, shared, source, names) in SOURCES {
            self.compile_into(&mut funcs, file, shared, source, names, self.arch, &options)?;
        }
        // The pipelined kernels take more than the default 48 KB of shared memory.
        let most = pipe_smem(4 * 64 + 128, head_dim);
        for name in ["attn_fwd_m32", "attn_fwd_m32n32", "attn_fwd_p1n32"] {
            funcs[name].set_attribute(
                drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                most as i32,
            )?;
        }
        // The one-row products stage their input vector in dynamic shared memory.
        for &name in GEMV_KERNELS {
            funcs[name].set_attribute(
                drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                GEMV_SMEM_MAX as i32,
            )?;
        }
        for (name, tile) in [
            ("attn_fwd_simple_kv8", 32),
            ("attn_fwd_w1_kv8", 32),
            ("attn_fwd_simple_kv8_n64", 64),
            ("attn_fwd_w1_kv8_n64", 64),
            ("attn_fwd_w1_kv8_fm", 32),
            ("attn_fwd_w1_kv8_n64_fm", 64),
        ] {
            funcs[name].set_attribute(
                drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                kv8_smem(tile, head_dim) as i32,
            )?;
        }
        funcs["attn_fwd_swap"].set_attribute(
            drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            swap_smem(head_dim) as i32,
        )?;
        let swap_ctas_per_sm = funcs["attn_fwd_swap"]
            .occupancy_max_active_blocks_per_multiprocessor(32, swap_smem(head_dim), None)
            .map_or(0, |n| n as usize);
        let k = Arc::new(Kernels {
            head_dim,
            funcs,
            swap_ctas_per_sm,
        });
        cache.insert(head_dim, k.clone());
        Ok(k)
    }

    /// The Hopper attention kernel `name` (one of [`SM90_CONFIGS`], head_dim 128),
    /// compiling its configuration of `attention_sm90.cu` on first use (only that one:
    /// NVRTC takes ~2 s per configuration).
    pub(super) fn sm90_kernel(&self, name: &str) -> Result<CudaFunction> {
        let mut cache = self.sm90.lock().unwrap();
        let funcs = cache.get_or_insert_with(HashMap::new);
        if let Some(f) = funcs.get(name) {
            return Ok(f.clone());
        }
        if !self.attention_kernels().hopper {
            return Err(CudaError::Invalid(
                "the Hopper attention kernels need a compute capability 9.0 GPU".into(),
            ));
        }
        let &(only, plain, tma, keys) = SM90_CONFIGS
            .iter()
            .find(|c| c.1 == name || c.2 == name)
            .ok_or_else(|| {
                CudaError::Invalid(format!("{name} is not a kernel of attention_sm90.cu"))
            })?;
        let mut options = self.compile_options(128);
        options.push(format!("-DS9_ONLY={only}"));
        let mut compiled = HashMap::new();
        self.compile_into(
            &mut compiled,
            "attention_sm90.cu",
            ATTN_COMMON_SOURCE,
            ATTENTION_SM90_SOURCE,
            &[plain, tma],
            "compute_90a",
            &options,
        )?;
        for f in compiled.values() {
            f.set_attribute(
                drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                sm90_smem(keys) as i32,
            )?;
        }
        funcs.extend(compiled);
        funcs.get(name).cloned().ok_or_else(|| {
            CudaError::Invalid(format!("{name} was not loaded from attention_sm90.cu"))
        })
    }

    /// NVRTC options for this GPU's kernels of `head_dim` ([`compile_options`]).
    fn compile_options(&self, head_dim: usize) -> Vec<String> {
        compile_options(self.dtype, head_dim)
    }

    /// Compiles `source` (after `common.cuh` and `shared`) for `arch` and loads `names`
    /// from it into `funcs`.
    #[allow(clippy::too_many_arguments)]
    fn compile_into(
        &self,
        funcs: &mut HashMap<&'static str, CudaFunction>,
        file: &str,
        shared: &str,
        source: &str,
        names: &[&'static str],
        arch: &'static str,
        options: &[String],
    ) -> Result<()> {
        let ptx = compile_source(file, shared, source, arch, options)?;
        let module = self.ctx.load_module(ptx)?;
        for &name in names {
            funcs.insert(name, module.load_function(name)?);
        }
        Ok(())
    }
}

/// NVRTC options for kernels of `head_dim` in `dtype`: the 16-bit type and the
/// measurement-only switches from the environment.
pub(crate) fn compile_options(dtype: HalfType, head_dim: usize) -> Vec<String> {
    let mut options = vec![format!("-DHEAD_DIM={head_dim}"), "--std=c++17".into()];
    if dtype == HalfType::BF16 {
        options.push("-DDT_BF16".into());
    }
    // Measurements only: the Hopper kernels without their loads or their products.
    if let Some(n) = std::env::var("STARKV_SM90_DIAG")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|n| (1..=2).contains(n))
    {
        options.push(format!("-DS9_DIAG={n}"));
    }
    // Measurements only: 16-byte chunks per row in flight in the one-row products.
    if let Some(n) = std::env::var("STARKV_GEMV_UNROLL")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|n| (1..=16).contains(n))
    {
        options.push(format!("-DGEMV_UNROLL={n}"));
    }
    // Measurements only: tiles staged ahead by the swapped-operand decode kernel.
    options.push(format!("-DSWAP_STAGES={}", super::attention::swap_stages()));
    options
}

/// `source` (after `common.cuh` and `shared`) compiled by NVRTC for `arch`: no device
/// needed, so the tests compile every kernel source wherever NVRTC is installed.
pub(crate) fn compile_source(
    file: &str,
    shared: &str,
    source: &str,
    arch: &'static str,
    options: &[String],
) -> Result<cudarc::nvrtc::Ptx> {
    // `#line` makes NVRTC's messages name the source file and its own lines.
    let text = format!("{COMMON_SOURCE}\n{shared}\n#line 1 \"{file}\"\n{source}");
    compile_ptx_with_opts(
        text,
        CompileOptions {
            arch: Some(arch),
            options: options.to_vec(),
            name: Some(format!("starkv_{file}")),
            ..Default::default()
        },
    )
    .map_err(|e| CudaError::Nvrtc(format!("{file}: {e}")))
}
