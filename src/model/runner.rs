//! The seam between the engine and a model: [`ModelRunner`] runs one scheduler step (packed
//! sequences, chunked prefill and decode together) over a paged KV store that the runner
//! owns. The engine knows only this trait, so its loop can be tested with a fake model, and
//! [`LlamaRunner`] runs on any [`Backend`] (the CPU, or CUDA with the `cuda` feature).

use super::llama::{Llama, SeqInput};
use crate::backend::{Backend, Cpu};
use crate::error::ModelError;

/// One step's outputs: for each sequence of the step, the rows it asked for (its last
/// token's `vocab_size` logits, every token's logits row after row, or every token's
/// `embedding_length` hidden state row after row), `None` if none.
pub type StepLogits = Vec<Option<Vec<f32>>>;

/// A model as the engine drives it. Runs on the engine thread only.
pub trait ModelRunner: Send + 'static {
    /// Positions one sequence may hold, prompt and output together.
    fn context_length(&self) -> usize;

    /// Values in a hidden state ([`Logits::Hidden`]'s rows).
    ///
    /// [`Logits::Hidden`]: super::Logits::Hidden
    fn embedding_length(&self) -> usize;

    /// Sets up the KV store: `n_blocks` blocks of `block_size` positions each. Called once,
    /// before the first step; the engine's block manager hands out the block ids. Fails
    /// when the device cannot hold it.
    fn allocate_kv(&mut self, block_size: usize, n_blocks: usize) -> Result<(), ModelError>;

    /// Copies the first `rows` positions of block `src` into block `dst` (copy-on-write of
    /// a shared, partly filled prefix block).
    fn copy_kv(&mut self, src: u32, dst: u32, rows: usize) -> Result<(), ModelError>;

    /// Runs one step: each sequence's `tokens` at positions `start..`, its KV through its
    /// block table. Writes their keys and values, and returns the logits asked for.
    fn forward(&mut self, seqs: &[SeqInput]) -> Result<StepLogits, ModelError>;
}

/// The Llama / Mistral forward pass on backend `B`, with its KV store on the same backend.
pub struct LlamaRunner<B: Backend = Cpu> {
    llama: Llama<B>,
    kv: Option<B::Kv>,
}

impl<B: Backend> LlamaRunner<B> {
    pub fn new(llama: Llama<B>) -> Self {
        Self { llama, kv: None }
    }

    pub fn llama(&self) -> &Llama<B> {
        &self.llama
    }
}

fn unallocated() -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(
        "the KV store is used before it is allocated. This is a bug.".into(),
    ))
}

impl<B: Backend> ModelRunner for LlamaRunner<B> {
    fn context_length(&self) -> usize {
        self.llama.config.context_length
    }

    fn embedding_length(&self) -> usize {
        self.llama.config.dim
    }

    fn allocate_kv(&mut self, block_size: usize, n_blocks: usize) -> Result<(), ModelError> {
        self.kv = None; // the old store goes first: a GPU may not hold two
        self.kv = Some(self.llama.new_kv(block_size, n_blocks)?);
        Ok(())
    }

    fn copy_kv(&mut self, src: u32, dst: u32, rows: usize) -> Result<(), ModelError> {
        let kv = self.kv.as_mut().ok_or_else(unallocated)?;
        self.llama.copy_kv(kv, src, dst, rows)
    }

    fn forward(&mut self, seqs: &[SeqInput]) -> Result<StepLogits, ModelError> {
        let kv = self.kv.as_mut().ok_or_else(unallocated)?;
        self.llama.forward_batch(seqs, kv)
    }
}
