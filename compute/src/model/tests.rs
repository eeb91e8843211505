//! The whole forward pass against a straightforward float64 implementation on a small
//! random-weight model.

use super::*;
use crate::quant::GgmlType;

fn tiny_config() -> LlamaConfig {
    LlamaConfig::tiny_for_tests()
}

/// Float64 Llama forward over all `tokens` (positions 0..n), full causal attention,
/// written independently of the optimised path: logits `[n][vocab]`.
fn reference_logits(model: &Llama, tokens: &[u32]) -> Vec<f64> {
    let c = model.config().clone();
    let w = model.dense_weights();
    let (n, h, d) = (tokens.len(), c.hidden, c.head_dim);
    let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let matvec = |wt: &[f32], rows: usize, cols: usize, x: &[f64]| -> Vec<f64> {
        (0..rows)
            .map(|r| (0..cols).map(|i| wt[r * cols + i] as f64 * x[i]).sum())
            .collect()
    };
    let norm = |x: &[f64], wt: &[f32]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let s = 1.0 / (ms + c.rms_eps as f64).sqrt();
        x.iter().zip(wt).map(|(v, &g)| v * s * g as f64).collect()
    };
    let rope = |x: &mut [f64], pos: usize| {
        for head in x.chunks_exact_mut(d) {
            for i in 0..c.rope_dim / 2 {
                let angle =
                    pos as f64 / (c.rope_theta as f64).powf(2.0 * i as f64 / c.rope_dim as f64);
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * angle.cos() - b * angle.sin();
                head[2 * i + 1] = a * angle.sin() + b * angle.cos();
            }
        }
    };
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| f(&w.embed[t as usize * h..(t as usize + 1) * h]))
        .collect();
    let (qw, kvw) = (c.n_heads * d, c.n_kv_heads * d);
    let shape = crate::cpu::attention::HeadShape {
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: d,
    };
    for l in &w.layers {
        let normed: Vec<Vec<f64>> = xs.iter().map(|x| norm(x, &l[0])).collect();
        let mut qs: Vec<Vec<f64>> = normed.iter().map(|x| matvec(&l[1], qw, h, x)).collect();
        let mut ks: Vec<Vec<f64>> = normed.iter().map(|x| matvec(&l[2], kvw, h, x)).collect();
        let vs: Vec<Vec<f64>> = normed.iter().map(|x| matvec(&l[3], kvw, h, x)).collect();
        for t in 0..n {
            rope(&mut qs[t], t);
            rope(&mut ks[t], t);
        }
        for t in 0..n {
            let attn = causal_reference(&qs[t], 1, &ks[..=t], &vs[..=t], shape);
            let o = matvec(&l[4], h, qw, &attn);
            xs[t].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let x2 = norm(&xs[t], &l[5]);
            let g = matvec(&l[6], c.ffn, h, &x2);
            let u = matvec(&l[7], c.ffn, h, &x2);
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = matvec(&l[8], h, c.ffn, &act);
            xs[t].iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
    }
    xs.iter()
        .flat_map(|x| matvec(&w.output, c.vocab, h, &norm(x, &w.output_norm)))
        .collect()
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % 300) as u32).collect()
}

#[test]
fn forward_matches_float64_reference() {
    let model = Llama::random(tiny_config(), GgmlType::F32, 42);
    let toks = tokens(40);
    let positions: Vec<usize> = (0..toks.len()).collect();
    // The f32 cache: the projections exactly, so only f32 arithmetic separates the two.
    let mut cache = KvCache::with_precision(3, model.head_shape(), 8, KvPrecision::F32);
    let hidden = model.forward(&toks, &positions, &mut cache).unwrap();
    let got = model.logits(&hidden);
    let want = reference_logits(&model, &toks);
    let max_abs = want.iter().fold(0f64, |a, b| a.max(b.abs()));
    assert!(max_abs > 0.1, "degenerate logits");
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (*a as f64 - b).abs() < 1e-4 * (1.0 + max_abs),
            "logit {i}: {a} vs {b}"
        );
    }
}

/// The default f16 cache through a whole forward pass: within 1e-2 of the largest logit
/// of the float64 model (its one rounding of each K and V row to f16 moves this model's
/// logits by about 3e-3; rounding boundaries make a tighter bound against a float64
/// reference fragile: one key element within 4e-8 of a midpoint rounds the other way in
/// f32 and moves a logit by 3.5e-4), and it does round (it differs from the f32 cache).
/// The f16 attention itself is checked exactly in `f16_cache_attention_matches_the_f64_reference`.
#[test]
fn f16_cache_forward_stays_within_the_rounding_budget() {
    let model = Llama::random(tiny_config(), GgmlType::F32, 42);
    let toks = tokens(40);
    let positions: Vec<usize> = (0..toks.len()).collect();
    let logits = |precision| {
        let mut cache = KvCache::with_precision(3, model.head_shape(), 8, precision);
        model.logits(&model.forward(&toks, &positions, &mut cache).unwrap())
    };
    let want = reference_logits(&model, &toks);
    let max_abs = want.iter().fold(0f64, |a, b| a.max(b.abs()));
    let worst = |got: &[f32]| {
        got.iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0f64, f64::max)
    };
    let (f16_err, f32_err) = (
        worst(&logits(KvPrecision::F16)),
        worst(&logits(KvPrecision::F32)),
    );
    assert!(f16_err < 1e-2 * (1.0 + max_abs), "f16 cache: {f16_err}");
    assert!(
        f16_err > 10.0 * f32_err,
        "the f16 cache did not round: {f16_err} vs {f32_err}"
    );
}

/// f64 causal attention of the rows `q` (`[m][n_heads * d]`, at positions `offset..`)
/// over every key and value so far (token-major f64 rows).
fn causal_reference(
    q: &[f64],
    m: usize,
    k: &[Vec<f64>],
    v: &[Vec<f64>],
    shape: crate::cpu::attention::HeadShape,
) -> Vec<f64> {
    let (d, qw) = (shape.head_dim, shape.q_width());
    let offset = k.len() - m;
    let mut out = vec![0f64; m * qw];
    for i in 0..m {
        for h in 0..shape.n_heads {
            let kh = h / shape.group();
            let scores: Vec<f64> = (0..=offset + i)
                .map(|j| {
                    (0..d)
                        .map(|c| q[i * qw + h * d + c] * k[j][kh * d + c])
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - mx).exp()).sum();
            for (j, s) in scores.iter().enumerate() {
                for c in 0..d {
                    out[i * qw + h * d + c] += (s - mx).exp() / z * v[j][kh * d + c];
                }
            }
        }
    }
    out
}

/// The f16 cache holds each appended row as exactly `f16::from_f32` of it, and attending
/// through it (a prefill, decode steps of one row, a few rows at once; the cache growing
/// from a small capacity) matches the f64 reference over those rounded rows within 1e-4,
/// on random inputs in [-2, 2], with head sizes that take the direct f16 decode path and
/// one that does not.
#[test]
fn f16_cache_attention_matches_the_f64_reference() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for (n_heads, n_kv_heads, head_dim) in [(9, 3, 64), (4, 2, 16), (2, 1, 12)] {
        let shape = crate::cpu::attention::HeadShape {
            n_heads,
            n_kv_heads,
            head_dim,
        };
        let mut cache = KvCache::new(2, shape, 3);
        let (mut ks, mut vs): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (Vec::new(), Vec::new());
        for m in [37usize, 1, 1, 5, 1, 600, 1] {
            let mut random =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect() };
            let (q, k, v) = (
                random(m * shape.q_width()),
                random(m * shape.kv_width()),
                random(m * shape.kv_width()),
            );
            let round = |x: &[f32]| -> Vec<Vec<f64>> {
                x.chunks(shape.kv_width())
                    .map(|row| {
                        row.iter()
                            .map(|&y| half::f16::from_f32(y).to_f64())
                            .collect()
                    })
                    .collect()
            };
            ks.extend(round(&k));
            vs.extend(round(&v));
            let mut out = vec![0f32; m * shape.q_width()];
            cache.attend(1, &q, &k, &v, m, &mut out).unwrap();
            let q64: Vec<f64> = q.iter().map(|&x| f64::from(x)).collect();
            let want = causal_reference(&q64, m, &ks, &vs, shape);
            for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 1e-4,
                    "{shape:?} m={m} out[{i}]: {a} vs {b}"
                );
            }
            let layer = cache.layer(1);
            for h in 0..n_kv_heads {
                let held = layer.head_k(h);
                for (t, row) in ks.iter().enumerate() {
                    for c in 0..head_dim {
                        assert_eq!(held[t * head_dim + c] as f64, row[h * head_dim + c]);
                    }
                }
            }
        }
        assert_eq!(cache.layer(1).precision(), KvPrecision::F16);
    }
}

/// Prefill in pieces, then one token at a time: the same logits as one full pass.
#[test]
fn incremental_decoding_equals_one_pass() {
    let model = Llama::random(tiny_config(), GgmlType::F16, 9);
    let toks = tokens(37);
    let positions: Vec<usize> = (0..toks.len()).collect();
    let mut full_cache = KvCache::new(3, model.head_shape(), 64);
    let full = model.logits(&model.forward(&toks, &positions, &mut full_cache).unwrap());
    let mut cache = KvCache::new(3, model.head_shape(), 4);
    let mut pieces = Vec::new();
    for (a, b) in [(0, 20), (20, 33), (33, 34), (34, 35), (35, 37)] {
        let hidden = model
            .forward(&toks[a..b], &positions[a..b], &mut cache)
            .unwrap();
        pieces.extend(model.logits(&hidden));
    }
    assert_eq!(cache.len(), 37);
    for (i, (a, b)) in pieces.iter().zip(&full).enumerate() {
        assert!((a - b).abs() < 1e-4, "logit {i}: {a} vs {b}");
    }
}

#[test]
fn out_of_vocabulary_tokens_are_an_error() {
    let model = Llama::random(tiny_config(), GgmlType::F32, 1);
    let mut cache = KvCache::new(3, model.head_shape(), 4);
    let err = model.forward(&[5, 300], &[0, 1], &mut cache).unwrap_err();
    assert!(err.to_string().contains("300"), "{err}");
}
