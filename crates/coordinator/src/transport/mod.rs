//! The agents' transport: the `tokenfleet.v1` NodeSession gRPC service ([`session`]: a node's
//! stream, its security checks, its link to the manager) and the listeners (plain, TLS and
//! mutual-TLS ports for the API, the agents and enrollment).
//!
//! May import: `clock`, `config`, `metrics`, `trust` (session security), `fleet` (the manager)
//! and `http` (the router the listeners serve). Nothing imports it but the crate root.

pub(crate) mod listeners;
pub mod session;
