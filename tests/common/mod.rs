//! Shared helpers for integration tests: the real default model and the llama.cpp reference.
#![allow(dead_code)]

pub mod oracle;
pub mod server;
pub mod synthetic;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use edgeinfer::model::LoadedModel;

/// A 2,000-word prompt ending in `ask`: its prefill alone keeps a request busy for a second
/// or more on any host, so tests that need a request still running don't race its end.
pub fn long_prompt(ask: &str) -> String {
    format!(
        "{}{ask}",
        "The quick brown fox jumps over the lazy dog. ".repeat(200)
    )
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The default model: `EDGEINFER_TEST_MODEL`, else `models/SmolLM2-135M-Instruct.Q4_1.gguf`,
/// pulled (and verified) on first use like `edgeinfer pull` does.
pub fn default_model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("EDGEINFER_TEST_MODEL") {
            return PathBuf::from(path);
        }
        let manifest = edgeinfer::hub::Manifest::builtin();
        edgeinfer::hub::pull(manifest.default_entry(), &repo_root().join("models"))
            .unwrap_or_else(|e| panic!("cannot fetch the default model for the tests: {e}"))
    })
    .clone()
}

/// The default model, loaded once per test binary.
pub fn default_model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        LoadedModel::load(&default_model_path(), None, &candle_core::Device::Cpu)
            .expect("the default model loads")
    })
}

/// `../shared/reference/smollm2-llamacpp.json`: what llama.cpp produced on the default model.
pub fn llamacpp_reference() -> serde_json::Value {
    let path = repo_root().join("../shared/reference/smollm2-llamacpp.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read the reference {}: {e}", path.display()));
    serde_json::from_str(&text).expect("the reference is JSON")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of token ids")
        .iter()
        .map(|x| x.as_u64().expect("a token id") as u32)
        .collect()
}

/// The Python of `.venv`, with the official `openai`, `anthropic` and `cloudflare` packages,
/// `jsonschema` and `playwright` (the virtual environment is created, and they are
/// installed, if missing; Playwright drives Debian's Chromium and never downloads a browser).
pub fn python_with_clients() -> PathBuf {
    let root = repo_root();
    let python = root.join(".venv/bin/python");
    let ok = |p: &PathBuf| {
        Command::new(p)
            .args([
                "-c",
                // (An `openai` too old for files' `expires_after` is upgraded.)
                "import openai, anthropic, cloudflare, jsonschema, playwright, inspect; \
                 from openai.resources.files import Files; \
                 assert 'expires_after' in inspect.signature(Files.create).parameters",
            ])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok(&python) {
        if !root.join(".venv/bin/pip").exists() {
            let venv = Command::new("python3")
                .args(["-m", "venv"])
                .arg(root.join(".venv"))
                .status();
            assert!(venv.is_ok_and(|s| s.success()), "cannot create .venv");
        }
        let pip = Command::new(root.join(".venv/bin/pip"))
            .args([
                "install",
                "--quiet",
                "--upgrade",
                "openai",
                "anthropic",
                "cloudflare",
                "jsonschema",
                // Pinned: it must speak the protocol of Debian's Chromium.
                "playwright==1.65.2",
            ])
            .status();
        assert!(
            pip.is_ok_and(|s| s.success()),
            "cannot install openai, anthropic, cloudflare, jsonschema and playwright into .venv"
        );
    }
    python
}

/// The Python of `.venv` with lm-evaluation-harness (0.4.13, installed without its
/// dependencies on PyTorch, transformers and the datasets, which its API models do not
/// need) and the few packages its `local-completions` model imports.
pub fn python_with_lm_eval() -> PathBuf {
    let python = python_with_clients();
    let ok = Command::new(&python)
        .args(["-c", "import lm_eval.models.openai_completions"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let pip = repo_root().join(".venv/bin/pip");
        let installed = [
            &["install", "--quiet", "--no-deps", "lm-eval==0.4.13"][..],
            &[
                "install",
                "--quiet",
                "numpy",
                "pyyaml",
                "jinja2",
                "requests",
                "tqdm",
                "typing_extensions",
                "aiohttp",
                "tenacity",
            ][..],
        ]
        .iter()
        .all(|args| {
            Command::new(&pip)
                .args(*args)
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(installed, "cannot install lm-eval into .venv");
    }
    python
}

/// Debian's Chromium for the browser tests: `EDGEINFER_CHROMIUM`, else `/usr/bin/chromium`,
/// installed with apt-get when missing and this runs as root (as CI does).
pub fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("EDGEINFER_CHROMIUM") {
        return PathBuf::from(p);
    }
    let path = PathBuf::from("/usr/bin/chromium");
    if !path.exists() {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        if root {
            let _ = Command::new("apt-get")
                .args(["install", "-y", "-q", "chromium"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
        }
    }
    assert!(
        path.exists(),
        "the browser tests need Debian's Chromium: apt-get install chromium (or set EDGEINFER_CHROMIUM)"
    );
    path
}
