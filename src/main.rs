//! The `cubeload` command line. Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.

mod cli;

use std::io::Write as _;

/// Batches and decoded chunks are megabytes each, allocated and freed hundreds of times a second by
/// different threads: glibc's allocator returns such blocks to the kernel and takes them back with page
/// faults (a third of the loader's time in `cubeload bench`); mimalloc keeps reusing them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let code = cli::run();
    // Everything the command wrote is closed by now. Leaving with `_exit` skips the static destructors of the
    // libraries, libtorch's above all (it unregisters thousands of operators: a tenth of a second, spent
    // after every command, on every `cubeload gen` of a small cube among them).
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process and all its threads at once; the commands have written and closed
    // their files, and standard output and error are flushed above, so nothing is lost with them.
    unsafe { libc::_exit(code) }
}
