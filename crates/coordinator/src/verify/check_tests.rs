//! The judging rules on synthetic distributions, where honest sampling can be simulated
//! thousands of times: the false-positive rate holds, and other models' tokens are caught.

use super::*;
use tokenfleet_engine::sampling::{sample, uniform};
use tokenfleet_engine::score::{score_position, NextScore};

const VOCAB: usize = 256;

fn normal(seed: u64, i: u64) -> f64 {
    let u1 = uniform(seed, 2 * i).max(1e-12);
    let u2 = uniform(seed, 2 * i + 1);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Logits of position `pos` of a synthetic "model"; `noise` perturbs them (another model).
fn logits(model_seed: u64, pos: u64, noise: f64, noise_seed: u64) -> Vec<f32> {
    let scale = 1.0 + 3.0 * uniform(model_seed ^ 0xABCD, pos);
    (0..VOCAB as u64)
        .map(|i| {
            let base = scale * normal(model_seed.wrapping_add(pos * 7919), i);
            (base + noise * normal(noise_seed.wrapping_add(pos * 104_729), i)) as f32
        })
        .collect()
}

fn sampling(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        top_k: 0,
        seed,
    }
}

/// A job of `n` tokens drawn from the (possibly perturbed) model, scored by the true one.
fn job(model_seed: u64, n: u64, noise: f64, draw_seed: u64) -> ScoreResult {
    let p = sampling(draw_seed);
    let tokens = (0..n)
        .map(|pos| {
            let drawn_from = logits(model_seed, pos, noise, draw_seed);
            let token = sample(&drawn_from, &p, pos, 0).token;
            score_position(&logits(model_seed, pos, 0.0, 0), token, &p)
        })
        .collect();
    ScoreResult {
        tokens,
        next: NextScore {
            argmax: 0,
            argmax_logprob: 0.0,
            best_eog_logprob: 0.0,
        },
    }
}

fn thresholds(alpha: f64) -> Thresholds {
    Thresholds {
        greedy_tolerance_nats: 0.25,
        sampled_false_positive_rate: alpha,
        min_sampled_tokens: 32,
        top_p_slack: 0.02,
    }
}

fn whole(n: usize) -> Segment {
    Segment {
        node: "n".into(),
        start: 0,
        end: n,
    }
}

#[test]
fn critical_values_match_the_normal_table() {
    assert!((z_two_sided(0.05) - 1.959_964).abs() < 1e-3);
    assert!((z_two_sided(1e-6) - 4.891_638).abs() < 1e-3);
}

#[test]
fn honest_sampling_passes_at_the_stated_false_positive_rate() {
    // 400 honest nodes, 4 jobs of 48 tokens each, at alpha = 0.01 per node lifetime:
    // expect about 4 false positives; the bound is loose enough for the CLT's error on short
    // sums and tight enough to catch a broken statistic (which fails far more).
    let alpha = 0.01;
    let th = thresholds(alpha);
    let mut failed_nodes = 0;
    for node in 0..400u64 {
        let mut evidence = SampledEvidence::default();
        for j in 0..4u64 {
            let seed = node * 1000 + j;
            let scores = job(seed, 48, 0.0, seed + 17);
            if let Finding::Fail(why) =
                judge_sampled(&scores, &whole(48), &sampling(0), &mut evidence, &th)
            {
                println!("honest node {node} failed: {why}");
                failed_nodes += 1;
                break;
            }
        }
    }
    println!("honest nodes failed: {failed_nodes} of 400 at alpha {alpha}");
    assert!(failed_nodes <= 12, "{failed_nodes} false positives");
}

#[test]
fn another_models_samples_and_random_tokens_fail() {
    let th = thresholds(1e-6);
    // Another model: the same logits plus noise of the same order as their spread.
    let mut caught_within = None;
    let mut evidence = SampledEvidence::default();
    for j in 0..20u64 {
        let scores = job(500 + j, 64, 2.0, 900 + j);
        if let Finding::Fail(_) =
            judge_sampled(&scores, &whole(64), &sampling(0), &mut evidence, &th)
        {
            caught_within = Some(j + 1);
            break;
        }
    }
    println!("perturbed model caught within {caught_within:?} jobs of 64 tokens");
    assert!(caught_within.is_some_and(|j| j <= 5));

    // Uniformly random tokens: outside the nucleus at once.
    let p = sampling(3);
    let tokens = (0..64u64)
        .map(|pos| {
            let t = (uniform(77, pos) * VOCAB as f64) as i32;
            score_position(&logits(4242, pos, 0.0, 0), t, &p)
        })
        .collect();
    let scores = ScoreResult {
        tokens,
        next: NextScore {
            argmax: 0,
            argmax_logprob: 0.0,
            best_eog_logprob: 0.0,
        },
    };
    let mut evidence = SampledEvidence::default();
    assert!(matches!(
        judge_sampled(&scores, &whole(64), &p, &mut evidence, &th),
        Finding::Fail(_)
    ));
}

#[test]
fn argmax_tokens_passed_off_as_samples_are_too_likely() {
    let th = thresholds(1e-6);
    let p = sampling(5);
    let mut evidence = SampledEvidence::default();
    let mut caught = false;
    for j in 0..10u64 {
        let tokens = (0..64u64)
            .map(|pos| {
                let l = logits(7000 + j, pos, 0.0, 0);
                let best = tokenfleet_engine::sampling::argmax(&l) as i32;
                score_position(&l, best, &p)
            })
            .collect();
        let scores = ScoreResult {
            tokens,
            next: NextScore {
                argmax: 0,
                argmax_logprob: 0.0,
                best_eog_logprob: 0.0,
            },
        };
        if let Finding::Fail(why) = judge_sampled(&scores, &whole(64), &p, &mut evidence, &th) {
            assert!(why.contains("z = "), "{why}");
            caught = true;
            break;
        }
    }
    assert!(caught);
}

#[test]
fn greedy_failures_name_the_token_and_a_premature_end() {
    let th = thresholds(1e-6);
    let greedy = SamplingParams::default();
    let rows: Vec<Vec<f32>> = (0..8u64).map(|p| logits(1, p, 0.0, 0)).collect();
    let argmaxes: Vec<i32> = rows
        .iter()
        .map(|l| tokenfleet_engine::sampling::argmax(l) as i32)
        .collect();
    let mk = |tokens: &[i32], eog_gap: f32| ScoreResult {
        tokens: rows
            .iter()
            .zip(tokens)
            .map(|(l, &t)| score_position(l, t, &greedy))
            .collect(),
        next: NextScore {
            argmax: 0,
            argmax_logprob: -0.1,
            best_eog_logprob: -0.1 - eog_gap,
        },
    };
    assert_eq!(
        judge_greedy(&mk(&argmaxes, 0.0), &whole(8), true, &th),
        Finding::Pass
    );
    let mut wrong = argmaxes.clone();
    wrong[3] = (wrong[3] + 1) % VOCAB as i32;
    match judge_greedy(&mk(&wrong, 0.0), &whole(8), false, &th) {
        Finding::Fail(why) => assert!(why.contains("token 3"), "{why}"),
        other => panic!("{other:?}"),
    }
    // The wrong token lies outside a segment that ends before it: that node passes.
    let first = Segment {
        node: "a".into(),
        start: 0,
        end: 3,
    };
    assert_eq!(
        judge_greedy(&mk(&wrong, 0.0), &first, false, &th),
        Finding::Pass
    );
    assert!(matches!(
        judge_greedy(&mk(&argmaxes, 5.0), &whole(8), true, &th),
        Finding::Fail(_)
    ));
}
