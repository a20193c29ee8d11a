//! The sole-coordinator guard: until coordinators claim jobs and batches with an owner and a
//! lease (issue 15, items 2-3), two coordinators on one database would each load every
//! unfinished job and run it, and each run every active batch. So a coordinator on PostgreSQL
//! holds a session advisory lock on a connection of its own for as long as it runs; a second
//! one finds the lock taken and refuses to start, naming the cause, or, as a standby
//! ([`SoleCoordinator::wait`]), waits for the lock and starts the moment it is free: an
//! active-passive pair, the first step of failover.
//!
//! The server releases the lock when that connection ends (the coordinator died, or the link
//! broke). [`SoleCoordinator::lost`] resolves then, and the coordinator must stop: from that
//! moment another one may start on the same rows. TCP keepalive on the lock's connection
//! (both the client's and the server's side) bounds how long a vanished holder keeps the lock
//! and how long a cut-off holder takes to notice. Those two clocks run separately: after a
//! network cut there can be a few seconds in which the old holder has not yet stopped and
//! the standby has started, and both may run the same job on two vehicles. Fencing with an
//! owner and an epoch per job (docs/SCALE-OUT.md) closes that window; this lock does not.
//! Uses tokio-postgres only.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

use super::{backend_error, parse_url, CONNECT_TIMEOUT};
use crate::StoreError;

/// The session advisory lock key a running coordinator holds (`"tkfleet\x02"`; migrations use
/// `...\x01`).
const SOLE_COORDINATOR_LOCK: i64 = 0x746b_666c_6565_7402;

/// The held lock; dropping it closes its connection, which releases it.
pub struct SoleCoordinator {
    /// Kept open: the lock lives as long as this session.
    _client: Client,
    ended: watch::Receiver<Option<String>>,
}

impl SoleCoordinator {
    /// Takes the lock on the database at `url`, or fails at once (never waits) when another
    /// session holds it.
    pub async fn acquire(url: &str) -> Result<Self, StoreError> {
        Self::acquire_config(parse_url(url)?).await
    }

    /// [`SoleCoordinator::acquire`] with a parsed configuration.
    pub(crate) async fn acquire_config(config: tokio_postgres::Config) -> Result<Self, StoreError> {
        let (client, ended) = lock_session(config).await?;
        if try_lock(&client).await? {
            return Ok(Self {
                _client: client,
                ended,
            });
        }
        let holder = holder(&client).await;
        Err(backend_error(format!(
            "another coordinator is running on this database{holder}; one coordinator per \
             database until jobs are claimed with an owner and a lease (start this one with \
             --standby to take over when that one stops)"
        )))
    }

    /// A standby: waits until the lock is free and takes it. The server grants it the moment
    /// the holder's session ends (a kill -9 of the active coordinator closes its socket, and
    /// the server notices at once on the same host, or after TCP keepalive across a network),
    /// so the standby starts without polling delay. `waiting` is told, once, who holds it.
    pub async fn wait(url: &str, waiting: impl FnOnce(&str)) -> Result<Self, StoreError> {
        Self::wait_config(parse_url(url)?, waiting).await
    }

    /// [`SoleCoordinator::wait`] with a parsed configuration.
    pub(crate) async fn wait_config(
        config: tokio_postgres::Config,
        waiting: impl FnOnce(&str),
    ) -> Result<Self, StoreError> {
        let (client, ended) = lock_session(config).await?;
        if !try_lock(&client).await? {
            waiting(&holder(&client).await);
            client
                .execute("SELECT pg_advisory_lock($1)", &[&SOLE_COORDINATOR_LOCK])
                .await?;
        }
        Ok(Self {
            _client: client,
            ended,
        })
    }

    /// Resolves when the lock's connection has ended (and with it the lock), with why.
    pub async fn lost(&mut self) -> String {
        let ended = self.ended.wait_for(Option::is_some).await;
        match ended {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "the lock's connection task ended".to_string(),
        }
    }
}

/// TCP keepalive on the lock's connection, both ways: idle seconds before the first probe,
/// seconds between probes, probes lost before the connection counts as dead (about 11 s in
/// all). A kill -9 closes the socket and is seen at once; these bound the other failures,
/// a holder's host that vanishes or a network cut between it and the database, which the
/// defaults (2 hours idle) would hide: the server then releases the lock to the standby,
/// and the holder learns that it lost it and stops, within about the same time.
const KEEPALIVE: (u64, u64, u32) = (5, 2, 3);

/// Opens the connection the lock lives on; the watch learns when it ends, and why.
async fn lock_session(
    mut config: tokio_postgres::Config,
) -> Result<(Client, watch::Receiver<Option<String>>), StoreError> {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let (idle, interval, count) = KEEPALIVE;
    config
        .application_name("tokenfleet-coordinator (sole-coordinator lock)")
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(idle))
        .keepalives_interval(Duration::from_secs(interval))
        .keepalives_retries(count);
    let (client, connection) = config.connect(NoTls).await?;
    let (tx, ended) = watch::channel(None);
    tokio::spawn(async move {
        let why = match connection.await {
            Ok(()) => "the server closed the connection".to_string(),
            Err(e) => e.to_string(),
        };
        let _ = tx.send(Some(why));
    });
    // The server's side of the same probes (per session; ignored on a Unix socket).
    client
        .batch_execute(&format!(
            "SET tcp_keepalives_idle = {idle}; SET tcp_keepalives_interval = {interval}; \
             SET tcp_keepalives_count = {count}"
        ))
        .await?;
    Ok((client, ended))
}

async fn try_lock(client: &Client) -> Result<bool, StoreError> {
    let row = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&SOLE_COORDINATOR_LOCK])
        .await?;
    Ok(row.get::<_, bool>(0))
}

/// Who holds the lock, for the message (" (server process P for ADDR since T)"), or "".
async fn holder(client: &Client) -> String {
    client
        .query_opt(
            "SELECT a.pid, coalesce(a.client_addr::text, 'local'), a.backend_start::text \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted \
               AND l.classid = ($1::bigint >> 32)::oid AND l.objid = ($1::bigint & 4294967295)::oid",
            &[&SOLE_COORDINATOR_LOCK],
        )
        .await
        .ok()
        .flatten()
        .map(|r| {
            format!(
                " (server process {} for {} since {})",
                r.get::<_, i32>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2)
            )
        })
        .unwrap_or_default()
}
