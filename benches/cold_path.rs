//! The cold path, store to device: how fast a stored document's KV blocks come back from
//! a real RocksDB store, against the disk and the page cache of the same machine, and (on
//! a GPU) a cold query's time to first token when its blocks are loaded, re-encoded, or
//! both at once (the split of [`starkv_compute::cold_split`]).
//!
//! ```text
//! cargo bench --bench cold_path -- [--dir PATH] [--tokens 65536] [--shape 8b|smol]
//!                                   [--threads N] [--no-gpu] [--glibc-defaults] [--no-int8]
//! ```
//!
//! Writes one document of `--tokens` tokens (8K-token blocks, the model shape's KV in
//! bf16, random values) into a RocksDB store under `--dir` (default: the system temp
//! directory; put it on the disk being measured), then measures in the same run:
//! - the disk: the store's own files read with direct I/O (O_DIRECT, 8 MiB requests),
//!   one stream and `--threads` streams; and the page cache: the same files read twice
//!   through it;
//! - loading (`DocLease::read_block_into`: read, verify, decode into one reused buffer),
//!   one thread and `--threads`, with the store's files dropped from the page cache
//!   first (fsync + `posix_fadvise(DONTNEED)`: no root needed) and again from the page
//!   cache;
//! - on a GPU (CUDA probe succeeds, no `--no-gpu`): the model shape with random weights;
//!   the pinned host-to-device copy rate; and a cold query's time to first token (all
//!   blocks missing from the GPU, 30-token question) with every block loaded (from the
//!   disk, and from the page cache), every block re-encoded, and both at once.
//!
//! - on a GPU, unless `--no-int8`: the same document stored as int8 (`kv_dtype = int8`,
//!   one scale per row), the same five cold queries (blocks loaded in 8 bits, re-encoded
//!   ones quantised on the device: the 8-bit split, `STARKV_COLD_SPLIT8=1`, turned on);
//! - on a GPU, first a correctness row: a small model's cold query logits with every
//!   block loaded (must equal the phase-1 blocks' logits exactly), re-encoded, or both,
//!   for an anchor of one block and of two blocks.
//!
//! Prints a markdown table last. Without a GPU only the host rows are measured (this is
//! the CPU-side version that runs anywhere).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use starkv_cache::{BlockStore, DType, DocSpec, RocksConfig, StoreConfig, Tensor, TensorData};
use starkv_compute::cuda::cold::{BlockReader, ColdLoad, ColdMode, ColdRates, StagingPool};
use starkv_compute::cuda::star::{ContextBlocks, GpuBlock, GpuQuery, encode_block};
use starkv_compute::cuda::{CudaLlama, Gpu, HalfType, PinnedBuf, probe};
use starkv_compute::kv8::Kv8Format;
use starkv_compute::model::LlamaConfig;
use starkv_compute::star::StarConfig;
use starkv_service::StoreReader;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const BLOCK: usize = 8192;

struct Opts {
    dir: PathBuf,
    tokens: usize,
    shape: String,
    threads: usize,
    gpu: bool,
    glibc_defaults: bool,
    int8: bool,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        dir: std::env::temp_dir(),
        tokens: 65536,
        shape: "8b".into(),
        threads: std::thread::available_parallelism().map_or(4, |n| n.get().min(16)),
        gpu: true,
        glibc_defaults: false,
        int8: true,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--dir" => o.dir = PathBuf::from(&value),
            "--tokens" => o.tokens = value.parse().expect("--tokens N"),
            "--shape" => o.shape = value.clone(),
            "--threads" => o.threads = value.parse().expect("--threads N"),
            "--no-gpu" => {
                o.gpu = false;
                i += 1;
                continue;
            }
            "--glibc-defaults" => {
                o.glibc_defaults = true;
                i += 1;
                continue;
            }
            "--no-int8" => {
                o.int8 = false;
                i += 1;
                continue;
            }
            "--bench" => {
                i += 1;
                continue;
            }
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    o
}

fn main() {
    let opts = parse_opts();
    // As `starkv` does at start (stored layers' read buffers reused, not faulted in);
    // `--glibc-defaults` measures without it.
    if !opts.glibc_defaults {
        let taken = starkv_service::allocator::keep_large_buffers();
        eprintln!("allocator: large read buffers kept between reads: {taken}");
    } else {
        eprintln!("allocator: glibc defaults (--glibc-defaults)");
    }
    if let Err(e) = run(&opts) {
        eprintln!("cold_path failed: {e}");
        std::process::exit(1);
    }
}

fn model_config(shape: &str) -> LlamaConfig {
    match shape {
        "smol" => LlamaConfig::smollm2_135m(),
        _ => LlamaConfig::llama31_8b(),
    }
}

fn run(opts: &Opts) -> Result<()> {
    let config = model_config(&opts.shape);
    let (layers, kv_heads, d) = (config.n_layers, config.n_kv_heads, config.head_dim);
    let n_blocks = opts.tokens.div_ceil(BLOCK);
    let tokens_per_block = |i: usize| BLOCK.min(opts.tokens - i * BLOCK);
    let layer_bytes = |i: usize| 2 * kv_heads * tokens_per_block(i) * d * 2;
    let total: usize = (0..n_blocks).map(|i| layer_bytes(i) * layers).sum();
    let mut table: Vec<(String, String, String)> = Vec::new();
    let mut add = |what: String, value: String, note: String| {
        println!("  {what}: {value} {note}");
        table.push((what, value, note));
    };
    let gb = |bytes: usize, secs: f64| bytes as f64 / secs / 1e9;

    // The store: one document, bf16 KV of random values (normal-ish, like KV).
    let root = tempfile::Builder::new()
        .prefix("starkv-cold-path-")
        .tempdir_in(&opts.dir)?;
    let store_dir = root.path().join("store");
    let store = BlockStore::open_rocks(
        RocksConfig::new(&store_dir, 4),
        StoreConfig {
            hot_tier_bytes: 0,
            encode_threads: opts.threads,
            ..StoreConfig::default()
        },
    )?;
    let t = Instant::now();
    let shape = (layers, kv_heads, d);
    write_document(&store, "cold", DType::BF16, shape, opts.tokens)?;
    // The same document stored as int8 (for the 8-bit cold path's rows: only with a GPU).
    let int8 = opts.int8 && opts.gpu && probe().is_ok();
    if int8 {
        write_document(&store, "cold8", DType::I8, shape, opts.tokens)?;
    }
    store.flush()?;
    let files = store_files(&store_dir)?;
    let on_disk: u64 = files.iter().map(|(_, n)| n).sum();
    println!(
        "{} x 8K-token blocks of {} ({:.2} GB bf16, {:.2} GB on disk) written in {:.1} s under {}",
        n_blocks,
        opts.shape,
        total as f64 / 1e9,
        on_disk as f64 / 1e9,
        t.elapsed().as_secs_f64(),
        store_dir.display()
    );

    // The disk and the page cache, on the store's own files.
    drop_from_page_cache(&files)?;
    for streams in [1, opts.threads] {
        let (bytes, secs) = read_files(&files, streams, true)?;
        add(
            format!("disk read, direct I/O, {streams} stream(s)"),
            format!("{:.2} GB/s", gb(bytes, secs)),
            format!(
                "(the store's files, {:.2} GB, 8 MiB requests)",
                bytes as f64 / 1e9
            ),
        );
    }
    read_files(&files, opts.threads, false)?; // into the page cache
    let (bytes, secs) = read_files(&files, 1, false)?;
    let page_cache_gbs = gb(bytes, secs);
    add(
        "page-cache read, 1 stream".into(),
        format!("{page_cache_gbs:.2} GB/s"),
        "(the same files, cached; like one dd)".into(),
    );

    // Loading on the host: read + verify + decode into one reused buffer.
    let lease = store.open_doc("cold")?;
    let most = (0..n_blocks)
        .map(|i| layer_bytes(i) * layers)
        .max()
        .unwrap_or(0);
    let mut buf = vec![0u16; most / 2];
    for (cold, threads) in [
        (true, 1),
        (true, opts.threads),
        (false, 1),
        (false, opts.threads),
    ] {
        if cold {
            drop_from_page_cache(&files)?;
        }
        let t = Instant::now();
        for i in 0..n_blocks {
            let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut buf[..layer_bytes(i) * layers / 2]);
            lease.read_block_into(i, DType::BF16, layer_bytes(i), dst, threads)?;
        }
        let secs = t.elapsed().as_secs_f64();
        add(
            format!(
                "store load to host memory, {}, {threads} thread(s)",
                if cold {
                    "from disk"
                } else {
                    "from the page cache"
                }
            ),
            format!("{:.2} GB/s", gb(total, secs)),
            format!(
                "({:.2} GB bf16 of {n_blocks} blocks in {:.2} s; read, verify, decode)",
                total as f64 / 1e9,
                secs
            ),
        );
    }

    if opts.gpu {
        match probe() {
            Ok(devs) => {
                println!("GPU: {}", devs[0]);
                let lease8 = if int8 {
                    Some(store.open_doc("cold8")?)
                } else {
                    None
                };
                gpu_rows(
                    opts,
                    &config,
                    (&lease, lease8.as_ref()),
                    &files,
                    total,
                    &mut add,
                )?;
            }
            Err(e) => println!("no GPU here ({e}): host rows only"),
        }
    }
    drop(lease);

    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!();
    println!(
        "Cold path, {} shape, {} tokens ({n_blocks} x 8K blocks), RocksDB store under {} ({date}; {})",
        opts.shape,
        opts.tokens,
        opts.dir.display(),
        if opts.glibc_defaults {
            "glibc allocator defaults"
        } else {
            "allocator as `starkv` sets it: large buffers kept"
        }
    );
    println!();
    println!("| measurement | value | notes |");
    println!("|---|---|---|");
    for (w, v, n) in &table {
        println!("| {w} | {v} | {n} |");
    }
    Ok(())
}

/// Writes document `id` of `tokens` tokens in 8K-token blocks (anchor = one block) of
/// random KV-like values ([`random_layer`], the same for every `dtype`) stored as `dtype`.
fn write_document(
    store: &BlockStore,
    id: &str,
    dtype: DType,
    (layers, kv_heads, d): (usize, usize, usize),
    tokens: usize,
) -> Result<()> {
    use rayon::prelude::*;
    let mut spec = DocSpec::new(id, "bench");
    spec.dtype = dtype;
    spec.block_size = BLOCK as u32;
    spec.anchor_size = BLOCK as u32;
    spec.source_tokens = (0..tokens as u32).map(|i| i % 1000).collect();
    let mut ingest = store.begin_ingest(spec)?;
    let anchor: Vec<u32> = (0..BLOCK as u32).collect();
    for i in 0..tokens.div_ceil(BLOCK) {
        let n = BLOCK.min(tokens - i * BLOCK);
        let block_tokens: Vec<u32> = (0..n as u32).map(|t| t ^ (i as u32) << 16).collect();
        let key = ingest.block_key(&anchor, &block_tokens, (i * BLOCK) as u64);
        let tensors: Vec<Tensor> = (0..layers)
            .into_par_iter()
            .map(|l| {
                let wide = random_layer(kv_heads, n, d, (i * 1000 + l) as u64)?;
                if dtype == DType::BF16 {
                    return Ok(wide);
                }
                Tensor::from_f32(dtype, wide.shape().to_vec(), &wide.to_f32())
                    .map_err(|e| e.to_string())
            })
            .collect::<std::result::Result<_, String>>()?;
        ingest.put_block(key, (i * BLOCK) as u64, n as u32, &tensors)?;
    }
    ingest.commit()?;
    Ok(())
}

/// One layer `[2, kv_heads, tokens, d]` of bf16 values with KV-like statistics (sums of
/// uniforms: near-normal, scale ~1), from a cheap generator.
fn random_layer(
    kv_heads: usize,
    tokens: usize,
    d: usize,
    seed: u64,
) -> std::result::Result<Tensor, String> {
    let n = 2 * kv_heads * tokens * d;
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<half::bf16> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let a = (s & 0xFFFF) as f32 + ((s >> 16) & 0xFFFF) as f32 + ((s >> 32) & 0xFFFF) as f32;
            half::bf16::from_f32(a / 65536.0 - 1.5)
        })
        .collect();
    Tensor::new(
        vec![2, kv_heads as u32, tokens as u32, d as u32],
        TensorData::BF16(values),
    )
    .map_err(|e| e.to_string())
}

/// Every regular file under `dir` with its size.
fn store_files(dir: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let meta = e.metadata()?;
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() {
                out.push((e.path(), meta.len()));
            }
        }
    }
    Ok(out)
}

unsafe extern "C" {
    fn posix_fadvise(fd: i32, offset: i64, len: i64, advice: i32) -> i32;
}
const POSIX_FADV_DONTNEED: i32 = 4;
#[cfg(target_arch = "x86_64")]
const O_DIRECT: i32 = 0o40000;
#[cfg(not(target_arch = "x86_64"))]
const O_DIRECT: i32 = 0o200000;

/// Writes the files' dirty pages out and asks the kernel to drop them from the page cache.
fn drop_from_page_cache(files: &[(PathBuf, u64)]) -> Result<()> {
    use std::os::fd::AsRawFd;
    for (path, _) in files {
        let f = std::fs::File::open(path)?;
        f.sync_all()?;
        // SAFETY: a plain syscall on an open descriptor.
        let rc = unsafe { posix_fadvise(f.as_raw_fd(), 0, 0, POSIX_FADV_DONTNEED) };
        if rc != 0 {
            return Err(format!("posix_fadvise({}) failed: {rc}", path.display()).into());
        }
    }
    Ok(())
}

/// Reads every file in 8 MiB requests on `streams` threads (direct I/O or through the
/// page cache); returns (bytes, seconds).
fn read_files(files: &[(PathBuf, u64)], streams: usize, direct: bool) -> Result<(usize, f64)> {
    const CHUNK: usize = 8 << 20;
    let tasks: Vec<(&Path, u64)> = files
        .iter()
        .filter(|(_, n)| *n >= CHUNK as u64)
        .flat_map(|(p, n)| {
            (0..n.div_ceil(CHUNK as u64)).map(move |c| (p.as_path(), c * CHUNK as u64))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let bytes = AtomicUsize::new(0);
    let failed: Mutex<Option<String>> = Mutex::new(None);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..streams {
            s.spawn(|| {
                // 4 KiB-aligned buffer for O_DIRECT.
                let mut raw = vec![0u8; CHUNK + 4096];
                let off = raw.as_ptr().align_offset(4096);
                let buf = &mut raw[off..off + CHUNK];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(path, at)) = tasks.get(i) else {
                        return;
                    };
                    let r = (|| -> std::io::Result<usize> {
                        use std::os::unix::fs::FileExt;
                        let f = std::fs::OpenOptions::new()
                            .read(true)
                            .custom_flags(if direct { O_DIRECT } else { 0 })
                            .open(path)?;
                        let mut got = 0;
                        while got < CHUNK {
                            let n = f.read_at(&mut buf[got..], at + got as u64)?;
                            if n == 0 {
                                break;
                            }
                            got += n;
                            if direct && n % 4096 != 0 {
                                break; // the file's unaligned tail
                            }
                        }
                        Ok(got)
                    })();
                    match r {
                        Ok(n) => {
                            bytes.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            *failed.lock().unwrap() = Some(format!("{}: {e}", path.display()));
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e.into());
    }
    Ok((bytes.into_inner(), t.elapsed().as_secs_f64()))
}

fn gpu_rows(
    opts: &Opts,
    config: &LlamaConfig,
    (lease, lease8): (&starkv_cache::DocLease, Option<&starkv_cache::DocLease>),
    files: &[(PathBuf, u64)],
    total: usize,
    add: &mut dyn FnMut(String, String, String),
) -> Result<()> {
    let gpu = Gpu::new(0, HalfType::BF16)?;
    // Pinned host-to-device copy.
    {
        let bytes = 1usize << 30;
        let mut pinned = PinnedBuf::new(&gpu, bytes)?;
        pinned
            .as_u16_mut()
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as u16);
        let dst = gpu.alloc(bytes)?;
        let mut ts = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            gpu.upload_pinned(dst.ptr(), &pinned, bytes)?;
            gpu.synchronize()?;
            ts.push(t.elapsed().as_secs_f64());
        }
        ts.sort_by(f64::total_cmp);
        add(
            "pinned host-to-device copy".into(),
            format!("{:.1} GB/s", bytes as f64 / ts[2] / 1e9),
            "(1 GiB, median of 5)".into(),
        );
    }
    check_cold_blocks(&gpu, add)?;
    let t = Instant::now();
    let model = Mutex::new(CudaLlama::random(gpu.clone(), config.clone(), 7)?);
    println!(
        "random weights on the device in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let vocab = config.vocab;
    let mut seed = 42u64;
    let mut take = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 33) % vocab as u64) as u32
            })
            .collect()
    };
    let tokens = take(opts.tokens);
    let question = take(30);
    let star = StarConfig::with_anchor(BLOCK, BLOCK);
    let staging = StagingPool::default();
    let reader = StoreReader::with_threads(lease, opts.threads);
    let n_blocks = opts.tokens.div_ceil(BLOCK);
    let wanted: Vec<usize> = (0..n_blocks).collect();
    // Warm-up: kernels compiled, cuBLAS heuristics, staging allocated.
    {
        let cold = ColdLoad {
            gpu: &gpu,
            model: &model,
            staging: &staging,
            tokens: &tokens,
            config: star,
            reader: &reader,
            mode: ColdMode::Both,
            rates: ColdRates::default(),
            kv8: None,
        };
        cold.run(&wanted[..1.min(n_blocks)])?;
        let enc = ColdLoad {
            mode: ColdMode::Encode,
            ..cold
        };
        enc.run(&wanted[n_blocks.saturating_sub(1)..])?;
    }
    let runs: [(&str, ColdMode, bool); 5] = [
        ("all re-encoded", ColdMode::Encode, false),
        ("all loaded, from disk", ColdMode::Load, true),
        ("split load + re-encode, from disk", ColdMode::Both, true),
        ("all loaded, from the page cache", ColdMode::Load, false),
        (
            "split load + re-encode, from the page cache",
            ColdMode::Both,
            false,
        ),
    ];
    // The bf16 document, then the int8 one: its blocks loaded in 8 bits, re-encoded ones
    // quantised on the device (the split of 8-bit documents, `STARKV_COLD_SPLIT8=1`, on
    // for these rows).
    let reader8 = lease8.map(|lease| StoreReader::with_threads(lease, opts.threads));
    let mut docs: Vec<(&str, &StoreReader<'_>, Option<Kv8Format>)> = vec![("", &reader, None)];
    if let Some(r) = &reader8 {
        docs.push(("int8 document, ", r, Some(Kv8Format::Int8)));
        gpu.set_cold_split8(true);
    }
    for (doc, reader, kv8) in docs {
        let mut rates = ColdRates::default();
        for (what, mode, from_disk) in runs {
            if from_disk {
                drop_from_page_cache(files)?;
            } else if mode != ColdMode::Encode {
                read_files(files, opts.threads, false)?;
            }
            // The split starts from the rates of the matching all-load / all-encode runs.
            let start_rates = if mode == ColdMode::Both {
                rates
            } else {
                ColdRates::default()
            };
            let t = Instant::now();
            let (blocks, stats) = ColdLoad {
                gpu: &gpu,
                model: &model,
                staging: &staging,
                tokens: &tokens,
                config: star,
                reader,
                mode,
                rates: start_rates,
                kv8,
            }
            .run(&wanted)?;
            let loaded_at = t.elapsed().as_secs_f64();
            let mut m = model.lock().unwrap();
            let mut q = GpuQuery::new(&m, ContextBlocks::Resident(blocks), 30 + 1)?;
            let positions: Vec<usize> = (opts.tokens..opts.tokens + 30).collect();
            m.forward(&question, &positions, &mut q)?;
            m.argmax(1)?;
            let ttft = t.elapsed().as_secs_f64();
            drop(q);
            drop(m);
            gpu.synchronize()?;
            if mode == ColdMode::Load {
                // The split runs right after the matching all-load run (disk, page cache).
                rates.load_s_per_token = stats.rates.load_s_per_token;
            }
            if mode == ColdMode::Encode {
                rates.encode_s_per_token = stats.rates.encode_s_per_token;
            }
            let load_rate = if stats.loaded_blocks > 0 {
                format!(
                    ", loading {:.2} GB/s of {:.2} GB stored values and scales",
                    stats.bytes_loaded as f64 / stats.load_busy.as_secs_f64().max(1e-9) / 1e9,
                    stats.bytes_loaded as f64 / 1e9
                )
            } else {
                String::new()
            };
            add(
                format!("cold query TTFT, {doc}{what}"),
                format!("{ttft:.2} s"),
                format!(
                    "({} loaded + {} re-encoded of {n_blocks}; blocks on the GPU after {:.2} s{load_rate}; anchor {:.2} s; {:.2} GB of bf16 KV)",
                    stats.loaded_blocks,
                    stats.encoded_blocks,
                    loaded_at,
                    stats.anchor.as_secs_f64(),
                    total as f64 / 1e9
                ),
            );
        }
    }
    Ok(())
}

/// Blocks held as 16-bit copies in memory (the correctness check's store).
struct HeldBlocks(Vec<Vec<u16>>);

impl BlockReader for HeldBlocks {
    fn read_block(
        &self,
        block: usize,
        _dtype: HalfType,
        dst: &mut [u16],
    ) -> std::result::Result<(), String> {
        let b = self.0.get(block).ok_or("no such block")?;
        if b.len() != dst.len() {
            return Err(format!("{} values for a buffer of {}", b.len(), dst.len()));
        }
        dst.copy_from_slice(b);
        Ok(())
    }
}

/// Logits of `question` right after the context, over `blocks`.
fn query_logits(
    model: &Mutex<CudaLlama>,
    blocks: Vec<Arc<GpuBlock>>,
    question: &[u32],
) -> Result<Vec<f32>> {
    let mut m = model.lock().unwrap();
    let mut q = GpuQuery::new(&m, ContextBlocks::Resident(blocks), question.len() + 1)?;
    let start = q.context_len();
    let positions: Vec<usize> = (start..start + question.len()).collect();
    m.forward(question, &positions, &mut q)?;
    Ok(m.logits(1)?)
}

/// A cold query's logits against phase 1's own blocks (SmolLM2 shape, random weights,
/// 1K-token blocks, a partial last block), for an anchor of one and of two blocks:
/// loaded blocks must give the same logits exactly; re-encoded ones run the same kernels
/// on the same inputs (only the anchor may be computed on its own).
fn check_cold_blocks(gpu: &Arc<Gpu>, add: &mut dyn FnMut(String, String, String)) -> Result<()> {
    let config = LlamaConfig::smollm2_135m();
    let model = Mutex::new(CudaLlama::random(gpu.clone(), config.clone(), 11)?);
    let b = 1024;
    let n = 4 * b + 300;
    let mut seed = 7u64;
    let tokens: Vec<u32> = (0..n + 30)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) % config.vocab as u64) as u32
        })
        .collect();
    let (tokens, question) = tokens.split_at(n);
    for a in [b, 2 * b] {
        // Phase 1 as the encoder runs it: the anchor encoded alone (its rows are the
        // blocks inside it), every later block over it.
        let reference: Vec<Arc<GpuBlock>> = {
            let mut m = model.lock().unwrap();
            let anchor = encode_block(&mut m, &tokens[..a], 0, None)?;
            let mut out = Vec::new();
            for start in (0..n).step_by(b) {
                let end = (start + b).min(n);
                out.push(Arc::new(if end <= a {
                    anchor.rows(gpu, start..end)?
                } else {
                    encode_block(&mut m, &tokens[start..end], start, Some(&anchor))?
                }));
            }
            out
        };
        let want = query_logits(&model, reference.clone(), question)?;
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let held = HeldBlocks(
            reference
                .iter()
                .map(|blk| {
                    let kv = blk.download(gpu)?;
                    let mut out = Vec::new();
                    for (k, v) in &kv.layers {
                        for part in [k, v] {
                            let mut h = vec![0u16; part.len()];
                            gpu.dtype.encode(part, &mut h);
                            out.extend_from_slice(&h);
                        }
                    }
                    Ok(out)
                })
                .collect::<Result<_>>()?,
        );
        drop(reference);
        let staging = StagingPool::default();
        let mut diffs = Vec::new();
        for mode in [ColdMode::Load, ColdMode::Encode, ColdMode::Both] {
            let wanted: Vec<usize> = (0..n.div_ceil(b)).collect();
            let (blocks, stats) = ColdLoad {
                gpu,
                model: &model,
                staging: &staging,
                tokens,
                config: StarConfig::with_anchor(b, a),
                reader: &held,
                mode,
                rates: ColdRates::default(),
                kv8: None,
            }
            .run(&wanted)?;
            let got = query_logits(&model, blocks, question)?;
            let d = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            diffs.push((mode, d, stats.loaded_blocks, stats.encoded_blocks));
        }
        let text: Vec<String> = diffs
            .iter()
            .map(|(m, d, l, e)| format!("{m:?} ({l} loaded, {e} re-encoded): {d:.2e}"))
            .collect();
        add(
            format!("cold query logits vs phase-1 blocks, anchor {}K", a / 1024),
            format!(
                "max |diff| {:.2e}",
                diffs.iter().map(|x| x.1).fold(0f32, f32::max)
            ),
            format!(
                "(SmolLM2 shape, random weights, {n} tokens; {}; max |logit| {scale:.1})",
                text.join(", ")
            ),
        );
        if diffs[0].1 != 0.0 {
            return Err(format!("loaded blocks changed the logits: {text:?}").into());
        }
        if diffs.iter().any(|x| x.1 > 0.02 * scale) {
            return Err(format!("cold logits off: {text:?}").into());
        }
    }
    Ok(())
}
