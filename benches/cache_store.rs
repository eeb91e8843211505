//! Cache store benchmark: codec (plain vs byte-shuffled zstd at two levels), RocksDB
//! layout (BlobDB vs plain SST values), hot tier vs RocksDB reads.
//!
//! ```text
//! cargo bench -p starkv-cache --bench cache_store -- [--kv-dir DIR] [--quick] [--blocks N]
//! ```
//!
//! Data:
//! - "SmolLM2 block": 30 layers, 3 KV heads, 2048 tokens, head_dim 64 (45 MiB of f16).
//!   Real tensors when `--kv-dir DIR` (or `STARKV_KV_DIR`) points at a dump, else a
//!   synthetic generator (see below) and the output says so on every table.
//! - "8B block": Llama-3.1-8B shape, 32 layers, 8 KV heads, 2048 tokens, head_dim 128
//!   (256 MiB of f16), always synthetic.
//!
//! Dump format for `--kv-dir`: any number of blocks, each a pair of files
//! `NAME.f32` (little-endian f32, layout `[layer][k|v][kv_head][token][head_dim]`) and
//! `NAME.txt` with `key=value` lines `layers=`, `kv_heads=`, `tokens=`, `head_dim=`
//! (`#` starts a comment). K is after RoPE, as the compute crate stores it.
//!
//! Synthetic generator (not i.i.d. noise, which would make every compressor look
//! useless): per channel a log-normal scale with ~3% outlier channels at 8x, a
//! per-channel bias, an AR(1) process along tokens (rho 0.9 for K, 0.6 for V), and for K
//! a RoPE rotation of adjacent pairs at the token's position (theta 1e5). Real KV is
//! what decides the default; rerun with a dump.
//!
//! Throughput is decoded (f16) bytes per second. RocksDB reads hit the OS page cache
//! (the data was just written), which is the steady state for a hot shard; the hot
//! tier row shows what skipping the decode costs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use starkv_cache::{
    BlockStore, CodecConfig, DType, DocSpec, RocksConfig, StoreConfig, Tensor, codec,
};

#[derive(Clone, Copy, Debug)]
struct Shape {
    layers: usize,
    kv_heads: usize,
    tokens: usize,
    head_dim: usize,
}

impl Shape {
    fn layer_elems(&self) -> usize {
        2 * self.kv_heads * self.tokens * self.head_dim
    }
    fn tensor_shape(&self) -> Vec<u32> {
        vec![
            2,
            self.kv_heads as u32,
            self.tokens as u32,
            self.head_dim as u32,
        ]
    }
}

struct Block {
    name: String,
    source: String,
    shape: Shape,
    layers: Vec<Tensor>,
}

impl Block {
    fn raw_bytes(&self) -> usize {
        self.layers.iter().map(|t| t.byte_len()).sum()
    }
}

fn gauss(rng: &mut ChaCha8Rng) -> f32 {
    // Irwin-Hall(4), rescaled: close enough to N(0, 1) for a data generator.
    let s: f32 = (0..4).map(|_| rng.random::<f32>()).sum();
    (s - 2.0) * 3f32.sqrt()
}

fn synthetic(shape: Shape, seed: u64) -> Vec<Tensor> {
    let (h, t, d) = (shape.kv_heads, shape.tokens, shape.head_dim);
    (0..shape.layers)
        .map(|layer| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed * 1000 + layer as u64);
            let mut out = vec![0f32; shape.layer_elems()];
            for (kv, rho, base_scale) in [(0usize, 0.9f32, 1.0f32), (1, 0.6, 0.3)] {
                for head in 0..h {
                    let scale: Vec<f32> = (0..d)
                        .map(|_| {
                            let s = (gauss(&mut rng) * 0.5).exp() * base_scale;
                            if rng.random::<f32>() < 0.03 {
                                s * 8.0
                            } else {
                                s
                            }
                        })
                        .collect();
                    let bias: Vec<f32> = scale.iter().map(|s| gauss(&mut rng) * 0.3 * s).collect();
                    let mut c = vec![0f32; d];
                    let innov = (1.0 - rho * rho).sqrt();
                    for tok in 0..t {
                        let row = ((kv * h + head) * t + tok) * d;
                        for j in 0..d {
                            c[j] = rho * c[j] + innov * gauss(&mut rng);
                            out[row + j] = c[j] * scale[j] + bias[j];
                        }
                        if kv == 0 {
                            for i in 0..d / 2 {
                                let theta = (tok as f32) * 1e5f32.powf(-2.0 * i as f32 / d as f32);
                                let (s, co) = theta.sin_cos();
                                let (a, b) = (out[row + 2 * i], out[row + 2 * i + 1]);
                                out[row + 2 * i] = a * co - b * s;
                                out[row + 2 * i + 1] = a * s + b * co;
                            }
                        }
                    }
                }
            }
            Tensor::from_f32(DType::F16, shape.tensor_shape(), &out).unwrap()
        })
        .collect()
}

fn load_dump(dir: &Path) -> Vec<Block> {
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "f32"))
        .collect();
    entries.sort();
    for f in entries {
        let side = f.with_extension("txt");
        let text = std::fs::read_to_string(&side)
            .unwrap_or_else(|e| panic!("read {}: {e}", side.display()));
        let get = |k: &str| -> usize {
            text.lines()
                .map(|l| l.split('#').next().unwrap().trim())
                .filter_map(|l| l.split_once('='))
                .find(|(key, _)| key.trim() == k)
                .map(|(_, v)| v.trim().parse().expect("integer"))
                .unwrap_or_else(|| panic!("{}: missing {k}=", side.display()))
        };
        let shape = Shape {
            layers: get("layers"),
            kv_heads: get("kv_heads"),
            tokens: get("tokens"),
            head_dim: get("head_dim"),
        };
        let bytes = std::fs::read(&f).unwrap();
        assert_eq!(
            bytes.len(),
            shape.layers * shape.layer_elems() * 4,
            "{}: size does not match {shape:?}",
            f.display()
        );
        let vals: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let layers = vals
            .chunks_exact(shape.layer_elems())
            .map(|l| Tensor::from_f32(DType::F16, shape.tensor_shape(), l).unwrap())
            .collect();
        out.push(Block {
            name: f.file_stem().unwrap().to_string_lossy().into_owned(),
            source: format!("REAL dump {}", f.display()),
            shape,
            layers,
        });
    }
    assert!(!out.is_empty(), "no *.f32 files in {}", dir.display());
    out
}

fn mbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

fn codec_table(blocks: &[&Block]) {
    println!("\n## Codec (one thread, f16 values, decoded MB/s)\n");
    println!("| block | source | codec | ratio vs raw f16 | encode MB/s | decode+verify MB/s |");
    println!("|---|---|---|---|---|---|");
    let configs = [
        (
            "none (raw + checksum)",
            CodecConfig {
                zstd_level: None,
                shuffle: false,
            },
        ),
        (
            "zstd-1 plain",
            CodecConfig {
                zstd_level: Some(1),
                shuffle: false,
            },
        ),
        (
            "zstd-3 plain",
            CodecConfig {
                zstd_level: Some(3),
                shuffle: false,
            },
        ),
        (
            "zstd-1 shuffled",
            CodecConfig {
                zstd_level: Some(1),
                shuffle: true,
            },
        ),
        (
            "zstd-3 shuffled",
            CodecConfig {
                zstd_level: Some(3),
                shuffle: true,
            },
        ),
    ];
    for b in blocks {
        let raw = b.raw_bytes();
        for (name, cfg) in &configs {
            let t0 = Instant::now();
            let enc: Vec<Vec<u8>> = b.layers.iter().map(|t| codec::encode(t, cfg)).collect();
            let te = t0.elapsed().as_secs_f64();
            let stored: usize = enc.iter().map(Vec::len).sum();
            let t0 = Instant::now();
            for (v, t) in enc.iter().zip(&b.layers) {
                let d = codec::decode(v).unwrap();
                assert_eq!(d.byte_len(), t.byte_len());
            }
            let td = t0.elapsed().as_secs_f64();
            println!(
                "| {} | {} | {} | {:.3} | {:.0} | {:.0} |",
                b.name,
                b.source,
                name,
                stored as f64 / raw as f64,
                mbps(raw, te),
                mbps(raw, td)
            );
        }
    }
}

fn spec_for(doc: &str, b: &Block, nblocks: usize) -> DocSpec {
    // Distinct token ids per document: blocks are content-addressed, and two documents
    // with the same ids would deduplicate instead of being written.
    let salt = doc
        .bytes()
        .fold(0u32, |h, c| h.wrapping_mul(31).wrapping_add(c as u32))
        << 20;
    DocSpec {
        model_fingerprint: b"bench".to_vec(),
        block_size: b.shape.tokens as u32,
        anchor_size: b.shape.tokens as u32,
        source_tokens: (0..(nblocks * b.shape.tokens) as u32)
            .map(|t| t ^ salt)
            .collect(),
        ..DocSpec::new(doc, "bench")
    }
}

fn write_doc(store: &BlockStore, doc: &str, blocks: &[&Block], n: usize) -> (usize, f64) {
    let spec = spec_for(doc, blocks[0], n);
    let tokens = spec.source_tokens.clone();
    let t0 = Instant::now();
    let mut ing = store.begin_ingest(spec).unwrap();
    let bt = blocks[0].shape.tokens;
    let anchor = &tokens[..bt];
    let mut raw = 0;
    for i in 0..n {
        let b = blocks[i % blocks.len()];
        let toks = &tokens[i * bt..(i + 1) * bt];
        let key = ing.block_key(anchor, toks, (i * bt) as u64);
        assert!(
            ing.put_block(key, (i * bt) as u64, bt as u32, &b.layers)
                .unwrap()
        );
        raw += b.raw_bytes();
    }
    ing.commit().unwrap();
    (raw, t0.elapsed().as_secs_f64())
}

fn read_doc(store: &BlockStore, doc: &str, threads: usize, uncached: bool) -> (usize, f64) {
    let lease = store.open_doc(doc).unwrap();
    let n = lease.num_blocks();
    let layers = lease.manifest().blocks[0].layers;
    let t0 = Instant::now();
    let total: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|th| {
                let lease = &lease;
                s.spawn(move || {
                    let mut bytes = 0;
                    // Layer-major, as phase 2 streams: layer l of every block.
                    for l in 0..layers {
                        for i in (th..n).step_by(threads) {
                            bytes += if uncached {
                                lease.read_layer_uncached(i, l).unwrap().byte_len()
                            } else {
                                lease.read_layer(i, l).unwrap().byte_len()
                            };
                        }
                    }
                    bytes
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    (total, t0.elapsed().as_secs_f64())
}

fn rocks_tables(
    smol: &[&Block],
    big: &Block,
    nblocks: usize,
    shards: usize,
    churn: (usize, usize),
) {
    println!(
        "\n## RocksDB layout ({shards} shards, default codec {:?}, {nblocks} SmolLM2 blocks + 1 8B block per run, hot tier off)\n",
        CodecConfig::default()
    );
    println!(
        "| values | write MB/s (incl. fsync+publish) | read MB/s 1 thread | read MB/s 2 threads | 8B write MB/s | 8B read MB/s 2 thr | disk / raw f16 | churn write MB/s | disk / live after churn |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    {
        // Reference: the same ingest into the in-memory engine (codec + bookkeeping
        // only), to show how much of the write time RocksDB takes.
        let store = BlockStore::in_memory(shards, StoreConfig::default()).unwrap();
        let (raw, tw) = write_doc(&store, "smol", smol, nblocks);
        let (r1, t1) = read_doc(&store, "smol", 1, true);
        println!(
            "| in-memory engine (reference) | {:.0} | {:.0} | | | | | | |",
            mbps(raw, tw),
            mbps(r1, t1)
        );
    }
    let base = std::env::var_os("STARKV_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    for blob in [true, false] {
        let dir = tempfile::tempdir_in(&base).unwrap();
        let rocks = RocksConfig {
            blob_files: blob,
            ..RocksConfig::new(dir.path(), shards)
        };
        let cfg = StoreConfig {
            hot_tier_bytes: 0,
            ..StoreConfig::default()
        };
        let store = BlockStore::open_rocks(rocks, cfg).unwrap();
        let (raw, tw) = write_doc(&store, "smol", smol, nblocks);
        let (braw, btw) = write_doc(&store, "big", &[big], 1);
        // Steady state: reads from table/blob files, not from the memtable.
        store.flush().unwrap();
        let (r1, t1) = read_doc(&store, "smol", 1, true);
        let (r2, t2) = read_doc(&store, "smol", 2, true);
        assert_eq!((r1, r2), (raw, raw));
        let (br, btr) = read_doc(&store, "big", 2, true);
        assert_eq!(br, braw);
        let disk = store.engine().disk_usage().unwrap();
        // Churn: keep ingesting while deleting old documents, so compactions (and blob
        // GC) run under the writes, then compare disk use with live data.
        store.delete_doc("smol").unwrap();
        store.delete_doc("big").unwrap();
        let (rounds, per_doc) = churn;
        let t0 = Instant::now();
        let mut churn_raw = 0;
        for round in 0..rounds {
            churn_raw += write_doc(&store, &format!("churn{round}"), smol, per_doc).0;
            if round >= 2 {
                store.delete_doc(&format!("churn{}", round - 2)).unwrap();
            }
        }
        let tc = t0.elapsed().as_secs_f64();
        store.flush().unwrap();
        let live = store.stats().store_bytes;
        let churn_disk = store.engine().disk_usage().unwrap();
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3} | {:.0} | {:.2} |",
            if blob {
                "BlobDB (enable_blob_files)"
            } else {
                "plain SST"
            },
            mbps(raw, tw),
            mbps(r1, t1),
            mbps(r2, t2),
            mbps(braw, btw),
            mbps(br, btr),
            disk as f64 / (raw + braw) as f64,
            mbps(churn_raw, tc),
            churn_disk as f64 / live as f64
        );
    }

    println!("\n## Hot tier vs RocksDB reads (SmolLM2 blocks, BlobDB, 1 thread)\n");
    let dir = tempfile::tempdir_in(&base).unwrap();
    let raw_total: usize = (0..nblocks).map(|i| smol[i % smol.len()].raw_bytes()).sum();
    let cfg = StoreConfig {
        hot_tier_bytes: raw_total as u64 + (1 << 20),
        ..StoreConfig::default()
    };
    let store = BlockStore::open_rocks(RocksConfig::new(dir.path(), shards), cfg).unwrap();
    write_doc(&store, "smol", smol, nblocks);
    store.flush().unwrap();
    let (a, ta) = read_doc(&store, "smol", 1, false);
    let (b, tb) = read_doc(&store, "smol", 1, false);
    let h = store.stats().hot;
    let layers = (h.hits.max(1)) as f64;
    println!("| path | decoded MB/s | µs per layer | hot hits | hot misses |");
    println!("|---|---|---|---|---|");
    println!(
        "| RocksDB (miss: read, verify, decode, fill hot tier) | {:.0} | {:.1} | | |",
        mbps(a, ta),
        ta * 1e6 / layers
    );
    println!(
        "| hot tier (hit: shared `Arc<Tensor>`, no copy) | {:.0} | {:.2} | {} | {} |",
        mbps(b, tb),
        tb * 1e6 / layers,
        h.hits,
        h.misses
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick =
        args.iter().any(|a| a == "--quick") || std::env::var_os("STARKV_BENCH_QUICK").is_some();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let kv_dir = arg("--kv-dir").or_else(|| std::env::var("STARKV_KV_DIR").ok());
    let nblocks: usize = arg("--blocks")
        .map(|s| s.parse().expect("--blocks N"))
        .unwrap_or(if quick { 2 } else { 8 });
    let shards: usize = arg("--shards")
        .map(|s| s.parse().expect("--shards N"))
        .unwrap_or(4);

    let smol_shape = Shape {
        layers: if quick { 4 } else { 30 },
        kv_heads: 3,
        tokens: 2048,
        head_dim: 64,
    };
    let big_shape = Shape {
        layers: if quick { 2 } else { 32 },
        kv_heads: 8,
        tokens: 2048,
        head_dim: 128,
    };
    let smol: Vec<Block> = match &kv_dir {
        Some(d) => load_dump(Path::new(d)),
        None => vec![Block {
            name: "SmolLM2 2048 tok x 30 layers".into(),
            source: "SYNTHETIC (AR(1)+RoPE+outlier channels)".into(),
            shape: smol_shape,
            layers: synthetic(smol_shape, 1),
        }],
    };
    let big = Block {
        name: "8B-shape 2048 tok x 32 layers".into(),
        source: "SYNTHETIC (AR(1)+RoPE+outlier channels)".into(),
        shape: big_shape,
        layers: synthetic(big_shape, 2),
    };
    println!(
        "# starkv-cache store bench{}",
        if quick { " (quick)" } else { "" }
    );
    println!(
        "\nSmolLM2 data: {}. Raw f16 per SmolLM2 block: {:.1} MiB; per 8B block: {:.1} MiB.",
        smol[0].source,
        smol[0].raw_bytes() as f64 / (1 << 20) as f64,
        big.raw_bytes() as f64 / (1 << 20) as f64
    );
    let mut all: Vec<&Block> = smol.iter().collect();
    all.push(&big);
    codec_table(&all);
    let smol_refs: Vec<&Block> = smol.iter().collect();
    let churn = if quick { (3, 1) } else { (8, 4) };
    rocks_tables(&smol_refs, &big, nblocks, shards, churn);
}
