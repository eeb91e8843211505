//! Star Attention on a small random-weight model: exactness where the algorithm is exact,
//! independence of blocks, shard handling and positions.

use std::sync::Arc;

use super::*;
use crate::cpu::attention::{
    Attended, HeadShape, Mask, attention, attention_source_into, merge_into,
};
use crate::error::Result;
use crate::model::{KvCache, KvPrecision, LayerAttention, LayerKv, Llama, LlamaConfig};
use crate::quant::GgmlType;

fn tiny_model() -> Llama {
    Llama::random(LlamaConfig::tiny_for_tests(), GgmlType::F32, 77)
}

fn tokens(n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 31 + 5) % 300) as u32)
        .collect()
}

/// Logits of `query` (and each following token) with full causal attention over
/// `context ++ query`.
fn full_attention_logits(model: &Llama, context: &[u32], query: &[u32]) -> Vec<f32> {
    let all: Vec<u32> = context.iter().chain(query).copied().collect();
    let mut cache = KvCache::with_precision(
        model.config().n_layers,
        model.head_shape(),
        all.len(),
        KvPrecision::F32,
    );
    let hidden = model
        .forward(&all, &(0..all.len()).collect::<Vec<_>>(), &mut cache)
        .unwrap();
    let h = model.config().hidden;
    model.logits(&hidden[context.len() * h..])
}

/// Logits of `query` at positions `context_len..` through `attention`.
fn query_logits(
    model: &Llama,
    context_len: usize,
    query: &[u32],
    attention: &mut dyn LayerAttention,
) -> Vec<f32> {
    let positions: Vec<usize> = (context_len..context_len + query.len()).collect();
    model.logits(&model.forward(query, &positions, attention).unwrap())
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Phase 1 of `context` under `config`, every block shared.
fn encoded_blocks(model: &Llama, context: &[u32], config: StarConfig) -> Vec<Arc<BlockKv>> {
    Phase1::new(model, context, config)
        .unwrap()
        .encode_all()
        .unwrap()
        .into_iter()
        .map(Arc::new)
        .collect()
}

/// Logits of `query` after a context of `context_len` tokens held as `blocks` in one
/// shard, attended in f32.
fn one_shard_logits(
    model: &Llama,
    blocks: Vec<Arc<BlockKv>>,
    context_len: usize,
    query: &[u32],
) -> Vec<f32> {
    let shard = CpuShard::new(blocks, model.head_shape());
    let mut attn = QueryAttention::new(vec![&shard], 3, model.head_shape(), 16)
        .with_precision(KvPrecision::F32);
    query_logits(model, context_len, query, &mut attn)
}

/// The context's KV from a full-attention prefill, cut into blocks at `cuts`.
fn full_attention_blocks(model: &Llama, context: &[u32], cuts: &[usize]) -> Vec<Arc<BlockKv>> {
    let c = model.config();
    let mut cache = KvCache::with_precision(
        c.n_layers,
        model.head_shape(),
        context.len(),
        KvPrecision::F32,
    );
    model
        .forward(context, &(0..context.len()).collect::<Vec<_>>(), &mut cache)
        .unwrap();
    let shape = model.head_shape();
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(context.len());
    bounds
        .windows(2)
        .map(|w| {
            let (a, b) = (w[0], w[1]);
            let mut block = BlockKv::new(a, b - a, shape, c.n_layers);
            for l in 0..c.n_layers {
                let layer = cache.layer(l);
                let d = shape.head_dim;
                let (mut k, mut v) = (Vec::new(), Vec::new());
                for t in a..b {
                    for h in 0..shape.n_kv_heads {
                        k.extend_from_slice(&layer.head_k(h)[t * d..(t + 1) * d]);
                        v.extend_from_slice(&layer.head_v(h)[t * d..(t + 1) * d]);
                    }
                }
                block.set_layer_from_rows(l, &k, &v);
            }
            Arc::new(block)
        })
        .collect()
}

#[test]
fn star_with_a_single_block_is_full_attention() {
    let model = tiny_model();
    let (context, query) = (tokens(150, 1), tokens(9, 2));
    let want = full_attention_logits(&model, &context, &query);
    for block_size in [150, 151, 4096] {
        let blocks = encoded_blocks(&model, &context, StarConfig::new(block_size));
        assert_eq!(blocks.len(), 1);
        let got = one_shard_logits(&model, blocks, context.len(), &query);
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-4, "b = {block_size}: max |logit diff| {diff}");
    }
}

/// Phase 2 alone is exact: over the KV of a full-attention prefill, cut into any blocks and
/// grouped into any shards, it reproduces full attention, for the query and for tokens
/// generated after it.
#[test]
fn phase2_over_exact_kv_equals_full_attention_for_any_sharding() {
    let model = tiny_model();
    let (context, query) = (tokens(200, 3), tokens(12, 4));
    let want = full_attention_logits(&model, &context, &query);
    let blocks = full_attention_blocks(&model, &context, &[1, 50, 64, 130, 199]);
    let shape = model.head_shape();
    let groupings: Vec<Vec<Vec<usize>>> = vec![
        vec![vec![0, 1, 2, 3, 4, 5]],
        vec![vec![0], vec![1, 2], vec![3, 4, 5]],
        vec![vec![5, 0], vec![3], vec![2, 4, 1]],
    ];
    for grouping in groupings {
        let shards: Vec<CpuShard> = grouping
            .iter()
            .map(|g| CpuShard::new(g.iter().map(|&i| blocks[i].clone()).collect(), shape))
            .collect();
        let refs: Vec<&dyn AttentionShard> =
            shards.iter().map(|s| s as &dyn AttentionShard).collect();
        let mut attn = QueryAttention::new(refs, 3, shape, 4).with_precision(KvPrecision::F32);
        assert_eq!(attn.context_len(), context.len());
        // The query in two pieces (prefill, then token by token) like generation does.
        let mut got = query_logits(&model, context.len(), &query[..8], &mut attn);
        for (i, &t) in query[8..].iter().enumerate() {
            got.extend(query_logits(&model, context.len() + 8 + i, &[t], &mut attn));
        }
        assert_eq!(
            attn.local_len(),
            query.len(),
            "query KV is held once, locally"
        );
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-4, "{grouping:?}: max |logit diff| {diff}");
    }
}

#[test]
fn shard_order_does_not_change_the_result() {
    let model = tiny_model();
    let (context, query) = (tokens(180, 5), tokens(7, 6));
    let phase1 = Phase1::new(&model, &context, StarConfig::with_anchor(40, 16)).unwrap();
    let blocks: Vec<Arc<BlockKv>> = phase1
        .encode_all()
        .unwrap()
        .into_iter()
        .map(Arc::new)
        .collect();
    assert_eq!(blocks.len(), 5);
    let shape = model.head_shape();
    let run = |order: &[usize]| {
        let shards: Vec<CpuShard> = order
            .iter()
            .map(|&i| CpuShard::new(vec![blocks[i].clone()], shape))
            .collect();
        let refs: Vec<&dyn AttentionShard> =
            shards.iter().map(|s| s as &dyn AttentionShard).collect();
        let mut attn = QueryAttention::new(refs, 3, shape, 8).with_precision(KvPrecision::F32);
        query_logits(&model, context.len(), &query, &mut attn)
    };
    let a = run(&[0, 1, 2, 3, 4]);
    for order in [[4, 3, 2, 1, 0], [2, 0, 4, 1, 3]] {
        let diff = max_diff(&a, &run(&order));
        assert!(diff < 1e-5, "{order:?}: {diff}");
    }
}

/// The reference implementation once appended the query's KV on every shard. This is that
/// bug, written as a `LayerAttention`: each of two shards holds the context blocks it owns
/// plus its own copy of the query KV.
struct DuplicatingQueryKv {
    shards: Vec<(Vec<Arc<BlockKv>>, Vec<LayerKv>)>,
    shape: HeadShape,
}

impl LayerAttention for DuplicatingQueryKv {
    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let scale = 1.0 / (self.shape.head_dim as f32).sqrt();
        let mut acc = Attended::empty(m, self.shape);
        for (blocks, local) in &mut self.shards {
            for b in blocks.iter() {
                merge_into(
                    &mut acc,
                    &attention(q, m, b.view(layer), self.shape, Mask::None, scale),
                    m,
                    self.shape,
                );
            }
            let offset = local[layer].len();
            local[layer].append(k, v);
            let mut part = Attended::empty(m, self.shape);
            attention_source_into(
                q,
                m,
                local[layer].view(),
                self.shape,
                Mask::Causal { offset },
                scale,
                &mut part.out,
                &mut part.lse,
            );
            merge_into(&mut acc, &part, m, self.shape);
        }
        out.copy_from_slice(&acc.out);
        Ok(())
    }
}

/// The exactness check above catches duplicated query KV: with two shards each holding a
/// copy of the query KV the logits move far beyond the tolerance, while QueryAttention
/// (which never hands K/V to a shard) stays within it.
#[test]
fn duplicated_query_kv_across_shards_is_caught() {
    let model = tiny_model();
    let (context, query) = (tokens(120, 7), tokens(10, 8));
    let want = full_attention_logits(&model, &context, &query);
    let blocks = full_attention_blocks(&model, &context, &[60]);
    let shape = model.head_shape();
    let fresh = || {
        (0..3)
            .map(|_| LayerKv::with_precision(shape, 16, KvPrecision::F32))
            .collect::<Vec<_>>()
    };
    let mut buggy = DuplicatingQueryKv {
        shards: vec![
            (vec![blocks[0].clone()], fresh()),
            (vec![blocks[1].clone()], fresh()),
        ],
        shape,
    };
    let buggy_diff = max_diff(
        &query_logits(&model, context.len(), &query, &mut buggy),
        &want,
    );
    assert!(
        buggy_diff > 1e-2,
        "duplicated query KV went unnoticed (diff {buggy_diff})"
    );
    let shards = [
        CpuShard::new(vec![blocks[0].clone()], shape),
        CpuShard::new(vec![blocks[1].clone()], shape),
    ];
    let mut good = QueryAttention::new(vec![&shards[0], &shards[1]], 3, shape, 16)
        .with_precision(KvPrecision::F32);
    let good_diff = max_diff(
        &query_logits(&model, context.len(), &query, &mut good),
        &want,
    );
    assert!(good_diff < 1e-4, "{good_diff}");
}

#[test]
fn a_block_encoded_alone_equals_the_block_in_a_whole_run() {
    let model = tiny_model();
    let context = tokens(230, 9);
    let phase1 = Phase1::new(&model, &context, StarConfig::with_anchor(64, 32)).unwrap();
    let all = phase1.encode_all().unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(
        all[3].len,
        230 - 192,
        "the last block is shorter, not padded"
    );
    let anchor = phase1.encode_anchor().unwrap();
    for i in [3, 0, 2, 1] {
        let alone = phase1.encode_block(i, &anchor).unwrap();
        assert_eq!((alone.start, alone.len), (all[i].start, all[i].len));
        for (l, ((ka, va), (kb, vb))) in alone.layers.iter().zip(&all[i].layers).enumerate() {
            assert!(
                max_diff(ka, kb) < 1e-5 && max_diff(va, vb) < 1e-5,
                "block {i} layer {l}"
            );
        }
    }
}

/// Positions follow DESIGN.md: block 0 at 0..b; block i as [anchor | block] at 0..a then
/// its global positions, so block 2 (the paper's c_3) has a gap; the stored rows equal a
/// plain causal pass over exactly that sequence, anchor rows dropped.
#[test]
fn block_positions_follow_the_design_including_the_gap() {
    let model = tiny_model();
    let context = tokens(40, 10);
    let (b, a) = (12, 5);
    let phase1 = Phase1::new(&model, &context, StarConfig::with_anchor(b, a)).unwrap();
    assert_eq!(phase1.sequence_positions(0), (0..12).collect::<Vec<_>>());
    assert_eq!(
        phase1.sequence_positions(1),
        [
            0, 1, 2, 3, 4, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23
        ]
    );
    let third = phase1.sequence_positions(2);
    assert_eq!(
        &third[..6],
        &[0, 1, 2, 3, 4, 24],
        "a gap after the anchor from block 2 on"
    );
    assert_eq!(
        phase1.sequence_positions(3),
        [0, 1, 2, 3, 4, 36, 37, 38, 39]
    );
    let blocks = phase1.encode_all().unwrap();
    for (i, block) in blocks.iter().enumerate().skip(1) {
        let range = phase1.block_range(i);
        let seq: Vec<u32> = context[..a]
            .iter()
            .chain(&context[range.clone()])
            .copied()
            .collect();
        let mut cache = KvCache::with_precision(3, model.head_shape(), seq.len(), KvPrecision::F32);
        model
            .forward(&seq, &phase1.sequence_positions(i), &mut cache)
            .unwrap();
        assert_eq!(block.start, range.start);
        for l in 0..3 {
            for h in 0..model.head_shape().n_kv_heads {
                let d = model.head_shape().head_dim;
                let want_k = &cache.layer(l).head_k(h)[a * d..];
                let got_k =
                    &blocks[i].layers[l].0[h * blocks[i].len * d..(h + 1) * blocks[i].len * d];
                assert!(
                    max_diff(got_k, want_k) < 1e-5,
                    "block {i} layer {l} head {h}"
                );
            }
        }
    }
}

#[test]
fn bad_configurations_are_errors() {
    let model = tiny_model();
    let context = tokens(10, 0);
    assert!(Phase1::new(&model, &context, StarConfig::with_anchor(0, 0)).is_err());
    assert!(Phase1::new(&model, &context, StarConfig::with_anchor(4, 5)).is_err());
    // A longer anchor must be whole blocks.
    assert!(Phase1::new(&model, &context, StarConfig::with_anchor(4, 10)).is_err());
    assert!(Phase1::new(&model, &[], StarConfig::new(4)).is_err());
}

/// An anchor of whole blocks (`a = k * b`, issue 14): the blocks inside it are exactly the
/// causal prefill's rows, every later block is `[anchor | block]` with the longer anchor,
/// and an anchor covering the context makes Star Attention full attention.
#[test]
fn an_anchor_of_whole_blocks_is_a_causal_prefix_seen_by_every_later_block() {
    let model = tiny_model();
    let context = tokens(170, 4);
    let config = StarConfig::with_anchor(40, 80);
    let phase1 = Phase1::new(&model, &context, config).unwrap();
    let blocks = phase1.encode_all().unwrap();
    assert_eq!(blocks.len(), 5);
    let full = full_attention_blocks(&model, &context, &[40, 80, 120, 160]);
    for i in 0..2 {
        assert!(phase1.in_anchor(i));
        assert_eq!(
            (blocks[i].start, blocks[i].len),
            (full[i].start, full[i].len)
        );
        for ((ka, va), (kb, vb)) in blocks[i].layers.iter().zip(&full[i].layers) {
            assert!(
                max_diff(ka, kb) < 1e-4 && max_diff(va, vb) < 1e-4,
                "block {i}"
            );
        }
    }
    assert_eq!(
        phase1.sequence_positions(2)[..80],
        (0..80).collect::<Vec<_>>()[..]
    );
    assert_eq!(
        phase1.sequence_positions(2)[80..],
        (80..120).collect::<Vec<_>>()[..]
    );
    // Blocks beyond the anchor see all 80 anchor tokens: not what an a = b anchor gives.
    let short = Phase1::new(&model, &context, StarConfig::new(40)).unwrap();
    let short_anchor = short.encode_anchor().unwrap();
    let with_short = short.encode_block(3, &short_anchor).unwrap();
    assert!(max_diff(&blocks[3].layers[1].0, &with_short.layers[1].0) > 1e-3);
    // Encoded one at a time (any order) they equal the whole run.
    let anchor = phase1.encode_anchor().unwrap();
    for i in [4, 1, 3, 0, 2] {
        let alone = phase1.encode_block(i, &anchor).unwrap();
        assert!(
            max_diff(&alone.layers[2].1, &blocks[i].layers[2].1) < 1e-5,
            "block {i}"
        );
    }
    // An anchor as long as the context: phase 2 over the blocks is full attention.
    let query = tokens(7, 5);
    let whole = StarConfig::with_anchor(40, 200);
    let blocks = encoded_blocks(&model, &context, whole);
    let got = one_shard_logits(&model, blocks, context.len(), &query);
    let diff = max_diff(&got, &full_attention_logits(&model, &context, &query));
    assert!(diff < 1e-4, "max |logit diff| {diff}");
}

/// A shard that records when it is started and waited on, and fails on request: what a
/// remote worker looks like to the query host.
struct Recording<'r> {
    inner: CpuShard,
    name: &'static str,
    log: &'r std::sync::Mutex<Vec<String>>,
    fail_at_layer: Option<usize>,
}

impl AttentionShard for Recording<'_> {
    fn start<'a>(
        &'a self,
        layer: usize,
        q: &'a [f32],
        m: usize,
    ) -> crate::error::Result<PendingPartial<'a>> {
        self.log
            .lock()
            .unwrap()
            .push(format!("start {}", self.name));
        Ok(PendingPartial::new(move || {
            self.log.lock().unwrap().push(format!("wait {}", self.name));
            if self.fail_at_layer == Some(layer) {
                return Err(crate::Error::Shard {
                    shard: self.name.into(),
                    reason: "connection reset".into(),
                });
            }
            self.inner.attend(layer, q, m)
        }))
    }

    fn n_tokens(&self) -> usize {
        self.inner.n_tokens()
    }
}

/// The query host sends a layer's Q to every shard before it waits for any (so remote
/// shards work at the same time), and a shard that fails fails the forward pass instead
/// of being merged away.
#[test]
fn every_shard_starts_before_any_is_awaited_and_a_failure_is_an_error() {
    let model = tiny_model();
    let (context, query) = (tokens(120, 9), tokens(6, 10));
    let want = full_attention_logits(&model, &context, &query);
    let blocks = full_attention_blocks(&model, &context, &[40, 80]);
    let shape = model.head_shape();
    let log = std::sync::Mutex::new(Vec::new());
    let shards: Vec<Recording> = ["a", "b", "c"]
        .iter()
        .zip(&blocks)
        .map(|(&name, b)| Recording {
            inner: CpuShard::new(vec![b.clone()], shape),
            name,
            log: &log,
            fail_at_layer: None,
        })
        .collect();
    let refs: Vec<&dyn AttentionShard> = shards.iter().map(|s| s as &dyn AttentionShard).collect();
    let mut attn = QueryAttention::new(refs, 3, shape, 8).with_precision(KvPrecision::F32);
    let got = query_logits(&model, context.len(), &query, &mut attn);
    assert!(max_diff(&got, &want) < 1e-4);
    let log = log.into_inner().unwrap();
    assert_eq!(
        log.len(),
        3 * 2 * 3,
        "3 layers, 3 shards, start + wait: {log:?}"
    );
    for layer in log.chunks(6) {
        assert!(
            layer[..3].iter().all(|e| e.starts_with("start")),
            "all started before any wait: {layer:?}"
        );
    }

    let log = std::sync::Mutex::new(Vec::new());
    let failing = Recording {
        inner: CpuShard::new(vec![blocks[1].clone()], shape),
        name: "b",
        log: &log,
        fail_at_layer: Some(2),
    };
    let healthy = CpuShard::new(vec![blocks[0].clone(), blocks[2].clone()], shape);
    let mut attn =
        QueryAttention::new(vec![&healthy, &failing], 3, shape, 8).with_precision(KvPrecision::F32);
    let positions: Vec<usize> = (context.len()..context.len() + query.len()).collect();
    let err = model.forward(&query, &positions, &mut attn).unwrap_err();
    assert!(
        matches!(&err, crate::Error::Shard { shard, .. } if shard == "b"),
        "{err}"
    );
}

/// The lead: up to `overlap` tokens before a block, never inside the anchor, none for
/// block 0 or the blocks the anchor holds.
#[test]
fn the_lead_is_the_overlap_before_a_block_after_the_anchor() {
    let c = StarConfig::with_anchor(12, 5).with_overlap(4);
    assert_eq!(c.lead(0..12, 5), 0..0, "block 0 has no lead");
    assert_eq!(c.lead(12..24, 5), 8..12);
    assert_eq!(c.lead(36..40, 5), 32..36);
    // Clamped at the anchor's end: those tokens are the anchor's, seen anyway.
    assert_eq!(
        StarConfig::with_anchor(12, 10)
            .with_overlap(4)
            .lead(12..24, 10),
        10..12
    );
    // The first block after an anchor of whole blocks, and the blocks inside it.
    let long = StarConfig::with_anchor(10, 30).with_overlap(8);
    assert_eq!(long.lead(10..20, 30), 10..10);
    assert_eq!(long.lead(30..40, 30), 30..30);
    assert_eq!(long.lead(40..50, 30), 32..40);
    assert_eq!(
        StarConfig::new(12).lead(24..36, 12),
        24..24,
        "no overlap, no lead"
    );
}

/// A block with a lead is the tail of one causal pass over `[anchor | lead | block]` at
/// the tokens' global positions.
#[test]
fn a_block_with_a_lead_is_the_tail_of_anchor_lead_and_block() {
    let model = tiny_model();
    let context = tokens(40, 11);
    let (b, a, o) = (12, 5, 4);
    let phase1 = Phase1::new(
        &model,
        &context,
        StarConfig::with_anchor(b, a).with_overlap(o),
    )
    .unwrap();
    assert_eq!(
        phase1.sequence_positions(1),
        [
            0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23
        ]
    );
    let plain = Phase1::new(&model, &context, StarConfig::with_anchor(b, a))
        .unwrap()
        .encode_all()
        .unwrap();
    let blocks = phase1.encode_all().unwrap();
    assert_eq!(blocks[0], plain[0], "block 0 has no lead");
    let (shape, d) = (model.head_shape(), model.head_shape().head_dim);
    for (i, block) in blocks.iter().enumerate().skip(1) {
        let (range, lead) = (phase1.block_range(i), phase1.lead_range(i));
        assert_eq!((block.start, block.len), (range.start, range.len()));
        let seq: Vec<u32> = context[..a]
            .iter()
            .chain(&context[lead.start..range.end])
            .copied()
            .collect();
        let mut cache = KvCache::with_precision(3, shape, seq.len(), KvPrecision::F32);
        model
            .forward(&seq, &phase1.sequence_positions(i), &mut cache)
            .unwrap();
        let skip = a + lead.len();
        for l in 0..3 {
            for h in 0..shape.n_kv_heads {
                let want_k = &cache.layer(l).head_k(h)[skip * d..];
                let want_v = &cache.layer(l).head_v(h)[skip * d..];
                let span = h * block.len * d..(h + 1) * block.len * d;
                let (got_k, got_v) = (&block.layers[l].0[span.clone()], &block.layers[l].1[span]);
                assert!(
                    max_diff(got_k, want_k) < 1e-5,
                    "block {i} layer {l} head {h} K"
                );
                assert!(
                    max_diff(got_v, want_v) < 1e-5,
                    "block {i} layer {l} head {h} V"
                );
            }
        }
        let moved = max_diff(&block.layers[1].0, &plain[i].layers[1].0);
        assert!(
            moved > 1e-3,
            "block {i}: the lead changed nothing ({moved})"
        );
    }
}

/// An overlap that reaches back to the anchor gives every block all the tokens before
/// it: phase 1 is then full attention, block by block, and so are the answers.
#[test]
fn an_overlap_reaching_the_anchor_is_full_attention() {
    let model = tiny_model();
    let (context, query) = (tokens(90, 12), tokens(7, 13));
    let want_blocks = full_attention_blocks(&model, &context, &[20, 40, 60, 80]);
    let config = StarConfig::with_anchor(20, 20).with_overlap(1000);
    let blocks = encoded_blocks(&model, &context, config);
    for (got, want) in blocks.iter().zip(&want_blocks) {
        assert_eq!((got.start, got.len), (want.start, want.len));
        for l in 0..3 {
            let diff = max_diff(&got.layers[l].0, &want.layers[l].0)
                .max(max_diff(&got.layers[l].1, &want.layers[l].1));
            assert!(diff < 1e-4, "block at {} layer {l}: {diff}", got.start);
        }
    }
    let got = one_shard_logits(&model, blocks, context.len(), &query);
    let diff = max_diff(&got, &full_attention_logits(&model, &context, &query));
    assert!(diff < 1e-4, "max |logit diff| {diff}");
}
