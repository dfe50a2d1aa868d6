//! Checks of a backend against the CPU and of its speed (`edgeinfer backend-check`): logits
//! agreement, batching invariance, decode throughput at several stream counts and prefill
//! throughput. Used on GPU machines; runs on the CPU too (CPU against itself), which is how
//! its own code is tested.

use std::time::Instant;

use serde::Serialize;

use super::llama::{argmax, Llama, Logits, SeqInput};
use crate::backend::Backend;
use crate::error::ModelError;

type Result<T> = std::result::Result<T, ModelError>;

/// How far two backends' logits are apart over a prefill and greedy decode steps.
#[derive(Debug, Serialize)]
pub struct Agreement {
    pub steps: usize,
    /// Largest |a - b| over every logit of every step.
    pub max_abs_diff: f32,
    /// That, divided by the spread (max - min) of the reference's logits at that step.
    pub max_rel_diff: f32,
    /// Steps whose top token is the same on both.
    pub same_argmax: usize,
}

/// Feeds `prompt`, then `steps` greedy tokens chosen by `reference`, to both models and
/// compares their logits at every step.
pub fn compare<A: Backend, B: Backend>(
    reference: &Llama<A>,
    other: &Llama<B>,
    prompt: &[u32],
    steps: usize,
) -> Result<Agreement> {
    let (mut ca, mut cb) = (reference.new_cache(), other.new_cache());
    let mut agreement = Agreement {
        steps: 0,
        max_abs_diff: 0.0,
        max_rel_diff: 0.0,
        same_argmax: 0,
    };
    let mut input = prompt.to_vec();
    for _ in 0..=steps {
        let a = reference.forward(&input, &mut ca)?;
        let b = other.forward(&input, &mut cb)?;
        let diff = max_abs_diff(&a, &b);
        let spread =
            a.iter().cloned().fold(f32::MIN, f32::max) - a.iter().cloned().fold(f32::MAX, f32::min);
        agreement.max_abs_diff = agreement.max_abs_diff.max(diff);
        agreement.max_rel_diff = agreement.max_rel_diff.max(diff / spread.max(1e-6));
        agreement.same_argmax += usize::from(argmax(&a) == argmax(&b));
        agreement.steps += 1;
        input = vec![argmax(&a)];
    }
    Ok(agreement)
}

/// How far two backends' final hidden states (the rows embeddings pool) are apart over one
/// prompt: the largest |a - b|, and the smallest cosine similarity of a position's rows.
#[derive(Debug, Serialize)]
pub struct HiddenAgreement {
    pub positions: usize,
    pub max_abs_diff: f32,
    pub min_cosine: f32,
}

pub fn compare_hidden<A: Backend, B: Backend>(
    reference: &Llama<A>,
    other: &Llama<B>,
    prompt: &[u32],
) -> Result<HiddenAgreement> {
    let (a, b) = (hidden(reference, prompt)?, hidden(other, prompt)?);
    let dim = reference.config.dim;
    let cosine = |x: &[f32], y: &[f32]| {
        let dot: f64 = x.iter().zip(y).map(|(p, q)| f64::from(p * q)).sum();
        let norm = |v: &[f32]| v.iter().map(|p| f64::from(p * p)).sum::<f64>().sqrt();
        (dot / (norm(x) * norm(y)).max(1e-30)) as f32
    };
    let min_cosine = a
        .chunks(dim)
        .zip(b.chunks(dim))
        .map(|(x, y)| cosine(x, y))
        .fold(f32::INFINITY, f32::min);
    Ok(HiddenAgreement {
        positions: prompt.len(),
        max_abs_diff: max_abs_diff(&a, &b),
        min_cosine,
    })
}

/// Every position's final hidden state over `prompt`, in one forward of its own.
fn hidden<B: Backend>(model: &Llama<B>, prompt: &[u32]) -> Result<Vec<f32>> {
    const BLOCK: usize = 16;
    let blocks: Vec<u32> = (0..prompt.len().div_ceil(BLOCK) as u32).collect();
    let mut kv = model.new_kv(BLOCK, blocks.len())?;
    let input = SeqInput {
        tokens: prompt,
        start: 0,
        blocks: &blocks,
        logits: Logits::Hidden {
            from: 0,
            to: prompt.len(),
        },
        adapter: None,
    };
    let mut out = model.forward_batch(&[input], &mut kv)?;
    out.pop()
        .flatten()
        .ok_or_else(|| ModelError::Candle(candle_core::Error::Msg("no hidden states".into())))
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Batching invariance on one backend: each prompt run alone, then all of them packed into
/// one step (and one decode step of all of them together); returns the largest logit
/// difference between the two ways.
pub fn batch_invariance<B: Backend>(model: &Llama<B>, prompts: &[Vec<u32>]) -> Result<f32> {
    const BLOCK: usize = 16;
    let per_seq = |p: &Vec<u32>| (p.len() + 1).div_ceil(BLOCK);
    let total: usize = prompts.iter().map(per_seq).sum();
    let mut tables = Vec::new();
    let mut next = 0u32;
    for p in prompts {
        let n = per_seq(p) as u32;
        tables.push((next..next + n).collect::<Vec<u32>>());
        next += n;
    }
    // Alone: each prompt, then its greedy token, in a pool of its own.
    let mut alone = Vec::new();
    for (p, t) in prompts.iter().zip(&tables) {
        let mut kv = model.new_kv(BLOCK, total)?;
        let seq = |tokens, start| SeqInput {
            tokens,
            start,
            blocks: t,
            logits: Logits::Last,
            adapter: None,
        };
        let first = model
            .forward_batch(&[seq(p, 0)], &mut kv)?
            .remove(0)
            .unwrap_or_default();
        let next = [argmax(&first)];
        let second = model
            .forward_batch(&[seq(&next, p.len())], &mut kv)?
            .remove(0)
            .unwrap_or_default();
        alone.push((first, second));
    }
    // Together: all prompts in one step, then all their next tokens in one step.
    let mut kv = model.new_kv(BLOCK, total)?;
    let seqs: Vec<SeqInput> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, t)| SeqInput {
            tokens: p,
            start: 0,
            blocks: t,
            logits: Logits::Last,
            adapter: None,
        })
        .collect();
    let firsts = model.forward_batch(&seqs, &mut kv)?;
    let nexts: Vec<[u32; 1]> = alone.iter().map(|(f, _)| [argmax(f)]).collect();
    let seqs: Vec<SeqInput> = prompts
        .iter()
        .zip(&tables)
        .zip(&nexts)
        .map(|((p, t), n)| SeqInput {
            tokens: n,
            start: p.len(),
            blocks: t,
            logits: Logits::Last,
            adapter: None,
        })
        .collect();
    let seconds = model.forward_batch(&seqs, &mut kv)?;
    let mut worst = 0f32;
    for (i, (f, s)) in alone.iter().enumerate() {
        let (pf, ps) = (firsts[i].as_deref(), seconds[i].as_deref());
        worst = worst.max(max_abs_diff(f, pf.unwrap_or_default()));
        worst = worst.max(max_abs_diff(s, ps.unwrap_or_default()));
    }
    Ok(worst)
}

/// Decode throughput with `streams` sequences, each after a `context`-token prompt.
#[derive(Debug, Serialize)]
pub struct DecodeSpeed {
    pub streams: usize,
    pub context: usize,
    pub steps: usize,
    pub seconds: f64,
    /// Tokens per second, all streams together.
    pub tokens_per_second: f64,
}

pub fn decode_speed<B: Backend>(
    model: &Llama<B>,
    streams: usize,
    context: usize,
    steps: usize,
) -> Result<DecodeSpeed> {
    const BLOCK: usize = 16;
    let per_seq = (context + steps + 1).div_ceil(BLOCK);
    let mut kv = model.new_kv(BLOCK, per_seq * streams)?;
    let vocab = model.config.vocab_size as u32;
    let tables: Vec<Vec<u32>> = (0..streams)
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect();
    let prompts: Vec<Vec<u32>> = (0..streams)
        .map(|s| {
            (0..context)
                .map(|i| ((s * 7919 + i * 31) as u32 + 1) % vocab)
                .collect()
        })
        .collect();
    // Prefill a few streams at a time, as the engine's token budget would.
    for (chunk_p, chunk_t) in prompts.chunks(8).zip(tables.chunks(8)) {
        let seqs: Vec<SeqInput> = chunk_p
            .iter()
            .zip(chunk_t)
            .map(|(p, t)| SeqInput {
                tokens: p,
                start: 0,
                blocks: t,
                logits: Logits::Skip,
                adapter: None,
            })
            .collect();
        model.forward_batch(&seqs, &mut kv)?;
    }
    let mut next: Vec<[u32; 1]> = (0..streams)
        .map(|s| [(s as u32 * 13 + 5) % vocab])
        .collect();
    let mut step = |pos: usize, next: &mut Vec<[u32; 1]>| -> Result<()> {
        let seqs: Vec<SeqInput> = next
            .iter()
            .zip(&tables)
            .map(|(n, t)| SeqInput {
                tokens: n,
                start: pos,
                blocks: t,
                logits: Logits::Last,
                adapter: None,
            })
            .collect();
        let out = model.forward_batch(&seqs, &mut kv)?;
        for (n, logits) in next.iter_mut().zip(out) {
            n[0] = argmax(&logits.unwrap_or_default());
        }
        Ok(())
    };
    step(context, &mut next)?; // warm-up, not timed
    let started = Instant::now();
    for i in 1..=steps {
        step(context + i, &mut next)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(DecodeSpeed {
        streams,
        context,
        steps,
        seconds,
        tokens_per_second: (streams * steps) as f64 / seconds,
    })
}

/// Prefill throughput: one `tokens`-long prompt in one step (after one untimed run).
pub fn prefill_speed<B: Backend>(model: &Llama<B>, tokens: usize) -> Result<f64> {
    const BLOCK: usize = 16;
    let blocks: Vec<u32> = (0..tokens.div_ceil(BLOCK) as u32).collect();
    let mut kv = model.new_kv(BLOCK, blocks.len())?;
    let vocab = model.config.vocab_size as u32;
    let prompt: Vec<u32> = (0..tokens).map(|i| (i as u32 * 31 + 7) % vocab).collect();
    let seq = SeqInput {
        tokens: &prompt,
        start: 0,
        blocks: &blocks,
        logits: Logits::Last,
        adapter: None,
    };
    model.forward_batch(std::slice::from_ref(&seq), &mut kv)?;
    let started = Instant::now();
    model.forward_batch(&[seq], &mut kv)?;
    Ok(tokens as f64 / started.elapsed().as_secs_f64())
}
