//! Request traces: a diurnal Poisson stream of interactive requests plus daily batch dumps, or a
//! JSON-lines trace file.
//!
//! Trace format, one JSON object per line (times relative to the start of measurement):
//! `{"t_ms": 1200, "class": "interactive", "model": "llama-3.1-8b", "prompt_tokens": 500,
//!   "max_tokens": 200, "deadline_ms": null, "residency": ["eu-nl"], "sensitive": false,
//!   "shard": 1}`
//!
//! Owns: `TraceRequest`, `InteractiveGen`, trace loading. May import: `scenario`, `rng`.

use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::sync::Arc;

use tokenfleet_scheduler::{JobClass, Millis};

use crate::rng::Rng;
use crate::scenario::Scenario;

/// One request (or batch shard) before it enters the queue. Model and residency are shared
/// (`Arc`): a generated day has ~10^8 requests, and each used to allocate its own copies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceRequest {
    pub t_ms: Millis,
    pub class: JobClass,
    pub model: Arc<str>,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    #[serde(default)]
    pub deadline_ms: Option<Millis>,
    #[serde(default)]
    pub residency: Option<Arc<[String]>>,
    #[serde(default)]
    pub sensitive: bool,
    /// Requests in this job (batch shards); prompt/max tokens are per request.
    #[serde(default = "one")]
    pub shard: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("reading trace {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("trace {path} line {line}: {source}")]
    Parse {
        path: String,
        line: usize,
        source: serde_json::Error,
    },
}

/// Load a JSON-lines trace, sorted by time.
pub fn load_trace(path: &str) -> Result<Vec<TraceRequest>, TraceError> {
    let f = std::fs::File::open(path).map_err(|source| TraceError::Io {
        path: path.to_string(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|source| TraceError::Io {
            path: path.to_string(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let r: TraceRequest = serde_json::from_str(&line).map_err(|source| TraceError::Parse {
            path: path.to_string(),
            line: i + 1,
            source,
        })?;
        out.push(r);
    }
    out.sort_by_key(|r| r.t_ms);
    Ok(out)
}

/// Generates interactive arrivals lazily (thinning against the diurnal profile).
pub struct InteractiveGen {
    rng: Rng,
    peak_rps: f64,
    /// Time of the last arrival with its sub-millisecond part: above 1,000 requests/s several
    /// arrivals share a millisecond, and rounding each gap to whole ms would cap the rate.
    last: f64,
    /// Every request asks for this model (a partition's stream, `peak_rps` its share);
    /// `None`: drawn per request by the workload's model shares.
    model: Option<Arc<str>>,
    /// The workload's model names and residency choices, shared by the requests.
    models: Vec<Arc<str>>,
    residencies: Vec<Option<Arc<[String]>>>,
}

impl InteractiveGen {
    pub fn new(sc: &Scenario, seed: u64, peak_rps: f64, model: Option<&str>) -> Self {
        Self {
            rng: Rng::derive(seed, 0x1A7E),
            peak_rps,
            last: 0.0,
            model: model.map(Arc::from),
            models: sc
                .workload
                .models
                .iter()
                .map(|m| Arc::from(m.name.as_str()))
                .collect(),
            residencies: sc
                .workload
                .residency
                .iter()
                .map(|r| r.regions.as_deref().map(Arc::from))
                .collect(),
        }
    }

    /// Next arrival after `now` (`hour_of` gives the local hour of a time), or None if no load.
    pub fn next(
        &mut self,
        sc: &Scenario,
        now: Millis,
        end: Millis,
        hour_of: impl Fn(Millis) -> usize,
    ) -> Option<TraceRequest> {
        if self.peak_rps <= 0.0 {
            return None;
        }
        let peak = sc.workload.diurnal.iter().cloned().fold(0.0f64, f64::max);
        if peak <= 0.0 {
            return None;
        }
        let mut tf = self.last.max(now as f64);
        let t = loop {
            tf += self.rng.exp(1000.0 / self.peak_rps);
            let t = tf as Millis;
            if t >= end {
                return None;
            }
            let rel = sc.workload.diurnal[hour_of(t) % 24] / peak;
            if self.rng.chance(rel) {
                break t;
            }
        };
        self.last = tf;
        let w = &sc.workload;
        let model = match &self.model {
            Some(m) => Arc::clone(m),
            None => self.pick_model(sc),
        };
        let residency = if w.residency.is_empty() {
            None
        } else {
            let i = self.rng.weighted(w.residency.iter().map(|r| r.share));
            self.residencies[i].clone()
        };
        let prompt = (self.rng.lognormal(w.interactive_prompt_tokens as f64, 0.5) as u32).max(8);
        let max = (self.rng.lognormal(w.interactive_max_tokens as f64, 0.5) as u32).max(8);
        Some(TraceRequest {
            t_ms: t,
            class: JobClass::Interactive,
            model,
            prompt_tokens: prompt.min(16_000),
            max_tokens: max.min(4_000),
            deadline_ms: None,
            residency,
            sensitive: self.rng.chance(w.interactive_sensitive_frac),
            shard: 1,
        })
    }
}

impl InteractiveGen {
    /// A model name by the workload's model shares (or the first compute class's model).
    fn pick_model(&mut self, sc: &Scenario) -> Arc<str> {
        let ms = &sc.workload.models;
        if ms.is_empty() {
            return Arc::from(sc.classes.first().map_or("", |c| c.model.as_str()));
        }
        Arc::clone(&self.models[self.rng.weighted(ms.iter().map(|m| m.share))])
    }
}
