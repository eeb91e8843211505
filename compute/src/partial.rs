//! Partial attention: what a group of context blocks (a shard) and the query host
//! exchange, whatever device or host computed it.
//!
//! Star Attention's phase 2 splits one layer's attention over disjoint key sets: every
//! shard of cached blocks answers the query's Q with its partial output `O` and the
//! natural-log log-sum-exp `lse` of its scaled scores, and the query host merges the
//! parts exactly (DESIGN.md §1):
//!
//! ```text
//! M = max_h lse_h;  lse = M + ln(sum_h e^(lse_h - M));  O = sum_h e^(lse_h - lse) O_h
//! ```
//!
//! An empty shard contributes `lse = -inf` and weight 0. Raw exponentials are never
//! summed. The CPU kernel ([`crate::cpu::attention`]), the CUDA kernels and the remote
//! shards of a cluster all produce and consume exactly these types, so a partial result
//! can travel between them unchanged.

/// Head geometry shared by queries and keys (grouped-query attention when
/// `n_heads > n_kv_heads`; query head `h` reads key/value head `h / (n_heads / n_kv_heads)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl HeadShape {
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// The softmax scale of scaled dot-product attention, `1 / sqrt(head_dim)`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Attention output for `m` query rows: `out` is `[m][n_heads * head_dim]`, `lse` is
/// `[n_heads][m]` (natural log). A row that sees no key has `lse = -inf` and a zero
/// output.
#[derive(Debug, Clone, PartialEq)]
pub struct Attended {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
}

impl Attended {
    /// The identity of [`merge_into`]: the result over an empty key set.
    pub fn empty(m: usize, shape: HeadShape) -> Self {
        Self {
            out: vec![0.0; m * shape.q_width()],
            lse: vec![f32::NEG_INFINITY; shape.n_heads * m],
        }
    }

    /// Whether the buffers fit `m` rows of `shape` (checked on anything received from
    /// another process before it is merged).
    pub fn fits(&self, m: usize, shape: HeadShape) -> bool {
        self.out.len() == m * shape.q_width() && self.lse.len() == m * shape.n_heads
    }
}

/// Merges a partial result over one key set into `acc` (a partial result over a disjoint
/// key set), so that `acc` becomes the result over their union:
/// `lse = M + ln(e^(lse_a - M) + e^(lse_b - M))`, `O = e^(lse_a - lse) O_a + e^(lse_b - lse) O_b`
/// with `M = max(lse_a, lse_b)`. An empty part (`lse = -inf`) contributes nothing.
pub fn merge_into(acc: &mut Attended, part: &Attended, m: usize, shape: HeadShape) {
    let d = shape.head_dim;
    let qw = shape.q_width();
    for h in 0..shape.n_heads {
        for i in 0..m {
            let (la, lb) = (acc.lse[h * m + i], part.lse[h * m + i]);
            if lb == f32::NEG_INFINITY {
                continue;
            }
            let hi = la.max(lb);
            let (ea, eb) = ((la - hi).exp(), (lb - hi).exp());
            let total = ea + eb;
            let (wa, wb) = (ea / total, eb / total);
            acc.lse[h * m + i] = hi + total.ln();
            let a = &mut acc.out[i * qw + h * d..i * qw + (h + 1) * d];
            let b = &part.out[i * qw + h * d..i * qw + (h + 1) * d];
            for (x, y) in a.iter_mut().zip(b) {
                *x = wa * *x + wb * y;
            }
        }
    }
}

/// The result over the union of the parts' disjoint key sets (empty for no parts).
pub fn merge_all<'a>(
    parts: impl IntoIterator<Item = &'a Attended>,
    m: usize,
    shape: HeadShape,
) -> Attended {
    let mut acc = Attended::empty(m, shape);
    for part in parts {
        merge_into(&mut acc, part, m, shape);
    }
    acc
}

/// APE's scaling factor `S` for a document whose context blocks are approximate: what
/// an ingest that sets no merge options gets (`T` stays 1) unless the server configures
/// another (issue 14). Why: the blocks after the anchor were encoded without the blocks
/// before them, so the weight their attention logits claim in the merge is not
/// calibrated against the exact anchor and the query; `S < 1` lowers the group's share.
/// Measured on an H200 over 416 paired needle questions: multi-key retrieval at
/// b = L/16 rose from 0.917 to 0.959-0.983 of full attention and at b = L/8 from 0.901
/// to 0.983-0.992, single needles at 0.972-0.989; `S = 0.7` and `S = 0.35` were worse.
/// A document whose KV is exact (every token re-encoded with global attention) keeps the
/// exact merge: there any `S` is only a bias.
pub const DEFAULT_MERGE_SCALE: f32 = 0.5;

/// How the context blocks' partial results are merged at query time.
///
/// [`ContextMerge::EXACT`] is Star Attention's phase 2 (`temperature = scale = 1`);
/// otherwise APE's tempered merge (Yang et al., arXiv 2502.05431; the service's default
/// for approximate blocks is `S =` [`DEFAULT_MERGE_SCALE`]): the context blocks that
/// start at or after `tempered_from` (the approximate ones: not the anchor's, nor the
/// exact block after a whole-block anchor) are attended at softmax scale
/// `1 / (sqrt(d) T)` and merged among themselves into `(O_C, L)`; the group then enters
/// the final merge with `lse = T L + ln S`, while the blocks before `tempered_from` and
/// the query's own causal part stay untempered. Why: Star's context blocks were encoded
/// without seeing each other, so their attention logits are not calibrated against one
/// another; a temperature `T < 1` sharpens the distribution over them (the needle
/// stands out), and `S` rebalances the group against the anchor and the query. No extra
/// compute: the same keys are read once, only the softmax scale and the group's weight
/// change.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContextMerge {
    pub temperature: f32,
    pub scale: f32,
    /// First global position of the tempered group: blocks starting before it (the
    /// anchor's blocks and any other exact ones) are merged untempered.
    pub tempered_from: usize,
}

impl ContextMerge {
    /// The exact merge (Star Attention's phase 2).
    pub const EXACT: Self = Self {
        temperature: 1.0,
        scale: 1.0,
        tempered_from: 0,
    };

    /// Whether this is the exact merge (`T = S = 1`): every part merges untempered.
    pub fn is_exact(&self) -> bool {
        self.temperature == 1.0 && self.scale == 1.0
    }

    /// Whether a context block starting at `start` belongs to the tempered group.
    pub fn is_tempered(&self, start: usize) -> bool {
        !self.is_exact() && start >= self.tempered_from
    }

    /// The multiplier of the softmax scale for the tempered group, `1 / T`.
    pub fn score_scale(&self) -> f32 {
        1.0 / self.temperature
    }

    /// Turns the tempered group's merged result (its `lse` is `L`, computed at scale
    /// `1 / (sqrt(d) T)`) into a part that merges exactly with the untempered parts:
    /// `lse = T L + ln S` (an empty group stays empty).
    pub fn weigh_group(&self, group: &mut Attended) {
        let ln_s = self.scale.ln();
        for l in &mut group.lse {
            if *l != f32::NEG_INFINITY {
                *l = self.temperature * *l + ln_s;
            }
        }
    }
}

impl Default for ContextMerge {
    fn default() -> Self {
        Self::EXACT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: HeadShape = HeadShape {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 3,
    };

    /// Softmax attention of one row over explicit (score, value) pairs, in float64.
    fn reference(scores: &[f64], values: &[[f64; 3]]) -> ([f64; 3], f64) {
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        let mut out = [0.0; 3];
        for (s, v) in scores.iter().zip(values) {
            for c in 0..3 {
                out[c] += (s - max).exp() / sum * v[c];
            }
        }
        (out, max + sum.ln())
    }

    fn part(scores: &[f64], values: &[[f64; 3]]) -> Attended {
        // Both heads of the single row get the same keys (m = 1).
        let (o, l) = reference(scores, values);
        let row: Vec<f32> = o.iter().map(|&x| x as f32).collect();
        Attended {
            out: row.iter().chain(&row).copied().collect(),
            lse: vec![l as f32; 2],
        }
    }

    #[test]
    fn merging_disjoint_parts_equals_attention_over_the_union() {
        let scores = [0.3, -1.2, 2.5, 0.9, -0.4, 1.7];
        let values = [
            [0.1, -0.5, 0.7],
            [1.3, 0.2, -0.9],
            [-0.6, 0.8, 0.4],
            [0.5, 0.5, -0.2],
            [-1.1, 0.3, 0.9],
            [0.2, -0.7, 0.6],
        ];
        let whole = part(&scores, &values);
        let parts = [
            part(&scores[..2], &values[..2]),
            part(&scores[2..3], &values[2..3]),
            Attended::empty(1, SHAPE),
            part(&scores[3..], &values[3..]),
        ];
        let merged = merge_all(&parts, 1, SHAPE);
        for (a, b) in merged.out.iter().zip(&whole.out) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        for (a, b) in merged.lse.iter().zip(&whole.lse) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn empty_parts_are_the_identity_and_fits_checks_shapes() {
        let only = part(&[1.5, -2.0], &[[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]]);
        let merged = merge_all([&Attended::empty(1, SHAPE), &only], 1, SHAPE);
        assert_eq!(merged, only);
        assert!(
            merge_all([], 1, SHAPE)
                .lse
                .iter()
                .all(|l| *l == f32::NEG_INFINITY)
        );
        assert!(only.fits(1, SHAPE));
        assert!(!only.fits(2, SHAPE));
    }

    /// The tempered merge (anchor keys untempered, context keys at scale 1/(sqrt(d) T),
    /// the context group weighted `e^(T L) S`) against a float64 evaluation of its
    /// definition, on random inputs through the CPU attention kernel.
    #[test]
    fn tempered_merge_matches_a_float64_reference() {
        use crate::cpu::attention::{KvView, Mask, attention};
        let shape = HeadShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let (d, m) = (shape.head_dim, 3);
        let mut seed = 0x5EED_u64;
        let mut rand = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        };
        // Head-major K and V: [n_kv_heads][len][d].
        let mut keys = |len: usize| -> (Vec<f32>, Vec<f32>) {
            let n = shape.n_kv_heads * len * d;
            (
                (0..n).map(|_| rand()).collect(),
                (0..n).map(|_| rand()).collect(),
            )
        };
        let (anchor_len, context_len) = (5, 11);
        let (ka, va) = keys(anchor_len);
        let (kc, vc) = keys(context_len);
        let q: Vec<f32> = (0..m * shape.q_width()).map(|_| rand() * 0.7).collect();
        fn view<'a>(k: &'a [f32], v: &'a [f32], len: usize, d: usize) -> KvView<'a> {
            KvView {
                k,
                v,
                len,
                row_stride: d,
                head_stride: len * d,
            }
        }
        let (ka, va, kc, vc) = (&ka[..], &va[..], &kc[..], &vc[..]);
        for &(t, s) in &[
            (0.7f32, 0.9f32),
            (0.5, 1.0),
            (1.0, 0.6),
            (1.3, 2.0),
            (1.0, 1.0),
        ] {
            let merge = ContextMerge {
                temperature: t,
                scale: s,
                tempered_from: anchor_len,
            };
            let base = shape.scale();
            let mut acc = attention(&q, m, view(ka, va, anchor_len, d), shape, Mask::None, base);
            let mut group = attention(
                &q,
                m,
                view(kc, vc, context_len, d),
                shape,
                Mask::None,
                base * merge.score_scale(),
            );
            merge.weigh_group(&mut group);
            merge_into(&mut acc, &group, m, shape);
            for h in 0..shape.n_heads {
                let kv = h / shape.group();
                for i in 0..m {
                    let qrow = &q[i * shape.q_width() + h * d..][..d];
                    let score = |k: &[f32], len: usize, j: usize| -> f64 {
                        let krow = &k[kv * len * d + j * d..][..d];
                        qrow.iter()
                            .zip(krow)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    };
                    let (t, s) = (t as f64, s as f64);
                    // Anchor: e^s_j; context group: S (sum_j e^(s_j / T))^T, output O_C.
                    let mut num = vec![0.0f64; d];
                    let mut den = 0.0f64;
                    for j in 0..anchor_len {
                        let w = score(ka, anchor_len, j).exp();
                        den += w;
                        for (c, x) in num.iter_mut().enumerate() {
                            *x += w * va[kv * anchor_len * d + j * d + c] as f64;
                        }
                    }
                    let mut z = 0.0f64;
                    let mut oc = vec![0.0f64; d];
                    for j in 0..context_len {
                        let w = (score(kc, context_len, j) / t).exp();
                        z += w;
                        for (c, x) in oc.iter_mut().enumerate() {
                            *x += w * vc[kv * context_len * d + j * d + c] as f64;
                        }
                    }
                    let weight = s * z.powf(t);
                    den += weight;
                    for c in 0..d {
                        let want = (num[c] + weight * oc[c] / z) / den;
                        let got = acc.out[i * shape.q_width() + h * d + c] as f64;
                        assert!((got - want).abs() < 1e-5, "T={t} S={s}: O {got} vs {want}");
                    }
                    let got = acc.lse[h * m + i] as f64;
                    assert!(
                        (got - den.ln()).abs() < 1e-5,
                        "T={t} S={s}: lse {got} vs {}",
                        den.ln()
                    );
                }
            }
        }
    }

    #[test]
    fn the_exact_merge_tempers_nothing() {
        assert!(ContextMerge::default().is_exact());
        assert!(!ContextMerge::EXACT.is_tempered(0));
        let m = ContextMerge {
            temperature: 0.8,
            scale: 1.0,
            tempered_from: 16,
        };
        assert!(!m.is_tempered(0) && !m.is_tempered(15) && m.is_tempered(16));
        let mut empty = Attended::empty(1, SHAPE);
        m.weigh_group(&mut empty);
        assert!(empty.lse.iter().all(|l| *l == f32::NEG_INFINITY));
    }
}
