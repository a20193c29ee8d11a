//! The hard constraints every policy obeys. One function, used by the scheduler before every
//! assignment and by the property tests to check it.

use serde::{Deserialize, Serialize};

use crate::types::{NodeView, QueuedJob};

/// A hard constraint a placement would break.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Violation {
    #[error("node is not eligible (governor)")]
    NotEligible,
    #[error("sensitive job on an unattested node")]
    Unattested,
    #[error("node does not hold the model")]
    NoModel,
    #[error("node has no free slot")]
    NoFreeSlot,
    #[error("state of charge unknown or at/below reserve and not plugged in")]
    SocReserve,
    #[error("node lies outside the job's residency regions")]
    Residency,
}

/// Whether `job` may run on `node`. With `freeing_slot`, the caller is about to preempt one of
/// the node's batch jobs, so a full node is acceptable when it runs batch work.
pub fn check_placement(
    job: &QueuedJob,
    node: &NodeView,
    freeing_slot: bool,
) -> Result<(), Violation> {
    if !node.eligible {
        return Err(Violation::NotEligible);
    }
    if job.sensitive && !node.attested {
        return Err(Violation::Unattested);
    }
    if !node.soc_ok() {
        return Err(Violation::SocReserve);
    }
    if !node.models.contains(&job.model) {
        return Err(Violation::NoModel);
    }
    let slot = if freeing_slot {
        node.slots_total > 0 && !node.running_batch.is_empty()
    } else {
        node.has_free_slot()
    };
    if !slot {
        return Err(Violation::NoFreeSlot);
    }
    if let Some(allowed) = &job.residency {
        if !allowed.iter().any(|r| node.regions.contains(r)) {
            return Err(Violation::Residency);
        }
    }
    Ok(())
}
