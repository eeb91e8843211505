//! Choosing the next token: greedy, or seeded temperature / top-k / top-p sampling.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// How to pick tokens. `temperature == 0` is greedy (argmax, ties to the lowest id).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 keeps all).
    pub top_p: f32,
    /// Seeds the generator: the same seed and inputs give the same tokens.
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidInput(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// A stateful sampler (its random stream advances with every draw).
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if self.params.top_k > 0 && self.params.top_k < candidates.len() {
            candidates.select_nth_unstable_by(self.params.top_k - 1, by_logit_desc);
            candidates.truncate(self.params.top_k);
        }
        candidates.sort_unstable_by(by_logit_desc);
        let max = candidates[0].1;
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|&(_, l)| (((l - max) / self.params.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= self.params.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut draw = self.rng.random::<f64>() * total;
        for (i, p) in probs.iter().enumerate() {
            draw -= p;
            if draw <= 0.0 {
                return candidates[i].0;
            }
        }
        candidates[probs.len() - 1].0
    }
}

/// Index of the largest logit (the lowest index among equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `log p(target)` under `softmax(logits)`, computed stably in f64.
pub fn log_prob(logits: &[f32], target: u32) -> f64 {
    logits[target as usize] as f64 - log_sum_exp(logits)
}

/// `ln sum(exp(logits))`, stably: each term in f32 (every one is at most 1, and f32's
/// `exp` is several times cheaper than f64's over a vocabulary of ~50K per generated
/// token when an answer reports logprobs), summed in f64.
fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    max as f64
        + logits
            .iter()
            .map(|&l| f64::from((l - max).exp()))
            .sum::<f64>()
            .ln()
}

/// The most alternatives [`token_logprob`] reports per step (OpenAI's `top_logprobs` cap).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A generated token's log-probability and the step's most likely tokens, all under the
/// model's own distribution `softmax(logits)` (before temperature, top-k and top-p, as
/// OpenAI's `logprobs` reports them): what a client needs to judge how sure an answer
/// is, and what tells a near-tie (two paths whose rounding differs may pick either
/// token) from a real disagreement.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// `(id, logprob)` of the most likely tokens, most likely first (lowest id first
    /// among equals, as [`argmax`] picks).
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `id` and of the `top` most likely tokens (at most
/// [`MAX_TOP_LOGPROBS`]) under `softmax(logits)`.
pub fn token_logprob(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let lse = log_sum_exp(logits);
    let logprob = |i: usize| (logits[i] as f64 - lse) as f32;
    let n = top.min(MAX_TOP_LOGPROBS).min(logits.len());
    // Keeps the best n in order (n <= 20: an insertion per logit that beats the last).
    let mut best: Vec<usize> = Vec::with_capacity(n + 1);
    if n > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() == n && l <= logits[best[n - 1]] {
                continue;
            }
            let at = best.partition_point(|&b| logits[b] >= l);
            best.insert(at, i);
            best.truncate(n);
        }
    }
    TokenLogprob {
        id,
        logprob: logprob(id as usize),
        top: best.into_iter().map(|i| (i as u32, logprob(i))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 3.0, 0.0]
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&logits()), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_restricts() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            seed: 11,
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone()).unwrap();
            (0..200).map(|_| s.sample(&logits())).collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        assert!(
            a.iter().all(|&t| t == 1 || t == 4),
            "top-2 holds ids 1 and 4 only"
        );
        assert!(a.contains(&1) && a.contains(&4));
        let other = draw(&SamplingParams { seed: 12, ..params });
        assert_ne!(a, other);
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        // Probabilities at T=1: ids 1 and 4 hold ~0.33 each, 2 holds ~0.2.
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 3,
        };
        let mut s = Sampler::new(params).unwrap();
        let draws: Vec<u32> = (0..300).map(|_| s.sample(&logits())).collect();
        assert!(draws.iter().all(|&t| t == 1 || t == 4), "{draws:?}");
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 5,
        };
        let mut s = Sampler::new(params).unwrap();
        let l = logits();
        let n = 20_000;
        let mut counts = [0usize; 6];
        for _ in 0..n {
            counts[s.sample(&l) as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let p = log_prob(&l, i as u32).exp();
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                ((c as f64 / n as f64) - p).abs() < 5.0 * sd + 1e-3,
                "id {i}: {c} draws, p = {p}"
            );
        }
    }

    #[test]
    fn token_logprobs_match_the_softmax_and_rank_the_alternatives() {
        let l = logits();
        let t = token_logprob(&l, 2, 3);
        assert_eq!(t.id, 2);
        assert!((t.logprob as f64 - log_prob(&l, 2)).abs() < 1e-6);
        // Ids 1 and 4 tie at 3.0 (the lower id first, as greedy picks), then id 2.
        let ids: Vec<u32> = t.top.iter().map(|&(i, _)| i).collect();
        assert_eq!(ids, [1, 4, 2]);
        for &(i, lp) in &t.top {
            assert!((lp as f64 - log_prob(&l, i)).abs() < 1e-6);
        }
        let total: f64 = (0..l.len() as u32).map(|i| log_prob(&l, i).exp()).sum();
        // Normalised to f32's precision (the terms of the sum are f32 exponentials).
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        // No alternatives asked for, and more than there are tokens.
        assert!(token_logprob(&l, 0, 0).top.is_empty());
        assert_eq!(token_logprob(&l, 0, 50).top.len(), l.len());
        // Random logits over a vocabulary-sized row: the top list is the sorted head.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let big: Vec<f32> = (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 20.0 - 10.0
            })
            .collect();
        let mut order: Vec<u32> = (0..big.len() as u32).collect();
        order.sort_by(|&a, &b| big[b as usize].total_cmp(&big[a as usize]).then(a.cmp(&b)));
        let t = token_logprob(&big, order[7], MAX_TOP_LOGPROBS);
        let ids: Vec<u32> = t.top.iter().map(|&(i, _)| i).collect();
        assert_eq!(ids, order[..MAX_TOP_LOGPROBS]);
        assert!(t.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                top_p: 0.0,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                top_p: 1.5,
                ..SamplingParams::greedy()
            },
        ] {
            assert!(Sampler::new(p).is_err());
        }
    }
}
