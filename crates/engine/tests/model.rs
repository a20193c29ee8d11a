//! Engine tests on the real model (SmolLM2-135M-Instruct Q4_1).

mod common;

use common::{assert_coherent_english, chat_prompt, engine};
use tokenfleet_engine::{
    EngineConfig, EngineError, FinishReason, GenerationEvent, GenerationRequest, SamplingParams,
};

#[tokio::test]
async fn greedy_chat_is_coherent_and_deterministic() {
    let engine = engine(2, 512);
    // (SmolLM2-135M answers "capital of France" with French gibberish — llama-server too.)
    let prompt = chat_prompt(&engine, "Explain why the sky is blue.");
    let a = engine
        .generate(GenerationRequest::greedy(prompt.clone(), 40))
        .unwrap()
        .collect()
        .await
        .unwrap();
    let b = engine
        .generate(GenerationRequest::greedy(prompt, 40))
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.text, b.text);
    assert!(a.text.contains("sky"), "{:?}", a.text);
    assert_coherent_english(&a.text);
}

#[tokio::test]
async fn max_tokens_ends_with_length() {
    let engine = engine(1, 512);
    let prompt = chat_prompt(&engine, "Tell me a long story about a dragon.");
    let out = engine
        .generate(GenerationRequest::greedy(prompt, 7))
        .unwrap()
        .collect()
        .await
        .unwrap();
    let finished = out.finished.unwrap();
    assert_eq!(finished.reason, FinishReason::Length);
    assert_eq!(finished.completion_tokens, 7);
    assert_eq!(out.tokens.len(), 7);
}

#[tokio::test]
async fn stop_string_ends_with_stop_and_cuts_the_text() {
    let engine = engine(1, 512);
    let prompt = chat_prompt(&engine, "Tell me a long story about a dragon.");
    let full = engine
        .generate(GenerationRequest::greedy(prompt.clone(), 48))
        .unwrap()
        .collect()
        .await
        .unwrap();
    // Stop on the fifth word of the uninterrupted answer.
    let word = full
        .text
        .split_whitespace()
        .nth(4)
        .expect("five words")
        .to_string();
    let cut = full.text.find(&word).unwrap();
    let mut request = GenerationRequest::greedy(prompt, 48);
    request.stop = vec![word.clone()];
    let stopped = engine.generate(request).unwrap().collect().await.unwrap();
    assert_eq!(stopped.finished.unwrap().reason, FinishReason::Stop);
    assert_eq!(stopped.text, full.text[..cut], "stop word {word:?}");
}

#[tokio::test]
async fn resumed_generation_equals_uninterrupted_one() {
    let engine = engine(2, 512);
    let prompt = chat_prompt(&engine, "Explain why the sky is blue.");
    let full = engine
        .generate(GenerationRequest::greedy(prompt.clone(), 64))
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(
        full.tokens.len(),
        64,
        "the answer must not end before 64 tokens"
    );
    let first = engine
        .generate(GenerationRequest::greedy(prompt.clone(), 20))
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut resume = GenerationRequest::greedy(prompt, 44);
    resume.resume = first.tokens.clone();
    let rest = engine.generate(resume).unwrap().collect().await.unwrap();
    let mut joined = first.tokens.clone();
    joined.extend(&rest.tokens);
    assert_eq!(joined, full.tokens);
    // The resumed part's text continues exactly where the first part's ended.
    assert_eq!(format!("{}{}", first.text, rest.text), full.text);
    assert_eq!(rest.finished.unwrap().completion_tokens, 44);
}

#[tokio::test]
async fn seeded_sampling_resumes_exactly() {
    let engine = engine(1, 512);
    let prompt = chat_prompt(&engine, "Write a poem about the sea.");
    let sampling = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 40,
        seed: 1234,
    };
    let mut full = GenerationRequest::greedy(prompt.clone(), 40);
    full.sampling = sampling.clone();
    let full = engine.generate(full).unwrap().collect().await.unwrap();
    let mut first = GenerationRequest::greedy(prompt.clone(), 15);
    first.sampling = sampling.clone();
    let first = engine.generate(first).unwrap().collect().await.unwrap();
    let mut rest = GenerationRequest::greedy(prompt, 25);
    rest.sampling = sampling;
    rest.resume = first.tokens.clone();
    let rest = engine.generate(rest).unwrap().collect().await.unwrap();
    let mut joined = first.tokens.clone();
    joined.extend(&rest.tokens);
    assert_eq!(joined.len(), full.tokens.len());
    assert_eq!(joined, full.tokens);
}

#[tokio::test]
async fn logprobs_are_reported_with_alternatives() {
    let engine = engine(1, 512);
    let prompt = chat_prompt(&engine, "Say hello.");
    let mut request = GenerationRequest::greedy(prompt, 5);
    request.logprobs = true;
    request.top_logprobs = 3;
    let mut stream = engine.generate(request).unwrap();
    let mut seen = 0;
    while let Some(ev) = stream.next().await {
        match ev {
            GenerationEvent::Token(t) => {
                seen += 1;
                assert!(t.logprob <= 0.0);
                assert_eq!(t.top_logprobs.len(), 3);
                // Greedy: the chosen token is the most likely one.
                assert_eq!(t.top_logprobs[0].id, t.id);
                assert!((t.top_logprobs[0].logprob - t.logprob).abs() < 1e-6);
                assert!(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob);
            }
            GenerationEvent::Finished(_) => break,
            GenerationEvent::Failed(m) => panic!("{m}"),
        }
    }
    assert_eq!(seen, 5);
}

#[tokio::test]
async fn prompt_longer_than_context_is_a_typed_error() {
    let engine = engine(1, 64);
    let prompt = engine.tokenize(&"word ".repeat(100), true);
    let err = engine
        .generate(GenerationRequest::greedy(prompt, 8))
        .unwrap_err();
    assert!(
        matches!(err, EngineError::ContextOverflow { available: 64, .. }),
        "{err}"
    );
}

#[test]
fn missing_file_is_a_typed_error() {
    let err =
        tokenfleet_engine::Engine::load(EngineConfig::new("/nonexistent/model.gguf")).unwrap_err();
    assert!(matches!(err, EngineError::ModelNotFound { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/model.gguf"));
}

#[test]
fn non_gguf_file_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.gguf");
    std::fs::write(&path, b"this is a text file, not a model at all").unwrap();
    let err = tokenfleet_engine::Engine::load(EngineConfig::new(&path)).unwrap_err();
    assert!(matches!(err, EngineError::NotGguf { .. }), "{err}");
}

#[test]
fn truncated_gguf_is_a_typed_error() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("truncated.gguf");
    let mut head = vec![0u8; 8 << 20];
    std::fs::File::open(common::model_path())
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    std::fs::write(&path, &head).unwrap();
    let err = tokenfleet_engine::Engine::load(EngineConfig::new(&path)).unwrap_err();
    assert!(matches!(err, EngineError::ModelLoad { .. }), "{err}");
}

#[tokio::test]
async fn dropping_the_last_handle_waits_for_running_work_and_the_thread() {
    let engine = engine(1, 256);
    let mut stream = engine
        .generate(GenerationRequest::greedy(
            chat_prompt(&engine, "Tell me a story."),
            8,
        ))
        .unwrap();
    // The stream is still held: its generation runs to the end, and the drop returns only once
    // the inference thread has sent everything and exited.
    tokio::task::spawn_blocking(move || drop(engine))
        .await
        .unwrap();
    let mut finished = false;
    while let Ok(Some(ev)) =
        tokio::time::timeout(std::time::Duration::from_millis(10), stream.next()).await
    {
        if matches!(ev, GenerationEvent::Finished(_)) {
            finished = true;
        }
    }
    assert!(
        finished,
        "the engine's drop returned before its running generation had finished"
    );
}
