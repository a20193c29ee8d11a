//! `llama-bench`: runs it and reads prefill and decode speed from its JSON output.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::process::run_bounded;
use super::tail;
use super::tools::RefTools;

/// Generous for small models; a llama-bench run that takes longer is treated as hung.
const LLAMA_BENCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Prefill and decode speed as llama-bench reports them (mean over its repetitions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlamaBenchResult {
    pub prefill_tps: f64,
    pub decode_tps: f64,
}

/// Runs `llama-bench -m model -t threads -p n_prompt -n n_gen -r reps -o json` and takes
/// `avg_ts` of its prompt-processing (pp) and text-generation (tg) rows. A zero `n_prompt` or
/// `n_gen` skips that test in llama-bench and reports 0 for it here. Blocking.
pub fn run_llama_bench(
    tools: &RefTools,
    model: &Path,
    threads: u32,
    n_prompt: u32,
    n_gen: u32,
    reps: u32,
) -> Result<LlamaBenchResult> {
    if n_prompt == 0 && n_gen == 0 {
        bail!("llama-bench needs n_prompt or n_gen above 0");
    }
    let mut cmd = Command::new(&tools.llama_bench);
    cmd.arg("-m")
        .arg(model)
        .args(["-t", &threads.to_string()])
        .args(["-p", &n_prompt.to_string()])
        .args(["-n", &n_gen.to_string()])
        .args(["-r", &reps.max(1).to_string()])
        .args(["-o", "json"])
        .stdin(Stdio::null());
    let what = format!(
        "{} -m {} -t {threads} -p {n_prompt} -n {n_gen} -r {} -o json",
        tools.llama_bench.display(),
        model.display(),
        reps.max(1)
    );
    let out = run_bounded(cmd, &what, LLAMA_BENCH_TIMEOUT, true)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            tail(&out.stderr, 2000)
        );
    }
    parse_llama_bench_json(&out.stdout, n_prompt, n_gen)
        .with_context(|| format!("parsing the output of {what}"))
}

/// Finds the pp row (`n_prompt > 0, n_gen == 0`) and the tg row (`n_prompt == 0, n_gen > 0`)
/// of llama-bench's JSON array, both at KV depth 0 (`n_depth`, the default). Anything printed
/// around the array is skipped.
fn parse_llama_bench_json(stdout: &str, n_prompt: u32, n_gen: u32) -> Result<LlamaBenchResult> {
    let start = stdout
        .find('[')
        .ok_or_else(|| anyhow!("no JSON array in llama-bench output"))?;
    let end = stdout
        .rfind(']')
        .ok_or_else(|| anyhow!("unterminated JSON array in llama-bench output"))?;
    if end < start {
        bail!("no JSON array in llama-bench output");
    }
    let rows: Vec<Value> =
        serde_json::from_str(&stdout[start..=end]).context("llama-bench JSON")?;
    let find = |want_prompt: u64, want_gen: u64| -> Result<f64> {
        let row = rows
            .iter()
            .find(|r| {
                r.get("n_prompt").and_then(Value::as_u64) == Some(want_prompt)
                    && r.get("n_gen").and_then(Value::as_u64) == Some(want_gen)
                    && r.get("n_depth").and_then(Value::as_u64).unwrap_or(0) == 0
            })
            .ok_or_else(|| anyhow!("no row with n_prompt={want_prompt}, n_gen={want_gen}"))?;
        row.get("avg_ts").and_then(Value::as_f64).ok_or_else(|| {
            anyhow!("row n_prompt={want_prompt}, n_gen={want_gen} has no numeric avg_ts")
        })
    };
    Ok(LlamaBenchResult {
        prefill_tps: if n_prompt > 0 {
            find(n_prompt.into(), 0)?
        } else {
            0.0
        },
        decode_tps: if n_gen > 0 {
            find(0, n_gen.into())?
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from real `llama-bench -o json` output (llama-cpp-python 0.3.36's llama.cpp).
    const BENCH_JSON: &str = r#"[
  {
    "build_commit": "0c1e57098",
    "build_number": 0,
    "cpu_info": "AMD EPYC",
    "model_filename": "/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama ?B Q4_1",
    "n_threads": 2,
    "n_prompt": 512,
    "n_gen": 0,
    "avg_ns": 948000000,
    "stddev_ns": 3000000,
    "avg_ts": 540.123456,
    "stddev_ts": 1.5,
    "samples_ns": [ 945000000, 951000000 ],
    "samples_ts": [ 541.8, 538.4 ]
  },
  {
    "build_commit": "0c1e57098",
    "build_number": 0,
    "n_threads": 2,
    "n_prompt": 0,
    "n_gen": 128,
    "avg_ns": 720000000,
    "stddev_ns": 2000000,
    "avg_ts": 177.75,
    "stddev_ts": 0.5,
    "samples_ns": [ 719000000, 721000000 ],
    "samples_ts": [ 178.0, 177.5 ]
  }
]
"#;

    #[test]
    fn llama_bench_json_gives_pp_and_tg() {
        let r = parse_llama_bench_json(BENCH_JSON, 512, 128).unwrap();
        assert_eq!(r.prefill_tps, 540.123456);
        assert_eq!(r.decode_tps, 177.75);
    }

    #[test]
    fn llama_bench_json_tolerates_surrounding_text_and_skipped_tests() {
        let noisy = format!("some log line\n{BENCH_JSON}\n");
        let r = parse_llama_bench_json(&noisy, 0, 128).unwrap();
        assert_eq!(r.prefill_tps, 0.0);
        assert_eq!(r.decode_tps, 177.75);
    }

    #[test]
    fn llama_bench_json_missing_row_is_an_error() {
        let e = parse_llama_bench_json(BENCH_JSON, 256, 128).unwrap_err();
        assert!(e.to_string().contains("n_prompt=256"), "{e}");
        assert!(parse_llama_bench_json("no json here", 512, 128).is_err());
    }
}
