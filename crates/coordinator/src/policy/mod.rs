//! Operator policy over requests and vehicles: tenants' rate limits, quotas and residency
//! ([`tenants`]) and the residency regions a vehicle is in ([`regions`], loaded once per
//! coordinator).
//!
//! May import: `clock`, `config`, `domain`.

pub mod regions;
pub mod tenants;
