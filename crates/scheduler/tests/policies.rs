//! Example tests of the policies' behaviour on small hand-built fleets: interactive preemption
//! (and the `tokenfleet` preemption wait), departure-aware batch placement, the rescue of
//! resumed batch jobs, the shared interactive candidate pool, policy names. The hard
//! constraints over random fleets are in `properties.rs`.

use tokenfleet_scheduler::{
    DepartureForecast, JobClass, JobId, NodeId, NodeView, PolicyKind, QueuedJob, RejectReason,
    Scheduler, SchedulerConfig,
};

/// A one-slot node, full with batch job 99 (unattested, SoC unknown, departure unknown).
fn full_node_running_batch() -> NodeView {
    NodeView {
        slots_busy: 1,
        decode_tps_single: 30.0,
        soc_pct: None,
        attested: false,
        departure: DepartureForecast::unknown(0),
        running_batch: vec![JobId(99)],
        oracle_departure: None,
        ..plugged_node(7, 1, 30.0, 0)
    }
}

/// A small interactive job for model "m" in "eu", enqueued at 0.
fn interactive_job() -> QueuedJob {
    QueuedJob {
        id: JobId(1),
        class: JobClass::Interactive,
        model: "m".into(),
        prompt_tokens: 10,
        max_tokens: 10,
        generated_tokens: 0,
        deadline: None,
        residency: Some(vec!["eu".into()]),
        tenant: "t".into(),
        sensitive: false,
        enqueued_at: 0,
        running_on: None,
    }
}

#[test]
fn interactive_preempts_batch_when_full() {
    // `first-fit` and `random` preempt at once, and so does `tokenfleet` by default.
    for policy in [
        PolicyKind::FirstFit,
        PolicyKind::Random,
        PolicyKind::Tokenfleet,
    ] {
        let mut s = Scheduler::new(policy, 1);
        s.upsert_node(full_node_running_batch());
        let d = s.decide(0, &[interactive_job()]);
        assert_eq!(d.preemptions.len(), 1, "{policy}");
    }
    let job = interactive_job();
    // With `interactive_preempt_after_ms`, `tokenfleet` first gives a slot the chance to free
    // by itself...
    let wait = 250;
    let mut s = Scheduler::with_config(
        PolicyKind::Tokenfleet,
        1,
        SchedulerConfig {
            interactive_preempt_after_ms: wait,
            ..SchedulerConfig::default()
        },
    );
    s.upsert_node(full_node_running_batch());
    let d = s.decide(wait - 1, std::slice::from_ref(&job));
    assert!(
        d.preemptions.is_empty() && d.assignments.is_empty(),
        "{d:?}"
    );
    // ...then preempts the batch work.
    let d = s.decide(wait, std::slice::from_ref(&job));
    assert_eq!(d.preemptions.len(), 1);
    assert_eq!(d.preemptions[0].job, JobId(99));
    assert_eq!(d.assignments.len(), 1);
    // A sensitive job must not go there (unattested), nor a job for another region.
    let mut s2 = Scheduler::new(PolicyKind::Random, 1);
    s2.upsert_node(s.node(NodeId(7)).cloned().expect("node"));
    let mut sens = job.clone();
    sens.sensitive = true;
    let d = s2.decide(0, &[sens]);
    assert_eq!(d.rejections[0].reason, RejectReason::NoMatchingNode);
}

#[test]
fn policy_names_round_trip() {
    for p in PolicyKind::ALL {
        assert_eq!(p.to_string().parse::<PolicyKind>(), Ok(p));
        assert_eq!(serde_json::to_string(&p).expect("json"), format!("\"{p}\""));
    }
    assert!("best".parse::<PolicyKind>().is_err());
}

/// An eligible, plugged-in node holding model `m` in region `eu` that leaves in `leaves_in_s`.
fn plugged_node(id: u64, slots: u32, decode_tps_batched: f32, leaves_in_s: u64) -> NodeView {
    NodeView {
        id: NodeId(id),
        models: vec!["m".into()],
        slots_total: slots,
        slots_busy: 0,
        decode_tps_single: 28.0,
        decode_tps_batched,
        prefill_tps: 500.0,
        eligible: true,
        soc_pct: Some(80.0),
        soc_reserve_pct: 20.0,
        plugged_in: true,
        regions: vec!["eu".into()],
        tariff_per_kwh: 0.2,
        power_w: 300.0,
        link_rtt_ms: 30.0,
        reputation: 1.0,
        attested: true,
        departure: DepartureForecast::certain(0, leaves_in_s * 1000),
        running_batch: vec![],
        oracle_departure: Some(leaves_in_s * 1000),
    }
}

#[test]
fn tokenfleet_sends_long_batch_work_to_the_vehicle_that_stays() {
    let base = |id: u64, leaves_in_s: u64| plugged_node(id, 4, 112.0, leaves_in_s);
    let job = QueuedJob {
        id: JobId(1),
        class: JobClass::Batch,
        model: "m".into(),
        prompt_tokens: 1000,
        max_tokens: 20_000, // ~700 s at 28 tok/s per stream
        generated_tokens: 0,
        deadline: None,
        residency: None,
        tenant: "t".into(),
        sensitive: false,
        enqueued_at: 0,
        running_on: None,
    };
    for policy in [PolicyKind::Tokenfleet, PolicyKind::Oracle] {
        let mut s = Scheduler::new(policy, 3);
        s.upsert_node(base(1, 300));
        s.upsert_node(base(2, 36_000));
        s.upsert_node(base(3, 200));
        let d = s.decide(0, std::slice::from_ref(&job));
        assert_eq!(d.assignments.len(), 1, "{policy}");
        assert_eq!(d.assignments[0].node, NodeId(2), "{policy}");
    }
}

/// A batch job resumed after an eviction (with acknowledged output) and near its deadline takes
/// the last free slot before a fresh job due at the same time under `tokenfleet`/`oracle` (its
/// partial request would be lost at the deadline); `first-fit` keeps plain queue order, and far
/// from the deadline `tokenfleet` does too.
#[test]
fn tokenfleet_rescues_a_resumed_batch_job_near_its_deadline() {
    let node = plugged_node(1, 1, 28.0, 360_000);
    // Half an hour ahead: each job needs about 5 minutes on this node, so the deadline is within
    // the rescue window (8 run times).
    let deadline = 1_800_000;
    let job = |id: u64, generated: u32, enqueued_at: u64| QueuedJob {
        id: JobId(id),
        class: JobClass::Batch,
        model: "m".into(),
        prompt_tokens: 1000,
        max_tokens: 8_000,
        generated_tokens: generated,
        deadline: Some(deadline),
        residency: None,
        tenant: "t".into(),
        sensitive: false,
        enqueued_at,
        running_on: None,
    };
    // The fresh job was queued first; the resumed one came back later with 1,000 tokens done.
    let queue = [job(1, 0, 0), job(2, 1_000, 10)];
    let first = |policy, now| {
        let mut s = Scheduler::new(policy, 5);
        s.upsert_node(node.clone());
        let d = s.decide(now, &queue);
        assert_eq!(d.assignments.len(), 1, "{policy}");
        d.assignments[0].job
    };
    for policy in [PolicyKind::Tokenfleet, PolicyKind::Oracle] {
        assert_eq!(first(policy, 1_000), JobId(2), "{policy} near the deadline");
    }
    assert_eq!(first(PolicyKind::FirstFit, 1_000), JobId(1));
    // Far from the deadline (more than 8 run times ahead) queue order holds.
    let far = |policy| {
        let mut s = Scheduler::new(policy, 5);
        s.upsert_node(node.clone());
        let q: Vec<QueuedJob> = queue
            .iter()
            .map(|j| QueuedJob {
                deadline: Some(100 * deadline),
                ..j.clone()
            })
            .collect();
        s.decide(1_000, &q).assignments[0].job
    };
    assert_eq!(far(PolicyKind::Tokenfleet), JobId(1));
}

/// The interactive jobs of one `decide` call share a pool of candidates (`tokenfleet`,
/// `oracle`): a node that an earlier job of the call filled, or that a sensitive job may not
/// use, must not be taken from the pool.
#[test]
fn interactive_jobs_sharing_a_candidate_pool_respect_slots_and_attestation() {
    for policy in [PolicyKind::Tokenfleet, PolicyKind::Oracle] {
        let mut s = Scheduler::new(policy, 3);
        for id in 0..3 {
            let mut n = plugged_node(id, 1 + id as u32, 60.0, 3600);
            // Node 0 is the most attractive (no RTT) but unattested.
            if id == 0 {
                n.attested = false;
                n.link_rtt_ms = 0.0;
            }
            s.upsert_node(n);
        }
        let job = |id: u64, sensitive: bool| QueuedJob {
            id: JobId(id),
            class: JobClass::Interactive,
            model: "m".into(),
            prompt_tokens: 100 + id as u32,
            max_tokens: 50,
            generated_tokens: 0,
            deadline: None,
            residency: None,
            tenant: "t".into(),
            sensitive,
            enqueued_at: id,
            running_on: None,
        };
        // Six slots in all (1 + 2 + 3), five of them on attested nodes.
        let queue: Vec<QueuedJob> = (0..8).map(|i| job(i, i % 2 == 0)).collect();
        let d = s.decide(10, &queue);
        let mut per_node = std::collections::HashMap::new();
        for a in &d.assignments {
            *per_node.entry(a.node).or_insert(0u32) += 1;
            let j = &queue[a.job.0 as usize];
            assert!(
                !(j.sensitive && a.node == NodeId(0)),
                "{policy}: sensitive job on the unattested node"
            );
        }
        for (node, n) in &per_node {
            assert!(*n <= 1 + node.0 as u32, "{policy}: {node} over its slots");
        }
        assert_eq!(d.assignments.len(), 6, "{policy}: every slot is used");
        for id in 0..3 {
            let v = s.node(NodeId(id)).expect("node");
            assert_eq!(v.slots_busy, v.slots_total);
        }
    }
}
