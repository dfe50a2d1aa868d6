//! The scheduler's prefix-cache helpers: taking a waiting sequence's cached leading blocks,
//! and noticing a waiting sequence whose leading blocks this step computes.

use std::collections::HashSet;

use super::{Chunk, Scheduler, SeqId};

impl Scheduler {
    /// Adds the hashes of the full blocks chunk `c` completes to `computing`.
    pub(super) fn note_computing(&mut self, c: &Chunk, computing: &mut HashSet<u64>) {
        let bs = self.blocks.block_size();
        let Some(s) = self.seqs.get_mut(&c.id) else {
            return;
        };
        if !s.cache || !self.blocks.caching() {
            return;
        }
        // A chunk's drafts are not the sequence's tokens (yet).
        let end = (c.start + c.len - c.draft) / bs;
        computing.extend(&s.hashes(end, bs)[(c.start / bs).min(end)..]);
    }

    /// Whether waiting sequence `id` shares a full block that this step computes.
    pub(super) fn shares_computing(&mut self, id: SeqId, computing: &HashSet<u64>) -> bool {
        let bs = self.blocks.block_size();
        let s = self
            .seqs
            .get_mut(&id)
            .expect("waiting ids are known. This is a bug.");
        if computing.is_empty() || !s.cache || !self.blocks.caching() || !s.blocks.is_empty() {
            return false;
        }
        let n = (s.tokens.len() - 1) / bs;
        s.hashes(n, bs).iter().any(|h| computing.contains(h))
    }

    /// For a sequence about to be admitted with no blocks: takes references to the cached
    /// blocks matching its leading full blocks, then looks for a cached block sharing the
    /// start of the next one, and skips computing all of that (never its last token).
    /// Returns the tokens taken and the partial block to copy from, pinned, with its rows.
    pub(super) fn take_cached_prefix(&mut self, id: SeqId) -> (usize, Option<(u32, usize)>) {
        let bs = self.blocks.block_size();
        let s = self
            .seqs
            .get_mut(&id)
            .expect("waiting ids are known. This is a bug.");
        if !s.cache || !self.blocks.caching() || !s.blocks.is_empty() {
            return (0, None);
        }
        let last = s.tokens.len() - 1;
        s.hashes(last / bs, bs);
        let found = self.blocks.lookup(&s.hashes[..last / bs], &s.tokens);
        let k = found.len();
        s.registered = k;
        s.computed = k * bs;
        s.blocks = found;
        let parent = if k == 0 { s.root } else { s.hashes[k - 1] };
        let tail = &s.tokens[k * bs..last.min((k + 1) * bs)];
        let copy = self.blocks.partial(parent, tail);
        if let Some((src, rows)) = copy {
            self.blocks.pin(src);
            s.computed += rows;
        }
        (s.computed, copy)
    }

    /// Undoes [`Self::take_cached_prefix`] for a sequence that could not be admitted.
    pub(super) fn give_back_cached_prefix(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.get_mut(&id) {
            self.blocks.release(&mut s.blocks);
            s.computed = 0;
            s.registered = 0;
        }
    }
}
