//! `[[regions]]` and `[[tenants]]`: the residency regions and the tenants' limits, as the
//! operator writes them (built into the live policy by `crate::policy`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One region as configured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegionConfig {
    /// The name requests and tenants use (e.g. `EU`).
    pub name: String,
    /// ISO 3166-1 alpha-2 codes, resolved through `country_boundaries`.
    pub countries: Vec<String>,
    /// A GeoJSON file (Feature, FeatureCollection or bare geometry) whose polygons form the
    /// region.
    pub geojson: Option<PathBuf>,
    /// One inline polygon ring, `[longitude, latitude]` pairs (GeoJSON order).
    pub polygon: Vec<[f64; 2]>,
}

/// One tenant as configured (`[[tenants]]`). Tenants not listed have no residency bound and
/// no per-tenant limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// Regions every request of this tenant must run in (empty: anywhere).
    pub residency: Vec<String>,
    /// Requests per minute (0: unlimited).
    pub requests_per_minute: u32,
    /// Tokens per minute, prompt estimate + max_tokens (0: unlimited).
    pub tokens_per_minute: u32,
    /// Quota: tokens per UTC day, counted like `tokens_per_minute` (0: unlimited).
    pub tokens_per_day: u64,
}
