//! Print the measured figures for a scenario.
//!
//! `cargo run --release -p tokenfleet-sim --example figures -- [SCENARIO] [--policy P | --compare]
//!  [--vehicles N] [--days D] [--seed S] [--threads N] [--json] [--plots DIR]`
//!
//! Prints wall time and peak RSS (from /proc/self/status) to stderr.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Instant;

use tokenfleet_sim::{compare, plot, report, run, PolicyKind, RunOptions, Scenario};

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut scenario = "city-mixed".to_string();
    let mut policy: Option<PolicyKind> = None;
    let mut opts = RunOptions::default();
    let mut json = false;
    let mut plots: Option<PathBuf> = None;
    let mut i = 0;
    while i < args.len() {
        let next = |i: usize| args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--policy" => {
                policy = PolicyKind::from_str(&next(i)).ok();
                i += 1;
            }
            "--compare" => policy = None,
            "--vehicles" => {
                opts.vehicles = next(i).parse().ok();
                i += 1;
            }
            "--days" => {
                opts.days = next(i).parse().ok();
                i += 1;
            }
            "--threads" => {
                opts.threads = next(i).parse().ok();
                i += 1;
            }
            "--seed" => {
                opts.seed = next(i).parse().ok();
                i += 1;
            }
            "--json" => json = true,
            "--plots" => {
                plots = Some(PathBuf::from(next(i)));
                i += 1;
            }
            other => scenario = other.to_string(),
        }
        i += 1;
    }
    let sc = match Scenario::from_name(&scenario) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    opts.progress = Some(std::sync::Arc::new(|p: tokenfleet_sim::Progress| {
        eprint!(
            "\r{:<10} {:>5.1}%",
            p.policy.to_string(),
            p.fraction * 100.0
        );
    }));
    let t = Instant::now();
    match policy {
        Some(p) => {
            let r = run(&sc, p, &opts);
            eprintln!();
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                print!("{}", report::text(&r));
            }
            if let Some(dir) = &plots {
                match plot::plot_run(&r, dir) {
                    Ok(files) => eprintln!("plots: {files:?}"),
                    Err(e) => eprintln!("plot error: {e}"),
                }
            }
        }
        None => {
            let c = compare(&sc, &opts);
            eprintln!();
            if json {
                println!("{}", serde_json::to_string_pretty(&c).unwrap_or_default());
            } else {
                for r in c.policies.values() {
                    print!("{}", report::text(r));
                }
                print!("\n{}", report::compare_table(&c));
            }
            if let Some(dir) = &plots {
                let mut files = plot::plot_compare(&c, dir);
                if let (Ok(f), Some(r)) = (&mut files, c.policies.get("tokenfleet")) {
                    if let Ok(more) = plot::plot_run(r, dir) {
                        f.extend(more);
                    }
                }
                match files {
                    Ok(files) => eprintln!("plots: {files:?}"),
                    Err(e) => eprintln!("plot error: {e}"),
                }
            }
        }
    }
    eprintln!(
        "wall time {:.1} s, peak RSS {:.0} MiB",
        t.elapsed().as_secs_f64(),
        peak_rss_mib().unwrap_or(f64::NAN)
    );
}
