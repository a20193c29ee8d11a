//! Judging a teacher-forced job: did each node's tokens come from the claimed model?
//!
//! Pure functions over the trusted engine's [`ScoreResult`]. A job's output may come from
//! several nodes (it moved on evictions), so everything runs per [`Segment`] and names the node
//! it is about. Re-scoring is not bit-exact: a batched prefill rounds differently from a node's
//! token-by-token decoding (and a node's batch of 1-8 sequences, its thread count and its
//! backend differ again), so an honest greedy token can come out a little below the re-scored
//! argmax, and near-ties (top two logits within noise) are common in small models. No rule
//! here compares values for equality; every limit is a [`Thresholds`] field derived from
//! honest work by `tokenfleet verify calibrate` (see VERIFICATION.md), with a stated
//! false-positive rate per job, split evenly over the four tests that can fail a job.
//!
//! Per segment the verifier extracts [`Evidence`] (sufficient statistics), then:
//! - **greedy**, two tests: (1) one token further below the argmax than `greedy_gap_limit_nats`
//!   (far beyond any honest rounding: a substituted token, another model) fails; (2) the count
//!   of tokens more than `greedy_mismatch_gap_nats` below the argmax (past near-tie noise) is
//!   binomial under honesty with the calibrated rate; a count the honest rate makes less
//!   likely than the test's share of α fails (a near miss: a lower-bit quantization, a
//!   temperature above 0). A claimed end of generation is judged like a claimed token.
//! - **sampled**: a token top-k / top-p could never have drawn fails. Then a likelihood test:
//!   under honest sampling from q_t, L_t = ln q_t(x_t) has mean -H(q_t) and variance
//!   Var_t = E[(ln q)^2] - H^2, so Z = Σ(L_t + H_t) / sqrt(Σ Var_t) is close to N(0, 1) (its
//!   honest spread is calibrated: `sampled_z_scale`). Another model's samples, random tokens,
//!   or argmax tokens passed off as samples push |Z| up.
//! - **logprobs** (both): a reported log-probability further than `logprob_tolerance_nats`
//!   from the re-scored one is forged.
//! - **window** (both, [`NodeWindow`]): the same count and likelihood tests over a node's last
//!   `window_segments` checked segments, so a liar that cheats a little on every job is caught
//!   by accumulation, while a long honest past cannot dilute new lies (the window forgets it).
//!
//! A failure is not yet a verdict: the verifier confirms it on an independent path first
//! (`verify::confirm`).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use statrs::distribution::{Binomial, ContinuousCDF, DiscreteCDF, Normal};
use tokenfleet_engine::{SamplingParams, ScoreResult, TokenScore};

use crate::config::verification::Thresholds;

/// Tokens `start..end` of a job's output, produced by `node` (`start == end`: the node
/// produced no token, only the job's end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub node: String,
    pub start: usize,
    pub end: usize,
}

impl Thresholds {
    /// α of each of the four tests that can fail a job.
    fn alpha_per_test(&self) -> f64 {
        self.false_positive_rate / 4.0
    }
}

/// What the node claimed besides its token ids, for the checks that read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims<'a> {
    pub tokens: &'a [i32],
    /// The log-probability the node reported per token (what the client was shown).
    pub logprobs: &'a [f32],
    /// The job ended on an end-of-generation token (not a stop string or its length).
    pub ended_on_eog: bool,
    pub sampling: &'a SamplingParams,
}

/// Sums of the sampled likelihood test.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SampledSums {
    /// Informative tokens (Var_t > 0) seen.
    pub tokens: u64,
    /// Σ (L_t + H_t).
    pub excess: f64,
    /// Σ Var_t.
    pub variance: f64,
}

impl SampledSums {
    pub fn z(&self) -> f64 {
        if self.variance > 0.0 {
            self.excess / self.variance.sqrt()
        } else {
            0.0
        }
    }

    pub fn add(&mut self, other: &SampledSums) {
        self.tokens += other.tokens;
        self.excess += other.excess;
        self.variance += other.variance;
    }
}

/// What re-scoring found in one node's segment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evidence {
    pub greedy: bool,
    /// Positions judged (claimed tokens, plus a claimed end of generation).
    pub positions: u64,
    /// Greedy: the largest gap below the argmax, and where.
    pub max_gap: f32,
    pub max_gap_at: usize,
    /// Greedy: positions further than `greedy_mismatch_gap_nats` below the argmax.
    pub mismatches: u64,
    pub sampled: SampledSums,
    /// The largest |reported - re-scored| log-probability, and where.
    pub max_logprob_error: f32,
    pub max_logprob_error_at: usize,
    /// A token honest sampling could not draw (sampled jobs), with why.
    pub impossible: Option<String>,
}

/// What one check says about one node.
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    Pass,
    /// Not enough evidence yet (a short sampled job); the evidence is kept in the window.
    Inconclusive(String),
    Fail(String),
}

impl Finding {
    pub fn is_fail(&self) -> bool {
        matches!(self, Finding::Fail(_))
    }
}

/// The statistics of one node's segment.
pub fn evidence(
    scores: &ScoreResult,
    segment: &Segment,
    claims: &Claims<'_>,
    th: &Thresholds,
) -> Evidence {
    let greedy = claims.sampling.is_greedy();
    let mut e = Evidence {
        greedy,
        ..Default::default()
    };
    let end = segment.end.min(scores.tokens.len());
    for i in segment.start..end {
        let t = &scores.tokens[i];
        if let Some(&reported) = claims.logprobs.get(i) {
            let err = (reported - t.logprob).abs();
            // NaN is a forged value too.
            if err.is_nan() || err > e.max_logprob_error {
                e.max_logprob_error = if err.is_nan() { f32::INFINITY } else { err };
                e.max_logprob_error_at = i;
            }
        }
        e.positions += 1;
        if greedy {
            note_gap(&mut e, t.gap(), i, th);
        } else {
            if e.impossible.is_none() && !possible(t, claims.sampling, th) {
                e.impossible = Some(format!(
                    "sampled token {i} (id {}, rank {}) is outside what temperature {} top_p {} top_k {} can draw",
                    t.token, t.rank, claims.sampling.temperature, claims.sampling.top_p, claims.sampling.top_k
                ));
            }
            if let Some(s) = t.sampled {
                let var = s.logprob_sq_mean - s.entropy * s.entropy;
                if var > 1e-9 {
                    e.sampled.tokens += 1;
                    e.sampled.excess += s.logprob + s.entropy;
                    e.sampled.variance += var;
                }
            }
        }
    }
    // The claimed end of generation is a claimed token too (a node that stops early to save
    // work claims the model would have stopped).
    if claims.ended_on_eog && segment.end == scores.tokens.len() && greedy {
        let n = &scores.next;
        e.positions += 1;
        note_gap(
            &mut e,
            (n.argmax_logprob - n.best_eog_logprob).max(0.0),
            segment.end,
            th,
        );
    }
    e
}

fn note_gap(e: &mut Evidence, gap: f32, at: usize, th: &Thresholds) {
    if gap > e.max_gap || gap.is_nan() {
        e.max_gap = if gap.is_nan() { f32::INFINITY } else { gap };
        e.max_gap_at = at;
    }
    if gap > th.greedy_mismatch_gap_nats {
        e.mismatches += 1;
    }
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

/// Judges one segment on its own.
pub fn judge(e: &Evidence, th: &Thresholds) -> Finding {
    if let Some(why) = &e.impossible {
        return Finding::Fail(why.clone());
    }
    if e.max_logprob_error > th.logprob_tolerance_nats {
        return Finding::Fail(format!(
            "reported logprob of token {} is {:.2} nats from the model's (tolerance {})",
            e.max_logprob_error_at, e.max_logprob_error, th.logprob_tolerance_nats
        ));
    }
    if e.greedy {
        if e.max_gap > th.greedy_gap_limit_nats {
            return Finding::Fail(format!(
                "greedy token {} is {:.2} nats below the model's choice (limit {})",
                e.max_gap_at, e.max_gap, th.greedy_gap_limit_nats
            ));
        }
        return mismatch_test(e.positions, e.mismatches, th, "this job");
    }
    likelihood_test(&e.sampled, th, "this job")
}

/// Greedy count test: fails when `mismatches` of `positions` is too many for an honest node.
fn mismatch_test(positions: u64, mismatches: u64, th: &Thresholds, over: &str) -> Finding {
    let p_value = binomial_at_least(positions, th.greedy_mismatch_rate, mismatches);
    if p_value < th.alpha_per_test() {
        Finding::Fail(format!(
            "{mismatches} of {positions} greedy tokens over {over} are more than {} nats below the model's choice (p = {p_value:.1e} at an honest rate of {})",
            th.greedy_mismatch_gap_nats, th.greedy_mismatch_rate
        ))
    } else {
        Finding::Pass
    }
}

/// Sampled likelihood test on `sums`.
fn likelihood_test(sums: &SampledSums, th: &Thresholds, over: &str) -> Finding {
    if sums.tokens < th.min_sampled_tokens {
        return Finding::Inconclusive(format!(
            "{} informative sampled tokens over {over} (judged from {})",
            sums.tokens, th.min_sampled_tokens
        ));
    }
    let limit = z_two_sided(th.alpha_per_test()) * th.sampled_z_scale;
    let z = sums.z();
    if z.abs() > limit {
        Finding::Fail(format!(
            "sampled tokens over {over} do not fit the model: likelihood z = {z:.2} over {} tokens (|z| limit {limit:.2})",
            sums.tokens
        ))
    } else {
        Finding::Pass
    }
}

/// P(X >= k) for X ~ Binomial(n, p).
pub fn binomial_at_least(n: u64, p: f64, k: u64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    match Binomial::new(p, n) {
        Ok(b) => b.sf(k - 1),
        Err(_) => 0.0,
    }
}

/// The z with P(|N(0,1)| > z) = alpha.
pub fn z_two_sided(alpha: f64) -> f64 {
    let alpha = alpha.clamp(1e-300, 1.0);
    Normal::standard().inverse_cdf(1.0 - alpha / 2.0).max(0.0)
}

/// One checked segment, as the window keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct WindowEntry {
    greedy_positions: u64,
    mismatches: u64,
    sampled: SampledSums,
}

/// A node's last checked segments (the verifier keeps one per node, in memory: after a
/// coordinator restart a node's window starts empty, its quarantine does not).
#[derive(Debug, Clone, Default)]
pub struct NodeWindow {
    entries: VecDeque<WindowEntry>,
}

impl NodeWindow {
    /// Judges the window as it would be with `e` added (nothing changes).
    pub fn judge_with(&self, e: &Evidence, th: &Thresholds) -> Finding {
        let mut w = self.clone();
        w.push(e, th);
        w.judge(th)
    }

    pub fn push(&mut self, e: &Evidence, th: &Thresholds) {
        self.entries.push_back(WindowEntry {
            greedy_positions: if e.greedy { e.positions } else { 0 },
            mismatches: e.mismatches,
            sampled: e.sampled,
        });
        while self.entries.len() > th.window_segments {
            self.entries.pop_front();
        }
    }

    fn judge(&self, th: &Thresholds) -> Finding {
        let over = format!("the node's last {} checked jobs", self.entries.len());
        let (positions, mismatches) = self.entries.iter().fold((0, 0), |(p, m), e| {
            (p + e.greedy_positions, m + e.mismatches)
        });
        if let f @ Finding::Fail(_) = mismatch_test(positions, mismatches, th, &over) {
            return f;
        }
        let mut sums = SampledSums::default();
        for e in &self.entries {
            sums.add(&e.sampled);
        }
        match likelihood_test(&sums, th, &over) {
            f @ Finding::Fail(_) => f,
            _ => Finding::Pass,
        }
    }
}

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;
