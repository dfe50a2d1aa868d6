//! Quantized matmul: our kernels against candle's `QMatMul`, per weight type, on the shapes of
//! real models (SmolLM2's 576x1536, 1536x576 and 49152x576 lm head; a Llama 8B 4096x14336),
//! for 1, 4, 16 and 128 input rows; the K-quants on Llama 8B's shapes (4096x4096,
//! 14336x4096, 4096x14336) for 1, 4 and 16.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput};
use edgeinfer::kernels::qmatmul::Linear;
use rand::{Rng, SeedableRng};

fn random(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

pub fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("qmatmul");
    g.sample_size(10);
    let shapes = [(1536, 576), (576, 1536), (49152, 576), (14336, 4096)];
    let k_shapes = [(4096, 4096), (14336, 4096), (4096, 14336)];
    let cases = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0]
        .into_iter()
        .flat_map(|d| shapes.iter().map(move |&s| (d, s)))
        .filter(|&(d, (rows, cols))| rows * cols < 20_000_000 || d == GgmlDType::Q4_0)
        .chain(
            [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K]
                .into_iter()
                .flat_map(|d| k_shapes.iter().map(move |&s| (d, s))),
        );
    for (dtype, (rows, cols)) in cases {
        let k_quant = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K);
        let w = Tensor::from_vec(random(rows, cols, 1), (rows, cols), &Device::Cpu).unwrap();
        let qt = QTensor::quantize(&w, dtype).unwrap();
        let ours = Linear::from_qtensor_native(&qt).unwrap();
        let candle = QMatMul::from_qtensor(qt).unwrap();
        for n in [1usize, 4, 16, 128] {
            if (rows * cols > 20_000_000 || k_quant) && n > 16 {
                continue;
            }
            let x = random(n, cols, 2);
            let xt = Tensor::from_vec(x.clone(), (n, cols), &Device::Cpu).unwrap();
            let id = format!("{dtype:?}/{rows}x{cols}/n{n}");
            g.throughput(Throughput::Elements(n as u64));
            g.bench_with_input(BenchmarkId::new("edgeinfer", &id), &n, |b, &n| {
                b.iter(|| ours.matmul(&x, n).unwrap())
            });
            g.bench_with_input(BenchmarkId::new("candle", &id), &n, |b, _| {
                b.iter(|| candle.forward(&xt).unwrap())
            });
        }
    }
    g.finish();
}
