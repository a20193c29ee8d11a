//! Policies (`random`, `first-fit`, `tokenfleet`, `oracle`), their configuration and the
//! `tokenfleet`/`oracle` scoring function.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::forecast::DepartureForecast;
use crate::types::{JobClass, Millis, NodeView, QueuedJob};

/// A placement policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Any feasible node, uniformly at random.
    Random,
    /// BOINC-like: the first feasible node in index order takes the job.
    FirstFit,
    /// Departure-, energy-, tariff-, wear-, link- and reputation-aware scoring.
    Tokenfleet,
    /// Like `tokenfleet` but with the true departure time (`NodeView::oracle_departure`).
    Oracle,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 4] = [
        PolicyKind::Random,
        PolicyKind::FirstFit,
        PolicyKind::Tokenfleet,
        PolicyKind::Oracle,
    ];

    /// `tokenfleet` and `oracle` score sampled candidates (and share the rules that come with
    /// scoring: the interactive pool, the rescue of resumed batch jobs, the preemption wait);
    /// `random` and `first-fit` take the first feasible node.
    pub fn scores(self) -> bool {
        matches!(self, PolicyKind::Tokenfleet | PolicyKind::Oracle)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Random => "random",
            PolicyKind::FirstFit => "first-fit",
            PolicyKind::Tokenfleet => "tokenfleet",
            PolicyKind::Oracle => "oracle",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown policy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {0:?} (expected random, first-fit, tokenfleet or oracle)")]
pub struct UnknownPolicy(pub String);

impl FromStr for PolicyKind {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "random" => Ok(PolicyKind::Random),
            "first-fit" | "firstfit" | "first_fit" => Ok(PolicyKind::FirstFit),
            "tokenfleet" => Ok(PolicyKind::Tokenfleet),
            "oracle" => Ok(PolicyKind::Oracle),
            other => Err(UnknownPolicy(other.to_string())),
        }
    }
}

/// Tunables shared by all policies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Candidates examined per job by the scoring policies (bounded so `decide` never scans the
    /// whole fleet; small fleets are scanned completely).
    pub sample_size: usize,
    /// Candidates examined per interactive job. Interactive answers are short (seconds), so the
    /// stay probability is close to 1 on most nodes and a smaller sample finds a node as good on
    /// latency; it keeps the per-request cost low at a million-request-per-hour load.
    pub sample_size_interactive: usize,
    /// `tokenfleet`/`oracle`: leave a batch job queued rather than start it on the best sampled
    /// node when the chance that this node stays for `batch_useful_ms` (or the whole job, if
    /// shorter) is below this, unless its deadline is near.
    pub min_stay_prob_batch: f32,
    /// The least run time worth starting a batch job for, ms. Evicted work is continued, so
    /// a node that leaves after this long has still delivered far more than the re-prefill an
    /// eviction costs.
    pub batch_useful_ms: u64,
    /// A batch job whose deadline is closer than this multiple of its run time takes the best
    /// node regardless of the stay probability.
    pub deadline_urgency: f32,
    /// Interactive jobs queued longer than this are rejected (`QueueTimeout`).
    pub interactive_queue_timeout_ms: Millis,
    /// `tokenfleet`/`oracle`: a batch job resumed after an eviction (it has acknowledged
    /// output) goes before fresh jobs due at the same time once its deadline is closer than
    /// this multiple of its run time on the fastest node, so its partial request is not lost
    /// to the deadline. Giving resumed jobs priority always (a huge window) makes them chase
    /// one another through preemptions and delivers less (city-mixed: -4%); 8 was the best of
    /// 2, 4, 8, 16 on city-mixed.
    pub resumed_rescue_window: f32,
    /// `tokenfleet`/`oracle`: the interactive jobs of one (model, residency, sensitivity) in a
    /// `decide` call share `sample_size_interactive` candidates, scored for each job; before
    /// each job this many of the oldest leave for the next members of the candidate sets.
    /// 0 keeps the candidates until they fill up (cheapest, but the pool then holds the nodes
    /// every job passed over, and jobs go to nodes on battery: scale-1m noon, battery energy
    /// 47 -> 2,156 kWh); `sample_size_interactive` gives every job fresh candidates.
    pub interactive_pool_turnover: usize,
    /// `tokenfleet`/`oracle`: an interactive job that finds no free slot preempts batch work
    /// only once it has waited this long, ms; until then it waits for a slot that frees by
    /// itself. Each preemption costs the victim a re-prefill of its prompt and partial answer;
    /// the wait costs the job TTFT. Worth it where slots free every few hundred ms (a large
    /// fleet; the simulator's scenarios use 250 ms: city-mixed waste -25 %, interactive SLO
    /// -0.06 pt); 0 (the default) preempts at once, as a small fleet needs. `random` and
    /// `first-fit` always preempt at once.
    pub interactive_preempt_after_ms: Millis,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            sample_size: 64,
            sample_size_interactive: 16,
            min_stay_prob_batch: 0.6,
            batch_useful_ms: 10 * 60_000,
            deadline_urgency: 2.0,
            interactive_queue_timeout_ms: 60_000,
            resumed_rescue_window: 8.0,
            interactive_pool_turnover: 4,
            interactive_preempt_after_ms: 0,
        }
    }
}

/// The job-independent numbers the scoring policies read about a node, packed into one cache
/// line. The index keeps one per node (refreshed on every change), so scoring a candidate touches
/// this card only, never the node's heap-allocated strings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Card {
    /// Energy source, tariff, battery headroom, energy per token, packing, reputation.
    pub base: f32,
    pub stream_tps: f32,
    pub prefill_tps: f32,
    pub rtt_ms: f32,
    pub departure: DepartureForecast,
    /// `Millis::MAX` when unknown.
    pub oracle_departure: Millis,
    pub attested: bool,
}

impl Card {
    pub fn of(node: &NodeView) -> Self {
        let mut base = 0.0;
        // Grid energy before battery energy; cheaper tariff first.
        if node.plugged_in {
            base += 0.6;
            base -= 0.5 * (node.tariff_per_kwh / 0.40).clamp(0.0, 2.0);
        } else {
            // Battery energy is bought back later and wears the pack; keep away from the reserve.
            let headroom = node.soc_pct.map_or(0.0, |soc| {
                ((soc - node.soc_reserve_pct) / 50.0).clamp(0.0, 1.0)
            });
            base += 0.2 * headroom;
        }
        // Energy per token: the awake vehicle's power shared by the busy streams; packing work
        // onto already-busy nodes amortises it.
        let j_per_tok = node.power_w.max(1.0) / node.decode_tps_batched.max(0.1);
        base -= 0.2 * (j_per_tok / 5.0).min(3.0);
        if node.slots_total > 0 {
            base += 0.3 * node.slots_busy as f32 / node.slots_total as f32;
        }
        base += 0.5 * node.reputation.clamp(0.0, 1.0);
        Self {
            base,
            stream_tps: node.stream_tps(),
            prefill_tps: node.prefill_tps,
            rtt_ms: node.link_rtt_ms,
            departure: node.departure,
            oracle_departure: node.oracle_departure.unwrap_or(Millis::MAX),
            attested: node.attested,
        }
    }

    pub fn run_ms(&self, job: &QueuedJob) -> u64 {
        let prefill = (job.prompt_tokens as f64 + job.generated_tokens as f64)
            / self.prefill_tps.max(1.0) as f64;
        let decode = job.remaining_tokens() as f64 / self.stream_tps.max(f32::MIN_POSITIVE) as f64;
        ((prefill + decode) * 1000.0 + self.rtt_ms.max(0.0) as f64).min(u64::MAX as f64 / 4.0)
            as u64
    }

    pub fn stay_probability(&self, policy: PolicyKind, now: Millis, run_ms: u64) -> f32 {
        if policy == PolicyKind::Oracle && self.oracle_departure != Millis::MAX {
            if self.oracle_departure >= now.saturating_add(run_ms) {
                1.0
            } else {
                0.0
            }
        } else {
            self.departure.survival(now, run_ms)
        }
    }

    /// Median remaining parked time from `now`, s (exact for the oracle).
    pub fn median_stay_s(&self, policy: PolicyKind, now: Millis) -> f32 {
        if policy == PolicyKind::Oracle && self.oracle_departure != Millis::MAX {
            self.oracle_departure.saturating_sub(now) as f32 / 1000.0
        } else {
            self.departure.median_remaining_s(now)
        }
    }

    /// (score, stay probability, planned run ms).
    pub fn score(&self, policy: PolicyKind, job: &QueuedJob, now: Millis) -> (f32, f32, u64) {
        let run_ms = self.run_ms(job);
        let p = self.stay_probability(policy, now, run_ms);
        let mut s = self.base;
        match job.class {
            JobClass::Batch => {
                // Expected useful share of the work: an eviction costs the re-prefill and the
                // unacknowledged tail, so the stay probability dominates. Among nodes that will
                // likely finish this job, prefer the one that stays longest: the slot's next
                // jobs run there too.
                s += 3.0 * p;
                s += (self.median_stay_s(policy, now) / (4.0 * 3600.0)).min(1.0);
            }
            JobClass::Interactive => {
                // An answer cut off by a departure costs the user a second TTFT: weigh staying
                // for the answer, then latency (RTT and prefill) heavily.
                s += 3.0 * p;
                let (rtt, prefill) = self.latency_penalties(job);
                s -= rtt;
                s -= prefill;
            }
        }
        (s, p, run_ms)
    }

    /// An upper bound of `score(.., job, ..).0` for an interactive `job` (the stay probability
    /// taken as 1), without the forecast: a candidate whose bound does not beat the best score
    /// so far cannot win, so its score need not be computed. Exact in floating point: the same
    /// operations in the same order, with `3.0 >= 3.0 * p`.
    pub fn interactive_score_bound(&self, job: &QueuedJob) -> f32 {
        let mut s = self.base;
        s += 3.0;
        let (rtt, prefill) = self.latency_penalties(job);
        s -= rtt;
        s -= prefill;
        s
    }

    /// The interactive score's round-trip and prefill penalties.
    fn latency_penalties(&self, job: &QueuedJob) -> (f32, f32) {
        let rtt = (self.rtt_ms.max(0.0) / 250.0).min(4.0);
        let prefill_s = job.prompt_tokens as f32 / self.prefill_tps.max(1.0);
        (rtt, (prefill_s / 2.0).min(4.0))
    }
}

/// Planned run time of `job` on `node`, ms: re-prefill of prompt + generated tokens, then the
/// remaining decode at the node's per-stream speed, plus one round trip.
pub fn estimate_run_ms(job: &QueuedJob, node: &NodeView) -> u64 {
    Card::of(node).run_ms(job)
}

/// Probability that `node` stays parked for `run_ms` from `now`, as the policy sees it.
pub fn stay_probability(policy: PolicyKind, node: &NodeView, now: Millis, run_ms: u64) -> f32 {
    Card::of(node).stay_probability(policy, now, run_ms)
}

/// Score of placing `job` on `node` (higher is better) and the stay probability behind it.
pub fn score(policy: PolicyKind, job: &QueuedJob, node: &NodeView, now: Millis) -> (f32, f32) {
    let (s, p, _) = Card::of(node).score(policy, job, now);
    (s, p)
}
