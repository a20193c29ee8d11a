//! `Scheduler`: the stateful-but-pure placement engine.
//!
//! Contract with the caller (coordinator dispatch loop or simulator):
//! - `upsert_node` whenever a node's view changes (governor state, slots freed, forecast);
//!   `remove_node` when its session ends.
//! - `decide(now, queue)` with the jobs waiting for a placement (jobs with `running_on` set are
//!   ignored). The scheduler applies its own assignments and preemptions to its node views
//!   (slots, `running_batch`) so a following `decide` sees them; the caller's next upsert
//!   overwrites them with the truth.
//! - The caller requeues preempted jobs (with their acknowledged tokens) itself.
//!
//! Cost: each job looks at most `sample_size` candidates from the (model, region) candidate sets
//! of the index; jobs of a (model, residency, sensitivity, class) that found no node are skipped
//! for the rest of the call. So `decide` is O(queue x sample_size), independent of fleet size.
//! `tokenfleet`/`oracle` interactive jobs of one group share their candidates within a call
//! (see `Pool`), so the index is read a few members per job instead of a fresh sample each.

mod pool;

use pool::Pool;

use crate::constraints::check_placement;
use crate::index::{FleetIndex, Kind, Member, SetKey, ANY_REGION};
use crate::policy::{PolicyKind, SchedulerConfig};
use crate::rng::SplitMix64;
use crate::trace::{NodeChange, Recorder, StepSink, TraceHeader};
use crate::types::{
    Assignment, Decisions, JobClass, Millis, NodeId, NodeView, PreemptReason, Preemption,
    QueuedJob, RejectReason, Rejection,
};

/// Placement and admission. See the module docs for the calling contract.
pub struct Scheduler {
    policy: PolicyKind,
    config: SchedulerConfig,
    seed: u64,
    rng: SplitMix64,
    index: FleetIndex,
    /// Fastest per-stream decode and prefill ever seen (for deadline admission).
    best_stream_tps: f32,
    best_prefill_tps: f32,
    /// Set by [`Scheduler::record_to`]: every input and decision goes to the caller's sink.
    recorder: Option<Recorder>,
}

/// Jobs sharing this key see the same candidate sets.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
struct MemoKey<'a> {
    model: &'a str,
    residency: Option<&'a [String]>,
    sensitive: bool,
    class: JobClass,
}

/// What the jobs of one [`MemoKey`] share during a `decide` call.
struct Group {
    /// Some registered node (in any state) holds the model inside the allowed regions.
    registered: bool,
    /// Candidate sets (ids in the index) with a free slot, and running preemptible batch work.
    free: Vec<u32>,
    preemptible: Vec<u32>,
    /// None = not tried yet; Some(None) = no candidate; Some(Some(t)) = declined at >= t ms.
    memo: Option<Option<u64>>,
    /// `tokenfleet`/`oracle` interactive jobs: the candidates the group's jobs share in this
    /// call (see [`Pool`]). Created by the group's first interactive job.
    pool: Option<Pool>,
}

enum Pick {
    Free(u32),
    Preempt(u32),
    /// Candidates exist but the policy prefers to wait (shortest run time that was refused).
    Declined(u64),
    Nothing,
}

impl Scheduler {
    pub fn new(policy: PolicyKind, seed: u64) -> Self {
        Self::with_config(policy, seed, SchedulerConfig::default())
    }

    pub fn with_config(policy: PolicyKind, seed: u64, config: SchedulerConfig) -> Self {
        Self {
            policy,
            config,
            seed,
            rng: SplitMix64::new(seed),
            index: FleetIndex::default(),
            best_stream_tps: 0.0,
            best_prefill_tps: 0.0,
            recorder: None,
        }
    }

    /// What a replay needs to build an identical scheduler.
    pub fn header(&self) -> TraceHeader {
        TraceHeader {
            policy: self.policy,
            seed: self.seed,
            config: self.config.clone(),
        }
    }

    /// Record every input (node upserts, updates and removals, the queue) and every decision:
    /// after each `decide`, `sink` gets a [`crate::TraceStep`] with the node changes since the
    /// previous one. Attach it before the first `upsert_node`, so that the steps together with
    /// [`Scheduler::header`] replay exactly ([`crate::replay`]). Recording copies each changed
    /// node view and the queue, so it is for tests and audits, not for a million-node fleet.
    pub fn record_to(&mut self, sink: StepSink) {
        self.recorder = Some(Recorder {
            sink,
            nodes: Vec::new(),
        });
    }

    pub fn policy(&self) -> PolicyKind {
        self.policy
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn node_count(&self) -> usize {
        self.index.len()
    }

    /// The scheduler's current view of a node (including its own assignments).
    pub fn node(&self, id: NodeId) -> Option<&NodeView> {
        self.index.slot_of(id).map(|s| self.index.view(s))
    }

    pub fn upsert_node(&mut self, node: NodeView) {
        if let Some(r) = &mut self.recorder {
            r.nodes.push(NodeChange::Upsert(node.clone()));
        }
        self.best_stream_tps = self.best_stream_tps.max(node.stream_tps());
        self.best_prefill_tps = self.best_prefill_tps.max(node.prefill_tps);
        self.index.upsert(node);
    }

    /// Change a registered node's dynamic fields in place (slots, governor state, SoC, tariff,
    /// link, forecast, running batch work) without rebuilding its index entry: the cheap path
    /// for a caller that updates nodes on every job start and finish. `models`, `regions` and
    /// `attested` must not change here (use [`Scheduler::upsert_node`]). Returns `false` for an
    /// unknown node. Equivalent to `upsert_node` with the changed view.
    pub fn update_node(&mut self, id: NodeId, f: impl FnOnce(&mut NodeView)) -> bool {
        let Some(slot) = self.index.slot_of(id) else {
            return false;
        };
        #[cfg(debug_assertions)]
        let before = {
            let v = self.index.view(slot);
            (v.models.clone(), v.regions.clone(), v.attested)
        };
        self.index.modify(slot, f);
        let v = self.index.view(slot);
        #[cfg(debug_assertions)]
        debug_assert!(
            before == (v.models.clone(), v.regions.clone(), v.attested),
            "update_node changed models, regions or attestation"
        );
        self.best_stream_tps = self.best_stream_tps.max(v.stream_tps());
        self.best_prefill_tps = self.best_prefill_tps.max(v.prefill_tps);
        if let Some(r) = &mut self.recorder {
            // A replay upserts the resulting full view: the same state by another path.
            r.nodes.push(NodeChange::Upsert(v.clone()));
        }
        true
    }

    /// A performance hint for a caller that knows which node it will update next (the
    /// simulator, a few events ahead): start loading the node's entry into cache. Changes no
    /// state and no decision.
    pub fn prefetch_node(&self, id: NodeId) {
        self.index.prefetch(id);
    }

    /// The second stage of [`Scheduler::prefetch_node`], a little later (when the entry is in
    /// cache): start loading the node's candidate-set members, which an update rewrites.
    pub fn prefetch_node_sets(&self, id: NodeId) {
        self.index.prefetch_sets(id);
    }

    pub fn remove_node(&mut self, id: NodeId) {
        if let Some(r) = &mut self.recorder {
            r.nodes.push(NodeChange::Remove(id));
        }
        self.index.remove(id);
    }

    pub fn decide(&mut self, now: Millis, queue: &[QueuedJob]) -> Decisions {
        let out = self.decide_unrecorded(now, queue);
        if let Some(r) = &mut self.recorder {
            r.step(now, queue, &out);
        }
        out
    }

    fn decide_unrecorded(&mut self, now: Millis, queue: &[QueuedJob]) -> Decisions {
        let mut order: Vec<&QueuedJob> = queue.iter().filter(|j| j.running_on.is_none()).collect();
        let rescue_resumed = self.policy.scores();
        let window = self.config.resumed_rescue_window as f64;
        order.sort_by_cached_key(|j| {
            let due = match j.class {
                JobClass::Interactive => j.enqueued_at,
                JobClass::Batch => j.deadline.unwrap_or(Millis::MAX),
            };
            // `tokenfleet`/`oracle`: a batch job resumed after an eviction goes before the other
            // jobs due at the same time once its deadline is within `resumed_rescue_window` run
            // times. Its acknowledged output is sunk work: if it misses the deadline its partial
            // request is lost, while a fresh job loses nothing by waiting.
            let rescue = rescue_resumed
                && j.class == JobClass::Batch
                && j.generated_tokens > 0
                && j.deadline.is_some_and(|d| {
                    (d.saturating_sub(now) as f64) < window * self.rough_run_ms(j) as f64
                });
            (j.class, due, !rescue, j.enqueued_at, j.id)
        });
        let mut out = Decisions::default();
        // Per call: the candidate sets of each (model, residency, sensitivity, class), and the
        // memo: None = no candidate at all; Some(t) = declined jobs needing >= t ms. A call sees
        // a handful of groups, so they are found by a scan (hashing the key's strings for every
        // job cost more); sorted jobs come in runs of the same key, so the previous key is
        // checked first.
        let mut groups: Vec<Group> = Vec::new();
        let mut group_keys: Vec<MemoKey<'_>> = Vec::new();
        let mut last: Option<(MemoKey<'_>, usize)> = None;
        for job in order {
            let key = MemoKey {
                model: &job.model,
                residency: job.residency.as_deref(),
                sensitive: job.sensitive,
                class: job.class,
            };
            let g = match &last {
                Some((k, g)) if *k == key => *g,
                _ => {
                    let g = match group_keys.iter().position(|k| *k == key) {
                        Some(g) => g,
                        None => {
                            groups.push(self.group(job));
                            group_keys.push(key);
                            groups.len() - 1
                        }
                    };
                    last = Some((key, g));
                    g
                }
            };
            if let Err(reason) = self.admit(now, job, groups[g].registered) {
                out.rejections.push(Rejection {
                    job: job.id,
                    reason,
                });
                continue;
            }
            match groups[g].memo {
                Some(None) => continue,
                Some(Some(t)) if self.rough_run_ms(job) >= t => continue,
                _ => {}
            }
            match self.pick(now, job, &mut groups[g]) {
                Pick::Free(slot) => {
                    let node = self.assign(slot, job);
                    out.assignments.push(Assignment { job: job.id, node });
                }
                Pick::Preempt(slot) => {
                    let mut victim = None;
                    self.index.modify(slot, |v| victim = v.running_batch.pop());
                    let node = self.index.view(slot).id;
                    if let Some(victim) = victim {
                        self.index
                            .modify(slot, |v| v.slots_busy = v.slots_busy.saturating_sub(1));
                        out.preemptions.push(Preemption {
                            job: victim,
                            node,
                            reason: PreemptReason::InteractivePriority,
                        });
                        self.assign(slot, job);
                        out.assignments.push(Assignment { job: job.id, node });
                    }
                }
                Pick::Declined(t) => {
                    let t = self.rough_run_ms(job).min(t);
                    let m = &mut groups[g].memo;
                    match m {
                        Some(Some(old)) => *old = (*old).min(t),
                        Some(None) => {}
                        None => *m = Some(Some(t)),
                    }
                }
                Pick::Nothing => {
                    groups[g].memo = Some(None);
                }
            }
        }
        out
    }

    /// A fleet-independent size measure used by the decline memo.
    fn rough_run_ms(&self, job: &QueuedJob) -> u64 {
        let tps = self.best_stream_tps.max(0.1) as f64;
        let pre = self.best_prefill_tps.max(1.0) as f64;
        (((job.prompt_tokens + job.generated_tokens) as f64 / pre
            + job.remaining_tokens() as f64 / tps)
            * 1000.0) as u64
    }

    /// `registered`: whether any registered node matches the job's group (see [`Group`]).
    fn admit(&self, now: Millis, job: &QueuedJob, registered: bool) -> Result<(), RejectReason> {
        if job.model.is_empty() || job.remaining_tokens() == 0 {
            return Err(RejectReason::InvalidJob);
        }
        if let Some(d) = job.deadline {
            if d <= now {
                return Err(RejectReason::DeadlinePassed);
            }
            if now.saturating_add(self.rough_run_ms(job)) > d {
                return Err(RejectReason::DeadlineUnreachable);
            }
        }
        if job.class == JobClass::Interactive
            && now.saturating_sub(job.enqueued_at) > self.config.interactive_queue_timeout_ms
        {
            return Err(RejectReason::QueueTimeout);
        }
        if registered {
            Ok(())
        } else {
            Err(RejectReason::NoMatchingNode)
        }
    }

    /// Resolve what a job's group (model, residency, sensitivity, class) needs from the index.
    fn group(&mut self, job: &QueuedJob) -> Group {
        let mut g = Group {
            registered: false,
            free: Vec::new(),
            preemptible: Vec::new(),
            memo: None,
            pool: None,
        };
        let Some(model) = self.index.models.get(&job.model) else {
            return g;
        };
        let regions: Vec<u32> = match &job.residency {
            None => vec![ANY_REGION],
            Some(rs) => {
                let mut ids: Vec<u32> = rs
                    .iter()
                    .filter_map(|r| self.index.regions.get(r))
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                ids
            }
        };
        g.registered = regions.iter().any(|&region| {
            let (all, attested) = self.index.registered(model, region);
            (if job.sensitive { attested } else { all }) > 0
        });
        // Every set is created here if it does not exist yet (empty), so that a node joining it
        // during this call is seen.
        for &region in &regions {
            let key = |kind| SetKey {
                model,
                region,
                kind,
            };
            g.free.push(self.index.set_id(key(Kind::Free)));
            g.preemptible
                .push(self.index.set_id(key(Kind::Preemptible)));
        }
        g
    }

    /// Members in the concatenation of the sets `ids`.
    fn total(&self, ids: &[u32]) -> usize {
        ids.iter().map(|&id| self.index.set_by_id(id).len()).sum()
    }

    /// The `at`-th member of the concatenated sets `ids`.
    fn member(&self, ids: &[u32], mut at: usize) -> &Member {
        for &id in ids {
            let set = self.index.set_by_id(id);
            if at < set.len() {
                return &set[at];
            }
            at -= set.len();
        }
        unreachable!("member index beyond the candidate sets")
    }

    fn pick(&mut self, now: Millis, job: &QueuedJob, group: &mut Group) -> Pick {
        let scoring = self.policy.scores();
        let free = if scoring && job.class == JobClass::Interactive {
            self.pick_pooled(now, job, group)
        } else {
            self.pick_in(now, job, &group.free, false)
        };
        let may_preempt = !scoring
            || now.saturating_sub(job.enqueued_at) >= self.config.interactive_preempt_after_ms;
        match free {
            Pick::Nothing if job.class == JobClass::Interactive && may_preempt => {
                match self.pick_in(now, job, &group.preemptible, true) {
                    Pick::Free(s) => Pick::Preempt(s),
                    other => other,
                }
            }
            other => other,
        }
    }

    fn pick_in(&mut self, now: Millis, job: &QueuedJob, ids: &[u32], freeing: bool) -> Pick {
        let limit = match self.policy {
            PolicyKind::Random | PolicyKind::FirstFit => usize::MAX,
            PolicyKind::Tokenfleet | PolicyKind::Oracle => match job.class {
                JobClass::Interactive => self.config.sample_size_interactive.max(1),
                JobClass::Batch => self.config.sample_size.max(1),
            },
        };
        let random_start = self.policy != PolicyKind::FirstFit;
        match self.policy {
            PolicyKind::Random | PolicyKind::FirstFit => {
                // Walk lazily: the first feasible node from a random (or the first) position.
                let total = self.total(ids);
                if total == 0 {
                    return Pick::Nothing;
                }
                let start = if random_start {
                    self.rng.below(total)
                } else {
                    0
                };
                for i in 0..total.min(limit) {
                    let slot = self.member(ids, (start + i) % total).slot;
                    if check_placement(job, self.index.view(slot), freeing).is_ok() {
                        return Pick::Free(slot);
                    }
                }
                Pick::Nothing
            }
            PolicyKind::Tokenfleet | PolicyKind::Oracle => {
                let total = self.total(ids);
                if total == 0 {
                    return Pick::Nothing;
                }
                let start = self.rng.below(total);
                let n = limit.min(total);
                // Score from the cards only: set membership already guarantees model, region,
                // eligibility, SoC reserve and a free slot; attestation is on the card. The
                // winner is checked against every hard constraint below.
                let mut best: Option<(f32, u64, &Member)> = None;
                let mut min_refused = u64::MAX;
                for i in 0..n {
                    let m = self.member(ids, (start + i) % total);
                    if job.sensitive && !m.card.attested {
                        continue;
                    }
                    let (s, _, run) = m.card.score(self.policy, job, now);
                    if best.is_none_or(|(bs, _, _)| s > bs) {
                        best = Some((s, run, m));
                        // The winner's full view is checked below: start loading it.
                        self.index.prefetch_slot(m.slot);
                    }
                    min_refused = min_refused.min(run);
                }
                let Some((_, run, m)) = best else {
                    return Pick::Nothing;
                };
                let slot = m.slot;
                // Work is continued after an eviction (acknowledged tokens are kept), so a node
                // that leaves before the end still delivers until it leaves; only one likely to
                // leave before doing a useful amount of work is refused.
                let useful = run.min(self.config.batch_useful_ms);
                let p = m.card.stay_probability(self.policy, now, useful);
                if check_placement(job, self.index.view(slot), freeing).is_err() {
                    // The index and the view disagree (cannot happen while `refresh` keeps them
                    // in step); refuse rather than break a hard constraint.
                    debug_assert!(false, "candidate set member fails check_placement");
                    return Pick::Nothing;
                }
                if job.class == JobClass::Batch && p < self.config.min_stay_prob_batch {
                    let urgent = job.deadline.is_some_and(|d| {
                        (d.saturating_sub(now) as f32) < run as f32 * self.config.deadline_urgency
                    });
                    if !urgent {
                        return Pick::Declined(min_refused);
                    }
                }
                Pick::Free(slot)
            }
        }
    }

    fn assign(&mut self, slot: u32, job: &QueuedJob) -> NodeId {
        let batch = job.class == JobClass::Batch;
        self.index.modify(slot, |v| {
            v.slots_busy += 1;
            if batch {
                v.running_batch.push(job.id);
            }
        });
        self.index.view(slot).id
    }
}
