//! Where a partition's work comes from: generated interactive arrivals, the scenario's batch
//! dumps, or a workload trace. Hands each request over as a [`TraceRequest`] and schedules the
//! next arrival event.
//!
//! Owns: [`Arrivals`] (the interactive generator, the trace and its cursor, the model the
//! partition serves).
//! May import: `event`, `window`, `scenario`, `workload`, `vehicle_model`.

use std::sync::Arc;

use tokenfleet_scheduler::{JobClass, Millis};

use crate::event::{Ev, Events};
use crate::scenario::Scenario;
use crate::vehicle_model::{DAY, HOUR};
use crate::window::Window;
use crate::workload::{InteractiveGen, TraceRequest};

pub(crate) struct Arrivals {
    inter: InteractiveGen,
    /// The next generated interactive request (its `Interactive` event is in the queue).
    next_interactive: Option<TraceRequest>,
    /// This partition's requests of a workload trace (relative times, sorted).
    trace: Vec<TraceRequest>,
    trace_pos: usize,
    /// The run's workload is a trace (this partition's part of it may be empty).
    from_trace: bool,
    /// The model this partition serves (`None`: all).
    model: Option<String>,
}

impl Arrivals {
    /// A partition's arrivals: interactive ones at `peak_rps` (for `model`, or drawn by the
    /// workload's model shares), its model's batch dumps, or its part of a trace.
    pub fn new(
        sc: &Scenario,
        seed: u64,
        peak_rps: f64,
        model: Option<String>,
        trace: Vec<TraceRequest>,
        from_trace: bool,
    ) -> Self {
        Self {
            inter: InteractiveGen::new(sc, seed, peak_rps, model.as_deref()),
            next_interactive: None,
            trace,
            trace_pos: 0,
            from_trace,
            model,
        }
    }

    /// Start of measurement: schedule the first interactive arrival and every batch dump in the
    /// window, or the trace's first request.
    pub fn begin(&mut self, sc: &Scenario, w: &Window, now: Millis, events: &mut Events) {
        if !self.from_trace {
            self.schedule_interactive(sc, w, now, events);
            let days = ((w.t_end - w.t_start) as f64 / DAY as f64).ceil() as u32 + 1;
            for (i, d) in sc.workload.batch.iter().enumerate() {
                for day in 0..days {
                    let t = w.clock.at(w.t_start, day as u64, d.at_hour);
                    if (w.t_start..w.t_end).contains(&t) {
                        events.push(t, Ev::Dump(i as u32, day));
                    }
                }
            }
        } else if let Some(r) = self.trace.first() {
            events.push(w.t_start + r.t_ms, Ev::TraceNext);
        }
    }

    /// Draw the next interactive arrival after `now` and schedule it.
    pub fn schedule_interactive(
        &mut self,
        sc: &Scenario,
        w: &Window,
        now: Millis,
        events: &mut Events,
    ) {
        let clock_t0 = w.clock.t0;
        let next = self.inter.next(sc, now.max(w.t_start), w.t_end, |t| {
            ((t.saturating_sub(clock_t0) % DAY) / HOUR) as usize
        });
        if let Some(r) = next {
            events.push(r.t_ms, Ev::Interactive);
            self.next_interactive = Some(r);
        }
    }

    /// The interactive request whose `Interactive` event is due.
    pub fn take_interactive(&mut self) -> Option<TraceRequest> {
        self.next_interactive.take()
    }

    /// The next trace request due at `now` (absolute times), if any.
    pub fn next_from_trace(&mut self, w: &Window, now: Millis) -> Option<TraceRequest> {
        let r = self.trace.get(self.trace_pos)?;
        if w.t_start + r.t_ms > now {
            return None;
        }
        let mut r = r.clone();
        r.t_ms += w.t_start;
        r.deadline_ms = r.deadline_ms.map(|d| d + w.t_start);
        self.trace_pos += 1;
        Some(r)
    }

    /// Schedule the trace's next request, if any.
    pub fn schedule_trace(&self, w: &Window, events: &mut Events) {
        if let Some(r) = self.trace.get(self.trace_pos) {
            events.push(w.t_start + r.t_ms, Ev::TraceNext);
        }
    }

    /// Batch dump `d` at `now`: its shards as requests, or nothing if the dump is for another
    /// partition's model or a weekday-only dump falls on a weekend.
    pub fn dump<'s>(
        &self,
        sc: &'s Scenario,
        d: usize,
        w: &Window,
        now: Millis,
    ) -> impl Iterator<Item = TraceRequest> + 's {
        let dump = &sc.workload.batch[d];
        let skip = self.model.as_ref().is_some_and(|m| *m != dump.model)
            || (dump.weekdays_only && w.clock.weekday(now) >= 5);
        let shard = dump.shard.max(1) as u64;
        let n_jobs = if skip {
            0
        } else {
            dump.requests.div_ceil(shard)
        };
        let model: Arc<str> = dump.model.as_str().into();
        let residency: Option<Arc<[String]>> = dump.residency.as_deref().map(Into::into);
        (0..n_jobs).map(move |i| {
            let reqs = shard.min(dump.requests - i * shard) as u32;
            TraceRequest {
                t_ms: now,
                class: JobClass::Batch,
                model: Arc::clone(&model),
                prompt_tokens: dump.prompt_tokens,
                max_tokens: dump.max_tokens,
                deadline_ms: dump.deadline_hours.map(|h| now + (h * HOUR as f64) as u64),
                residency: residency.clone(),
                sensitive: false,
                shard: reqs,
            }
        })
    }
}
