//! Integration tests: one binary, topic modules (as ripgrep does).

// Index arithmetic over rasters reads best with short names and explicit loops.
#![allow(
    clippy::many_single_char_names,
    clippy::needless_range_loop,
    clippy::manual_midpoint,
    clippy::single_range_in_vec_init,
    clippy::doc_markdown,
    clippy::semicolon_if_nothing_returned
)]

mod util;

mod bench;
mod cli_errors;
mod demo;
mod fuzz_cases;
mod gen_real_data;
mod image_archive;
mod lifecycle;
mod loader;
mod multires;
mod object_store;
mod precision;
