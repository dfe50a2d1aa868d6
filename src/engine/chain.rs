//! llama.cpp's sampler chain, for its own endpoints (`/completion`, `/infill`): the steps
//! its `samplers` names, in that order, over a list of candidates, then the draw; or
//! Mirostat (1 or 2) after the temperature in place of the chain, as llama.cpp builds it.
//!
//! Owns: the repetition penalties over `penalty_last_n`, DRY, top-n-sigma, top-k,
//! locally typical sampling, top-p, min-p, XTC, the (dynamic) temperature, Mirostat and its
//! running target. Each step reads as llama.cpp's sampler of that name: the same
//! thresholds, the same `min_keep`, the same cases that turn it off.
//!
//! Must not know: the tokenizer. DRY's sequence breakers come as token sequences, made by
//! the API from the breaker strings.

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

#[path = "chain_dry.rs"]
mod dry;
use dry::dry;
#[cfg(test)]
use dry::z_array;

use super::sampler::{
    by_logit_desc, candidates, draw_index, penalized, softmax, Candidate, SamplingError,
    SamplingParams,
};

/// One of the chain's steps (llama.cpp's `samplers` names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Penalties,
    Dry,
    TopNSigma,
    TopK,
    TypicalP,
    TopP,
    MinP,
    Xtc,
    Temperature,
}

impl Step {
    /// llama.cpp's default order.
    pub const DEFAULT: [Step; 9] = [
        Step::Penalties,
        Step::Dry,
        Step::TopNSigma,
        Step::TopK,
        Step::TypicalP,
        Step::TopP,
        Step::MinP,
        Step::Xtc,
        Step::Temperature,
    ];
}

/// llama.cpp's sampler settings beyond the OpenAI fields [`SamplingParams`] has (its
/// `top_k`, `top_p`, `min_p`, `temperature` and penalties are those). Defaults: llama.cpp's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChainParams {
    /// The steps in order; one left out does not run.
    pub steps: Vec<Step>,
    /// The fewest candidates top-p, min-p, typical-p and XTC leave (0: one).
    pub min_keep: usize,
    /// Locally typical sampling's mass; `>= 1` is off.
    pub typical_p: f32,
    /// Keep logits within this many standard deviations of the top one; `<= 0` is off.
    pub top_n_sigma: f32,
    /// XTC: the chance that it runs at a step (0 is off), and the probability from which the
    /// most likely tokens are removed (all but the least likely of them; `> 0.5` is off).
    pub xtc_probability: f32,
    pub xtc_threshold: f32,
    /// Dynamic temperature: the temperature moves within `temperature ± range` with the
    /// distribution's normalised entropy raised to `exponent`; a range `<= 0` is off.
    pub dynatemp_range: f32,
    pub dynatemp_exponent: f32,
    /// How many of the sequence's last tokens the penalties count (`None`: all of them).
    pub penalty_last_n: Option<usize>,
    /// 0: the chain; 1 or 2: Mirostat of that version after the temperature, instead.
    pub mirostat: u8,
    /// Mirostat's target surprise (bits) and learning rate.
    pub mirostat_tau: f32,
    pub mirostat_eta: f32,
    /// DRY's settings; `None` is off.
    pub dry: Option<DryParams>,
    /// Keep each pick's probability and the likeliest tokens after the chain
    /// ([`ChainState::final_probs`]; llama.cpp's `post_sampling_probs`).
    pub final_probs: bool,
}

impl Default for ChainParams {
    fn default() -> Self {
        Self {
            steps: Step::DEFAULT.to_vec(),
            min_keep: 0,
            typical_p: 1.0,
            top_n_sigma: -1.0,
            xtc_probability: 0.0,
            xtc_threshold: 0.1,
            dynatemp_range: 0.0,
            dynatemp_exponent: 1.0,
            penalty_last_n: Some(64),
            mirostat: 0,
            mirostat_tau: 5.0,
            mirostat_eta: 0.1,
            dry: None,
            final_probs: false,
        }
    }
}

impl ChainParams {
    /// Checks the settings llama.cpp bounds (field names are its own); the rest read any
    /// finite number, as llama.cpp does (its "off" values included).
    pub fn validate(&self) -> Result<(), SamplingError> {
        let err = |field: &'static str, expected: &'static str, value: f32| {
            Err(SamplingError::OutOfRange {
                field,
                expected,
                value: value.to_string(),
            })
        };
        for (field, v) in [
            ("xtc_probability", self.xtc_probability),
            ("xtc_threshold", self.xtc_threshold),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return err(field, "in [0, 1]", v);
            }
        }
        for (field, v) in [
            ("typical_p", self.typical_p),
            ("top_n_sigma", self.top_n_sigma),
            ("dynatemp_range", self.dynatemp_range),
            ("dynatemp_exponent", self.dynatemp_exponent),
            ("mirostat_tau", self.mirostat_tau),
            ("mirostat_eta", self.mirostat_eta),
        ] {
            if !v.is_finite() {
                return err(field, "a finite number", v);
            }
        }
        if self.mirostat > 2 {
            return err("mirostat", "0, 1 or 2", f32::from(self.mirostat));
        }
        if let Some(d) = &self.dry {
            if !d.multiplier.is_finite() || d.multiplier < 0.0 {
                return err("dry_multiplier", "a finite number >= 0", d.multiplier);
            }
            if !d.base.is_finite() {
                return err("dry_base", "a finite number", d.base);
            }
        }
        Ok(())
    }

    /// Whether the pick is random even at a temperature of 0: XTC draws whether to run, a
    /// dynamic temperature moves above 0, and without the temperature step the draw is at 1.
    pub fn random_at_zero(&self) -> bool {
        let xtc = self.steps.contains(&Step::Xtc)
            && self.xtc_probability > 0.0
            && self.xtc_threshold <= 0.5;
        let temperature = self.steps.contains(&Step::Temperature);
        self.mirostat == 0 && (xtc || !temperature || self.dynatemp_range > 0.0)
    }
}

/// DRY ("don't repeat yourself"): a token that would extend a sequence already seen, longer
/// than `allowed_length`, loses `multiplier * base^(length - allowed_length)` of its logit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DryParams {
    pub multiplier: f32,
    pub base: f32,
    pub allowed_length: usize,
    /// How many of the sequence's last tokens it looks at (`None`: all of them).
    pub last_n: Option<usize>,
    /// Sequence breakers as a head token and the tokens that must follow it (none: the head
    /// alone is one), sorted; a repetition never reaches back across one.
    pub breakers: Vec<(u32, Vec<u32>)>,
}

/// What a chain keeps from step to step: Mirostat's running target, and (when asked) the
/// last pick's probability after the chain with the [`FINAL_KEPT`] likeliest tokens then.
#[derive(Debug, Clone, Default)]
pub struct ChainState {
    mu: Option<f32>,
    last: Option<(f32, Vec<(u32, f32)>)>,
}

/// How many of the final distribution's likeliest tokens are kept (the most `n_probs` asks).
pub const FINAL_KEPT: usize = 20;

impl ChainState {
    /// The last pick's probability after the chain, and the likeliest tokens then (most
    /// likely first, lowest id among equals; none at 0).
    pub fn final_probs(&self) -> Option<(f32, &[(u32, f32)])> {
        self.last.as_ref().map(|(p, top)| (*p, top.as_slice()))
    }

    /// Keeps pick `i` of the candidates' final distribution (their `p`).
    fn keep(&mut self, c: &[Candidate], i: usize) {
        let mut top: Vec<(u32, f32)> = c
            .iter()
            .filter(|c| c.p > 0.0)
            .map(|c| (c.id, c.p))
            .collect();
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if top.len() > FINAL_KEPT {
            top.select_nth_unstable_by(FINAL_KEPT - 1, order);
            top.truncate(FINAL_KEPT);
        }
        top.sort_unstable_by(order);
        self.last = Some((c[i].p, top));
    }
}

/// The candidates and whether they are sorted by logit, highest first.
struct Cands {
    c: Vec<Candidate>,
    sorted: bool,
}

impl Cands {
    /// Fills `p` with the softmax of the logits, sorting first when asked.
    fn probs(&mut self, sort: bool) {
        if sort && !self.sorted {
            self.c.sort_unstable_by(by_logit_desc);
            self.sorted = true;
        }
        softmax(&mut self.c, 1.0);
    }

    /// llama.cpp's temperature: the logits divided by it; `<= 0` keeps the top one alone.
    fn scale(&mut self, t: f32) {
        if t <= 0.0 {
            if let Some(top) = self.c.iter().copied().min_by(by_logit_desc) {
                self.c = vec![top];
                self.sorted = true;
            }
            return;
        }
        for c in &mut self.c {
            c.logit /= t;
        }
    }
}

/// Picks the next token with llama.cpp's chain (the logit bias already added): the steps
/// in order, then the draw; or the temperature and Mirostat. `masked`: `-inf` logits are no
/// candidates (a grammar's mask). `history`: the sequence so far, prompt included.
pub(super) fn pick(
    p: &SamplingParams,
    chain: &ChainParams,
    state: &mut ChainState,
    rng: &mut StdRng,
    logits: &[f32],
    history: &[u32],
    masked: bool,
) -> u32 {
    state.last = None;
    let c = candidates(logits, masked);
    // Nothing to draw from (every logit NaN or masked): token 0, alone.
    let none = |state: &mut ChainState| {
        if chain.final_probs {
            state.last = Some((1.0, Vec::new()));
        }
        0
    };
    if c.is_empty() {
        return none(state);
    }
    let mut cands = Cands { c, sorted: false };
    if chain.mirostat != 0 {
        cands.scale(p.temperature);
        let mu = state.mu.get_or_insert(2.0 * chain.mirostat_tau);
        let i = mirostat(chain, mu, &mut cands, logits.len(), rng);
        if chain.final_probs {
            state.keep(&cands.c, i);
        }
        return cands.c[i].id;
    }
    for step in &chain.steps {
        match step {
            Step::Penalties => penalties(p, chain.penalty_last_n, &mut cands, history),
            Step::Dry => {
                if let Some(d) = &chain.dry {
                    dry(d, &mut cands, history);
                }
            }
            Step::TopNSigma => top_n_sigma(chain.top_n_sigma, &mut cands),
            Step::TopK => top_k(p.top_k, &mut cands),
            Step::TypicalP => typical(chain.typical_p, chain.min_keep, &mut cands),
            Step::TopP => top_p(p.top_p, chain.min_keep, &mut cands),
            Step::MinP => min_p(p.min_p, chain.min_keep, &mut cands),
            Step::Xtc => xtc(chain, &mut cands, rng),
            Step::Temperature => temperature(p.temperature, chain, &mut cands),
        }
        if cands.c.is_empty() {
            return none(state);
        }
    }
    cands.probs(false);
    let i = draw_index(rng, &cands.c).unwrap_or(0);
    if chain.final_probs {
        state.keep(&cands.c, i);
    }
    cands.c[i].id
}

/// The repetition, frequency and presence penalties over the last `last_n` tokens.
fn penalties(p: &SamplingParams, last_n: Option<usize>, cands: &mut Cands, history: &[u32]) {
    let n = last_n.map_or(history.len(), |n| n.min(history.len()));
    let off =
        p.repetition_penalty == 1.0 && p.frequency_penalty == 0.0 && p.presence_penalty == 0.0;
    if n == 0 || off {
        return;
    }
    let mut counts = std::collections::HashMap::new();
    for &t in &history[history.len() - n..] {
        *counts.entry(t).or_insert(0u32) += 1;
    }
    for c in &mut cands.c {
        if let Some(&count) = counts.get(&c.id) {
            c.logit = penalized(p, c.logit, count);
        }
    }
    cands.sorted = false;
}

/// The entropy (nats) of the candidates' `p`.
fn entropy(c: &[Candidate]) -> f64 {
    c.iter()
        .filter(|c| c.p > 0.0)
        .map(|c| -f64::from(c.p) * f64::from(c.p).ln())
        .sum()
}

/// Keeps the logits within `n` standard deviations of the top one.
fn top_n_sigma(n: f32, cands: &mut Cands) {
    if n <= 0.0 || cands.c.len() <= 1 {
        return;
    }
    let finite: Vec<f64> = cands
        .c
        .iter()
        .filter(|c| c.logit != f32::NEG_INFINITY)
        .map(|c| f64::from(c.logit))
        .collect();
    if finite.is_empty() {
        return;
    }
    let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mean = finite.iter().sum::<f64>() / finite.len() as f64;
    let var = finite.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / finite.len() as f64;
    let floor = max - f64::from(n) * var.sqrt();
    cands.c.retain(|c| f64::from(c.logit) >= floor);
}

fn top_k(k: usize, cands: &mut Cands) {
    if k == 0 {
        return;
    }
    if k < cands.c.len() {
        if !cands.sorted {
            cands.c.select_nth_unstable_by(k - 1, by_logit_desc);
            cands.c.truncate(k);
        } else {
            cands.c.truncate(k);
        }
    }
    if !cands.sorted {
        cands.c.sort_unstable_by(by_logit_desc);
        cands.sorted = true;
    }
}

/// Locally typical sampling: the tokens whose surprise is closest to the distribution's
/// entropy, in that order, until their mass passes `mass`.
fn typical(mass: f32, min_keep: usize, cands: &mut Cands) {
    if mass >= 1.0 {
        return;
    }
    cands.probs(true);
    let entropy = entropy(&cands.c);
    let mut order: Vec<(f64, Candidate)> = cands
        .c
        .iter()
        .map(|c| ((-f64::from(c.p).ln() - entropy).abs(), *c))
        .collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut sum = 0.0f64;
    let mut keep = order.len();
    for (i, (_, c)) in order.iter().enumerate() {
        sum += f64::from(c.p);
        if sum > f64::from(mass) && (min_keep == 0 || i + 1 >= min_keep) {
            keep = i + 1;
            break;
        }
    }
    order.truncate(keep);
    cands.c = order.into_iter().map(|(_, c)| c).collect();
    cands.sorted = false;
}

/// Nucleus: the most likely tokens until their mass reaches `mass`.
fn top_p(mass: f32, min_keep: usize, cands: &mut Cands) {
    if mass >= 1.0 {
        return;
    }
    cands.probs(true);
    let mut sum = 0.0f64;
    let mut keep = cands.c.len();
    for (i, c) in cands.c.iter().enumerate() {
        sum += f64::from(c.p);
        if sum >= f64::from(mass) && i + 1 >= min_keep {
            keep = i + 1;
            break;
        }
    }
    cands.c.truncate(keep);
}

/// Drops the tokens less likely than `ratio` times the most likely one (at least
/// `min_keep` stay).
fn min_p(ratio: f32, min_keep: usize, cands: &mut Cands) {
    if ratio <= 0.0 || cands.c.is_empty() {
        return;
    }
    let max = cands.c.iter().map(|c| c.logit).fold(f32::MIN, f32::max);
    let floor = max + ratio.ln();
    let kept = cands.c.iter().filter(|c| c.logit >= floor).count();
    if kept >= min_keep.max(1) {
        cands.c.retain(|c| c.logit >= floor);
        return;
    }
    if !cands.sorted {
        cands.c.sort_unstable_by(by_logit_desc);
        cands.sorted = true;
    }
    let keep = (1..cands.c.len())
        .find(|&i| cands.c[i].logit < floor && i >= min_keep)
        .unwrap_or(cands.c.len());
    cands.c.truncate(keep);
}

/// XTC ("exclude top choices"): at a chance of `xtc_probability`, every token at or above
/// `xtc_threshold` but the least likely of them is removed.
fn xtc(chain: &ChainParams, cands: &mut Cands, rng: &mut StdRng) {
    let (chance, threshold) = (chain.xtc_probability, chain.xtc_threshold);
    if chance <= 0.0 || threshold > 0.5 || cands.c.len() < 2 {
        return;
    }
    if rng.gen::<f32>() > chance {
        return;
    }
    cands.probs(true);
    let last = cands.c.iter().take_while(|c| c.p >= threshold).count();
    let last = last.saturating_sub(1);
    if last > 0 && cands.c.len() - last >= chain.min_keep {
        cands.c.drain(..last);
    }
}

/// The temperature, or with `dynatemp_range` one set by the distribution's entropy.
fn temperature(t: f32, chain: &ChainParams, cands: &mut Cands) {
    let range = chain.dynatemp_range;
    if range <= 0.0 {
        cands.scale(t);
        return;
    }
    if cands.c.len() <= 1 {
        return;
    }
    let (lo, hi) = ((t - range).max(0.0), t + range);
    let max_entropy = (cands.c.len() as f64).ln();
    cands.probs(true);
    let entropy = entropy(&cands.c);
    let norm = (entropy / max_entropy) as f32;
    cands.scale(lo + (hi - lo) * norm.powf(chain.dynatemp_exponent));
}

/// Mirostat 1 or 2 (after the temperature): truncates to reach the target surprise `mu`,
/// draws (the pick's index is returned), then moves `mu` by the learning rate times the
/// draw's surprise error.
fn mirostat(
    chain: &ChainParams,
    mu: &mut f32,
    cands: &mut Cands,
    n_vocab: usize,
    rng: &mut StdRng,
) -> usize {
    cands.probs(true);
    if chain.mirostat == 1 {
        // Zipf's exponent estimated from the top 100 tokens, then the k that gives `mu`.
        let (mut tb, mut tt) = (0.0f32, 0.0f32);
        for i in 0..cands.c.len().saturating_sub(1).min(99) {
            let t = ((i + 2) as f32 / (i + 1) as f32).ln();
            let b = (cands.c[i].p / cands.c[i + 1].p).ln();
            tb += t * b;
            tt += t * t;
        }
        let s = tb / tt;
        let eps = s - 1.0;
        let k = ((eps * 2f32.powf(*mu)) / (1.0 - (n_vocab as f32).powf(-eps))).powf(1.0 / s);
        let k = if k.is_finite() && k >= 1.0 {
            k as usize
        } else {
            1
        };
        cands.c.truncate(k.max(1));
    } else {
        let keep = cands
            .c
            .iter()
            .position(|c| -c.p.log2() > *mu)
            .unwrap_or(cands.c.len());
        cands.c.truncate(keep.max(1));
    }
    cands.probs(true);
    let i = draw_index(rng, &cands.c).unwrap_or(0);
    let surprise = -cands.c[i].p.log2();
    *mu -= chain.mirostat_eta * (surprise - chain.mirostat_tau);
    i
}

#[cfg(test)]
#[path = "chain_tests.rs"]
mod tests;
