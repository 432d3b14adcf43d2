//! Criterion benchmarks of the loader's hot paths, on synthetic cubes built once in a temporary directory
//! (`demo::build_cube`, 672 hours as in `cubeload bench`'s default cube, at the demo's 0.01°: chunks of
//! 688 KB decoded, several zstd blocks each, and pixel-series batches of 2 MB):
//!
//! - `decode/t2m_chunk`: one batch chunk of one variable read and decoded as the loader does
//!   (`Assembler::decode_stored`: float32 chunks decoded from their stored bytes), and
//!   `decode/t2m_chunk_zarrs` the same chunk through zarrs' codec pipeline;
//! - `decode/epoch_all_variables`: every chunk the loader reads in an epoch, read and decoded by the loader's
//!   code, nothing assembled, by an `Assembler` made afresh for each epoch as a loader makes its own (the
//!   single-threaded ceiling of `batch_assembly`: the difference in time per epoch is the assembly);
//! - `batch_assembly/*`: one epoch through `Loader` with `threads(0)` (reading and assembly on the calling
//!   thread), each batch given back (`Batch::recycle`) once delivered: plain, with `normalize(true)` (the
//!   batch's mask and normalization: the loader always builds the mask, and normalizes in the same pass),
//!   with `variable_major(true)`, with `mix(4)` and `normalize(true)` (as `examples/train_lstm.py` reads),
//!   `shuffled` plain on the same cube stored sample-major (`order: shuffled`), and `image_sequence` plain
//!   on the same inputs in the demo's video layout (4 sequences of 8 frames of 16 × 16 pixels);
//! - `regrid/*`: a 64 × 64 batch footprint of 48 steps upsampled from a level 8 × 8 times coarser (the
//!   kernels of multi-resolution cubes), nearest and bilinear, and bilinear with 2 % of the level's values
//!   missing (its slow path, which renormalizes the weights of each cell).
//!
//! Throughputs are bytes of decoded chunk data for `decode` (as float32, which the loader decodes into:
//! the byte land cover counts four bytes a value), bytes of the delivered float32 batch data (`Batch::data`,
//! as `cubeload bench` counts) for `batch_assembly`, and bytes of the upsampled float32 footprint for
//! `regrid`. `cargo test --benches` (run by `scripts/test.sh`) runs each benchmark once.
//!
//! ```text
//! cargo bench --bench loader -- --quick
//! ```

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{BatchSize, Criterion, Throughput};
use cubeload::Cube;
use cubeload::demo::{DemoSpec, IMAGE_LAYOUT, build_cube};
use cubeload::loader::assemble::{Assembler, Transform};
use cubeload::loader::{Loader, LoaderBuilder};

/// The allocator of the binaries and the Python module (batch buffers on huge pages), so that the hot
/// paths are measured on the memory they run on there.
#[global_allocator]
static ALLOCATOR: cubeload::Allocator = cubeload::Allocator;

/// Hours of the cubes: those of `cubeload bench`'s default cube.
const HOURS: usize = 24 * 28;

/// The demo's pixel series stored sample-major, samples permuted once (`order: shuffled`).
const SHUFFLED_LAYOUT: &str = "{ kind: pixel_series, batch: 256, order: shuffled }";

/// A loader option under test.
type Configure = fn(LoaderBuilder) -> LoaderBuilder;

/// The builder every loader benchmark starts from: natural order, reading on the calling thread.
fn builder(cube: &Path) -> LoaderBuilder {
    Loader::builder(cube).threads(0)
}

fn decode(c: &mut Criterion, path: &Path) {
    let cube = Cube::open(path).expect("open the cube");
    let meta = cube.meta();
    let layout = meta.layout;
    let mut group = c.benchmark_group("decode");

    // The loader's reading code, for every variable of the cube.
    let transform = Transform::default();
    let assembler = Assembler::new(&cube, &[], transform).expect("assembler");

    // One chunk of t2m: exactly one batch's (T, h, w) block.
    let t2m_index = meta.variables.iter().position(|v| v.name == "t2m").expect("t2m in the demo cube");
    let t2m = &meta.variables[t2m_index];
    let array = cube.array("t2m").expect("open t2m");
    let subset = layout.chunk_subset(t2m.is_static, [0, 0, 0]);
    let cells = array.retrieve_array_subset::<Vec<f32>>(&subset).expect("decode a t2m chunk").len();
    assert_eq!(cells, layout.chunk_t * layout.chunk_y * layout.chunk_x, "one whole chunk");
    let bytes = assembler.decode_stored(t2m_index, [0, 0, 0]).expect("decode");
    assert_eq!(bytes, cells * size_of::<f32>(), "the same chunk");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("t2m_chunk", |b| {
        b.iter(|| assembler.decode_stored(t2m_index, black_box([0, 0, 0])).expect("decode"));
    });
    group.bench_function("t2m_chunk_zarrs", |b| {
        b.iter(|| array.retrieve_array_subset::<Vec<f32>>(black_box(&subset)).expect("decode"));
    });

    // The chunks of one loader epoch, every variable (statics once per chunk, as the loader reads them).
    let chunks: Vec<_> =
        builder(path).build().expect("loader").map(|batch| batch.expect("batch").origin.chunk).collect();
    let read_all = |assembler: &Assembler| -> u64 {
        let mut bytes = 0;
        for var in 0..meta.variables.len() {
            for &id in &chunks {
                bytes += assembler.decode_stored(var, black_box(id)).expect("decode") as u64;
            }
        }
        bytes
    };
    group.throughput(Throughput::Bytes(read_all(&assembler)));
    group.sample_size(20);
    // A fresh assembler per epoch (made untimed), as each `batch_assembly` epoch's loader makes its own:
    // the shard indexes it reads and the files it opens are timed in both.
    group.bench_function("epoch_all_variables", |b| {
        b.iter_batched(
            || Assembler::new(&cube, &[], transform).expect("assembler"),
            |assembler| read_all(&assembler),
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

fn batch_assembly(c: &mut Criterion, path: &Path, shuffled: &Path, image: &Path) {
    let bytes = |path: &Path| -> u64 {
        let loader = builder(path).build().expect("loader");
        loader.map(|b| (b.expect("batch").data.len() * size_of::<f32>()) as u64).sum()
    };
    let variants: [(&str, &Path, Configure); 6] = [
        ("default", path, |b| b),
        ("normalize", path, |b| b.normalize(true)),
        ("variable_major", path, |b| b.variable_major(true)),
        ("mix4_normalize", path, |b| b.mix(4).normalize(true)),
        ("shuffled", shuffled, |b| b),
        ("image_sequence", image, |b| b),
    ];
    let mut group = c.benchmark_group("batch_assembly");
    group.sample_size(20);
    for (name, path, configure) in variants {
        group.throughput(Throughput::Bytes(bytes(path)));
        // A fresh loader per iteration (opening the cube and its index is not timed); one epoch timed.
        group.bench_function(name, |b| {
            b.iter_batched(
                || configure(builder(path)).build().expect("loader"),
                |mut loader| {
                    // Each batch given back once read, as a training loop's tensors give theirs back.
                    for batch in &mut loader {
                        black_box(batch.expect("batch")).recycle();
                    }
                    loader // dropped untimed
                },
                BatchSize::PerIteration,
            );
        });
    }
    group.finish();
}

fn regrid(c: &mut Criterion) {
    use cubeload::config::{LayoutConfig, Upsampling};
    use cubeload::grid::Grid;
    use cubeload::layout::Layout;
    use cubeload::levels::Level;
    use cubeload::loader::regrid::{Window, level_span, upsample};
    let (steps, k, side) = (48, 8, 64);
    let grid = Grid { west: 0.0, north: 10.0, res_x: 0.01, res_y: 0.01, width: 512, height: 512 };
    let config = LayoutConfig::unsharded_multires(side * side);
    let target = Layout::resolve(&config, steps, grid.height, grid.width, 4);
    let level = Level::new([k, k], 1, &grid, &target, &config, steps, 4);
    let (rows, cols) = (side..2 * side, side..2 * side);
    let mut group = c.benchmark_group("regrid");
    group.throughput(Throughput::Bytes((steps * side * side * size_of::<f32>()) as u64));
    let kernels = [
        ("nearest", Upsampling::Nearest, false),
        ("bilinear", Upsampling::Bilinear, false),
        ("bilinear_missing", Upsampling::Bilinear, true),
    ];
    for (name, upsampling, missing) in kernels {
        let (lr, lc) = (level_span(upsampling, &rows, k, 64), level_span(upsampling, &cols, k, 64));
        let cells = steps * lr.len() * lc.len();
        let value = |i: usize| if missing && i % 50 == 7 { f32::NAN } else { (i % 97) as f32 * 0.5 };
        let window = Window { rows: lr, cols: lc, steps, values: (0..cells).map(value).collect() };
        group.bench_function(name, |b| {
            b.iter(|| {
                upsample(black_box(&window), &level, upsampling, rows.clone(), cols.clone(), (512, 512))
            });
        });
    }
    group.finish();
}

fn main() {
    let scratch = tempfile::tempdir().expect("temporary directory"); // removed at the end of main
    let spec = DemoSpec { hours: HOURS, ..DemoSpec::default() };
    let cube: PathBuf = build_cube(scratch.path(), &spec, None).expect("build the demo cube").path;
    let variant = |name: &str, layout| -> PathBuf {
        let spec = DemoSpec { layout, ..spec };
        build_cube(&scratch.path().join(name), &spec, None).expect("build a cube").path
    };
    let shuffled = variant("shuffled", SHUFFLED_LAYOUT);
    let image = variant("image", IMAGE_LAYOUT);
    let mut c = Criterion::default().configure_from_args();
    decode(&mut c, &cube);
    batch_assembly(&mut c, &cube, &shuffled, &image);
    regrid(&mut c);
    c.final_summary();
}
