//! Vehicle state and the compute governor for tokenfleet.
//!
//! This crate owns everything the agent needs to know about the car it runs in: COVESA VSS
//! signals (from an Eclipse Kuksa databroker, a JSON-lines replay, or a simulation), the
//! operator's policy, the governor that decides when and how hard the vehicle may compute,
//! and the energy and battery-wear accounting. It depends on no other tokenfleet crate; the
//! agent and the fleet simulator both use it.
//!
//! # Layout
//!
//! - [`time`] — [`Millis`], the one time type (milliseconds since the Unix epoch, UTC).
//!   Models and the governor take `now: Millis` as an argument and never read a clock.
//! - [`signals`] — VSS paths, typed [`SignalValue`]s, [`VehicleState`] with per-signal
//!   staleness ([`Reading`]: `Missing` / `Stale` / `Fresh`).
//! - [`source`] — the [`SignalSource`] trait and its implementations: [`source::replay`]
//!   (JSON lines at real or accelerated speed), [`source::simulated`] (a
//!   [`SimulatedVehicle`] as a source) and, with the `kuksa` feature, [`source::kuksa`]
//!   (kuksa.val.v2 `Subscribe` with reconnect).
//! - [`sim`] — [`SimulatedVehicle`]: schedule, SoC dynamics including the compute load,
//!   first-order compute-unit thermal model.
//! - [`policy`] — operator [`Policy`] in TOML, fleet defaults with per-vehicle overrides,
//!   validated at the edge.
//! - [`governor`] — [`Governor`] (`Unavailable → Eligible → Computing ⇄ Throttled → Draining`)
//!   with hysteresis and dwell times; [`throttle`] is its controller ([`ComputeBudget`]).
//! - [`energy`] — [`EnergyMeter`] (per job and per day, grid vs battery, measured vs
//!   estimated, RAPL); [`wear`] — [`WearModel`] after NREL BLAST-Lite; [`report`] —
//!   [`DailyReport`].
//!
//! # Use
//!
//! ```
//! use std::time::Duration;
//! use tokenfleet_vehicle::*;
//!
//! let policy = Policy::from_toml_str("pack_capacity_kwh = 75.0\nrequire_plugged_in = false\n", "VIN1").unwrap();
//! let t0 = Millis::from_secs(1_748_815_200);
//! let mut car = SimulatedVehicle::new(Schedule::commuter_day(t0, true), VehicleParams::default(), 42);
//! let mut gov = Governor::new(policy.clone(), t0);
//! let mut meter = EnergyMeter::new(&policy, t0);
//! let mut power_w = 0.0;
//! let mut now = t0;
//! for _ in 0..360 {
//!     now = now + Duration::from_secs(10);
//!     let state = car.advance(now, power_w);
//!     let ctx = StepContext { work_present: true, usage_today: meter.usage_today() };
//!     let d = gov.step(state, now, ctx);
//!     meter.step(state, now, &d, None);
//!     power_w = if d.state.is_computing() { policy.compute.hardware.power_w(d.budget.utilization) } else { 0.0 };
//! }
//! ```

pub mod energy;
pub mod governor;
pub mod policy;
pub mod report;
pub mod signals;
pub mod sim;
pub mod source;
pub mod throttle;
pub mod time;
pub mod wear;

pub use energy::{EnergyMeter, JobEnergy, Kwh, Quality, RaplReader};
pub use governor::{
    Departure, Governor, GovernorDecision, GovernorState, Reason, StepContext, UsageToday,
};
pub use policy::{FleetPolicy, HardwareProfile, Policy, PolicyError, COMMUTER_EXAMPLE_POLICY};
pub use report::DailyReport;
pub use signals::{
    LowVoltageSystemState, Reading, Signal, SignalError, SignalUpdate, SignalValue, VehicleState,
};
pub use sim::{ComputeThermal, Schedule, SimulatedVehicle, VehicleParams};
pub use source::{SignalSource, SourceError};
pub use throttle::{ComputeBudget, Limiter};
pub use time::Millis;
pub use wear::{Wear, WearModel};
