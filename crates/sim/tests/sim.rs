//! Simulator tests: determinism, seed sensitivity, the one-code-path replay, report shape.

use tokenfleet_sim::driver::Driver;
use tokenfleet_sim::{compare, run, run_checked, PolicyKind, RunOptions, Scenario};

fn small() -> (Scenario, RunOptions) {
    let mut sc = Scenario::from_name("city-mixed").expect("shipped scenario");
    sc.warmup_days = 2;
    // Scale the workload down with the fleet (300 of 10,000 vehicles).
    sc.workload.interactive_peak_rps *= 0.03;
    for b in &mut sc.workload.batch {
        b.requests = b.requests * 3 / 100;
    }
    let opts = RunOptions {
        vehicles: Some(300),
        days: Some(0.5),
        ..RunOptions::default()
    };
    (sc, opts)
}

#[test]
fn same_seed_same_json_different_seed_differs() {
    let (sc, opts) = small();
    let a = serde_json::to_string(&run(&sc, PolicyKind::Tokenfleet, &opts)).expect("json");
    let b = serde_json::to_string(&run(&sc, PolicyKind::Tokenfleet, &opts)).expect("json");
    assert_eq!(a, b);
    let other = RunOptions {
        seed: Some(7),
        ..opts.clone()
    };
    let c = serde_json::to_string(&run(&sc, PolicyKind::Tokenfleet, &other)).expect("json");
    assert_ne!(a, c);
}

#[test]
fn the_report_does_not_depend_on_the_thread_count() {
    let (sc, opts) = small();
    let one = RunOptions {
        threads: Some(1),
        ..opts.clone()
    };
    let three = RunOptions {
        threads: Some(3),
        ..opts.clone()
    };
    let a = serde_json::to_string(&run(&sc, PolicyKind::Tokenfleet, &one)).expect("json");
    let b = serde_json::to_string(&run(&sc, PolicyKind::Tokenfleet, &three)).expect("json");
    let c = serde_json::to_string(&run(&sc, PolicyKind::Tokenfleet, &opts)).expect("json");
    assert_eq!(a, b);
    assert_eq!(a, c);
}

#[test]
fn trace_recorded_from_a_sim_run_replays_identically() {
    let (sc, mut opts) = small();
    opts.days = Some(0.2);
    opts.vehicles = Some(120);
    opts.record_trace = true;
    for policy in PolicyKind::ALL {
        let (report, traces) = run_checked(&sc, policy, &opts).expect("run");
        // One scheduler, so one trace, per model.
        assert_eq!(traces.len(), 3, "{policy}");
        assert!(report.delivered_tokens > 0);
        for trace in &traces {
            assert!(trace
                .steps
                .iter()
                .any(|s| !s.decisions.assignments.is_empty()));
            // Through JSON, as the coordinator would store it.
            let json = serde_json::to_string(trace).expect("json");
            let back = serde_json::from_str(&json).expect("parse");
            assert_eq!(tokenfleet_scheduler::replay(&back), Ok(()), "{policy}");
            assert_eq!(Driver::replay(&back), Ok(()), "{policy}");
            // A tampered trace must be caught.
            let mut bad = back.clone();
            if let Some(step) = bad
                .steps
                .iter_mut()
                .find(|s| !s.decisions.assignments.is_empty())
            {
                step.decisions.assignments.pop();
            }
            assert!(Driver::replay(&bad).is_err());
        }
    }
}

/// The JSON contract itself (every policy, the required fields) is tested on the command
/// line: `crates/tokenfleet/tests/sim_cli.rs`.
#[test]
fn compare_runs_every_policy_with_figures_in_range() {
    let (sc, mut opts) = small();
    opts.days = Some(0.25);
    opts.vehicles = Some(100);
    let c = compare(&sc, &opts);
    for p in ["random", "first-fit", "tokenfleet", "oracle"] {
        assert!(c.policies.contains_key(p), "{p}");
    }
    let tf = &c.policies["tokenfleet"];
    assert!(tf.delivered_tokens > 0);
    assert!((0.0..=1.0).contains(&tf.wasted_frac));
    assert!((0.0..=1.0).contains(&tf.slo_interactive));
    assert_eq!(tf.calibration.levels.len(), 5);
}

#[test]
fn shipped_scenarios_parse_and_bad_input_is_an_error() {
    for name in ["city-mixed", "depot-vans", "scale-1m"] {
        let s = Scenario::from_name(name).expect(name);
        assert!(!s.classes.is_empty());
    }
    assert_eq!(
        Scenario::from_name("scale-1m").expect("1m").vehicles,
        1_000_000
    );
    assert!(Scenario::from_name("nope").is_err());
    assert!(Scenario::from_toml("name = 3").is_err());
    assert!(Scenario::from_file("/nonexistent/x.toml").is_err());
    let mut s = Scenario::from_name("depot-vans").expect("vans");
    s.workload.diurnal.pop();
    assert!(s.resolve().is_err());
}

#[test]
fn oracle_is_never_evicted_by_a_departure_it_could_see() {
    // With true departure times the oracle only loses work to link outages and SoC floors, so
    // it wastes no more than first-fit.
    let (sc, opts) = small();
    let o = run(&sc, PolicyKind::Oracle, &opts);
    let f = run(&sc, PolicyKind::FirstFit, &opts);
    assert!(
        o.evictions <= f.evictions,
        "{} > {}",
        o.evictions,
        f.evictions
    );
}

#[test]
fn an_interactive_answer_cut_by_an_eviction_misses_its_slo() {
    // Frequent link outages cut answers while they stream; every cut request must be counted
    // as missing the SLO, and its second TTFT must enter the TTFT distribution.
    let (mut sc, mut opts) = small();
    sc.link.outages_per_hour = 2.0;
    sc.link.outage_minutes = 1.0;
    opts.days = Some(0.25);
    let r = run(&sc, PolicyKind::FirstFit, &opts);
    assert!(r.interactive_cut > 0, "no answer was cut");
    let ok = (r.slo_interactive * r.interactive_jobs as f64).round() as u64;
    assert!(
        ok + r.interactive_cut <= r.interactive_jobs,
        "{ok} within SLO + {} cut > {} jobs",
        r.interactive_cut,
        r.interactive_jobs
    );
}

#[test]
fn a_slow_link_delays_the_first_token_by_the_input_transfer() {
    // 0.1 Mbit/s: a ~600-token prompt (4 bytes a token) takes about 0.2 s to send, at 20
    // Mbit/s about 1 ms.
    let (mut sc, mut opts) = small();
    opts.days = Some(0.25);
    let fast = run(&sc, PolicyKind::FirstFit, &opts);
    sc.link.bandwidth_mbps = 0.1;
    let slow = run(&sc, PolicyKind::FirstFit, &opts);
    assert!(fast.interactive_jobs > 100, "{}", fast.interactive_jobs);
    assert!(
        slow.ttft_p50_ms >= fast.ttft_p50_ms + 100.0,
        "TTFT p50 {} ms at 0.1 Mbit/s vs {} ms at 20",
        slow.ttft_p50_ms,
        fast.ttft_p50_ms
    );
}

#[test]
fn governor_policy_from_the_scenario_is_enforced() {
    // Quiet hours all day long: `tokenfleet-vehicle`'s governor never lets a vehicle compute,
    // so nothing is delivered (the same run without them delivers).
    let (mut sc, mut opts) = small();
    opts.days = Some(0.25);
    let open = run(&sc, PolicyKind::Tokenfleet, &opts);
    assert!(open.delivered_tokens > 0);
    for a in &mut sc.archetypes {
        a.governor = Some(r#"quiet_hours = ["00:00-12:00", "12:00-00:00"]"#.to_string());
    }
    let quiet = run(&sc, PolicyKind::Tokenfleet, &opts);
    assert_eq!(quiet.delivered_tokens, 0);
    assert!(quiet.interactive_jobs > 0);
    // A policy the vehicle crate rejects is a scenario error.
    sc.archetypes[0].governor = Some("[soc]\nstrat = 1".to_string());
    assert!(sc.resolve().is_err());
}

#[test]
fn no_work_on_a_vehicle_below_its_reserve_and_unplugged() {
    // Every assignment in a recorded run goes to a node whose last view (as the simulator,
    // stepping the vehicle crate's governor, reported it) was eligible and plugged in or above
    // its SoC reserve.
    let (sc, mut opts) = small();
    opts.days = Some(0.2);
    opts.vehicles = Some(120);
    opts.record_trace = true;
    let (_, traces) = run_checked(&sc, PolicyKind::Tokenfleet, &opts).expect("run");
    assert!(!traces.is_empty());
    let mut views = std::collections::HashMap::new();
    let mut assigned = 0;
    for s in traces.iter().flat_map(|t| {
        // Node ids are per partition: each trace starts with its own views.
        std::iter::once(None).chain(t.steps.iter().map(Some))
    }) {
        let Some(s) = s else {
            views.clear();
            continue;
        };
        for c in &s.nodes {
            if let tokenfleet_scheduler::NodeChange::Upsert(v) = c {
                views.insert(v.id, v.clone());
            }
        }
        for a in &s.decisions.assignments {
            let v = &views[&a.node];
            assert!(v.eligible, "{a:?} on an ineligible node");
            let soc = v.soc_pct.expect("soc reported");
            assert!(
                v.plugged_in || soc > v.soc_reserve_pct,
                "{a:?}: unplugged at {soc}% <= reserve {}%",
                v.soc_reserve_pct
            );
            assigned += 1;
        }
    }
    assert!(assigned > 0);
}
