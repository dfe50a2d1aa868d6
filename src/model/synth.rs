//! Random-weight GGUF files of real model shapes (Llama 3.2 1B/3B, Llama 3.1 8B, Mistral 7B),
//! for benchmarks and tests where the real weights cannot be fetched (GPU machines without a
//! network, CI). The vocabulary, tokenizer metadata and chat template are copied from a donor
//! GGUF (the default model), so prompts tokenize and render exactly as with it.
//!
//! Knows GGUF and llama.cpp's quantization-type rules; never the forward pass. Invariant: a
//! `q4_k_m` file has the tensor types llama.cpp's `llama-quantize Q4_K_M` gives that shape, so
//! both engines read the same bytes per step.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::gguf::GgufFile;
use crate::error::ModelError;

/// The hyper-parameters of a published model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub name: &'static str,
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub rope_theta: f32,
    /// The output projection is the token embedding.
    pub tied: bool,
}

pub const SHAPES: [Shape; 4] = [
    Shape {
        name: "llama-3.2-1b",
        dim: 2048,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        ffn: 8192,
        rope_theta: 500_000.0,
        tied: true,
    },
    Shape {
        name: "llama-3.2-3b",
        dim: 3072,
        layers: 28,
        heads: 24,
        kv_heads: 8,
        ffn: 8192,
        rope_theta: 500_000.0,
        tied: true,
    },
    Shape {
        name: "llama-3.1-8b",
        dim: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        ffn: 14336,
        rope_theta: 500_000.0,
        tied: false,
    },
    Shape {
        name: "mistral-7b",
        dim: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        ffn: 14336,
        rope_theta: 1_000_000.0,
        tied: false,
    },
];

pub fn shape(name: &str) -> Option<Shape> {
    SHAPES.iter().copied().find(|s| s.name == name)
}

/// How the matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// llama.cpp's Q4_K_M mix: Q6_K for `output` and for half of `attn_v` / `ffn_down`.
    Q4KM,
    Q4_0,
    Q8_0,
    F16,
}

impl Quant {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q4_k_m" => Some(Self::Q4KM),
            "q4_0" => Some(Self::Q4_0),
            "q8_0" => Some(Self::Q8_0),
            "f16" => Some(Self::F16),
            _ => None,
        }
    }

    /// llama.cpp's file type number (`general.file_type`).
    fn file_type(self) -> u32 {
        match self {
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
        }
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third in
/// between, get more bits.
pub fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    let first = n_layers / 8;
    layer < first || layer >= 7 * n_layers / 8 || (layer - first) % 3 == 2
}

/// The storage type of one matrix (`name` without `blk.N.` and `.weight`).
pub fn matrix_type(quant: Quant, name: &str, layer: usize, n_layers: usize) -> GgmlDType {
    match quant {
        Quant::Q4_0 => GgmlDType::Q4_0,
        Quant::Q8_0 => GgmlDType::Q8_0,
        Quant::F16 => GgmlDType::F16,
        Quant::Q4KM => match name {
            "output" => GgmlDType::Q6K,
            "attn_v" | "ffn_down" if use_more_bits(layer, n_layers) => GgmlDType::Q6K,
            _ => GgmlDType::Q4K,
        },
    }
}

/// What to write.
#[derive(Debug, Clone, Copy)]
pub struct SynthSpec {
    pub shape: Shape,
    /// Fewer layers than the shape has (a small file for tests), or `None` for all.
    pub layers: Option<usize>,
    pub quant: Quant,
    pub seed: u64,
    /// `context_length` written to the metadata.
    pub context: usize,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SynthReport {
    pub bytes: u64,
    pub tensors: usize,
    pub vocab: usize,
}

/// A fast, seedable stream of uniform values (splitmix64).
fn fill_uniform(v: &mut [f32], seed: u64, scale: f32) {
    v.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s = seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for x in chunk {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                // 24 random bits in [-1, 1).
                *x = ((z >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale;
            }
        });
}

fn random_matrix(
    rows: usize,
    cols: usize,
    seed: u64,
    scale: f32,
    dtype: GgmlDType,
) -> Result<QTensor, ModelError> {
    let mut v = vec![0f32; rows * cols];
    fill_uniform(&mut v, seed, scale);
    let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu)?;
    Ok(QTensor::quantize(&t, dtype)?)
}

fn norm(dim: usize, seed: u64) -> Result<QTensor, ModelError> {
    let mut v = vec![0f32; dim];
    fill_uniform(&mut v, seed, 0.2);
    v.iter_mut().for_each(|x| *x += 1.0);
    Ok(QTensor::quantize(
        &Tensor::from_vec(v, dim, &Device::Cpu)?,
        GgmlDType::F32,
    )?)
}

/// Writes a random-weight model of `spec` to `out`, with the vocabulary, tokenizer metadata
/// and chat template of `donor`.
pub fn write(out: &Path, spec: &SynthSpec, donor: &Path) -> Result<SynthReport, ModelError> {
    let s = spec.shape;
    let n_layers = spec.layers.unwrap_or(s.layers).max(1);
    let donor = GgufFile::open(donor)?;
    let vocab = match donor.content.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => a.len(),
        _ => return Err(ModelError::MissingMetadata("tokenizer.ggml.tokens".into())),
    };
    let head_dim = s.dim / s.heads;
    let kv = s.kv_heads * head_dim;
    // Uniform in [-a, a) has variance a^2 / 3: a = sqrt(3 / fan_in) keeps activations O(1).
    let scale = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    let q = spec.quant;
    let embd_type = match q {
        Quant::Q4KM if s.tied => GgmlDType::Q6K, // llama.cpp keeps a tied embedding at output's type
        Quant::Q4KM => GgmlDType::Q4K,
        _ => matrix_type(q, "token_embd", 0, n_layers),
    };
    // Every matrix is independent and seeded on its own: make them in parallel (an 8B
    // file is minutes of quantizing on one core), then write them in this order.
    struct Job {
        name: String,
        rows: usize,
        cols: usize,
        seed: u64,
        scale: f32,
        dtype: Option<GgmlDType>, // None: a norm vector
    }
    let matrix = |name: String, rows, cols, seed, scale, t| Job {
        name,
        rows,
        cols,
        seed,
        scale,
        dtype: Some(t),
    };
    let norm_job = |name: String, dim, seed| Job {
        name,
        rows: 1,
        cols: dim,
        seed,
        scale: 0.0,
        dtype: None,
    };
    let mut jobs = vec![
        matrix(
            "token_embd.weight".into(),
            vocab,
            s.dim,
            spec.seed,
            1.0,
            embd_type,
        ),
        norm_job("output_norm.weight".into(), s.dim, spec.seed + 1),
    ];
    if !s.tied {
        let t = matrix_type(q, "output", 0, n_layers);
        jobs.push(matrix(
            "output.weight".into(),
            vocab,
            s.dim,
            spec.seed + 2,
            scale(s.dim),
            t,
        ));
    }
    for l in 0..n_layers {
        let seed = spec.seed + 100 * (l as u64 + 1);
        let mat = |i: u64, name: &str, rows: usize, cols: usize| {
            let t = matrix_type(q, name, l, n_layers);
            matrix(
                format!("blk.{l}.{name}.weight"),
                rows,
                cols,
                seed + i,
                scale(cols),
                t,
            )
        };
        jobs.push(norm_job(format!("blk.{l}.attn_norm.weight"), s.dim, seed));
        jobs.push(norm_job(
            format!("blk.{l}.ffn_norm.weight"),
            s.dim,
            seed + 1,
        ));
        jobs.push(mat(2, "attn_q", s.dim, s.dim));
        jobs.push(mat(3, "attn_k", kv, s.dim));
        jobs.push(mat(4, "attn_v", kv, s.dim));
        jobs.push(mat(5, "attn_output", s.dim, s.dim));
        jobs.push(mat(6, "ffn_gate", s.ffn, s.dim));
        jobs.push(mat(7, "ffn_up", s.ffn, s.dim));
        jobs.push(mat(8, "ffn_down", s.dim, s.ffn));
    }
    let tensors: Vec<(String, QTensor)> = jobs
        .par_iter()
        .map(|j| {
            let t = match j.dtype {
                Some(t) => random_matrix(j.rows, j.cols, j.seed, j.scale, t)?,
                None => norm(j.cols, j.seed)?,
            };
            Ok((j.name.clone(), t))
        })
        .collect::<Result<_, ModelError>>()?;
    let a = "llama";
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (
            "general.name".into(),
            Value::String(format!("synthetic {} ({n_layers} layers)", s.name)),
        ),
        ("general.file_type".into(), Value::U32(q.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (format!("{a}.vocab_size"), Value::U32(vocab as u32)),
        (format!("{a}.block_count"), Value::U32(n_layers as u32)),
        (
            format!("{a}.context_length"),
            Value::U32(spec.context as u32),
        ),
        (format!("{a}.embedding_length"), Value::U32(s.dim as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(s.ffn as u32)),
        (
            format!("{a}.attention.head_count"),
            Value::U32(s.heads as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(s.kv_heads as u32),
        ),
        (
            format!("{a}.rope.dimension_count"),
            Value::U32(head_dim as u32),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(s.rope_theta)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
    ];
    // The donor's vocabulary, tokenizer settings and chat template, as they are.
    let mut donor_keys: Vec<_> = donor
        .content
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .collect();
    donor_keys.sort_by(|a, b| a.0.cmp(b.0));
    meta.extend(donor_keys.into_iter().map(|(k, v)| (k.clone(), v.clone())));
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let io = |source| ModelError::Open {
        path: out.to_path_buf(),
        source,
    };
    let part = out.with_extension("gguf.part");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&part).map_err(io)?);
        candle_core::quantized::gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
        std::io::Write::flush(&mut f).map_err(io)?;
    }
    std::fs::rename(&part, out).map_err(io)?;
    let bytes = std::fs::metadata(out).map_err(io)?.len();
    Ok(SynthReport {
        bytes,
        tensors: tensors.len(),
        vocab,
    })
}

/// Writes `donor`'s metadata (vocabulary, tokenizer, chat template and hyper-parameters) with
/// no tensors: a small donor for [`write`]. Returns the bytes written.
pub fn write_vocab_only(out: &Path, donor: &Path) -> Result<u64, ModelError> {
    let donor = GgufFile::open(donor)?;
    let mut meta: Vec<(&str, &Value)> = donor
        .content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    meta.sort_by(|a, b| a.0.cmp(b.0));
    let io = |source| ModelError::Open {
        path: out.to_path_buf(),
        source,
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).map_err(io)?);
    candle_core::quantized::gguf_file::write(&mut f, &meta, &[])?;
    std::io::Write::flush(&mut f).map_err(io)?;
    Ok(std::fs::metadata(out).map_err(io)?.len())
}

#[path = "synth_lora.rs"]
mod lora;
pub use lora::{write_lora, LoraSpec};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_gives_half_of_attn_v_and_ffn_down_more_bits_as_llama_cpp_does() {
        let more: Vec<usize> = (0..16).filter(|&l| use_more_bits(l, 16)).collect();
        assert_eq!(more, [0, 1, 4, 7, 10, 13, 14, 15]);
        let more32 = (0..32).filter(|&l| use_more_bits(l, 32)).count();
        assert_eq!(more32, 16);
        assert_eq!(matrix_type(Quant::Q4KM, "ffn_down", 4, 16), GgmlDType::Q6K);
        assert_eq!(matrix_type(Quant::Q4KM, "ffn_down", 5, 16), GgmlDType::Q4K);
        assert_eq!(matrix_type(Quant::Q4KM, "attn_q", 0, 16), GgmlDType::Q4K);
        assert_eq!(matrix_type(Quant::Q4KM, "output", 0, 16), GgmlDType::Q6K);
        assert_eq!(matrix_type(Quant::Q8_0, "attn_q", 0, 16), GgmlDType::Q8_0);
    }

    #[test]
    fn values_are_uniform_in_range_and_seeded() {
        let (mut a, mut b) = (vec![0f32; 100_000], vec![0f32; 100_000]);
        fill_uniform(&mut a, 7, 0.5);
        fill_uniform(&mut b, 7, 0.5);
        assert_eq!(a, b);
        assert!(a.iter().all(|x| (-0.5..0.5).contains(x)));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / a.len() as f32;
        assert!(
            mean.abs() < 0.01 && (var - 0.25 / 3.0).abs() < 0.005,
            "{mean} {var}"
        );
        fill_uniform(&mut b, 8, 0.5);
        assert_ne!(a, b);
    }
}
