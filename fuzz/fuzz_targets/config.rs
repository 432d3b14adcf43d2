//! The config parser, and the pure planning that follows it (a regular time axis, the grid, then layout and
//! size checks for a 744-step axis), on arbitrary text: every input must give `Ok` or a clean `Err`, never a panic or an
//! absurd allocation. `tests/fuzz_cases.rs` replays the found cases the same way.
#![no_main]

use std::path::Path;

use cubeload::config::{Config, TimeConfig};
use cubeload::grid::Grid;
use cubeload::plan::{DType, resolve_layout};
use cubeload::time::{Step, TimeAxis, parse_timestamp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::from_yaml(text, Path::new("fuzz.yaml")) else { return };
    if let Some(TimeConfig { start: Some(start), end: Some(end), step: Some(step), .. }) = &config.time
        && let (Ok(start), Ok(end), Ok(step)) =
            (parse_timestamp(start), parse_timestamp(end), Step::parse(step))
    {
        let _ = TimeAxis::regular(start, end, step);
    }
    let Ok(grid) = Grid::from_config(config.grid()) else { return };
    let variables: Vec<(DType, bool)> =
        config.variables.0.iter().map(|(_, v)| (DType::Float32, v.is_static)).collect();
    let _ = resolve_layout(&config, &grid, 744, &variables, 1);
});
