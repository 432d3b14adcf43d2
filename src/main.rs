//! The `cubeload` command line. Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.

mod cli;

use std::process::ExitCode;

/// Batches and decoded chunks are megabytes each, allocated and freed hundreds of times a second by
/// different threads: glibc's allocator returns such blocks to the kernel and takes them back with page
/// faults (a third of the loader's time in `cubeload bench`); mimalloc keeps reusing them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    cli::run()
}
