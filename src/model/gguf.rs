//! Opening a GGUF file: magic and size checks, metadata access, and the model's
//! hyper-parameters ([`ModelConfig`]).
//!
//! Knows the GGUF layout and llama.cpp's metadata keys; never the forward pass or the tokenizer.
//! Invariant: every tensor named in the header lies wholly inside the file, so later reads
//! cannot hit a short read.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::error::ModelError;

type Result<T> = std::result::Result<T, ModelError>;

/// The header of a GGUF of `actual` bytes read from `reader`: the magic, a bounds-checked
/// walk over counts, lengths, dimensions and offsets, candle's parse, and every tensor
/// inside the file. Errors name `path` and the problem; nothing is allocated from an
/// unchecked size.
pub fn read_content<R: Read + Seek>(reader: &mut R, actual: u64, path: &Path) -> Result<Content> {
    let not_gguf = |reason: String| ModelError::NotGguf {
        path: path.to_path_buf(),
        reason,
    };
    let mut magic = [0u8; 4];
    reader
        .read_exact(&mut magic)
        .map_err(|_| not_gguf(format!("only {actual} bytes long")))?;
    if &magic != b"GGUF" {
        return Err(not_gguf(format!(
            "it starts with {magic:02x?}, not the GGUF magic \"GGUF\""
        )));
    }
    reader.rewind().map_err(|source| ModelError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    // Counts, lengths and dimensions checked against the file before candle parses (and
    // allocates) anything.
    super::gguf_check::check_header(&mut *reader, actual).map_err(not_gguf)?;
    reader.rewind().map_err(|source| ModelError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    // candle panics on a few malformed headers (e.g. `general.alignment = 0`): contain it.
    let content = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(reader)))
        .map_err(|_| not_gguf("its header is malformed".into()))?
        .map_err(|e| not_gguf(format!("its header cannot be read ({e})")))?;
    for (name, info) in &content.tensor_infos {
        let elems = info.shape.elem_count();
        let block = info.ggml_dtype.block_size();
        let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
        let needed = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|n| n.checked_add(bytes))
            .unwrap_or(u64::MAX);
        if needed > actual {
            return Err(ModelError::Truncated {
                path: path.to_path_buf(),
                tensor: name.clone(),
                needed,
                actual,
            });
        }
    }
    Ok(content)
}

/// [`read_content`] over bytes in memory (fuzzing, tests).
pub fn read_content_bytes(bytes: &[u8]) -> Result<Content> {
    let mut cursor = std::io::Cursor::new(bytes);
    read_content(&mut cursor, bytes.len() as u64, Path::new("(memory)"))
}

/// A tensor's GGML blocks in the mapped file, its type and its dimensions (candle's order).
pub type TensorBytes<'a> = (&'a [u8], GgmlDType, Vec<usize>);

/// An open GGUF file: its parsed header, a reader for tensor data and, where the system
/// allows, a read-only memory map of the file for tensors taken as bytes.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    reader: BufReader<File>,
    map: Option<memmap2::Mmap>,
}

impl GgufFile {
    /// Opens and validates `path`: the magic bytes, the header, and that every tensor fits.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| ModelError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let actual = file
            .metadata()
            .map_err(|source| ModelError::Open {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        // Mapped before the checks, so they hold for the bytes the map shows. Safety: the
        // map is read-only and lives only while the model loads (the weights are packed
        // into memory of our own); our downloads replace a model file whole (written to a
        // temporary name, then renamed). A file truncated in place during those seconds, or
        // an I/O error on network storage, would end the process (SIGBUS) instead of an
        // error: `EDGEINFER_NO_MMAP=1` reads the file instead.
        let map = if crate::kernels::env_flag("EDGEINFER_NO_MMAP") {
            None
        } else {
            unsafe { memmap2::Mmap::map(&file) }
                .ok()
                .filter(|m| m.len() as u64 == actual)
        };
        let mut reader = BufReader::new(file);
        let content = read_content(&mut reader, actual, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
            map,
        })
    }

    /// One tensor's GGML blocks as they lie in the file, with its type and dimensions, when
    /// the file is mapped (`None` otherwise: read it with [`Self::tensor`]). The header
    /// checks put every tensor inside the file.
    pub fn tensor_bytes(&self, name: &str) -> Result<Option<TensorBytes<'_>>> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let Some(map) = &self.map else {
            return Ok(None);
        };
        let dtype = info.ggml_dtype;
        let len = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        let start = self.content.tensor_data_offset.checked_add(info.offset);
        let range = start
            .and_then(|s| usize::try_from(s).ok())
            .and_then(|s| Some(s..s.checked_add(len)?));
        let bytes = range
            .and_then(|r| map.get(r))
            .ok_or_else(|| ModelError::Truncated {
                path: self.path.clone(),
                tensor: name.to_string(),
                needed: start.map_or(u64::MAX, |s| s.saturating_add(len as u64)),
                actual: map.len() as u64,
            })?;
        Ok(Some((bytes, dtype, info.shape.dims().to_vec())))
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads one tensor onto `device`, naming it if it is missing.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(ModelError::MissingTensor(name.to_string()));
        }
        Ok(self.content.tensor(&mut self.reader, name, device)?)
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.metadata(key) {
            None => Err(ModelError::MissingMetadata(key.into())),
            Some(v) => v.to_string().map(|s| s.as_str()).map_err(|e| bad(key, e)),
        }
    }

    pub fn get_u32(&self, key: &str) -> Result<u32> {
        match self.metadata(key) {
            None => Err(ModelError::MissingMetadata(key.into())),
            Some(v) => as_u32(v).ok_or_else(|| bad(key, "not an unsigned integer")),
        }
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.metadata(key) {
            None => Err(ModelError::MissingMetadata(key.into())),
            Some(Value::F32(v)) => Ok(*v),
            Some(Value::F64(v)) => Ok(*v as f32),
            Some(v) => as_u32(v)
                .map(|u| u as f32)
                .ok_or_else(|| bad(key, "not a number")),
        }
    }

    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.metadata(key).map(|_| self.get_u32(key)).transpose()
    }

    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.metadata(key).map(|_| self.get_f32(key)).transpose()
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(bad(key, "not a boolean")),
        }
    }

    /// Shape of a tensor in candle's order (outermost first), if present.
    pub fn tensor_dims(&self, name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|i| i.shape.dims().to_vec())
    }
}

fn as_u32(v: &Value) -> Option<u32> {
    match v {
        Value::U8(x) => Some(*x as u32),
        Value::U16(x) => Some(*x as u32),
        Value::U32(x) => Some(*x),
        Value::U64(x) => u32::try_from(*x).ok(),
        Value::I8(x) => u32::try_from(*x).ok(),
        Value::I16(x) => u32::try_from(*x).ok(),
        Value::I32(x) => u32::try_from(*x).ok(),
        Value::I64(x) => u32::try_from(*x).ok(),
        _ => None,
    }
}

fn bad(key: &str, reason: impl std::fmt::Display) -> ModelError {
    ModelError::BadMetadata {
        key: key.into(),
        reason: reason.to_string(),
    }
}

/// RoPE frequency scaling, as llama.cpp applies it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions are divided by `factor`.
    Linear {
        factor: f32,
    },
}

/// How one embedding is made of a sequence's final hidden states (llama.cpp's
/// `{arch}.pooling_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Their mean.
    Mean,
    /// The first token's (`cls`).
    First,
    /// The last token's.
    Last,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::First => "cls",
            Pooling::Last => "last",
        }
    }
}

impl std::str::FromStr for Pooling {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "cls" | "first" => Ok(Pooling::First),
            "last" => Ok(Pooling::Last),
            _ => Err(format!("unknown pooling `{s}` (mean, cls or last)")),
        }
    }
}

/// Hyper-parameters of a Llama-family model, read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub n_layer: usize,
    pub dim: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub norm_eps: f64,
    /// True when the file has no `output.weight`: the lm head reuses `token_embd.weight`.
    pub tied_embeddings: bool,
    /// The pooling an embedding model declares; `None` for a chat model (none declared).
    pub pooling: Option<Pooling>,
}

/// More layers than any model has (Llama 3.1 405B has 126): a file claiming more is corrupt,
/// and is refused before anything is sized by it.
const MAX_LAYERS: usize = 4096;

impl ModelConfig {
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        // One part of a split model (`-00001-of-00003.gguf`) has some of the tensors (and
        // only the first the metadata).
        if let Some(n) = f.opt_u32("split.count")?.filter(|&n| n > 1) {
            let part = f.opt_u32("split.no")?.unwrap_or(0) + 1;
            return Err(bad(
                "split.count",
                format!(
                    "this file is part {part} of a model split in {n}; merge the parts into one \
                     file (llama.cpp's `llama-gguf-split --merge FIRST-PART MERGED.gguf`) and load that"
                ),
            ));
        }
        let arch = f.get_str("general.architecture")?.to_string();
        if arch != "llama" && arch != "mistral" {
            return Err(ModelError::UnsupportedArchitecture(arch));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let n_layer = f.get_u32(&key("block_count"))? as usize;
        if n_layer > MAX_LAYERS {
            return Err(bad(
                &key("block_count"),
                format!("{n_layer} layers is past the {MAX_LAYERS} any model has"),
            ));
        }
        let dim = f.get_u32(&key("embedding_length"))? as usize;
        let n_head = f.get_u32(&key("attention.head_count"))? as usize;
        let n_kv_head = f
            .opt_u32(&key("attention.head_count_kv"))?
            .map_or(n_head, |v| v as usize);
        if n_head == 0
            || !dim.is_multiple_of(n_head)
            || n_kv_head == 0
            || !n_head.is_multiple_of(n_kv_head)
        {
            return Err(bad(
                &key("attention.head_count"),
                format!("{n_head} heads / {n_kv_head} KV heads do not divide dim {dim}"),
            ));
        }
        let head_dim = f
            .opt_u32(&key("attention.key_length"))?
            .map_or(dim / n_head, |v| v as usize);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad(
                &key("attention.key_length"),
                format!("head dimension {head_dim} must be even and positive"),
            ));
        }
        if let Some(rope_dim) = f.opt_u32(&key("rope.dimension_count"))? {
            if rope_dim as usize != head_dim {
                return Err(bad(
                    &key("rope.dimension_count"),
                    format!("partial rotary ({rope_dim} of {head_dim}) is not supported"),
                ));
            }
        }
        let embd = f
            .tensor_dims("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let vocab_size = *embd.first().unwrap_or(&0);
        let ffn_dim = match f.opt_u32(&key("feed_forward_length"))? {
            Some(v) => v as usize,
            None => f
                .tensor_dims("blk.0.ffn_gate.weight")
                .ok_or_else(|| ModelError::MissingTensor("blk.0.ffn_gate.weight".into()))?
                .first()
                .copied()
                .unwrap_or(0),
        };
        if vocab_size == 0 || ffn_dim == 0 || n_layer == 0 {
            return Err(bad(
                &key("block_count"),
                format!("empty model: {n_layer} layers, vocabulary {vocab_size}, ffn {ffn_dim}"),
            ));
        }
        let rope_scaling = match f.metadata(&key("rope.scaling.type")) {
            Some(Value::String(t)) if t == "linear" => {
                let factor = f.get_f32(&key("rope.scaling.factor"))?;
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(bad(&key("rope.scaling.factor"), format!("{factor}")));
                }
                RopeScaling::Linear { factor }
            }
            Some(Value::String(t)) if t == "none" => RopeScaling::None,
            Some(Value::String(t)) => {
                return Err(bad(
                    &key("rope.scaling.type"),
                    format!("scaling `{t}` is not supported"),
                ))
            }
            _ => match f.opt_f32(&key("rope.scale_linear"))? {
                Some(factor) if !(factor.is_finite() && factor > 0.0) => {
                    return Err(bad(&key("rope.scale_linear"), format!("{factor}")));
                }
                Some(factor) if factor != 1.0 => RopeScaling::Linear { factor },
                _ => RopeScaling::None,
            },
        };
        let pooling = match f.opt_u32(&key("pooling_type"))? {
            None | Some(0) => None,
            Some(1) => Some(Pooling::Mean),
            Some(2) => Some(Pooling::First),
            Some(3) => Some(Pooling::Last),
            Some(t) => {
                // (4 is a reranker's.) The model still generates; embeddings pool the mean
                // unless `--pooling` says otherwise.
                tracing::warn!(pooling_type = t, "unsupported pooling type ignored");
                None
            }
        };
        if f.opt_bool(&key("attention.causal"))? == Some(false) {
            return Err(bad(
                &key("attention.causal"),
                "bidirectional attention (an encoder-style embedding model) is not supported",
            ));
        }
        // Read as llama.cpp reads them; a value no model can run with is named, not loaded
        // into a model whose every output is NaN or that can hold no token.
        let context_length = match f.opt_u32(&key("context_length"))? {
            Some(0) => return Err(bad(&key("context_length"), "0: the model holds no token")),
            v => v.map_or(4096, |v| v as usize),
        };
        let rope_theta = f.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(bad(&key("rope.freq_base"), format!("{rope_theta}")));
        }
        let norm_eps = f
            .opt_f32(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5);
        if !(norm_eps.is_finite() && norm_eps >= 0.0) {
            return Err(bad(
                &key("attention.layer_norm_rms_epsilon"),
                format!("{norm_eps}"),
            ));
        }
        Ok(Self {
            pooling,
            n_layer,
            dim,
            n_head,
            n_kv_head,
            head_dim,
            ffn_dim,
            vocab_size,
            context_length,
            rope_theta,
            rope_scaling,
            norm_eps: norm_eps as f64,
            tied_embeddings: !f.has_tensor("output.weight"),
            architecture: arch,
        })
    }
}
