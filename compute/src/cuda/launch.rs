//! Element-wise kernel launches (embedding, RMSNorm, RoPE, SwiGLU, conversions, fills,
//! argmax, layout changes), all through [`Gpu::launch_elementwise`]: one place that picks
//! the kernel, sizes the launch and queues it on the compute stream.

use std::ffi::c_void;
use std::sync::OnceLock;

use cudarc::driver::{CudaFunction, LaunchArgs, LaunchConfig, PushKernelArg, sys};

use super::device::Gpu;
use super::kernels::Kernels;
use super::{KvDest, Result};
use crate::kv8::Kv8Format;

/// The address of one kernel argument, as `cuLaunchKernelEx` takes it.
pub(super) fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

/// The kernels that may start while the kernel before them in the stream still runs
/// (programmatic dependent launch, sm_90 and later), each family behind its own switch
/// for measurements: the decode products (on; `STARKV_GEMV_PDL=0` turns it off) and the
/// attention kernels with the split merge (off; `STARKV_ATTN_PDL=1` turns it on: it made
/// SmolLM2's graph decode at 8K slower on the H200, 1.17 against 0.98-1.00 ms/token,
/// 2026-12-02); `Merge`, the split merge alone, is always allowed (the caller decides by
/// [`super::SplitTuning::merge_pdl`]). Every kernel of a family waits for its predecessor on the device
/// (`pdl_wait` in `common.cuh`) before it reads anything that one writes; launched
/// without the attribute, the wait is a no-op.
#[derive(Debug, Clone, Copy)]
pub(super) enum Dependent {
    Products,
    Attention,
    Merge,
}

impl Dependent {
    fn allowed(self) -> bool {
        fn read(var: &str, default: bool) -> bool {
            match std::env::var(var).as_deref() {
                Ok("0" | "off" | "false") => false,
                Ok("1" | "on" | "true") => true,
                _ => default,
            }
        }
        static PRODUCTS: OnceLock<bool> = OnceLock::new();
        static ATTENTION: OnceLock<bool> = OnceLock::new();
        match self {
            Self::Products => *PRODUCTS.get_or_init(|| read("STARKV_GEMV_PDL", true)),
            Self::Attention => *ATTENTION.get_or_init(|| read("STARKV_ATTN_PDL", false)),
            Self::Merge => true,
        }
    }
}

/// Where `argmax_wide`'s partials start in its scratch (after the counter).
const ARGMAX_PART_OFFSET: usize = 16;

/// `argmax_wide`'s CTAs and logits per CTA for `n` logits: 1024 a CTA (4 per thread),
/// more when that would take over 1024 CTAs.
fn argmax_split(n: usize) -> (usize, usize) {
    let per = n.div_ceil(1024).next_multiple_of(256).max(1024);
    (n.div_ceil(per).max(1), per)
}

/// Bytes of [`Gpu::argmax_one`]'s scratch for `n` logits: the counter, then one
/// (max, index, sum) partial of 12 bytes per CTA.
pub fn argmax_scratch_bytes(n: usize) -> usize {
    ARGMAX_PART_OFFSET + 12 * argmax_split(n).0
}

/// CTAs of `per` threads covering `n` elements (at least one).
fn blocks_for(n: usize, per: usize) -> u32 {
    n.div_ceil(per).max(1) as u32
}

impl Gpu {
    /// Launches `func` on the compute stream through `cuLaunchKernelEx`, as a programmatic
    /// dependent launch when it belongs to a `family` and the device (sm_90 and later)
    /// and the family's switch allow it:
    /// the kernel may then start while the previous one runs, which hides its launch.
    /// `params` are the addresses of the kernel's arguments in order ([`arg`]).
    ///
    /// # Safety
    /// `params` must match the kernel's signature, with device addresses of buffers
    /// sized for the launch; the kernel must call `pdl_wait()` before it reads anything
    /// an earlier kernel writes (every kernel launched through this does).
    pub(super) unsafe fn launch_dependent(
        &self,
        func: &CudaFunction,
        cfg: LaunchConfig,
        params: &mut [*mut c_void],
        family: Option<Dependent>,
    ) -> Result<()> {
        // SAFETY: an all-zero attribute value is valid (a union of plain integers).
        let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let pdl = self.info.compute_capability.0 >= 9 && family.is_some_and(Dependent::allowed);
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.exec_stream().cu_stream(),
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: pdl as u32,
        };
        self.ctx.bind_to_thread()?;
        // SAFETY: the caller's contract (above); the function belongs to this context.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                func.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()?;
        }
        Ok(())
    }

    /// Launches kernel `name` on a 1-D grid of `grid` CTAs of `block` threads (no dynamic
    /// shared memory); `args` pushes the kernel's arguments in order (they must match its
    /// signature in `elementwise.cu`).
    fn launch_elementwise<'a>(
        &'a self,
        k: &'a Kernels,
        name: &str,
        grid: u32,
        block: u32,
        args: impl FnOnce(&mut LaunchArgs<'a>),
    ) -> Result<()> {
        let mut b = self.exec_stream().launch_builder(k.get(name));
        args(&mut b);
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every caller pushes the arguments its kernel declares, with device
        // addresses of buffers sized for the launch's shape.
        unsafe { b.launch(cfg)? };
        Ok(())
    }

    /// `x[t] = table[tokens[t]]` (table 16-bit `[vocab][hidden]`, x f32).
    pub fn embed(
        &self,
        k: &Kernels,
        x: u64,
        table: u64,
        tokens: u64,
        m: usize,
        hidden: usize,
    ) -> Result<()> {
        let hidden_i = hidden as i32;
        self.launch_elementwise(k, "embed_rows", m as u32, 256, |b| {
            b.arg(&x).arg(&table).arg(&tokens).arg(&hidden_i);
        })
    }

    /// RMSNorm of `rows` rows of `n`: f32 in, 16-bit (`out_f32 == false`) or f32 out.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        k: &Kernels,
        out: u64,
        out_f32: bool,
        x: u64,
        w: u64,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let n_i = n as i32;
        let name = if out_f32 { "rms_norm_f" } else { "rms_norm_h" };
        self.launch_elementwise(k, name, rows as u32, 256, |b| {
            b.arg(&out).arg(&x).arg(&w).arg(&n_i).arg(&eps);
        })
    }

    /// cos/sin tables `[m][pairs]` for positions (i32 on the device), angles in f64.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_table(
        &self,
        k: &Kernels,
        cos: u64,
        sin: u64,
        pos: u64,
        inv_freq: u64,
        m: usize,
        pairs: usize,
    ) -> Result<()> {
        if m * pairs == 0 {
            return Ok(());
        }
        let (m_i, p_i) = (m as i32, pairs as i32);
        self.launch_elementwise(k, "rope_table", blocks_for(m * pairs, 256), 256, |b| {
            b.arg(&cos)
                .arg(&sin)
                .arg(&pos)
                .arg(&inv_freq)
                .arg(&m_i)
                .arg(&p_i);
        })
    }

    /// Splits fused `qkv` f32 rows into rotated Q (16-bit `[m][nh d]`) and rotated K / V
    /// written at `dest`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_split(
        &self,
        k: &Kernels,
        q: u64,
        dest: &KvDest,
        qkv: u64,
        cos: u64,
        sin: u64,
        m: usize,
        nh: usize,
        nkv: usize,
        d: usize,
        pairs: usize,
    ) -> Result<()> {
        if m == 0 {
            return Ok(());
        }
        let (nh_i, nkv_i, d_i, p_i) = (nh as i32, nkv as i32, d as i32, pairs as i32);
        self.launch_elementwise(k, "rope_split", m as u32, 256, |b| {
            b.arg(&q)
                .arg(&dest.k)
                .arg(&dest.v)
                .arg(&qkv)
                .arg(&cos)
                .arg(&sin)
                .arg(&nh_i)
                .arg(&nkv_i)
                .arg(&d_i)
                .arg(&p_i)
                .arg(&dest.head_stride)
                .arg(&dest.row_stride)
                .arg(&dest.t0)
                .arg(&dest.t0_dev);
        })
    }

    /// `out[t][i] = silu(gu[t][i]) · gu[t][ffn + i]` (16-bit out).
    pub fn swiglu(&self, k: &Kernels, out: u64, gu: u64, m: usize, ffn: usize) -> Result<()> {
        if m == 0 {
            return Ok(());
        }
        let (m_i, f_i) = (m as i32, ffn as i32);
        self.launch_elementwise(k, "swiglu_h", blocks_for(m * ffn, 256), 256, |b| {
            b.arg(&out).arg(&gu).arg(&m_i).arg(&f_i);
        })
    }

    /// f32 to the 16-bit type, `n` values.
    pub fn to_half(&self, k: &Kernels, out: u64, x: u64, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        self.launch_elementwise(k, "to_h16", blocks_for(n, 256), 256, |b| {
            b.arg(&out).arg(&x).arg(&n64);
        })
    }

    /// `rows` rows of `d` 16-bit values at `src` quantised into the 8-bit device buffer
    /// `dst` (`[rows][d]` values, then one f16 scale per row: an 8-bit block's K or V),
    /// bit for bit as the store quantises (`kv8::quantize_group`, `quantize_group_fp8`).
    pub fn quantize_rows(
        &self,
        k: &Kernels,
        dst: u64,
        src: u64,
        (rows, d): (usize, usize),
        format: Kv8Format,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, d_i) = (rows as i32, d as i32);
        let fp8 = i32::from(format == Kv8Format::Fp8);
        self.launch_elementwise(k, "quantize_rows", blocks_for(rows * 32, 256), 256, |b| {
            b.arg(&dst).arg(&src).arg(&rows_i).arg(&d_i).arg(&fp8);
        })
    }

    /// The 16-bit type to f32, `n` values.
    pub fn to_f32(&self, k: &Kernels, out: u64, x: u64, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        self.launch_elementwise(k, "to_f32", blocks_for(n, 256), 256, |b| {
            b.arg(&out).arg(&x).arg(&n64);
        })
    }

    /// Uniform values in `[-bound, bound)` (16-bit), from a hash of (seed, index).
    pub fn fill_uniform_half(
        &self,
        k: &Kernels,
        out: u64,
        n: usize,
        seed: u64,
        bound: f32,
    ) -> Result<()> {
        let n64 = n as u64;
        let grid = blocks_for(n, 256).min(65536);
        self.launch_elementwise(k, "fill_uniform_h", grid, 256, |b| {
            b.arg(&out).arg(&n64).arg(&seed).arg(&bound);
        })
    }

    /// Uniform f32 values in `[lo, hi)`, from a hash of (seed, index).
    pub fn fill_uniform_f32(
        &self,
        k: &Kernels,
        out: u64,
        n: usize,
        seed: u64,
        lo: f32,
        hi: f32,
    ) -> Result<()> {
        let n64 = n as u64;
        let grid = blocks_for(n, 256).min(65536);
        self.launch_elementwise(k, "fill_uniform_f", grid, 256, |b| {
            b.arg(&out).arg(&n64).arg(&seed).arg(&lo).arg(&hi);
        })
    }

    /// Per row of `logits` (`[rows][n]` f32): argmax index and log-sum-exp.
    pub fn argmax(
        &self,
        k: &Kernels,
        idx: u64,
        lse: u64,
        logits: u64,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        let n_i = n as i32;
        self.launch_elementwise(k, "argmax_rows", rows as u32, 512, |b| {
            b.arg(&idx).arg(&lse).arg(&logits).arg(&n_i);
        })
    }

    /// [`Gpu::argmax`] of ONE row of `n` f32 logits over many CTAs (`argmax_wide`), for
    /// a decode step's pick: `scratch` is a buffer of [`argmax_scratch_bytes`]`(n)` bytes
    /// whose first word (the CTAs' finish counter) is zero before the first call; every
    /// call leaves it zero again.
    #[allow(clippy::too_many_arguments)]
    pub fn argmax_one(
        &self,
        k: &Kernels,
        idx: u64,
        lse: u64,
        logits: u64,
        n: usize,
        scratch: u64,
    ) -> Result<()> {
        let (ctas, per) = argmax_split(n);
        let (n_i, per_i) = (n as i32, per as i32);
        let (part, counter) = (scratch + ARGMAX_PART_OFFSET as u64, scratch);
        self.launch_elementwise(k, "argmax_wide", ctas as u32, 256, |b| {
            b.arg(&idx)
                .arg(&lse)
                .arg(&logits)
                .arg(&n_i)
                .arg(&per_i)
                .arg(&part)
                .arg(&counter);
        })
    }

    /// Token-major `[len][nkv d]` 16-bit rows to head-major `[nkv][len][d]`.
    pub fn rows_to_heads(
        &self,
        k: &Kernels,
        dst: u64,
        src: u64,
        len: usize,
        nkv: usize,
        d: usize,
    ) -> Result<()> {
        let (l, n, dd) = (len as i32, nkv as i32, d as i32);
        self.launch_elementwise(
            k,
            "rows_to_heads",
            blocks_for(len * nkv * d, 256),
            256,
            |b| {
                b.arg(&dst).arg(&src).arg(&l).arg(&n).arg(&dd);
            },
        )
    }
}
