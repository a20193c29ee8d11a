//! A request that passed validation ([`ValidRequest`]): what the manager, the store and the
//! policy work on. Only `crate::openai::validation` makes one from client input.

use serde::{Deserialize, Serialize};
use tokenfleet_scheduler::JobClass;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    ChatCompletions,
    Completions,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    Chat(Vec<Message>),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

/// A request that passed every check; stored as JSON in the job store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidRequest {
    pub endpoint: Endpoint,
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: u32,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub logprobs: bool,
    pub top_logprobs: u8,
    pub stream: bool,
    pub include_usage: bool,
    pub class: JobClass,
    pub residency: Option<Vec<String>>,
    /// Unix milliseconds.
    pub deadline_ms: Option<u64>,
    pub sensitive: bool,
    #[serde(default)]
    pub ignore_eos: bool,
    /// With an `Idempotency-Key`: the SHA-256 (hex) of the request's canonical JSON body, so
    /// the key reused with another body is refused (422) instead of answered with the first
    /// request's answer. Set at the edge, not by validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_sha256: Option<String>,
}

impl ValidRequest {
    /// A small greedy completion request (unit tests of the modules that store and admit
    /// requests).
    #[cfg(test)]
    pub(crate) fn sample(prompt: &str, max_tokens: u32) -> ValidRequest {
        ValidRequest {
            endpoint: Endpoint::Completions,
            model: "m".into(),
            prompt: Prompt::Text(prompt.into()),
            max_tokens,
            sampling: Sampling {
                temperature: 0.0,
                top_p: 1.0,
                seed: 5,
            },
            stop: vec![],
            logprobs: false,
            top_logprobs: 0,
            stream: false,
            include_usage: false,
            class: JobClass::Interactive,
            residency: None,
            deadline_ms: None,
            sensitive: false,
            ignore_eos: false,
            body_sha256: None,
        }
    }

    /// Characters of the prompt (for chat, of every message's content).
    pub fn prompt_chars(&self) -> usize {
        match &self.prompt {
            Prompt::Chat(messages) => messages.iter().map(|m| m.content.chars().count()).sum(),
            Prompt::Text(text) => text.chars().count(),
        }
    }
}
