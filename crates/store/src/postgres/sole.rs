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
//! moment another one may start on the same rows. Uses tokio-postgres only.

use std::str::FromStr;

use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

use super::{backend_error, CONNECT_TIMEOUT};
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
        let config = tokio_postgres::Config::from_str(url)
            .map_err(|e| backend_error(format!("connection string: {e}")))?;
        Self::acquire_config(config).await
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
        let config = tokio_postgres::Config::from_str(url)
            .map_err(|e| backend_error(format!("connection string: {e}")))?;
        Self::wait_config(config, waiting).await
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

/// Opens the connection the lock lives on; the watch learns when it ends, and why.
async fn lock_session(
    mut config: tokio_postgres::Config,
) -> Result<(Client, watch::Receiver<Option<String>>), StoreError> {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.application_name("tokenfleet-coordinator (sole-coordinator lock)");
    let (client, connection) = config.connect(NoTls).await?;
    let (tx, ended) = watch::channel(None);
    tokio::spawn(async move {
        let why = match connection.await {
            Ok(()) => "the server closed the connection".to_string(),
            Err(e) => e.to_string(),
        };
        let _ = tx.send(Some(why));
    });
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
