//! The judging rules on synthetic distributions, where honest sampling can be simulated
//! thousands of times: the false-positive rate holds, and other models' tokens are caught.

use super::*;
use tokenfleet_engine::sampling::{sample, uniform};
use tokenfleet_engine::score::{score_position, NextScore};
use tokenfleet_engine::TokenScore;

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
        false_positive_rate: alpha,
        ..Thresholds::default()
    }
}

fn whole(n: usize) -> Segment {
    Segment {
        node: "n".into(),
        start: 0,
        end: n,
    }
}

fn claims<'a>(tokens: &'a [i32], logprobs: &'a [f32], p: &'a SamplingParams) -> Claims<'a> {
    Claims {
        tokens,
        logprobs,
        ended_on_eog: false,
        sampling: p,
    }
}

/// The evidence of a whole job whose reported logprobs are the re-scored ones.
fn job_evidence(scores: &ScoreResult, p: &SamplingParams, th: &Thresholds) -> Evidence {
    let tokens: Vec<i32> = scores.tokens.iter().map(|t| t.token).collect();
    let logprobs: Vec<f32> = scores.tokens.iter().map(|t| t.logprob).collect();
    evidence(
        scores,
        &whole(tokens.len()),
        &claims(&tokens, &logprobs, p),
        th,
    )
}

/// Judges a job on its own and in the node's window (as the verifier does), then keeps it.
fn judge_in_window(e: &Evidence, window: &mut NodeWindow, th: &Thresholds) -> Finding {
    let finding = match judge(e, th) {
        f @ Finding::Fail(_) => f,
        own => match window.judge_with(e, th) {
            f @ Finding::Fail(_) => f,
            _ => own,
        },
    };
    window.push(e, th);
    finding
}

fn no_next() -> NextScore {
    NextScore {
        argmax: 0,
        argmax_logprob: 0.0,
        best_eog_logprob: 0.0,
    }
}

#[test]
fn critical_values_match_the_normal_table() {
    assert!((z_two_sided(0.05) - 1.959_964).abs() < 1e-3);
    assert!((z_two_sided(1e-6) - 4.891_638).abs() < 1e-3);
    // P(Bin(10, 0.5) >= 8) = 56 / 1024.
    assert!((binomial_at_least(10, 0.5, 8) - 56.0 / 1024.0).abs() < 1e-9);
    assert_eq!(binomial_at_least(10, 0.5, 0), 1.0);
    assert_eq!(binomial_at_least(10, 0.5, 11), 0.0);
}

#[test]
fn honest_sampling_passes_at_the_stated_false_positive_rate() {
    // 1000 honest jobs of 48 tokens at alpha 0.01 per test (sampled_z_scale 1: the synthetic
    // model has no rounding noise): about 10 per-job failures are expected; the bound is loose
    // enough for the CLT's error on short sums and tight enough to catch a broken statistic.
    let th = Thresholds {
        sampled_z_scale: 1.0,
        ..thresholds(0.04)
    };
    let mut failed = 0;
    for j in 0..1000u64 {
        let scores = job(j, 48, 0.0, j + 17);
        if let Finding::Fail(why) = judge(&job_evidence(&scores, &sampling(0), &th), &th) {
            println!("honest job {j} failed: {why}");
            failed += 1;
        }
    }
    println!("honest jobs failed: {failed} of 1000 at alpha 0.01 per test");
    assert!(failed <= 25, "{failed} false positives");
}

#[test]
fn another_models_samples_and_random_tokens_fail() {
    let th = thresholds(1e-6);
    // Another model: the same logits plus noise of the same order as their spread.
    let mut caught_within = None;
    let mut window = NodeWindow::default();
    for j in 0..20u64 {
        let scores = job(500 + j, 64, 2.0, 900 + j);
        let e = job_evidence(&scores, &sampling(0), &th);
        if judge_in_window(&e, &mut window, &th).is_fail() {
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
        next: no_next(),
    };
    match judge(&job_evidence(&scores, &p, &th), &th) {
        Finding::Fail(why) => assert!(why.contains("outside what"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn argmax_tokens_passed_off_as_samples_are_too_likely() {
    let th = thresholds(1e-6);
    let p = sampling(5);
    let mut window = NodeWindow::default();
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
            next: no_next(),
        };
        if let Finding::Fail(why) =
            judge_in_window(&job_evidence(&scores, &p, &th), &mut window, &th)
        {
            assert!(why.contains("z = "), "{why}");
            caught = true;
            break;
        }
    }
    assert!(caught);
}

/// A long honest past cannot hide new lies: 2,000 honest jobs, then a node that draws from a
/// slightly different model. Summed over its whole life (the old rule) the new lies are
/// diluted; the window sees only recent jobs and fails the node.
#[test]
fn a_long_honest_past_does_not_hide_new_lies() {
    let th = thresholds(1e-6);
    let mut window = NodeWindow::default();
    let mut lifetime = SampledSums::default();
    for j in 0..2000u64 {
        let e = job_evidence(&job(j, 48, 0.0, j + 3), &sampling(0), &th);
        lifetime.add(&e.sampled);
        assert!(
            !judge_in_window(&e, &mut window, &th).is_fail(),
            "honest job {j}"
        );
    }
    let mut caught_after = None;
    for j in 0..64u64 {
        let e = job_evidence(&job(90_000 + j, 48, 0.7, j + 5), &sampling(0), &th);
        lifetime.add(&e.sampled);
        if judge_in_window(&e, &mut window, &th).is_fail() {
            caught_after = Some(j + 1);
            break;
        }
    }
    let lifetime_z = lifetime.z().abs();
    println!("new liar caught after {caught_after:?} jobs; lifetime |z| then {lifetime_z:.2}");
    assert!(
        caught_after.is_some(),
        "the window never caught the new liar"
    );
    assert!(
        lifetime_z < z_two_sided(th.false_positive_rate / 4.0),
        "the lifetime sum would have caught it too ({lifetime_z:.2}): the test shows nothing"
    );
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
    let judged = |scores: &ScoreResult, segment: &Segment, eog: bool| {
        let tokens: Vec<i32> = scores.tokens.iter().map(|t| t.token).collect();
        let logprobs: Vec<f32> = scores.tokens.iter().map(|t| t.logprob).collect();
        let c = Claims {
            ended_on_eog: eog,
            ..claims(&tokens, &logprobs, &greedy)
        };
        judge(&evidence(scores, segment, &c, &th), &th)
    };
    assert_eq!(judged(&mk(&argmaxes, 0.0), &whole(8), true), Finding::Pass);
    // A far-off token: the synthetic logits' spread puts the least likely token far down.
    let mut wrong = argmaxes.clone();
    wrong[3] = (0..VOCAB as i32)
        .min_by(|&a, &b| rows[3][a as usize].total_cmp(&rows[3][b as usize]))
        .unwrap();
    match judged(&mk(&wrong, 0.0), &whole(8), false) {
        Finding::Fail(why) => assert!(why.contains("token 3"), "{why}"),
        other => panic!("{other:?}"),
    }
    // The wrong token lies outside a segment that ends before it: that node passes.
    let first = Segment {
        node: "a".into(),
        start: 0,
        end: 3,
    };
    assert_eq!(judged(&mk(&wrong, 0.0), &first, false), Finding::Pass);
    // A premature end: the model's end-of-generation is far below its choice.
    assert!(judged(&mk(&argmaxes, 5.0), &whole(8), true).is_fail());
    // A near-tie end (rounding) is not evidence.
    assert_eq!(judged(&mk(&argmaxes, 0.3), &whole(8), true), Finding::Pass);
}

/// Near misses: every token a little below the argmax (a lower-bit quantization, a little
/// temperature) stays under the single-token limit but not under the count test; an honest
/// node's rare near-ties do not add up.
#[test]
fn many_small_greedy_misses_fail_where_rare_near_ties_pass() {
    let th = thresholds(1e-6);
    let score = |gap: f32| TokenScore {
        token: 1,
        logprob: -1.0 - gap,
        rank: u32::from(gap > 0.0),
        argmax: 0,
        argmax_logprob: -1.0,
        sampled: None,
    };
    let greedy = SamplingParams::default();
    let run = |gaps: &[f32]| {
        let scores = ScoreResult {
            tokens: gaps.iter().map(|&g| score(g)).collect(),
            next: no_next(),
        };
        let e = job_evidence(&scores, &greedy, &th);
        judge(&e, &th)
    };
    // 1 token in 10 at 1.5 nats (under the 1.83-nat limit): 13 of 128.
    let near_miss: Vec<f32> = (0..128)
        .map(|i| if i % 10 == 0 { 1.5 } else { 0.0 })
        .collect();
    match run(&near_miss) {
        Finding::Fail(why) => assert!(why.contains("13 of 128"), "{why}"),
        other => panic!("{other:?}"),
    }
    // An honest job: 2 near-ties of 128, one of them past the mismatch gap.
    let mut honest = vec![0.0f32; 128];
    honest[40] = 0.3;
    honest[90] = 1.2;
    assert_eq!(run(&honest), Finding::Pass);
}

#[test]
fn forged_logprobs_fail_and_honest_rounding_passes() {
    let th = thresholds(1e-6);
    let greedy = SamplingParams::default();
    let rows: Vec<Vec<f32>> = (0..16u64).map(|p| logits(9, p, 0.0, 0)).collect();
    let scores = ScoreResult {
        tokens: rows
            .iter()
            .map(|l| {
                let best = tokenfleet_engine::sampling::argmax(l) as i32;
                score_position(l, best, &greedy)
            })
            .collect(),
        next: no_next(),
    };
    let tokens: Vec<i32> = scores.tokens.iter().map(|t| t.token).collect();
    let rounded: Vec<f32> = scores.tokens.iter().map(|t| t.logprob - 0.1).collect();
    let e = evidence(
        &scores,
        &whole(16),
        &claims(&tokens, &rounded, &greedy),
        &th,
    );
    assert_eq!(judge(&e, &th), Finding::Pass);
    // "Every token was certain": -0.01 everywhere.
    let forged = vec![-0.01f32; 16];
    let e = evidence(&scores, &whole(16), &claims(&tokens, &forged, &greedy), &th);
    match judge(&e, &th) {
        Finding::Fail(why) => assert!(why.contains("reported logprob"), "{why}"),
        other => panic!("{other:?}"),
    }
}
