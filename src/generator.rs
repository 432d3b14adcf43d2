//! `cubeload gen`: sources → warp + resample in space, aggregate in time → batch-aligned Zarr chunks.
//!
//! The unit of work is a *block*: one variable, one row of batch chunks, one time window. A block is warped
//! from its sources, aggregated in time and written as whole chunks (or shards), so memory stays bounded by
//! a few blocks (one per thread) whatever the cube's size. Blocks run on plain threads, not on rayon's pool:
//! GDAL reads block, and each thread keeps its own GDAL handles (GDAL datasets are `Send`, not `Sync`).
//!
//! The cube is built in a hidden staging directory beside the output and renamed into place only once its
//! completion marker is written: a failed or interrupted run never leaves something that looks like a
//! complete cube, and never touches an existing one (`--overwrite` swaps a previous cube out only at the end).

mod shuffled;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant as Clock;

use crate::config::Aggregation;
use crate::cube::reader::is_cubeload_cube;
use crate::cube::writer::{BlockSummary, CubeWriter};
use crate::cube::{CubeError, CubeMeta, RunningStats};
use crate::plan::{Plan, PlanError, VariablePlan};
use crate::source::SourceError;
use crate::source::warp::warp_window;
use crate::time::StepSources;

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
    /// Blocks written.
    pub blocks: usize,
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

/// Generates the cube of `plan`; `progress(done, total)` is called on the calling thread after each block.
///
/// # Errors
/// [`GenError`] naming the file, variable or path at fault; the output path is then untouched.
pub fn generate(
    plan: &Plan,
    options: &GenOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<GenReport, GenError> {
    let started = Clock::now();
    let output = plan.config.output.clone();
    check_output(&output, options.overwrite)?;
    let staging = sibling(&output, "cubeload-partial");
    if staging.exists() {
        if !is_cubeload_cube(&staging) {
            return Err(CubeError::OutputTaken {
                path: staging,
                message: "exists and is not a cube in progress: move it away".to_string(),
            }
            .into());
        }
        remove_dir(&staging)?; // a run that was interrupted earlier
    }
    let result = if plan.layout.shuffled.is_some() {
        shuffled::build(plan, &staging, options, progress)
    } else {
        build(plan, &staging, options, progress)
    };
    let (meta, blocks) = match result {
        Ok(done) => done,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    swap_into_place(&staging, &output)?;
    Ok(GenReport { path: output, meta, seconds: started.elapsed().as_secs_f64(), blocks })
}

fn check_output(output: &Path, overwrite: bool) -> Result<(), CubeError> {
    if !output.exists() {
        return Ok(());
    }
    let taken =
        |message: &str| CubeError::OutputTaken { path: output.to_path_buf(), message: message.to_string() };
    if !output.is_dir() {
        return Err(taken("exists and is not a directory: cubeload will not replace it"));
    }
    if !is_cubeload_cube(output) {
        return Err(taken("exists and is not a cubeload cube: cubeload will not replace it"));
    }
    if !overwrite {
        return Err(taken("a cube already exists here; pass --overwrite to replace it"));
    }
    Ok(())
}

/// `dir/.name.suffix` beside `path`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let name = path.file_name().map_or_else(|| "cube".into(), |n| n.to_string_lossy().to_string());
    path.with_file_name(format!(".{name}.{suffix}"))
}

fn remove_dir(path: &Path) -> Result<(), CubeError> {
    std::fs::remove_dir_all(path).map_err(|source| CubeError::Io { path: path.to_path_buf(), source })
}

fn swap_into_place(staging: &Path, output: &Path) -> Result<(), CubeError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CubeError::Io { path, source }
    };
    if output.exists() {
        // Only reached with --overwrite on a cubeload cube (checked before any work).
        let old = sibling(output, "cubeload-old");
        if old.exists() {
            remove_dir(&old)?;
        }
        std::fs::rename(output, &old).map_err(io(output))?;
        std::fs::rename(staging, output).map_err(io(output))?;
        remove_dir(&old)?;
    } else {
        if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::rename(staging, output).map_err(io(output))?;
    }
    Ok(())
}

fn build(
    plan: &Plan,
    staging: &Path,
    options: &GenOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<(CubeMeta, usize), GenError> {
    if let Some(parent) = staging.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|source| CubeError::Io { path: parent.to_path_buf(), source })?;
    }
    let writer = CubeWriter::create(staging, plan)?;
    let [ct_n, cy_n, cx_n] = writer.meta().chunk_counts();
    let layout = plan.layout;
    let budget = options.block_bytes.unwrap_or(BLOCK_BUDGET_BYTES);
    let mut blocks = Vec::new();
    for (var, v) in plan.variables.iter().enumerate() {
        let (ct, shard_x) =
            if v.is_static { (1, layout.static_shard_x) } else { (layout.chunk_t, layout.shard_x) };
        // Accumulator bytes per shard: f64 value + u32 count/rank per cell.
        let per_shard = ct * layout.chunk_y * layout.chunk_x * shard_x * 12;
        let n_shards = cx_n.div_ceil(shard_x);
        let step = (budget / per_shard.max(1)).clamp(1, n_shards.max(1));
        for iy in 0..cy_n {
            for first in (0..n_shards).step_by(step) {
                let count = step.min(n_shards - first);
                if v.is_static {
                    blocks.push(Block { var, it: 0, iy, first_shard: first, n_shards: count });
                } else {
                    blocks.extend((0..ct_n).map(|it| Block {
                        var,
                        it,
                        iy,
                        first_shard: first,
                        n_shards: count,
                    }));
                }
            }
        }
    }
    let total = blocks.len();
    let threads = options
        .threads
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
        .min(total.max(1));

    let n_vars = plan.variables.len();
    let mut stats = vec![RunningStats::default(); n_vars];
    let mut cells = vec![(0u64, 0u64); n_vars];
    let mut validity: Vec<Vec<f32>> = plan
        .variables
        .iter()
        .map(|v| vec![0.0; if v.is_static { cy_n * cx_n } else { ct_n * cy_n * cx_n }])
        .collect();

    let (job_tx, job_rx) = crossbeam_channel::unbounded::<Block>();
    for b in &blocks {
        job_tx.send(*b).expect("receiver alive");
    }
    drop(job_tx);
    let (done_tx, done_rx) =
        crossbeam_channel::bounded::<Result<(Block, BlockSummary), GenError>>(threads * 2);
    let cancel = AtomicBool::new(false);
    let writer_ref = &writer;
    let outcome: Result<(), GenError> = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let cancel = &cancel;
            handles.push(scope.spawn(move || {
                crate::source::quiet_hdf5_in_this_thread();
                while let Ok(block) = job_rx.recv() {
                    if cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    let result = run_block(plan, writer_ref, block).map(|summary| (block, summary));
                    if done_tx.send(result).is_err() {
                        break;
                    }
                }
            }));
        }
        drop(done_tx);
        let mut first_error = None;
        let mut done = 0u64;
        for result in &done_rx {
            match result {
                Ok((block, summary)) => {
                    stats[block.var].merge(&summary.stats);
                    cells[block.var].0 += summary.cells;
                    cells[block.var].1 += summary.valid;
                    let base = if plan.variables[block.var].is_static {
                        block.iy * cx_n
                    } else {
                        (block.it * cy_n + block.iy) * cx_n
                    };
                    for (ix, fraction) in summary.chunk_validity {
                        validity[block.var][base + ix] = fraction;
                    }
                    done += 1;
                    progress(done, total as u64);
                }
                Err(e) => {
                    cancel.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            }
        }
        for handle in handles {
            if let Err(panic) = handle.join() {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                    .unwrap_or_default();
                first_error.get_or_insert(GenError::Panic(message));
            }
        }
        first_error.map_or(Ok(()), Err)
    });
    outcome?;
    let meta = writer.finish(&stats, &cells, &validity)?;
    Ok((meta, total))
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
        let aux = ops
            .iter()
            .flat_map(|op| std::iter::repeat_n(if *op == Some(Op::Ranked) { u32::MAX } else { 0 }, plane))
            .collect();
        Accumulator { ops, values: vec![f64::NAN; n], aux, plane }
    }

    #[inline]
    fn add(&mut self, j: usize, cell: usize, x: f64, rank: u32) {
        let i = j * self.plane + cell;
        let (value, aux) = (&mut self.values[i], &mut self.aux[i]);
        match self.ops[j] {
            Some(Op::Mean | Op::Sum) => {
                *value = if *aux == 0 { x } else { *value + x };
                *aux += 1;
            }
            Some(Op::Min) => *value = if value.is_nan() { x } else { value.min(x) },
            Some(Op::Max) => *value = if value.is_nan() { x } else { value.max(x) },
            Some(Op::Ranked) if rank < *aux => {
                *value = x;
                *aux = rank;
            }
            Some(Op::Ranked) | None => {}
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

/// Warps, aggregates and writes one block.
fn run_block(plan: &Plan, writer: &CubeWriter, block: Block) -> Result<BlockSummary, GenError> {
    let v = &plan.variables[block.var];
    let layout = plan.layout;
    let grid = &plan.grid;
    let (cy, ct) = (layout.chunk_y, if v.is_static { 1 } else { layout.chunk_t });
    let shard_cols = layout.chunk_x * if v.is_static { layout.static_shard_x } else { layout.shard_x };
    // The block's columns: its shards, of which only those inside the grid are warped.
    let (col0, px) = (block.first_shard * shard_cols, block.n_shards * shard_cols);
    let cols = px.min(grid.width.saturating_sub(col0));
    let row0 = block.iy * cy;
    let rows = cy.min(grid.height.saturating_sub(row0));
    let plane = cy * px;

    // Which source steps feed which local target step, with which rank.
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
            let Some(sources) = v.step_sources.get(block.it * ct + j) else { continue };
            match sources {
                StepSources::Aggregate(steps) => {
                    *op = Some(match v.aggregation {
                        Aggregation::Mean => Op::Mean,
                        Aggregation::Sum => Op::Sum,
                        Aggregation::Min => Op::Min,
                        Aggregation::Max => Op::Max,
                        Aggregation::Nearest => Op::Ranked,
                    });
                    let target = axis.times[block.it * ct + j];
                    let mut by_distance: Vec<usize> = steps.clone();
                    by_distance.sort_by_key(|&s| (v.source.steps[s].time.unwrap_or(target) - target).abs());
                    for (rank, &s) in by_distance.iter().enumerate() {
                        feeds[s].push((j, rank as u32));
                    }
                }
                StepSources::Nearest(steps) => {
                    *op = Some(Op::Ranked);
                    for (rank, &s) in steps.iter().enumerate() {
                        feeds[s].push((j, rank as u32));
                    }
                }
                StepSources::Empty => {}
            }
        }
    }
    let mut acc = Accumulator::new(ops, plane);
    if rows > 0 && cols > 0 {
        let per_band = rows * cols * 8;
        let batch = (WARP_BUDGET_BYTES / per_band.max(1)).clamp(1, 512);
        for (file_index, file) in v.source.files.iter().enumerate() {
            let needed: Vec<usize> = v
                .source
                .steps
                .iter()
                .enumerate()
                .filter(|(s, step)| step.file == file_index && !feeds[*s].is_empty())
                .map(|(s, _)| s)
                .collect();
            for group in needed.chunks(batch) {
                let bands: Vec<usize> = group.iter().map(|&s| v.source.steps[s].band).collect();
                let rasters = warp_window(
                    file,
                    &bands,
                    v.source.data_type,
                    v.source.nodata,
                    v.resampling,
                    grid,
                    (row0..row0 + rows, col0..col0 + cols),
                )?;
                for (&s, raster) in group.iter().zip(rasters) {
                    accumulate(&mut acc, v, &feeds[s], &raster, rows, cols, px);
                }
            }
        }
    }
    let values = acc.finish();
    Ok(writer.write_block(block.var, block.it, block.iy, block.first_shard, &values)?)
}

/// Unpacks one warped band and adds it to every target step it feeds.
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
    let unpack = scale != 1.0 || offset != 0.0;
    for y in 0..rows {
        for x in 0..width {
            let raw = raster[y * width + x];
            if raw.is_nan() {
                continue;
            }
            let value = if unpack { raw * scale + offset } else { raw };
            for &(j, rank) in feeds {
                acc.add(j, y * px + x, value, rank);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulator_ops() {
        let mut acc = Accumulator::new(vec![Some(Op::Mean), Some(Op::Ranked), None, Some(Op::Max)], 2);
        acc.add(0, 0, 1.0, 0);
        acc.add(0, 0, 3.0, 0);
        acc.add(1, 0, 5.0, 2);
        acc.add(1, 0, 7.0, 1);
        acc.add(1, 0, 9.0, 3);
        acc.add(3, 1, -1.0, 0);
        acc.add(3, 1, 4.0, 0);
        let v = acc.finish();
        assert_eq!(v[0], 2.0);
        assert!(v[1].is_nan());
        assert_eq!(v[2], 7.0);
        assert!(v[4].is_nan() && v[5].is_nan());
        assert_eq!(v[7], 4.0);
    }
}
