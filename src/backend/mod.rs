//! The seam between the model's layer graph and the hardware: [`Backend`] holds the per-op
//! work of one forward step (embedding, quantized matmul, norm, RoPE, KV write, paged
//! attention, SwiGLU, residual adds, logits back to the host).
//!
//! [`Cpu`] runs today's kernels ([`crate::kernels`]) on host memory; `cuda` (behind the
//! `cuda` cargo feature) runs candle's CUDA quantized matmuls and our own paged-KV kernels.
//! The model layer ([`crate::model::Llama`]) is generic over the backend and holds only the
//! layer graph; the engine sees neither (it drives a [`crate::model::ModelRunner`]).
//!
//! Knows tensors, weights and KV memory; never tokens' meaning, the scheduler or HTTP.

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod kv;

use candle_core::quantized::{GgmlDType, QTensor};

pub use cpu::{Cpu, Rows};
pub use kv::KvPool;

use crate::error::ModelError;

pub type Result<T> = std::result::Result<T, ModelError>;

/// What a quantized matrix is loaded for: the device keeps only what it will use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightUse {
    /// Only multiplied by activations.
    Matmul,
    /// Only read row by row as token embeddings.
    Embedding,
    /// Both (the output matrix of a model with tied embeddings).
    Both,
}

/// Heads and their width, for attention and RoPE.
#[derive(Clone, Copy, Debug)]
pub struct HeadShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// A LoRA pair's dimensions: `A` is `rank × n_in`, `B` is `n_out × rank`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraShape {
    pub rank: usize,
    pub n_in: usize,
    pub n_out: usize,
}

/// One sequence's part of a step, as the backend needs it: `len` rows of the step's packed
/// activations, at positions `start..start + len`, with KV through `blocks`.
#[derive(Clone, Debug)]
pub struct StepSeq {
    pub row: usize,
    pub len: usize,
    pub start: usize,
    pub blocks: Vec<u32>,
}

/// Everything about one step that every layer shares, in host form: the backend turns it into
/// its own [`Backend::Step`] once (a GPU uploads it once, not once per layer).
pub struct StepPlan {
    pub seqs: Vec<StepSeq>,
    /// Total rows (tokens) in the step.
    pub rows: usize,
    /// RoPE `(cos, sin)` pairs: `head_dim / 2` per row, row `i` at its own position.
    pub rope: Vec<(f32, f32)>,
}

/// The per-op work of a Llama-family forward step on one device.
///
/// Activations are `rows × width` f32 matrices ([`Backend::Act`]). Every op is pure except
/// [`Backend::kv_write`] and [`Backend::copy_kv`], which change only the KV rows named.
pub trait Backend: Send + Sync + Sized + 'static {
    /// A `rows × width` f32 activation matrix on the device.
    type Act;
    /// A quantized weight matrix (`out × in`), as loaded for its [`WeightUse`].
    type Weight: Send + Sync;
    /// A norm's weight vector.
    type Norm: Send + Sync;
    /// The paged KV store: per layer, `n_blocks × block_size` positions of keys and values.
    type Kv: Send;
    /// One step's shared, device-side data (RoPE table, block tables, KV slots).
    type Step;
    /// A LoRA adapter's pair for one weight ([`Backend::load_lora`]).
    type Lora: Send + Sync;

    /// A short name for logs and metrics ("cpu", "cuda:0").
    fn name(&self) -> String;

    fn load_weight(&self, t: &QTensor, usage: WeightUse) -> Result<Self::Weight>;
    /// A weight from its GGML blocks as they lie in the (mapped) file, when the backend can
    /// take them so; `None`: the caller reads a [`QTensor`] for [`Self::load_weight`].
    fn load_weight_bytes(
        &self,
        _bytes: &[u8],
        _dtype: GgmlDType,
        _dims: &[usize],
        _usage: WeightUse,
    ) -> Option<Result<Self::Weight>> {
        None
    }
    fn load_norm(&self, w: Vec<f32>) -> Result<Self::Norm>;
    /// A LoRA pair for an `n_out × n_in` weight: `a` is `rank × n_in` and `b` is
    /// `n_out × rank`, row-major f32.
    fn load_lora(&self, a: Vec<f32>, b: Vec<f32>, shape: LoraShape) -> Result<Self::Lora>;

    /// A KV store of `n_blocks` blocks of `block_size` positions, `stride` values per
    /// position (`n_kv_head * head_dim`), for `n_layer` layers.
    fn alloc_kv(
        &self,
        n_layer: usize,
        stride: usize,
        block_size: usize,
        n_blocks: usize,
    ) -> Result<Self::Kv>;
    /// Adds `extra` empty blocks at the end (a single growing sequence, for the CLI).
    fn grow_kv(&self, kv: &mut Self::Kv, extra: usize) -> Result<()>;
    fn kv_blocks(&self, kv: &Self::Kv) -> usize;
    /// Copies the first `rows` positions of block `src` into block `dst`, in every layer.
    fn copy_kv(&self, kv: &mut Self::Kv, src: u32, dst: u32, rows: usize) -> Result<()>;

    /// Uploads what the step's layers share.
    fn begin_step(&self, kv: &Self::Kv, plan: StepPlan) -> Result<Self::Step>;

    /// The embedding rows of `tokens` (`tokens.len() × dim`).
    fn embed(&self, table: &Self::Weight, tokens: &[u32]) -> Result<Self::Act>;
    /// A normalised copy of `x` (llama.cpp's RMS norm, times `w`).
    fn rms_norm(&self, x: &Self::Act, w: &Self::Norm, eps: f32) -> Result<Self::Act>;
    /// `x · wᵀ` for each of `ws`, sharing whatever preparation of `x` they can.
    fn matmul_many(&self, ws: &[&Self::Weight], x: &Self::Act) -> Result<Vec<Self::Act>>;
    fn matmul(&self, w: &Self::Weight, x: &Self::Act) -> Result<Self::Act> {
        Ok(self.matmul_many(&[w], x)?.remove(0))
    }
    /// Interleaved rotary embedding of `x` (`rows × heads · head_dim`), in place.
    fn rope(&self, x: &mut Self::Act, step: &Self::Step, head_dim: usize) -> Result<()>;
    /// Stores each row's key and value (rounded to f16) at its position in `layer`.
    fn kv_write(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        step: &Self::Step,
        k: &Self::Act,
        v: &Self::Act,
    ) -> Result<()>;
    /// Causal attention of each row's query over its own sequence's KV, positions
    /// `0..=pos`. Returns `rows × n_head · head_dim`.
    fn attention(
        &self,
        q: &Self::Act,
        kv: &Self::Kv,
        layer: usize,
        step: &Self::Step,
        shape: HeadShape,
    ) -> Result<Self::Act>;
    /// `gate = SiLU(gate) · up`, elementwise.
    fn silu_mul(&self, gate: &mut Self::Act, up: &Self::Act) -> Result<()>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Act, y: &Self::Act) -> Result<()>;
    /// A new matrix of the given rows of `x`, in that order.
    fn select_rows(&self, x: &Self::Act, rows: &[usize]) -> Result<Self::Act>;
    /// `y[r] += scale · B·A·x[r]` for each row `r` in `rows`: an adapter's update of a
    /// linear layer, for the rows of the sequences that use it.
    fn lora_add(
        &self,
        y: &mut Self::Act,
        x: &Self::Act,
        lora: &Self::Lora,
        rows: &[usize],
        scale: f32,
    ) -> Result<()>;
    /// `x` on the host, row-major.
    fn to_host(&self, x: Self::Act) -> Result<Vec<f32>>;
}
