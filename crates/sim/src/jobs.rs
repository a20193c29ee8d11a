//! The job table: every job of a partition from arrival to its end, the queues they wait in, the
//! window of them offered to the scheduler, and the accounting of their tokens, time to first
//! token, SLOs, waste and refusals.
//!
//! Execution model: a job on a vehicle decodes at the class's per-stream speed
//! (`decode_tps_batched / slots`, what the scheduler plans with), after one round trip and the
//! prefill of its remaining prompts plus already generated tokens. A batch "shard" is `shard`
//! requests run back to back on one slot. On eviction the coordinator keeps every acknowledged
//! token; a graceful hand-back loses only the tokens in flight (one RTT), an abrupt one (link
//! outage, unannounced departure) loses everything since the last acknowledged checkpoint.
//!
//! Owns: [`JobTable`] and its `Job`s, the interactive and batch queues, the reusable buffers of
//! the offered queue, run ids and the model ids jobs are interned by.
//! May import: `metrics`, `compute`, `scenario`, `workload`. Vehicles are only ids here: this
//! module knows nothing of the fleet, the events or the scheduler driver.

use std::collections::{BTreeSet, VecDeque};

use tokenfleet_scheduler::hint::prefetch;
use tokenfleet_scheduler::{JobClass, JobId, Millis, QueuedJob, RejectReason};

use crate::compute::ComputeClass;
use crate::metrics::Metrics;
use crate::scenario::Scenario;
use crate::workload::TraceRequest;

struct Job {
    class: JobClass,
    model: u16,
    sensitive: bool,
    shard: u32,
    /// Per request.
    prompt: u32,
    max_per_req: u32,
    generated: u32,
    deadline: Option<Millis>,
    arrived: Millis,
    enqueued: Millis,
    residency: Option<std::sync::Arc<[String]>>,
    node: Option<u32>,
    attempt: u32,
    /// When decoding starts on the current node.
    decode_from: Millis,
    rate: f32,
    rtt_ms: f32,
    ttft_done: bool,
    /// Interactive: the first TTFT met the SLO and no departure has cut the answer since.
    slo_ok: bool,
    /// Interactive: when a departure (or outage, SoC floor) cut the answer being streamed.
    cut_at: Option<Millis>,
    finished: bool,
    /// Run id of the current placement (matches its `JobDone` event).
    run: u32,
    /// Waiting in `pending_int` (interactive jobs leave it lazily, see `prune_interactive`).
    queued: bool,
}

impl Job {
    fn max_total(&self) -> u32 {
        self.max_per_req.saturating_mul(self.shard)
    }

    /// Prompt tokens still to process, including re-prefill of a partial request.
    fn prefill_tokens(&self) -> u32 {
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

/// Key of a batch job in the batch queues: deadline (none last), enqueue time, id.
type BatchKey = (Millis, Millis, u32);

pub(crate) struct JobTable {
    jobs: Vec<Job>,
    /// Finished job slots for reuse (a million-vehicle day has ~10^8 requests).
    free: Vec<u32>,
    /// Run ids: every start of a job gets a fresh one, so a stale completion never matches.
    next_run: u32,
    /// Model names, indexed by `Job::model`.
    model_ids: Vec<String>,
    pending_int: VecDeque<u32>,
    pending_batch: BTreeSet<BatchKey>,
    /// The batch jobs of `pending_batch` that were evicted with acknowledged output (same keys).
    /// Every dispatch offers them besides the head of the queue: the coordinator hands the
    /// scheduler its whole queue, and the window is only the simulator's shortcut for it.
    pending_resumed: BTreeSet<BatchKey>,
    /// Reused between dispatches (no per-job allocation on the hot path).
    queue_buf: Vec<QueuedJob>,
    ids_buf: Vec<u32>,
}

impl JobTable {
    pub fn new(sc: &Scenario) -> Self {
        let mut model_ids: Vec<String> = sc.classes.iter().map(|c| c.model.clone()).collect();
        model_ids.dedup();
        Self {
            jobs: Vec::new(),
            free: Vec::new(),
            next_run: 0,
            model_ids,
            pending_int: VecDeque::new(),
            pending_batch: BTreeSet::new(),
            pending_resumed: BTreeSet::new(),
            queue_buf: Vec::new(),
            ids_buf: Vec::new(),
        }
    }

    /// A new job for request `r`, queued at `now`.
    pub fn enqueue(&mut self, r: TraceRequest, now: Millis, t_end: Millis, m: &mut Metrics) {
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
            arrived: now,
            enqueued: now,
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
        let id = match self.free.pop() {
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
                m.int_jobs += 1;
                self.pending_int.push_back(id);
            }
            JobClass::Batch => {
                m.batch_jobs += 1;
                if r.deadline_ms.is_some_and(|d| d <= t_end) {
                    m.batch_due += 1;
                }
                self.pending_batch
                    .insert((r.deadline_ms.unwrap_or(Millis::MAX), now, id));
            }
        }
    }

    /// Any job waiting.
    pub fn has_pending(&self) -> bool {
        !(self.pending_int.is_empty() && self.pending_batch.is_empty())
    }

    pub fn interactive_waiting(&self) -> bool {
        !self.pending_int.is_empty()
    }

    pub fn batch_waiting(&self) -> bool {
        !self.pending_batch.is_empty()
    }

    /// The queue offered to the scheduler: every waiting interactive job, the first `window`
    /// batch jobs and up to `window` resumed batch jobs beyond those.
    pub fn offer(&mut self, window: usize) -> &[QueuedJob] {
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
        &self.queue_buf[..n]
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

    /// The vehicle job `j` runs on, if any.
    pub fn node_of(&self, j: u32) -> Option<u32> {
        self.jobs.get(j as usize).and_then(|job| job.node)
    }

    /// Start loading job `j`'s record (a hint).
    pub fn prefetch(&self, j: usize) {
        if let Some(job) = self.jobs.get(j) {
            prefetch(job);
        }
    }

    pub fn is_batch(&self, j: u32) -> bool {
        self.jobs[j as usize].class == JobClass::Batch
    }

    /// Job `j` leaves its queue (placed or refused).
    pub fn unqueue(&mut self, j: u32) {
        let job = &self.jobs[j as usize];
        match job.class {
            // Removed from `pending_int` in one pass after the decisions (a job refused or left
            // waiting ahead of many placed ones made a per-job search quadratic), by
            // `prune_interactive`.
            JobClass::Interactive => self.jobs[j as usize].queued = false,
            JobClass::Batch => {
                let key = (job.deadline.unwrap_or(Millis::MAX), job.enqueued, j);
                self.pending_batch.remove(&key);
                self.pending_resumed.remove(&key);
            }
        }
    }

    /// Drop the interactive jobs `unqueue` took off the queue.
    pub fn prune_interactive(&mut self) {
        let jobs = &self.jobs;
        self.pending_int.retain(|&j| jobs[j as usize].queued);
    }

    /// Job `j`, off its vehicle, waits again from `now`.
    pub fn requeue(&mut self, j: u32, now: Millis) {
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
    }

    /// Job `j` starts at `now` on vehicle `v` of compute class `class` with round trip `rtt`
    /// ms: returns when it will be done and its run id (for its `JobDone` event).
    #[allow(
        clippy::too_many_arguments,
        reason = "one call site (`Sim::start`), passing its own state; a struct would only rename them"
    )]
    pub fn start(
        &mut self,
        sc: &Scenario,
        j: u32,
        v: u32,
        now: Millis,
        class: &ComputeClass,
        rtt: f32,
        m: &mut Metrics,
    ) -> (Millis, u32) {
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
            m.reprefill += first_prefill as u64;
            let equiv =
                (first_prefill as f64 * rate as f64 / class.prefill_tps as f64).ceil() as u64;
            m.wasted += equiv;
            m.waste.reprefill += equiv;
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
            m.ttft_ms.push(ttft.min(u32::MAX as u64) as u32);
            if ttft <= sc.workload.ttft_slo_ms {
                m.int_slo_ok += 1;
                job.slo_ok = true;
            }
        } else if let Some(cut) = job.cut_at.take() {
            // The user waits a second time for the answer to continue.
            let ttft = job.decode_from - cut;
            m.ttft_ms.push(ttft.min(u32::MAX as u64) as u32);
        }
        let remaining_tokens = job.max_total().saturating_sub(job.generated);
        let other_prefill = prefill_total.saturating_sub(first_prefill);
        let done_at = job.decode_from
            + prefill_ms(other_prefill)
            + (remaining_tokens as f64 / rate as f64 * 1000.0) as u64;
        (done_at, job.run)
    }

    /// The vehicle job `j` is running on in run `run`; `None` for a stale completion.
    pub fn running_on(&self, j: u32, run: u32) -> Option<u32> {
        let job = &self.jobs[j as usize];
        if job.run != run || job.finished {
            return None;
        }
        job.node
    }

    /// Job `j` is done at `now`: every token delivered, its slot in the table free again.
    pub fn complete(&mut self, j: u32, now: Millis, t_end: Millis, m: &mut Metrics) {
        let job = &self.jobs[j as usize];
        let remaining = job.max_total().saturating_sub(job.generated) as u64;
        let (class, deadline) = (job.class, job.deadline);
        self.credit(j, remaining, m);
        let job = &mut self.jobs[j as usize];
        job.generated = job.max_total();
        job.finished = true;
        job.node = None;
        if class == JobClass::Batch {
            m.batch_completed += 1;
            if deadline.is_some_and(|d| now <= d && d <= t_end) {
                m.batch_on_time += 1;
            }
        }
        self.free.push(j);
    }

    fn credit(&self, j: u32, tokens: u64, m: &mut Metrics) {
        match self.jobs[j as usize].class {
            JobClass::Interactive => m.delivered_int += tokens,
            JobClass::Batch => m.delivered_batch += tokens,
        }
        m.tokens_in_bucket += tokens;
    }

    /// Tokens produced so far by a running job on its current node (bounded by what is left).
    fn produced(&self, j: u32, now: Millis) -> u64 {
        let job = &self.jobs[j as usize];
        let left = job.max_total().saturating_sub(job.generated) as u64;
        if now <= job.decode_from {
            return 0;
        }
        (((now - job.decode_from) as f64 / 1000.0 * job.rate as f64) as u64).min(left)
    }

    /// Take job `j` off its node: keep acknowledged tokens, count the rest as wasted. Returns
    /// the vehicle it was on (`None`: it was not running); the caller frees the slot and
    /// requeues the job.
    pub fn evict(
        &mut self,
        sc: &Scenario,
        j: u32,
        graceful: bool,
        now: Millis,
        m: &mut Metrics,
    ) -> Option<u32> {
        let v = self.jobs[j as usize].node?;
        let produced = self.produced(j, now);
        let job = &self.jobs[j as usize];
        let lost = if graceful {
            ((job.rate as f64 * job.rtt_ms as f64 / 1000.0).ceil() as u64).min(produced)
        } else {
            let ack = match job.class {
                JobClass::Interactive => sc.link.ack_interval_s_interactive,
                JobClass::Batch => sc.link.ack_interval_s_batch,
            };
            let chunk = ((job.rate as f64 * ack).ceil() as u64).max(1);
            produced % chunk
        };
        let acked = produced - lost;
        let job = &mut self.jobs[j as usize];
        if job.class == JobClass::Interactive && job.ttft_done {
            // A cut answer stalls for at least a round trip, the queue wait and the re-prefill,
            // and the user sees a second TTFT: the request no longer meets its SLO.
            job.cut_at = Some(now);
            m.int_cut += 1;
            if std::mem::take(&mut job.slo_ok) {
                m.int_slo_ok -= 1;
            }
        }
        self.credit(j, acked, m);
        m.wasted += lost;
        m.waste.lost_on_eviction += lost;
        m.evictions += 1;
        self.jobs[j as usize].generated += acked as u32;
        Some(v)
    }

    /// The scheduler refused job `j`.
    pub fn reject(&mut self, j: u32, reason: RejectReason, m: &mut Metrics) {
        self.free.push(j);
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
                m.int_rejected += 1;
                m.delivered_int -= partial.min(m.delivered_int);
            }
            JobClass::Batch => {
                m.batch_rejected += 1;
                m.delivered_batch -= partial.min(m.delivered_batch);
            }
        }
        m.wasted += partial;
        m.waste.refused_partial += partial;
        let key = serde_json::to_value(reason)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_else(|| format!("{reason:?}"));
        *m.rejections.entry(key).or_default() += 1;
    }

    /// End of the measurement window: credit the acknowledged progress of running job `j` (it
    /// would continue).
    pub fn credit_at_end(&self, sc: &Scenario, j: u32, now: Millis, m: &mut Metrics) {
        let produced = self.produced(j, now);
        let job = &self.jobs[j as usize];
        let chunk = ((job.rate as f64 * sc.link.ack_interval_s_batch).ceil() as u64).max(1);
        let acked = produced - produced % chunk;
        self.credit(j, acked, m);
    }
}
