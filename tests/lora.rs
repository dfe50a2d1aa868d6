//! LoRA adapters at the model level: an adapter applied as the model runs gives the logits
//! of the model with the adapter merged into its weights; sequences with different adapters
//! (and none) in one packed forward each get what they get alone; and a bad adapter file is
//! refused with a message naming the problem.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::synthetic::{self, Spec};
use edgeinfer::model::synth::{write_lora, LoraSpec};
use edgeinfer::model::{GgufFile, KvPool, Llama, Logits, SeqInput};

const BLOCK: usize = 4;

fn tiny(dir: &Path, name: &str, dtype: Option<GgmlDType>) -> PathBuf {
    let path = dir.join(name);
    synthetic::write(
        &path,
        &Spec {
            matrix_dtype: dtype,
            ..Spec::default()
        },
    );
    path
}

fn load(path: &Path, adapters: &[&Path]) -> Llama {
    let mut m = Llama::load(&mut GgufFile::open(path).unwrap(), &Device::Cpu).unwrap();
    for (i, a) in adapters.iter().enumerate() {
        assert_eq!(m.add_adapter(a).unwrap(), i);
    }
    m
}

/// Every token's logits of `tokens` run alone from position 0 with `adapter`.
fn logits(model: &Llama, tokens: &[u32], adapter: Option<usize>) -> Vec<f32> {
    let mut pool = model.new_pool(BLOCK, tokens.len().div_ceil(BLOCK));
    let blocks: Vec<u32> = (0..tokens.len().div_ceil(BLOCK) as u32).collect();
    let seq = SeqInput {
        tokens,
        start: 0,
        blocks: &blocks,
        logits: Logits::All,
        adapter,
    };
    model
        .forward_batch(&[seq], &mut pool)
        .unwrap()
        .remove(0)
        .unwrap()
}

fn dequantized(f: &mut GgufFile, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = f.tensor(name, &Device::Cpu).unwrap();
    let dims = t.shape().dims().to_vec();
    let v = t.dequantize(&Device::Cpu).unwrap();
    (dims, v.flatten_all().unwrap().to_vec1().unwrap())
}

/// `base` with `adapter` merged into its weights (`W + alpha / rank · B·A`, in f64, stored
/// as f32), written to `out`.
fn merge(base: &Path, adapter: &Path, out: &Path) {
    let mut b = GgufFile::open(base).unwrap();
    let mut a = GgufFile::open(adapter).unwrap();
    let alpha = a.opt_f32("adapter.lora.alpha").unwrap().unwrap();
    let mut names: Vec<String> = b.content.tensor_infos.keys().cloned().collect();
    names.sort();
    let mut tensors = Vec::new();
    let mut merged = 0;
    for name in &names {
        let t = b.tensor(name, &Device::Cpu).unwrap();
        let a_name = format!("{name}.lora_a");
        if !a.has_tensor(&a_name) {
            tensors.push((name.clone(), t));
            continue;
        }
        let (dims, mut w) = dequantized(&mut b, name);
        let (ad, av) = dequantized(&mut a, &a_name);
        let (_, bv) = dequantized(&mut a, &format!("{name}.lora_b"));
        let (rank, n_in, n_out) = (ad[0], ad[1], dims[0]);
        let s = if alpha != 0.0 {
            alpha as f64 / rank as f64
        } else {
            1.0
        };
        for o in 0..n_out {
            for i in 0..n_in {
                let d: f64 = (0..rank)
                    .map(|k| bv[o * rank + k] as f64 * av[k * n_in + i] as f64)
                    .sum();
                w[o * n_in + i] = (w[o * n_in + i] as f64 + s * d) as f32;
            }
        }
        let t = Tensor::from_vec(w, (n_out, n_in), &Device::Cpu).unwrap();
        tensors.push((name.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap()));
        merged += 1;
    }
    assert!(merged >= 2, "the adapter merged into {merged} weights");
    let meta: Vec<(&str, &Value)> = b
        .content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(out).unwrap();
    gguf_file::write(&mut f, &meta, &refs).unwrap();
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn an_adapter_applied_as_the_model_runs_equals_it_merged_into_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    // f32 weights: the merged model's products are exact, so only the order of the sums
    // differs between the two.
    let base = tiny(dir.path(), "base.gguf", Some(GgmlDType::F32));
    let tokens: Vec<u32> = b"A LoRA adapter, merged or not."
        .iter()
        .map(|&b| b as u32)
        .collect();
    let plain = logits(&load(&base, &[]), &tokens, None);
    let specs = [
        // Every layer of every block and the lm head.
        LoraSpec {
            output: true,
            strength: 0.3,
            ..Default::default()
        },
        // Some layers of one block, rank 3, no alpha scaling beyond its own.
        LoraSpec {
            rank: 3,
            alpha: 5.0,
            targets: vec!["attn_v".into(), "ffn_down".into(), "attn_output".into()],
            blocks: Some(vec![1]),
            strength: 0.5,
            dtype: GgmlDType::F32,
            seed: 9,
            ..Default::default()
        },
        // No alpha: the product is taken as it is (scale 1).
        LoraSpec {
            alpha: 0.0,
            targets: vec!["attn_q".into(), "ffn_gate".into()],
            strength: 0.5,
            seed: 4,
            ..Default::default()
        },
    ];
    for (i, spec) in specs.iter().enumerate() {
        let adapter = dir.path().join(format!("adapter{i}.gguf"));
        write_lora(&adapter, &base, spec).unwrap();
        let merged = dir.path().join(format!("merged{i}.gguf"));
        merge(&base, &adapter, &merged);
        let model = load(&base, &[&adapter]);
        let applied = logits(&model, &tokens, Some(0));
        let want = logits(&load(&merged, &[]), &tokens, None);
        let moved = max_diff(&applied, &plain);
        let off = max_diff(&applied, &want);
        eprintln!("adapter {i}: moved {moved}, off {off}");
        assert!(moved > 0.05, "adapter {i} moved the logits by only {moved}");
        // The same f32 arithmetic in another order (and keys rounded to f16 in the KV cache,
        // where a last-bit difference can round the other way): under a thousandth of what
        // the adapter moved. A scale off by 1%, or a pair on the wrong layer, is ten times that.
        assert!(
            off < 1e-3 * moved,
            "adapter {i}: {off} from the merged model's logits (moved {moved})"
        );
        // The base model is still there, unchanged, beside its adapter.
        assert_eq!(logits(&model, &tokens, None), plain);
    }
}

#[test]
fn sequences_with_different_adapters_in_one_batch_each_get_their_own_logits() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny(dir.path(), "base.gguf", None);
    let (a0, a1) = (dir.path().join("a0.gguf"), dir.path().join("a1.gguf"));
    let spec = |seed, output| LoraSpec {
        seed,
        output,
        strength: 0.3,
        ..Default::default()
    };
    write_lora(&a0, &base, &spec(1, true)).unwrap();
    write_lora(&a1, &base, &spec(2, false)).unwrap();
    let model = load(&base, &[&a0, &a1]);
    let prompts: [&[u8]; 4] = [
        b"plain text",
        b"first adapter",
        b"second one here",
        b"first again",
    ];
    let adapters = [None, Some(0), Some(1), Some(0)];
    let wants = [Logits::All, Logits::Last, Logits::All, Logits::Last];
    let tokens: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| p.iter().map(|&b| b as u32).collect())
        .collect();
    // Alone, each in its own pool.
    let alone: Vec<Vec<f32>> = tokens
        .iter()
        .zip(adapters)
        .zip(wants)
        .map(|((t, a), w)| {
            let all = logits(&model, t, a);
            match w {
                Logits::Last => all[all.len() - synthetic::VOCAB..].to_vec(),
                _ => all,
            }
        })
        .collect();
    // Together, in one pool with scattered blocks.
    let mut pool: KvPool = model.new_pool(BLOCK, 24);
    let tables: Vec<Vec<u32>> = vec![
        vec![7, 2, 19],
        vec![0, 11, 5, 22],
        vec![3, 14, 9, 16],
        vec![1, 20, 8],
    ];
    let seqs: Vec<SeqInput> = (0..4)
        .map(|i| SeqInput {
            tokens: &tokens[i],
            start: 0,
            blocks: &tables[i],
            logits: wants[i],
            adapter: adapters[i],
        })
        .collect();
    let together = model.forward_batch(&seqs, &mut pool).unwrap();
    for (i, (got, want)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(
            got.as_ref().unwrap(),
            want,
            "sequence {i} ({:?})",
            adapters[i]
        );
    }
    // And the adapters do change them.
    assert_ne!(
        logits(&model, &tokens[1], None),
        logits(&model, &tokens[1], Some(0))
    );
    assert_ne!(
        logits(&model, &tokens[1], Some(1)),
        logits(&model, &tokens[1], Some(0))
    );
}

/// Writes an adapter file of these tensors (f32) and metadata.
fn adapter_file(path: &Path, arch: &str, kind: &str, tensors: &[(&str, (usize, usize))]) {
    adapter_file_alpha(path, arch, kind, 8.0, tensors)
}

fn adapter_file_alpha(
    path: &Path,
    arch: &str,
    kind: &str,
    alpha: f32,
    tensors: &[(&str, (usize, usize))],
) {
    let meta = [
        ("general.architecture", Value::String(arch.into())),
        ("general.type", Value::String(kind.into())),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(alpha)),
    ];
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, QTensor)> = tensors
        .iter()
        .map(|&(name, (r, c))| {
            let t = Tensor::zeros((r, c), candle_core::DType::F32, &Device::Cpu).unwrap();
            (name, QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    let refs: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &refs).unwrap();
}

#[test]
fn a_bad_adapter_file_is_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny(dir.path(), "base.gguf", None);
    let d = synthetic::DIM;
    let q_a = "blk.0.attn_q.weight.lora_a";
    let q_b = "blk.0.attn_q.weight.lora_b";
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, (usize, usize))>, &'a str);
    let cases: Vec<Case> = vec![
        ("llama", "adapter", vec![(q_a, (4, d)), (q_b, (d, 4))], ""),
        (
            "qwen2",
            "adapter",
            vec![(q_a, (4, d)), (q_b, (d, 4))],
            "for `qwen2` models",
        ),
        (
            "llama",
            "model",
            vec![(q_a, (4, d)), (q_b, (d, 4))],
            "not a LoRA adapter",
        ),
        (
            "llama",
            "adapter",
            vec![(q_a, (4, d + 1)), (q_b, (d, 4))],
            "must be rank",
        ),
        (
            "llama",
            "adapter",
            vec![(q_a, (4, d)), (q_b, (d, 5))],
            "must agree",
        ),
        ("llama", "adapter", vec![(q_a, (4, d))], "no `lora_b`"),
        ("llama", "adapter", vec![(q_b, (d, 4))], "no `lora_a`"),
        (
            "llama",
            "adapter",
            vec![
                ("token_embd.weight.lora_a", (4, d)),
                ("token_embd.weight.lora_b", (258, 4)),
            ],
            "adapts `token_embd.weight`, which edgeinfer cannot adapt",
        ),
        (
            "llama",
            "adapter",
            vec![
                ("blk.9.attn_q.weight.lora_a", (4, d)),
                ("blk.9.attn_q.weight.lora_b", (d, 4)),
            ],
            "adapts `blk.9.attn_q.weight`, which edgeinfer cannot",
        ),
        ("llama", "adapter", vec![], "holds no LoRA pair"),
    ];
    for (i, (arch, kind, tensors, expected)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.gguf"));
        adapter_file(&path, arch, kind, &tensors);
        let mut m = Llama::load(&mut GgufFile::open(&base).unwrap(), &Device::Cpu).unwrap();
        match m.add_adapter(&path) {
            Ok(_) => assert!(expected.is_empty(), "case {i} was taken"),
            Err(e) => {
                let msg = e.to_string();
                assert!(!expected.is_empty(), "case {i}: {msg}");
                assert!(msg.contains(expected), "case {i}: {msg}");
                assert!(msg.contains(&path.display().to_string()), "{msg}");
            }
        }
    }
    // An alpha that is no number.
    let path = dir.path().join("nan.gguf");
    adapter_file_alpha(
        &path,
        "llama",
        "adapter",
        f32::NAN,
        &[(q_a, (4, d)), (q_b, (d, 4))],
    );
    let mut m = Llama::load(&mut GgufFile::open(&base).unwrap(), &Device::Cpu).unwrap();
    let e = m.add_adapter(&path).unwrap_err().to_string();
    assert!(e.contains("`adapter.lora.alpha` is NaN"), "{e}");
    // The model file itself is no adapter.
    let mut m = Llama::load(&mut GgufFile::open(&base).unwrap(), &Device::Cpu).unwrap();
    let e = m.add_adapter(&base).unwrap_err().to_string();
    assert!(e.contains("`general.type` is `model`"), "{e}");
}
