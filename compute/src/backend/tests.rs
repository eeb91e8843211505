//! The backend on the CPU (CI has no GPU): device selection never panics, and answers
//! through [`Backend`] equal the direct phase-1/phase-2 path token for token. The GPU
//! side is checked by `starkv selftest --device cuda` ("backend: ..." rows).

use std::sync::Arc;

use super::*;
use crate::generate::StopReason;
use crate::model::LlamaConfig;
use crate::partial::ContextMerge;
use crate::quant::GgmlType;
use crate::sampling::SamplingParams;
use crate::star::PendingPartial;
use crate::tokenizer::Tokenizer;

fn tiny() -> LoadedModel {
    let config = LlamaConfig::tiny_for_tests();
    // A vocabulary of plain-text tokens as large as the model's (no end-of-generation
    // token, so generation always runs to max_tokens).
    let names: Vec<String> = (0..config.vocab).map(|i| format!("t{i}.")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let types = vec![1i64; names.len()];
    LoadedModel {
        model: Llama::random(config, GgmlType::F32, 77),
        tokenizer: Tokenizer::new(&names, &[], &types, "default", None, None, None).unwrap(),
    }
}

fn tokens(n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 31 + 5) % 300) as u32)
        .collect()
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        cancel: Default::default(),
        merge: Default::default(),
        logprobs: None,
    }
}

fn key(i: usize) -> BlockId {
    [i as u8; 32]
}

/// Phase 1 with `encode_all`, phase 2 with one `CpuShard`: what the service and the CLI
/// ran before the backend existed.
fn direct_answer(
    loaded: &LoadedModel,
    context: &[u32],
    config: StarConfig,
    query: &[u32],
    params: &GenerateParams,
) -> (Vec<BlockKv>, Vec<u32>) {
    let model = &loaded.model;
    let blocks = Phase1::new(model, context, config)
        .unwrap()
        .encode_all()
        .unwrap();
    let shard = CpuShard::new(
        blocks.iter().cloned().map(Arc::new).collect(),
        model.head_shape(),
    );
    let mut attention = QueryAttention::new(
        vec![&shard],
        model.config().n_layers,
        model.head_shape(),
        query.len() + params.max_tokens,
    );
    let generation = generate(
        model,
        &loaded.tokenizer,
        query,
        context.len(),
        &mut attention,
        params,
        &mut |_| true,
    )
    .unwrap();
    (blocks, generation.ids)
}

#[test]
fn cpu_is_always_the_cpu_and_auto_never_fails() {
    let loaded = tiny();
    let cpu = Backend::new(&loaded.model, DeviceChoice::Cpu, None).unwrap();
    assert!(matches!(cpu.selected(), Selected::Cpu { .. }));
    assert_eq!(cpu.device_id(), "cpu");
    assert!(cpu.tier_stats().is_none());
    // With a GPU this is the GPU; without one the CPU with the reason.
    let auto = Backend::new(&loaded.model, DeviceChoice::Auto, None).unwrap();
    match auto.selected() {
        Selected::Cpu { reason } => assert!(reason.starts_with("auto"), "{reason}"),
        Selected::Cuda { device } => {
            assert_eq!(auto.device_id(), format!("cuda:{}", device.ordinal))
        }
    }
    assert!(!auto.selected().to_string().is_empty());
}

#[test]
fn an_unusable_cuda_device_is_an_error_not_a_panic() {
    let loaded = tiny();
    match Backend::new(&loaded.model, DeviceChoice::Cuda(4096), None) {
        Err(Error::Device(message)) => assert!(message.contains("cuda:4096"), "{message}"),
        Err(other) => panic!("expected a device error, got {other}"),
        Ok(_) => panic!("no machine has CUDA device 4096"),
    }
}

#[test]
fn cpu_backend_answers_equal_the_direct_path() {
    let loaded = tiny();
    let backend = Backend::cpu();
    let context = tokens(70, 1);
    let query = tokens(5, 2);
    let config = StarConfig::with_anchor(16, 8);
    let params = greedy(6);
    let (want_blocks, want_ids) = direct_answer(&loaded, &context, config, &query, &params);

    // Phase 1 block by block in order (as ingest does), phase 2 through `load`.
    let mut encoder = backend.phase1(&loaded.model, &context, config).unwrap();
    assert_eq!(encoder.n_blocks(), want_blocks.len());
    assert_eq!(encoder.anchor_tokens(), &context[..8]);
    let blocks: Vec<Arc<BlockKv>> = (0..encoder.n_blocks())
        .map(|i| Arc::new(encoder.encode_block(i).unwrap()))
        .collect();
    assert!(encoder.encode_block(blocks.len()).is_err());
    for (got, want) in blocks.iter().zip(&want_blocks) {
        assert_eq!(**got, *want, "block at {}", want.start);
    }
    let keys: Vec<BlockId> = (0..blocks.len()).map(key).collect();
    let mut loads = Vec::new();
    let answer = backend
        .answer::<Error>(
            &loaded,
            &keys,
            &mut |i| {
                loads.push(i);
                Ok(blocks[i].clone())
            },
            &[],
            &query,
            &params,
            &mut |_| true,
        )
        .unwrap();
    assert_eq!(answer.generation.ids, want_ids);
    assert_eq!(answer.resident_blocks, 0);
    assert_eq!(
        loads,
        (0..blocks.len()).collect::<Vec<_>>(),
        "every block loaded once"
    );

    // The one-shot form gives the same answer.
    let doc = backend
        .answer_document(&loaded, &context, config, &query, &params, &mut |_| true)
        .unwrap();
    assert_eq!(doc.generation.ids, want_ids);
    assert_eq!(doc.n_blocks, want_blocks.len());
}

#[test]
fn a_load_error_is_the_callers_error() {
    let loaded = tiny();
    let result = Backend::cpu().answer::<Error>(
        &loaded,
        &[key(0)],
        &mut |_| Err(Error::InvalidInput("no such block".into())),
        &[],
        &tokens(3, 0),
        &greedy(2),
        &mut |_| true,
    );
    assert!(matches!(result, Err(Error::InvalidInput(m)) if m == "no such block"));
}

#[test]
fn blocks_encode_in_any_order() {
    let loaded = tiny();
    let context = tokens(50, 3);
    let config = StarConfig::new(16);
    let want = Phase1::new(&loaded.model, &context, config)
        .unwrap()
        .encode_all()
        .unwrap();
    let backend = Backend::cpu();
    // Block 2 first: the anchor is encoded alone, not cut from block 0.
    let mut encoder = backend.phase1(&loaded.model, &context, config).unwrap();
    for i in [2, 0, 3, 1] {
        let got = encoder.encode_block(i).unwrap();
        assert_eq!((got.start, got.len), (want[i].start, want[i].len));
        let worst = got
            .layers
            .iter()
            .zip(&want[i].layers)
            .flat_map(|((gk, gv), (wk, wv))| gk.iter().zip(wk).chain(gv.iter().zip(wv)))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "block {i}: {worst}");
    }
}

#[test]
fn plain_generation_equals_the_kv_cache_path() {
    let loaded = tiny();
    let prompt = tokens(12, 4);
    let params = greedy(5);
    let model = &loaded.model;
    let mut cache = KvCache::new(model.config().n_layers, model.head_shape(), 32);
    let want = generate(
        model,
        &loaded.tokenizer,
        &prompt,
        0,
        &mut cache,
        &params,
        &mut |_| true,
    )
    .unwrap();
    let got = Backend::cpu()
        .generate_plain(&loaded, &prompt, &params, &mut |_| true)
        .unwrap();
    assert_eq!(got.ids, want.ids);
    assert_eq!(got.text, want.text);
}

/// Counts the layers attended and cancels `cancel` once layer `cancel_at` has been.
struct CancelAtLayer<'a> {
    inner: KvCache,
    cancel: &'a crate::cancel::Cancel,
    cancel_at: usize,
    layers_attended: Vec<usize>,
}

impl crate::model::LayerAttention for CancelAtLayer<'_> {
    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<()> {
        self.layers_attended.push(layer);
        self.inner.attend(layer, q, k, v, m, out)?;
        if layer == self.cancel_at {
            self.cancel.cancel();
        }
        Ok(())
    }
}

#[test]
fn a_cancelled_prefill_stops_before_its_next_layer() {
    let loaded = tiny();
    let model = &loaded.model;
    assert!(model.config().n_layers >= 3);
    let params = greedy(4);
    let mut attention = CancelAtLayer {
        inner: KvCache::new(model.config().n_layers, model.head_shape(), 64),
        cancel: &params.cancel,
        cancel_at: 0,
        layers_attended: Vec::new(),
    };
    let mut pieces = 0;
    let result = generate(
        model,
        &loaded.tokenizer,
        &tokens(20, 5),
        0,
        &mut attention,
        &params,
        &mut |_| {
            pieces += 1;
            true
        },
    );
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    assert_eq!(
        attention.layers_attended,
        vec![0],
        "the forward pass must stop before layer 1"
    );
    assert_eq!(pieces, 0, "nothing is generated after a cancel");
}

/// Decoding keeps what it generated: the answer so far, marked as cancelled.
#[test]
fn a_cancel_during_decoding_stops_at_the_next_step() {
    let loaded = tiny();
    let backend = Backend::cpu();
    let params = greedy(20);
    let mut pieces = 0;
    let result = backend.generate_plain(&loaded, &tokens(8, 6), &params, &mut |_| {
        pieces += 1;
        if pieces == 2 {
            // A client hanging up sets the flag from elsewhere; the piece still succeeds.
            params.cancel.cancel();
        }
        true
    });
    let generation = result.unwrap();
    assert_eq!(generation.stop_reason, StopReason::Cancelled);
    assert_eq!(generation.ids.len(), 2, "no step runs after the cancel");
    assert_eq!(pieces, 2);
}

#[test]
fn a_cancelled_answer_loads_no_more_blocks() {
    let loaded = tiny();
    let params = greedy(4);
    let blocks: Vec<Arc<BlockKv>> = Phase1::new(&loaded.model, &tokens(48, 7), StarConfig::new(16))
        .unwrap()
        .encode_all()
        .unwrap()
        .into_iter()
        .map(Arc::new)
        .collect();
    let keys: Vec<BlockId> = (0..blocks.len()).map(key).collect();
    let mut loads = 0;
    let result = Backend::cpu().answer::<Error>(
        &loaded,
        &keys,
        &mut |i| {
            loads += 1;
            // The client hangs up while the first block loads.
            params.cancel.cancel();
            Ok(blocks[i].clone())
        },
        &[],
        &tokens(4, 8),
        &params,
        &mut |_| true,
    );
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    assert_eq!(loads, 1, "no block is loaded after the cancel");
}

/// A shard worker's session for the tempered group, as the coordinator sees it.
struct TemperedRemote(CpuShard);

impl AttentionShard for TemperedRemote {
    fn start<'a>(&'a self, layer: usize, q: &'a [f32], m: usize) -> Result<PendingPartial<'a>> {
        self.0.start(layer, q, m)
    }

    fn n_tokens(&self) -> usize {
        self.0.n_tokens()
    }

    fn tempered(&self) -> bool {
        true
    }
}

/// APE's tempered merge on the CPU path (issue 14; its math is checked in
/// `partial::tests`): it changes nothing when no block lies after the anchor, it changes
/// the answer's distribution when blocks do (seen in the first step's choice over many
/// temperatures), and the tempered group may be held by shards (a cluster's workers
/// attending at `1 / T`): the same tokens as with every block here.
#[test]
fn tempered_merge_on_the_cpu_path() {
    let loaded = tiny();
    let backend = Backend::cpu();
    let context = tokens(70, 3);
    let query = tokens(5, 4);
    let config = StarConfig::new(16);
    let blocks: Vec<Arc<BlockKv>> = Phase1::new(&loaded.model, &context, config)
        .unwrap()
        .encode_all()
        .unwrap()
        .into_iter()
        .map(Arc::new)
        .collect();
    let keys: Vec<BlockId> = (0..blocks.len()).map(key).collect();
    // `local` blocks here, the others in `shards`.
    let answer = |merge: ContextMerge, local: usize, shards: &[Arc<dyn AttentionShard>]| {
        let params = GenerateParams { merge, ..greedy(6) };
        backend
            .answer::<Error>(
                &loaded,
                &keys[..local],
                &mut |i| Ok(blocks[i].clone()),
                shards,
                &query,
                &params,
                &mut |_| true,
            )
            .map(|a| a.generation.ids)
    };
    let all = blocks.len();
    let exact = answer(ContextMerge::EXACT, all, &[]).unwrap();
    let beyond = ContextMerge {
        temperature: 0.5,
        scale: 0.5,
        tempered_from: context.len(),
    };
    assert_eq!(answer(beyond, all, &[]).unwrap(), exact);
    let differing = [0.0625f32, 0.25, 0.5, 2.0, 4.0].iter().find_map(|&t| {
        let merge = ContextMerge {
            temperature: t,
            scale: 0.015625,
            tempered_from: 16,
        };
        (answer(merge, all, &[]).unwrap() != exact).then_some(merge)
    });
    let merge = differing.expect("no temperature changed the answer");
    let shape = loaded.model.head_shape();
    let remote: Arc<dyn AttentionShard> = Arc::new(TemperedRemote(CpuShard::tempered(
        blocks[1..].to_vec(),
        shape,
        merge,
    )));
    assert_eq!(
        answer(merge, 1, std::slice::from_ref(&remote)).unwrap(),
        answer(merge, all, &[]).unwrap(),
        "the tempered group on a shard answers as on the query host"
    );
    assert!(matches!(
        answer(ContextMerge::EXACT, 1, &[remote]),
        Err(Error::InvalidInput(m)) if m.contains("tempered")
    ));
}

/// [`BlockEncoder::encode_reencoded`]'s blocks, checked to arrive in order.
fn reencoded(
    enc: &mut BlockEncoder<'_>,
    model: &Llama,
    backend: &Backend,
    ratio: f32,
    keep: Option<&[BlockId]>,
) -> Result<(Vec<BlockKv>, Reencoded)> {
    let mut blocks = Vec::new();
    let done = enc.encode_reencoded(model, backend, 24, ratio, keep, &mut |i, b| {
        assert_eq!(i, blocks.len(), "blocks arrive in order");
        blocks.push(b);
        Ok(())
    })?;
    Ok((blocks, done))
}

#[test]
fn encode_reencoded_is_phase1_then_the_reencoding_pass() {
    // An anchor of two blocks: the ingest path's blocks equal phase 1's blocks re-encoded
    // by the pass itself, exactly; r = 0 is phase 1; a key per block or none; a failing
    // sink stops the blocks after it.
    let loaded = tiny();
    let model = &loaded.model;
    let backend = Backend::cpu();
    let t = tokens(70, 3);
    let config = StarConfig::with_anchor(12, 24);
    let mut enc = backend.phase1(model, &t, config).unwrap();
    let mut expected = (0..enc.n_blocks())
        .map(|i| enc.encode_block(i).unwrap())
        .collect::<Vec<_>>();
    let phase1 = expected.clone();
    let want = crate::star::reencode::reencode(model, &t, &mut expected, 24, 0.3).unwrap();
    assert_eq!((want.tokens, want.candidates), (14, 46));
    let (got, done) = reencoded(&mut enc, model, &backend, 0.3, None).unwrap();
    assert_eq!(done, want);
    assert_eq!(got, expected);
    assert_ne!(got, phase1, "r = 0.3 changed nothing");
    let (none, done) = reencoded(&mut enc, model, &backend, 0.0, None).unwrap();
    assert_eq!((none, done.tokens), (phase1, 0));
    let keys: Vec<BlockId> = (0..enc.n_blocks()).map(key).collect();
    assert!(reencoded(&mut enc, model, &backend, 0.3, Some(&keys[1..])).is_err());
    let (kept, _) = reencoded(&mut enc, model, &backend, 0.3, Some(&keys)).unwrap();
    assert_eq!(kept, expected);
    let mut seen = 0;
    let failed = enc.encode_reencoded(model, &backend, 24, 0.3, None, &mut |i, _| {
        seen += 1;
        if i == 2 {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    });
    assert!(matches!(failed, Err(Error::Cancelled)), "{failed:?}");
    assert_eq!(seen, 3, "blocks after a failed one were still handed over");
}
