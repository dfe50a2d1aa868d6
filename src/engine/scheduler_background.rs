//! The scheduler's background sequences (`x-edgeinfer-priority: low`) making way for
//! foreground ones: their prompts computed after the rest, and their blocks given up.

use super::{Scheduler, SeqId, Step};

/// While foreground sequences run or wait, background prompts compute at most this share of
/// `max_batch_tokens` a step together: a long prompt's chunk (its attention over a long
/// context above all) would otherwise lengthen every step the foreground sequences decode in.
const BACKGROUND_CHUNK_SHARE: usize = 16;

/// Steps the short chunks last after the foreground sequences are gone: a client's next
/// request (an agent's next turn) often comes right after its last one ends.
pub(super) const FOREGROUND_LINGER_STEPS: usize = 16;

impl Scheduler {
    /// Rows the step's background prompts may compute together: `max_background_rows` (so
    /// the step a foreground request arrives during, which it waits for, is short), and no
    /// more than a sixteenth of the budget while `foreground` sequences run or wait (or did
    /// lately).
    pub(super) fn background_rows(&self, foreground: bool) -> usize {
        let own = match self.config.max_background_rows {
            0 => usize::MAX,
            n => n,
        };
        if foreground {
            own.min((self.config.max_batch_tokens / BACKGROUND_CHUNK_SHARE).max(1))
        } else {
            own
        }
    }

    /// Rows `id` may compute this step: a background prompt's come out of `bg_rows` (what
    /// the step's background prompts have left); anything else's are not limited here.
    pub(super) fn row_limit(&self, id: SeqId, bg_rows: usize) -> usize {
        if self.background_prompt(id) {
            bg_rows
        } else {
            usize::MAX
        }
    }

    /// For foreground sequence `id`, out of blocks for its first `positions` positions:
    /// running background sequences, newest first, give theirs up until `id` has them, if
    /// all of them together would free enough (otherwise none does). The rows the
    /// preempted ones had planned this step go back to the budgets. Returns whether `id`
    /// now fits.
    pub(super) fn make_room(
        &mut self,
        id: SeqId,
        positions: usize,
        step: &mut Step,
        budget: &mut usize,
        scored_left: &mut usize,
    ) -> bool {
        let background: Vec<SeqId> = (self.running.iter().rev())
            .filter(|r| self.seqs[r].tenant.background)
            .copied()
            .collect();
        let needed = self.blocks.blocks_for(positions) - self.seqs[&id].blocks.len();
        let tables = background.iter().map(|b| self.seqs[b].blocks.as_slice());
        if background.is_empty() || self.blocks.free_count() + self.blocks.freed_by(tables) < needed
        {
            return false;
        }
        for gone in background {
            self.preempt_planned(gone, step, budget, scored_left);
            if self.grow(id, positions) {
                return true;
            }
        }
        debug_assert!(
            false,
            "the background sequences' blocks were counted. This is a bug."
        );
        false
    }

    /// Whether `id` is a background sequence with more than one token to compute.
    pub(super) fn background_prompt(&self, id: SeqId) -> bool {
        let s = &self.seqs[&id];
        s.tenant.background && s.tokens.len() - s.computed > 1
    }
}
