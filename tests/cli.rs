//! The `edgeinfer` binary on good and bad input: each error is one clear message on stderr and
//! exit status 1 (never a panic, whose status is 101).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::synthetic::{self, Spec};

fn edgeinfer(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgeinfer"));
    cmd.args(args).env("RAYON_NUM_THREADS", "2");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

/// Runs `generate` on `model` and checks it fails cleanly with `expected` in the message.
fn assert_generate_fails(model: &Path, expected: &str) {
    let out = edgeinfer(
        &["generate", "--model", model.to_str().unwrap(), "-p", "hi"],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn not_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.gguf");
    std::fs::write(&path, "these are not model weights").unwrap();
    assert_generate_fails(&path, "is not a GGUF file");
}

#[test]
fn truncated_file_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    synthetic::write(&path, &Spec::default());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
    assert_generate_fails(&path, "is truncated: tensor `");
}

#[test]
fn hostile_headers_are_refused_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    synthetic::write(&path, &Spec::default());
    let good = std::fs::read(&path).unwrap();
    // (byte offset, bytes written there, what the message names)
    let cases: [(usize, Vec<u8>, &str); 3] = [
        (8, (1u64 << 62).to_le_bytes().to_vec(), "the tensor count"),
        (
            16,
            (1u64 << 62).to_le_bytes().to_vec(),
            "the metadata count",
        ),
        // The first key's length.
        (24, u64::MAX.to_le_bytes().to_vec(), "metadata key 0"),
    ];
    for (at, bytes, named) in cases {
        let mut bad = good.clone();
        bad[at..at + bytes.len()].copy_from_slice(&bytes);
        std::fs::write(&path, &bad).unwrap();
        assert_generate_fails(&path, named);
    }
    // Cut inside the metadata: named, not a panic.
    std::fs::write(&path, &good[..200]).unwrap();
    assert_generate_fails(&path, "is not a GGUF file: ");
}

#[test]
fn metadata_that_would_size_or_break_the_model_is_named() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let write = |meta| {
        let spec = Spec {
            meta,
            ..Spec::default()
        };
        synthetic::write(&path, &spec);
    };
    // Four billion layers (the layer list was sized by it before any tensor was read): a
    // clear message naming the key.
    write(vec![("{arch}.block_count", Value::U32(u32::MAX))]);
    assert_generate_fails(&path, "llama.block_count");
    // Values no model runs with (every output NaN, or room for no token) load no model.
    for (key, v) in [
        ("{arch}.context_length", Value::U32(0)),
        ("{arch}.rope.freq_base", Value::F32(0.0)),
        ("{arch}.rope.freq_base", Value::F32(f32::NAN)),
        ("{arch}.attention.layer_norm_rms_epsilon", Value::F32(-1.0)),
    ] {
        write(vec![(key, v)]);
        assert_generate_fails(&path, &key.replace("{arch}", "llama"));
    }
    // An end token outside the vocabulary (it met an assert in the grammar compiler) is
    // none, as llama.cpp takes it, with a warning naming the key.
    write(vec![("tokenizer.ggml.eos_token_id", Value::U32(1_000_000))]);
    let model = path.to_str().unwrap();
    let out = edgeinfer(&["generate", "--model", model, "-p", "hi", "-n", "2"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("tokenizer.ggml.eos_token_id"), "{stderr}");
}

#[test]
fn unknown_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("falcon.gguf");
    synthetic::write(
        &path,
        &Spec {
            arch: "falcon",
            ..Spec::default()
        },
    );
    assert_generate_fails(&path, "unsupported model architecture `falcon`");
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("holey.gguf");
    synthetic::write(
        &path,
        &Spec {
            drop_tensor: Some("blk.1.ffn_down.weight"),
            ..Spec::default()
        },
    );
    assert_generate_fails(&path, "no tensor `blk.1.ffn_down.weight`");
}

#[test]
fn unknown_pre_tokenizer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mystery.gguf");
    synthetic::write(
        &path,
        &Spec {
            pre: "mystery-bpe",
            ..Spec::default()
        },
    );
    assert_generate_fails(
        &path,
        "unknown tokenizer pre-tokenizer `tokenizer.ggml.pre = mystery-bpe`",
    );
}

#[test]
fn missing_model_file_is_a_clear_error() {
    assert_generate_fails(Path::new("/nonexistent/model.gguf"), "does not exist");
}

#[test]
fn unreachable_hub_without_fallback_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = edgeinfer(
        &["pull", "nobody/nothing-GGUF:nothing.Q4_0.gguf"],
        &[
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
            ("EDGEINFER_MODELS_DIR", dir.path().to_str().unwrap()),
            ("HF_HOME", dir.path().to_str().unwrap()),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("every source failed"), "{stderr}");
    assert!(
        stderr.contains("Hugging Face Hub nobody/nothing-GGUF@main:nothing.Q4_0.gguf"),
        "{stderr}"
    );
    assert!(
        started.elapsed().as_secs() < 60,
        "took {:?}",
        started.elapsed()
    );
    assert!(std::fs::read_dir(dir.path())
        .unwrap()
        .all(|e| { !e.unwrap().file_name().to_string_lossy().ends_with(".gguf") }));
}

#[test]
fn bad_specs_and_bad_flags_are_refused() {
    let out = edgeinfer(&["pull", "no-such-model"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("unknown model `no-such-model`"), "{stderr}");
    let out = edgeinfer(
        &[
            "generate",
            "-p",
            "x",
            "--temperature",
            "-1",
            "--model",
            "/dev/null",
        ],
        &[],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn generate_json_on_a_synthetic_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    synthetic::write(&path, &Spec::default());
    let model = path.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", model, "-n", "12", "--json"];
        args.extend_from_slice(extra);
        let out = edgeinfer(&args, &[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let last = stdout.lines().last().unwrap().to_string();
        let json: serde_json::Value = serde_json::from_str(&last).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (json, stderr)
    };
    // --raw: special-token text becomes the special token, no BOS is added by the tokenizer.
    let (json, stderr) = run(&["--raw", "-p", "<|im_start|>ab"]);
    assert_eq!(common::ids(&json["prompt_tokens"]), vec![256, 97, 98]);
    let tokens = common::ids(&json["tokens"]);
    assert!(!tokens.is_empty() && tokens.len() <= 12);
    assert!(["stop", "length"].contains(&json["finish_reason"].as_str().unwrap()));
    assert!(json["timings"]["generation_tokens_per_second"]
        .as_f64()
        .is_some());
    assert!(stderr.contains("prompt: 3 tokens"), "{stderr}");
    // Chat mode goes through the built-in ChatML template (the file has none).
    let (json, _) = run(&["-p", "ab"]);
    let prompt = common::ids(&json["prompt_tokens"]);
    assert_eq!(prompt[0], 256, "starts with <|im_start|>");
    assert!(prompt.len() > 6);
    // Seeds: the same seed samples the same tokens; greedy ignores seeds.
    let (a, _) = run(&["--raw", "-p", "ab", "--temperature", "1.5", "--seed", "7"]);
    let (b, _) = run(&["--raw", "-p", "ab", "--temperature", "1.5", "--seed", "7"]);
    assert_eq!(a["tokens"], b["tokens"]);
}

#[test]
fn tokenizer_json_overrides_an_unsupported_gguf_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("mystery.gguf");
    synthetic::write(
        &model,
        &Spec {
            pre: "mystery-bpe",
            ..Spec::default()
        },
    );
    let tok = dir.path().join("tokenizer.json");
    std::fs::write(&tok, synthetic::tokenizer_json()).unwrap();
    let out = edgeinfer(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--raw",
            "-p",
            "<|im_start|>hi",
            "-n",
            "4",
            "--json",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(common::ids(&json["prompt_tokens"]), vec![256, 104, 105]);
}

#[test]
fn serve_refuses_inconsistent_budgets() {
    for (args, expected) in [
        (
            vec![
                "serve",
                "--max-batch-size",
                "32",
                "--max-batch-tokens",
                "16",
            ],
            "must be at least --max-batch-size",
        ),
        (
            vec!["serve", "--body-read-timeout", "0"],
            "--sse-keep-alive and --max-connections must be positive",
        ),
        // Sizes that would overflow or round the cache past its size.
        (
            vec!["serve", "--max-queue", "18446744073709551615"],
            "--max-queue (18446744073709551615) must be at most",
        ),
        (
            vec!["serve", "--block-size", "100000"],
            "--block-size (100000) must be at most 1024",
        ),
        (
            vec!["serve", "--shutdown-timeout", "99999999999"],
            "--shutdown-timeout",
        ),
        (
            vec!["serve", "--sse-keep-alive", "18446744073709551615"],
            "--sse-keep-alive (18446744073709551615) must be at most 86400",
        ),
        // A key read from a file with its newline: no client could send it.
        (
            vec!["serve", "--master-key", "sk-master-key\n"],
            "--master-key must be printable ASCII",
        ),
        (
            vec!["serve", "--metrics-key", " metrics-key"],
            "--metrics-key must be printable ASCII",
        ),
    ] {
        let out = edgeinfer(&args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
}

#[test]
fn generating_no_tokens_is_a_usage_error() {
    let out = edgeinfer(&["generate", "-n", "0", "-p", "hi"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // clap's usage error (status 2), before any model is read.
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--max-tokens") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn a_named_model_that_is_not_the_manifests_file_is_refused() {
    // A file under the default model's name that is not it: refused naming both hashes,
    // neither served nor fetched again behind the user's back.
    let dir = tempfile::tempdir().unwrap();
    let file = common::default_model_path();
    let name = file.file_name().unwrap();
    std::fs::write(dir.path().join(name), b"not the weights").unwrap();
    let models = dir.path().to_str().unwrap();
    let out = edgeinfer(&["generate", "--models-dir", models, "-p", "hi"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is not the file the manifest names") && stderr.contains("edgeinfer pull"),
        "{stderr}"
    );
}

#[test]
fn boolean_variables_take_one_and_zero() {
    // `EDGEINFER_NO_PREFIX_CACHE=1` was refused by the flag parser ("invalid value '1'"): the
    // start goes on to the next problem, the missing model.
    for v in ["1", "0", "true", "off"] {
        let out = edgeinfer(
            &["serve", "--model", "/nonexistent/m.gguf", "--port", "0"],
            &[
                ("EDGEINFER_NO_PREFIX_CACHE", v),
                ("EDGEINFER_INSECURE_NO_AUTH", v),
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{v}: {stderr}");
        assert!(!stderr.contains("invalid value"), "{v}: {stderr}");
        assert!(stderr.contains("m.gguf"), "{v}: {stderr}");
    }
}

#[test]
fn the_download_scripts_python_fallback_waits_for_a_pull_of_its_file() {
    // Without cargo, scripts/download_model.sh fetches the default model through Python. A
    // pull of the same file under way (holding `.FILE.lock`, as `edgeinfer pull` does) is
    // waited for, and its file then found: nothing is fetched twice.
    let model = common::default_model_path();
    let name = model.file_name().unwrap().to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lock = std::fs::File::create(dir.path().join(format!(".{name}.lock"))).unwrap();
    lock.lock().unwrap();
    // The PATH without cargo (the fallback is taken only then), and the Python found on it.
    let path = std::env::var("PATH").unwrap();
    let dirs =
        std::env::join_paths(std::env::split_paths(&path).filter(|d| !d.join("cargo").exists()))
            .unwrap();
    let python = std::env::split_paths(&path)
        .map(|d| d.join("python3"))
        .find(|p| p.exists())
        .expect("python3 on the PATH");
    let mut child = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/download_model.sh"))
        .env("PATH", dirs)
        .env("EDGEINFER_PYTHON", &python)
        .env("EDGEINFER_MODELS_DIR", dir.path())
        // Were it to fetch, it would fail at once.
        .env("PIP_NO_INDEX", "1")
        .env("PIP_FIND_LINKS", "")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    if let Some(status) = child.try_wait().unwrap() {
        let out = child.wait_with_output().unwrap();
        panic!(
            "the fallback did not wait for the pull under way ({status}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The other pull ends: its file is renamed in, and its lock let go.
    let part = dir.path().join(format!("{name}.4242.part"));
    std::fs::copy(&model, &part).unwrap();
    std::fs::rename(&part, dir.path().join(name)).unwrap();
    drop(lock);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.trim_end().ends_with(name), "{printed}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "the file and its lock only: {left:?}");
}
