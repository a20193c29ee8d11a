//! Drives the governor from a simulated vehicle on an accelerated clock and publishes the
//! result as [`VehicleStatus`]: `tokenfleet up` uses it so vehicles park, charge, and leave
//! (taking their work with them) while they serve.

use std::time::{Duration, Instant};

use tokenfleet_engine::{Engine, Limits};
use tokenfleet_protocol::v1::{self, GovernorState as WireState};
use tokenfleet_vehicle::{
    ComputeBudget, Governor, GovernorDecision, GovernorState, Millis, Policy, Schedule,
    SimulatedVehicle, StepContext, VehicleParams, VehicleState,
};

use crate::status::{StatusSender, VehicleStatus};

/// A permissive demo policy: compute parked, plugged in or not, above a 30% reserve.
pub const DEMO_POLICY: &str = r#"
pack_capacity_kwh = 75.0
utc_offset = "+00:00"
require_plugged_in = false
[soc]
start = "35%"
stop = "30%"
[battery]
max_temperature_c = 45.0
[compute]
max_temperature_c = 75.0
temperature_hysteresis_c = 5.0
idle_power_w = 8.0
full_power_w = 60.0
max_threads = 2
max_batch = 8
[low_voltage]
allowed_states = ["OFF", "LOCK", "ACC"]
min_voltage_v = 11.5
"#;

#[derive(Debug, Clone)]
pub struct SimulatedVehicleConfig {
    pub policy: Policy,
    pub schedule: Schedule,
    /// Virtual seconds per real second.
    pub speedup: f64,
    /// Virtual time at start, ms (the hour of day the demo begins at).
    pub start_ms: u64,
    pub seed: u64,
}

impl SimulatedVehicleConfig {
    /// A commuter whose virtual day starts `phase_h` hours after midnight.
    pub fn commuter(speedup: f64, phase_h: f64, seed: u64) -> Result<Self, String> {
        let policy = Policy::from_toml_str(DEMO_POLICY, "DEMO").map_err(|e| e.to_string())?;
        Ok(Self {
            policy,
            schedule: Schedule::commuter_day(Millis(0), true),
            speedup,
            // Day 2 of a repeating schedule, at the requested hour.
            start_ms: 2 * 86_400_000 + (phase_h.rem_euclid(24.0) * 3_600_000.0) as u64,
            seed,
        })
    }
}

fn wire_state(s: GovernorState) -> WireState {
    match s {
        GovernorState::Unavailable => WireState::Unavailable,
        GovernorState::Eligible => WireState::Eligible,
        GovernorState::Computing => WireState::Computing,
        GovernorState::Throttled => WireState::Throttled,
        GovernorState::Draining => WireState::Draining,
    }
}

/// The status the agent core acts on, from the governor's decision and the vehicle's signals.
pub fn status_from(
    decision: &GovernorDecision,
    state: &VehicleState,
    now: Millis,
) -> VehicleStatus {
    let loc = state.location(now).fresh();
    let eligible = matches!(
        decision.state,
        GovernorState::Eligible | GovernorState::Computing | GovernorState::Throttled
    );
    VehicleStatus {
        state: v1::State {
            governor: wire_state(decision.state) as i32,
            eligible,
            reason: decision.reason.to_string(),
            parked: state.selected_gear(now).fresh() == Some(126),
            plugged_in: state.cable_connected(now).fresh() == Some(true),
            soc_pct: state.soc_percent(now).fresh().map(|v| v as f32),
            soc_reserve_pct: 30.0,
            battery_temp_c: state.battery_temperature_c(now).fresh().map(|v| v as f32),
            compute_temp_c: state.compute_temperature_c(now).fresh().map(|v| v as f32),
            latitude: loc.map(|l| l.0),
            longitude: loc.map(|l| l.1),
            link_rtt_ms: 40.0,
            slots_free: 0,
            compute_power_w: state.compute_power_w(now).fresh().unwrap_or(0.0) as f32,
            expected_parked_s: 0,
            tariff_per_kwh: 0.25,
        },
        must_evict: decision.must_evict,
        limits: Some(engine_limits(&decision.budget)),
        // The simulated vehicle's compute-power signal comes from the hardware power model.
        compute_power_measured: false,
    }
}

/// The engine throttle for a governor budget. The engine's thread count is fixed when the
/// model is loaded, so the budget's thread share is applied as duty cycle too: the engine
/// decodes for `utilization` of wall time (not `duty_cycle`, which assumes the thread count
/// also dropped) with at most `max_batch` sequences.
pub fn engine_limits(budget: &ComputeBudget) -> Limits {
    Limits {
        max_active: u32::from(budget.max_batch.max(1)),
        duty_cycle: budget.utilization.clamp(0.05, 1.0) as f32,
    }
}

/// Runs the simulated vehicle and its governor until the status receivers are gone.
pub async fn run_simulated(config: SimulatedVehicleConfig, engine: Engine, status: StatusSender) {
    let mut vehicle = SimulatedVehicle::new(
        config.schedule.clone(),
        VehicleParams::default(),
        config.seed,
    );
    let start = Instant::now();
    let mut governor = Governor::new(config.policy.clone(), Millis(config.start_ms));
    let hw = config.policy.compute.hardware;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut utilization = 0.0;
    let mut last_sent = Instant::now();
    loop {
        tick.tick().await;
        if status.is_closed() {
            return;
        }
        let now = Millis(
            config.start_ms + (start.elapsed().as_secs_f64() * config.speedup * 1000.0) as u64,
        );
        let busy = engine.stats().slots_busy > 0;
        let power = if busy {
            hw.power_w(utilization)
        } else {
            hw.power_w(0.0)
        };
        let state = vehicle.advance(now, power);
        let decision = governor.step(state, now, StepContext::with_work(busy));
        utilization = decision.budget.utilization;
        let next = status_from(&decision, state, now);
        let periodic = last_sent.elapsed() > Duration::from_secs(2);
        status.send_if_modified(|cur| {
            let changed = cur.state.governor != next.state.governor
                || cur.must_evict != next.must_evict
                || cur.state.eligible != next.state.eligible
                || cur.limits != next.limits;
            if changed || periodic {
                *cur = next.clone();
                true
            } else {
                false
            }
        });
        if periodic {
            last_sent = Instant::now();
        }
    }
}
