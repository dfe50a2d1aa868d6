//! Parity with llama.cpp on the real default model: prompt tokens, greedy continuations,
//! tokenizations and the chat template, against `../shared/reference/smollm2-llamacpp.json`.
//!
//! Near-ties: where the best and second-best tokens are within `NEAR_TIE` logprob of each
//! other, a correct implementation with different rounding may pick either (see the
//! reference's `note`). On this 4-bit model a one-ulp change in a single activation function
//! moves top-2 gaps by up to ~0.3 (measured: SiLU written as `x * (1/(1+e^-x))` instead of
//! `x / (1+e^-x)`), so a step counts as a near-tie when either llama.cpp's gap or ours is
//! below `NEAR_TIE`. Everything before the first near-tie must match exactly.

mod common;

use edgeinfer::engine::generate::{generate, GenerateParams};
use edgeinfer::engine::sampler::SamplingParams;
use edgeinfer::model::Message;

const NEAR_TIE: f64 = 0.05;

struct Case {
    prompt: String,
    prompt_tokens: Vec<u32>,
    tokens: Vec<u32>,
    margins: Vec<f64>,
}

fn cases() -> Vec<Case> {
    let reference = common::llamacpp_reference();
    let cases: Vec<Case> = reference["completions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().unwrap().to_string(),
            prompt_tokens: common::ids(&c["prompt_tokens"]),
            tokens: common::ids(&c["tokens"]),
            margins: c["top2_margins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_f64().unwrap())
                .collect(),
        })
        .collect();
    assert!(cases.len() >= 8);
    cases
}

/// Feeds llama.cpp's tokens and returns, per step, our argmax and our top-2 logprob gap.
fn teacher_forced(case: &Case) -> Vec<(u32, f64)> {
    let model = common::default_model();
    let mut cache = model.llama.new_cache();
    let mut logits = model
        .llama
        .forward(&case.prompt_tokens, &mut cache)
        .unwrap();
    let mut steps = Vec::new();
    for &tok in &case.tokens {
        let (mut best, mut second) = (0usize, 1usize);
        if logits[second] > logits[best] {
            std::mem::swap(&mut best, &mut second);
        }
        for (i, &v) in logits.iter().enumerate().skip(2) {
            if v > logits[best] {
                second = best;
                best = i;
            } else if v > logits[second] {
                second = i;
            }
        }
        // A gap between logits is the gap between logprobs.
        steps.push((best as u32, (logits[best] - logits[second]) as f64));
        logits = model.llama.forward(&[tok], &mut cache).unwrap();
    }
    steps
}

#[test]
fn greedy_continuations_match_llamacpp() {
    let model = common::default_model();
    let mut compared = 0;
    let mut agreed_forced = 0;
    let mut clear_steps = 0;
    let mut gap_error = 0.0;
    for case in cases() {
        let prompt_ids = model.tokenizer.encode(&case.prompt, true).unwrap();
        assert_eq!(
            prompt_ids, case.prompt_tokens,
            "prompt tokens of {:?}",
            case.prompt
        );

        // 1. Free-running greedy generation equals llama.cpp's up to the first near-tie.
        let forced = teacher_forced(&case);
        let first_tie = (0..case.tokens.len())
            .find(|&i| case.margins[i] < NEAR_TIE || forced[i].1 < NEAR_TIE)
            .unwrap_or(case.tokens.len());
        let params = GenerateParams {
            max_tokens: case.tokens.len(),
            sampling: SamplingParams::greedy(),
            stop: vec![],
        };
        let out = generate(model, &prompt_ids, &params, |_| {}).unwrap();
        // llama.cpp records the end-of-turn token it stopped on; we report it apart.
        let got: Vec<u32> = out.tokens.iter().copied().chain(out.stop_token).collect();
        assert!(got.len() >= first_tie, "{:?}: too few tokens", case.prompt);
        assert_eq!(
            got[..first_tie],
            case.tokens[..first_tie],
            "{:?}: greedy tokens differ before the first near-tie (step {first_tie})",
            case.prompt
        );
        compared += first_tie;

        // 2. With llama.cpp's tokens fed back, our argmax agrees at every clear step, and our
        //    top-2 gaps track llama.cpp's.
        for (i, &(ours, gap)) in forced.iter().enumerate() {
            gap_error += (gap - case.margins[i]).abs();
            if case.margins[i] >= NEAR_TIE && gap >= NEAR_TIE {
                clear_steps += 1;
                if ours == case.tokens[i] {
                    agreed_forced += 1;
                } else {
                    panic!(
                        "{:?} step {i}: we pick {ours}, llama.cpp {} (gaps: ours {gap:.3}, llama.cpp {:.3})",
                        case.prompt, case.tokens[i], case.margins[i]
                    );
                }
            }
        }
    }
    let mean_gap_error = gap_error / clear_steps.max(1) as f64;
    println!("compared {compared} free-running tokens; {agreed_forced}/{clear_steps} teacher-forced steps agree; mean |gap difference| {mean_gap_error:.3}");
    // The comparison must cover real ground, not just the steps before early near-ties.
    assert!(compared >= 140, "only {compared} tokens compared");
    assert!(clear_steps >= 200, "only {clear_steps} clear steps");
    // Measured 0.118 on 2026-11-26 (llama.cpp-exact quantization and attention).
    assert!(
        mean_gap_error < 0.15,
        "top-2 gaps drift from llama.cpp's: {mean_gap_error:.3}"
    );
}

#[test]
fn tokenizations_match_llamacpp() {
    let model = common::default_model();
    let reference = common::llamacpp_reference();
    let cases = reference["tokenizations"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let got = model.tokenizer.encode(text, false).unwrap();
        assert_eq!(got, common::ids(&case["tokens"]), "tokens of {text:?}");
        // Control tokens are dropped when decoding, so only plain text round-trips.
        if !text.contains("<|") {
            let back = model.tokenizer.decode(&got).unwrap();
            assert_eq!(back, text, "round trip of {text:?}");
        }
    }
}

#[test]
fn chat_template_renders_like_llamacpp() {
    let model = common::default_model();
    let reference = common::llamacpp_reference();
    let tpl = &reference["chat_template"];
    let messages: Vec<Message> = serde_json::from_value(tpl["messages"].clone()).unwrap();
    assert!(model.template_from_file);
    let add = tpl["add_generation_prompt"].as_bool().unwrap();
    let rendered = model.template.render(&messages, add).unwrap();
    assert_eq!(rendered, tpl["rendered_prompt"].as_str().unwrap());
    let ids = model.tokenizer.encode(&rendered, false).unwrap();
    assert_eq!(ids, common::ids(&tpl["rendered_prompt_tokens"]));
}
