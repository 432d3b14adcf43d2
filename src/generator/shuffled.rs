//! `order: shuffled` pixel-series cubes: pixels permuted once, stored sample-major `(sample, time)` in
//! `(B, T)` chunks, so that every chunk is a random batch and still one sequential read.
//!
//! The permutation scatters each spatial tile over every batch, so the cube is made in two steps: a tiled
//! cube (the usual generation) in a scratch directory beside the output, then a rewrite into sample order.
//! The rewrite fills as many output shards at a time as [`REWRITE_BUDGET_BYTES`] allows and scans the
//! tiled cube once per such group: memory stays bounded whatever the cube's size, at the price of extra
//! passes over the tiled cube when it is larger than the budget.

use std::path::{Path, PathBuf};

use zarrs::array::{Array, CodecOptions};
use zarrs::storage::ReadableStorageTraits;

use super::{Built, GenError, Run, remove_dir};
use crate::config::{Codec, CompressionConfig, LayoutConfig, Order, ShardConfig, ShardMode};
use crate::cube::manifest::{
    BlockId, BlockRecord, FileRecord, MANIFEST_FILE, Manifest, ManifestHeader, ManifestWriter,
};
use crate::cube::reader::{Cube, read_f64};
use crate::cube::writer::CubeWriter;
use crate::cube::{CubeError, CubeMeta, RunningStats};
use crate::layout::Layout;
use crate::plan::{DType, Plan};
use crate::time;

/// Memory for the output samples held during the rewrite.
pub(super) const REWRITE_BUDGET_BYTES: usize = 512 << 20;

/// Where the tiled cube of the sample-major cube being made in `staging` is built.
pub(super) fn scratch(staging: &Path) -> PathBuf {
    staging.with_extension("tiled")
}

/// Builds the sample-major cube of `plan` in `staging`. The tiled step resumes and partitions like any
/// cube; the rewrite, a copy, runs again whole when it was interrupted.
pub(super) fn build(plan: &Plan, staging: &Path, run: &Run) -> Result<Built, GenError> {
    let layout = plan.layout;
    let grid = plan.grid;
    let n_time = plan.n_time();
    // The staging directory carries the plan's fingerprint from the start, so that a second run recognises
    // its work (and a changed configuration is refused) before the scratch cube is looked at.
    std::fs::create_dir_all(staging)
        .map_err(|source| CubeError::Io { path: staging.to_path_buf(), source })?;
    let existing = Manifest::load(staging)?.header.filter(|h| h.fingerprint == run.fingerprint);
    let header = existing.unwrap_or_else(|| {
        ManifestHeader::new(run.fingerprint.clone(), time::format_instant(chrono::Utc::now().timestamp()))
    });
    drop(ManifestWriter::create(staging, MANIFEST_FILE, &header, &[])?);

    // Step 1: the tiled cube, uncompressed (it is read back once and deleted).
    let mut tiled_plan = plan.clone();
    let tiled_config = LayoutConfig::PixelSeries {
        batch: layout.batch,
        tile: None,
        window: Some(layout.chunk_t),
        shard: ShardConfig::Named(ShardMode::None),
        order: Order::Tiled,
        seed: 0,
        multires: false,
    };
    tiled_plan.layout = Layout::resolve(&tiled_config, n_time, grid.height, grid.width, 4);
    tiled_plan.config.compression = CompressionConfig { codec: Codec::None, level: None };
    let scratch = scratch(staging);
    let tiled_run = Run {
        options: run.options,
        fingerprint: super::fingerprint(&tiled_plan),
        reuse_from: None,
        progress: run.progress,
    };
    if Manifest::fingerprint(&scratch).is_some_and(|f| f != tiled_run.fingerprint) {
        remove_dir(&scratch)?;
    }
    match super::build(&tiled_plan, &scratch, &tiled_run)? {
        part @ Built::Part { .. } => Ok(part),
        Built::Complete { blocks, reused, .. } => {
            let tiled = Cube::open(&scratch)?;
            let meta = rewrite(plan, &tiled, staging, &header, &tiled_run.fingerprint)?;
            let _ = std::fs::remove_dir_all(&scratch);
            Ok(Built::Complete { meta, blocks, reused })
        }
    }
}

/// Step 2: copies the tiled cube into sample order.
fn rewrite(
    plan: &Plan,
    tiled: &Cube,
    staging: &Path,
    header: &ManifestHeader,
    inputs: &str,
) -> Result<CubeMeta, GenError> {
    let writer = CubeWriter::create(staging, plan, &header.created)?;
    let mut records = Vec::new();
    let layout = plan.layout;
    let [_, height, width] = writer.meta().shape;
    let cells = writer.samples().expect("a sample-major writer").to_vec();
    let mut sample_of = vec![0u32; cells.len()];
    for (sample, &cell) in cells.iter().enumerate() {
        sample_of[cell as usize] = sample as u32;
    }
    let [ct_n, nb, _] = writer.meta().chunk_counts();
    let tl = tiled.meta().layout;
    let [_, ty_n, tx_n] = tiled.meta().chunk_counts();
    let n_vars = plan.variables.len();
    let mut stats = vec![RunningStats::default(); n_vars];
    let mut cells_valid = vec![(0u64, 0u64); n_vars];
    // Values the type cannot hold were made missing in the tiled cube: its blocks counted them.
    let mut unstorable = vec![0u64; n_vars];
    for record in Manifest::load(tiled.path())?.records {
        if let Some(var) = plan.variables.iter().position(|v| v.name == record.block.var) {
            unstorable[var] += record.unstorable;
        }
    }
    let mut validity: Vec<Vec<f32>> = Vec::with_capacity(n_vars);
    for (var, v) in writer.meta().variables.clone().iter().enumerate() {
        let array = tiled.array(&v.name)?;
        let ct = if v.is_static { 1 } else { layout.chunk_t };
        let shard_samples = layout.batch * if v.is_static { layout.static_shard_x } else { layout.shard_x };
        let n_shards = (nb * layout.batch).div_ceil(shard_samples);
        let per_group = (REWRITE_BUDGET_BYTES / (shard_samples * ct * 8)).clamp(1, n_shards);
        let time_chunks = if v.is_static { 1 } else { ct_n };
        let mut var_validity = vec![0.0f32; time_chunks * nb];
        for it in 0..time_chunks {
            for first in (0..n_shards).step_by(per_group) {
                let shards = first..(first + per_group).min(n_shards);
                let samples = shards.start * shard_samples..shards.end * shard_samples;
                let mut buffer = vec![f64::NAN; samples.len() * ct];
                for iy in 0..ty_n {
                    for ix in 0..tx_n {
                        let (y0, x0) = (iy * tl.chunk_y, ix * tl.chunk_x);
                        let tile = read_tile(&array, v.dtype, v.is_static, it, iy, ix, &tl).map_err(|e| {
                            CubeError::Zarr {
                                path: tiled.path().to_path_buf(),
                                message: format!("variable `{}`: {e}", v.name),
                            }
                        })?;
                        let plane = tl.chunk_y * tl.chunk_x;
                        for dy in 0..tl.chunk_y.min(height.saturating_sub(y0)) {
                            for dx in 0..tl.chunk_x.min(width.saturating_sub(x0)) {
                                let sample = sample_of[(y0 + dy) * width + x0 + dx] as usize;
                                if !samples.contains(&sample) {
                                    continue;
                                }
                                let out = (sample - samples.start) * ct;
                                for t in 0..ct {
                                    buffer[out + t] = tile[t * plane + dy * tl.chunk_x + dx];
                                }
                            }
                        }
                    }
                }
                for (k, shard) in shards.enumerate() {
                    let values = &buffer[k * shard_samples * ct..(k + 1) * shard_samples * ct];
                    let summary = writer.write_samples(var, it, shard, values)?;
                    records.push(BlockRecord {
                        block: BlockId { var: v.name.clone(), it, iy: 0, first_shard: shard, n_shards: 1 },
                        inputs: inputs.to_string(),
                        files: summary
                            .files
                            .iter()
                            .map(|key| FileRecord::of(staging, key))
                            .collect::<Result<_, _>>()?,
                        stats: (&summary.stats).into(),
                        cells: summary.cells,
                        valid: summary.valid,
                        unstorable: summary.unstorable,
                        validity: summary.chunk_validity.clone(),
                    });
                    stats[var].merge(&summary.stats);
                    cells_valid[var].0 += summary.cells;
                    cells_valid[var].1 += summary.valid;
                    for (ib, fraction) in summary.chunk_validity {
                        if ib < nb {
                            var_validity[it * nb + ib] = fraction;
                        }
                    }
                }
            }
        }
        validity.push(var_validity);
    }
    drop(ManifestWriter::create(staging, MANIFEST_FILE, header, &records.iter().collect::<Vec<_>>())?);
    let meta = writer.finish(&stats, &cells_valid, &unstorable, &validity)?;
    Manifest::seal(staging)?;
    Ok(meta)
}

/// One chunk of the tiled cube as f64 (`[T, h, w]`, or `[h, w]` when static); fill values stay as stored.
fn read_tile(
    array: &Array<dyn ReadableStorageTraits>,
    dtype: DType,
    is_static: bool,
    it: usize,
    iy: usize,
    ix: usize,
    tiled: &Layout,
) -> Result<Vec<f64>, zarrs::array::ArrayError> {
    read_f64(array, dtype, &tiled.chunk_subset(is_static, [it, iy, ix]), &CodecOptions::default())
}
