//! One GPU and its memory: context, streams, cuBLAS, device and pinned buffers, copies
//! and the matrix product. Everything works on raw device addresses (`u64`) of
//! [`DevBuf`]s so that views into buffers (a layer, a token offset) cost nothing; ordering
//! is by stream: every kernel and cuBLAS call runs on [`Gpu::stream`], block loads on
//! [`Gpu::copy_stream`], joined with events. The kernels are in `kernels.rs` (compiled),
//! `launch.rs` (element-wise launches) and `attention.rs` (planning and launch).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use cudarc::cublas::{CudaBlas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaGraph, CudaSlice, CudaStream, DevicePtr, result as drv, sys as drv_sys,
};

use super::attention::AttnKernels;
use super::kernels::Kernels;
use super::{CudaError, DeviceInfo, Result};

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

/// Bytes of cuBLAS's workspace.
const BLAS_WORKSPACE: usize = 32 << 20;

/// Gives cuBLAS `workspace` for every later call on `blas`.
fn set_blas_workspace(blas: &CudaBlas, workspace: &DevBuf) -> Result<()> {
    // SAFETY: the workspace outlives the handle (both owned by the `Gpu`, the handle
    // dropped first: fields drop in declaration order).
    let status = unsafe {
        blas_sys::cublasSetWorkspace_v2(
            *blas.handle(),
            workspace.ptr() as *mut std::ffi::c_void,
            workspace.bytes(),
        )
    };
    if status != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(CudaError::Cublas(cudarc::cublas::result::CublasError(
            status,
        )));
    }
    Ok(())
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

    /// The address of `buf`, first (re)allocated on `gpu` when it holds fewer than `bytes`
    /// (scratch reused call after call, grown on demand).
    pub fn grown(gpu: &Gpu, buf: &mut Option<DevBuf>, bytes: usize) -> Result<u64> {
        if buf.as_ref().is_none_or(|b| b.bytes < bytes) {
            *buf = Some(gpu.alloc(bytes)?);
        }
        Ok(buf.as_ref().map_or(0, DevBuf::ptr))
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

    pub fn as_u8_mut(&mut self) -> &mut [u8] {
        // SAFETY: the allocation holds `bytes` bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }

    pub fn as_u16_mut(&mut self) -> &mut [u16] {
        // SAFETY: the allocation holds `bytes` bytes and is 16-byte aligned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u16, self.bytes / 2) }
    }

    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        // SAFETY: the allocation holds `bytes` bytes and is page-aligned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut f32, self.bytes / 4) }
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

/// How an attention plan cuts its keys into splits and how the splits are merged
/// (issue 13 item 3; README, "Decode as a CUDA graph"). Each field has an env switch for
/// A/B runs; the benchmark also switches them within one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitTuning {
    /// Splits of (nearly) equal key counts across segment boundaries ([`AttnPlan::new`]);
    /// off: every segment cut on its own into fixed-size chunks, its remainder a short
    /// split ([`AttnPlan::per_segment`], the earlier plan). Env `STARKV_SPLIT_PLAN=segment`
    /// turns it off.
    ///
    /// [`AttnPlan::new`]: super::AttnPlan::new
    /// [`AttnPlan::per_segment`]: super::AttnPlan::per_segment
    pub balanced: bool,
    /// With `balanced`: cut points on whole 64-key tiles of each segment, splits of equal
    /// tile counts ([`AttnPlan::tiles`]; not yet measured on a GPU, so off). Env
    /// `STARKV_SPLIT_PLAN=tiles` turns it on.
    ///
    /// [`AttnPlan::tiles`]: super::AttnPlan::tiles
    pub tile_cuts: bool,
    /// The split merge spreads each (token, head) over column chunks, so that about one
    /// CTA per SM shares the reads; off: one CTA per (token, head) (the earlier merge).
    /// Env `STARKV_MERGE_WIDE=0` turns it off.
    pub wide_merge: bool,
    /// The split merge is launched as a programmatic dependent of the attention kernel
    /// (it waits on the device), hiding its launch. Env `STARKV_MERGE_PDL=1` turns it on.
    pub merge_pdl: bool,
    /// One-warp decode CTAs per SM that [`Gpu::choose_splits`] plans for (0: the default,
    /// [`SplitTuning::DECODE_PER_SM`]); env `STARKV_DECODE_PER_SM=N`.
    pub decode_per_sm: usize,
    /// Decode attention (at most 16 rows per KV head, the one-warp `attn_fwd_w1` and its
    /// 8-bit twins) merges its splits itself: the last split CTA of each group of splits
    /// to finish merges the group, the last group merger the groups (`fm_tail` in
    /// attention.cu), instead of a separate `attn_merge` launch. Off: it made the decode
    /// step slower, not faster (8B shape at 128K 9.89-9.99 against 9.08-9.17 ms/token,
    /// SmolLM2 at 8K 1.19-1.25 against 0.89-0.95; H200, 2026-12-02, PERF_NOTES.md). Env
    /// `STARKV_FUSED_MERGE=1` turns it on.
    pub fused_merge: bool,
    /// Splits per group of the fused merge (0: about the square root of the split count;
    /// kept to at most 32 splits a group and 32 groups); env `STARKV_FUSED_MERGE_GROUP=N`.
    pub merge_group: usize,
}

impl SplitTuning {
    fn from_env() -> Self {
        let is = |var: &str, values: &[&str]| {
            std::env::var(var)
                .ok()
                .is_some_and(|v| values.contains(&v.as_str()))
        };
        Self {
            balanced: !is("STARKV_SPLIT_PLAN", &["segment", "0", "off"]),
            tile_cuts: is("STARKV_SPLIT_PLAN", &["tiles"]),
            wide_merge: !is("STARKV_MERGE_WIDE", &["0", "off", "false"]),
            merge_pdl: is("STARKV_MERGE_PDL", &["1", "on", "true"]),
            decode_per_sm: std::env::var("STARKV_DECODE_PER_SM")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            fused_merge: is("STARKV_FUSED_MERGE", &["1", "on", "true"]),
            merge_group: std::env::var("STARKV_FUSED_MERGE_GROUP")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        }
    }

    /// Splits per group of the fused merge of `n` splits (see
    /// [`SplitTuning::merge_group`]): a group count and a group size of at most 32 each
    /// (n <= 1024).
    pub fn fused_merge_group(&self, n: usize) -> usize {
        let n = n.max(1);
        let want = match self.merge_group {
            0 => n.isqrt() + usize::from(n.isqrt() * n.isqrt() < n),
            g => g,
        };
        want.min(n).clamp(n.div_ceil(32).min(32), 32)
    }

    /// The default of [`SplitTuning::decode_per_sm`]: four of the six one-warp CTAs that
    /// fit an H200 SM (34.8 KB of shared memory each at head_dim 128).
    pub const DECODE_PER_SM: usize = 4;

    /// One-warp decode CTAs per SM to plan for.
    pub fn decode_per_sm(&self) -> usize {
        match self.decode_per_sm {
            0 => Self::DECODE_PER_SM,
            n => n,
        }
    }

    /// A number that tells the choices apart (part of a decode graph's key).
    pub fn code(&self) -> u64 {
        self.balanced as u64
            | (self.wide_merge as u64) << 1
            | (self.merge_pdl as u64) << 2
            | (self.tile_cuts as u64) << 3
            | (self.decode_per_sm as u64) << 4
            | (self.fused_merge as u64) << 20
            | (self.merge_group as u64) << 21
    }
}

/// One GPU with its streams, cuBLAS handle and kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    /// Kernels and matrix products.
    pub stream: Arc<CudaStream>,
    /// Host-to-device block loads.
    pub copy_stream: Arc<CudaStream>,
    /// cuBLAS, and whether its handle is bound to `graph_stream` (set per call).
    blas: Mutex<(CudaBlas, bool)>,
    /// cuBLAS's workspace, given explicitly so that a product captured into a graph never
    /// makes cuBLAS allocate (32 MiB, its default on Hopper).
    blas_workspace: DevBuf,
    pub dtype: HalfType,
    pub info: DeviceInfo,
    /// Compiled kernels by head dimension (see `kernels.rs`).
    pub(super) kernels: Mutex<HashMap<usize, Arc<Kernels>>>,
    /// NVRTC target architecture.
    pub(super) arch: &'static str,
    /// Which attention kernels run (see [`AttnKernels`]).
    pub(super) attn: Mutex<AttnKernels>,
    /// The Hopper attention kernels, compiled on first use (see `kernels.rs`).
    pub(super) sm90: Mutex<Option<HashMap<&'static str, cudarc::driver::CudaFunction>>>,
    /// Whether decode steps replay a captured CUDA graph (see
    /// [`super::CudaLlama::decode_greedy`]); env `STARKV_DECODE_GRAPHS=0` turns it off.
    decode_graphs: AtomicBool,
    /// Whether one-token forward passes multiply through the fused one-row kernels of
    /// `gemv.rs` (norm, RoPE, SwiGLU and residual adds folded in) instead of cuBLAS and
    /// separate element-wise kernels; env `STARKV_FUSED_DECODE=0` turns it off.
    fused_decode: AtomicBool,
    /// Whether a decode step's greedy pick runs over many CTAs (`argmax_wide`) instead
    /// of one (`argmax_rows`); env `STARKV_WIDE_ARGMAX=0` turns it off.
    wide_argmax: AtomicBool,
    /// Whether the generation loop's greedy answers pick their tokens on the device with
    /// pipelined steps ([`super::CudaLlama::decode_greedy_pipelined`]) instead of taking
    /// each step's logits to the host (the selftest's "tokens picked on the GPU
    /// (pipelined) == logits path" row checks both give the same answer); env
    /// `STARKV_DEVICE_GREEDY=0` turns it off.
    device_greedy: AtomicBool,
    /// Whether a cold load of an 8-bit document splits its blocks between loading and
    /// re-encoding (re-encoded blocks quantised on the device, `quantize_rows`) instead of
    /// loading them all. Off until run on a GPU (written after the session's device time
    /// ran out; the selftest's rows turn it on for themselves); env
    /// `STARKV_COLD_SPLIT8=1` turns it on.
    cold_split8: AtomicBool,
    /// How attention plans cut their keys into splits and merge them (see
    /// [`SplitTuning`]; the benchmark switches them for same-run A/B rows).
    split_tuning: Mutex<SplitTuning>,
    /// The capture stream of decode graphs: private, so that nothing another thread
    /// queues meanwhile (a block freed by a tier eviction frees on `stream`) can land in
    /// a graph. Graphs are launched on `stream`.
    graph_stream: Arc<CudaStream>,
    /// The thread capturing on `graph_stream`: its launches go there.
    capturing: Mutex<Option<ThreadId>>,
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
        let attn = AttnKernels::from_env(info.compute_capability);
        let ctx = CudaContext::new(ordinal)?;
        // Ordering is explicit (one compute stream, events for the copy stream).
        // SAFETY: no CudaSlice is shared between streams without an event join.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let copy_stream = ctx.new_stream()?;
        let graph_stream = ctx.new_stream()?;
        let blas = CudaBlas::new(stream.clone())?;
        let blas_workspace = {
            // SAFETY: scratch for cuBLAS only.
            let buf = unsafe { stream.alloc::<u8>(BLAS_WORKSPACE)? };
            let ptr = buf.device_ptr(&stream).0;
            DevBuf {
                _buf: buf,
                ptr,
                bytes: BLAS_WORKSPACE,
            }
        };
        set_blas_workspace(&blas, &blas_workspace)?;
        Ok(Arc::new(Self {
            ctx,
            stream,
            copy_stream,
            blas: Mutex::new((blas, false)),
            blas_workspace,
            dtype,
            info,
            kernels: Mutex::new(HashMap::new()),
            arch,
            attn: Mutex::new(attn),
            sm90: Mutex::new(None),
            decode_graphs: AtomicBool::new(!matches!(
                std::env::var("STARKV_DECODE_GRAPHS").as_deref(),
                Ok("0" | "off" | "false")
            )),
            fused_decode: AtomicBool::new(!matches!(
                std::env::var("STARKV_FUSED_DECODE").as_deref(),
                Ok("0" | "off" | "false")
            )),
            wide_argmax: AtomicBool::new(!matches!(
                std::env::var("STARKV_WIDE_ARGMAX").as_deref(),
                Ok("0" | "off" | "false")
            )),
            device_greedy: AtomicBool::new(!matches!(
                std::env::var("STARKV_DEVICE_GREEDY").as_deref(),
                Ok("0" | "off" | "false")
            )),
            cold_split8: AtomicBool::new(matches!(
                std::env::var("STARKV_COLD_SPLIT8").as_deref(),
                Ok("1" | "on" | "true")
            )),
            split_tuning: Mutex::new(SplitTuning::from_env()),
            graph_stream,
            capturing: Mutex::new(None),
        }))
    }

    /// Turns CUDA-graph decode steps on or off (benchmarks and the selftest compare both;
    /// a failed capture turns them off for this GPU).
    pub fn set_decode_graphs(&self, on: bool) {
        self.decode_graphs.store(on, Ordering::Relaxed);
    }

    pub fn decode_graphs(&self) -> bool {
        self.decode_graphs.load(Ordering::Relaxed)
    }

    /// Turns the fused one-row decode kernels on or off (the selftest and the benchmark
    /// compare them with the cuBLAS path).
    pub fn set_fused_decode(&self, on: bool) {
        self.fused_decode.store(on, Ordering::Relaxed);
    }

    pub fn fused_decode(&self) -> bool {
        self.fused_decode.load(Ordering::Relaxed)
    }

    /// Turns the many-CTA greedy pick of decode steps on or off (benchmarks compare both).
    pub fn set_wide_argmax(&self, on: bool) {
        self.wide_argmax.store(on, Ordering::Relaxed);
    }

    pub fn wide_argmax(&self) -> bool {
        self.wide_argmax.load(Ordering::Relaxed)
    }

    /// Turns device-picked, pipelined greedy generation on or off (see the field).
    pub fn set_device_greedy(&self, on: bool) {
        self.device_greedy.store(on, Ordering::Relaxed);
    }

    pub fn device_greedy(&self) -> bool {
        self.device_greedy.load(Ordering::Relaxed)
    }

    /// Turns the split of 8-bit documents' cold loads on or off (see the field).
    pub fn set_cold_split8(&self, on: bool) {
        self.cold_split8.store(on, Ordering::Relaxed);
    }

    pub fn cold_split8(&self) -> bool {
        self.cold_split8.load(Ordering::Relaxed)
    }

    /// Sets how attention plans split their keys and merge the splits (benchmarks and the
    /// selftest compare the choices).
    pub fn set_split_tuning(&self, tuning: SplitTuning) {
        *self.split_tuning.lock().unwrap() = tuning;
    }

    pub fn split_tuning(&self) -> SplitTuning {
        *self.split_tuning.lock().unwrap()
    }

    /// Whether the calling thread is capturing a graph (see [`Gpu::capture`]).
    fn captures_here(&self) -> bool {
        *self.capturing.lock().unwrap() == Some(std::thread::current().id())
    }

    /// The stream the calling thread's kernels and products go to: the graph stream
    /// while it captures, else the compute stream.
    pub(super) fn exec_stream(&self) -> &Arc<CudaStream> {
        if self.captures_here() {
            &self.graph_stream
        } else {
            &self.stream
        }
    }

    /// Captures the kernels and products `launch` queues on this thread as a graph (on
    /// the private graph stream; nothing runs). `launch` must not allocate, copy or
    /// synchronise. Launch the result with [`Gpu::launch_graph`].
    pub fn capture(&self, launch: impl FnOnce() -> Result<()>) -> Result<Option<CudaGraph>> {
        self.ctx.bind_to_thread()?;
        self.graph_stream
            .begin_capture(drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        *self.capturing.lock().unwrap() = Some(std::thread::current().id());
        let launched = launch();
        *self.capturing.lock().unwrap() = None;
        let ended = self
            .graph_stream
            .end_capture(drv_sys::CUgraphInstantiate_flags(0));
        launched?;
        Ok(ended?)
    }

    /// Queues a captured graph on the compute stream.
    pub fn launch_graph(&self, graph: &CudaGraph) -> Result<()> {
        self.ctx.bind_to_thread()?;
        // SAFETY: the exec belongs to `graph`, alive for the call; graphs captured by
        // [`Gpu::capture`] on this context.
        unsafe { drv::graph::launch(graph.cu_graph_exec(), self.stream.cu_stream())? };
        Ok(())
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

    /// Copies `bytes` from `src` into a pinned buffer at byte `offset` on the compute
    /// stream, without waiting: synchronise before reading the buffer.
    pub fn download_pinned(
        &self,
        dst: &mut PinnedBuf,
        offset: usize,
        src: u64,
        bytes: usize,
    ) -> Result<()> {
        if offset + bytes > dst.bytes() {
            return Err(CudaError::Invalid(format!(
                "{bytes} bytes at {offset} do not fit a pinned buffer of {}",
                dst.bytes()
            )));
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: the range lies inside the pinned allocation (checked above); src holds
        // at least `bytes` bytes.
        unsafe {
            let d = std::slice::from_raw_parts_mut(dst.ptr.add(offset), bytes);
            drv::memcpy_dtoh_async(d, src, self.stream.cu_stream())?;
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
        let stream = self.exec_stream().clone();
        let on_graph = Arc::ptr_eq(&stream, &self.graph_stream);
        let mut guard = self.blas.lock().unwrap();
        if guard.1 != on_graph {
            // SAFETY: the handle is only used under this lock; later calls rebind it.
            unsafe { guard.0.set_stream(stream)? };
            // Setting the stream resets the workspace to cuBLAS's own pool.
            set_blas_workspace(&guard.0, &self.blas_workspace)?;
            guard.1 = on_graph;
        }
        let blas = &guard.0;
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

    /// Device memory (free, total) in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }

    /// Raw driver stream handle of the compute stream (for events).
    pub fn cu_stream(&self) -> drv_sys::CUstream {
        self.stream.cu_stream()
    }
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
