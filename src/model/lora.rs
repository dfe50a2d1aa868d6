//! LoRA adapters in llama.cpp's GGUF form (`convert_lora_to_gguf.py` from a PEFT adapter):
//! `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and a pair of
//! tensors `<weight>.lora_a` (`rank × in`) and `<weight>.lora_b` (`out × rank`) for each
//! adapted weight. A weight `W` then computes `W·x + s·B·(A·x)`, with `s = alpha / rank` (1
//! without an alpha), as llama.cpp applies it; the base weights are never changed, so one
//! loaded model serves its adapters and itself side by side in one batch.
//!
//! Knows GGUF and shapes; never the scheduler or HTTP.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::gguf::{GgufFile, ModelConfig};
use crate::backend::{Backend, LoraShape};
use crate::error::ModelError;

type Result<T> = std::result::Result<T, ModelError>;

/// The linear layers of a block an adapter may change, in llama.cpp's tensor names.
pub const TARGETS: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// Index of a block's linear layer in [`TARGETS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Q = 0,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

/// One adapted weight: its pair on the backend and the factor its product is scaled by.
pub struct Pair<B: Backend> {
    pub lora: B::Lora,
    pub scale: f32,
}

/// A loaded adapter: per block, a pair for each adapted linear layer; and the lm head's.
pub struct Adapter<B: Backend> {
    pub path: PathBuf,
    pub blocks: Vec<[Option<Pair<B>>; 7]>,
    pub output: Option<Pair<B>>,
}

impl<B: Backend> Adapter<B> {
    pub fn pair(&self, layer: usize, t: Target) -> Option<&Pair<B>> {
        self.blocks[layer][t as usize].as_ref()
    }

    /// How many weights it adapts.
    pub fn weights(&self) -> usize {
        self.blocks.iter().flatten().flatten().count() + usize::from(self.output.is_some())
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Adapter {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The `(out, in)` shape of each of [`TARGETS`] in a model of `c`.
pub fn target_shapes(c: &ModelConfig) -> [(usize, usize); 7] {
    let (q, kv) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
    [
        (q, c.dim),
        (kv, c.dim),
        (kv, c.dim),
        (c.dim, q),
        (c.ffn_dim, c.dim),
        (c.ffn_dim, c.dim),
        (c.dim, c.ffn_dim),
    ]
}

/// Where an adapted weight sits: a block's layer, or the lm head (`None`); and its
/// `(out, in)` shape.
type Place = (Option<(usize, Target)>, usize, usize);

/// The place of the model weight named `base` (`blk.N.attn_q.weight`, `output.weight`);
/// `None` for a tensor no adapter may change here.
fn place(c: &ModelConfig, base: &str) -> Option<Place> {
    if base == "output.weight" {
        return Some((None, c.vocab_size, c.dim));
    }
    let rest = base.strip_prefix("blk.")?.strip_suffix(".weight")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok().filter(|&l| l < c.n_layer)?;
    let t = TARGETS.iter().position(|&n| n == name)?;
    let (out, inp) = target_shapes(c)[t];
    let target = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ][t];
    Some((Some((layer, target)), out, inp))
}

/// Loads the adapter at `path` for a model of `config` onto `backend`; every problem is
/// an error naming the file and what is wrong with it.
pub fn load<B: Backend>(path: &Path, config: &ModelConfig, backend: &B) -> Result<Adapter<B>> {
    let mut file = GgufFile::open(path)?;
    let kind = file.get_str("general.type").unwrap_or("model");
    if kind != "adapter" {
        return Err(bad(
            path,
            format!("`general.type` is `{kind}`, not `adapter`: this is not a LoRA adapter file"),
        ));
    }
    let adapter_type = file.get_str("adapter.type").unwrap_or("");
    if adapter_type != "lora" {
        return Err(bad(
            path,
            format!("`adapter.type` is `{adapter_type}`: only `lora` adapters are supported"),
        ));
    }
    if file.metadata("adapter.alora.invocation_tokens").is_some() {
        return Err(bad(
            path,
            "activated LoRA (aLoRA) adapters are not supported",
        ));
    }
    let arch = file.get_str("general.architecture").unwrap_or("");
    if arch != config.architecture {
        return Err(bad(
            path,
            format!(
                "it is for `{arch}` models, and the model is `{}`",
                config.architecture
            ),
        ));
    }
    let alpha = file
        .opt_f32("adapter.lora.alpha")
        .map_err(|e| bad(path, e.to_string()))?
        .unwrap_or(0.0);
    if !alpha.is_finite() {
        return Err(bad(path, format!("`adapter.lora.alpha` is {alpha}")));
    }
    let mut names: Vec<String> = file.content.tensor_infos.keys().cloned().collect();
    names.sort();
    let mut adapter = Adapter {
        path: path.to_path_buf(),
        blocks: (0..config.n_layer).map(|_| Default::default()).collect(),
        output: None,
    };
    let device = Device::Cpu;
    for name in &names {
        let Some(base) = name.strip_suffix(".lora_a") else {
            if name
                .strip_suffix(".lora_b")
                .is_some_and(|b| !file.has_tensor(&format!("{b}.lora_a")))
            {
                return Err(bad(path, format!("`{name}` has no `lora_a` beside it")));
            }
            if !name.ends_with(".lora_b") {
                return Err(bad(
                    path,
                    format!("tensor `{name}` is neither a `lora_a` nor a `lora_b`"),
                ));
            }
            continue;
        };
        let b_name = format!("{base}.lora_b");
        if !file.has_tensor(&b_name) {
            return Err(bad(path, format!("`{name}` has no `lora_b` beside it")));
        }
        let Some((at, n_out, n_in)) = place(config, base) else {
            return Err(bad(
                path,
                format!(
                    "it adapts `{base}`, which edgeinfer cannot adapt (only the blocks' {} and `output`, within the model's {} blocks)",
                    TARGETS.join(", "),
                    config.n_layer
                ),
            ));
        };
        // Shapes first: nothing is read (or allocated) for a pair that does not fit.
        let a_dims = file.tensor_dims(name).unwrap_or_default();
        let b_dims = file.tensor_dims(&b_name).unwrap_or_default();
        let rank = a_dims.first().copied().unwrap_or(0);
        if a_dims.len() != 2 || b_dims.len() != 2 || a_dims[1] != n_in || b_dims[0] != n_out {
            return Err(bad(
                path,
                format!(
                    "`{base}` is {n_out} × {n_in} in the model, and its pair is {a_dims:?} (A) and {b_dims:?} (B); A must be rank × {n_in} and B {n_out} × rank"
                ),
            ));
        }
        if b_dims[1] != rank || rank == 0 {
            return Err(bad(
                path,
                format!(
                    "`{base}`'s A has rank {rank} and its B {}: they must agree",
                    b_dims[1]
                ),
            ));
        }
        let read = |file: &mut GgufFile, name: &str| -> Result<Vec<f32>> {
            let t = file.tensor(name, &device)?;
            Ok(t.dequantize(&device)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let (a, b) = (read(&mut file, name)?, read(&mut file, &b_name)?);
        if a.iter().chain(&b).any(|v| !v.is_finite()) {
            return Err(bad(
                path,
                format!("`{base}`'s pair holds a value that is not finite"),
            ));
        }
        let scale = if alpha != 0.0 {
            alpha / rank as f32
        } else {
            1.0
        };
        let shape = LoraShape { rank, n_in, n_out };
        let pair = Pair {
            lora: backend.load_lora(a, b, shape)?,
            scale,
        };
        match at {
            Some((layer, t)) => adapter.blocks[layer][t as usize] = Some(pair),
            None => adapter.output = Some(pair),
        }
    }
    if adapter.weights() == 0 {
        return Err(bad(
            path,
            "it holds no LoRA pair (`*.lora_a` / `*.lora_b` tensors)",
        ));
    }
    Ok(adapter)
}
