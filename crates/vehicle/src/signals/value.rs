//! Typed signal values: [`ValueKind`], [`SignalValue`], [`LowVoltageSystemState`], a
//! timestamped [`SignalUpdate`], and [`SignalError`] for a rejected value.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::signal::Signal;
use crate::time::Millis;

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
    pub(super) fn type_name(self) -> &'static str {
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
