//! Trains an LSTM on a `pixel_series` cube: predict the next hour of the first variable from all variables.
//!
//! ```text
//! cargo run --release -p cubeload-torch --example train_lstm -- [CUBE] [EPOCHS]
//! ```
//! Without CUBE it builds the demo cube in a temporary directory. Prints `epoch N loss X`.

use cubeload::loader::Loader;
use cubeload_torch::BatchTensors as _;
use cubeload_torch::train::LstmForecaster;
use tch::nn::{self, OptimizerConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let scratch = tempfile::tempdir()?; // removed on exit
    let cube = match args.next() {
        Some(path) => path.into(),
        None => cubeload::demo::build_cube(scratch.path(), &cubeload::demo::DemoSpec::default(), None)?.path,
    };
    let epochs: usize = args.next().map_or(Ok(5), |e| e.parse())?;

    // Batches of 256 pixel series [B, T, V], normalized, gaps filled with 0 and flagged in the mask;
    // chunks shuffled every epoch and mixed by fours so that a batch is not one spatial tile.
    let loader =
        Loader::builder(&cube).shuffle(42).epochs(epochs).mix(4).normalize(true).prefetch(8).build()?;
    let (variables, _) = loader.variable_names();
    println!("{}: {} batches per epoch, variables {variables:?}", cube.display(), loader.batches_per_epoch());

    tch::manual_seed(0);
    let device = cubeload_torch::train::device();
    let vs = nn::VarStore::new(device);
    let model = LstmForecaster::new(&vs.root(), variables.len(), 32, 0);
    let mut optimizer = nn::Adam::default().build(&vs, 1e-2)?;

    let (mut epoch, mut sum, mut count) = (0, 0.0, 0);
    for batch in loader {
        let batch = batch?;
        if batch.origin.epoch != epoch {
            println!("epoch {epoch} loss {:.4}", sum / f64::from(count));
            (epoch, sum, count) = (batch.origin.epoch, 0.0, 0);
        }
        let mask = batch.mask_tensor(device);
        let x = batch.into_tensor(device); // [B, T, V]; on the CPU the batch's own buffer
        let loss = model.loss(&x, &mask);
        optimizer.backward_step(&loss);
        sum += loss.double_value(&[]);
        count += 1;
    }
    println!("epoch {epoch} loss {:.4}", sum / f64::from(count));
    Ok(())
}
