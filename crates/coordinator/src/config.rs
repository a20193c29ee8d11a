//! Coordinator configuration: what an operator writes once (TOML), with defaults that run a
//! whole fleet on one machine.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokenfleet_scheduler::PolicyKind;

/// An API key and the tenant it acts for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub key: String,
    pub tenant: String,
}

/// TLS material for a listener (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// OpenAI-compatible HTTP API.
    pub http_addr: SocketAddr,
    /// Agent sessions (gRPC).
    pub grpc_addr: SocketAddr,
    /// TLS for the agent port; without it the port serves plaintext gRPC (tests, loopback).
    pub grpc_tls: Option<TlsFiles>,
    /// SQLite job store (WAL mode).
    pub db_path: PathBuf,
    pub api_keys: Vec<ApiKey>,
    /// Placement policy: random, first-fit, tokenfleet or oracle.
    pub policy: String,
    /// Agents heartbeat this often.
    #[serde(with = "millis")]
    pub heartbeat_interval: Duration,
    /// A node silent this long loses its jobs (they resume elsewhere).
    #[serde(with = "millis")]
    pub lease_timeout: Duration,
    /// An interactive job no vehicle can take for this long fails with 503.
    #[serde(with = "millis")]
    pub queue_timeout: Duration,
    /// Progress is written to the store at least this often.
    #[serde(with = "millis")]
    pub persist_interval: Duration,
    pub max_body_bytes: usize,
    pub max_prompt_chars: usize,
    pub max_tokens_limit: u32,
    pub default_max_tokens: u32,
    /// Jobs in the queue (all tenants) beyond which new requests get 429.
    pub max_queued_jobs: usize,
    /// Result verification (`[verification]`; off unless enabled).
    pub verification: crate::verify::VerificationConfig,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            http_addr: "127.0.0.1:8080".parse().expect("literal address"),
            grpc_addr: "127.0.0.1:50051".parse().expect("literal address"),
            grpc_tls: None,
            db_path: PathBuf::from("tokenfleet.db"),
            api_keys: Vec::new(),
            policy: "tokenfleet".into(),
            heartbeat_interval: Duration::from_millis(1000),
            lease_timeout: Duration::from_millis(5000),
            queue_timeout: Duration::from_secs(120),
            persist_interval: Duration::from_millis(100),
            max_body_bytes: 1 << 20,
            max_prompt_chars: 64 * 1024,
            max_tokens_limit: 4096,
            default_max_tokens: 512,
            max_queued_jobs: 10_000,
            verification: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid coordinator config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid coordinator config: {0}")]
    Invalid(String),
}

impl CoordinatorConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.policy_kind()?;
        if self.api_keys.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one api key is required".into(),
            ));
        }
        if self.api_keys.iter().any(|k| k.key.len() < 16) {
            return Err(ConfigError::Invalid(
                "api keys must be at least 16 characters".into(),
            ));
        }
        if self.lease_timeout < self.heartbeat_interval * 2 {
            return Err(ConfigError::Invalid(
                "lease_timeout must be at least two heartbeat intervals".into(),
            ));
        }
        self.verification.validate().map_err(ConfigError::Invalid)?;
        if self.default_max_tokens > self.max_tokens_limit {
            return Err(ConfigError::Invalid(
                "default_max_tokens exceeds max_tokens_limit".into(),
            ));
        }
        Ok(())
    }

    pub fn policy_kind(&self) -> Result<PolicyKind, ConfigError> {
        self.policy
            .parse()
            .map_err(|_| ConfigError::Invalid(format!("unknown policy {:?}", self.policy)))
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}
