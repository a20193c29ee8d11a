//! The agent's session to the coordinator: dial out, Hello, heartbeats, and reconnect with
//! capped exponential backoff when the link drops (vehicles change networks all the time).

use std::time::Duration;

use tokenfleet_protocol::v1::node_session_client::NodeSessionClient;
use tokenfleet_protocol::v1::{self, AgentMessage};
use tokenfleet_protocol::{AgentMsg, CoordinatorMsg};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::{AgentConfig, Backoff};
use crate::core::CoreMsg;
use crate::AgentError;

const OUTBOUND_BUFFER: usize = 1024;

async fn channel(config: &AgentConfig) -> Result<Channel, AgentError> {
    let mut endpoint = Endpoint::from_shared(config.coordinator.clone())
        .map_err(|e| {
            AgentError::Config(format!("coordinator address {:?}: {e}", config.coordinator))
        })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    if config.coordinator.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &config.ca_cert {
            let pem = std::fs::read(ca)
                .map_err(|e| AgentError::Config(format!("{}: {e}", ca.display())))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| AgentError::Config(e.to_string()))?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| AgentError::Connect(e.to_string()))
}

/// Keeps a session up until `shutdown` flips.
pub(crate) async fn run(
    config: AgentConfig,
    core: mpsc::Sender<CoreMsg>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    loop {
        if *shutdown.borrow() {
            return;
        }
        match one_session(&config, &core, &mut shutdown, &mut backoff).await {
            Ok(()) => tracing::info!(node = %config.node_id, "session ended"),
            Err(e) => tracing::warn!(node = %config.node_id, cause = %e, "session failed"),
        }
        let _ = core.send(CoreMsg::Detach).await;
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn one_session(
    config: &AgentConfig,
    core: &mpsc::Sender<CoreMsg>,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
) -> Result<(), AgentError> {
    let channel = channel(config).await?;
    let mut client = NodeSessionClient::new(channel);
    let (out_tx, out_rx) = mpsc::channel::<AgentMessage>(OUTBOUND_BUFFER);
    let (hello_tx, hello_rx) = oneshot::channel();
    core.send(CoreMsg::Hello(hello_tx))
        .await
        .map_err(|_| AgentError::Stopped)?;
    let hello = hello_rx.await.map_err(|_| AgentError::Stopped)?;
    out_tx
        .send(AgentMessage::new(AgentMsg::Hello(hello)))
        .await
        .map_err(|_| AgentError::Stopped)?;
    let response = client
        .open(ReceiverStream::new(out_rx))
        .await
        .map_err(|s| AgentError::Refused(s.message().to_string()))?;
    let mut inbound = response.into_inner();
    let welcome = match inbound
        .message()
        .await
        .map_err(|s| AgentError::Refused(s.message().to_string()))?
    {
        Some(v1::CoordinatorMessage {
            msg: Some(CoordinatorMsg::Welcome(w)),
        }) => w,
        _ => {
            return Err(AgentError::Refused(
                "the coordinator did not answer Hello with Welcome".into(),
            ))
        }
    };
    backoff.reset();
    tracing::info!(node = %config.node_id, coordinator = %config.coordinator, "session established");
    core.send(CoreMsg::Attach(out_tx.clone()))
        .await
        .map_err(|_| AgentError::Stopped)?;
    let mut heartbeat = tokio::time::interval(Duration::from_millis(
        welcome.heartbeat_interval_ms.max(100) as u64,
    ));
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(v1::CoordinatorMessage { msg: Some(msg) })) => {
                    core.send(CoreMsg::FromCoordinator(msg)).await.map_err(|_| AgentError::Stopped)?;
                }
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(status) => return Err(AgentError::Connect(status.message().to_string())),
            },
            _ = heartbeat.tick() => {
                let sent_unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
                if out_tx.try_send(AgentMessage::new(AgentMsg::Heartbeat(v1::Heartbeat { sent_unix_ms }))).is_err() {
                    tracing::debug!("heartbeat not sent: session buffer full");
                }
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}
