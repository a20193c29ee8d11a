//! Trust in vehicles: fleet CA, enrollment, mutual TLS, revocation and TPM attestation
//! ([`security`]); result verification, where a trusted engine re-scores finished jobs
//! ([`verify`], reporting on its own channel); and per-node reputation, quarantine and adaptive
//! spot-check rates ([`reputation`]).
//!
//! May import: `clock`, `config`, `metrics`, `domain`. Not `fleet`: the manager calls the
//! verifier and reads its reports, never the other way round.

pub mod reputation;
pub mod security;
pub mod verify;
