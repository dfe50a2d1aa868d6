//! Token sampling: turns one logits vector into one token id.
//!
//! Owns: the logit bias, the repetition / frequency / presence penalties, greedy argmax, the
//! top-k, top-p and min-p filters, temperature, the seeded random draw, and
//! [`log_softmax_of`] for logprobs; llama.cpp's chain of samplers is its child
//! [`super::chain`].
//!
//! Must not know: the model, the tokenizer, HTTP or request formats. It only
//! ever sees `f32` logits indexed by `u32` token ids.
//!
//! Invariant: with the same build, the same [`SamplingParams`] (seed
//! included), the same sequence of logits and histories give the same tokens (Mirostat
//! carries its target from step to step). Every tie is broken by the lowest token id and
//! NaN logits are treated as `-inf`, so nothing depends on hash or sort order.

use std::cmp::Ordering;
use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::chain::{self, ChainParams, ChainState};
use super::constraint::{ConstraintError, TokenConstraint};
use crate::model::llama::argmax;

/// How many recent tokens the repetition penalties look at (llama.cpp's default
/// `penalty_last_n`; its endpoints may set another).
pub const PENALTY_WINDOW: usize = 64;

/// How to pick the next token. The default is greedy with every filter off.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// `<= 0` means greedy (argmax); valid range `[0, 2]`.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` = off.
    pub top_k: usize,
    /// Nucleus sampling threshold in `[0, 1]` (`0`: the most likely token); `1.0` = off.
    pub top_p: f32,
    /// Drop tokens with probability below `min_p * p_max`; `0` = off.
    pub min_p: f32,
    /// CTRL-style repetition penalty, `> 0`; `1.0` = off.
    pub repetition_penalty: f32,
    /// Subtracted once per previous occurrence, in `[-2, 2]`; `0` = off.
    pub frequency_penalty: f32,
    /// Subtracted once if the token occurred at all, in `[-2, 2]`; `0` = off.
    pub presence_penalty: f32,
    /// Seed for the random draw; `None` seeds from OS entropy.
    pub seed: Option<u64>,
    /// Added to these tokens' logits before anything else (OpenAI's `logit_bias`): each
    /// in `[-100, 100]`, ids ascending and distinct. Ids outside the vocabulary are
    /// ignored here (the API refuses them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logit_bias: Vec<(u32, f32)>,
    /// llama.cpp's chain (its endpoints, or a request that names its samplers): the steps
    /// in its order (by default top-k, top-p and min-p before the temperature), and under a
    /// grammar the unmasked pick tried first even with those filters, as llama.cpp samples.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub llama_cpp_order: bool,
    /// llama.cpp's other sampler settings and the order of its steps (with
    /// `llama_cpp_order`; `None`: its defaults).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llama: Option<ChainParams>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
            llama_cpp_order: false,
            llama: None,
        }
    }
}

/// A sampling parameter outside its valid range. Field names are OpenAI's.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("`{field}` must be {expected}, got {value}")]
    OutOfRange {
        field: &'static str,
        expected: &'static str,
        value: String,
    },
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token, no filters, no penalties.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether the same logits and history always give the same token: a seed, or a
    /// temperature of 0 that llama.cpp's chain keeps at 0 with nothing random before it.
    pub fn is_deterministic(&self) -> bool {
        let random = self.llama.as_ref().is_some_and(ChainParams::random_at_zero);
        self.seed.is_some() || self.temperature == 0.0 && !random
    }

    /// Whether [`Sampler::sample`] takes the argmax instead of drawing.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0
    }

    /// Checks every field against its range; the first bad field is reported.
    /// NaN and infinities are rejected everywhere.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let err = |field: &'static str, expected: &'static str, value: f32| {
            let value = value.to_string();
            Err(SamplingError::OutOfRange {
                field,
                expected,
                value,
            })
        };
        // The widest range of any surface (Workers AI's); each API checks its own first.
        if !(0.0..=5.0).contains(&self.temperature) {
            return err("temperature", "in [0, 5]", self.temperature);
        }
        // 0 keeps the most likely token alone, as OpenAI and llama.cpp read it.
        if !(0.0..=1.0).contains(&self.top_p) {
            return err("top_p", "in [0, 1]", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return err("min_p", "in [0, 1]", self.min_p);
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return err(
                "repetition_penalty",
                "a finite number > 0",
                self.repetition_penalty,
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return err("frequency_penalty", "in [-2, 2]", self.frequency_penalty);
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return err("presence_penalty", "in [-2, 2]", self.presence_penalty);
        }
        if let Some(&(_, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return err("logit_bias", "in [-100, 100] for every token", b);
        }
        match &self.llama {
            Some(c) => c.validate(),
            None => Ok(()),
        }
    }
}

/// One surviving token during filtering.
#[derive(Debug, Clone, Copy)]
pub(super) struct Candidate {
    pub(super) id: u32,
    pub(super) logit: f32,
    pub(super) p: f32,
}

/// Every token but NaN ones (and with `masked`, `-inf` ones: a mask left most of the
/// vocabulary there) as a candidate.
pub(super) fn candidates(logits: &[f32], masked: bool) -> Vec<Candidate> {
    logits
        .iter()
        .enumerate()
        .filter(|(_, l)| !(l.is_nan() || masked && **l == f32::NEG_INFINITY))
        // +inf is clamped so that it wins the softmax instead of making NaN.
        .map(|(i, &l)| Candidate {
            id: i as u32,
            logit: l.min(f32::MAX),
            p: 0.0,
        })
        .collect()
}

/// Highest logit first, lowest id first among equals. NaNs are filtered out
/// before this is used.
pub(super) fn by_logit_desc(a: &Candidate, b: &Candidate) -> Ordering {
    b.logit.total_cmp(&a.logit).then_with(|| a.id.cmp(&b.id))
}

/// Fills `p` with the temperature softmax of the candidates' logits (which
/// are never NaN or +inf). If every logit is `-inf`, every `p` stays 0.
pub(super) fn softmax(cands: &mut [Candidate], temperature: f32) {
    let max = cands
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for c in cands.iter_mut() {
        // NaN only from `-inf - -inf`: such a token has no mass.
        let z = (c.logit - max) / temperature;
        c.p = if z.is_nan() { 0.0 } else { z.exp() };
        sum += f64::from(c.p);
    }
    if sum > 0.0 {
        for c in cands.iter_mut() {
            c.p = (f64::from(c.p) / sum) as f32;
        }
    }
}

/// Token sampler for one sequence: parameters plus its own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// llama.cpp's chain's state, with `llama_cpp_order` (its settings are `params.llama`).
    chain: Option<ChainState>,
}

/// llama.cpp's chain as it is by default, for `llama_cpp_order` without settings.
static DEFAULT_CHAIN: std::sync::LazyLock<ChainParams> =
    std::sync::LazyLock::new(ChainParams::default);

impl Sampler {
    /// Seeds from `params.seed` when given, otherwise from OS entropy.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        let chain = params.llama_cpp_order.then(ChainState::default);
        Self { params, rng, chain }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// With llama.cpp's chain asked to keep them: the last pick's probability after the
    /// chain and the likeliest tokens then (see [`ChainState::final_probs`]).
    pub fn final_probs(&self) -> Option<(f32, &[(u32, f32)])> {
        self.chain.as_ref().and_then(ChainState::final_probs)
    }

    /// Adds the logit bias, then applies the penalties over the last [`PENALTY_WINDOW`]
    /// tokens of `history` (llama.cpp's order: its bias sampler comes first). llama.cpp's
    /// chain applies its penalties itself, where its steps put them.
    fn adjust(&self, logits: &mut [f32], history: &[u32]) {
        for &(token, bias) in &self.params.logit_bias {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit += bias;
            }
        }
        if self.chain.is_none() {
            let window = &history[history.len().saturating_sub(PENALTY_WINDOW)..];
            self.apply_penalties(logits, window);
        }
    }

    /// Applies the repetition, frequency and presence penalties in place, as
    /// llama.cpp does: for every distinct token in `history`, a positive logit
    /// is divided by the repetition penalty and a non-positive one multiplied
    /// by it, then `count * frequency_penalty + presence_penalty` is
    /// subtracted. History ids outside the vocabulary are ignored.
    pub fn apply_penalties(&self, logits: &mut [f32], history: &[u32]) {
        let p = &self.params;
        let repeat = p.repetition_penalty;
        let use_repeat = repeat != 1.0 && repeat.is_finite() && repeat > 0.0;
        let off = !use_repeat && p.frequency_penalty == 0.0 && p.presence_penalty == 0.0;
        if off || history.is_empty() {
            return;
        }
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &token in history {
            *counts.entry(token).or_insert(0) += 1;
        }
        // Each token is adjusted independently, so map order does not matter.
        for (&token, &count) in &counts {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit = penalized(p, *logit, count);
            }
        }
    }

    /// Picks the next token. `logits` is modified in place (bias and penalties,
    /// nothing else). `history` is the sequence so far (prompt included); the penalties
    /// count its last [`PENALTY_WINDOW`] tokens (llama.cpp's chain: its `penalty_last_n`).
    ///
    /// Order: logit bias, penalties; then greedy argmax if `temperature <= 0`; otherwise
    /// top-k, temperature softmax, top-p, min-p, renormalise, draw. With `llama_cpp_order`:
    /// the logit bias, then llama.cpp's chain ([`chain`]: its steps in its order, the
    /// temperature among them, or Mirostat), then the draw.
    /// Parameters should have passed [`SamplingParams::validate`]; invalid
    /// ones never panic but pick an unspecified (still deterministic) token.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.adjust(logits, history);
        self.pick(logits, history, false)
    }

    /// [`sample`](Self::sample) restricted to the tokens `constraint` allows, from exactly
    /// the distribution the mask would give. Without top-k, top-p or min-p, the unmasked
    /// pick is tried first and the mask computed only when the constraint rejects it: for
    /// argmax that is the masked argmax, and for a plain softmax draw, accepting an allowed
    /// draw and otherwise redrawing from the allowed tokens gives each allowed token
    /// `p / p(allowed)`, the masked distribution. With those filters the mask comes first,
    /// since they must see only allowed tokens, except in `llama_cpp_order`, which tries the
    /// unmasked pick first as llama.cpp does. The chosen token is committed.
    pub fn sample_constrained(
        &mut self,
        logits: &mut [f32],
        history: &[u32],
        constraint: &mut dyn TokenConstraint,
    ) -> Result<u32, ConstraintError> {
        self.adjust(logits, history);
        let p = &self.params;
        let filtered = !p.is_greedy() && (p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0);
        if !filtered || p.llama_cpp_order {
            let token = self.pick(logits, history, false);
            if constraint.allows(token)? {
                constraint.commit(token)?;
                return Ok(token);
            }
        }
        constraint.mask(logits)?;
        let token = self.pick(logits, history, true);
        constraint.commit(token)?;
        Ok(token)
    }

    /// Greedy argmax, or the filtered draw, or llama.cpp's chain. `masked`: `-inf` logits
    /// are left out of the candidates (a mask left most of the vocabulary at `-inf`).
    fn pick(&mut self, logits: &[f32], history: &[u32], masked: bool) -> u32 {
        if let Some(state) = self.chain.as_mut() {
            let p = &self.params;
            let params = p.llama.as_ref().unwrap_or(&DEFAULT_CHAIN);
            return chain::pick(p, params, state, &mut self.rng, logits, history, masked);
        }
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let temperature = self.params.temperature;

        let mut cands = candidates(logits, masked);
        if cands.is_empty() {
            return 0;
        }

        let mut sorted = false;
        let k = self.params.top_k;
        if k > 0 && k < cands.len() {
            // Partial selection: O(vocab) instead of sorting the whole vocabulary.
            cands.select_nth_unstable_by(k - 1, by_logit_desc);
            cands.truncate(k);
            cands.sort_unstable_by(by_logit_desc);
            sorted = true;
        }

        let top_p = self.params.top_p;
        let nucleus = top_p < 1.0;
        if nucleus && !sorted {
            cands.sort_unstable_by(by_logit_desc);
        }

        softmax(&mut cands, temperature);

        if nucleus {
            // Smallest prefix of the sorted candidates reaching `top_p`; at least one.
            let mut cumulative = 0.0f64;
            let mut keep = cands.len();
            for (i, c) in cands.iter().enumerate() {
                cumulative += f64::from(c.p);
                if cumulative >= f64::from(top_p) {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep);
        }

        let min_p = self.params.min_p;
        if min_p > 0.0 {
            let p_max = cands.iter().map(|c| c.p).fold(0.0f32, f32::max);
            // The most likely token always survives since min_p <= 1.
            let threshold = min_p.min(1.0) * p_max;
            cands.retain(|c| c.p >= threshold);
        }

        draw_index(&mut self.rng, &cands).map_or(0, |i| cands[i].id)
    }
}

/// `logit` after the repetition, frequency and presence penalties for a token seen `count`
/// times, as llama.cpp does: a positive logit is divided by the repetition penalty and a
/// non-positive one multiplied by it, then `count * frequency_penalty + presence_penalty` is
/// subtracted.
pub(super) fn penalized(p: &SamplingParams, logit: f32, count: u32) -> f32 {
    let repeat = p.repetition_penalty;
    let mut logit = logit;
    if repeat != 1.0 && repeat.is_finite() && repeat > 0.0 {
        logit = if logit > 0.0 {
            logit / repeat
        } else {
            logit * repeat
        };
    }
    logit - (count as f32 * p.frequency_penalty + p.presence_penalty)
}

/// Draws one candidate's index in proportion to `p` (renormalising implicitly); `None` for
/// no candidates. Without any mass, the first.
pub(super) fn draw_index(rng: &mut StdRng, cands: &[Candidate]) -> Option<usize> {
    cands.first()?;
    let total: f64 = cands.iter().map(|c| f64::from(c.p)).sum();
    if !total.is_finite() || total <= 0.0 {
        return Some(0);
    }
    let r = rng.gen::<f64>() * total;
    let mut cumulative = 0.0f64;
    for (i, c) in cands.iter().enumerate() {
        cumulative += f64::from(c.p);
        if cumulative > r {
            return Some(i);
        }
    }
    // Rounding left `r` past the end: take the last token with any mass.
    Some(cands.iter().rposition(|c| c.p > 0.0).unwrap_or(0))
}

/// `log softmax(logits)[token]` at temperature 1, computed stably (max
/// subtracted, summed in f64). NaN logits count as `-inf`; a token outside
/// the vocabulary, or a NaN one, gives `-inf`.
pub fn log_softmax_of(logits: &[f32], token: u32) -> f32 {
    LogSoftmax::new(logits).of(logits, token)
}

/// One distribution's normaliser, for the logprobs of several of its tokens.
#[derive(Debug, Clone, Copy)]
pub struct LogSoftmax {
    max: f64,
    ln_sum: f64,
}

/// NaN counts as -inf; +inf is clamped so the arithmetic stays finite.
fn clean(l: f32) -> f64 {
    if l.is_nan() {
        f64::NEG_INFINITY
    } else {
        f64::from(l.min(f32::MAX))
    }
}

impl LogSoftmax {
    pub fn new(logits: &[f32]) -> Self {
        let max = logits
            .iter()
            .map(|&l| clean(l))
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = if max == f64::NEG_INFINITY {
            0.0
        } else {
            logits.iter().map(|&l| (clean(l) - max).exp()).sum()
        };
        Self {
            max,
            ln_sum: sum.ln(),
        }
    }

    /// `token`'s logprob under the `logits` this was made from.
    pub fn of(&self, logits: &[f32], token: u32) -> f32 {
        let Some(&x) = logits.get(token as usize) else {
            return f32::NEG_INFINITY;
        };
        if self.max == f64::NEG_INFINITY {
            return f32::NEG_INFINITY;
        }
        (clean(x) - self.max - self.ln_sum) as f32
    }
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;
