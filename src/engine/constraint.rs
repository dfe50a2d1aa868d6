//! The seam between the engine and whatever restricts a sequence's next token (a grammar for
//! structured output or tool calls). The engine holds one per constrained sequence and knows
//! nothing of how it was built.
//!
//! Invariant: a sequence with a constraint only ever samples tokens the constraint allows,
//! and every sampled token is committed to it before the next step.

/// What a constraint failed at: the request fails with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConstraintError(pub String);

/// Restricts the next token of one sequence. Stop tokens (end of turn, EOS) are allowed
/// exactly when the constraint is satisfied so far: they end it.
pub trait TokenConstraint: Send + std::fmt::Debug {
    /// Whether `token` may come next. Cheap: called before any mask is computed.
    fn allows(&mut self, token: u32) -> Result<bool, ConstraintError>;
    /// Sets every logit whose token may not come next to `-inf`. At least one token is
    /// always left allowed, or this fails.
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError>;
    /// Advances past `token`, which [`allows`](Self::allows) accepted or the mask left.
    fn commit(&mut self, token: u32) -> Result<(), ConstraintError>;
    /// Tokens the constraint forces next (the only text it allows, tokenized), without
    /// advancing: a draft for speculation. None by default.
    fn forced(&mut self) -> Vec<u32> {
        Vec::new()
    }
}
