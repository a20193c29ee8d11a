//! [`VehicleState`]: the latest timestamped value of every signal, read back as a
//! [`Reading`] (`Missing`, `Stale` or `Fresh`) against per-signal maximum ages.

use std::time::Duration;

use super::signal::{Signal, SIGNAL_COUNT};
use super::value::{LowVoltageSystemState, SignalError, SignalUpdate, SignalValue};
use crate::time::Millis;

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
    use crate::signals::GEAR_PARK;

    fn upd(at: u64, path: Signal, value: SignalValue) -> SignalUpdate {
        SignalUpdate {
            at: Millis(at),
            path,
            value,
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
}
