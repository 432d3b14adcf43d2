//! `cubeload-torch`: the `cubeload` command line linked with libtorch, for the commands that train or deliver
//! batches into tensors (`demo`, `bench`); `cubeload` hands those over to it.

/// As in `cubeload`: mimalloc, with batch buffers on huge pages (see [`cubeload::Allocator`]).
#[global_allocator]
static ALLOCATOR: cubeload::Allocator = cubeload::Allocator;

fn main() {
    cubeload::cli::exit(cubeload::cli::run(Some(&cubeload_torch::TORCH)))
}
