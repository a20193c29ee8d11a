//! `tokenfleet sim`: run the fleet simulator (the real scheduler) on a scenario and print the
//! report, wall time and peak RSS.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokenfleet_sim::{compare, plot, report, PolicyKind, Progress, RunOptions, Scenario};

/// Simulate a fleet: tokens, waste, SLOs, energy, wear and money per policy.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// A shipped scenario (city-mixed, depot-vans, scale-1m) or a scenario TOML file.
    #[arg(long, env = "TOKENFLEET_SIM_SCENARIO", default_value = "city-mixed")]
    pub scenario: String,
    /// Placement policy: random, first-fit, tokenfleet or oracle.
    #[arg(long, env = "TOKENFLEET_SIM_POLICY", default_value = "tokenfleet",
          value_parser = parse_policy, conflicts_with = "compare")]
    pub policy: PolicyKind,
    /// Run every policy on the same scenario and seed and print a comparison.
    #[arg(long, env = "TOKENFLEET_SIM_COMPARE")]
    pub compare: bool,
    /// Override the scenario's number of vehicles (the workload is not rescaled).
    #[arg(long, env = "TOKENFLEET_SIM_VEHICLES")]
    pub vehicles: Option<u32>,
    /// Override the measured days.
    #[arg(long, env = "TOKENFLEET_SIM_DAYS")]
    pub days: Option<f64>,
    /// Override the scenario's seed.
    #[arg(long, env = "TOKENFLEET_SIM_SEED")]
    pub seed: Option<u64>,
    /// Print one JSON object instead of the text report.
    #[arg(long, env = "TOKENFLEET_SIM_JSON")]
    pub json: bool,
    /// Write PNG and SVG plots into this directory.
    #[arg(long, env = "TOKENFLEET_SIM_PLOTS")]
    pub plots: Option<PathBuf>,
    /// Threads to simulate on (each model's vehicles and jobs are one partition; the report
    /// does not depend on this). Default: 2.
    #[arg(long, env = "TOKENFLEET_SIM_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
}

/// A report with the run's wall time and peak RSS beside its own fields. Serialized directly
/// (not through `serde_json::Value`, which widens `f32` fields: calibration level 0.1 would
/// print as 0.10000000149011612).
#[derive(serde::Serialize)]
struct Timed<'a, T: serde::Serialize> {
    #[serde(flatten)]
    report: &'a T,
    wall_time_s: f64,
    peak_rss_mib: Option<f64>,
}

fn parse_policy(s: &str) -> Result<PolicyKind, String> {
    s.parse::<PolicyKind>().map_err(|e| e.to_string())
}

/// Peak resident set size of this process, MiB (`VmHWM` in /proc/self/status).
pub fn peak_rss_mib() -> Option<f64> {
    crate::procfs::status_kib("VmHWM").map(|kib| kib as f64 / 1024.0)
}

fn progress_bar(hidden: bool, policies: u64) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(
        Some(policies * 1000),
        if hidden {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:40} {percent:>3}% {msg} (eta {eta})",
    ) {
        pb.set_style(style);
    }
    pb
}

pub fn run(args: SimArgs) -> anyhow::Result<()> {
    let sc = Scenario::from_name(&args.scenario)
        .with_context(|| format!("loading scenario {:?}", args.scenario))?;
    let policies: Vec<PolicyKind> = if args.compare {
        PolicyKind::ALL.to_vec()
    } else {
        vec![args.policy]
    };
    let hidden = args.json || !std::io::stderr().is_terminal();
    let pb = progress_bar(hidden, policies.len() as u64);
    let order = policies.clone();
    let bar = pb.clone();
    let progress: tokenfleet_sim::ProgressFn = Arc::new(move |p: Progress| {
        let done = order.iter().position(|&q| q == p.policy).unwrap_or(0) as u64;
        bar.set_message(p.policy.to_string());
        bar.set_position(done * 1000 + (p.fraction * 1000.0) as u64);
    });
    let opts = RunOptions {
        seed: args.seed,
        vehicles: args.vehicles,
        days: args.days,
        progress: Some(progress),
        threads: args.threads.map(usize::from),
        ..RunOptions::default()
    };
    let started = Instant::now();
    let mut out = std::io::stdout().lock();
    let mut plots = Vec::new();
    if args.compare {
        let c = compare(&sc, &opts);
        pb.finish_and_clear();
        if let Some(dir) = &args.plots {
            plots = plot::plot_compare(&c, dir).context("plotting")?;
            if let Some(r) = c.policies.get("tokenfleet") {
                plots.extend(plot::plot_run(r, dir).context("plotting")?);
            }
        }
        let wall_s = started.elapsed().as_secs_f64();
        if args.json {
            let timed = Timed {
                report: &c,
                wall_time_s: wall_s,
                peak_rss_mib: peak_rss_mib(),
            };
            writeln!(out, "{}", serde_json::to_string(&timed)?)?;
        } else {
            for r in c.policies.values() {
                write!(out, "{}", report::text(r))?;
            }
            write!(out, "\n{}", report::compare_table(&c))?;
        }
    } else {
        let r = tokenfleet_sim::run(&sc, args.policy, &opts);
        pb.finish_and_clear();
        if let Some(dir) = &args.plots {
            plots = plot::plot_run(&r, dir).context("plotting")?;
        }
        if args.json {
            let timed = Timed {
                report: &r,
                wall_time_s: started.elapsed().as_secs_f64(),
                peak_rss_mib: peak_rss_mib(),
            };
            writeln!(out, "{}", serde_json::to_string(&timed)?)?;
        } else {
            write!(out, "{}", report::text(&r))?;
        }
    }
    if !args.json {
        for f in &plots {
            writeln!(out, "plot: {}", f.display())?;
        }
        writeln!(
            out,
            "wall time {:.1} s, peak RSS {:.0} MiB",
            started.elapsed().as_secs_f64(),
            peak_rss_mib().unwrap_or(f64::NAN)
        )?;
    }
    Ok(())
}
