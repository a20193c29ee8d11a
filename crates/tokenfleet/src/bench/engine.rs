//! `tokenfleet bench engine`: our engine against llama.cpp's own tools, in one run.
//!
//! - prefill and single-stream decode: ours on a 512-token prompt and a 128-token generation,
//!   against `llama-bench -p 512 -n 128` (same model, same threads);
//! - 8 concurrent streams: ours (8 slots, continuous batching) against `llama-server
//!   --parallel 8` driven by 8 concurrent streaming clients, 128 generated tokens per request,
//!   aggregate tokens/s over wall time (prefill of the short chat prompt included on both sides).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tokenfleet_engine::{ChatMessage, Engine, EngineConfig, GenerationEvent, GenerationRequest};

use super::reference::{self, RefTools};
use crate::cli::{default_cache_dir, EngineArgs};

#[derive(Debug, Args)]
pub struct EngineBenchArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Repetitions of each single-stream measurement.
    #[arg(long, default_value_t = 3)]
    pub reps: u32,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 128)]
    pub n_gen: u32,
    /// Prompt tokens for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub n_prompt: u32,
    /// Where the llama.cpp reference tools are built and cached.
    #[arg(long, env = "TOKENFLEET_CACHE", default_value_os_t = default_cache_dir())]
    pub cache_dir: PathBuf,
}

/// The figures, as printed with `--json`.
#[derive(Debug, Serialize)]
pub struct EngineBenchReport {
    pub model: String,
    pub threads: u32,
    pub engine_llama_cpp: String,
    pub reference_llama_cpp: String,
    pub reference_llama_cpp_python: String,
    pub prefill_tps: f64,
    pub ref_prefill_tps: f64,
    pub ratio_prefill: f64,
    pub decode_tps_1: f64,
    pub ref_decode_tps_1: f64,
    pub ratio_decode_1: f64,
    /// Single stream measured like the 8-stream case (wall time, prefill included).
    pub stream_tps_1: f64,
    pub ref_stream_tps_1: f64,
    pub decode_tps_8: f64,
    pub ref_decode_tps_8: f64,
    pub ratio_decode_8: f64,
    /// Ours: 8-stream aggregate / 1-stream.
    pub batch_speedup_8: f64,
    /// llama-server: 8-client aggregate / 1 client.
    pub ref_batch_speedup_8: f64,
}

/// The llama.cpp tree compiled into llama-cpp-sys-2 (see Cargo.lock).
const ENGINE_LLAMA_CPP: &str = "llama-cpp-sys-2 0.1.161";

const CHAT_PROMPT: &str =
    "Write a short story about an electric car that earns money while parked.";

pub async fn run(args: EngineBenchArgs) -> anyhow::Result<()> {
    let threads = args.engine.threads.unwrap_or(2);
    let model = args.engine.model.clone();
    let tools = {
        let cache = args.cache_dir.clone();
        tokio::task::spawn_blocking(move || reference::ensure_reference_tools(&cache))
            .await?
            .context("building llama.cpp's reference tools")?
    };
    eprintln!(
        "reference: llama-cpp-python {} (llama.cpp {}); ours: {}",
        tools.llama_cpp_python_version, tools.llama_cpp_build, ENGINE_LLAMA_CPP
    );

    // Ours, single stream.
    let mut config = EngineConfig::new(&model);
    config.threads = threads;
    config.slots = 1;
    config.ctx_per_slot = args.n_prompt + args.n_gen + 16;
    config.batch_tokens = args.n_prompt;
    let engine = Engine::load_async(config).await?;
    let prefill_tps = measure_prefill(&engine, args.n_prompt, args.reps).await?;
    let decode_tps_1 = measure_decode_1(&engine, args.n_gen, args.reps).await?;
    let chat = engine.tokenize(
        &engine.render_chat(&[ChatMessage::new("user", CHAT_PROMPT)])?,
        true,
    );
    let stream_tps_1 = measure_streams(&engine, &chat, 1, args.n_gen).await?;
    drop(engine);

    // Ours, 8 slots.
    let mut config = EngineConfig::new(&model);
    config.threads = threads;
    config.slots = 8;
    config.ctx_per_slot = 512;
    let engine = Engine::load_async(config).await?;
    // Warm-up request on the freshly loaded engine, exactly as the reference server gets one.
    measure_streams(&engine, &chat, 1, 8).await?;
    // One untimed round first so every slot has been used and freed once: the timed round
    // then measures the steady state of a serving engine, not a fresh one (slot reuse once
    // cost 30% here; see the engine's `step`).
    measure_streams(&engine, &chat, 8, args.n_gen).await?;
    let decode_tps_8 = measure_streams(&engine, &chat, 8, args.n_gen).await?;
    drop(engine);

    // Reference.
    let (ref_prefill_tps, ref_decode_tps_1) = {
        let (tools, model) = (tools.clone(), model.clone());
        let (n_prompt, n_gen, reps) = (args.n_prompt, args.n_gen, args.reps);
        let r = tokio::task::spawn_blocking(move || {
            reference::run_llama_bench(&tools, &model, threads, n_prompt, n_gen, reps)
        })
        .await??;
        (r.prefill_tps, r.decode_tps)
    };
    let (ref_stream_tps_1, ref_decode_tps_8) =
        reference_streams(&tools, &model, threads, args.n_gen).await?;

    let report = EngineBenchReport {
        model: model.display().to_string(),
        threads,
        engine_llama_cpp: ENGINE_LLAMA_CPP.into(),
        reference_llama_cpp: tools.llama_cpp_build.clone(),
        reference_llama_cpp_python: tools.llama_cpp_python_version.clone(),
        prefill_tps,
        ref_prefill_tps,
        ratio_prefill: prefill_tps / ref_prefill_tps,
        decode_tps_1,
        ref_decode_tps_1,
        ratio_decode_1: decode_tps_1 / ref_decode_tps_1,
        stream_tps_1,
        ref_stream_tps_1,
        decode_tps_8,
        ref_decode_tps_8,
        ratio_decode_8: decode_tps_8 / ref_decode_tps_8,
        batch_speedup_8: decode_tps_8 / stream_tps_1,
        ref_batch_speedup_8: ref_decode_tps_8 / ref_stream_tps_1,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

async fn reference_streams(
    tools: &RefTools,
    model: &std::path::Path,
    threads: u32,
    n_gen: u32,
) -> anyhow::Result<(f64, f64)> {
    let server = reference::start_llama_server(tools, model, threads, 8, 512).await?;
    // Warm-up request (our engines get the same: the single-stream one from the prefill and
    // decode runs, the 8-slot one explicitly).
    reference::drive_openai_streams(&server.base_url, None, "model", CHAT_PROMPT, 1, 1, 8).await?;
    let one =
        reference::drive_openai_streams(&server.base_url, None, "model", CHAT_PROMPT, 1, 1, n_gen)
            .await?;
    // Same untimed round as ours: every slot used once before the timed one.
    reference::drive_openai_streams(&server.base_url, None, "model", CHAT_PROMPT, 8, 1, n_gen)
        .await?;
    let eight =
        reference::drive_openai_streams(&server.base_url, None, "model", CHAT_PROMPT, 8, 1, n_gen)
            .await?;
    Ok((
        one.tokens as f64 / one.wall_s,
        eight.tokens as f64 / eight.wall_s,
    ))
}

fn bench_request(prompt: Vec<i32>, n_gen: u32) -> GenerationRequest {
    let mut r = GenerationRequest::greedy(prompt, n_gen);
    r.ignore_eos = true;
    r
}

async fn measure_prefill(engine: &Engine, n_prompt: u32, reps: u32) -> anyhow::Result<f64> {
    let filler = "The quick brown fox jumps over the lazy dog. ".repeat(n_prompt as usize);
    let mut prompt = engine.tokenize(&filler, true);
    prompt.truncate(n_prompt as usize);
    let mut rates = Vec::new();
    for _ in 0..reps {
        let done = engine
            .generate(bench_request(prompt.clone(), 1))?
            .collect()
            .await?;
        let t = done.finished.context("no finish event")?.timings;
        rates.push(t.prefill_tokens as f64 / t.prefill.as_secs_f64());
    }
    Ok(rates.iter().sum::<f64>() / rates.len() as f64)
}

pub(crate) async fn measure_decode_1(
    engine: &Engine,
    n_gen: u32,
    reps: u32,
) -> anyhow::Result<f64> {
    let prompt = engine.tokenize("Once upon a time", true);
    let mut rates = Vec::new();
    for _ in 0..reps {
        let done = engine
            .generate(bench_request(prompt.clone(), n_gen))?
            .collect()
            .await?;
        let f = done.finished.context("no finish event")?;
        // Tokens after the first were each one decode call.
        rates.push((f.completion_tokens - 1) as f64 / f.timings.decode.as_secs_f64());
    }
    Ok(rates.iter().sum::<f64>() / rates.len() as f64)
}

/// `streams` concurrent generations of `n_gen` tokens; aggregate tokens per wall second.
pub(crate) async fn measure_streams(
    engine: &Engine,
    prompt: &[i32],
    streams: usize,
    n_gen: u32,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..streams {
        let mut s = engine.generate(bench_request(prompt.to_vec(), n_gen))?;
        handles.push(tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(ev) = s.next().await {
                match ev {
                    GenerationEvent::Token(_) => n += 1,
                    GenerationEvent::Finished(_) => break,
                    GenerationEvent::Failed(m) => return Err(anyhow::anyhow!(m)),
                }
            }
            Ok(n)
        }));
    }
    let mut tokens = 0;
    for h in handles {
        tokens += h.await??;
    }
    Ok(tokens as f64 / start.elapsed().as_secs_f64())
}

fn print_table(r: &EngineBenchReport) {
    println!("model {}  threads {}", r.model, r.threads);
    println!(
        "ours: {}   reference: llama.cpp {} (llama-cpp-python {})",
        r.engine_llama_cpp, r.reference_llama_cpp, r.reference_llama_cpp_python
    );
    println!(
        "{:<34} {:>10} {:>10} {:>7}",
        "", "ours", "llama.cpp", "ratio"
    );
    let row = |name: &str, ours: f64, reference: f64| {
        println!(
            "{name:<34} {ours:>10.1} {reference:>10.1} {:>7.3}",
            ours / reference
        )
    };
    row("prefill tok/s (pp512)", r.prefill_tps, r.ref_prefill_tps);
    row(
        "decode tok/s, 1 stream (tg128)",
        r.decode_tps_1,
        r.ref_decode_tps_1,
    );
    row(
        "1 stream, wall (server)",
        r.stream_tps_1,
        r.ref_stream_tps_1,
    );
    row(
        "8 streams aggregate (server)",
        r.decode_tps_8,
        r.ref_decode_tps_8,
    );
    println!(
        "batch speedup 8 vs 1: ours {:.2}x, llama-server {:.2}x",
        r.batch_speedup_8, r.ref_batch_speedup_8
    );
}
