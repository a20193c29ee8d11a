//! The real engine under a synthetic workload, measured once per budget level: every slot
//! busy with sampled generations that always run to `max_tokens`, the budget applied with
//! [`Engine::set_limits`], the engine's own token and step counters read over a whole number
//! of decode steps.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokenfleet_engine::{Engine, GenerationEvent, GenerationRequest, Limits, SamplingParams};
use tokenfleet_vehicle::ComputeBudget;

use super::{ReplayError, ReplayOptions};
use crate::vehicle::engine_limits;

/// The engine measured at one budget level.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    /// Utilization of the level (rounded down from the governor's).
    pub utilization: f64,
    pub max_active: u32,
    pub duty_cycle: f32,
    /// Measured decode speed: tokens / measured_s.
    pub tokens_per_s: f64,
    /// Real time measured, and the tokens and decode steps the engine counted in it.
    pub measured_s: f64,
    pub tokens: u64,
    pub steps: u64,
    /// Virtual time computed at this level during the replay.
    pub virtual_s: f64,
}

impl Calibration {
    /// Real time per decode step, duty-cycle pauses included: the bound on handing jobs back.
    pub fn step_time(&self) -> Duration {
        Duration::from_secs_f64(self.measured_s / self.steps.max(1) as f64)
    }
}

/// Decode steps a measurement spans at least, however long the calibration time.
const MIN_STEPS: u64 = 8;
/// How long a measurement may overrun the calibration time before the engine is deemed stuck.
const PATIENCE: Duration = Duration::from_secs(120);

const PROMPTS: [&str; 4] = [
    "Explain how an electric car's battery management system protects the cells.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List the steps to make bread at home, with a sentence about each step.",
    "Describe the water cycle to a ten-year-old, with examples from everyday life.",
];

/// The real engine under a synthetic workload, measured once per budget level.
pub(super) struct Bench<'e> {
    engine: &'e Engine,
    requests: Vec<GenerationRequest>,
    calibration: Duration,
    warmup: Duration,
    /// Level → measurement.
    pub(super) done: BTreeMap<u32, Calibration>,
}

impl<'e> Bench<'e> {
    pub(super) fn new(engine: &'e Engine, opts: &ReplayOptions) -> Result<Self, ReplayError> {
        let prompts: Vec<Vec<i32>> = PROMPTS.iter().map(|p| engine.tokenize(p, true)).collect();
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) as u32;
        let ctx = engine.info().ctx_per_slot;
        let needed = longest + 32;
        if ctx < needed {
            return Err(ReplayError::Context { ctx, needed });
        }
        let max_tokens = (ctx - longest).min(256);
        let requests = prompts
            .into_iter()
            .enumerate()
            .map(|(i, prompt)| GenerationRequest {
                sampling: SamplingParams {
                    temperature: 0.7,
                    top_p: 0.95,
                    top_k: 0,
                    seed: i as u64,
                },
                // Exact token counts: a request always runs to max_tokens.
                ignore_eos: true,
                ..GenerationRequest::greedy(prompt, max_tokens)
            })
            .collect();
        Ok(Bench {
            engine,
            requests,
            calibration: opts.calibration,
            warmup: opts.warmup,
            done: BTreeMap::new(),
        })
    }

    /// Measures the engine at `level` unless it already has been.
    pub(super) async fn ensure(
        &mut self,
        level: u32,
        budget: &ComputeBudget,
    ) -> Result<(), ReplayError> {
        if !self.done.contains_key(&level) {
            let c = self.measure(budget).await?;
            tracing::info!(
                utilization = c.utilization,
                max_active = c.max_active,
                tokens_per_s = c.tokens_per_s,
                "engine calibrated"
            );
            self.done.insert(level, c);
        }
        Ok(())
    }

    async fn measure(&self, budget: &ComputeBudget) -> Result<Calibration, ReplayError> {
        let limits: Limits = engine_limits(budget);
        self.engine.set_limits(limits)?;
        let mut workload = tokio::task::JoinSet::new();
        for i in 0..self.engine.info().slots as usize {
            let engine = self.engine.clone();
            let request = self.requests[i % self.requests.len()].clone();
            workload.spawn(async move {
                // Resubmit as each request finishes, so every slot stays busy.
                while let Ok(mut stream) = engine.generate(request.clone()) {
                    while let Some(GenerationEvent::Token(_)) = stream.next().await {}
                }
            });
        }
        tokio::time::sleep(self.warmup).await;
        let mut stats = self.engine.watch_stats();
        let patience = self.calibration + PATIENCE;
        let measured = async {
            // Both ends on a step boundary (the engine publishes after each decode step), so a
            // whole number of steps, duty-cycle pauses included, is measured.
            stats.mark_unchanged();
            stats.changed().await.ok()?;
            let (t0, s0) = (Instant::now(), stats.borrow_and_update().clone());
            tokio::time::sleep(self.calibration).await;
            stats.mark_unchanged();
            loop {
                // On a loaded machine a step can take long: measure at least MIN_STEPS.
                stats.changed().await.ok()?;
                let (t1, s1) = (Instant::now(), stats.borrow_and_update().clone());
                let steps = s1.steps.saturating_sub(s0.steps);
                if steps >= MIN_STEPS {
                    let tokens = s1.tokens_generated.saturating_sub(s0.tokens_generated);
                    return Some((t1 - t0, tokens, steps));
                }
            }
        };
        let result = tokio::time::timeout(patience, measured)
            .await
            .ok()
            .flatten();
        // Dropping the streams cancels the workload; the engine frees the slots at once.
        workload.shutdown().await;
        let (elapsed, tokens, steps) = match result {
            Some(m) if m.1 > 0 => m,
            _ => {
                return Err(ReplayError::NoTokens {
                    max_active: limits.max_active,
                    duty_cycle: limits.duty_cycle,
                })
            }
        };
        Ok(Calibration {
            utilization: budget.utilization,
            max_active: limits.max_active.min(self.engine.info().slots),
            duty_cycle: limits.duty_cycle,
            tokens_per_s: tokens as f64 / elapsed.as_secs_f64(),
            measured_s: elapsed.as_secs_f64(),
            tokens,
            steps,
            virtual_s: 0.0,
        })
    }
}
