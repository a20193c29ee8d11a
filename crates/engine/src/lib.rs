//! `tokenfleet-engine` runs a GGUF model on one node through llama.cpp (`llama-cpp-2`).
//!
//! It owns everything between token ids and the CPU/GPU: model loading, the chat template,
//! tokenization, sampling with log-probabilities, continuous batching of concurrent sequences,
//! streaming, cancellation, and resuming a generation another node started. Inference runs on
//! a dedicated thread; the rest of the system talks to it through channels.
//!
//! Layout:
//! - [`engine`]: [`Engine`], the async handle: load, tokenize, render chat, `generate`.
//! - `worker`: the inference thread and its continuous-batching loop.
//! - [`request`]: [`GenerationRequest`] in, [`GenerationEvent`]s out.
//! - [`sampling`]: greedy/temperature/top-k/top-p over raw logits, counter-based RNG for
//!   exact resume, log-probabilities.
//! - [`score`]: teacher forcing for result verification: per-token logprob, argmax, rank and
//!   the probability under the job's sampling distribution ([`Engine::score`]).
//! - [`token_text`]: incremental detokenization and stop strings, a pure function of the ids.
//! - [`chat`]: the GGUF's Jinja chat template, rendered with minijinja.
//! - [`gguf`]: file checks and sha256 before llama.cpp sees a file.
//! - [`error`]: the [`EngineError`] enum.

pub mod chat;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod request;
pub mod sampling;
pub mod score;
pub mod token_text;
mod worker;

pub use chat::{ChatMessage, PromptInput};
pub use engine::{
    Completion, Engine, EngineConfig, EngineStats, GenerationStream, Limits, ModelInfo,
};
pub use error::EngineError;
pub use request::{
    FinishReason, Finished, GenerationEvent, GenerationRequest, Timings, TokenEvent,
};
pub use sampling::{SamplingParams, TokenId};
pub use score::{NextScore, SampledScore, ScoreMode, ScoreRequest, ScoreResult, TokenScore};
pub use token_text::TokenTable;
