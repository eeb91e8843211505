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
}
