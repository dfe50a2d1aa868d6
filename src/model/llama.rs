//! The Llama / Mistral forward pass over quantized GGUF weights, with a per-sequence KV cache.
//!
//! Knows weights, activations and our kernels; never the tokenizer, the scheduler or HTTP.
//! Invariant: the output for a sequence depends only on its own tokens and cache, so the
//! engine may run sequences in any order. candle-transformers' `quantized_llama` is the test
//! oracle; llama.cpp's arithmetic is followed op by op so greedy outputs agree with it.

use candle_core::quantized::QTensor;
use candle_core::Device;

use super::gguf::{GgufFile, ModelConfig, RopeScaling};
use super::kv::KvPool;
use crate::error::ModelError;
use crate::kernels::attention::{packed_attention, AttentionSeq, AttentionShape};
use crate::kernels::norm::rms_norm;
use crate::kernels::qmatmul::{Activations, Linear};

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
    /// Token embeddings, kept quantized; rows are dequantized on lookup. `None` when tied to
    /// the output matrix, which then serves both (one copy in memory).
    embed: Option<Linear>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Linear,
    rope: Rope,
}

/// Positions per KV block for a single sequence's own cache.
const SINGLE_BLOCK: usize = 64;

/// One sequence's own KV memory (for the CLI and tests): a private pool that grows a block at
/// a time. The server shares one [`KvPool`] between sequences instead.
pub struct KvCache {
    pool: KvPool,
    blocks: Vec<u32>,
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

/// One sequence's part of a packed forward: `tokens` at positions `start..`, its KV through
/// `blocks` (which must already cover `start + tokens.len()` positions).
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub blocks: &'a [u32],
    /// Whether to compute the logits of the last token (false for a prefill chunk that does
    /// not end the prompt).
    pub logits: bool,
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
        let (embed, output) = if c.tied_embeddings {
            (None, Linear::from_qtensor(&embed)?)
        } else {
            let output = mat(file, "output.weight", c.vocab_size, c.dim)?;
            (Some(Linear::from_qtensor(&embed)?), output)
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
            embed,
            layers,
            norm,
            output,
            rope,
            config,
        })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            pool: self.new_pool(SINGLE_BLOCK, 0),
            blocks: Vec::new(),
            len: 0,
        }
    }

    /// A KV pool of `n_blocks` blocks of `block_size` positions for this model.
    pub fn new_pool(&self, block_size: usize, n_blocks: usize) -> KvPool {
        let c = &self.config;
        KvPool::new(c.n_layer, c.n_kv_head * c.head_dim, block_size, n_blocks)
    }

    /// Runs `tokens` at positions `cache.len()..` and returns the logits of the last one
    /// (`vocab_size` values).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let needed = (cache.len + tokens.len()).div_ceil(SINGLE_BLOCK);
        if needed > cache.blocks.len() {
            let extra = needed - cache.blocks.len();
            let first = cache.pool.n_blocks() as u32;
            cache.pool.grow(extra);
            cache.blocks.extend(first..first + extra as u32);
        }
        let seq = SeqInput {
            tokens,
            start: cache.len,
            blocks: &cache.blocks,
            logits: true,
        };
        let mut out = self.forward_batch(&[seq], &mut cache.pool)?;
        cache.len += tokens.len();
        Ok(out
            .pop()
            .flatten()
            .expect("one sequence asked for logits. This is a bug."))
    }

    /// One forward over every token of a step, packed into one matrix for each linear layer,
    /// with attention per sequence over its own blocks. Returns, per sequence, the logits of
    /// its last token when it asked for them.
    pub fn forward_batch(
        &self,
        seqs: &[SeqInput],
        pool: &mut KvPool,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let c = &self.config;
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        if n == 0 || seqs.iter().any(|s| s.tokens.is_empty()) {
            return Err(ModelError::Candle(candle_core::Error::Msg(
                "forward called with an empty sequence. This is a bug.".into(),
            )));
        }
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            // A tokenizer.json with a larger vocabulary than the weights would get here.
            return Err(ModelError::Tokenizer(format!(
                "token id {bad} is outside the model's vocabulary of {} tokens",
                c.vocab_size
            )));
        }
        let positions: Vec<usize> = seqs
            .iter()
            .flat_map(|s| s.start..s.start + s.tokens.len())
            .collect();
        let rope = self.rope.table(&positions);
        let eps = c.norm_eps as f32;
        let mut x = self
            .embed
            .as_ref()
            .unwrap_or(&self.output)
            .embedding(&tokens)?; // [n, dim]
        let shape = AttentionShape {
            n_head: c.n_head,
            n_kv_head: c.n_kv_head,
            head_dim: c.head_dim,
        };
        let kv_dim = c.n_kv_head * c.head_dim;
        for (l, layer) in self.layers.iter().enumerate() {
            let mut h = x.clone();
            rms_norm(&mut h, &layer.attn_norm, eps);
            let acts = Activations::new(&h, n); // quantized once for q, k and v
                                                // [n, n_head * head_dim], [n, n_kv_head * head_dim] twice
            let [mut q, mut k, v]: [Vec<f32>; 3] =
                Linear::apply_many(&[&layer.wq, &layer.wk, &layer.wv], &acts)?
                    .try_into()
                    .expect("three products");
            self.rope.apply(&mut q, &rope);
            self.rope.apply(&mut k, &rope);
            let mut row = 0;
            for s in seqs {
                for (i, pos) in (s.start..s.start + s.tokens.len()).enumerate() {
                    let r = (row + i) * kv_dim;
                    pool.write(l, s.blocks, pos, &k[r..r + kv_dim], &v[r..r + kv_dim]);
                }
                row += s.tokens.len();
            }
            let mut att = Vec::with_capacity(seqs.len());
            let mut row = 0;
            for s in seqs {
                att.push(AttentionSeq {
                    row,
                    len: s.tokens.len(),
                    start: s.start,
                    kv: pool.view(l, s.blocks),
                });
                row += s.tokens.len();
            }
            let y = packed_attention(&q, &att, shape);
            add(&mut x, &layer.wo.matmul(&y, n)?);
            let mut h = x.clone();
            rms_norm(&mut h, &layer.ffn_norm, eps);
            let acts = Activations::new(&h, n);
            let [mut gate, up]: [Vec<f32>; 2] = // [n, ffn_dim] each
                Linear::apply_many(&[&layer.w_gate, &layer.w_up], &acts)?
                    .try_into()
                    .expect("two products");
            silu_mul(&mut gate, &up, c.ffn_dim);
            add(&mut x, &layer.w_down.matmul(&gate, n)?);
        }
        // The lm head runs only on the last row of sequences that want logits, all at once.
        let mut last_rows = Vec::new();
        let mut end = 0;
        for s in seqs {
            end += s.tokens.len();
            if s.logits {
                last_rows.extend_from_slice(&x[(end - 1) * c.dim..end * c.dim]);
            }
        }
        let wanted = last_rows.len() / c.dim;
        let logits = if wanted > 0 {
            rms_norm(&mut last_rows, &self.norm, eps);
            self.output.matmul(&last_rows, wanted)?
        } else {
            Vec::new()
        };
        let mut rows = logits.chunks_exact(c.vocab_size.max(1));
        Ok(seqs
            .iter()
            .map(|s| s.logits.then(|| rows.next().map(<[f32]>::to_vec)).flatten())
            .collect())
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

    /// The `(cos, sin)` pairs of each position (`head_dim / 2` per position), worked out
    /// once per forward and shared by every layer's q and k.
    fn table(&self, positions: &[usize]) -> Vec<(f32, f32)> {
        let half = self.head_dim / 2;
        let mut out = Vec::with_capacity(positions.len() * half);
        for &pos in positions {
            let mut theta = pos as f32;
            for j in 0..half {
                let ff = self.freq_factors.as_ref().map_or(1.0, |f| f[j]);
                let angle = self.freq_scale * (theta / ff);
                out.push((angle.cos(), angle.sin()));
                theta *= self.theta_scale;
            }
        }
        out
    }

    /// Rotates `x` (`[n, heads * head_dim]`, row `i` at the position of `table`'s row `i`)
    /// in place.
    fn apply(&self, x: &mut [f32], table: &[(f32, f32)]) {
        let half = self.head_dim / 2;
        let n = table.len() / half;
        let row_len = x.len() / n;
        for (row, cos_sin) in x.chunks_exact_mut(row_len).zip(table.chunks_exact(half)) {
            for head in row.chunks_exact_mut(self.head_dim) {
                for (pair, &(cos, sin)) in head.chunks_exact_mut(2).zip(cos_sin) {
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

/// `gate = SiLU(gate) * up`, elementwise; rows in parallel when there are many.
fn silu_mul(gate: &mut [f32], up: &[f32], width: usize) {
    let row = |(g, u): (&mut [f32], &[f32])| {
        for (g, u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    };
    if gate.len() >= crate::kernels::cpu::PARALLEL_QUANT_VALUES {
        crate::kernels::pool::for_chunks_mut(gate, width, |i, g| {
            row((g, &up[i * width..][..width]))
        });
    } else {
        gate.chunks_mut(width).zip(up.chunks(width)).for_each(row);
    }
}
