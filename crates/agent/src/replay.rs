//! `tokenfleet agent --replay FILE --report`: a recorded day of vehicle signals through the
//! governor, with the real engine measured at every budget the governor grants, and the day's
//! report (energy grid/battery, wear, time per governor state, tokens). No coordinator.
//!
//! # Virtual time and real time
//!
//! A day cannot be computed in real time, and squeezing it into minutes of real decoding would
//! make the token count an artifact of the squeeze. The replay keeps the two apart:
//!
//! - **Vehicle side, virtual time, as fast as possible.** The recorded signals are applied in
//!   time order; the [`Governor`] is stepped every [`ReplayOptions::step`] of virtual time and
//!   at every departure-relevant update (gear, 12 V state, speed, IsMoving, cable); the
//!   [`EnergyMeter`] integrates compute energy from the hardware power model (reported as
//!   estimated) and prices battery energy with the wear model.
//! - **Engine side, real time, measured.** The first time the governor grants a budget, the
//!   real engine is calibrated at it: a synthetic workload keeps every slot busy, the budget
//!   is applied with [`Engine::set_limits`] (see [`crate::vehicle::engine_limits`]), and
//!   the engine's own token counter is read over [`ReplayOptions::calibration`] of real
//!   time. Utilization is rounded *down* to a multiple of `1/levels`, so a day needs at
//!   most `levels` calibrations and the token figure is never rounded up.
//! - **Tokens = measured tok/s at the budget in force × virtual seconds Computing or
//!   Throttled.** The report says so: [`TOKENS_METHOD`].
//!
//! # What the replay adds to the recording
//!
//! The recording is of a car without tokenfleet, so the replay models what computing changes,
//! as the vehicle crate's `commuter_day` test does: the compute unit's temperature follows the
//! first-order [`ComputeThermal`] model (recorded air temperature + enclosure offset, compute
//! power); the recorded ControlUnit temperature and power are ignored; the SoC is the recorded
//! SoC minus what computing and the awake car drew from the traction battery while not
//! charging. Work is always waiting while the vehicle is eligible; at `Draining` the jobs are
//! handed back within one decode step (the governor is stepped again one measured engine
//! step later, so the drain costs one step of energy, not a whole governor period).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokenfleet_engine::{Engine, EngineError};
use tokenfleet_vehicle::source::replay::ReplaySource;
use tokenfleet_vehicle::source::Pace;
use tokenfleet_vehicle::{
    ComputeBudget, ComputeThermal, DailyReport, EnergyMeter, Governor, GovernorDecision,
    GovernorState, Millis, Policy, Signal, SignalSource, SignalUpdate, SignalValue, SourceError,
    StepContext, VehicleParams, VehicleState,
};

mod bench;
mod report;

pub use bench::Calibration;
pub use report::{ReplayReport, Segment, Situation, Timeline};

use bench::Bench;

/// The default replay policy: the commuter policy of the vehicle crate's `commuter_day` test,
/// which fits `crates/vehicle/fixtures/commuter-day.jsonl` (CEST, 74 % departure reserve).
pub const REPLAY_POLICY: &str = tokenfleet_vehicle::COMMUTER_EXAMPLE_POLICY;

/// How the report's token figure is obtained.
pub const TOKENS_METHOD: &str = "estimated from measured engine speed × computing time";

/// Replay knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayOptions {
    /// Governor period in virtual time (it is also stepped at departure-relevant updates).
    pub step: Duration,
    /// Real time the engine is measured at each budget level.
    pub calibration: Duration,
    /// Real time the workload runs at a new level before measuring (slots fill, prefill).
    pub warmup: Duration,
    /// Utilization is rounded down to a multiple of `1/levels` for calibration.
    pub levels: u32,
    /// Thermal constants, enclosure offset, awake overhead, compute load while driving.
    pub vehicle: VehicleParams,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            step: Duration::from_secs(10),
            calibration: Duration::from_millis(1500),
            warmup: Duration::from_millis(500),
            levels: 20,
            vehicle: VehicleParams::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}: {cause}")]
    Source { path: PathBuf, cause: SourceError },
    #[error("{0}: no valid signal updates")]
    Empty(PathBuf),
    #[error("invalid replay options: {0}")]
    Options(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the engine's context ({ctx} tokens per slot) is too small for the synthetic workload ({needed} needed)")]
    Context { ctx: u32, needed: u32 },
    #[error("the engine produced no tokens while calibrating at max_active {max_active}, duty cycle {duty_cycle:.2}")]
    NoTokens { max_active: u32, duty_cycle: f32 },
}

/// Replays `path` through the governor with `policy`, calibrating `engine` at every budget.
pub async fn replay_report(
    path: &Path,
    policy: Policy,
    engine: &Engine,
    opts: &ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    validate(opts)?;
    let (updates, skipped_lines) = load(path).await?;
    let (Some(first), Some(last)) = (updates.first(), updates.last()) else {
        return Err(ReplayError::Empty(path.to_path_buf()));
    };
    let (start, end) = (first.at, last.at);
    let n_updates = updates.len();
    let mut bench = Bench::new(engine, opts)?;
    let mut r = Replay::new(&policy, opts, updates, start);
    let mut t = start;
    loop {
        let level_before = r.level;
        let d = r.advance(t, &mut bench).await?;
        if d.state == GovernorState::Draining {
            // The jobs are dropped now; the engine frees their slots before its next step.
            let latency = level_before
                .and_then(|l| bench.done.get(&l))
                .map_or(Duration::from_millis(1), Calibration::step_time);
            let handed_back = t + latency.max(Duration::from_millis(1));
            if handed_back < r.next_time(t, end) {
                r.work_present = false;
                r.advance(handed_back, &mut bench).await?;
                t = handed_back;
            }
        }
        if t >= end {
            break;
        }
        t = r.next_time(t, end);
    }
    Ok(r.finish(path, bench, n_updates, skipped_lines, start, end))
}

fn validate(o: &ReplayOptions) -> Result<(), ReplayError> {
    let bad = |m: &str| Err(ReplayError::Options(m.to_string()));
    if o.step < Duration::from_millis(100) || o.step > Duration::from_secs(600) {
        return bad("the governor step must be between 0.1 s and 600 s");
    }
    if o.calibration < Duration::from_millis(50) {
        return bad("calibration must be at least 50 ms per level");
    }
    if !(1..=100).contains(&o.levels) {
        return bad("levels must be between 1 and 100");
    }
    Ok(())
}

/// Every valid update of the file, in time order (bad lines are logged and counted).
async fn load(path: &Path) -> Result<(Vec<SignalUpdate>, u64), ReplayError> {
    let err = |cause| ReplayError::Source {
        path: path.to_path_buf(),
        cause,
    };
    let mut src = ReplaySource::open(path, Pace::AsFastAsPossible)
        .await
        .map_err(err)?;
    let mut updates = Vec::new();
    while let Some(u) = src.next_update().await.map_err(err)? {
        updates.push(u);
    }
    updates.sort_by_key(|u| u.at);
    Ok((updates, src.skipped()))
}

/// Signals after which the governor is stepped at once (departures go to Draining without
/// waiting for the next period).
fn departure_relevant(s: Signal) -> bool {
    matches!(
        s,
        Signal::SelectedGear
            | Signal::LowVoltageSystemState
            | Signal::Speed
            | Signal::IsMoving
            | Signal::ChargingCableConnected
    )
}

/// The calibration level of a utilization: rounded down to a multiple of `1/levels`, ≥ 1.
fn level_of(utilization: f64, levels: u32) -> u32 {
    let x = (utilization.clamp(0.0, 1.0) * f64::from(levels) + 1e-9).floor();
    (x as u32).clamp(1, levels)
}

/// The vehicle side of a replay: recorded signals, models, governor, meter, bookkeeping.
struct Replay<'a> {
    policy: &'a Policy,
    opts: &'a ReplayOptions,
    updates: Vec<SignalUpdate>,
    next: usize,
    vs: VehicleState,
    raw_soc: Option<(Millis, f64)>,
    /// Traction-battery energy drawn by computing and the awake car, not in the recording.
    drained_kwh: f64,
    thermal: ComputeThermal,
    governor: Governor,
    meter: EnergyMeter,
    days: Vec<DailyReport>,
    steps: u64,
    /// What holds for the interval after `last_t`.
    last_t: Millis,
    last: Option<(GovernorDecision, Situation)>,
    power_w: f64,
    /// The calibration level in force while computing.
    level: Option<u32>,
    work_present: bool,
    tokens_carry: f64,
    segments: Vec<Segment>,
    min_soc_computing: Option<f64>,
    max_temp: f64,
}

impl<'a> Replay<'a> {
    fn new(
        policy: &'a Policy,
        opts: &'a ReplayOptions,
        updates: Vec<SignalUpdate>,
        start: Millis,
    ) -> Self {
        let p = &opts.vehicle;
        Replay {
            policy,
            opts,
            updates,
            next: 0,
            vs: VehicleState::new(),
            raw_soc: None,
            drained_kwh: 0.0,
            thermal: ComputeThermal {
                r_th_k_per_w: p.compute_r_th_k_per_w,
                tau_s: p.compute_tau_s,
                temp_c: f64::NAN,
            },
            governor: Governor::new(policy.clone(), start),
            meter: EnergyMeter::new(policy, start),
            days: Vec::new(),
            steps: 0,
            last_t: start,
            last: None,
            power_w: 0.0,
            level: None,
            work_present: false,
            tokens_carry: 0.0,
            segments: Vec::new(),
            min_soc_computing: None,
            max_temp: f64::MIN,
        }
    }

    /// The next governor step after `t`: one period later, or the next departure-relevant update.
    fn next_time(&self, t: Millis, end: Millis) -> Millis {
        let period = (t + self.opts.step).min(end);
        self.updates[self.next..]
            .iter()
            .take_while(|u| u.at < period)
            .find(|u| u.at > t && departure_relevant(u.path))
            .map_or(period, |u| u.at)
    }

    /// Accounts the interval since the previous step and steps the governor at `t`.
    async fn advance(
        &mut self,
        t: Millis,
        bench: &mut Bench<'_>,
    ) -> Result<GovernorDecision, ReplayError> {
        let dt_s = t.ms_since(self.last_t) as f64 / 1000.0;
        let computing = self.last.is_some_and(|(d, _)| d.state.is_computing());
        let active = computing
            || self
                .last
                .is_some_and(|(d, _)| d.state == GovernorState::Draining);
        let on_grid = self.last.is_some_and(|(_, s)| s == Situation::Charging);
        if active && !on_grid {
            let awake_w = self.power_w + self.opts.vehicle.awake_overhead_w;
            self.drained_kwh += awake_w * dt_s / 3.6e6;
        }
        // 1. recorded signals; the compute unit and the SoC are modelled below
        while let Some(&u) = self.updates.get(self.next).filter(|u| u.at <= t) {
            self.next += 1;
            match u.path {
                Signal::StateOfCharge => self.raw_soc = u.value.as_f64().map(|v| (u.at, v)),
                Signal::ComputeTemperature | Signal::ComputePower => {}
                _ => {
                    if let Err(e) = self.vs.apply(u) {
                        tracing::warn!(path = %u.path, error = %e, "replayed update rejected");
                    }
                }
            }
        }
        if let Some((at, soc)) = self.raw_soc {
            let soc = soc - self.drained_kwh / self.policy.pack_capacity_kwh * 100.0;
            self.vs
                .set(Signal::StateOfCharge, at, SignalValue::Float(soc));
        }
        // 2. compute-unit temperature over the interval
        let ambient = self.vs.air_temperature_c(t).fresh().unwrap_or(18.0)
            + self.opts.vehicle.enclosure_offset_c;
        if self.thermal.temp_c.is_nan() {
            self.thermal.temp_c = ambient;
        }
        self.thermal.step(ambient, self.power_w, dt_s);
        self.max_temp = self.max_temp.max(self.thermal.temp_c);
        let temp = SignalValue::Float(self.thermal.temp_c);
        self.vs.set(Signal::ComputeTemperature, t, temp);
        // 3. tokens of the interval at the measured speed of the level in force
        let mut tokens = 0.0;
        if let (true, Some(level)) = (computing, self.level) {
            if let Some(c) = bench.done.get_mut(&level) {
                tokens = c.tokens_per_s * dt_s;
                c.virtual_s += dt_s;
            }
        }
        self.tokens_carry += tokens;
        let whole = self.tokens_carry.floor();
        self.tokens_carry -= whole;
        self.meter.add_tokens(whole as u64);
        // 4. governor and meter
        let before = energy(self.meter.today());
        let ctx = StepContext {
            work_present: self.work_present,
            usage_today: self.meter.usage_today(),
        };
        let d = self.governor.step(&self.vs, t, ctx);
        self.meter.step(&self.vs, t, &d, None);
        self.steps += 1;
        let finished = self.meter.take_finished_days();
        let mut after = energy(self.meter.today());
        for day in &finished {
            let (g, b) = energy(day);
            after = (after.0 + g, after.1 + b);
        }
        self.days.extend(finished);
        let delta = (after.0 - before.0, after.1 - before.1);
        // 5. the interval belongs to the decision and situation it started with
        if let Some((prev, situation)) = self.last {
            self.record(prev, situation, t, delta, tokens);
        }
        // 6. the next interval
        let situation = Situation::of(&self.vs, t);
        let hw = self.policy.compute.hardware;
        self.power_w = match d.state {
            s if s.is_computing() => hw.power_w(d.budget.utilization),
            GovernorState::Draining => hw.power_w(0.0),
            _ if situation == Situation::Driving => self.opts.vehicle.driving_compute_w,
            _ => 0.0,
        };
        if d.state.is_computing() {
            let level = level_of(d.budget.utilization, self.opts.levels);
            let u = f64::from(level) / f64::from(self.opts.levels);
            let budget = ComputeBudget::from_utilization(u, &self.policy.compute);
            bench.ensure(level, &budget).await?;
            self.level = Some(level);
            if let Some(soc) = self.vs.soc_percent(t).fresh() {
                let m = self.min_soc_computing.get_or_insert(soc);
                *m = m.min(soc);
            }
        }
        // An eligible vehicle gets work (the backlog is endless); jobs leave at Draining.
        self.work_present = matches!(
            d.state,
            GovernorState::Eligible | GovernorState::Computing | GovernorState::Throttled
        ) || (d.state == GovernorState::Draining && self.work_present);
        self.last = Some((d, situation));
        self.last_t = t;
        Ok(d)
    }

    fn record(
        &mut self,
        d: GovernorDecision,
        situation: Situation,
        t: Millis,
        (grid, battery): (f64, f64),
        tokens: f64,
    ) {
        let extend = self
            .segments
            .last()
            .is_some_and(|s| s.state == d.state && s.situation == situation);
        if !extend {
            self.segments.push(Segment {
                start: self.last_t,
                end: self.last_t,
                state: d.state,
                situation,
                reason: d.reason.to_string(),
                grid_kwh: 0.0,
                battery_kwh: 0.0,
                tokens: 0.0,
            });
        }
        if let Some(s) = self.segments.last_mut() {
            s.end = t;
            s.grid_kwh += grid;
            s.battery_kwh += battery;
            s.tokens += tokens;
        }
    }

    fn finish(
        self,
        path: &Path,
        bench: Bench<'_>,
        updates: usize,
        skipped_lines: u64,
        start: Millis,
        end: Millis,
    ) -> ReplayReport {
        let mut days = self.days;
        days.extend(self.meter.finish());
        days.retain(|d| d.time_in_state.iter().any(|t| !t.is_zero()));
        let hw = self.policy.compute.hardware;
        let driving_compute_kwh = self
            .segments
            .iter()
            .filter(|s| s.situation == Situation::Driving)
            .map(|s| s.grid_kwh + s.battery_kwh)
            .sum();
        ReplayReport {
            file: path.to_path_buf(),
            start,
            end,
            utc_offset_min: self.policy.utc_offset_min,
            updates,
            skipped_lines,
            governor_steps: self.steps,
            tokens: days.iter().map(|d| d.tokens).sum(),
            days,
            tokens_method: TOKENS_METHOD,
            energy_method: format!(
                "compute-unit power from the hardware model ({:.0} W idle, {:.0} W full): estimated",
                hw.idle_w, hw.full_w
            ),
            calibration: bench.done.into_values().collect(),
            segments: self.segments,
            driving_compute_kwh,
            min_soc_computing_pct: self.min_soc_computing,
            reserve_pct: self.policy.stop_soc_pct,
            max_compute_temp_c: self.max_temp,
            compute_limit_c: self.policy.compute.max_temperature_c,
        }
    }
}

fn energy(d: &DailyReport) -> (f64, f64) {
    (d.grid.kwh, d.battery.kwh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_round_down_and_never_reach_zero() {
        assert_eq!(level_of(1.0, 20), 20);
        assert_eq!(level_of(0.999, 20), 19);
        assert_eq!(level_of(0.5, 20), 10);
        assert_eq!(level_of(0.01, 20), 1);
        assert_eq!(level_of(0.0, 20), 1);
    }

    #[test]
    fn default_policy_parses_and_options_are_checked() {
        let p = Policy::from_toml_str(REPLAY_POLICY, "REPLAY").unwrap();
        assert!((p.stop_soc_pct - 74.0).abs() < 1e-9);
        assert_eq!(p.utc_offset_min, 120);
        assert!(validate(&ReplayOptions::default()).is_ok());
        let o = ReplayOptions {
            levels: 0,
            ..Default::default()
        };
        assert!(matches!(validate(&o), Err(ReplayError::Options(_))));
    }
}
