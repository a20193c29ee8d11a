//! `tokenfleet sim` from the command line: the `--compare --json` contract (one JSON object,
//! `{"policies": {...}}` with the four policies and their figures, plus wall time and peak RSS)
//! and a bad scenario name reported as an error.

use std::process::Command;

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tokenfleet"))
        .arg("sim")
        .args(args)
        .output()
        .expect("run tokenfleet sim")
}

#[test]
fn compare_json_is_one_object_with_every_policy_and_its_figures() {
    let out = sim(&[
        "--scenario",
        "city-mixed",
        "--compare",
        "--json",
        "--vehicles",
        "300",
        "--days",
        "0.1",
        "--threads",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(text.trim().lines().count(), 1, "one JSON object: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let policies = v["policies"].as_object().expect("policies");
    for name in ["random", "first-fit", "tokenfleet", "oracle"] {
        let p = &policies[name];
        for key in [
            "delivered_tokens",
            "wasted_frac",
            "slo_interactive",
            "cost_per_mtok",
            "energy_kwh_grid",
            "energy_kwh_battery",
            "wear_cost",
        ] {
            assert!(p[key].is_number(), "{name}.{key} missing: {p}");
        }
        assert!(p["delivered_tokens"].as_u64().expect("count") > 0, "{name}");
    }
    assert!(v["wall_time_s"].as_f64().expect("wall time") > 0.0);
    assert!(v["peak_rss_mib"].as_f64().expect("peak RSS") > 0.0);
    // f32 figures keep their short decimal form.
    assert_eq!(policies["tokenfleet"]["calibration"]["levels"][0], 0.1);
}

#[test]
fn an_unknown_scenario_is_an_error_naming_it() {
    let out = sim(&["--scenario", "no-such-scenario"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-scenario"), "{err}");
}
