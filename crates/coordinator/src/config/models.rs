//! What identifies a model across the fleet, and which names the operator binds to which file.
//!
//! - [`Sha256Hex`]: the one accepted form of a model hash (64 lower-case hex digits). Every
//!   place a model hash comes in (a node's `Hello`, its attestation log, the attestation
//!   allow-list, the `[[models]]` bindings, the verifier's trusted models) parses it with
//!   [`Sha256Hex::parse`], so two spellings of one file can never compare unequal; anything
//!   else is refused. (Issue 13, hole 2: attestation lower-cased an offered hash while the
//!   verifier looked it up as sent, so an upper-case hash skipped every check.)
//! - [`ModelBinding`] / [`check_hello`]: the operator's `[[models]] name = "...", sha256 = "..."`
//!   table. With bindings configured, a node may announce only bound names, each with exactly
//!   the bound hash: a node cannot serve model "big" from a file allowed for "small".

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use tokenfleet_protocol::v1;

/// A sha256 in its canonical text form: exactly 64 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Sha256Hex(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a sha256 in canonical form (64 lower-case hex digits)")]
pub struct NotCanonical(pub String);

impl Sha256Hex {
    /// Accepts exactly 64 lower-case hex digits; no trimming, no case folding, no prefix.
    pub fn parse(s: &str) -> Result<Self, NotCanonical> {
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Self(s.to_string()))
        } else {
            Err(NotCanonical(s.chars().take(80).collect()))
        }
    }

    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self(hex::encode(bytes))
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex::decode_to_slice(&self.0, &mut out).expect("checked to be 64 hex digits");
        out
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sha256Hex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `[[models]]`: a model name the fleet serves and the one file (by sha256) it must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelBinding {
    pub name: String,
    pub sha256: Sha256Hex,
}

/// The bindings by name; an error names a name bound twice.
pub fn binding_map(bindings: &[ModelBinding]) -> Result<HashMap<&str, &Sha256Hex>, String> {
    let mut map = HashMap::new();
    for b in bindings {
        if b.name.is_empty() {
            return Err("[[models]]: a binding has an empty name".into());
        }
        if map.insert(b.name.as_str(), &b.sha256).is_some() {
            return Err(format!("[[models]]: model {:?} is bound twice", b.name));
        }
    }
    Ok(map)
}

/// Why a node's announced models are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloRefusal {
    #[error("model {name:?}: {source}")]
    NotCanonical { name: String, source: NotCanonical },
    #[error("model {name:?} is not served by this fleet (no [[models]] binding)")]
    Unbound { name: String },
    #[error("model {name:?} must be the file with sha256 {bound}, not {announced}")]
    WrongFile {
        name: String,
        bound: Sha256Hex,
        announced: Sha256Hex,
    },
}

/// Checks the models a node announces in its Hello: every hash canonical, and with bindings
/// configured every name bound and announced with exactly its bound hash.
pub fn check_hello(
    models: &[v1::ModelInfo],
    bindings: &[ModelBinding],
) -> Result<(), HelloRefusal> {
    let bound: HashMap<&str, &Sha256Hex> = bindings
        .iter()
        .map(|b| (b.name.as_str(), &b.sha256))
        .collect();
    for m in models {
        let announced =
            Sha256Hex::parse(&m.sha256).map_err(|source| HelloRefusal::NotCanonical {
                name: m.name.clone(),
                source,
            })?;
        if bindings.is_empty() {
            continue;
        }
        match bound.get(m.name.as_str()) {
            None => {
                return Err(HelloRefusal::Unbound {
                    name: m.name.clone(),
                })
            }
            Some(b) if **b != announced => {
                return Err(HelloRefusal::WrongFile {
                    name: m.name.clone(),
                    bound: (*b).clone(),
                    announced,
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const BIG: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn info(name: &str, sha: &str) -> v1::ModelInfo {
        v1::ModelInfo {
            name: name.into(),
            sha256: sha.into(),
            ..Default::default()
        }
    }

    fn bindings() -> Vec<ModelBinding> {
        vec![
            ModelBinding {
                name: "small".into(),
                sha256: Sha256Hex::parse(SMALL).unwrap(),
            },
            ModelBinding {
                name: "big".into(),
                sha256: Sha256Hex::parse(BIG).unwrap(),
            },
        ]
    }

    #[test]
    fn only_64_lower_case_hex_digits_are_a_model_hash() {
        let lower = "ab".repeat(32);
        assert_eq!(Sha256Hex::parse(&lower).unwrap().as_str(), lower);
        for bad in [
            "AB".repeat(32),
            format!(" {lower}"),
            format!("{lower}\n"),
            format!("0x{}", &lower[2..]),
            lower[..62].to_string(),
            format!("{lower}00"),
            "g".repeat(64),
            String::new(),
        ] {
            assert!(Sha256Hex::parse(&bad).is_err(), "{bad:?} accepted");
        }
        let h = Sha256Hex::parse(&lower).unwrap();
        assert_eq!(Sha256Hex::from_bytes(&h.to_bytes()), h);
        assert!(toml::from_str::<ModelBinding>(&format!(
            "name = \"m\"\nsha256 = \"{}\"",
            "AB".repeat(32)
        ))
        .is_err());
    }

    /// Issue 13, hole 2: an upper-case spelling of an allowed hash is refused at the door
    /// rather than accepted by one check and unknown to the next.
    #[test]
    fn an_upper_case_hash_in_hello_is_refused() {
        let upper = "ab".repeat(32).to_uppercase();
        assert!(Sha256Hex::parse(&upper.to_lowercase()).is_ok());
        assert!(matches!(
            check_hello(&[info("small", &upper)], &[]),
            Err(HelloRefusal::NotCanonical { .. })
        ));
        assert!(matches!(
            check_hello(&[info("small", &"AA".repeat(32))], &bindings()),
            Err(HelloRefusal::NotCanonical { .. })
        ));
    }

    /// Issue 13, hole 2: a node cannot serve "big" from the allowed small model's file.
    #[test]
    fn a_bound_name_must_be_announced_with_its_bound_file() {
        let b = bindings();
        assert_eq!(
            check_hello(&[info("small", SMALL), info("big", BIG)], &b),
            Ok(())
        );
        assert!(matches!(
            check_hello(&[info("big", SMALL)], &b),
            Err(HelloRefusal::WrongFile { name, .. }) if name == "big"
        ));
        assert!(matches!(
            check_hello(&[info("other", SMALL)], &b),
            Err(HelloRefusal::Unbound { name }) if name == "other"
        ));
        // Without bindings (development) any canonical announcement passes.
        assert_eq!(check_hello(&[info("big", SMALL)], &[]), Ok(()));
    }

    #[test]
    fn a_name_bound_twice_is_a_config_error() {
        let mut b = bindings();
        b.push(b[0].clone());
        assert!(binding_map(&b).unwrap_err().contains("bound twice"));
    }
}
