//! Serving the client API's connections with the bounds `axum::serve` lacks (issue 13, hole 7):
//!
//! - a connection cap: a semaphore taken at accept; a connection over the cap is answered
//!   `503` with an OpenAI error body and closed, and counted in
//!   `tokenfleet_http_connections_refused_total{listener}`;
//! - a header-read timeout (HTTP/1): a client that does not send a whole request head within
//!   `http_header_read_timeout` is disconnected, and so is an idle keep-alive connection,
//!   whose wait for its next request head is timed the same way;
//! - HTTP/2 keep-alive pings, so a vanished peer's connection (and its permit) is released.
//!
//! Timeouts on a request's body and on non-streaming handlers are the router's
//! ([`crate::http::api`]); nothing here limits how long a response takes, so a long SSE stream is
//! never cut.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};
use tokio_stream::{Stream, StreamExt};

/// HTTP/2 pings an idle peer this often, and drops it when a ping is not answered in as long.
const H2_KEEPALIVE: Duration = Duration::from_secs(20);

/// What bounds one listener's connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// The answer to a connection over the cap: a whole HTTP/1.1 response, then close.
fn over_capacity_response() -> Vec<u8> {
    let body = serde_json::json!({"error": {
        "message": "The server has too many open connections; retry shortly.",
        "type": "server_error", "param": null, "code": "too_many_connections"}})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `router` on the connections `accept` yields until `stop` flips, then lets the open
/// ones finish (graceful shutdown) and returns.
pub async fn serve<I>(
    accepted: impl Stream<Item = std::io::Result<I>> + Unpin,
    router: axum::Router,
    limits: ConnLimits,
    refused: prometheus::IntCounter,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut accepted = accepted;
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let io = tokio::select! {
            io = accepted.next() => match io {
                Some(Ok(io)) => io,
                Some(Err(e)) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(cause = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                None => break,
            },
            _ = stopped(&mut stop) => break,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            refused.inc();
            tokio::spawn(async move {
                let mut io = io;
                // Best effort within a bound: a client that does not read gets closed anyway.
                let answer = over_capacity_response();
                let _ = tokio::time::timeout(Duration::from_secs(1), io.write_all(&answer)).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
            });
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_KEEPALIVE)
                .keep_alive_timeout(H2_KEEPALIVE);
            let mut conn = pin!(builder.serve_connection_with_upgrades(TokioIo::new(io), service));
            let mut stopping = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::trace!(cause = %e, "HTTP connection ended with an error");
                        }
                        break;
                    }
                    _ = stopped(&mut stop), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    // Every connection holds a permit until it ends: all of them back means all are closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
}

/// Resolves once `stop` is true (the guard `wait_for` returns is not held across awaits).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
