//! Agent sessions: the gRPC `NodeSession.Open` stream, one per connected vehicle.

use std::sync::Arc;
use std::time::Duration;

use tokenfleet_protocol::v1::node_session_server::NodeSession;
use tokenfleet_protocol::v1::{self, AgentMessage, CoordinatorMessage};
use tokenfleet_protocol::{AgentMsg, CoordinatorMsg};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::CoordinatorConfig;
use crate::manager::Manager;

/// Outbound messages a session buffers before the manager treats the node as unable to keep up.
const SESSION_BUFFER: usize = 256;
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct NodeService {
    pub manager: Manager,
    pub config: Arc<CoordinatorConfig>,
}

#[tonic::async_trait]
impl NodeSession for NodeService {
    type OpenStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn open(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::OpenStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10 s"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(AgentMsg::Hello(h)) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let welcome = CoordinatorMessage::new(CoordinatorMsg::Welcome(v1::Welcome {
            node_id: hello.node_id.clone(),
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u32,
            lease_timeout_ms: self.config.lease_timeout.as_millis() as u32,
        }));
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::internal("session closed"))?;
        let name = hello.node_id.clone();
        let registered = self.manager.node_up(hello, tx).await?;
        tracing::debug!(node = %name, ?peer, "session open");
        let manager = self.manager.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(AgentMessage { msg: Some(msg) })) => {
                        if !manager
                            .node_msg(registered.node, registered.conn, msg)
                            .await
                        {
                            break;
                        }
                    }
                    Ok(Some(AgentMessage { msg: None })) => {}
                    Ok(None) => break,
                    Err(status) => {
                        tracing::info!(node = %name, cause = %status, "session stream error");
                        break;
                    }
                }
            }
            manager.node_down(registered.node, registered.conn).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
