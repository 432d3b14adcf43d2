//! Criterion benchmarks of handing batches to libtorch, on one batch of a small synthetic cube
//! (`demo::build_cube`, 48 hours, batches of 256 pixel series): `BatchTensors::to_tensor` (one copy),
//! `into_tensor` (no copy: the time of handing the buffer over) and `mask_tensor`, on the CPU. Throughput:
//! bytes of the float32 tensor produced.
//!
//! ```text
//! cargo bench -p cubeload-torch --bench tensor -- --quick
//! ```

use criterion::{BatchSize, Criterion, Throughput};
use cubeload::Loader;
use cubeload::demo::{DemoSpec, build_cube};
use cubeload_torch::BatchTensors as _;

/// The allocator of the binaries and the Python module (batch buffers on huge pages), so that the hot
/// paths are measured on the memory they run on there.
#[global_allocator]
static ALLOCATOR: cubeload::Allocator = cubeload::Allocator;

fn main() {
    let scratch = tempfile::tempdir().expect("temporary directory"); // removed at the end of main
    let spec = DemoSpec { hours: 48, ..DemoSpec::default() };
    let cube = build_cube(scratch.path(), &spec, None).expect("build the demo cube").path;
    let mut c = Criterion::default().configure_from_args();
    // As `cubeload bench` does: one torch thread on the consumer side.
    tch::set_num_threads(1);
    let batch = Loader::builder(&cube).build().expect("loader").next().expect("a batch").expect("batch");
    let mut group = c.benchmark_group("tensor");
    group.throughput(Throughput::Bytes((batch.data.len() * size_of::<f32>()) as u64));
    group.bench_function("to_tensor_cpu", |b| b.iter(|| batch.to_tensor(tch::Device::Cpu).unwrap()));
    group.bench_function("into_tensor_cpu", |b| {
        b.iter_batched(|| batch.clone(), |x| x.into_tensor(tch::Device::Cpu).unwrap(), BatchSize::LargeInput);
    });
    group.bench_function("mask_tensor_cpu", |b| b.iter(|| batch.mask_tensor(tch::Device::Cpu).unwrap()));
    group.finish();
    c.final_summary();
}
