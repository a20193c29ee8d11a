//! Table-driven tests of every governor transition, plus the noisy-SoC regression
//! (BOINC issue #5815 is the anti-example: on/off flapping around a threshold).

use std::time::Duration;

use tokenfleet_vehicle::governor::UsageToday;
use tokenfleet_vehicle::signals::GEAR_PARK;
use tokenfleet_vehicle::*;

const POLICY: &str = r#"
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
const T0: Millis = Millis(1_748_865_600_000);

fn policy() -> Policy {
    Policy::from_toml_str(POLICY, "TEST").expect("test policy is valid")
}

fn plugged_policy() -> Policy {
    let toml = format!("{POLICY}\n[vehicles.\"P\"]\nrequire_plugged_in = true\n");
    Policy::from_toml_str(&toml, "P").expect("valid")
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A parked, healthy vehicle: everything allows computing.
#[derive(Clone, Copy)]
struct Car {
    gear: i64,
    speed: f64,
    moving: bool,
    lv: LowVoltageSystemState,
    volts: f64,
    soc: f64,
    battery_c: f64,
    compute_c: f64,
    plugged: bool,
    charging: bool,
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
    fn state(&self, at: Millis) -> VehicleState {
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

fn work(w: bool) -> StepContext {
    StepContext::with_work(w)
}

/// Drive a fresh governor into `target` with a healthy car; returns it and the time reached.
fn governor_in(target: GovernorState, p: Policy) -> (Governor, Millis) {
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

#[test]
fn unavailable_dwells_then_becomes_eligible() {
    let car = Car::default();
    let mut g = Governor::new(policy(), T0);
    let d = g.step(&car.state(T0), T0, work(false));
    assert_eq!(d.state, GovernorState::Unavailable);
    assert_eq!(
        d.reason,
        Reason::Dwell {
            remaining_ms: 60_000
        }
    );
    assert!(d.budget.is_zero());
    let t = T0 + secs(59);
    assert_eq!(
        g.step(&car.state(t), t, work(false)).state,
        GovernorState::Unavailable
    );
    let t = T0 + secs(60);
    let d = g.step(&car.state(t), t, work(false));
    assert_eq!(
        (d.state, d.reason),
        (GovernorState::Eligible, Reason::Ready)
    );
    assert_eq!(d.budget.utilization, 1.0);
    assert!(!d.must_evict);
}

#[test]
fn unavailable_goes_through_eligible_to_computing_in_one_step_when_work_waits() {
    let car = Car::default();
    let mut g = Governor::new(policy(), T0);
    g.step(&car.state(T0), T0, work(true));
    let t = T0 + secs(60);
    let d = g.step(&car.state(t), t, work(true));
    assert_eq!(
        (d.state, d.reason),
        (GovernorState::Computing, Reason::FullBudget)
    );
    assert_eq!((d.budget.threads, d.budget.max_batch), (2, 8));
}

#[test]
fn a_blocker_during_the_dwell_restarts_it() {
    let car = Car::default();
    let mut g = Governor::new(policy(), T0);
    g.step(&car.state(T0), T0, work(false));
    let t = T0 + secs(30);
    g.step(&Car { soc: 59.0, ..car }.state(t), t, work(false));
    let t = T0 + secs(60);
    let d = g.step(&car.state(t), t, work(false));
    assert_eq!(
        d.state,
        GovernorState::Unavailable,
        "dwell restarted at 60 s"
    );
    let t = T0 + secs(120);
    assert_eq!(
        g.step(&car.state(t), t, work(false)).state,
        GovernorState::Eligible
    );
}

/// Every start blocker keeps a fresh governor Unavailable, with its reason.
#[test]
fn start_blockers_table() {
    use LowVoltageSystemState as Lv;
    let c = Car::default();
    let quiet = Millis(T0.0 + 11 * 3_600_000); // 23:00 UTC
    type Check = fn(&Reason) -> bool;
    let cases: Vec<(&str, Car, Millis, Policy, Check)> = vec![
        (
            "soc between stop and start",
            Car { soc: 55.0, ..c },
            T0,
            policy(),
            |r| matches!(r, Reason::SocBelowStart { .. }),
        ),
        (
            "soc below stop",
            Car { soc: 45.0, ..c },
            T0,
            policy(),
            |r| matches!(r, Reason::SocBelowStart { .. }),
        ),
        (
            "battery within hysteresis of limit",
            Car {
                battery_c: 43.0,
                ..c
            },
            T0,
            policy(),
            |r| matches!(r, Reason::BatteryTemperature { .. }),
        ),
        (
            "compute unit not cooled below restart",
            Car {
                compute_c: 76.0,
                ..c
            },
            T0,
            policy(),
            |r| matches!(r, Reason::ComputeTemperature { .. }),
        ),
        (
            "12 V within hysteresis of floor",
            Car { volts: 12.2, ..c },
            T0,
            policy(),
            |r| matches!(r, Reason::LowVoltage { .. }),
        ),
        (
            "12 V state ACC",
            Car { lv: Lv::Acc, ..c },
            T0,
            policy(),
            |r| *r == Reason::LowVoltageState(Lv::Acc),
        ),
        (
            "12 V state ON",
            Car { lv: Lv::On, ..c },
            T0,
            policy(),
            |r| *r == Reason::LowVoltageState(Lv::On),
        ),
        ("gear in drive", Car { gear: 127, ..c }, T0, policy(), |r| {
            *r == Reason::NotParked
        }),
        (
            "speed above zero",
            Car { speed: 3.0, ..c },
            T0,
            policy(),
            |r| *r == Reason::NotParked,
        ),
        ("is moving", Car { moving: true, ..c }, T0, policy(), |r| {
            *r == Reason::NotParked
        }),
        ("quiet hours", c, quiet, policy(), |r| {
            *r == Reason::QuietHours
        }),
        (
            "not plugged in",
            Car {
                plugged: false,
                ..c
            },
            T0,
            plugged_policy(),
            |r| *r == Reason::NotPluggedIn,
        ),
    ];
    for (name, car, at, p, check) in cases {
        let mut g = Governor::new(p, at);
        for k in 0..3 {
            let t = at + secs(60 * k);
            let d = g.step(&car.state(t), t, work(true));
            assert_eq!(d.state, GovernorState::Unavailable, "{name}");
            assert!(check(&d.reason), "{name}: {:?}", d.reason);
            assert!(d.budget.is_zero(), "{name}");
        }
    }
}

#[test]
fn missing_and_stale_signals_block_start() {
    let car = Car::default();
    let mut g = Governor::new(policy(), T0);
    let mut s = car.state(T0);
    s.clear(Signal::StateOfCharge);
    assert_eq!(
        g.step(&s, T0, work(true)).reason,
        Reason::SignalMissing(Signal::StateOfCharge)
    );
    // SoC measured 6 minutes ago: stale (max age 5 min), not a valid SoC
    let mut s = car.state(T0);
    s.set(
        Signal::StateOfCharge,
        T0 - secs(360),
        SignalValue::Float(90.0),
    );
    assert_eq!(
        g.step(&s, T0, work(true)).reason,
        Reason::SignalStale(Signal::StateOfCharge)
    );
    // gear missing but park lock engaged: parked is proven another way
    let mut s = car.state(T0);
    s.clear(Signal::SelectedGear);
    let d = g.step(&s, T0, work(true));
    assert!(matches!(d.reason, Reason::Dwell { .. }), "{:?}", d.reason);
    s.clear(Signal::IsParkLockEngaged);
    assert_eq!(
        g.step(&s, T0, work(true)).reason,
        Reason::SignalMissing(Signal::SelectedGear)
    );
}

#[test]
fn eligible_and_computing_follow_work() {
    let (mut g, t) = governor_in(GovernorState::Eligible, policy());
    let car = Car::default();
    let t = t + secs(10);
    let d = g.step(&car.state(t), t, work(true));
    assert_eq!(d.state, GovernorState::Computing, "Eligible → Computing");
    let t = t + secs(10);
    let d = g.step(&car.state(t), t, work(false));
    assert_eq!(
        (d.state, d.reason),
        (GovernorState::Eligible, Reason::Ready),
        "Computing → Eligible"
    );
    assert!(
        !d.budget.is_zero(),
        "an eligible vehicle advertises its budget"
    );
}

/// A compute unit in a hot parked car: full load would reach 87 °C, over the 80 °C limit.
fn hot_plant() -> ComputeThermal {
    ComputeThermal {
        r_th_k_per_w: 1.2,
        tau_s: 120.0,
        temp_c: 45.0,
    }
}

/// Closed loop: the governor's budget sets the power, the thermal model the temperature.
fn run_thermal(
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

#[test]
fn computing_throttles_smoothly_and_returns_after_the_exit_dwell() {
    let (mut g, t) = governor_in(GovernorState::Computing, policy());
    let car = Car::default();
    let mut plant = hot_plant();
    let (run, mut t) = run_thermal(&mut g, &mut plant, car, t, 360);
    let first_throttled = run
        .iter()
        .position(|(d, _)| d.state == GovernorState::Throttled)
        .expect("Computing → Throttled");
    assert_eq!(
        run[first_throttled].0.reason,
        Reason::Limited(Limiter::Temperature)
    );
    for (d, temp) in &run {
        assert!(
            d.state.is_computing(),
            "the controller holds the limit: no stop ({temp} °C)"
        );
        assert!(*temp < 80.0, "never above the hard limit: {temp}");
    }
    // smooth, not on/off: small steps, and a steady utilization strictly between 0 and 1
    for w in run.windows(2) {
        let (a, b) = (w[0].0.budget.utilization, w[1].0.budget.utilization);
        assert!((a - b).abs() <= 0.2, "{a} -> {b}");
    }
    let (last, temp) = run.last().unwrap();
    assert!(
        last.budget.utilization > 0.3 && last.budget.utilization < 0.95,
        "{:?}",
        last.budget
    );
    assert!((temp - 75.0).abs() < 1.5, "settles at the setpoint: {temp}");
    assert!(last.budget.threads >= 1 && last.budget.duty_cycle > 0.0);

    // cool down: the controller recovers to full, then the exit dwell must pass
    let cool = Car {
        compute_c: 45.0,
        ..car
    };
    let mut back_at = None;
    let mut full_since = None;
    for i in 0..200 {
        t = t + secs(10);
        let d = g.step(&cool.state(t), t, work(true));
        if d.budget.utilization >= 0.99 && full_since.is_none() {
            full_since = Some(t);
        }
        if d.state == GovernorState::Computing {
            back_at = Some((i, t));
            break;
        }
    }
    let (_, back) = back_at.expect("Throttled → Computing");
    let since = full_since.expect("controller recovered");
    assert!(back.since(since) >= secs(30), "exit dwell respected");
}

/// Departures go to Draining at once from Eligible, Computing and Throttled.
#[test]
fn departure_table() {
    use LowVoltageSystemState as Lv;
    let c = Car::default();
    let cases: Vec<(&str, Car, bool, Departure)> = vec![
        (
            "gear leaves park",
            Car { gear: 127, ..c },
            false,
            Departure::GearLeftPark { gear: 127 },
        ),
        (
            "reverse",
            Car { gear: -1, ..c },
            false,
            Departure::GearLeftPark { gear: -1 },
        ),
        (
            "12 V ON",
            Car { lv: Lv::On, ..c },
            false,
            Departure::DriverStarting { state: Lv::On },
        ),
        (
            "12 V START",
            Car { lv: Lv::Start, ..c },
            false,
            Departure::DriverStarting { state: Lv::Start },
        ),
        (
            "speed",
            Car { speed: 0.5, ..c },
            false,
            Departure::Moving { speed_kmh: 0.5 },
        ),
        (
            "is moving",
            Car { moving: true, ..c },
            false,
            Departure::IsMoving,
        ),
        (
            "unplugged when required",
            Car {
                plugged: false,
                ..c
            },
            true,
            Departure::Unplugged,
        ),
    ];
    for from in [
        GovernorState::Eligible,
        GovernorState::Computing,
        GovernorState::Throttled,
    ] {
        for (name, car, needs_plug, dep) in &cases {
            let p = if *needs_plug {
                plugged_policy()
            } else {
                policy()
            };
            let (mut g, t) = governor_in(from, p);
            // the very next step, however soon: no dwell on the departure path
            let t = t + Duration::from_millis(1);
            let d = g.step(&car.state(t), t, work(true));
            assert_eq!(d.state, GovernorState::Draining, "{from:?} / {name}");
            assert_eq!(d.reason, Reason::Departure(*dep), "{from:?} / {name}");
            assert!(d.must_evict && g.must_evict(), "{from:?} / {name}");
            assert!(d.budget.is_zero());
        }
    }
    // unplugging is not a departure when battery computing is allowed
    let (mut g, t) = governor_in(GovernorState::Computing, policy());
    let t = t + secs(10);
    let d = g.step(
        &Car {
            plugged: false,
            ..c
        }
        .state(t),
        t,
        work(true),
    );
    assert_eq!(d.state, GovernorState::Computing);
}

/// Stop conditions (thresholds crossed, budgets used, signals lost) also drain.
#[test]
fn stop_condition_table() {
    use LowVoltageSystemState as Lv;
    let c = Car::default();
    let quiet = Millis(T0.0 + 11 * 3_600_000);
    type Check = fn(&Reason) -> bool;
    let cases: Vec<(&str, Car, Option<Millis>, UsageToday, Check)> = vec![
        (
            "soc at reserve",
            Car { soc: 50.0, ..c },
            None,
            UsageToday::default(),
            |r| matches!(r, Reason::SocAtReserve { .. }),
        ),
        (
            "battery hot",
            Car {
                battery_c: 45.0,
                ..c
            },
            None,
            UsageToday::default(),
            |r| matches!(r, Reason::BatteryTemperature { .. }),
        ),
        (
            "compute at hard limit",
            Car {
                compute_c: 80.0,
                ..c
            },
            None,
            UsageToday::default(),
            |r| matches!(r, Reason::ComputeTemperature { .. }),
        ),
        (
            "12 V below floor",
            Car { volts: 11.9, ..c },
            None,
            UsageToday::default(),
            |r| matches!(r, Reason::LowVoltage { .. }),
        ),
        (
            "12 V ACC",
            Car { lv: Lv::Acc, ..c },
            None,
            UsageToday::default(),
            |r| *r == Reason::LowVoltageState(Lv::Acc),
        ),
        (
            "quiet hours begin",
            c,
            Some(quiet),
            UsageToday::default(),
            |r| *r == Reason::QuietHours,
        ),
        (
            "energy budget",
            c,
            None,
            UsageToday {
                energy_kwh: 2.0,
                ..Default::default()
            },
            |r| *r == Reason::EnergyBudget,
        ),
        (
            "wear budget",
            c,
            None,
            UsageToday {
                wear_usd: 0.5,
                ..Default::default()
            },
            |r| *r == Reason::WearBudget,
        ),
    ];
    for (name, car, at, usage, check) in cases {
        let (mut g, t) = governor_in(GovernorState::Computing, policy());
        let t = at.unwrap_or(t + secs(10));
        let ctx = StepContext {
            work_present: true,
            usage_today: usage,
        };
        let d = g.step(&car.state(t), t, ctx);
        assert_eq!(d.state, GovernorState::Draining, "{name}");
        assert!(check(&d.reason), "{name}: {:?}", d.reason);
        assert!(d.must_evict, "{name}");
    }
    // a stale SoC while computing stops too
    let (mut g, t) = governor_in(GovernorState::Computing, policy());
    let t = t + secs(10);
    let mut s = c.state(t);
    s.set(
        Signal::StateOfCharge,
        t - secs(301),
        SignalValue::Float(70.0),
    );
    let d = g.step(&s, t, work(true));
    assert_eq!(
        (d.state, d.reason),
        (
            GovernorState::Draining,
            Reason::SignalStale(Signal::StateOfCharge)
        )
    );
}

#[test]
fn hysteresis_keeps_computing_between_thresholds() {
    let (mut g, mut t) = governor_in(GovernorState::Computing, policy());
    let c = Car::default();
    // below start but above stop; battery within its hysteresis; 12 V between floor and restart
    for car in [
        Car { soc: 55.0, ..c },
        Car {
            battery_c: 43.5,
            ..c
        },
        Car { volts: 12.1, ..c },
    ] {
        t = t + secs(10);
        assert_eq!(
            g.step(&car.state(t), t, work(true)).state,
            GovernorState::Computing
        );
    }
}

#[test]
fn draining_waits_for_the_work_then_restart_dwell_applies() {
    let (mut g, t0) = governor_in(GovernorState::Draining, policy());
    let c = Car::default();
    // still holding work, before the timeout: stays Draining and keeps asking for eviction
    let t = t0 + secs(5);
    let d = g.step(&c.state(t), t, work(true));
    assert_eq!(d.state, GovernorState::Draining);
    assert!(d.must_evict);
    assert_eq!(
        d.reason,
        Reason::Departure(Departure::GearLeftPark { gear: 127 })
    );
    // work handed back: Draining → Unavailable
    let t = t0 + secs(6);
    let d = g.step(&c.state(t), t, work(false));
    assert_eq!(d.state, GovernorState::Unavailable);
    assert!(!d.must_evict);
    // conditions are fine again but the restart dwell (300 s from the stop) holds
    let mut t = t;
    let mut eligible_at = None;
    for _ in 0..40 {
        t = t + secs(10);
        let d = g.step(&c.state(t), t, work(false));
        if d.state == GovernorState::Eligible {
            eligible_at = Some(t);
            break;
        }
        assert!(
            matches!(d.reason, Reason::Dwell { .. } | Reason::RestartDwell { .. }),
            "{:?}",
            d.reason
        );
    }
    let at = eligible_at.expect("eligible again");
    assert!(
        at.since(t0) >= secs(300),
        "restart dwell: {:?}",
        at.since(t0)
    );
}

#[test]
fn draining_times_out_if_work_is_never_handed_back() {
    let (mut g, t0) = governor_in(GovernorState::Draining, policy());
    let c = Car {
        gear: 127,
        ..Car::default()
    };
    let t = t0 + secs(9);
    assert_eq!(
        g.step(&c.state(t), t, work(true)).state,
        GovernorState::Draining
    );
    let t = t0 + secs(10);
    let d = g.step(&c.state(t), t, work(true));
    assert_eq!(
        (d.state, d.reason),
        (GovernorState::Unavailable, Reason::DrainTimeout)
    );
    assert!(
        d.must_evict,
        "work present while Unavailable must still be evicted"
    );
}

/// Deterministic noise for the regression test.
fn noise(i: u64) -> f64 {
    let mut z = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0 // uniform in [-1, 1)
}

/// Regression for the BOINC #5815 failure mode: a noisy SoC drifting slowly across the
/// thresholds. Real crossings: down through stop (50 %) once, up through start (60 %) once.
#[test]
fn noisy_soc_gives_one_start_and_stop_per_real_crossing() {
    let mut p = policy();
    p.quiet_hours.clear();
    let mut g = Governor::new(p, T0);
    let c = Car::default();
    let step = secs(10);
    let n: u64 = 2 * 6 * 3600; // 120 h in 10 s steps: 60 h down, 60 h up
    let (mut starts, mut stops) = (0, 0);
    let (mut naive_on, mut naive_toggles) = (false, 0);
    let mut prev = g.state();
    let mut t = T0;
    for i in 0..n {
        // 64 % → 46 % over the first half, back to 64 % over the second; ±1.5 points of noise
        let x = i as f64 / n as f64;
        let truth = if x < 0.5 {
            64.0 - 36.0 * x
        } else {
            46.0 + 36.0 * (x - 0.5)
        };
        let measured = truth + 1.5 * noise(i);
        let car = Car { soc: measured, ..c };
        let d = g.step(&car.state(t), t, work(true));
        if d.state.is_computing() && !prev.is_computing() {
            starts += 1;
        }
        if d.state == GovernorState::Draining && prev != GovernorState::Draining {
            stops += 1;
        }
        // the anti-example: one threshold, no dwell
        let on = measured > 55.0;
        if on != naive_on {
            naive_toggles += 1;
            naive_on = on;
        }
        // the agent hands work back when told to
        if d.must_evict {
            t = t + Duration::from_millis(1);
            g.step(&car.state(t), t, work(false));
        }
        prev = g.state();
        t = t + step;
    }
    assert_eq!(
        starts, 2,
        "start at the beginning and once after the upward crossing"
    );
    assert_eq!(stops, 1, "stop once at the downward crossing");
    assert!(
        naive_toggles > 20,
        "the naive governor flaps ({naive_toggles} toggles): the test is sensitive"
    );
}
