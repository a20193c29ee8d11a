//! OpenAI's wire format: request and response types ([`wire`]), validation of raw requests into
//! `domain::request::ValidRequest` or an OpenAI-shaped 400 ([`validation`]), and the response
//! shapes built from stored tokens ([`responses`]).
//!
//! May import: `config` (limits), `domain`.

pub mod responses;
pub mod validation;
pub mod wire;
