//! The self-test of [`crate::backend::Backend`] on the GPU against the CPU backend, on a
//! real model and through the same calls the service and `generate` make.

use std::sync::Arc;
use std::time::Instant;

use super::{PROMPT, Report, Result, ms, rel};
use crate::backend::{Backend, BlockId, BlockReader, StoredContext};
use crate::cuda::{Gpu, HalfType};
use crate::generate::GenerateParams;
use crate::kv8::Kv8Format;
use crate::sampling::SamplingParams;
use crate::star::{BlockKv, StarConfig};

/// A document of about 600 tokens with one fact, and the question about it.
fn backend_document() -> (String, &'static str) {
    let mut paragraphs: Vec<String> = (0..14)
        .map(|i| {
            format!(
                "Chapter {i}. The harbour town kept its lamps lit through the long winter. Fishing \
                 boats left before dawn and returned at noon, and the market square filled with \
                 traders selling rope, salt and bread."
            )
        })
        .collect();
    paragraphs[6] = "The special magic number for the harbour town is 6194027. Remember it.".into();
    (
        paragraphs.join("\n\n"),
        "What is the special magic number for the harbour town?",
    )
}

/// [`crate::backend::Backend`] on the GPU against the CPU backend on a real model: phase-1
/// blocks as ingest encodes them, a greedy star answer as the service runs it (blocks
/// streamed, then resident in the tier, then mixed), the one-shot document answer and
/// plain generation. bf16 answers may drift after a few tokens: the first token must
/// agree, the agreement of the first 8 is reported.
pub(super) fn checks(
    gpu: &Arc<Gpu>,
    report: &mut Report,
    u: f64,
    loaded: &crate::LoadedModel,
) -> Result<()> {
    let t = Instant::now();
    let cpu = Backend::cpu();
    let on_gpu = Backend::on_gpu(gpu.clone(), &loaded.model, Some(256 << 20))?;
    println!(
        "    (backend on {}, uploaded in {:.0} ms)",
        on_gpu.selected(),
        ms(t)
    );
    let (document, question) = backend_document();
    let context = crate::prompt::document_context(&loaded.tokenizer, None, &document)?;
    let query = crate::prompt::question_query(&loaded.tokenizer, question)?;
    let config = StarConfig::new(256);
    let params = GenerateParams {
        max_tokens: 8,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        cancel: Default::default(),
        merge: Default::default(),
        logprobs: None,
    };

    // Phase 1 block by block, as ingest runs it.
    let t = Instant::now();
    let encode_with = |backend: &Backend, config: StarConfig| -> Result<Vec<Arc<BlockKv>>> {
        let mut encoder = backend.phase1(&loaded.model, &context, config)?;
        (0..encoder.n_blocks())
            .map(|i| Ok(Arc::new(encoder.encode_block(i)?)))
            .collect()
    };
    let encode = |backend: &Backend| encode_with(backend, config);
    // Worst relative difference of two encodings, and where it is (block, layer).
    let kv_diff = |a: &[Arc<BlockKv>], b: &[Arc<BlockKv>]| -> (f64, (usize, usize)) {
        let (mut err, mut at) = (0f64, (0, 0));
        for (bi, (g, c)) in a.iter().zip(b).enumerate() {
            for (l, (gl, cl)) in g.layers.iter().zip(&c.layers).enumerate() {
                let e = rel(&gl.0, &cl.0).max(rel(&gl.1, &cl.1));
                if e > err {
                    (err, at) = (e, (bi, l));
                }
            }
        }
        (err, at)
    };
    let cpu_blocks = encode(&cpu)?;
    let gpu_blocks = encode(&on_gpu)?;
    let (kv_err, worst_at) = kv_diff(&gpu_blocks, &cpu_blocks);
    println!(
        "    ({} context tokens in {} blocks; worst block {} layer {})",
        context.len(),
        cpu_blocks.len(),
        worst_at.0,
        worst_at.1
    );
    report.check(
        "backend: phase-1 blocks GPU vs CPU (b=256, a=256)",
        "rel",
        kv_err,
        8.0 * u,
        ms(t),
    );

    // An anchor of two blocks (issue 14): the blocks inside it are rows of the anchor.
    let t = Instant::now();
    let long_anchor = StarConfig::with_anchor(128, 256);
    let (err, _) = kv_diff(
        &encode_with(&on_gpu, long_anchor)?,
        &encode_with(&cpu, long_anchor)?,
    );
    report.check(
        "backend: phase-1 blocks GPU vs CPU (b=128, a=256)",
        "rel",
        err,
        8.0 * u,
        ms(t),
    );

    // Phase 2 as the service runs it: every block through `load` on the CPU; on the GPU
    // streamed the first time, from the resident tier the second time.
    let keys: Vec<BlockId> = (0..cpu_blocks.len()).map(|i| [i as u8 + 1; 32]).collect();
    let t = Instant::now();
    let answer = |backend: &Backend,
                  keys: &[BlockId],
                  blocks: &[Arc<BlockKv>]|
     -> Result<(Vec<u32>, usize, usize)> {
        let mut loads = 0;
        let a = backend.answer::<crate::Error>(
            loaded,
            keys,
            &mut |i| {
                loads += 1;
                Ok(blocks[i].clone())
            },
            &[],
            &query,
            &params,
            &mut |_| true,
        )?;
        Ok((a.generation.ids, a.resident_blocks, loads))
    };
    let (want, _, _) = answer(&cpu, &keys, &cpu_blocks)?;
    let (streamed, resident, _) = answer(&on_gpu, &keys, &gpu_blocks)?;
    let agree = want
        .iter()
        .zip(&streamed)
        .take_while(|(a, b)| a == b)
        .count();
    println!(
        "    (first 8 ids: CPU {want:?}, GPU {streamed:?}: the first {agree} agree; answer {:?})",
        loaded.tokenizer.decode(&streamed)
    );
    report.check(
        "backend: star answer GPU vs CPU, first token",
        "mismatch",
        (want.first() != streamed.first() || streamed.is_empty()) as u8 as f64,
        0.0,
        ms(t),
    );
    report.check(
        "backend: star answer GPU vs CPU, first 8 (info)",
        "differ",
        (8 - agree.min(8)) as f64,
        8.0,
        ms(t),
    );
    let t = Instant::now();
    let (again, resident_again, loads_again) = answer(&on_gpu, &keys, &gpu_blocks)?;
    report.check(
        "backend: repeat query served from the GPU tier",
        "loads",
        (loads_again + (keys.len() - resident_again) + resident) as f64,
        0.0,
        ms(t),
    );
    report.check(
        "backend: tier answer == streamed answer",
        "mismatch",
        (again != streamed) as u8 as f64,
        0.0,
        ms(t),
    );
    // Mixed: block 0 resident, the others streamed.
    let t = Instant::now();
    on_gpu.forget_resident();
    answer(&on_gpu, &keys[..1], &gpu_blocks[..1])?;
    let (mixed, resident_mixed, _) = answer(&on_gpu, &keys, &gpu_blocks)?;
    report.check(
        "backend: mixed resident+streamed == streamed answer",
        "mismatch",
        ((mixed != streamed) as usize + (resident_mixed != 1) as usize) as f64,
        0.0,
        ms(t),
    );

    // An int8 document (`kv_dtype = int8`; the GPU's phase-1 blocks quantised, as an
    // ingest on this GPU stores them): its blocks are uploaded whole in 8 bits on the
    // first answer (counted as loaded, not resident) and resident from then on; the GPU's
    // 8-bit attention gives the CPU's 8-bit answer's first token.
    let t = Instant::now();
    let int8_blocks: Vec<Arc<BlockKv>> = gpu_blocks
        .iter()
        .map(|b| Arc::new(b.to_8bit(Kv8Format::Int8)))
        .collect();
    let int8_keys: Vec<BlockId> = (0..int8_blocks.len())
        .map(|i| [i as u8 + 101; 32])
        .collect();
    let (want8, _, _) = answer(&cpu, &int8_keys, &int8_blocks)?;
    let (first8, resident8, loads8) = answer(&on_gpu, &int8_keys, &int8_blocks)?;
    let (again8, resident8_again, loads8_again) = answer(&on_gpu, &int8_keys, &int8_blocks)?;
    println!(
        "    (int8 blocks: first 8 ids CPU {:?}, GPU {:?}; resident {resident8} then {resident8_again} of {})",
        &want8[..want8.len().min(8)],
        &first8[..first8.len().min(8)],
        int8_keys.len()
    );
    report.check(
        "backend: int8 blocks loaded, then resident (counts)",
        "wrong",
        ((resident8 != 0) as usize
            + (loads8 != int8_keys.len()) as usize
            + (resident8_again != int8_keys.len()) as usize
            + (loads8_again != 0) as usize) as f64,
        0.0,
        ms(t),
    );
    report.check(
        "backend: int8 answer GPU vs CPU first token, tier answer == loaded answer",
        "mismatch",
        ((want8.first() != first8.first() || first8.is_empty()) as usize
            + (again8 != first8) as usize) as f64,
        0.0,
        ms(t),
    );

    // The cold path (`answer_stored`, what the service runs on a GPU): no block resident,
    // blocks read from a "store" of 16-bit copies and re-encoded at once; then with one
    // unreadable block, which is re-encoded instead.
    let t = Instant::now();
    let reader = HalfBlocks {
        blocks: &gpu_blocks,
        fail: None,
    };
    let stored_as = |reader: &HalfBlocks<'_>,
                     kv8: Option<Kv8Format>|
     -> Result<(Vec<u32>, usize, usize, usize)> {
        on_gpu.forget_resident();
        let stored = StoredContext {
            tokens: &context,
            config,
            reader,
            kv8,
        };
        let a = on_gpu.answer_stored(loaded, &keys, &stored, &query, &params, &mut |_| true)?;
        let cold = a.cold.unwrap_or_default();
        Ok((
            a.generation.ids,
            cold.loaded_blocks,
            cold.encoded_blocks,
            cold.failed_reads.len(),
        ))
    };
    let stored = |reader: &HalfBlocks<'_>| stored_as(reader, None);
    let (cold, n_loaded, n_encoded, _) = stored(&reader)?;
    println!("    (cold answer: {n_loaded} blocks loaded, {n_encoded} re-encoded)");
    report.check(
        "backend: cold answer (load + re-encode) == streamed answer",
        "mismatch",
        ((cold != streamed) as usize + (n_loaded + n_encoded != keys.len()) as usize) as f64,
        0.0,
        ms(t),
    );
    let t = Instant::now();
    let failing = HalfBlocks {
        blocks: &gpu_blocks,
        fail: Some(keys.len() - 1),
    };
    let (cold_failed, _, _, failed) = stored(&failing)?;
    report.check(
        "backend: cold answer with an unreadable block == streamed answer",
        "mismatch",
        ((cold_failed != streamed) as usize + (failed > 1) as usize) as f64,
        0.0,
        ms(t),
    );
    // The int8 document's cold path: its stored 8-bit layers loaded as they are (an
    // unreadable block re-encoded and quantised on the host); then with the split on
    // (`Gpu::cold_split8`): the other blocks re-encoded and quantised on the device, bit
    // for bit the store's quantiser on the GPU's phase-1 values, so every answer is the
    // loaded one.
    let int8_reader = HalfBlocks {
        blocks: &int8_blocks,
        fail: None,
    };
    let int8_failing = HalfBlocks {
        blocks: &int8_blocks,
        fail: Some(keys.len() - 1),
    };
    let split8_was = gpu.cold_split8();
    let runs: Result<Vec<_>> = [false, true]
        .into_iter()
        .map(|split8| {
            gpu.set_cold_split8(split8);
            let t = Instant::now();
            let cold = stored_as(&int8_reader, Some(Kv8Format::Int8))?;
            let failing = stored_as(&int8_failing, Some(Kv8Format::Int8))?;
            Ok((split8, ms(t), cold, failing))
        })
        .collect();
    gpu.set_cold_split8(split8_was);
    for (split8, took_ms, (cold8, loaded8, encoded8, _), (cold8_failed, _, _, failed8)) in runs? {
        let how = if split8 {
            "split, re-encoded blocks quantised on the device"
        } else {
            "8-bit loads"
        };
        println!("    (int8 cold answer, {how}: {loaded8} blocks loaded, {encoded8} re-encoded)");
        let counts_wrong = if split8 {
            loaded8 + encoded8 != keys.len()
        } else {
            loaded8 != keys.len() || encoded8 != 0
        };
        report.check(
            &format!("backend: int8 cold answer ({how}) == loaded int8 answer"),
            "mismatch",
            ((cold8 != first8) as usize + counts_wrong as usize) as f64,
            0.0,
            took_ms,
        );
        report.check(
            &format!("backend: int8 cold answer ({how}), an unreadable block == loaded"),
            "mismatch",
            ((cold8_failed != first8) as usize + (failed8 > 1) as usize) as f64,
            0.0,
            took_ms,
        );
    }

    // The one-shot document answer (generate --document) and plain generation.
    let t = Instant::now();
    let doc_cpu = cpu.answer_document(loaded, &context, config, &query, &params, &mut |_| true)?;
    let doc_gpu =
        on_gpu.answer_document(loaded, &context, config, &query, &params, &mut |_| true)?;
    report.check(
        "backend: answer_document GPU vs CPU, first token",
        "mismatch",
        (doc_cpu.generation.ids.first() != doc_gpu.generation.ids.first()) as u8 as f64,
        0.0,
        ms(t),
    );
    // Greedy answers pick their tokens on the device with pipelined steps; asking for
    // log-probabilities takes the logits path (host argmax): the same tokens and text.
    let t = Instant::now();
    let device_greedy_was = gpu.device_greedy();
    gpu.set_device_greedy(true);
    let doc_picked =
        on_gpu.answer_document(loaded, &context, config, &query, &params, &mut |_| true);
    gpu.set_device_greedy(device_greedy_was);
    let doc_picked = doc_picked?;
    let with_logprobs = GenerateParams {
        logprobs: Some(1),
        ..params.clone()
    };
    let doc_logits = on_gpu.answer_document(
        loaded,
        &context,
        config,
        &query,
        &with_logprobs,
        &mut |_| true,
    )?;
    let (picked, sampled) = (&doc_picked.generation, &doc_logits.generation);
    report.check(
        "backend: answer_document, tokens picked on the GPU (pipelined) == logits path",
        "mismatch",
        ((picked.ids != sampled.ids) as usize
            + (picked.text != sampled.text) as usize
            + (picked.stop_reason != sampled.stop_reason) as usize
            + (sampled.logprobs.len() != sampled.ids.len()) as usize) as f64,
        0.0,
        ms(t),
    );
    let t = Instant::now();
    let prompt = loaded.tokenizer.encode(PROMPT, false)?;
    let plain_cpu = cpu.generate_plain(loaded, &prompt, &params, &mut |_| true)?;
    let plain_gpu = on_gpu.generate_plain(loaded, &prompt, &params, &mut |_| true)?;
    report.check(
        "backend: plain generation GPU vs CPU, first token",
        "mismatch",
        (plain_cpu.ids.first() != plain_gpu.ids.first()) as u8 as f64,
        0.0,
        ms(t),
    );
    Ok(())
}

/// A stand-in for the store: blocks as 16-bit copies of the encoder's output (bf16 blocks
/// convert back exactly), one of them unreadable when `fail` says so.
struct HalfBlocks<'a> {
    blocks: &'a [Arc<BlockKv>],
    fail: Option<usize>,
}

impl BlockReader for HalfBlocks<'_> {
    fn read_block(
        &self,
        block: usize,
        dtype: HalfType,
        dst: &mut [u16],
    ) -> std::result::Result<(), String> {
        if self.fail == Some(block) {
            return Err("checksum mismatch (test)".into());
        }
        let b = self.blocks.get(block).ok_or("no such block")?;
        let mut off = 0;
        for (k, v) in &b.layers {
            for part in [k, v] {
                let end = off + part.len();
                let out = dst.get_mut(off..end).ok_or("buffer too small")?;
                dtype.encode(part, out);
                off = end;
            }
        }
        if off != dst.len() {
            return Err(format!("{off} values for a buffer of {}", dst.len()));
        }
        Ok(())
    }

    /// The store's layout of an 8-bit layer: K's rows' f16 scales, V's, then K's and V's
    /// values.
    fn read_block_8bit(
        &self,
        block: usize,
        format: Kv8Format,
        dst: &mut [u8],
    ) -> std::result::Result<(), String> {
        if self.fail == Some(block) {
            return Err("checksum mismatch (test)".into());
        }
        let b = self.blocks.get(block).ok_or("no such block")?;
        let kv8 = b.kv8.as_ref().ok_or("not an 8-bit block")?;
        let mut out = Vec::with_capacity(dst.len());
        for (k, v) in kv8 {
            if k.format != format || k.rows_per_scale != 1 {
                return Err(format!(
                    "{:?} values, {} rows a scale",
                    k.format, k.rows_per_scale
                ));
            }
            for s in k.scales.iter().chain(&v.scales) {
                out.extend_from_slice(&half::f16::from_f32(*s).to_bits().to_le_bytes());
            }
            out.extend(k.q.iter().chain(&v.q).map(|&x| x as u8));
        }
        if out.len() != dst.len() {
            return Err(format!("{} bytes for a buffer of {}", out.len(), dst.len()));
        }
        dst.copy_from_slice(&out);
        Ok(())
    }
}
