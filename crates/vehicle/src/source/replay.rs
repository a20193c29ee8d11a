//! JSON-lines replay of recorded signals.
//!
//! One object per line: `{"t": 1748815200.5, "path": "Vehicle.Speed", "value": 42.0}`, where
//! `t` is seconds since the Unix epoch or an RFC 3339 string. Blank lines and lines starting
//! with `#` are skipped. A malformed line, an unknown path or a value of the wrong type is
//! logged with its line number and path and skipped.

use serde::Deserialize;
use thiserror::Error;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader, Lines};

use super::{Pace, SignalSource, SourceError};
use crate::signals::{Signal, SignalError, SignalUpdate};
use crate::time::Millis;

/// Why one replay line was skipped.
#[derive(Debug, Error)]
pub enum ReplayLineError {
    #[error("not a JSON object with t, path and value: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bad timestamp: {0}")]
    Time(String),
    #[error("unknown VSS path {0:?}")]
    UnknownPath(String),
    #[error(transparent)]
    Value(#[from] SignalError),
}

#[derive(Deserialize)]
struct Line<'a> {
    t: serde_json::Value,
    #[serde(borrow)]
    path: std::borrow::Cow<'a, str>,
    value: serde_json::Value,
}

fn parse_time(t: &serde_json::Value) -> Result<Millis, ReplayLineError> {
    match t {
        serde_json::Value::Number(n) => n
            .as_f64()
            .and_then(Millis::from_secs_f64)
            .ok_or_else(|| ReplayLineError::Time(n.to_string())),
        serde_json::Value::String(s) => {
            let dt = OffsetDateTime::parse(s, &Rfc3339)
                .map_err(|e| ReplayLineError::Time(format!("{s:?}: {e}")))?;
            let ms = dt.unix_timestamp_nanos() / 1_000_000;
            u64::try_from(ms)
                .map(Millis)
                .map_err(|_| ReplayLineError::Time(format!("{s:?} is before 1970")))
        }
        other => Err(ReplayLineError::Time(other.to_string())),
    }
}

/// Parse one line. `Ok(None)` for blank and comment lines.
pub fn parse_line(line: &str) -> Result<Option<SignalUpdate>, ReplayLineError> {
    let l = line.trim();
    if l.is_empty() || l.starts_with('#') {
        return Ok(None);
    }
    let raw: Line<'_> = serde_json::from_str(l)?;
    let at = parse_time(&raw.t)?;
    let signal = Signal::from_path(&raw.path)
        .ok_or_else(|| ReplayLineError::UnknownPath(raw.path.to_string()))?;
    let value = signal.value_from_json(&raw.value)?;
    Ok(Some(SignalUpdate {
        at,
        path: signal,
        value,
    }))
}

/// Parse a whole replay text; bad lines are returned with their 1-based line number.
pub fn parse_all(text: &str) -> (Vec<SignalUpdate>, Vec<(usize, ReplayLineError)>) {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match parse_line(line) {
            Ok(Some(u)) => ok.push(u),
            Ok(None) => {}
            Err(e) => bad.push((i + 1, e)),
        }
    }
    (ok, bad)
}

/// Format one replay line (used by fixture generators and recorders).
pub fn format_line(u: &SignalUpdate) -> String {
    use crate::signals::SignalValue::*;
    let secs = u.at.0 / 1000;
    let ms = u.at.0 % 1000;
    let t = if ms == 0 {
        format!("{secs}")
    } else {
        format!("{secs}.{ms:03}")
    };
    let v = match u.value {
        Bool(b) => b.to_string(),
        Int(i) => i.to_string(),
        Float(x) => {
            let s = format!("{x:.4}");
            let s = s.trim_end_matches('0');
            if s.ends_with('.') {
                format!("{s}0")
            } else {
                s.to_string()
            }
        }
        LowVoltage(s) => format!("\"{}\"", s.as_str()),
    };
    format!("{{\"t\":{t},\"path\":\"{}\",\"value\":{v}}}", u.path.path())
}

/// A replay file or stream as a [`SignalSource`].
pub struct ReplaySource<R> {
    lines: Lines<BufReader<R>>,
    pace: Pace,
    line_no: usize,
    skipped: u64,
    origin: Option<(tokio::time::Instant, Millis)>,
}

impl ReplaySource<tokio::fs::File> {
    /// Open a replay file.
    pub async fn open(path: impl AsRef<std::path::Path>, pace: Pace) -> Result<Self, SourceError> {
        let f = tokio::fs::File::open(path).await?;
        Ok(Self::new(f, pace))
    }
}

impl<R: AsyncRead + Unpin + Send> ReplaySource<R> {
    /// Replay from any async reader.
    pub fn new(reader: R, pace: Pace) -> Self {
        ReplaySource {
            lines: BufReader::new(reader).lines(),
            pace,
            line_no: 0,
            skipped: 0,
            origin: None,
        }
    }

    /// Lines skipped so far (malformed, unknown path, wrong type).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    async fn pace(&mut self, at: Millis) {
        let Pace::Speed(f) = self.pace else { return };
        let (start, t0) = *self
            .origin
            .get_or_insert_with(|| (tokio::time::Instant::now(), at));
        let virtual_s = at.ms_since(t0) as f64 / 1000.0;
        let target = start + std::time::Duration::from_secs_f64(virtual_s / f);
        tokio::time::sleep_until(target).await;
    }
}

impl<R: AsyncRead + Unpin + Send> SignalSource for ReplaySource<R> {
    async fn next_update(&mut self) -> Result<Option<SignalUpdate>, SourceError> {
        loop {
            let Some(line) = self.lines.next_line().await? else {
                return Ok(None);
            };
            self.line_no += 1;
            match parse_line(&line) {
                Ok(Some(u)) => {
                    self.pace(u.at).await;
                    return Ok(Some(u));
                }
                Ok(None) => {}
                Err(e) => {
                    self.skipped += 1;
                    let path = serde_json::from_str::<serde_json::Value>(&line)
                        .ok()
                        .and_then(|v| v.get("path").and_then(|p| p.as_str()).map(str::to_string))
                        .unwrap_or_default();
                    tracing::warn!(line = self.line_no, path = %path, error = %e, "replay line skipped");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::SignalValue;

    #[test]
    fn parses_numbers_and_rfc3339_and_rejects_garbage() {
        let u = parse_line(r#"{"t": 1748815200.25, "path": "Vehicle.Speed", "value": 12}"#)
            .unwrap()
            .unwrap();
        assert_eq!(u.at, Millis(1_748_815_200_250));
        assert_eq!(u.value, SignalValue::Float(12.0));
        let u = parse_line(
            r#"{"t": "2025-06-02T00:00:00+02:00", "path": "Vehicle.Powertrain.TractionBattery.Charging.IsChargingCableConnected", "value": true}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(u.at, Millis::from_secs(1_748_815_200));
        assert_eq!(u.path, Signal::ChargingCableConnected);
        assert!(parse_line("").unwrap().is_none());
        assert!(parse_line("# comment").unwrap().is_none());
        assert!(matches!(parse_line("{"), Err(ReplayLineError::Json(_))));
        assert!(matches!(
            parse_line(r#"{"t": 1, "path": "Vehicle.Nope", "value": 1}"#),
            Err(ReplayLineError::UnknownPath(_))
        ));
        assert!(matches!(
            parse_line(r#"{"t": 1, "path": "Vehicle.Speed", "value": "fast"}"#),
            Err(ReplayLineError::Value(_))
        ));
        assert!(matches!(
            parse_line(r#"{"t": "yesterday", "path": "Vehicle.Speed", "value": 1}"#),
            Err(ReplayLineError::Time(_))
        ));
    }

    #[test]
    fn format_then_parse_roundtrips() {
        for v in [
            SignalUpdate {
                at: Millis(1_748_815_200_000),
                path: Signal::StateOfCharge,
                value: SignalValue::Float(81.25),
            },
            SignalUpdate {
                at: Millis(1_748_815_200_500),
                path: Signal::SelectedGear,
                value: SignalValue::Int(126),
            },
            SignalUpdate {
                at: Millis(1),
                path: Signal::IsMoving,
                value: SignalValue::Bool(false),
            },
            SignalUpdate {
                at: Millis(2),
                path: Signal::LowVoltageSystemState,
                value: SignalValue::LowVoltage(crate::LowVoltageSystemState::Acc),
            },
        ] {
            let line = format_line(&v);
            assert_eq!(parse_line(&line).unwrap().unwrap(), v, "{line}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn paced_replay_waits_virtual_time_divided_by_speed() {
        let text = "{\"t\":1000,\"path\":\"Vehicle.Speed\",\"value\":0}\n\
                    {\"t\":1000,\"path\":\"Vehicle.Nope\",\"value\":0}\n\
                    {\"t\":1060,\"path\":\"Vehicle.Speed\",\"value\":5}\n";
        let mut src = ReplaySource::new(text.as_bytes(), Pace::Speed(60.0));
        let start = tokio::time::Instant::now();
        assert!(src.next_update().await.unwrap().is_some());
        let u = src.next_update().await.unwrap().unwrap();
        assert_eq!(u.value, SignalValue::Float(5.0));
        let waited = start.elapsed();
        assert!(
            waited >= std::time::Duration::from_secs(1)
                && waited < std::time::Duration::from_millis(1100),
            "{waited:?}"
        );
        assert_eq!(src.skipped(), 1);
        assert!(src.next_update().await.unwrap().is_none());
    }
}
