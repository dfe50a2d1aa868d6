//! The Llama / Mistral forward pass over quantized GGUF weights, with a per-sequence KV cache.
//!
//! Knows tensors and candle ops; never the tokenizer, the scheduler or HTTP. Invariant: the
//! output for a sequence depends only on its own tokens and cache, so the engine may run
//! sequences in any order. candle-transformers' `quantized_llama` is the test oracle.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

use super::gguf::{GgufFile, ModelConfig, RopeScaling};
use crate::error::ModelError;

type Result<T> = std::result::Result<T, ModelError>;

struct Layer {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
}

/// A loaded Llama-family model.
pub struct Llama {
    pub config: ModelConfig,
    embed: QMatMul,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QMatMul,
    /// Per rotary pair i: the angle per position, `1 / (theta^(2i/d) * freq_factor_i * scale)`.
    rope_inv_freq: Vec<f32>,
    device: Device,
}

/// The keys and values a sequence has produced so far, per layer: `[n_kv_head, len, head_dim]`.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
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

impl Llama {
    /// Loads the weights of `file` onto `device`. The config is read from its metadata.
    pub fn load(file: &mut GgufFile, device: &Device) -> Result<Self> {
        let config = ModelConfig::from_gguf(file)?;
        let vec = |file: &mut GgufFile, name: &str, len: usize| -> Result<Tensor> {
            let t = file.tensor(name, device)?.dequantize(device)?;
            if t.dims() != [len] {
                return Err(ModelError::BadShape {
                    name: name.into(),
                    expected: vec![len],
                    actual: t.dims().to_vec(),
                });
            }
            Ok(t)
        };
        let mat = |file: &mut GgufFile, name: &str, rows: usize, cols: usize| -> Result<QTensor> {
            let t = file.tensor(name, device)?;
            if t.shape().dims() != [rows, cols] {
                return Err(ModelError::BadShape {
                    name: name.into(),
                    expected: vec![rows, cols],
                    actual: t.shape().dims().to_vec(),
                });
            }
            Ok(t)
        };
        let c = &config;
        let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let embed = Arc::new(mat(file, "token_embd.weight", c.vocab_size, c.dim)?);
        let output = if c.tied_embeddings {
            QMatMul::from_arc(embed.clone())?
        } else {
            QMatMul::from_qtensor(mat(file, "output.weight", c.vocab_size, c.dim)?)?
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let q = |file: &mut GgufFile, s: &str, rows, cols| -> Result<QMatMul> {
                Ok(QMatMul::from_qtensor(mat(file, &n(s), rows, cols)?)?)
            };
            layers.push(Layer {
                attn_norm: vec(file, &n("attn_norm"), c.dim)?,
                wq: q(file, "attn_q", q_dim, c.dim)?,
                wk: q(file, "attn_k", kv_dim, c.dim)?,
                wv: q(file, "attn_v", kv_dim, c.dim)?,
                wo: q(file, "attn_output", c.dim, q_dim)?,
                ffn_norm: vec(file, &n("ffn_norm"), c.dim)?,
                w_gate: q(file, "ffn_gate", c.ffn_dim, c.dim)?,
                w_up: q(file, "ffn_up", c.ffn_dim, c.dim)?,
                w_down: q(file, "ffn_down", c.dim, c.ffn_dim)?,
            });
        }
        let norm = vec(file, "output_norm.weight", c.dim)?;
        let freq_factors = if file.has_tensor("rope_freqs.weight") {
            let t = vec(file, "rope_freqs.weight", c.head_dim / 2)?;
            Some(t.to_vec1::<f32>()?)
        } else {
            None
        };
        let rope_inv_freq = rope_inv_freq(c, freq_factors.as_deref());
        Ok(Self {
            embed: QMatMul::from_arc(embed)?,
            layers,
            norm,
            output,
            rope_inv_freq,
            device: device.clone(),
            config,
        })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.config.n_layer).map(|_| None).collect(),
            len: 0,
        }
    }

    /// Runs `tokens` at positions `cache.len()..` and returns the logits of the last one,
    /// `[vocab_size]` f32.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        let t = tokens.len();
        if t == 0 {
            return Err(ModelError::Candle(candle_core::Error::Msg(
                "forward called with no tokens. This is a bug.".into(),
            )));
        }
        let start = cache.len;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.embedding(&ids)?.to_dtype(DType::F32)?; // [t, dim]
        let (cos, sin) = self.rope_tables(start, t)?; // [t, head_dim/2]
        let mask = causal_mask(t, start, &self.device)?; // [t, start + t] or None
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.norm_eps as f32)?;
            let q = layer.wq.forward(&h)?; // [t, n_head * head_dim]
            let k = layer.wk.forward(&h)?; // [t, n_kv_head * head_dim]
            let v = layer.wv.forward(&h)?;
            let q = heads_first(&q, c.n_head, c.head_dim)?; // [1, n_head, t, head_dim]
            let k = heads_first(&k, c.n_kv_head, c.head_dim)?;
            let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?.squeeze(0)?;
            let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?.squeeze(0)?;
            let v = heads_first(&v, c.n_kv_head, c.head_dim)?.squeeze(0)?;
            let (k, v) = match kv.take() {
                None => (k, v),
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
            };
            let y = attention(&q, &k, &v, mask.as_ref(), c)?; // [t, n_head * head_dim]
            *kv = Some((k, v));
            x = (x + layer.wo.forward(&y)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.norm_eps as f32)?;
            let gate = candle_nn::ops::silu(&layer.w_gate.forward(&h)?)?;
            let up = layer.w_up.forward(&h)?;
            x = (x + layer.w_down.forward(&(gate * up)?)?)?;
        }
        cache.len += t;
        let last = x.narrow(0, t - 1, 1)?; // [1, dim]
        let last = candle_nn::ops::rms_norm(&last, &self.norm, c.norm_eps as f32)?;
        Ok(self
            .output
            .forward(&last)?
            .squeeze(0)?
            .to_dtype(DType::F32)?)
    }

    /// cos and sin of every rotary angle for positions `start..start + len`.
    fn rope_tables(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let half = self.rope_inv_freq.len();
        let mut angles = Vec::with_capacity(len * half);
        for p in start..start + len {
            angles.extend(self.rope_inv_freq.iter().map(|f| p as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (len, half), &self.device)?;
        Ok((angles.cos()?, angles.sin()?))
    }
}

fn rope_inv_freq(c: &ModelConfig, freq_factors: Option<&[f32]>) -> Vec<f32> {
    let scale = match c.rope_scaling {
        RopeScaling::None => 1.0,
        RopeScaling::Linear { factor } => factor,
    };
    (0..c.head_dim / 2)
        .map(|i| {
            let base = 1.0 / c.rope_theta.powf(2.0 * i as f32 / c.head_dim as f32);
            let factor = freq_factors.map_or(1.0, |f| f[i]);
            base / factor / scale
        })
        .collect()
}

/// `[t, heads * head_dim]` -> `[1, heads, t, head_dim]`, contiguous.
fn heads_first(x: &Tensor, heads: usize, head_dim: usize) -> candle_core::Result<Tensor> {
    let t = x.dim(0)?;
    x.reshape((1, t, heads, head_dim))?
        .transpose(1, 2)?
        .contiguous()
}

/// Additive causal mask `[t, start + t]` (0 where visible, -inf above the diagonal), or None
/// for a single token, which sees everything.
fn causal_mask(t: usize, start: usize, device: &Device) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let kv = start + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..kv).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(mask, (t, kv), device)?))
}

/// Grouped-query attention without copying K/V per head.
/// q: `[n_head, t, hd]`, k and v: `[n_kv_head, kv, hd]` -> `[t, n_head * hd]`.
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    c: &ModelConfig,
) -> candle_core::Result<Tensor> {
    let (n_head, t, hd) = q.dims3()?;
    let kv_len = k.dim(1)?;
    let group = n_head / c.n_kv_head;
    // Heads sharing a KV head are adjacent: fold them into the row dimension.
    let q = q.reshape((c.n_kv_head, group * t, hd))?;
    let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?; // [n_kv, group * t, kv]
    let scores = match mask {
        None => scores,
        Some(mask) => scores
            .reshape((c.n_kv_head, group, t, kv_len))?
            .broadcast_add(mask)?
            .reshape((c.n_kv_head, group * t, kv_len))?,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let y = probs.matmul(v)?; // [n_kv, group * t, hd]
    y.reshape((n_head, t, hd))?
        .transpose(0, 1)?
        .reshape((t, n_head * hd))
}

/// The argmax of a logits vector, for greedy checks in tests and tools.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?)
}
