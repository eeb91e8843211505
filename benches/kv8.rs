//! 8-bit KV (issue 13, item 4): what `kv_dtype = int8` and `kv_dtype = fp8` cost and save
//! on the CPU, against the 16-bit default, in the same run on the same blocks.
//!
//! A context is encoded once with Star Attention phase 1 (the default model, a needle
//! document); then
//! (a) bytes at rest: every block layer through the store's codec (byte-shuffled zstd,
//!     the default), as f16 and as int8 (one f16 scale per token and KV head, the
//!     encoding `kv_dtype = int8` stores);
//! (b) decode attention: one query row's attention over every context block at every
//!     layer (what a decode step spends in context attention), blocks held as an f16
//!     document's are held on the CPU today (f32) against held in 8 bits and dequantised
//!     one key tile at a time; medians of interleaved repeats;
//! (c) the first answer token's logits of a few questions about the document: phase 2
//!     over the 8-bit blocks against over the f32 ones a CPU holds for a 16-bit document
//!     (max |difference|, top-1 equal).
//!
//! (a) and (c) also show bf16 (what a GPU host stores) and int8 and fp8 (e4m3) with one
//! scale per block and head (fewer bytes; more error for int8), to show what the
//! per-token choice buys for each.
//!
//! Usage: `cargo bench --bench kv8 -- --context 4096 --block 1024 --repeats 31`.

#[path = "support/machine.rs"]
mod machine;
#[allow(dead_code)]
#[path = "support/niah.rs"]
mod niah;
#[path = "support/prompt.rs"]
mod prompt;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use starkv_cache::codec::{self, CodecConfig};
use starkv_cache::{DType, Tensor};
use starkv_compute::kv8::{Kv8, Kv8Format};
use starkv_compute::model::Llama;
use starkv_compute::sampling::argmax;
use starkv_compute::star::{AttentionShard, BlockKv, CpuShard, Phase1, QueryAttention, StarConfig};

#[derive(Parser, Debug)]
#[command(about = "8-bit KV against 16-bit: bytes at rest, CPU decode attention, logits")]
struct Args {
    /// Context tokens (chat head + document).
    #[arg(long, env = "STARKV_KV8_CONTEXT", default_value_t = 4096)]
    context: usize,
    /// Block size (anchor = block).
    #[arg(long, env = "STARKV_KV8_BLOCK", default_value_t = 1024)]
    block: usize,
    /// Repeats of the attention timing; the table shows medians.
    #[arg(long, env = "STARKV_KV8_REPEATS", default_value_t = 31)]
    repeats: usize,
    /// Needles (one question each) for the logits comparison.
    #[arg(long, env = "STARKV_KV8_QUESTIONS", default_value_t = 4)]
    questions: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn median(mut s: Vec<f64>) -> f64 {
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Byte histograms, for the order-0 entropy (bits per byte) of a byte stream: a bound on
/// what an entropy coder without context (zstd's literals) can reach.
struct Histogram([u64; 256]);

impl Default for Histogram {
    fn default() -> Self {
        Self([0; 256])
    }
}

impl Histogram {
    fn add(&mut self, bytes: impl IntoIterator<Item = u8>) {
        for b in bytes {
            self.0[b as usize] += 1;
        }
    }

    fn bits_per_byte(&self) -> f64 {
        let n: u64 = self.0.iter().sum();
        self.0
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / n as f64;
                -p * p.log2()
            })
            .sum()
    }
}

/// The block as the store keeps an int8 (or fp8: `dtype`) document's block, read back as
/// the service holds it (the same tensors and the same conversion as `service/src/kv.rs`).
fn stored_8bit(block: &BlockKv, dtype: DType) -> Result<(BlockKv, Vec<Tensor>)> {
    let s = block.shape;
    let half = s.n_kv_heads * block.len;
    let format = if dtype == DType::F8 {
        Kv8Format::Fp8
    } else {
        Kv8Format::Int8
    };
    let mut layers = Vec::new();
    let mut tensors = Vec::new();
    for (k, v) in &block.layers {
        let t = Tensor::kv_layer(
            dtype,
            s.n_kv_heads as u32,
            block.len as u32,
            s.head_dim as u32,
            k,
            v,
        )?;
        let (scales, q) = t.as_8bit().expect("an 8-bit tensor");
        let q: &[i8] = bytemuck::cast_slice(q);
        let (qk, qv) = q.split_at(q.len() / 2);
        let part = |q: &[i8], sc: &[f32]| Kv8 {
            q: q.to_vec(),
            scales: sc.to_vec(),
            rows_per_scale: 1,
            format,
        };
        layers.push((part(qk, &scales[..half]), part(qv, &scales[half..])));
        tensors.push(t);
    }
    Ok((
        BlockKv::quantized(block.start, block.len, s, layers),
        tensors,
    ))
}

/// The first answer token's logits of `query` over `shard`.
fn first_logits(
    model: &Llama,
    shard: &CpuShard,
    context: usize,
    query: &[u32],
) -> Result<Vec<f32>> {
    let (n_layers, shape) = (model.config().n_layers, model.head_shape());
    let mut attention = QueryAttention::new(vec![shard], n_layers, shape, query.len());
    let positions: Vec<usize> = (context..context + query.len()).collect();
    let hidden = model.forward(query, &positions, &mut attention)?;
    let h = model.config().hidden;
    Ok(model.logits(&hidden[hidden.len() - h..]))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let loaded = prompt::load_default_model()?;
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let head_len = prompt::context_head_len(tokenizer)?;
    let count_tokens = |s: &str| {
        tokenizer
            .encode(s, false)
            .map_or(usize::MAX, |ids| ids.len())
    };
    let case = niah::build_case(
        niah::seed_of(&[args.context as u64, 8]),
        niah::Task::MultiKey,
        0.5,
        args.context.saturating_sub(head_len),
        &count_tokens,
    );
    let context = prompt::context_ids(tokenizer, &case.document)?;
    let l = context.len();
    eprintln!("encoding {l} tokens in blocks of {}", args.block);
    let blocks = Phase1::new(model, &context, StarConfig::new(args.block))?.encode_all()?;

    // (a) bytes at rest.
    let cfg = CodecConfig::default();
    // (raw, at rest) of: f16 (a CPU host's default), bf16 (a GPU host's), int8 with one
    // scale per token and head (what `kv_dtype = int8` stores), int8 with one scale per
    // block and head (the coarser alternative, measured for comparison only), and the
    // same two for fp8 e4m3 (per token and head: what `kv_dtype = fp8` stores).
    let mut bytes = [(0usize, 0usize); 6];
    let mut f32_blocks = Vec::new();
    let mut i8_blocks = Vec::new();
    let mut block_scaled = Vec::new();
    let mut f8_blocks = Vec::new();
    let mut f8_block_scaled = Vec::new();
    let (mut tokf8, mut blkf8) = (Histogram::default(), Histogram::default());
    // Why int8 is further from bf16 at rest than from f16: order-0 entropy of the bf16
    // high bytes (sign, exponent: the shuffle's compressible plane), its low bytes, the
    // int8 values with per-token and with per-block scales.
    let (mut hi16, mut lo16, mut tok8, mut blk8) = Default::default();
    let (hi16, lo16, tok8, blk8): (
        &mut Histogram,
        &mut Histogram,
        &mut Histogram,
        &mut Histogram,
    ) = (&mut hi16, &mut lo16, &mut tok8, &mut blk8);
    for block in blocks {
        let s = block.shape;
        let (h, d) = (s.n_kv_heads as u32, s.head_dim as u32);
        for (k, v) in &block.layers {
            for (i, dtype) in [(0, DType::F16), (1, DType::BF16)] {
                let t = Tensor::kv_layer(dtype, h, block.len as u32, d, k, v)?;
                bytes[i].0 += t.byte_len();
                bytes[i].1 += codec::encode(&t, &cfg).len();
                if dtype == DType::BF16 {
                    lo16.add(t.as_bytes().iter().step_by(2).copied());
                    hi16.add(t.as_bytes().iter().skip(1).step_by(2).copied());
                }
            }
            let coarse =
                Tensor::from_f32_parts(DType::I8, vec![2, h, block.len as u32 * d], &[k, v])?;
            bytes[3].0 += coarse.byte_len();
            bytes[3].1 += codec::encode(&coarse, &cfg).len();
            if let Some((_, q)) = coarse.as_i8() {
                blk8.add(q.iter().map(|&x| x as u8));
            }
            let coarse =
                Tensor::from_f32_parts(DType::F8, vec![2, h, block.len as u32 * d], &[k, v])?;
            bytes[5].0 += coarse.byte_len();
            bytes[5].1 += codec::encode(&coarse, &cfg).len();
            if let Some((_, q)) = coarse.as_8bit() {
                blkf8.add(q.iter().copied());
            }
        }
        let (f8, tensors) = stored_8bit(&block, DType::F8)?;
        for t in &tensors {
            bytes[4].0 += t.byte_len();
            bytes[4].1 += codec::encode(t, &cfg).len();
            if let Some((_, q)) = t.as_8bit() {
                tokf8.add(q.iter().copied());
            }
        }
        f8_blocks.push(Arc::new(f8));
        let layers = block
            .layers
            .iter()
            .map(|(k, v)| {
                let d = s.head_dim;
                (
                    Kv8::quantize_as(Kv8Format::Fp8, k, d, block.len),
                    Kv8::quantize_as(Kv8Format::Fp8, v, d, block.len),
                )
            })
            .collect();
        f8_block_scaled.push(Arc::new(BlockKv::quantized(
            block.start,
            block.len,
            s,
            layers,
        )));
        let (b8, tensors) = stored_8bit(&block, DType::I8)?;
        for t in &tensors {
            bytes[2].0 += t.byte_len();
            bytes[2].1 += codec::encode(t, &cfg).len();
            if let Some((_, q)) = t.as_i8() {
                tok8.add(q.iter().map(|&x| x as u8));
            }
        }
        let layers = block
            .layers
            .iter()
            .map(|(k, v)| {
                let d = s.head_dim;
                (
                    Kv8::quantize(k, d, block.len),
                    Kv8::quantize(v, d, block.len),
                )
            })
            .collect();
        block_scaled.push(Arc::new(BlockKv::quantized(
            block.start,
            block.len,
            s,
            layers,
        )));
        i8_blocks.push(Arc::new(b8));
        f32_blocks.push(Arc::new(block));
    }
    let held32: usize = f32_blocks.iter().map(|b| b.n_bytes()).sum();
    let held8: usize = i8_blocks.iter().map(|b| b.n_bytes()).sum();
    let shape = model.head_shape();
    let shard32 = CpuShard::new(f32_blocks, shape);
    let shard8 = CpuShard::new(i8_blocks, shape);
    let shard8_block = CpuShard::new(block_scaled, shape);
    let shard_f8 = CpuShard::new(f8_blocks, shape);
    let shard_f8_block = CpuShard::new(f8_block_scaled, shape);

    // (b) decode attention: one query row at every layer, interleaved.
    let n_layers = model.config().n_layers;
    let mut state = 0x1234_5678_9abc_def0u64;
    let q: Vec<f32> = (0..shape.q_width())
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect();
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    let mut max_out_diff = [0f32; 3];
    for repeat in 0..args.repeats + 1 {
        for (which, shard) in [&shard32, &shard8, &shard_f8].into_iter().enumerate() {
            let started = Instant::now();
            let mut outs = Vec::with_capacity(n_layers);
            for layer in 0..n_layers {
                outs.push(shard.attend(layer, &q, 1)?);
            }
            let took = started.elapsed().as_secs_f64();
            if repeat > 0 {
                times[which].push(took);
            }
            if repeat == 0 && which > 0 {
                for (layer, out8) in outs.iter().enumerate() {
                    let a = shard32.attend(layer, &q, 1)?;
                    for (x, y) in a.out.iter().zip(&out8.out) {
                        max_out_diff[which] = max_out_diff[which].max((x - y).abs());
                    }
                }
            }
        }
    }
    let (t32, t8, tf8) = (
        median(times[0].clone()),
        median(times[1].clone()),
        median(times[2].clone()),
    );

    // (c) first-token logits of a few questions.
    let mut rows = Vec::new();
    for question in case.questions().iter().take(args.questions) {
        let query = prompt::query_ids(tokenizer, &question.text)?;
        let a = first_logits(model, &shard32, l, &query)?;
        let b = first_logits(model, &shard8, l, &query)?;
        let c = first_logits(model, &shard8_block, l, &query)?;
        let e = first_logits(model, &shard_f8, l, &query)?;
        let f = first_logits(model, &shard_f8_block, l, &query)?;
        let diff = |b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        let span = a.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
            - a.iter().fold(f32::INFINITY, |m, &x| m.min(x));
        rows.push((
            question.text.clone(),
            [argmax(&a), argmax(&b), argmax(&c), argmax(&e), argmax(&f)],
            [diff(&b), diff(&c), diff(&e), diff(&f)],
            span,
        ));
    }

    println!("## 8-bit KV vs 16-bit (SmolLM2-135M-Instruct, CPU)");
    println!();
    println!(
        "{} | {} | context L = {l} tokens, b = a = {}, {n_layers} layers | {} repeats, interleaved",
        machine::utc_now(),
        machine::describe(),
        args.block,
        args.repeats
    );
    println!();
    println!(
        "| (a) bytes, raw / at rest (codec: shuffled zstd-1, header, CRC) | raw | at rest | at rest / f16 | at rest / bf16 |"
    );
    println!("|---|---|---|---|---|");
    for (name, (raw, rest)) in [
        "f16 (CPU host default)",
        "bf16 (GPU host default)",
        "int8, f16 scale per token and head (kv_dtype = int8)",
        "int8, f16 scale per block and head (comparison only)",
        "fp8 e4m3, f16 scale per token and head (kv_dtype = fp8)",
        "fp8 e4m3, f16 scale per block and head (comparison only)",
    ]
    .iter()
    .zip(bytes)
    {
        println!(
            "| {name} | {raw} | {rest} | {:.3} | {:.3} |",
            rest as f64 / bytes[0].1 as f64,
            rest as f64 / bytes[1].1 as f64
        );
    }
    println!(
        "| held in memory on the CPU: f16 doc (f32) / int8 doc | {held32} | {held8} | {:.3} | |",
        held8 as f64 / held32 as f64
    );
    println!();
    println!(
        "| (a') order-0 entropy of the bytes (what zstd's literal coding can reach) | bits per byte | bits per value |"
    );
    println!("|---|---|---|");
    let (h, l8) = (hi16.bits_per_byte(), lo16.bits_per_byte());
    println!("| bf16 high bytes (sign, exponent, 1 mantissa bit) | {h:.2} | |");
    println!(
        "| bf16 low bytes (7 mantissa bits) | {l8:.2} | {:.2} (both bytes) |",
        h + l8
    );
    let e_tok = tok8.bits_per_byte();
    println!(
        "| int8 values, per-token scales (kv_dtype = int8) | {e_tok:.2} | {e_tok:.2} (+ scales) |"
    );
    let e_blk = blk8.bits_per_byte();
    println!("| int8 values, per-block scales (comparison only) | {e_blk:.2} | {e_blk:.2} |");
    let (e_tf8, e_bf8) = (tokf8.bits_per_byte(), blkf8.bits_per_byte());
    println!(
        "| fp8 values, per-token scales (kv_dtype = fp8) | {e_tf8:.2} | {e_tf8:.2} (+ scales) |"
    );
    println!("| fp8 values, per-block scales (comparison only) | {e_bf8:.2} | {e_bf8:.2} |");
    println!(
        "| int8 (per token) / bf16 from these entropies | | {:.3} |",
        e_tok / (h + l8)
    );
    println!();
    println!(
        "| (b) decode attention, 1 row x {n_layers} layers over {l} tokens | median | vs 16-bit doc |"
    );
    println!("|---|---|---|");
    println!("| 16-bit doc (held f32) | {:.3} ms | 1.00x |", t32 * 1e3);
    println!(
        "| int8 (held 8-bit, tile dequantised) | {:.3} ms | {:.2}x faster |",
        t8 * 1e3,
        t32 / t8
    );
    println!(
        "| fp8 (held 8-bit, tile dequantised) | {:.3} ms | {:.2}x faster |",
        tf8 * 1e3,
        t32 / tf8
    );
    println!(
        "| max abs difference of the attention outputs: int8 / fp8 | {:.4} / {:.4} | |",
        max_out_diff[1], max_out_diff[2]
    );
    println!();
    println!(
        "| (c) question | top-1: f32 / int8 per token / int8 per block / fp8 per token / fp8 per block | max abs logit difference vs f32: int8 per token / per block / fp8 per token / per block | logit range |"
    );
    println!("|---|---|---|---|");
    for (text, top, diff, span) in &rows {
        println!(
            "| {text} | {} / {} / {} / {} / {} | {:.3} / {:.3} / {:.3} / {:.3} | {span:.1} |",
            top[0], top[1], top[2], top[3], top[4], diff[0], diff[1], diff[2], diff[3]
        );
    }
    Ok(())
}
