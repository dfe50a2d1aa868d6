//! Random LoRA adapters for a model file, in llama.cpp's GGUF adapter form, for tests and
//! load runs where no trained adapter can be fetched.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::fill_uniform;
use crate::error::ModelError;
use crate::model::gguf::{GgufFile, ModelConfig};
use crate::model::lora::{target_shapes, TARGETS};

/// What adapter to write.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub rank: usize,
    /// `adapter.lora.alpha`: products are scaled by `alpha / rank`.
    pub alpha: f32,
    pub seed: u64,
    /// How far it moves each layer's output, relative to its input (about).
    pub strength: f32,
    /// The blocks' layers it adapts ([`TARGETS`] names); empty: all of them.
    pub targets: Vec<String>,
    /// The blocks it adapts; `None`: all.
    pub blocks: Option<Vec<usize>>,
    /// Whether it adapts the lm head (`output.weight`) too.
    pub output: bool,
    /// F32 or F16.
    pub dtype: GgmlDType,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            seed: 1,
            strength: 0.05,
            targets: Vec::new(),
            blocks: None,
            output: false,
            dtype: GgmlDType::F16,
        }
    }
}

/// Writes a random adapter of `spec` for the model `base` to `out`; returns its pairs.
pub fn write_lora(out: &Path, base: &Path, spec: &LoraSpec) -> Result<usize, ModelError> {
    let file = GgufFile::open(base)?;
    let c = ModelConfig::from_gguf(&file)?;
    let shapes = target_shapes(&c);
    let mut jobs: Vec<(String, usize, usize)> = Vec::new();
    for l in 0..c.n_layer {
        if spec.blocks.as_ref().is_some_and(|b| !b.contains(&l)) {
            continue;
        }
        for (t, &(n_out, n_in)) in TARGETS.iter().zip(&shapes) {
            if spec.targets.is_empty() || spec.targets.iter().any(|x| x == t) {
                jobs.push((format!("blk.{l}.{t}.weight"), n_out, n_in));
            }
        }
    }
    if spec.output {
        jobs.push(("output.weight".into(), c.vocab_size, c.dim));
    }
    let r = spec.rank.max(1);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (i, (name, n_out, n_in)) in jobs.iter().enumerate() {
        let seed = spec.seed.wrapping_mul(1_000_003).wrapping_add(2 * i as u64);
        // A·x about as large as x; B·(A·x) about `strength` of it, after `alpha / rank`.
        let a_scale = (3.0 / *n_in as f32).sqrt();
        let applied = if spec.alpha != 0.0 {
            spec.alpha / r as f32
        } else {
            1.0
        };
        let b_scale = spec.strength * (3.0 / r as f32).sqrt() / applied;
        let matrix = |rows: usize, cols: usize, seed: u64, scale: f32| {
            let mut v = vec![0f32; rows * cols];
            fill_uniform(&mut v, seed, scale);
            let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu)?;
            QTensor::quantize(&t, spec.dtype)
        };
        tensors.push((format!("{name}.lora_a"), matrix(r, *n_in, seed, a_scale)?));
        tensors.push((
            format!("{name}.lora_b"),
            matrix(*n_out, r, seed + 1, b_scale)?,
        ));
    }
    let meta: Vec<(&str, Value)> = vec![
        (
            "general.architecture",
            Value::String(c.architecture.clone()),
        ),
        ("general.type", Value::String("adapter".into())),
        ("general.name", Value::String("synthetic LoRA".into())),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(spec.alpha)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let io = |source| ModelError::Open {
        path: out.to_path_buf(),
        source,
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).map_err(io)?);
    candle_core::quantized::gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    std::io::Write::flush(&mut f).map_err(io)?;
    Ok(jobs.len())
}
