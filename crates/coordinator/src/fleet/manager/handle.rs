//! The manager's handle ([`Manager`]): what HTTP handlers, the batch runner and node sessions
//! call. Each call is a command on the manager task's bounded channel, answered on a oneshot.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokenfleet_protocol::v1;
use tokenfleet_protocol::AgentMsg;
use tokenfleet_scheduler::{NodeId, Scheduler};
use tokio::sync::{mpsc, oneshot, watch};

use super::{verdicts, State};
use crate::config::CoordinatorConfig;
use crate::domain::error::RequestError;
use crate::domain::job::JobHandle;
use crate::domain::request::ValidRequest;
use crate::domain::store::{Store, StoredJob};
use crate::fleet::nodes::{LastSeen, NodeSender};
use crate::fleet::queue::JobQueue;
use crate::fleet::writer::StoreWriter;
use crate::metrics::Metrics;

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
    /// Jobs leased to the node that its Hello does not hold (requeued by the manager).
    pub stranded: Vec<u64>,
    /// Jobs its Hello holds that this coordinator does not run (another coordinator's, in a
    /// cluster: the node came over from it). The node is told to drop them; in a cluster
    /// they are claimed and resumed here from their stored tokens.
    pub foreign: Vec<u64>,
}

pub(super) enum Cmd {
    Submit(NewJob, oneshot::Sender<Result<JobHandle, RequestError>>),
    Attach(u64, oneshot::Sender<Option<JobHandle>>),
    Resume(Box<StoredJob>, oneshot::Sender<JobHandle>),
    Adopt(Vec<StoredJob>, oneshot::Sender<()>),
    Cancel(u64),
    /// Jobs another coordinator took over (see `fleet::ownership`).
    Disown(Vec<u64>),
    QueueLen(oneshot::Sender<usize>),
    NodeUp(
        Box<v1::Hello>,
        /// Whether the session verified a TPM quote (sensitive requests need it).
        bool,
        NodeSender,
        LastSeen,
        oneshot::Sender<Result<Registered, NodeRefusal>>,
    ),
    NodeMsg(NodeId, u64, AgentMsg),
    NodeDown(NodeId, u64),
}

/// Handle to the manager task; cheap to clone.
#[derive(Clone)]
pub struct Manager {
    tx: mpsc::Sender<Cmd>,
    /// Models held by at least one connected node, with the largest context one offers; kept
    /// current by the manager so that requests check a model without a round trip to its task.
    models: watch::Receiver<Arc<crate::fleet::nodes::ServedModels>>,
}

/// Why the manager refuses a node's session; the transport maps it to its own status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeRefusal {
    #[error("coordinator shutting down")]
    ShuttingDown,
    #[error("Hello.node_id is empty")]
    EmptyNodeId,
    #[error("protocol version {offered} is not supported (this coordinator speaks {spoken})")]
    ProtocolVersion { offered: u32, spoken: u32 },
    #[error("this node is quarantined: its outputs failed result verification; an operator must release it (tokenfleet fleet quarantine release)")]
    Quarantined,
}

/// What the manager is built from.
pub struct Deps {
    pub config: Arc<CoordinatorConfig>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub scheduler: Scheduler,
    /// Residency regions, loaded once for the coordinator.
    pub regions: Arc<crate::policy::regions::RegionMap>,
    /// Result verification, when enabled.
    pub verification: Option<crate::trust::verify::Setup>,
}

impl Manager {
    /// Starts the manager with the jobs recovered from the store.
    pub fn spawn(
        deps: Deps,
        recovered: Vec<StoredJob>,
        shutdown: watch::Receiver<bool>,
    ) -> (Manager, tokio::task::JoinHandle<()>) {
        let Deps {
            config,
            store,
            metrics,
            scheduler,
            regions,
            verification,
        } = deps;
        let (tx, rx) = mpsc::channel(8192);
        let (models_tx, models) = watch::channel(Arc::default());
        let manager = Manager { tx, models };
        // One of several coordinators on the store (`[cluster]`): jobs of nodes that come over
        // are claimed, jobs taken over are followed. Weak: the manager's own link must not
        // keep its command channel open.
        let cluster = config.cluster.is_some().then(|| super::ClusterLink {
            store: store.clone(),
            tx: manager.tx.downgrade(),
            models: manager.models.clone(),
        });
        // The verifier reports on its own channel, which the manager's loop reads next to its
        // commands.
        let (verify, reports) = match verification {
            Some(setup) => {
                let (reports_tx, reports) = mpsc::channel(setup.config.queue_capacity.max(1));
                let verify =
                    verdicts::Verification::start(setup, store.clone(), &metrics, reports_tx);
                (Some(verify), Some(reports))
            }
            None => (None, None),
        };
        let writer = StoreWriter::new(store);
        let mut state = State {
            config,
            metrics,
            scheduler,
            writer,
            jobs: HashMap::new(),
            queue: JobQueue::default(),
            nodes: HashMap::new(),
            node_names: HashMap::new(),
            next_node: 1,
            next_conn: 1,
            dirty_nodes: HashSet::new(),
            wants_dispatch: true,
            model_sessions: HashMap::new(),
            models_tx,
            node_gauges_dirty: true,
            regions,
            verify,
            cluster,
        };
        for job in recovered {
            state.recover(job);
        }
        let task = tokio::spawn(state.run(rx, reports, shutdown));
        (manager, task)
    }

    /// A handle from its channel and its models (the manager's link to itself).
    pub(super) fn from_parts(
        tx: mpsc::Sender<Cmd>,
        models: watch::Receiver<Arc<crate::fleet::nodes::ServedModels>>,
    ) -> Self {
        Self { tx, models }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    pub async fn submit(&self, job: NewJob) -> Result<JobHandle, RequestError> {
        self.ask(|tx| Cmd::Submit(job, tx))
            .await
            .unwrap_or_else(|| {
                Err(RequestError::unavailable(
                    "the coordinator is shutting down",
                ))
            })
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
    /// `max_queued_jobs`, which limits what clients of the HTTP API queue.
    pub async fn adopt(&self, jobs: Vec<StoredJob>) {
        let _ = self.ask(|tx| Cmd::Adopt(jobs, tx)).await;
    }

    pub async fn cancel(&self, job: u64) {
        let _ = self.tx.send(Cmd::Cancel(job)).await;
    }

    /// Stops running jobs another coordinator took over: their nodes drop them, nothing is
    /// written for them, and their clients here follow them where they run now.
    pub async fn disown(&self, jobs: Vec<u64>) {
        let _ = self.tx.send(Cmd::Disown(jobs)).await;
    }

    /// Names of models held by at least one connected node, sorted.
    pub async fn models(&self) -> Vec<String> {
        self.models.borrow().keys().cloned().collect()
    }

    /// Whether at least one connected node holds `model`.
    pub fn has_model(&self, model: &str) -> bool {
        self.models.borrow().contains_key(model)
    }

    /// The largest context (prompt plus generated tokens) a connected node holding `model`
    /// offers; None when no connected node holds it.
    pub fn context_limit(&self, model: &str) -> Option<u32> {
        self.models.borrow().get(model).copied()
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
    ) -> Result<Registered, NodeRefusal> {
        self.ask(|tx| Cmd::NodeUp(Box::new(hello), attested, sender, last_seen, tx))
            .await
            .unwrap_or(Err(NodeRefusal::ShuttingDown))
    }

    pub(crate) async fn node_msg(&self, node: NodeId, conn: u64, msg: AgentMsg) -> bool {
        self.tx.send(Cmd::NodeMsg(node, conn, msg)).await.is_ok()
    }

    pub(crate) async fn node_down(&self, node: NodeId, conn: u64) {
        let _ = self.tx.send(Cmd::NodeDown(node, conn)).await;
    }
}
