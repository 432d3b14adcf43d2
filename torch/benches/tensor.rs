//! Criterion benchmarks of handing batches to libtorch on the CPU, on the batches of one epoch of a
//! synthetic cube (`demo::build_cube`, 672 hours as in `cubeload bench`'s default cube: batches of 256 pixel
//! series, 2 MB of float32 values):
//!
//! - `tensor/to_tensor_cpu` and `tensor/mask_tensor_cpu`: `BatchTensors::to_tensor` and `mask_tensor`, one
//!   copy each. Every iteration copies the next batch of the epoch (about 150 MB in all, round-robin), so
//!   that the copy reads memory, as it does in training, where the loader writes each batch with
//!   non-temporal stores: one batch copied over and over would be read from the cache, twice as fast.
//!   Throughput: bytes of the tensor made.
//! - `handover/into_tensor_cpu`: `into_tensor`, which hands the batch's buffer to libtorch without a copy;
//!   its time, with no throughput (it touches none of the values).
//!
//! ```text
//! cargo bench -p cubeload-torch --bench tensor -- --quick
//! ```

use std::cell::Cell;

use criterion::{BatchSize, Criterion, Throughput};
use cubeload::demo::{DemoSpec, build_cube};
use cubeload::{Batch, Loader};
use cubeload_torch::BatchTensors as _;

/// The allocator of the binaries and the Python module (batch buffers on huge pages), so that the hot
/// paths are measured on the memory they run on there.
#[global_allocator]
static ALLOCATOR: cubeload::Allocator = cubeload::Allocator;

/// Hours of the cube: those of `cubeload bench`'s default cube.
const HOURS: usize = 24 * 28;

fn main() {
    let scratch = tempfile::tempdir().expect("temporary directory"); // removed at the end of main
    let spec = DemoSpec { hours: HOURS, ..DemoSpec::default() };
    let cube = build_cube(scratch.path(), &spec, None).expect("build the demo cube").path;
    let mut c = Criterion::default().configure_from_args();
    // As `cubeload bench` does: one torch thread on the consumer side.
    tch::set_num_threads(1);
    let batches: Vec<Batch> =
        Loader::builder(&cube).build().expect("loader").map(|b| b.expect("batch")).collect();
    let next = Cell::new(0);
    let next_batch = || {
        let i = next.get();
        next.set((i + 1) % batches.len());
        &batches[i]
    };

    let mut group = c.benchmark_group("tensor");
    group.throughput(Throughput::Bytes((batches[0].data.len() * size_of::<f32>()) as u64));
    group.bench_function("to_tensor_cpu", |b| b.iter(|| next_batch().to_tensor(tch::Device::Cpu).unwrap()));
    group.throughput(Throughput::Bytes((batches[0].mask.len() * size_of::<f32>()) as u64));
    group.bench_function("mask_tensor_cpu", |b| {
        b.iter(|| next_batch().mask_tensor(tch::Device::Cpu).unwrap());
    });
    group.finish();

    let mut group = c.benchmark_group("handover");
    group.bench_function("into_tensor_cpu", |b| {
        b.iter_batched(
            || next_batch().clone(),
            |x| x.into_tensor(tch::Device::Cpu).unwrap(),
            BatchSize::LargeInput,
        );
    });
    group.finish();
    c.final_summary();
}
