//! The `cubeload` command line (see [`cubeload::cli`]). It does not link libtorch: `demo` and `bench` run in
//! `cubeload-torch`, beside it.

/// Batches and decoded chunks are megabytes each, allocated and freed hundreds of times a second by
/// different threads: glibc's allocator returns such blocks to the kernel and takes them back with page
/// faults (a third of the loader's time in `cubeload bench`); mimalloc keeps reusing them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    cubeload::cli::exit(cubeload::cli::run(None))
}
