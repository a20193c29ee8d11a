//! The job manager: one task that owns the jobs, the queue and the fleet view.
//!
//! HTTP handlers and node sessions talk to it through a bounded channel ([`Manager`]). It
//! hands the scheduler the fleet view and the queue, sends `Assign`s over node sessions, folds
//! token chunks into jobs, takes jobs back from nodes that leave or go silent (they resume
//! elsewhere from their tokens), and writes progress to the store through an ordered writer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenfleet_protocol::v1::{self, CoordinatorMessage};
use tokenfleet_protocol::{AgentMsg, CoordinatorMsg};
use tokenfleet_scheduler::{JobClass, JobId, NodeId, QueuedJob, Scheduler};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use crate::config::CoordinatorConfig;
use crate::error::ApiError;
use crate::jobs::{Job, JobHandle, JobOutcome, JobView, Placement};
use crate::metrics::Metrics;
use crate::nodes::{count_models, LastSeen, Node, NodeSender};
use crate::store::{JobState, Outcome, Store, StoredJob, StoredToken};
use crate::validation::ValidRequest;
use crate::writer::{StoreWriter, WriteOp};

mod handback;
mod verdicts;

/// A job accepted by the API and already in the store.
pub struct NewJob {
    pub id: u64,
    pub public_id: String,
    pub tenant: String,
    pub request: ValidRequest,
    pub created_ms: u64,
}

/// What a node session learns when it registers.
pub struct Registered {
    pub node: NodeId,
    pub conn: u64,
}

enum Cmd {
    Submit(NewJob, oneshot::Sender<Result<JobHandle, ApiError>>),
    Attach(u64, oneshot::Sender<Option<JobHandle>>),
    Resume(Box<StoredJob>, oneshot::Sender<JobHandle>),
    Adopt(Vec<StoredJob>, oneshot::Sender<()>),
    Cancel(u64),
    QueueLen(oneshot::Sender<usize>),
    NodeUp(
        Box<v1::Hello>,
        /// Whether the session verified a TPM quote (sensitive requests need it).
        bool,
        NodeSender,
        LastSeen,
        oneshot::Sender<Result<Registered, Status>>,
    ),
    NodeMsg(NodeId, u64, AgentMsg),
    NodeDown(NodeId, u64),
    Verified(crate::verify::Report),
}

/// Handle to the manager task; cheap to clone.
#[derive(Clone)]
pub struct Manager {
    tx: mpsc::Sender<Cmd>,
    /// Models held by at least one connected node, sorted; kept current by the manager so
    /// that requests check a model without a round trip to its task.
    models: watch::Receiver<Arc<Vec<String>>>,
}

/// Commands the manager handles before it runs the scheduler once (bounded, so ticks and
/// dispatch still come round under a flood of messages).
const MAX_CMDS_PER_DISPATCH: usize = 256;

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Manager {
    /// Starts the manager with the jobs recovered from the store.
    pub fn spawn(
        config: Arc<CoordinatorConfig>,
        store: Store,
        metrics: Arc<Metrics>,
        scheduler: Scheduler,
        recovered: Vec<StoredJob>,
        shutdown: watch::Receiver<bool>,
        verification: Option<crate::verify::Setup>,
    ) -> (Manager, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(8192);
        let config_regions = config.region_map().unwrap_or_default();
        let (models_tx, models) = watch::channel(Arc::new(Vec::new()));
        let manager = Manager { tx, models };
        // The verifier reports back to the manager through its own handle.
        let verify = verification.map(|setup| {
            verdicts::Verification::start(setup, store.clone(), &metrics, manager.clone())
        });
        let writer = StoreWriter::new(store);
        let mut state = State {
            config,
            metrics,
            scheduler,
            writer,
            jobs: HashMap::new(),
            queue: BTreeMap::new(),
            nodes: HashMap::new(),
            node_names: HashMap::new(),
            next_node: 1,
            next_conn: 1,
            dirty_nodes: HashSet::new(),
            wants_dispatch: true,
            model_sessions: HashMap::new(),
            models_tx,
            node_gauges_dirty: true,
            // Validated when the coordinator started.
            regions: config_regions,
            verify,
        };
        for job in recovered {
            state.recover(job);
        }
        let task = tokio::spawn(state.run(rx, shutdown));
        (manager, task)
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    pub async fn submit(&self, job: NewJob) -> Result<JobHandle, ApiError> {
        self.ask(|tx| Cmd::Submit(job, tx))
            .await
            .unwrap_or_else(|| Err(ApiError::unavailable("the coordinator is shutting down")))
    }

    /// A handle on a job the manager still runs (None when it has ended or never existed).
    pub async fn attach(&self, job: u64) -> Option<JobHandle> {
        self.ask(|tx| Cmd::Attach(job, tx)).await.flatten()
    }

    /// Runs a stored job again (queued, continuing from its stored tokens) and returns a
    /// handle on it; a handle on the running job when the manager already has it.
    pub async fn resume(&self, job: StoredJob) -> Option<JobHandle> {
        self.ask(|tx| Cmd::Resume(Box::new(job), tx)).await
    }

    /// Queues stored jobs that nobody follows (a batch's requests); not bounded by
    /// `max_queued_jobs`, which limits interactive admission.
    pub async fn adopt(&self, jobs: Vec<StoredJob>) {
        let _ = self.ask(|tx| Cmd::Adopt(jobs, tx)).await;
    }

    pub async fn cancel(&self, job: u64) {
        let _ = self.tx.send(Cmd::Cancel(job)).await;
    }

    /// Names of models held by at least one connected node, sorted.
    pub async fn models(&self) -> Vec<String> {
        self.models.borrow().to_vec()
    }

    /// Whether at least one connected node holds `model`.
    pub fn has_model(&self, model: &str) -> bool {
        self.models.borrow().iter().any(|m| m == model)
    }

    pub async fn queue_len(&self) -> usize {
        self.ask(Cmd::QueueLen).await.unwrap_or(0)
    }

    pub(crate) async fn node_up(
        &self,
        hello: v1::Hello,
        attested: bool,
        sender: NodeSender,
        last_seen: LastSeen,
    ) -> Result<Registered, Status> {
        self.ask(|tx| Cmd::NodeUp(Box::new(hello), attested, sender, last_seen, tx))
            .await
            .unwrap_or_else(|| Err(Status::unavailable("coordinator shutting down")))
    }

    pub(crate) async fn node_msg(&self, node: NodeId, conn: u64, msg: AgentMsg) -> bool {
        self.tx.send(Cmd::NodeMsg(node, conn, msg)).await.is_ok()
    }

    pub(crate) async fn node_down(&self, node: NodeId, conn: u64) {
        let _ = self.tx.send(Cmd::NodeDown(node, conn)).await;
    }

    /// A verifier's report on a finished job; false when the manager has stopped.
    pub(crate) async fn verified(&self, report: crate::verify::Report) -> bool {
        self.tx.send(Cmd::Verified(report)).await.is_ok()
    }
}

struct State {
    config: Arc<CoordinatorConfig>,
    metrics: Arc<Metrics>,
    scheduler: Scheduler,
    writer: StoreWriter,
    jobs: HashMap<u64, Job>,
    /// Jobs waiting for a vehicle, oldest first.
    queue: BTreeMap<u64, ()>,
    nodes: HashMap<NodeId, Node>,
    node_names: HashMap<String, NodeId>,
    next_node: u64,
    next_conn: u64,
    /// Nodes whose view changed since the scheduler last saw them.
    dirty_nodes: HashSet<NodeId>,
    wants_dispatch: bool,
    /// Connected sessions per model name (the source of [`Manager::models`]).
    model_sessions: HashMap<String, usize>,
    models_tx: watch::Sender<Arc<Vec<String>>>,
    /// A session opened or closed or a governor state changed since the node gauges were
    /// counted (counting walks the whole fleet, so it is skipped when nothing changed).
    node_gauges_dirty: bool,
    /// Residency regions; a node's are recomputed from each `State`'s position.
    regions: crate::regions::RegionMap,
    /// Result verification, when enabled.
    verify: Option<verdicts::Verification>,
}

impl State {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, mut shutdown: watch::Receiver<bool>) {
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
                _ = tick.tick() => self.on_tick().await,
                _ = shutdown.changed() => break,
            }
            if self.wants_dispatch {
                self.dispatch().await;
            }
        }
        self.flush_tokens().await;
        tracing::info!("job manager stopped");
    }

    fn recover(&mut self, stored: StoredJob) {
        let (view, _) = watch::channel(JobView {
            prompt_tokens: stored.prompt_tokens,
            tokens: stored.tokens,
            outcome: None,
            restarts: 0,
        });
        let persisted = view.borrow().tokens.len();
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
                attempts: 0,
                producers: Vec::new(),
            },
        );
        self.queue.insert(stored.id, ());
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
            Cmd::QueueLen(reply) => {
                let _ = reply.send(self.queue.len());
            }
            Cmd::NodeUp(hello, attested, sender, last_seen, reply) => {
                let _ = reply.send(self.node_up(*hello, attested, sender, last_seen));
            }
            Cmd::NodeMsg(node, conn, msg) => self.node_msg(node, conn, msg).await,
            Cmd::Verified(report) => self.on_verified(report).await,
            Cmd::NodeDown(node, conn) => {
                if let Some(n) = self.nodes.get_mut(&node) {
                    if n.conn == conn {
                        tracing::debug!(node = %n.name, "node session closed; its jobs stay leased until the lease runs out");
                        if n.sender.take().is_some() {
                            count_models(
                                &mut self.model_sessions,
                                &self.models_tx,
                                &n.hello,
                                false,
                            );
                        }
                        self.scheduler.remove_node(node);
                        self.dirty_nodes.remove(&node);
                        self.node_gauges_dirty = true;
                    }
                }
            }
        }
    }

    /// Interactive jobs waiting (batch jobs wait for their deadline and do not count against
    /// the admission limit, so a large batch never locks interactive clients out).
    fn queued_interactive(&self) -> usize {
        self.queue
            .keys()
            .filter(|id| self.jobs[id].request.class == JobClass::Interactive)
            .count()
    }

    fn submit(&mut self, new: NewJob) -> Result<JobHandle, ApiError> {
        if self.queue.len() >= self.config.max_queued_jobs
            && self.queued_interactive() >= self.config.max_queued_jobs
        {
            self.metrics
                .rejected
                .with_label_values(&["queue_full"])
                .inc();
            return Err(ApiError::overloaded(format!(
                "the fleet's queue is full ({} requests waiting); retry later",
                self.config.max_queued_jobs
            )));
        }
        let (view, _) = watch::channel(JobView::default());
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
            attempts: 0,
            producers: Vec::new(),
        };
        let handle = job.handle();
        self.queue.insert(job.id, ());
        self.jobs.insert(job.id, job);
        self.wants_dispatch = true;
        Ok(handle)
    }

    fn node_up(
        &mut self,
        hello: v1::Hello,
        attested: bool,
        sender: NodeSender,
        last_seen: LastSeen,
    ) -> Result<Registered, Status> {
        if hello.node_id.is_empty() {
            return Err(Status::invalid_argument("Hello.node_id is empty"));
        }
        self.refuse_quarantined(&hello.node_id)?;
        if hello.protocol_version != tokenfleet_protocol::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not supported (this coordinator speaks {})",
                hello.protocol_version,
                tokenfleet_protocol::PROTOCOL_VERSION
            )));
        }
        let id = *self
            .node_names
            .entry(hello.node_id.clone())
            .or_insert_with(|| {
                let id = NodeId(self.next_node);
                self.next_node += 1;
                id
            });
        let conn = self.next_conn;
        self.next_conn += 1;
        let held = hello.held_jobs.clone();
        let node = self
            .nodes
            .entry(id)
            .or_insert_with(|| Node::new(id, hello.clone()));
        let old = std::mem::replace(&mut node.hello, hello);
        if node.sender.is_some() {
            count_models(&mut self.model_sessions, &self.models_tx, &old, false);
        }
        count_models(&mut self.model_sessions, &self.models_tx, &node.hello, true);
        node.conn = conn;
        node.attested = attested;
        node.sender = Some(sender);
        node.last_seen = last_seen;
        tracing::debug!(node = %node.name, conn, held = held.len(), "node connected");
        // Jobs the agent still runs: keep the ones still leased to it (it resends what we
        // lack), cancel the ones that moved on.
        for h in held {
            let job_id = h.job_id.parse::<u64>().ok();
            let job = job_id.and_then(|j| self.jobs.get(&j));
            let msg = match job {
                Some(job) if job.placement == (Placement::Running { node: id }) => {
                    CoordinatorMsg::Resend(v1::Resend {
                        job_id: h.job_id.clone(),
                        from_index: job.generated() as u32,
                    })
                }
                Some(job) if job.is_handing_back_from(id) => handback::hand_back_msg(job.id),
                _ => CoordinatorMsg::Cancel(v1::Cancel {
                    job_id: h.job_id.clone(),
                    reason: "job moved to another vehicle".into(),
                    hand_back: false,
                }),
            };
            if let Some(node) = self.nodes.get(&id) {
                node.send(msg);
            }
        }
        self.dirty_nodes.insert(id);
        self.wants_dispatch = true;
        self.node_gauges_dirty = true;
        Ok(Registered { node: id, conn })
    }

    async fn node_msg(&mut self, id: NodeId, conn: u64, msg: AgentMsg) {
        {
            let Some(node) = self.nodes.get_mut(&id) else {
                return;
            };
            if node.conn != conn {
                return; // a stale session of a node that has reconnected
            }
        }
        match msg {
            // Answered by the session task, which also keeps `last_seen`, attestation and
            // certificates.
            AgentMsg::Heartbeat(_) | AgentMsg::Quote(_) | AgentMsg::CertificateRequest(_) => {}
            AgentMsg::State(state) => {
                if let Some(node) = self.nodes.get_mut(&id) {
                    node.state = state;
                }
                self.update_regions(id).await;
                self.node_gauges_dirty = true;
                self.dirty_nodes.insert(id);
                self.wants_dispatch = true;
            }
            AgentMsg::Hello(_) => {
                tracing::warn!(node = %self.nodes[&id].name, "second Hello on one session ignored");
            }
            AgentMsg::Chunk(chunk) => self.on_chunk(id, chunk),
            AgentMsg::Done(done) => self.on_done(id, done).await,
            AgentMsg::Evicted(ev) => {
                let Some(job) = self.running_on(&ev.job_id, id) else {
                    return;
                };
                // A hand-back was counted when the preemption was decided.
                if !self.jobs[&job].is_handing_back_from(id) {
                    self.metrics
                        .evictions
                        .with_label_values(&[eviction_label(&ev.reason)])
                        .inc();
                }
                tracing::info!(node = %self.nodes[&id].name, job, reason = %ev.reason, next_index = ev.next_index, "job evicted; requeued");
                self.requeue(job, id).await;
            }
            AgentMsg::Failed(f) => {
                let Some(job) = self.running_on(&f.job_id, id) else {
                    return;
                };
                let attempts = self.jobs[&job].attempts;
                tracing::warn!(node = %self.nodes[&id].name, job, retryable = f.retryable, cause = %f.message, "job failed on node");
                if f.retryable && attempts < 3 {
                    self.requeue(job, id).await;
                } else {
                    self.detach(job, id);
                    let err = ApiError::invalid(f.message, None);
                    self.end(job, JobOutcome::Failed(err)).await;
                }
            }
        }
    }

    /// The job id if `job_id` names a job currently running on `node` (or being handed back
    /// by it).
    fn running_on(&self, job_id: &str, node: NodeId) -> Option<u64> {
        let id = job_id.parse::<u64>().ok()?;
        let job = self.jobs.get(&id)?;
        (job.placement == Placement::Running { node } || job.is_handing_back_from(node))
            .then_some(id)
    }

    fn on_chunk(&mut self, node: NodeId, chunk: v1::TokenChunk) {
        let n = chunk.token_ids.len();
        self.metrics.tokens_generated.inc_by(n as u64);
        let Some(id) = self.running_on(&chunk.job_id, node) else {
            return;
        };
        let job = self.jobs.get_mut(&id).expect("running job exists");
        if chunk.texts.len() != n || chunk.logprobs.len() != n {
            tracing::warn!(node = %self.nodes[&node].name, job = id, "malformed chunk ignored");
            return;
        }
        let have = job.generated();
        let start = chunk.start_index as usize;
        if start > have {
            tracing::warn!(node = %self.nodes[&node].name, job = id, start, have, "chunk leaves a gap; ignored");
            return;
        }
        let skip = have - start;
        if skip >= n {
            return; // all already known (a resend)
        }
        if job.producers.last().map(|p| p.0) != Some(node) {
            job.producers.push((node, have));
        }
        let mut delivered = 0;
        job.view.send_modify(|v| {
            v.prompt_tokens = chunk.prompt_tokens;
            for i in skip..n {
                let top = chunk
                    .top_logprobs
                    .get(i)
                    .map(|t| t.top.iter().map(|a| (a.text.clone(), a.logprob)).collect())
                    .unwrap_or_default();
                v.tokens.push(StoredToken {
                    id: chunk.token_ids[i],
                    text: chunk.texts[i].clone(),
                    logprob: chunk.logprobs[i],
                    top,
                });
                delivered += 1;
            }
        });
        self.metrics.tokens_delivered.inc_by(delivered);
        if !job.first_token_seen {
            job.first_token_seen = true;
            self.metrics
                .ttft
                .observe(job.accepted.elapsed().as_secs_f64());
        }
    }

    async fn on_done(&mut self, node: NodeId, done: v1::JobDone) {
        let Some(id) = self.running_on(&done.job_id, node) else {
            return;
        };
        let have = self.jobs[&id].generated() as u32;
        if done.next_index != have {
            // Some chunks were lost (a reconnect); the tokens we lack are regenerated.
            tracing::warn!(node = %self.nodes[&node].name, job = id, have, reported = done.next_index, "JobDone before all chunks arrived; resuming elsewhere");
            self.requeue(id, node).await;
            return;
        }
        self.detach(id, node);
        self.metrics.record_job_energy(
            done.grid_energy_j,
            done.battery_energy_j,
            done.energy_measured,
            done.battery_wear_usd,
        );
        tracing::debug!(node = %self.nodes[&node].name, job = id, energy_j = done.energy_j, measured = done.energy_measured, wear_usd = done.battery_wear_usd, "job done");
        let finish_reason = match v1::FinishReason::try_from(done.finish_reason) {
            Ok(v1::FinishReason::Length) => "length",
            _ => "stop",
        };
        let prompt_tokens = done.prompt_tokens;
        self.end(
            id,
            JobOutcome::Done {
                finish_reason: finish_reason.into(),
                text_tail: done.text_tail,
                prompt_tokens,
            },
        )
        .await;
    }

    /// Recomputes a node's residency regions from its reported position; jobs whose residency
    /// it no longer satisfies (it crossed a border, or lost its position fix) are taken back
    /// and continue elsewhere from their acknowledged tokens.
    async fn update_regions(&mut self, id: NodeId) {
        if self.regions.is_empty() {
            return;
        }
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let regions = match (node.state.latitude, node.state.longitude) {
            (Some(lat), Some(lon)) => self.regions.regions_at(lat, lon),
            _ => Vec::new(),
        };
        if regions == node.regions {
            return;
        }
        tracing::info!(node = %node.name, from = ?node.regions, to = ?regions, "node changed residency regions");
        node.regions = regions;
        self.dirty_nodes.insert(id);
        let outside: Vec<u64> =
            node.jobs
                .iter()
                .copied()
                .filter(|j| {
                    self.jobs.get(j).is_some_and(|job| {
                        job.request.residency.as_ref().is_some_and(|allowed| {
                            !allowed.iter().any(|r| node.regions.contains(r))
                        })
                    })
                })
                .collect();
        for job in outside {
            self.nodes[&id].send(CoordinatorMsg::Cancel(v1::Cancel {
                job_id: job.to_string(),
                reason: "vehicle left the job's residency region".into(),
                // Continued from the tokens the coordinator already holds.
                hand_back: false,
            }));
            self.metrics
                .evictions
                .with_label_values(&["residency"])
                .inc();
            tracing::info!(node = %self.nodes[&id].name, job, "job taken back: vehicle left its residency region");
            self.requeue(job, id).await;
        }
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
        self.queue.insert(id, ());
        self.wants_dispatch = true;
    }

    async fn cancel(&mut self, id: u64, reason: &str) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if let Placement::Running { node } | Placement::HandingBack { node, .. } = job.placement {
            if let Some(n) = self.nodes.get(&node) {
                n.send(CoordinatorMsg::Cancel(v1::Cancel {
                    job_id: id.to_string(),
                    reason: reason.into(),
                    hand_back: false,
                }));
            }
            self.detach(id, node);
        }
        self.end(id, JobOutcome::Cancelled).await;
    }

    /// Ends a job: publishes the outcome to its clients and writes it to the store.
    async fn end(&mut self, id: u64, outcome: JobOutcome) {
        self.queue.remove(&id);
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

    async fn on_tick(&mut self) {
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
    async fn expire_leases(&mut self) {
        let lease = self.config.lease_timeout;
        let silent: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| !n.jobs.is_empty() && n.silent_for() > lease)
            .map(|n| n.id)
            .collect();
        for id in silent {
            let node = self.nodes.get_mut(&id).expect("listed above");
            tracing::warn!(node = %node.name, jobs = node.jobs.len(), "node silent past its lease; requeueing its jobs");
            // A live but silent session is cut so the agent reconnects and resyncs.
            if node.sender.take().is_some() {
                count_models(
                    &mut self.model_sessions,
                    &self.models_tx,
                    &node.hello,
                    false,
                );
            }
            self.node_gauges_dirty = true;
            self.scheduler.remove_node(id);
            let jobs: Vec<u64> = node.jobs.iter().copied().collect();
            for job in jobs {
                self.metrics.lease_expiries.inc();
                self.requeue(job, id).await;
            }
        }
    }

    /// Interactive jobs that no vehicle could take within the queue timeout fail with 503
    /// (batch jobs wait for their deadline instead).
    async fn fail_stale_queue(&mut self) {
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

    fn update_gauges(&mut self) {
        let (mut interactive, mut batch) = (0, 0);
        for id in self.queue.keys() {
            match self.jobs[id].request.class {
                JobClass::Interactive => interactive += 1,
                JobClass::Batch => batch += 1,
            }
        }
        self.metrics
            .queue_depth
            .with_label_values(&["interactive"])
            .set(interactive);
        self.metrics
            .queue_depth
            .with_label_values(&["batch"])
            .set(batch);
        if !std::mem::take(&mut self.node_gauges_dirty) {
            return;
        }
        let mut by_state: HashMap<&'static str, i64> = HashMap::new();
        for n in self.nodes.values().filter(|n| n.connected()) {
            *by_state.entry(n.governor_label()).or_default() += 1;
        }
        for state in crate::nodes::GOVERNOR_LABELS {
            self.metrics
                .nodes
                .with_label_values(&[state])
                .set(by_state.get(state).copied().unwrap_or(0));
        }
    }

    async fn dispatch(&mut self) {
        self.wants_dispatch = false;
        if self.queue.is_empty() {
            return;
        }
        let now_ms = unix_ms();
        let dirty: Vec<NodeId> = self.dirty_nodes.drain().collect();
        for id in dirty {
            if let Some(n) = self.nodes.get(&id) {
                if n.connected() {
                    let mut view = n.view(now_ms);
                    view.running_batch = self.running_batch(n);
                    self.scheduler.upsert_node(view);
                }
            }
        }
        let queue: Vec<QueuedJob> = self
            .queue
            .keys()
            .map(|id| {
                let job = &self.jobs[id];
                let generated = job.generated() as u32;
                let enqueued_at = match job.placement {
                    Placement::Queued { since } => {
                        now_ms.saturating_sub(since.elapsed().as_millis() as u64)
                    }
                    _ => now_ms,
                };
                QueuedJob {
                    id: JobId(job.id),
                    class: job.request.class,
                    model: job.request.model.clone(),
                    prompt_tokens: job.view.borrow().prompt_tokens.max(1),
                    max_tokens: job.request.max_tokens,
                    generated_tokens: generated,
                    deadline: job.request.deadline_ms,
                    residency: job.request.residency.clone(),
                    tenant: job.tenant.clone(),
                    sensitive: job.request.sensitive,
                    enqueued_at,
                    running_on: None,
                }
            })
            .collect();
        let decisions = self.scheduler.decide(now_ms, &queue);
        for p in decisions.preemptions {
            self.preempt(p.job.0, p.node);
        }
        for a in decisions.assignments {
            self.assign(a.job.0, a.node);
        }
        // A request no node could ever serve (e.g. no vehicle in its residency region)
        // waits for the queue timeout rather than failing at once: vehicles come and go.
        for r in decisions.rejections {
            tracing::debug!(job = r.job.0, reason = %r.reason, "scheduler could not place job yet");
        }
    }

    fn assign(&mut self, id: u64, node_id: NodeId) {
        let Some(node) = self.nodes.get_mut(&node_id) else {
            return;
        };
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let Placement::Queued { since } = job.placement else {
            return;
        };
        let resume: Vec<i32> = job.view.borrow().tokens.iter().map(|t| t.id).collect();
        let r = &job.request;
        let prompt = match &r.prompt {
            crate::validation::Prompt::Chat(msgs) => v1::assign::Prompt::Chat(v1::ChatMessages {
                messages: msgs
                    .iter()
                    .map(|m| v1::ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
            }),
            crate::validation::Prompt::Text(t) => v1::assign::Prompt::Text(t.clone()),
        };
        let msg = CoordinatorMessage::new(CoordinatorMsg::Assign(v1::Assign {
            job_id: id.to_string(),
            lease_deadline_unix_ms: unix_ms() + self.config.lease_timeout.as_millis() as u64,
            model: r.model.clone(),
            prompt: Some(prompt),
            sampling: Some(v1::Sampling {
                temperature: r.sampling.temperature,
                top_p: r.sampling.top_p,
                top_k: 0,
                seed: r.sampling.seed,
            }),
            max_tokens: r.max_tokens - resume.len() as u32,
            resume_token_ids: resume,
            stop: r.stop.clone(),
            logprobs: r.logprobs,
            top_logprobs: r.top_logprobs as u32,
            ignore_eos: r.ignore_eos,
            interactive: r.class == JobClass::Interactive,
        }));
        if !node.try_send(msg) {
            tracing::warn!(node = %node.name, job = id, "node session is full or closed; job stays queued");
            self.dirty_nodes.insert(node_id);
            return;
        }
        self.metrics
            .dispatch_latency
            .observe(since.elapsed().as_secs_f64());
        job.placement = Placement::Running { node: node_id };
        job.attempts += 1;
        node.jobs.insert(id);
        self.queue.remove(&id);
        self.dirty_nodes.insert(node_id);
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
