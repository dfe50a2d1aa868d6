//! The Llama / Mistral forward pass over quantized GGUF weights, with a per-sequence KV cache.
//!
//! Knows weights, activations and our kernels; never the tokenizer, the scheduler or HTTP.
//! Invariant: the output for a sequence depends only on its own tokens and cache, so the
//! engine may run sequences in any order. candle-transformers' `quantized_llama` is the test
//! oracle; llama.cpp's arithmetic is followed op by op so greedy outputs agree with it.

use candle_core::Device;

use super::gguf::{GgufFile, ModelConfig, RopeScaling};
use super::lora::{self, Adapter, Target};
use crate::backend::{Backend, Cpu, HeadShape, KvPool, StepPlan, StepSeq, WeightUse};
use crate::error::ModelError;

type Result<T> = std::result::Result<T, ModelError>;

struct Layer<B: Backend> {
    attn_norm: B::Norm,
    wq: B::Weight,
    wk: B::Weight,
    wv: B::Weight,
    wo: B::Weight,
    ffn_norm: B::Norm,
    w_gate: B::Weight,
    w_up: B::Weight,
    w_down: B::Weight,
}

/// A loaded Llama-family model on backend `B` (the CPU unless named).
pub struct Llama<B: Backend = Cpu> {
    pub config: ModelConfig,
    backend: B,
    /// Token embeddings, kept quantized; rows are dequantized on lookup. `None` when tied to
    /// the output matrix, which then serves both (one copy in memory).
    embed: Option<B::Weight>,
    layers: Vec<Layer<B>>,
    norm: B::Norm,
    output: B::Weight,
    rope: Rope,
    /// LoRA adapters, by the index a sequence names ([`SeqInput::adapter`]).
    adapters: Vec<Adapter<B>>,
}

/// Positions per KV block for a single sequence's own cache.
const SINGLE_BLOCK: usize = 64;

/// One sequence's own KV memory (for the CLI and tests): a private pool that grows a block at
/// a time. The server shares one pool between sequences instead.
pub struct KvCache<B: Backend = Cpu> {
    pool: B::Kv,
    blocks: Vec<u32>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
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
    /// Which rows' logits to compute.
    pub logits: Logits,
    /// The LoRA adapter its tokens run with ([`Llama::add_adapter`]'s index), or the base
    /// model's weights alone.
    pub adapter: Option<usize>,
}

/// The logits a sequence wants from a forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk that does not end the prompt).
    Skip,
    /// The last token's: what the next token is sampled from.
    Last,
    /// Every token's, row after row (`tokens.len() * vocab_size` values): the logprobs of
    /// the prompt's own tokens.
    All,
    /// No logits: the final hidden states (after the output norm, before the lm head) of
    /// the chunk's tokens `from..to`, row after row (`(to - from) * dim` values), that
    /// embeddings pool.
    Hidden { from: usize, to: usize },
}

impl From<bool> for Logits {
    /// `true`: the last token's.
    fn from(last: bool) -> Self {
        if last {
            Self::Last
        } else {
            Self::Skip
        }
    }
}

fn check_dims(name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual != expected {
        return Err(ModelError::BadShape {
            name: name.into(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        });
    }
    Ok(())
}

impl Llama<Cpu> {
    /// Loads the weights of `file` for the CPU backend. `device` is where candle reads the
    /// tensors (the CPU).
    pub fn load(file: &mut GgufFile, device: &Device) -> Result<Self> {
        Self::load_on(file, device, Cpu)
    }

    /// A KV pool of `n_blocks` blocks of `block_size` positions for this model.
    pub fn new_pool(&self, block_size: usize, n_blocks: usize) -> KvPool {
        self.new_kv(block_size, n_blocks)
            .expect("the CPU's KV pool is plain host memory")
    }
}

impl<B: Backend> Llama<B> {
    /// Loads the weights of `file` onto `backend`. The config is read from its metadata;
    /// candle reads the tensors on `device` and the backend takes them from there.
    pub fn load_on(file: &mut GgufFile, device: &Device, backend: B) -> Result<Self> {
        let config = ModelConfig::from_gguf(file)?;
        let c = &config;
        let b = &backend;
        let vec = |file: &mut GgufFile, name: &str, len: usize| -> Result<Vec<f32>> {
            let t = file.tensor(name, device)?;
            check_dims(name, t.shape().dims(), &[len])?;
            Ok(t.dequantize(device)?.to_vec1::<f32>()?)
        };
        let norm = |file: &mut GgufFile, name: &str| -> Result<B::Norm> {
            b.load_norm(vec(file, name, c.dim)?)
        };
        // A weight straight from the mapped file where the backend takes bytes (no copy of
        // the file in between), else read through candle.
        let weight = |file: &mut GgufFile, name: &str, dims: [usize; 2], usage| {
            if let Some((bytes, dtype, got)) = file.tensor_bytes(name)? {
                check_dims(name, &got, &dims)?;
                if let Some(w) = b.load_weight_bytes(bytes, dtype, &dims, usage) {
                    return w;
                }
            }
            let t = file.tensor(name, device)?;
            check_dims(name, t.shape().dims(), &dims)?;
            b.load_weight(&t, usage)
        };
        let mat = |file: &mut GgufFile, name: &str, rows: usize, cols: usize| {
            weight(file, name, [rows, cols], WeightUse::Matmul)
        };
        let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let embed_dims = [c.vocab_size, c.dim];
        let (embed, output) = if c.tied_embeddings {
            let both = weight(file, "token_embd.weight", embed_dims, WeightUse::Both)?;
            (None, both)
        } else {
            let output = mat(file, "output.weight", c.vocab_size, c.dim)?;
            let embed = weight(file, "token_embd.weight", embed_dims, WeightUse::Embedding)?;
            (Some(embed), output)
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: norm(file, &n("attn_norm"))?,
                wq: mat(file, &n("attn_q"), q_dim, c.dim)?,
                wk: mat(file, &n("attn_k"), kv_dim, c.dim)?,
                wv: mat(file, &n("attn_v"), kv_dim, c.dim)?,
                wo: mat(file, &n("attn_output"), c.dim, q_dim)?,
                ffn_norm: norm(file, &n("ffn_norm"))?,
                w_gate: mat(file, &n("ffn_gate"), c.ffn_dim, c.dim)?,
                w_up: mat(file, &n("ffn_up"), c.ffn_dim, c.dim)?,
                w_down: mat(file, &n("ffn_down"), c.dim, c.ffn_dim)?,
            });
        }
        let norm = norm(file, "output_norm.weight")?;
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
            backend,
            adapters: Vec::new(),
        })
    }

    /// Loads the LoRA adapter at `path` for this model; sequences name it by the index
    /// returned (0 for the first).
    pub fn add_adapter(&mut self, path: &std::path::Path) -> Result<usize> {
        let adapter = lora::load(path, &self.config, &self.backend)?;
        self.adapters.push(adapter);
        Ok(self.adapters.len() - 1)
    }

    /// How many adapters are loaded.
    pub fn adapters(&self) -> usize {
        self.adapters.len()
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// A KV store of `n_blocks` blocks of `block_size` positions on this model's backend.
    pub fn new_kv(&self, block_size: usize, n_blocks: usize) -> Result<B::Kv> {
        let c = &self.config;
        let stride = c.n_kv_head * c.head_dim;
        self.backend
            .alloc_kv(c.n_layer, stride, block_size, n_blocks)
    }

    /// Copies the first `rows` positions of block `src` into block `dst`.
    pub fn copy_kv(&self, kv: &mut B::Kv, src: u32, dst: u32, rows: usize) -> Result<()> {
        self.backend.copy_kv(kv, src, dst, rows)
    }

    pub fn new_cache(&self) -> KvCache<B> {
        KvCache {
            pool: self
                .new_kv(SINGLE_BLOCK, 0)
                .expect("an empty KV store needs no memory"),
            blocks: Vec::new(),
            len: 0,
        }
    }

    /// Runs `tokens` at positions `cache.len()..` and returns the logits of the last one
    /// (`vocab_size` values).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache<B>) -> Result<Vec<f32>> {
        let needed = (cache.len + tokens.len()).div_ceil(SINGLE_BLOCK);
        if needed > cache.blocks.len() {
            let extra = needed - cache.blocks.len();
            let first = self.backend.kv_blocks(&cache.pool) as u32;
            self.backend.grow_kv(&mut cache.pool, extra)?;
            cache.blocks.extend(first..first + extra as u32);
        }
        let seq = SeqInput {
            tokens,
            start: cache.len,
            blocks: &cache.blocks,
            logits: Logits::Last,
            adapter: None,
        };
        let mut out = self.forward_batch(&[seq], &mut cache.pool)?;
        cache.len += tokens.len();
        Ok(out
            .pop()
            .flatten()
            .expect("one sequence asked for logits. This is a bug."))
    }

    /// One forward over every token of a step, packed into one matrix for each linear layer,
    /// with attention per sequence over its own blocks. Returns, per sequence, the logits it
    /// asked for ([`Logits`]): its last token's, or every token's row after row.
    pub fn forward_batch(
        &self,
        seqs: &[SeqInput],
        pool: &mut B::Kv,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let c = &self.config;
        let b = &self.backend;
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
        let mut row = 0;
        let plan = StepPlan {
            seqs: seqs
                .iter()
                .map(|s| {
                    row += s.tokens.len();
                    StepSeq {
                        row: row - s.tokens.len(),
                        len: s.tokens.len(),
                        start: s.start,
                        blocks: s.blocks.to_vec(),
                    }
                })
                .collect(),
            rows: n,
            rope: self.rope.table(&positions),
        };
        let step = b.begin_step(pool, plan)?;
        let groups = self.adapter_rows(seqs.iter().map(|s| (s.adapter, s.tokens.len())))?;
        // A LoRA adapter's update of linear layer `t`'s output `y` from its input `x`, for
        // the rows of the sequences using it.
        let adapt = |y: &mut B::Act, x: &B::Act, l: usize, t: Target| -> Result<()> {
            for (a, rows) in &groups {
                if let Some(p) = self.adapters[*a].pair(l, t) {
                    b.lora_add(y, x, &p.lora, rows, p.scale)?;
                }
            }
            Ok(())
        };
        let eps = c.norm_eps as f32;
        let mut x = b.embed(self.embed.as_ref().unwrap_or(&self.output), &tokens)?; // [n, dim]
        let shape = HeadShape {
            n_head: c.n_head,
            n_kv_head: c.n_kv_head,
            head_dim: c.head_dim,
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let h = b.rms_norm(&x, &layer.attn_norm, eps)?;
            // [n, n_head * head_dim], [n, n_kv_head * head_dim] twice
            let [mut q, mut k, mut v]: [B::Act; 3] = b
                .matmul_many(&[&layer.wq, &layer.wk, &layer.wv], &h)?
                .try_into()
                .map_err(|_| bug("three products"))?;
            adapt(&mut q, &h, l, Target::Q)?;
            adapt(&mut k, &h, l, Target::K)?;
            adapt(&mut v, &h, l, Target::V)?;
            b.rope(&mut q, &step, c.head_dim)?;
            b.rope(&mut k, &step, c.head_dim)?;
            b.kv_write(pool, l, &step, &k, &v)?;
            let y = b.attention(&q, pool, l, &step, shape)?;
            let mut o = b.matmul(&layer.wo, &y)?;
            adapt(&mut o, &y, l, Target::O)?;
            b.add(&mut x, &o)?;
            let h = b.rms_norm(&x, &layer.ffn_norm, eps)?;
            let [mut gate, mut up]: [B::Act; 2] =
                b // [n, ffn_dim] each
                    .matmul_many(&[&layer.w_gate, &layer.w_up], &h)?
                    .try_into()
                    .map_err(|_| bug("two products"))?;
            adapt(&mut gate, &h, l, Target::Gate)?;
            adapt(&mut up, &h, l, Target::Up)?;
            b.silu_mul(&mut gate, &up)?;
            let mut down = b.matmul(&layer.w_down, &gate)?;
            adapt(&mut down, &gate, l, Target::Down)?;
            b.add(&mut x, &down)?;
        }
        // The output norm and the lm head run only on the rows sequences want, all at once.
        let (mut heads, mut hidden) = (Vec::new(), Vec::new());
        let mut head_adapters = Vec::new();
        let mut end = 0;
        for s in seqs {
            end += s.tokens.len();
            let rows = end - s.tokens.len()..end;
            let before = heads.len();
            match s.logits {
                Logits::Skip => {}
                Logits::Last => heads.push(end - 1),
                Logits::All => heads.extend(rows.clone()),
                Logits::Hidden { from, to } => {
                    let to = to.min(s.tokens.len());
                    hidden.extend(rows.start + from.min(to)..rows.start + to)
                }
            }
            head_adapters.push((s.adapter, heads.len() - before));
        }
        let normed = |rows: &[usize]| -> Result<Option<B::Act>> {
            if rows.is_empty() {
                return Ok(None);
            }
            Ok(Some(b.rms_norm(
                &b.select_rows(&x, rows)?,
                &self.norm,
                eps,
            )?))
        };
        let logits = match normed(&heads)? {
            Some(h) => {
                let mut logits = b.matmul(&self.output, &h)?;
                for (a, rows) in &self.adapter_rows(head_adapters.into_iter())? {
                    if let Some(p) = &self.adapters[*a].output {
                        b.lora_add(&mut logits, &h, &p.lora, rows, p.scale)?;
                    }
                }
                b.to_host(logits)?
            }
            None => Vec::new(),
        };
        let states = match normed(&hidden)? {
            Some(h) => b.to_host(h)?,
            None => Vec::new(),
        };
        if logits.len() != heads.len() * c.vocab_size || states.len() != hidden.len() * c.dim {
            return Err(bug("one row for each row asked for"));
        }
        let wants = |s: &SeqInput| match s.logits {
            Logits::Skip => 0,
            Logits::Last => 1,
            Logits::All => s.tokens.len(),
            Logits::Hidden { from, to } => to.min(s.tokens.len()).saturating_sub(from),
        };
        if seqs.iter().filter(|s| wants(s) > 0).count() == 1 {
            // One sequence's rows: hand over the vector itself (49k floats a row), no copy.
            let (mut logits, mut states) = (Some(logits), Some(states));
            return Ok(seqs
                .iter()
                .map(|s| match s.logits {
                    _ if wants(s) == 0 => None,
                    Logits::Hidden { .. } => states.take(),
                    _ => logits.take(),
                })
                .collect());
        }
        let (mut logits, mut states) = (&logits[..], &states[..]);
        Ok(seqs
            .iter()
            .map(|s| {
                let (rest, width) = match s.logits {
                    Logits::Hidden { .. } => (&mut states, c.dim),
                    _ => (&mut logits, c.vocab_size),
                };
                let (mine, after) = rest.split_at(wants(s) * width);
                *rest = after;
                (!mine.is_empty()).then(|| mine.to_vec())
            })
            .collect())
    }
}

impl<B: Backend> Llama<B> {
    /// Each adapter named by `(adapter, rows)` runs of consecutive rows, with the rows that
    /// use it, in order of first use.
    fn adapter_rows(
        &self,
        runs: impl Iterator<Item = (Option<usize>, usize)>,
    ) -> Result<Vec<(usize, Vec<usize>)>> {
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        let mut row = 0;
        for (adapter, n) in runs {
            if let Some(a) = adapter {
                if a >= self.adapters.len() {
                    return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                        "a sequence names adapter {a} of {}. This is a bug.",
                        self.adapters.len()
                    ))));
                }
                let rows = row..row + n;
                match groups.iter_mut().find(|g| g.0 == a) {
                    Some(g) => g.1.extend(rows),
                    None => groups.push((a, rows.collect())),
                }
            }
            row += n;
        }
        Ok(groups)
    }
}

fn bug(what: &str) -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(format!(
        "the backend did not return {what}. This is a bug."
    )))
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
}

/// Index of the largest logit; ties go to the lowest index, NaN counts as
/// `-inf`. An empty or all-NaN slice gives 0.
///
/// Two passes the compiler vectorises: the maximum over sixteen lanes, then
/// the first sixteen-logit chunk holding it. Greedy decoding runs this on
/// every step's logits (49k for SmolLM2), where a one-compare-at-a-time loop
/// took about 1% of a step.
pub fn argmax(logits: &[f32]) -> u32 {
    const L: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; L];
    let chunks = logits.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            // A select: NaN compares false, so it never replaces a lane.
            *m = if v > *m { v } else { *m };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(tail) {
        if v > max {
            max = v;
        }
    }
    // The first value equal to the maximum (NaN equals nothing); none when every
    // logit is NaN. Vocabularies are far below u32::MAX tokens.
    logits
        .chunks(L)
        .position(|c| c.iter().fold(false, |hit, &v| hit | (v == max)))
        .and_then(|chunk| {
            let at = logits[chunk * L..].iter().position(|&v| v == max)?;
            Some((chunk * L + at) as u32)
        })
        .unwrap_or(0)
}
