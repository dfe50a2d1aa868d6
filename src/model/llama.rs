//! The Llama / Mistral forward pass over quantized GGUF weights, with a per-sequence KV cache.
//!
//! Knows weights, activations and our kernels; never the tokenizer, the scheduler or HTTP.
//! Invariant: the output for a sequence depends only on its own tokens and cache, so the
//! engine may run sequences in any order. candle-transformers' `quantized_llama` is the test
//! oracle; llama.cpp's arithmetic is followed op by op so greedy outputs agree with it.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

use super::gguf::{GgufFile, ModelConfig, RopeScaling};
use crate::error::ModelError;
use crate::kernels::attention::{causal_attention, AttentionShape};
use crate::kernels::norm::rms_norm;
use crate::kernels::qmatmul::Linear;

type Result<T> = std::result::Result<T, ModelError>;

struct Layer {
    attn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

/// A loaded Llama-family model.
pub struct Llama {
    pub config: ModelConfig,
    /// Token embeddings, kept quantized; rows are dequantized on lookup.
    embed: QMatMul,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Linear,
    rope: Rope,
    device: Device,
}

/// The keys and values a sequence has produced so far, per layer, in f16 (as llama.cpp stores
/// them): `[len, n_kv_head * head_dim]`, position-major.
pub struct KvCache {
    layers: Vec<(Vec<f16>, Vec<f16>)>,
    len: usize,
}

impl KvCache {
    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn check_dims(name: &str, t: &QTensor, expected: &[usize]) -> Result<()> {
    if t.shape().dims() != expected {
        return Err(ModelError::BadShape {
            name: name.into(),
            expected: expected.to_vec(),
            actual: t.shape().dims().to_vec(),
        });
    }
    Ok(())
}

impl Llama {
    /// Loads the weights of `file` onto `device`. The config is read from its metadata.
    pub fn load(file: &mut GgufFile, device: &Device) -> Result<Self> {
        let config = ModelConfig::from_gguf(file)?;
        let c = &config;
        let vec = |file: &mut GgufFile, name: &str, len: usize| -> Result<Vec<f32>> {
            let t = file.tensor(name, device)?;
            check_dims(name, &t, &[len])?;
            Ok(t.dequantize(device)?.to_vec1::<f32>()?)
        };
        let mat = |file: &mut GgufFile, name: &str, rows: usize, cols: usize| -> Result<Linear> {
            let t = file.tensor(name, device)?;
            check_dims(name, &t, &[rows, cols])?;
            Ok(Linear::from_qtensor(&t)?)
        };
        let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let embed = file.tensor("token_embd.weight", device)?;
        check_dims("token_embd.weight", &embed, &[c.vocab_size, c.dim])?;
        let output = if c.tied_embeddings {
            Linear::from_qtensor(&embed)?
        } else {
            mat(file, "output.weight", c.vocab_size, c.dim)?
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: vec(file, &n("attn_norm"), c.dim)?,
                wq: mat(file, &n("attn_q"), q_dim, c.dim)?,
                wk: mat(file, &n("attn_k"), kv_dim, c.dim)?,
                wv: mat(file, &n("attn_v"), kv_dim, c.dim)?,
                wo: mat(file, &n("attn_output"), c.dim, q_dim)?,
                ffn_norm: vec(file, &n("ffn_norm"), c.dim)?,
                w_gate: mat(file, &n("ffn_gate"), c.ffn_dim, c.dim)?,
                w_up: mat(file, &n("ffn_up"), c.ffn_dim, c.dim)?,
                w_down: mat(file, &n("ffn_down"), c.dim, c.ffn_dim)?,
            });
        }
        let norm = vec(file, "output_norm.weight", c.dim)?;
        let freq_factors = if file.has_tensor("rope_freqs.weight") {
            Some(vec(file, "rope_freqs.weight", c.head_dim / 2)?)
        } else {
            None
        };
        let rope = Rope::new(c, freq_factors);
        Ok(Self {
            embed: QMatMul::from_qtensor(embed)?,
            layers,
            norm,
            output,
            rope,
            device: device.clone(),
            config,
        })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.config.n_layer)
                .map(|_| (Vec::new(), Vec::new()))
                .collect(),
            len: 0,
        }
    }

    /// Runs `tokens` at positions `cache.len()..` and returns the logits of the last one
    /// (`vocab_size` values).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let c = &self.config;
        let t = tokens.len();
        if t == 0 {
            return Err(ModelError::Candle(candle_core::Error::Msg(
                "forward called with no tokens. This is a bug.".into(),
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            // A tokenizer.json with a larger vocabulary than the weights would get here.
            return Err(ModelError::Tokenizer(format!(
                "token id {bad} is outside the model's vocabulary of {} tokens",
                c.vocab_size
            )));
        }
        let start = cache.len;
        let eps = c.norm_eps as f32;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self
            .embed
            .embedding(&ids)?
            .flatten_all()?
            .to_vec1::<f32>()?; // [t, dim]
        let shape = AttentionShape {
            n_head: c.n_head,
            n_kv_head: c.n_kv_head,
            head_dim: c.head_dim,
        };
        for (layer, (k_cache, v_cache)) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let mut h = x.clone();
            rms_norm(&mut h, &layer.attn_norm, eps);
            let mut q = layer.wq.matmul(&h, t)?; // [t, n_head * head_dim]
            let mut k = layer.wk.matmul(&h, t)?; // [t, n_kv_head * head_dim]
            let v = layer.wv.matmul(&h, t)?;
            self.rope.apply(&mut q, start, t);
            self.rope.apply(&mut k, start, t);
            k_cache.extend(k.iter().map(|&v| f16::from_f32(v)));
            v_cache.extend(v.iter().map(|&v| f16::from_f32(v)));
            let y = causal_attention(&q, k_cache, v_cache, t, start, shape);
            add(&mut x, &layer.wo.matmul(&y, t)?);
            let mut h = x.clone();
            rms_norm(&mut h, &layer.ffn_norm, eps);
            let mut gate = layer.w_gate.matmul(&h, t)?; // [t, ffn_dim]
            let up = layer.w_up.matmul(&h, t)?;
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = *g / (1.0 + (-*g).exp()) * u; // SiLU(gate) * up
            }
            add(&mut x, &layer.w_down.matmul(&gate, t)?);
        }
        cache.len += t;
        let mut last = x[(t - 1) * c.dim..].to_vec(); // [1, dim]
        rms_norm(&mut last, &self.norm, eps);
        Ok(self.output.matmul(&last, 1)?)
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Interleaved rotary position embedding (llama.cpp's "normal" mode), with angles computed as
/// llama.cpp computes them: `theta_i = p * base^(-2i/d)` by repeated multiplication.
struct Rope {
    head_dim: usize,
    theta_scale: f32,
    /// Positions are multiplied by this (1 / linear scaling factor).
    freq_scale: f32,
    freq_factors: Option<Vec<f32>>,
}

impl Rope {
    fn new(c: &ModelConfig, freq_factors: Option<Vec<f32>>) -> Self {
        let freq_scale = match c.rope_scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => 1.0 / factor,
        };
        Self {
            head_dim: c.head_dim,
            theta_scale: c.rope_theta.powf(-2.0 / c.head_dim as f32),
            freq_scale,
            freq_factors,
        }
    }

    /// Rotates `x` (`[t, heads * head_dim]`, rows at positions `start..start + t`) in place.
    fn apply(&self, x: &mut [f32], start: usize, t: usize) {
        let half = self.head_dim / 2;
        let row_len = x.len() / t;
        let mut cos_sin = vec![(0f32, 0f32); half];
        for (i, row) in x.chunks_exact_mut(row_len).enumerate() {
            let mut theta = (start + i) as f32;
            for (j, cs) in cos_sin.iter_mut().enumerate() {
                let ff = self.freq_factors.as_ref().map_or(1.0, |f| f[j]);
                let angle = self.freq_scale * (theta / ff);
                *cs = (angle.cos(), angle.sin());
                theta *= self.theta_scale;
            }
            for head in row.chunks_exact_mut(self.head_dim) {
                for (pair, &(cos, sin)) in head.chunks_exact_mut(2).zip(&cos_sin) {
                    let (x0, x1) = (pair[0], pair[1]);
                    pair[0] = x0 * cos - x1 * sin;
                    pair[1] = x0 * sin + x1 * cos;
                }
            }
        }
    }
}

/// Index of the largest value (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}
