//! Property tests: for thousands of random fleets and queues, no policy ever breaks a hard
//! constraint (residency, eligibility, model presence, free slot, SoC reserve, attestation).

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use tokenfleet_scheduler::{
    check_placement, replay, DepartureForecast, JobClass, JobId, NodeChange, NodeId, NodeView,
    PolicyKind, QueuedJob, RejectReason, Scheduler, SchedulerConfig, SchedulerTrace, TraceStep,
};

const MODELS: [&str; 3] = ["llama-8b", "qwen-3b", "smollm"];
const REGIONS: [&str; 4] = ["eu-nl", "eu-de", "us-ca", "eu"];

fn node_strategy(id: u64) -> impl Strategy<Value = NodeView> {
    (
        proptest::sample::subsequence(MODELS.to_vec(), 0..=3),
        proptest::sample::subsequence(REGIONS.to_vec(), 0..=2),
        0u32..5,
        0u32..6,
        any::<bool>(),
        proptest::option::of(0.0f32..100.0),
        any::<bool>(),
        any::<bool>(),
        0.0f32..600.0,
        (
            1.0f32..40.0,
            0u64..40_000_000,
            proptest::option::of(0u64..40_000_000),
        ),
    )
        .prop_map(
            move |(models, regions, slots, busy, eligible, soc, plugged, attested, rtt, rest)| {
                let (tps, horizon, oracle) = rest;
                let busy = busy.min(slots);
                NodeView {
                    id: NodeId(id),
                    models: models.into_iter().map(String::from).collect(),
                    slots_total: slots,
                    slots_busy: busy,
                    decode_tps_single: tps,
                    decode_tps_batched: tps * 3.0,
                    prefill_tps: tps * 20.0,
                    eligible,
                    soc_pct: soc,
                    soc_reserve_pct: 30.0,
                    plugged_in: plugged,
                    regions: regions.into_iter().map(String::from).collect(),
                    tariff_per_kwh: 0.25,
                    power_w: 300.0,
                    link_rtt_ms: rtt,
                    reputation: 0.9,
                    attested,
                    departure: DepartureForecast::certain(0, horizon),
                    running_batch: (0..busy)
                        .map(|k| JobId(1_000_000 + id * 100 + k as u64))
                        .collect(),
                    oracle_departure: oracle,
                }
            },
        )
}

fn fleet_strategy() -> impl Strategy<Value = Vec<NodeView>> {
    (0usize..24).prop_flat_map(|n| (0..n as u64).map(node_strategy).collect::<Vec<_>>())
}

fn job_strategy(id: u64) -> impl Strategy<Value = QueuedJob> {
    (
        any::<bool>(),
        proptest::sample::select(MODELS.to_vec()),
        0u32..4000,
        1u32..4000,
        proptest::option::of(proptest::sample::subsequence(REGIONS.to_vec(), 0..=2)),
        any::<bool>(),
        proptest::option::of(0u64..100_000_000),
        0u64..200_000,
    )
        .prop_map(
            move |(inter, model, prompt, max, residency, sensitive, deadline, enq)| QueuedJob {
                id: JobId(id),
                class: if inter {
                    JobClass::Interactive
                } else {
                    JobClass::Batch
                },
                model: model.to_string(),
                prompt_tokens: prompt,
                max_tokens: max,
                generated_tokens: 0,
                deadline,
                residency: residency.map(|r| r.into_iter().map(String::from).collect()),
                tenant: "t".into(),
                sensitive,
                enqueued_at: enq,
                running_on: None,
            },
        )
}

fn queue_strategy() -> impl Strategy<Value = Vec<QueuedJob>> {
    (0usize..40).prop_flat_map(|n| (0..n as u64).map(job_strategy).collect::<Vec<_>>())
}

fn policy_strategy() -> impl Strategy<Value = PolicyKind> {
    proptest::sample::select(PolicyKind::ALL.to_vec())
}

/// Check every decision against the views the scheduler was given.
fn check_decisions(
    nodes: &HashMap<NodeId, NodeView>,
    queue: &[QueuedJob],
    d: &tokenfleet_scheduler::Decisions,
) -> Result<(), TestCaseError> {
    let jobs: HashMap<JobId, &QueuedJob> = queue.iter().map(|j| (j.id, j)).collect();
    let mut seen = HashSet::new();
    for a in &d.assignments {
        prop_assert!(seen.insert(a.job), "job decided twice");
    }
    for r in &d.rejections {
        prop_assert!(seen.insert(r.job), "job both assigned and rejected");
    }
    let mut used: HashMap<NodeId, u32> = HashMap::new();
    let mut freed: HashMap<NodeId, u32> = HashMap::new();
    for p in &d.preemptions {
        let n = nodes.get(&p.node).expect("preempted on unknown node");
        prop_assert!(
            n.running_batch.contains(&p.job),
            "preempted a job not running there"
        );
        *freed.entry(p.node).or_default() += 1;
    }
    for a in &d.assignments {
        let job = jobs.get(&a.job).expect("assigned unknown job");
        let node = nodes.get(&a.node).expect("assigned to unknown node");
        // All hard constraints but the slot count, which is checked in aggregate below.
        let mut with_slot = node.clone();
        with_slot.slots_busy = 0;
        with_slot.slots_total = with_slot.slots_total.max(1);
        prop_assert_eq!(check_placement(job, &with_slot, false), Ok(()));
        prop_assert!(node.slots_total > 0);
        if job.sensitive {
            prop_assert!(node.attested);
        }
        if let Some(res) = &job.residency {
            prop_assert!(res.iter().any(|r| node.regions.contains(r)));
        }
        prop_assert!(node.eligible);
        prop_assert!(node.plugged_in || node.soc_pct.is_some_and(|s| s > node.soc_reserve_pct));
        prop_assert!(node.models.contains(&job.model));
        *used.entry(a.node).or_default() += 1;
    }
    for (id, n) in used {
        let node = &nodes[&id];
        let cap = node.slots_total - node.slots_busy + freed.get(&id).copied().unwrap_or(0);
        prop_assert!(n <= cap, "node {id} over-assigned: {n} > {cap}");
    }
    for r in &d.rejections {
        if r.reason == RejectReason::NoMatchingNode {
            let job = jobs[&r.job];
            let exists = nodes.values().any(|n| {
                n.models.contains(&job.model)
                    && (!job.sensitive || n.attested)
                    && job
                        .residency
                        .as_ref()
                        .is_none_or(|res| res.iter().any(|r| n.regions.contains(r)))
            });
            prop_assert!(!exists, "rejected NoMatchingNode although a node matches");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn no_policy_breaks_a_hard_constraint(
        fleet in fleet_strategy(),
        queue in queue_strategy(),
        policy in policy_strategy(),
        seed in any::<u64>(),
        now in 0u64..50_000_000,
    ) {
        let mut s = Scheduler::new(policy, seed);
        let nodes: HashMap<NodeId, NodeView> = fleet.iter().map(|n| (n.id, n.clone())).collect();
        for n in fleet {
            s.upsert_node(n);
        }
        let d = s.decide(now, &queue);
        check_decisions(&nodes, &queue, &d)?;
    }

    #[test]
    fn repeated_rounds_with_churn_stay_feasible(
        fleet in fleet_strategy(),
        queue in queue_strategy(),
        policy in policy_strategy(),
        seed in any::<u64>(),
        removed in proptest::collection::vec(0u64..24, 0..6),
    ) {
        // Round 1 fills slots; round 2 (after some nodes leave) must respect the scheduler's own
        // earlier assignments as the caller would see them.
        let mut s = Scheduler::new(policy, seed);
        let mut nodes: HashMap<NodeId, NodeView> = fleet.iter().map(|n| (n.id, n.clone())).collect();
        for n in fleet {
            s.upsert_node(n);
        }
        let d1 = s.decide(0, &queue);
        check_decisions(&nodes, &queue, &d1)?;
        for p in &d1.preemptions {
            if let Some(n) = nodes.get_mut(&p.node) {
                n.running_batch.retain(|j| *j != p.job);
                n.slots_busy -= 1;
            }
        }
        for a in &d1.assignments {
            if let Some(n) = nodes.get_mut(&a.node) {
                n.slots_busy += 1;
                if queue.iter().any(|j| j.id == a.job && j.class == JobClass::Batch) {
                    n.running_batch.push(a.job);
                }
            }
        }
        for r in removed {
            s.remove_node(NodeId(r));
            nodes.remove(&NodeId(r));
        }
        let decided: HashSet<JobId> = d1.assignments.iter().map(|a| a.job)
            .chain(d1.rejections.iter().map(|r| r.job)).collect();
        let rest: Vec<QueuedJob> = queue.into_iter().filter(|j| !decided.contains(&j.id)).collect();
        let d2 = s.decide(1000, &rest);
        check_decisions(&nodes, &rest, &d2)?;
    }

    #[test]
    fn same_inputs_same_decisions_and_replay_matches(
        fleet in fleet_strategy(),
        queue in queue_strategy(),
        policy in policy_strategy(),
        seed in any::<u64>(),
    ) {
        let mut trace = SchedulerTrace::new(policy, seed, SchedulerConfig::default());
        let mut s = Scheduler::new(policy, seed);
        for n in &fleet {
            s.upsert_node(n.clone());
        }
        let d = s.decide(5, &queue);
        trace.steps.push(TraceStep {
            now: 5,
            nodes: fleet.into_iter().map(NodeChange::Upsert).collect(),
            queue,
            decisions: d,
        });
        let json = serde_json::to_string(&trace).expect("serialize");
        let back: SchedulerTrace = serde_json::from_str(&json).expect("deserialize");
        prop_assert_eq!(replay(&back), Ok(()));
    }

    #[test]
    fn recorded_session_with_removals_and_rejoins_replays_exactly(
        fleet in fleet_strategy(),
        queue in queue_strategy(),
        policy in policy_strategy(),
        seed in any::<u64>(),
        rounds in 1usize..5,
    ) {
        // The live coordinator removes nodes (session ends), re-registers them and upserts
        // changes between decide calls in any order; the recorder must keep that order.
        let steps = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&steps);
        let mut s = Scheduler::new(policy, seed);
        s.record_to(Box::new(move |st: &TraceStep| sink.lock().unwrap().push(st.clone())));
        let mut live = Vec::new();
        for round in 0..rounds {
            for (i, n) in fleet.iter().enumerate() {
                match (i + round) % 3 {
                    0 => s.upsert_node(n.clone()),
                    1 if round > 0 => s.remove_node(n.id),
                    _ => {
                        s.upsert_node(n.clone());
                        s.update_node(n.id, |v| v.slots_busy = 0);
                    }
                }
            }
            live.push(s.decide(5 + round as u64 * 1000, &queue));
        }
        let mut trace = SchedulerTrace::from_header(s.header());
        trace.steps = steps.lock().unwrap().clone();
        prop_assert_eq!(trace.steps.len(), rounds);
        for (st, d) in trace.steps.iter().zip(&live) {
            prop_assert_eq!(&st.decisions, d);
        }
        prop_assert_eq!(replay(&trace), Ok(()));
    }

    #[test]
    fn interactive_goes_before_batch_on_a_uniform_fleet(
        n_nodes in 1usize..6,
        slots in 1u32..3,
        queue in queue_strategy(),
        policy in policy_strategy(),
        seed in any::<u64>(),
    ) {
        // Every node can run every job: if any admitted interactive job is left waiting, no
        // batch job may have been started.
        let mut s = Scheduler::new(policy, seed);
        for i in 0..n_nodes as u64 {
            s.upsert_node(NodeView {
                id: NodeId(i),
                models: MODELS.iter().map(|m| m.to_string()).collect(),
                slots_total: slots,
                slots_busy: 0,
                decode_tps_single: 30.0,
                decode_tps_batched: 100.0,
                prefill_tps: 500.0,
                eligible: true,
                soc_pct: Some(80.0),
                soc_reserve_pct: 20.0,
                plugged_in: true,
                regions: REGIONS.iter().map(|r| r.to_string()).collect(),
                tariff_per_kwh: 0.2,
                power_w: 300.0,
                link_rtt_ms: 30.0,
                reputation: 1.0,
                attested: true,
                departure: DepartureForecast::certain(0, u64::MAX / 4),
                running_batch: vec![],
                oracle_departure: Some(u64::MAX / 4),
            });
        }
        let now = 0;
        let d = s.decide(now, &queue);
        let decided: HashSet<JobId> = d.assignments.iter().map(|a| a.job)
            .chain(d.rejections.iter().map(|r| r.job)).collect();
        let waiting_interactive = queue.iter().any(|j| j.class == JobClass::Interactive && !decided.contains(&j.id));
        let batch_started = d.assignments.iter().any(|a| queue.iter().any(|j| j.id == a.job && j.class == JobClass::Batch));
        prop_assert!(!(waiting_interactive && batch_started));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// `update_node` (the simulator's per-job path) leaves the scheduler in exactly the state an
    /// `upsert_node` of the changed view would: same decisions afterwards.
    #[test]
    fn update_node_is_equivalent_to_upsert(
        fleet in fleet_strategy(),
        queue in queue_strategy(),
        policy in policy_strategy(),
        seed in any::<u64>(),
        changes in proptest::collection::vec((0u64..24, 0u32..6, any::<bool>(), any::<bool>(), 0.0f32..100.0), 0..12),
    ) {
        let mut a = Scheduler::new(policy, seed);
        let mut b = Scheduler::new(policy, seed);
        for n in &fleet {
            a.upsert_node(n.clone());
            b.upsert_node(n.clone());
        }
        for (id, busy, eligible, plugged, soc) in changes {
            let Some(mut view) = a.node(NodeId(id)).cloned() else {
                let known = b.update_node(NodeId(id), |_| ());
                prop_assert!(!known);
                continue;
            };
            let busy = busy.min(view.slots_total);
            view.slots_busy = busy;
            view.running_batch.truncate(busy as usize);
            view.eligible = eligible;
            view.plugged_in = plugged;
            view.soc_pct = Some(soc);
            a.upsert_node(view.clone());
            let known = b.update_node(NodeId(id), |v| *v = view);
            prop_assert!(known);
        }
        prop_assert_eq!(a.decide(7, &queue), b.decide(7, &queue));
    }
}
