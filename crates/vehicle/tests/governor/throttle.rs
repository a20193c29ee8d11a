//! Throttling on compute temperature and the exit dwell.

use tokenfleet_vehicle::*;

use crate::support::*;

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
