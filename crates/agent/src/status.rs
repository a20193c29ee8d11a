//! What the vehicle side tells the agent core: may it compute, how hard, must it hand work
//! back now. Whatever drives the vehicle (the governor on simulated, replayed or Kuksa
//! signals, or a fixed "always parked" status in tests) publishes a [`VehicleStatus`].

use tokenfleet_engine::Limits;
use tokenfleet_protocol::v1::{self, GovernorState};
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq)]
pub struct VehicleStatus {
    /// The summary sent to the coordinator (`State`).
    pub state: v1::State,
    /// Hand every in-flight job back now (the car is needed).
    pub must_evict: bool,
    /// Throttle for the engine (None: full speed).
    pub limits: Option<Limits>,
    /// Whether `state.compute_power_w` is a measurement (a real vehicle power signal) rather
    /// than a model's estimate; per-job energy is reported as measured only then.
    pub compute_power_measured: bool,
}

impl VehicleStatus {
    /// Parked, plugged in, allowed to compute: for tests and `tokenfleet up --always-parked`.
    pub fn parked() -> Self {
        Self {
            state: v1::State {
                governor: GovernorState::Eligible as i32,
                eligible: true,
                reason: "parked and plugged in".into(),
                parked: true,
                plugged_in: true,
                soc_pct: Some(80.0),
                soc_reserve_pct: 30.0,
                link_rtt_ms: 1.0,
                ..Default::default()
            },
            must_evict: false,
            limits: None,
            compute_power_measured: false,
        }
    }

    /// The driver is back: stop computing and give work back.
    pub fn departing(reason: &str) -> Self {
        let mut s = Self::parked();
        s.state.governor = GovernorState::Draining as i32;
        s.state.eligible = false;
        s.state.parked = false;
        s.state.reason = reason.into();
        s.must_evict = true;
        s
    }
}

/// The writing side, held by the vehicle driver.
pub type StatusSender = watch::Sender<VehicleStatus>;
