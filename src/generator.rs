//! `cubeload gen`: sources → warp + resample in space, aggregate in time → batch-aligned Zarr chunks.
//!
//! The unit of work is a *block*: one variable, one row of batch chunks, one time window. A block is warped
//! from its sources, aggregated in time and written as whole chunks (or shards), so memory stays bounded by
//! a few blocks (one per thread) whatever the cube's size. Blocks run on plain threads, not on rayon's pool:
//! GDAL reads block, and each thread keeps its own GDAL handles (GDAL datasets are `Send`, not `Sync`).
//!
//! The cube is built in a hidden staging directory beside the output and renamed into place only once its
//! completion marker is written: a failed or interrupted run never leaves something that looks like a
//! complete cube, and never touches an existing one (`--overwrite` and `--append` swap the previous cube out
//! only at the end). Before the rename every file of the cube is flushed to storage (`durable`), so that a
//! power cut cannot leave the rename on disk without the chunks it points to.
//!
//! Every finished block is recorded in the cube's [manifest](crate::cube::manifest) with the checksums of
//! its files, so that the same run started again after a crash continues where it stopped, `--append`
//! reuses the blocks of the previous cube whose inputs did not change, and `--part K/N` runs share the
//! blocks of one cube between independent jobs that `--finalize` completes. Statistics are merged in block
//! order, not in the order threads finish: however a cube was made, its bytes are the same.

mod durable;
mod lock;
pub(crate) use lock::held as run_in_progress;
mod shuffled;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant as Clock;

use sha2::{Digest as _, Sha256};

use crate::config::Aggregation;
use crate::cube::manifest::{
    BlockId, BlockRecord, FileRecord, MANIFEST_FILE, Manifest, ManifestHeader, ManifestWriter,
};
use crate::cube::reader::{Cube, is_cubeload_cube};
use crate::cube::writer::{BlockSummary, CubeWriter};
use crate::cube::{CubeError, CubeMeta, RunningStats};
use crate::grid::Grid;
use crate::plan::{Plan, PlanError, VariablePlan};
use crate::source::warp::warp_window;
use crate::source::{FileView, SourceError};
use crate::store::Location;
use crate::time::{self, StepSources};
use lock::RunLock;

/// A generation error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenError {
    /// Planning failed (config or sources).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Reading a source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Writing the cube failed.
    #[error(transparent)]
    Cube(#[from] CubeError),
    /// A worker thread panicked (a bug).
    #[error("a generation thread panicked: {0}")]
    Panic(String),
    /// An input file changed while the run read it.
    #[error(
        "{path} (variable `{variable}`) changed while this run read it: the blocks made from it may mix its two \
         versions, {}",
        if *.discarded { "so the run's work was discarded; run it again" } else {
            "so this part stops; run every part again with --overwrite"
        }
    )]
    InputChanged {
        /// The input file.
        path: PathBuf,
        /// Its variable.
        variable: String,
        /// Whether the staging directory was removed (a whole run; parts share theirs).
        discarded: bool,
    },
    /// A half-made cube from another configuration or other inputs is in the way.
    #[error(
        "{output}: an unfinished generation of this cube from {difference} is kept in {staging}; run the \
         original config again to resume it, or {}",
        if *.parts {
            "delete that directory to discard it, once no part of the other config runs (--overwrite \
             does not go with --part, and --finalize keeps it)"
        } else {
            "add --overwrite to discard it"
        }
    )]
    Changed {
        /// The cube being generated.
        output: PathBuf,
        /// Where the half-made cube is.
        staging: PathBuf,
        /// What differs: the configuration, or the input files added, removed or changed since.
        difference: String,
        /// Whether a part or `--finalize` was refused, for which `--overwrite` discards nothing.
        parts: bool,
    },
    /// Parts of one cube run with different configurations or inputs.
    #[error(
        "{output}: parts of this cube run with different configurations or inputs ({files} against the \
         first part's manifest): run every part with one config, those of the other one again"
    )]
    OtherParts {
        /// The cube being generated.
        output: PathBuf,
        /// The part manifests that differ from the first.
        files: String,
    },
    /// Flags that do not go with this output.
    #[error("{path}: {message}")]
    Flags {
        /// The cube.
        path: PathBuf,
        /// Which, and why.
        message: String,
    },
    /// `--append` cannot extend this cube with this configuration.
    #[error("{path}: cannot append: {message}")]
    Append {
        /// The cube.
        path: PathBuf,
        /// Why not.
        message: String,
    },
    /// Another run is writing this cube.
    #[error(
        "{output}: another `cubeload gen` is writing this cube (it holds {lock}); wait for it to end (parts \
         of one cube may run together, but not beside a whole run, --append or --finalize)",
        lock = lock.display()
    )]
    Busy {
        /// The cube being generated.
        output: PathBuf,
        /// The lock file the other run holds.
        lock: PathBuf,
    },
    /// `--finalize` found blocks that no part has written (yet).
    #[error("{path}: cannot finalize: {message}")]
    Unfinished {
        /// The cube.
        path: PathBuf,
        /// What is missing.
        message: String,
    },
}

impl GenError {
    /// Whether the configuration or the flags are at fault (exit code 2) rather than the run or what is on
    /// disk (1).
    #[must_use]
    pub fn is_usage(&self) -> bool {
        match self {
            GenError::Plan(PlanError::Config(_))
            | GenError::Append { .. }
            | GenError::Changed { .. }
            | GenError::OtherParts { .. }
            | GenError::Flags { .. }
            | GenError::Cube(CubeError::OutputTaken { .. }) => true,
            GenError::Plan(PlanError::Source(e)) | GenError::Source(e) => e.is_usage(),
            _ => false,
        }
    }
}

/// One share of a partitioned generation: part `index` of `count` (0-based, as `SLURM_ARRAY_TASK_ID` and
/// `JOB_COMPLETION_INDEX` count). Blocks go round-robin to parts: disjoint, balanced, deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// This part.
    pub index: usize,
    /// Parts in all.
    pub count: usize,
}

impl Part {
    /// Whether block `i` (in the cube's block order) belongs to this part.
    #[must_use]
    pub fn owns(&self, i: usize) -> bool {
        i % self.count == self.index
    }

    fn manifest_file(&self) -> String {
        format!("cubeload_manifest.part-{:05}-of-{:05}.jsonl", self.index, self.count)
    }
}

impl std::str::FromStr for Part {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (k, n) = text.split_once('/').ok_or_else(|| format!("`{text}`: expected K/N, e.g. 0/8"))?;
        let parse =
            |x: &str| x.trim().parse::<usize>().map_err(|_| format!("`{text}`: expected K/N, e.g. 0/8"));
        let (index, count) = (parse(k)?, parse(n)?);
        if count == 0 || index >= count {
            return Err(format!(
                "`{text}`: K counts from 0 (as SLURM_ARRAY_TASK_ID and JOB_COMPLETION_INDEX do) and must be \
                 below N"
            ));
        }
        Ok(Part { index, count })
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Options of one generation run.
#[derive(Debug, Clone, Default)]
pub struct GenOptions {
    /// Worker threads. > default: the number of cores
    pub threads: Option<usize>,
    /// Replace an existing cube at the output path (never anything else).
    pub overwrite: bool,
    /// Memory for one block's accumulators; a chunk row wider than this is split along x, so that memory
    /// does not grow with the grid. > default: 32 MiB
    pub block_bytes: Option<usize>,
    /// Extend the cube at the output path along time with new inputs, reusing its unchanged blocks; the
    /// previous cube stays intact until the new one is complete.
    pub append: bool,
    /// Write only this share of the blocks into the shared staging directory, and stop.
    pub part: Option<Part>,
    /// Check that the parts wrote every block, then complete the cube.
    pub finalize: bool,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct GenReport {
    /// Where the cube is.
    pub path: PathBuf,
    /// Its metadata.
    pub meta: CubeMeta,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Blocks of the cube (of this part for `--part`).
    pub blocks: usize,
    /// Blocks kept from an interrupted run or from the previous cube (`--append`) instead of recomputed.
    pub reused: usize,
    /// `Some` for a `--part` run: the cube is not complete yet.
    pub part: Option<Part>,
    /// What the run could not tidy up after it succeeded (a replaced cube it may not delete), to be said.
    pub warnings: Vec<String>,
}

/// What [`build`] produced.
#[derive(Debug)]
enum Built {
    /// A complete cube.
    Complete { meta: CubeMeta, blocks: usize, reused: usize },
    /// One part's share.
    Part { meta: CubeMeta, blocks: usize, reused: usize },
}

/// What a run is asked to do besides computing blocks.
struct Run<'a> {
    options: &'a GenOptions,
    /// The plan's [`fingerprint`].
    fingerprint: String,
    /// The previous cube, whose unchanged blocks are reused (`--append`).
    reuse_from: Option<&'a Path>,
    progress: &'a dyn Fn(u64, u64),
}

/// One unit of work.
#[derive(Debug, Clone, Copy)]
struct Block {
    var: usize,
    it: usize,
    iy: usize,
    /// First shard (along x) of the chunk row that this block covers.
    first_shard: usize,
    /// Shards covered.
    n_shards: usize,
}

/// Default memory for one block's accumulators (see [`GenOptions::block_bytes`]).
const BLOCK_BUDGET_BYTES: usize = 32 << 20;

/// Bytes of warped source bands held at once per thread.
const WARP_BUDGET_BYTES: usize = 64 << 20;

/// [`GenError::Busy`] when another run holds the lock on `output`'s runs and this one would need it alone
/// (a whole run, `--append`, `--finalize`): said before planning, which reads every input, rather than
/// after it. [`generate`] takes the lock itself and decides; parts share it, and are left to it.
///
/// # Errors
/// [`GenError::Busy`], naming the lock file.
pub fn refuse_if_busy(output: &Path, options: &GenOptions) -> Result<(), GenError> {
    if options.part.is_none() && !matches!(Location::parse(output), Location::S3 { .. }) && lock::held(output)
    {
        return Err(GenError::Busy { output: output.to_path_buf(), lock: sibling(output, "cubeload-lock") });
    }
    Ok(())
}

/// Generates the cube of `plan`; `progress(done, total)` is called on the calling thread after each block.
///
/// # Errors
/// [`GenError`] naming the file, variable or path at fault; the output path is then untouched, and the
/// blocks finished so far are kept for the next run of the same configuration. [`GenError::Busy`] when
/// another run writes the same output (`--part` runs of one cube may run together).
pub fn generate(
    plan: &Plan,
    options: &GenOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<GenReport, GenError> {
    let location = Location::parse(&plan.config.output);
    if let Location::S3 { .. } = location {
        return generate_remote(plan, &location, options, progress);
    }
    // The cube, its lock and its staging directory are made under the output's nearest existing ancestor,
    // which must be a directory.
    let output = &plan.config.output;
    if let Some(file) = output.ancestors().skip(1).find(|a| !a.as_os_str().is_empty() && a.exists())
        && !file.is_dir()
    {
        let message = format!("{} is a file: a cube cannot be made under it", file.display());
        return Err(CubeError::OutputTaken { path: output.clone(), message }.into());
    }
    let _lock = RunLock::acquire(output, options.part.is_some())?;
    generate_locked(plan, options, progress, true)
}

/// [`generate`] to a filesystem, once the output's [`RunLock`] is held. With `durable`, the cube is flushed
/// to storage before it is renamed into place (not for the local copy of a cube bound for an object store,
/// which is uploaded and removed: after a power cut the next run checks its blocks against the manifest).
fn generate_locked(
    plan: &Plan,
    options: &GenOptions,
    progress: &dyn Fn(u64, u64),
    durable: bool,
) -> Result<GenReport, GenError> {
    let started = Clock::now();
    let output = plan.config.output.clone();
    // Parts only write into the staging directory; what is at the output path matters when a run moves the
    // cube there.
    if options.part.is_none() {
        restore_previous(&output)?;
        check_output(&output, options)?;
    }
    if options.append {
        check_append(plan, &output)?;
    }
    let staging = staging_dir(&output);
    let fingerprint = fingerprint(plan);
    prepare_staging(&output, &staging, plan, &fingerprint, options)?;
    let run = Run { options, fingerprint, reuse_from: options.append.then_some(output.as_path()), progress };
    let built = if plan.layout.shuffled.is_some() {
        shuffled::build(plan, &staging, &run)
    } else {
        build(plan, &staging, &run)
    };
    let built = built.inspect_err(|_| {
        // Keep what an interrupted or failed run finished for the next run; nothing finished, nothing kept.
        // Never the blocks of parts, of this configuration or another (`--finalize` of another deleted them).
        let scratch = shuffled::scratch(&staging);
        let nothing = |dir: &Path| {
            Manifest::load(dir).is_ok_and(|m| m.records.is_empty() && m.other_runs.is_empty())
                && !crate::cube::manifest::holds_parts(dir)
        };
        if options.part.is_none() && !options.finalize && nothing(&staging) && nothing(&scratch) {
            let _ = std::fs::remove_dir_all(&staging);
            let _ = std::fs::remove_dir_all(&scratch);
        }
    })?;
    // An input replaced or rewritten while the blocks were made has been read in two versions, which the
    // manifest, recording the first, would not tell apart.
    if let Some((variable, path)) = changed_input(plan)? {
        let discarded = options.part.is_none();
        if discarded {
            remove_dir(&staging)?;
            let scratch = shuffled::scratch(&staging);
            if scratch.exists() {
                remove_dir(&scratch)?;
            }
        }
        return Err(GenError::InputChanged { path, variable, discarded });
    }
    let seconds = started.elapsed().as_secs_f64();
    match built {
        Built::Part { meta, blocks, reused } => Ok(GenReport {
            path: staging,
            meta,
            seconds,
            blocks,
            reused,
            part: options.part,
            warnings: Vec::new(),
        }),
        Built::Complete { meta, blocks, reused } => {
            if durable {
                durable::sync_tree(&staging)?;
            }
            let left = swap_into_place(&staging, &output)?;
            let warnings = left.map(|w| format!("{}: {w}", output.display())).into_iter().collect();
            if durable {
                durable::sync_parent(&output)?;
            }
            Ok(GenReport { path: output, meta, seconds, blocks, reused, part: None, warnings })
        }
    }
}

/// The first input of `plan` whose content differs from what was hashed when the run began, and its
/// variable.
fn changed_input(plan: &Plan) -> Result<Option<(String, PathBuf)>, GenError> {
    for v in &plan.variables {
        for (file, stamp) in v.source.provenance.iter().zip(&v.source.stamps) {
            if file.changed_since(stamp)? {
                return Ok(Some((v.name.clone(), file.path.clone())));
            }
        }
    }
    Ok(None)
}

/// An object-store output: the cube is made (and resumed) in a local directory keyed by the URL under the
/// temporary directory (`TMPDIR`), then uploaded with its completion marker last.
fn generate_remote(
    plan: &Plan,
    location: &Location,
    options: &GenOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<GenReport, GenError> {
    let url = location.display_path();
    if options.append || options.part.is_some() || options.finalize {
        return Err(GenError::Flags {
            path: url,
            message:
                "--append, --part and --finalize need the cube on a filesystem: make it there, then copy \
                      it to the object store"
                    .to_string(),
        });
    }
    if let Location::S3 { bucket, .. } = location
        && bucket.is_empty()
    {
        let message = format!("{}: no bucket name (s3://BUCKET/PREFIX)", url.display());
        return Err(PlanError::Config(crate::config::ConfigError::invalid("output", message)).into());
    }
    let key = hex(&Sha256::digest(url.to_string_lossy().as_bytes()));
    let mut local_plan = plan.clone();
    local_plan.config.output =
        std::env::temp_dir().join(format!("cubeload-upload-{}", &key[..16])).join("cube.zarr");
    let local = local_plan.config.output.clone();
    let fingerprint = fingerprint(&local_plan);
    // Before the cube is made: what is at the URL, the bucket, the permission to write there.
    crate::store::check_replaceable(location, options.overwrite, &fingerprint)?;
    // Held until the upload ends: another run to the same URL would share (and delete) the local cube.
    let _lock = RunLock::acquire(&local, false)?;
    // What earlier runs' removals of their copies left (stopped while deleting): never uploaded again.
    if let Some(dir) = local.parent() {
        remove_removed_copies(dir);
    }
    // A cube made by an earlier run whose upload failed: upload it again rather than make it again, if every
    // file of it is there as its manifest records it (an upload deletes the objects the copy lacks).
    let made = Manifest::fingerprint(&local)
        .is_some_and(|f| f == fingerprint)
        .then(|| Cube::open(&local).ok())
        .flatten()
        .filter(|_| crate::verify::verify(&local).is_ok_and(|report| report.problems.is_empty()));
    let mut report = if let Some(cube) = made {
        let meta = cube.meta().clone();
        let blocks = Manifest::load(&local)?.records.len();
        GenReport {
            path: local.clone(),
            meta,
            seconds: 0.0,
            blocks,
            reused: blocks,
            part: None,
            warnings: Vec::new(),
        }
    } else {
        if local.exists() {
            remove_dir(&local)?; // an earlier configuration's, never uploaded
        }
        generate_locked(&local_plan, options, progress, false)?
    };
    let started = Clock::now();
    crate::store::upload(&local, location, options.overwrite, &fingerprint).map_err(|e| match e {
        CubeError::Zarr { path, message } => CubeError::Zarr {
            path,
            message: format!(
                "{message}; the cube is made and kept in {}: run the same command again to upload it (it is \
                 not made again)",
                local.display()
            ),
        },
        other => other,
    })?;
    report.seconds += started.elapsed().as_secs_f64();
    if let Some(dir) = local.parent() {
        // Renamed first, in one step: a run stopped while deleting it leaves no copy that a later run would
        // take for a cube made and not uploaded.
        let removed = removed_copy(dir);
        if std::fs::rename(dir, &removed).is_ok() {
            let _ = std::fs::remove_dir_all(&removed);
        }
    }
    report.path = url;
    Ok(report)
}

/// Where a local copy `dir` goes to be deleted once uploaded: `dir.removed-PID`.
fn removed_copy(dir: &Path) -> PathBuf {
    let name = dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().to_string());
    dir.with_file_name(format!("{name}.removed-{}", std::process::id()))
}

/// Deletes the copies beside `dir` that runs stopped while deleting them left (best effort).
fn remove_removed_copies(dir: &Path) {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else { return };
    let prefix = format!("{}.removed-", name.to_string_lossy());
    for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Digest of everything a run's result depends on: the configuration, the cubeload version and every input
/// file's size and SHA-256. Runs with the same fingerprint may continue each other's work.
#[must_use]
pub fn fingerprint(plan: &Plan) -> String {
    let mut text = format!(
        "cubeload {}\n{}\n{:?}\n{:?}\n",
        env!("CARGO_PKG_VERSION"),
        plan.config_text,
        plan.layout,
        plan.config.compression
    );
    for v in &plan.variables {
        for f in &v.source.provenance {
            let _ = writeln!(text, "{} {} {} {}", v.name, f.path.display(), f.size, f.sha256);
        }
    }
    hex(&Sha256::digest(text.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(2 * bytes.len()), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn check_output(output: &Path, options: &GenOptions) -> Result<(), CubeError> {
    let taken =
        |message: &str| CubeError::OutputTaken { path: output.to_path_buf(), message: message.to_string() };
    if !output.exists() {
        return Ok(());
    }
    if !output.is_dir() {
        return Err(taken("exists and is not a directory: cubeload will not replace it"));
    }
    if !is_cubeload_cube(output) {
        return Err(taken("exists and is not a cubeload cube: cubeload will not replace it"));
    }
    if !options.overwrite && !options.append {
        return Err(taken(if options.finalize {
            "a finished cube is here already: --finalize completes the parts of a cube not made yet (with \
             --overwrite, of one that replaces it)"
        } else {
            "a cube already exists here; pass --overwrite to replace it or --append to extend it"
        }));
    }
    // Replacing or extending the cube replaces its directory: files of the user's put in it would go too.
    let nodes =
        std::fs::read(output.join("zarr.json")).ok().and_then(|root| crate::store::cube_node_paths(&root));
    let mut foreign = Vec::new();
    if let Some(nodes) = &nodes {
        foreign_entries(output, "", nodes, &mut foreign)
            .map_err(|source| CubeError::Io { path: output.to_path_buf(), source })?;
    }
    foreign.sort();
    if let Some(first) = foreign.first() {
        return Err(taken(&match foreign.len() {
            1 => format!(
                "is a cube holding {first}, which is not the cube's: a new cube would replace it with the rest; \
                 move it out of the cube first"
            ),
            n => format!(
                "is a cube holding {n} entries that are not the cube's (such as {first}): a new cube would \
                 replace them with the rest; move them out of the cube first"
            ),
        }));
    }
    Ok(())
}

/// Entries under `output/rel` (the cube's root, or one of its `nodes`) that are not the cube's: anything but
/// metadata, an array's chunks, child nodes, the manifest, what a killed run leaves beside files it renames
/// and what file browsers and NFS leave in any directory.
fn foreign_entries(
    output: &Path,
    rel: &str,
    nodes: &std::collections::BTreeSet<String>,
    out: &mut Vec<String>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(output.join(rel))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let key = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        let ours = name == "zarr.json"
            || crate::cube::manifest::is_leftover(&name)
            || matches!(name.as_str(), ".DS_Store" | "Thumbs.db" | "desktop.ini")
            || name.starts_with("._")
            || name.starts_with(".nfs")
            || (rel.is_empty() && name == crate::cube::manifest::MANIFEST_FILE)
            || (!rel.is_empty() && name == "c");
        if ours {
            continue;
        }
        if nodes.contains(&key) && entry.file_type()?.is_dir() {
            foreign_entries(output, &key, nodes, out)?;
        } else {
            out.push(key);
        }
    }
    Ok(())
}

/// Why the configured `window` (`pixel_series`) or `seq_len` (`image_sequence`), the steps a batch holds,
/// is not the cube's, if it is not. The cube's window is that of the config it was made from; where that
/// no longer reads, it is told from the chunks: a cube whose chunks hold its whole series was made without
/// a window, or with one at least as long as the series.
fn series_length_change(config: &crate::config::LayoutConfig, old: &CubeMeta) -> Option<String> {
    use crate::config::LayoutConfig;
    let steps = old.time.as_ref().map_or(0, |t| t.steps);
    match *config {
        LayoutConfig::PixelSeries { window, .. } => {
            let made_with = crate::config::Config::from_yaml(&old.config, Path::new("the cube's config"))
                .ok()
                .and_then(|c| match c.layout {
                    LayoutConfig::PixelSeries { window, .. } => Some(window),
                    LayoutConfig::ImageSequence { .. } => None,
                });
            let (same, old_window) = if let Some(old_window) = made_with {
                (window == old_window, old_window)
            } else {
                let old_window = (old.layout.chunk_t < steps).then_some(old.layout.chunk_t);
                let same = match (old_window, window) {
                    (Some(old), new) => new == Some(old),
                    (None, Some(new)) => new >= steps,
                    (None, None) => true,
                };
                (same, old_window)
            };
            let show =
                |w: Option<usize>| w.map_or_else(|| "none: whole series".to_string(), |w| w.to_string());
            (!same).then(|| {
                format!(
                    "the configured layout.window ({}) differs from the cube's ({}): a batch would hold series \
                     of another length",
                    show(window),
                    show(old_window)
                )
            })
        }
        LayoutConfig::ImageSequence { seq_len, .. } => (seq_len != old.layout.chunk_t).then(|| {
            format!(
                "the configured layout.seq_len ({seq_len}) differs from the cube's ({})",
                old.layout.chunk_t
            )
        }),
    }
}

/// `--append`: the cube at `output` is complete and the plan only adds time steps after its end, with the
/// same grid, layout, variables and encoding.
fn check_append(plan: &Plan, output: &Path) -> Result<(), GenError> {
    let refuse = |message: String| GenError::Append { path: output.to_path_buf(), message };
    if !output.exists() {
        // Checked here: the cube's reader, seeing this run's own lock, would say a run is generating it.
        return Err(refuse("there is no cube here to extend; run without --append to make it".to_string()));
    }
    let cube = Cube::open(output)?;
    let old = cube.meta();
    if old.grid != plan.grid {
        return Err(refuse(format!(
            "the configured grid ({}) differs from the cube's ({})",
            plan.grid, old.grid
        )));
    }
    let layout_of = |l: &crate::layout::Layout| (l.kind, l.batch, l.chunk_y, l.chunk_x, l.patch, l.shuffled);
    if layout_of(&old.layout) != layout_of(&plan.layout) {
        return Err(refuse("the configured layout differs from the cube's".to_string()));
    }
    if let Some(message) = old.time.as_ref().and(series_length_change(&plan.config.layout, old)) {
        return Err(refuse(message));
    }
    let names: Vec<&str> = old.variables.iter().map(|v| v.name.as_str()).collect();
    let new_names: Vec<&str> = plan.variables.iter().map(|v| v.name.as_str()).collect();
    if names != new_names {
        return Err(refuse(format!(
            "the configured variables ({}) differ from the cube's ({})",
            new_names.join(", "),
            names.join(", ")
        )));
    }
    for (o, v) in old.variables.iter().zip(&plan.variables) {
        let fill = (!v.fill.is_nan()).then_some(v.fill);
        if o.dtype != v.dtype || o.fill_value != fill || o.is_static != v.is_static || o.kind != v.kind {
            return Err(refuse(format!(
                "variable `{}`: its type, fill value or kind differs from the cube's; the encoding of a cube \
                 stays constant when it grows",
                v.name
            )));
        }
        let factor = |levels: &[crate::levels::Level], l: Option<usize>| l.map(|l| levels[l].factor);
        if factor(&old.levels, o.level) != factor(&plan.levels, v.level) {
            return Err(refuse(format!(
                "variable `{}`: its native resolution differs from the cube's",
                v.name
            )));
        }
    }
    let compression = crate::cube::writer::compression_name(&plan.config.compression);
    if old.compression != compression {
        return Err(refuse(format!(
            "the configured compression ({compression}) differs from the cube's ({})",
            old.compression
        )));
    }
    let (Some(old_time), Some(axis)) = (&old.time, &plan.time) else {
        return Err(refuse("a cube without a time axis cannot grow along time".to_string()));
    };
    // The configured axis must hold the cube's instants as its first steps, every one of them: compared
    // with the cube's time coordinate (a step written as text differs between equal axes: two month starts
    // are `31d`, three `1mo`).
    let cube_times = cube.times()?;
    let regular = match (axis.step.map(|s| s.to_string()), &old_time.step) {
        (Some(new), Some(old)) if new != *old => format!(" (its step is {new}, the cube's {old})"),
        _ => String::new(),
    };
    if let Some(i) = (0..cube_times.len().min(axis.len())).find(|&i| axis.times[i] != cube_times[i]) {
        let (new, old) = (time::format_instant(axis.times[i]), time::format_instant(cube_times[i]));
        return Err(refuse(if i == 0 {
            format!(
                "the configured time axis does not continue the cube's: it starts at {new}, the cube at {old}"
            )
        } else {
            format!(
                "the configured time axis does not continue the cube's: its step {i} is {new}, the cube's \
                 {old}{regular}"
            )
        }));
    }
    if axis.len() <= old_time.steps {
        return Err(refuse(format!(
            "nothing to append: the inputs add no time step after {} ({} steps configured, {} in the cube)",
            old_time.end,
            axis.len(),
            old_time.steps
        )));
    }
    Ok(())
}

/// Decides what to do with a staging directory left by an earlier run: continue it (same fingerprint),
/// discard it (`--overwrite`, or nothing recorded in it), or refuse.
fn prepare_staging(
    output: &Path,
    staging: &Path,
    plan: &Plan,
    fingerprint: &str,
    options: &GenOptions,
) -> Result<(), GenError> {
    let scratch = shuffled::scratch(staging);
    if !staging.exists() {
        if options.finalize {
            return Err(GenError::Flags {
                path: output.to_path_buf(),
                message: format!(
                    "cannot finalize: no part of this cube has run (nothing at {}); run the parts first \
                     (`--part K/N`)",
                    staging.display()
                ),
            });
        }
        if scratch.exists() {
            remove_dir(&scratch)?; // left by an older cubeload
        }
        return Ok(());
    }
    // A manifest that cannot be read is an error, not "nothing finished": that would delete the blocks.
    let recorded = Manifest::load(staging)?.header.map(|h| h.fingerprint);
    match recorded {
        Some(fp) if fp == fingerprint => Ok(()),
        Some(_) if options.overwrite && options.part.is_none() && !options.finalize => {
            remove_dir(staging)?;
            if scratch.exists() {
                remove_dir(&scratch)?;
            }
            Ok(())
        }
        Some(_) => Err(GenError::Changed {
            output: output.to_path_buf(),
            staging: staging.to_path_buf(),
            difference: difference(staging, plan),
            parts: options.part.is_some() || options.finalize,
        }),
        // Parts start together: another one may be creating the directory right now.
        None if options.part.is_some() => Ok(()),
        None if is_cubeload_cube(staging) => {
            // Nothing finished is recorded (an older cubeload, or a run stopped before its first block).
            remove_dir(staging)?;
            if scratch.exists() {
                remove_dir(&scratch)?;
            }
            Ok(())
        }
        None => Err(CubeError::OutputTaken {
            path: staging.to_path_buf(),
            message: "exists and is not a cube in progress: move it away".to_string(),
        }
        .into()),
    }
}

/// Where the runs of `output` build it (kept between runs, so that an interrupted run is resumed).
pub(crate) fn staging_dir(output: &Path) -> PathBuf {
    sibling(output, "cubeload-partial")
}

/// What the half-made cube at `staging` was made from, against `plan`, as its metadata records it: "a
/// different configuration", or the input files added, removed or changed since (the first few).
fn difference(staging: &Path, plan: &Plan) -> String {
    const UNKNOWN: &str = "a different configuration or different input files";
    let Ok(before) = crate::cube::reader::read_meta(staging) else { return UNKNOWN.to_string() };
    if before.config != plan.config_text {
        return "a different configuration".to_string();
    }
    let mut changes = Vec::new();
    for v in &plan.variables {
        let sources = before.variables.iter().find(|b| b.name == v.name).map_or(&[][..], |b| &b.sources[..]);
        let now = &v.source.provenance;
        for file in now {
            let what = match sources.iter().find(|f| f.path == file.path) {
                None => "added",
                Some(f) if f != file => "changed",
                Some(_) => continue,
            };
            changes.push(format!("`{}`: {} {what}", v.name, file.path.display()));
        }
        for file in sources.iter().filter(|f| !now.iter().any(|n| n.path == f.path)) {
            changes.push(format!("`{}`: {} removed", v.name, file.path.display()));
        }
    }
    match changes.len() {
        0 => UNKNOWN.to_string(),
        1..=3 => format!("other input files ({})", changes.join("; ")),
        n => format!("other input files ({}; and {} more)", changes[..3].join("; "), n - 3),
    }
}

/// Where a replaced cube is kept while the new one takes its place.
pub(crate) fn previous_dir(output: &Path) -> PathBuf {
    sibling(output, "cubeload-old")
}

/// `dir/.name.suffix` beside `path`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let name = path.file_name().map_or_else(|| "cube".into(), |n| n.to_string_lossy().to_string());
    path.with_file_name(format!(".{name}.{suffix}"))
}

fn remove_dir(path: &Path) -> Result<(), CubeError> {
    std::fs::remove_dir_all(path).map_err(|source| CubeError::Io { path: path.to_path_buf(), source })
}

/// Where a replaced cube goes once the new one is in place, to be deleted: a run stopped while deleting it
/// leaves part of it there, which is never put back.
fn superseded_dir(output: &Path) -> PathBuf {
    sibling(output, "cubeload-superseded")
}

/// What a run stopped within [`swap_into_place`] left: the previous cube hidden beside an empty output path
/// (stopped between its first two renames) is put back, and the run goes on as if that one had not started
/// its swap; beside a new cube in place (complete: a directory of the user's there is not one), the previous
/// one (stopped before its last rename) is deleted, and so is what is left of a superseded one (stopped
/// while deleting it), which is never put back.
fn restore_previous(output: &Path) -> Result<(), CubeError> {
    let old = previous_dir(output);
    if swap_interrupted(output) {
        std::fs::rename(&old, output)
            .map_err(|source| CubeError::Io { path: output.to_path_buf(), source })?;
    } else if old.exists() && crate::Cube::open(output).is_ok() {
        // The new cube took its place: the previous one is superseded.
        taken_if_left(output, supersede(&old, output)?)?;
    }
    remove_superseded(output)
}

/// Deletes what is left of a replaced cube before a run starts: one that cannot be deleted (a cube of
/// another user's, replaced by this one) is an error that says so before any work, since a later replacement
/// would have to move the cube it replaces there.
fn remove_superseded(output: &Path) -> Result<(), CubeError> {
    let superseded = superseded_dir(output);
    if !superseded.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(&superseded).map_err(|source| CubeError::OutputTaken {
        path: output.to_path_buf(),
        message: format!(
            "a cube it replaced earlier is left at {} and cannot be deleted ({source}): delete it (as its \
             owner), then run again",
            superseded.display()
        ),
    })
}

/// Whether a run stopped between the first two renames of [`swap_into_place`]: the previous cube moved
/// aside (whole: it is only ever renamed there, and deleted only once renamed again), nothing at the output
/// path.
pub(crate) fn swap_interrupted(output: &Path) -> bool {
    // Opened only where it is: opening a missing cube asks this of its own path (for its message).
    let old = previous_dir(output);
    !output.exists() && old.is_dir() && crate::Cube::open(old).is_ok()
}

/// Moves the replaced cube at `old` aside and deletes it: whole until the rename, which a stop cannot split.
/// The new cube is in place by then: a deletion the file system refuses is a warning to say, not a failed
/// run (the next run asks for it to be deleted first).
fn supersede(old: &Path, output: &Path) -> Result<Option<String>, CubeError> {
    remove_superseded(output)?;
    let superseded = superseded_dir(output);
    std::fs::rename(old, &superseded).map_err(|source| CubeError::Io { path: old.to_path_buf(), source })?;
    Ok(std::fs::remove_dir_all(&superseded).err().map(|e| {
        format!(
            "the cube it replaced, moved to {}, cannot be deleted ({e}): delete it (as its owner) before the \
             next run",
            superseded.display()
        )
    }))
}

/// Moves the complete cube at `staging` to `output`, replacing a cube there; a warning when the replaced one
/// could not be deleted.
fn swap_into_place(staging: &Path, output: &Path) -> Result<Option<String>, CubeError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CubeError::Io { path, source }
    };
    if output.exists() {
        // Only reached with --overwrite or --append on a cubeload cube (checked before any work).
        let old = previous_dir(output);
        if old.exists() {
            taken_if_left(output, supersede(&old, output)?)?;
        }
        std::fs::rename(output, &old).map_err(io(output))?;
        std::fs::rename(staging, output).map_err(io(output))?;
        supersede(&old, output)
    } else {
        if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::rename(staging, output).map_err(io(output))?;
        Ok(None)
    }
}

/// Before a run's work or its swap, a replaced cube left undeleted ([`supersede`]'s warning) stops it.
fn taken_if_left(output: &Path, left: Option<String>) -> Result<(), CubeError> {
    match left {
        Some(message) => Err(CubeError::OutputTaken { path: output.to_path_buf(), message }),
        None => Ok(()),
    }
}

/// The blocks of a cube, in their canonical order (variable, chunk row, shard range, time chunk). Each
/// variable is cut along its own chunk grid: the target's, or its level's in a multi-resolution cube.
fn plan_blocks(plan: &Plan, budget: usize) -> Vec<Block> {
    let mut blocks = Vec::new();
    for (var, v) in plan.variables.iter().enumerate() {
        let [ct_n, cy_n, cx_n] = plan.chunk_counts(var);
        let shard_x = shard_of(plan, var);
        let per_shard = shard_accumulator_bytes(plan, var);
        let n_shards = cx_n.div_ceil(shard_x);
        let step = (budget / per_shard.max(1)).clamp(1, n_shards.max(1));
        for iy in 0..cy_n {
            for first in (0..n_shards).step_by(step) {
                let count = step.min(n_shards - first);
                let time_chunks = if v.is_static { 1 } else { ct_n };
                blocks.extend((0..time_chunks).map(|it| Block {
                    var,
                    it,
                    iy,
                    first_shard: first,
                    n_shards: count,
                }));
            }
        }
    }
    blocks
}

/// Generation threads for `todo` blocks: `asked` (or the `cores`), no more than there are blocks. Each
/// thread holds a block's accumulators and about as much again in warp buffers (`per_thread` bytes in
/// all): no more than half the `memory` holds. More asked is refused; the default is cut down.
fn thread_count(
    asked: Option<usize>,
    cores: usize,
    todo: usize,
    per_thread: usize,
    memory: u64,
) -> Result<usize, String> {
    let fit = usize::try_from(memory / 2).unwrap_or(usize::MAX).checked_div(per_thread).unwrap_or(usize::MAX);
    let fit = if memory == 0 { usize::MAX } else { fit.max(1) };
    let threads = match asked.filter(|&n| n > 0) {
        Some(asked) if asked.min(todo) > fit => {
            return Err(format!(
                "--threads {asked}: each generation thread holds up to {} MB, and half this machine's memory \
                 holds {fit} of them",
                per_thread >> 20
            ));
        }
        Some(asked) => asked,
        None => cores.min(fit),
    };
    Ok(threads.min(todo.max(1)))
}

/// Chunks per shard of variable `var`.
fn shard_of(plan: &Plan, var: usize) -> usize {
    let (_, layout) = plan.geometry(var);
    if plan.variables[var].is_static { layout.static_shard_x } else { layout.shard_x }
}

/// Accumulator bytes of one shard of variable `var`: an f64 value and a u32 count (or rank) per cell.
fn shard_accumulator_bytes(plan: &Plan, var: usize) -> usize {
    let (_, layout) = plan.geometry(var);
    let ct = if plan.variables[var].is_static { 1 } else { layout.chunk_t };
    ct * layout.chunk_y * layout.chunk_x * shard_of(plan, var) * 12
}

/// Accumulator bytes of block `b`.
fn accumulator_bytes(plan: &Plan, b: &Block) -> usize {
    shard_accumulator_bytes(plan, b.var) * b.n_shards
}

fn block_id(plan: &Plan, b: &Block) -> BlockId {
    BlockId {
        var: plan.variables[b.var].name.clone(),
        it: b.it,
        iy: b.iy,
        first_shard: b.first_shard,
        n_shards: b.n_shards,
    }
}

/// Digest of everything block `b`'s values depend on: the cube's encoding, the variable's settings, the
/// target steps and, for each, the input files (by SHA-256) and bands that feed it, ranked.
fn block_inputs(plan: &Plan, b: &Block) -> String {
    let v = &plan.variables[b.var];
    let mut settings = plan.config.variables.0.iter().find(|(n, _)| *n == v.name).map(|(_, c)| c.clone());
    if let Some(s) = settings.as_mut() {
        s.path.clear(); // which files is said below, by content
    }
    let (grid, layout) = plan.geometry(b.var);
    let mut text = format!(
        "cubeload {} format {}\n{:?}\n{:?}\n{:?}\n{} {:?} {:?} {:?} {:?} {:?} {} {} {:?}\n{:?}\n",
        env!("CARGO_PKG_VERSION"),
        crate::cube::FORMAT_VERSION,
        grid,
        layout,
        plan.config.compression,
        v.name,
        v.kind,
        v.dtype,
        v.resampling,
        v.aggregation,
        v.source.data_type,
        v.source.scale,
        v.source.offset,
        v.source.nodata,
        settings,
    );
    // Only where there is one, so that the blocks of other cubes keep their hashes (and are reused).
    if let Some(missing) = v.source.missing_value {
        let _ = writeln!(text, "missing_value {missing:?}");
    }
    // Blocks of a build that unpacked these values after the warp hold other values: never reused.
    if unpacks_before_warp(v) {
        let _ = writeln!(text, "unpacked before the warp");
    }
    let _ = writeln!(text, "{b:?}");
    let (ops, feeds) = block_feeds(plan, b);
    let q = v.level.map_or(1, |l| plan.levels[l].time_factor);
    for (j, op) in ops.iter().enumerate() {
        let first = b.it * plan.layout.chunk_t + j * q;
        let instant = plan.time.as_ref().and_then(|axis| axis.times.get(first));
        let _ = writeln!(text, "step {j} ({q} steps) {instant:?} {op:?}");
    }
    for (s, feed) in feeds.iter().enumerate().filter(|(_, f)| !f.is_empty()) {
        let step = &v.source.steps[s];
        let _ = writeln!(text, "{} band {} feeds {feed:?}", v.source.provenance[step.file].sha256, step.band);
    }
    hex(&Sha256::digest(text.as_bytes()))
}

/// Hard-links (or copies, where links are not possible) the files of `record` from `from` into `to`.
fn link_files(record: &BlockRecord, from: &Path, to: &Path) -> Result<(), CubeError> {
    for file in record.files.iter().filter(|f| f.len.is_some()) {
        let (src, dst) = (from.join(&file.key), to.join(&file.key));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CubeError::Io { path, source }
        };
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        match std::fs::remove_file(&dst) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&dst)(e)),
            _ => {}
        }
        if std::fs::hard_link(&src, &dst).is_err() {
            // Copied beside it and renamed over it: a copy opened onto a path that is (or has become) a link
            // to the source would empty the source, a file of the cube being extended.
            let copy = dst.with_file_name(format!(
                ".{}.cubeload-copy-{}",
                dst.file_name().map_or_else(Default::default, |n| n.to_string_lossy()),
                std::process::id()
            ));
            std::fs::copy(&src, &copy).map_err(io(&copy))?;
            std::fs::rename(&copy, &dst).map_err(io(&dst))?;
        }
    }
    Ok(())
}

fn build(plan: &Plan, dir: &Path, run: &Run) -> Result<Built, GenError> {
    let options = run.options;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CubeError::Io { path, source }
    };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let existing = Manifest::load(dir)?;
    let existing_other_runs = existing.other_runs.clone();
    let created = existing
        .header
        .as_ref()
        .filter(|h| h.fingerprint == run.fingerprint)
        .map_or_else(|| time::format_instant(chrono::Utc::now().timestamp()), |h| h.created.clone());
    let header = ManifestHeader::new(run.fingerprint.clone(), created.clone());
    let blocks = plan_blocks(plan, options.block_bytes.unwrap_or(BLOCK_BUDGET_BYTES));
    let total = blocks.len();
    let ids: Vec<BlockId> = blocks.iter().map(|b| block_id(plan, b)).collect();
    let position: HashMap<&BlockId, usize> = ids.iter().enumerate().map(|(i, id)| (id, i)).collect();
    let digests: Vec<String> = blocks.iter().map(|b| block_inputs(plan, b)).collect();

    // Blocks already done: by an interrupted run of this configuration, or in the cube being extended.
    let mut done: Vec<Option<BlockRecord>> = vec![None; total];
    let usable = |record: &BlockRecord, root: &Path| {
        position
            .get(&record.block)
            .copied()
            .filter(|&i| digests[i] == record.inputs && record.first_mismatch(root).is_none())
    };
    if existing.header.as_ref().is_some_and(|h| h.fingerprint == run.fingerprint) {
        for record in existing.records {
            if let Some(i) = usable(&record, dir) {
                done[i] = Some(record);
            }
        }
    }
    let part = options.part;
    let mine = |i: usize| part.is_none_or(|p| p.owns(i));
    if let Some(previous) = run.reuse_from.filter(|_| plan.layout.shuffled.is_none()) {
        for record in Manifest::load(previous)?.records {
            // Each part links its own blocks' files only: parts run at once, in the same staging directory.
            if let Some(i) = usable(&record, previous).filter(|&i| done[i].is_none() && mine(i)) {
                link_files(&record, previous, dir)?;
                done[i] = Some(record);
            }
        }
    }
    let reused = done.iter().filter(|d| d.is_some()).count();
    let unfinished = |done: &[Option<BlockRecord>]| {
        let first = done.iter().position(Option::is_none)?;
        let others = if existing_other_runs.is_empty() {
            String::new()
        } else {
            format!(
                "; {} record parts run with another configuration or other inputs: run those parts again \
                 with this config",
                existing_other_runs.join(", ")
            )
        };
        Some(GenError::Unfinished {
            path: plan.config.output.clone(),
            message: format!(
                "{} of {total} blocks are not written (the first: {}){others}; run the parts that failed \
                 again, then --finalize",
                done.iter().filter(|d| d.is_none()).count(),
                ids[first],
            ),
        })
    };
    // `--finalize` writes nothing before all blocks are there: its metadata and manifest would make the
    // staging directory its configuration's, in the way of the parts of another one.
    if let Some(error) = unfinished(&done).filter(|_| options.finalize) {
        return Err(error);
    }
    let writer = CubeWriter::create(dir, plan, &created)?;
    let todo: Vec<usize> =
        (0..total).filter(|&i| done[i].is_none() && mine(i) && !options.finalize).collect();
    let manifest_name = part.map_or_else(|| MANIFEST_FILE.to_string(), |p| p.manifest_file());
    let kept: Vec<&BlockRecord> =
        done.iter().enumerate().filter(|&(i, _)| mine(i)).filter_map(|(_, d)| d.as_ref()).collect();
    let mut manifest = ManifestWriter::create(dir, &manifest_name, &header, &kept)?;
    let kept = kept.len();
    // Parts start together, each finding no header but its own: once each has written its header, one of
    // another configuration is seen by both (checked at the start, it could be missed by both).
    if part.is_some() {
        let now = Manifest::load(dir)?;
        if now.header.is_some_and(|h| h.fingerprint != run.fingerprint) || !now.other_runs.is_empty() {
            // A refused part that kept nothing takes its header away: left, it made the staging directory
            // this configuration's, and the parts of the other one, which ran on, could not finish.
            if kept == 0 {
                drop(manifest);
                let _ = std::fs::remove_file(dir.join(&manifest_name));
            }
            return Err(GenError::OtherParts {
                output: plan.config.output.clone(),
                files: now.other_runs.join(", "),
            });
        }
    }

    let per_thread = 2 * todo.iter().map(|&i| accumulator_bytes(plan, &blocks[i])).max().unwrap_or(0);
    let memory = crate::plan::physical_memory();
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let threads = thread_count(options.threads, cores, todo.len(), per_thread, memory)
        .map_err(|message| GenError::Flags { path: plan.config.output.clone(), message })?;
    let (job_tx, job_rx) = crossbeam_channel::unbounded::<usize>();
    for &i in &todo {
        job_tx.send(i).expect("receiver alive");
    }
    drop(job_tx);
    let (done_tx, done_rx) =
        crossbeam_channel::bounded::<Result<(usize, BlockSummary), GenError>>(threads * 2);
    let cancel = AtomicBool::new(false);
    let writer_ref = &writer;
    let blocks_ref = &blocks;
    let ids_ref = &ids;
    let mut finished = kept as u64;
    let to_finish = finished + todo.len() as u64;
    (run.progress)(finished, to_finish);
    let outcome: Result<(), GenError> = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let cancel = &cancel;
            handles.push(scope.spawn(move || {
                crate::source::quiet_hdf5_in_this_thread();
                while let Ok(i) = job_rx.recv() {
                    if cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    let result =
                        guarded(&ids_ref[i], || run_block(plan, writer_ref, blocks_ref[i])).map(|s| (i, s));
                    if done_tx.send(result).is_err() {
                        break;
                    }
                }
            }));
        }
        drop(done_tx);
        let mut first_error = None;
        for result in &done_rx {
            let recorded = result.and_then(|(i, summary)| {
                let files = summary
                    .files
                    .iter()
                    .map(|key| FileRecord::of(dir, key))
                    .collect::<Result<Vec<_>, _>>()?;
                let record = BlockRecord {
                    block: ids[i].clone(),
                    inputs: digests[i].clone(),
                    files,
                    stats: (&summary.stats).into(),
                    cells: summary.cells,
                    valid: summary.valid,
                    unstorable: summary.unstorable,
                    validity: summary.chunk_validity,
                };
                manifest.append(&record)?;
                done[i] = Some(record);
                Ok(())
            });
            match recorded {
                Ok(()) => {
                    finished += 1;
                    (run.progress)(finished, to_finish);
                }
                Err(e) => {
                    cancel.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            }
        }
        for handle in handles {
            if let Err(panic) = handle.join() {
                first_error.get_or_insert(GenError::Panic(panic_message(&*panic)));
            }
        }
        first_error.map_or(Ok(()), Err)
    });
    outcome?;
    drop(manifest);
    if part.is_some() {
        let blocks = (0..total).filter(|&i| mine(i)).count();
        return Ok(Built::Part { meta: writer.meta().clone(), blocks, reused: kept });
    }
    if let Some(error) = unfinished(&done) {
        return Err(error);
    }
    let records: Vec<&BlockRecord> = done.iter().flatten().collect();
    let meta = finish(plan, writer, dir, &header, &blocks, &records)?;
    Ok(Built::Complete { meta, blocks: total, reused })
}

/// Runs block `id`'s work, a panic (a bug) turned into an error naming the block: it then stops the other
/// threads at once, as any failed block does, instead of being found when they have done all theirs.
fn guarded<T>(id: &BlockId, work: impl FnOnce() -> Result<T, GenError>) -> Result<T, GenError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
        .unwrap_or_else(|panic| Err(GenError::Panic(format!("{id}: {}", panic_message(&*panic)))))
}

/// The text a panic was raised with (`panic!`'s message), or nothing.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_default()
}

/// Merges the blocks' statistics and validity in block order, writes the merged manifest (removing the
/// parts' files) and completes the cube.
fn finish(
    plan: &Plan,
    writer: CubeWriter,
    dir: &Path,
    header: &ManifestHeader,
    blocks: &[Block],
    records: &[&BlockRecord],
) -> Result<CubeMeta, GenError> {
    let n_vars = plan.variables.len();
    let mut stats = vec![RunningStats::default(); n_vars];
    let mut cells = vec![(0u64, 0u64); n_vars];
    let mut unstorable = vec![0u64; n_vars];
    let counts: Vec<[usize; 3]> =
        writer.meta().variables.iter().map(|v| writer.meta().geometry(v).chunk_counts()).collect();
    let mut validity: Vec<Vec<f32>> = plan
        .variables
        .iter()
        .zip(&counts)
        .map(|(v, &[ct_n, cy_n, cx_n])| vec![0.0; if v.is_static { cy_n * cx_n } else { ct_n * cy_n * cx_n }])
        .collect();
    for (block, record) in blocks.iter().zip(records) {
        let [_, cy_n, cx_n] = counts[block.var];
        stats[block.var].merge(&record.stats.into());
        cells[block.var].0 += record.cells;
        cells[block.var].1 += record.valid;
        unstorable[block.var] += record.unstorable;
        let base = if plan.variables[block.var].is_static {
            block.iy * cx_n
        } else {
            (block.it * cy_n + block.iy) * cx_n
        };
        for &(ix, fraction) in &record.validity {
            validity[block.var][base + ix] = fraction;
        }
    }
    drop(ManifestWriter::create(dir, MANIFEST_FILE, header, records)?);
    remove_part_manifests(dir)?;
    let meta = writer.finish(&stats, &cells, &unstorable, &validity)?;
    Manifest::seal(dir)?;
    Ok(meta)
}

fn remove_part_manifests(dir: &Path) -> Result<(), CubeError> {
    for entry in std::fs::read_dir(dir).map_err(|source| CubeError::Io { path: dir.to_path_buf(), source })? {
        let path = entry.map_err(|source| CubeError::Io { path: dir.to_path_buf(), source })?.path();
        let is_part =
            path.file_name().and_then(|n| n.to_str()).is_some_and(crate::cube::manifest::is_part_manifest);
        if is_part {
            std::fs::remove_file(&path).map_err(|source| CubeError::Io { path: path.clone(), source })?;
        }
    }
    Ok(())
}

/// How the source steps feeding one target step combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Mean,
    Sum,
    Min,
    Max,
    /// The valid value of the best-ranked step wins (nearest in time, or first file of a mosaic).
    Ranked,
}

/// Per-cell accumulation of one block: `values[j][cell]` plus `aux` (count or rank).
struct Accumulator {
    ops: Vec<Option<Op>>,
    values: Vec<f64>,
    aux: Vec<u32>,
    plane: usize,
}

impl Accumulator {
    fn new(ops: Vec<Option<Op>>, plane: usize) -> Self {
        let n = ops.len() * plane;
        let mut aux = vec![0; n];
        for (op, aux) in ops.iter().zip(aux.chunks_exact_mut(plane.max(1))) {
            if *op == Some(Op::Ranked) {
                aux.fill(u32::MAX);
            }
        }
        Accumulator { ops, values: vec![f64::NAN; n], aux, plane }
    }

    /// Adds the values `xs` (NaN: missing) to cells `start..start + xs.len()` of local step `j`.
    fn add_row(&mut self, j: usize, start: usize, xs: &[f64], rank: u32) {
        let Some(op) = self.ops[j] else { return };
        let cells = j * self.plane + start..j * self.plane + start + xs.len();
        let targets = self.values[cells.clone()].iter_mut().zip(&mut self.aux[cells]);
        for ((value, aux), &x) in targets.zip(xs).filter(|(_, x)| !x.is_nan()) {
            match op {
                Op::Mean | Op::Sum => {
                    *value = if *aux == 0 { x } else { *value + x };
                    *aux += 1;
                }
                Op::Min => *value = if value.is_nan() { x } else { value.min(x) },
                Op::Max => *value = if value.is_nan() { x } else { value.max(x) },
                Op::Ranked if rank < *aux => {
                    *value = x;
                    *aux = rank;
                }
                Op::Ranked => {}
            }
        }
    }

    fn finish(mut self) -> Vec<f64> {
        for (j, op) in self.ops.iter().enumerate() {
            if *op == Some(Op::Mean) {
                for i in j * self.plane..(j + 1) * self.plane {
                    if self.aux[i] > 0 {
                        self.values[i] /= f64::from(self.aux[i]);
                    }
                }
            }
        }
        self.values
    }
}

/// Per source step: the local target steps it feeds, each with the step's rank there.
type Feeds = Vec<Vec<(usize, u32)>>;

/// Which source steps feed which local stored step of block `b`, with which rank, and how each stored step
/// combines them (a stored step of a variable on a level with time factor `q` is a window of `q` target
/// steps, whose sources the plan has found as for a target step).
fn block_feeds(plan: &Plan, b: &Block) -> (Vec<Option<Op>>, Feeds) {
    let v = &plan.variables[b.var];
    let q = v.level.map_or(1, |l| plan.levels[l].time_factor);
    let ct = if v.is_static { 1 } else { plan.layout.chunk_t / q };
    let mut ops = vec![None; ct];
    let mut feeds: Vec<Vec<(usize, u32)>> = vec![Vec::new(); v.source.steps.len()];
    if v.is_static {
        ops[0] = Some(Op::Ranked);
        for (s, feed) in feeds.iter_mut().enumerate() {
            feed.push((0, s as u32));
        }
    } else {
        let axis = plan.time.as_ref().expect("time-varying variables have an axis");
        for (j, op) in ops.iter_mut().enumerate() {
            let first = b.it * plan.layout.chunk_t + j * q;
            match v.step_sources.get(first / q) {
                Some(StepSources::Aggregate(inside)) => {
                    *op = Some(match v.aggregation {
                        Aggregation::Mean => Op::Mean,
                        Aggregation::Sum => Op::Sum,
                        Aggregation::Min => Op::Min,
                        Aggregation::Max => Op::Max,
                        Aggregation::Nearest => Op::Ranked,
                    });
                    let target = axis.times[first];
                    let mut by_distance = inside.clone();
                    by_distance.sort_by_key(|&s| (v.source.steps[s].time.unwrap_or(target) - target).abs());
                    by_distance.dedup();
                    for (rank, &s) in by_distance.iter().enumerate() {
                        feeds[s].push((j, rank as u32));
                    }
                }
                Some(StepSources::Nearest(steps)) => {
                    *op = Some(Op::Ranked);
                    for (rank, &s) in steps.iter().enumerate() {
                        feeds[s].push((j, rank as u32));
                    }
                }
                Some(StepSources::Empty) | None => {}
            }
        }
    }
    (ops, feeds)
}

/// Warps, aggregates and writes one block.
fn run_block(plan: &Plan, writer: &CubeWriter, block: Block) -> Result<BlockSummary, GenError> {
    let v = &plan.variables[block.var];
    let (grid, layout) = plan.geometry(block.var);
    let cy = layout.chunk_y;
    let shard_cols = layout.chunk_x * if v.is_static { layout.static_shard_x } else { layout.shard_x };
    // The block's columns: its shards, of which only those inside the grid are warped.
    let (col0, px) = (block.first_shard * shard_cols, block.n_shards * shard_cols);
    let cols = px.min(grid.width.saturating_sub(col0));
    let row0 = block.iy * cy;
    let rows = cy.min(grid.height.saturating_sub(row0));
    let plane = cy * px;

    let (ops, feeds) = block_feeds(plan, &block);
    let mut acc = Accumulator::new(ops, plane);
    if rows > 0 && cols > 0 {
        let per_band = rows * cols * 8;
        let batch = (WARP_BUDGET_BYTES / per_band.max(1)).clamp(1, 512);
        let window = (row0..row0 + rows, col0..col0 + cols);
        let files = &v.source.files;
        let file_of = |s: usize| &files[v.source.steps[s].file];
        // The steps this block needs, in source order, warped together while consecutive files share a grid.
        let needed: Vec<usize> = (0..v.source.steps.len()).filter(|&s| !feeds[s].is_empty()).collect();
        for same_grid in needed.chunk_by(|&a, &b| file_of(a).same_grid(file_of(b))) {
            for group in same_grid.chunks(batch) {
                let rasters = warp_steps(v, group, grid, &window)?;
                for (&s, raster) in group.iter().zip(rasters.chunks_exact((rows * cols).max(1))) {
                    accumulate(&mut acc, v, &feeds[s], raster, rows, cols, px);
                }
            }
        }
    }
    let values = acc.finish();
    Ok(writer.write_block(block.var, block.it, block.iy, block.first_shard, &values)?)
}

/// Warps source `steps` of `v` (files on one grid) onto `window` of `grid`: their rasters one after the other.
/// When the warp of several files fails, they are warped again one file at a time, so that an error names its
/// file.
fn warp_steps(
    v: &VariablePlan,
    steps: &[usize],
    grid: &Grid,
    window: &(Range<usize>, Range<usize>),
) -> Result<Vec<f64>, SourceError> {
    let source = &v.source;
    let bands: Vec<(&FileView, usize)> =
        steps.iter().map(|&s| (&source.files[source.steps[s].file], source.steps[s].band)).collect();
    let warp = |bands: &[(&FileView, usize)]| {
        let nodata = (source.nodata, source.missing_value);
        let unpack = unpacks_before_warp(v).then_some((source.scale, source.offset));
        warp_window(bands, source.data_type, nodata, unpack, v.resampling, grid, window.clone())
    };
    let same_file = |a: &(&FileView, usize), b: &(&FileView, usize)| std::ptr::eq(a.0, b.0);
    match warp(&bands) {
        Err(_) if bands.chunk_by(same_file).nth(1).is_some() => {
            let mut rasters = Vec::with_capacity(bands.len());
            for one_file in bands.chunk_by(same_file) {
                rasters.extend(warp(one_file)?);
            }
            Ok(rasters)
        }
        result => result,
    }
}

/// Whether `v`'s values are unpacked before the warp, its resampling giving another result on stored values
/// ([`Resampling::commutes_with_unpacking`](crate::config::Resampling::commutes_with_unpacking)); otherwise
/// [`accumulate`] unpacks what the warp gives, which then works in the source's own type (Float32 for 16-bit
/// integers) rather than Float64.
fn unpacks_before_warp(v: &VariablePlan) -> bool {
    !v.resampling.commutes_with_unpacking(v.source.scale, v.source.offset)
}

/// Unpacks one warped band (unless the warp did) and adds it to every target step it feeds.
fn accumulate(
    acc: &mut Accumulator,
    v: &VariablePlan,
    feeds: &[(usize, u32)],
    raster: &[f64],
    rows: usize,
    width: usize,
    px: usize,
) {
    let (scale, offset) = (v.source.scale, v.source.offset);
    let unpack = (scale != 1.0 || offset != 0.0) && !unpacks_before_warp(v);
    let mut unpacked = vec![0.0; if unpack { width } else { 0 }];
    for (y, raw) in raster.chunks_exact(width.max(1)).take(rows).enumerate() {
        let row = if unpack {
            for (value, &raw) in unpacked.iter_mut().zip(raw) {
                *value = raw * scale + offset;
            }
            &unpacked
        } else {
            raw
        };
        for &(j, rank) in feeds {
            acc.add_row(j, y * px, row, rank);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn threads_are_as_many_as_asked_blocks_and_memory_allow() {
        const MB: usize = 1 << 20;
        let gb = 1u64 << 30;
        // As asked, or the cores, but no more than the blocks.
        assert_eq!(super::thread_count(Some(8), 2, 100, 64 * MB, 16 * gb), Ok(8));
        assert_eq!(super::thread_count(None, 32, 100, 64 * MB, 16 * gb), Ok(32));
        assert_eq!(super::thread_count(Some(1_000_000), 2, 40, 64 * MB, 16 * gb), Ok(40));
        // Half of 16 GB holds 128 threads of 64 MB: the cores cut down to it, more asked refused.
        assert_eq!(super::thread_count(None, 256, 1000, 64 * MB, 16 * gb), Ok(128));
        let refused = super::thread_count(Some(200), 2, 1000, 64 * MB, 16 * gb).unwrap_err();
        assert!(refused.contains("--threads 200") && refused.contains("holds 128 of them"), "{refused}");
        // A block larger than half the memory still gets one thread (the plan refuses what cannot fit at all);
        // unknown memory limits nothing.
        assert_eq!(super::thread_count(None, 4, 10, 64 * MB, 64 * MB as u64), Ok(1));
        assert_eq!(super::thread_count(None, 4, 10, 64 * MB, 0), Ok(4));
    }

    use super::*;

    #[test]
    fn a_panicking_block_is_an_error_naming_it() {
        let id = BlockId { var: "t2m".into(), it: 2, iy: 5, first_shard: 1, n_shards: 1 };
        let err = guarded::<()>(&id, || panic!("index out of bounds: {}", 7)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "a generation thread panicked: variable `t2m`, time chunk 2, chunk row 5, shard 1: index out of \
             bounds: 7"
        );
        assert!(matches!(guarded(&id, || Ok(3)), Ok(3)));
    }

    #[test]
    fn accumulator_ops() {
        let mut acc = Accumulator::new(vec![Some(Op::Mean), Some(Op::Ranked), None, Some(Op::Max)], 2);
        acc.add_row(0, 0, &[1.0], 0);
        acc.add_row(0, 0, &[3.0, f64::NAN], 0);
        acc.add_row(1, 0, &[5.0], 2);
        acc.add_row(1, 0, &[7.0], 1);
        acc.add_row(1, 0, &[9.0], 3);
        acc.add_row(3, 1, &[-1.0], 0);
        acc.add_row(3, 0, &[f64::NAN, 4.0], 0);
        acc.add_row(2, 0, &[8.0, 8.0], 0);
        let v = acc.finish();
        assert_eq!(v[0], 2.0);
        assert!(v[1].is_nan());
        assert_eq!(v[2], 7.0);
        assert!(v[4].is_nan() && v[5].is_nan());
        assert_eq!(v[7], 4.0);
    }
}
