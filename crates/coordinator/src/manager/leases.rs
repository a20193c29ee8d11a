//! The periodic tick: persisting acknowledged tokens, taking jobs back from nodes whose lease
//! ran out, and failing interactive jobs that waited in the queue past their deadline.

use tokenfleet_scheduler::{JobClass, NodeId};

use super::{unix_ms, State};
use crate::error::ApiError;
use crate::jobs::{JobOutcome, Placement};

impl State {
    pub(super) async fn on_tick(&mut self) {
        self.flush_tokens().await;
        self.expire_leases().await;
        self.expire_hand_backs().await;
        self.fail_stale_queue().await;
        self.update_gauges();
        if !self.queue.is_empty() {
            self.wants_dispatch = true;
        }
    }

    /// A node silent for longer than the lease loses its jobs; they continue elsewhere.
    pub(super) async fn expire_leases(&mut self) {
        let lease = self.config.lease_timeout;
        let silent: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| !n.jobs.is_empty() && n.silent_for() > lease)
            .map(|n| n.id)
            .collect();
        for id in silent {
            let node = &self.nodes[&id];
            tracing::warn!(node = %node.name, jobs = node.jobs.len(), "node silent past its lease; requeueing its jobs");
            let jobs: Vec<u64> = node.jobs.iter().copied().collect();
            // A live but silent session is cut so the agent reconnects and resyncs.
            self.close_session(id);
            self.node_gauges_dirty = true;
            self.scheduler.remove_node(id);
            for job in jobs {
                self.metrics.lease_expiries.inc();
                self.requeue(job, id).await;
            }
        }
    }

    /// Interactive jobs that no vehicle could take within the queue timeout fail with 503
    /// (batch jobs wait for their deadline instead).
    pub(super) async fn fail_stale_queue(&mut self) {
        let timeout = self.config.queue_timeout;
        let now_ms = unix_ms();
        let stale: Vec<(u64, ApiError)> = self
            .queue
            .keys()
            .filter_map(|id| {
                let job = &self.jobs[id];
                let Placement::Queued { since } = job.placement else {
                    return None;
                };
                if job.request.deadline_ms.is_some_and(|d| d < now_ms) {
                    return Some((
                        *id,
                        ApiError::unavailable(
                            "the request's deadline passed before a vehicle could finish it",
                        ),
                    ));
                }
                (job.request.class == JobClass::Interactive && since.elapsed() > timeout).then(
                    || {
                        (
                            *id,
                            ApiError::unavailable(format!(
                        "no eligible vehicle could take the request within {} s; retry later",
                        timeout.as_secs()
                    )),
                        )
                    },
                )
            })
            .collect();
        for (id, err) in stale {
            self.metrics
                .rejected
                .with_label_values(&["queue_timeout"])
                .inc();
            self.end(id, JobOutcome::Failed(err)).await;
        }
    }
}
