//! Selective global re-encoding after phase 1 (issue 14; the CacheBlend idea, applied
//! once per document at ingest).
//!
//! Phase 1 encodes every block against the anchor only, so a block's KV misses what the
//! blocks between the anchor and itself would have contributed. Recomputing the KV of
//! every token with attention over everything before it is a full prefill; CacheBlend
//! (Yao et al., 2024) observes that a few tokens carry most of the deviation and that
//! the tokens whose KV deviates most at an early layer are the ones to fix. Here:
//!
//! 1. Selection: one layer of global (causal) attention over all tokens gives every
//!    token's layer-1 KV as full attention computes it; the `ratio` of the tokens after
//!    the anchor whose layer-1 KV differs most from phase 1's are selected.
//! 2. Re-encoding: the selected tokens go through the whole model, layer by layer, with
//!    attention over all preceding tokens (phase 1's KV for the others, the recomputed
//!    KV for the selected ones); their KV replaces phase 1's in every layer.
//!
//! Cost: one layer of a full prefill plus `ratio` of a full prefill's work (the selected
//! rows' projections and MLP, and their attention over the whole document). `ratio = 1`
//! is exactly full attention's KV; the anchor's tokens are exact already (they only
//! ever see the anchor).

use rayon::prelude::*;

use super::block::BlockKv;
use crate::cpu::attention::{HeadShape, KvView, Mask, attention, attention_into};
use crate::error::{Error, Result};
use crate::model::{LayerAttention, Llama};

/// What a re-encoding did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reencoded {
    /// Tokens whose KV was recomputed with global attention.
    pub tokens: usize,
    /// Tokens it could choose from (every token after the anchor's blocks).
    pub candidates: usize,
}

/// Re-encodes the `ratio` (in `0..=1`) of the tokens at positions `exact_until..` whose KV
/// phase 1 got most wrong, in place in `blocks` (all of a document's blocks, in order,
/// covering `tokens`). Positions before `exact_until` (the anchor's blocks) are left as
/// they are.
pub fn reencode(
    model: &Llama,
    tokens: &[u32],
    blocks: &mut [BlockKv],
    exact_until: usize,
    ratio: f32,
) -> Result<Reencoded> {
    let (candidates, want) = plan(tokens, blocks, exact_until, ratio)?;
    let n_layers = model.config().n_layers;
    if want == 0 || n_layers < 2 {
        return Ok(Reencoded {
            tokens: 0,
            candidates,
        });
    }
    let selected = select(model, tokens, blocks, exact_until, want)?;
    reencode_positions(model, tokens, blocks, &selected)?;
    Ok(Reencoded {
        tokens: selected.len(),
        candidates,
    })
}

/// Checks a re-encoding request (the ratio, and `blocks` covering `tokens` in order) and
/// returns `(candidates, tokens to re-encode)`; every device's re-encoding starts here.
pub fn plan(
    tokens: &[u32],
    blocks: &[BlockKv],
    exact_until: usize,
    ratio: f32,
) -> Result<(usize, usize)> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(Error::InvalidInput(format!(
            "re-encode ratio {ratio} is outside 0..=1"
        )));
    }
    let covered: usize = blocks.iter().map(|b| b.len).sum();
    let contiguous = blocks
        .iter()
        .scan(0, |next, b| {
            let ok = b.start == *next;
            *next += b.len;
            Some(ok)
        })
        .all(|ok| ok);
    if covered != tokens.len() || !contiguous {
        return Err(Error::InvalidInput(format!(
            "re-encoding needs every block of the document in order ({covered} of {} tokens)",
            tokens.len()
        )));
    }
    let candidates = tokens.len().saturating_sub(exact_until);
    let want = ((candidates as f64) * ratio as f64).ceil() as usize;
    Ok((candidates, want))
}

/// Re-encodes the tokens at `positions` (increasing, each after the anchor) with global
/// attention through every layer, in place in `blocks` (as [`reencode`] does after its
/// selection).
pub fn reencode_positions(
    model: &Llama,
    tokens: &[u32],
    blocks: &mut [BlockKv],
    positions: &[usize],
) -> Result<()> {
    plan(tokens, blocks, 0, 0.0)?;
    check_positions(positions, tokens.len())?;
    if positions.is_empty() {
        return Ok(());
    }
    let shape = model.head_shape();
    let mut pass = Reencode {
        kv: DocumentKv::from_blocks(blocks, shape, model.config().n_layers),
        positions,
        shape,
    };
    let ids: Vec<u32> = positions.iter().map(|&p| tokens[p]).collect();
    model.forward(&ids, positions, &mut pass)?;
    pass.kv.write_rows(blocks, positions);
    Ok(())
}

/// Positions must increase strictly and lie in the document.
pub fn check_positions(positions: &[usize], len: usize) -> Result<()> {
    let increasing = positions.windows(2).all(|w| w[0] < w[1]);
    if !increasing || positions.last().is_some_and(|&p| p >= len) {
        return Err(Error::InvalidInput(format!(
            "re-encoded positions must increase and lie below {len}"
        )));
    }
    Ok(())
}

/// Layer `layer`'s K and V of the whole document, token-major `[L][kv_width]`.
pub fn layer_token_major(
    blocks: &[BlockKv],
    layer: usize,
    shape: HeadShape,
) -> (Vec<f32>, Vec<f32>) {
    let (kvw, d) = (shape.kv_width(), shape.head_dim);
    let len: usize = blocks.iter().map(|b| b.len).sum();
    let (mut k, mut v) = (vec![0f32; len * kvw], vec![0f32; len * kvw]);
    for b in blocks {
        let (bk, bv) = &b.layers[layer];
        for h in 0..shape.n_kv_heads {
            for r in 0..b.len {
                let (src, dst) = ((h * b.len + r) * d, (b.start + r) * kvw + h * d);
                k[dst..dst + d].copy_from_slice(&bk[src..src + d]);
                v[dst..dst + d].copy_from_slice(&bv[src..src + d]);
            }
        }
    }
    (k, v)
}

/// The `want` positions at `exact_until..` whose layer-1 KV under global attention
/// (`global`, token-major) differs most from phase 1's (`phase1`, token-major), in
/// increasing order (ties to the earlier position).
pub fn most_deviating(
    global: (&[f32], &[f32]),
    phase1: (&[f32], &[f32]),
    kv_width: usize,
    exact_until: usize,
    want: usize,
) -> Vec<usize> {
    let len = phase1.0.len() / kv_width.max(1);
    let deviation = |p: usize| -> f64 {
        let row = p * kv_width..(p + 1) * kv_width;
        let sq = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum()
        };
        sq(&global.0[row.clone()], &phase1.0[row.clone()])
            + sq(&global.1[row.clone()], &phase1.1[row])
    };
    let mut ranked: Vec<(f64, usize)> = (exact_until..len).map(|p| (deviation(p), p)).collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut chosen: Vec<usize> = ranked.into_iter().take(want).map(|(_, p)| p).collect();
    chosen.sort_unstable();
    chosen
}

/// Every layer's KV of the whole document, token-major `[L][kv_width]`.
struct DocumentKv {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    shape: HeadShape,
}

impl DocumentKv {
    fn from_blocks(blocks: &[BlockKv], shape: HeadShape, n_layers: usize) -> Self {
        let layers = (0..n_layers)
            .map(|l| layer_token_major(blocks, l, shape))
            .collect();
        Self { layers, shape }
    }

    /// Layer `layer`'s keys `0..len` (token-major).
    fn view(&self, layer: usize, len: usize) -> KvView<'_> {
        let (k, v) = &self.layers[layer];
        KvView {
            k,
            v,
            len,
            row_stride: self.shape.kv_width(),
            head_stride: self.shape.head_dim,
        }
    }

    /// Copies the rows at `positions` of every layer back into `blocks` (head-major).
    fn write_rows(&self, blocks: &mut [BlockKv], positions: &[usize]) {
        let (kvw, d) = (self.shape.kv_width(), self.shape.head_dim);
        for (l, (k, v)) in self.layers.iter().enumerate() {
            for &p in positions {
                let b = blocks
                    .iter_mut()
                    .find(|b| (b.start..b.start + b.len).contains(&p))
                    .expect("positions lie in the blocks");
                let (r, len) = (p - b.start, b.len);
                let (bk, bv) = &mut b.layers[l];
                for h in 0..self.shape.n_kv_heads {
                    let (dst, src) = ((h * len + r) * d, p * kvw + h * d);
                    bk[dst..dst + d].copy_from_slice(&k[src..src + d]);
                    bv[dst..dst + d].copy_from_slice(&v[src..src + d]);
                }
            }
        }
    }
}

/// The `want` positions at `exact_until..` whose layer-1 KV under global attention (one
/// layer of causal attention over the whole document) differs most from phase 1's
/// (`blocks`), in increasing order.
pub fn select(
    model: &Llama,
    tokens: &[u32],
    blocks: &[BlockKv],
    exact_until: usize,
    want: usize,
) -> Result<Vec<usize>> {
    let shape = model.head_shape();
    let (k1, v1) = layer_one(model, tokens)?;
    let (pk, pv) = layer_token_major(blocks, 1, shape);
    Ok(most_deviating(
        (&k1, &v1),
        (&pk, &pv),
        shape.kv_width(),
        exact_until,
        want,
    ))
}

/// Layer 1's K and V of every token (token-major) when layer 0 attends causally over the
/// whole document: full attention's layer-1 KV.
pub fn layer_one(model: &Llama, tokens: &[u32]) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut probe = LayerOneProbe {
        shape: model.head_shape(),
        layer_one: None,
    };
    let positions: Vec<usize> = (0..tokens.len()).collect();
    match model.forward(tokens, &positions, &mut probe) {
        Err(Error::Cancelled) if probe.layer_one.is_some() => {}
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    probe
        .layer_one
        .ok_or_else(|| Error::InvalidInput("the model has no layer 1".into()))
}

/// Layer 0 with causal attention over the whole document; keeps layer 1's K and V and
/// stops the forward pass there.
struct LayerOneProbe {
    shape: HeadShape,
    layer_one: Option<(Vec<f32>, Vec<f32>)>,
}

impl LayerAttention for LayerOneProbe {
    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<()> {
        if layer >= 1 {
            self.layer_one = Some((k.to_vec(), v.to_vec()));
            return Err(Error::Cancelled);
        }
        let own = KvView {
            k,
            v,
            len: m,
            row_stride: self.shape.kv_width(),
            head_stride: self.shape.head_dim,
        };
        let (mut o, mut lse) = (vec![0f32; out.len()], vec![0f32; self.shape.n_heads * m]);
        let scale = self.shape.scale();
        attention_into(
            q,
            m,
            own,
            self.shape,
            Mask::Causal { offset: 0 },
            scale,
            &mut o,
            &mut lse,
        );
        out.copy_from_slice(&o);
        Ok(())
    }
}

/// The selected tokens' layers: their new K and V replace phase 1's at their positions,
/// then each attends to every key at or before its position.
struct Reencode<'a> {
    kv: DocumentKv,
    positions: &'a [usize],
    shape: HeadShape,
}

impl LayerAttention for Reencode<'_> {
    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let kvw = self.shape.kv_width();
        {
            let (lk, lv) = &mut self.kv.layers[layer];
            for (i, &p) in self.positions.iter().enumerate() {
                lk[p * kvw..(p + 1) * kvw].copy_from_slice(&k[i * kvw..(i + 1) * kvw]);
                lv[p * kvw..(p + 1) * kvw].copy_from_slice(&v[i * kvw..(i + 1) * kvw]);
            }
        }
        let (qw, shape, kv) = (self.shape.q_width(), self.shape, &self.kv);
        out.par_chunks_exact_mut(qw)
            .zip(q.par_chunks_exact(qw))
            .zip(self.positions.par_iter())
            .take(m)
            .for_each(|((row_out, row_q), &p)| {
                let res = attention(
                    row_q,
                    1,
                    kv.view(layer, p + 1),
                    shape,
                    Mask::None,
                    shape.scale(),
                );
                row_out.copy_from_slice(&res.out);
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LlamaConfig;
    use crate::quant::GgmlType;
    use crate::star::{Phase1, StarConfig};

    fn worst(a: &[BlockKv], b: &[BlockKv]) -> f32 {
        let mut err = 0f32;
        for (x, y) in a.iter().zip(b) {
            for ((xk, xv), (yk, yv)) in x.layers.iter().zip(&y.layers) {
                for (p, q) in xk.iter().chain(xv).zip(yk.iter().chain(yv)) {
                    err = err.max((p - q).abs());
                }
            }
        }
        err
    }

    /// Full attention's KV (one block), cut into the blocks of `config`.
    fn full_kv(model: &Llama, tokens: &[u32], blocks: &[BlockKv]) -> Vec<BlockKv> {
        let whole = Phase1::new(model, tokens, StarConfig::new(tokens.len()))
            .unwrap()
            .encode_all()
            .unwrap()
            .remove(0);
        blocks
            .iter()
            .map(|b| whole.rows(b.start..b.start + b.len))
            .collect()
    }

    #[test]
    fn ratio_one_is_full_attention_and_zero_changes_nothing() {
        let model = Llama::random(LlamaConfig::tiny_for_tests(), GgmlType::F32, 11);
        let tokens: Vec<u32> = (0..90).map(|i| ((i * 37 + 11) % 300) as u32).collect();
        let config = StarConfig::new(16);
        let phase1 = Phase1::new(&model, &tokens, config)
            .unwrap()
            .encode_all()
            .unwrap();
        let full = full_kv(&model, &tokens, &phase1);
        let before = worst(&phase1, &full);
        assert!(
            before > 1e-3,
            "phase 1 already equals full attention ({before})"
        );

        let mut unchanged = phase1.clone();
        let r = reencode(&model, &tokens, &mut unchanged, 16, 0.0).unwrap();
        assert_eq!((r.tokens, r.candidates), (0, 74));
        assert_eq!(unchanged, phase1);

        let mut all = phase1.clone();
        let r = reencode(&model, &tokens, &mut all, 16, 1.0).unwrap();
        assert_eq!(r.tokens, 74);
        let after = worst(&all, &full);
        assert!(
            after < 1e-4,
            "ratio 1 differs from full attention by {after}"
        );

        // A part: exactly that many tokens change, the others keep phase 1's KV.
        let mut some = phase1.clone();
        let r = reencode(&model, &tokens, &mut some, 16, 0.25).unwrap();
        assert_eq!(r.tokens, 19);
        let changed = (0..tokens.len())
            .filter(|&p| {
                let b = p / 16;
                let row = |x: &BlockKv| x.rows(p - x.start..p - x.start + 1);
                row(&some[b]) != row(&phase1[b])
            })
            .count();
        assert_eq!(changed, 19);
        assert!(worst(&some, &full) <= before);
    }

    #[test]
    fn bad_ratios_and_partial_documents_are_refused() {
        let model = Llama::random(LlamaConfig::tiny_for_tests(), GgmlType::F32, 12);
        let tokens: Vec<u32> = (0..40).map(|i| (i * 7 % 300) as u32).collect();
        let mut blocks = Phase1::new(&model, &tokens, StarConfig::new(16))
            .unwrap()
            .encode_all()
            .unwrap();
        assert!(reencode(&model, &tokens, &mut blocks, 16, 1.5).is_err());
        assert!(reencode(&model, &tokens, &mut blocks[1..], 16, 0.5).is_err());
        // Positions out of order, repeated or past the end.
        for bad in [&[20, 18][..], &[20, 20], &[39, 40]] {
            assert!(reencode_positions(&model, &tokens, &mut blocks, bad).is_err());
        }
    }

    #[test]
    fn the_selection_is_the_most_deviating_tokens_after_the_anchor() {
        // Two tokens of width 2 after an anchor of one: token 2 deviates most.
        let phase1 = vec![0f32; 8];
        let global_k = vec![9.0, 9.0, 0.0, 1.0, 0.0, 3.0, 0.0, 0.0];
        let global_v = vec![0f32; 8];
        let picked = most_deviating((&global_k, &global_v), (&phase1, &phase1), 2, 1, 1);
        assert_eq!(picked, vec![2]);
        let both = most_deviating((&global_k, &global_v), (&phase1, &phase1), 2, 1, 2);
        assert_eq!(both, vec![1, 2]);
    }
}
