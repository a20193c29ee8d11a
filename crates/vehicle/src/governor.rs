//! The governor: may this vehicle compute now, and how hard?
//!
//! ```text
//!   Unavailable ──(start conditions held for eligible_dwell, restart_dwell since last stop)──▶ Eligible
//!   Eligible ──(work present)──▶ Computing ──(controller below 95 %)──▶ Throttled
//!   Throttled ──(controller ≥ 99 % for throttle_exit_dwell)──▶ Computing
//!   Computing/Throttled ──(no work)──▶ Eligible
//!   Eligible/Computing/Throttled ──(departure or stop condition)──▶ Draining
//!   Draining ──(work handed back, or drain_timeout)──▶ Unavailable
//! ```
//!
//! Every threshold has hysteresis: start needs SoC ≥ start, battery and compute-unit
//! temperature ≤ limit − hysteresis, 12 V ≥ floor + hysteresis; stop happens at SoC ≤ stop,
//! temperature ≥ limit, 12 V < floor. With a band wider than the signal noise, a noisy SoC
//! around a threshold gives at most one start and one stop per real crossing.
//!
//! Departure signals (gear leaves Park, 12 V state ON/START, speed > 0 or IsMoving, cable
//! unplugged when the policy requires it) go straight to `Draining` without any dwell, and
//! [`GovernorDecision::must_evict`] tells the agent to hand in-flight jobs back now.
//!
//! [`Governor::step`] is pure: it takes the state and `now`, reads no clock and allocates
//! nothing, so the simulator can step it for millions of vehicles.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::policy::{Policy, WearBudget};
use crate::signals::{LowVoltageSystemState, Reading, Signal, VehicleState, GEAR_PARK};
use crate::throttle::{ComputeBudget, ControllerParams, Limiter, ThrottleController};
use crate::time::Millis;

/// Governor states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum GovernorState {
    /// Must not compute (conditions not met, or still dwelling).
    Unavailable,
    /// May compute; no work yet.
    Eligible,
    /// Computing at full budget.
    Computing,
    /// Computing with a budget lowered by the controller.
    Throttled,
    /// Stopping: hand every in-flight job back now.
    Draining,
}

impl GovernorState {
    /// All states, for reports.
    pub const ALL: [GovernorState; 5] = [
        GovernorState::Unavailable,
        GovernorState::Eligible,
        GovernorState::Computing,
        GovernorState::Throttled,
        GovernorState::Draining,
    ];

    /// Lower-case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            GovernorState::Unavailable => "unavailable",
            GovernorState::Eligible => "eligible",
            GovernorState::Computing => "computing",
            GovernorState::Throttled => "throttled",
            GovernorState::Draining => "draining",
        }
    }

    /// Computing or Throttled.
    pub const fn is_computing(self) -> bool {
        matches!(self, GovernorState::Computing | GovernorState::Throttled)
    }
}

impl fmt::Display for GovernorState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A signal that the driver is about to use the car.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Departure {
    /// `SelectedGear` is no longer Park (126).
    GearLeftPark { gear: i32 },
    /// `LowVoltageSystemState` is ON or START.
    DriverStarting { state: LowVoltageSystemState },
    /// `Vehicle.Speed` > 0.
    Moving { speed_kmh: f64 },
    /// `Vehicle.IsMoving` is true.
    IsMoving,
    /// Cable unplugged while the policy requires it.
    Unplugged,
}

/// Why the governor is in its current state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Reason {
    /// A required signal has never been received.
    SignalMissing(Signal),
    /// A required signal is older than its maximum age.
    SignalStale(Signal),
    /// Not in Park.
    NotParked,
    /// The driver is about to use the car.
    Departure(Departure),
    /// 12 V system state not allowed by policy.
    LowVoltageState(LowVoltageSystemState),
    /// 12 V battery below the floor (stop) or below floor + hysteresis (start).
    LowVoltage { volts: f64 },
    /// Policy requires the cable and it is not connected.
    NotPluggedIn,
    /// SoC at or below the stop threshold (the departure reserve).
    SocAtReserve { soc_pct: f64 },
    /// SoC below the start threshold.
    SocBelowStart { soc_pct: f64 },
    /// Battery too hot.
    BatteryTemperature { celsius: f64 },
    /// Compute unit at its hard limit (stop) or not cooled below the restart threshold.
    ComputeTemperature { celsius: f64 },
    /// Local quiet hours.
    QuietHours,
    /// Today's energy budget is used up.
    EnergyBudget,
    /// Today's battery-wear budget is used up.
    WearBudget,
    /// Start conditions hold; waiting for the dwell time.
    Dwell { remaining_ms: u64 },
    /// Waiting after a stop before starting again.
    RestartDwell { remaining_ms: u64 },
    /// Allowed, waiting for work.
    Ready,
    /// Computing at full budget.
    FullBudget,
    /// Computing, the controller is holding a limit.
    Limited(Limiter),
    /// Draining ended because the drain timeout passed.
    DrainTimeout,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::SignalMissing(s) => write!(f, "signal missing: {s}"),
            Reason::SignalStale(s) => write!(f, "signal stale: {s}"),
            Reason::NotParked => f.write_str("not parked"),
            Reason::Departure(d) => match d {
                Departure::GearLeftPark { gear } => write!(f, "departure: gear {gear} left Park"),
                Departure::DriverStarting { state } => write!(f, "departure: 12 V system {state}"),
                Departure::Moving { speed_kmh } => {
                    write!(f, "departure: speed {speed_kmh:.1} km/h")
                }
                Departure::IsMoving => f.write_str("departure: vehicle moving"),
                Departure::Unplugged => f.write_str("departure: charging cable unplugged"),
            },
            Reason::LowVoltageState(s) => write!(f, "12 V system state {s} not allowed"),
            Reason::LowVoltage { volts } => write!(f, "12 V battery at {volts:.2} V"),
            Reason::NotPluggedIn => f.write_str("not plugged in"),
            Reason::SocAtReserve { soc_pct } => write!(f, "SoC {soc_pct:.1}% at the reserve"),
            Reason::SocBelowStart { soc_pct } => write!(f, "SoC {soc_pct:.1}% below start"),
            Reason::BatteryTemperature { celsius } => write!(f, "battery at {celsius:.1} °C"),
            Reason::ComputeTemperature { celsius } => write!(f, "compute unit at {celsius:.1} °C"),
            Reason::QuietHours => f.write_str("quiet hours"),
            Reason::EnergyBudget => f.write_str("daily energy budget used"),
            Reason::WearBudget => f.write_str("daily battery-wear budget used"),
            Reason::Dwell { remaining_ms } => {
                write!(f, "conditions met, {}s to go", remaining_ms / 1000)
            }
            Reason::RestartDwell { remaining_ms } => {
                write!(f, "restart allowed in {}s", remaining_ms / 1000)
            }
            Reason::Ready => f.write_str("ready for work"),
            Reason::FullBudget => f.write_str("computing at full budget"),
            Reason::Limited(Limiter::Temperature) => f.write_str("throttled by temperature"),
            Reason::Limited(Limiter::Power) => f.write_str("throttled by power"),
            Reason::DrainTimeout => f.write_str("drain timed out"),
        }
    }
}

/// Usage so far in the current local day (from [`crate::energy::EnergyMeter`]).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct UsageToday {
    /// Compute energy, grid + battery, kWh.
    pub energy_kwh: f64,
    /// Battery wear attributable to compute, $.
    pub wear_usd: f64,
    /// Battery wear attributable to compute, percent of capacity.
    pub wear_capacity_pct: f64,
}

/// Inputs besides the vehicle state.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepContext {
    /// The agent has jobs (queued or in flight).
    pub work_present: bool,
    /// Today's usage, for the daily budgets.
    pub usage_today: UsageToday,
}

impl StepContext {
    /// Only the work flag; no usage recorded.
    pub fn with_work(work_present: bool) -> Self {
        StepContext {
            work_present,
            usage_today: UsageToday::default(),
        }
    }
}

/// What the governor decided for this step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GovernorDecision {
    pub state: GovernorState,
    /// Zero unless Eligible, Computing or Throttled.
    pub budget: ComputeBudget,
    pub reason: Reason,
    /// Hand every in-flight job back now (within one decode step).
    pub must_evict: bool,
}

/// Utilization below which Computing becomes Throttled.
const THROTTLE_ENTER: f64 = 0.95;
/// Utilization at or above which Throttled may return to Computing (after the dwell).
const THROTTLE_EXIT: f64 = 0.99;

/// The per-vehicle governor.
///
/// The policy is shared ([`Governor::shared`]): a fleet simulator holds one governor per
/// vehicle, and vehicles of one kind share one policy, so a governor is a few dozen bytes of
/// state plus a pointer.
#[derive(Debug, Clone)]
pub struct Governor {
    policy: Arc<Policy>,
    state: GovernorState,
    entered_at: Millis,
    last_step: Millis,
    /// Since when the start conditions have held continuously.
    start_ok_since: Option<Millis>,
    /// Last entry into Draining.
    last_stop: Option<Millis>,
    /// Since when the controller has been unsaturated (for Throttled → Computing).
    unthrottled_since: Option<Millis>,
    drain_reason: Reason,
    controller: ThrottleController,
    utilization: f64,
    limiter: Option<Limiter>,
}

impl Governor {
    /// A governor that starts `Unavailable` at `now`.
    pub fn new(policy: Policy, now: Millis) -> Governor {
        Governor::with_controller(policy, now, ControllerParams::default())
    }

    /// A governor that starts `Unavailable` at `now` under a policy shared with other governors.
    pub fn shared(policy: Arc<Policy>, now: Millis) -> Governor {
        Governor::shared_with_controller(policy, now, ControllerParams::default())
    }

    /// Same, with explicit controller gains.
    pub fn with_controller(policy: Policy, now: Millis, params: ControllerParams) -> Governor {
        Governor::shared_with_controller(Arc::new(policy), now, params)
    }

    /// A shared policy and explicit controller gains.
    pub fn shared_with_controller(
        policy: Arc<Policy>,
        now: Millis,
        params: ControllerParams,
    ) -> Governor {
        Governor {
            policy,
            state: GovernorState::Unavailable,
            entered_at: now,
            last_step: now,
            start_ok_since: None,
            last_stop: None,
            unthrottled_since: None,
            drain_reason: Reason::Ready,
            controller: ThrottleController::new(params),
            utilization: 1.0,
            limiter: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> GovernorState {
        self.state
    }

    /// When the current state was entered.
    pub fn state_since(&self) -> Millis {
        self.entered_at
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// True while in-flight work must be handed back.
    pub fn must_evict(&self) -> bool {
        self.state == GovernorState::Draining
    }

    fn enter(&mut self, s: GovernorState, now: Millis) {
        if s != self.state {
            tracing::debug!(from = %self.state, to = %s, "governor transition");
            self.state = s;
            self.entered_at = now;
        }
    }

    /// Advance the governor to `now`.
    pub fn step(&mut self, vs: &VehicleState, now: Millis, ctx: StepContext) -> GovernorDecision {
        let dt_s = now.ms_since(self.last_step) as f64 / 1000.0;
        self.last_step = now;

        match self.state {
            GovernorState::Draining => {
                let timed_out = now.since(self.entered_at) >= self.policy.timing.drain_timeout;
                if !ctx.work_present || timed_out {
                    self.enter(GovernorState::Unavailable, now);
                    self.start_ok_since = None;
                    self.controller.reset();
                    let reason = if ctx.work_present {
                        Reason::DrainTimeout
                    } else {
                        self.drain_reason
                    };
                    return self.decision(reason, ctx);
                }
                return self.decision(self.drain_reason, ctx);
            }
            GovernorState::Unavailable => {
                if let Some(r) = self.start_blocker(vs, now, ctx) {
                    self.start_ok_since = None;
                    return self.decision(r, ctx);
                }
                let since = *self.start_ok_since.get_or_insert(now);
                let held = now.since(since);
                let dwell = self.policy.timing.eligible_dwell;
                if held < dwell {
                    let remaining_ms = (dwell - held).as_millis() as u64;
                    return self.decision(Reason::Dwell { remaining_ms }, ctx);
                }
                if let Some(stop) = self.last_stop {
                    let off = now.since(stop);
                    let restart = self.policy.timing.restart_dwell;
                    if off < restart {
                        let remaining_ms = (restart - off).as_millis() as u64;
                        return self.decision(Reason::RestartDwell { remaining_ms }, ctx);
                    }
                }
                self.controller.reset();
                self.enter(GovernorState::Eligible, now);
                // fall through: may start computing in the same step
            }
            GovernorState::Eligible | GovernorState::Computing | GovernorState::Throttled => {
                let stop = self
                    .departure(vs, now)
                    .map(Reason::Departure)
                    .or_else(|| self.stop_condition(vs, now, ctx));
                if let Some(r) = stop {
                    tracing::info!(reason = %r, from = %self.state, "governor draining");
                    self.drain_reason = r;
                    self.last_stop = Some(now);
                    self.unthrottled_since = None;
                    self.enter(GovernorState::Draining, now);
                    return self.decision(r, ctx);
                }
            }
        }

        // Allowed to compute: run the controller.
        let temp = vs.compute_temperature_c(now).fresh().unwrap_or(f64::NAN);
        let power = vs.compute_power_w(now).fresh();
        let (u, limiter) = self
            .controller
            .update(&self.policy.compute, temp, power, dt_s);
        self.utilization = u;
        self.limiter = limiter;

        if u >= THROTTLE_EXIT {
            self.unthrottled_since.get_or_insert(now);
        } else {
            self.unthrottled_since = None;
        }

        if !ctx.work_present {
            self.enter(GovernorState::Eligible, now);
            return self.decision(Reason::Ready, ctx);
        }
        let next = match self.state {
            GovernorState::Throttled => {
                let calm = self
                    .unthrottled_since
                    .is_some_and(|t| now.since(t) >= self.policy.timing.throttle_exit_dwell);
                if calm {
                    GovernorState::Computing
                } else {
                    GovernorState::Throttled
                }
            }
            _ => {
                if u < THROTTLE_ENTER {
                    GovernorState::Throttled
                } else {
                    GovernorState::Computing
                }
            }
        };
        self.enter(next, now);
        let reason = match (next, limiter) {
            (GovernorState::Throttled, Some(l)) => Reason::Limited(l),
            (GovernorState::Throttled, None) => Reason::Limited(Limiter::Temperature),
            _ => Reason::FullBudget,
        };
        self.decision(reason, ctx)
    }

    fn decision(&self, reason: Reason, ctx: StepContext) -> GovernorDecision {
        let budget = match self.state {
            GovernorState::Eligible | GovernorState::Computing | GovernorState::Throttled => {
                ComputeBudget::from_utilization(self.utilization, &self.policy.compute)
            }
            _ => ComputeBudget::ZERO,
        };
        let must_evict = self.state == GovernorState::Draining
            || (self.state == GovernorState::Unavailable && ctx.work_present);
        GovernorDecision {
            state: self.state,
            budget,
            reason,
            must_evict,
        }
    }

    /// A departure signal, if any (fresh signals only).
    fn departure(&self, vs: &VehicleState, now: Millis) -> Option<Departure> {
        if let Some(gear) = vs.selected_gear(now).fresh() {
            if gear != GEAR_PARK {
                return Some(Departure::GearLeftPark { gear });
            }
        }
        if let Some(state) = vs.low_voltage_state(now).fresh() {
            if state.is_driving_ready() {
                return Some(Departure::DriverStarting { state });
            }
        }
        if let Some(speed_kmh) = vs.speed_kmh(now).fresh() {
            if speed_kmh > 0.0 {
                return Some(Departure::Moving { speed_kmh });
            }
        }
        if vs.is_moving(now).fresh() == Some(true) {
            return Some(Departure::IsMoving);
        }
        if self.policy.require_plugged_in && vs.cable_connected(now).fresh() == Some(false) {
            return Some(Departure::Unplugged);
        }
        None
    }

    /// Conditions shared by start and stop that have no threshold.
    fn common_blocker(&self, vs: &VehicleState, now: Millis, ctx: StepContext) -> Option<Reason> {
        // Parked: gear in Park, or (gear unknown) park lock engaged.
        match vs.selected_gear(now) {
            Reading::Fresh(g) if g == GEAR_PARK => {}
            Reading::Fresh(_) => return Some(Reason::NotParked),
            other => {
                if vs.park_lock_engaged(now).fresh() != Some(true) {
                    return Some(missing(Signal::SelectedGear, other));
                }
            }
        }
        if vs.speed_kmh(now).fresh().is_some_and(|v| v > 0.0)
            || vs.is_moving(now).fresh() == Some(true)
        {
            return Some(Reason::NotParked);
        }
        match vs.low_voltage_state(now) {
            Reading::Fresh(s) if self.policy.low_voltage.allows(s) => {}
            Reading::Fresh(s) => return Some(Reason::LowVoltageState(s)),
            other => return Some(missing(Signal::LowVoltageSystemState, other)),
        }
        if self.policy.require_plugged_in {
            match vs.cable_connected(now) {
                Reading::Fresh(true) => {}
                Reading::Fresh(false) => return Some(Reason::NotPluggedIn),
                other => return Some(missing(Signal::ChargingCableConnected, other)),
            }
        }
        if self.policy.in_quiet_hours(now) {
            return Some(Reason::QuietHours);
        }
        let b = &self.policy.budgets;
        if b.daily_energy_kwh
            .is_some_and(|max| ctx.usage_today.energy_kwh >= max)
        {
            return Some(Reason::EnergyBudget);
        }
        let wear_used = match b.daily_wear {
            Some(WearBudget::Usd(max)) => ctx.usage_today.wear_usd >= max,
            Some(WearBudget::CapacityPercent(max)) => ctx.usage_today.wear_capacity_pct >= max,
            None => false,
        };
        if wear_used {
            return Some(Reason::WearBudget);
        }
        None
    }

    /// Why the vehicle may not start (start thresholds), or `None`.
    fn start_blocker(&self, vs: &VehicleState, now: Millis, ctx: StepContext) -> Option<Reason> {
        if let Some(r) = self.common_blocker(vs, now, ctx) {
            return Some(r);
        }
        let p = &self.policy;
        let soc = match vs.soc_percent(now) {
            Reading::Fresh(s) => s,
            other => return Some(missing(Signal::StateOfCharge, other)),
        };
        if soc < p.start_soc_pct {
            return Some(Reason::SocBelowStart { soc_pct: soc });
        }
        let bt = match vs.battery_temperature_c(now) {
            Reading::Fresh(t) => t,
            other => return Some(missing(Signal::BatteryTemperature, other)),
        };
        if bt > p.battery_max_temperature_c - p.battery_temperature_hysteresis_c {
            return Some(Reason::BatteryTemperature { celsius: bt });
        }
        let ct = match vs.compute_temperature_c(now) {
            Reading::Fresh(t) => t,
            other => return Some(missing(Signal::ComputeTemperature, other)),
        };
        if ct > p.compute.max_temperature_c - p.compute.temperature_hysteresis_c {
            return Some(Reason::ComputeTemperature { celsius: ct });
        }
        let v = match vs.low_voltage_v(now) {
            Reading::Fresh(v) => v,
            other => return Some(missing(Signal::LowVoltageBatteryVoltage, other)),
        };
        if v < p.low_voltage.min_voltage_v + p.low_voltage.voltage_hysteresis_v {
            return Some(Reason::LowVoltage { volts: v });
        }
        None
    }

    /// Why a running vehicle must stop (stop thresholds), or `None`.
    fn stop_condition(&self, vs: &VehicleState, now: Millis, ctx: StepContext) -> Option<Reason> {
        if let Some(r) = self.common_blocker(vs, now, ctx) {
            return Some(r);
        }
        let p = &self.policy;
        match vs.soc_percent(now) {
            Reading::Fresh(s) if s <= p.stop_soc_pct => {
                return Some(Reason::SocAtReserve { soc_pct: s })
            }
            Reading::Fresh(_) => {}
            other => return Some(missing(Signal::StateOfCharge, other)),
        }
        match vs.battery_temperature_c(now) {
            Reading::Fresh(t) if t >= p.battery_max_temperature_c => {
                return Some(Reason::BatteryTemperature { celsius: t })
            }
            Reading::Fresh(_) => {}
            other => return Some(missing(Signal::BatteryTemperature, other)),
        }
        match vs.compute_temperature_c(now) {
            Reading::Fresh(t) if t >= p.compute.max_temperature_c => {
                return Some(Reason::ComputeTemperature { celsius: t })
            }
            Reading::Fresh(_) => {}
            other => return Some(missing(Signal::ComputeTemperature, other)),
        }
        match vs.low_voltage_v(now) {
            Reading::Fresh(v) if v < p.low_voltage.min_voltage_v => {
                return Some(Reason::LowVoltage { volts: v })
            }
            Reading::Fresh(_) => {}
            other => return Some(missing(Signal::LowVoltageBatteryVoltage, other)),
        }
        None
    }
}

fn missing<T>(signal: Signal, r: Reading<T>) -> Reason {
    match r {
        Reading::Stale { .. } => Reason::SignalStale(signal),
        _ => Reason::SignalMissing(signal),
    }
}
