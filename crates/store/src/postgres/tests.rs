//! The PostgreSQL backend's tests: the store suite, each test on a fresh database (created
//! for it, dropped after it) in the cluster that `TOKENFLEET_TEST_PG_URL` names, and what only
//! this backend has: two stores (two coordinators) on one database, migrations that refuse a
//! newer schema, a connection that is killed.
//!
//! `scripts/test.sh` starts a throwaway cluster (`scripts/pg.sh`) and sets the URL. Without
//! it these tests fail and say how to get one, unless `TOKENFLEET_TEST_PG=skip` asks to skip
//! them. The sealing test reads the cluster's files, so the cluster runs on this machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio_postgres::{Client, Config, NoTls};

use super::migrations::MIGRATIONS;
use super::PostgresStore;
use crate::suite::{new_job, request, store_suite, test_sealer, Harness};
use crate::{EnrollmentToken, FileRecord, NewFile, OverLimit, Sealer, StoreError, Stores};

const URL_VAR: &str = "TOKENFLEET_TEST_PG_URL";
const SKIP_VAR: &str = "TOKENFLEET_TEST_PG";

/// A database of its own in the test cluster.
pub(super) struct PgHarness {
    /// The cluster's superuser connection (to its maintenance database).
    admin: Config,
    /// This test's database.
    config: Config,
    name: String,
    /// The cluster's data directory, and this database's directory under `base/`.
    data: PathBuf,
    base: PathBuf,
    /// The write-ahead log segment current when the database was created: the segments from
    /// it on hold what this test wrote.
    first_wal: String,
}

/// The cluster's URL; None when the tests are skipped on purpose.
fn admin_config() -> Option<Config> {
    match std::env::var(URL_VAR) {
        Ok(url) => Some(
            url.parse()
                .unwrap_or_else(|e| panic!("{URL_VAR}={url} is not a connection string: {e}")),
        ),
        Err(_) if std::env::var(SKIP_VAR).as_deref() == Ok("skip") => {
            eprintln!("skipped: the PostgreSQL store tests ({SKIP_VAR}=skip)");
            None
        }
        Err(_) => panic!(
            "the PostgreSQL store tests need a server: set {URL_VAR} to a superuser URL of a \
             cluster on this machine (`eval \"$(scripts/pg.sh start)\"` starts a throwaway one \
             and sets it; scripts/test.sh does that), or set {SKIP_VAR}=skip to skip them"
        ),
    }
}

async fn connect(config: &Config) -> Client {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test cluster ({URL_VAR}): {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

impl PgHarness {
    async fn admin(&self) -> Client {
        connect(&self.admin).await
    }

    /// Ends every server session on this database (a crashed network, a DBA's kill), returning
    /// how many there were.
    async fn kill_connections(&self) -> u64 {
        self.admin()
            .await
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&self.name],
            )
            .await
            .unwrap()
    }

    /// Another store on this database (another coordinator).
    async fn store(&self, sealer: Sealer) -> Result<PostgresStore, StoreError> {
        PostgresStore::connect_config(self.config.clone(), sealer, None).await
    }

    /// A store for coordinator `id` among several on this database, with leases of `lease`.
    pub(super) async fn owned(&self, id: &str, lease: Duration) -> Stores {
        let ownership = crate::Ownership {
            coordinator: id.into(),
            lease,
        };
        PostgresStore::connect_config(self.config.clone(), test_sealer(), Some(ownership))
            .await
            .unwrap()
            .into_stores()
    }
}

#[async_trait]
impl Harness for PgHarness {
    async fn fresh() -> Option<Self> {
        let admin = admin_config()?;
        let client = connect(&admin).await;
        let name = format!("tokenfleet_test_{}", hex::encode(rand::random::<[u8; 8]>()));
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let row = client
            .query_one(
                "SELECT d.oid, current_setting('data_directory'),
                        pg_walfile_name(pg_current_wal_lsn())
                 FROM pg_database d WHERE d.datname = $1",
                &[&name],
            )
            .await
            .unwrap();
        let oid: u32 = row.get(0);
        let data = PathBuf::from(row.get::<_, String>(1));
        let mut config = admin.clone();
        config.dbname(&name);
        Some(Self {
            admin,
            config,
            base: data.join("base").join(oid.to_string()),
            data,
            name,
            first_wal: row.get(2),
        })
    }

    async fn open(&self, sealer: Sealer) -> Stores {
        self.store(sealer).await.unwrap().into_stores()
    }

    /// Searches this database's files and the write-ahead log written since it was created,
    /// after a checkpoint has written every dirty page.
    async fn on_disk(&self, marker: &str) -> bool {
        self.admin()
            .await
            .batch_execute("CHECKPOINT")
            .await
            .unwrap();
        let wal = self.data.join("pg_wal");
        let mut files = files_in(&self.base);
        let table_files = files.len();
        files.extend(files_in(&wal).into_iter().filter(|f| {
            f.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 24 && n >= self.first_wal.as_str())
        }));
        assert!(
            table_files > 0,
            "no file of the test database in {}: the sealing test reads the cluster's files, \
             so {URL_VAR} must name a cluster on this machine that this user can read",
            self.base.display()
        );
        let finder = memchr::memmem::Finder::new(marker.as_bytes());
        files.iter().any(|f| {
            std::fs::read(f)
                .map(|bytes| finder.find(&bytes).is_some())
                .unwrap_or(false)
        })
    }

    async fn rows(&self, table: &str) -> u64 {
        let client = connect(&self.config).await;
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        n as u64
    }
}

/// Drops the test's database (closing what is still connected to it), on a thread of its own:
/// the test's runtime is busy dropping this.
impl Drop for PgHarness {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let (client, connection) = admin.connect(NoTls).await?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("test database {} not dropped: {e}", self.name),
            Err(_) => eprintln!(
                "test database {} not dropped: the thread panicked",
                self.name
            ),
        }
    }
}

/// The regular files directly in `dir`.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default()
}

store_suite!(PgHarness);

/// Runs `test` on a fresh database unless the PostgreSQL tests are skipped.
pub(super) async fn with_database<F, Fut>(test: F)
where
    F: FnOnce(PgHarness) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if let Some(h) = PgHarness::fresh().await {
        test(h).await;
    }
}

/// Two coordinators starting together on a new database: one migrates, the other waits for
/// the migration lock and finds the schema current.
#[tokio::test]
async fn two_stores_connecting_together_migrate_once() {
    with_database(|h| async move {
        let (a, b) = tokio::join!(h.store(test_sealer()), h.store(test_sealer()));
        let (a, b) = (a.unwrap().into_stores(), b.unwrap().into_stores());
        assert_eq!(
            h.rows("tokenfleet_migrations").await,
            MIGRATIONS.len() as u64
        );
        let id = new_job(&a).await;
        assert!(b.jobs.load_job(id).await.unwrap().is_some());
    })
    .await;
}

/// A database migrated by a newer build is refused, not written to.
#[tokio::test]
async fn a_newer_schema_is_refused() {
    with_database(|h| async move {
        drop(h.store(test_sealer()).await.unwrap());
        connect(&h.config)
            .await
            .batch_execute("INSERT INTO tokenfleet_migrations (version) VALUES (999)")
            .await
            .unwrap();
        let refused = h.store(test_sealer()).await.err().unwrap();
        assert!(refused.to_string().contains("newer"), "{refused}");
    })
    .await;
}

/// Two stores on one database draw disjoint blocks of ids: no id is handed out twice, and each
/// store's ids increase.
#[tokio::test]
async fn two_stores_on_one_database_hand_out_disjoint_increasing_ids() {
    with_database(|h| async move {
        let a = h.store(test_sealer()).await.unwrap().into_stores();
        let b = h.store(test_sealer()).await.unwrap().into_stores();
        let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
        // More than one block (64) each, interleaved.
        for i in 0..150 {
            for (store, ids, name) in [(&a, &mut from_a, "a"), (&b, &mut from_b, "b")] {
                let (id, durable) = store
                    .jobs
                    .queue_job(format!("{name}-{i}"), "t".into(), request(), 1)
                    .await
                    .unwrap();
                ids.push((id, durable));
            }
        }
        let mut all = Vec::new();
        for ids in [from_a, from_b] {
            let ids: Vec<u64> = {
                let mut out = Vec::new();
                for (id, durable) in ids {
                    durable.wait().await.unwrap();
                    out.push(id);
                }
                out
            };
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "increasing per store");
            all.extend(ids);
        }
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 300, "no id handed out twice");
        assert_eq!(a.jobs.load_unfinished().await.unwrap().len(), 300);
    })
    .await;
}

/// What one coordinator checks and writes holds against another on the same database: a
/// tenant's file limit, a one-time token, an idempotency key.
#[tokio::test]
async fn two_stores_cannot_both_pass_a_check() {
    with_database(|h| async move {
        let a = h.store(test_sealer()).await.unwrap().into_stores();
        let b = h.store(test_sealer()).await.unwrap().into_stores();
        let file = |id: &str| NewFile {
            file: FileRecord {
                id: id.into(),
                bytes: 1,
                created_s: 1,
                filename: "in.jsonl".into(),
                purpose: "batch".into(),
            },
            tenant: "t".into(),
            content: b"x".to_vec(),
        };
        for round in 0..5 {
            let (x, y) = tokio::join!(
                a.batches
                    .insert_file_within(file(&format!("a{round}")), round + 1, 1_000),
                b.batches
                    .insert_file_within(file(&format!("b{round}")), round + 1, 1_000),
            );
            let mut answers = [x.unwrap(), y.unwrap()];
            answers.sort_by_key(|r| r.is_err());
            assert_eq!(answers[0], Ok(()), "round {round}");
            assert!(
                matches!(answers[1], Err(OverLimit::Files { .. })),
                "round {round}: both passed the limit"
            );
        }

        a.registry
            .insert_token(EnrollmentToken {
                token_sha256: "h".into(),
                node_id: "vehicle-1".into(),
                created_ms: 1,
                expires_ms: 1_000,
            })
            .await
            .unwrap();
        let (x, y) = tokio::join!(
            a.registry.redeem_token("h", 2),
            b.registry.redeem_token("h", 2)
        );
        let winners = [x.unwrap(), y.unwrap()].into_iter().flatten().count();
        assert_eq!(winners, 1, "one token enrolls one vehicle");

        let (x, y) = tokio::join!(
            a.jobs
                .insert_job("ka".into(), "t".into(), Some("k".into()), request(), 1),
            b.jobs
                .insert_job("kb".into(), "t".into(), Some("k".into()), request(), 1),
        );
        match (x.unwrap(), y.unwrap()) {
            (Ok(first), Err(same)) | (Err(same), Ok(first)) => assert_eq!(first, same),
            other => panic!("one idempotency key, two answers: {other:?}"),
        }
    })
    .await;
}

/// When the server drops the store's connection, the calls of the group that was running
/// fail, and the queue goes on with a fresh connection.
#[tokio::test]
async fn the_store_reconnects_after_its_connection_is_killed() {
    with_database(|h| async move {
        let store = h.open(test_sealer()).await;
        let id = new_job(&store).await;
        let killed = h.kill_connections().await;
        assert!(killed >= 1);
        // Bounded: a few calls, each failing fast or succeeding.
        let mut answer = None;
        for _ in 0..20 {
            match store.jobs.load_job(id).await {
                Ok(job) => {
                    answer = Some(job);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        assert_eq!(answer.flatten().map(|j| j.id), Some(id));
        let next = new_job(&store).await;
        assert!(next > id);
    })
    .await;
}

/// One coordinator per database: a second one is refused while the first runs, and may start
/// once it stopped; the holder learns when its lock's connection is killed.
#[tokio::test]
async fn a_second_coordinator_is_refused_until_the_first_lets_go() {
    use super::SoleCoordinator;
    with_database(|h| async move {
        let first = SoleCoordinator::acquire_config(h.config.clone())
            .await
            .unwrap();
        let refused = SoleCoordinator::acquire_config(h.config.clone()).await;
        let message = refused
            .err()
            .expect("second coordinator refused")
            .to_string();
        assert!(
            message.contains("another coordinator is running on this database"),
            "{message}"
        );
        drop(first);
        // The server releases the lock when the first session's connection closes; bounded.
        let mut second = None;
        for _ in 0..100 {
            match SoleCoordinator::acquire_config(h.config.clone()).await {
                Ok(lock) => {
                    second = Some(lock);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let mut second = second.expect("the lock is free once its holder is gone");
        h.kill_connections().await;
        let why = tokio::time::timeout(Duration::from_secs(30), second.lost())
            .await
            .expect("the holder learns its lock is gone");
        assert!(!why.is_empty());
    })
    .await;
}

/// A standby waits while another coordinator holds the database, is told who holds it, and
/// gets the lock once the holder is gone.
#[tokio::test]
async fn a_standby_waits_for_the_lock_and_takes_it_when_the_holder_dies() {
    use super::SoleCoordinator;
    with_database(|h| async move {
        let first = SoleCoordinator::acquire_config(h.config.clone())
            .await
            .unwrap();
        let (told_tx, told_rx) = tokio::sync::oneshot::channel();
        let config = h.config.clone();
        let mut standby = tokio::spawn(async move {
            SoleCoordinator::wait_config(config, |holder| {
                let _ = told_tx.send(holder.to_string());
            })
            .await
        });
        let holder = tokio::time::timeout(Duration::from_secs(30), told_rx)
            .await
            .expect("the standby says who holds the lock")
            .unwrap();
        assert!(holder.contains("server process"), "{holder:?}");
        // Told means it found the lock taken: it must still be waiting while the holder lives.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut standby)
                .await
                .is_err(),
            "the standby must not hold the lock while the first coordinator does"
        );
        // The holder's socket closes (as at kill -9 of its process): the server releases the
        // lock and grants it to the waiting standby.
        drop(first);
        let taken = tokio::time::timeout(Duration::from_secs(30), standby)
            .await
            .expect("the standby takes the lock once the holder is gone")
            .unwrap();
        assert!(taken.is_ok(), "{:?}", taken.err());
        // And now it is the one a third coordinator is refused by.
        assert!(SoleCoordinator::acquire_config(h.config.clone())
            .await
            .is_err());
    })
    .await;
}

/// One group, a failing step in the middle and one at the end: each failure is undone alone
/// and answered with its own error, every other step commits (the savepoint commands that
/// travel with the next step's statements keep that).
#[tokio::test]
async fn a_failing_step_is_undone_alone_and_the_rest_of_its_group_commits() {
    with_database(|h| async move {
        let store = h.store(test_sealer()).await.unwrap();
        connect(&h.config)
            .await
            .batch_execute("CREATE TABLE group_probe (k INT PRIMARY KEY)")
            .await
            .unwrap();
        let insert = |k: i32| {
            store.call(move |conn, _| {
                Box::pin(async move {
                    conn.execute("INSERT INTO group_probe (k) VALUES ($1)", &[&k])
                        .await?;
                    Ok(k)
                })
            })
        };
        // Queued in one pass (this runtime runs one task at a time): one group.
        let (a, b, c, d, e) = tokio::join!(insert(1), insert(2), insert(1), insert(3), insert(2));
        let answers = [a, b, c, d, e];
        let ok: Vec<bool> = answers.iter().map(Result::is_ok).collect();
        assert_eq!(ok, [true, true, false, true, false], "{answers:?}");
        let duplicate = answers[2].as_ref().unwrap_err().to_string();
        assert!(duplicate.contains("duplicate key"), "{duplicate}");
        let rows: Vec<i32> = connect(&h.config)
            .await
            .query("SELECT k FROM group_probe ORDER BY k", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(rows, [1, 2, 3]);
    })
    .await;
}
