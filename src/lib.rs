//! edgeinfer: a self-hosted edge inference node for quantized Llama- and Mistral-family GGUF
//! models.
//!
//! ```text
//! CLI / HTTP (api)          engine                               model (candle)
//! ----------------          ------                               --------------
//! prompt or messages  ->    validate, sample, stop rules   ->    GGUF weights, forward pass,
//! text stream         <-    incremental detokenization     <-    tokenizer, chat template
//! ```
//!
//! Modules:
//! - [`backend`]: the per-op work of a forward step on one device (CPU; CUDA with `--features cuda`).
//! - [`model`]: GGUF loading, the Llama forward pass, tokenizer, detokenizer, chat template.
//! - [`engine`]: sampling, stop strings, the generation loop.
//! - [`hub`]: the model manifest and downloads (Hugging Face Hub, then fallbacks), checksums.
//! - [`api`]: the OpenAI-compatible HTTP server (axum), errors, SSE, metrics.
//! - [`config`]: the command line.
//! - [`error`]: one error enum per layer.

pub mod api;
pub mod backend;
pub mod config;
pub mod engine;
pub mod error;
pub mod gateway;
pub mod hub;
pub mod kernels;
pub mod model;
pub mod structured;
pub mod telemetry;

pub use error::{Error, Result};
