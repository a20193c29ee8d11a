//! The coordinator's three listeners and how each is secured.
//!
//! - Agent port (gRPC): with `[security]`, rustls with client certificates from the fleet CA
//!   required and checked against revocations in the handshake (plaintext and certificate-less
//!   clients never reach gRPC); with `grpc_tls`, server-only TLS from operator files; with
//!   neither, plaintext (loopback only, enforced by config validation).
//! - Client API (HTTP): HTTPS with `http_tls`, else plain HTTP; served by
//!   [`crate::http::server`] (connection cap, header-read timeout).
//! - Enrollment (gRPC, with `[security]`): server-authenticated TLS with the coordinator's
//!   certificate from the fleet CA, since a vehicle has no certificate before it enrolls.
//!   Anyone can connect, so it is bounded like the API: at most `http_max_connections`
//!   connections (one more is closed and counted), each RPC within `http_request_timeout`,
//!   each connection closed after [`ENROLL_CONNECTION_AGE`] (also one that never sends a
//!   request), TLS handshakes within the handshake timeout.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt;

use prometheus::{IntCounter, IntCounterVec, Opts};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

use crate::http::server::{self, ConnLimits};
use crate::metrics::Metrics;
use crate::transport::session::NodeSessionServer;
use crate::trust::security::enroll::{EnrollmentServer, EnrollmentService};
use crate::trust::security::{tls, Security, SecurityError};
use crate::CoordinatorConfig;

/// The coordinator's own server certificate is reissued at every start.
const SERVER_CERT_TTL: Duration = Duration::from_secs(365 * 86400);

/// An enrollment is a few unary RPCs (enroll, a quote round trip) taking well under a second
/// on loopback; two minutes leave room for a slow cellular link and a TPM quote.
const ENROLL_CONNECTION_AGE: Duration = Duration::from_secs(120);

/// Why the listeners could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Security(#[from] SecurityError),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

type Served = Pin<Box<dyn Future<Output = Result<(), ListenError>> + Send>>;

enum AgentPort {
    Plain(TcpListener),
    Mutual(TcpListener, Box<rustls::ServerConfig>),
}

pub(crate) struct Listeners {
    limits: ConnLimits,
    request_timeout: Duration,
    http: TcpListener,
    https: Option<rustls::ServerConfig>,
    agents: AgentPort,
    enroll: Option<EnrollPort>,
}

/// The enrollment port: TLS (server-authenticated: a node has no certificate yet), at most
/// `max_connections` at once.
struct EnrollPort {
    listener: TcpListener,
    tls: rustls::ServerConfig,
    security: Arc<Security>,
}

impl EnrollPort {
    fn serve(
        self,
        max_connections: usize,
        request_timeout: Duration,
        refused: IntCounter,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> Served {
        let permits = Arc::new(Semaphore::new(max_connections));
        let accepted = ReceiverStream::new(tls::incoming(self.listener, self.tls, "enroll"))
            .filter_map(move |(stream, peer)| {
                match Arc::clone(&permits).try_acquire_owned() {
                    Ok(permit) => Some(Ok::<_, std::io::Error>(Capped {
                        io: stream,
                        _permit: permit,
                    })),
                    Err(_) => {
                        refused.inc();
                        tracing::warn!(%peer, "enrollment port at its connection limit; connection closed");
                        None
                    }
                }
            });
        let s = tonic::transport::Server::builder()
            .timeout(request_timeout)
            .max_connection_age(ENROLL_CONNECTION_AGE)
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(EnrollmentServer::new(EnrollmentService {
                security: self.security,
            }))
            .serve_with_incoming_shutdown(accepted, stopped);
        Box::pin(async move { Ok(s.await?) })
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, ListenError> {
    std::fs::read(path).map_err(|e| ListenError::Tls(format!("{}: {e}", path.display())))
}

/// A private key file, refused when its group or others may read it.
fn read_key(path: &std::path::Path) -> Result<Vec<u8>, ListenError> {
    tokenfleet_store::sealing::check_private(path).map_err(|e| ListenError::Tls(e.to_string()))?;
    read(path)
}

fn tls_err(e: tls::TlsError) -> ListenError {
    ListenError::Security(SecurityError::Tls(e))
}

impl Listeners {
    pub fn new(
        config: &CoordinatorConfig,
        security: Option<&Arc<Security>>,
        http: TcpListener,
        grpc: TcpListener,
        enroll: Option<TcpListener>,
    ) -> Result<Self, ListenError> {
        let https = match &config.http_tls {
            Some(files) => Some(
                tls::server_config(
                    &read(&files.cert)?,
                    &read_key(&files.key)?,
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
                    Some(EnrollPort {
                        listener: enroll,
                        tls: enroll_tls,
                        security: Arc::clone(sec),
                    }),
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
            limits: ConnLimits {
                max_connections: config.http_max_connections,
                header_read_timeout: config.http_header_read_timeout,
            },
            request_timeout: config.http_request_timeout,
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
        metrics: &Metrics,
        stop: watch::Receiver<bool>,
    ) -> Result<(), ListenError> {
        let refused = IntCounterVec::new(
            Opts::new(
                "tokenfleet_http_connections_refused_total",
                "Connections closed at accept because the listener held its maximum",
            ),
            &["listener"],
        )
        .expect("valid metric");
        metrics.register(Box::new(refused.clone()));
        let stopped = move || {
            let mut stop = stop.clone();
            async move {
                let _ = stop.wait_for(|s| *s).await;
            }
        };
        let limits = self.limits;
        let http: Served = match self.https {
            None => {
                let accepted = TcpListenerStream::new(self.http);
                let s = server::serve(
                    accepted,
                    router,
                    limits,
                    refused.with_label_values(&["http"]),
                    stop_rx(&stopped),
                );
                Box::pin(async move {
                    s.await;
                    Ok(())
                })
            }
            Some(config) => {
                let accepted = ReceiverStream::new(tls::incoming(self.http, config, "https"))
                    .map(|(stream, _)| Ok::<_, std::io::Error>(stream));
                let s = server::serve(
                    accepted,
                    router,
                    limits,
                    refused.with_label_values(&["https"]),
                    stop_rx(&stopped),
                );
                Box::pin(async move {
                    s.await;
                    Ok(())
                })
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
            Some(port) => port.serve(
                limits.max_connections,
                self.request_timeout,
                refused.with_label_values(&["enroll"]),
                stopped(),
            ),
        };
        let (h, g, e) = tokio::join!(http, grpc, enroll);
        h?;
        g?;
        e
    }
}

/// A watch receiver that flips when `stopped` resolves (the HTTP server takes a receiver).
fn stop_rx<F, Fut>(stopped: &F) -> watch::Receiver<bool>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = watch::channel(false);
    let done = stopped();
    tokio::spawn(async move {
        done.await;
        let _ = tx.send(true);
    });
    rx
}

/// An accepted connection holding its place under the listener's connection cap until it
/// is dropped.
struct Capped<S> {
    io: S,
    _permit: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Capped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<S: Connected> Connected for Capped<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
