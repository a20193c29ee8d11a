//! The noisy-SoC regression (BOINC issue #5815: on/off flapping around a threshold).

use std::time::Duration;

use tokenfleet_vehicle::*;

use crate::support::*;

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
