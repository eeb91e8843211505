//! One GPU: context, streams, cuBLAS, the NVRTC-compiled kernels and thin wrappers that
//! launch them. Everything here works on raw device addresses (`u64`) of [`DevBuf`]s so
//! that views into buffers (a layer, a token offset) cost nothing; ordering is by stream:
//! every kernel and cuBLAS call runs on [`Gpu::stream`], block loads on
//! [`Gpu::copy_stream`], joined with events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{CudaBlas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
    result as drv, sys as drv_sys,
};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

use super::{CudaError, DeviceInfo, Result};
use crate::partial::HeadShape;

/// The 16-bit float type weights, activations and KV use on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HalfType {
    F16,
    BF16,
}

impl HalfType {
    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        }
    }

    fn blas(self) -> blas_sys::cudaDataType {
        match self {
            Self::F16 => blas_sys::cudaDataType::CUDA_R_16F,
            Self::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
        }
    }

    /// Converts f32 values to this type's bits.
    pub fn encode(self, src: &[f32], dst: &mut [u16]) {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| match self {
                Self::F16 => {
                    for (o, &v) in d.iter_mut().zip(s) {
                        *o = half::f16::from_f32(v).to_bits();
                    }
                }
                Self::BF16 => {
                    for (o, &v) in d.iter_mut().zip(s) {
                        *o = half::bf16::from_f32(v).to_bits();
                    }
                }
            });
    }

    pub fn decode(self, src: &[u16], dst: &mut [f32]) {
        for (o, &b) in dst.iter_mut().zip(src) {
            *o = match self {
                Self::F16 => half::f16::from_bits(b).to_f32(),
                Self::BF16 => half::bf16::from_bits(b).to_f32(),
            };
        }
    }

    /// Rounds `x` through this type (what an upload does to a value).
    pub fn round(self, x: f32) -> f32 {
        match self {
            Self::F16 => half::f16::from_f32(x).to_f32(),
            Self::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

/// A device allocation; `ptr()` is its address for kernels and copies.
pub struct DevBuf {
    _buf: CudaSlice<u8>,
    ptr: u64,
    bytes: usize,
}

impl DevBuf {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuf({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

/// Page-locked host memory (for asynchronous copies).
pub struct PinnedBuf {
    ptr: *mut u8,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the buffer is plain memory owned by this value; access goes through &/&mut.
unsafe impl Send for PinnedBuf {}
unsafe impl Sync for PinnedBuf {}

impl PinnedBuf {
    pub fn new(gpu: &Gpu, bytes: usize) -> Result<Self> {
        gpu.ctx.bind_to_thread()?;
        // SAFETY: a plain page-locked allocation, freed in Drop.
        let ptr = unsafe { drv::malloc_host(bytes.max(1), 0)? } as *mut u8;
        Ok(Self {
            ptr,
            bytes,
            ctx: gpu.ctx.clone(),
        })
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn as_u16_mut(&mut self) -> &mut [u16] {
        // SAFETY: the allocation holds `bytes` bytes and is 16-byte aligned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u16, self.bytes / 2) }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by malloc_host in `new`.
        unsafe {
            let _ = drv::free_host(self.ptr as *mut _);
        }
    }
}

/// The kernels of one (16-bit type, head dimension) pair.
pub struct Kernels {
    pub head_dim: usize,
    funcs: HashMap<&'static str, CudaFunction>,
}

pub(crate) const KERNEL_NAMES: &[&str] = &[
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
    "rows_to_heads",
    "attn_fwd_simple",
    "attn_fwd_w1",
    "attn_fwd_m32",
    "attn_fwd_m32n32",
    "attn_fwd_p1n32",
    "attn_merge",
];

/// Head-dim-dependent dynamic shared memory of the pipelined kernels (see kernels.cu):
/// `tiles` rows of `head_dim + 8` 16-bit values.
fn pipe_smem(tiles: usize, head_dim: usize) -> usize {
    tiles * (head_dim + 8) * 2
}

/// The kernel that attends runs of more than 64 rows per KV head (phase 1, prefill).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongKernel {
    /// 4 warps x 16 rows, K and V loaded together per tile (the first version).
    Simple,
    /// 4 warps x 32 rows, two-stage K/V buffers, 64-key tiles.
    M32,
    /// 4 warps x 32 rows, two-stage K/V buffers, 32-key tiles.
    M32N32,
}

/// The kernel that attends at most 16 rows per KV head (decoding a token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeKernel {
    /// One warp, K and V loaded together per tile.
    W1,
    /// One warp, Q in registers, two-stage 32-key K/V buffers.
    P1N32,
}

/// Which kernels [`Gpu::attention`] launches, by rows per KV head (`m * group`): at most
/// 16 rows `decode`, 17 to 64 rows the 64-row simple kernel, more `long`. Defaults from
/// the measurements in PERF_NOTES.md; env `STARKV_ATTN_LONG=simple|m32|m32n32` and
/// `STARKV_ATTN_DECODE=w1|p1n32` override them (A/B runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnKernels {
    pub long: LongKernel,
    pub decode: DecodeKernel,
}

impl Default for AttnKernels {
    fn default() -> Self {
        Self {
            long: LongKernel::M32,
            decode: DecodeKernel::W1,
        }
    }
}

impl AttnKernels {
    /// Every kernel the selftest must cover.
    pub const ALL_LONG: [LongKernel; 3] = [LongKernel::Simple, LongKernel::M32, LongKernel::M32N32];
    pub const ALL_DECODE: [DecodeKernel; 2] = [DecodeKernel::W1, DecodeKernel::P1N32];

    fn from_env() -> Self {
        let mut k = Self::default();
        match std::env::var("STARKV_ATTN_LONG").as_deref() {
            Ok("simple") => k.long = LongKernel::Simple,
            Ok("m32") => k.long = LongKernel::M32,
            Ok("m32n32") => k.long = LongKernel::M32N32,
            _ => {}
        }
        match std::env::var("STARKV_ATTN_DECODE").as_deref() {
            Ok("w1") => k.decode = DecodeKernel::W1,
            Ok("p1n32") => k.decode = DecodeKernel::P1N32,
            _ => {}
        }
        k
    }

    /// `(kernel, rows per CTA, threads, dynamic shared memory bytes)` for `rows` rows
    /// per KV head. The 32-row-per-warp kernels hold 128 f32 accumulators per thread at
    /// head_dim 128; above that they would spill, so larger heads use the simple kernel.
    fn launch(&self, rows: usize, head_dim: usize) -> (&'static str, usize, u32, usize) {
        if rows <= 16 {
            return match self.decode {
                DecodeKernel::W1 => ("attn_fwd_w1", 16, 32, 0),
                DecodeKernel::P1N32 => ("attn_fwd_p1n32", 16, 32, pipe_smem(4 * 32, head_dim)),
            };
        }
        let long = match self.long {
            LongKernel::M32 | LongKernel::M32N32 if head_dim > 128 => LongKernel::Simple,
            other => other,
        };
        if rows <= 64 {
            return ("attn_fwd_simple", 64, 128, 0);
        }
        match long {
            LongKernel::Simple => ("attn_fwd_simple", 64, 128, 0),
            LongKernel::M32 => ("attn_fwd_m32", 128, 128, pipe_smem(4 * 64 + 128, head_dim)),
            LongKernel::M32N32 => (
                "attn_fwd_m32n32",
                128,
                128,
                pipe_smem(4 * 32 + 128, head_dim),
            ),
        }
    }
}

impl Kernels {
    pub fn get(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }
}

/// The kernel source, compiled at run time.
pub const KERNEL_SOURCE: &str = include_str!("kernels.cu");

/// One entry of the attention kernel's key table (mirrors `AttnItem` in kernels.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttnItem {
    pub k: u64,
    pub v: u64,
    pub head_stride: i64,
    pub row_stride: i32,
    pub key_begin: i32,
    pub key_end: i32,
    pub causal_offset: i32,
    pub pad: [i32; 2],
}

const _: () = assert!(std::mem::size_of::<AttnItem>() == 48);

/// A run of keys for attention: element `(kv head h, key j, i)` at
/// `k + 2 * (h * head_stride + j * row_stride + i)` bytes (16-bit values).
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub k: u64,
    pub v: u64,
    pub head_stride: i64,
    pub row_stride: i32,
    pub len: usize,
    /// `None`: every key visible; `Some(o)`: query token `t` sees keys `j <= t + o`.
    pub causal_offset: Option<usize>,
}

/// How an attention call's keys are split over grid z: items and per-split item ranges.
#[derive(Debug, Clone, Default)]
pub struct AttnPlan {
    pub items: Vec<AttnItem>,
    /// `splits + 1` offsets into `items`.
    pub split_begin: Vec<i32>,
}

impl AttnPlan {
    pub fn n_splits(&self) -> usize {
        self.split_begin.len() - 1
    }

    /// One split over every segment (one running softmax, direct output), or, when
    /// `target_splits > 1`, segments cut into chunks of about `total / target_splits`
    /// keys with one split per chunk (merged afterwards by log-sum-exp).
    pub fn new(segments: &[Segment], target_splits: usize) -> Self {
        let item = |s: &Segment, a: usize, b: usize| AttnItem {
            k: s.k,
            v: s.v,
            head_stride: s.head_stride,
            row_stride: s.row_stride,
            key_begin: a as i32,
            key_end: b as i32,
            causal_offset: s.causal_offset.map_or(-1, |o| o as i32),
            pad: [0; 2],
        };
        let segments: Vec<&Segment> = segments.iter().filter(|s| s.len > 0).collect();
        let mut plan = AttnPlan {
            items: Vec::new(),
            split_begin: vec![0],
        };
        if target_splits <= 1 {
            plan.items = segments.iter().map(|s| item(s, 0, s.len)).collect();
            plan.split_begin.push(plan.items.len() as i32);
            return plan;
        }
        let total: usize = segments.iter().map(|s| s.len).sum();
        let chunk = total.div_ceil(target_splits).div_ceil(64).max(8) * 64;
        for s in segments {
            let mut a = 0;
            while a < s.len {
                let b = (a + chunk).min(s.len);
                plan.items.push(item(s, a, b));
                plan.split_begin.push(plan.items.len() as i32);
                a = b;
            }
        }
        if plan.items.is_empty() {
            plan.split_begin.push(0);
        }
        plan
    }
}

/// One GPU with its streams, cuBLAS handle and kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    /// Kernels and matrix products.
    pub stream: Arc<CudaStream>,
    /// Host-to-device block loads.
    pub copy_stream: Arc<CudaStream>,
    blas: Mutex<CudaBlas>,
    pub dtype: HalfType,
    pub info: DeviceInfo,
    kernels: Mutex<HashMap<usize, Arc<Kernels>>>,
    arch: &'static str,
    /// Which attention kernels run (see [`AttnKernels`]).
    attn: Mutex<AttnKernels>,
}

impl Gpu {
    /// Opens GPU `ordinal` (the driver, NVRTC and cuBLAS must load: see [`super::probe`]).
    pub fn new(ordinal: usize, dtype: HalfType) -> Result<Arc<Self>> {
        let devices = super::probe()?;
        let info = devices.get(ordinal).cloned().ok_or_else(|| {
            CudaError::Unavailable(format!(
                "no CUDA device {ordinal} ({} found)",
                devices.len()
            ))
        })?;
        super::check_libraries()?;
        let arch = match info.compute_capability {
            (9, _) => "compute_90",
            (8, 9) => "compute_89",
            (8, 6) => "compute_86",
            (8, _) => "compute_80",
            (major, _) if major >= 10 => "compute_90",
            (major, minor) => {
                return Err(CudaError::Unavailable(format!(
                    "{} has compute capability {major}.{minor}; starkv's kernels need 8.0 or newer",
                    info.name
                )));
            }
        };
        let ctx = CudaContext::new(ordinal)?;
        // Ordering is explicit (one compute stream, events for the copy stream).
        // SAFETY: no CudaSlice is shared between streams without an event join.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let copy_stream = ctx.new_stream()?;
        let blas = CudaBlas::new(stream.clone())?;
        Ok(Arc::new(Self {
            ctx,
            stream,
            copy_stream,
            blas: Mutex::new(blas),
            dtype,
            info,
            kernels: Mutex::new(HashMap::new()),
            arch,
            attn: Mutex::new(AttnKernels::from_env()),
        }))
    }

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
        let mut options = vec![format!("-DHEAD_DIM={head_dim}"), "--std=c++17".into()];
        if self.dtype == HalfType::BF16 {
            options.push("-DDT_BF16".into());
        }
        let ptx = compile_ptx_with_opts(
            KERNEL_SOURCE,
            CompileOptions {
                arch: Some(self.arch),
                options,
                name: Some("starkv_kernels.cu".into()),
                ..Default::default()
            },
        )
        .map_err(|e| CudaError::Nvrtc(format!("{e}")))?;
        let module = self.ctx.load_module(ptx)?;
        let mut funcs = HashMap::new();
        for &name in KERNEL_NAMES {
            funcs.insert(name, module.load_function(name)?);
        }
        // The pipelined kernels take more than the default 48 KB of shared memory.
        let most = pipe_smem(4 * 64 + 128, head_dim);
        for name in ["attn_fwd_m32", "attn_fwd_m32n32", "attn_fwd_p1n32"] {
            funcs[name].set_attribute(
                drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                most as i32,
            )?;
        }
        let k = Arc::new(Kernels { head_dim, funcs });
        cache.insert(head_dim, k.clone());
        Ok(k)
    }

    /// Selects the attention kernels (benchmarks and the selftest switch them).
    pub fn set_attention_kernels(&self, kernels: AttnKernels) {
        *self.attn.lock().unwrap() = kernels;
    }

    pub fn attention_kernels(&self) -> AttnKernels {
        *self.attn.lock().unwrap()
    }

    /// The attention kernel [`Gpu::attention`] launches for `rows` rows per KV head.
    pub fn attention_kernel_name(&self, rows: usize, head_dim: usize) -> &'static str {
        self.attention_kernels().launch(rows, head_dim).0
    }

    pub fn sm_count(&self) -> usize {
        self.info.multiprocessors
    }

    /// Uninitialised device memory of `bytes` bytes.
    pub fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        // SAFETY: callers write before they read (or use alloc_zeros).
        let buf = unsafe { self.stream.alloc::<u8>(bytes.max(256))? };
        let ptr = buf.device_ptr(&self.stream).0;
        Ok(DevBuf {
            _buf: buf,
            ptr,
            bytes,
        })
    }

    pub fn alloc_zeros(&self, bytes: usize) -> Result<DevBuf> {
        let buf = self.stream.alloc_zeros::<u8>(bytes.max(256))?;
        let ptr = buf.device_ptr(&self.stream).0;
        Ok(DevBuf {
            _buf: buf,
            ptr,
            bytes,
        })
    }

    /// Copies `src` to device address `dst` on the compute stream (the host data is
    /// staged before this returns, so `src` may be dropped right after).
    pub fn upload<T: bytemuck::Pod>(&self, dst: u64, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: dst holds at least size_of_val(src) bytes (callers size it).
        unsafe { drv::memcpy_htod_async(dst, src, self.stream.cu_stream())? };
        Ok(())
    }

    /// A new buffer holding `src`.
    pub fn upload_new<T: bytemuck::Pod>(&self, src: &[T]) -> Result<DevBuf> {
        let buf = self.alloc(std::mem::size_of_val(src))?;
        self.upload(buf.ptr(), src)?;
        Ok(buf)
    }

    /// Copies device address `src` into `dst` after all queued work (synchronous).
    pub fn download<T: bytemuck::Pod>(&self, dst: &mut [T], src: u64) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: src holds at least size_of_val(dst) bytes.
        unsafe { drv::memcpy_dtoh_async(dst, src, self.stream.cu_stream())? };
        self.stream.synchronize()?;
        Ok(())
    }

    /// Copies the first `bytes` of a pinned buffer to `dst` on the compute stream.
    pub fn upload_pinned(&self, dst: u64, src: &PinnedBuf, bytes: usize) -> Result<()> {
        let bytes = bytes.min(src.bytes());
        self.ctx.bind_to_thread()?;
        // SAFETY: the pinned buffer holds `bytes` bytes; dst at least as many.
        unsafe {
            let s = std::slice::from_raw_parts(src.as_ptr(), bytes);
            drv::memcpy_htod_async(dst, s, self.stream.cu_stream())?;
        }
        Ok(())
    }

    pub fn copy_d2d(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: both ranges are valid device memory of at least `bytes` bytes.
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())? };
        Ok(())
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize()?;
        Ok(())
    }

    /// `y[m][n] = x[m][k] · w[n][k]ᵀ (+ beta · y)`: x and w 16-bit, y f32 (`y_f32`) or
    /// 16-bit, f32 accumulation on the tensor cores.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        y: u64,
        y_f32: bool,
        x: u64,
        w: u64,
        m: usize,
        n: usize,
        k: usize,
        beta: f32,
    ) -> Result<()> {
        if m == 0 {
            return Ok(());
        }
        let alpha = 1.0f32;
        let dt = self.dtype.blas();
        let ct = if y_f32 {
            blas_sys::cudaDataType::CUDA_R_32F
        } else {
            dt
        };
        let blas = self.blas.lock().unwrap();
        // SAFETY: column-major view of the row-major product: yᵀ[n x m] = w[k x n]ᵀ · xᵀ[k x m];
        // the buffers hold the sizes the shapes say (callers size them).
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                w as *const _,
                dt,
                k as i32,
                x as *const _,
                dt,
                k as i32,
                &beta as *const f32 as *const _,
                y as *mut _,
                ct,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }

    fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn blocks_for(n: usize, per: usize) -> u32 {
        n.div_ceil(per).max(1) as u32
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
        let mut b = self.stream.launch_builder(k.get("embed_rows"));
        b.arg(&x).arg(&table).arg(&tokens).arg(&hidden_i);
        unsafe { b.launch(Self::cfg((m as u32, 1, 1), 256))? };
        Ok(())
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
        let f = k.get(if out_f32 { "rms_norm_f" } else { "rms_norm_h" });
        let mut b = self.stream.launch_builder(f);
        b.arg(&out).arg(&x).arg(&w).arg(&n_i).arg(&eps);
        unsafe { b.launch(Self::cfg((rows as u32, 1, 1), 256))? };
        Ok(())
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
        let mut b = self.stream.launch_builder(k.get("rope_table"));
        b.arg(&cos)
            .arg(&sin)
            .arg(&pos)
            .arg(&inv_freq)
            .arg(&m_i)
            .arg(&p_i);
        unsafe { b.launch(Self::cfg((Self::blocks_for(m * pairs, 256), 1, 1), 256))? };
        Ok(())
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
        let mut b = self.stream.launch_builder(k.get("rope_split"));
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
            .arg(&dest.t0);
        unsafe { b.launch(Self::cfg((m as u32, 1, 1), 256))? };
        Ok(())
    }

    /// `out[t][i] = silu(gu[t][i]) · gu[t][ffn + i]` (16-bit out).
    pub fn swiglu(&self, k: &Kernels, out: u64, gu: u64, m: usize, ffn: usize) -> Result<()> {
        if m == 0 {
            return Ok(());
        }
        let (m_i, f_i) = (m as i32, ffn as i32);
        let mut b = self.stream.launch_builder(k.get("swiglu_h"));
        b.arg(&out).arg(&gu).arg(&m_i).arg(&f_i);
        unsafe { b.launch(Self::cfg((Self::blocks_for(m * ffn, 256), 1, 1), 256))? };
        Ok(())
    }

    pub fn to_half(&self, k: &Kernels, out: u64, x: u64, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        let mut b = self.stream.launch_builder(k.get("to_h16"));
        b.arg(&out).arg(&x).arg(&n64);
        unsafe { b.launch(Self::cfg((Self::blocks_for(n, 256), 1, 1), 256))? };
        Ok(())
    }

    pub fn to_f32(&self, k: &Kernels, out: u64, x: u64, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        let mut b = self.stream.launch_builder(k.get("to_f32"));
        b.arg(&out).arg(&x).arg(&n64);
        unsafe { b.launch(Self::cfg((Self::blocks_for(n, 256), 1, 1), 256))? };
        Ok(())
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
        let mut b = self.stream.launch_builder(k.get("fill_uniform_h"));
        b.arg(&out).arg(&n64).arg(&seed).arg(&bound);
        unsafe { b.launch(Self::cfg((Self::blocks_for(n, 256).min(65536), 1, 1), 256))? };
        Ok(())
    }

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
        let mut b = self.stream.launch_builder(k.get("fill_uniform_f"));
        b.arg(&out).arg(&n64).arg(&seed).arg(&lo).arg(&hi);
        unsafe { b.launch(Self::cfg((Self::blocks_for(n, 256).min(65536), 1, 1), 256))? };
        Ok(())
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
        let mut b = self.stream.launch_builder(k.get("argmax_rows"));
        b.arg(&idx).arg(&lse).arg(&logits).arg(&n_i);
        unsafe { b.launch(Self::cfg((rows as u32, 1, 1), 512))? };
        Ok(())
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
        let mut b = self.stream.launch_builder(k.get("rows_to_heads"));
        b.arg(&dst).arg(&src).arg(&l).arg(&n).arg(&dd);
        unsafe { b.launch(Self::cfg((Self::blocks_for(len * nkv * d, 256), 1, 1), 256))? };
        Ok(())
    }

    /// Splits that keep the GPU busy: about four waves of the 4-warp CTAs (two resident
    /// per SM), or, for decoding (`m * group <= 16`, one-warp CTAs), about six CTAs per
    /// SM; chunks of >= 256 keys.
    pub fn choose_splits(&self, m: usize, shape: HeadShape, total_keys: usize) -> usize {
        let (group, n_kv) = (shape.group(), shape.n_kv_heads);
        let rows = m * group;
        let (_, per_cta, _, _) = self.attention_kernels().launch(rows, shape.head_dim);
        let (ctas, target) = if rows <= 16 {
            (n_kv, 6 * self.sm_count())
        } else {
            (rows.div_ceil(per_cta) * n_kv, 8 * self.sm_count())
        };
        if ctas >= target / 2 {
            return 1;
        }
        let want = target.div_ceil(ctas.max(1));
        want.min(total_keys / 256).clamp(1, 512)
    }

    /// Attention of 16-bit `q` (`[m][nh d]`) over the planned keys. With one split the
    /// normalised output goes straight to `out` (16-bit); otherwise partials go to
    /// `scratch` and are merged into `out`. `out_f32`: write f32 O and `lse` instead.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        k: &Kernels,
        q: u64,
        m: usize,
        nh: usize,
        nkv: usize,
        plan_items: u64,
        plan_splits: u64,
        n_splits: usize,
        out: AttnOut,
        scratch: &mut AttnScratch,
    ) -> Result<()> {
        if m == 0 {
            return Ok(());
        }
        let d = k.head_dim;
        let group = nh / nkv;
        let scale_log2 = (1.0 / (d as f64).sqrt() * std::f64::consts::LOG2_E) as f32;
        let (m_i, g_i, nh_i) = (m as i32, group as i32, nh as i32);
        if n_splits > 1024 {
            return Err(CudaError::Invalid(format!(
                "{n_splits} attention splits (at most 1024)"
            )));
        }
        let (name, rows_per_cta, threads, smem) = self.attention_kernels().launch(m * group, d);
        let launch = LaunchConfig {
            grid_dim: (
                ((m * group).div_ceil(rows_per_cta)) as u32,
                nkv as u32,
                n_splits.max(1) as u32,
            ),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let direct = n_splits == 1 && matches!(out, AttnOut::Half(_));
        let null = 0u64;
        if direct {
            let AttnOut::Half(o) = out else {
                unreachable!()
            };
            let mut b = self.stream.launch_builder(k.get(name));
            b.arg(&q)
                .arg(&m_i)
                .arg(&g_i)
                .arg(&nh_i)
                .arg(&plan_items)
                .arg(&plan_splits)
                .arg(&scale_log2)
                .arg(&o)
                .arg(&null)
                .arg(&null);
            unsafe { b.launch(launch)? };
            return Ok(());
        }
        let splits = n_splits.max(1);
        scratch.ensure(self, splits * m * nh * d * 4, splits * nh * m * 4)?;
        let (po, pl) = (
            scratch.o.as_ref().unwrap().ptr(),
            scratch.lse.as_ref().unwrap().ptr(),
        );
        {
            let mut b = self.stream.launch_builder(k.get(name));
            b.arg(&q)
                .arg(&m_i)
                .arg(&g_i)
                .arg(&nh_i)
                .arg(&plan_items)
                .arg(&plan_splits)
                .arg(&scale_log2)
                .arg(&null)
                .arg(&po)
                .arg(&pl);
            unsafe { b.launch(launch)? };
        }
        let (oh, of, lf) = match out {
            AttnOut::Half(o) => (o, null, null),
            AttnOut::F32 { out, lse } => (null, out, lse),
        };
        let (s_i, d_i) = (splits as i32, d as i32);
        let mut b = self.stream.launch_builder(k.get("attn_merge"));
        b.arg(&oh)
            .arg(&of)
            .arg(&lf)
            .arg(&po)
            .arg(&pl)
            .arg(&s_i)
            .arg(&m_i)
            .arg(&nh_i)
            .arg(&d_i);
        // d x G threads, G an even number of split groups (d is a multiple of 16, so the
        // block is whole warps), about 512 threads.
        let groups = ((512 / d) & !1).max(2);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (m as u32, nh as u32, 1),
                block_dim: ((d * groups) as u32, 1, 1),
                shared_mem_bytes: 0,
            })?
        };
        Ok(())
    }

    /// Device memory (free, total) in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }

    /// Raw driver stream handle of the compute stream (for events).
    pub fn cu_stream(&self) -> drv_sys::CUstream {
        self.stream.cu_stream()
    }
}

/// Where attention writes: the 16-bit input of the output projection, or f32 `(O, lse)`
/// in [`crate::cpu::attention::Attended`]'s layout (for shards answering a query host).
#[derive(Debug, Clone, Copy)]
pub enum AttnOut {
    Half(u64),
    F32 { out: u64, lse: u64 },
}

/// Partial-result buffers of split attention, grown on demand.
#[derive(Default)]
pub struct AttnScratch {
    pub o: Option<DevBuf>,
    pub lse: Option<DevBuf>,
}

impl AttnScratch {
    pub fn ensure(&mut self, gpu: &Gpu, o_bytes: usize, lse_bytes: usize) -> Result<()> {
        if self.o.as_ref().is_none_or(|b| b.bytes() < o_bytes) {
            self.o = Some(gpu.alloc(o_bytes)?);
        }
        if self.lse.as_ref().is_none_or(|b| b.bytes() < lse_bytes) {
            self.lse = Some(gpu.alloc(lse_bytes)?);
        }
        Ok(())
    }
}

/// Where a layer's new K and V rows go: element `(kv head h, new token t, i)` at
/// `k + 2 * (h * head_stride + (t0 + t) * row_stride + i)`.
#[derive(Debug, Clone, Copy)]
pub struct KvDest {
    pub k: u64,
    pub v: u64,
    pub head_stride: i64,
    pub row_stride: i32,
    pub t0: i32,
}

/// A growable device buffer for small per-call tables (attention plans).
#[derive(Default)]
pub struct TableBuf {
    buf: Option<DevBuf>,
}

impl TableBuf {
    /// Uploads `data` (stream-ordered) and returns its device address.
    pub fn upload<T: bytemuck::Pod>(&mut self, gpu: &Gpu, data: &[T]) -> Result<u64> {
        let bytes = std::mem::size_of_val(data);
        if self.buf.as_ref().is_none_or(|b| b.bytes() < bytes) {
            self.buf = Some(gpu.alloc(bytes.next_power_of_two().max(4096))?);
        }
        let ptr = self.buf.as_ref().unwrap().ptr();
        gpu.upload(ptr, data)?;
        Ok(ptr)
    }
}

/// Uploads a layer-indexed set of attention plans in one copy; returns per layer the
/// device addresses of its items and split offsets, and the split count.
pub fn upload_plans(
    gpu: &Gpu,
    table: &mut TableBuf,
    plans: &[AttnPlan],
) -> Result<Vec<(u64, u64, usize)>> {
    let mut bytes: Vec<u8> = Vec::new();
    let mut offsets = Vec::with_capacity(plans.len());
    for p in plans {
        let io = bytes.len();
        bytes.extend_from_slice(bytemuck::cast_slice(&p.items));
        while !bytes.len().is_multiple_of(16) {
            bytes.push(0);
        }
        let so = bytes.len();
        bytes.extend_from_slice(bytemuck::cast_slice(&p.split_begin));
        while !bytes.len().is_multiple_of(16) {
            bytes.push(0);
        }
        offsets.push((io, so, p.n_splits()));
    }
    let base = table.upload(gpu, &bytes)?;
    Ok(offsets
        .into_iter()
        .map(|(io, so, n)| (base + io as u64, base + so as u64, n))
        .collect())
}
