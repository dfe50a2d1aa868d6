//! `edgeinfer backend-check`: a backend against the CPU, and its speed (see
//! [`edgeinfer::model::check`]). One JSON object per check on stdout.

use anyhow::Result;
use serde_json::json;

use edgeinfer::backend::{Backend, Cpu};
use edgeinfer::config::{BackendCheckArgs, DeviceChoice};
use edgeinfer::model::check;
use edgeinfer::model::{GgufFile, Llama};

pub fn run(args: BackendCheckArgs) -> Result<()> {
    let path = crate::resolve_model(args.source.model.as_deref(), &args.source.models_dir)?;
    let load = |path: &std::path::Path| -> Result<Llama> {
        let mut f = GgufFile::open(path)?;
        Ok(Llama::load(&mut f, &candle_core::Device::Cpu)?)
    };
    match args.source.device {
        DeviceChoice::Cpu => check_on(load(&path)?, &args, &path),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(n) => {
            use anyhow::Context;
            let backend = edgeinfer::backend::cuda::Cuda::new(n)
                .with_context(|| format!("cannot open CUDA device {n}"))?;
            let mut f = GgufFile::open(&path)?;
            let model = Llama::load_on(&mut f, &candle_core::Device::Cpu, backend)
                .with_context(|| format!("cannot load {} onto cuda:{n}", path.display()))?;
            check_on(model, &args, &path)
        }
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => Err(crate::no_cuda()),
    }
}

fn check_on<B: Backend>(
    model: Llama<B>,
    args: &BackendCheckArgs,
    path: &std::path::Path,
) -> Result<()> {
    let name = model.backend().name();
    let c = &model.config;
    let vocab = c.vocab_size as u32;
    eprintln!(
        "{}: {} layers, dim {}, {}/{} heads, vocab {} on {name}",
        path.display(),
        c.n_layer,
        c.dim,
        c.n_head,
        c.n_kv_head,
        c.vocab_size
    );
    let prompt = |len: usize, seed: u32| -> Vec<u32> {
        (0..len as u32)
            .map(|i| (seed * 7919 + i * 31 + 1) % vocab)
            .collect()
    };
    if args.compare {
        let mut f = GgufFile::open(path)?;
        let reference: Llama<Cpu> = Llama::load(&mut f, &candle_core::Device::Cpu)?;
        let a = check::compare(&reference, &model, &prompt(24, 1), 16)?;
        println!(
            "{}",
            json!({"check": "logits_vs_cpu", "device": name, "result": a})
        );
        let h = check::compare_hidden(&reference, &model, &prompt(40, 6))?;
        println!(
            "{}",
            json!({"check": "hidden_vs_cpu", "device": name, "result": h})
        );
    }
    if args.invariance {
        let prompts = [prompt(5, 2), prompt(37, 3), prompt(1, 4), prompt(70, 5)];
        let worst = check::batch_invariance(&model, &prompts)?;
        println!(
            "{}",
            json!({"check": "batch_invariance", "device": name, "max_abs_diff": worst})
        );
    }
    for &streams in &args.streams {
        let s = check::decode_speed(&model, streams, args.context, args.steps)?;
        println!(
            "{}",
            json!({"check": "decode", "device": name, "result": s})
        );
    }
    if let Some(tokens) = args.prefill {
        let tps = check::prefill_speed(&model, tokens)?;
        println!(
            "{}",
            json!({"check": "prefill", "device": name, "tokens": tokens, "tokens_per_second": tps})
        );
    }
    Ok(())
}
