//! Pure placement and admission for tokenfleet: `(fleet view, queue, now) -> decisions`.
//!
//! No I/O, no clock, no async, no globals: the live coordinator and the simulator call the same
//! code with the same inputs. This crate depends on no other tokenfleet crate.
//!
//! Layout:
//! - [`types`]: ids, [`NodeView`], [`QueuedJob`], [`Decisions`] and reasons.
//! - [`forecast`]: [`DepartureForecast`], remaining parked time as quantiles.
//! - [`predict`]: departure prediction from dwell history, schedule and charging time.
//! - [`constraints`]: the hard constraints ([`check_placement`]) every policy obeys.
//! - [`policy`]: [`PolicyKind`], [`SchedulerConfig`] and the scoring function.
//! - [`scheduler`]: [`Scheduler`] (`upsert_node`, `remove_node`, `decide`) and its contract.
//! - `index` (private): candidate sets by (model, region) with free capacity.
//! - [`trace`]: [`SchedulerTrace`] and [`replay`] for the "one code path" check.
//! - [`rng`]: a tiny deterministic PRNG.
//! - [`hint`]: a cache prefetch hint (no effect on any result).

pub mod constraints;
pub mod forecast;
pub mod hint;
mod index;
pub mod policy;
pub mod predict;
pub mod rng;
pub mod scheduler;
pub mod trace;
pub mod types;

pub use constraints::{check_placement, Violation};
pub use forecast::DepartureForecast;
pub use policy::{PolicyKind, SchedulerConfig, UnknownPolicy};
pub use predict::{DepartureHints, DwellHistory};
pub use scheduler::Scheduler;
pub use trace::{replay, Divergence, NodeChange, SchedulerTrace, StepSink, TraceHeader, TraceStep};
pub use types::{
    Assignment, Decisions, JobClass, JobId, Millis, NodeId, NodeView, PreemptReason, Preemption,
    QueuedJob, RejectReason, Rejection,
};
