//! `edgeinfer synth`: a random-weight file of a real shape, with llama.cpp's Q4_K_M type mix,
//! the default model's vocabulary and template, that we load and run like candle's
//! `quantized_llama` does.

mod common;

use std::process::Command;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::Device;
use common::oracle::{max_rel_diff, oracle, oracle_logits};
use edgeinfer::model::LoadedModel;

/// As in `synthetic_gguf.rs`: 8-bit activations on both sides, scales rounded differently.
const REL_TOL: f32 = 0.06;

#[test]
fn a_two_layer_llama_3_2_1b_q4_k_m_has_the_real_shape_and_runs_like_candle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("1b.gguf");
    let donor = common::default_model_path();
    let out = Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
        .args([
            "synth",
            "--shape",
            "llama-3.2-1b",
            "--layers",
            "2",
            "--quant",
            "q4_k_m",
        ])
        .args([
            "--out",
            path.to_str().unwrap(),
            "--donor",
            donor.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // llama.cpp's Q4_K_M rule: of 2 layers, layer 1 (>= 7/8 of them) gets Q6_K attn_v and
    // ffn_down; the tied embedding is Q6_K like an output; the rest Q4_K; norms f32.
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let ty = |n: &str| content.tensor_infos[n].ggml_dtype;
    assert_eq!(ty("token_embd.weight"), GgmlDType::Q6K);
    assert!(!content.tensor_infos.contains_key("output.weight"));
    assert_eq!(ty("blk.0.attn_v.weight"), GgmlDType::Q4K);
    assert_eq!(ty("blk.1.attn_v.weight"), GgmlDType::Q6K);
    assert_eq!(ty("blk.1.ffn_down.weight"), GgmlDType::Q6K);
    assert_eq!(ty("blk.0.ffn_gate.weight"), GgmlDType::Q4K);
    assert_eq!(ty("blk.0.attn_norm.weight"), GgmlDType::F32);
    assert_eq!(
        content.tensor_infos["blk.0.ffn_up.weight"].shape.dims(),
        &[8192, 2048]
    );

    let model = LoadedModel::load(&path, None, &Device::Cpu).unwrap();
    let c = &model.llama.config;
    assert_eq!(
        (c.dim, c.n_layer, c.n_head, c.n_kv_head, c.ffn_dim),
        (2048, 2, 32, 8, 8192)
    );
    assert_eq!(c.vocab_size, 49152);
    // The donor's tokenizer and template, unchanged.
    let reference = common::default_model();
    let text = "Hello, world! Tokenizers <|im_start|> agree.";
    assert_eq!(
        model.tokenizer.encode(text, false).unwrap(),
        reference.tokenizer.encode(text, false).unwrap()
    );
    assert_eq!(model.template.source(), reference.template.source());

    // Our forward against candle's on the same bytes.
    let prompt = model
        .tokenizer
        .encode("The capital of France is", false)
        .unwrap();
    let mut cache = model.llama.new_cache();
    let ours = model.llama.forward(&prompt, &mut cache).unwrap();
    let want = oracle_logits(&mut oracle(&path), &prompt, 0);
    assert!(ours.iter().all(|x| x.is_finite()));
    let diff = max_rel_diff(&ours, &want);
    println!("worst relative logit difference {diff:.5}");
    assert!(
        diff < REL_TOL,
        "logits differ from candle's by {diff} (relative)"
    );
}

#[test]
fn unknown_shapes_and_quants_are_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
        .args(["synth", "--shape", "llama-9b", "--out", "/dev/null"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("llama-3.1-8b"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
        .args([
            "synth",
            "--shape",
            "mistral-7b",
            "--quant",
            "q3",
            "--out",
            "/dev/null",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("q4_k_m"), "{err}");
}
