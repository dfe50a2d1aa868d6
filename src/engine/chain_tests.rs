//! llama.cpp's chain on hand-made logits (no model).
use super::*;
use crate::engine::sampler::Sampler;

fn ln(probs: &[f32]) -> Vec<f32> {
    probs.iter().map(|p| p.ln()).collect()
}

/// A seeded sampler with llama.cpp's chain: `temperature` 1, every OpenAI filter off.
fn llama(edit: impl FnOnce(&mut SamplingParams, &mut ChainParams)) -> SamplingParams {
    let mut p = SamplingParams {
        temperature: 1.0,
        seed: Some(7),
        llama_cpp_order: true,
        ..SamplingParams::default()
    };
    let mut c = ChainParams::default();
    edit(&mut p, &mut c);
    p.llama = Some(c);
    p
}

/// How often each token is drawn in `n` steps of one sampler (its state carried along).
fn counts(params: SamplingParams, logits: &[f32], history: &[u32], n: usize) -> Vec<usize> {
    let mut s = Sampler::new(params);
    let mut c = vec![0; logits.len()];
    for _ in 0..n {
        c[s.sample(&mut logits.to_vec(), history) as usize] += 1;
    }
    c
}

#[test]
fn z_array_matches_the_naive_one() {
    let mut state = 12345u64;
    for len in 0..40 {
        let s: Vec<u32> = (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % 3) as u32
            })
            .collect();
        let naive: Vec<usize> = (0..len)
            .map(|k| (0..len - k).take_while(|&i| s[i] == s[k + i]).count())
            .collect();
        assert_eq!(z_array(&s), naive, "{s:?}");
    }
}

/// DRY's logits for `history` over the tokens a b c y (0..4), all at 0 before.
fn dry_logits(history: &[u32], breakers: Vec<(u32, Vec<u32>)>, last_n: Option<usize>) -> Vec<f32> {
    let d = DryParams {
        multiplier: 0.5,
        base: 2.0,
        allowed_length: 2,
        last_n,
        breakers,
    };
    let mut cands = Cands {
        c: (0..4)
            .map(|id| Candidate {
                id,
                logit: 0.0,
                p: 0.0,
            })
            .collect(),
        sorted: false,
    };
    dry(&d, &mut cands, history);
    cands.c.sort_by_key(|c| c.id);
    cands.c.iter().map(|c| c.logit).collect()
}

#[test]
fn dry_penalises_what_would_extend_a_repetition() {
    const A: u32 = 0;
    const B: u32 = 1;
    const C: u32 = 2;
    const Y: u32 = 3;
    // a b c c b c y a b c: `a b c` stood before, followed by c (3 tokens long: 0.5 * 2^1);
    // `b c` stood before y (2 long: 0.5 * 2^0); `c` alone is shorter than allowed.
    let h = [A, B, C, C, B, C, Y, A, B, C];
    assert_eq!(dry_logits(&h, Vec::new(), None), [0.0, 0.0, -1.0, -0.5]);
    // The window leaves the first a out: c follows `b c` there, 2 long.
    assert_eq!(dry_logits(&h, Vec::new(), Some(9)), [0.0, 0.0, -0.5, -0.5]);
    // Too short a window to hold a repetition longer than allowed.
    assert_eq!(dry_logits(&h, Vec::new(), Some(2)), [0.0; 4]);
    // y as a breaker: the repetition may still reach back to it (3 tokens after it), and y
    // itself is never penalised.
    assert_eq!(
        dry_logits(&h, vec![(Y, vec![])], None),
        [0.0, 0.0, -1.0, 0.0]
    );
    // a as a breaker: only `b c` after it counts, so c's repetition is 2 long.
    assert_eq!(
        dry_logits(&h, vec![(A, vec![])], None),
        [0.0, 0.0, -0.5, -0.5]
    );
    // A huge base is clamped to stay finite: 10^10 to at most the 3rd power.
    let d = DryParams {
        multiplier: 1.0,
        base: 1e10,
        allowed_length: 2,
        last_n: None,
        breakers: Vec::new(),
    };
    let mut cands = Cands {
        c: vec![Candidate {
            id: A,
            logit: 0.0,
            p: 0.0,
        }],
        sorted: false,
    };
    dry(&d, &mut cands, &[A, B, A, B, A, B, A, B, A, B, A, B]);
    assert!(
        (cands.c[0].logit + 1e30).abs() < 1e25,
        "{}",
        cands.c[0].logit
    );
    // b followed by c as a two-token breaker ends the sequence: nothing after it to repeat.
    assert_eq!(dry_logits(&h, vec![(B, vec![C])], None), [0.0; 4]);
    // ... but b followed by y never stands there: no limit.
    assert_eq!(
        dry_logits(&h, vec![(B, vec![Y])], None),
        [0.0, 0.0, -1.0, -0.5]
    );
}

#[test]
fn typical_p_keeps_the_tokens_nearest_the_entropy() {
    // Entropy 1.142 nats: token 1 (surprise 1.204) is nearest, then token 0 (0.693).
    let logits = ln(&[0.5, 0.3, 0.15, 0.05]);
    let c = counts(llama(|_, c| c.typical_p = 0.2), &logits, &[], 200);
    assert_eq!(c, [0, 200, 0, 0]);
    let c = counts(llama(|_, c| c.typical_p = 0.5), &logits, &[], 400);
    assert!(c[0] > 0 && c[1] > 0 && c[2] + c[3] == 0, "{c:?}");
    // min_keep holds three.
    let c = counts(
        llama(|_, c| {
            c.typical_p = 0.2;
            c.min_keep = 3;
        }),
        &logits,
        &[],
        400,
    );
    assert!(c[2] > 0 && c[3] == 0, "{c:?}");
    // Left out of `samplers`, it does not run.
    let c = counts(
        llama(|_, c| {
            c.typical_p = 0.2;
            c.steps.retain(|s| *s != Step::TypicalP);
        }),
        &logits,
        &[],
        400,
    );
    assert!(c.iter().all(|&n| n > 0), "{c:?}");
}

#[test]
fn top_n_sigma_keeps_logits_near_the_top() {
    // Mean 0.35, deviation 0.709: within one of 2.0, only 2.0 and 1.5.
    let mut logits = vec![2.0, 1.5];
    logits.extend([0.0; 8]);
    let c = counts(llama(|_, c| c.top_n_sigma = 1.0), &logits, &[], 400);
    assert!(
        c[0] > 0 && c[1] > 0 && c[2..].iter().all(|&n| n == 0),
        "{c:?}"
    );
    let c = counts(llama(|_, _| {}), &logits, &[], 400);
    assert!(c[2..].iter().any(|&n| n > 0), "{c:?}");
}

#[test]
fn xtc_removes_the_top_choices_but_the_least_of_them() {
    let logits = ln(&[0.5, 0.3, 0.15, 0.05]);
    let on = |threshold: f32, min_keep: usize| {
        llama(move |_, c| {
            c.xtc_probability = 1.0;
            c.xtc_threshold = threshold;
            c.min_keep = min_keep;
        })
    };
    // 0, 1 and 2 are at 0.1 or more: 0 and 1 go.
    let c = counts(on(0.1, 0), &logits, &[], 400);
    assert!(c[0] + c[1] == 0 && c[2] > 0 && c[3] > 0, "{c:?}");
    // Only one above the threshold, or too few left, or a threshold past 0.5: no change.
    for params in [on(0.4, 0), on(0.1, 3), on(0.6, 0)] {
        let c = counts(params, &logits, &[], 400);
        assert!(c.iter().all(|&n| n > 0), "{c:?}");
    }
    // Greedy after it: the top choice is the one XTC left.
    let c = counts(
        llama(|p, c| {
            p.temperature = 0.0;
            c.xtc_probability = 1.0;
        }),
        &logits,
        &[],
        20,
    );
    assert_eq!(c, [0, 0, 20, 0]);
    assert!(!llama(|p, c| {
        p.temperature = 0.0;
        p.seed = None;
        c.xtc_probability = 1.0;
    })
    .is_deterministic());
}

#[test]
fn mirostat_2_truncates_at_its_target_and_learns() {
    let logits = ln(&[0.5, 0.3, 0.15, 0.05]);
    // A target of 0.5 bits starts mu at 1: only tokens of 1 bit or less (0.5) stay.
    let v2 = |eta: f32| {
        llama(move |_, c| {
            c.mirostat = 2;
            c.mirostat_tau = 0.5;
            c.mirostat_eta = eta;
        })
    };
    assert_eq!(counts(v2(0.0), &logits, &[], 100), [100, 0, 0, 0]);
    // mu starts at twice the target: 1 bit keeps token 1 (1.74 bits) but not token 2 (2.74).
    let twice = llama(|_, c| {
        c.mirostat = 2;
        c.mirostat_tau = 1.0;
        c.mirostat_eta = 0.0;
    });
    let c = counts(twice, &logits, &[], 400);
    assert!(c[1] > 0 && c[2] + c[3] == 0, "{c:?}");
    // Each pick is less surprising than the target, so mu grows and lets more in.
    let c = counts(v2(1.0), &logits, &[], 100);
    assert!(c[1] > 0, "{c:?}");
    // The other filters do not run under Mirostat.
    let c = counts(
        llama(|p, c| {
            p.top_k = 1;
            c.mirostat = 2;
            c.mirostat_tau = 5.0;
        }),
        &logits,
        &[],
        400,
    );
    assert!(c.iter().all(|&n| n > 0), "{c:?}");
}

#[test]
fn mirostat_1_picks_from_the_vocabulary_and_repeats_with_its_seed() {
    let logits = ln(&[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]);
    let v1 = |tau: f32| {
        llama(move |_, c| {
            c.mirostat = 1;
            c.mirostat_tau = tau;
        })
    };
    let a = counts(v1(5.0), &logits, &[], 300);
    assert_eq!(a, counts(v1(5.0), &logits, &[], 300));
    assert_eq!(a.iter().sum::<usize>(), 300);
    assert!(a.iter().filter(|&&n| n > 0).count() > 2, "{a:?}");
    // A target near 0 bits keeps the top token alone.
    let c = counts(v1(0.01), &logits, &[], 100);
    assert_eq!(c[0], 100, "{c:?}");
    // Zipf's exponent from these probabilities is 1.035; with mu at 2 and 3 bits (targets
    // of 1 and 1.5) the k that reaches it is 2.24 and 4.38: two and four tokens.
    let fixed = |tau: f32| {
        llama(move |_, c| {
            c.mirostat = 1;
            c.mirostat_tau = tau;
            c.mirostat_eta = 0.0;
        })
    };
    let c = counts(fixed(1.0), &logits, &[], 400);
    assert!(c[1] > 0 && c[2..].iter().all(|&n| n == 0), "{c:?}");
    let c = counts(fixed(1.5), &logits, &[], 600);
    assert!(c[3] > 0 && c[4] + c[5] == 0, "{c:?}");
}

#[test]
fn penalties_count_their_window() {
    // Token 0 leads, but was seen: a repetition penalty of 4 puts it below token 1.
    let logits = [2.0, 1.0, 0.0];
    let greedy = |last_n: Option<usize>| {
        llama(move |p, c| {
            p.temperature = 0.0;
            p.repetition_penalty = 4.0;
            c.penalty_last_n = last_n;
        })
    };
    let mut history = vec![0];
    history.extend([2; 10]);
    assert_eq!(counts(greedy(Some(64)), &logits, &history, 1), [0, 1, 0]);
    assert_eq!(counts(greedy(Some(10)), &logits, &history, 1), [1, 0, 0]);
    assert_eq!(counts(greedy(Some(0)), &logits, &history, 1), [1, 0, 0]);
    history.extend([2; 100]);
    // Past the default 64, unless the window is the whole sequence.
    assert_eq!(counts(greedy(Some(64)), &logits, &history, 1), [1, 0, 0]);
    assert_eq!(counts(greedy(None), &logits, &history, 1), [0, 1, 0]);
    // After top-k 1 in `samplers`' order, the penalty comes too late to matter.
    let late = llama(|p, c| {
        p.temperature = 0.0;
        p.repetition_penalty = 4.0;
        p.top_k = 1;
        c.steps = vec![Step::TopK, Step::Penalties, Step::Temperature];
    });
    assert_eq!(counts(late, &logits, &[0], 1), [1, 0, 0]);
}

#[test]
fn dynamic_temperature_follows_the_entropy() {
    // At temperature 0 with a range of 1: a flat distribution (entropy at its most) is
    // drawn at 1, a peaked one near 0.
    let dyn_t = llama(|p, c| {
        p.temperature = 0.0;
        c.dynatemp_range = 1.0;
    });
    let c = counts(dyn_t.clone(), &[0.0; 4], &[], 400);
    assert!(c.iter().all(|&n| n > 50), "{c:?}");
    // Entropy at 38% of its most: squared (the exponent), a temperature of 0.15, where 1
    // would draw the others 13% of the time.
    let peaked = [3.0, 0.0, 0.0, 0.0];
    let sharp = llama(|p, c| {
        p.temperature = 0.0;
        c.dynatemp_range = 1.0;
        c.dynatemp_exponent = 2.0;
    });
    assert_eq!(counts(sharp.clone(), &peaked, &[], 400)[0], 400);
    let c = counts(llama(|_, _| {}), &peaked, &[], 400);
    assert!(c[0] < 380, "{c:?}");
    // Random at a temperature of 0: never replayed from a cache without a seed.
    assert!(!SamplingParams {
        seed: None,
        ..sharp
    }
    .is_deterministic());
    let plain = llama(|p, _| {
        p.temperature = 0.0;
        p.seed = None;
    });
    assert!(plain.is_deterministic());
}

#[test]
fn min_keep_holds_top_p_and_min_p_open() {
    let logits = ln(&[0.5, 0.3, 0.15, 0.05]);
    let c = counts(llama(|p, _| p.top_p = 0.0), &logits, &[], 100);
    assert_eq!(c, [100, 0, 0, 0]);
    let c = counts(
        llama(|p, c| {
            p.min_p = 0.9;
            c.min_keep = 2;
        }),
        &logits,
        &[],
        400,
    );
    assert!(c[1] > 0 && c[2] + c[3] == 0, "{c:?}");
    let c = counts(
        llama(|p, c| {
            p.top_p = 0.0;
            c.min_keep = 3;
        }),
        &logits,
        &[],
        400,
    );
    assert!(c[2] > 0 && c[3] == 0, "{c:?}");
}

#[test]
fn chain_settings_out_of_range_are_refused() {
    for edit in [
        (|c: &mut ChainParams| c.xtc_probability = 1.5) as fn(&mut ChainParams),
        |c| c.mirostat = 3,
        |c| c.typical_p = f32::NAN,
        |c| {
            c.dry = Some(DryParams {
                multiplier: -1.0,
                base: 1.75,
                allowed_length: 2,
                last_n: None,
                breakers: Vec::new(),
            })
        },
    ] {
        assert!(llama(|_, c| edit(c)).validate().is_err());
    }
    assert!(llama(|_, _| {}).validate().is_ok());
}

#[test]
fn final_probs_keep_the_chains_distribution() {
    let logits = ln(&[0.5, 0.3, 0.15, 0.05]);
    let mut s = Sampler::new(llama(|p, c| {
        p.top_k = 2;
        c.final_probs = true;
    }));
    for _ in 0..20 {
        let t = s.sample(&mut logits.clone(), &[]);
        let (p, top) = s.final_probs().unwrap();
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [0, 1]);
        assert!((top[0].1 - 0.625).abs() < 1e-6 && (top[1].1 - 0.375).abs() < 1e-6);
        assert_eq!(p, top[t as usize].1);
    }
    // Mirostat's truncation too: a target of 1 bit keeps 0 and 1.
    let mut s = Sampler::new(llama(|_, c| {
        c.mirostat = 2;
        c.mirostat_tau = 1.0;
        c.mirostat_eta = 0.0;
        c.final_probs = true;
    }));
    s.sample(&mut logits.clone(), &[]);
    assert_eq!(s.final_probs().unwrap().1.len(), 2);
    // Not asked: none kept.
    let mut s = Sampler::new(llama(|_, _| {}));
    s.sample(&mut logits.clone(), &[]);
    assert!(s.final_probs().is_none());
}
