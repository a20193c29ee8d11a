//! Teacher forcing on the real model: an honest greedy generation scores as all-argmax; a
//! corrupted one does not; an honest sampled one stays inside its sampling support.

mod common;

use common::{chat_prompt, engine};
use tokenfleet_engine::{GenerationRequest, SamplingParams, ScoreRequest};

/// Rounding between a batched prefill and token-by-token decoding stays far below this.
const TOLERANCE_NATS: f32 = 0.05;

#[tokio::test]
async fn a_greedy_generation_scores_as_all_argmax_and_a_corrupted_one_does_not() {
    let engine = engine(2, 512);
    let prompt = chat_prompt(&engine, "Explain why the sky is blue.");
    let out = engine
        .generate(GenerationRequest::greedy(prompt.clone(), 64))
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert!(out.tokens.len() >= 32, "{out:?}");
    let honest = engine
        .score(ScoreRequest {
            prompt: prompt.clone(),
            claimed: out.tokens.clone(),
            sampling: SamplingParams::default(),
            mode: Default::default(),
        })
        .await
        .unwrap();
    assert_eq!(honest.tokens.len(), out.tokens.len());
    let max_gap = honest.tokens.iter().map(|t| t.gap()).fold(0.0, f32::max);
    let not_first = honest.tokens.iter().filter(|t| t.rank > 0).count();
    println!(
        "honest greedy: {} tokens, {not_first} not ranked first, max gap {max_gap:.5} nats",
        out.tokens.len()
    );
    assert!(max_gap <= TOLERANCE_NATS, "max gap {max_gap}");
    // Absolute log-probabilities drift more than the gaps between candidates (the whole
    // softmax shifts a little); verification therefore judges gaps, not logprob equality.
    let mut max_drift = 0.0f32;
    for (score, (&id, &lp)) in honest
        .tokens
        .iter()
        .zip(out.tokens.iter().zip(&out.logprobs))
    {
        assert_eq!(score.token, id);
        assert!(score.sampled.is_none());
        max_drift = max_drift.max((score.logprob - lp).abs());
    }
    println!("honest greedy: max |logprob(score) - logprob(generation)| = {max_drift:.4} nats");
    assert!(max_drift < 0.5, "logprobs drift by {max_drift}");

    // Corrupt three positions with the model's least plausible choice among a few ids.
    let mut corrupted = out.tokens.clone();
    for &i in &[5usize, 17, 29] {
        corrupted[i] = (corrupted[i] + 7919) % engine.info().n_vocab as i32;
    }
    let bad = engine
        .score(ScoreRequest {
            prompt,
            claimed: corrupted.clone(),
            sampling: SamplingParams::default(),
            mode: Default::default(),
        })
        .await
        .unwrap();
    for &i in &[5usize, 17, 29] {
        let t = &bad.tokens[i];
        assert_eq!(t.token, corrupted[i]);
        assert!(t.rank > 0 && t.gap() > 1.0, "position {i}: {t:?}");
    }
    let failing = bad
        .tokens
        .iter()
        .filter(|t| t.gap() > TOLERANCE_NATS)
        .count();
    println!(
        "corrupted greedy: {failing} of {} tokens beyond tolerance",
        corrupted.len()
    );
    assert!(failing >= 3);
}

#[tokio::test]
async fn an_honest_sampled_generation_stays_in_its_support() {
    let engine = engine(2, 512);
    let prompt = chat_prompt(&engine, "Write a short poem about parking lots.");
    let sampling = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        top_k: 0,
        seed: 1234,
    };
    let mut request = GenerationRequest::greedy(prompt.clone(), 64);
    request.sampling = sampling.clone();
    let out = engine.generate(request).unwrap().collect().await.unwrap();
    let scores = engine
        .score(ScoreRequest {
            prompt,
            claimed: out.tokens.clone(),
            sampling: sampling.clone(),
            mode: Default::default(),
        })
        .await
        .unwrap();
    let mut loglik = 0.0;
    let mut entropy = 0.0;
    for t in &scores.tokens {
        let s = t.sampled.expect("sampled statistics for a sampled request");
        // Exactly at the nucleus boundary rounding may move a token out; never far.
        assert!(
            s.in_support || s.mass_before < sampling.top_p as f64 + 0.02,
            "{t:?}"
        );
        assert!(s.logprob <= 1e-9 && s.entropy >= 0.0);
        loglik += s.logprob;
        entropy += s.entropy;
    }
    println!(
        "honest sampled: {} tokens, sum ln q = {loglik:.2}, expected {:.2}",
        scores.tokens.len(),
        -entropy
    );
}

#[tokio::test]
async fn scoring_rejects_what_the_model_cannot_hold() {
    let engine = engine(1, 64);
    let err = engine
        .score(ScoreRequest {
            prompt: vec![1; 40],
            claimed: vec![2; 40],
            sampling: SamplingParams::default(),
            mode: Default::default(),
        })
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        tokenfleet_engine::EngineError::ContextOverflow { .. }
    ));
    let err = engine
        .score(ScoreRequest {
            prompt: vec![1],
            claimed: vec![-3],
            sampling: SamplingParams::default(),
            mode: Default::default(),
        })
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        tokenfleet_engine::EngineError::InvalidToken(-3)
    ));
}
