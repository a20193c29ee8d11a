//! Judging a teacher-forced job: did each node's tokens come from the claimed model?
//!
//! Pure functions over the trusted engine's [`ScoreResult`]. A job's output may come from
//! several nodes (it moved on evictions), so every test runs per [`Segment`] and the verdict
//! names the node it is about.
//!
//! - **Greedy** (temperature 0): every claimed token must be the model's argmax within
//!   `greedy_tolerance_nats` (a batched prefill rounds differently from decoding, so an honest
//!   near-tie can come out second by a hair). A job that ended on end-of-generation must end
//!   where the model ends too. One violation fails the node.
//! - **Sampled**: a token top-k / top-p could never have drawn fails the node at once. Then a
//!   likelihood test: under honest sampling from q_t, L_t = ln q_t(x_t) has mean -H(q_t) and
//!   variance Var_t = E[(ln q)²] - H², so Z = Σ(L_t + H_t) / sqrt(Σ Var_t) is close to N(0, 1).
//!   Tokens from another model (lower likelihood under this one), random tokens, or argmax
//!   tokens passed off as samples (too likely) push |Z| up. The sums accumulate per node across
//!   every verified job ([`SampledEvidence`]); the k-th look at a node tests at
//!   α / (k (k + 1)), so the chance an honest node is ever failed over its whole life stays
//!   below α however often it is looked at (alpha spending).

use tokenfleet_engine::{SamplingParams, ScoreResult, TokenScore};

/// Tokens `start..end` of a job's output, produced by `node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub node: String,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub greedy_tolerance_nats: f32,
    /// Lifetime false-positive rate of the sampled test per node (α).
    pub sampled_false_positive_rate: f64,
    /// A node's sampled evidence is judged only once this many informative tokens are in.
    pub min_sampled_tokens: u64,
    /// A token just past the top-p boundary is tolerated if the mass before it is below
    /// top_p + this (rounding can move the boundary by a token).
    pub top_p_slack: f64,
}

/// Running sums of the sampled test for one node (persisted with its reputation).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SampledEvidence {
    /// Informative tokens (Var_t > 0) seen.
    pub tokens: u64,
    /// Σ (L_t + H_t).
    pub excess: f64,
    /// Σ Var_t.
    pub variance: f64,
    /// Times the test was evaluated (for alpha spending).
    pub looks: u64,
}

impl SampledEvidence {
    pub fn z(&self) -> f64 {
        if self.variance > 0.0 {
            self.excess / self.variance.sqrt()
        } else {
            0.0
        }
    }
}

/// What one job says about one node.
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    Pass,
    Fail(String),
    /// Not enough evidence yet (a short sampled job); the evidence is kept.
    Inconclusive(String),
}

/// Greedy: the first token beyond tolerance, or a wrongly claimed end.
pub fn judge_greedy(
    scores: &ScoreResult,
    segment: &Segment,
    ended_on_eog: bool,
    th: &Thresholds,
) -> Finding {
    for i in segment.start..segment.end.min(scores.tokens.len()) {
        let t = &scores.tokens[i];
        if t.gap() > th.greedy_tolerance_nats {
            return Finding::Fail(format!(
                "greedy token {i} is id {} ({:.2} nats below the model's choice {}, tolerance {})",
                t.token,
                t.gap(),
                t.argmax,
                th.greedy_tolerance_nats
            ));
        }
    }
    if ended_on_eog && segment.end == scores.tokens.len() {
        let n = &scores.next;
        let gap = n.argmax_logprob - n.best_eog_logprob;
        if gap > th.greedy_tolerance_nats {
            return Finding::Fail(format!(
                "claimed end of generation after token {} where the model continues ({gap:.2} nats)",
                segment.end
            ));
        }
    }
    Finding::Pass
}

/// Whether honest top-k / top-p sampling could have drawn this token (up to rounding at the
/// boundary).
fn possible(t: &TokenScore, sampling: &SamplingParams, th: &Thresholds) -> bool {
    let Some(s) = t.sampled else { return true };
    if s.in_support {
        return true;
    }
    let top_p_boundary =
        sampling.top_p < 1.0 && s.mass_before < sampling.top_p as f64 + th.top_p_slack;
    let top_k_boundary = sampling.top_k > 0 && t.rank <= sampling.top_k;
    top_p_boundary || top_k_boundary
}

/// Sampled, first half (on the verifier): the segment's contribution to its node's
/// evidence, or a failure when it holds a token honest sampling could not draw.
pub fn sampled_evidence(
    scores: &ScoreResult,
    segment: &Segment,
    sampling: &SamplingParams,
    th: &Thresholds,
) -> Result<SampledEvidence, String> {
    let mut evidence = SampledEvidence::default();
    for i in segment.start..segment.end.min(scores.tokens.len()) {
        let t = &scores.tokens[i];
        if !possible(t, sampling, th) {
            return Err(format!(
                "sampled token {i} (id {}, rank {}) is outside what temperature {} top_p {} top_k {} can draw",
                t.token, t.rank, sampling.temperature, sampling.top_p, sampling.top_k
            ));
        }
        let Some(s) = t.sampled else { continue };
        let var = s.logprob_sq_mean - s.entropy * s.entropy;
        if var > 1e-9 {
            evidence.tokens += 1;
            evidence.excess += s.logprob + s.entropy;
            evidence.variance += var;
        }
    }
    Ok(evidence)
}

impl SampledEvidence {
    pub fn add(&mut self, other: &SampledEvidence) {
        self.tokens += other.tokens;
        self.excess += other.excess;
        self.variance += other.variance;
    }
}

/// Sampled, second half (with the node's record): tests the node's accumulated evidence.
pub fn test_sampled(evidence: &mut SampledEvidence, th: &Thresholds) -> Finding {
    if evidence.tokens < th.min_sampled_tokens {
        return Finding::Inconclusive(format!(
            "{} informative sampled tokens so far (judged from {})",
            evidence.tokens, th.min_sampled_tokens
        ));
    }
    evidence.looks += 1;
    let k = evidence.looks as f64;
    let critical = z_two_sided(th.sampled_false_positive_rate / (k * (k + 1.0)));
    let z = evidence.z();
    if z.abs() > critical {
        Finding::Fail(format!(
            "sampled tokens do not fit the model: likelihood z = {z:.2} over {} tokens (|z| limit {critical:.2} at look {})",
            evidence.tokens, evidence.looks
        ))
    } else {
        Finding::Pass
    }
}

/// Both halves at once (one node's segment against its running evidence).
pub fn judge_sampled(
    scores: &ScoreResult,
    segment: &Segment,
    sampling: &SamplingParams,
    evidence: &mut SampledEvidence,
    th: &Thresholds,
) -> Finding {
    match sampled_evidence(scores, segment, sampling, th) {
        Ok(delta) => {
            evidence.add(&delta);
            test_sampled(evidence, th)
        }
        Err(why) => Finding::Fail(why),
    }
}

/// The z with P(|N(0,1)| > z) = alpha.
pub fn z_two_sided(alpha: f64) -> f64 {
    let alpha = alpha.clamp(1e-300, 1.0);
    let (mut lo, mut hi) = (0.0f64, 40.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if erfc(mid / std::f64::consts::SQRT_2) > alpha {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Complementary error function (Numerical Recipes' Chebyshev fit, relative error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;
