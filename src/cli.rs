//! Subcommands, progress bars and printing: the only place that talks to a terminal.

mod info;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cubeload::generator::{GenOptions, GenReport, generate};
use cubeload::{Config, Cube, Plan, demo};
use indicatif::{ProgressBar, ProgressStyle};

/// Batch-aligned Zarr cubes from Earth-observation rasters, for fast ML training.
#[derive(Debug, Parser)]
#[command(name = "cubeload", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a cube from a YAML config.
    Gen {
        /// The config file.
        #[arg(short, long)]
        config: PathBuf,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Replace an existing cube at the output path (never anything that is not a cube).
        #[arg(long)]
        overwrite: bool,
    },
    /// Describe a cube: variables, layout, time range, statistics, size.
    Info {
        /// The cube directory.
        cube: PathBuf,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Synthesize demo inputs, generate a cube from them and describe it.
    Demo {
        /// Working directory for inputs, config and cube.
        #[arg(long, default_value_os_t = demo::default_dir())]
        dir: PathBuf,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Epochs of the short training run (0 to skip it).
        #[arg(long, default_value_t = 3)]
        epochs: usize,
    },
}

/// Parses arguments, runs the command, prints errors once, and maps them to exit codes.
pub(crate) fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}

fn dispatch(command: Command) -> cubeload::Result<()> {
    match command {
        Command::Gen { config, threads, overwrite } => {
            let text = std::fs::read_to_string(&config)
                .map_err(|source| cubeload::config::ConfigError::Read { path: config.clone(), source })?;
            let report = run_gen(&text, &config, &GenOptions { threads, overwrite })?;
            print_summary(&report);
            Ok(())
        }
        Command::Info { cube, json } => {
            let cube = Cube::open(&cube)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info::json(&cube)).expect("serializable"));
            } else {
                print!("{}", info::table(&cube));
            }
            Ok(())
        }
        Command::Demo { dir, threads, epochs } => {
            eprintln!(
                "Writing synthetic inputs to {}/inputs and generating {}/demo.zarr ...",
                dir.display(),
                dir.display()
            );
            let report = demo::build_cube(&dir, &demo::DemoSpec::default(), threads)?;
            print_summary(&report);
            println!();
            print!("{}", info::table(&Cube::open(&report.path)?));
            if epochs > 0 {
                println!();
                train_demo(&report.path, epochs)?;
            }
            Ok(())
        }
    }
}

/// A short training run on the demo cube: an LSTM predicting the next hour of t2m from all variables.
fn train_demo(cube: &Path, epochs: usize) -> cubeload::Result<()> {
    use cubeload::train::{LstmForecaster, device, fit};
    let loader = cubeload::Loader::builder(cube)
        .shuffle(42)
        .epochs(epochs)
        .mix(4)
        .normalize(true)
        .prefetch(8)
        .build()?;
    let (variables, _) = loader.variable_names();
    println!(
        "training an LSTM (next-hour t2m from {}) for {epochs} epochs of {} batches on {:?}",
        variables.join(", "),
        loader.batches_per_epoch(),
        device()
    );
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(device());
    let model = LstmForecaster::new(&vs.root(), variables.len(), 32, 0);
    let started = std::time::Instant::now();
    fit(
        loader,
        &vs,
        1e-2,
        |x, mask| model.loss(x, mask),
        |epoch, loss| {
            println!("epoch {epoch} loss {loss:.4} ({:.1} s)", started.elapsed().as_secs_f64());
        },
    )?;
    Ok(())
}

/// Sends what is printed on stdout to stderr while alive. GDAL's GRIB reader prints diagnostics with
/// `printf` ("ERROR: Ran out of file reading SECT0" at the end of an ERA5 file); stdout is for results.
struct StdoutToStderr(Option<i32>);

impl StdoutToStderr {
    fn new() -> Self {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // SAFETY: dup/dup2 on the process's standard descriptors; the saved descriptor is restored on drop.
        let saved = unsafe { libc::dup(1) };
        if saved < 0 || unsafe { libc::dup2(2, 1) } < 0 {
            return StdoutToStderr(None);
        }
        StdoutToStderr(Some(saved))
    }
}

impl Drop for StdoutToStderr {
    fn drop(&mut self) {
        if let Some(saved) = self.0 {
            // SAFETY: C's stdio buffers are flushed before the descriptor is swapped back; `saved` is ours.
            unsafe {
                libc::fflush(std::ptr::null_mut());
                libc::dup2(saved, 1);
                libc::close(saved);
            }
        }
    }
}

fn run_gen(text: &str, origin: &Path, options: &GenOptions) -> cubeload::Result<GenReport> {
    let _stdout = StdoutToStderr::new();
    let config = Config::from_yaml(text, origin)?;
    let plan = Plan::new(config, text.to_string())?;
    for v in &plan.variables {
        for note in &v.notes {
            eprintln!("note: variable `{}`: {note}", v.name);
        }
    }
    let bar = if std::io::stderr().is_terminal() { ProgressBar::new(0) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} generating [{bar:40}] {pos}/{len} blocks, {elapsed} (ETA {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let report = generate(&plan, options, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    Ok(report?)
}

fn print_summary(report: &GenReport) {
    let meta = &report.meta;
    let l = &meta.layout;
    println!(
        "wrote {} in {:.1} s: {} variables, {} × {} × {} (time × lat × lon), chunk = batch ({} × {} × {}), {} blocks",
        report.path.display(),
        report.seconds,
        meta.variables.len(),
        meta.shape[0],
        meta.shape[1],
        meta.shape[2],
        l.chunk_t,
        l.chunk_y,
        l.chunk_x,
        report.blocks
    );
}
