//! `tokenfleet-coordinator`: the fleet's single control point.
//!
//! It owns the OpenAI-compatible HTTP API, the agents' gRPC sessions, the durable job store
//! and the dispatch loop that asks the scheduler where each job should run.
//!
//! Layout:
//! - [`config`]: [`CoordinatorConfig`] (TOML).
//! - [`api`], [`generate`], [`responses`], [`openai`]: the HTTP API and its wire types.
//! - [`validation`]: raw requests → [`validation::ValidRequest`] or a 400.
//! - [`error`]: [`error::ApiError`], the one place errors become OpenAI error bodies.
//! - [`manager`]: the task that owns jobs, queue and fleet view; dispatch and continuation.
//! - [`jobs`], [`nodes`]: what the manager keeps per job and per vehicle.
//! - [`session`]: the `tokenfleet.v1` NodeSession gRPC service.
//! - [`store`], [`writer`]: SQLite (WAL) job store with migrations; ordered writes.
//! - [`metrics`]: Prometheus metrics (`tokenfleet_` prefix).
//! - [`verify`], [`reputation`]: result verification (a trusted engine re-scores finished
//!   jobs) and per-node reputation, quarantine and adaptive spot-check rates.

pub mod api;
pub mod config;
pub mod error;
pub mod generate;
pub mod jobs;
pub mod manager;
pub mod metrics;
pub mod nodes;
pub mod openai;
pub mod reputation;
pub mod responses;
pub mod session;
pub mod store;
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
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error(transparent)]
    Verify(#[from] verify::VerifyError),
}

/// Addresses the coordinator actually listens on (ports may have been 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

/// A running coordinator.
pub struct Running {
    pub bound: Bound,
    pub task: tokio::task::JoinHandle<Result<(), CoordinatorError>>,
}

/// Binds both listeners and runs the coordinator until `shutdown` resolves.
pub async fn start(
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, CoordinatorError> {
    config.validate()?;
    let config = Arc::new(config);
    let store = store::Store::open(&config.db_path)?;
    let recovered = store.load_unfinished().await?;
    if !recovered.is_empty() {
        tracing::info!(
            jobs = recovered.len(),
            "resuming unfinished jobs from the store"
        );
    }
    let metrics = Arc::new(metrics::Metrics::new());
    let verification = if config.verification.enabled {
        let vc = config.verification.clone();
        let models = tokio::task::spawn_blocking(move || verify::TrustedModels::load(&vc))
            .await
            .map_err(|e| verify::VerifyError::Start(e.to_string()))??;
        Some(verify::Setup {
            config: config.verification.clone(),
            models,
            reputation: reputation::Reputation::load(store.clone()).await?,
        })
    } else {
        None
    };
    let scheduler = Scheduler::new(config.policy_kind()?, 0x007f_1ee7);
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
    let state = Arc::new(api::AppState {
        manager: manager.clone(),
        store,
        config: Arc::clone(&config),
        metrics,
        keys: config
            .api_keys
            .iter()
            .map(|k| (k.key.clone(), k.tenant.clone()))
            .collect(),
    });
    let http = TcpListener::bind(config.http_addr).await?;
    let grpc = TcpListener::bind(config.grpc_addr).await?;
    let bound = Bound {
        http: http.local_addr()?,
        grpc: grpc.local_addr()?,
    };
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)));
    if let Some(tls) = &config.grpc_tls {
        let cert = std::fs::read(&tls.cert)
            .map_err(|e| CoordinatorError::Tls(format!("{}: {e}", tls.cert.display())))?;
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
        },
        4 << 20,
    );
    tracing::info!(http = %bound.http, grpc = %bound.grpc, tls = config.grpc_tls.is_some(), "coordinator listening");
    let task = tokio::spawn(async move {
        let mut stop_http = stop_rx.clone();
        let mut stop_grpc = stop_rx.clone();
        let http_server =
            axum::serve(http, api::router(state)).with_graceful_shutdown(async move {
                let _ = stop_http.wait_for(|s| *s).await;
            });
        let grpc_server = builder.add_service(service).serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc),
            async move {
                let _ = stop_grpc.wait_for(|s| *s).await;
            },
        );
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let (h, g) = tokio::join!(http_server, grpc_server);
        let _ = manager_task.await;
        // Everything the manager queued for the store is durable before we report stopped.
        if let Err(e) = flush_store.flush().await {
            tracing::error!(cause = %e, "job store flush at shutdown failed");
        }
        h?;
        g?;
        Ok(())
    });
    Ok(Running { bound, task })
}
