//! Eclipse Kuksa databroker source (kuksa.val.v2 `Subscribe`) through `kuksa-rust-sdk`.
//!
//! - Subscribes to every path in [`Signal::SUBSCRIBE_PATHS`]. A broker with an older VSS tree
//!   rejects unknown paths with NOT_FOUND (VSS 4.x has no `ChargingPort.AnyPosition…`,
//!   VSS < 6 no `ControlUnit`); the source then probes each path and subscribes to the ones
//!   the broker knows, logging the others.
//! - The broker's first response lists every path with an empty value; empty values are
//!   skipped. Values of the wrong type and paths this crate does not know are logged with the
//!   path and ignored.
//! - When the stream ends or fails, it reconnects with capped exponential backoff
//!   ([`KuksaConfig::backoff_initial`] doubling up to [`KuksaConfig::backoff_max`]).
//! - Timestamps come from the broker's datapoint; without one, the receive time is used.

use std::collections::VecDeque;
use std::time::Duration;

use kuksa_rust_sdk::kuksa::common::{ClientError, ClientTraitV2};
use kuksa_rust_sdk::kuksa::val::v2::KuksaClientV2;
use kuksa_rust_sdk::v2_proto::value::TypedValue;
use kuksa_rust_sdk::v2_proto::{Datapoint, SubscribeResponse};
use tonic::Streaming;

use super::{SignalSource, SourceError};
use crate::signals::{LowVoltageSystemState, Signal, SignalUpdate, SignalValue, ValueKind};
use crate::time::Millis;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct KuksaConfig {
    /// Broker address, e.g. `http://127.0.0.1:55555`.
    pub uri: String,
    /// Bearer token (JWT) if the broker requires authorization.
    pub token: Option<String>,
    /// Broker-side buffer for slow subscribers.
    pub buffer_size: u32,
    /// Minimum interval between samples the broker sends per signal, ms.
    pub min_sample_interval_ms: Option<u32>,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

impl KuksaConfig {
    /// Defaults for a broker at `uri`: buffer 100, no sampling filter, backoff 0.5 s → 30 s.
    pub fn new(uri: impl Into<String>) -> Self {
        KuksaConfig {
            uri: uri.into(),
            token: None,
            buffer_size: 100,
            min_sample_interval_ms: None,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// A Kuksa databroker subscription as a [`SignalSource`].
pub struct KuksaSource {
    cfg: KuksaConfig,
    uri: tonic::transport::Uri,
    stream: Option<Streaming<SubscribeResponse>>,
    pending: VecDeque<SignalUpdate>,
    backoff: Duration,
    connects: u64,
    ignored: u64,
}

impl KuksaSource {
    /// A source for the configured broker. Does not connect yet.
    pub fn new(cfg: KuksaConfig) -> Result<Self, SourceError> {
        // Not `kuksa_rust_sdk::…::to_uri`: in 0.2.2 it panics on every input
        // ("uri path should be empty string").
        let text = if cfg.uri.contains("://") {
            cfg.uri.clone()
        } else {
            format!("http://{}", cfg.uri)
        };
        let uri: tonic::transport::Uri = text
            .parse()
            .map_err(|e| SourceError::Config(format!("broker uri {:?}: {e}", cfg.uri)))?;
        if uri.host().is_none() || !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(SourceError::Config(format!(
                "broker uri {:?}: expected http(s)://host:port",
                cfg.uri
            )));
        }
        if cfg.backoff_initial.is_zero() || cfg.backoff_max < cfg.backoff_initial {
            return Err(SourceError::Config(
                "backoff must be positive and max >= initial".into(),
            ));
        }
        let backoff = cfg.backoff_initial;
        Ok(KuksaSource {
            cfg,
            uri,
            stream: None,
            pending: VecDeque::new(),
            backoff,
            connects: 0,
            ignored: 0,
        })
    }

    /// Successful subscriptions so far (1 + reconnects).
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// Entries ignored so far (unknown path or wrong type).
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    fn client(&self) -> Result<KuksaClientV2, SourceError> {
        let mut c = KuksaClientV2::new(self.uri.clone());
        if let Some(t) = &self.cfg.token {
            c.basic_client
                .set_access_token(t)
                .map_err(|e| SourceError::Config(format!("access token: {e:?}")))?;
        }
        Ok(c)
    }

    async fn subscribe(
        &self,
        client: &mut KuksaClientV2,
        paths: Vec<String>,
    ) -> Result<Streaming<SubscribeResponse>, ClientError> {
        ClientTraitV2::subscribe(
            client,
            paths,
            Some(self.cfg.buffer_size),
            self.cfg.min_sample_interval_ms,
        )
        .await
    }

    async fn connect(&mut self) -> Result<Streaming<SubscribeResponse>, String> {
        let mut client = self.client().map_err(|e| e.to_string())?;
        let all: Vec<String> = Signal::SUBSCRIBE_PATHS
            .iter()
            .map(|p| p.to_string())
            .collect();
        match self.subscribe(&mut client, all.clone()).await {
            Ok(s) => Ok(s),
            Err(ClientError::Status(st)) if st.code() == tonic::Code::NotFound => {
                // Older VSS tree: keep the paths the broker knows.
                let mut known = Vec::new();
                for p in all {
                    match self.subscribe(&mut client, vec![p.clone()]).await {
                        Ok(_) => known.push(p),
                        Err(ClientError::Status(s)) if s.code() == tonic::Code::NotFound => {
                            tracing::warn!(path = %p, "databroker does not know this VSS path; not subscribed");
                        }
                        Err(e) => return Err(describe(&e)),
                    }
                }
                if known.is_empty() {
                    return Err("databroker knows none of the subscribed paths".into());
                }
                self.subscribe(&mut client, known)
                    .await
                    .map_err(|e| describe(&e))
            }
            Err(e) => Err(describe(&e)),
        }
    }

    fn take_response(&mut self, resp: SubscribeResponse) {
        for (path, dp) in resp.entries {
            match convert(&path, &dp) {
                Ok(Some(u)) => self.pending.push_back(u),
                Ok(None) => tracing::trace!(path = %path, "no value yet"),
                Err(reason) => {
                    self.ignored += 1;
                    tracing::warn!(path = %path, reason = %reason, "databroker entry ignored");
                }
            }
        }
    }

    async fn back_off(&mut self) {
        tracing::info!(
            delay_ms = self.backoff.as_millis() as u64,
            "reconnecting to databroker"
        );
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(self.cfg.backoff_max);
    }
}

fn describe(e: &ClientError) -> String {
    match e {
        ClientError::Connection(s) => format!("connection: {s}"),
        ClientError::Status(s) => format!("{:?}: {}", s.code(), s.message()),
        ClientError::Function(errs) => format!("{errs:?}"),
    }
}

/// Convert one broker entry. `Ok(None)` for an empty value.
fn convert(path: &str, dp: &Datapoint) -> Result<Option<SignalUpdate>, String> {
    let signal = Signal::from_path(path).ok_or_else(|| "unknown VSS path".to_string())?;
    let Some(tv) = dp.value.as_ref().and_then(|v| v.typed_value.as_ref()) else {
        return Ok(None);
    };
    let raw = match tv {
        TypedValue::Bool(b) => SignalValue::Bool(*b),
        TypedValue::Int32(i) => SignalValue::Int(i64::from(*i)),
        TypedValue::Int64(i) => SignalValue::Int(*i),
        TypedValue::Uint32(i) => SignalValue::Int(i64::from(*i)),
        TypedValue::Uint64(i) => {
            SignalValue::Int(i64::try_from(*i).map_err(|_| "uint64 out of range".to_string())?)
        }
        TypedValue::Float(x) => SignalValue::Float(f64::from(*x)),
        TypedValue::Double(x) => SignalValue::Float(*x),
        TypedValue::String(s) if signal.kind() == ValueKind::LowVoltageState => {
            SignalValue::LowVoltage(
                s.parse::<LowVoltageSystemState>()
                    .map_err(|e| e.to_string())?,
            )
        }
        TypedValue::String(_) => return Err(format!("expected a {}, got a string", signal.kind())),
        _ => return Err(format!("expected a {}, got an array", signal.kind())),
    };
    let value = signal.check(raw).map_err(|e| e.to_string())?;
    let at = dp
        .timestamp
        .as_ref()
        .and_then(|ts| {
            let ms = i128::from(ts.seconds) * 1000 + i128::from(ts.nanos) / 1_000_000;
            u64::try_from(ms).ok().filter(|ms| *ms > 0).map(Millis)
        })
        .unwrap_or_else(Millis::now);
    Ok(Some(SignalUpdate {
        at,
        path: signal,
        value,
    }))
}

impl SignalSource for KuksaSource {
    async fn next_update(&mut self) -> Result<Option<SignalUpdate>, SourceError> {
        loop {
            if let Some(u) = self.pending.pop_front() {
                return Ok(Some(u));
            }
            let Some(stream) = self.stream.as_mut() else {
                match self.connect().await {
                    Ok(s) => {
                        self.connects += 1;
                        tracing::info!(uri = %self.cfg.uri, "subscribed to databroker");
                        self.stream = Some(s);
                    }
                    Err(e) => {
                        tracing::warn!(uri = %self.cfg.uri, error = %e, "databroker subscribe failed");
                        self.back_off().await;
                    }
                }
                continue;
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    self.backoff = self.cfg.backoff_initial;
                    self.take_response(resp);
                }
                Ok(None) => {
                    tracing::warn!(uri = %self.cfg.uri, "databroker closed the subscription");
                    self.stream = None;
                    self.back_off().await;
                }
                Err(status) => {
                    tracing::warn!(uri = %self.cfg.uri, code = ?status.code(), error = %status.message(), "databroker stream failed");
                    self.stream = None;
                    self.back_off().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kuksa_rust_sdk::v2_proto::Value;

    fn dp(v: TypedValue) -> Datapoint {
        Datapoint {
            timestamp: None,
            value: Some(Value {
                typed_value: Some(v),
            }),
        }
    }

    #[test]
    fn conversion_checks_paths_and_types() {
        let u = convert(
            crate::signals::path::SELECTED_GEAR,
            &dp(TypedValue::Int32(126)),
        )
        .unwrap()
        .unwrap();
        assert_eq!(u.value, SignalValue::Int(126));
        let u = convert(crate::signals::path::SOC, &dp(TypedValue::Float(55.5)))
            .unwrap()
            .unwrap();
        assert_eq!(u.value, SignalValue::Float(55.5));
        let u = convert(
            crate::signals::path::LOW_VOLTAGE_SYSTEM_STATE,
            &dp(TypedValue::String("START".into())),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            u.value,
            SignalValue::LowVoltage(LowVoltageSystemState::Start)
        );
        assert!(convert(
            crate::signals::path::SOC,
            &dp(TypedValue::String("full".into()))
        )
        .is_err());
        assert!(convert(crate::signals::path::SOC, &dp(TypedValue::Float(250.0))).is_err());
        assert!(convert(
            "Vehicle.Cabin.IsAirConditioningActive",
            &dp(TypedValue::Bool(true))
        )
        .is_err());
        let empty = Datapoint {
            timestamp: None,
            value: None,
        };
        assert_eq!(convert(crate::signals::path::SPEED, &empty), Ok(None));
    }
}
