//! `[security]` in the coordinator's TOML: the fleet CA, enrollment, certificate lifetime and
//! the attestation policy.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::models::Sha256Hex;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Directory of the fleet CA (`ca.pem`, `ca.key`), created on first start.
    pub ca_dir: PathBuf,
    /// Names the CA's subject carries.
    pub fleet_name: String,
    /// Enrollment service (TLS with the coordinator's certificate; no client certificate).
    pub enroll_addr: SocketAddr,
    /// Names (IP addresses or DNS names) in the coordinator's server certificate: what agents
    /// dial.
    pub server_names: Vec<String>,
    /// Lifetime of a node certificate; the coordinator asks for renewal at half of it and
    /// closes a session whose certificate expires.
    #[serde(with = "crate::config::millis")]
    pub cert_ttl: Duration,
    /// Whether a node enrolled without a TPM may join (it then only gets requests not marked
    /// sensitive). Off by default.
    pub allow_unattested: bool,
    /// The resettable PCR agents extend their measurements into (16 or 23).
    pub pcr_index: u32,
    /// How often a connected node must quote a fresh nonce again.
    #[serde(with = "crate::config::millis")]
    pub reattest_interval: Duration,
    /// A node that does not answer a challenge within this time is disconnected.
    #[serde(with = "crate::config::millis")]
    pub attest_timeout: Duration,
    /// sha256 (64 lower-case hex digits) of agent builds allowed to serve.
    pub allowed_agent_builds: Vec<String>,
    /// sha256 (64 lower-case hex digits) of model files allowed to be served. Which name each
    /// file serves is bound by the coordinator's `[[models]]` (every bound file must be here).
    pub allowed_models: Vec<String>,
    /// Certificates one node may be issued per hour (enrollment included); a renewal past it
    /// is refused. Must leave room for the renewals `cert_ttl` needs (one per half-life).
    pub max_certificates_per_hour: u32,
    /// How often the store is read for revocations made by other processes.
    #[serde(with = "crate::config::millis")]
    pub revocation_poll: Duration,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            ca_dir: PathBuf::from("fleet-ca"),
            fleet_name: "tokenfleet".into(),
            enroll_addr: "127.0.0.1:50052".parse().expect("literal address"),
            server_names: vec!["127.0.0.1".into(), "localhost".into()],
            cert_ttl: Duration::from_secs(24 * 3600),
            allow_unattested: false,
            pcr_index: 23,
            reattest_interval: Duration::from_secs(60),
            attest_timeout: Duration::from_secs(10),
            allowed_agent_builds: Vec::new(),
            allowed_models: Vec::new(),
            revocation_poll: Duration::from_millis(500),
            // A 1 h TTL (`tokenfleet up`) renews twice an hour, plus the enrollment.
            max_certificates_per_hour: 4,
        }
    }
}

impl SecurityConfig {
    /// Certificates an honest node is issued in its busiest hour: one renewal per half of
    /// `cert_ttl`, plus the enrollment.
    pub fn renewals_per_hour_needed(&self) -> u32 {
        let half_s = (self.cert_ttl.as_secs_f64() / 2.0).max(1.0);
        (3600.0 / half_s).ceil() as u32 + 1
    }
}

impl SecurityConfig {
    /// The attestation policy, with every hash checked.
    pub fn policy(&self) -> Result<AttestationPolicy, String> {
        if ![16, 23].contains(&self.pcr_index) {
            return Err(format!(
                "pcr_index {} is not resettable at locality 0 (use 16 or 23)",
                self.pcr_index
            ));
        }
        if self.cert_ttl < Duration::from_secs(2) {
            return Err("cert_ttl must be at least 2 s".into());
        }
        let needed = self.renewals_per_hour_needed();
        if self.max_certificates_per_hour < needed {
            return Err(format!(
                "max_certificates_per_hour {} is below what cert_ttl {} s needs ({needed}: a renewal per half-life, plus enrollment)",
                self.max_certificates_per_hour,
                self.cert_ttl.as_secs()
            ));
        }
        let parse = |list: &[String], what: &str| {
            list.iter()
                .map(|h| {
                    parse_sha256_hex(h).ok_or_else(|| {
                        format!("{what}: {h:?} is not a sha256 in canonical form (64 lower-case hex digits)")
                    })
                })
                .collect::<Result<_, _>>()
        };
        Ok(AttestationPolicy {
            pcr_index: self.pcr_index,
            agent_builds: parse(&self.allowed_agent_builds, "allowed_agent_builds")?,
            models: parse(&self.allowed_models, "allowed_models")?,
        })
    }
}

/// What the fleet allows: agent builds and models, by sha256.
#[derive(Debug, Clone, Default)]
pub struct AttestationPolicy {
    pub pcr_index: u32,
    pub agent_builds: HashSet<[u8; 32]>,
    pub models: HashSet<[u8; 32]>,
}

/// A policy hash in canonical form (see [`Sha256Hex`]); anything else is None.
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    Sha256Hex::parse(s).ok().map(|h| h.to_bytes())
}
