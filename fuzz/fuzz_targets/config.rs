//! The config parser, and the pure planning that follows it (grid, then layout and size checks for a
//! 744-step axis), on arbitrary text: every input must give `Ok` or a clean `Err`, never a panic or an
//! absurd allocation. `tests/fuzz_cases.rs` replays the found cases the same way.
#![no_main]

use std::path::Path;

use cubeload::config::Config;
use cubeload::grid::Grid;
use cubeload::plan::{DType, resolve_layout};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::from_yaml(text, Path::new("fuzz.yaml")) else { return };
    let Ok(grid) = Grid::from_config(config.grid()) else { return };
    let variables: Vec<(DType, bool)> =
        config.variables.0.iter().map(|(_, v)| (DType::Float32, v.is_static)).collect();
    let _ = resolve_layout(&config, &grid, 744, &variables);
});
