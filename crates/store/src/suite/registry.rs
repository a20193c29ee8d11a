//! The registry's tests: enrollment tokens (once, before expiry), certificates counted per
//! node, attestation keys, revocations.

use super::Harness;
use crate::{EnrollmentToken, IssuedCertificate, Sealer};

fn enrollment(hash: &str, node: &str, expires_ms: u64) -> EnrollmentToken {
    EnrollmentToken {
        token_sha256: hash.into(),
        node_id: node.into(),
        created_ms: 1,
        expires_ms,
    }
}

fn certificate(serial: &str, node: &str, issued_ms: u64) -> IssuedCertificate {
    IssuedCertificate {
        serial: serial.into(),
        node_id: node.into(),
        issued_ms,
        not_after_ms: issued_ms + 1_000,
    }
}

pub(crate) async fn an_enrollment_token_is_redeemed_once_before_it_expires(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let registry = &store.registry;
    registry
        .insert_token(enrollment("h1", "vehicle-1", 100))
        .await
        .unwrap();
    registry
        .insert_token(enrollment("h2", "vehicle-2", 100))
        .await
        .unwrap();
    assert!(
        registry
            .insert_token(enrollment("h1", "vehicle-3", 100))
            .await
            .is_err(),
        "a token hash is stored once"
    );
    assert_eq!(
        registry.redeem_token("h1", 50).await.unwrap(),
        Some("vehicle-1".into())
    );
    assert_eq!(registry.redeem_token("h1", 51).await.unwrap(), None);
    assert_eq!(
        registry.redeem_token("h2", 100).await.unwrap(),
        None,
        "expired at 100"
    );
    assert_eq!(registry.redeem_token("unknown", 1).await.unwrap(), None);
    assert_eq!(
        registry.redeem_token("h2", 99).await.unwrap(),
        Some("vehicle-2".into())
    );
}

pub(crate) async fn certificates_are_counted_per_node_since_a_time(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let registry = &store.registry;
    for (serial, node, at) in [
        ("s1", "vehicle-1", 10),
        ("s2", "vehicle-1", 20),
        ("s3", "vehicle-1", 30),
        ("s4", "vehicle-2", 30),
    ] {
        registry
            .record_certificate(certificate(serial, node, at))
            .await
            .unwrap();
    }
    assert!(registry
        .record_certificate(certificate("s1", "vehicle-2", 40))
        .await
        .is_err());
    let since = |node: &'static str, ms| registry.certificates_issued_since(node, ms);
    assert_eq!(since("vehicle-1", 0).await.unwrap(), 3);
    assert_eq!(since("vehicle-1", 20).await.unwrap(), 2);
    assert_eq!(since("vehicle-1", 31).await.unwrap(), 0);
    assert_eq!(since("vehicle-2", 0).await.unwrap(), 1);
    assert_eq!(since("vehicle-3", 0).await.unwrap(), 0);
}

pub(crate) async fn an_attestation_key_is_set_replaced_and_removed(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let registry = &store.registry;
    assert_eq!(registry.attestation_key("vehicle-1").await.unwrap(), None);
    registry
        .set_attestation_key("vehicle-1", Some(vec![1, 2, 3]), 1)
        .await
        .unwrap();
    registry
        .set_attestation_key("vehicle-2", Some(vec![9]), 1)
        .await
        .unwrap();
    assert_eq!(
        registry.attestation_key("vehicle-1").await.unwrap(),
        Some(vec![1, 2, 3])
    );
    registry
        .set_attestation_key("vehicle-1", Some(vec![4, 5]), 2)
        .await
        .unwrap();
    assert_eq!(
        registry.attestation_key("vehicle-1").await.unwrap(),
        Some(vec![4, 5])
    );
    registry
        .set_attestation_key("vehicle-1", None, 3)
        .await
        .unwrap();
    assert_eq!(registry.attestation_key("vehicle-1").await.unwrap(), None);
    assert_eq!(
        registry.attestation_key("vehicle-2").await.unwrap(),
        Some(vec![9])
    );
    assert_eq!(h.rows("node_attestation_keys").await, 1);
}

pub(crate) async fn a_revocation_keeps_its_first_reason_and_uses_up_tokens(h: &dyn Harness) {
    let store = h.open(Sealer::ephemeral()).await;
    let registry = &store.registry;
    registry
        .insert_token(enrollment("h1", "vehicle-1", 1_000))
        .await
        .unwrap();
    registry
        .insert_token(enrollment("h2", "vehicle-2", 1_000))
        .await
        .unwrap();
    assert_eq!(registry.revoked_reason("vehicle-1").await.unwrap(), None);
    registry.revoke("vehicle-1", "stolen", 5).await.unwrap();
    registry.revoke("vehicle-1", "again", 6).await.unwrap();
    registry.revoke("vehicle-3", "retired", 7).await.unwrap();
    assert_eq!(
        registry.revoked_reason("vehicle-1").await.unwrap(),
        Some("stolen".into())
    );
    let mut revoked = registry.revoked().await.unwrap();
    revoked.sort();
    assert_eq!(revoked, ["vehicle-1", "vehicle-3"]);
    assert_eq!(
        registry.redeem_token("h1", 10).await.unwrap(),
        None,
        "a revoked node's unused token is used up"
    );
    assert_eq!(
        registry.redeem_token("h2", 10).await.unwrap(),
        Some("vehicle-2".into())
    );
}
