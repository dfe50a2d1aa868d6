//! The model layer: GGUF loading, the forward pass, tokenizer, detokenizer and chat template.
//!
//! Knows candle, GGUF and text; never the scheduler or HTTP. Invariant: everything a model file
//! implies (hyper-parameters, vocabulary, template, stop tokens) is read from the file itself.

pub mod check;
pub mod detok;
pub mod fim;
pub mod gguf;
mod gguf_check;
pub mod llama;
pub mod lora;
mod pyjson;
pub mod runner;
pub mod synth;
pub mod template;
pub mod tokenizer;

use std::path::Path;

use candle_core::Device;

use crate::backend::{Backend, Cpu};

pub use crate::backend::KvPool;
pub use gguf::{GgufFile, ModelConfig, Pooling, RopeScaling};
pub use llama::{KvCache, Llama, Logits, SeqInput};
pub use runner::{LlamaRunner, ModelRunner};
pub use template::{ChatTemplate, Message};
pub use tokenizer::Tokenizer;

use crate::error::ModelError;

/// Everything needed to turn messages into tokens and tokens into text, plus the weights on
/// backend `B` (the CPU unless named).
pub struct LoadedModel<B: Backend = Cpu> {
    pub llama: Llama<B>,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// True when the template came from the file, false for a built-in fallback.
    pub template_from_file: bool,
}

impl LoadedModel<Cpu> {
    /// Loads `path` for the CPU, with an optional `tokenizer.json` that replaces the GGUF
    /// vocabulary.
    pub fn load(
        path: &Path,
        tokenizer_json: Option<&Path>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::load_on(path, tokenizer_json, device, Cpu)
    }
}

impl<B: Backend> LoadedModel<B> {
    /// Loads `path` onto `backend` (candle reads the file's tensors on `device`), with an
    /// optional `tokenizer.json` that replaces the GGUF vocabulary.
    pub fn load_on(
        path: &Path,
        tokenizer_json: Option<&Path>,
        device: &Device,
        backend: B,
    ) -> Result<Self, ModelError> {
        let mut file = GgufFile::open(path)?;
        // Config first: an unsupported architecture is reported before anything else.
        ModelConfig::from_gguf(&file)?;
        let tokenizer = match tokenizer_json {
            Some(p) => Tokenizer::from_file(p, &file)?,
            None => Tokenizer::from_gguf(&file)?,
        };
        let (template, template_from_file) = load_template(&file, &tokenizer)?;
        let llama = Llama::load_on(&mut file, device, backend)?;
        // candle repacks Q4_K / Q6_K / Q8_0 weights for its tile kernels on their first
        // matmul: do it now, at load, so no request pays seconds for it.
        let started = std::time::Instant::now();
        let mut cache = llama.new_cache();
        llama.forward(&[0], &mut cache)?;
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            "warm-up forward (weight repacking) done"
        );
        Ok(Self {
            llama,
            tokenizer,
            template,
            template_from_file,
        })
    }

    /// Renders `messages` with the chat template and an open assistant turn.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String, ModelError> {
        self.template.render(messages, true)
    }
}

fn load_template(file: &GgufFile, tok: &Tokenizer) -> Result<(ChatTemplate, bool), ModelError> {
    let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_default();
    let (bos, eos) = (text(tok.bos), text(tok.eos));
    if let Ok(src) = file.get_str("tokenizer.chat_template") {
        match ChatTemplate::new(src, &bos, &eos) {
            Ok(template) => return Ok((template, true)),
            // As llama.cpp: a template minijinja cannot read falls back to a built-in one,
            // with a warning (`--chat-template-file` can give the right one), rather than
            // stopping a model that may serve completions and embeddings.
            Err(e) => tracing::warn!(
                error = %e,
                "the model's chat template cannot be used; a built-in one is used instead \
                 (give the right one with --chat-template-file)"
            ),
        }
    }
    let src = ChatTemplate::fallback_source(|t| tok.token_id(t).is_some());
    Ok((ChatTemplate::new(src, &bos, &eos)?, false))
}
