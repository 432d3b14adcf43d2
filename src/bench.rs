//! `cubeload bench`: the loader measured against the machine's limit and against image-chunked storage, all in
//! one run so that the ratios are not spoiled by a noisy machine.
//!
//! - **loader**: one shuffled epoch delivered as batches ([`BenchOptions::deliver`]: into tensors in the
//!   `cubeload-torch` binary): several of one loader where an epoch is too short to measure, its first
//!   batches where it is too long (measurements last 50 ms to [`MAX_PASS_SECONDS`]);
//! - **ceiling**: the same chunks read and decoded with the same number of threads, by the loader's own
//!   reading code ([`Assembler::decode_stored`]), nothing assembled;
//! - **ceiling with writes**: the same, each read then streaming its share of the bytes the loader wrote to
//!   memory, by the loader's own stores, nothing rearranged: what decoding and writing the batches cost
//!   at least, so that the report tells the write volume's part of a gap from the assembly's;
//! - **image-chunked**: the same batches read from a copy of the cube chunked image by image
//!   (`(1, 200, 200)`), the layout of the usual xarray recipe;
//! - **read amplification**: bytes the process read (`/proc/self/io`) during the loader's epochs ÷ the bytes
//!   the batches read occupy on disk.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use zarrs::array::codec::ZstdCodec;
use zarrs::array::{ArrayBuilder, ArraySubset, data_type};
use zarrs::filesystem::FilesystemStore;

use crate::cube::reader::Cube;
use crate::cube::{CubeMeta, VariableMeta};
use crate::loader::assemble::{Assembler, Transform};
use crate::loader::sampler::ChunkId;
use crate::loader::transpose;
use crate::loader::{HINT_AHEAD, Loader, LoaderError};
use crate::store::{LatencyStore, Location};

/// Options of a benchmark run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Reader threads (loader and ceiling).
    pub threads: usize,
    /// Prefetch depth of the loader (`None`: the loader's default for the cube's batches).
    pub prefetch: Option<usize>,
    /// Batches read from the image-chunked copy (they are slow).
    pub image_batches: usize,
    /// Drop the page cache before each phase (root on Linux).
    pub cold: bool,
    /// Fetch threads of the object-store phase (0 skips it): requests wait on the network, not on cores
    /// (the reader threads that decode are `threads`, as locally).
    pub remote_threads: usize,
    /// Prefetch depth of the object-store phase.
    pub remote_prefetch: usize,
    /// Static variables delivered once per sample (`[B, S]`, the loader's `separate_statics`) instead of
    /// repeated along time in every batch.
    pub separate_statics: bool,
    /// Chunks whose samples the loader mixes into each group of batches (its `mix`; 1: none).
    pub mix: usize,
    /// The most time a measurement reads for ([`MAX_PASS_SECONDS`] by default): of a cube whose ceiling pass
    /// would last longer, each measurement takes the first batches of the shuffled epoch.
    pub max_pass_seconds: f64,
    /// Hands each batch to the training side: `cubeload-torch` makes a tensor that takes the batch's buffer
    /// (as a training loop's `into_tensor`); the default reads every value.
    pub deliver: fn(crate::Batch),
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            threads: 2,
            prefetch: None,
            image_batches: 8,
            cold: false,
            remote_threads: 96,
            remote_prefetch: 192,
            separate_statics: false,
            mix: 1,
            max_pass_seconds: MAX_PASS_SECONDS,
            deliver: read_every_value,
        }
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The cube measured.
    pub cube: PathBuf,
    /// Loader throughput, GB/s of delivered float32 batch data (values, and statics delivered apart), from
    /// the built loader to its last batch.
    pub loader_gb_per_s: f64,
    /// Samples (pixel series or image sequences) per second.
    pub samples_per_s: f64,
    /// Batches per second.
    pub batches_per_s: f64,
    /// Build of the loader plus its first batch.
    pub time_to_first_batch_ms: f64,
    /// Build of the loader alone (opening the cube, starting the threads): part of the time to the first
    /// batch, not of the epoch the throughputs are taken over (the ceiling opens the cube untimed too).
    pub loader_build_ms: f64,
    /// Median wait for a batch.
    pub latency_ms_p50: f64,
    /// 99th percentile wait for a batch.
    pub latency_ms_p99: f64,
    /// Peak resident memory of the process up to the end of the loader's rounds (generation runs in a
    /// child process; the object-store phase and the image-chunked copy come after).
    pub peak_rss_mb: f64,
    /// The same chunks read and decoded with the same threads, nothing assembled: GB/s of decoded data.
    pub ceiling_gb_per_s: f64,
    /// Ceiling time per chunk ÷ loader time per batch (the same chunks; bytes differ, since batches repeat
    /// static variables along time): the median of five rounds of a loader epoch between two ceiling passes
    /// (their mean); the loader's other figures come from that round.
    pub ratio_to_ceiling: f64,
    /// The batches per second the ceiling reads the chunks of (`batches_per_s` ÷ `ratio_to_ceiling`): the
    /// loader's figure and the ceiling's in one unit, since `loader_gb_per_s` counts bytes delivered, which
    /// repeat static variables along time, and `ceiling_gb_per_s` bytes decoded.
    pub ceiling_batches_per_s: f64,
    /// The ceiling's chunks decoded again, each read then streaming its share of the bytes the loader wrote
    /// (values, statics and masks) to memory by the loader's stores, nothing rearranged: a limit for a
    /// loader that must write its batches. GB/s of decoded data, from the round of `ratio_to_ceiling`.
    pub ceiling_with_writes_gb_per_s: f64,
    /// As `ratio_to_ceiling`, against the ceiling with writes: how much of the loader's time is spent
    /// beyond decoding and writing its bytes (rearranging them, masking, handing batches over).
    pub ratio_to_ceiling_with_writes: f64,
    /// Epochs of one loader in each measurement of the loader (and passes over the chunks in each of the
    /// ceiling): 1, unless a pass lasts under 50 ms (a small cube), then as many as last that long.
    pub epochs_per_round: usize,
    /// Where a ceiling pass would last over `max_pass_seconds` (a large cube), the batches each measurement
    /// takes: the first of the shuffled epoch, as many as last that long (the ceiling reads their chunks).
    /// `None`: whole epochs.
    pub epoch_batches_measured: Option<usize>,
    /// Bytes read by the process during the loader's epochs, its build included (the cube's metadata and
    /// validity index) ÷ stored bytes of the batches read (delivered, and read ahead of a measurement that
    /// ends before its epoch does).
    pub read_amplification: Option<f64>,
    /// Per-batch time from the image-chunked copy ÷ per-batch time of the loader.
    pub speedup_vs_image_chunked: Option<f64>,
    /// Why `speedup_vs_image_chunked` was not measured, where it was not.
    pub image_chunked_note: Option<String>,
    /// Epoch time with one reader thread ÷ with `threads`, the median of five rounds (goal: ≥ 1.8 for 2
    /// threads when decode-bound).
    pub thread_scaling: Option<f64>,
    /// The same epoch through a store that answers every request after [`REMOTE_LATENCY_MS`] (an object
    /// store's latency), with `remote_threads` fetch threads: batches/s there ÷ batches/s locally, over two
    /// epochs after the first batch (the time to it is `remote_time_to_first_batch_ms`); the median of three
    /// such pairs run side by side.
    pub remote_ratio: Option<f64>,
    /// Requests per batch read in that phase, opening the cube included (each pays the latency; in a
    /// measurement cut short, the fetch threads' requests for batches further ahead count too).
    pub remote_requests_per_batch: Option<f64>,
    /// Build of that loader plus its first batch: opening the cube (metadata, coordinates, validity index)
    /// pays the latency once per request before prefetching starts.
    pub remote_time_to_first_batch_ms: Option<f64>,
    /// Generation throughput of the default cube, MB/s of uncompressed cube data.
    pub gen_mb_per_s: Option<f64>,
    /// Peak resident memory of generating the default cube.
    pub gen_peak_rss_mb: Option<f64>,
    /// The same for a cube with 4× the cells (goal: within 20 % of `gen_peak_rss_mb`).
    pub gen_peak_rss_mb_4x: Option<f64>,
    /// Bytes on disk of the single-resolution cube ÷ of the multi-resolution cube of the same inputs and
    /// batches (coarse variables at their native resolution and time step).
    pub multires_storage_ratio: Option<f64>,
    /// Batches/s of the loader on the multi-resolution cube (regridding on the fly) ÷ on the single-resolution
    /// one: the median of three pairs of epochs run side by side.
    pub multires_throughput_ratio: Option<f64>,
    /// Batches delivered in the loader epoch.
    pub batches: usize,
    /// Bytes of one batch.
    pub batch_bytes: usize,
    /// Whether the page cache was dropped before each phase.
    pub cold: bool,
    /// Why `--cold` could not drop the page cache, if it could not.
    pub cold_note: Option<String>,
    /// Coarser levels of a multi-resolution cube, by group. Their variables are regridded by the loader
    /// (work the ceiling does not do) and each level chunk is read once for the batches that share it, so
    /// the ceiling ratios, thread scaling and read amplification are not judged on such a cube.
    pub levels: Vec<String>,
    /// Machine and setup.
    pub machine: Machine,
    /// The project's goals, each with the measured value and whether it is met.
    pub goals: Vec<Goal>,
    /// Wait for each batch of the loader epoch, in delivery order (for `--plot`).
    #[serde(skip)]
    pub latencies_ms: Vec<f64>,
}

/// One goal of the project, checked against this run.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    /// The figure.
    pub name: &'static str,
    /// The goal, e.g. `>= 0.8`.
    pub goal: String,
    /// The measured value.
    pub value: f64,
    /// Whether it is met.
    pub met: bool,
    /// When missed, by how much: the distance from the goal as a fraction of it (0.2 for 0.64 against
    /// `>= 0.8`).
    pub missed_by: Option<f64>,
}

impl Goal {
    /// `value >= min`.
    fn at_least(name: &'static str, value: f64, min: f64) -> Goal {
        let met = value >= min;
        Goal { name, goal: format!(">= {min}"), value, met, missed_by: (!met).then(|| (min - value) / min) }
    }

    /// `value <= max`.
    fn at_most(name: &'static str, value: f64, max: f64) -> Goal {
        let met = value <= max;
        Goal { name, goal: format!("<= {max}"), value, met, missed_by: (!met).then(|| (value - max) / max) }
    }
}

impl BenchReport {
    /// Why `thread_scaling` is not judged on a cube the loader reads as stored, if it is not: its goal is
    /// for two reader threads, with batches enough to keep both busy.
    #[must_use]
    pub fn thread_scaling_unjudged(&self) -> Option<String> {
        let (threads, batches) = (self.machine.threads, self.batches / self.epochs_per_round.max(1));
        if threads != 2 {
            Some(format!("thread_scaling is judged with 2 reader threads (this run: {threads})"))
        } else if batches < SCALING_BATCHES_PER_THREAD * threads {
            Some(format!(
                "thread_scaling is not judged: an epoch of {batches} batch{} (fewer than \
                 {SCALING_BATCHES_PER_THREAD} per reader) cannot keep {threads} readers busy",
                if batches == 1 { "" } else { "es" }
            ))
        } else {
            None
        }
    }

    /// Fills [`BenchReport::goals`] from the figures measured (call after the generation figures are set).
    pub fn check_goals(&mut self) {
        let mut goals = Vec::new();
        let mut at_least = |name, value: Option<f64>, min: f64| {
            goals.extend(value.map(|value| Goal::at_least(name, value, min)));
        };
        // Set for cubes the loader reads as stored, not for one whose coarser variables it regrids.
        let single = self.levels.is_empty();
        at_least("ratio_to_ceiling", Some(self.ratio_to_ceiling).filter(|_| single), 0.8);
        at_least("speedup_vs_image_chunked", self.speedup_vs_image_chunked, 10.0);
        let scaling = self.thread_scaling.filter(|_| single && self.thread_scaling_unjudged().is_none());
        at_least("thread_scaling", scaling, 1.8);
        at_least("remote_ratio", self.remote_ratio, 0.8);
        at_least("multires_storage_ratio", self.multires_storage_ratio, 10.0);
        at_least("multires_throughput_ratio", self.multires_throughput_ratio, 0.7);
        let mut at_most = |name, value: Option<f64>, max: f64| {
            goals.extend(value.map(|value| Goal::at_most(name, value, max)));
        };
        at_most("read_amplification", self.read_amplification.filter(|_| single), 1.01);
        at_most("time_to_first_batch_ms", Some(self.time_to_first_batch_ms), 50.0);
        let growth = self.gen_peak_rss_mb.zip(self.gen_peak_rss_mb_4x).map(|(a, b)| b / a);
        at_most("gen_peak_rss_growth_4x", growth, 1.2);
        self.goals = goals;
    }
}

/// What a result needs to be read later.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical cores.
    pub cores: usize,
    /// Total memory.
    pub memory_gb: f64,
    /// Reader threads used.
    pub threads: usize,
    /// Prefetch depth used (in batches).
    pub prefetch: usize,
    /// Fetch threads of the object-store phase.
    pub remote_threads: usize,
    /// Prefetch depth of the object-store phase.
    pub remote_prefetch: usize,
    /// Whether static variables were delivered once per sample instead of repeated along time.
    pub separate_statics: bool,
    /// Chunks mixed per group of batches (`--mix`).
    pub mix: usize,
    /// The most seconds a measurement reads for (`--max-pass-seconds`).
    pub max_pass_seconds: f64,
    /// The cube's codec.
    pub codec: String,
    /// cubeload version.
    pub version: String,
}

fn proc_value(file: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(file).ok()?.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.trim_start_matches(':').trim();
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Peak resident memory of this process (`VmHWM`), MB.
#[must_use]
pub fn peak_rss_mb() -> f64 {
    proc_value("/proc/self/status", "VmHWM").map_or(0.0, |kb| kb as f64 / 1024.0)
}

/// Bytes this process read through `read` calls so far (page-cache hits included).
fn bytes_read() -> Option<u64> {
    proc_value("/proc/self/io", "rchar")
}

/// Drops the page cache (needs root); `Err` says why not.
fn drop_page_cache() -> Result<(), String> {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| format!("cannot drop the page cache ({e}): run as root on Linux for --cold"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Batches per reader thread an epoch needs for `thread_scaling` to be judged.
const SCALING_BATCHES_PER_THREAD: usize = 8;

/// Latency added to every request in the object-store phase, ms (a same-region S3 GET's order of size).
pub const REMOTE_LATENCY_MS: u64 = 20;

/// Runs the benchmark on `cube`.
///
/// # Errors
/// [`LoaderError`] when the cube cannot be opened or read.
pub fn run(cube_path: &Path, options: &BenchOptions, scratch: &Path) -> Result<BenchReport, LoaderError> {
    let cube = Cube::open(cube_path)?;
    let meta = cube.meta().clone();
    // `--cold` where the page cache cannot be dropped measures warm, all of it: a run whose first reads come
    // from the disk and the rest from memory would be neither.
    let mut cold_note = None;
    let warm_instead;
    let options = match options.cold.then(drop_page_cache) {
        Some(Err(note)) => {
            cold_note = Some(format!("{note}; measured with a warm cache instead"));
            warm_instead = BenchOptions { cold: false, ..options.clone() };
            &warm_instead
        }
        _ => options,
    };
    let mut prepare = || {
        if options.cold
            && let Err(note) = drop_page_cache()
        {
            cold_note.get_or_insert(note);
        }
    };

    // How long each measurement reads: the ceiling over the chunks of the loader's first batches says how
    // long a whole pass would take.
    // A loader without threads, asked only for its order of batches.
    let order = Loader::builder(cube_path).shuffle(0).threads(0).build()?;
    // The batches of an epoch: the cube's chunks but those without a valid value, which the loader skips.
    let batches_in_cube = order.batches_per_epoch();
    let first = order.first_chunks(CALIBRATION_BATCHES);
    let threads = options.threads.max(1);
    // Twice, the second timed: warm, the first brings the chunks into memory (cold, both read the disk).
    let calibration = ceiling_work(&meta, &first);
    ceiling_pass(&cube, &calibration, threads, 1, 0, &mut prepare)?;
    let (seconds, _) = ceiling_pass(&cube, &calibration, threads, 1, 0, &mut prepare)?;
    let per_batch = seconds / first.len().max(1) as f64;
    let plan = Plan::new(per_batch, batches_in_cube, options);
    // The object-store phase: of a measurement cut short, at least four times the prefetch depth there,
    // which a remote epoch fills first.
    let remote_plan = Plan {
        passes: plan.passes * REMOTE_EPOCHS,
        batches: plan.batches.map(|n| n.max(options.remote_prefetch.saturating_mul(4))),
    };
    // Ceiling: the chunks of every variable that the measured batches read (each level chunk of a
    // multi-resolution cube once), decoded by `threads` threads.
    let (work, ceiling_batches) = match plan.batches {
        None => {
            // In the cube's order: the ceiling reads them as they lie in their files.
            let mut epoch = order.first_chunks(batches_in_cube);
            epoch.sort_unstable();
            (ceiling_work(&meta, &epoch), batches_in_cube)
        }
        Some(n) => {
            let measured = order.first_chunks(n);
            (ceiling_work(&meta, &measured), measured.len())
        }
    };
    // Warm means warm: the chunks every phase reads are read into memory first (a cube the bench has just
    // generated is there already; a user's cube, or the batches past the first of a cut measurement, may
    // not be).
    if !options.cold {
        let remote;
        let warm = match remote_plan.limit() {
            Some(limit) if options.remote_threads > 0 => {
                remote = ceiling_work(&meta, &order.first_chunks(limit));
                &remote
            }
            _ => &work,
        };
        ceiling_pass(&cube, warm, threads, 1, 0, &mut || {})?;
    }
    drop(order);
    prepare();
    let passes = plan.passes;

    // Ceiling, loader (one shuffled epoch into tensors), ceiling again and the same epoch with one reader
    // thread, run one after the other, LOCAL_ROUNDS times: an epoch of a cube of a few hundred MB lasts a
    // fraction of a second on a shared machine, so each ratio is taken within a round and the round with
    // the median `ratio_to_ceiling` gives the loader's figures.
    let mut rounds = Vec::with_capacity(LOCAL_ROUNDS);
    for _ in 0..LOCAL_ROUNDS {
        // The ceiling once before the loader epoch and once after it, their mean taken: the machine's speed
        // drifts within a round (ceiling passes of one run differ by up to a fifth), and the two passes
        // bracket the epoch.
        let (before, decoded) = ceiling_pass(&cube, &work, threads, passes, 0, &mut prepare)?;
        prepare();
        let read_before = bytes_read();
        let epoch = loader_epochs(cube_path, None, threads, options.prefetch, 0, plan, options)?;
        let read_during = read_before.zip(bytes_read()).map(|(a, b)| b.saturating_sub(a));
        let (after, _) = ceiling_pass(&cube, &work, threads, passes, 0, &mut prepare)?;
        let ceiling_seconds = f64::midpoint(before, after);
        // The ceiling again, each read also streaming its share of the bytes the epoch delivered.
        let share = (epoch.written / epoch.batches.max(1)) * ceiling_batches / work.len().max(1);
        let (with_writes, _) = ceiling_pass(&cube, &work, threads, passes, share, &mut prepare)?;
        // The same epoch with one reader thread: how reading scales with threads.
        let single_seconds = if threads >= 2 {
            prepare();
            Some(loader_epochs(cube_path, None, 1, options.prefetch, 0, plan, options)?.seconds)
        } else {
            None
        };
        // Time per chunk, not bytes: delivered batches repeat static variables along time.
        let ratio = (ceiling_seconds / (ceiling_batches * passes) as f64)
            / (epoch.seconds / epoch.batches.max(1) as f64);
        rounds.push(Round {
            ratio,
            ceiling_gb_per_s: decoded as f64 / ceiling_seconds / 1e9,
            ratio_with_writes: ratio * with_writes / ceiling_seconds,
            with_writes_gb_per_s: decoded as f64 / with_writes / 1e9,
            epoch,
            read_during,
            single_seconds,
        });
    }
    let mut scalings: Vec<f64> =
        rounds.iter().filter_map(|r| r.single_seconds.map(|single| single / r.epoch.seconds)).collect();
    let thread_scaling = (!scalings.is_empty()).then(|| median(&mut scalings));
    rounds.sort_by(|a, b| a.ratio.total_cmp(&b.ratio));
    let Round {
        ratio: ratio_to_ceiling,
        ceiling_gb_per_s,
        ratio_with_writes: ratio_to_ceiling_with_writes,
        with_writes_gb_per_s: ceiling_with_writes_gb_per_s,
        epoch,
        read_during,
        ..
    } = rounds.swap_remove(rounds.len() / 2);
    let Epoch {
        seconds,
        build_ms,
        batches,
        samples,
        bytes,
        first_ms,
        mut latencies,
        written: _,
        prefetch: epoch_prefetch,
        batches_read: epoch_batches_read,
    } = epoch;
    let loader_gb_per_s = bytes as f64 / seconds / 1e9;
    // The loader's peak: the phases after it (object store, image-chunked copy) hold memory of their own.
    let loader_peak_rss_mb = peak_rss_mb();
    // The same epoch from a store with an object store's latency, hidden (or not) by prefetching.
    let (remote_ratio, remote_requests_per_batch, remote_first_ms) = if options.remote_threads > 0 {
        let store = LatencyStore::new(
            Location::Local(cube_path.to_path_buf()).readable()?,
            Duration::from_millis(REMOTE_LATENCY_MS),
        );
        // The median of three ratios of two remote epochs and two local ones run side by side: a training
        // run's sustained rate, past the first epoch's cold shard indexes.
        let mut ratios = Vec::with_capacity(ROUNDS);
        let (mut requests, mut batches_read, mut first_ms) = (0, 0, Vec::with_capacity(ROUNDS));
        for _ in 0..ROUNDS {
            let before = store.requests();
            let remote = loader_epochs(
                cube_path,
                Some(store.store()),
                threads,
                Some(options.remote_prefetch),
                options.remote_threads,
                remote_plan,
                options,
            )?;
            requests += store.requests() - before;
            batches_read += remote.batches_read;
            first_ms.push(remote.first_ms);
            let local = loader_epochs(cube_path, None, threads, options.prefetch, 0, remote_plan, options)?;
            ratios.push(remote.steady_rate() / local.steady_rate());
        }
        (
            Some(median(&mut ratios)),
            Some(requests as f64 / batches_read.max(1) as f64),
            Some(median(&mut first_ms)),
        )
    } else {
        (None, None, None)
    };
    let latencies_ms = latencies.clone();
    latencies.sort_by(f64::total_cmp);
    // Stored bytes of the batches read: the arrays' chunk files (not their metadata, which a small cube's
    // chunks do not outweigh), times the share of chunks read (those delivered, and those read ahead of a
    // measurement that stops before the end of the epoch); their shard indexes once, as one loader reads
    // them however many epochs it runs (counted every epoch, a small cube's read amplification fell below 1).
    let (mut stored, mut indexes) = (0, 0);
    for v in &meta.variables {
        let path = meta.geometry(v).array_path(&v.name);
        let (bytes, files) = crate::store::dir_bytes_and_files(&cube_path.join(&path).join("c"));
        stored += bytes;
        indexes += files * shard_index_bytes(&cube, &path).unwrap_or(0);
    }
    let share = epoch_batches_read as f64 / batches_in_cube as f64;
    let needed = (stored - indexes.min(stored)) as f64 * share + indexes as f64 * share.min(1.0);
    let read_amplification = read_during.map(|r| r as f64 / needed);

    // Image-chunked copy.
    let image_chunked_note = image_chunked_skipped(&meta, options.image_batches);
    let speedup_vs_image_chunked = if image_chunked_note.is_none() {
        let per_batch = image_chunked_seconds_per_batch(&cube, scratch, options.image_batches, &mut prepare)?;
        Some(per_batch / (seconds / batches.max(1) as f64))
    } else {
        None
    };

    let memory_gb = proc_value("/proc/meminfo", "MemTotal").map_or(0.0, |kb| kb as f64 / 1024.0 / 1024.0);
    Ok(BenchReport {
        cube: cube_path.to_path_buf(),
        loader_gb_per_s,
        samples_per_s: samples as f64 / seconds,
        batches_per_s: batches as f64 / seconds,
        time_to_first_batch_ms: first_ms,
        loader_build_ms: build_ms,
        latency_ms_p50: percentile(&latencies, 0.5),
        latency_ms_p99: percentile(&latencies, 0.99),
        peak_rss_mb: loader_peak_rss_mb,
        ceiling_gb_per_s,
        ratio_to_ceiling,
        ceiling_batches_per_s: batches as f64 / seconds / ratio_to_ceiling,
        ceiling_with_writes_gb_per_s,
        ratio_to_ceiling_with_writes,
        epochs_per_round: passes,
        epoch_batches_measured: plan.batches,
        read_amplification,
        speedup_vs_image_chunked,
        image_chunked_note,
        thread_scaling,
        remote_ratio,
        remote_requests_per_batch,
        remote_time_to_first_batch_ms: remote_first_ms,
        gen_mb_per_s: None,
        gen_peak_rss_mb: None,
        gen_peak_rss_mb_4x: None,
        multires_storage_ratio: None,
        multires_throughput_ratio: None,
        batches,
        batch_bytes: bytes.checked_div(batches).unwrap_or(0),
        cold: options.cold && cold_note.is_none(),
        cold_note,
        levels: meta.levels.iter().map(|l| l.group.clone()).collect(),
        machine: Machine {
            cores: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            memory_gb,
            threads,
            prefetch: epoch_prefetch,
            remote_threads: options.remote_threads,
            remote_prefetch: options.remote_prefetch,
            separate_statics: options.separate_statics,
            mix: options.mix,
            max_pass_seconds: options.max_pass_seconds,
            codec: meta.compression.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        },
        latencies_ms,
        goals: Vec::new(),
    })
    .map(|mut report| {
        report.check_goals();
        report
    })
}

/// One round of the local measurement.
struct Round {
    ratio: f64,
    ceiling_gb_per_s: f64,
    ratio_with_writes: f64,
    with_writes_gb_per_s: f64,
    epoch: Epoch,
    read_during: Option<u64>,
    single_seconds: Option<f64>,
}

/// Bytes of the index of each shard of the array at `path` (0 when it is not sharded).
fn shard_index_bytes(cube: &Cube, path: &str) -> Option<u64> {
    let array = cube.array(path).ok()?;
    match crate::loader::assemble::shard_index_read(&array)? {
        zarrs::storage::byte_range::ByteRange::Suffix(length)
        | zarrs::storage::byte_range::ByteRange::FromStart(_, Some(length)) => Some(length),
        zarrs::storage::byte_range::ByteRange::FromStart(_, None) => None,
    }
}

struct Epoch {
    /// From the built loader to the last batch.
    seconds: f64,
    /// Building the loader.
    build_ms: f64,
    batches: usize,
    samples: usize,
    bytes: usize,
    /// Bytes of every batch the loader wrote: values, statics, masks and native fields.
    written: usize,
    first_ms: f64,
    latencies: Vec<f64>,
    /// The loader's prefetch depth.
    prefetch: usize,
    /// Batches the readers took: those delivered, and those read ahead of a measurement that stops early.
    batches_read: usize,
}

impl Epoch {
    /// Batches per second after the first: the rate a training loop sees once the loader runs, without
    /// opening the cube and reaching the first batch (reported as `time_to_first_batch_ms`).
    fn steady_rate(&self) -> f64 {
        let after_first = self.seconds - (self.first_ms - self.build_ms) / 1e3;
        (self.batches.saturating_sub(1)) as f64 / after_first.max(1e-9)
    }
}

/// A multi-resolution cube against the single-resolution cube of the same inputs and batches: (storage ratio,
/// throughput ratio), as [`BenchReport::multires_storage_ratio`] and
/// [`BenchReport::multires_throughput_ratio`] define them: after a warming epoch of each, the median of three
/// pairs of epochs run one after the other.
///
/// # Errors
/// [`LoaderError`] when a cube cannot be opened or read.
pub fn compare_multires(
    single: &Path,
    multi: &Path,
    options: &BenchOptions,
) -> Result<(f64, f64), LoaderError> {
    let storage =
        Cube::open(single)?.bytes_on_disk() as f64 / Cube::open(multi)?.bytes_on_disk().max(1) as f64;
    let per_second = |e: &Epoch| e.batches as f64 / e.seconds;
    // A first pass of each warms the page cache, so that neither pays for the other's disk reads; then the
    // median of three ratios of epochs run side by side (one epoch is under a second: noise on a shared
    // machine moves a single ratio by ±0.15).
    loader_epoch(single, options.threads, options)?;
    loader_epoch(multi, options.threads, options)?;
    let mut ratios = (0..ROUNDS)
        .map(|_| {
            let a = loader_epoch(single, options.threads, options)?;
            let b = loader_epoch(multi, options.threads, options)?;
            Ok(per_second(&b) / per_second(&a))
        })
        .collect::<Result<Vec<f64>, LoaderError>>()?;
    Ok((storage, median(&mut ratios)))
}

/// Rounds of the side-by-side comparisons whose median is reported.
const ROUNDS: usize = 3;

/// Rounds of ceiling, loader and one-thread epochs: each lasts under a second, and the machine's speed
/// drifts from one second to the next by more than the effects measured (the ceiling alone moved by a
/// fifth and more across runs of one binary), so the median of five is steadier than that of three.
const LOCAL_ROUNDS: usize = 5;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One shuffled epoch delivered into tensors; times the build, the first batch and every wait.
fn loader_epoch(cube: &Path, threads: usize, options: &BenchOptions) -> Result<Epoch, LoaderError> {
    loader_epochs(cube, None, threads, options.prefetch, 0, Plan::WHOLE_EPOCH, options)
}

/// Epochs of the object-store phase.
const REMOTE_EPOCHS: usize = 2;

/// The epochs of `plan` (of each, all batches or its first ones) through `store` when given, with `fetchers`
/// fetch threads in front of it: one loader, timed as [`loader_epoch`].
fn loader_epochs(
    cube: &Path,
    store: Option<zarrs::storage::ReadableStorage>,
    threads: usize,
    prefetch: Option<usize>,
    fetchers: usize,
    plan: Plan,
    options: &BenchOptions,
) -> Result<Epoch, LoaderError> {
    let started = Instant::now();
    let mut builder = Loader::builder(cube)
        .shuffle(0)
        .epochs(plan.passes)
        .threads(threads)
        .fetchers(fetchers)
        .separate_statics(options.separate_statics)
        .mix(options.mix);
    if let Some(prefetch) = prefetch {
        builder = builder.prefetch(prefetch);
    }
    if let Some(store) = store {
        builder = builder.store(store);
    }
    let mut loader = builder.build()?;
    let built = Instant::now();
    let mut epoch = Epoch {
        seconds: 0.0,
        build_ms: (built - started).as_secs_f64() * 1e3,
        batches: 0,
        samples: 0,
        bytes: 0,
        written: 0,
        first_ms: 0.0,
        latencies: Vec::new(),
        prefetch: loader.prefetch_depth(),
        batches_read: 0,
    };
    let limit = plan.limit();
    while limit.is_none_or(|limit| epoch.batches < limit) {
        let waited = Instant::now();
        let Some(batch) = loader.next() else { break };
        let batch = batch?;
        epoch.latencies.push(waited.elapsed().as_secs_f64() * 1e3);
        if epoch.batches == 0 {
            epoch.first_ms = started.elapsed().as_secs_f64() * 1e3;
        }
        epoch.batches += 1;
        epoch.samples += batch.len();
        epoch.bytes += (batch.data.len() + batch.statics.len()) * 4;
        epoch.written += written_bytes(&batch);
        (options.deliver)(batch);
    }
    epoch.seconds = built.elapsed().as_secs_f64();
    // Batches the readers took, delivered or read ahead.
    epoch.batches_read = loader.stop();
    Ok(epoch)
}

/// Bytes of every buffer the loader wrote for `batch`: values, statics, masks and native fields.
fn written_bytes(batch: &crate::Batch) -> usize {
    let native: usize = batch.native.iter().map(|f| f.data.len() * 4 + f.mask.len()).sum();
    (batch.data.len() + batch.statics.len()) * 4 + batch.mask.len() + native
}

/// The delivery of a library caller that has no tensors: a read of every value, then the batch given back
/// for the next ones, as a training loop done with it gives it back ([`crate::Batch::recycle`]; the tensors
/// of `cubeload-torch` give theirs back when freed).
fn read_every_value(batch: crate::Batch) {
    std::hint::black_box(batch.data.iter().sum::<f32>());
    batch.recycle();
}

/// One pass of the ceiling: every `(variable, chunk)` of `work` read and decoded as the loader reads them,
/// by the loader's own reading code, with nothing assembled; the cube opened afresh (untimed, then
/// `prepare`), as each loader epoch opens it and reads its shard indexes anew. With `writes` > 0, each read
/// then streams that many bytes from the values it decoded to a buffer of its thread, as
/// [`read_chunks`] says. Returns (seconds, decoded bytes).
fn ceiling_pass(
    cube: &Cube,
    work: &[(usize, ChunkId)],
    threads: usize,
    passes: usize,
    writes: usize,
    prepare: &mut impl FnMut(),
) -> Result<(f64, u64), LoaderError> {
    let stored = Assembler::new(cube, &[], Transform::default())?;
    // The buffers written to, faulted in before the pass, as the loader's batch buffers are once its pool
    // has them (apart from that pool, whose buffers the loader's next epochs take).
    let mut sinks: Vec<Vec<u8>> = (0..threads)
        .map(|_| {
            // Not zeros, which may come as pages mapped but untouched: written, its pages are there.
            let mut sink = vec![1; writes];
            sink.clear();
            sink
        })
        .collect();
    prepare();
    let started = Instant::now();
    let decoded = read_chunks(&stored, work, passes, &mut sinks, writes)?;
    Ok((started.elapsed().as_secs_f64(), decoded))
}

/// The least time a measurement reads for: an epoch of a small cube (the demo's 70 batches, about 10 ms)
/// is mostly the loader's start (its threads, its first batch, the first fill of its prefetch window) and
/// the machine's noise, so such a cube is measured over several epochs of one loader, as a training run
/// reads it, against as many ceiling passes. An epoch of the default cube lasts longer: one of each.
const MIN_PASS_SECONDS: f64 = 0.05;

/// The most time a measurement reads for: the bench runs some thirty of them, and an epoch of a user's cube
/// of hundreds of GB lasts many minutes. Of a cube whose ceiling pass would last longer, each measurement
/// reads the first batches of the shuffled epoch, as many as last this long (the default cube's pass takes
/// about 0.12 s).
pub const MAX_PASS_SECONDS: f64 = 1.0;

/// Batches whose chunks are read to estimate how long a ceiling pass takes.
const CALIBRATION_BATCHES: usize = 64;

/// What each measurement reads: `passes` epochs of one loader (and as many ceiling passes), each whole or
/// its first `batches`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Plan {
    passes: usize,
    batches: Option<usize>,
}

impl Plan {
    const WHOLE_EPOCH: Plan = Plan { passes: 1, batches: None };

    /// The batches delivered in all, when cut short.
    fn limit(self) -> Option<usize> {
        self.batches.map(|n| n * self.passes)
    }

    /// The plan for a cube of `batches` batches whose ceiling takes `per_batch` seconds a batch. Cold, one
    /// epoch at most: only the first pass would read the disk.
    fn new(per_batch: f64, batches: usize, options: &BenchOptions) -> Plan {
        let (seconds, max) = (per_batch * batches as f64, options.max_pass_seconds);
        if seconds > max {
            // Fewer than the epoch's batches, or the whole epoch.
            let n = (max / per_batch.max(1e-9)).ceil().max(1.0) as usize;
            return if n < batches { Plan { passes: 1, batches: Some(n) } } else { Plan::WHOLE_EPOCH };
        }
        if options.cold {
            return Plan::WHOLE_EPOCH;
        }
        let passes = (MIN_PASS_SECONDS / seconds.max(1e-6)).ceil().clamp(1.0, 1000.0) as usize;
        Plan { passes, batches: None }
    }
}

/// The `(variable, chunk)` reads of the ceiling for the batches of chunks `batches`: theirs, a static
/// variable's once per tile (a variable on a level of a multi-resolution cube, whose chunks do not follow
/// the batches', the same share of its chunks).
fn ceiling_work(meta: &CubeMeta, batches: &[ChunkId]) -> Vec<(usize, ChunkId)> {
    let all = |i: usize, v: &VariableMeta| {
        let [ct, cy, cx] = meta.geometry(v).chunk_counts();
        let ct = if v.is_static { 1 } else { ct };
        (0..ct).flat_map(move |t| (0..cy).flat_map(move |y| (0..cx).map(move |x| (i, [t, y, x]))))
    };
    let share = batches.len() as f64 / meta.chunk_counts().iter().product::<usize>().max(1) as f64;
    let mut work = Vec::new();
    for (i, v) in meta.variables.iter().enumerate() {
        if v.level.is_some() {
            let chunks: Vec<_> = all(i, v).collect();
            let n = (chunks.len() as f64 * share).ceil() as usize;
            work.extend(chunks.into_iter().take(n));
        } else if v.is_static {
            let mut seen = std::collections::HashSet::new();
            work.extend(
                batches.iter().filter(|id| seen.insert((id[1], id[2]))).map(|id| (i, [0, id[1], id[2]])),
            );
        } else {
            work.extend(batches.iter().map(|&id| (i, id)));
        }
    }
    work
}

/// Reads and decodes chunk `id` of variable `i` for every `(i, id)` of `work`, `passes` times over, with a
/// thread for each of `sinks`, started once as the loader's readers are for all its epochs (threads started
/// for each pass of a small cube took longer than its reads); returns the decoded bytes. With `writes` > 0, each read then streams `writes` bytes to its
/// thread's sink (the values decoded, over again as often as they fit), by the non-temporal stores that
/// write the loader's batches: the bytes a loader must deliver, written at the machine's rate, with
/// nothing rearranged.
fn read_chunks(
    stored: &Assembler,
    work: &[(usize, ChunkId)],
    passes: usize,
    sinks: &mut [Vec<u8>],
    writes: usize,
) -> Result<u64, LoaderError> {
    let threads = sinks.len();
    let reads = work.len() * passes;
    let read = |i: usize| (i < reads).then(|| work[i % work.len()]);
    // As far ahead as the loader's readers hint: `HINT_AHEAD` batches (one read per variable) per thread.
    let ahead = HINT_AHEAD * threads * stored.variable_count();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let handles: Vec<_> = sinks
            .iter_mut()
            .map(|sink| {
                let next = &next;
                scope.spawn(move || -> Result<u64, LoaderError> {
                    let mut bytes = 0u64;
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((var, id)) = read(i) else { return Ok(bytes) };
                        // Reading ahead as the loader's readers do (the same distance, in reads).
                        if let Some((var, id)) = read(i + ahead) {
                            stored.hint_stored(var, id);
                        }
                        let write =
                            |values: &[f32]| stream_over(values, &mut sink.spare_capacity_mut()[..writes]);
                        bytes += stored.decode_stored_then(var, id, write)? as u64;
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("reader thread")).sum()
    })
}

/// Fills `sink` with the bytes of `values`, over again as often as they fit, by the stores that write the
/// loader's batches ([`transpose::stream_rows`]). Nothing is written when `values` is empty.
fn stream_over(values: &[f32], sink: &mut [MaybeUninit<u8>]) {
    let bytes: &[u8] = bytemuck::cast_slice(values);
    if bytes.is_empty() || sink.is_empty() {
        return;
    }
    let (whole, rest) = (sink.len() / bytes.len(), sink.len() % bytes.len());
    // No fence: the sink is this thread's, never read by another.
    transpose::stream_rows(std::iter::repeat_n(bytes, whole).chain([&bytes[..rest]]), sink);
}

/// The variables of the image-chunked copy: the usual recipe has every variable on one grid, so those on the
/// target grid that vary in time (float32, as that recipe's are).
fn image_chunked_variables(meta: &CubeMeta) -> Vec<&VariableMeta> {
    meta.variables
        .iter()
        .filter(|v| !v.is_static && v.level.is_none() && v.dtype == crate::plan::DType::Float32)
        .collect()
}

/// Why the image-chunked copy of `meta`'s cube is not made (`None` when it is).
fn image_chunked_skipped(meta: &CubeMeta, image_batches: usize) -> Option<String> {
    let dynamic = image_chunked_variables(meta);
    let [pt, py, px] = meta.padded_shape;
    let skipped = if image_batches == 0 {
        "--image-batches 0"
    } else if meta.layout.shuffled.is_some() {
        "an `order: shuffled` cube's batches are samples from all over the grid, which no image-chunked copy \
         holds together"
    } else if dynamic.is_empty() {
        "no float32 variable on the target grid varies in time"
    } else if (pt * py * px * 4 * dynamic.len()) as u64 > IMAGE_CHUNKED_MAX_BYTES {
        "its image-chunked copy would take over 4 GiB"
    } else {
        return None;
    };
    Some(format!("speedup_vs_image_chunked is not measured: {skipped}"))
}

/// The largest image-chunked copy made.
const IMAGE_CHUNKED_MAX_BYTES: u64 = 4 << 30;

/// Copies the time-varying float32 variables image by image (`(1, 200, 200)` chunks, zstd level 3 as
/// zarr-python writes by default) and times reading `n` of the cube's batches from the copy, `prepare` run
/// between the two (`--cold` drops the page cache there). `None` for layouts other than tiled cubes, cubes
/// without such a variable, or copies over 4 GB.
fn image_chunked_seconds_per_batch(
    cube: &Cube,
    scratch: &Path,
    n: usize,
    prepare: &mut impl FnMut(),
) -> Result<f64, LoaderError> {
    let meta = cube.meta();
    let layout = meta.layout;
    let dynamic = image_chunked_variables(meta);
    let [pt, py, px] = meta.padded_shape;
    let dir = scratch.join("image-chunked.zarr");
    let fail = |name: &str, chunk: ChunkId, e: &dyn std::fmt::Display| LoaderError::Read {
        variable: format!("{name} (its image-chunked copy in {})", dir.display()),
        chunk,
        message: e.to_string(),
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| fail("every variable", [0, 0, 0], &e))?;
    let store = Arc::new(FilesystemStore::new(&dir).map_err(|e| fail("every variable", [0, 0, 0], &e))?);
    let mut copies = Vec::new();
    for v in &dynamic {
        let source = cube.array(&v.name)?;
        let whole = ArraySubset::new_with_shape(vec![pt as u64, py as u64, px as u64]);
        let fail = |e: &dyn std::fmt::Display| fail(&v.name, [0, 0, 0], e);
        let values = source.retrieve_array_subset::<Vec<f32>>(&whole).map_err(|e| fail(&e))?;
        let mut builder = ArrayBuilder::new(
            vec![pt as u64, py as u64, px as u64],
            vec![1, 200, 200],
            data_type::float32(),
            f32::NAN,
        );
        builder.bytes_to_bytes_codecs(vec![Arc::new(ZstdCodec::new(3, false))]);
        let copy = builder.build(store.clone(), &format!("/{}", v.name)).map_err(|e| fail(&e))?;
        copy.store_metadata().map_err(|e| fail(&e))?;
        copy.store_array_subset(&whole, values.as_slice()).map_err(|e| fail(&e))?;
        copies.push((v.name.as_str(), copy));
    }
    // The same batches as the loader reads: one (T, h, w) block per variable, here spread over T images.
    let [ct, cy, cx] = meta.chunk_counts();
    let ids: Vec<ChunkId> = (0..n).map(|i| [i % ct, (i * 7) % cy, (i * 13) % cx]).collect();
    prepare();
    let started = Instant::now();
    for &id in &ids {
        for (name, copy) in &copies {
            let values = copy
                .retrieve_array_subset::<Vec<f32>>(&layout.chunk_subset(false, id))
                .map_err(|e| fail(name, id, &e))?;
            std::hint::black_box(values);
        }
    }
    let per_batch = started.elapsed().as_secs_f64() / n as f64;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(per_batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ceiling with writes streams the values it decoded, over again, into every byte of the sink: at
    /// every alignment of the sink, and for sinks shorter and longer than the values.
    #[test]
    fn writes_fill_the_sink_with_the_values_over_again() {
        let values: Vec<f32> = (0..37u16).map(|i| f32::from(i) * 1.5 - 7.0).collect();
        let bytes: &[u8] = bytemuck::cast_slice(&values);
        // SAFETY: every byte of the sinks below is initialized before it is written or read.
        let read = |sink: &[MaybeUninit<u8>]| -> Vec<u8> {
            sink.iter().map(|b| unsafe { b.assume_init() }).collect()
        };
        for len in [0, 3, 64, 148, 1000, 4096 + 5] {
            for offset in 0..4 {
                let mut sink = vec![MaybeUninit::new(0xAAu8); offset + len + 8];
                stream_over(&values, &mut sink[offset..offset + len]);
                let sink = read(&sink);
                let expected: Vec<u8> = bytes.iter().copied().cycle().take(len).collect();
                assert_eq!(&sink[offset..offset + len], &expected[..], "{len} bytes at {offset}");
                let around = sink[..offset].iter().chain(&sink[offset + len..]);
                assert!(around.into_iter().all(|&b| b == 0xAA), "{len} bytes at {offset}");
            }
        }
        // Nothing decoded: nothing written.
        let mut sink = [MaybeUninit::new(1u8); 16];
        stream_over(&[], &mut sink);
        assert_eq!(read(&sink), [1; 16]);
    }

    /// Short passes are repeated until they last `MIN_PASS_SECONDS`, long ones cut to `MAX_PASS_SECONDS`;
    /// cold, never repeated.
    #[test]
    fn measurements_last_long_enough_and_not_too_long() {
        let (warm, cold) = (BenchOptions::default(), BenchOptions { cold: true, ..BenchOptions::default() });
        let whole = Plan::WHOLE_EPOCH;
        assert_eq!(Plan::new(0.0005, 240, &warm), whole);
        assert_eq!(Plan::new(0.001, 50, &warm), whole);
        assert_eq!(Plan::new(0.0001, 70, &warm), Plan { passes: 8, batches: None });
        assert_eq!(Plan::new(0.0001, 70, &cold), whole);
        assert_eq!(Plan::new(0.001, 1000, &warm), whole);
        for options in [&warm, &cold] {
            assert_eq!(Plan::new(0.002, 300_000, options), Plan { passes: 1, batches: Some(500) });
        }
        let shorter = BenchOptions { max_pass_seconds: 0.1, ..BenchOptions::default() };
        assert_eq!(Plan::new(0.0005, 240, &shorter), Plan { passes: 1, batches: Some(200) });
        // Over the maximum by less than a batch: the whole epoch, once.
        let tiny = BenchOptions { max_pass_seconds: 0.002, ..BenchOptions::default() };
        assert_eq!(Plan::new(0.002 / 69.7, 70, &tiny), whole);
        assert_eq!(Plan::new(0.002 / 60.0, 70, &tiny), Plan { passes: 1, batches: Some(60) });
        for seconds in [0.001, 0.003, 0.011, 0.02, 0.049] {
            let Plan { passes, batches } = Plan::new(seconds / 70.0, 70, &warm);
            assert!(batches.is_none() && passes as f64 * seconds >= MIN_PASS_SECONDS, "{seconds}: {passes}");
            assert!((passes - 1) as f64 * seconds < MIN_PASS_SECONDS, "{seconds}: {passes}");
        }
    }

    /// The ceiling of part of an epoch reads the chunks of its batches: each time-varying variable's chunk
    /// of every batch, a static variable's once per tile.
    #[test]
    fn the_ceiling_of_some_batches_reads_their_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let report = crate::demo::build_cube(dir.path(), &crate::demo::DemoSpec::default(), Some(2)).unwrap();
        let meta = Cube::open(&report.path).unwrap().meta().clone();
        let names: Vec<(&str, bool)> =
            meta.variables.iter().map(|v| (v.name.as_str(), v.is_static)).collect();
        assert_eq!(names, [("t2m", false), ("ndvi", false), ("landcover", true)]);
        // 1 × 7 × 10 chunks: every one of the two time-varying variables, one per tile of the static.
        let every: Vec<ChunkId> = (0..7).flat_map(|y| (0..10).map(move |x| [0, y, x])).collect();
        assert_eq!(ceiling_work(&meta, &every).len(), 70 * 3);
        let batches = [[0, 3, 4], [0, 1, 2], [0, 3, 5]];
        let expected: Vec<(usize, ChunkId)> = [0, 1]
            .into_iter()
            .flat_map(|i| batches.map(|id| (i, id)))
            .chain(batches.map(|[_, y, x]| (2, [0, y, x])))
            .collect();
        assert_eq!(ceiling_work(&meta, &batches), expected);
        // Passes over them, by the same threads: each read once per pass.
        let cube = Cube::open(&report.path).unwrap();
        let (_, once) = ceiling_pass(&cube, &expected, 2, 1, 0, &mut || {}).unwrap();
        let (_, thrice) = ceiling_pass(&cube, &expected, 2, 3, 0, &mut || {}).unwrap();
        assert!(once > 0);
        assert_eq!(thrice, 3 * once);
    }

    /// A goal says whether it is met and, when not, by how much, relative to the goal.
    #[test]
    fn goals_say_by_how_much_they_are_missed() {
        let missed = Goal::at_least("ratio_to_ceiling", 0.64, 0.8);
        assert!(!missed.met);
        assert!((missed.missed_by.unwrap() - 0.2).abs() < 1e-12, "{missed:?}");
        let met = Goal::at_least("ratio_to_ceiling", 0.8, 0.8);
        assert!(met.met && met.missed_by.is_none(), "the bound itself meets the goal");
        let over = Goal::at_most("time_to_first_batch_ms", 75.0, 50.0);
        assert!(!over.met);
        assert!((over.missed_by.unwrap() - 0.5).abs() < 1e-12, "{over:?}");
        assert_eq!(Goal::at_most("read_amplification", 1.0, 1.01).missed_by, None);
        assert_eq!(over.goal, "<= 50");
    }
}
