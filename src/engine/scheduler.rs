//! The scheduler: decides what each step computes. Pure and synchronous (no model, no
//! channels), so it is unit-tested on its own.
//!
//! Each step takes every running decode (one token each), then continues prefills and admits
//! waiting sequences in arrival order, under two budgets: `max_batch_size` running sequences
//! and `max_batch_tokens` tokens per step (so a long prompt is prefilled in chunks and never
//! stalls running streams). When KV blocks run out, the most recently admitted sequence is
//! preempted: its blocks are freed and it waits to be recomputed. Invariant: a sequence is in
//! exactly one of waiting / running, and only running sequences hold blocks.

use std::collections::{HashMap, VecDeque};

use super::blocks::BlockManager;

pub type SeqId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
}

/// One sequence's share of a step: compute `len` tokens starting at position `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub id: SeqId,
    pub start: usize,
    pub len: usize,
    /// True when the chunk reaches the sequence's last token, so a new token is sampled.
    pub logits: bool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    pub chunks: Vec<Chunk>,
    /// Sequences that lost their KV blocks this step and went back to waiting.
    pub preempted: Vec<SeqId>,
    /// Sequences that started running for the first time this step.
    pub admitted: Vec<SeqId>,
}

#[derive(Debug)]
struct SeqState {
    /// Tokens known so far (prompt plus generated).
    tokens: usize,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    ever_ran: bool,
}

#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    seqs: HashMap<SeqId, SeqState>,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, blocks: BlockManager) -> Self {
        assert!(
            config.max_batch_tokens >= config.max_batch_size && config.max_batch_size > 0,
            "budgets validated at start-up. This is a bug."
        );
        Self {
            config,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            seqs: HashMap::new(),
        }
    }

    /// Queues a sequence whose prompt has `prompt_len` tokens.
    pub fn add(&mut self, id: SeqId, prompt_len: usize) {
        self.seqs.insert(
            id,
            SeqState {
                tokens: prompt_len,
                computed: 0,
                blocks: Vec::new(),
                ever_ran: false,
            },
        );
        self.waiting.push_back(id);
    }

    /// Removes a sequence (finished, cancelled or failed) and frees its blocks.
    pub fn remove(&mut self, id: SeqId) {
        if let Some(mut s) = self.seqs.remove(&id) {
            self.blocks.release(&mut s.blocks);
        }
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
    }

    /// Records that the chunks of a step were computed; `sampled` lists sequences that
    /// gained a token.
    pub fn complete(&mut self, step: &Step, sampled: &[SeqId]) {
        for c in &step.chunks {
            if let Some(s) = self.seqs.get_mut(&c.id) {
                s.computed = s.computed.max(c.start + c.len);
            }
        }
        for id in sampled {
            if let Some(s) = self.seqs.get_mut(id) {
                s.tokens += 1;
            }
        }
    }

    pub fn blocks(&self, id: SeqId) -> &[u32] {
        self.seqs.get(&id).map_or(&[], |s| &s.blocks)
    }

    /// Whether `id` has been admitted to run at least once.
    pub fn has_run(&self, id: SeqId) -> bool {
        self.seqs.get(&id).is_some_and(|s| s.ever_ran)
    }

    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    pub fn waiting_count(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn kv_usage(&self) -> f64 {
        self.blocks.usage()
    }

    pub fn free_blocks(&self) -> usize {
        self.blocks.free_count()
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> Step {
        let mut step = Step::default();
        let mut budget = self.config.max_batch_tokens;
        // 1. Running sequences, oldest first: decodes and continuing prefills.
        let mut i = 0;
        while i < self.running.len() {
            let id = self.running[i];
            let s = &self.seqs[&id];
            let remaining = s.tokens - s.computed;
            let want = remaining.min(budget);
            if want == 0 {
                i += 1;
                continue;
            }
            let target = s.computed + want;
            if !self.grow(id, target) {
                // Out of blocks: preempt the newest running sequence (maybe this one).
                let victim = *self
                    .running
                    .last()
                    .expect("`id` is running. This is a bug.");
                budget += self.preempt(victim, &mut step);
                continue; // re-examine index i (or stop if it was the victim)
            }
            step.chunks.push(self.chunk(id, want));
            budget -= want;
            i += 1;
        }
        // 2. Admit waiting sequences in arrival order while budgets and blocks allow.
        while budget > 0 && self.running.len() < self.config.max_batch_size {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let s = &self.seqs[&id];
            let want = (s.tokens - s.computed).min(budget);
            let target = s.computed + want;
            if !self.grow(id, target) {
                break;
            }
            self.waiting.pop_front();
            self.running.push(id);
            let s = self
                .seqs
                .get_mut(&id)
                .expect("waiting ids are known. This is a bug.");
            if !s.ever_ran {
                s.ever_ran = true;
                step.admitted.push(id);
            }
            step.chunks.push(self.chunk(id, want));
            budget -= want;
        }
        step
    }

    /// The next `len` tokens of `id`, from its first uncomputed position.
    fn chunk(&self, id: SeqId, len: usize) -> Chunk {
        let s = &self.seqs[&id];
        Chunk {
            id,
            start: s.computed,
            len,
            logits: s.computed + len == s.tokens,
        }
    }

    fn grow(&mut self, id: SeqId, positions: usize) -> bool {
        let s = self
            .seqs
            .get_mut(&id)
            .expect("scheduled ids are known. This is a bug.");
        self.blocks.ensure(&mut s.blocks, positions)
    }

    /// Sends `id` back to waiting without its blocks; returns the step tokens it gives back.
    fn preempt(&mut self, id: SeqId, step: &mut Step) -> usize {
        self.running.retain(|&r| r != id);
        let refund = step
            .chunks
            .iter()
            .filter(|c| c.id == id)
            .map(|c| c.len)
            .sum();
        step.chunks.retain(|c| c.id != id);
        if let Some(s) = self.seqs.get_mut(&id) {
            self.blocks.release(&mut s.blocks);
            s.computed = 0;
        }
        self.waiting.push_front(id);
        step.preempted.push(id);
        refund
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
