//! Job execution in the simulator: queueing, dispatch through the driver, running on a vehicle,
//! completion, eviction with continuation, and the end-of-run accounting.
//!
//! Execution model: a job on a vehicle decodes at the class's per-stream speed
//! (`decode_tps_batched / slots`, what the scheduler plans with), after one round trip and the
//! prefill of its remaining prompts plus already generated tokens. A batch "shard" is `shard`
//! requests run back to back on one slot. On eviction the coordinator keeps every acknowledged
//! token; a graceful hand-back loses only the tokens in flight (one RTT), an abrupt one (link
//! outage, unannounced departure) loses everything since the last acknowledged checkpoint.

use tokenfleet_scheduler::hint::prefetch;
use tokenfleet_scheduler::{JobClass, JobId, Millis, QueuedJob, RejectReason};

use crate::engine::{Ev, Sim, SWEEP_MS};

pub struct Job {
    pub class: JobClass,
    pub model: u16,
    pub sensitive: bool,
    pub shard: u32,
    /// Per request.
    pub prompt: u32,
    pub max_per_req: u32,
    pub generated: u32,
    pub deadline: Option<Millis>,
    pub arrived: Millis,
    pub enqueued: Millis,
    pub residency: Option<std::sync::Arc<[String]>>,
    pub node: Option<u32>,
    pub attempt: u32,
    /// When decoding starts on the current node.
    pub decode_from: Millis,
    pub rate: f32,
    pub rtt_ms: f32,
    pub ttft_done: bool,
    /// Interactive: the first TTFT met the SLO and no departure has cut the answer since.
    pub slo_ok: bool,
    /// Interactive: when a departure (or outage, SoC floor) cut the answer being streamed.
    pub cut_at: Option<Millis>,
    pub finished: bool,
    /// Run id of the current placement (matches its `JobDone` event).
    pub run: u32,
    /// Waiting in `pending_int` (interactive jobs leave it lazily, see `dispatch`).
    pub queued: bool,
}

impl Job {
    pub fn max_total(&self) -> u32 {
        self.max_per_req.saturating_mul(self.shard)
    }

    /// Prompt tokens still to process, including re-prefill of a partial request.
    pub fn prefill_tokens(&self) -> u32 {
        let m = self.max_per_req.max(1);
        let done_reqs = self.generated / m;
        let partial = self.generated % m;
        (self.shard.saturating_sub(done_reqs)) * self.prompt + partial
    }
}

/// Bytes per token on the wire (text or token ids: about 4 either way).
const WIRE_BYTES_PER_TOKEN: f64 = 4.0;

/// Time to send `tokens` over a link of `mbps` megabits per second, ms (0 for a link without a
/// stated bandwidth).
fn transfer_ms(tokens: u32, mbps: f32) -> u64 {
    if mbps <= 0.0 {
        return 0;
    }
    (tokens as f64 * WIRE_BYTES_PER_TOKEN * 8.0 / (mbps as f64 * 1000.0)).ceil() as u64
}

/// `dst = src`, reusing `dst`'s strings.
fn clone_into_vec(src: &[String], dst: &mut Vec<String>) {
    dst.truncate(src.len());
    let common = dst.len();
    for (d, s) in dst.iter_mut().zip(src) {
        d.clone_from(s);
    }
    dst.extend(src[common..].iter().cloned());
}

impl Sim<'_> {
    pub fn enqueue(&mut self, r: crate::workload::TraceRequest) {
        let model = match self.model_ids.iter().position(|m| **m == *r.model) {
            Some(i) => i,
            None => {
                self.model_ids.push(r.model.to_string());
                self.model_ids.len() - 1
            }
        };
        let job = Job {
            class: r.class,
            model: model as u16,
            sensitive: r.sensitive,
            shard: r.shard.max(1),
            prompt: r.prompt_tokens,
            max_per_req: r.max_tokens.max(1),
            generated: 0,
            deadline: r.deadline_ms,
            arrived: self.now,
            enqueued: self.now,
            residency: r.residency,
            node: None,
            attempt: 0,
            decode_from: 0,
            rate: 0.0,
            rtt_ms: 0.0,
            ttft_done: false,
            slo_ok: false,
            cut_at: None,
            finished: false,
            run: 0,
            queued: true,
        };
        let id = match self.free_jobs.pop() {
            Some(id) => {
                self.jobs[id as usize] = job;
                id
            }
            None => {
                self.jobs.push(job);
                (self.jobs.len() - 1) as u32
            }
        };
        match r.class {
            JobClass::Interactive => {
                self.m.int_jobs += 1;
                self.pending_int.push_back(id);
            }
            JobClass::Batch => {
                self.m.batch_jobs += 1;
                if r.deadline_ms.is_some_and(|d| d <= self.t_end) {
                    self.m.batch_due += 1;
                }
                self.pending_batch
                    .insert((r.deadline_ms.unwrap_or(Millis::MAX), self.now, id));
            }
        }
        self.want_dispatch();
    }

    /// Write job `j` into `q`, reusing `q`'s string and vector allocations (`clone_from`): a
    /// busy day offers ~10^8 jobs to the scheduler, and a fresh `QueuedJob` costs three
    /// allocations.
    fn fill_queued(&self, j: u32, q: &mut QueuedJob) {
        let job = &self.jobs[j as usize];
        q.id = JobId(j as u64);
        q.class = job.class;
        q.model.clone_from(&self.model_ids[job.model as usize]);
        q.prompt_tokens = job.prefill_tokens();
        q.max_tokens = job.max_total();
        q.generated_tokens = job.generated;
        q.deadline = job.deadline;
        match (&job.residency, &mut q.residency) {
            (None, r) => *r = None,
            (Some(src), Some(dst)) => clone_into_vec(src, dst),
            (Some(src), r) => *r = Some(src.to_vec()),
        }
        if q.tenant != "sim" {
            q.tenant.clear();
            q.tenant.push_str("sim");
        }
        q.sensitive = job.sensitive;
        q.enqueued_at = job.enqueued;
        q.running_on = None;
    }

    /// Fill the reusable queue buffer with `ids` (in order); returns how many it holds.
    fn build_queue(&mut self, ids: &[u32]) -> usize {
        let mut buf = std::mem::take(&mut self.queue_buf);
        let mut n = 0;
        for &j in ids {
            if n == buf.len() {
                buf.push(QueuedJob {
                    id: JobId(0),
                    class: JobClass::Batch,
                    model: String::new(),
                    prompt_tokens: 0,
                    max_tokens: 0,
                    generated_tokens: 0,
                    deadline: None,
                    residency: None,
                    tenant: String::new(),
                    sensitive: false,
                    enqueued_at: 0,
                    running_on: None,
                });
            }
            self.fill_queued(j, &mut buf[n]);
            n += 1;
        }
        self.queue_buf = buf;
        n
    }

    /// `sweep`: the periodic pass that offers a large batch window (declined jobs get retried).
    pub fn dispatch(&mut self, sweep: bool) {
        if sweep {
            self.sweep_at = None;
        } else {
            self.dispatch_at = None;
        }
        if self.pending_int.is_empty() && self.pending_batch.is_empty() {
            return;
        }
        let sweep = sweep || self.now >= self.last_sweep + SWEEP_MS;
        let window = if sweep {
            self.last_sweep = self.now;
            8192
        } else {
            (self.freed + 64).min(65_536)
        };
        self.freed = 0;
        let mut ids = std::mem::take(&mut self.ids_buf);
        ids.clear();
        ids.extend(self.pending_int.iter().copied());
        let head = ids.len();
        ids.extend(self.pending_batch.iter().take(window).map(|&(_, _, j)| j));
        if ids.len() > head {
            // Resumed jobs beyond the head (they were requeued behind fresh jobs due at the
            // same time).
            let last = ids[ids.len() - 1];
            let job = &self.jobs[last as usize];
            let last_key = (job.deadline.unwrap_or(Millis::MAX), job.enqueued, last);
            ids.extend(
                self.pending_resumed
                    .range((
                        std::ops::Bound::Excluded(last_key),
                        std::ops::Bound::Unbounded,
                    ))
                    .take(window)
                    .map(|&(_, _, j)| j),
            );
        }
        let n = self.build_queue(&ids);
        self.ids_buf = ids;
        self.m.scheduler_calls += 1;
        let d = self.driver.decide(self.now, &self.queue_buf[..n]);
        // Start loading every placed job's record and vehicle before working through them.
        for a in &d.assignments {
            if let Some(job) = self.jobs.get(a.job.0 as usize) {
                prefetch(job);
            }
            if let Some(veh) = self.vehicles.get(a.node.0 as usize) {
                prefetch(veh);
            }
        }
        let mut touched = std::mem::take(&mut self.touched_buf);
        touched.clear();
        for p in &d.preemptions {
            let j = p.job.0 as u32;
            if let Some(v) = self.jobs.get(j as usize).and_then(|job| job.node) {
                self.settle(v);
                self.evict(j, true);
                self.m.preemptions += 1;
                touched.push(v);
            }
        }
        for a in &d.assignments {
            let j = a.job.0 as u32;
            let v = a.node.0 as u32;
            self.unqueue(j);
            self.start(j, v);
            touched.push(v);
        }
        for r in &d.rejections {
            let j = r.job.0 as u32;
            self.unqueue(j);
            self.reject(j, r.reason);
        }
        let jobs = &self.jobs;
        self.pending_int.retain(|&j| jobs[j as usize].queued);
        touched.sort_unstable();
        touched.dedup();
        for &v in &touched {
            self.schedule_check(v);
            self.upsert(v);
        }
        self.touched_buf = touched;
        // Still waiting: look again soon (interactive) or on the next sweep (batch).
        if !self.pending_int.is_empty() {
            self.want_dispatch();
        }
        if !self.pending_batch.is_empty() && self.sweep_at.is_none() {
            let at = self.last_sweep + SWEEP_MS;
            self.sweep_at = Some(at);
            self.push(at, Ev::Sweep);
        }
    }

    fn unqueue(&mut self, j: u32) {
        let job = &self.jobs[j as usize];
        match job.class {
            // Removed from `pending_int` in one pass after the decisions (a job refused or left
            // waiting ahead of many placed ones made a per-job search quadratic).
            JobClass::Interactive => self.jobs[j as usize].queued = false,
            JobClass::Batch => {
                let key = (job.deadline.unwrap_or(Millis::MAX), job.enqueued, j);
                self.pending_batch.remove(&key);
                self.pending_resumed.remove(&key);
            }
        }
    }

    fn requeue(&mut self, j: u32) {
        let now = self.now;
        let job = &mut self.jobs[j as usize];
        job.node = None;
        job.enqueued = now;
        job.queued = true;
        match job.class {
            JobClass::Interactive => self.pending_int.push_back(j),
            JobClass::Batch => {
                let key = (job.deadline.unwrap_or(Millis::MAX), now, j);
                self.pending_batch.insert(key);
                if job.generated > 0 {
                    self.pending_resumed.insert(key);
                }
            }
        }
        self.want_dispatch();
    }

    fn start(&mut self, j: u32, v: u32) {
        self.settle(v);
        let now = self.now;
        let sc = self.sc;
        let veh = &mut self.vehicles[v as usize];
        let class = &sc.classes[veh.class as usize];
        veh.busy += 1;
        veh.running
            .push((j, self.jobs[j as usize].class == JobClass::Batch));
        self.slots_busy += 1;
        let rtt = veh.rtt_ms;
        let job = &mut self.jobs[j as usize];
        let rate = class.stream_tps();
        let first_prefill = if job.generated > 0 {
            job.prompt + job.generated % job.max_per_req.max(1)
        } else {
            job.prompt
        };
        if job.attempt > 0 && job.generated % job.max_per_req.max(1) > 0 {
            // A resume re-prefills the prompt and the partial answer: slot time spent again,
            // counted as waste in decode-token equivalents of that time.
            self.m.reprefill += first_prefill as u64;
            let equiv =
                (first_prefill as f64 * rate as f64 / class.prefill_tps as f64).ceil() as u64;
            self.m.wasted += equiv;
            self.m.waste.reprefill += equiv;
        }
        let prefill_ms = |tokens: u32| (tokens as f64 / class.prefill_tps as f64 * 1000.0) as u64;
        // The job's input (prompts, and on a resume the tokens already generated) goes to the
        // vehicle over its link before the prefill starts.
        let prefill_total = job.prefill_tokens();
        let upload_ms = transfer_ms(prefill_total, sc.link.bandwidth_mbps);
        job.attempt += 1;
        self.next_run = self.next_run.wrapping_add(1);
        job.run = self.next_run;
        job.node = Some(v);
        job.rate = rate;
        job.rtt_ms = rtt;
        job.decode_from = now + rtt as u64 + upload_ms + prefill_ms(first_prefill);
        if !job.ttft_done && job.class == JobClass::Interactive {
            job.ttft_done = true;
            let ttft = job.decode_from - job.arrived;
            self.m.ttft_ms.push(ttft.min(u32::MAX as u64) as u32);
            if ttft <= sc.workload.ttft_slo_ms {
                self.m.int_slo_ok += 1;
                job.slo_ok = true;
            }
        } else if let Some(cut) = job.cut_at.take() {
            // The user waits a second time for the answer to continue.
            let ttft = job.decode_from - cut;
            self.m.ttft_ms.push(ttft.min(u32::MAX as u64) as u32);
        }
        let remaining_tokens = job.max_total().saturating_sub(job.generated);
        let other_prefill = prefill_total.saturating_sub(first_prefill);
        let done_at = job.decode_from
            + prefill_ms(other_prefill)
            + (remaining_tokens as f64 / rate as f64 * 1000.0) as u64;
        let run = job.run;
        self.push(done_at, Ev::JobDone(j, run));
    }

    fn release_slot(&mut self, j: u32, v: u32) {
        let veh = &mut self.vehicles[v as usize];
        veh.busy = veh.busy.saturating_sub(1);
        if let Some(pos) = veh.running.iter().position(|&(x, _)| x == j) {
            veh.running.swap_remove(pos);
        }
        self.slots_busy -= 1;
        if veh.eligible {
            self.freed += 1;
        }
    }

    fn credit(&mut self, j: u32, tokens: u64) {
        match self.jobs[j as usize].class {
            JobClass::Interactive => self.m.delivered_int += tokens,
            JobClass::Batch => self.m.delivered_batch += tokens,
        }
        self.m.tokens_in_bucket += tokens;
    }

    pub fn job_done(&mut self, j: u32, run: u32) {
        let job = &self.jobs[j as usize];
        if job.run != run || job.finished {
            return;
        }
        let Some(v) = job.node else { return };
        let remaining = job.max_total().saturating_sub(job.generated) as u64;
        let (class, deadline) = (job.class, job.deadline);
        self.settle(v);
        self.credit(j, remaining);
        let job = &mut self.jobs[j as usize];
        job.generated = job.max_total();
        job.finished = true;
        job.node = None;
        if class == JobClass::Batch {
            self.m.batch_completed += 1;
            if deadline.is_some_and(|d| self.now <= d && d <= self.t_end) {
                self.m.batch_on_time += 1;
            }
        }
        self.release_slot(j, v);
        self.free_jobs.push(j);
        self.schedule_check(v);
        self.upsert(v);
        self.want_dispatch();
    }

    /// Tokens produced so far by a running job on its current node (bounded by what is left).
    fn produced(&self, j: u32) -> u64 {
        let job = &self.jobs[j as usize];
        let left = job.max_total().saturating_sub(job.generated) as u64;
        if self.now <= job.decode_from {
            return 0;
        }
        (((self.now - job.decode_from) as f64 / 1000.0 * job.rate as f64) as u64).min(left)
    }

    /// Take job `j` off its node; keep acknowledged tokens, count the rest as wasted, requeue.
    pub fn evict(&mut self, j: u32, graceful: bool) {
        let Some(v) = self.jobs[j as usize].node else {
            return;
        };
        let produced = self.produced(j);
        let job = &self.jobs[j as usize];
        let lost = if graceful {
            ((job.rate as f64 * job.rtt_ms as f64 / 1000.0).ceil() as u64).min(produced)
        } else {
            let ack = match job.class {
                JobClass::Interactive => self.sc.link.ack_interval_s_interactive,
                JobClass::Batch => self.sc.link.ack_interval_s_batch,
            };
            let chunk = ((job.rate as f64 * ack).ceil() as u64).max(1);
            produced % chunk
        };
        let acked = produced - lost;
        let now = self.now;
        let job = &mut self.jobs[j as usize];
        if job.class == JobClass::Interactive && job.ttft_done {
            // A cut answer stalls for at least a round trip, the queue wait and the re-prefill,
            // and the user sees a second TTFT: the request no longer meets its SLO.
            job.cut_at = Some(now);
            self.m.int_cut += 1;
            if std::mem::take(&mut job.slo_ok) {
                self.m.int_slo_ok -= 1;
            }
        }
        self.credit(j, acked);
        self.m.wasted += lost;
        self.m.waste.lost_on_eviction += lost;
        self.m.evictions += 1;
        self.jobs[j as usize].generated += acked as u32;
        self.release_slot(j, v);
        self.requeue(j);
    }

    pub fn evict_all(&mut self, v: u32, graceful: bool) {
        if !self.live {
            return;
        }
        let running = std::mem::take(&mut self.vehicles[v as usize].running);
        self.vehicles[v as usize].running = running.clone();
        for (j, _) in running {
            self.evict(j, graceful);
        }
    }

    fn reject(&mut self, j: u32, reason: RejectReason) {
        self.free_jobs.push(j);
        let job = &mut self.jobs[j as usize];
        job.finished = true;
        // Tokens already delivered for a request that is then refused are wasted after all. A
        // batch shard's requests are independent: the finished ones are returned (as a batch
        // API returns the completed part of an expired batch); only the partial one is lost.
        let class = job.class;
        let partial = match class {
            JobClass::Interactive => job.generated,
            JobClass::Batch => job.generated % job.max_per_req.max(1),
        } as u64;
        match class {
            JobClass::Interactive => {
                self.m.int_rejected += 1;
                self.m.delivered_int -= partial.min(self.m.delivered_int);
            }
            JobClass::Batch => {
                self.m.batch_rejected += 1;
                self.m.delivered_batch -= partial.min(self.m.delivered_batch);
            }
        }
        self.m.wasted += partial;
        self.m.waste.refused_partial += partial;
        let key = serde_json::to_value(reason)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_else(|| format!("{reason:?}"));
        *self.m.rejections.entry(key).or_default() += 1;
    }

    /// End of the measurement window: settle energy, credit acknowledged progress of running
    /// jobs (they would continue), close the books.
    pub fn finish(&mut self) {
        for v in 0..self.vehicles.len() as u32 {
            self.settle(v);
        }
        let running: Vec<u32> = self
            .vehicles
            .iter()
            .flat_map(|veh| veh.running.iter().map(|&(j, _)| j))
            .collect();
        for j in running {
            let produced = self.produced(j);
            let job = &self.jobs[j as usize];
            let chunk =
                ((job.rate as f64 * self.sc.link.ack_interval_s_batch).ceil() as u64).max(1);
            let acked = produced - produced % chunk;
            self.credit(j, acked);
        }
    }
}
