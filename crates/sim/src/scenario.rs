//! Scenario files (TOML): fleet composition, links, workload and economics.
//!
//! Owns: `Scenario` and its parts, their loading and validation (with each archetype's
//! governor policy). May import: `compute`.

use serde::{Deserialize, Serialize};
use std::path::Path;

use tokenfleet_vehicle::{Policy, PolicyError};

use crate::compute::{ComputeClass, ComputeError};

/// Errors loading a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing scenario: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("unknown scenario {0:?} (shipped: city-mixed, depot-vans, scale-1m)")]
    UnknownName(String),
    #[error("invalid scenario: {0}")]
    Invalid(String),
    #[error(transparent)]
    Compute(#[from] ComputeError),
}

/// Vehicle usage pattern; dwell distributions live in [`crate::vehicle_model`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArchetypeKind {
    Commuter,
    DeliveryVan,
    RideHail,
    CarShare,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Archetype {
    pub kind: ArchetypeKind,
    pub share: f64,
    #[serde(default = "d_battery")]
    pub battery_kwh: f32,
    /// Probability that a stay at home/work/depot/public is plugged in.
    #[serde(default)]
    pub plug_prob: PlugProb,
    /// Operator policy: compute on battery above the reserve (else only while plugged).
    #[serde(default = "d_true")]
    pub compute_on_battery: bool,
    #[serde(default = "d_reserve")]
    pub soc_reserve_pct: f32,
    /// Extra operator policy for this archetype's governor, in `tokenfleet-vehicle`'s policy
    /// TOML (quiet hours, daily budgets, `[timing]`); SoC levels and the cable rule come from
    /// the fields above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub governor: Option<String>,
}

/// Start SoC above the archetype's reserve (the governor's SoC hysteresis band), percentage
/// points: a vehicle stopped at its reserve starts again only this far above it.
pub const HYSTERESIS_PCT: f32 = 5.0;

impl Archetype {
    /// The operator policy of this archetype, as `tokenfleet-vehicle` reads it: the departure
    /// reserve is the stop SoC, start is [`HYSTERESIS_PCT`] above it, `compute_on_battery =
    /// false` requires the cable; `governor` (extra policy TOML: quiet hours, budgets,
    /// `[timing]`) is appended.
    pub fn governor_policy(&self, utc_offset_min: i32) -> Result<Policy, PolicyError> {
        let off = utc_offset_min.unsigned_abs();
        let sign = if utc_offset_min < 0 { '-' } else { '+' };
        let toml = format!(
            "pack_capacity_kwh = {}\nutc_offset = \"{sign}{:02}:{:02}\"\nrequire_plugged_in = {}\n\
             soc = {{ start = {}, stop = {} }}\n{}\n",
            self.battery_kwh,
            off / 60,
            off % 60,
            !self.compute_on_battery,
            (self.soc_reserve_pct + HYSTERESIS_PCT).min(100.0),
            self.soc_reserve_pct,
            self.governor.as_deref().unwrap_or(""),
        );
        Policy::fleet_defaults_from_toml_str(&toml)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlugProb {
    pub home: f64,
    pub work: f64,
    pub depot: f64,
    pub public: f64,
}

impl Default for PlugProb {
    fn default() -> Self {
        Self {
            home: 0.6,
            work: 0.3,
            depot: 0.9,
            public: 0.3,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComputeShare {
    /// Name of a compute class under `crates/sim/data/` (or a path to a TOML file).
    pub class: String,
    pub share: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegionShare {
    /// Regions a vehicle of this group lies in (e.g. `["eu", "eu-nl"]`).
    pub names: Vec<String>,
    pub share: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkConfig {
    pub rtt_ms_home: f32,
    pub rtt_ms_work: f32,
    pub rtt_ms_depot: f32,
    pub rtt_ms_public: f32,
    /// Link bandwidth to a parked vehicle, Mbit/s: a job's input (prompts, and on a resume the
    /// tokens already generated) is sent at this rate before its prefill starts (0: instant).
    pub bandwidth_mbps: f32,
    /// Link outages per parked hour (Poisson); an outage evicts running work abruptly.
    pub outages_per_hour: f64,
    pub outage_minutes: f64,
    /// Probability a departure hands work back gracefully (only in-flight tokens lost);
    /// otherwise everything since the last acknowledged checkpoint is lost.
    pub graceful_handback: f64,
    pub ack_interval_s_interactive: f64,
    pub ack_interval_s_batch: f64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            rtt_ms_home: 30.0,
            rtt_ms_work: 40.0,
            rtt_ms_depot: 25.0,
            rtt_ms_public: 90.0,
            bandwidth_mbps: 20.0,
            outages_per_hour: 0.02,
            outage_minutes: 5.0,
            graceful_handback: 0.9,
            ack_interval_s_interactive: 0.5,
            ack_interval_s_batch: 10.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelShare {
    pub name: String,
    pub share: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResidencyShare {
    /// `None` = anywhere.
    #[serde(default)]
    pub regions: Option<Vec<String>>,
    pub share: f64,
}

/// A batch dump released every day at `at_hour` (local).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchDump {
    pub at_hour: f64,
    pub requests: u64,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    /// Requests grouped into one scheduler job (run back to back on one slot).
    #[serde(default = "d_one")]
    pub shard: u32,
    pub deadline_hours: Option<f64>,
    pub model: String,
    #[serde(default)]
    pub residency: Option<Vec<String>>,
    #[serde(default)]
    pub weekdays_only: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Workload {
    /// Interactive requests per second at the daily peak (whole fleet).
    pub interactive_peak_rps: f64,
    /// Relative interactive load per local hour (24 values, peak = max).
    pub diurnal: Vec<f64>,
    pub interactive_prompt_tokens: u32,
    pub interactive_max_tokens: u32,
    pub interactive_sensitive_frac: f64,
    pub ttft_slo_ms: u64,
    pub models: Vec<ModelShare>,
    pub residency: Vec<ResidencyShare>,
    pub batch: Vec<BatchDump>,
    /// Optional JSON-lines trace replacing the generated requests (see `workload` module).
    pub trace: Option<String>,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            interactive_peak_rps: 1.0,
            diurnal: vec![
                0.15, 0.1, 0.08, 0.07, 0.08, 0.12, 0.25, 0.45, 0.65, 0.8, 0.9, 0.95, 1.0, 0.95,
                0.9, 0.9, 0.92, 0.95, 0.9, 0.85, 0.75, 0.6, 0.4, 0.25,
            ],
            interactive_prompt_tokens: 600,
            interactive_max_tokens: 300,
            interactive_sensitive_frac: 0.1,
            ttft_slo_ms: 2000,
            models: vec![],
            residency: vec![ResidencyShare {
                regions: None,
                share: 1.0,
            }],
            batch: vec![],
            trace: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Economics {
    pub price_per_mtok_interactive: f64,
    pub price_per_mtok_batch: f64,
    pub tariff_home: f32,
    pub tariff_work: f32,
    pub tariff_depot: f32,
    pub tariff_public: f32,
    /// Battery energy is bought back at home with this charging efficiency.
    pub charge_efficiency: f32,
    /// Pack replacement cost, currency per kWh of capacity (wear cost basis).
    pub pack_cost_per_kwh: f64,
    /// Whole awake vehicle draw while computing, W (Sentry-mode measurement ~300 W).
    pub awake_w: f32,
}

impl Default for Economics {
    fn default() -> Self {
        Self {
            price_per_mtok_interactive: 0.60,
            price_per_mtok_batch: 0.20,
            tariff_home: 0.30,
            tariff_work: 0.25,
            tariff_depot: 0.18,
            tariff_public: 0.55,
            charge_efficiency: 0.9,
            pack_cost_per_kwh: 130.0,
            awake_w: 300.0,
        }
    }
}

/// A simulation scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub vehicles: u32,
    #[serde(default = "d_days")]
    pub days: f64,
    /// Days simulated before measurement so every vehicle has a dwell history.
    #[serde(default = "d_warmup")]
    pub warmup_days: u32,
    /// Local hour at which measurement starts (0 = midnight). Starting at noon puts a whole
    /// night, with the deadlines of the evening batch dumps, inside a one-day run.
    #[serde(default)]
    pub start_hour: f64,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Local time offset, minutes (simulation starts Monday 00:00 local).
    #[serde(default)]
    pub utc_offset_min: i32,
    /// Scheduler dispatch cadence, ms.
    #[serde(default = "d_dispatch")]
    pub dispatch_ms: u64,
    pub archetypes: Vec<Archetype>,
    pub compute: Vec<ComputeShare>,
    pub regions: Vec<RegionShare>,
    #[serde(default)]
    pub link: LinkConfig,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub economics: Economics,
    /// Scheduler tunables (`[scheduler]`, any subset of `tokenfleet_scheduler::SchedulerConfig`;
    /// the rest keep their defaults). `RunOptions::scheduler` overrides the whole table.
    #[serde(default)]
    pub scheduler: tokenfleet_scheduler::SchedulerConfig,
    /// Resolved compute classes (filled by `resolve`).
    #[serde(skip)]
    pub classes: Vec<ComputeClass>,
}

fn d_battery() -> f32 {
    60.0
}
fn d_true() -> bool {
    true
}
fn d_reserve() -> f32 {
    50.0
}
fn d_one() -> u32 {
    1
}
fn d_days() -> f64 {
    1.0
}
fn d_warmup() -> u32 {
    7
}
fn d_seed() -> u64 {
    42
}
fn d_dispatch() -> u64 {
    250
}

const SHIPPED: [(&str, &str); 3] = [
    ("city-mixed", include_str!("../scenarios/city-mixed.toml")),
    ("depot-vans", include_str!("../scenarios/depot-vans.toml")),
    ("scale-1m", include_str!("../scenarios/scale-1m.toml")),
];

impl Scenario {
    /// Parse and validate a scenario from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ScenarioError> {
        let mut s: Scenario = toml::from_str(text)?;
        s.resolve()?;
        Ok(s)
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ScenarioError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// One of the shipped scenarios (`city-mixed`, `depot-vans`, `scale-1m`), or a file path.
    pub fn from_name(name: &str) -> Result<Self, ScenarioError> {
        match SHIPPED.iter().find(|(n, _)| *n == name) {
            Some((_, text)) => Self::from_toml(text),
            None if name.ends_with(".toml") => Self::from_file(name),
            None => Err(ScenarioError::UnknownName(name.to_string())),
        }
    }

    /// Validate shares and load compute classes.
    pub fn resolve(&mut self) -> Result<(), ScenarioError> {
        let invalid = |m: &str| Err(ScenarioError::Invalid(m.to_string()));
        if self.vehicles == 0 {
            return invalid("vehicles must be > 0");
        }
        if !(self.days > 0.0 && self.days <= 366.0) {
            return invalid("days must be in (0, 366]");
        }
        if self.archetypes.is_empty() || self.compute.is_empty() || self.regions.is_empty() {
            return invalid("archetypes, compute and regions must not be empty");
        }
        let shares = self
            .archetypes
            .iter()
            .map(|a| a.share)
            .chain(self.compute.iter().map(|c| c.share))
            .chain(self.regions.iter().map(|r| r.share))
            .chain(self.workload.models.iter().map(|m| m.share))
            .chain(self.workload.residency.iter().map(|r| r.share));
        for s in shares {
            if !(s.is_finite() && s >= 0.0) {
                return invalid("shares must be finite and >= 0");
            }
        }
        if self.workload.diurnal.len() != 24 {
            return invalid("workload.diurnal needs 24 values");
        }
        if self.dispatch_ms == 0 {
            return invalid("dispatch_ms must be > 0");
        }
        for a in &self.archetypes {
            if let Err(e) = a.governor_policy(self.utc_offset_min) {
                return Err(ScenarioError::Invalid(format!(
                    "archetype {:?}: governor policy: {e}",
                    a.kind
                )));
            }
        }
        self.classes = self
            .compute
            .iter()
            .map(|c| ComputeClass::load(&c.class))
            .collect::<Result<_, _>>()?;
        Ok(())
    }
}
