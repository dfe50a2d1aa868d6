//! The seam between the engine and a model: [`ModelRunner`] runs one scheduler step (packed
//! sequences, chunked prefill and decode together) over a paged KV store that the runner
//! owns. The engine knows only this trait, so its loop can be tested with a fake model and a
//! GPU backend can stand where [`LlamaRunner`] stands today.

use super::kv::KvPool;
use super::llama::{Llama, SeqInput};
use crate::error::ModelError;

/// One step's logits: for each sequence of the step, its last token's logits
/// (`vocab_size` values) if it asked for them.
pub type StepLogits = Vec<Option<Vec<f32>>>;

/// A model as the engine drives it. Runs on the engine thread only.
pub trait ModelRunner: Send + 'static {
    /// Positions one sequence may hold, prompt and output together.
    fn context_length(&self) -> usize;

    /// Sets up the KV store: `n_blocks` blocks of `block_size` positions each. Called once,
    /// before the first step; the engine's block manager hands out the block ids.
    fn allocate_kv(&mut self, block_size: usize, n_blocks: usize);

    /// Copies the first `rows` positions of block `src` into block `dst` (copy-on-write of
    /// a shared, partly filled prefix block).
    fn copy_kv(&mut self, src: u32, dst: u32, rows: usize);

    /// Runs one step: each sequence's `tokens` at positions `start..`, its KV through its
    /// block table. Writes their keys and values, and returns the logits asked for.
    fn forward(&mut self, seqs: &[SeqInput]) -> Result<StepLogits, ModelError>;
}

/// The Llama / Mistral forward pass on the CPU kernels, with an f16 [`KvPool`].
pub struct LlamaRunner {
    llama: Llama,
    pool: KvPool,
}

impl LlamaRunner {
    pub fn new(llama: Llama) -> Self {
        let pool = llama.new_pool(1, 0);
        Self { llama, pool }
    }

    pub fn llama(&self) -> &Llama {
        &self.llama
    }
}

impl ModelRunner for LlamaRunner {
    fn context_length(&self) -> usize {
        self.llama.config.context_length
    }

    fn allocate_kv(&mut self, block_size: usize, n_blocks: usize) {
        self.pool = self.llama.new_pool(block_size, n_blocks);
    }

    fn copy_kv(&mut self, src: u32, dst: u32, rows: usize) {
        self.pool.copy_rows(src, dst, rows);
    }

    fn forward(&mut self, seqs: &[SeqInput]) -> Result<StepLogits, ModelError> {
        self.llama.forward_batch(seqs, &mut self.pool)
    }
}
