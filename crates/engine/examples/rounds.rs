//! Throughput of N concurrent greedy streams over several back-to-back rounds on one engine
//! (does a reused slot decode as fast as a fresh one?).
//! `cargo run --release -p tokenfleet-engine --example rounds -- MODEL [ROUNDS] [STREAMS]`
use std::time::Instant;
use tokenfleet_engine::{ChatMessage, Engine, EngineConfig, GenerationEvent, GenerationRequest};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args.next().expect("model path");
    let rounds: usize = args.next().map_or(3, |s| s.parse().unwrap());
    let streams: usize = args.next().map_or(8, |s| s.parse().unwrap());
    let mut config = EngineConfig::new(&model);
    config.threads = 2;
    config.slots = 8;
    config.ctx_per_slot = 512;
    let engine = Engine::load_async(config).await?;
    let prompt = engine.tokenize(
        &engine.render_chat(&[ChatMessage::new(
            "user",
            "Write a short story about an electric car that earns money while parked.",
        )])?,
        true,
    );
    for round in 0..rounds {
        let start = Instant::now();
        let mut handles = Vec::new();
        for _ in 0..streams {
            let mut r = GenerationRequest::greedy(prompt.clone(), 128);
            r.ignore_eos = true;
            let mut s = engine.generate(r)?;
            handles.push(tokio::spawn(async move {
                let mut n = 0u64;
                while let Some(ev) = s.next().await {
                    match ev {
                        GenerationEvent::Token(_) => n += 1,
                        _ => break,
                    }
                }
                n
            }));
        }
        let mut n = 0;
        for h in handles {
            n += h.await?;
        }
        let s = start.elapsed().as_secs_f64();
        println!(
            "round {round}: {n} tokens in {s:.2} s = {:.1} tok/s",
            n as f64 / s
        );
    }
    Ok(())
}
