//! The coordinator's view of one connected vehicle, and the count of sessions per model
//! behind `/v1/models`.
//!
//! [`Standing`] is what the coordinator measures of a node itself rather than takes from its
//! reports: progress of each running job (for the progress deadline), recent stalls and a
//! cool-down, and decode throughput from its chunks. [`Node::view`] applies it: a node
//! cooling down is not eligible, and a node measured far below its claimed speed is
//! scheduled at the measured one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::clock::clock_ms;

use tokenfleet_protocol::v1::{self, CoordinatorMessage, GovernorState};
use tokenfleet_protocol::CoordinatorMsg;
use tokenfleet_scheduler::{DepartureForecast, NodeId, NodeView};
use tokio::sync::mpsc;

/// The outbound half of a node's session (boxed: a fleet holds one such queue per vehicle,
/// and a queue allocates room for a block of messages up front).
pub type NodeSender = mpsc::Sender<Box<CoordinatorMessage>>;

/// When a session last heard from its agent, in [`clock_ms`]: written by the session task on
/// every message (heartbeats never reach the manager), read by the manager for leases.
pub type LastSeen = Arc<AtomicU64>;

pub const GOVERNOR_LABELS: [&str; 6] = [
    "unknown",
    "unavailable",
    "eligible",
    "computing",
    "throttled",
    "draining",
];

pub struct Node {
    pub id: NodeId,
    pub name: String,
    pub hello: v1::Hello,
    pub state: v1::State,
    /// Current session; None while disconnected.
    pub sender: Option<NodeSender>,
    pub conn: u64,
    /// Of the current session.
    pub last_seen: LastSeen,
    /// Jobs running here.
    pub jobs: HashSet<u64>,
    /// Residency regions its last reported position lies in (none without a position).
    pub regions: Vec<String>,
    /// The current session verified a TPM quote (only such nodes get sensitive requests).
    pub attested: bool,
    /// Measured by the coordinator; kept across the node's reconnects.
    pub standing: Standing,
}

/// A running job's progress on its node, as the coordinator saw it.
#[derive(Debug, Clone, Copy)]
pub struct JobProgress {
    /// Tokens the job had when this node got it (it owes their prefill with the prompt's).
    pub at_assign: usize,
    /// Tokens the job has now, and when that count last grew.
    pub tokens: usize,
    pub since: Instant,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Standing {
    pub progress: HashMap<u64, JobProgress>,
    /// When this node's recent stalls happened (only those within the window are kept).
    pub stalls: VecDeque<Instant>,
    /// No new work until then.
    pub cooldown_until: Option<Instant>,
    /// When progress was last checked (the busy time accumulates between checks).
    pub last_check: Option<Instant>,
    /// Tokens produced over `busy`, the time at least one job was decoding here.
    pub tokens: u64,
    pub busy: Duration,
    /// The measured decode throughput that replaces the claimed one, when far below it.
    pub measured_tps: Option<f32>,
    /// The operator was warned that this node overclaims. A node near the limit flips in and
    /// out of it with its load (the demo's three agents on two cores: measured 6-35 tok/s
    /// against the 37.5 limit, 22 warnings in 10 minutes): later onsets are logged at debug
    /// and counted in `tokenfleet_node_speed_overclaims_total`.
    pub overclaim_warned: bool,
}

impl Standing {
    pub fn cooling_down(&self, now: Instant) -> bool {
        self.cooldown_until.is_some_and(|t| now < t)
    }
}

impl Node {
    pub fn new(id: NodeId, hello: v1::Hello) -> Self {
        Self {
            id,
            name: hello.node_id.clone(),
            hello,
            state: v1::State::default(),
            sender: None,
            conn: 0,
            last_seen: Arc::new(AtomicU64::new(clock_ms())),
            jobs: HashSet::new(),
            regions: Vec::new(),
            attested: false,
            standing: Standing::default(),
        }
    }

    /// How long the current session has been silent.
    pub fn silent_for(&self) -> Duration {
        Duration::from_millis(clock_ms().saturating_sub(self.last_seen.load(Ordering::Relaxed)))
    }

    pub fn connected(&self) -> bool {
        self.sender.as_ref().is_some_and(|s| !s.is_closed())
    }

    /// Sends without waiting; false when the session is gone or its buffer is full.
    pub fn try_send(&self, msg: CoordinatorMessage) -> bool {
        self.sender
            .as_ref()
            .is_some_and(|s| s.try_send(Box::new(msg)).is_ok())
    }

    pub fn send(&self, msg: CoordinatorMsg) {
        if !self.try_send(CoordinatorMessage::new(msg)) {
            tracing::warn!(node = %self.name, "could not send to node (session closed or full)");
        }
    }

    pub fn governor_label(&self) -> &'static str {
        match GovernorState::try_from(self.state.governor).unwrap_or(GovernorState::Unspecified) {
            GovernorState::Unspecified => "unknown",
            GovernorState::Unavailable => "unavailable",
            GovernorState::Eligible => "eligible",
            GovernorState::Computing => "computing",
            GovernorState::Throttled => "throttled",
            GovernorState::Draining => "draining",
        }
    }

    /// What the scheduler sees of this node.
    pub fn view(&self, now_ms: u64) -> NodeView {
        let hw = self.hello.hardware.clone().unwrap_or_default();
        let s = &self.state;
        let departure = if s.expected_parked_s > 0 {
            let e = s.expected_parked_s as f32;
            DepartureForecast::from_quantiles(now_ms, [0.4 * e, 0.7 * e, e, 1.3 * e, 1.8 * e])
        } else {
            DepartureForecast::unknown(now_ms)
        };
        // Speeds are claims; a node measured far below its claim is scheduled at the
        // measured speed (see `Standing`).
        let cap = |claimed: f32| match self.standing.measured_tps {
            Some(measured) => claimed.min(measured),
            None => claimed,
        };
        let single = cap(hw.decode_tps_single).max(1.0);
        let batched = cap(hw.decode_tps_batched.max(hw.decode_tps_single)).max(single);
        NodeView {
            id: self.id,
            models: self.hello.models.iter().map(|m| m.name.clone()).collect(),
            slots_total: self.hello.engine_slots,
            slots_busy: self.jobs.len() as u32,
            decode_tps_single: single,
            decode_tps_batched: batched,
            prefill_tps: 10.0 * single,
            eligible: self.connected() && s.eligible && !self.standing.cooling_down(Instant::now()),
            soc_pct: s.soc_pct,
            soc_reserve_pct: s.soc_reserve_pct,
            plugged_in: s.plugged_in,
            regions: self.regions.clone(),
            tariff_per_kwh: s.tariff_per_kwh,
            power_w: s.compute_power_w,
            link_rtt_ms: s.link_rtt_ms,
            // Set by the manager from the verifier's record (`dispatch`).
            reputation: 1.0,
            attested: self.attested,
            departure,
            running_batch: Vec::new(),
            oracle_departure: None,
        }
    }
}

/// Connected sessions per model and, per model, how many of them offer each context length
/// (so that the largest context any connected vehicle offers is known when one leaves).
pub(crate) type ModelSessions = HashMap<String, std::collections::BTreeMap<u32, usize>>;

/// What the HTTP edge reads without a round trip to the manager: each model held by at least
/// one connected node, with the largest context (tokens per sequence) any of them offers.
pub(crate) type ServedModels = std::collections::BTreeMap<String, u32>;

/// Counts a node's models in or out of `sessions` when its session starts or ends, and
/// publishes the served models when they change.
pub(crate) fn count_models(
    sessions: &mut ModelSessions,
    publish: &tokio::sync::watch::Sender<Arc<ServedModels>>,
    hello: &v1::Hello,
    up: bool,
) {
    for m in &hello.models {
        let contexts = sessions.entry(m.name.clone()).or_default();
        if up {
            *contexts.entry(m.ctx_per_slot).or_insert(0) += 1;
        } else if let Some(c) = contexts.get_mut(&m.ctx_per_slot) {
            *c -= 1;
            if *c == 0 {
                contexts.remove(&m.ctx_per_slot);
            }
        }
        if contexts.is_empty() {
            sessions.remove(&m.name);
        }
    }
    let served: ServedModels = sessions
        .iter()
        .filter_map(|(name, contexts)| Some((name.clone(), *contexts.last_key_value()?.0)))
        .collect();
    publish.send_if_modified(|current| {
        if **current == served {
            return false;
        }
        *current = Arc::new(served);
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(models: &[(&str, u32)]) -> v1::Hello {
        v1::Hello {
            models: models
                .iter()
                .map(|&(name, ctx)| v1::ModelInfo {
                    name: name.into(),
                    ctx_per_slot: ctx,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn served_models_follow_sessions_with_the_largest_context_still_connected() {
        let (tx, rx) = tokio::sync::watch::channel(Arc::<ServedModels>::default());
        let mut sessions = ModelSessions::new();
        let small = hello(&[("m", 1024)]);
        let large = hello(&[("m", 4096), ("n", 2048)]);
        count_models(&mut sessions, &tx, &small, true);
        count_models(&mut sessions, &tx, &large, true);
        count_models(&mut sessions, &tx, &small, true);
        assert_eq!(rx.borrow().get("m"), Some(&4096));
        assert_eq!(rx.borrow().get("n"), Some(&2048));
        count_models(&mut sessions, &tx, &large, false);
        assert_eq!(rx.borrow().get("m"), Some(&1024));
        assert!(!rx.borrow().contains_key("n"));
        count_models(&mut sessions, &tx, &small, false);
        assert_eq!(
            rx.borrow().get("m"),
            Some(&1024),
            "one small session is left"
        );
        count_models(&mut sessions, &tx, &small, false);
        assert!(rx.borrow().is_empty());
        assert!(sessions.is_empty());
    }
}
