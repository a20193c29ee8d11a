//! The coordinator's three listeners and how each is secured.
//!
//! - Agent port (gRPC): with `[security]`, rustls with client certificates from the fleet CA
//!   required and checked against revocations in the handshake (plaintext and certificate-less
//!   clients never reach gRPC); with `grpc_tls`, server-only TLS from operator files; with
//!   neither, plaintext (loopback only, enforced by config validation).
//! - Client API (HTTP): HTTPS with `http_tls`, else plain HTTP.
//! - Enrollment (gRPC, with `[security]`): server-authenticated TLS with the coordinator's
//!   certificate from the fleet CA, since a vehicle has no certificate before it enrolls.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt;

use crate::security::enroll::{EnrollmentServer, EnrollmentService};
use crate::security::{tls, Security, SecurityError};
use crate::session::NodeSessionServer;
use crate::{CoordinatorConfig, CoordinatorError};

/// The coordinator's own server certificate is reissued at every start.
const SERVER_CERT_TTL: Duration = Duration::from_secs(365 * 86400);

type Served = Pin<Box<dyn Future<Output = Result<(), CoordinatorError>> + Send>>;

enum AgentPort {
    Plain(TcpListener),
    Mutual(TcpListener, Box<rustls::ServerConfig>),
}

pub(crate) struct Listeners {
    http: TcpListener,
    https: Option<rustls::ServerConfig>,
    agents: AgentPort,
    enroll: Option<(TcpListener, rustls::ServerConfig, Arc<Security>)>,
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, CoordinatorError> {
    std::fs::read(path).map_err(|e| CoordinatorError::Tls(format!("{}: {e}", path.display())))
}

fn tls_err(e: tls::TlsError) -> CoordinatorError {
    CoordinatorError::Security(SecurityError::Tls(e))
}

impl Listeners {
    pub fn new(
        config: &CoordinatorConfig,
        security: Option<&Arc<Security>>,
        http: TcpListener,
        grpc: TcpListener,
        enroll: Option<TcpListener>,
    ) -> Result<Self, CoordinatorError> {
        let https = match &config.http_tls {
            Some(files) => Some(
                tls::server_config(
                    &read(&files.cert)?,
                    &read(&files.key)?,
                    &[b"h2", b"http/1.1"],
                )
                .map_err(tls_err)?,
            ),
            None => None,
        };
        let (agents, enroll) = match (security, enroll) {
            (Some(sec), Some(enroll)) => {
                let (cert, key) = sec
                    .ca
                    .server_identity(&sec.config.server_names, SERVER_CERT_TTL)
                    .map_err(SecurityError::from)?;
                let ca = sec.ca.cert_pem().as_bytes();
                let agent_tls = tls::agent_port_config(
                    cert.as_bytes(),
                    key.as_bytes(),
                    ca,
                    sec.revoked.clone(),
                )
                .map_err(tls_err)?;
                let enroll_tls = tls::server_config(cert.as_bytes(), key.as_bytes(), &[b"h2"])
                    .map_err(tls_err)?;
                (
                    AgentPort::Mutual(grpc, Box::new(agent_tls)),
                    Some((enroll, enroll_tls, Arc::clone(sec))),
                )
            }
            _ => {
                if config.grpc_tls.is_none() {
                    tracing::warn!(addr = %config.grpc_addr, "agent port is PLAINTEXT and unauthenticated (no [security]): development on loopback only");
                }
                (AgentPort::Plain(grpc), None)
            }
        };
        Ok(Self {
            http,
            https,
            agents,
            enroll,
        })
    }

    pub fn agent_port_mode(&self) -> &'static str {
        match &self.agents {
            AgentPort::Mutual(..) => "mutual-tls",
            AgentPort::Plain(_) => "plaintext-or-server-tls",
        }
    }

    /// Serves everything until `stop` flips.
    pub async fn serve(
        self,
        builder: tonic::transport::Server,
        sessions: NodeSessionServer,
        router: axum::Router,
        stop: watch::Receiver<bool>,
    ) -> Result<(), CoordinatorError> {
        let stopped = move || {
            let mut stop = stop.clone();
            async move {
                let _ = stop.wait_for(|s| *s).await;
            }
        };
        let http: Served = match self.https {
            None => {
                let s = axum::serve(self.http, router).with_graceful_shutdown(stopped());
                Box::pin(async move { Ok(s.await?) })
            }
            Some(config) => {
                let local = self.http.local_addr()?;
                let listener = tls::HttpsListener {
                    accepted: tls::incoming(self.http, config, "https"),
                    local,
                };
                let s = axum::serve(listener, router).with_graceful_shutdown(stopped());
                Box::pin(async move { Ok(s.await?) })
            }
        };
        let mut builder = builder;
        let router = builder.add_service(sessions);
        let grpc: Served = match self.agents {
            AgentPort::Plain(listener) => {
                let s = router
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped());
                Box::pin(async move { Ok(s.await?) })
            }
            AgentPort::Mutual(listener, config) => {
                let accepted = ReceiverStream::new(tls::incoming(listener, *config, "agents"))
                    .map(|(stream, _)| Ok::<_, std::io::Error>(stream));
                let s = router.serve_with_incoming_shutdown(accepted, stopped());
                Box::pin(async move { Ok(s.await?) })
            }
        };
        let enroll: Served = match self.enroll {
            None => Box::pin(async { Ok(()) }),
            Some((listener, config, security)) => {
                let accepted = ReceiverStream::new(tls::incoming(listener, config, "enroll"))
                    .map(|(stream, _)| Ok::<_, std::io::Error>(stream));
                let s = tonic::transport::Server::builder()
                    .add_service(EnrollmentServer::new(EnrollmentService { security }))
                    .serve_with_incoming_shutdown(accepted, stopped());
                Box::pin(async move { Ok(s.await?) })
            }
        };
        let (h, g, e) = tokio::join!(http, grpc, enroll);
        h?;
        g?;
        e
    }
}
