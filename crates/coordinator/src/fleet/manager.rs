//! The job manager: one task that owns the jobs, the queue and the fleet view.
//!
//! HTTP handlers and node sessions talk to it through a bounded channel ([`Manager`]). It
//! hands the scheduler the fleet view and the queue, sends `Assign`s over node sessions, folds
//! token chunks into jobs, takes jobs back from nodes that leave or go silent (they resume
//! elsewhere from their tokens), and writes progress to the store through an ordered writer.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::clock::unix_ms;
use crate::fleet::queue::JobQueue;

use tokenfleet_protocol::v1::{self};
use tokenfleet_protocol::CoordinatorMsg;
use tokenfleet_scheduler::{JobClass, NodeId, Scheduler};
use tokio::sync::{mpsc, watch};

use crate::config::CoordinatorConfig;
use crate::domain::error::RequestError;
use crate::domain::job::{Job, JobHandle, JobOutcome, JobText, JobView, Placement};
use crate::domain::request::ValidRequest;
use crate::domain::store::{JobState, Outcome, StoredJob, StoredToken};
use crate::fleet::nodes::Node;
use crate::fleet::writer::{StoreWriter, WriteOp};
use crate::metrics::Metrics;

mod dispatch;
mod handback;
mod handle;
#[cfg(any(test, feature = "fuzzing"))]
pub mod harness;
mod leases;
mod node_events;
mod verdicts;

use handle::Cmd;
pub use handle::{Deps, Manager, NewJob, NodeRefusal, Registered};

/// Commands the manager handles before it runs the scheduler once (bounded, so ticks and
/// dispatch still come round under a flood of messages).
const MAX_CMDS_PER_DISPATCH: usize = 256;

struct State {
    config: Arc<CoordinatorConfig>,
    metrics: Arc<Metrics>,
    scheduler: Scheduler,
    writer: StoreWriter,
    jobs: HashMap<u64, Job>,
    /// Jobs waiting for a vehicle, oldest first.
    queue: JobQueue,
    nodes: HashMap<NodeId, Node>,
    node_names: HashMap<String, NodeId>,
    next_node: u64,
    next_conn: u64,
    /// Nodes whose view changed since the scheduler last saw them.
    dirty_nodes: HashSet<NodeId>,
    wants_dispatch: bool,
    /// Connected sessions per model name (the source of [`Manager::models`]).
    model_sessions: crate::fleet::nodes::ModelSessions,
    models_tx: watch::Sender<Arc<crate::fleet::nodes::ServedModels>>,
    /// A session opened or closed or a governor state changed since the node gauges were
    /// counted (counting walks the whole fleet, so it is skipped when nothing changed).
    node_gauges_dirty: bool,
    /// Residency regions; a node's are recomputed from each `State`'s position.
    regions: Arc<crate::policy::regions::RegionMap>,
    /// Result verification, when enabled.
    verify: Option<verdicts::Verification>,
    /// In a cluster of coordinators (`[cluster]`).
    cluster: Option<ClusterLink>,
}

/// What the manager of one coordinator among several needs to hand jobs to and from the
/// others: the store's claims, and a handle on itself for the tasks it starts.
struct ClusterLink {
    store: crate::domain::store::Store,
    tx: mpsc::WeakSender<Cmd>,
    models: watch::Receiver<Arc<crate::fleet::nodes::ServedModels>>,
}

impl ClusterLink {
    /// A handle on the manager, unless it is stopping.
    fn manager(&self) -> Option<Manager> {
        Some(Manager::from_parts(self.tx.upgrade()?, self.models.clone()))
    }
}

impl State {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Cmd>,
        mut reports: Option<mpsc::Receiver<crate::trust::verify::Report>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick =
            tokio::time::interval(self.config.persist_interval.min(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => {
                        self.handle(cmd).await;
                        // Take what else is waiting, then run the scheduler once for all.
                        for _ in 1..MAX_CMDS_PER_DISPATCH {
                            match rx.try_recv() {
                                Ok(cmd) => self.handle(cmd).await,
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                report = next_report(&mut reports) => match report {
                    Some(report) => self.on_verified(report).await,
                    // The verifier stopped: its queue is closed, offers are dropped.
                    None => reports = None,
                },
                _ = tick.tick() => {
                    self.on_tick().await;
                    self.poll_operator().await;
                }
                _ = shutdown.changed() => break,
            }
            if self.wants_dispatch {
                self.dispatch().await;
            }
        }
        self.flush_tokens().await;
        tracing::info!("job manager stopped");
    }

    /// A node's name for logs. A node id the manager does not know would be a bug; it is
    /// logged as "?" rather than taking the manager (and every job) down.
    fn node_name(&self, id: NodeId) -> &str {
        self.nodes.get(&id).map_or("?", |n| n.name.as_str())
    }

    fn recover(&mut self, stored: StoredJob) {
        let (view, _) = watch::channel(JobView {
            prompt_tokens: stored.prompt_tokens,
            tokens: stored.tokens,
            outcome: None,
            restarts: 0,
        });
        let persisted = view.borrow().tokens.len();
        let text = {
            let ids: Vec<i32> = view.borrow().tokens.iter().map(|t| t.id).collect();
            self.job_text(&stored.request, &ids)
        };
        tracing::debug!(
            job = stored.id,
            tokens = persisted,
            "job queued from the store"
        );
        self.jobs.insert(
            stored.id,
            Job {
                id: stored.id,
                public_id: stored.public_id,
                tenant: stored.tenant,
                request: stored.request,
                created_ms: stored.created_ms,
                accepted: Instant::now(),
                view,
                placement: Placement::Queued {
                    since: Instant::now(),
                },
                persisted,
                first_token_seen: persisted > 0,
                failures: 0,
                producers: Vec::new(),
                text,
                followed: false,
            },
        );
        self.enqueue(stored.id);
    }

    async fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Submit(new, reply) => {
                let result = self.submit(new);
                let _ = reply.send(result);
            }
            Cmd::Attach(id, reply) => {
                let _ = reply.send(self.jobs.get(&id).map(Job::handle));
            }
            Cmd::Resume(stored, reply) => {
                let id = stored.id;
                if !self.jobs.contains_key(&id) {
                    self.recover(*stored);
                    self.wants_dispatch = true;
                }
                if let Some(job) = self.jobs.get(&id) {
                    let _ = reply.send(job.handle());
                }
            }
            Cmd::Adopt(jobs, reply) => {
                for job in jobs {
                    if !self.jobs.contains_key(&job.id) {
                        self.recover(job);
                    }
                }
                self.wants_dispatch = true;
                let _ = reply.send(());
            }
            Cmd::Cancel(id) => self.cancel(id, "client went away").await,
            Cmd::Disown(ids) => {
                for id in ids {
                    self.disown(id);
                }
            }
            Cmd::QueueLen(reply) => {
                let _ = reply.send(self.queue.len());
            }
            Cmd::NodeUp(hello, attested, sender, last_seen, reply) => {
                let registered = self.node_up(*hello, attested, sender, last_seen);
                if let Ok(r) = &registered {
                    for &job in &r.stranded {
                        tracing::warn!(node = %self.node_name(r.node), job, "job not held by the reconnected node; requeued");
                        self.requeue(job, r.node).await;
                    }
                    if !r.foreign.is_empty() {
                        self.take_over(r.foreign.clone(), self.node_name(r.node).to_string());
                    }
                }
                let _ = reply.send(registered);
            }
            Cmd::NodeMsg(node, conn, msg) => self.node_msg(node, conn, msg).await,
            Cmd::NodeDown(node, conn) => {
                if let Some(n) = self.nodes.get_mut(&node) {
                    if n.conn == conn {
                        tracing::debug!(node = %n.name, "node session closed; its jobs stay leased until the lease runs out");
                        self.close_session(node);
                        self.scheduler.remove_node(node);
                        self.dirty_nodes.remove(&node);
                        self.node_gauges_dirty = true;
                    }
                }
            }
        }
    }

    /// Jobs waiting that count against `max_queued_jobs`: interactive ones, and every request
    /// a client sent through the HTTP API whatever its class (issue 13: `"class": "batch"` on
    /// a chat request escaped the cap). Batch API lines wait for their window and do not
    /// count, so a large batch never locks interactive clients out.
    fn queued_admitted(&self) -> usize {
        self.queue
            .ids()
            .filter(|id| {
                self.jobs
                    .get(id)
                    .is_some_and(|job| job.followed || job.request.class == JobClass::Interactive)
            })
            .count()
    }

    fn submit(&mut self, new: NewJob) -> Result<JobHandle, RequestError> {
        if self.queue.len() >= self.config.max_queued_jobs
            && self.queued_admitted() >= self.config.max_queued_jobs
        {
            self.metrics
                .rejected
                .with_label_values(&["queue_full"])
                .inc();
            return Err(RequestError::overloaded(format!(
                "the fleet's queue is full ({} requests waiting); retry later",
                self.config.max_queued_jobs
            )));
        }
        let (view, _) = watch::channel(JobView::default());
        let text = self.job_text(&new.request, &[]);
        let job = Job {
            id: new.id,
            public_id: new.public_id,
            tenant: new.tenant,
            request: new.request,
            created_ms: new.created_ms,
            accepted: Instant::now(),
            view,
            placement: Placement::Queued {
                since: Instant::now(),
            },
            persisted: 0,
            first_token_seen: false,
            failures: 0,
            producers: Vec::new(),
            text,
            followed: true,
        };
        let handle = job.handle();
        let id = job.id;
        self.jobs.insert(id, job);
        self.enqueue(id);
        self.wants_dispatch = true;
        Ok(handle)
    }

    /// The coordinator's text release for a job of `request`'s model, when it holds the
    /// model's token table.
    fn job_text(&self, request: &ValidRequest, ids: &[i32]) -> Option<JobText> {
        let table = self.verify.as_ref()?.token_tables.get(&request.model)?;
        Some(JobText::new(Arc::clone(table), &request.stop, ids))
    }

    /// Removes a job from a node's books.
    fn detach(&mut self, job: u64, node: NodeId) {
        if let Some(n) = self.nodes.get_mut(&node) {
            n.jobs.remove(&job);
            self.dirty_nodes.insert(node);
            // A slot came free: jobs still waiting may take it now rather than at the tick.
            if !self.queue.is_empty() {
                self.wants_dispatch = true;
            }
        }
    }

    /// Puts a job back in the queue with the tokens it has, to continue on another vehicle.
    async fn requeue(&mut self, id: u64, from: NodeId) {
        self.detach(id, from);
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let generated = job.generated() as u32;
        if generated >= job.request.max_tokens {
            let prompt_tokens = job.view.borrow().prompt_tokens;
            self.end(
                id,
                JobOutcome::Done {
                    finish_reason: "length".into(),
                    text_tail: String::new(),
                    prompt_tokens,
                },
            )
            .await;
            return;
        }
        if generated > 0 {
            self.metrics.resumes.inc();
        }
        job.placement = Placement::Queued {
            since: Instant::now(),
        };
        self.enqueue(id);
        self.wants_dispatch = true;
    }

    /// In a cluster: claims the jobs a node brought from another coordinator (whose session
    /// with it ended) and resumes them here from their stored tokens. The claim steals: the
    /// node's move is the proof that the old owner lost the job's vehicle, and the store's
    /// fencing keeps the old owner from writing to it from now on.
    fn take_over(&self, jobs: Vec<u64>, node: String) {
        let Some(link) = &self.cluster else {
            return;
        };
        let Some(manager) = link.manager() else {
            return;
        };
        let store = link.store.clone();
        tokio::spawn(async move {
            let mut taken = Vec::new();
            for job in jobs {
                match store.claim_job(job, true).await {
                    Ok(crate::domain::store::ClaimedJob::Claimed(stored)) => taken.push(*stored),
                    Ok(_) => {} // ended meanwhile, or unknown: nothing to run
                    Err(e) => {
                        tracing::warn!(%node, job, cause = %e, "could not take over a job the vehicle brought; its old coordinator's lease will hand it on")
                    }
                }
            }
            if !taken.is_empty() {
                tracing::info!(%node, jobs = taken.len(), "took over the jobs a vehicle brought from another coordinator");
                manager.adopt(taken).await;
            }
        });
    }

    /// A job another coordinator took over: its node drops it (no hand-back: the new owner
    /// resumes it from the stored tokens), nothing more is written for it here, and whoever
    /// reads its view here follows it where it runs now.
    fn disown(&mut self, id: u64) {
        self.queue.remove(id);
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        self.drop_from_node(id, job.placement, "job taken over by another coordinator");
        self.wants_dispatch = true;
        tracing::info!(job = id, "job taken over by another coordinator");
        if job.view.is_closed() {
            return;
        }
        if let Some((link, manager)) = self.cluster.as_ref().and_then(|l| Some((l, l.manager()?))) {
            crate::fleet::follow::spawn_follower(link.store.clone(), manager, id, job.view);
        }
    }

    async fn cancel(&mut self, id: u64, reason: &str) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        self.drop_from_node(id, job.placement, reason);
        self.end(id, JobOutcome::Cancelled).await;
    }

    /// Tells the node a job at `placement` runs on (if any) to drop it, keeping nothing (no
    /// hand-back), and frees its slot there.
    fn drop_from_node(&mut self, id: u64, placement: Placement, reason: &str) {
        if let Placement::Running { node } | Placement::HandingBack { node, .. } = placement {
            if let Some(n) = self.nodes.get(&node) {
                n.send(CoordinatorMsg::Cancel(v1::Cancel {
                    job_id: id.to_string(),
                    reason: reason.into(),
                    hand_back: false,
                }));
            }
            self.detach(id, node);
        }
    }

    /// Ends a job: publishes the outcome to its clients and writes it to the store.
    async fn end(&mut self, id: u64, outcome: JobOutcome) {
        self.queue.remove(id);
        let Some(mut job) = self.jobs.remove(&id) else {
            return;
        };
        job.placement = Placement::Ended;
        let (state, label, finish_reason, text_tail, prompt_tokens, error) = match &outcome {
            JobOutcome::Done {
                finish_reason,
                text_tail,
                prompt_tokens,
            } => (
                JobState::Done,
                "done",
                Some(finish_reason.clone()),
                text_tail.clone(),
                *prompt_tokens,
                None,
            ),
            JobOutcome::Failed(e) => (
                JobState::Failed,
                "failed",
                None,
                String::new(),
                0,
                Some(e.message.clone()),
            ),
            JobOutcome::Cancelled => (
                JobState::Cancelled,
                "cancelled",
                None,
                String::new(),
                0,
                None,
            ),
        };
        self.metrics.jobs_finished.with_label_values(&[label]).inc();
        self.persist_tokens(&mut job).await;
        if let JobOutcome::Done { finish_reason, .. } = &outcome {
            self.offer_verification(&job, finish_reason).await;
        }
        self.writer
            .send(WriteOp::Finish(
                job.id,
                Outcome {
                    state,
                    finished_ms: unix_ms(),
                    finish_reason,
                    text_tail,
                    prompt_tokens,
                    error,
                },
            ))
            .await;
        job.view.send_modify(|v| {
            if prompt_tokens > 0 {
                v.prompt_tokens = prompt_tokens;
            }
            v.outcome = Some(outcome);
        });
    }

    async fn persist_tokens(&mut self, job: &mut Job) {
        let tokens: Vec<StoredToken> = job.view.borrow().tokens[job.persisted..].to_vec();
        if tokens.is_empty() {
            return;
        }
        let start = job.persisted as u32;
        job.persisted += tokens.len();
        self.writer
            .send(WriteOp::Tokens(job.id, start, tokens))
            .await;
    }

    async fn flush_tokens(&mut self) {
        let ids: Vec<u64> = self
            .jobs
            .values()
            .filter(|j| j.generated() > j.persisted)
            .map(|j| j.id)
            .collect();
        for id in ids {
            if let Some(mut job) = self.jobs.remove(&id) {
                self.persist_tokens(&mut job).await;
                self.jobs.insert(id, job);
            }
        }
    }
}

/// Eviction reasons become a bounded label set (an agent cannot grow the metric's cardinality).
fn eviction_label(reason: &str) -> &'static str {
    const KNOWN: [&str; 5] = ["departure", "drain", "shutdown", "governor", "preempted"];
    let head = reason.split(':').next().unwrap_or("").trim();
    KNOWN
        .iter()
        .copied()
        .find(|k| *k == head)
        .unwrap_or("other")
}

/// The verifier's next report; never, without a verifier.
async fn next_report(
    reports: &mut Option<mpsc::Receiver<crate::trust::verify::Report>>,
) -> Option<crate::trust::verify::Report> {
    match reports {
        Some(reports) => reports.recv().await,
        None => std::future::pending().await,
    }
}
