//! Tiny random-weight Llama GGUF files written in tests (candle writes GGUF), to check the
//! forward pass against candle's `quantized_llama` and to exercise every loading error.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

pub const DIM: usize = 64;
pub const FFN: usize = 128;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const LAYERS: usize = 2;
/// 256 byte-level tokens plus `<|im_start|>` and `<|im_end|>`.
pub const VOCAB: usize = 258;

pub struct Spec {
    pub arch: &'static str,
    pub tied: bool,
    pub pre: &'static str,
    pub drop_tensor: Option<&'static str>,
    pub seed: u64,
    /// Store every matrix in this type instead of the default mix of Q4_0 / Q4_1 / Q8_0.
    pub matrix_dtype: Option<GgmlDType>,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            arch: "llama",
            tied: false,
            pre: "gpt-2",
            drop_tensor: None,
            seed: 42,
            matrix_dtype: None,
        }
    }
}

/// GPT-2's byte-to-character map: printable bytes stand for themselves, others move to 256+.
fn byte_level_alphabet() -> Vec<String> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap().to_string()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap().to_string()
            }
        })
        .collect()
}

pub fn write(path: &Path, spec: &Spec) {
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let mut tensor = |rows: usize, cols: usize, scale: f32, dtype: GgmlDType| {
        let dtype = spec.matrix_dtype.unwrap_or(dtype);
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.gen_range(-scale..scale))
            .collect();
        QTensor::quantize(&Tensor::from_vec(v, (rows, cols), &dev).unwrap(), dtype).unwrap()
    };
    let hd = DIM / HEADS;
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            tensor(VOCAB, DIM, 1.0, GgmlDType::Q8_0),
        ),
        (
            "output_norm.weight".into(),
            norm(&mut rand::rngs::StdRng::seed_from_u64(spec.seed + 1)),
        ),
    ];
    if !spec.tied {
        tensors.push((
            "output.weight".into(),
            tensor(VOCAB, DIM, 0.5, GgmlDType::Q4_1),
        ));
    }
    for l in 0..LAYERS {
        let mut nrng = rand::rngs::StdRng::seed_from_u64(spec.seed + 10 + l as u64);
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        tensors.push((n("attn_norm"), norm(&mut nrng)));
        tensors.push((n("ffn_norm"), norm(&mut nrng)));
        tensors.push((n("attn_q"), tensor(DIM, DIM, 0.3, GgmlDType::Q4_1)));
        tensors.push((
            n("attn_k"),
            tensor(KV_HEADS * hd, DIM, 0.3, GgmlDType::Q4_0),
        ));
        tensors.push((
            n("attn_v"),
            tensor(KV_HEADS * hd, DIM, 0.3, GgmlDType::Q8_0),
        ));
        tensors.push((n("attn_output"), tensor(DIM, DIM, 0.3, GgmlDType::Q4_1)));
        tensors.push((n("ffn_gate"), tensor(FFN, DIM, 0.3, GgmlDType::Q4_1)));
        tensors.push((n("ffn_up"), tensor(FFN, DIM, 0.3, GgmlDType::Q8_0)));
        tensors.push((n("ffn_down"), tensor(DIM, FFN, 0.3, GgmlDType::Q4_0)));
    }
    tensors.retain(|(name, _)| Some(name.as_str()) != spec.drop_tensor);

    let a = spec.arch;
    let mut tokens: Vec<Value> = byte_level_alphabet()
        .into_iter()
        .map(Value::String)
        .collect();
    tokens.push(Value::String("<|im_start|>".into()));
    tokens.push(Value::String("<|im_end|>".into()));
    let mut types = vec![Value::I32(1); 256];
    types.extend([Value::I32(3), Value::I32(3)]);
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.block_count"), Value::U32(LAYERS as u32)),
        (format!("{a}.context_length"), Value::U32(256)),
        (format!("{a}.embedding_length"), Value::U32(DIM as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(FFN as u32)),
        (
            format!("{a}.attention.head_count"),
            Value::U32(HEADS as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(KV_HEADS as u32),
        ),
        (format!("{a}.rope.dimension_count"), Value::U32(hd as u32)),
        (format!("{a}.rope.freq_base"), Value::F32(10_000.0)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(spec.pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(256)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(257)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

fn norm(rng: &mut rand::rngs::StdRng) -> QTensor {
    let v: Vec<f32> = (0..DIM).map(|_| rng.gen_range(0.8..1.2)).collect();
    QTensor::quantize(
        &Tensor::from_vec(v, DIM, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap()
}
