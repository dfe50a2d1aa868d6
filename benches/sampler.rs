//! Sampling over a full 49,152-token vocabulary: greedy, and temperature with top-k / top-p.

use criterion::{Criterion, Throughput};
use edgeinfer::engine::sampler::{Sampler, SamplingParams};
use rand::{Rng, SeedableRng};

pub fn bench(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let logits: Vec<f32> = (0..49_152).map(|_| rng.gen_range(-10.0..10.0)).collect();
    let history: Vec<u32> = (0..64).map(|i| i * 97).collect();
    let mut g = c.benchmark_group("sampler");
    g.throughput(Throughput::Elements(1));
    let cases = [
        ("greedy", SamplingParams::greedy()),
        (
            "top_k40_t0.8",
            SamplingParams {
                temperature: 0.8,
                top_k: 40,
                seed: Some(1),
                ..SamplingParams::default()
            },
        ),
        (
            "top_p0.9_t1",
            SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                seed: Some(1),
                ..SamplingParams::default()
            },
        ),
        (
            "penalties_greedy",
            SamplingParams {
                repetition_penalty: 1.1,
                presence_penalty: 0.5,
                ..SamplingParams::default()
            },
        ),
    ];
    for (name, params) in cases {
        let mut sampler = Sampler::new(params);
        g.bench_function(name, |b| {
            b.iter_batched(
                || logits.clone(),
                |mut l| sampler.sample(&mut l, &history),
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}
