//! The engine's error type: every way a model load or a generation can fail, with a message
//! that tells the operator or the API client what to fix.

use std::path::PathBuf;

/// Errors from loading a model or running a generation.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file {path} does not exist")]
    ModelNotFound { path: PathBuf },
    #[error("cannot read model file {path}: {source}")]
    ModelUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF model file: {reason}")]
    NotGguf { path: PathBuf, reason: String },
    #[error("llama.cpp could not load the model {path} (truncated or corrupt GGUF, or an unsupported architecture)")]
    ModelLoad { path: PathBuf },
    #[error("llama.cpp could not create an inference context: {0}")]
    Context(String),
    #[error("invalid engine configuration: {0}")]
    Config(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the request needs {needed} tokens of context (prompt {prompt} + already generated {resumed} + max_tokens {max_tokens}) but a slot holds {available}")]
    ContextOverflow {
        needed: usize,
        prompt: usize,
        resumed: usize,
        max_tokens: u32,
        available: u32,
    },
    #[error("token id {0} is outside the model's vocabulary")]
    InvalidToken(i32),
    #[error("invalid sampling parameter: {0}")]
    InvalidSampling(String),
    #[error("the model has no chat template; send a plain prompt instead")]
    NoChatTemplate,
    #[error("the chat template could not be rendered: {0}")]
    ChatTemplate(String),
    #[error("the engine queue is full ({0} requests waiting)")]
    Overloaded(usize),
    #[error("llama.cpp decode failed: {0}")]
    Decode(String),
    #[error("the engine has shut down")]
    Shutdown,
}
