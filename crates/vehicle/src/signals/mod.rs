//! COVESA VSS signals the governor reads, their typed values, and [`VehicleState`].
//!
//! Paths are VSS 4.x–6.0. The charging-cable signal has two spellings: VSS 5+
//! `…Charging.ChargingPort.AnyPosition.IsChargingCableConnected` and VSS 4.x
//! `…Charging.IsChargingCableConnected`; both map to [`Signal::ChargingCableConnected`].
//!
//! Every stored value carries the time it was measured. Each signal has a maximum age;
//! accessors return a [`Reading`] that is `Missing`, `Stale` or `Fresh`, so a caller
//! cannot use a stale state of charge by accident.
//!
//! # Layout
//!
//! - [`path`] — the VSS path constants.
//! - `signal` — [`Signal`]: index, path, kind, maximum age and value checks.
//! - `value` — typed values: [`SignalValue`], [`LowVoltageSystemState`], [`SignalUpdate`],
//!   [`SignalError`].
//! - `state` — [`VehicleState`] and [`Reading`].

pub mod path;
mod signal;
mod state;
mod value;

pub use signal::{Signal, GEAR_PARK, SIGNAL_COUNT};
pub use state::{Applied, Reading, VehicleState};
pub use value::{LowVoltageSystemState, SignalError, SignalUpdate, SignalValue, ValueKind};
