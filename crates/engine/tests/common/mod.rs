//! Shared helpers for tests on the real model.

#![allow(
    dead_code,
    reason = "each test binary uses only part of the shared harness"
)]

use std::path::PathBuf;

use tokenfleet_engine::{ChatMessage, Engine, EngineConfig, PromptInput};

/// The test model: `$TOKENFLEET_MODEL`, or where `scripts/fetch-model.sh` puts it.
pub fn model_path() -> PathBuf {
    let path = tokenfleet_engine::gguf::default_model_path();
    assert!(
        path.exists(),
        "test model missing at {}: run scripts/fetch-model.sh (the README's test command does)",
        path.display()
    );
    path
}

pub fn engine(slots: u32, ctx_per_slot: u32) -> Engine {
    let mut config = EngineConfig::new(model_path());
    config.slots = slots;
    config.ctx_per_slot = ctx_per_slot;
    config.threads = 2;
    Engine::load(config).expect("load the test model")
}

pub fn chat_prompt(engine: &Engine, user: &str) -> Vec<i32> {
    engine
        .prompt_tokens(&PromptInput::Chat(vec![ChatMessage::new("user", user)]))
        .expect("render chat")
}

/// A crude coherence check: mostly letters and spaces, several distinct words.
pub fn assert_coherent_english(text: &str) {
    let letters = text
        .chars()
        .filter(|c| c.is_ascii_alphabetic() || *c == ' ')
        .count();
    let words: std::collections::HashSet<&str> = text.split_whitespace().collect();
    assert!(
        letters as f64 >= 0.8 * text.chars().count() as f64 && words.len() >= 5,
        "not coherent English: {text:?}"
    );
}
