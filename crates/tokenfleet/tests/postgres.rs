//! The coordinator on PostgreSQL (`TOKENFLEET_DATABASE_URL`), as a process on the real model:
//! it serves, a second coordinator on the same database is refused while the first runs, and
//! after a SIGKILL mid-job a restarted coordinator resumes the job from the database and the
//! client's `Idempotency-Key` retry gets the same greedy answer as an uninterrupted run, from
//! one stored job. A standby (`--standby`) waits for the database and takes over when the
//! active coordinator is killed: the agent, given both addresses, moves to it, and the
//! client's retry there gets the whole answer.
//!
//! Needs a PostgreSQL cluster, as the store's PostgreSQL suite does: `TOKENFLEET_TEST_PG_URL`
//! (a superuser URL, `postgresql://user@host:port/db`; `scripts/test.sh` starts one), or
//! `TOKENFLEET_TEST_PG=skip` to skip.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{free_port, wait_http, wait_models, Proc, BIN};
use common::{greedy_chat, start_agent, KEY, OPERATOR_KEY};
use serde_json::Value;
use tokio_postgres::{Client, NoTls};

const URL_VAR: &str = "TOKENFLEET_TEST_PG_URL";
const SKIP_VAR: &str = "TOKENFLEET_TEST_PG";
/// A fixed job-store key (32 bytes, base64) in the `TOKENFLEET_STORE_KEYS` format.
const STORE_KEYS: &str = "test:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A fresh database in the test cluster, dropped on drop.
struct Database {
    url: String,
    admin_url: String,
    name: String,
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test cluster ({URL_VAR}): {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

impl Database {
    async fn fresh() -> Option<Self> {
        let admin_url = match std::env::var(URL_VAR) {
            Ok(url) => url,
            Err(_) if std::env::var(SKIP_VAR).as_deref() == Ok("skip") => {
                eprintln!("skipped: the coordinator-on-PostgreSQL tests ({SKIP_VAR}=skip)");
                return None;
            }
            Err(_) => panic!(
                "these tests need a PostgreSQL server: set {URL_VAR} (`eval \"$(scripts/pg.sh \
                 start)\"` starts a throwaway one; scripts/test.sh does that), or {SKIP_VAR}=skip"
            ),
        };
        let (base, _) = admin_url
            .split('?')
            .next()
            .and_then(|u| u.rsplit_once('/'))
            .unwrap_or_else(|| panic!("{URL_VAR} must be a URL ending in /<database>"));
        let name = format!(
            "tokenfleet_coord_{}",
            hex::encode(rand::random::<[u8; 6]>())
        );
        connect(&admin_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Some(Self {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        })
    }

    /// (state, stored output tokens) of the jobs with this idempotency key.
    async fn jobs_with_key(&self, key: &str) -> Vec<(String, i64)> {
        connect(&self.url)
            .await
            .query(
                "SELECT j.state, (SELECT count(*) FROM job_outputs o WHERE o.job_id = j.id)
                 FROM jobs j WHERE j.idempotency_key = $1",
                &[&key],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }
}

impl Database {
    /// One stored job for `key`, done. The client's answer ends as the job's end is queued
    /// for the store's group commit, so its row may say `done` a flush later: waited for,
    /// bounded.
    async fn assert_one_done_job(&self, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rows = self.jobs_with_key(key).await;
            assert_eq!(
                rows.len(),
                1,
                "one stored job per idempotency key: {rows:?}"
            );
            if rows[0].0 == "done" {
                return;
            }
            assert!(Instant::now() < deadline, "the job never ended: {rows:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (admin, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime: a thread of its own for the last statement.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let client = connect(&admin).await;
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}

fn coordinator(db: &Database, http: u16, grpc: u16, stderr: Stdio) -> Child {
    coordinator_with(db, http, grpc, stderr, &[])
}

fn coordinator_with(db: &Database, http: u16, grpc: u16, stderr: Stdio, extra: &[&str]) -> Child {
    Command::new(BIN)
        .args(["coordinator", "--http", &format!("127.0.0.1:{http}")])
        .args(extra)
        .args(["--grpc", &format!("127.0.0.1:{grpc}")])
        .args(["--api-key", KEY, "--operator-key", OPERATOR_KEY])
        .args(["--lease-timeout-ms", "2000"])
        .env("TOKENFLEET_DATABASE_URL", &db.url)
        .env("TOKENFLEET_STORE_KEYS", STORE_KEYS)
        .env_remove("TOKENFLEET_DB")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start the coordinator")
}

/// Starts the coordinator and waits for its API. Right after a SIGKILL the server may not
/// yet have closed the dead coordinator's lock session, and the new one exits refused: it is
/// started again (bounded).
async fn start_coordinator(client: &reqwest::Client, db: &Database, http: u16, grpc: u16) -> Proc {
    let base = format!("http://127.0.0.1:{http}");
    for _ in 0..20 {
        let mut child = coordinator(db, http, grpc, Stdio::null());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                eprintln!("coordinator exited at start ({status}); starting it again");
                tokio::time::sleep(Duration::from_millis(250)).await;
                break;
            }
            if client.get(format!("{base}/livez")).send().await.is_ok() {
                return Proc(child);
            }
            assert!(Instant::now() < deadline, "coordinator did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    panic!("the coordinator on PostgreSQL did not start in 20 tries");
}

async fn chat(client: &reqwest::Client, base: &str, key: &str, body: &Value) -> (u16, Value) {
    let resp = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("Idempotency-Key", key)
        .json(body)
        .timeout(Duration::from_secs(180))
        .send()
        .await
        .expect("the coordinator answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Sends `body` with `key` to the coordinator at `base` and SIGKILLs it once the database
/// holds some of the job's tokens; returns the job's rows at the kill.
async fn kill_mid_job(
    client: &reqwest::Client,
    db: &Database,
    base: &str,
    body: &Value,
    key: &str,
    coordinator: &mut Proc,
) -> Vec<(String, i64)> {
    let request = {
        let (client, url, body, key) = (
            client.clone(),
            format!("{base}/v1/chat/completions"),
            body.clone(),
            key.to_string(),
        );
        tokio::spawn(async move {
            let _ = client
                .post(url)
                .bearer_auth(KEY)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await;
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let at_kill = loop {
        let rows = db.jobs_with_key(key).await;
        if rows.iter().any(|(_, tokens)| *tokens >= 2) {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "the job stored no tokens: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    coordinator.0.kill().unwrap();
    let _ = coordinator.0.wait();
    let _ = request.await;
    at_kill
}

fn text(answer: &Value) -> String {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_on_postgres_is_alone_on_its_database_and_resumes_after_sigkill() {
    let Some(db) = Database::fresh().await else {
        return;
    };
    let client = reqwest::Client::new();
    let (http, grpc) = (free_port(), free_port());
    let base = format!("http://127.0.0.1:{http}");
    let mut first = start_coordinator(&client, &db, http, grpc).await;
    wait_http(&client, &base).await;

    // A second coordinator on the same database is refused and says why.
    let second = coordinator(&db, free_port(), free_port(), Stdio::piped());
    let out = tokio::task::spawn_blocking(move || second.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second coordinator must not run");
    assert!(
        stderr.contains("another coordinator is running on this database"),
        "{stderr}"
    );

    let _agent = start_agent(&format!("127.0.0.1:{grpc}"), "vehicle-pg", 2).await;
    wait_models(&client, &base).await;
    let body = greedy_chat(
        "Tell a long story about a lighthouse keeper and the sea, in many sentences.",
        160,
        false,
    );
    let (status, reference) = chat(&client, &base, "pg-reference", &body).await;
    assert_eq!(status, 200, "{reference}");
    let reference = text(&reference);
    assert!(!reference.is_empty());

    // The same request again, killed mid-job once the database holds some of its tokens.
    let at_kill = kill_mid_job(&client, &db, &base, &body, "pg-crash", &mut first).await;
    eprintln!("killed with the job at {at_kill:?}");

    let _restarted = start_coordinator(&client, &db, http, grpc).await;
    wait_models(&client, &base).await;
    let (status, retried) = chat(&client, &base, "pg-crash", &body).await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(text(&retried), reference);
    db.assert_one_done_job("pg-crash").await;
}

/// Active-passive failover: a standby waits (binding nothing) while the active coordinator
/// holds the database; kill -9 of the active one mid-job, and the standby takes the lock,
/// resumes the job from the database, the agent (given both addresses) reconnects to it, and
/// the client's Idempotency-Key retry there gets the uninterrupted greedy answer, from one
/// stored job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_coordinator_is_killed() {
    let Some(db) = Database::fresh().await else {
        return;
    };
    let client = reqwest::Client::new();
    let (http_a, grpc_a) = (free_port(), free_port());
    let (http_b, grpc_b) = (free_port(), free_port());
    let (base_a, base_b) = (
        format!("http://127.0.0.1:{http_a}"),
        format!("http://127.0.0.1:{http_b}"),
    );
    let mut active = start_coordinator(&client, &db, http_a, grpc_a).await;
    let mut standby = Proc(coordinator_with(
        &db,
        http_b,
        grpc_b,
        Stdio::null(),
        &["--standby"],
    ));
    // The agent's address list: the active coordinator, then the standby.
    let _agent = start_agent(
        &format!("127.0.0.1:{grpc_a},http://127.0.0.1:{grpc_b}"),
        "vehicle-failover",
        2,
    )
    .await;
    wait_models(&client, &base_a).await;
    let body = greedy_chat(
        "Tell a long story about a lighthouse keeper and the sea, in many sentences.",
        160,
        false,
    );
    let (status, reference) = chat(&client, &base_a, "failover-reference", &body).await;
    assert_eq!(status, 200, "{reference}");
    let reference = text(&reference);
    assert!(!reference.is_empty());
    // The standby is still waiting, and serves nothing while it waits.
    assert!(
        standby.0.try_wait().unwrap().is_none(),
        "the standby must wait, not exit"
    );
    assert!(client.get(format!("{base_b}/livez")).send().await.is_err());

    let at_kill = kill_mid_job(&client, &db, &base_a, &body, "failover", &mut active).await;
    let killed = Instant::now();

    wait_http(&client, &base_b).await;
    wait_models(&client, &base_b).await;
    eprintln!(
        "killed with the job at {at_kill:?}; the standby served the agent again {:.1} s later",
        killed.elapsed().as_secs_f64()
    );
    let (status, retried) = chat(&client, &base_b, "failover", &body).await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(text(&retried), reference);
    db.assert_one_done_job("failover").await;
    assert!(
        standby.0.try_wait().unwrap().is_none(),
        "the standby runs on"
    );
}
