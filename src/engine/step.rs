//! What one step computes: the scheduler's plan, handed to the engine.

use super::scheduler::SeqId;

/// One sequence's share of a step: compute `len` tokens starting at position `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub id: SeqId,
    pub start: usize,
    pub len: usize,
    /// True when the chunk reaches the sequence's last token, so a new token is sampled.
    pub logits: bool,
    /// Draft tokens after the sequence's last token: the chunk's last `draft` positions
    /// hold them, and every row's logits are needed to verify them.
    pub draft: usize,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    pub chunks: Vec<Chunk>,
    /// Sequences that lost their KV blocks this step and went back to waiting.
    pub preempted: Vec<SeqId>,
    /// Sequences that started running for the first time this step.
    pub admitted: Vec<SeqId>,
    /// KV rows to copy before the step runs (a cached block's leading rows into a new
    /// sequence's own block).
    pub copies: Vec<BlockCopy>,
}

/// Copy rows `0..rows` of KV block `src` into block `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: u32,
    pub dst: u32,
    pub rows: usize,
}
