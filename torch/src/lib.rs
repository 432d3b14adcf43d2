//! # cubeload-torch
//!
//! cubeload's batches in libtorch, through `tch`: kept out of the `cubeload` crate so that generating,
//! inspecting and loading cubes (and the Python binding) never link libtorch, whose start-up alone costs a
//! few tenths of a second per process.
//!
//! - [`BatchTensors`]: a batch as tensors (`into_tensor` hands the batch's buffer to libtorch, no copy).
//! - [`train`]: small reference models and a training loop, for the demo and the examples.
//! - [`TORCH`]: what the `cubeload-torch` binary adds to cubeload's command line (`demo`'s training and
//!   `bench`'s delivery into tensors); the `cubeload` binary hands those two commands over to it.
//!
//! ```no_run
//! use cubeload::Loader;
//! use cubeload_torch::BatchTensors as _;
//! for batch in Loader::builder("cubes/uk.zarr").shuffle(42).build()? {
//!     let batch = batch?;
//!     let mask = batch.mask_tensor(tch::Device::Cpu)?;
//!     let x = batch.into_tensor(tch::Device::Cpu)?; // [B, T, V], the batch's own buffer
//! #   let _ = (x, mask);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod tensor;
pub mod train;

use std::path::Path;

use cubeload::Batch;
use cubeload::cli::Torch;

pub use tensor::{BatchTensors, NativeTensors};

/// The hooks of the `cubeload-torch` binary.
pub const TORCH: Torch = Torch { deliver, train_demo };

/// `cubeload bench`'s delivery: a tensor that takes the batch's buffer, as a training loop's `into_tensor`
/// does.
fn deliver(batch: Batch) {
    // libtorch's OpenMP workers spin after each operation and would take the cores of the reader threads:
    // the consumer side gets one torch thread.
    static ONE_THREAD: std::sync::Once = std::sync::Once::new();
    ONE_THREAD.call_once(|| tch::set_num_threads(1));
    // Statics delivered apart (`--separate-statics`) become a tensor too, as a training step takes them.
    // On the CPU, libtorch fails only where memory does.
    let statics = (!batch.statics.is_empty())
        .then(|| batch.statics_tensor(tch::Device::Cpu).expect("a CPU tensor of the statics"));
    let values = batch.into_tensor(tch::Device::Cpu).expect("a CPU tensor over the batch");
    drop(std::hint::black_box((values, statics)));
}

/// The demo's short training run: an LSTM predicting the next hour of t2m from all variables.
fn train_demo(cube: &Path, epochs: usize) -> cubeload::Result<()> {
    use train::{FitError, LstmForecaster, device, fit};
    let loader = cubeload::Loader::builder(cube)
        .shuffle(42)
        .epochs(epochs)
        .mix(4)
        .normalize(true)
        .prefetch(8)
        .build()?;
    let (variables, _) = loader.variable_names();
    cubeload::cli::print(format_args!(
        "training an LSTM (next-hour t2m from {}) for {epochs} epochs of {} batches on {:?}\n",
        variables.join(", "),
        loader.batches_per_epoch(),
        device()
    ));
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(device());
    let model = LstmForecaster::new(&vs.root(), variables.len(), 32, 0);
    let started = std::time::Instant::now();
    let mut epoch_started = started;
    fit(
        loader,
        &vs,
        1e-2,
        |x, mask| model.loss(x, mask),
        |epoch, loss| {
            let (epoch_seconds, seconds) =
                (epoch_started.elapsed().as_secs_f64(), started.elapsed().as_secs_f64());
            epoch_started = std::time::Instant::now();
            cubeload::cli::print(format_args!(
                "epoch {epoch} loss {loss:.4} ({epoch_seconds:.1} s, {seconds:.1} s in all)\n"
            ));
        },
    )
    .map_err(|e| match e {
        FitError::Loader(e) => cubeload::Error::from(e),
        FitError::Torch(e) => cubeload::Error::Torch(e.to_string()),
    })?;
    Ok(())
}
