//! The test policy, a healthy parked car, and helpers that drive a governor into a state.

use std::time::Duration;

use tokenfleet_vehicle::signals::GEAR_PARK;
use tokenfleet_vehicle::*;

pub(crate) const POLICY: &str = r#"
pack_capacity_kwh = 60.0
require_plugged_in = false
quiet_hours = ["23:00-05:00"]
[soc]
start = "60%"
stop = "50%"
[battery]
max_temperature_c = 45.0
temperature_hysteresis_c = 3.0
[compute]
max_temperature_c = 80.0
temperature_hysteresis_c = 5.0
idle_power_w = 5.0
full_power_w = 35.0
[low_voltage]
min_voltage_v = 12.0
voltage_hysteresis_v = 0.3
[budget]
daily_energy_kwh = 2.0
daily_wear_usd = 0.5
[timing]
eligible_dwell_s = 60
restart_dwell_s = 300
drain_timeout_s = 10
throttle_exit_dwell_s = 30
"#;

/// 2025-06-02T12:00:00Z (outside quiet hours; UTC policy).
pub(crate) const T0: Millis = Millis(1_748_865_600_000);

pub(crate) fn policy() -> Policy {
    Policy::from_toml_str(POLICY, "TEST").expect("test policy is valid")
}

pub(crate) fn plugged_policy() -> Policy {
    let toml = format!("{POLICY}\n[vehicles.\"P\"]\nrequire_plugged_in = true\n");
    Policy::from_toml_str(&toml, "P").expect("valid")
}

pub(crate) fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A parked, healthy vehicle: everything allows computing.
#[derive(Clone, Copy)]
pub(crate) struct Car {
    pub(crate) gear: i64,
    pub(crate) speed: f64,
    pub(crate) moving: bool,
    pub(crate) lv: LowVoltageSystemState,
    pub(crate) volts: f64,
    pub(crate) soc: f64,
    pub(crate) battery_c: f64,
    pub(crate) compute_c: f64,
    pub(crate) plugged: bool,
    pub(crate) charging: bool,
}

impl Default for Car {
    fn default() -> Self {
        Car {
            gear: i64::from(GEAR_PARK),
            speed: 0.0,
            moving: false,
            lv: LowVoltageSystemState::Off,
            volts: 12.6,
            soc: 70.0,
            battery_c: 25.0,
            compute_c: 40.0,
            plugged: true,
            charging: false,
        }
    }
}

impl Car {
    pub(crate) fn state(&self, at: Millis) -> VehicleState {
        use SignalValue::*;
        let mut s = VehicleState::new();
        s.set(Signal::SelectedGear, at, Int(self.gear));
        s.set(
            Signal::IsParkLockEngaged,
            at,
            Bool(self.gear == i64::from(GEAR_PARK)),
        );
        s.set(Signal::Speed, at, Float(self.speed));
        s.set(Signal::IsMoving, at, Bool(self.moving));
        s.set(Signal::LowVoltageSystemState, at, LowVoltage(self.lv));
        s.set(Signal::LowVoltageBatteryVoltage, at, Float(self.volts));
        s.set(Signal::StateOfCharge, at, Float(self.soc));
        s.set(Signal::BatteryTemperature, at, Float(self.battery_c));
        s.set(Signal::ComputeTemperature, at, Float(self.compute_c));
        s.set(Signal::ChargingCableConnected, at, Bool(self.plugged));
        s.set(Signal::IsCharging, at, Bool(self.charging));
        s
    }
}

pub(crate) fn work(w: bool) -> StepContext {
    StepContext::with_work(w)
}

/// Drive a fresh governor into `target` with a healthy car; returns it and the time reached.
pub(crate) fn governor_in(target: GovernorState, p: Policy) -> (Governor, Millis) {
    let car = Car::default();
    let mut g = Governor::new(p, T0);
    let mut t = T0;
    let d = g.step(&car.state(t), t, work(false));
    assert_eq!(d.state, GovernorState::Unavailable);
    t = t + secs(60);
    let d = g.step(&car.state(t), t, work(false));
    assert_eq!(d.state, GovernorState::Eligible);
    match target {
        GovernorState::Unavailable => unreachable!("use Governor::new"),
        GovernorState::Eligible => {}
        GovernorState::Computing => {
            t = t + secs(10);
            let d = g.step(&car.state(t), t, work(true));
            assert_eq!(d.state, GovernorState::Computing);
        }
        GovernorState::Throttled => {
            let mut plant = hot_plant();
            let (_, t2) = run_thermal(&mut g, &mut plant, car, t, 60);
            t = t2;
            assert_eq!(g.state(), GovernorState::Throttled);
        }
        GovernorState::Draining => {
            t = t + secs(10);
            g.step(&car.state(t), t, work(true));
            t = t + secs(10);
            let d = g.step(&Car { gear: 127, ..car }.state(t), t, work(true));
            assert_eq!(d.state, GovernorState::Draining);
        }
    }
    (g, t)
}

/// A compute unit in a hot parked car: full load would reach 87 °C, over the 80 °C limit.
pub(crate) fn hot_plant() -> ComputeThermal {
    ComputeThermal {
        r_th_k_per_w: 1.2,
        tau_s: 120.0,
        temp_c: 45.0,
    }
}

/// Closed loop: the governor's budget sets the power, the thermal model the temperature.
pub(crate) fn run_thermal(
    g: &mut Governor,
    plant: &mut ComputeThermal,
    car: Car,
    mut t: Millis,
    steps: usize,
) -> (Vec<(GovernorDecision, f64)>, Millis) {
    let hw = g.policy().compute.hardware;
    let mut out = vec![];
    let mut power = hw.idle_w;
    for _ in 0..steps {
        t = t + secs(10);
        plant.step(45.0, power, 10.0);
        let d = g.step(
            &Car {
                compute_c: plant.temp_c,
                ..car
            }
            .state(t),
            t,
            work(true),
        );
        power = if d.state.is_computing() {
            hw.power_w(d.budget.utilization)
        } else {
            hw.idle_w
        };
        out.push((d, plant.temp_c));
    }
    (out, t)
}
