//! The sole-coordinator guard: until coordinators claim jobs and batches with an owner and a
//! lease (issue 15, items 2-3), two coordinators on one database would each load every
//! unfinished job and run it, and each run every active batch. So a coordinator on PostgreSQL
//! holds a session advisory lock on a connection of its own for as long as it runs; a second
//! one finds the lock taken and refuses to start, naming the cause.
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
    pub(crate) async fn acquire_config(
        mut config: tokio_postgres::Config,
    ) -> Result<Self, StoreError> {
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
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&SOLE_COORDINATOR_LOCK])
            .await?;
        if !row.get::<_, bool>(0) {
            let holder = client
                .query_opt(
                    "SELECT a.pid, coalesce(a.client_addr::text, 'local'), a.backend_start::text \
                     FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE l.locktype = 'advisory' AND l.granted \
                       AND l.classid = ($1 >> 32)::oid AND l.objid = ($1 & 4294967295)::oid",
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
                .unwrap_or_default();
            return Err(backend_error(format!(
                "another coordinator is running on this database{holder}; one coordinator per \
                 database until jobs are claimed with an owner and a lease"
            )));
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
