//! Issue #7, enrollment and mutual TLS: the agent port admits only vehicles holding a current,
//! unrevoked certificate from this fleet's CA, for a key generated on the vehicle; revocation
//! ends a live session at once and refuses reconnects; certificates renew over the session.
//!
//! These fleets allow unattested nodes (attestation has its own suite, security_attest.rs),
//! so every refusal here is the certificate's doing. Each refusal test checks its cause: the
//! TLS alert when the agent read it, else that the handshake closed the connection (under TLS
//! 1.3 a client-certificate alert races the server's close), never an application status.

mod common;

use std::time::{Duration, SystemTime};

use common::model_path;
use common::secure::{
    agent, assert_refused_for, engine, is_connected, is_failed, unattested_agent,
    wait_connected_nodes, wait_serving, wait_status, SecureFleet, UNMEASURED_SHA,
};
use tokenfleet_agent::identity::{IdentityDir, PendingKey};
use tokenfleet_coordinator::config::SecurityConfig;
use tokenfleet_coordinator::domain::store::Store;
use tokenfleet_coordinator::trust::security::ca::FleetCa;
use tokenfleet_coordinator::trust::security::registry::Registry;

fn unattested_ok() -> SecurityConfig {
    SecurityConfig {
        allow_unattested: true,
        ..Default::default()
    }
}

/// An identity directory holding a certificate signed by `ca` with the given validity.
fn forged_identity(
    dir: &std::path::Path,
    ca: &FleetCa,
    trusted_ca_pem: &str,
    node_id: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> IdentityDir {
    let identity = IdentityDir::new(dir);
    std::fs::create_dir_all(dir).unwrap();
    let key = PendingKey::generate().unwrap();
    let issued = ca
        .sign_node_csr(&key.csr_pem, node_id, not_before, not_after)
        .unwrap();
    identity.store(&key, &issued.cert_pem).unwrap();
    std::fs::write(identity.ca_path(), trusted_ca_pem).unwrap();
    std::fs::write(identity.node_id_path(), node_id).unwrap();
    identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_agent_serves_over_mutual_tls() {
    let fleet = SecureFleet::start(unattested_ok(), Duration::from_secs(60)).await;
    let identity = fleet.enroll("vehicle-1", None).await;
    let engine = engine(&model_path()).await;
    let a = unattested_agent(&fleet, &engine, Some(identity));
    wait_status(&a, "connected", is_connected).await;
    wait_serving(&fleet).await;
    let (status, body) = fleet.chat("Say hi.", false).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(a.assignments_received(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_without_certificate_is_refused() {
    let fleet = SecureFleet::start(unattested_ok(), Duration::from_secs(60)).await;
    let engine = engine(&model_path()).await;
    // Trusts the fleet CA (so the server side of TLS is fine) but presents no certificate.
    let ca = fleet.ca_file();
    let a = agent(&fleet, &engine, UNMEASURED_SHA, None, None, |c| {
        c.ca_cert = Some(ca)
    });
    let status = wait_status(&a, "refused", is_failed).await;
    // Under TLS 1.3 the server's alert often races its close, so the agent may see only the
    // closed connection, or a broken pipe when its first write meets the close (two tests
    // failed on that text in one full test run on 2026-12-05): either way the refusal is the handshake's, not a session's
    // status, and no session was registered (asserted below).
    assert_refused_for(
        &status,
        &[
            "CertificateRequired",
            "certificate required",
            "transport error: connection closed",
            "stream closed because of a broken pipe",
        ],
    );
    assert_eq!(fleet.connected_nodes().await, 0, "{status:?}");
    assert_eq!(a.assignments_received(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_agent_is_refused() {
    let fleet = SecureFleet::start(unattested_ok(), Duration::from_secs(60)).await;
    let engine = engine(&model_path()).await;
    let grpc = fleet.grpc;
    let a = agent(&fleet, &engine, UNMEASURED_SHA, None, None, |c| {
        c.coordinators = vec![format!("http://{grpc}")]
    });
    let status = wait_status(&a, "refused", is_failed).await;
    // h2c against a TLS port: the transport fails before any gRPC status.
    assert_refused_for(
        &status,
        &[
            "h2 protocol error",
            "transport error: connection error",
            "transport error: connection closed",
            "stream closed because of a broken pipe",
        ],
    );
    assert_eq!(fleet.connected_nodes().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_expired_certificate_is_refused() {
    let fleet = SecureFleet::start(unattested_ok(), Duration::from_secs(60)).await;
    let now = SystemTime::now();
    let identity = forged_identity(
        &fleet.dir.path().join("expired"),
        &fleet.security.ca,
        fleet.security.ca.cert_pem(),
        "vehicle-1",
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    );
    let engine = engine(&model_path()).await;
    let a = unattested_agent(&fleet, &engine, Some(identity));
    let status = wait_status(&a, "refused", is_failed).await;
    assert_refused_for(
        &status,
        &[
            "CertificateExpired",
            "expired",
            "transport error: connection closed",
            "stream closed because of a broken pipe",
        ],
    );
    assert_eq!(fleet.connected_nodes().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_certificate_from_another_fleets_ca_is_refused() {
    let fleet = SecureFleet::start(unattested_ok(), Duration::from_secs(60)).await;
    let other = FleetCa::generate("another fleet").unwrap();
    let now = SystemTime::now();
    let identity = forged_identity(
        &fleet.dir.path().join("foreign"),
        &other,
        fleet.security.ca.cert_pem(),
        "vehicle-1",
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    );
    let engine = engine(&model_path()).await;
    let a = unattested_agent(&fleet, &engine, Some(identity));
    let status = wait_status(&a, "refused", is_failed).await;
    assert_refused_for(
        &status,
        &[
            "UnknownCA",
            "unknown ca",
            "UnknownIssuer",
            "transport error: connection closed",
            "stream closed because of a broken pipe",
        ],
    );
    assert_eq!(fleet.connected_nodes().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_agent_is_refused() {
    let fleet = SecureFleet::start(unattested_ok(), Duration::from_secs(60)).await;
    let identity = fleet.enroll("vehicle-1", None).await;
    fleet
        .security
        .revoke("vehicle-1", "stolen vehicle")
        .await
        .unwrap();
    let engine = engine(&model_path()).await;
    let a = unattested_agent(&fleet, &engine, Some(identity));
    let status = wait_status(&a, "refused", is_failed).await;
    assert_refused_for(
        &status,
        &[
            "CertificateRevoked",
            "revoked",
            "transport error: connection closed",
            "stream closed because of a broken pipe",
        ],
    );
    assert_eq!(fleet.connected_nodes().await, 0);
    // A revoked node id cannot be enrolled again either.
    assert!(fleet
        .security
        .registry
        .issue_token("vehicle-1", 60_000)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_agent_mid_session_is_disconnected() {
    let fleet = SecureFleet::start(unattested_ok(), Duration::from_secs(60)).await;
    let identity = fleet.enroll("vehicle-1", None).await;
    let engine = engine(&model_path()).await;
    let a = unattested_agent(&fleet, &engine, Some(identity));
    wait_status(&a, "connected", is_connected).await;
    wait_connected_nodes(&fleet, 1).await;
    // The operator revokes from another process (`tokenfleet fleet revoke`): the store is
    // the only channel; the running coordinator picks it up by itself.
    let operator = Registry::new(
        Store::open(
            &fleet.db,
            tokenfleet_coordinator::config::store_sealer(&fleet.db, None).unwrap(),
        )
        .unwrap(),
    );
    operator.revoke("vehicle-1", "key leaked").await.unwrap();
    let status = wait_status(&a, "disconnected", is_failed).await;
    assert_refused_for(&status, &["revoked"]);
    wait_connected_nodes(&fleet, 0).await;
    // And it stays out: reconnects fail in the TLS handshake.
    let mut rx = a.session_status();
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(30), rx.changed())
            .await
            .expect("the agent keeps retrying")
            .unwrap();
        assert_ne!(
            *rx.borrow_and_update(),
            tokenfleet_agent::SessionStatus::Connected
        );
    }
    assert_eq!(fleet.connected_nodes().await, 0, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_token_is_single_use_and_expires() {
    let fleet = SecureFleet::start(unattested_ok(), Duration::from_secs(60)).await;
    let registry = &fleet.security.registry;
    let ca = fleet.security.ca.cert_pem().as_bytes().to_vec();
    let url = format!("https://{}", fleet.enroll);
    let token = registry.issue_token("vehicle-1", 60_000).await.unwrap();
    let dir = IdentityDir::new(fleet.dir.path().join("once"));
    tokenfleet_agent::identity::enroll(&url, &ca, &token, &dir, None)
        .await
        .expect("first use");
    let again = IdentityDir::new(fleet.dir.path().join("twice"));
    let second = tokenfleet_agent::identity::enroll(&url, &ca, &token, &again, None).await;
    assert!(second.is_err(), "a token enrolls once");
    let expired = registry.issue_token("vehicle-2", 0).await.unwrap();
    let late = IdentityDir::new(fleet.dir.path().join("late"));
    assert!(
        tokenfleet_agent::identity::enroll(&url, &ca, &expired, &late, None)
            .await
            .is_err()
    );
    // The certificate names the token's node, whatever the vehicle asked for.
    assert_eq!(dir.node_id().unwrap(), "vehicle-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_is_renewed_over_the_session() {
    let fleet = SecureFleet::start(
        SecurityConfig {
            cert_ttl: Duration::from_secs(10),
            // A 10 s certificate renews every 5 s: 721 an hour.
            max_certificates_per_hour: 1000,
            ..unattested_ok()
        },
        Duration::from_secs(60),
    )
    .await;
    let identity = fleet.enroll("vehicle-1", None).await;
    let first = std::fs::read(identity.identity_path()).unwrap();
    let engine = engine(&model_path()).await;
    let a = unattested_agent(&fleet, &engine, Some(identity.clone()));
    wait_status(&a, "connected", is_connected).await;
    // At half-life the coordinator asks for a CSR; the agent stores the new certificate and
    // key, and when the old certificate expires it reconnects with the new one.
    let mut renewed = false;
    for _ in 0..300 {
        if std::fs::read(identity.identity_path()).unwrap() != first {
            renewed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(renewed, "the identity was not renewed");
    let mut rx = a.session_status();
    // The session ends at the old certificate's expiry and comes back on the new one.
    tokio::time::timeout(Duration::from_secs(30), async {
        while *rx.borrow_and_update() == tokenfleet_agent::SessionStatus::Connected {
            rx.changed().await.unwrap();
        }
        while *rx.borrow_and_update() != tokenfleet_agent::SessionStatus::Connected {
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("reconnected with the renewed certificate");
    wait_serving(&fleet).await;
    let (status, body) = fleet.chat("Say hi.", false).await;
    assert_eq!(status, 200, "{body}");
}
