//! The OpenAI request edge: a raw JSON body, as `POST /v1/chat/completions` and
//! `POST /v1/completions` receive it, becomes a `ValidRequest` or a `RequestError`, never a panic.
//! What passes must hold what the code behind the edge relies on without re-checking, and must
//! survive the job store's JSON round trip unchanged.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tokenfleet_coordinator::fuzzing::{
    status, validate_chat, validate_completion, ChatCompletionRequest, CompletionRequest, Prompt,
    RequestError, ValidRequest,
};
use tokenfleet_coordinator::CoordinatorConfig;

static CONFIG: LazyLock<CoordinatorConfig> = LazyLock::new(CoordinatorConfig::default);

fn check_valid(v: &ValidRequest, config: &CoordinatorConfig) {
    assert!(v.max_tokens >= 1 && v.max_tokens <= config.max_tokens_limit);
    assert!((0.0..=2.0).contains(&v.sampling.temperature));
    assert!(v.sampling.top_p > 0.0 && v.sampling.top_p <= 1.0);
    assert!(v.stop.len() <= 4 && v.stop.iter().all(|s| !s.is_empty()));
    assert!(v.top_logprobs <= 20);
    assert!(v.prompt_chars() <= config.max_prompt_chars);
    match &v.prompt {
        Prompt::Text(t) => assert!(!t.is_empty()),
        Prompt::Chat(m) => {
            assert!(!m.is_empty());
            assert!(m
                .iter()
                .all(|m| matches!(m.role.as_str(), "system" | "user" | "assistant")));
        }
    }
    if let Some(r) = &v.residency {
        assert!(!r.is_empty() && r.iter().all(|s| !s.trim().is_empty()));
    }
    // The store keeps the request as JSON and a resumed job runs what it reads back.
    let stored = serde_json::to_string(v).expect("a valid request serializes");
    let back: ValidRequest = serde_json::from_str(&stored).expect("and reads back");
    assert_eq!(&back, v);
}

fn check_error(e: &RequestError) {
    assert!(status(e.kind).is_client_error(), "{e:?}");
    assert!(!e.message.is_empty());
}

fuzz_target!(|body: &[u8]| {
    let config = &*CONFIG;
    if let Ok(req) = serde_json::from_slice::<ChatCompletionRequest>(body) {
        match validate_chat(req, config) {
            Ok(v) => check_valid(&v, config),
            Err(e) => check_error(&e),
        }
    }
    if let Ok(req) = serde_json::from_slice::<CompletionRequest>(body) {
        match validate_completion(req, config) {
            Ok(v) => check_valid(&v, config),
            Err(e) => check_error(&e),
        }
    }
});
