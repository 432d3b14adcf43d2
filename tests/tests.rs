//! Integration tests: one binary, topic modules (as ripgrep does).

mod util;

mod cli_errors;
mod demo;
mod gen_real_data;
mod loader;
