#!/usr/bin/env bash
# Runs every test of cubeload: formatting, clippy, the API documentation, the Rust unit and integration tests
# (which read the real rasters in ../shared/data and compare with the gdalwarp program), the Python suite that
# opens cubes with real xarray, and the Python binding's suite with real numpy and torch. Installs what is
# missing first (scripts/setup.sh), so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# The API documentation builds without a warning (broken or private links), private items included.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --document-private-items
# Optimised: the integration tests generate dozens of cubes (an unoptimised build is ~5x slower there), and the
# release build is the one `cargo build --release` already made. Both crates of the workspace: cubeload and
# cubeload-torch (torch/), whose binary runs `demo` and `bench` for the tests that call them through `cubeload`.
cargo test --release
# Every criterion benchmark once (criterion's test mode), so that a bench that panics or stops building fails
# here rather than when someone measures.
cargo test --release --benches
.venv/bin/python -m pip install -q ./python
CUBELOAD_BIN="$PWD/target/release/cubeload" .venv/bin/python -m pytest tests/python python/tests -q
