//! The scheduler: decides what each step computes. Pure and synchronous (no model, no
//! channels), so it is unit-tested on its own.
//!
//! Each step takes every running decode (one token each), then continues prefills and admits
//! waiting sequences (fairly among tenants: see [`Scheduler::set_tenant`]), under two budgets: `max_batch_size` running sequences
//! and `max_batch_tokens` tokens per step (so a long prompt is prefilled in chunks and never
//! stalls running streams), of which at most `max_scored_rows` may be rows of prompts being
//! scored (each returns a whole vocabulary's logits; a scored prompt waiting for them lets
//! later arrivals pass). A decoding sequence may carry draft tokens (speculation, see
//! `draft.rs`): its chunk then runs its last token and the drafts together, at most
//! `max_draft_rows` drafts a step, and [`Scheduler::complete`] keeps the positions the
//! sampled tokens confirmed. When KV blocks run out, the most recently admitted sequence is
//! preempted: its blocks are freed and it waits to be recomputed. Running background
//! sequences (`fair.rs`) give up their places, and their blocks, to waiting foreground ones.
//! With prefix caching (`scheduler_prefix.rs`), a sequence admitted with no blocks first
//! takes the cached blocks matching its tokens and starts computing after them; each block
//! it fills is registered for later sequences. When
//! its next tokens part from a cached block's midway, the rows they share are copied into the
//! sequence's own block (the step's `copies`), so reuse is token-granular. A waiting sequence
//! whose leading blocks another sequence computes in the same step waits for them (one step)
//! instead of computing them twice.
//! Invariants: a sequence is in exactly one of waiting / running, and only running sequences
//! hold blocks; at least the last token of a sequence is always computed (never taken from
//! the cache), so its logits exist.

use std::collections::{HashMap, HashSet, VecDeque};

use super::blocks::{chain_hash, BlockManager};
use super::fair::{victim, yielding, Turns};
use super::request::Tenant;
pub use super::step::{BlockCopy, Chunk, Step};
use background::FOREGROUND_LINGER_STEPS;

pub type SeqId = u64;

/// Drafts run only in steps of at most this many sequences: a larger step's cost grows
/// with its rows (on a CPU it is bound by arithmetic, not by reading the weights), so a
/// draft row would cost about what another sequence's token does.
pub const DRAFTING_MAX_SEQUENCES: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    /// Rows a step may compute of prompts being scored (see [`Scheduler::add_scoring`]).
    pub max_scored_rows: usize,
    /// Draft tokens a step may verify, over all sequences (see [`Scheduler::set_draft`]).
    pub max_draft_rows: usize,
    /// Rows a background prompt may compute a step when no foreground sequence is near
    /// (0: the whole budget); see [`Scheduler::row_limit`].
    pub max_background_rows: usize,
}

#[derive(Debug)]
struct SeqState {
    /// Tokens known so far (prompt plus generated).
    tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    ever_ran: bool,
    /// Whether this sequence reads and feeds the prefix cache.
    cache: bool,
    /// Chained hashes of the full blocks of `tokens` worked out so far.
    hashes: Vec<u64>,
    /// Leading blocks of `blocks` registered in (or taken from) the prefix cache.
    registered: usize,
    /// Prompt tokens taken from the cache at first admission.
    cached_tokens: usize,
    /// Positions before this are scored: each computed row returns its logits.
    scored_until: usize,
    /// Positions computed (and so scored) before a preemption: recomputing them needs no
    /// logits.
    rescored: usize,
    /// Draft tokens offered for the next step (taken by it).
    draft: usize,
    /// Whose sequence it is (0: nobody's in particular) and its weight.
    tenant: Tenant,
    /// The parent hash of its first block: sequences of other roots share no blocks.
    root: u64,
}

impl SeqState {
    /// Chained hashes of the first `n` full blocks (worked out once, kept).
    fn hashes(&mut self, n: usize, block_size: usize) -> &[u64] {
        while self.hashes.len() < n {
            let i = self.hashes.len();
            let parent = self.hashes.last().copied().unwrap_or(self.root);
            let block = &self.tokens[i * block_size..(i + 1) * block_size];
            self.hashes.push(chain_hash(parent, block));
        }
        &self.hashes[..n]
    }
}

#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    seqs: HashMap<SeqId, SeqState>,
    /// Sources of the planned step's copies, held until it completes (or the next step is
    /// planned, or nothing is left to run).
    pinned: Vec<u32>,
    /// Steps planned since one with a foreground sequence running or waiting.
    since_foreground: usize,
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
            pinned: Vec::new(),
            since_foreground: usize::MAX,
        }
    }

    /// Offers `draft` tokens to follow decoding sequence `id`'s last token in the next step
    /// (the caller holds them). The step takes them if `id` is decoding and the budgets and
    /// blocks allow; its chunk says how many it took.
    pub fn set_draft(&mut self, id: SeqId, draft: usize) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.draft = draft;
        }
    }

    /// `want` rows for sequence `id`, no more than the scored rows left when it is scoring;
    /// a sequence recomputing rows it scored before a preemption stops short of the first
    /// row whose logits are needed again.
    fn capped(&self, id: SeqId, want: usize, scored_left: usize) -> usize {
        let s = &self.seqs[&id];
        if s.computed >= s.scored_until {
            return want;
        }
        match s.rescored.saturating_sub(1).saturating_sub(s.computed) {
            0 => want.min(scored_left),
            free => want.min(free),
        }
    }

    /// Whether `id`'s next chunk returns logits for its prompt's scores.
    fn scoring(&self, id: SeqId) -> bool {
        let s = &self.seqs[&id];
        s.computed < s.scored_until && s.computed + 1 >= s.rescored
    }

    /// Removes a sequence whose step failed: as [`Self::remove`], but none of its rows is
    /// offered to the cache (the step's copies into its blocks may not have run).
    pub fn discard(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.cache = false;
        }
        self.remove(id);
    }

    /// Removes a sequence (finished, cancelled or failed) and frees its blocks.
    pub fn remove(&mut self, id: SeqId) {
        if let Some(mut s) = self.seqs.remove(&id) {
            // The computed rows of a last, partly filled block stay findable (to be copied,
            // never shared): an agent's next turn starts with them.
            let bs = self.blocks.block_size();
            let full = s.computed / bs;
            if s.cache && s.computed % bs != 0 && full == s.registered && full < s.blocks.len() {
                s.hashes(full, bs);
                let parent = if full == 0 {
                    s.root
                } else {
                    s.hashes[full - 1]
                };
                let tokens = &s.tokens[full * bs..s.computed];
                let hash = chain_hash(parent, tokens);
                self.blocks.register(s.blocks[full], parent, hash, tokens);
            }
            self.blocks.release(&mut s.blocks);
        }
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        if self.seqs.is_empty() {
            self.blocks.release(&mut self.pinned);
            self.since_foreground = usize::MAX;
        }
    }

    /// Records that the chunks of a step were computed and registers the blocks they
    /// filled; `sampled` lists sequences that gained a token, with the token.
    ///
    /// A sequence may gain several tokens (listed in order): a chunk with drafts keeps the
    /// positions up to its last token and the drafts the tokens confirmed, one fewer than
    /// the tokens sampled.
    pub fn complete(&mut self, step: &Step, sampled: &[(SeqId, u32)]) {
        // The step's copies are done.
        self.blocks.release(&mut self.pinned);
        for &(id, token) in sampled {
            if let Some(s) = self.seqs.get_mut(&id) {
                s.tokens.push(token);
            }
        }
        let bs = self.blocks.block_size();
        for c in &step.chunks {
            let Some(s) = self.seqs.get_mut(&c.id) else {
                continue;
            };
            s.draft = 0;
            let end = if c.draft > 0 {
                let gained = sampled.iter().filter(|(id, _)| *id == c.id).count();
                c.start + gained.max(1)
            } else {
                c.start + c.len
            };
            s.computed = s.computed.max(end).min(s.tokens.len());
            if c.draft > 0 {
                // Blocks taken for drafts that were not kept go back.
                self.blocks.shrink(&mut s.blocks, s.tokens.len());
            }
            if s.cache && self.blocks.caching() {
                let full = s.computed / bs;
                if full > s.registered {
                    s.hashes(full, bs);
                    for i in s.registered..full {
                        let parent = if i == 0 { s.root } else { s.hashes[i - 1] };
                        let tokens = &s.tokens[i * bs..(i + 1) * bs];
                        self.blocks
                            .register(s.blocks[i], parent, s.hashes[i], tokens);
                    }
                    s.registered = full;
                }
            }
        }
    }

    /// Prompt tokens `id` took from the prefix cache when it was first admitted.
    pub fn cached_tokens(&self, id: SeqId) -> usize {
        self.seqs.get(&id).map_or(0, |s| s.cached_tokens)
    }

    /// Blocks registered in the prefix cache, and cached blocks evicted so far.
    pub fn cache_stats(&self) -> (usize, u64) {
        (self.blocks.cached_count(), self.blocks.evictions())
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
        self.blocks.release(&mut self.pinned);
        let mut step = Step::default();
        let mut budget = self.config.max_batch_tokens;
        let mut scored_left = self.config.max_scored_rows;
        // 0. Waiting foreground sequences take the places of running background ones.
        let mut yielded = false;
        let background = |id: &SeqId| self.seqs[id].tenant.background;
        if !self.waiting.is_empty() && self.running.iter().any(background) {
            let tenant = |id: &SeqId| self.seqs[id].tenant;
            let running: Vec<Tenant> = self.running.iter().map(tenant).collect();
            let waiting = self.waiting.iter().map(tenant);
            for at in yielding(waiting, &running, self.config.max_batch_size) {
                self.preempt(self.running[at], &mut step);
                yielded = true;
            }
        }
        // 1. Running sequences, oldest first: decodes and continuing prefills, background
        // prompts after the rest. While a foreground sequence waits, background prompts take
        // only what the admissions leave (2b), and no background sequence is admitted; while
        // one runs or waits (or did a few steps ago: an agent's next turn follows its last),
        // they take short chunks. Background prompts share `bg_rows` a step, so their rows
        // (and the step's time) do not grow with their number.
        let fg = |id: &SeqId| !self.seqs[id].tenant.background;
        let foreground_waits = self.waiting.iter().any(fg);
        self.since_foreground = if foreground_waits || self.running.iter().any(fg) {
            0
        } else {
            self.since_foreground.saturating_add(1)
        };
        let foreground = self.since_foreground <= FOREGROUND_LINGER_STEPS;
        let mut bg_rows = self.background_rows(foreground);
        yielded |= foreground_waits;
        let mut order = self.running.clone();
        order.sort_by_key(|id| self.background_prompt(*id));
        let mut deferred = Vec::new();
        let mut admitted_foreground = false;
        for id in order {
            if foreground_waits && self.background_prompt(id) {
                deferred.push(id);
                continue;
            }
            let bg_prompt = self.background_prompt(id);
            let limit = self.row_limit(id, bg_rows);
            let rows = self.plan_running(id, limit, &mut step, &mut budget, &mut scored_left);
            if bg_prompt {
                bg_rows = bg_rows.saturating_sub(rows);
            }
        }
        // Full blocks this step computes, by hash: a waiting sequence that would compute one
        // of them too (a burst of prompts with a common, uncached start) waits a step and
        // then takes them from the cache.
        let mut computing = HashSet::new();
        if !self.waiting.is_empty() {
            for c in &step.chunks {
                self.note_computing(c, &mut computing);
            }
        }
        // 2. Admit waiting sequences, tenant by tenant, while budgets and blocks allow (a
        // scored prompt without scored rows left lets the next ones pass).
        // The queue is looked at only when a place is free.
        let room = budget > 0 && self.running.len() < self.config.max_batch_size;
        let mut turns = Turns::new(
            self.waiting
                .iter()
                .take(if room { usize::MAX } else { 0 })
                .map(|id| {
                    let s = &self.seqs[id];
                    (*id, s.tenant, s.ever_ran)
                }),
            self.running.iter().map(|id| self.seqs[id].tenant),
        );
        while budget > 0 && self.running.len() < self.config.max_batch_size {
            let Some((tenant, id)) = turns.next() else {
                break;
            };
            // No background sequence takes a place a foreground one could not (it would be
            // preempted again next step).
            let background = self.seqs[&id].tenant.background;
            if background && yielded {
                break;
            }
            if self.shares_computing(id, &computing)
                || self.capped(id, budget, scored_left) == 0
                || self.row_limit(id, bg_rows) == 0
            {
                turns.take(tenant, false);
                yielded |= !background;
                continue;
            }
            let (mut hit, mut copy) = self.take_cached_prefix(id);
            let (fits, want, bg_prompt) = loop {
                let s = &self.seqs[&id];
                let want = (s.tokens.len() - s.computed).min(budget);
                let bg_prompt = self.background_prompt(id);
                let want = self.capped(id, want.min(self.row_limit(id, bg_rows)), scored_left);
                let target = s.computed + want;
                // A foreground sequence out of blocks takes those of background ones, but
                // first gives up its copy: the block a partial prefix is copied from is
                // held meanwhile, and may be the very block it needs. Without the copy it
                // computes those rows itself (else it could wait for good, the only one).
                let fits = self.grow(id, target)
                    || (copy.is_none() && !background && {
                        yielded = true;
                        self.make_room(id, target, &mut step, &mut budget, &mut scored_left)
                    });
                let Some((src, rows)) = copy.filter(|_| !fits) else {
                    break (fits, want, bg_prompt);
                };
                copy = None;
                self.blocks.release(&mut vec![src]);
                let s = self
                    .seqs
                    .get_mut(&id)
                    .expect("offered ids are known. This is a bug.");
                s.computed -= rows;
                hit -= rows;
            };
            if !fits {
                self.give_back_cached_prefix(id);
                break;
            }
            if let Some((src, rows)) = copy {
                let dst = self.seqs[&id].blocks[(hit - rows) / self.blocks.block_size()];
                step.copies.push(BlockCopy { src, dst, rows });
                self.pinned.push(src);
            }
            turns.take(tenant, true);
            admitted_foreground |= !background;
            let idx = self.waiting.iter().position(|&w| w == id);
            self.waiting
                .remove(idx.expect("offered ids wait. This is a bug."));
            self.running.push(id);
            let s = self
                .seqs
                .get_mut(&id)
                .expect("waiting ids are known. This is a bug.");
            if !s.ever_ran {
                s.ever_ran = true;
                s.cached_tokens = hit;
                step.admitted.push(id);
            }
            if self.scoring(id) {
                scored_left -= want;
            }
            let chunk = self.chunk(id, want);
            self.note_computing(&chunk, &mut computing);
            step.chunks.push(chunk);
            budget -= want;
            if bg_prompt {
                bg_rows = bg_rows.saturating_sub(want);
            }
        }
        // 2b. Background prompts deferred in 1, unless a foreground sequence was admitted
        // (its first token comes sooner from a short step), with what is left.
        for id in deferred {
            if !admitted_foreground && budget > 0 && bg_rows > 0 {
                let limit = self.row_limit(id, bg_rows);
                bg_rows -= self.plan_running(id, limit, &mut step, &mut budget, &mut scored_left);
            }
        }
        // 3. Drafts, with what the step has left: tokens, and empty blocks (a draft never
        // evicts a cached block nor preempts anyone); only in small steps.
        let mut drafts_left = if step.chunks.len() <= DRAFTING_MAX_SEQUENCES {
            self.config.max_draft_rows.min(budget)
        } else {
            0
        };
        for c in step.chunks.iter_mut() {
            let s = self
                .seqs
                .get_mut(&c.id)
                .expect("scheduled ids are known. This is a bug.");
            let draft = s.draft.min(drafts_left);
            let decode = c.len == 1 && c.logits && c.start + 1 == s.tokens.len();
            if draft == 0
                || !decode
                || !self.blocks.ensure_empty(&mut s.blocks, c.start + 1 + draft)
            {
                continue;
            }
            drafts_left -= draft;
            c.len += draft;
            c.draft = draft;
        }
        step
    }

    /// Plans running sequence `id`'s next chunk, at most `limit` rows; how many it planned.
    /// Out of blocks, it preempts the newest running sequence of the tenant running the most
    /// (maybe `id`), whose planned rows go back to the budgets, until `id` fits or is gone.
    fn plan_running(
        &mut self,
        id: SeqId,
        limit: usize,
        step: &mut Step,
        budget: &mut usize,
        scored_left: &mut usize,
    ) -> usize {
        while self.running.contains(&id) {
            let s = &self.seqs[&id];
            let remaining = s.tokens.len() - s.computed;
            let want = self.capped(id, remaining.min(*budget).min(limit), *scored_left);
            if want == 0 {
                return 0;
            }
            if self.grow(id, self.seqs[&id].computed + want) {
                if self.scoring(id) {
                    *scored_left -= want;
                }
                step.chunks.push(self.chunk(id, want));
                *budget -= want;
                return want;
            }
            let at = victim(self.running.iter().map(|id| self.seqs[id].tenant));
            self.preempt_planned(self.running[at], step, budget, scored_left);
        }
        0
    }

    /// Preempts `gone` (see [`Self::preempt`]); the rows it had planned this step go back
    /// to the budgets they took.
    fn preempt_planned(
        &mut self,
        gone: SeqId,
        step: &mut Step,
        budget: &mut usize,
        scored_left: &mut usize,
    ) {
        let scored = self.scoring(gone);
        let refund = self.preempt(gone, step);
        *budget += refund;
        if scored {
            *scored_left += refund;
        }
    }

    /// The next `len` tokens of `id`, from its first uncomputed position.
    fn chunk(&self, id: SeqId, len: usize) -> Chunk {
        let s = &self.seqs[&id];
        Chunk {
            id,
            start: s.computed,
            len,
            logits: s.computed + len == s.tokens.len(),
            draft: 0,
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
            s.rescored = s.rescored.max(s.computed);
            s.computed = 0;
            s.registered = 0;
        }
        self.waiting.push_front(id);
        step.preempted.push(id);
        refund
    }
}

#[path = "scheduler_add.rs"]
mod add;
#[path = "scheduler_background.rs"]
mod background;
#[path = "scheduler_prefix.rs"]
mod prefix;

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
