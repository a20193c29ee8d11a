//! Agent configuration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::attest::Attestor;
use crate::identity::IdentityDir;
use tokenfleet_vehicle::{HardwareProfile, WearModel};

/// The vehicle's TPM, shared by the session (quotes) and whoever measured into it.
#[derive(Clone)]
pub struct SharedAttestor(pub Arc<dyn Attestor>);

impl std::fmt::Debug for SharedAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Attestor")
    }
}

/// How the agent connects and what it serves.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Coordinator agent endpoints, e.g. `https://fleet.example:50051` (or `http://` on
    /// loopback), tried in turn: an active coordinator and its standby.
    pub coordinators: Vec<String>,
    /// PEM CA that signed the coordinator's certificate (for `https://` without an identity).
    pub ca_cert: Option<PathBuf>,
    /// The enrolled identity (node certificate, key, fleet CA): the session then uses mutual
    /// TLS and the coordinator knows the node by its certificate.
    pub identity: Option<IdentityDir>,
    /// The vehicle's TPM with the agent's measurements extended into it; without one the
    /// agent answers attestation challenges with "unavailable".
    pub attestor: Option<SharedAttestor>,
    /// Stable vehicle identity.
    pub node_id: String,
    /// The name clients use for the served model (default: the GGUF file stem).
    pub model_name: String,
    pub compute_class: String,
    /// Decode speed advertised to the scheduler (single stream / all slots busy).
    pub decode_tps_single: f32,
    pub decode_tps_batched: f32,
    /// Reconnect backoff: first delay and cap.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Backoff after the coordinator denies the vehicle itself (quarantine, revocation): an
    /// operator has to act first, so the agent asks again only every few minutes.
    pub denied_backoff_initial: Duration,
    pub denied_backoff_max: Duration,
    /// Compute-unit power model, used for per-job energy when neither the vehicle's power
    /// signal nor RAPL is available (reported as estimated).
    pub power_model: HardwareProfile,
    /// Prices the battery wear of compute energy drawn while unplugged.
    pub wear_model: WearModel,
}

impl AgentConfig {
    /// `coordinator` is one address or several separated by commas.
    pub fn new(
        coordinator: impl Into<String>,
        node_id: impl Into<String>,
        model_name: impl Into<String>,
    ) -> Self {
        Self {
            coordinators: coordinator
                .into()
                .split(',')
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect(),
            ca_cert: None,
            identity: None,
            attestor: None,
            node_id: node_id.into(),
            model_name: model_name.into(),
            compute_class: "cpu-2core".into(),
            decode_tps_single: 150.0,
            decode_tps_batched: 250.0,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            denied_backoff_initial: Duration::from_secs(60),
            denied_backoff_max: Duration::from_secs(1800),
            // An Orin-class compute unit: ~8 W powered and idle, ~60 W inferring flat out.
            power_model: HardwareProfile {
                idle_w: 8.0,
                full_w: 60.0,
            },
            // A 75 kWh pack at the policy's default $140/kWh replacement cost.
            wear_model: WearModel::new(75.0, 140.0),
        }
    }

    /// The address for the `attempt`-th connection (round robin; "" when none is configured,
    /// which the connection refuses as an invalid address).
    pub fn coordinator(&self, attempt: usize) -> &str {
        match self.coordinators.len() {
            0 => "",
            n => &self.coordinators[attempt % n],
        }
    }
}

/// Capped exponential backoff with full jitter (async-nats style reconnects).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let cap = exp.min(self.max);
        // Full jitter keeps a fleet that lost its coordinator from reconnecting in lockstep.
        cap.mul_f64(0.5 + 0.5 * rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[9] >= Duration::from_secs(1), "{delays:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn several_coordinators_are_tried_in_turn() {
        let c = AgentConfig::new(" http://10.0.0.1:50051, http://10.0.0.2:50051,", "v", "m");
        assert_eq!(
            c.coordinators,
            ["http://10.0.0.1:50051", "http://10.0.0.2:50051"]
        );
        let tried: Vec<&str> = (0..3).map(|i| c.coordinator(i)).collect();
        assert_eq!(
            tried,
            [
                "http://10.0.0.1:50051",
                "http://10.0.0.2:50051",
                "http://10.0.0.1:50051"
            ]
        );
        assert_eq!(AgentConfig::new("", "v", "m").coordinator(0), "");
    }
}
