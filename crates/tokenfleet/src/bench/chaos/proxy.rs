//! A fault-injecting TCP proxy: one per vehicle, between its agent and the coordinator's agent
//! port, standing in for `tc netem` (not available on the machines we measure on: no `sch_netem`
//! module, no `modprobe`).
//!
//! What it emulates, per direction of every connection:
//! - **Latency**: each read is forwarded `delay_mean ± delay_jitter` (uniform) after it was read,
//!   never before the previous read of that direction (a TCP stream never reorders).
//! - **Loss as TCP experiences it**: a lost segment is retransmitted, so the application sees
//!   no gap but a stall. Each read is cut into MSS-sized segments, each lost with probability
//!   `loss`; a read with a lost segment is held for one retransmission timeout drawn from
//!   `rto_min..rto_max`, and everything behind it waits too (head-of-line blocking). Bytes are
//!   never dropped, duplicated or reordered.
//! - **Partitions**: until the partition heals nothing is forwarded in either direction, on old
//!   or new connections, and nothing is closed: sockets stay open, data waits (bounded, so the
//!   sender's writes block as with a full TCP window) and is delivered when the partition
//!   heals, as retransmissions would. A peer that gives up on its side during the partition
//!   has its close (FIN or RST) delivered after the heal too, as a real one would.
//! - **Address change** (a vehicle moving from cellular to Wi-Fi): every connection is reset
//!   (RST) on both sides, the agent-facing port refuses connections for a hand-over gap, then
//!   the same port accepts again and new connections reach the coordinator from another source
//!   address (127.0.0.2, .3, ...), so the coordinator sees the node come back from a new
//!   address. The port is re-bound rather than moved because an agent takes a single
//!   coordinator URL (`AgentConfig::coordinator`); the agent's reconnect with backoff is what
//!   is under test.
//!
//! Faults are counted by kind in [`FaultCounters`].

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Bytes per emulated TCP segment (Ethernet MSS).
const MSS: usize = 1448;
/// Reads buffered per direction before the proxy stops reading (the sender's window fills).
const PIPE_DEPTH: usize = 256;
const READ_BUF: usize = 16 * 1024;
/// How long the proxy waits for the coordinator to accept a forwarded connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The impairment of a link while faults are on.
#[derive(Debug, Clone, Copy)]
pub struct FaultProfile {
    pub delay_mean: Duration,
    pub delay_jitter: Duration,
    /// Probability that one segment is lost.
    pub loss: f64,
    pub rto_min: Duration,
    pub rto_max: Duration,
}

impl FaultProfile {
    /// The profile: 300 ± 100 ms one way, 5 % loss, a 200 ms - 1 s retransmission
    /// timeout per loss (Linux's minimum RTO is 200 ms; 1 s is RFC 6298's initial one).
    pub fn lossy_cellular() -> Self {
        Self {
            delay_mean: Duration::from_millis(300),
            delay_jitter: Duration::from_millis(100),
            loss: 0.05,
            rto_min: Duration::from_millis(200),
            rto_max: Duration::from_millis(1000),
        }
    }
}

/// Faults injected, by kind (shared by all proxies of a run).
#[derive(Debug, Default)]
pub struct FaultCounters {
    pub delayed_reads: AtomicU64,
    pub lost_segments: AtomicU64,
    pub loss_stalls: AtomicU64,
    pub partitions: AtomicU64,
    /// Reads held back by a partition (delivered after it healed).
    pub reads_held_by_partition: AtomicU64,
    pub address_changes: AtomicU64,
    pub connections_reset: AtomicU64,
}

/// A snapshot of [`FaultCounters`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct FaultCounts {
    pub delayed_reads: u64,
    pub lost_segments: u64,
    pub loss_stalls: u64,
    pub partitions: u64,
    pub reads_held_by_partition: u64,
    pub address_changes: u64,
    pub connections_reset: u64,
}

impl FaultCounters {
    pub fn snapshot(&self) -> FaultCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FaultCounts {
            delayed_reads: get(&self.delayed_reads),
            lost_segments: get(&self.lost_segments),
            loss_stalls: get(&self.loss_stalls),
            partitions: get(&self.partitions),
            reads_held_by_partition: get(&self.reads_held_by_partition),
            address_changes: get(&self.address_changes),
            connections_reset: get(&self.connections_reset),
        }
    }
}

/// What every connection of one proxy shares: the current impairment and partition.
struct Link {
    faults: watch::Receiver<Option<FaultProfile>>,
    /// The instant the current partition heals (None or past: no partition).
    partition: watch::Receiver<Option<Instant>>,
    counters: Arc<FaultCounters>,
}

/// One vehicle's proxy. Dropping it stops accepting and resets its connections.
pub struct FaultProxy {
    /// Where the agent connects.
    pub addr: SocketAddr,
    upstream: SocketAddr,
    faults: watch::Sender<Option<FaultProfile>>,
    partition: watch::Sender<Option<Instant>>,
    counters: Arc<FaultCounters>,
    /// Kill switches of the live connections.
    conns: Arc<Mutex<Vec<Arc<watch::Sender<bool>>>>>,
    accept: tokio::task::JoinHandle<()>,
    /// Last octet of the source address towards the coordinator (127.0.0.N).
    network: u8,
    seed: u64,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards to `upstream`, without faults until
    /// [`FaultProxy::set_faults`].
    pub async fn start(
        upstream: SocketAddr,
        counters: Arc<FaultCounters>,
        seed: u64,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (faults, _) = watch::channel(None);
        let (partition, _) = watch::channel(None);
        let mut proxy = Self {
            addr,
            upstream,
            faults,
            partition,
            counters,
            conns: Arc::new(Mutex::new(Vec::new())),
            accept: tokio::spawn(async {}),
            network: 1,
            seed,
        };
        proxy.accept = proxy.spawn_accept(listener);
        Ok(proxy)
    }

    fn spawn_accept(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let link = Arc::new(Link {
            faults: self.faults.subscribe(),
            partition: self.partition.subscribe(),
            counters: Arc::clone(&self.counters),
        });
        let conns = Arc::clone(&self.conns);
        let (upstream, source) = (self.upstream, Ipv4Addr::new(127, 0, 0, self.network));
        let seed = self.seed ^ ((self.network as u64) << 32);
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let agent = match listener.accept().await {
                    Ok((agent, _)) => agent,
                    Err(e) => {
                        // Out of descriptors or similar: do not spin.
                        tracing::warn!(cause = %e, "proxy: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                n += 1;
                let kill = Arc::new(watch::channel(false).0);
                {
                    let mut live = conns.lock().expect("proxy connection list");
                    // A connection is over when its tasks (the only other holders) are gone.
                    live.retain(|k| Arc::strong_count(k) > 1);
                    live.push(Arc::clone(&kill));
                }
                tokio::spawn(forward(
                    agent,
                    upstream,
                    source,
                    Arc::clone(&link),
                    kill,
                    seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                ));
            }
        })
    }

    /// Turns the impairment on (Some) or off (None) for every connection, current and new.
    pub fn set_faults(&self, profile: Option<FaultProfile>) {
        self.faults.send_replace(profile);
    }

    /// Black-holes both directions for `duration` from now.
    pub fn partition(&self, duration: Duration) {
        self.counters.partitions.fetch_add(1, Ordering::Relaxed);
        self.partition.send_replace(Some(Instant::now() + duration));
    }

    /// The vehicle changes networks: every connection is reset on both sides, the port
    /// refuses connections for `gap`, then accepts again and forwards from the next source
    /// address.
    pub async fn change_address(&mut self, gap: Duration) -> io::Result<()> {
        self.counters
            .address_changes
            .fetch_add(1, Ordering::Relaxed);
        self.accept.abort();
        let _ = (&mut self.accept).await;
        self.reset_all();
        tokio::time::sleep(gap).await;
        self.network = self
            .network
            .checked_add(1)
            .filter(|n| *n < 255)
            .unwrap_or(2);
        // Re-bound on the same port (SO_REUSEADDR, set by tokio) so the agent's single URL
        // reaches the new network.
        let listener = TcpListener::bind(self.addr).await?;
        self.accept = self.spawn_accept(listener);
        Ok(())
    }

    /// Resets every live connection (RST to the agent and to the coordinator).
    fn reset_all(&self) {
        let live = std::mem::take(&mut *self.conns.lock().expect("proxy connection list"));
        for kill in live {
            kill.send_replace(true);
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset_all();
    }
}

/// One direction's unit of work: bytes, an orderly close, or a reset, due at `at`.
enum Item {
    Data(Vec<u8>),
    Eof,
    Reset,
}

async fn forward(
    agent: TcpStream,
    upstream: SocketAddr,
    source: Ipv4Addr,
    link: Arc<Link>,
    kill: Arc<watch::Sender<bool>>,
    seed: u64,
) {
    let _ = agent.set_nodelay(true);
    let coordinator = match connect_from(source, upstream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(cause = %e, "proxy: coordinator unreachable; resetting the agent");
            let _ = agent.set_zero_linger();
            return;
        }
    };
    let (agent_r, agent_w) = agent.into_split();
    let (coord_r, coord_w) = coordinator.into_split();
    let up = direction(agent_r, coord_w, Arc::clone(&link), Arc::clone(&kill), seed);
    let down = direction(
        coord_r,
        agent_w,
        Arc::clone(&link),
        Arc::clone(&kill),
        seed ^ 1,
    );
    tokio::join!(up, down);
    if *kill.borrow() {
        link.counters
            .connections_reset
            .fetch_add(1, Ordering::Relaxed);
    }
}

async fn connect_from(source: Ipv4Addr, upstream: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.into(), 0))?;
    let stream = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, socket.connect(upstream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Relays `src` to `dst` with the link's impairment until the stream ends or the connection is
/// killed. A reset seen on `src` (or a failed write to `dst`) kills the connection: both sides
/// are reset.
async fn direction(
    mut src: OwnedReadHalf,
    mut dst: OwnedWriteHalf,
    link: Arc<Link>,
    kill: Arc<watch::Sender<bool>>,
    seed: u64,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Item)>(PIPE_DEPTH);
    let reader = {
        let link = Arc::clone(&link);
        let mut killed = kill.subscribe();
        async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut last = Instant::now();
            let mut buf = vec![0u8; READ_BUF];
            loop {
                let read = tokio::select! {
                    r = src.read(&mut buf) => r,
                    _ = killed.wait_for(|k| *k) => return,
                };
                let item = match read {
                    Ok(0) => Item::Eof,
                    Ok(n) => Item::Data(buf[..n].to_vec()),
                    Err(_) => Item::Reset,
                };
                let len = match &item {
                    Item::Data(d) => d.len(),
                    _ => 1,
                };
                let at = due(&link, &mut rng, len).max(last);
                last = at;
                let end = !matches!(item, Item::Data(_));
                let sent = tokio::select! {
                    s = tx.send((at, item)) => s.is_ok(),
                    _ = killed.wait_for(|k| *k) => false,
                };
                if !sent || end {
                    return;
                }
            }
        }
    };
    let writer = async {
        let mut killed = kill.subscribe();
        let mut partition = link.partition.clone();
        loop {
            let next = tokio::select! {
                n = rx.recv() => n,
                _ = killed.wait_for(|k| *k) => None,
            };
            let Some((at, item)) = next else {
                break;
            };
            let delivered = async {
                tokio::time::sleep_until(at).await;
                if wait_for_heal(&mut partition).await {
                    link.counters
                        .reads_held_by_partition
                        .fetch_add(1, Ordering::Relaxed);
                }
            };
            tokio::select! {
                _ = delivered => {}
                _ = killed.wait_for(|k| *k) => break,
            }
            match item {
                Item::Data(d) => {
                    if dst.write_all(&d).await.is_err() {
                        break;
                    }
                }
                Item::Eof => {
                    let _ = dst.shutdown().await;
                    return;
                }
                Item::Reset => break,
            }
        }
        // Killed, or a reset to pass on: abort the connection on both sides.
        kill.send_replace(true);
        let _ = dst.as_ref().set_zero_linger();
        // Without the FIN a dropped write half sends: the socket closes with RST once the read
        // half (owned by the other direction) is dropped too.
        dst.forget();
    };
    tokio::join!(reader, writer);
}

/// When a read of `len` bytes made now is due at the far end.
fn due(link: &Link, rng: &mut StdRng, len: usize) -> Instant {
    let now = Instant::now();
    let Some(p) = *link.faults.borrow() else {
        return now;
    };
    let c = &link.counters;
    c.delayed_reads.fetch_add(1, Ordering::Relaxed);
    let jitter = p.delay_jitter.as_secs_f64();
    let delay = (p.delay_mean.as_secs_f64() + rng.random_range(-jitter..=jitter)).max(0.0);
    let segments = len.div_ceil(MSS).max(1);
    let lost = (0..segments).filter(|_| rng.random_bool(p.loss)).count() as u64;
    let mut at = now + Duration::from_secs_f64(delay);
    if lost > 0 {
        c.lost_segments.fetch_add(lost, Ordering::Relaxed);
        c.loss_stalls.fetch_add(1, Ordering::Relaxed);
        at += Duration::from_secs_f64(
            rng.random_range(p.rto_min.as_secs_f64()..=p.rto_max.as_secs_f64()),
        );
    }
    at
}

/// Waits while a partition is on; true if it had to wait.
async fn wait_for_heal(partition: &mut watch::Receiver<Option<Instant>>) -> bool {
    let mut waited = false;
    loop {
        let until = *partition.borrow_and_update();
        match until {
            Some(t) if t > Instant::now() => {
                waited = true;
                tokio::select! {
                    _ = tokio::time::sleep_until(t) => {}
                    _ = partition.changed() => {}
                }
            }
            _ => return waited,
        }
    }
}

#[cfg(test)]
mod tests;
