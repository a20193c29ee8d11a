//! Stopping: departures, stop conditions, hysteresis and draining.

use std::time::Duration;

use tokenfleet_vehicle::governor::UsageToday;
use tokenfleet_vehicle::*;

use crate::support::*;

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
