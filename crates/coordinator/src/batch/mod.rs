//! The Batch API's core (OpenAI `/v1/files` and `/v1/batches` behind the handlers in
//! `crate::http`): a batch's JSONL input, checked on upload and validated line by line
//! ([`input`]); files and batches to and from the store's records ([`store`]); the wire objects
//! and their states ([`types`]); the task that moves batches through their lifecycle and feeds
//! their lines to the manager as jobs ([`runner`]).
//!
//! May import: `clock`, `config`, `domain`, `openai` (validation, response shapes), `policy`
//! (tenants' limits, residency) and `fleet` (the manager that runs the lines). Not `http`.

pub mod input;
pub(crate) mod runner;
pub(crate) mod store;
pub(crate) mod types;
