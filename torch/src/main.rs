//! `cubeload-torch`: the `cubeload` command line linked with libtorch, for the commands that train or deliver
//! batches into tensors (`demo`, `bench`); `cubeload` hands those over to it.

/// As in `cubeload`: batches and chunks are megabytes each, allocated and freed by different threads;
/// mimalloc keeps reusing them where glibc would return them to the kernel.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    cubeload::cli::exit(cubeload::cli::run(Some(&cubeload_torch::TORCH)))
}
