//! Agent sessions: the gRPC `NodeSession.Open` stream, one per connected vehicle.
//!
//! The service is mounted by hand ([`NodeSessionServer`]) rather than through the generated
//! server only to size its codec buffers: a coordinator holds one stream per vehicle, and
//! tonic's default 8 KiB encode plus 8 KiB decode buffer per stream would be most of what a
//! session costs. The buffers start small and grow on demand, so large messages still pass
//! (up to the configured decoding limit). The wire contract is the generated one.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokenfleet_protocol::v1::{self, AgentMessage, CoordinatorMessage};
use tokenfleet_protocol::{AgentMsg, CoordinatorMsg};
use tokio::sync::mpsc;
use tonic::codec::{BufferSettings, Codec};
use tonic::codegen::{http, Body, BoxFuture, StdError};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::{ProstDecoder, ProstEncoder};

use crate::config::CoordinatorConfig;
use crate::manager::{unix_ms, Manager};
use crate::nodes::clock_ms;

/// Outbound messages a session buffers before the manager treats the node as unable to keep up.
const SESSION_BUFFER: usize = 256;
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Initial codec buffer per stream and direction (tonic's default is 8 KiB).
const CODEC_BUFFER: usize = 512;
/// Encoded bytes gathered before the encoder yields (tonic's default).
const CODEC_YIELD: usize = 32 * 1024;
const OPEN_PATH: &str = "/tokenfleet.v1.NodeSession/Open";

pub struct NodeService {
    pub manager: Manager,
    pub config: Arc<CoordinatorConfig>,
}

/// The coordinator → agent half of a session, as the response stream.
pub struct Outbound(mpsc::Receiver<Box<CoordinatorMessage>>);

impl tokio_stream::Stream for Outbound {
    type Item = Result<CoordinatorMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|m| m.map(|m| Ok(*m)))
    }
}

impl NodeService {
    async fn open(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Outbound>, Status> {
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
        tx.send(Box::new(welcome))
            .await
            .map_err(|_| Status::internal("session closed"))?;
        let name = hello.node_id.clone();
        // The session answers heartbeats itself (a fleet sends thousands a second; none needs
        // the manager) through a weak handle, so that when the manager drops the session's
        // sender the outbound stream still ends and the agent reconnects.
        let acks = tx.downgrade();
        let last_seen = Arc::new(AtomicU64::new(clock_ms()));
        let registered = self
            .manager
            .node_up(hello, tx, Arc::clone(&last_seen))
            .await?;
        tracing::debug!(node = %name, ?peer, "session open");
        let manager = self.manager.clone();
        let lease_ms = self.config.lease_timeout.as_millis() as u64;
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(AgentMessage { msg: Some(msg) })) => {
                        last_seen.store(clock_ms(), Ordering::Relaxed);
                        if let AgentMsg::Heartbeat(hb) = &msg {
                            let ack = CoordinatorMsg::HeartbeatAck(v1::HeartbeatAck {
                                sent_unix_ms: hb.sent_unix_ms,
                                lease_deadline_unix_ms: unix_ms() + lease_ms,
                            });
                            let sent = acks.upgrade().is_some_and(|tx| {
                                tx.try_send(Box::new(CoordinatorMessage::new(ack))).is_ok()
                            });
                            if !sent {
                                tracing::debug!(node = %name, "heartbeat not acknowledged: session closed or full");
                            }
                            continue;
                        }
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
                        tracing::debug!(node = %name, cause = %status, "session stream error");
                        break;
                    }
                }
            }
            manager.node_down(registered.node, registered.conn).await;
        });
        Ok(Response::new(Outbound(rx)))
    }
}

/// `tokenfleet.v1.NodeSession` as a tower service for tonic's router.
#[derive(Clone)]
pub struct NodeSessionServer {
    inner: Arc<NodeService>,
    max_decoding_message_size: usize,
}

impl NodeSessionServer {
    pub fn new(service: NodeService, max_decoding_message_size: usize) -> Self {
        Self {
            inner: Arc::new(service),
            max_decoding_message_size,
        }
    }
}

impl tonic::server::NamedService for NodeSessionServer {
    const NAME: &'static str = v1::node_session_server::SERVICE_NAME;
}

impl<B> tonic::codegen::Service<http::Request<B>> for NodeSessionServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != OPEN_PATH {
            return Box::pin(async { Ok(Status::unimplemented("unknown method").into_http()) });
        }
        let open = OpenSvc(Arc::clone(&self.inner));
        let limit = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(SessionCodec)
                .apply_max_message_size_config(Some(limit), None);
            Ok(grpc.streaming(open, req).await)
        })
    }
}

struct OpenSvc(Arc<NodeService>);

impl tonic::server::StreamingService<AgentMessage> for OpenSvc {
    type Response = CoordinatorMessage;
    type ResponseStream = Outbound;
    type Future = BoxFuture<Response<Outbound>, Status>;

    fn call(&mut self, request: Request<Streaming<AgentMessage>>) -> Self::Future {
        let inner = Arc::clone(&self.0);
        Box::pin(async move { inner.open(request).await })
    }
}

/// Protobuf codec with small initial buffers (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
struct SessionCodec;

impl Codec for SessionCodec {
    type Encode = CoordinatorMessage;
    type Decode = AgentMessage;
    type Encoder = ProstEncoder<CoordinatorMessage>;
    type Decoder = ProstDecoder<AgentMessage>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(CODEC_BUFFER, CODEC_YIELD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(CODEC_BUFFER, CODEC_YIELD))
    }
}
