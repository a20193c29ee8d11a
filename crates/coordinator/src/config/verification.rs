//! `[verification]`: result verification's settings and its calibrated statistical limits
//! ([`Thresholds`]), as the operator writes them (run by `crate::trust::verify`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[verification]` in the coordinator's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerificationConfig {
    pub enabled: bool,
    /// GGUF files the verifier trusts. Each is identified by its sha256 (computed at start);
    /// a job is verified against the file whose sha256 its nodes claimed in Hello.
    pub models: Vec<PathBuf>,
    /// Spot-check rate of a node with a long good record (the steady-state fraction). When
    /// unset it follows from the detection goal below.
    pub min_rate: Option<f64>,
    /// Detection goal the default `min_rate` is derived from: a node that lies on
    /// `goal_lie_rate` of its jobs is caught within `goal_jobs` of its jobs on average.
    pub goal_lie_rate: f64,
    pub goal_jobs: u32,
    /// Spot-check rate of a node with no verified work.
    pub new_node_rate: f64,
    /// Jobs verified good over which a node's rate falls to half of `new_node_rate`.
    pub decay_jobs: u32,
    /// The statistical limits (calibrated; see VERIFICATION.md). A file written by
    /// `tokenfleet verify calibrate --json` can be given instead with `calibration`.
    pub thresholds: Thresholds,
    /// A calibration report (`tokenfleet verify calibrate --json > FILE`); its thresholds
    /// replace `thresholds`.
    pub calibration: Option<PathBuf>,
    /// Confirm a failed check on an independent path (the trusted engine re-scoring the job
    /// token by token, as a generating node does) before it counts. Only tests turn it off.
    pub confirm: bool,
    /// Circuit breaker: the verifier quarantines at most this share of the live fleet (at
    /// least one node) within `breaker_window_s`; further failures are held for an operator.
    pub breaker_max_share: f64,
    pub breaker_window_s: u64,
    /// Jobs waiting for the verifier beyond which spot checks are dropped (and counted).
    pub queue_capacity: usize,
    /// A quarantined node's finished jobs this recent that were not verified good are re-run.
    pub rerun_window_s: u64,
    /// Context of the trusted engine (prompt + output); longer jobs are not verified.
    pub ctx_tokens: u32,
    /// CPU threads of the trusted engine.
    pub threads: u32,
}

impl Default for VerificationConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            models: Vec::new(),
            min_rate: None,
            goal_lie_rate: 0.01,
            goal_jobs: 500,
            new_node_rate: 1.0,
            decay_jobs: 10,
            thresholds: Thresholds::default(),
            calibration: None,
            confirm: true,
            breaker_max_share: 0.1,
            breaker_window_s: 3600,
            queue_capacity: 64,
            rerun_window_s: 3600,
            ctx_tokens: 4096,
            threads: 1,
        }
    }
}

impl VerificationConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        if self.models.is_empty() {
            return Err("verification.models must list at least one trusted GGUF".into());
        }
        let rate = |r: f64| (0.0..=1.0).contains(&r);
        let min_rate = self.min_rate();
        if !rate(min_rate) || !rate(self.new_node_rate) || min_rate > self.new_node_rate {
            return Err(
                "verification rates must satisfy 0 <= min_rate <= new_node_rate <= 1".into(),
            );
        }
        if !(self.goal_lie_rate > 0.0 && self.goal_lie_rate <= 1.0) || self.goal_jobs == 0 {
            return Err("verification.goal_lie_rate must be in (0, 1] and goal_jobs > 0".into());
        }
        if !(self.breaker_max_share > 0.0 && self.breaker_max_share <= 1.0) {
            return Err("verification.breaker_max_share must be in (0, 1]".into());
        }
        self.thresholds
            .validate()
            .map_err(|e| format!("verification.thresholds: {e}"))?;
        if self.queue_capacity == 0 || self.threads == 0 || self.ctx_tokens < 16 {
            return Err(
                "verification.queue_capacity, threads must be > 0 and ctx_tokens >= 16".into(),
            );
        }
        Ok(())
    }

    /// The spot-check floor: the configured one, or the one the detection goal needs. A liar
    /// on a share `l` of its jobs, checked at rate `r`, meets its first checked lie after
    /// 1 / (l r) jobs on average (geometric); every checked lie is caught (the verifier's
    /// power against a substituted answer is ~1, `tokenfleet bench trust`), so r = 1 / (l J)
    /// meets "caught within J jobs on average": 0.2 for 1 % within 500.
    pub fn min_rate(&self) -> f64 {
        self.min_rate.unwrap_or_else(|| {
            (1.0 / (self.goal_lie_rate * self.goal_jobs as f64)).clamp(0.0, self.new_node_rate)
        })
    }

    /// The thresholds in force: from the calibration file when one is configured.
    pub fn load_thresholds(&self) -> Result<Thresholds, String> {
        let Some(path) = &self.calibration else {
            return Ok(self.thresholds);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("calibration {}: {e}", path.display()))?;
        #[derive(Deserialize)]
        struct Report {
            thresholds: Thresholds,
        }
        let report: Report = serde_json::from_str(&text)
            .map_err(|e| format!("calibration {}: {e}", path.display()))?;
        report
            .thresholds
            .validate()
            .map_err(|e| format!("calibration {}: {e}", path.display()))?;
        Ok(report.thresholds)
    }
}

/// Calibrated limits. The defaults are the figures `tokenfleet verify calibrate` derived for
/// SmolLM2-135M-Instruct Q4_1 on this project's CPU configurations (VERIFICATION.md has the
/// report and how to recalibrate for another model or backend).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    /// Probability that an honest job fails any test (split evenly over four tests).
    pub false_positive_rate: f64,
    /// Greedy: one claimed token this far (nats) below the argmax fails the segment.
    pub greedy_gap_limit_nats: f32,
    /// Greedy: tokens further than this below the argmax count as mismatches...
    pub greedy_mismatch_gap_nats: f32,
    /// ...which honest nodes produce at most at this rate per token.
    pub greedy_mismatch_rate: f64,
    /// A reported log-probability may differ from the re-scored one by this much.
    pub logprob_tolerance_nats: f32,
    /// Honest spread of the sampled likelihood z (1 in theory; rounding widens it).
    pub sampled_z_scale: f64,
    /// Informative sampled tokens before a likelihood test is judged.
    pub min_sampled_tokens: u64,
    /// A token just past the top-p boundary is tolerated if the mass before it is below
    /// top_p + this (rounding can move the boundary by a token).
    pub top_p_slack: f64,
    /// Checked segments per node in the sliding window.
    pub window_segments: usize,
}

impl Default for Thresholds {
    fn default() -> Self {
        // From `tokenfleet verify calibrate --jobs 2004 --json` (crates/coordinator/calibration/
        // smollm2-135m-q4_1.json: 2,004 honest jobs, 49,352 tokens, 6 CPU configurations, 0
        // honest failures), rounded up: largest honest gap 0.74 nats (p99.9 0.31), 0.27 % of
        // greedy tokens past 0.25 nats (over-dispersion 1.37), largest logprob difference 0.92
        // nats (p99.9 0.38), honest z spread 1.12 over 119 jobs. Other backends (CUDA, many
        // threads) are noisier (gaps up to 2.8 nats measured): recalibrate there
        // (VERIFICATION.md).
        Self {
            false_positive_rate: 1e-6,
            greedy_gap_limit_nats: 1.83,
            greedy_mismatch_gap_nats: 0.25,
            greedy_mismatch_rate: 0.0051,
            logprob_tolerance_nats: 1.85,
            sampled_z_scale: 1.35,
            min_sampled_tokens: 32,
            top_p_slack: 0.02,
            window_segments: 32,
        }
    }
}

impl Thresholds {
    pub fn validate(&self) -> Result<(), String> {
        let fpr = self.false_positive_rate;
        if !(fpr > 0.0 && fpr < 0.1) {
            return Err("false_positive_rate must be in (0, 0.1)".into());
        }
        let positive = [
            self.greedy_gap_limit_nats,
            self.greedy_mismatch_gap_nats,
            self.logprob_tolerance_nats,
        ];
        if positive.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err("nats limits must be positive".into());
        }
        if !(self.greedy_mismatch_rate > 0.0 && self.greedy_mismatch_rate < 1.0) {
            return Err("greedy_mismatch_rate must be in (0, 1)".into());
        }
        if !(self.sampled_z_scale >= 1.0 && self.sampled_z_scale.is_finite()) {
            return Err("sampled_z_scale must be >= 1".into());
        }
        if self.window_segments == 0 {
            return Err("window_segments must be > 0".into());
        }
        Ok(())
    }
}
