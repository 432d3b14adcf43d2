//! # cubeload
//!
//! Earth-observation rasters (`GeoTIFF`, `NetCDF`, GRIB: anything GDAL reads, in any CRS and resolution) made
//! ready for machine learning: `cubeload gen` writes one Zarr v3 cube whose **chunk is a training batch**
//! (B full pixel time series for LSTMs, or B image sequences for video prediction), aligned across all
//! variables, so that a training loop reads each batch with one read per variable.
//!
//! ## Getting started
//! ```no_run
//! use cubeload::{Config, GenOptions, Plan, generate};
//! // The config `cubeload demo` writes beside its synthetic inputs.
//! let text = std::fs::read_to_string("cubeload-demo/demo.yaml")?;
//! let config = Config::from_yaml(&text, "cubeload-demo/demo.yaml".as_ref())?;
//! let plan = Plan::new(config, text)?;
//! let report = generate(&plan, &GenOptions::default(), &|_, _| {})?;
//! println!("{} written in {:.1} s", report.path.display(), report.seconds);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Stages (one module each)
//! - [`config`]: the YAML file as users write it, strictly parsed.
//! - [`grid`], [`time`], [`layout`], [`levels`]: target grid, time axis, chunk = batch arithmetic, nested
//!   resolution levels of multi-resolution cubes (pure).
//! - [`source`]: what the input files hold, read through GDAL and its warper.
//! - [`plan`]: the config resolved against the sources, before anything is written.
//! - [`generator`]: parallel generation into a staging directory, renamed into place when complete.
//! - [`cube`]: the on-disk contract, writer, reader and the manifest of finished blocks.
//! - [`verify`]: every stored file against its checksum, every chunk decoded.
//! - [`demo`]: synthetic inputs for the demo and for tests that must run anywhere.
//! - [`bench`](mod@bench): the loader against the machine's limit and image-chunked storage, in one run.
//! - [`plot`]: PNGs of the benchmark and quicklooks of cubes.
//! - [`loader`]: shuffled, prefetched batches from a cube; [`batch`]: what it delivers (as tch tensors with
//!   the `cubeload-torch` crate, `torch/` in this repository).
//! - `cli`: the command line of the `cubeload` and `cubeload-torch` binaries.
//!
//! This crate does not link libtorch; `cubeload-torch` adds tensors, reference models and the commands that
//! train (`demo`) or deliver into tensors (`bench`).
//!
//! ## Crate features
//! - `cli` (default): the command line and the `cubeload` binary.

pub mod allocator;
pub mod batch;
pub mod bench;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod cube;
pub mod demo;
pub mod error;
pub mod generator;
pub mod grid;
pub mod layout;
pub mod levels;
pub mod loader;
pub mod plan;
pub mod plot;
pub mod source;
pub mod store;
pub mod time;
pub mod verify;

pub use allocator::Allocator;
pub use batch::Batch;
pub use config::Config;
pub use cube::reader::Cube;
pub use error::{Error, Result};
pub use generator::{GenOptions, GenReport, generate};
pub use loader::{Loader, LoaderError, LoaderState, OnCorrupt, Regrid};
pub use plan::Plan;

/// The unit tests run on the binaries' allocator, so that batch buffers are mapped as they are there.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: Allocator = Allocator;
