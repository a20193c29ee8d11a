//! `tokenfleet agent --replay FILE --report`: replay a JSON-lines VSS recording through the
//! governor, measure the real engine at every budget it grants, and print the day's report
//! (energy grid/battery, wear, time per governor state, tokens). Offline: no coordinator.
//!
//! The logic is [`tokenfleet_agent::replay::replay_report`]; this file parses flags, loads
//! the policy and the engine, and prints.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokenfleet_agent::replay::{replay_report, ReplayOptions, REPLAY_POLICY};
use tokenfleet_engine::{Engine, EngineConfig};
use tokenfleet_vehicle::Policy;

use crate::cli::EngineArgs;

/// The replay flags, without the engine flags (so `tokenfleet agent` can flatten them next
/// to its own `EngineArgs`).
#[derive(Debug, Clone, PartialEq, Args)]
pub struct ReplayFlags {
    /// Replay this JSON-lines VSS recording through the governor instead of serving
    /// (offline: no coordinator, as fast as possible).
    #[arg(long, env = "TOKENFLEET_REPLAY", value_name = "FILE")]
    pub replay: Option<PathBuf>,
    /// Print the day's report: energy (grid/battery), wear, time per governor state, tokens.
    #[arg(long, env = "TOKENFLEET_REPLAY_REPORT", requires = "replay")]
    pub report: bool,
    /// Print the whole replay (report, timeline, calibration) as one JSON object.
    #[arg(long, env = "TOKENFLEET_REPLAY_JSON", requires = "replay")]
    pub json: bool,
    /// Governor policy TOML (fleet defaults and `[vehicles."VIN"]` overrides); default: the
    /// commuter policy that fits `crates/vehicle/fixtures/commuter-day.jsonl`.
    #[arg(long, env = "TOKENFLEET_VEHICLE_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Vehicle whose per-vehicle policy overrides apply.
    #[arg(long, env = "TOKENFLEET_VIN", default_value = "REPLAY")]
    pub vin: String,
    /// Governor period in virtual seconds (it also steps at every departure-relevant signal).
    #[arg(long, env = "TOKENFLEET_REPLAY_STEP_S", default_value_t = 10.0)]
    pub replay_step_s: f64,
    /// Real seconds the engine is measured at each budget level.
    #[arg(long, env = "TOKENFLEET_CALIBRATION_S", default_value_t = 1.5)]
    pub calibration_s: f64,
    /// Budget levels (utilization is rounded down to multiples of 1/levels).
    #[arg(long, env = "TOKENFLEET_CALIBRATION_LEVELS", default_value_t = 20)]
    pub calibration_levels: u32,
}

impl Default for ReplayFlags {
    /// The same as the flags' defaults (for building `AgentArgs` in code, e.g. `tokenfleet up`).
    fn default() -> Self {
        ReplayFlags {
            replay: None,
            report: false,
            json: false,
            policy: None,
            vin: "REPLAY".into(),
            replay_step_s: 10.0,
            calibration_s: 1.5,
            calibration_levels: 20,
        }
    }
}

/// `--replay` with its own engine flags: what [`run`] takes.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub replay: ReplayFlags,
}

fn seconds(flag: &str, s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("--{flag} {s}: not a duration"))
}

fn load_policy(flags: &ReplayFlags) -> anyhow::Result<Policy> {
    match &flags.policy {
        None => Ok(Policy::from_toml_str(REPLAY_POLICY, &flags.vin)?),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Policy::from_toml_str(&text, &flags.vin)
                .with_context(|| format!("policy {}", path.display()))
        }
    }
}

/// Replays the recording and prints the timeline, the report (`--report`) or JSON (`--json`).
pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let flags = args.replay;
    let file = flags.replay.clone().context("--replay FILE is required")?;
    let policy = load_policy(&flags)?;
    let opts = ReplayOptions {
        step: seconds("replay-step-s", flags.replay_step_s)?,
        calibration: seconds("calibration-s", flags.calibration_s)?,
        levels: flags.calibration_levels,
        ..ReplayOptions::default()
    };
    let mut config = EngineConfig::new(&args.engine.model);
    // One slot per sequence the policy's largest budget may batch.
    config.slots = u32::from(policy.compute.max_batch.max(1));
    config.ctx_per_slot = 512;
    config.threads = args
        .engine
        .threads
        .unwrap_or(u32::from(policy.compute.max_threads.max(1)));
    let threads = config.threads;
    let engine = Engine::load_async(config)
        .await
        .with_context(|| format!("loading {}", args.engine.model.display()))?;
    eprintln!(
        "replaying {} with {} ({} threads, {} slots); the engine is measured at each budget the governor grants",
        file.display(),
        engine.info().name,
        threads,
        engine.info().slots
    );
    let report = replay_report(&file, policy, &engine, &opts).await?;
    if flags.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("governor timeline (local time, state, vehicle, reason):");
    print!("{}", report.timeline());
    if flags.report {
        println!();
        print!("{report}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        replay: ReplayArgs,
    }

    #[test]
    fn flags_parse_and_default_matches_clap() {
        let cli = Cli::try_parse_from(["t", "--model", "m.gguf"]).unwrap();
        assert_eq!(cli.replay.replay, ReplayFlags::default());
        let cli =
            Cli::try_parse_from(["t", "--replay", "day.jsonl", "--report", "--json"]).unwrap();
        assert_eq!(cli.replay.replay.replay, Some(PathBuf::from("day.jsonl")));
        assert!(cli.replay.replay.report && cli.replay.replay.json);
        assert!(
            Cli::try_parse_from(["t", "--report"]).is_err(),
            "--report needs --replay"
        );
    }

    #[test]
    fn default_policy_is_the_commuter_policy() {
        let p = load_policy(&ReplayFlags::default()).unwrap();
        assert!((p.stop_soc_pct - 74.0).abs() < 1e-9);
    }
}
