//! One-row matrix products for decode steps (`kernels/gemv.cu`): a decode step multiplies
//! one row by every weight matrix, where cuBLAS runs a small grid per product and the
//! RMSNorm, RoPE, SwiGLU and residual kernels around it are launches of their own. These
//! kernels fold them: a layer is four products (QKV with its norm and RoPE, the output
//! projection into the residual, gate/up with its norm and SwiGLU, the down projection
//! into the residual) plus attention's two (split, merge): six kernels instead of ten,
//! the products launched so that each starts while the kernel before it runs (Hopper, PDL).
//! Used by the forward pass for one-token steps while [`Gpu::fused_decode`] is on;
//! prefill keeps cuBLAS.

use std::ffi::c_void;

use cudarc::driver::LaunchConfig;

use super::device::Gpu;
use super::kernels::Kernels;
use super::launch::{Dependent, arg};
use super::{CudaError, KvDest, Result};

/// Threads per CTA (`GEMV_THREADS` in `gemv.cu`): eight warps, each two rows at a time.
const THREADS: u32 = 256;
/// Warps per CTA.
const WARPS: usize = (THREADS / 32) as usize;
/// Most shared memory a product's staged input may take (the kernels' dynamic shared
/// memory attribute is raised to this in `kernels.rs`): inputs up to 49152 values.
pub(crate) const GEMV_SMEM_MAX: usize = 96 * 1024;

/// Whether the one-row kernels can multiply inputs of `k` values: 16-byte chunks and the
/// staged vector within [`GEMV_SMEM_MAX`].
pub fn gemv_fits(k: usize) -> bool {
    k > 0 && k.is_multiple_of(8) && k * 2 <= GEMV_SMEM_MAX
}

impl Gpu {
    /// Warps per unit (row pair) for `units` pairs of rows of `k` values: the fewest
    /// (1, 2, 4 or 8) that give every SM four CTAs of busy warps, while each warp keeps
    /// at least two 16-byte chunks per lane and row. Errors when the kernels cannot stage
    /// `k` values.
    fn gemv_wpu(&self, units: usize, k: usize) -> Result<usize> {
        if !gemv_fits(k) {
            return Err(CudaError::Invalid(format!(
                "one-row product over {k} inputs: needs a multiple of 8 up to {}",
                GEMV_SMEM_MAX / 2
            )));
        }
        let target = 4 * WARPS * self.sm_count().max(1);
        let mut wpu = 1;
        while wpu < WARPS && units * wpu < target && k / 8 >= 64 * (2 * wpu) {
            wpu *= 2;
        }
        Ok(wpu)
    }

    /// Launches one-row product kernel `name` over `units` row pairs, `wpu` warps each
    /// (CTAs of eight warps, at most four per SM: later units loop) with `k` staged input
    /// values; `params` are the addresses of the kernel's arguments in order (they must
    /// match its signature in `gemv.cu`). On sm_90 and later with programmatic dependent
    /// launch: the kernel may start while the previous one runs and waits for it on the
    /// device (see `gemv.cu`), which hides its launch and its first weight loads.
    fn launch_gemv(
        &self,
        kern: &Kernels,
        name: &str,
        (units, wpu): (usize, usize),
        k: usize,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let grid = units
            .div_ceil(WARPS / wpu)
            .clamp(1, 4 * self.sm_count().max(1));
        let cfg = LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: (k * 2) as u32,
        };
        // SAFETY: `params` holds the addresses of live values, one per argument of the
        // kernel in `gemv.cu` (every caller below), with device addresses of buffers
        // sized for the shapes given; every product waits with `pdl_wait()`.
        unsafe { self.launch_dependent(kern.get(name), cfg, params, Some(Dependent::Products)) }
    }

    /// One decode token's fused Q/K/V: `x` (f32 `[k]`, the residual stream) RMS-normalised
    /// with `norm_w` (f32 `[k]`), times `w` (16-bit `[(nh + 2 nkv) d][k]`), RoPE from the
    /// one-row tables `cos`/`sin` (`[pairs]`), Q to `q` (16-bit `[nh d]`) and K/V to
    /// `dest` (row `t0`, or the device word `t0_dev`): what `rms_norm` + `gemm` +
    /// `rope_split` compute for one row.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_qkv_rope(
        &self,
        kern: &Kernels,
        q: u64,
        dest: &KvDest,
        w: u64,
        x: u64,
        norm_w: u64,
        eps: f32,
        k: usize,
        cos: u64,
        sin: u64,
        (nh, nkv, d, pairs): (usize, usize, usize, usize),
    ) -> Result<()> {
        if d % 2 != 0 || pairs > d / 2 {
            return Err(CudaError::Invalid(format!(
                "RoPE over {pairs} pairs of a head of {d}"
            )));
        }
        let units = (nh + 2 * nkv) * d / 2;
        let wpu = self.gemv_wpu(units, k)?;
        let (k_i, wpu_i) = (k as i32, wpu as i32);
        let (nh_i, nkv_i, d_i, p_i) = (nh as i32, nkv as i32, d as i32, pairs as i32);
        let mut params = [
            arg(&q),
            arg(&dest.k),
            arg(&dest.v),
            arg(&w),
            arg(&x),
            arg(&norm_w),
            arg(&eps),
            arg(&k_i),
            arg(&cos),
            arg(&sin),
            arg(&nh_i),
            arg(&nkv_i),
            arg(&d_i),
            arg(&p_i),
            arg(&dest.head_stride),
            arg(&dest.row_stride),
            arg(&dest.t0),
            arg(&dest.t0_dev),
            arg(&wpu_i),
        ];
        self.launch_gemv(kern, "gemv_qkv_rope", (units, wpu), k, &mut params)
    }

    /// One decode token's feed-forward input: `x` (f32 `[k]`) RMS-normalised with `norm_w`,
    /// times `w` (16-bit `[2 ffn][k]`, gate rows then up rows), `act[j] = silu(gate_j) ·
    /// up_j` (16-bit `[ffn]`): what `rms_norm` + `gemm` + `swiglu` compute for one row.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_swiglu(
        &self,
        kern: &Kernels,
        act: u64,
        w: u64,
        x: u64,
        norm_w: u64,
        eps: f32,
        k: usize,
        ffn: usize,
    ) -> Result<()> {
        let wpu = self.gemv_wpu(ffn, k)?;
        let (k_i, f_i, wpu_i) = (k as i32, ffn as i32, wpu as i32);
        let mut params = [
            arg(&act),
            arg(&w),
            arg(&x),
            arg(&norm_w),
            arg(&eps),
            arg(&k_i),
            arg(&f_i),
            arg(&wpu_i),
        ];
        self.launch_gemv(kern, "gemv_swiglu", (ffn, wpu), k, &mut params)
    }

    /// `y[r] (+)= Σᵢ w[r][i] · x[i]` for one row: `w` 16-bit `[n][k]`, `x` 16-bit
    /// (`x_f32 == false`) or f32 rounded to 16-bit first, `y` f32 `[n]`, added to
    /// (`accumulate`: a residual add, cuBLAS's beta = 1) or overwritten.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_rows(
        &self,
        kern: &Kernels,
        y: u64,
        accumulate: bool,
        w: u64,
        x: u64,
        x_f32: bool,
        n: usize,
        k: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let (xh, xf) = if x_f32 { (0u64, x) } else { (x, 0u64) };
        let units = n.div_ceil(2);
        let wpu = self.gemv_wpu(units, k)?;
        let (acc, k_i, n_i, wpu_i) = (accumulate as i32, k as i32, n as i32, wpu as i32);
        let mut params = [
            arg(&y),
            arg(&acc),
            arg(&w),
            arg(&xh),
            arg(&xf),
            arg(&k_i),
            arg(&n_i),
            arg(&wpu_i),
        ];
        self.launch_gemv(kern, "gemv_rows", (units, wpu), k, &mut params)
    }
}
