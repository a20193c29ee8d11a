//! Agent sessions: the gRPC `NodeSession.Open` stream, one per connected vehicle.
//!
//! The service is mounted by hand ([`NodeSessionServer`]) rather than through the generated
//! server only to size its codec buffers: a coordinator holds one stream per vehicle, and
//! tonic's default 8 KiB encode plus 8 KiB decode buffer per stream would be most of what a
//! session costs. The buffers start small and grow on demand, so large messages still pass
//! (up to the configured decoding limit). The wire contract is the generated one.
//!
//! With [`Security`] the session takes the node id from the client certificate and admits the
//! node only after its attestation (see `security::session`).
//!
//! A Hello is refused when a model hash in it is not canonical or, with `[[models]]` bindings,
//! when a model name is unbound or announced with another file than the bound one
//! ([`crate::config::models::check_hello`]). `State` messages are rate-limited per session
//! ([`StateLimiter`]): excess is coalesced (only the newest waits, the rest are dropped and
//! counted) and a session that keeps flooding is closed.

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

use tokio::time::Instant;

use crate::clock::{clock_ms, unix_ms};
use crate::config::models::{check_hello, HelloRefusal};
use crate::config::{CoordinatorConfig, StateRate};
use crate::fleet::manager::{Manager, NodeRefusal};
use crate::fleet::nodes::NodeSender;
use crate::metrics::Metrics;
use crate::trust::security::session::SessionSecurity;
use crate::trust::security::tls::NodeIdentity;
use crate::trust::security::{Security, SessionKill};

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
    /// Mutual TLS and attestation; None on a plaintext loopback port (development).
    pub security: Option<Arc<Security>>,
    pub metrics: Arc<Metrics>,
}

/// What to do with a `State` message (see [`StateLimiter::offer`]).
#[derive(Debug, PartialEq)]
pub enum StateVerdict {
    /// Within the rate: pass it on now.
    Forward(v1::State),
    /// Over the rate: it waits as the newest (see [`StateLimiter::release_at`]).
    Held,
    /// The session kept flooding past the limit: close it.
    Close,
}

/// A token bucket over one session's `State` messages, holding back only the newest excess.
#[derive(Debug)]
pub struct StateLimiter {
    rate: StateRate,
    tokens: f64,
    last: Instant,
    pending: Option<v1::State>,
    /// Messages superseded in the current window, and when the window started.
    dropped: u32,
    window_start: Instant,
}

impl StateLimiter {
    pub fn new(rate: StateRate, now: Instant) -> Self {
        Self {
            rate,
            tokens: rate.burst as f64,
            last: now,
            pending: None,
            dropped: 0,
            window_start: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate.per_s).min(self.rate.burst as f64);
        self.last = now;
        if now.saturating_duration_since(self.window_start)
            >= Duration::from_secs(self.rate.window_s)
        {
            self.window_start = now;
            self.dropped = 0;
        }
    }

    /// Takes a State that arrived at `now`. Returns how many earlier messages it superseded
    /// (0 or 1) with the verdict.
    pub fn offer(&mut self, state: v1::State, now: Instant) -> (StateVerdict, u32) {
        self.refill(now);
        if self.pending.is_none() && self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return (StateVerdict::Forward(state), 0);
        }
        let superseded = u32::from(self.pending.replace(state).is_some());
        self.dropped += superseded;
        if self.dropped >= self.rate.close_after_dropped {
            return (StateVerdict::Close, superseded);
        }
        (StateVerdict::Held, superseded)
    }

    /// When the held State may go (None when nothing is held).
    pub fn release_at(&self) -> Option<Instant> {
        self.pending.as_ref()?;
        let missing = (1.0 - self.tokens).max(0.0);
        Some(self.last + Duration::from_secs_f64(missing / self.rate.per_s))
    }

    /// The held State, if a token is available at `now`.
    pub fn release(&mut self, now: Instant) -> Option<v1::State> {
        self.refill(now);
        if self.tokens < 1.0 {
            return None;
        }
        let state = self.pending.take()?;
        self.tokens -= 1.0;
        Some(state)
    }
}

/// The coordinator → agent half of a session, as the response stream. It ends when the
/// manager drops the session's sender, or with the status a kill (revocation, failed
/// attestation, expired certificate) puts on `kill`.
pub struct Outbound {
    rx: mpsc::Receiver<Box<CoordinatorMessage>>,
    kill: Option<mpsc::Receiver<Status>>,
}

impl tokio_stream::Stream for Outbound {
    type Item = Result<CoordinatorMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(kill) = &mut self.kill {
            match kill.poll_recv(cx) {
                Poll::Ready(Some(status)) => {
                    // End the stream after this error: nothing more goes to this agent.
                    self.rx.close();
                    self.kill = None;
                    while let Ok(_dropped) = self.rx.try_recv() {}
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(None) => self.kill = None,
                Poll::Pending => {}
            }
        }
        self.rx.poll_recv(cx).map(|m| m.map(|m| Ok(*m)))
    }
}

impl NodeService {
    async fn open(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Outbound>, Status> {
        let peer = request.remote_addr();
        // The node is who its certificate says, never what its Hello claims.
        let identity = match &self.security {
            Some(sec) => Some(sec.identify(request.peer_certs())?),
            None => None,
        };
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10 s"))??;
        let mut hello = match first.and_then(|m| m.msg) {
            Some(AgentMsg::Hello(h)) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        if let Some(id) = &identity {
            if !hello.node_id.is_empty() && hello.node_id != id.node_id {
                tracing::warn!(node = %id.node_id, claimed = %hello.node_id, "Hello names another node; the certificate's node id is used");
            }
            hello.node_id = id.node_id.clone();
        }
        // Issue 13, hole 2: one spelling of a model hash, and a bound name served only by its
        // bound file, before anything (attestation, verification) relies on the Hello.
        if let Err(refusal) = check_hello(&hello.models, &self.config.models) {
            tracing::warn!(node = %hello.node_id, cause = %refusal, "Hello refused: announced models");
            self.metrics
                .node_sessions_closed
                .with_label_values(&["hello_models"])
                .inc();
            return Err(match refusal {
                HelloRefusal::NotCanonical { .. } => Status::invalid_argument(refusal.to_string()),
                _ => Status::permission_denied(refusal.to_string()),
            });
        }
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let (kill_tx, kill_rx) = mpsc::channel(1);
        let session = Session {
            manager: self.manager.clone(),
            config: Arc::clone(&self.config),
            security: self.security.clone(),
            metrics: Arc::clone(&self.metrics),
            kill: SessionKill::new(kill_tx),
        };
        tracing::debug!(node = %hello.node_id, ?peer, "session open");
        tokio::spawn(session.run(identity, hello, inbound, tx));
        Ok(Response::new(Outbound {
            rx,
            kill: Some(kill_rx),
        }))
    }
}

/// One node session after its Hello: admission, registration, then the message loop.
struct Session {
    manager: Manager,
    config: Arc<CoordinatorConfig>,
    security: Option<Arc<Security>>,
    metrics: Arc<Metrics>,
    kill: Arc<SessionKill>,
}

impl Session {
    async fn run(
        self,
        identity: Option<NodeIdentity>,
        hello: v1::Hello,
        mut inbound: Streaming<AgentMessage>,
        tx: NodeSender,
    ) {
        let name = hello.node_id.clone();
        // Attestation comes before Welcome and before the manager knows the node: no job can
        // be assigned to a node that has not proven what it runs.
        let mut guard = None;
        let mut sec_state = None;
        let mut attested = false;
        if let (Some(sec), Some(id)) = (&self.security, identity) {
            match SessionSecurity::admit(Arc::clone(sec), id, &hello, &tx, &mut inbound).await {
                Ok((state, ok)) => {
                    attested = ok;
                    sec_state = Some(state);
                }
                Err(status) => return self.kill.kill(status),
            }
            guard = Some(sec.register_session(&name, Arc::clone(&self.kill)));
        }
        let welcome = CoordinatorMessage::new(CoordinatorMsg::Welcome(v1::Welcome {
            node_id: name.clone(),
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u32,
            lease_timeout_ms: self.config.lease_timeout.as_millis() as u32,
        }));
        if tx.send(Box::new(welcome)).await.is_err() {
            return;
        }
        // The session answers heartbeats itself (a fleet sends thousands a second; none needs
        // the manager) through a weak handle, so that when the manager drops the session's
        // sender the outbound stream still ends and the agent reconnects.
        let acks = tx.downgrade();
        let last_seen = Arc::new(AtomicU64::new(clock_ms()));
        let registered = match self
            .manager
            .node_up(hello.clone(), attested, tx, Arc::clone(&last_seen))
            .await
        {
            Ok(r) => r,
            Err(refusal) => return self.kill.kill(refusal_status(&refusal)),
        };
        let (node, conn) = (registered.node, registered.conn);
        let live = Live {
            name,
            hello,
            sec: sec_state,
            states: StateLimiter::new(self.config.node_state_rate, Instant::now()),
            node,
            conn,
            last_seen,
            acks,
            lease_ms: self.config.lease_timeout.as_millis() as u64,
        };
        self.message_loop(live, inbound).await;
        drop(guard);
        self.manager.node_down(node, conn).await;
    }

    /// Serves the registered node's messages and the session's timers until either side ends
    /// the session.
    async fn message_loop(&self, mut live: Live, mut inbound: Streaming<AgentMessage>) {
        let far = Instant::now() + Duration::from_secs(365 * 86400);
        let mut reattest = tokio::time::interval(
            live.sec
                .as_ref()
                .map(SessionSecurity::reattest_interval)
                .unwrap_or(Duration::from_secs(3600)),
        );
        reattest.reset();
        loop {
            let state_due = live.states.release_at();
            let quote_due = live.sec.as_ref().and_then(|s| s.quote_due());
            let renew_at = live.sec.as_ref().and_then(|s| s.renew_at());
            let expires_at = live.sec.as_ref().map(|s| s.expires_at());
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(AgentMessage { msg: Some(msg) })) => {
                        live.last_seen.store(clock_ms(), Ordering::Relaxed);
                        if !self.on_message(&mut live, msg).await {
                            break;
                        }
                    }
                    Ok(Some(AgentMessage { msg: None })) => {}
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(node = %live.name, cause = %status, "session stream error");
                        break;
                    }
                },
                _ = tokio::time::sleep_until(state_due.unwrap_or(far)), if state_due.is_some() => {
                    if let Some(state) = live.states.release(Instant::now()) {
                        if !self.manager.node_msg(live.node, live.conn, AgentMsg::State(state)).await {
                            break;
                        }
                    }
                }
                _ = reattest.tick(), if live.sec.as_ref().is_some_and(|s| s.is_attested()) => {
                    if let Some(challenge) = live.sec.as_mut().and_then(|s| s.challenge()) {
                        live.send(challenge);
                    }
                }
                _ = tokio::time::sleep_until(quote_due.unwrap_or(far)), if quote_due.is_some() => {
                    tracing::warn!(node = %live.name, "no answer to an attestation challenge; disconnecting");
                    self.kill.kill(Status::deadline_exceeded("no attestation quote in time"));
                    break;
                }
                _ = tokio::time::sleep_until(renew_at.unwrap_or(far)), if renew_at.is_some() => {
                    if let Some(request) = live.sec.as_mut().map(|s| s.renewal_request()) {
                        live.send(request);
                    }
                }
                _ = tokio::time::sleep_until(expires_at.unwrap_or(far)), if expires_at.is_some() => {
                    tracing::info!(node = %live.name, "session certificate expired; the agent reconnects with its renewed one");
                    self.kill.kill(Status::unauthenticated("certificate expired; reconnect with the renewed certificate"));
                    break;
                }
                _ = self.kill.killed() => break,
            }
        }
    }

    /// One message from the node; false ends the session.
    async fn on_message(&self, live: &mut Live, msg: AgentMsg) -> bool {
        match msg {
            AgentMsg::Heartbeat(hb) => {
                let ack = CoordinatorMsg::HeartbeatAck(v1::HeartbeatAck {
                    sent_unix_ms: hb.sent_unix_ms,
                    lease_deadline_unix_ms: unix_ms() + live.lease_ms,
                });
                if !live.send(CoordinatorMessage::new(ack)) {
                    tracing::debug!(node = %live.name, "heartbeat not acknowledged: session closed or full");
                }
                true
            }
            AgentMsg::Quote(q) => {
                let checked = match &mut live.sec {
                    Some(s) => s.check_quote(&q, &live.hello),
                    None => Err(Status::permission_denied("unsolicited attestation quote")),
                };
                match checked {
                    Ok(()) => true,
                    Err(status) => {
                        self.kill.kill(status);
                        false
                    }
                }
            }
            AgentMsg::CertificateRequest(csr) => {
                let Some(s) = &mut live.sec else {
                    return true;
                };
                match s.renew(&csr.csr_pem).await {
                    Ok(issued) => {
                        if !live.send(issued) {
                            tracing::warn!(node = %live.name, "renewed certificate not sent: session closed or full");
                        }
                    }
                    Err(refused) => {
                        self.metrics
                            .certificates_refused
                            .with_label_values(&[refused.label()])
                            .inc();
                        tracing::warn!(node = %live.name, cause = %refused, "certificate renewal refused");
                    }
                }
                true
            }
            AgentMsg::State(state) => {
                let (verdict, superseded) = live.states.offer(state, Instant::now());
                if superseded > 0 {
                    self.metrics
                        .node_messages_dropped
                        .with_label_values(&["state"])
                        .inc_by(superseded as u64);
                }
                match verdict {
                    StateVerdict::Forward(state) => {
                        self.manager
                            .node_msg(live.node, live.conn, AgentMsg::State(state))
                            .await
                    }
                    StateVerdict::Held => true,
                    StateVerdict::Close => {
                        tracing::warn!(node = %live.name, "node floods State messages past its rate limit; closing the session");
                        self.metrics
                            .node_sessions_closed
                            .with_label_values(&["state_flood"])
                            .inc();
                        self.kill
                            .kill(Status::resource_exhausted("too many State messages"));
                        false
                    }
                }
            }
            other => self.manager.node_msg(live.node, live.conn, other).await,
        }
    }
}

/// A registered node's session, as its message loop keeps it.
struct Live {
    name: String,
    hello: v1::Hello,
    /// Mutual TLS and attestation state, with `[security]`.
    sec: Option<SessionSecurity>,
    states: StateLimiter,
    node: tokenfleet_scheduler::NodeId,
    conn: u64,
    last_seen: Arc<AtomicU64>,
    /// The session's own sender, weak (see `Session::run`).
    acks: mpsc::WeakSender<Box<CoordinatorMessage>>,
    lease_ms: u64,
}

impl Live {
    /// Sends without waiting; false when the session is closed or its buffer full.
    fn send(&self, msg: CoordinatorMessage) -> bool {
        self.acks
            .upgrade()
            .is_some_and(|tx| tx.try_send(Box::new(msg)).is_ok())
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

/// The gRPC status a node is refused with.
fn refusal_status(refusal: &NodeRefusal) -> Status {
    let message = refusal.to_string();
    match refusal {
        NodeRefusal::ShuttingDown => Status::unavailable(message),
        NodeRefusal::EmptyNodeId => Status::invalid_argument(message),
        NodeRefusal::ProtocolVersion { .. } => Status::failed_precondition(message),
        NodeRefusal::Quarantined => Status::permission_denied(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(soc: f32) -> v1::State {
        v1::State {
            soc_pct: Some(soc),
            ..Default::default()
        }
    }

    /// Issue 13, hole 9: a session's State messages are limited; the newest excess one is
    /// delivered later, the others dropped and counted, and a persistent flood closes it.
    #[test]
    fn state_messages_past_the_rate_are_coalesced_then_the_session_is_closed() {
        let rate = StateRate {
            per_s: 1.0,
            burst: 2,
            close_after_dropped: 3,
            window_s: 60,
        };
        let t0 = Instant::now();
        let mut l = StateLimiter::new(rate, t0);
        assert_eq!(
            l.offer(state(1.0), t0),
            (StateVerdict::Forward(state(1.0)), 0)
        );
        assert_eq!(
            l.offer(state(2.0), t0),
            (StateVerdict::Forward(state(2.0)), 0)
        );
        assert_eq!(l.release_at(), None);
        assert_eq!(l.offer(state(3.0), t0), (StateVerdict::Held, 0));
        assert_eq!(l.offer(state(4.0), t0), (StateVerdict::Held, 1));
        assert_eq!(l.release_at(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(l.release(t0 + Duration::from_millis(500)), None);
        assert_eq!(
            l.release(t0 + Duration::from_secs(1)),
            Some(state(4.0)),
            "the newest held State goes once a token is back"
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.offer(state(5.0), t1), (StateVerdict::Held, 0));
        assert_eq!(l.offer(state(6.0), t1), (StateVerdict::Held, 1));
        assert_eq!(l.offer(state(7.0), t1), (StateVerdict::Close, 1));
    }

    #[test]
    fn an_honest_rate_is_never_held() {
        let rate = StateRate::default();
        let t0 = Instant::now();
        let mut l = StateLimiter::new(rate, t0);
        // 16 a second (an 8-slot vehicle with 1 s jobs) for a minute.
        for i in 0..16 * 60 {
            let at = t0 + Duration::from_millis(i * 1000 / 16);
            assert!(matches!(
                l.offer(state(i as f32), at),
                (StateVerdict::Forward(_), 0)
            ));
        }
    }
}
