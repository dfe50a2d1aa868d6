//! `cargo bench`: one entry point, a module per topic. Throughput is in tokens (input rows for
//! kernels). Model benches use the default model and are skipped, with a message, when it is
//! absent (`scripts/download_model.sh` fetches it).

use criterion::{criterion_group, criterion_main};

mod forward;
mod kernels;
mod sampler;
mod scheduler;
mod structured;

criterion_group!(
    benches,
    kernels::bench,
    forward::bench,
    sampler::bench,
    scheduler::bench,
    structured::bench
);
criterion_main!(benches);

/// The binary's allocator, so the forward benches allocate as `edgeinfer` does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
