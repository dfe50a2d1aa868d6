//! The forward pass on the default model: prefill of 128 and 512 tokens, and one decode step
//! for 1, 4, 16 and 64 sequences at context 0 and 512, and a 16-token chunk after 1,024
//! cached positions (a follow-up turn), through the shared KV pool.

use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, Throughput};
use edgeinfer::model::{GgufFile, KvPool, Llama, Logits, SeqInput};

const BLOCK: usize = 16;

fn model() -> Option<Llama> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        eprintln!(
            "skipping forward benches: {} is missing (run scripts/download_model.sh)",
            path.display()
        );
        return None;
    }
    let mut f = GgufFile::open(&path).ok()?;
    Llama::load(&mut f, &candle_core::Device::Cpu).ok()
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 100 + (i * 7919 + seed * 104_729) % 40_000)
        .collect()
}

pub fn bench(c: &mut Criterion) {
    let Some(model) = model() else { return };
    let mut g = c.benchmark_group("forward");
    g.sample_size(10);
    for n in [128usize, 512] {
        let mut pool = model.new_pool(BLOCK, n.div_ceil(BLOCK));
        let blocks: Vec<u32> = (0..n.div_ceil(BLOCK) as u32).collect();
        let prompt = tokens(n, 1);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("prefill", n), |b| {
            b.iter(|| {
                let seq = SeqInput {
                    tokens: &prompt,
                    start: 0,
                    blocks: &blocks,
                    logits: Logits::Last,
                    adapter: None,
                };
                model.forward_batch(&[seq], &mut pool).unwrap()
            })
        });
    }
    // A follow-up turn: 16 new tokens after 1,024 cached positions (prefix caching).
    {
        let (ctx, n) = (1024usize, 16usize);
        let blocks: Vec<u32> = (0..(ctx + n).div_ceil(BLOCK) as u32).collect();
        let mut pool = model.new_pool(BLOCK, blocks.len());
        let history = tokens(ctx, 3);
        let seq = SeqInput {
            tokens: &history,
            start: 0,
            blocks: &blocks,
            logits: Logits::Skip,
            adapter: None,
        };
        model.forward_batch(&[seq], &mut pool).unwrap();
        let turn = tokens(n, 4);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new(format!("chunk/ctx{ctx}"), n), |b| {
            b.iter(|| {
                let seq = SeqInput {
                    tokens: &turn,
                    start: ctx,
                    blocks: &blocks,
                    logits: Logits::Last,
                    adapter: None,
                };
                model.forward_batch(&[seq], &mut pool).unwrap()
            })
        });
    }
    for ctx in [0usize, 512] {
        for batch in [1usize, 4, 16, 64] {
            let per_seq = (ctx + 1).div_ceil(BLOCK);
            let mut pool: KvPool = model.new_pool(BLOCK, per_seq * batch);
            let tables: Vec<Vec<u32>> = (0..batch)
                .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
                .collect();
            if ctx > 0 {
                for (s, t) in tables.iter().enumerate() {
                    let prompt = tokens(ctx, s as u32);
                    let seq = SeqInput {
                        tokens: &prompt,
                        start: 0,
                        blocks: t,
                        logits: Logits::Skip,
                        adapter: None,
                    };
                    model.forward_batch(&[seq], &mut pool).unwrap();
                }
            }
            let next: Vec<[u32; 1]> = (0..batch).map(|s| [500 + s as u32]).collect();
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_function(BenchmarkId::new(format!("decode/ctx{ctx}"), batch), |b| {
                b.iter(|| {
                    let seqs: Vec<SeqInput> = tables
                        .iter()
                        .zip(&next)
                        .map(|(t, tok)| SeqInput {
                            tokens: tok,
                            start: ctx,
                            blocks: t,
                            logits: Logits::Last,
                            adapter: None,
                        })
                        .collect();
                    model.forward_batch(&seqs, &mut pool).unwrap()
                })
            });
        }
    }
    g.finish();
}
