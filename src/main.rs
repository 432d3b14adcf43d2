//! The `cubeload` command line. Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::run()
}
