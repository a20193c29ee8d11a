//! `tokenfleet-coordinator`: the fleet's single control point.
//!
//! It owns the OpenAI-compatible HTTP API, the agents' gRPC sessions, the durable job store
//! and the dispatch loop that asks the scheduler where each job should run.
//!
//! Layout:
//! - [`config`]: [`CoordinatorConfig`] (TOML).
//! - [`api`], [`generate`], [`responses`], [`openai`]: the HTTP API and its wire types.
//! - [`http_server`]: the API's connections: connection cap, header-read timeout.
//! - [`validation`]: raw requests → [`validation::ValidRequest`] or a 400.
//! - [`files`], [`batches`], [`batch_types`]: the Batch API (`/v1/files`, `/v1/batches`).
//! - [`batch_input`]: a batch's JSONL input, checked on upload and validated line by line.
//! - [`batch_runner`]: the task that moves batches through their lifecycle.
//! - [`batch_store`]: files and batches to and from the batch store's records.
//! - [`error`]: [`error::ApiError`], the one place errors become OpenAI error bodies.
//! - [`manager`]: the task that owns jobs, queue and fleet view; dispatch and continuation.
//! - [`jobs`], [`nodes`]: what the manager keeps per job and per vehicle.
//! - [`session`]: the `tokenfleet.v1` NodeSession gRPC service.
//! - [`store`], [`writer`]: the durable stores (`tokenfleet-store` traits, SQLite backend)
//!   with the coordinator's types; ordered writes.
//! - [`regions`]: residency regions (polygons, countries) and which a vehicle is in.
//! - [`tenants`]: per-tenant residency and OpenAI-style rate limits.
//! - [`metrics`]: Prometheus metrics (`tokenfleet_` prefix).
//! - [`decision_log`]: the optional JSON-lines log of every scheduler round (replayable).
//! - [`model_binding`]: the canonical model hash and the operator's name→hash bindings.
//! - [`security`]: fleet CA, enrollment, mutual TLS, revocation, TPM attestation.
//! - [`verify`], [`reputation`]: result verification (a trusted engine re-scores finished
//!   jobs) and per-node reputation, quarantine and adaptive spot-check rates.

pub mod api;
pub mod batch_input;
pub mod batch_runner;
pub mod batch_store;
pub mod batch_types;
pub mod batches;
pub mod config;
pub mod decision_log;
pub mod error;
pub mod files;
pub mod generate;
pub mod http_server;
pub mod jobs;
mod listeners;
pub mod manager;
pub mod metrics;
pub mod model_binding;
pub mod nodes;
pub mod openai;
pub mod regions;
pub mod reputation;
pub mod responses;
pub mod security;
pub mod session;
pub mod store;
pub mod tenants;
pub mod validation;
pub mod verify;
pub mod writer;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

pub use config::CoordinatorConfig;
use tokenfleet_scheduler::Scheduler;
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("job store keys: {0}")]
    Keys(#[from] tokenfleet_store::SealError),
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error(transparent)]
    DecisionLog(#[from] decision_log::DecisionLogError),
    #[error(transparent)]
    Security(#[from] security::SecurityError),
    #[error(transparent)]
    Verify(#[from] verify::VerifyError),
}

/// Addresses the coordinator actually listens on (ports may have been 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// The enrollment service, with `[security]`.
    pub enroll: Option<SocketAddr>,
}

/// Purges finished jobs older than `retention`, now and then periodically.
fn spawn_retention(store: store::Store, retention: std::time::Duration) {
    let every = (retention / 10).clamp(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_secs(3600),
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let cutoff = manager::unix_ms().saturating_sub(retention.as_millis() as u64);
            match store.jobs().purge_finished_before(cutoff).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(jobs = n, "purged finished jobs past retention"),
                Err(store::StoreError::Closed) => return,
                Err(e) => tracing::error!(cause = %e, "retention purge failed"),
            }
        }
    });
}

/// A running coordinator.
pub struct Running {
    pub bound: Bound,
    /// The fleet CA, registry and revocations, with `[security]`.
    pub security: Option<Arc<security::Security>>,
    pub task: tokio::task::JoinHandle<Result<(), CoordinatorError>>,
}

/// Binds both listeners and runs the coordinator until `shutdown` resolves.
pub async fn start(
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, CoordinatorError> {
    config.validate()?;
    let config = Arc::new(config);
    let store = store::Store::open(&config.db_path, config.store_sealer()?)?;
    spawn_retention(store.clone(), config.retention);
    // Jobs of batches that were being cancelled or ran out of time must not start again.
    let settled = store.settle_ending_batches(batch_types::unix_s()).await?;
    if settled > 0 {
        tracing::info!(jobs = settled, "stopped the jobs of ending batches");
    }
    let recovered = store.load_unfinished().await?;
    if !recovered.is_empty() {
        tracing::info!(
            jobs = recovered.len(),
            "resuming unfinished jobs from the store"
        );
    }
    let security = match &config.security {
        Some(sc) => Some(security::Security::open(sc.clone(), store.clone()).await?),
        None => None,
    };
    let metrics = Arc::new(metrics::Metrics::new());
    let verification = if config.verification.enabled {
        let vc = config.verification.clone();
        let models = tokio::task::spawn_blocking(move || verify::TrustedModels::load(&vc))
            .await
            .map_err(|e| verify::VerifyError::Start(e.to_string()))??;
        let thresholds = config
            .verification
            .load_thresholds()
            .map_err(verify::VerifyError::Start)?;
        Some(verify::Setup {
            config: config.verification.clone(),
            thresholds,
            models,
            reputation: reputation::Reputation::load(store.clone()).await?,
        })
    } else {
        None
    };
    let prompts = verification
        .as_ref()
        .map(|setup| setup.models.prompt_counter())
        .unwrap_or_default();
    let mut scheduler =
        Scheduler::with_config(config.policy_kind()?, 0x007f_1ee7, config.scheduler.clone());
    if let Some(path) = &config.decision_log {
        decision_log::attach(&mut scheduler, path)?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (manager, manager_task) = manager::Manager::spawn(
        Arc::clone(&config),
        store.clone(),
        Arc::clone(&metrics),
        scheduler,
        recovered,
        stop_rx.clone(),
        verification,
    );
    let flush_store = store.clone();
    let tenants = Arc::new(tenants::Tenants::new(&config.tenants));
    let regions = Arc::new(config.region_map()?);
    let (batches, batch_task) = batch_runner::BatchRunner::spawn(
        batch_runner::Deps {
            config: Arc::clone(&config),
            store: store.clone(),
            manager: manager.clone(),
            tenants: Arc::clone(&tenants),
            regions: Arc::clone(&regions),
        },
        stop_rx.clone(),
    );
    let session_metrics = Arc::clone(&metrics);
    let state = Arc::new(api::AppState {
        manager: manager.clone(),
        batches,
        store,
        config: Arc::clone(&config),
        metrics,
        keys: config
            .api_keys
            .iter()
            .map(|k| (k.key.clone(), k.tenant.clone()))
            .collect(),
        tenants,
        regions,
        prompts,
    });
    let http = TcpListener::bind(config.http_addr).await?;
    let grpc = TcpListener::bind(config.grpc_addr).await?;
    let enroll = match &config.security {
        Some(sc) => Some(TcpListener::bind(sc.enroll_addr).await?),
        None => None,
    };
    let bound = Bound {
        http: http.local_addr()?,
        grpc: grpc.local_addr()?,
        enroll: enroll.as_ref().map(|l| l.local_addr()).transpose()?,
    };
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
    let service = session::NodeSessionServer::new(
        session::NodeService {
            manager,
            config: Arc::clone(&config),
            security: security.clone(),
            metrics: session_metrics,
        },
        4 << 20,
    );
    let listeners = listeners::Listeners::new(&config, security.as_ref(), http, grpc, enroll)?;
    tracing::info!(http = %bound.http, grpc = %bound.grpc, enroll = ?bound.enroll, agent_port = listeners.agent_port_mode(), https = config.http_tls.is_some(), "coordinator listening");
    let revocations = security.as_ref().map(|s| s.watch_revocations());
    let task = tokio::spawn(async move {
        let servers = listeners.serve(
            builder,
            service,
            api::router(Arc::clone(&state)),
            &state.metrics,
            stop_rx.clone(),
        );
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let result = servers.await;
        if let Some(r) = revocations {
            r.abort();
        }
        let _ = batch_task.await;
        let _ = manager_task.await;
        // Everything the manager queued for the store is durable before we report stopped.
        if let Err(e) = flush_store.flush().await {
            tracing::error!(cause = %e, "job store flush at shutdown failed");
        }
        result
    });
    Ok(Running {
        bound,
        security,
        task,
    })
}
