//! The `cubeload` command line (feature `cli`): subcommands, progress bars and printing, the only place that
//! talks to a terminal. Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
//!
//! Two binaries run it: `cubeload`, which does not link libtorch (so that `gen`, `info` and the rest start in
//! milliseconds), and `cubeload-torch` (crate `cubeload-torch`), which does and passes its [`Torch`] hooks.
//! `cubeload` hands the two commands that need them, `demo` (a short training) and `bench` (batches delivered
//! into tensors), over to `cubeload-torch` beside it.

mod info;

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};

use crate::bench::{BenchOptions, BenchReport};
use crate::generator::{GenOptions, GenReport, generate};
use crate::{Batch, Config, Cube, Plan, demo};
use clap::{Parser, Subcommand};
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
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        threads: Option<usize>,
        /// Replace an existing cube at the output path (never anything that is not a cube), and discard a
        /// half-made one left by an interrupted run of another configuration. With --append, only the latter.
        #[arg(long)]
        overwrite: bool,
        /// Extend the cube at the output path along time with new input files, reusing its unchanged
        /// chunks; the previous cube stays intact until the new one is complete.
        #[arg(long)]
        append: bool,
        /// Write only part K of N (K from 0, as Slurm array task ids and Kubernetes completion indexes count) of the
        /// cube's blocks, for N concurrent jobs on one shared filesystem; then run --finalize once.
        #[arg(long, value_name = "K/N", conflicts_with_all = ["finalize", "overwrite", "append"])]
        part: Option<crate::generator::Part>,
        /// Check that the parts wrote every block, then complete the cube and move it into place (with
        /// --overwrite, in place of an earlier cube).
        #[arg(long, conflicts_with = "append")]
        finalize: bool,
    },
    /// Check a cube: every stored file against its checksum, every chunk decoded, the metadata against the
    /// arrays. Exit code 1 when anything is wrong.
    Verify {
        /// The cube directory (a local one: verify reads the stored files).
        cube: PathBuf,
    },
    /// Describe a cube: variables, layout, time range, statistics, size.
    Info {
        /// The cube: a directory, or `s3://bucket/prefix`.
        cube: PathBuf,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure the loader against the machine's limit and image-chunked storage (default: a synthetic cube).
    Bench {
        /// The cube (default: generate a synthetic ~330 MB cube in a temporary directory).
        cube: Option<PathBuf>,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Drop the page cache before each phase (needs root).
        #[arg(long)]
        cold: bool,
        /// Reader threads.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
        threads: u64,
        /// Loader prefetch depth [default: the loader's, as many batches as 32 MiB hold, 4 to 1024].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
        prefetch: Option<u64>,
        /// Batches read from the image-chunked copy (0 to skip that comparison).
        #[arg(long, default_value_t = 8)]
        image_batches: usize,
        /// Fetch threads of the object-store phase (every request delayed 20 ms; 0 skips it).
        #[arg(long, default_value_t = 96)]
        remote_threads: usize,
        /// Prefetch depth of the object-store phase.
        #[arg(long, default_value_t = 192, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
        remote_prefetch: u64,
        /// Deliver static variables once per sample ([B, S]) instead of repeated along time in every batch.
        #[arg(long)]
        separate_statics: bool,
        /// Mix the samples of this many chunks into each group of batches, as the loader's `mix`.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        mix: u64,
        /// The most seconds a measurement reads for: of a larger cube, each takes the first batches of the
        /// shuffled epoch.
        #[arg(long, default_value_t = crate::bench::MAX_PASS_SECONDS)]
        #[arg(value_parser = positive_seconds, allow_negative_numbers = true)]
        max_pass_seconds: f64,
        /// Also draw throughput and latency into this PNG.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Draw one time slice of a variable (and its valid mask) into a PNG.
    Quicklook {
        /// The cube: a directory, or `s3://bucket/prefix`.
        cube: PathBuf,
        /// The variable.
        variable: String,
        /// The time step: its index, or its instant (`2019-03-05T12:00:00Z`, `2019-03-05`); ignored for
        /// static variables.
        #[arg(long, default_value = "0")]
        time: String,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Synthesize demo inputs, generate a cube from them, describe it, train a small LSTM on it for three
    /// epochs and benchmark the loader on it.
    Demo {
        /// Working directory for inputs, config and cube.
        #[arg(long, default_value_os_t = demo::default_dir())]
        dir: PathBuf,
        /// Worker threads (default: all cores).
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        threads: Option<usize>,
        /// Epochs of the short training run (0 to skip it).
        #[arg(long, default_value_t = 3)]
        epochs: usize,
    },
}

/// What a binary linked with libtorch adds to the command line.
#[derive(Debug, Clone, Copy)]
pub struct Torch {
    /// Hands one batch to the training side in `bench`: a tensor that takes the batch's buffer.
    pub deliver: fn(Batch),
    /// The demo's short training run on a cube, for a number of epochs (printing its losses).
    pub train_demo: fn(&Path, usize) -> crate::Result<()>,
}

/// The binary that links libtorch, beside the running one.
pub const TORCH_BINARY: &str = "cubeload-torch";

/// Parses arguments, runs the command, prints errors once, and returns the exit code. Without `torch`,
/// `demo` and `bench` are handed over to [`TORCH_BINARY`].
#[must_use]
pub fn run(torch: Option<&Torch>) -> i32 {
    without_transparent_huge_pages();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let result = match (&cli.command, torch) {
        (Command::Demo { .. } | Command::Bench { .. }, None) => Err(hand_over_to_torch()),
        (_, torch) => dispatch(cli.command, torch),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            if e.is_usage() { 2 } else { 1 }
        }
    }
}

/// Writes to standard output. Once a reader has gone (`cubeload info | head`), the command prints nothing
/// more and ends with its own exit code (`verify` of a damaged cube still exits 1), where `println!` would
/// panic; another failure (a full disk under a redirection) is an error and exit code 1.
pub fn print(text: std::fmt::Arguments<'_>) {
    static READER_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if READER_GONE.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            READER_GONE.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        eprintln!("error: cannot write to standard output: {e}");
        exit(1);
    }
}

/// [`print()`] with `format!`'s arguments and a newline, as `println!`.
macro_rules! say {
    () => { print(format_args!("\n")) };
    ($($arg:tt)*) => { print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Ends the process with `code` once a command is done: flushes standard output and error, then leaves
/// with `_exit`, skipping the static destructors of the linked libraries (libtorch's unregister thousands of
/// operators: a tenth of a second after every command).
pub fn exit(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process and all its threads at once; the commands have written and closed
    // their files, and standard output and error are flushed above, so nothing is lost with them.
    unsafe { libc::_exit(code) }
}

/// Replaces this process with [`TORCH_BINARY`] beside it, same arguments; returns only the error.
fn hand_over_to_torch() -> crate::Error {
    use std::os::unix::process::CommandExt as _;
    let path = std::env::current_exe()
        .map_or_else(|_| PathBuf::from(TORCH_BINARY), |exe| exe.with_file_name(TORCH_BINARY));
    let source = std::process::Command::new(&path).args(std::env::args_os().skip(1)).exec();
    crate::Error::TorchBinary { path, source }
}

fn dispatch(command: Command, torch: Option<&Torch>) -> crate::Result<()> {
    let torch = || torch.expect("run() hands demo and bench over when there are no torch hooks");
    match command {
        Command::Gen { config, threads, overwrite, append, part, finalize } => {
            let text = std::fs::read_to_string(&config)
                .map_err(|source| crate::config::ConfigError::Read { path: config.clone(), source })?;
            let options = GenOptions { threads, overwrite, append, part, finalize, ..Default::default() };
            let report = run_gen(&text, &config, &options)?;
            print_summary(&report, finalize);
            Ok(())
        }
        Command::Verify { cube } => {
            if let crate::store::Location::S3 { .. } = crate::store::Location::parse(&cube) {
                return Err(crate::Error::Usage(format!(
                    "{}: verify reads the stored files directly: run it on a local copy of the cube",
                    cube.display()
                )));
            }
            let report = crate::verify::verify(&cube)?;
            for problem in &report.problems {
                say!("{problem}");
            }
            if report.is_ok() {
                say!(
                    "{}: OK ({} chunks in {} files decoded, {:.1} MB checked against the manifest)",
                    report.path.display(),
                    report.chunks,
                    report.files,
                    report.bytes as f64 / 1e6
                );
                if !report.sealed {
                    say!(
                        "note: this cube's manifest, from an earlier build of cubeload, has no checksums of \
                         its metadata and coordinates: those were only checked to decode"
                    );
                }
                Ok(())
            } else {
                Err(crate::cube::CubeError::Damaged {
                    path: report.path.clone(),
                    problems: report.problems.len(),
                    damaged: !report.only_incomplete(),
                }
                .into())
            }
        }
        Command::Info { cube, json } => {
            let cube = Cube::open(&cube)?;
            if json {
                say!("{}", serde_json::to_string_pretty(&info::json(&cube)).expect("serializable"));
            } else {
                print(format_args!("{}", info::table(&cube)));
            }
            Ok(())
        }
        Command::Quicklook { cube, variable, time, out } => {
            let cube = Cube::open(&cube)?;
            // Ignored for a static variable, as a date or as an index (a static-only cube has no axis).
            let is_static = cube.meta().variables.iter().any(|v| v.name == variable && v.is_static);
            let time = if is_static { 0 } else { crate::plot::time_step(&cube, &time)? };
            crate::plot::quicklook(&cube, &variable, time, &out)?;
            say!("wrote {}", out.display());
            Ok(())
        }
        Command::Bench {
            cube,
            json,
            cold,
            threads,
            prefetch,
            image_batches,
            remote_threads,
            remote_prefetch,
            separate_statics,
            mix,
            max_pass_seconds,
            plot,
        } => {
            let options = BenchOptions {
                threads: usize::try_from(threads).unwrap_or(usize::MAX),
                prefetch: prefetch.map(|p| usize::try_from(p).unwrap_or(usize::MAX)),
                image_batches,
                cold,
                remote_threads,
                remote_prefetch: usize::try_from(remote_prefetch).unwrap_or(usize::MAX),
                separate_statics,
                mix: usize::try_from(mix).unwrap_or(usize::MAX),
                max_pass_seconds,
                deliver: torch().deliver,
            };
            // A plot that could not be written is found out before the minute of measuring.
            if let Some(path) = &plot {
                crate::plot::check_png(path)?;
            }
            let scratch = std::env::temp_dir().join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
            remove_abandoned_scratch(&std::env::temp_dir());
            let held = hold_scratch(&scratch);
            let result = bench(cube.as_deref(), &options, &scratch);
            drop(held);
            let _ = std::fs::remove_dir_all(&scratch);
            let report = result?;
            if let Some(path) = &plot {
                crate::plot::bench(&report, path)?;
                eprintln!("wrote {}", path.display());
            }
            if json {
                say!("{}", serde_json::to_string_pretty(&report).expect("serializable"));
            } else {
                print(format_args!("{}", bench_table(&report, true)));
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
            print_summary(&report, false);
            say!();
            print(format_args!("{}", info::table(&Cube::open(&report.path)?)));
            let torch = torch();
            if epochs > 0 {
                say!();
                (torch.train_demo)(&report.path, epochs)?;
            }
            say!();
            let options =
                BenchOptions { image_batches: 4, deliver: torch.deliver, ..BenchOptions::default() };
            let report = crate::bench::run(&report.path, &options, &dir)?;
            print(format_args!("{}", bench_table(&report, false)));
            Ok(())
        }
    }
}

/// A number of seconds greater than zero.
fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds.is_finite() => Ok(seconds),
        _ => Err(format!("`{text}` is not a number of seconds greater than 0")),
    }
}

/// Runs the benchmark on `cube`, or on a synthetic default cube generated (and measured) first.
/// The scratch directories of `bench`, one per process: `cubeload-bench-PID`.
const SCRATCH_PREFIX: &str = "cubeload-bench-";

/// The lock a running bench holds on a file of its scratch directory: a bench stopped by a signal (Ctrl-C)
/// does not remove its directory (133 MB of inputs and cubes), and the kernel releases its lock.
const SCRATCH_LOCK: &str = ".cubeload-bench-lock";

/// Creates `scratch` and locks it for this run (`None` where the file system refuses: then nothing removes
/// it but this run).
fn hold_scratch(scratch: &Path) -> Option<std::fs::File> {
    std::fs::create_dir_all(scratch).ok()?;
    let file = std::fs::File::create(scratch.join(SCRATCH_LOCK)).ok()?;
    file.try_lock().ok()?;
    Some(file)
}

/// Removes the scratch directories in `tmp` of benches that were stopped: those whose lock no process holds.
fn remove_abandoned_scratch(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = entry.file_name().to_str().is_some_and(|n| n.starts_with(SCRATCH_PREFIX));
        let abandoned =
            ours && std::fs::File::open(path.join(SCRATCH_LOCK)).is_ok_and(|lock| lock.try_lock().is_ok());
        if abandoned {
            eprintln!("removing {}, left by a bench that was stopped", path.display());
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn bench(cube: Option<&Path>, options: &BenchOptions, scratch: &Path) -> crate::Result<BenchReport> {
    let Some(cube) = cube else {
        eprintln!("Generating the default benchmark cube (and one 4× larger) in {} ...", scratch.display());
        let spec = demo::DemoSpec { hours: 24 * 28, resolution: 0.005, ..demo::DemoSpec::default() };
        let text = demo::write_inputs(scratch, &spec)?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| crate::cube::CubeError::Io { path, source }
        };
        let config = scratch.join("bench.yaml");
        std::fs::write(&config, &text).map_err(io(&config))?;
        let (seconds, rss) = gen_child(&config)?;
        let path = scratch.join("demo.zarr");
        let mb = Cube::open(&path)?.uncompressed_bytes() as f64 / 1e6;
        // The same inputs on a grid with 4× the cells: generation memory must not grow with the cube.
        let big = scratch.join("bench4x.yaml");
        let text4 =
            text.replace("demo.zarr", "demo4x.zarr").replace("resolution: 0.005", "resolution: 0.0025");
        std::fs::write(&big, text4).map_err(io(&big))?;
        let (_, rss4) = gen_child(&big)?;
        let _ = std::fs::remove_dir_all(scratch.join("demo4x.zarr"));
        let mut result = crate::bench::run(&path, options, scratch)?;
        result.gen_mb_per_s = Some(mb / seconds);
        result.gen_peak_rss_mb = Some(rss);
        result.gen_peak_rss_mb_4x = Some(rss4);
        // The same inputs and batches in a multi-resolution cube: t2m at its native 0.25°, NDVI at its
        // 2-day revisit.
        let multi = scratch.join("multires.yaml");
        std::fs::write(&multi, demo::multires_config(&text, &spec)).map_err(io(&multi))?;
        gen_child(&multi)?;
        let (storage, throughput) =
            crate::bench::compare_multires(&path, &scratch.join("multires.zarr"), options)?;
        result.multires_storage_ratio = Some(storage);
        result.multires_throughput_ratio = Some(throughput);
        result.check_goals();
        return Ok(result);
    };
    Ok(crate::bench::run(cube, options, scratch)?)
}

/// Runs `cubeload gen` on `config` in a child process: (seconds, peak RSS in MB of that child). The child is
/// the `cubeload` binary beside this one when there is one (as users run `gen`, without libtorch's start-up).
fn gen_child(config: &Path) -> crate::Result<(f64, f64)> {
    let exe = std::env::current_exe()
        .map_err(|source| crate::cube::CubeError::Io { path: "cubeload".into(), source })?;
    let lean = exe.with_file_name("cubeload");
    let exe = if lean.is_file() { lean } else { exe };
    let started = std::time::Instant::now();
    let child = std::process::Command::new(exe)
        .args(["gen", "--overwrite", "-c"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|source| crate::cube::CubeError::Io { path: config.to_path_buf(), source })?;
    // SAFETY: wait4 reaps exactly this child (std's `Child` is not waited for afterwards) and fills the
    // status and the rusage given to it: the child's own peak RSS, whatever ran before.
    let (status, max_kb) = unsafe {
        let mut status = 0i32;
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::wait4(child.id() as i32, &raw mut status, 0, &raw mut usage);
        (status, usage.ru_maxrss)
    };
    let seconds = started.elapsed().as_secs_f64();
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(crate::cube::CubeError::NotACube {
            path: config.to_path_buf(),
            message: format!("generating the benchmark cube failed (wait status {status})"),
        }
        .into());
    }
    Ok((seconds, max_kb as f64 / 1024.0))
}

/// The bench report as a table; with `judge`, each goal met or missed by how much.
fn bench_table(r: &BenchReport, judge: bool) -> String {
    let opt = |v: Option<f64>, unit: &str| v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}{unit}"));
    let mut rows = vec![
        ("cube", r.cube.display().to_string()),
        (
            "loader",
            format!(
                "{:.3} GB/s, {:.0} samples/s, {:.1} batches/s ({} batches of {}{})",
                r.loader_gb_per_s,
                r.samples_per_s,
                r.batches_per_s,
                r.batches,
                info::human_bytes(r.batch_bytes as u64),
                match (r.epochs_per_round, r.epoch_batches_measured) {
                    (_, Some(_)) => format!(
                        ", the first of the shuffled epoch: a whole one lasts over {} s",
                        r.machine.max_pass_seconds
                    ),
                    (1, None) => String::new(),
                    (epochs, None) => format!(", {epochs} epochs of one loader: an epoch lasts under 50 ms"),
                }
            ),
        ),
        (
            "ceiling",
            format!(
                "{:.3} GB/s, {:.0} batches/s (same chunks decoded, same threads, nothing assembled)",
                r.ceiling_gb_per_s, r.ceiling_batches_per_s
            ),
        ),
        ("ratio_to_ceiling", format!("{:.2}", r.ratio_to_ceiling)),
        (
            "with writes",
            format!(
                "{:.3} GB/s ({:.2} of the ceiling: the same chunks, each read also writing its share of the \
                 batches' bytes); the loader at {:.2} of it",
                r.ceiling_with_writes_gb_per_s,
                r.ceiling_with_writes_gb_per_s / r.ceiling_gb_per_s,
                r.ratio_to_ceiling_with_writes
            ),
        ),
        (
            "first batch",
            format!("{:.1} ms (building the loader {:.1} ms)", r.time_to_first_batch_ms, r.loader_build_ms),
        ),
        ("latency", format!("p50 {:.2} ms, p99 {:.2} ms", r.latency_ms_p50, r.latency_ms_p99)),
        ("read_amplification", opt(r.read_amplification, "")),
        ("vs image-chunked", opt(r.speedup_vs_image_chunked, "× faster")),
        ("thread scaling", opt(r.thread_scaling, "× (epoch with 1 reader ÷ with all)")),
        (
            "object store",
            r.remote_ratio.map_or_else(
                || "-".to_string(),
                |ratio| {
                    format!(
                        "{ratio:.2} of local batches/s with {} ms per request ({:.1} requests per batch, {} \
                         fetch threads, prefetch {})",
                        crate::bench::REMOTE_LATENCY_MS,
                        r.remote_requests_per_batch.unwrap_or(0.0),
                        r.machine.remote_threads,
                        r.machine.remote_prefetch
                    )
                },
            ),
        ),
        ("peak RSS", format!("{:.0} MB", r.peak_rss_mb)),
    ];
    if let Some(storage) = r.multires_storage_ratio {
        rows.push((
            "multi-resolution",
            format!(
                "{storage:.1}× less storage than the single-resolution cube, {} of its batches/s",
                opt(r.multires_throughput_ratio, "")
            ),
        ));
    }
    if r.gen_mb_per_s.is_some() {
        rows.push((
            "generation",
            format!(
                "{} MB/s, peak RSS {} MB ({} MB for a cube with 4× the cells)",
                opt(r.gen_mb_per_s, ""),
                opt(r.gen_peak_rss_mb, ""),
                opt(r.gen_peak_rss_mb_4x, "")
            ),
        ));
    }
    let m = &r.machine;
    rows.push((
        "machine",
        format!(
            "{} cores, {:.1} GB, {} threads, prefetch {}, {}{}{}{}",
            m.cores,
            m.memory_gb,
            m.threads,
            m.prefetch,
            m.codec,
            if r.cold { ", cold cache" } else { ", warm cache" },
            if m.separate_statics { ", statics once per sample" } else { "" },
            if m.mix > 1 { format!(", samples of {} chunks mixed", m.mix) } else { String::new() }
        ),
    ));
    if let Some(note) = &r.cold_note {
        rows.push(("note", note.clone()));
    }
    if let Some(note) = r.thread_scaling_unjudged().filter(|_| r.levels.is_empty()) {
        rows.push(("note", note));
    }
    if let Some(note) = &r.image_chunked_note {
        rows.push(("note", note.clone()));
    }
    if !r.levels.is_empty() {
        rows.push((
            "note",
            format!(
                "a multi-resolution cube (levels {}): the loader regrids its coarser variables, work the ceiling \
                 does not do, and reads each level chunk once for the batches sharing it, so ratio_to_ceiling, \
                 thread_scaling and read_amplification are not judged; `cubeload bench` without a cube compares \
                 one with its single-resolution cube (multires_throughput_ratio)",
                r.levels.join(", ")
            ),
        ));
    }
    if !judge {
        // The goals are set for the default benchmark cube's 247 batches of 2 MB; an epoch of the demo's 70
        // small batches lasts a few milliseconds, mostly the loader's start and the scheduler's ticks.
        rows.push((
            "goals",
            "set for the default benchmark cube, not for this demo's small batches: `cubeload bench` judges them"
                .to_string(),
        ));
    }
    for goal in r.goals.iter().filter(|_| judge) {
        let verdict = match goal.missed_by {
            None => "met".to_string(),
            Some(by) => format!("MISSED by {:.0} % ({:.3}, goal {})", by * 100.0, goal.value, goal.goal),
        };
        rows.push(("goal", format!("{} {} : {verdict}", goal.name, goal.goal)));
    }
    rows.iter().fold(String::new(), |mut out, (k, v)| {
        let _ = writeln!(out, "{k:<19} {v}");
        out
    })
}

/// Keeps what is printed on stdout away from it while alive: GDAL's GRIB reader prints diagnostics with
/// `printf` (`Warning: Inside GRIB2Inventory ... ERROR: Ran out of file reading SECT0`, some 40 lines at the end
/// of an ERA5 file), past GDAL's error handler; stdout is for results. They are dropped, as GDAL's other
/// warnings are ([`crate::source::init_gdal`]), or sent to stderr with `CUBELOAD_GDAL_LOG=1`.
struct StdoutAside(Option<i32>);

impl StdoutAside {
    fn new() -> Self {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let verbose = std::env::var_os("CUBELOAD_GDAL_LOG").is_some();
        // SAFETY: open/dup/dup2/close on the process's standard descriptors and one of our own; the saved
        // descriptor is restored on drop.
        unsafe {
            let target = if verbose { 2 } else { libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY) };
            if target < 0 {
                return StdoutAside(None);
            }
            let saved = libc::dup(1);
            let swapped = saved >= 0 && libc::dup2(target, 1) >= 0;
            if target != 2 {
                libc::close(target);
            }
            if !swapped {
                if saved >= 0 {
                    libc::close(saved);
                }
                return StdoutAside(None);
            }
            StdoutAside(Some(saved))
        }
    }
}

impl Drop for StdoutAside {
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

fn run_gen(text: &str, origin: &Path, options: &GenOptions) -> crate::Result<GenReport> {
    let _stdout = StdoutAside::new();
    let config = Config::from_yaml(text, origin)?;
    crate::generator::refuse_if_busy(&config.output, options)?;
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
    let report = report?;
    // Notes only the written values could give (values the type cannot hold, categorical codes beyond
    // float32's exact integers).
    for (v, planned) in report.meta.variables.iter().zip(&plan.variables) {
        for note in v.notes.iter().filter(|note| !planned.notes.contains(note)) {
            eprintln!("note: variable `{}`: {note}", v.name);
        }
    }
    Ok(report)
}

/// What a run wrote; `finalized`: a `--finalize` run, whose blocks the parts wrote.
fn print_summary(report: &GenReport, finalized: bool) {
    let reused = if report.reused > 0 {
        format!(" ({} of them kept from an interrupted run or the previous cube)", report.reused)
    } else {
        String::new()
    };
    if let Some(part) = report.part {
        say!(
            "part {part}: wrote its {} block{}{reused} in {:.1} s into {}; when every part is done, run \
             `cubeload gen -c CONFIG --finalize`",
            report.blocks,
            if report.blocks == 1 { "" } else { "s" },
            report.seconds,
            report.path.display()
        );
        return;
    }
    let meta = &report.meta;
    let l = &meta.layout;
    let chunk = if l.shuffled.is_some() {
        format!("{} samples × {} steps", l.chunk_y, l.chunk_t)
    } else {
        format!("{} × {} × {}", l.chunk_t, l.chunk_y, l.chunk_x)
    };
    let extent = if meta.time.is_some() {
        format!("{} × {} × {} (time × lat × lon)", meta.shape[0], meta.shape[1], meta.shape[2])
    } else {
        format!("{} × {} (lat × lon, static variables only)", meta.shape[1], meta.shape[2])
    };
    say!(
        "wrote {} in {:.1} s: {} variable{}, {extent}, chunk = batch ({chunk}), {} blocks",
        report.path.display(),
        report.seconds,
        meta.variables.len(),
        if meta.variables.len() == 1 { "" } else { "s" },
        report.blocks
    );
    if finalized {
        say!("the blocks were written by the --part runs");
    } else if report.reused > 0 {
        say!("{} of the blocks were kept from an interrupted run or the previous cube", report.reused);
    }
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    // A bbox or time axis may meet a variable's sources within the margins the plan allows, yet give it no
    // value at all.
    for v in meta.variables.iter().filter(|v| v.valid_fraction == 0.0) {
        // Values its type cannot hold (a note counts them) are sources that do cover it.
        let why = if v.notes.iter().any(|n| n.contains("stored as missing")) {
            "none of the values its sources give can be stored (see the note above)"
        } else {
            "its sources cover none of its cells and steps"
        };
        eprintln!("warning: variable `{}` has no valid value in the cube: {why}", v.name);
    }
}

/// Turns transparent huge pages off for this process (and the `gen` children it starts), except where it
/// asks for them: the batch buffers of [`crate::Allocator`]. On a machine whose kernel backs all memory
/// with huge pages, the first touch of each 2 MB of every thread's fresh heap would clear all of it: the
/// reader and fetch threads of a loader would spend their time in the kernel's `clear_page` (the fetch
/// threads of `cubeload bench`'s object-store phase three quarters of theirs). A kernel older than 6.18,
/// which knows no exception, turns them off everywhere.
fn without_transparent_huge_pages() {
    /// `PR_THP_DISABLE_EXCEPT_ADVISED` (Linux 6.18): memory advised `MADV_HUGEPAGE` keeps them.
    #[cfg(target_os = "linux")]
    const EXCEPT_ADVISED: libc::c_ulong = 1 << 1;
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integers and changes only the process's paging policy; a kernel that
    // refuses a flag leaves things as they were.
    unsafe {
        if libc::prctl(libc::PR_SET_THP_DISABLE, 1, EXCEPT_ADVISED, 0, 0) != 0 {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
}
