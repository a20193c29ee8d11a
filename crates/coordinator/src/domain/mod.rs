//! The coordinator's own vocabulary, shared by every part above it: a request that passed
//! validation ([`request::ValidRequest`]), a job as the manager keeps it ([`job`]), a job as
//! the store holds it ([`store`]: the `tokenfleet-store` records in the coordinator's types),
//! and the error a request can meet ([`error::RequestError`], without a transport: the HTTP
//! edge maps it).
//!
//! May import: `clock`, `config`. Nothing that serves, schedules or checks.

pub(crate) mod error;
pub(crate) mod job;
pub(crate) mod request;
pub mod store;
