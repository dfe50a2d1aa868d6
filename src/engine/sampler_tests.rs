//! Tests of the sampler on hand-made logits (no model).
use super::*;
use std::collections::HashSet;

fn with(base: SamplingParams, edit: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut params = base;
    edit(&mut params);
    params
}

fn seeded(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

fn draws(params: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(params);
    (0..n)
        .map(|_| sampler.sample(&mut logits.to_vec(), &[]))
        .collect()
}

fn ln(probs: &[f32]) -> Vec<f32> {
    probs.iter().map(|p| p.ln()).collect()
}

fn counts(tokens: &[u32], vocab: usize) -> Vec<usize> {
    let mut c = vec![0; vocab];
    for &t in tokens {
        c[t as usize] += 1;
    }
    c
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "got {got:?}, want {want:?}");
    }
}

#[test]
fn greedy_picks_argmax_and_lowest_on_ties() {
    let mut s = Sampler::new(SamplingParams::greedy());
    assert_eq!(s.sample(&mut [0.1, -2.0, 3.5, 3.4], &[]), 2);
    assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, 2.0], &[]), 1);
}

#[test]
fn vectorised_argmax_matches_the_plain_loop() {
    use rand::{Rng, SeedableRng};
    // The one-compare-at-a-time loop it replaced.
    fn plain(logits: &[f32]) -> u32 {
        let mut best: Option<(usize, f32)> = None;
        for (i, &l) in logits.iter().enumerate() {
            match best {
                _ if l.is_nan() => {}
                Some((_, b)) if l <= b => {}
                _ => best = Some((i, l)),
            }
        }
        best.map_or(0, |(i, _)| i as u32)
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.0];
    for len in [0, 1, 2, 15, 16, 17, 33, 100, 49152] {
        for round in 0..40 {
            let mut x: Vec<f32> = (0..len)
                .map(|_| rng.gen_range(-8..8) as f32 * 0.5)
                .collect();
            // Ties, signed zeros, infinities and NaNs at random places.
            for _ in 0..round % 6 {
                if len > 0 {
                    x[rng.gen_range(0..len)] = special[rng.gen_range(0..special.len())];
                }
            }
            assert_eq!(argmax(&x), plain(&x), "len {len}, round {round}");
        }
    }
    assert_eq!(argmax(&[f32::NAN; 40]), 0);
    assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
    let mut late = vec![f32::NAN; 40];
    late[37] = f32::NEG_INFINITY;
    assert_eq!(argmax(&late), 37);
}

#[test]
fn nan_is_never_picked() {
    let mut s = Sampler::new(SamplingParams::greedy());
    assert_eq!(s.sample(&mut [f32::NAN, -5.0, f32::NAN, -6.0], &[]), 1);
    let picked = draws(seeded(3), &[f32::NAN, 0.0, f32::NAN, 0.0], 200);
    assert!(picked.iter().all(|&t| t == 1 || t == 3), "{picked:?}");
}

#[test]
fn top_k_one_equals_greedy_at_any_temperature() {
    let logits = [0.3, 2.0, -1.0, 2.0, 1.5, f32::NAN];
    let expected = argmax(&logits);
    assert_eq!(expected, 1);
    for (seed, temperature) in [0.05f32, 0.7, 1.0, 2.0].into_iter().enumerate() {
        let params = with(seeded(seed as u64), |p| {
            p.temperature = temperature;
            p.top_k = 1;
        });
        assert!(draws(params, &logits, 100).iter().all(|&t| t == expected));
    }
}

#[test]
fn top_k_keeps_only_the_k_best() {
    let params = with(seeded(5), |p| {
        p.temperature = 2.0;
        p.top_k = 2;
    });
    let c = counts(&draws(params, &[0.0, 1.0, 5.0, 4.0, 3.0], 300), 5);
    assert_eq!((c[0], c[1], c[4]), (0, 0, 0), "{c:?}");
    assert!(c[2] > 0 && c[3] > 0, "{c:?}");
}

#[test]
fn same_seed_same_draws_different_seed_different_draws() {
    let flat = vec![0.0f32; 1000];
    let a = draws(seeded(42), &flat, 50);
    assert_eq!(a, draws(seeded(42), &flat, 50));
    assert_ne!(a, draws(seeded(43), &flat, 50));
    let distinct = a.iter().collect::<HashSet<_>>().len();
    assert!(distinct > 10, "not random: {a:?}");
}

#[test]
fn top_p_keeps_only_the_nucleus() {
    let logits = ln(&[0.5, 0.3, 0.15, 0.05]);
    let c = counts(&draws(with(seeded(7), |p| p.top_p = 0.6), &logits, 500), 4);
    assert_eq!((c[2], c[3]), (0, 0), "{c:?}");
    assert!(c[0] > 0 && c[1] > 0, "{c:?}");
    // Control: without the filter the tail does show up.
    let c = counts(&draws(seeded(7), &logits, 500), 4);
    assert!(c[2] + c[3] > 0, "{c:?}");
    // 0 keeps the most likely token alone.
    let zero = with(seeded(7), |p| p.top_p = 0.0);
    assert_eq!(zero.validate(), Ok(()));
    let c = counts(&draws(zero, &logits, 200), 4);
    assert_eq!(c[0], 200, "{c:?}");
}

#[test]
fn llama_cpp_order_filters_before_the_temperature() {
    // At temperature 1, min_p 0.2 drops token 3 (0.05 < 0.2 * 0.5); a temperature of 3
    // flattens the distribution first and lets it through, unless the filters come first.
    let logits = ln(&[0.5, 0.3, 0.15, 0.05]);
    let hot = |llama: bool| {
        with(seeded(3), move |p| {
            p.temperature = 3.0;
            p.min_p = 0.2;
            p.llama_cpp_order = llama;
        })
    };
    let c = counts(&draws(hot(true), &logits, 500), 4);
    assert_eq!(c[3], 0, "{c:?}");
    assert!(c[2] > 0, "{c:?}");
    let c = counts(&draws(hot(false), &logits, 500), 4);
    assert!(c[3] > 0, "{c:?}");
}

#[test]
fn min_p_excludes_tokens_below_half_the_max() {
    let logits = ln(&[0.4, 0.3, 0.19, 0.11]);
    let c = counts(&draws(with(seeded(11), |p| p.min_p = 0.5), &logits, 500), 4);
    assert_eq!((c[2], c[3]), (0, 0), "{c:?}");
    assert!(c[0] > 0 && c[1] > 0, "{c:?}");
}

#[test]
fn repetition_penalty_flips_argmax_away_from_repeated_token() {
    let mut s = Sampler::new(with(SamplingParams::greedy(), |p| {
        p.repetition_penalty = 1.5
    }));
    assert_eq!(s.sample(&mut [2.0, 1.9, 0.5], &[]), 0);
    assert_eq!(s.sample(&mut [2.0, 1.9, 0.5], &[0, 0]), 1);
    // Negative logits are multiplied, positive ones divided, once per distinct token.
    let s = Sampler::new(with(SamplingParams::greedy(), |p| {
        p.repetition_penalty = 2.0
    }));
    let mut logits = [-1.0, 3.0, 0.5];
    s.apply_penalties(&mut logits, &[0, 1, 1]);
    assert_close(&logits, &[-2.0, 1.5, 0.5]);
}

#[test]
fn penalties_count_the_last_64_tokens() {
    let mut s = Sampler::new(with(SamplingParams::greedy(), |p| {
        p.repetition_penalty = 4.0
    }));
    let mut history = vec![0];
    history.extend([2; 63]);
    assert_eq!(s.sample(&mut [2.0, 1.0, 0.0], &history), 1);
    history.push(2);
    assert_eq!(s.sample(&mut [2.0, 1.0, 0.0], &history), 0);
}

#[test]
fn presence_and_frequency_penalties_subtract_the_right_amounts() {
    let params = with(SamplingParams::greedy(), |p| {
        p.frequency_penalty = 0.5;
        p.presence_penalty = 0.25;
    });
    let mut logits = [1.0; 4];
    // Token 99 is outside the vocabulary and must be ignored.
    Sampler::new(params).apply_penalties(&mut logits, &[0, 0, 0, 2, 99]);
    assert_close(&logits, &[1.0 - 1.5 - 0.25, 1.0, 1.0 - 0.5 - 0.25, 1.0]);
}

#[test]
fn validate_rejects_each_bad_field_by_name() {
    assert_eq!(SamplingParams::default().validate(), Ok(()));
    let edges = SamplingParams {
        temperature: 2.0,
        top_p: 1.0,
        min_p: 1.0,
        repetition_penalty: 10.0,
        frequency_penalty: -2.0,
        presence_penalty: 2.0,
        seed: Some(0),
        ..SamplingParams::default()
    };
    assert_eq!(edges.validate(), Ok(()));
    type Edit = fn(&mut SamplingParams);
    let bad: [(&str, Edit); 13] = [
        ("temperature", |p| p.temperature = 5.5),
        ("temperature", |p| p.temperature = -0.1),
        ("temperature", |p| p.temperature = f32::NAN),
        ("top_p", |p| p.top_p = -0.01),
        ("top_p", |p| p.top_p = 1.01),
        ("min_p", |p| p.min_p = -0.1),
        ("min_p", |p| p.min_p = 1.5),
        ("repetition_penalty", |p| p.repetition_penalty = 0.0),
        ("repetition_penalty", |p| {
            p.repetition_penalty = f32::INFINITY
        }),
        ("frequency_penalty", |p| p.frequency_penalty = 2.5),
        ("presence_penalty", |p| p.presence_penalty = -2.01),
        ("logit_bias", |p| p.logit_bias = vec![(0, 1.0), (3, 100.5)]),
        ("logit_bias", |p| p.logit_bias = vec![(7, f32::NAN)]),
    ];
    for (field, edit) in bad {
        let params = with(SamplingParams::default(), edit);
        match params.validate() {
            Err(SamplingError::OutOfRange { field: got, .. }) => assert_eq!(got, field),
            Ok(()) => panic!("{params:?} should be rejected for `{field}`"),
        }
    }
    let err = with(SamplingParams::default(), |p| p.top_p = 1.5).validate();
    let message = err.map_err(|e| e.to_string());
    assert_eq!(
        message,
        Err("`top_p` must be in [0, 1], got 1.5".to_owned())
    );
}

#[test]
fn temperature_sampling_follows_the_distribution() {
    let probs = [0.2, 0.3, 0.5];
    let n = 5000;
    let c = counts(&draws(seeded(12345), &ln(&probs), n), 3);
    let chi2: f64 = c
        .iter()
        .zip(probs)
        .map(|(&o, p)| {
            let e = f64::from(p) * n as f64;
            (o as f64 - e).powi(2) / e
        })
        .sum();
    // 2 degrees of freedom: p = 0.001 at 13.8; 20 is a loose bound.
    assert!(chi2 < 20.0, "chi2 = {chi2}, counts = {c:?}");
}

#[test]
fn log_softmax_is_correct_and_stable() {
    assert!((log_softmax_of(&[1.0, 2.0, 3.0], 2) - (-0.407_606)).abs() < 1e-5);
    let ln2 = std::f32::consts::LN_2;
    assert!((log_softmax_of(&[1000.0, 1000.0], 0) + ln2).abs() < 1e-6);
    assert_eq!(log_softmax_of(&[1.0, 2.0], 7), f32::NEG_INFINITY);
    let logits = [0.5, -3.0, 2.0, f32::NAN, 7.0];
    let total: f32 = (0..5).map(|t| log_softmax_of(&logits, t).exp()).sum();
    assert!((total - 1.0).abs() < 1e-5, "{total}");
    assert_eq!(log_softmax_of(&logits, 3), f32::NEG_INFINITY);
}

#[test]
fn logit_bias_is_added_before_the_penalties_and_the_pick() {
    let logits = [1.0, 4.0, 2.0, 3.0];
    // Greedy: -100 bans the argmax, +100 forces a token; ids past the vocabulary are ignored.
    let greedy = |bias: Vec<(u32, f32)>| {
        let params = with(SamplingParams::greedy(), |p| p.logit_bias = bias);
        Sampler::new(params).sample(&mut logits.to_vec(), &[])
    };
    assert_eq!(greedy(vec![]), 1);
    assert_eq!(greedy(vec![(1, -100.0)]), 3);
    assert_eq!(greedy(vec![(0, 100.0), (99, 100.0)]), 0);
    // The bias comes first: a repetition penalty of 2 then halves the biased logit
    // (4 + 4 = 8 -> 4, below 4.5); penalising the unbiased one instead would leave 6.
    let params = with(SamplingParams::greedy(), |p| {
        p.logit_bias = vec![(1, 4.0), (3, 1.5)];
        p.repetition_penalty = 2.0;
    });
    let mut l = logits.to_vec();
    assert_eq!(Sampler::new(params).sample(&mut l, &[1]), 3);
    assert_eq!(l, [1.0, 4.0, 2.0, 4.5]);
    // Sampling: a token biased by -100 is never drawn, one biased by +100 always is.
    let banned = with(seeded(7), |p| p.logit_bias = vec![(1, -100.0)]);
    assert_eq!(counts(&draws(banned, &logits, 2000), 4)[1], 0);
    let forced = with(seeded(7), |p| p.logit_bias = vec![(2, 100.0)]);
    assert!(draws(forced, &logits, 500).iter().all(|&t| t == 2));
}
