//! `tokenfleet chat`: one prompt through the local engine, streamed token by token.

use std::io::Write;

use anyhow::Context;
use tokenfleet_engine::{
    ChatMessage, Engine, EngineConfig, GenerationEvent, GenerationRequest, SamplingParams,
};

use crate::cli::ChatArgs;

pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let mut config = EngineConfig::new(&args.engine.model);
    config.slots = 1;
    config.ctx_per_slot = 4096;
    if let Some(t) = args.engine.threads {
        config.threads = t;
    }
    let engine = Engine::load_async(config).await?;
    let text = engine.render_chat(&[ChatMessage::new("user", &args.prompt)])?;
    let mut request = GenerationRequest::greedy(engine.tokenize(&text, true), args.max_tokens);
    request.sampling = SamplingParams {
        temperature: args.temperature,
        seed: args.seed,
        ..Default::default()
    };
    let mut stream = engine.generate(request)?;
    let mut out = std::io::stdout().lock();
    while let Some(event) = stream.next().await {
        match event {
            GenerationEvent::Token(t) => {
                out.write_all(t.text.as_bytes())?;
                out.flush()?;
            }
            GenerationEvent::Finished(f) => {
                writeln!(out, "{}", f.text_tail)?;
                let t = f.timings;
                eprintln!(
                    "[{} prompt tokens, {} completion tokens, finish_reason {}, prefill {:.0} ms, decode {:.1} tok/s]",
                    f.prompt_tokens,
                    f.completion_tokens,
                    f.reason.as_str(),
                    t.prefill.as_secs_f64() * 1e3,
                    f.completion_tokens.saturating_sub(1) as f64 / t.decode.as_secs_f64().max(1e-9),
                );
                return Ok(());
            }
            GenerationEvent::Failed(m) => anyhow::bail!("generation failed: {m}"),
        }
    }
    Err(anyhow::anyhow!("the engine stopped")).context("chat")
}
