//! Teacher forcing: how likely the model finds a sequence of tokens someone claims it produced.
//!
//! Result verification sends a job's prompt and its claimed output through a trusted copy of
//! the model in one batched prefill, with logits at every output position, and asks per
//! position: the claimed token's log-probability, the most likely token and the claimed
//! token's rank; and, for a sampled job, the claimed token's probability under the job's own
//! sampling distribution (temperature, top-k, top-p) with that distribution's entropy, which is
//! what a statistical test of honest sampling needs. The worker computes these on its thread
//! ([`score_position`] is the pure part), so only a few numbers per token cross the channel,
//! never a vocabulary-sized logit vector.
//!
//! A batched prefill takes other kernel paths than token-by-token decoding, so logits differ
//! from the generating run's by rounding: a greedy token that won a near-tie may come second
//! here. Callers compare with a tolerance (see `gap`), never for exact equality.

use crate::sampling::{argmax_and_log_sum_exp, truncated_support, SamplingParams, TokenId};

/// How the claimed tokens are evaluated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ScoreMode {
    /// All in batched prefills (fast; other kernel paths than decoding, so rounding differs).
    #[default]
    Prefill,
    /// The prompt in a prefill, then one claimed token per decode call: the path a generating
    /// node takes. Several times slower; used to confirm a failed check before it counts.
    Stepwise,
}

/// A prompt and the output tokens claimed to follow it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreRequest {
    /// Prompt token ids (as the generating node tokenized them).
    pub prompt: Vec<TokenId>,
    /// The claimed output, in order.
    pub claimed: Vec<TokenId>,
    /// The sampling parameters the output was supposedly drawn with; greedy (temperature 0)
    /// skips the per-distribution statistics.
    pub sampling: SamplingParams,
    pub mode: ScoreMode,
}

/// How the model scores one claimed token, given everything before it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScore {
    pub token: TokenId,
    /// Log-probability of `token` under the model (log-softmax, temperature 1).
    pub logprob: f32,
    /// Tokens the model finds strictly more likely than `token` (0: it is the argmax).
    pub rank: u32,
    pub argmax: TokenId,
    pub argmax_logprob: f32,
    /// Present for sampled requests.
    pub sampled: Option<SampledScore>,
}

impl TokenScore {
    /// How far (in nats) the claimed token is below the most likely one; 0 for the argmax.
    pub fn gap(&self) -> f32 {
        (self.argmax_logprob - self.logprob).max(0.0)
    }
}

/// The claimed token under the sampling distribution actually used (tempered, truncated by
/// top-k / top-p, renormalized), with the moments of that distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampledScore {
    /// ln q(token). For a token outside the truncated support this is its tempered
    /// probability relative to the kept mass (finite, so a caller may still use it).
    pub logprob: f64,
    /// Entropy of q: the expected value of -ln q(x) under honest sampling.
    pub entropy: f64,
    /// E_q[(ln q(x))²], for the variance of ln q(x) under honest sampling.
    pub logprob_sq_mean: f64,
    /// Whether top-k / top-p could have drawn `token` at all.
    pub in_support: bool,
    /// Tempered, untruncated probability mass of the tokens ranked strictly above `token`
    /// (top-p excludes a token exactly when this reaches top_p).
    pub mass_before: f64,
}

/// The model's view just after the last claimed token (did the output end where it should?).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NextScore {
    pub argmax: TokenId,
    pub argmax_logprob: f32,
    /// The most likely end-of-generation token's log-probability.
    pub best_eog_logprob: f32,
}

/// Scores for every claimed token, plus the position after them.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreResult {
    pub tokens: Vec<TokenScore>,
    pub next: NextScore,
}

/// Scores `token` against the logits of the position before it.
pub fn score_position(logits: &[f32], token: TokenId, sampling: &SamplingParams) -> TokenScore {
    let (best, lse) = argmax_and_log_sum_exp(logits);
    let t = token as usize;
    let lt = logits[t];
    let rank = logits.iter().filter(|&&l| l > lt).count() as u32;
    TokenScore {
        token,
        logprob: lt - lse,
        rank,
        argmax: best as TokenId,
        argmax_logprob: logits[best] - lse,
        sampled: (!sampling.is_greedy()).then(|| sampled_score(logits, t, sampling)),
    }
}

fn sampled_score(logits: &[f32], t: usize, params: &SamplingParams) -> SampledScore {
    let inv_t = 1.0 / params.temperature as f64;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weight = |l: f32| ((l as f64 - max) * inv_t).exp();
    let total: f64 = logits.iter().map(|&l| weight(l)).sum();
    let lt = logits[t];
    let mass_before = logits
        .iter()
        .filter(|&&l| l > lt)
        .map(|&l| weight(l))
        .sum::<f64>()
        / total;
    let (kept_total, in_support, entropy, logprob_sq_mean) =
        if params.top_k == 0 && params.top_p >= 1.0 {
            let (h, m2) = moments(logits.iter().map(|&l| weight(l) / total));
            (total, true, h, m2)
        } else {
            let (ids, weights) = truncated_support(logits, params);
            // `truncated_support` weighs relative to its own most likely candidate, which is
            // the global maximum, so its weights are on the same scale as `weight`.
            let kept: f64 = weights.iter().sum();
            let (h, m2) = moments(weights.iter().map(|w| w / kept));
            (kept, ids.contains(&t), h, m2)
        };
    SampledScore {
        logprob: (weight(lt) / kept_total).ln(),
        entropy,
        logprob_sq_mean,
        in_support,
        mass_before,
    }
}

/// (H, E[(ln q)²]) of a distribution given by its probabilities.
fn moments(probs: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut h, mut m2) = (0.0, 0.0);
    for q in probs {
        if q > 0.0 {
            let l = q.ln();
            h -= q * l;
            m2 += q * l * l;
        }
    }
    (h, m2)
}

/// The position after the last claimed token.
pub fn next_position(logits: &[f32], eog_tokens: &[TokenId]) -> NextScore {
    let (best, lse) = argmax_and_log_sum_exp(logits);
    let best_eog = eog_tokens
        .iter()
        .map(|&t| logits[t as usize])
        .fold(f32::NEG_INFINITY, f32::max);
    NextScore {
        argmax: best as TokenId,
        argmax_logprob: logits[best] - lse,
        best_eog_logprob: best_eog - lse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled(temperature: f32, top_p: f32, top_k: u32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: 1,
        }
    }

    #[test]
    fn the_argmax_has_rank_zero_and_no_gap() {
        let logits = [1.0, 3.0, 2.0];
        let s = score_position(&logits, 1, &SamplingParams::default());
        assert_eq!((s.rank, s.argmax), (0, 1));
        assert_eq!(s.gap(), 0.0);
        assert!(s.sampled.is_none());
        let s = score_position(&logits, 0, &SamplingParams::default());
        assert_eq!(s.rank, 2);
        assert!((s.gap() - 2.0).abs() < 1e-5);
    }

    #[test]
    fn sampled_probabilities_follow_temperature_and_truncation() {
        let logits = [0.0f32, (3.0f32).ln(), -20.0];
        // T = 1, no truncation: q = softmax.
        let s = score_position(&logits, 1, &sampled(1.0, 1.0, 0))
            .sampled
            .unwrap();
        assert!((s.logprob.exp() - 0.75).abs() < 1e-4, "{s:?}");
        assert!(s.in_support);
        // top_k = 1 keeps only token 1: q(1) = 1, entropy 0, token 0 outside.
        let s = score_position(&logits, 1, &sampled(1.0, 1.0, 1))
            .sampled
            .unwrap();
        assert!(s.logprob.abs() < 1e-9 && s.entropy.abs() < 1e-9);
        let s = score_position(&logits, 0, &sampled(1.0, 1.0, 1))
            .sampled
            .unwrap();
        assert!(!s.in_support);
        assert!((s.mass_before - 0.75).abs() < 1e-3);
        // top_p = 0.9 keeps tokens 1 and 0 (0.75 < 0.9), drops the -20 tail.
        let s = score_position(&logits, 2, &sampled(1.0, 0.9, 0))
            .sampled
            .unwrap();
        assert!(!s.in_support);
        // T = 2 flattens: q(1) = sqrt(3) / (1 + sqrt(3) + tiny).
        let s = score_position(&logits, 1, &sampled(2.0, 1.0, 0))
            .sampled
            .unwrap();
        let expected = 3f64.sqrt() / (1.0 + 3f64.sqrt());
        assert!((s.logprob.exp() - expected).abs() < 1e-4);
    }

    #[test]
    fn entropy_of_a_uniform_distribution_is_ln_n() {
        let logits = [0.5f32; 8];
        let s = score_position(&logits, 3, &sampled(0.7, 1.0, 0))
            .sampled
            .unwrap();
        assert!((s.entropy - 8f64.ln()).abs() < 1e-9);
        assert!((s.logprob_sq_mean - 8f64.ln().powi(2)).abs() < 1e-9);
    }

    #[test]
    fn next_position_reports_the_best_end_token() {
        let logits = [0.0f32, 2.0, 1.0];
        let n = next_position(&logits, &[2]);
        assert_eq!(n.argmax, 1);
        assert!(n.best_eog_logprob < n.argmax_logprob);
    }
}
