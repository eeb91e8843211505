//! The cold path of a phase-2 query on a GPU: the context blocks that are not resident
//! come from the store and from re-encoding their source tokens, both at once (see
//! [`crate::cold_split`] for how the blocks are split between the two).
//!
//! - Loading: the [`BlockReader`] (the service, over the store) decodes and verifies a
//!   whole block straight into page-locked staging in the GPU's 16-bit type (the store
//!   keeps blocks in that type on a GPU host: no conversion, no f32 copy on the host);
//!   the copy stream moves it to the device while the next block is read into the other
//!   staging buffer. Staging buffers are kept in a [`StagingPool`] across queries
//!   (allocating 1 GB of pinned memory costs ~25 ms).
//! - Re-encoding: a second thread runs phase 1 for its blocks under the model lock
//!   (released between blocks, so other requests interleave), computing the anchor once.
//! - Every block of the query is allocated before either worker starts, and the copy
//!   stream waits for those stream-ordered allocations once; the loader never touches
//!   the compute stream, the encoder never the copy stream.
//! - A block that fails to read (corrupt, missing) is re-encoded instead: the answer is
//!   unaffected; the store has marked it for repair.
//! - An 8-bit document (`kv8`): its stored layers (per-row f16 scales, then the 8-bit
//!   values) come into staging as they are and go to the device in the 8-bit tier's
//!   layout. A block that fails to read is re-encoded in 16 bits and quantised on the
//!   host like an ingest's block. With [`Gpu::cold_split8`] (off by default: not yet run
//!   on a GPU) the split works for 8-bit documents too, the re-encoded blocks quantised
//!   on the device bit for bit as the store quantises ([`GpuBlock::quantize_into`]).
//!
//! Phase 2 then attends over all blocks at once. Compared with streaming the layers into
//! a running forward pass (what [`super::star::StreamedBlocks`] does for host blocks),
//! the cold query waits for the last block before its first layer; phase 2 of a
//! 30-token question takes ~20 ms at 128K tokens on an H200 while loading those blocks
//! takes seconds, so the overlap would save ~1%.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cudarc::driver::CudaEvent;

use super::star::{GpuBlock, encode_block, encode_block_into};
use super::{CudaError, CudaLlama, Gpu, HalfType, PinnedBuf, Result};
use crate::cold_split::{Side, SplitQueue};
use crate::kv8::Kv8Format;
use crate::star::StarConfig;

/// Host-side source of stored blocks (the store, through the service).
pub trait BlockReader: Sync {
    /// Fills `dst` with context block `block`: for each layer in order, K `[n_kv][len][d]`
    /// then V, as 16-bit values of `dtype`. An error means the block is unusable (it is
    /// re-encoded); the message is logged.
    fn read_block(
        &self,
        block: usize,
        dtype: HalfType,
        dst: &mut [u16],
    ) -> std::result::Result<(), String>;

    /// Fills `dst` with block `block` of a document stored in 8 bits as `format`: for
    /// each layer in order, the stored layer's bytes (the f16 scales of K's rows then of
    /// V's, one per row of `head_dim` values, then K's and V's values, each
    /// `[n_kv][len][d]`). Readers without 8-bit blocks keep this default.
    fn read_block_8bit(
        &self,
        block: usize,
        format: Kv8Format,
        dst: &mut [u8],
    ) -> std::result::Result<(), String> {
        let _ = (block, dst);
        Err(format!("this reader holds no {format:?} blocks"))
    }
}

/// Which workers a cold load may use (the service uses [`ColdMode::Both`]; the others
/// are the benchmark's baselines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColdMode {
    Load,
    Encode,
    Both,
}

/// Seconds per token each side took in earlier cold loads (loading is per token too:
/// bytes per token are fixed for one model).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ColdRates {
    pub load_s_per_token: Option<f64>,
    pub encode_s_per_token: Option<f64>,
}

/// What one cold load did.
#[derive(Debug, Clone, Default)]
pub struct ColdStats {
    pub loaded_blocks: usize,
    pub encoded_blocks: usize,
    /// Blocks whose read failed (re-encoded instead), with the reason.
    pub failed_reads: Vec<(usize, String)>,
    pub bytes_loaded: usize,
    /// From the start until every block was on the device.
    pub wall: Duration,
    /// Time the loader spent per block, and the encoder (anchor excluded).
    pub load_busy: Duration,
    pub encode_busy: Duration,
    pub anchor: Duration,
    /// Rates measured here (for the next query's estimates).
    pub rates: ColdRates,
}

/// Page-locked staging buffers kept between queries.
#[derive(Default)]
pub struct StagingPool {
    free: Mutex<Vec<PinnedBuf>>,
}

impl StagingPool {
    /// At most this many idle buffers are kept.
    const KEEP: usize = 4;

    fn take(&self, gpu: &Gpu, bytes: usize) -> Result<PinnedBuf> {
        let found = {
            let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
            free.iter()
                .position(|b| b.bytes() >= bytes)
                .map(|i| free.swap_remove(i))
        };
        match found {
            Some(b) => Ok(b),
            None => PinnedBuf::new(gpu, bytes),
        }
    }

    fn give(&self, buf: PinnedBuf) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        free.push(buf);
        if free.len() > Self::KEEP {
            free.sort_by_key(|b| std::cmp::Reverse(b.bytes()));
            free.truncate(Self::KEEP);
        }
    }

    /// Bytes of idle pinned memory held.
    pub fn idle_bytes(&self) -> usize {
        let free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        free.iter().map(PinnedBuf::bytes).sum()
    }
}

/// One cold load: brings context blocks `wanted` of `tokens` (split by `config`) onto the
/// device, returned in `wanted`'s order.
pub struct ColdLoad<'a> {
    pub gpu: &'a Arc<Gpu>,
    /// The model (its lock is taken per encoded block).
    pub model: &'a Mutex<CudaLlama>,
    pub staging: &'a StagingPool,
    pub tokens: &'a [u32],
    pub config: StarConfig,
    pub reader: &'a dyn BlockReader,
    pub mode: ColdMode,
    pub rates: ColdRates,
    /// The document's blocks are stored in 8 bits (`kv_dtype` int8 or fp8): loaded into
    /// 8-bit device blocks; only loaded (whatever `mode` says) unless
    /// [`Gpu::cold_split8`] is on.
    pub kv8: Option<Kv8Format>,
}

fn lock<'m>(gpu: &Gpu, model: &'m Mutex<CudaLlama>) -> Result<MutexGuard<'m, CudaLlama>> {
    gpu.ctx.bind_to_thread()?;
    Ok(model.lock().unwrap_or_else(PoisonError::into_inner))
}

impl ColdLoad<'_> {
    fn range(&self, i: usize) -> Range<usize> {
        let b = self.config.block_size;
        i * b..((i + 1) * b).min(self.tokens.len())
    }

    pub fn run(&self, wanted: &[usize]) -> Result<(Vec<Arc<GpuBlock>>, ColdStats)> {
        self.config.validate()?;
        let started = Instant::now();
        let gpu = self.gpu;
        let (shape, n_layers) = {
            let m = lock(gpu, self.model)?;
            (m.head_shape(), m.config().n_layers)
        };
        gpu.ctx.bind_to_thread()?;
        let mut blocks = Vec::with_capacity(wanted.len());
        for &i in wanted {
            let r = self.range(i);
            if r.is_empty() {
                return Err(CudaError::Invalid(format!("block {i} is past the context")));
            }
            blocks.push(match self.kv8 {
                None => GpuBlock::alloc(gpu, r.start, r.len(), shape, n_layers)?,
                Some(f) => GpuBlock::alloc_kv8(gpu, r.start, r.len(), shape, n_layers, f)?,
            });
        }
        let allocated = gpu.ctx.new_event(None)?;
        allocated.record(&gpu.stream)?;
        gpu.copy_stream.wait(&allocated)?;

        let per_block = |rate: Option<f64>| rate.map(|r| r * self.config.block_size as f64);
        let sides = if self.kv8.is_some() && !gpu.cold_split8() {
            (true, false)
        } else {
            (self.mode != ColdMode::Encode, self.mode != ColdMode::Load)
        };
        let queue = SplitQueue::new(
            (0..wanted.len()).collect(),
            per_block(self.rates.load_s_per_token),
            per_block(self.rates.encode_s_per_token),
            sides,
        );
        let mut stats = ColdStats::default();
        let (load_result, encode_result) = std::thread::scope(|s| {
            let encoder = s.spawn(|| self.encode_worker(&queue, wanted, &blocks));
            let loaded = self.load_worker(&queue, wanted, &blocks);
            let encoded = encoder
                .join()
                .unwrap_or_else(|_| Err(CudaError::Invalid("the encoder thread panicked".into())));
            (loaded, encoded)
        });
        // Let the copies land before anything can free their staging or the blocks.
        gpu.ctx.bind_to_thread()?;
        gpu.copy_stream.synchronize()?;
        let load = load_result?;
        let mut encode = encode_result?;
        // Blocks nobody took (a failed read after the encoder stopped): encode them here.
        let leftover = queue.leftover();
        if !leftover.is_empty() {
            let mut model = lock(gpu, self.model)?;
            for j in leftover {
                match self.kv8 {
                    // The host quantiser (the path that ran on a GPU) unless the split,
                    // with the device quantiser, is on.
                    Some(format) if !gpu.cold_split8() => {
                        let wide = self.encode_wide(
                            &mut model,
                            &mut encode.anchor,
                            wanted[j],
                            &blocks[j],
                        )?;
                        blocks[j] = GpuBlock::upload(gpu, &wide.download(gpu)?.to_8bit(format))?;
                    }
                    _ => self.encode_to(&mut model, &mut encode.anchor, wanted[j], &blocks[j])?,
                }
                encode.blocks += 1;
            }
        }
        gpu.synchronize()?;
        drop(encode.anchor);

        stats.loaded_blocks = load.blocks;
        stats.bytes_loaded = load.bytes;
        stats.failed_reads = load.failed;
        stats.load_busy = load.busy;
        stats.encoded_blocks = encode.blocks;
        stats.encode_busy = encode.busy;
        stats.anchor = encode.anchor_time;
        stats.wall = started.elapsed();
        let b = self.config.block_size as f64;
        let (l, e) = queue.measured();
        stats.rates = ColdRates {
            load_s_per_token: l.map(|s| s / b),
            encode_s_per_token: e.map(|s| s / b),
        };
        Ok((blocks.into_iter().map(Arc::new).collect(), stats))
    }

    fn anchor_len(&self) -> usize {
        self.config.anchor_size.min(self.tokens.len())
    }

    /// Whether block `i`'s KV is rows of an anchor longer than one block (`a = k * b`).
    fn inside_long_anchor(&self, i: usize) -> bool {
        let r = self.range(i);
        self.anchor_len() > r.len() && r.end <= self.anchor_len()
    }

    /// Before block `i` is encoded: the anchor, encoded alone unless block 0 will provide
    /// it as its prefix. Returns whether it had to be computed.
    fn ensure_anchor(
        &self,
        model: &mut CudaLlama,
        anchor: &mut Option<GpuBlock>,
        i: usize,
    ) -> Result<bool> {
        if anchor.is_some() || (i == 0 && !self.inside_long_anchor(0)) {
            return Ok(false);
        }
        *anchor = Some(encode_block(
            model,
            &self.tokens[..self.anchor_len()],
            0,
            None,
        )?);
        Ok(true)
    }

    /// Phase 1 of block `i` into `block`, as [`crate::star::Phase1`] defines it: block 0
    /// alone (its prefix kept as the anchor), a block inside a multi-block anchor as rows
    /// of the anchor, any other block over the anchor after its lead.
    fn encode_one(
        &self,
        model: &mut CudaLlama,
        anchor: &mut Option<GpuBlock>,
        i: usize,
        block: &GpuBlock,
    ) -> Result<()> {
        let range = self.range(i);
        self.ensure_anchor(model, anchor, i)?;
        if self.inside_long_anchor(i) {
            let a = anchor.as_ref().expect("ensured above");
            let rows = a.rows(self.gpu, range)?;
            for l in 0..block.n_layers() {
                let (src, dst) = (rows.layer_ptrs(l), block.layer_ptrs(l));
                let bytes = block.n_bytes() / block.n_layers() / 2;
                self.gpu.copy_d2d(dst.0, src.0, bytes)?;
                self.gpu.copy_d2d(dst.1, src.1, bytes)?;
            }
            return Ok(());
        }
        let lead = &self.tokens[self.config.lead(range.clone(), self.anchor_len())];
        let tokens = &self.tokens[range];
        if i == 0 {
            encode_block_into(model, &[], tokens, None, block)?;
            if anchor.is_none() {
                *anchor = Some(block.prefix(self.gpu, self.anchor_len())?);
            }
            return Ok(());
        }
        encode_block_into(model, lead, tokens, anchor.as_ref(), block)
    }

    /// Phase 1 of block `i` into `block`: in place for a 16-bit block; for an 8-bit one
    /// into a 16-bit block first, then quantised on the device as the store quantises.
    fn encode_to(
        &self,
        model: &mut CudaLlama,
        anchor: &mut Option<GpuBlock>,
        i: usize,
        block: &GpuBlock,
    ) -> Result<()> {
        if block.kv8_format().is_none() {
            return self.encode_one(model, anchor, i, block);
        }
        let wide = self.encode_wide(model, anchor, i, block)?;
        wide.quantize_into(self.gpu, model.kernels(), block)
    }

    /// Phase 1 of block `i` into a new 16-bit block of `like`'s rows and layers.
    fn encode_wide(
        &self,
        model: &mut CudaLlama,
        anchor: &mut Option<GpuBlock>,
        i: usize,
        like: &GpuBlock,
    ) -> Result<GpuBlock> {
        let wide = GpuBlock::alloc(self.gpu, like.start, like.len, like.shape, like.n_layers())?;
        self.encode_one(model, anchor, i, &wide)?;
        Ok(wide)
    }

    fn encode_worker(
        &self,
        queue: &SplitQueue,
        wanted: &[usize],
        blocks: &[GpuBlock],
    ) -> Result<EncodeDone> {
        let mut done = EncodeDone::default();
        while let Some(j) = queue.next(Side::Encode, Instant::now()) {
            let mut model = lock(self.gpu, self.model)?;
            let t = Instant::now();
            if self.ensure_anchor(&mut model, &mut done.anchor, wanted[j])? {
                self.gpu.synchronize()?;
                done.anchor_time += t.elapsed();
            }
            let t = Instant::now();
            self.encode_to(&mut model, &mut done.anchor, wanted[j], &blocks[j])?;
            // Timed to completion: the split needs the real time per block.
            self.gpu.synchronize()?;
            drop(model);
            let took = t.elapsed();
            queue.done(Side::Encode, took);
            done.blocks += 1;
            done.busy += took;
        }
        Ok(done)
    }

    fn load_worker(
        &self,
        queue: &SplitQueue,
        wanted: &[usize],
        blocks: &[GpuBlock],
    ) -> Result<LoadDone> {
        let gpu = self.gpu;
        let mut done = LoadDone::default();
        let Some(first) = queue.next(Side::Load, Instant::now()) else {
            return Ok(done);
        };
        let most = blocks.iter().map(|b| b.n_bytes()).max().unwrap_or(0);
        let mut staging = [self.staging.take(gpu, most)?, self.staging.take(gpu, most)?];
        let mut in_flight: [Option<CudaEvent>; 2] = [None, None];
        let mut next = Some(first);
        let mut slot = 0;
        let result = (|| -> Result<()> {
            while let Some(j) = next {
                let t = Instant::now();
                if let Some(e) = in_flight[slot].take() {
                    e.synchronize()?;
                }
                let block = &blocks[j];
                let n_bytes = block.n_bytes();
                let read = match self.kv8 {
                    None => {
                        let dst = &mut staging[slot].as_u16_mut()[..n_bytes / 2];
                        self.reader.read_block(wanted[j], gpu.dtype, dst)
                    }
                    Some(format) => {
                        let dst = &mut staging[slot].as_u8_mut()[..n_bytes];
                        self.reader.read_block_8bit(wanted[j], format, dst)
                    }
                };
                match read {
                    Err(why) => {
                        tracing::warn!(block = wanted[j], %why, "stored block unusable: re-encoding it");
                        done.failed.push((wanted[j], why));
                        queue.requeue(j);
                    }
                    Ok(()) => {
                        gpu.ctx.bind_to_thread()?;
                        // SAFETY: the staging buffer holds the block's bytes and is
                        // neither written nor freed until this slot's event completes.
                        unsafe { copy_block_async(gpu, &staging[slot], block)? };
                        let event = gpu.ctx.new_event(None)?;
                        event.record(&gpu.copy_stream)?;
                        in_flight[slot] = Some(event);
                        slot ^= 1;
                        done.blocks += 1;
                        done.bytes += n_bytes;
                        let took = t.elapsed();
                        done.busy += took;
                        queue.done(Side::Load, took);
                    }
                }
                next = queue.next(Side::Load, Instant::now());
            }
            Ok(())
        })();
        // The staging goes back to the pool only once its copies have landed.
        let landed = in_flight.iter().flatten().try_for_each(|e| e.synchronize());
        if landed.is_ok() {
            for b in staging {
                self.staging.give(b);
            }
        } else {
            // Copies may still read the buffers: leak them rather than free them.
            std::mem::forget(staging);
        }
        result?;
        landed?;
        Ok(done)
    }
}

/// Queues on the copy stream the copies of a block read into `staging` into `block`: per
/// layer K then V for a 16-bit block; for an 8-bit one the stored layer (the scales of
/// K's rows, then of V's, then K's and V's values) into K's and V's buffers (values,
/// then their rows' scales: [`GpuBlock::segment`]'s layout).
///
/// # Safety
/// `staging` must hold the block's bytes and stay unwritten and alive until the copy
/// stream has passed these copies.
unsafe fn copy_block_async(gpu: &Gpu, staging: &PinnedBuf, block: &GpuBlock) -> Result<()> {
    let layer = block.n_bytes() / block.n_layers();
    let rows = block.shape.n_kv_heads * block.len;
    let values = rows * block.shape.head_dim;
    for l in 0..block.n_layers() {
        let (k, v) = block.layer_ptrs(l);
        let at = l * layer;
        // `bytes` of the staged layer from byte `off` to device address `dev`.
        let copy = |dev: u64, off: usize, bytes: usize| -> Result<()> {
            // SAFETY: (the caller's) the staging holds `layer` bytes per layer and stays
            // untouched until the copy stream passes; the device buffers hold the block.
            unsafe {
                let src = std::slice::from_raw_parts(staging.as_ptr().add(at + off), bytes);
                cudarc::driver::result::memcpy_htod_async(dev, src, gpu.copy_stream.cu_stream())?;
            }
            Ok(())
        };
        if block.kv8_format().is_none() {
            copy(k, 0, layer / 2)?;
            copy(v, layer / 2, layer / 2)?;
        } else {
            let (k_scales, v_scales) = (k + values as u64, v + values as u64);
            copy(k, 4 * rows, values)?;
            copy(v, 4 * rows + values, values)?;
            copy(k_scales, 0, 2 * rows)?;
            copy(v_scales, 2 * rows, 2 * rows)?;
        }
    }
    Ok(())
}

#[derive(Default)]
struct LoadDone {
    blocks: usize,
    bytes: usize,
    busy: Duration,
    failed: Vec<(usize, String)>,
}

#[derive(Default)]
struct EncodeDone {
    blocks: usize,
    busy: Duration,
    anchor_time: Duration,
    anchor: Option<GpuBlock>,
}
