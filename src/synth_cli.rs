//! `edgeinfer synth`: random-weight models of real shapes, a vocabulary-only donor, or a
//! random LoRA adapter for a model.

use anyhow::{Context, Result};

pub fn run(args: edgeinfer::config::SynthArgs) -> Result<()> {
    use edgeinfer::model::synth::{self, Quant, SynthSpec, SHAPES};
    if let Some(base) = &args.lora_for {
        let spec = synth::LoraSpec {
            rank: args.rank.max(1),
            alpha: 2.0 * args.rank.max(1) as f32,
            seed: args.seed,
            strength: args.strength,
            ..Default::default()
        };
        let pairs = synth::write_lora(&args.out, base, &spec)?;
        eprintln!(
            "wrote {} ({pairs} LoRA pairs of rank {})",
            args.out.display(),
            spec.rank
        );
        return Ok(());
    }
    let donor = match &args.donor {
        Some(p) => p.clone(),
        None => super::resolve_model(None, &args.models_dir)?,
    };
    if args.vocab_only {
        let bytes = synth::write_vocab_only(&args.out, &donor)?;
        eprintln!("wrote {} ({bytes} bytes, no tensors)", args.out.display());
        return Ok(());
    }
    let names = || SHAPES.map(|s| s.name).join(", ");
    let name = args.shape.as_deref().unwrap_or_default();
    let shape = synth::shape(name)
        .with_context(|| format!("unknown --shape {name}: known are {}", names()))?;
    let quant = Quant::parse(&args.quant).with_context(|| {
        format!(
            "unknown --quant {}: known are q4_k_m, q4_0, q8_0, f16",
            args.quant
        )
    })?;
    let started = std::time::Instant::now();
    let spec = SynthSpec {
        shape,
        layers: args.layers,
        quant,
        seed: args.seed,
        context: args.context,
    };
    let report = synth::write(&args.out, &spec, &donor)?;
    eprintln!(
        "wrote {} ({} tensors, {:.1} MiB, vocabulary {} from {}) in {:.1} s",
        args.out.display(),
        report.tensors,
        report.bytes as f64 / (1 << 20) as f64,
        report.vocab,
        donor.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
