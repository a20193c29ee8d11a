//! COVESA VSS signals the governor reads, their typed values, and [`VehicleState`].
//!
//! Paths are VSS 4.x–6.0. The charging-cable signal has two spellings: VSS 5+
//! `…Charging.ChargingPort.AnyPosition.IsChargingCableConnected` and VSS 4.x
//! `…Charging.IsChargingCableConnected`; both map to [`Signal::ChargingCableConnected`].
//!
//! Every stored value carries the time it was measured. Each signal has a maximum age;
//! accessors return a [`Reading`] that is `Missing`, `Stale` or `Fresh`, so a caller
//! cannot use a stale state of charge by accident.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::time::Millis;

/// VSS path constants.
pub mod path {
    /// Vehicle speed, km/h (float).
    pub const SPEED: &str = "Vehicle.Speed";
    /// Whether the vehicle is moving (bool).
    pub const IS_MOVING: &str = "Vehicle.IsMoving";
    /// Selected gear (int8: 126 = Park, 127 = Drive, 0 = Neutral, <0 reverse).
    pub const SELECTED_GEAR: &str = "Vehicle.Powertrain.Transmission.SelectedGear";
    /// Park lock engaged (bool).
    pub const IS_PARK_LOCK_ENGAGED: &str = "Vehicle.Powertrain.Transmission.IsParkLockEngaged";
    /// Traction battery state of charge, percent (float).
    pub const SOC: &str = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current";
    /// Battery is charging (bool).
    pub const IS_CHARGING: &str = "Vehicle.Powertrain.TractionBattery.Charging.IsCharging";
    /// Charging cable connected, VSS 5 and later (bool).
    pub const IS_CHARGING_CABLE_CONNECTED: &str =
        "Vehicle.Powertrain.TractionBattery.Charging.ChargingPort.AnyPosition.IsChargingCableConnected";
    /// Charging cable connected, VSS 4.x spelling (bool).
    pub const IS_CHARGING_CABLE_CONNECTED_V4: &str =
        "Vehicle.Powertrain.TractionBattery.Charging.IsChargingCableConnected";
    /// Time until charging completes, seconds (uint32).
    pub const TIME_TO_COMPLETE: &str = "Vehicle.Powertrain.TractionBattery.Charging.TimeToComplete";
    /// Average traction battery temperature, °C (float).
    pub const BATTERY_TEMPERATURE: &str = "Vehicle.Powertrain.TractionBattery.Temperature.Average";
    /// Power into the traction battery, W; positive while charging, negative while discharging.
    pub const BATTERY_CURRENT_POWER: &str = "Vehicle.Powertrain.TractionBattery.CurrentPower";
    /// State of the 12 V system (string: UNDEFINED, LOCK, OFF, ACC, ON, START).
    pub const LOW_VOLTAGE_SYSTEM_STATE: &str = "Vehicle.LowVoltageSystemState";
    /// 12 V battery voltage, V (float).
    pub const LOW_VOLTAGE_BATTERY_VOLTAGE: &str = "Vehicle.LowVoltageBattery.CurrentVoltage";
    /// Latitude, degrees (double).
    pub const LATITUDE: &str = "Vehicle.CurrentLocation.Latitude";
    /// Longitude, degrees (double).
    pub const LONGITUDE: &str = "Vehicle.CurrentLocation.Longitude";
    /// Exterior air temperature, °C (float).
    pub const AIR_TEMPERATURE: &str = "Vehicle.Exterior.AirTemperature";
    /// Temperature of the central compute unit, °C (VSS 6.0, float).
    pub const COMPUTE_TEMPERATURE: &str =
        "Vehicle.ControlUnit.Central.Health.Resources.Temperature";
    /// Power drawn by the central compute unit, W (VSS 6.0, float).
    pub const COMPUTE_POWER: &str = "Vehicle.ControlUnit.Central.Health.Resources.Power";
}

/// Number of distinct signals ([`Signal::ALL`]).
pub const SIGNAL_COUNT: usize = 17;

/// VSS `SelectedGear` value for Park.
pub const GEAR_PARK: i32 = 126;

/// One signal the governor knows, independent of the VSS spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Signal {
    Speed,
    IsMoving,
    SelectedGear,
    IsParkLockEngaged,
    StateOfCharge,
    IsCharging,
    ChargingCableConnected,
    TimeToComplete,
    BatteryTemperature,
    BatteryCurrentPower,
    LowVoltageSystemState,
    LowVoltageBatteryVoltage,
    Latitude,
    Longitude,
    AirTemperature,
    ComputeTemperature,
    ComputePower,
}

/// The type a signal's value must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Bool,
    Int,
    Float,
    LowVoltageState,
}

impl fmt::Display for ValueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ValueKind::Bool => "bool",
            ValueKind::Int => "integer",
            ValueKind::Float => "number",
            ValueKind::LowVoltageState => "low-voltage system state",
        })
    }
}

impl Signal {
    /// Every signal, in index order.
    pub const ALL: [Signal; SIGNAL_COUNT] = [
        Signal::Speed,
        Signal::IsMoving,
        Signal::SelectedGear,
        Signal::IsParkLockEngaged,
        Signal::StateOfCharge,
        Signal::IsCharging,
        Signal::ChargingCableConnected,
        Signal::TimeToComplete,
        Signal::BatteryTemperature,
        Signal::BatteryCurrentPower,
        Signal::LowVoltageSystemState,
        Signal::LowVoltageBatteryVoltage,
        Signal::Latitude,
        Signal::Longitude,
        Signal::AirTemperature,
        Signal::ComputeTemperature,
        Signal::ComputePower,
    ];

    /// Every VSS path a source should subscribe to (both cable spellings included).
    pub const SUBSCRIBE_PATHS: [&'static str; SIGNAL_COUNT + 1] = [
        path::SPEED,
        path::IS_MOVING,
        path::SELECTED_GEAR,
        path::IS_PARK_LOCK_ENGAGED,
        path::SOC,
        path::IS_CHARGING,
        path::IS_CHARGING_CABLE_CONNECTED,
        path::IS_CHARGING_CABLE_CONNECTED_V4,
        path::TIME_TO_COMPLETE,
        path::BATTERY_TEMPERATURE,
        path::BATTERY_CURRENT_POWER,
        path::LOW_VOLTAGE_SYSTEM_STATE,
        path::LOW_VOLTAGE_BATTERY_VOLTAGE,
        path::LATITUDE,
        path::LONGITUDE,
        path::AIR_TEMPERATURE,
        path::COMPUTE_TEMPERATURE,
        path::COMPUTE_POWER,
    ];

    /// Position in [`Signal::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The canonical (newest) VSS path.
    pub const fn path(self) -> &'static str {
        match self {
            Signal::Speed => path::SPEED,
            Signal::IsMoving => path::IS_MOVING,
            Signal::SelectedGear => path::SELECTED_GEAR,
            Signal::IsParkLockEngaged => path::IS_PARK_LOCK_ENGAGED,
            Signal::StateOfCharge => path::SOC,
            Signal::IsCharging => path::IS_CHARGING,
            Signal::ChargingCableConnected => path::IS_CHARGING_CABLE_CONNECTED,
            Signal::TimeToComplete => path::TIME_TO_COMPLETE,
            Signal::BatteryTemperature => path::BATTERY_TEMPERATURE,
            Signal::BatteryCurrentPower => path::BATTERY_CURRENT_POWER,
            Signal::LowVoltageSystemState => path::LOW_VOLTAGE_SYSTEM_STATE,
            Signal::LowVoltageBatteryVoltage => path::LOW_VOLTAGE_BATTERY_VOLTAGE,
            Signal::Latitude => path::LATITUDE,
            Signal::Longitude => path::LONGITUDE,
            Signal::AirTemperature => path::AIR_TEMPERATURE,
            Signal::ComputeTemperature => path::COMPUTE_TEMPERATURE,
            Signal::ComputePower => path::COMPUTE_POWER,
        }
    }

    /// The signal a VSS path names, accepting the 4.x cable alias. `None` for unknown paths.
    pub fn from_path(p: &str) -> Option<Signal> {
        if p == path::IS_CHARGING_CABLE_CONNECTED_V4 {
            return Some(Signal::ChargingCableConnected);
        }
        Signal::ALL.into_iter().find(|s| s.path() == p)
    }

    /// The type of value this signal carries.
    pub const fn kind(self) -> ValueKind {
        match self {
            Signal::IsMoving
            | Signal::IsParkLockEngaged
            | Signal::IsCharging
            | Signal::ChargingCableConnected => ValueKind::Bool,
            Signal::SelectedGear | Signal::TimeToComplete => ValueKind::Int,
            Signal::LowVoltageSystemState => ValueKind::LowVoltageState,
            _ => ValueKind::Float,
        }
    }

    /// Default maximum age before a value counts as stale. State-like signals that brokers
    /// publish on change get a long age; measurements that must be current (SoC, power,
    /// compute temperature) a short one.
    pub const fn default_max_age(self) -> Duration {
        let secs = match self {
            Signal::StateOfCharge | Signal::BatteryCurrentPower | Signal::ComputePower => 300,
            Signal::ComputeTemperature => 300,
            Signal::BatteryTemperature | Signal::LowVoltageBatteryVoltage => 600,
            Signal::Speed
            | Signal::IsMoving
            | Signal::SelectedGear
            | Signal::IsParkLockEngaged
            | Signal::IsCharging
            | Signal::ChargingCableConnected
            | Signal::LowVoltageSystemState
            | Signal::TimeToComplete => 900,
            Signal::Latitude | Signal::Longitude | Signal::AirTemperature => 1800,
        };
        Duration::from_secs(secs)
    }

    /// Type and range check; integer values are accepted for float signals.
    pub fn check(self, value: SignalValue) -> Result<SignalValue, SignalError> {
        let wrong = |got: &'static str| SignalError::WrongType {
            signal: self,
            expected: self.kind(),
            got,
        };
        let v = match (self.kind(), value) {
            (ValueKind::Bool, SignalValue::Bool(_)) => value,
            (ValueKind::Int, SignalValue::Int(_)) => value,
            (ValueKind::Float, SignalValue::Float(_)) => value,
            (ValueKind::Float, SignalValue::Int(i)) => SignalValue::Float(i as f64),
            (ValueKind::LowVoltageState, SignalValue::LowVoltage(_)) => value,
            (_, other) => return Err(wrong(other.type_name())),
        };
        let (lo, hi) = match self {
            Signal::StateOfCharge => (0.0, 100.0),
            Signal::Speed => (-400.0, 600.0),
            Signal::SelectedGear => (-15.0, 127.0),
            Signal::TimeToComplete => (0.0, 1.0e9),
            Signal::BatteryTemperature | Signal::AirTemperature | Signal::ComputeTemperature => {
                (-80.0, 250.0)
            }
            Signal::LowVoltageBatteryVoltage => (0.0, 100.0),
            Signal::Latitude => (-90.0, 90.0),
            Signal::Longitude => (-180.0, 180.0),
            Signal::BatteryCurrentPower => (-2.0e6, 2.0e6),
            Signal::ComputePower => (0.0, 1.0e5),
            _ => return Ok(v),
        };
        let x = match v {
            SignalValue::Float(x) => x,
            SignalValue::Int(i) => i as f64,
            _ => return Ok(v),
        };
        if !x.is_finite() || x < lo || x > hi {
            return Err(SignalError::OutOfRange {
                signal: self,
                value: x,
            });
        }
        Ok(v)
    }

    /// Parse a JSON value (replay files) into a checked value for this signal.
    pub fn value_from_json(self, v: &serde_json::Value) -> Result<SignalValue, SignalError> {
        let raw = match v {
            serde_json::Value::Bool(b) => SignalValue::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => SignalValue::Int(i),
                None => SignalValue::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) if self.kind() == ValueKind::LowVoltageState => {
                match s.parse::<LowVoltageSystemState>() {
                    Ok(state) => SignalValue::LowVoltage(state),
                    Err(_) => {
                        return Err(SignalError::WrongType {
                            signal: self,
                            expected: self.kind(),
                            got: "unknown string",
                        })
                    }
                }
            }
            serde_json::Value::String(_) => {
                return Err(SignalError::WrongType {
                    signal: self,
                    expected: self.kind(),
                    got: "string",
                })
            }
            serde_json::Value::Null => {
                return Err(SignalError::WrongType {
                    signal: self,
                    expected: self.kind(),
                    got: "null",
                })
            }
            _ => {
                return Err(SignalError::WrongType {
                    signal: self,
                    expected: self.kind(),
                    got: "array or object",
                })
            }
        };
        self.check(raw)
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path())
    }
}

/// VSS `Vehicle.LowVoltageSystemState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LowVoltageSystemState {
    Undefined,
    Lock,
    Off,
    Acc,
    On,
    Start,
}

impl LowVoltageSystemState {
    /// The VSS spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            LowVoltageSystemState::Undefined => "UNDEFINED",
            LowVoltageSystemState::Lock => "LOCK",
            LowVoltageSystemState::Off => "OFF",
            LowVoltageSystemState::Acc => "ACC",
            LowVoltageSystemState::On => "ON",
            LowVoltageSystemState::Start => "START",
        }
    }

    /// ON or START: a driver is getting ready to drive.
    pub const fn is_driving_ready(self) -> bool {
        matches!(
            self,
            LowVoltageSystemState::On | LowVoltageSystemState::Start
        )
    }
}

impl FromStr for LowVoltageSystemState {
    type Err = SignalError;
    fn from_str(s: &str) -> Result<Self, SignalError> {
        Ok(match s.trim().to_ascii_uppercase().as_str() {
            "UNDEFINED" => LowVoltageSystemState::Undefined,
            "LOCK" => LowVoltageSystemState::Lock,
            "OFF" => LowVoltageSystemState::Off,
            "ACC" => LowVoltageSystemState::Acc,
            "ON" => LowVoltageSystemState::On,
            "START" => LowVoltageSystemState::Start,
            _ => return Err(SignalError::UnknownLowVoltageState(s.to_string())),
        })
    }
}

impl fmt::Display for LowVoltageSystemState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed signal value. `Copy`, so updates never allocate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SignalValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    LowVoltage(LowVoltageSystemState),
}

impl SignalValue {
    fn type_name(self) -> &'static str {
        match self {
            SignalValue::Bool(_) => "bool",
            SignalValue::Int(_) => "integer",
            SignalValue::Float(_) => "float",
            SignalValue::LowVoltage(_) => "low-voltage system state",
        }
    }

    /// The value as a number (bools and states give `None`).
    pub fn as_f64(self) -> Option<f64> {
        match self {
            SignalValue::Float(x) => Some(x),
            SignalValue::Int(i) => Some(i as f64),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(self) -> Option<bool> {
        match self {
            SignalValue::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// One timestamped signal value as delivered by a source.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SignalUpdate {
    /// When the value was measured (or received, if the source has no timestamp).
    pub at: Millis,
    /// Which signal (the source has already resolved the VSS path, aliases included).
    pub path: Signal,
    /// The checked value.
    pub value: SignalValue,
}

/// A rejected signal value.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SignalError {
    #[error("{signal}: expected a {expected}, got a {got}")]
    WrongType {
        signal: Signal,
        expected: ValueKind,
        got: &'static str,
    },
    #[error("{signal}: value {value} out of range")]
    OutOfRange { signal: Signal, value: f64 },
    #[error("unknown low-voltage system state {0:?}")]
    UnknownLowVoltageState(String),
}

/// What a stored signal looks like at a given time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reading<T> {
    /// Never received.
    Missing,
    /// Received, but older than the signal's maximum age: not a valid current value.
    Stale { value: T, age: Duration },
    /// Received within the maximum age.
    Fresh(T),
}

impl<T: Copy> Reading<T> {
    /// The value if fresh.
    pub fn fresh(self) -> Option<T> {
        match self {
            Reading::Fresh(v) => Some(v),
            _ => None,
        }
    }

    /// True when fresh.
    pub fn is_fresh(self) -> bool {
        matches!(self, Reading::Fresh(_))
    }

    /// Transform the value, keeping freshness.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Reading<U> {
        match self {
            Reading::Missing => Reading::Missing,
            Reading::Stale { value, age } => Reading::Stale {
                value: f(value),
                age,
            },
            Reading::Fresh(v) => Reading::Fresh(f(v)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    at: Millis,
    value: SignalValue,
}

/// What happened to an update given to [`VehicleState::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Stored as the current value.
    Stored,
    /// Older than the value already held; ignored.
    OutOfOrder,
}

/// The latest value of every signal with its timestamp, plus per-signal maximum ages.
///
/// Fixed-size and `Copy`-friendly: applying an update never allocates.
#[derive(Debug, Clone, PartialEq)]
pub struct VehicleState {
    samples: [Option<Sample>; SIGNAL_COUNT],
    max_age_ms: [u64; SIGNAL_COUNT],
}

impl Default for VehicleState {
    fn default() -> Self {
        Self::new()
    }
}

impl VehicleState {
    /// Empty state with [`Signal::default_max_age`] for every signal.
    pub fn new() -> Self {
        let mut max_age_ms = [0; SIGNAL_COUNT];
        for s in Signal::ALL {
            max_age_ms[s.index()] = s.default_max_age().as_millis() as u64;
        }
        VehicleState {
            samples: [None; SIGNAL_COUNT],
            max_age_ms,
        }
    }

    /// Override one signal's maximum age.
    pub fn with_max_age(mut self, signal: Signal, max_age: Duration) -> Self {
        self.max_age_ms[signal.index()] = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// The maximum age of a signal.
    pub fn max_age(&self, signal: Signal) -> Duration {
        Duration::from_millis(self.max_age_ms[signal.index()])
    }

    /// Type-check and store an update. Updates older than the stored value are ignored.
    pub fn apply(&mut self, update: SignalUpdate) -> Result<Applied, SignalError> {
        let value = update.path.check(update.value)?;
        let slot = &mut self.samples[update.path.index()];
        if let Some(old) = slot {
            if old.at > update.at {
                return Ok(Applied::OutOfOrder);
            }
        }
        *slot = Some(Sample {
            at: update.at,
            value,
        });
        Ok(Applied::Stored)
    }

    /// Store a value the caller knows is well-typed (simulator fast path); checked in debug builds.
    pub fn set(&mut self, signal: Signal, at: Millis, value: SignalValue) {
        debug_assert!(signal.check(value).is_ok(), "{signal}: bad value {value:?}");
        self.samples[signal.index()] = Some(Sample { at, value });
    }

    /// Forget a signal (e.g. the source reported it has no value).
    pub fn clear(&mut self, signal: Signal) {
        self.samples[signal.index()] = None;
    }

    /// The time a signal was last measured.
    pub fn updated_at(&self, signal: Signal) -> Option<Millis> {
        self.samples[signal.index()].map(|s| s.at)
    }

    /// The raw reading of a signal at `now`.
    pub fn get(&self, signal: Signal, now: Millis) -> Reading<SignalValue> {
        match self.samples[signal.index()] {
            None => Reading::Missing,
            Some(s) => {
                let age = now.ms_since(s.at);
                if age > self.max_age_ms[signal.index()] {
                    Reading::Stale {
                        value: s.value,
                        age: Duration::from_millis(age),
                    }
                } else {
                    Reading::Fresh(s.value)
                }
            }
        }
    }

    fn get_f64(&self, signal: Signal, now: Millis) -> Reading<f64> {
        self.get(signal, now)
            .map(|v| v.as_f64().unwrap_or(f64::NAN))
    }

    fn get_bool(&self, signal: Signal, now: Millis) -> Reading<bool> {
        self.get(signal, now).map(|v| v.as_bool().unwrap_or(false))
    }

    /// `Vehicle.Speed`, km/h.
    pub fn speed_kmh(&self, now: Millis) -> Reading<f64> {
        self.get_f64(Signal::Speed, now)
    }
    /// `Vehicle.IsMoving`.
    pub fn is_moving(&self, now: Millis) -> Reading<bool> {
        self.get_bool(Signal::IsMoving, now)
    }
    /// `SelectedGear` (126 = Park).
    pub fn selected_gear(&self, now: Millis) -> Reading<i32> {
        self.get(Signal::SelectedGear, now).map(|v| match v {
            SignalValue::Int(i) => i32::try_from(i).unwrap_or(i32::MIN),
            _ => i32::MIN,
        })
    }
    /// `IsParkLockEngaged`.
    pub fn park_lock_engaged(&self, now: Millis) -> Reading<bool> {
        self.get_bool(Signal::IsParkLockEngaged, now)
    }
    /// State of charge, percent.
    pub fn soc_percent(&self, now: Millis) -> Reading<f64> {
        self.get_f64(Signal::StateOfCharge, now)
    }
    /// `Charging.IsCharging`.
    pub fn is_charging(&self, now: Millis) -> Reading<bool> {
        self.get_bool(Signal::IsCharging, now)
    }
    /// Charging cable connected (either VSS spelling).
    pub fn cable_connected(&self, now: Millis) -> Reading<bool> {
        self.get_bool(Signal::ChargingCableConnected, now)
    }
    /// `Charging.TimeToComplete`, seconds.
    pub fn time_to_complete_s(&self, now: Millis) -> Reading<f64> {
        self.get_f64(Signal::TimeToComplete, now)
    }
    /// Average battery temperature, °C.
    pub fn battery_temperature_c(&self, now: Millis) -> Reading<f64> {
        self.get_f64(Signal::BatteryTemperature, now)
    }
    /// Power into the traction battery, W (negative while discharging).
    pub fn battery_power_w(&self, now: Millis) -> Reading<f64> {
        self.get_f64(Signal::BatteryCurrentPower, now)
    }
    /// `Vehicle.LowVoltageSystemState`.
    pub fn low_voltage_state(&self, now: Millis) -> Reading<LowVoltageSystemState> {
        self.get(Signal::LowVoltageSystemState, now)
            .map(|v| match v {
                SignalValue::LowVoltage(s) => s,
                _ => LowVoltageSystemState::Undefined,
            })
    }
    /// 12 V battery voltage.
    pub fn low_voltage_v(&self, now: Millis) -> Reading<f64> {
        self.get_f64(Signal::LowVoltageBatteryVoltage, now)
    }
    /// Location (latitude, longitude); fresh only if both are fresh.
    pub fn location(&self, now: Millis) -> Reading<(f64, f64)> {
        match (
            self.get_f64(Signal::Latitude, now),
            self.get_f64(Signal::Longitude, now),
        ) {
            (Reading::Fresh(a), Reading::Fresh(b)) => Reading::Fresh((a, b)),
            (Reading::Missing, _) | (_, Reading::Missing) => Reading::Missing,
            (a, b) => {
                let age = |r: Reading<f64>| match r {
                    Reading::Stale { age, .. } => age,
                    _ => Duration::ZERO,
                };
                let v = |r: Reading<f64>| match r {
                    Reading::Stale { value, .. } | Reading::Fresh(value) => value,
                    Reading::Missing => f64::NAN,
                };
                Reading::Stale {
                    value: (v(a), v(b)),
                    age: age(a).max(age(b)),
                }
            }
        }
    }
    /// Exterior air temperature, °C.
    pub fn air_temperature_c(&self, now: Millis) -> Reading<f64> {
        self.get_f64(Signal::AirTemperature, now)
    }
    /// Compute-unit temperature, °C.
    pub fn compute_temperature_c(&self, now: Millis) -> Reading<f64> {
        self.get_f64(Signal::ComputeTemperature, now)
    }
    /// Compute-unit power, W.
    pub fn compute_power_w(&self, now: Millis) -> Reading<f64> {
        self.get_f64(Signal::ComputePower, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upd(at: u64, path: Signal, value: SignalValue) -> SignalUpdate {
        SignalUpdate {
            at: Millis(at),
            path,
            value,
        }
    }

    #[test]
    fn every_path_resolves_and_the_v4_alias_maps_to_the_cable_signal() {
        for s in Signal::ALL {
            assert_eq!(Signal::from_path(s.path()), Some(s));
        }
        for p in Signal::SUBSCRIBE_PATHS {
            assert!(Signal::from_path(p).is_some(), "{p}");
        }
        assert_eq!(
            Signal::from_path(path::IS_CHARGING_CABLE_CONNECTED_V4),
            Some(Signal::ChargingCableConnected)
        );
        assert_eq!(Signal::from_path("Vehicle.Cabin.Door.Row1.IsOpen"), None);
        for (i, s) in Signal::ALL.iter().enumerate() {
            assert_eq!(s.index(), i);
        }
    }

    #[test]
    fn stale_soc_is_not_a_valid_soc() {
        let mut st = VehicleState::new();
        st.apply(upd(1_000, Signal::StateOfCharge, SignalValue::Float(55.0)))
            .unwrap();
        let max = Signal::StateOfCharge.default_max_age().as_millis() as u64;
        assert_eq!(st.soc_percent(Millis(1_000 + max)).fresh(), Some(55.0));
        let late = st.soc_percent(Millis(1_000 + max + 1));
        assert!(matches!(late, Reading::Stale { value, .. } if value == 55.0));
        assert_eq!(late.fresh(), None);
        assert_eq!(VehicleState::new().soc_percent(Millis(0)), Reading::Missing);
    }

    #[test]
    fn max_age_is_configurable() {
        let mut st =
            VehicleState::new().with_max_age(Signal::StateOfCharge, Duration::from_secs(1));
        st.apply(upd(0, Signal::StateOfCharge, SignalValue::Float(50.0)))
            .unwrap();
        assert!(st.soc_percent(Millis(1_000)).is_fresh());
        assert!(!st.soc_percent(Millis(1_001)).is_fresh());
    }

    #[test]
    fn wrong_types_and_out_of_range_values_are_rejected_and_keep_the_old_value() {
        let mut st = VehicleState::new();
        st.apply(upd(0, Signal::StateOfCharge, SignalValue::Float(60.0)))
            .unwrap();
        assert!(matches!(
            st.apply(upd(1, Signal::StateOfCharge, SignalValue::Bool(true))),
            Err(SignalError::WrongType { .. })
        ));
        assert!(matches!(
            st.apply(upd(1, Signal::StateOfCharge, SignalValue::Float(140.0))),
            Err(SignalError::OutOfRange { .. })
        ));
        assert!(matches!(
            st.apply(upd(1, Signal::StateOfCharge, SignalValue::Float(f64::NAN))),
            Err(SignalError::OutOfRange { .. })
        ));
        assert_eq!(st.soc_percent(Millis(2)).fresh(), Some(60.0));
        // integers are fine for float signals
        st.apply(upd(3, Signal::StateOfCharge, SignalValue::Int(61)))
            .unwrap();
        assert_eq!(st.soc_percent(Millis(3)).fresh(), Some(61.0));
    }

    #[test]
    fn out_of_order_updates_are_ignored() {
        let mut st = VehicleState::new();
        st.apply(upd(10, Signal::SelectedGear, SignalValue::Int(126)))
            .unwrap();
        assert_eq!(
            st.apply(upd(5, Signal::SelectedGear, SignalValue::Int(127))),
            Ok(Applied::OutOfOrder)
        );
        assert_eq!(st.selected_gear(Millis(10)).fresh(), Some(GEAR_PARK));
    }

    #[test]
    fn json_values_are_parsed_by_signal_kind() {
        let j = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert_eq!(
            Signal::LowVoltageSystemState.value_from_json(&j("\"start\"")),
            Ok(SignalValue::LowVoltage(LowVoltageSystemState::Start))
        );
        assert!(Signal::LowVoltageSystemState
            .value_from_json(&j("\"WARP\""))
            .is_err());
        assert!(Signal::StateOfCharge.value_from_json(&j("\"80\"")).is_err());
        assert_eq!(
            Signal::SelectedGear.value_from_json(&j("126")),
            Ok(SignalValue::Int(126))
        );
        assert!(Signal::SelectedGear.value_from_json(&j("126.5")).is_err());
        assert_eq!(
            Signal::IsCharging.value_from_json(&j("true")),
            Ok(SignalValue::Bool(true))
        );
    }
}
