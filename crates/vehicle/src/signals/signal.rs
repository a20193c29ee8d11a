//! [`Signal`]: the signals the governor knows, their VSS paths (aliases included), value
//! kinds, default maximum ages and value checks.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::path;
use super::value::{LowVoltageSystemState, SignalError, SignalValue, ValueKind};

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

#[cfg(test)]
mod tests {
    use super::*;

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
