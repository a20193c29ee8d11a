//! tokenfleet fleet simulator: discrete-event, virtual time, deterministic from a seed, running
//! the real `tokenfleet-scheduler` through the same driver API the coordinator uses.
//!
//! Layout:
//! - [`scenario`]: scenario TOML files (`scenarios/`), `Scenario::from_file` / `from_name`.
//! - [`compute`]: compute classes as data files (`data/`), with their sources.
//! - [`vehicle_model`]: archetypes and dwell, charging, battery wear, and each vehicle's
//!   `tokenfleet-vehicle` governor (its policy and the signals it is stepped with).
//! - [`workload`]: diurnal Poisson interactive requests, batch dumps, JSON-lines traces.
//! - [`driver`]: the scheduler driver; records and replays [`SchedulerTrace`]s.
//! - [`metrics`]: [`RunReport`], [`CompareReport`].
//! - [`report`]: the readable text report; [`plot`]: PNG/SVG plots with plotters.
//! - `options`: [`RunOptions`], [`Progress`], [`SimError`].
//! - `run`: [`run()`], [`run_checked`], [`compare`].
//! - `parallel`: partitions on threads. `partition`: a run cut into one simulation per model.
//! - `engine`: one partition's event loop (`Sim`), over its parts: `fleet` (vehicles), `jobs`
//!   (the job table and queues), `arrivals` (the workload), `driver` (the scheduler).
//! - `event` / `queue`: the events and the calendar queue; `window`: the clock and the
//!   measurement window; `progress`: progress shared by partitions; `rng`: seeded
//!   distributions.
//!
//! Imports between the simulator's modules go one way: each module below imports only modules
//! on lower lines (each module's own doc says what it owns and what it may import; this file
//! only declares and re-exports). The spine of a run:
//!
//! ```text
//! run ──> parallel ──> engine (Sim) ──> partition ──> fleet, arrivals
//!                         │
//!                         └──> fleet, jobs, arrivals, driver   (the parts a Sim owns)
//! ```
//!
//! | module | imports (simulator modules) |
//! |---|---|
//! | `run` | parallel, partition, report, window, metrics, options, scenario, vehicle_model, workload |
//! | `parallel` | engine, partition, progress, options, scenario |
//! | `engine` | partition, fleet, jobs, arrivals, progress, window, event, driver, metrics, options, scenario, vehicle_model, workload |
//! | `partition` | fleet, arrivals, options, scenario, workload |
//! | `fleet` (+ `roster`, `view`) | window, event, driver, metrics, options, rng, scenario, vehicle_model |
//! | `jobs` | metrics, compute, scenario, workload |
//! | `arrivals` | window, event, scenario, vehicle_model, workload |
//! | `progress` | options |
//! | `report` | metrics, scenario, vehicle_model |
//! | `plot` | metrics |
//! | `window` | options, scenario, vehicle_model |
//! | `event` | queue |
//! | `options` | workload |
//! | `workload` | scenario, rng |
//! | `vehicle_model` | scenario, rng |
//! | `scenario` | compute |
//! | `compute`, `driver`, `metrics`, `queue`, `rng` | none |

pub mod compute;
pub mod driver;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod scenario;
pub mod vehicle_model;
pub mod workload;

mod arrivals;
mod engine;
mod event;
mod fleet;
mod jobs;
mod options;
mod parallel;
mod partition;
mod progress;
mod queue;
mod rng;
mod run;
mod window;

pub use metrics::{CompareReport, RunReport};
pub use options::{Progress, ProgressFn, RunOptions, SimError, DEFAULT_THREADS};
pub use run::{compare, run, run_checked};
pub use scenario::{Scenario, ScenarioError};
pub use tokenfleet_scheduler::{PolicyKind, SchedulerConfig, SchedulerTrace};
