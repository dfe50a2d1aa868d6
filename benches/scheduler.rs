//! The scheduler's cost per step with 64 running sequences and a queue behind them.

use criterion::{Criterion, Throughput};
use edgeinfer::engine::blocks::BlockManager;
use edgeinfer::engine::scheduler::{Scheduler, SchedulerConfig};

pub fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler");
    g.throughput(Throughput::Elements(1));
    g.bench_function("step_64_running", |b| {
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_batch_size: 64,
                max_batch_tokens: 512,
                max_scored_rows: 512,
                max_draft_rows: 0,
                max_background_rows: 0,
            },
            BlockManager::new(100_000, 16, true),
        );
        for id in 0..96 {
            let prompt: Vec<u32> = (0..40 + (id as u32 % 300)).map(|t| t + id as u32).collect();
            s.add(id, &prompt, true);
        }
        b.iter(|| {
            let step = s.schedule();
            let sampled: Vec<(u64, u32)> = step
                .chunks
                .iter()
                .filter(|c| c.logits)
                .map(|c| (c.id, 7))
                .collect();
            s.complete(&step, &sampled);
            step.chunks.len()
        })
    });
    g.finish();
}
