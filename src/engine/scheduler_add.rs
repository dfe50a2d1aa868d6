//! Queueing sequences: their prompts, whose they are, and which prefix-cache space they use.

use super::{Scheduler, SeqId, SeqState, Tenant};
use crate::engine::blocks::ROOT_HASH;

impl Scheduler {
    /// Queues a sequence with its prompt; `cache` lets it use the prefix cache (when the
    /// block manager has one).
    pub fn add(&mut self, id: SeqId, prompt: &[u32], cache: bool) {
        assert!(
            !prompt.is_empty(),
            "prompts are validated non-empty. This is a bug."
        );
        self.seqs.insert(
            id,
            SeqState {
                tokens: prompt.to_vec(),
                computed: 0,
                blocks: Vec::new(),
                ever_ran: false,
                cache,
                hashes: Vec::new(),
                registered: 0,
                cached_tokens: 0,
                scored_until: 0,
                rescored: 0,
                draft: 0,
                tenant: Tenant::from(0),
                root: ROOT_HASH,
            },
        );
        self.waiting.push_back(id);
    }

    /// Queues a sequence whose prompt is scored: every prompt row returns its logits, so its
    /// prefill rows share the step's `max_scored_rows`; it never uses the prefix cache.
    pub fn add_scoring(&mut self, id: SeqId, prompt: &[u32]) {
        self.add(id, prompt, false);
        if let Some(s) = self.seqs.get_mut(&id) {
            s.scored_until = prompt.len();
        }
    }

    /// Names whose sequence `id` is. Waiting sequences are admitted tenant by tenant (see
    /// `fair.rs`): next is always one of the tenant running the fewest sequences for its
    /// weight (the earliest of its own), so one tenant's burst does not queue the others
    /// behind it; a preempted sequence still goes first. One tenant alone is served in
    /// queue order.
    pub fn set_tenant(&mut self, id: SeqId, tenant: impl Into<Tenant>) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tenant = tenant.into();
        }
    }

    /// Puts sequence `id` in its own prefix-cache space, `root` (the parent hash of its first
    /// block): a LoRA adapter changes every key and value, so sequences run with different
    /// adapters never share cached blocks. Called before it is first scheduled.
    pub fn set_cache_root(&mut self, id: SeqId, root: u64) {
        if let Some(s) = self.seqs.get_mut(&id) {
            debug_assert!(s.hashes.is_empty() && !s.ever_ran, "set before scheduling");
            s.root = root;
        }
    }
}
