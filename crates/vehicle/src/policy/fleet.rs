//! [`FleetPolicy`]: the fleet table and the per-vehicle override tables of one policy file,
//! resolved into a [`Policy`] per vehicle.

use std::collections::BTreeMap;

use super::raw::merge;
use super::validate::validate;
use super::{Policy, PolicyError};

/// A whole policy file, every vehicle validated (for the coordinator or a `check` command).
#[derive(Debug, Clone)]
pub struct FleetPolicy {
    pub(super) defaults: toml::Table,
    vehicles: BTreeMap<String, toml::Table>,
}

impl FleetPolicy {
    pub(super) fn parse_tables(s: &str) -> Result<FleetPolicy, PolicyError> {
        let mut root: toml::Table = toml::from_str(s)?;
        let mut vehicles = BTreeMap::new();
        if let Some(v) = root.remove("vehicles") {
            let toml::Value::Table(t) = v else {
                return Err(PolicyError::Invalid {
                    field: "vehicles",
                    reason: "must be a table of VIN tables".into(),
                });
            };
            for (vin, over) in t {
                match over {
                    toml::Value::Table(o) => {
                        vehicles.insert(vin, o);
                    }
                    _ => return Err(PolicyError::OverrideNotTable(vin)),
                }
            }
        }
        // The fleet table alone must be valid: it applies to every vehicle without an override.
        validate(&root, None)?;
        Ok(FleetPolicy {
            defaults: root,
            vehicles,
        })
    }

    /// Parse and validate the fleet defaults and every vehicle override.
    pub fn from_toml_str(s: &str) -> Result<FleetPolicy, PolicyError> {
        let fleet = Self::parse_tables(s)?;
        for vin in fleet.vehicles.keys() {
            fleet.resolve(vin)?;
        }
        Ok(fleet)
    }

    /// VINs that have overrides.
    pub fn vins(&self) -> impl Iterator<Item = &str> {
        self.vehicles.keys().map(String::as_str)
    }

    /// The policy for one vehicle.
    pub fn resolve(&self, vin: &str) -> Result<Policy, PolicyError> {
        let mut merged = self.defaults.clone();
        if let Some(over) = self.vehicles.get(vin) {
            merge(&mut merged, over);
        }
        validate(&merged, Some(vin)).map_err(|e| match e {
            e @ PolicyError::Vehicle { .. } => e,
            e => PolicyError::Vehicle {
                vin: vin.to_string(),
                source: Box::new(e),
            },
        })
    }
}
