//! Trains an LSTM on a `pixel_series` cube: predict the next hour of the first variable from all variables.
//!
//! ```text
//! cargo run --release -p cubeload-torch --example train_lstm -- [CUBE|demo] [EPOCHS]
//! ```
//! Without CUBE, or with `demo`, it builds the demo cube in a temporary directory. Prints `epoch N loss X`.

use std::process::ExitCode;

use cubeload::layout::LayoutKind;
use cubeload::loader::Loader;
use cubeload_torch::BatchTensors as _;
use cubeload_torch::train::LstmForecaster;
use tch::nn::{self, OptimizerConfig};

const USAGE: &str =
    "usage: cargo run --release -p cubeload-torch --example train_lstm -- [CUBE|demo] [EPOCHS]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    // `demo` (or no argument) for the demo cube, so that EPOCHS can be given without a cube.
    let first = args.next().filter(|a| a != "demo");
    if first.as_deref().is_some_and(|a| a.starts_with('-')) {
        println!("{USAGE}");
        return Ok(());
    }
    let scratch = tempfile::tempdir()?; // removed on exit
    let cube = match first {
        Some(path) => path.into(),
        None => cubeload::demo::build_cube(scratch.path(), &cubeload::demo::DemoSpec::default(), None)?.path,
    };
    let epochs: usize = match args.next() {
        None => 5,
        Some(e) => e.parse().map_err(|_| format!("EPOCHS must be a whole number, not `{e}`; {USAGE}"))?,
    };

    // Batches of 256 pixel series [B, T, V], normalized, gaps filled with 0 and flagged in the mask;
    // chunks shuffled every epoch and mixed by fours so that a batch is not one spatial tile.
    let loader =
        Loader::builder(&cube).shuffle(42).epochs(epochs).mix(4).normalize(true).prefetch(8).build()?;
    if loader.meta().layout.kind != LayoutKind::PixelSeries {
        return Err(format!("{} is an image_sequence cube: train_lstm needs pixel_series (train_video trains on image sequences)", cube.display()).into());
    }
    if loader.meta().layout.chunk_t < 2 {
        return Err(format!(
            "{}: its series are of 1 step: train_lstm predicts each step from the steps before it, so it needs \
             at least 2 (`layout.window`)",
            cube.display()
        )
        .into());
    }
    let (variables, _) = loader.variable_names();
    println!("{}: {} batches per epoch, variables {variables:?}", cube.display(), loader.batches_per_epoch());

    tch::manual_seed(0);
    let device = cubeload_torch::train::device();
    let vs = nn::VarStore::new(device);
    let model = LstmForecaster::new(&vs.root(), variables.len(), 32, 0);
    let mut optimizer = nn::Adam::default().build(&vs, 1e-2)?;

    let report = |epoch: usize, sum: f64, count: u32| {
        if count > 0 {
            println!("epoch {epoch} loss {:.4}", sum / f64::from(count));
        }
    };
    let (mut epoch, mut sum, mut count) = (0, 0.0, 0);
    for batch in loader {
        let batch = batch?;
        if batch.origin.epoch != epoch {
            report(epoch, sum, count);
            (epoch, sum, count) = (batch.origin.epoch, 0.0, 0);
        }
        let mask = batch.mask_tensor(device)?;
        let x = batch.into_tensor(device)?; // [B, T, V]; on the CPU the batch's own buffer
        let loss = model.loss(&x, &mask);
        optimizer.backward_step(&loss);
        sum += loss.double_value(&[]);
        count += 1;
    }
    report(epoch, sum, count);
    Ok(())
}
