//! Continuous batching on the real model: 8 concurrent streams, determinism, cancellation.

mod common;

use std::time::Duration;

use common::{assert_coherent_english, chat_prompt, engine};
use tokenfleet_engine::{Engine, GenerationEvent, GenerationRequest, GenerationStream};

const QUESTIONS: [&str; 8] = [
    "What is the tallest mountain in the world?",
    "Explain why the sky is blue.",
    "Give me three tips for staying healthy.",
    "What is photosynthesis?",
    "Describe a cat in two sentences.",
    "Why do we have seasons on Earth?",
    "What is the largest ocean on Earth?",
    "How does a bicycle work?",
];

async fn run_concurrently(engine: &Engine, max_tokens: u32) -> Vec<(Vec<i32>, String)> {
    let streams: Vec<_> = QUESTIONS
        .iter()
        .map(|q| {
            engine
                .generate(GenerationRequest::greedy(
                    chat_prompt(engine, q),
                    max_tokens,
                ))
                .unwrap()
        })
        .collect();
    let mut out = Vec::new();
    for s in streams {
        let c = s.collect().await.unwrap();
        out.push((c.tokens, c.text));
    }
    out
}

#[tokio::test]
async fn eight_concurrent_greedy_streams_are_coherent_and_deterministic() {
    let engine = engine(8, 256);
    let first = run_concurrently(&engine, 48).await;
    let second = run_concurrently(&engine, 48).await;
    for (i, ((tok_a, text_a), (tok_b, _))) in first.iter().zip(&second).enumerate() {
        assert_coherent_english(text_a);
        assert_eq!(tok_a, tok_b, "request {i} differs between two batched runs");
    }
    // The batches really shared decode calls.
    assert!(engine.stats().steps < 2 * 8 * 48);

    // Batched outputs equal the same requests run alone: each sequence has its own KV stream
    // (kv_unified = false) and llama.cpp's CPU kernels for this model compute every token's row
    // independently of the batch, so batch composition does not change a greedy choice.
    let mut identical = 0;
    let mut common_prefix = Vec::new();
    for (i, q) in QUESTIONS.iter().enumerate() {
        let alone = engine
            .generate(GenerationRequest::greedy(chat_prompt(&engine, q), 48))
            .unwrap()
            .collect()
            .await
            .unwrap();
        let prefix = alone
            .tokens
            .iter()
            .zip(&first[i].0)
            .take_while(|(a, b)| a == b)
            .count();
        common_prefix.push(prefix);
        if alone.tokens == first[i].0 {
            identical += 1;
        }
    }
    println!("batched vs alone: {identical}/8 identical; common prefix lengths {common_prefix:?}");
    assert_eq!(identical, 8, "common prefix lengths {common_prefix:?}");
}

fn start_greedy(engine: &Engine, questions: &[&str], max_tokens: u32) -> Vec<GenerationStream> {
    questions
        .iter()
        .map(|q| {
            engine
                .generate(GenerationRequest::greedy(
                    chat_prompt(engine, q),
                    max_tokens,
                ))
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn cancelling_one_of_eight_frees_its_slot_before_the_next_step() {
    let engine = engine(8, 256);
    // 200 tokens each, whatever the model would say: no sequence ends (and frees its slot) on
    // its own for 200 steps, so only the cancelled one's slot can take the extra request below.
    let mut streams: Vec<_> = QUESTIONS
        .iter()
        .map(|q| {
            let mut r = GenerationRequest::greedy(chat_prompt(&engine, q), LONG);
            r.ignore_eos = true;
            engine.generate(r).unwrap()
        })
        .collect();
    // Wait until all eight are decoding.
    for s in streams.iter_mut() {
        match s.next().await {
            Some(GenerationEvent::Token(_)) => {}
            other => panic!("expected a token, got {other:?}"),
        }
    }
    let mut stats = engine.watch_stats();
    tokio::time::timeout(
        Duration::from_secs(30),
        stats.wait_for(|s| s.slots_busy == 8),
    )
    .await
    .expect("all eight sequences active")
    .unwrap();
    drop(streams.remove(3));
    let dropped_at = engine.stats().steps;
    // The step running while we dropped may still include it; the one after must not.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::timeout_at(deadline, stats.changed())
            .await
            .expect("engine kept stepping")
            .unwrap();
        let s = stats.borrow_and_update().clone();
        if s.steps >= dropped_at + 2 {
            assert_eq!(s.slots_busy, 7, "{s:?}");
            assert_eq!(s.last_batch_sequences, 7, "{s:?}");
            assert_eq!(s.cancelled, 1);
            break;
        }
    }
    // A new request takes the freed slot while the other seven keep running: it gets a token
    // with eight slots busy and nothing queued, fewer than LONG steps after the engine started.
    // Each of the seven takes one token per step, so none has ended yet; had the cancelled
    // sequence kept its slot, the request would have waited in the queue for one of them.
    let mut extra = engine
        .generate(GenerationRequest::greedy(chat_prompt(&engine, "Hi"), 4))
        .unwrap();
    assert!(matches!(
        extra.next().await,
        Some(GenerationEvent::Token(_))
    ));
    let s = tokio::time::timeout(
        Duration::from_secs(60),
        stats.wait_for(|s| s.slots_busy == 8 && s.queued == 0),
    )
    .await
    .expect("the extra request holds a slot")
    .unwrap()
    .clone();
    println!("the extra request ran {} steps into the run", s.steps);
    assert!(s.steps < u64::from(LONG), "{s:?}");
}

/// Tokens of the sequences that must outlast the cancellation test.
const LONG: u32 = 200;

fn interactive(prompt: Vec<i32>, max_tokens: u32) -> GenerationRequest {
    GenerationRequest {
        interactive: true,
        ..GenerationRequest::greedy(prompt, max_tokens)
    }
}

#[tokio::test]
async fn an_interactive_prompt_is_prefilled_ahead_of_running_decodes_and_gets_the_same_answer() {
    let engine = engine(8, 256);
    let mut batch = start_greedy(&engine, &QUESTIONS[..7], 200);
    for s in batch.iter_mut() {
        assert!(matches!(s.next().await, Some(GenerationEvent::Token(_))));
    }
    let prompt = chat_prompt(&engine, QUESTIONS[7]);
    let with_batch = engine
        .generate(interactive(prompt.clone(), 16))
        .unwrap()
        .collect()
        .await
        .unwrap();
    let stats = engine.stats();
    assert!(stats.interactive_prefill_steps >= 1, "{stats:?}");
    drop(batch);
    let alone = engine
        .generate(GenerationRequest::greedy(prompt, 16))
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(with_batch.tokens, alone.tokens);
}

#[tokio::test]
async fn an_interactive_request_takes_a_free_slot_before_waiting_batch_work() {
    let engine = engine(1, 256);
    let mut running = engine
        .generate(GenerationRequest::greedy(
            chat_prompt(&engine, QUESTIONS[0]),
            200,
        ))
        .unwrap();
    assert!(matches!(
        running.next().await,
        Some(GenerationEvent::Token(_))
    ));
    // Both wait for the one slot: the batch request arrived first.
    let mut waiting_batch = engine
        .generate(GenerationRequest::greedy(
            chat_prompt(&engine, QUESTIONS[1]),
            4,
        ))
        .unwrap();
    let mut urgent = engine
        .generate(interactive(chat_prompt(&engine, QUESTIONS[2]), 4))
        .unwrap();
    let mut stats = engine.watch_stats();
    tokio::time::timeout(Duration::from_secs(30), stats.wait_for(|s| s.queued == 2))
        .await
        .expect("both requests queued")
        .unwrap();
    drop(running);
    // The batch request starts only after the interactive one has finished (one slot, and
    // the engine sends all of a sequence's events before admitting the next): by the time its
    // first token is here, the interactive answer is complete in its channel.
    assert!(matches!(
        waiting_batch.next().await,
        Some(GenerationEvent::Token(_))
    ));
    let mut finished = false;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(10), urgent.next()).await {
        if matches!(ev, GenerationEvent::Finished(_)) {
            finished = true;
            break;
        }
    }
    assert!(
        finished,
        "the interactive request had not finished when the batch one started"
    );
}
