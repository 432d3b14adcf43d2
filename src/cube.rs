//! The cube on disk: a Zarr v3 group that xarray, zarr-python and GDAL open, whose chunks are batches.
//!
//! Contract (see DESIGN.md): one array per variable, `(time, lat, lon)` or `(lat, lon)` for static ones;
//! 1-D coordinate arrays `time` (int64, CF units and calendar), `lat` (descending), `lon`; a `spatial_ref`
//! grid mapping with `crs_wkt`; `dimension_names` everywhere; consolidated metadata on the root group; and
//! under the root attribute `cubeload` the [`CubeMeta`]: layout, grid, per-variable metadata, statistics and
//! provenance, with `complete: true` written last. Multi-resolution cubes keep each coarser level in a child
//! group (`coarse_K`) with its own `lat`, `lon`, `time` and `spatial_ref` (see [`crate::levels`]). A validity index (fraction of valid values per batch and
//! variable) lives in the child group `cubeload_index`, so a loader can skip empty batches without reading
//! them.

pub mod manifest;
pub mod reader;
pub mod validate;
pub mod writer;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{Aggregation, Resampling, Upsampling, VariableKind};
use crate::grid::Grid;
use crate::layout::Layout;
use crate::levels::Level;
use crate::plan::DType;
use crate::source::SourceFile;

/// Version of the on-disk contract; bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the root attribute holding [`CubeMeta`].
pub const META_KEY: &str = "cubeload";
/// Child group of the validity index.
pub const INDEX_GROUP: &str = "cubeload_index";

/// A cube-level error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CubeError {
    /// Zarr storage or codec failure.
    #[error("{path}: {message}")]
    Zarr {
        /// The cube.
        path: PathBuf,
        /// What zarrs reported.
        message: String,
    },
    /// Filesystem failure.
    #[error("{path}: {source}")]
    Io {
        /// The path at fault.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a cubeload cube.
    #[error("{path}: {message}")]
    NotACube {
        /// The path.
        path: PathBuf,
        /// Why not.
        message: String,
    },
    /// Generation did not finish.
    #[error(
        "{path}: incomplete cube (generation did not finish: its completion marker is missing); run the same `cubeload gen -c CONFIG` again to resume it (finished chunks are kept), or add --overwrite to start over"
    )]
    Incomplete {
        /// The cube.
        path: PathBuf,
    },
    /// `verify` found damage (listed before this error), or an incomplete cube.
    #[error(
        "{path}: {problems} {} found: {}",
        if *problems == 1 { "problem" } else { "problems" },
        if *damaged {
            "the cube is damaged; regenerate it, or the chunks named above"
        } else {
            "its generation did not finish; run the same `cubeload gen -c CONFIG` again to resume it"
        }
    )]
    Damaged {
        /// The cube.
        path: PathBuf,
        /// How many.
        problems: usize,
        /// Whether anything is wrong besides the cube being incomplete.
        damaged: bool,
    },
    /// The output path is taken by something cubeload did not make, or by a cube the flags do not let it
    /// replace or extend: the config's `output` or the flags are at fault (exit code 2).
    #[error("{path}: {message}")]
    OutputTaken {
        /// The path.
        path: PathBuf,
        /// What is there and what to do.
        message: String,
    },
}

/// Summary statistics of a variable's valid values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Valid values.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
}

/// Running statistics, mergeable across threads (Chan et al.'s parallel variance).
#[derive(Debug, Clone, Copy, Default)]
pub struct RunningStats {
    count: u64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
}

impl RunningStats {
    /// Statistics of the values of `rows` (in order) that `keep` accepts, in two passes (sum, then squared
    /// deviations): no division per value, and as precise as Welford's update. A plain loop per row: a
    /// generated block has tens of millions of values.
    pub fn of_rows(rows: &[&[f64]], keep: impl Fn(f64) -> bool + Copy) -> RunningStats {
        let (mut count, mut sum, mut min, mut max) = (0u64, 0.0f64, f64::INFINITY, f64::NEG_INFINITY);
        for row in rows {
            for &x in row.iter().filter(|&&x| keep(x)) {
                count += 1;
                sum += x;
                min = min.min(x);
                max = max.max(x);
            }
        }
        if count == 0 {
            return RunningStats::default();
        }
        let mean = sum / count as f64;
        let mut m2 = 0.0;
        for row in rows {
            for &x in row.iter().filter(|&&x| keep(x)) {
                m2 += (x - mean) * (x - mean);
            }
        }
        RunningStats { count, mean, m2, min, max }
    }

    /// Number of values.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.count
    }

    /// `[mean, m2, min, max]`, for storing partial results exactly (see [`manifest::StatsBits`]).
    #[must_use]
    pub fn moments(&self) -> [f64; 4] {
        [self.mean, self.m2, self.min, self.max]
    }

    /// The inverse of [`RunningStats::count`] and [`RunningStats::moments`].
    #[must_use]
    pub fn from_moments(count: u64, [mean, m2, min, max]: [f64; 4]) -> RunningStats {
        RunningStats { count, mean, m2, min, max }
    }

    /// Adds one value.
    pub fn push(&mut self, x: f64) {
        if self.count == 0 {
            self.min = x;
            self.max = x;
        } else {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
        self.count += 1;
        let delta = x - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (x - self.mean);
    }

    /// Merges another partial result.
    pub fn merge(&mut self, other: &RunningStats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        let n = (self.count + other.count) as f64;
        let delta = other.mean - self.mean;
        self.mean += delta * other.count as f64 / n;
        self.m2 += other.m2 + delta * delta * self.count as f64 * other.count as f64 / n;
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// The summary, `None` when no value was valid.
    #[must_use]
    pub fn finish(&self) -> Option<Stats> {
        (self.count > 0).then(|| Stats {
            count: self.count,
            mean: self.mean,
            std: (self.m2 / self.count as f64).sqrt(),
            min: self.min,
            max: self.max,
        })
    }
}

/// Per-variable metadata stored in the cube.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariableMeta {
    /// Array name.
    pub name: String,
    /// Continuous or categorical.
    pub kind: VariableKind,
    /// Stored type.
    pub dtype: DType,
    /// Fill value; `None` means NaN.
    pub fill_value: Option<f64>,
    /// Units.
    pub units: Option<String>,
    /// `(lat, lon)` only.
    #[serde(rename = "static")]
    pub is_static: bool,
    /// Spatial resampling used.
    pub resampling: Resampling,
    /// Temporal aggregation used.
    pub aggregation: Aggregation,
    /// Input files with size and SHA-256.
    pub sources: Vec<SourceFile>,
    /// Decisions taken for the user (assumed CRS, ...).
    pub notes: Vec<String>,
    /// Statistics of the valid values (`None` until generation finishes, or when nothing is valid).
    pub stats: Option<Stats>,
    /// Fraction of valid cells inside the grid extent (padding excluded).
    pub valid_fraction: f64,
    /// Multi-resolution cubes: index into [`CubeMeta::levels`] of the level the variable is stored on
    /// (absent: the target grid, at the root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<usize>,
    /// How a variable on a level is brought onto the target grid (the regrid contract, see
    /// [`crate::levels`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upsampling: Option<Upsampling>,
}

/// Where and how one variable is stored: on the target grid at the root, or on a level in its group.
#[derive(Debug, Clone, Copy)]
pub struct Geometry<'a> {
    /// Child group of its arrays (`coarse_10`), `""` for the root.
    pub group: &'a str,
    /// Grid of the stored cells.
    pub grid: &'a Grid,
    /// Chunk geometry of the stored arrays.
    pub layout: &'a Layout,
    /// Valid shape `[time, lat, lon]`.
    pub shape: [usize; 3],
    /// Stored shape `[time, lat, lon]`.
    pub padded_shape: [usize; 3],
    /// The level, for variables not on the target grid.
    pub level: Option<&'a Level>,
}

impl Geometry<'_> {
    /// Chunks along `(time, lat, lon)`.
    #[must_use]
    pub fn chunk_counts(&self) -> [usize; 3] {
        let [t, y, x] = self.padded_shape;
        [if t == 0 { 1 } else { t / self.layout.chunk_t }, y / self.layout.chunk_y, x / self.layout.chunk_x]
    }

    /// Store path of the array `name` of this geometry's group, e.g. `coarse_10/t2m`.
    #[must_use]
    pub fn array_path(&self, name: &str) -> String {
        if self.group.is_empty() { name.to_string() } else { format!("{}/{name}", self.group) }
    }
}

/// Time axis summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimeMeta {
    /// Steps inside the requested axis.
    pub steps: usize,
    /// First instant (ISO 8601).
    pub start: String,
    /// Last instant (ISO 8601).
    pub end: String,
    /// Step (`1h`, ...) or `None` when irregular.
    pub step: Option<String>,
}

/// The `cubeload` root attribute.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CubeMeta {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// `cubeload X.Y.Z`.
    pub generator: String,
    /// Creation time, ISO 8601.
    pub created: String,
    /// Written `true` last, once every chunk and all metadata are stored.
    pub complete: bool,
    /// Whether the cube's manifest ends with a seal: the checksums of the files no block stored (metadata,
    /// coordinates, validity index). `false` in cubes of earlier builds; in a cube that says `true`, a
    /// manifest without its seal was cut short or edited.
    #[serde(default)]
    pub sealed: bool,
    /// Chunk = batch layout.
    pub layout: Layout,
    /// The grid (valid extent).
    pub grid: Grid,
    /// Valid shape `[time, lat, lon]` (time 0 for static-only cubes).
    pub shape: [usize; 3],
    /// Stored (padded) shape `[time, lat, lon]`.
    pub padded_shape: [usize; 3],
    /// Time axis, if any.
    pub time: Option<TimeMeta>,
    /// Variables in delivery order.
    pub variables: Vec<VariableMeta>,
    /// Codec description, e.g. `zstd(3)`.
    pub compression: String,
    /// The configuration text the cube was made from.
    pub config: String,
    /// Coarser resolution levels of a multi-resolution cube (see [`crate::levels`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub levels: Vec<Level>,
}

impl CubeMeta {
    /// Batch chunks along `(time, lat, lon)`.
    #[must_use]
    pub fn chunk_counts(&self) -> [usize; 3] {
        let [t, y, x] = self.padded_shape;
        [if t == 0 { 1 } else { t / self.layout.chunk_t }, y / self.layout.chunk_y, x / self.layout.chunk_x]
    }

    /// Where variable `v` is stored. A level index past [`CubeMeta::levels`] is refused by validation.
    #[must_use]
    pub fn geometry(&self, v: &VariableMeta) -> Geometry<'_> {
        match v.level.and_then(|l| self.levels.get(l)) {
            Some(level) => Geometry {
                group: &level.group,
                grid: &level.grid,
                layout: &level.layout,
                shape: level.shape,
                padded_shape: level.padded_shape,
                level: Some(level),
            },
            None => Geometry {
                group: "",
                grid: &self.grid,
                layout: &self.layout,
                shape: self.shape,
                padded_shape: self.padded_shape,
                level: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RunningStats;

    #[test]
    fn two_pass_block_stats_equal_welford_and_merge() {
        let values: Vec<f64> =
            (0..1000).map(|i| 280.0 + f64::from(i % 37) * 0.25 - f64::from(i % 11)).collect();
        let mut welford = RunningStats::default();
        for &x in &values {
            welford.push(x);
        }
        let all = |_| true;
        let mut merged = RunningStats::of_rows(&[&values[..300]], all);
        merged.merge(&RunningStats::of_rows(&[&values[300..550], &values[550..]], all));
        let (a, b) = (welford.finish().unwrap(), merged.finish().unwrap());
        assert_eq!((a.count, a.min, a.max), (b.count, b.min, b.max));
        assert!((a.mean - b.mean).abs() < 1e-10 && (a.std - b.std).abs() < 1e-10, "{a:?} {b:?}");
        assert!(RunningStats::of_rows(&[], all).finish().is_none());
        // Values that `keep` refuses (missing ones) are left out, as if absent.
        let with_gaps: Vec<f64> = values.iter().flat_map(|&x| [x, f64::NAN]).collect();
        let c = RunningStats::of_rows(&[&with_gaps[..601], &with_gaps[601..]], |x: f64| !x.is_nan());
        assert_eq!(c.finish().unwrap(), RunningStats::of_rows(&[&values], all).finish().unwrap());
    }
}
