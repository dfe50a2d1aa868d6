//! Generation for one sequence: prefill, then decode step by step with sampling, stop tokens,
//! stop strings and a token budget. The CLI's `generate` runs on it; the server's batched
//! engine keeps the same finish rules.
//!
//! Knows the model's forward and the sampler; never HTTP. Invariant: the prompt plus the token
//! budget must fit the model's context; nothing is silently truncated.

use std::time::Instant;

use serde::Serialize;

pub use super::request::FinishReason;
use super::sampler::{Sampler, SamplingParams};
use super::sequence::{OutputState, TokenOutcome};
pub use super::sequence::{DETOK_CONTEXT, PENALTY_WINDOW};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::LoadedModel;

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub prompt_seconds: f64,
    pub prompt_tokens_per_second: f64,
    pub generation_seconds: f64,
    pub generation_tokens_per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationOutput {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    /// The end-of-turn token that ended generation, if one did (not part of `tokens`).
    pub stop_token: Option<u32>,
    pub timings: Timings,
}

/// Generates from `prompt` (token ids), calling `on_text` with each new piece of text.
pub fn generate<B: Backend>(
    model: &LoadedModel<B>,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_text: impl FnMut(&str),
) -> Result<GenerationOutput> {
    let ctx = model.llama.config.context_length;
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt has no tokens".into()));
    }
    if prompt.len().saturating_add(params.max_tokens) > ctx {
        return Err(Error::Invalid(format!(
            "the prompt ({} tokens) plus max_tokens ({}) exceeds the model's context of {ctx} tokens",
            prompt.len(),
            params.max_tokens
        )));
    }
    params
        .sampling
        .validate()
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let tok = &model.tokenizer;
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut cache = model.llama.new_cache();
    let context = &prompt[prompt.len().saturating_sub(DETOK_CONTEXT)..];
    let mut output = OutputState::new(params.stop.clone(), params.max_tokens, context);
    let mut history: Vec<u32> = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut stop_token = None;

    let started = Instant::now();
    let mut logits = model.llama.forward(prompt, &mut cache)?;
    let prompt_seconds = started.elapsed().as_secs_f64();
    let decode_started = Instant::now();
    let mut decode_steps = 0usize;
    let finish = loop {
        let next = sampler.sample(&mut logits, &history);
        let outcome = output.push(tok, next)?;
        let (emit, finished) = match outcome {
            TokenOutcome::Continue { emit } => (emit, None),
            TokenOutcome::Finished {
                emit,
                reason,
                counted,
                ..
            } => {
                if !counted {
                    stop_token = Some(next);
                }
                (emit, Some((reason, counted)))
            }
        };
        if finished.is_none_or(|(_, counted)| counted) {
            tokens.push(next);
            history.push(next);
        }
        if !emit.is_empty() {
            on_text(&emit);
            text.push_str(&emit);
        }
        if let Some((reason, _)) = finished {
            break reason;
        }
        logits = model.llama.forward(&[next], &mut cache)?;
        decode_steps += 1;
    };
    let generation_seconds = decode_started.elapsed().as_secs_f64();
    Ok(GenerationOutput {
        prompt_tokens: prompt.to_vec(),
        tokens,
        text,
        finish_reason: finish,
        stop_token,
        timings: Timings {
            prompt_seconds,
            prompt_tokens_per_second: prompt.len() as f64 / prompt_seconds.max(1e-9),
            generation_seconds,
            generation_tokens_per_second: decode_steps as f64 / generation_seconds.max(1e-9),
        },
    })
}
