//! Errors, one enum per layer, aggregated into [`Error`].
//!
//! Each variant's message is what a user reads: it names the file, tensor, key or field at
//! fault. `anyhow` is used only by the binary and tests, never by the library layers.

use std::path::PathBuf;

/// Problems loading a model: the GGUF file, its metadata, tensors, tokenizer or template.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot open model file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF file: {reason}")]
    NotGguf { path: PathBuf, reason: String },
    #[error("{path} is truncated: tensor `{tensor}` ends at byte {needed} but the file has {actual} bytes (an interrupted download? run `edgeinfer pull` again)")]
    Truncated {
        path: PathBuf,
        tensor: String,
        needed: u64,
        actual: u64,
    },
    #[error(
        "unsupported model architecture `{0}`: edgeinfer runs `llama` and `mistral` GGUF files"
    )]
    UnsupportedArchitecture(String),
    #[error("the model file has no tensor `{0}`")]
    MissingTensor(String),
    #[error("the model file has no metadata key `{0}`")]
    MissingMetadata(String),
    #[error("metadata key `{key}` is invalid: {reason}")]
    BadMetadata { key: String, reason: String },
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    BadShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("unknown tokenizer pre-tokenizer `tokenizer.ggml.pre = {0}`: known are default, gpt-2, smollm, llama-bpe, llama3, tekken; pass --tokenizer tokenizer.json to use your own")]
    UnknownPreTokenizer(String),
    #[error("unsupported tokenizer model `tokenizer.ggml.model = {0}`: known are gpt2 and llama")]
    UnsupportedTokenizer(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("LoRA adapter {path}: {reason}")]
    Adapter { path: PathBuf, reason: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("model computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Problems fetching a model: manifest, hub, fallback sources, checksum.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("unknown model `{name}`: known models are {known}; or pass HF_REPO:FILE (e.g. bartowski/Meta-Llama-3.1-8B-Instruct-GGUF:Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf)")]
    UnknownModel { name: String, known: String },
    #[error("invalid model spec `{spec}`: {reason}")]
    BadSpec { spec: String, reason: String },
    #[error("model manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("checksum mismatch for {path}: expected sha256 {expected}, got {actual}")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{0}")]
    Fetch(String),
    #[error("could not fetch {what}; every source failed:\n{attempts}")]
    AllSourcesFailed { what: String, attempts: String },
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Any error of the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(ModelError::Candle(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
