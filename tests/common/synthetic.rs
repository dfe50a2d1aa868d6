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
    /// A SentencePiece-style (`llama`) vocabulary instead of the byte-level BPE one.
    pub spm: bool,
    /// With `spm`: Mistral's control tokens (`[INST]`, `[TOOL_CALLS]`, ...) and a chat
    /// template that takes tools in Mistral's format.
    pub mistral: bool,
    /// With `mistral`: `[ARGS]` and `[CALL_ID]` too, and [`MISTRAL_ARGS_TEMPLATE`] (Mistral Small 3.2's
    /// `[TOOL_CALLS]name[ARGS]{...}` calls) instead of v0.3's.
    pub mistral_args: bool,
    /// With `mistral`: Magistral's `[THINK]` and `[/THINK]` control tokens too, and a
    /// template whose generation prompt opens the reasoning with `[THINK]`.
    pub mistral_think: bool,
    /// The context length the metadata declares.
    pub context: u32,
    /// Model width and FFN width (K-quant matrices need multiples of 256).
    pub dim: usize,
    pub ffn: usize,
    /// An embedding model's metadata: last-token pooling, and an EOS after each text.
    pub embedding: bool,
    /// More metadata, written last, replacing a key written before (`{arch}` in a key is the
    /// architecture).
    pub meta: Vec<(&'static str, Value)>,
    /// More control tokens after the vocabulary's (byte-level: ids from 258 on;
    /// SentencePiece-style: last): a code model's fill-in-the-middle tokens.
    pub controls: &'static [&'static str],
    /// Type `controls` as user-defined words (4) instead of control tokens (3), as older
    /// conversions do.
    pub controls_user_defined: bool,
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
            spm: false,
            mistral: false,
            mistral_args: false,
            mistral_think: false,
            context: 256,
            dim: DIM,
            ffn: FFN,
            embedding: false,
            meta: Vec::new(),
            controls: &[],
            controls_user_defined: false,
        }
    }
}

/// GPT-2's byte-to-character map: printable bytes stand for themselves, others move to 256+.
pub fn byte_level_alphabet() -> Vec<String> {
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
    let (dim, ffn) = (spec.dim, spec.ffn);
    let vocab_meta = if spec.spm {
        spm_vocab(
            spec.mistral,
            spec.mistral_args,
            spec.mistral_think,
            spec.controls,
        )
    } else {
        let ty = if spec.controls_user_defined { 4 } else { 3 };
        bpe_vocab(spec.pre, spec.controls, ty)
    };
    // One embedding row for each token.
    let vocab = vocab_meta
        .iter()
        .find_map(|(k, v)| match (k.as_str(), v) {
            ("tokenizer.ggml.tokens", Value::Array(t)) => Some(t.len()),
            _ => None,
        })
        .unwrap()
        .max(VOCAB);
    let hd = dim / HEADS;
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            tensor(vocab, dim, 1.0, GgmlDType::Q8_0),
        ),
        (
            "output_norm.weight".into(),
            norm(&mut rand::rngs::StdRng::seed_from_u64(spec.seed + 1), dim),
        ),
    ];
    if !spec.tied {
        tensors.push((
            "output.weight".into(),
            tensor(vocab, dim, 0.5, GgmlDType::Q4_1),
        ));
    }
    for l in 0..LAYERS {
        let mut nrng = rand::rngs::StdRng::seed_from_u64(spec.seed + 10 + l as u64);
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        tensors.push((n("attn_norm"), norm(&mut nrng, dim)));
        tensors.push((n("ffn_norm"), norm(&mut nrng, dim)));
        tensors.push((n("attn_q"), tensor(dim, dim, 0.3, GgmlDType::Q4_1)));
        tensors.push((
            n("attn_k"),
            tensor(KV_HEADS * hd, dim, 0.3, GgmlDType::Q4_0),
        ));
        tensors.push((
            n("attn_v"),
            tensor(KV_HEADS * hd, dim, 0.3, GgmlDType::Q8_0),
        ));
        tensors.push((n("attn_output"), tensor(dim, dim, 0.3, GgmlDType::Q4_1)));
        tensors.push((n("ffn_gate"), tensor(ffn, dim, 0.3, GgmlDType::Q4_1)));
        tensors.push((n("ffn_up"), tensor(ffn, dim, 0.3, GgmlDType::Q8_0)));
        tensors.push((n("ffn_down"), tensor(dim, ffn, 0.3, GgmlDType::Q4_0)));
    }
    tensors.retain(|(name, _)| Some(name.as_str()) != spec.drop_tensor);

    let a = spec.arch;
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.block_count"), Value::U32(LAYERS as u32)),
        (format!("{a}.context_length"), Value::U32(spec.context)),
        (format!("{a}.embedding_length"), Value::U32(dim as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(ffn as u32)),
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
    ];
    meta.extend(vocab_meta);
    if spec.embedding {
        meta.push((format!("{a}.pooling_type"), Value::U32(3)));
        meta.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(true)));
    }
    // More metadata replaces a key written above (a file names each key once).
    for (k, v) in &spec.meta {
        let k = k.replace("{arch}", a);
        meta.retain(|(old, _)| *old != k);
        meta.push((k, v.clone()));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

fn norm(rng: &mut rand::rngs::StdRng, dim: usize) -> QTensor {
    let v: Vec<f32> = (0..dim).map(|_| rng.gen_range(0.8..1.2)).collect();
    QTensor::quantize(
        &Tensor::from_vec(v, dim, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap()
}

/// A `tokenizer.json` for the synthetic vocabulary (byte-level BPE, no merges, the two control
/// tokens as special tokens), as a user would pass with `--tokenizer`.
pub fn tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    for (i, t) in byte_level_alphabet().into_iter().enumerate() {
        vocab.insert(t, i.into());
    }
    vocab.insert("<|im_start|>".into(), 256.into());
    vocab.insert("<|im_end|>".into(), 257.into());
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0",
        "added_tokens": [special(256, "<|im_start|>"), special(257, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": []}
    })
    .to_string()
}

fn strings(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
}

/// Byte-level BPE metadata: 256 byte symbols, `<|im_start|>` (256), `<|im_end|>` (257), then
/// `controls`.
fn bpe_vocab(pre: &str, controls: &[&str], controls_type: i32) -> Vec<(String, Value)> {
    let mut tokens: Vec<Value> = byte_level_alphabet()
        .into_iter()
        .map(Value::String)
        .collect();
    tokens.push(Value::String("<|im_start|>".into()));
    tokens.push(Value::String("<|im_end|>".into()));
    tokens.extend(controls.iter().map(|c| Value::String(c.to_string())));
    let mut types = vec![Value::I32(1); 256];
    types.extend([Value::I32(3), Value::I32(3)]);
    types.extend(controls.iter().map(|_| Value::I32(controls_type)));
    let mut meta = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(256)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(257)),
    ];
    // An empty `pre` writes none, as files converted before the key existed.
    if !pre.is_empty() {
        meta.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
    }
    meta
}

/// The pieces of the SentencePiece-style vocabulary after `<unk>`, `<s>`, `</s>` and the 256
/// byte tokens, with their scores (higher merges first).
pub const SPM_PIECES: &[(&str, f32)] = &[
    ("▁", -1.0),
    ("h", -2.0),
    ("e", -2.0),
    ("l", -2.0),
    ("o", -2.0),
    ("w", -2.0),
    ("r", -2.0),
    ("d", -2.0),
    ("he", -3.0),
    ("ll", -3.0),
    ("llo", -4.0),
    ("hello", -5.0),
    ("▁hello", -6.0),
    ("or", -3.0),
    ("▁w", -3.0),
    ("▁wor", -5.0),
    ("▁world", -6.0),
    ("ld", -4.0),
];

/// Mistral's control tokens, after the pieces when asked for.
pub const MISTRAL_CONTROLS: &[&str] = &[
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
];

/// A chat template in Mistral v0.3's format (tools before the last user turn, calls as a JSON
/// list after `[TOOL_CALLS]`, 9-character call ids or an exception), written for the tests.
pub const MISTRAL_TEMPLATE: &str = r#"{{ bos_token }}{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
{%- if m.role == 'user' %}
{%- if tools and loop.index0 == ns.last %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST] {{ m.content }}[/INST]
{%- elif m.role == 'assistant' and m.tool_calls %}{{ '[TOOL_CALLS] [' }}
{%- for c in m.tool_calls %}{% set out = c.function | tojson %}{{ out[:-1] }}{% if c.id | length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}{{ ', "id": "' + c.id + '"}' }}{% if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}
{%- elif m.role == 'assistant' %} {{ m.content }}{{ eos_token }}
{%- elif m.role == 'tool' %}{% if m.tool_call_id | length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}[TOOL_RESULTS] {"content": {{ m.content | tojson }}, "call_id": "{{ m.tool_call_id }}"}[/TOOL_RESULTS]
{%- endif %}
{%- endfor %}"#;

/// A chat template in the format of Mistral Small 3.2 and later (tools before the last user
/// turn, each call `[TOOL_CALLS]name[ARGS]` and its arguments, results without ids), written
/// for the tests.
pub const MISTRAL_ARGS_TEMPLATE: &str = r#"{{ bos_token }}{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
{%- if m.role == 'user' %}
{%- if tools and loop.index0 == ns.last %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ m.content }}[/INST]
{%- elif m.role == 'assistant' %}{{ m.content or '' }}
{%- for c in m.tool_calls or [] %}{% set a = c.function.arguments %}{{ '[TOOL_CALLS]' + c.function.name + '[ARGS]' }}{% if a is string %}{{ a }}{% else %}{{ a | tojson }}{% endif %}{% endfor %}{{ eos_token }}
{%- elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]
{%- endif %}
{%- endfor %}"#;

/// SentencePiece-style (`llama`) metadata: `<unk>` 0, `<s>` 1, `</s>` 2, bytes 3..259, pieces,
/// and with `mistral` [`MISTRAL_CONTROLS`] and [`MISTRAL_TEMPLATE`].
fn spm_vocab(mistral: bool, args: bool, think: bool, more: &[&str]) -> Vec<(String, Value)> {
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![Value::I32(2), Value::I32(3), Value::I32(3)];
    let mut scores = vec![Value::F32(0.0); 3];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(Value::I32(6));
        scores.push(Value::F32(0.0));
    }
    for (piece, score) in SPM_PIECES {
        tokens.push(piece.to_string());
        types.push(Value::I32(1));
        scores.push(Value::F32(*score));
    }
    let mut extra = Vec::new();
    if mistral {
        let named = ["[ARGS]", "[CALL_ID]"];
        let thinking = ["[THINK]", "[/THINK]"];
        let controls = MISTRAL_CONTROLS
            .iter()
            .chain(named.iter().filter(|_| args))
            .chain(thinking.iter().filter(|_| think));
        for c in controls {
            tokens.push(c.to_string());
            types.push(Value::I32(3));
            scores.push(Value::F32(0.0));
        }
        let template = if args {
            MISTRAL_ARGS_TEMPLATE
        } else {
            MISTRAL_TEMPLATE
        };
        let mut template = template.to_string();
        if think {
            template.push_str("{% if add_generation_prompt %}[THINK]{% endif %}");
        }
        extra.push((
            "tokenizer.chat_template".to_string(),
            Value::String(template),
        ));
    }
    for c in more {
        tokens.push(c.to_string());
        types.push(Value::I32(3));
        scores.push(Value::F32(0.0));
    }
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    extra.extend(vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.scores".into(), Value::Array(scores)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
    ]);
    extra
}
