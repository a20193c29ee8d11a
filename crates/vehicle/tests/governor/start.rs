//! Starting: the eligibility dwell, start blockers, missing and stale signals, work in and out.

use tokenfleet_vehicle::*;

use crate::support::*;

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
