//! The HTTP API: the router, its shared state and the API-key check ([`api`]), the one place
//! errors become OpenAI error bodies ([`error`]), the handlers (chat and text completions
//! [`generate`], [`files`], [`batches`]) and the connections they arrive on ([`server`]:
//! connection cap, header-read timeout).
//!
//! May import every part below it: `batch`, `fleet`, `trust` (the prompt counter), `policy`,
//! `openai`, `domain`, `clock`, `config`, `metrics`. Not `transport`.

pub mod api;
pub mod batches;
pub mod error;
pub mod files;
pub mod generate;
pub mod server;
