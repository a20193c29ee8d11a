//! `tokenfleet-coordinator`: the fleet's control point.
//!
//! It owns the OpenAI-compatible HTTP API, the agents' gRPC sessions, the durable job store
//! (through `tokenfleet-store`'s traits) and the dispatch loop that asks the scheduler where
//! each job should run.
//!
//! # Layout
//! Parts, bottom-up; each may import only parts listed before it (the allowed graph is in
//! `scripts/check-layout.py`, which CI runs; each part's doc names its own arrows):
//! - [`clock`], [`config`], [`metrics`]: shared vocabulary (time, the TOML configuration and
//!   its sections, Prometheus metrics); import nothing above them.
//! - [`domain`]: `ValidRequest`, jobs, their stored form, `RequestError`.
//! - [`openai`]: OpenAI wire types, validation, response shapes.
//! - [`policy`]: tenants (limits, quotas, residency) and residency regions.
//! - [`trust`]: enrollment, mTLS, attestation, result verification, reputation.
//! - [`fleet`]: the manager (single owner of jobs), dispatch, leases, node events.
//! - [`batch`]: files and batches, the batch runner.
//! - [`http`]: router, auth, the one error mapping, handlers.
//! - [`transport`]: the agents' gRPC service and the listeners.
//!
//! This file wires them together: [`start`] opens the store, recovers jobs, spawns the
//! manager and the batch runner and serves until shutdown.

// Public: what the `tokenfleet` binary and the tests use (configuration, the store, the
// verifier's checks and calibration, enrollment and reputation records, the decision log, the
// batch input parser).
// Everything else is the coordinator's own; the fuzz targets reach their parts through
// [`fuzzing`].
pub mod batch;
pub mod clock;
pub mod config;
pub mod domain;
pub mod fleet;
pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod openai;
pub(crate) mod policy;
pub(crate) mod transport;
pub mod trust;

/// What the fuzz targets (`fuzz/`, built with the `fuzzing` feature) drive: the OpenAI request
/// validation and its HTTP status, the batch input parser and the manager's test harness.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    pub use crate::batch::input::{parse_input, validate_line, BatchContext, ENDPOINTS};
    pub use crate::domain::request::{Prompt, ValidRequest};
    pub use crate::fleet::manager::harness;
    pub use crate::http::error::{status, RequestError};
    pub use crate::openai::validation::{validate_chat, validate_completion};
    pub use crate::openai::wire::{ChatCompletionRequest, CompletionRequest};
}

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

pub use config::CoordinatorConfig;
use tokenfleet_scheduler::Scheduler;
use tokenfleet_store::postgres::SoleCoordinator;
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] domain::store::StoreError),
    #[error("job store keys: {0}")]
    Keys(#[from] tokenfleet_store::SealError),
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error(transparent)]
    DecisionLog(#[from] fleet::decision_log::DecisionLogError),
    #[error(transparent)]
    Security(#[from] trust::security::SecurityError),
    #[error(transparent)]
    Verify(#[from] trust::verify::VerifyError),
    #[error(transparent)]
    Regions(#[from] policy::regions::RegionError),
    #[error("the job manager died: {0}")]
    ManagerDied(String),
    #[error("lost the PostgreSQL database's sole-coordinator lock: {0}")]
    LostDatabaseLock(String),
    #[error(transparent)]
    Listen(#[from] transport::listeners::ListenError),
}

/// Addresses the coordinator actually listens on (ports may have been 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// The enrollment service, with `[security]`.
    pub enroll: Option<SocketAddr>,
}

impl Bound {
    fn of(
        http: &TcpListener,
        grpc: &TcpListener,
        enroll: Option<&TcpListener>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            http: http.local_addr()?,
            grpc: grpc.local_addr()?,
            enroll: enroll.map(|l| l.local_addr()).transpose()?,
        })
    }
}

/// The largest message an agent may send (a chunk of tokens with their alternatives).
const MAX_NODE_MESSAGE_BYTES: usize = 4 << 20;

/// Purges finished jobs older than `retention`, now and then periodically.
fn spawn_retention(
    store: domain::store::Store,
    retention: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let every = (retention / 10).clamp(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_secs(3600),
    );
    // Ends with the coordinator: its store handle must not keep the database's connections
    // open after the coordinator stopped (an embedding process, a bench, runs on).
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
            let cutoff = clock::unix_ms().saturating_sub(retention.as_millis() as u64);
            match store.jobs().purge_finished_before(cutoff).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(jobs = n, "purged finished jobs past retention"),
                Err(domain::store::StoreError::Closed) => return,
                Err(e) => tracing::error!(cause = %e, "retention purge failed"),
            }
        }
    });
}

/// A running coordinator.
pub struct Running {
    pub bound: Bound,
    /// The fleet CA, registry and revocations, with `[security]`.
    pub security: Option<Arc<trust::security::Security>>,
    pub task: tokio::task::JoinHandle<Result<(), CoordinatorError>>,
}

/// Binds both listeners and runs the coordinator until `shutdown` resolves. A standby
/// (`standby`) first waits here until it holds the database.
pub async fn start(
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, CoordinatorError> {
    config.validate()?;
    let config = Arc::new(config);
    let (store, recovered, sole) = open_store(&config).await?;
    let security = match &config.security {
        Some(sc) => Some(trust::security::Security::open(sc.clone(), store.clone()).await?),
        None => None,
    };
    let metrics = Arc::new(metrics::Metrics::new());
    let verification = verification_setup(&config, &store).await?;
    let prompts = verification
        .as_ref()
        .map(|setup| setup.models.prompt_counter())
        .unwrap_or_default();
    let scheduler = scheduler(&config)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    spawn_retention(store.clone(), config.retention, stop_rx.clone());
    let regions = Arc::new(policy::regions::RegionMap::load(&config)?);
    let (manager, manager_task) = fleet::manager::Manager::spawn(
        fleet::manager::Deps {
            config: Arc::clone(&config),
            store: store.clone(),
            metrics: Arc::clone(&metrics),
            scheduler,
            regions: Arc::clone(&regions),
            verification,
        },
        recovered,
        stop_rx.clone(),
    );
    if let Some(cluster) = config.cluster.clone() {
        tokio::spawn(fleet::ownership::run(
            store.clone(),
            manager.clone(),
            cluster,
            stop_rx.clone(),
        ));
    }
    let tenants = Arc::new(policy::tenants::Tenants::new(&config.tenants));
    let (batches, batch_task) = batch::runner::BatchRunner::spawn(
        batch::runner::Deps {
            config: Arc::clone(&config),
            store: store.clone(),
            manager: manager.clone(),
            tenants: Arc::clone(&tenants),
            regions: Arc::clone(&regions),
        },
        stop_rx.clone(),
    );
    let state = Arc::new(http::api::AppState {
        manager: manager.clone(),
        batches,
        store: store.clone(),
        config: Arc::clone(&config),
        metrics: Arc::clone(&metrics),
        keys: api_keys(&config),
        tenants,
        regions,
        prompts,
    });
    let (http, grpc, enroll) = bind(&config).await?;
    let bound = Bound::of(&http, &grpc, enroll.as_ref())?;
    let builder = grpc_server(&config)?;
    let service = transport::session::NodeSessionServer::new(
        transport::session::NodeService {
            manager,
            config: Arc::clone(&config),
            security: security.clone(),
            metrics,
        },
        MAX_NODE_MESSAGE_BYTES,
    );
    let listeners =
        transport::listeners::Listeners::new(&config, security.as_ref(), http, grpc, enroll)?;
    tracing::info!(http = %bound.http, grpc = %bound.grpc, enroll = ?bound.enroll, agent_port = listeners.agent_port_mode(), https = config.http_tls.is_some(), "coordinator listening");
    let revocations = security.as_ref().map(|s| s.watch_revocations());
    let servers = async move {
        listeners
            .serve(
                builder,
                service,
                http::api::router(Arc::clone(&state)),
                &state.metrics,
                stop_rx,
            )
            .await
    };
    let task = tokio::spawn(run_until_stopped(Tasks {
        servers: Box::pin(servers),
        shutdown: Box::pin(shutdown),
        stop_tx,
        manager: manager_task,
        batches: batch_task,
        revocations,
        store,
        sole,
    }));
    Ok(Running {
        bound,
        security,
        task,
    })
}

/// API key -> tenant.
fn api_keys(config: &CoordinatorConfig) -> std::collections::HashMap<String, String> {
    config
        .api_keys
        .iter()
        .map(|k| (k.key.clone(), k.tenant.clone()))
        .collect()
}

/// Opens the configured store (PostgreSQL at `database_url`, holding the sole-coordinator lock
/// on it, else SQLite at `db_path`), settles batches that were ending and loads the unfinished
/// jobs to resume.
async fn open_store(
    config: &CoordinatorConfig,
) -> Result<
    (
        domain::store::Store,
        Vec<domain::store::StoredJob>,
        Option<SoleCoordinator>,
    ),
    CoordinatorError,
> {
    let (store, sole) = match (config.database_url(), &config.cluster) {
        (Some(url), Some(cluster)) => {
            let ownership = domain::store::Ownership {
                coordinator: cluster.coordinator_id(config.http_addr.port()),
                lease: cluster.lease,
            };
            tracing::info!(coordinator = %ownership.coordinator, lease_ms = cluster.lease.as_millis() as u64, "job store on PostgreSQL, shared with the cluster's other coordinators");
            let store = domain::store::Store::connect_postgres_owned(
                &url,
                config.store_sealer()?,
                ownership,
            )
            .await?;
            (store, None)
        }
        (Some(url), None) => {
            // The lock first: a second coordinator must not even load the jobs it would run.
            let sole = if config.standby {
                SoleCoordinator::wait(&url, |holder| {
                    tracing::info!(holder = %holder.trim(), "standby: another coordinator holds the database; taking over when it stops");
                })
                .await?
            } else {
                SoleCoordinator::acquire(&url).await?
            };
            let store =
                domain::store::Store::connect_postgres(&url, config.store_sealer()?).await?;
            tracing::info!("job store on PostgreSQL; this coordinator holds the database");
            (store, Some(sole))
        }
        (None, _) => (
            domain::store::Store::open(&config.db_path, config.store_sealer()?)?,
            None,
        ),
    };
    // Jobs of batches that were being cancelled or ran out of time must not start again.
    let settled = store.settle_ending_batches(clock::unix_s()).await?;
    if settled > 0 {
        tracing::info!(jobs = settled, "stopped the jobs of ending batches");
    }
    // In a cluster, only the jobs nobody else holds: this coordinator's own from before a
    // restart, and those whose coordinator stopped renewing them.
    let recovered = if config.cluster.is_some() {
        store.claim_orphans(usize::MAX).await?
    } else {
        store.load_unfinished().await?
    };
    if !recovered.is_empty() {
        tracing::info!(
            jobs = recovered.len(),
            "resuming unfinished jobs from the store"
        );
    }
    Ok((store, recovered, sole))
}

/// The verifier's trusted models, thresholds and reputation records, with `[verification]`.
async fn verification_setup(
    config: &Arc<CoordinatorConfig>,
    store: &domain::store::Store,
) -> Result<Option<trust::verify::Setup>, CoordinatorError> {
    if !config.verification.enabled {
        return Ok(None);
    }
    let vc = config.verification.clone();
    // Loading a model reads and hashes a GGUF file: not on an executor thread.
    let models = tokio::task::spawn_blocking(move || trust::verify::TrustedModels::load(&vc))
        .await
        .map_err(|e| trust::verify::VerifyError::Start(e.to_string()))??;
    let thresholds = config
        .verification
        .load_thresholds()
        .map_err(trust::verify::VerifyError::Start)?;
    Ok(Some(trust::verify::Setup {
        config: config.verification.clone(),
        thresholds,
        models,
        reputation: trust::reputation::Reputation::load(store.clone()).await?,
    }))
}

/// The configured placement policy, with the decision log attached when one is configured.
fn scheduler(config: &CoordinatorConfig) -> Result<Scheduler, CoordinatorError> {
    let mut scheduler =
        Scheduler::with_config(config.policy_kind()?, 0x007f_1ee7, config.scheduler.clone());
    if let Some(path) = &config.decision_log {
        fleet::decision_log::attach(&mut scheduler, path)?;
    }
    Ok(scheduler)
}

/// The API, agent and (with `[security]`) enrollment listeners.
async fn bind(
    config: &CoordinatorConfig,
) -> Result<(TcpListener, TcpListener, Option<TcpListener>), CoordinatorError> {
    let http = TcpListener::bind(config.http_addr).await?;
    let grpc = TcpListener::bind(config.grpc_addr).await?;
    let enroll = match &config.security {
        Some(sc) => Some(TcpListener::bind(sc.enroll_addr).await?),
        None => None,
    };
    Ok((http, grpc, enroll))
}

/// The agents' gRPC server: HTTP/2 keepalive, and TLS with `grpc_tls`.
fn grpc_server(config: &CoordinatorConfig) -> Result<tonic::transport::Server, CoordinatorError> {
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)));
    if let Some(tls) = &config.grpc_tls {
        let cert = std::fs::read(&tls.cert)
            .map_err(|e| CoordinatorError::Tls(format!("{}: {e}", tls.cert.display())))?;
        tokenfleet_store::sealing::check_private(&tls.key)
            .map_err(|e| CoordinatorError::Tls(e.to_string()))?;
        let key = std::fs::read(&tls.key)
            .map_err(|e| CoordinatorError::Tls(format!("{}: {e}", tls.key.display())))?;
        builder = builder.tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(cert, key)),
        )?;
    }
    Ok(builder)
}

type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;

/// What a running coordinator waits on until it stops.
struct Tasks {
    servers: BoxFuture<Result<(), transport::listeners::ListenError>>,
    shutdown: BoxFuture<()>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    manager: tokio::task::JoinHandle<()>,
    batches: tokio::task::JoinHandle<()>,
    revocations: Option<tokio::task::JoinHandle<()>>,
    store: domain::store::Store,
    /// The PostgreSQL store's sole-coordinator lock, held until the coordinator has stopped.
    sole: Option<SoleCoordinator>,
}

/// Serves until shutdown or a dead manager, then stops the tasks and flushes the store.
async fn run_until_stopped(tasks: Tasks) -> Result<(), CoordinatorError> {
    let Tasks {
        servers,
        shutdown,
        stop_tx,
        manager,
        batches,
        revocations,
        store,
        sole,
    } = tasks;
    let stop_tx = Arc::new(stop_tx);
    let stop_on_shutdown = Arc::clone(&stop_tx);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_on_shutdown.send(true);
    });
    // Once the database has released the lock, another coordinator may start on the same jobs:
    // this one stops rather than run them twice.
    let lock_lost = sole.map(|mut sole| {
        let stop_tx = Arc::clone(&stop_tx);
        tokio::spawn(async move {
            let why = sole.lost().await;
            tracing::error!(cause = %why, "lost the database's sole-coordinator lock; stopping the coordinator");
            let _ = stop_tx.send(true);
            why
        })
    });
    // The manager owns every job: if it dies (a panic is a bug), the coordinator stops
    // cleanly (listeners closed, store flushed) instead of serving with nobody behind the
    // API; the error names the cause.
    let manager = tokio::spawn(async move {
        let ended = manager.await;
        if let Err(e) = &ended {
            tracing::error!(cause = %e, "job manager died; stopping the coordinator");
            let _ = stop_tx.send(true);
        }
        ended
    });
    let result = servers.await.map_err(CoordinatorError::from);
    if let Some(r) = revocations {
        r.abort();
    }
    let _ = batches.await;
    let manager_died = match manager.await {
        Ok(Err(e)) => Some(e.to_string()),
        _ => None,
    };
    // Everything the manager queued for the store is durable before we report stopped.
    if let Err(e) = store.flush().await {
        tracing::error!(cause = %e, "job store flush at shutdown failed");
    }
    let lock_lost = match lock_lost {
        Some(task) if task.is_finished() => task.await.ok(),
        Some(task) => {
            // Stopped for another reason: the lock goes with the task.
            task.abort();
            None
        }
        None => None,
    };
    match (manager_died, lock_lost) {
        (Some(cause), _) => Err(CoordinatorError::ManagerDied(cause)),
        (None, Some(cause)) => Err(CoordinatorError::LostDatabaseLock(cause)),
        (None, None) => result,
    }
}
