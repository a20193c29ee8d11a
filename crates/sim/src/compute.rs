//! Compute classes: data files under `crates/sim/data/` (embedded), each with its sources.
//!
//! Owns: `ComputeClass` and its data files. May import: no simulator module.

use serde::{Deserialize, Serialize};

/// A vehicle computer and the model it serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComputeClass {
    pub name: String,
    pub memory_bandwidth_gbs: f32,
    pub model: String,
    pub slots: u32,
    pub decode_tps_single: f32,
    pub decode_tps_batched: f32,
    pub prefill_tps: f32,
    pub power_idle_w: f32,
    pub power_max_w: f32,
}

#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("unknown compute class {0:?} (shipped: orin-64gb, hw3, cockpit-soc)")]
    Unknown(String),
    #[error("reading compute class {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing compute class: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("compute class {0}: slots and speeds must be > 0")]
    Invalid(String),
}

const SHIPPED: [(&str, &str); 3] = [
    ("orin-64gb", include_str!("../data/orin-64gb.toml")),
    ("hw3", include_str!("../data/hw3.toml")),
    ("cockpit-soc", include_str!("../data/cockpit-soc.toml")),
];

impl ComputeClass {
    /// A shipped class by name, or a TOML file path.
    pub fn load(name: &str) -> Result<Self, ComputeError> {
        let text = match SHIPPED.iter().find(|(n, _)| *n == name) {
            Some((_, t)) => t.to_string(),
            None if name.ends_with(".toml") => {
                std::fs::read_to_string(name).map_err(|source| ComputeError::Io {
                    path: name.to_string(),
                    source,
                })?
            }
            None => return Err(ComputeError::Unknown(name.to_string())),
        };
        let c: ComputeClass = toml::from_str(&text)?;
        if c.slots == 0 || c.decode_tps_batched <= 0.0 || c.prefill_tps <= 0.0 {
            return Err(ComputeError::Invalid(c.name));
        }
        Ok(c)
    }

    /// Per-stream decode speed with all slots busy.
    pub fn stream_tps(&self) -> f32 {
        self.decode_tps_batched / self.slots as f32
    }
}
