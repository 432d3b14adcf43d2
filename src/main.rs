//! The `cubeload` command line (see [`cubeload::cli`]). It does not link libtorch: `demo` and `bench` run in
//! `cubeload-torch`, beside it.

/// mimalloc, with batch buffers on huge pages (see [`cubeload::Allocator`]).
#[global_allocator]
static ALLOCATOR: cubeload::Allocator = cubeload::Allocator;

fn main() {
    cubeload::cli::exit(cubeload::cli::run(None))
}
