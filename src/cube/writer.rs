//! Writing a cube: metadata first (without the completion marker), then chunk rows from many threads, then
//! statistics, validity index, consolidated metadata and, last, `complete: true`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use zarrs::array::codec::{Crc32cCodec, GzipCodec, ZstdCodec};
use zarrs::array::{Array, ArrayBuilder, Element, data_type};
use zarrs::filesystem::FilesystemStore;
use zarrs::group::GroupBuilder;
use zarrs::metadata_ext::group::consolidated_metadata::{ConsolidatedMetadata, ConsolidatedMetadataKind};
use zarrs::node::Node;

use super::{
    CubeError, CubeMeta, FORMAT_VERSION, INDEX_GROUP, META_KEY, RunningStats, TimeMeta, VariableKind,
    VariableMeta,
};
use crate::config::{Codec, CompressionConfig};
use crate::grid::Grid;
use crate::layout::sample_permutation;
use crate::levels::Level;
use crate::plan::{DType, Plan};
use crate::time::{self, TimeAxis};

/// What writing one block (a row of batch chunks of one variable and time window) found.
#[derive(Debug, Clone, Default)]
pub struct BlockSummary {
    /// Statistics of the valid values inside the grid extent.
    pub stats: RunningStats,
    /// Cells inside the grid extent.
    pub cells: u64,
    /// Valid cells inside the grid extent.
    pub valid: u64,
    /// Cells inside the grid extent whose value the variable's type cannot hold apart from its fill value
    /// (±∞, out of its range), stored as missing.
    pub unstorable: u64,
    /// `(chunk x index, fraction of valid cells in that batch chunk)`.
    pub chunk_validity: Vec<(usize, f32)>,
    /// Store keys of the files written (chunks or shards), for the manifest.
    pub files: Vec<String>,
}

/// Whether a value other than NaN is stored as itself in a variable of type `dtype` whose missing cells
/// hold `fill`: for float32, finite and within its range (a float64 source's 1e300 would become ∞); for an
/// integer type, finite, within its range once rounded, and not its fill value (a class equal to the fill
/// chosen for a source without nodata would read as missing; the source's own nodata is NaN by now).
fn storable(dtype: DType, fill: f64, x: f64) -> bool {
    match dtype {
        DType::Float32 => (x as f32).is_finite(),
        _ => x.is_finite() && dtype.holds(x.round()) && x.round() != fill,
    }
}

/// Writes one cube. Shared by the generation threads (`&CubeWriter` is `Sync`).
pub struct CubeWriter {
    path: PathBuf,
    store: Arc<FilesystemStore>,
    arrays: Vec<Array<FilesystemStore>>,
    meta: CubeMeta,
    root_attributes: Map<String, Value>,
    /// Sample-major cubes: the grid cell (`row · width + col`) of each sample.
    samples: Option<Vec<u32>>,
}

impl std::fmt::Debug for CubeWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CubeWriter").field("path", &self.path).finish_non_exhaustive()
    }
}

fn zarr_err(path: &Path, e: impl std::fmt::Display) -> CubeError {
    CubeError::Zarr { path: path.to_path_buf(), message: e.to_string() }
}

pub(crate) fn compression_name(c: &CompressionConfig) -> String {
    match c.codec {
        Codec::Zstd => format!("zstd({})", c.level.unwrap_or(3)),
        Codec::Gzip => format!("gzip({})", c.level.unwrap_or(5)),
        Codec::None => "none".to_string(),
    }
}

impl CubeWriter {
    /// Creates the cube's directory and all metadata at `path`, created at `created` (ISO 8601). Chunks
    /// already in `path` (from an interrupted run) are left alone.
    ///
    /// # Errors
    /// [`CubeError`] on filesystem or Zarr failures.
    pub fn create(path: &Path, plan: &Plan, created: &str) -> Result<CubeWriter, CubeError> {
        zarrs::config::global_config_mut().set_include_zarrs_metadata(false);
        std::fs::create_dir_all(path).map_err(|source| CubeError::Io { path: path.to_path_buf(), source })?;
        let store = Arc::new(FilesystemStore::new(path).map_err(|e| zarr_err(path, e))?);
        let layout = plan.layout;
        let grid = plan.grid;
        let n_time = plan.n_time();
        let (pt, py, px) = layout.padded_shape(n_time, grid.height, grid.width);

        let variables: Vec<VariableMeta> = plan
            .variables
            .iter()
            .map(|v| VariableMeta {
                name: v.name.clone(),
                kind: v.kind,
                dtype: v.dtype,
                fill_value: (!v.fill.is_nan()).then_some(v.fill),
                units: v.units.clone(),
                is_static: v.is_static,
                resampling: v.resampling,
                aggregation: v.aggregation,
                sources: v.source.provenance.clone(),
                notes: v.notes.clone(),
                stats: None,
                valid_fraction: 0.0,
                level: v.level,
                upsampling: v.upsampling,
            })
            .collect();
        let time_meta = plan.time.as_ref().map(|axis| TimeMeta {
            steps: axis.len(),
            start: time::format_instant(axis.times[0]),
            end: time::format_instant(*axis.times.last().expect("non-empty axis")),
            step: axis.step.map(|s| s.to_string()),
        });
        let meta = CubeMeta {
            format_version: FORMAT_VERSION,
            generator: format!("cubeload {}", env!("CARGO_PKG_VERSION")),
            created: created.to_string(),
            complete: false,
            sealed: false,
            layout,
            grid,
            shape: [n_time, grid.height, grid.width],
            padded_shape: [pt, py, px],
            time: time_meta,
            variables,
            compression: compression_name(&plan.config.compression),
            config: plan.config_text.clone(),
            levels: plan.levels.clone(),
        };

        let mut root_attributes = Map::new();
        root_attributes.insert("Conventions".into(), json!("CF-1.8"));
        for (k, v) in &plan.config.metadata {
            root_attributes.insert(k.clone(), v.clone());
        }
        let samples = layout.shuffled.map(|seed| sample_permutation(grid.height * grid.width, seed));
        let mut writer = CubeWriter {
            path: path.to_path_buf(),
            store,
            arrays: Vec::new(),
            meta,
            root_attributes,
            samples,
        };
        writer.store_root()?;
        writer.write_coordinates(plan, "", &grid, [pt, py, px], 1)?;
        for level in &plan.levels {
            writer.store_level_group(level)?;
            let [_, ly, lx] = level.padded_shape;
            writer.write_coordinates(plan, &level.group, &level.grid, [pt, ly, lx], level.time_factor)?;
        }
        for v in &writer.meta.variables {
            let array = writer.create_variable(plan, v)?;
            writer.arrays.push(array);
        }
        Ok(writer)
    }

    /// Sample-major cubes: the grid cell (`row · width + col`) of each sample.
    #[must_use]
    pub fn samples(&self) -> Option<&[u32]> {
        self.samples.as_deref()
    }

    /// Stores samples `shard · B·k .. (shard + 1) · B·k` of variable `var` at time chunk `it` of a sample-major
    /// cube (k batches per shard): `values` is `[samples, chunk_t]` row-major (`[samples]` when static).
    ///
    /// # Errors
    /// [`CubeError::Zarr`] when storing fails.
    pub fn write_samples(
        &self,
        var: usize,
        it: usize,
        shard: usize,
        values: &[f64],
    ) -> Result<BlockSummary, CubeError> {
        let layout = self.meta.layout;
        let v = &self.meta.variables[var];
        let [n_time, height, width] = self.meta.shape;
        let ct = if v.is_static { 1 } else { layout.chunk_t };
        let b = layout.chunk_y;
        let per_shard = b * if v.is_static { layout.static_shard_x } else { layout.shard_x };
        assert_eq!(values.len(), per_shard * ct, "shard shape");
        let fill = v.fill_value.unwrap_or(f64::NAN);
        let mut summary = BlockSummary::default();
        let mut chunk_valid = vec![0u64; per_shard / b];
        for (i, &value) in values.iter().enumerate() {
            let (sample, t) = (shard * per_shard + i / ct, it * ct + i % ct);
            if sample >= height * width || (!v.is_static && t >= n_time) {
                continue;
            }
            summary.cells += 1;
            if value.is_nan() || value == fill {
                continue;
            }
            if storable(v.dtype, fill, value) {
                summary.valid += 1;
                summary.stats.push(value);
                chunk_valid[i / ct / b] += 1;
            } else {
                summary.unstorable += 1;
            }
        }
        let shards_before = shard * per_shard / b;
        summary.chunk_validity = chunk_valid
            .iter()
            .enumerate()
            .map(|(k, &n)| (shards_before + k, n as f32 / (b * ct) as f32))
            .collect();
        let indices: Vec<u64> = if v.is_static { vec![shard as u64] } else { vec![shard as u64, it as u64] };
        summary.files.push(self.store_converted(&self.arrays[var], v.dtype, fill, &indices, &[values])?);
        Ok(summary)
    }

    /// The metadata as written so far.
    #[must_use]
    pub fn meta(&self) -> &CubeMeta {
        &self.meta
    }

    fn store_root(&self) -> Result<(), CubeError> {
        let mut attributes = self.root_attributes.clone();
        attributes.insert(META_KEY.into(), serde_json::to_value(&self.meta).expect("serializable"));
        let group = GroupBuilder::new()
            .attributes(attributes)
            .build(self.store.clone(), "/")
            .map_err(|e| zarr_err(&self.path, e))?;
        group.store_metadata().map_err(|e| zarr_err(&self.path, e))
    }

    /// The child group of a resolution level, with the index mapping to the target grid in its attributes.
    fn store_level_group(&self, level: &Level) -> Result<(), CubeError> {
        let [ky, kx] = level.factor;
        let [my, mx] = level.nest;
        let q = level.time_factor;
        let attributes = json!({
            "cubeload_level": {
                "factor": level.factor,
                "time_factor": q,
                "nest": level.nest,
                "mapping": format!(
                    "target cell (r, c) lies in this level's cell (r // {ky}, c // {kx}); its centre is at \
                     level position ((r + 0.5) / {ky} - 0.5, (c + 0.5) / {kx} - 0.5) in cell-centre units; \
                     target step t lies in this level's step t // {q}, the aggregation of the source steps of \
                     its window of {q} target steps; target chunk (it, iy, ix) lies in this level's chunk \
                     (it, iy // {my}, ix // {mx})"
                ),
            }
        });
        let group = GroupBuilder::new()
            .attributes(attributes.as_object().cloned().unwrap_or_default())
            .build(self.store.clone(), &format!("/{}", level.group))
            .map_err(|e| zarr_err(&self.path, e))?;
        group.store_metadata().map_err(|e| zarr_err(&self.path, e))
    }

    /// Coordinates `lat`, `lon`, `time` and the grid mapping of the group `group` (`""`: the root), whose
    /// steps are every `q`-th of the `pt` padded target steps.
    fn write_coordinates(
        &self,
        plan: &Plan,
        group: &str,
        grid: &Grid,
        [pt, py, px]: [usize; 3],
        q: usize,
    ) -> Result<(), CubeError> {
        let grid = *grid;
        let path =
            |name: &str| if group.is_empty() { format!("/{name}") } else { format!("/{group}/{name}") };
        let (lat, lon, dims): (Vec<f64>, Vec<f64>, [&str; 2]) = match &self.samples {
            // Sample-major cubes: the coordinates of each sample, NaN for the padding samples.
            Some(cells) => {
                let at =
                    |s: usize, f: &dyn Fn(usize) -> f64| cells.get(s).map_or(f64::NAN, |&c| f(c as usize));
                (
                    (0..py).map(|s| at(s, &|c| grid.lat(c / grid.width))).collect(),
                    (0..py).map(|s| at(s, &|c| grid.lon(c % grid.width))).collect(),
                    ["sample", "sample"],
                )
            }
            None => (
                (0..py).map(|i| grid.lat(i)).collect(),
                (0..px).map(|j| grid.lon(j)).collect(),
                ["lat", "lon"],
            ),
        };
        let coord = |name: &str, dim: &str, values: &[f64], attrs: Value| -> Result<(), CubeError> {
            let mut builder = ArrayBuilder::new(
                vec![values.len() as u64],
                vec![values.len().max(1) as u64],
                data_type::float64(),
                f64::NAN,
            );
            builder.dimension_names(Some([dim])).attributes(attrs.as_object().cloned().unwrap_or_default());
            let array =
                builder.build(self.store.clone(), &path(name)).map_err(|e| zarr_err(&self.path, e))?;
            array.store_metadata().map_err(|e| zarr_err(&self.path, e))?;
            array.store_chunk(&[0], values).map_err(|e| zarr_err(&self.path, e))
        };
        coord(
            "lat",
            dims[0],
            &lat,
            json!({"standard_name": "latitude", "long_name": "latitude", "units": "degrees_north", "axis": "Y"}),
        )?;
        coord(
            "lon",
            dims[1],
            &lon,
            json!({"standard_name": "longitude", "long_name": "longitude", "units": "degrees_east", "axis": "X"}),
        )?;
        if let Some(axis) = &plan.time {
            let times: Vec<i64> = axis.padded(pt - axis.len()).into_iter().step_by(q.max(1)).collect();
            let (unit, units) = TimeAxis::cf_units(&times);
            let values: Vec<i64> = times.iter().map(|t| t / unit).collect();
            let n = values.len();
            let mut builder =
                ArrayBuilder::new(vec![n as u64], vec![n.max(1) as u64], data_type::int64(), i64::MIN);
            builder.dimension_names(Some(["time"])).attributes(
                json!({
                    "standard_name": "time", "long_name": "time", "axis": "T",
                    "units": units, "calendar": "proleptic_gregorian",
                })
                .as_object()
                .cloned()
                .unwrap_or_default(),
            );
            let array =
                builder.build(self.store.clone(), &path("time")).map_err(|e| zarr_err(&self.path, e))?;
            array.store_metadata().map_err(|e| zarr_err(&self.path, e))?;
            array.store_chunk(&[0], &values).map_err(|e| zarr_err(&self.path, e))?;
        }
        // CF grid mapping, as rioxarray and GDAL look for it.
        let wkt = gdal::spatial_ref::SpatialRef::from_epsg(4326)
            .and_then(|s| s.to_wkt())
            .map_err(|e| zarr_err(&self.path, e))?;
        let gt = grid.geotransform(0);
        let mut builder = ArrayBuilder::new(Vec::<u64>::new(), Vec::<u64>::new(), data_type::int32(), 0i32);
        builder.dimension_names(Some(Vec::<String>::new())).attributes(
            json!({
                "grid_mapping_name": "latitude_longitude",
                "crs_wkt": wkt, "spatial_ref": wkt,
                "semi_major_axis": 6_378_137.0, "inverse_flattening": 298.257_223_563,
                "GeoTransform": gt.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
            })
            .as_object()
            .cloned()
            .unwrap_or_default(),
        );
        let array =
            builder.build(self.store.clone(), &path("spatial_ref")).map_err(|e| zarr_err(&self.path, e))?;
        array.store_metadata().map_err(|e| zarr_err(&self.path, e))
    }

    fn create_variable(&self, plan: &Plan, v: &VariableMeta) -> Result<Array<FilesystemStore>, CubeError> {
        let geometry = self.meta.geometry(v);
        let layout = *geometry.layout;
        let [pt, py, px] = geometry.padded_shape;
        let fill = v.fill_value.unwrap_or(f64::NAN);
        let (b, t) = (layout.chunk_y as u64, layout.chunk_t as u64);
        let (shape, chunk, shard_x, dims): (Vec<u64>, Vec<u64>, usize, Vec<&str>) = if self.samples.is_some()
        {
            // Sample-major: (sample, time) chunked (B, T); shards group batches along samples.
            if v.is_static {
                (vec![py as u64], vec![b], layout.static_shard_x, vec!["sample"])
            } else {
                (vec![py as u64, pt as u64], vec![b, t], layout.shard_x, vec!["sample", "time"])
            }
        } else if v.is_static {
            (
                vec![py as u64, px as u64],
                vec![layout.chunk_y as u64, layout.chunk_x as u64],
                layout.static_shard_x,
                vec!["lat", "lon"],
            )
        } else {
            (
                vec![pt as u64, py as u64, px as u64],
                vec![layout.chunk_t as u64, layout.chunk_y as u64, layout.chunk_x as u64],
                layout.shard_x,
                vec!["time", "lat", "lon"],
            )
        };
        let mut outer = chunk.clone();
        let sharded_axis = if self.samples.is_some() { 0 } else { outer.len() - 1 };
        outer[sharded_axis] *= shard_x as u64;
        let (dtype, fill): (zarrs::array::DataType, zarrs::array::FillValue) = match v.dtype {
            DType::Float32 => (data_type::float32(), f32::NAN.into()),
            DType::Uint8 => (data_type::uint8(), (fill as u8).into()),
            DType::Uint16 => (data_type::uint16(), (fill as u16).into()),
            DType::Int16 => (data_type::int16(), (fill as i16).into()),
            DType::Uint32 => (data_type::uint32(), (fill as u32).into()),
            DType::Int32 => (data_type::int32(), (fill as i32).into()),
        };
        let mut builder = ArrayBuilder::new(shape, outer, dtype, fill);
        let compression = &plan.config.compression;
        let mut codecs: Vec<Arc<dyn zarrs::array::BytesToBytesCodecTraits>> = match compression.codec {
            Codec::Zstd => vec![Arc::new(ZstdCodec::new(compression.level.unwrap_or(3), false))],
            Codec::Gzip => vec![Arc::new(
                GzipCodec::new(compression.level.unwrap_or(5) as u32).map_err(|e| zarr_err(&self.path, e))?,
            )],
            Codec::None => vec![],
        };
        // A checksum on every stored chunk: a flipped bit or a torn write is an error on read, never data.
        codecs.push(Arc::new(Crc32cCodec::new()));
        builder.bytes_to_bytes_codecs(codecs);
        if shard_x > 1 {
            builder.subchunk_shape(chunk);
        }
        let mut attrs = Map::new();
        attrs.insert("long_name".into(), json!(v.name));
        if let Some(units) = &v.units {
            attrs.insert("units".into(), json!(units));
        }
        attrs.insert("grid_mapping".into(), json!("spatial_ref"));
        attrs.insert(
            "coordinates".into(),
            json!(if self.samples.is_some() { "lat lon spatial_ref" } else { "spatial_ref" }),
        );
        attrs.insert("cubeload_kind".into(), serde_json::to_value(v.kind).expect("serializable"));
        // An integer variable's fill value marks real cells (no data, padding): declared as CF's `_FillValue`,
        // which xarray masks (Zarr v3's own `fill_value` it does not), as it does a NetCDF land-cover map's.
        if let Some(fill) = v.fill_value.filter(|f| v.dtype != DType::Float32 && f.is_finite()) {
            attrs.insert("_FillValue".into(), json!(fill as i64));
        }
        builder.dimension_names(Some(dims)).attributes(attrs);
        let array = builder
            .build(self.store.clone(), &format!("/{}", geometry.array_path(&v.name)))
            .map_err(|e| zarr_err(&self.path, e))?;
        array.store_metadata().map_err(|e| zarr_err(&self.path, e))?;
        Ok(array)
    }

    /// Stores the block of variable `var` at time chunk `it`, chunk row `iy`, from shard `first_shard` on:
    /// `values` holds `chunk_t × chunk_y × (k · shard width)` cells for k whole shards (`1 × …` for static
    /// variables), NaN for missing.
    ///
    /// # Errors
    /// [`CubeError::Zarr`] when storing fails.
    pub fn write_block(
        &self,
        var: usize,
        it: usize,
        iy: usize,
        first_shard: usize,
        values: &[f64],
    ) -> Result<BlockSummary, CubeError> {
        let v = &self.meta.variables[var];
        let geometry = self.meta.geometry(v);
        let layout = *geometry.layout;
        let [n_time, height, width] = geometry.shape;
        let (ct, cy, cx) = (if v.is_static { 1 } else { layout.chunk_t }, layout.chunk_y, layout.chunk_x);
        let shard_x = if v.is_static { layout.static_shard_x } else { layout.shard_x };
        let shard_w = cx * shard_x;
        let px = values.len() / (ct * cy);
        assert!(values.len() == ct * cy * px && px.is_multiple_of(shard_w), "block shape");
        let (col0, chunks_x) = (first_shard * shard_w, geometry.padded_shape[2] / cx);
        let fill = v.fill_value.unwrap_or(f64::NAN);

        // Statistics and validity over the block (padding counts as invalid in the validity index).
        let mut summary = BlockSummary::default();
        let mut chunk_valid = vec![0u64; px / cx];
        let inside_cols = px.min(width.saturating_sub(col0));
        let rows: Vec<&[f64]> = (0..ct)
            .filter(|t| v.is_static || it * ct + t < n_time)
            .flat_map(|t| (0..cy).filter(|y| iy * cy + y < height).map(move |y| (t, y)))
            .map(|(t, y)| &values[(t * cy + y) * px..(t * cy + y) * px + inside_cols])
            .collect();
        let dtype = v.dtype;
        let valid = |x: f64| !x.is_nan() && storable(dtype, fill, x);
        for row in &rows {
            summary.cells += row.len() as u64;
            for (n, cells) in chunk_valid.iter_mut().zip(row.chunks(cx)) {
                for &x in cells.iter().filter(|x| !x.is_nan()) {
                    if storable(dtype, fill, x) {
                        *n += 1;
                    } else {
                        summary.unstorable += 1;
                    }
                }
            }
        }
        summary.stats = RunningStats::of_rows(&rows, valid);
        summary.valid = summary.stats.count();
        let per_chunk = (ct * cy * cx) as f32;
        summary.chunk_validity = chunk_valid
            .iter()
            .enumerate()
            .map(|(i, &n)| (col0 / cx + i, n as f32 / per_chunk))
            .filter(|&(ix, _)| ix < chunks_x)
            .collect();

        // One store per shard (or per chunk when unsharded).
        let array = &self.arrays[var];
        for k in 0..px / shard_w {
            let ishard = first_shard + k;
            let shard_rows: Vec<&[f64]> =
                values.chunks_exact(px).map(|row| &row[k * shard_w..(k + 1) * shard_w]).collect();
            let indices: Vec<u64> = if v.is_static {
                vec![iy as u64, ishard as u64]
            } else {
                vec![it as u64, iy as u64, ishard as u64]
            };
            summary.files.push(self.store_converted(array, v.dtype, fill, &indices, &shard_rows)?);
        }
        Ok(summary)
    }

    /// Stores one chunk (or shard), given as its rows, converted to the variable's type; returns its store
    /// key. A file already there is unlinked first, not rewritten in place: it may be a hard link into the
    /// cube being extended.
    fn store_converted(
        &self,
        array: &Array<FilesystemStore>,
        dtype: DType,
        fill: f64,
        indices: &[u64],
        rows: &[&[f64]],
    ) -> Result<String, CubeError> {
        fn store<T: Element>(
            w: &CubeWriter,
            array: &Array<FilesystemStore>,
            indices: &[u64],
            data: &[T],
        ) -> Result<(), CubeError> {
            // One thread per shard: inner chunks then land in index order, so that the bytes of a cube do not
            // depend on scheduling (generation threads already keep the cores busy).
            let sequential = zarrs::array::CodecOptions::default().with_concurrent_target(1);
            array.store_chunk_opt(indices, data, &sequential).map_err(|e| zarr_err(&w.path, e))
        }
        fn converted<T>(rows: &[&[f64]], convert: impl Fn(f64) -> T) -> Vec<T> {
            let mut out = Vec::with_capacity(rows.iter().map(|row| row.len()).sum());
            for row in rows {
                out.extend(row.iter().map(|&x| convert(x)));
            }
            out
        }
        let key = array.chunk_key(indices).as_str().to_string();
        let file = self.path.join(&key);
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(CubeError::Io { path: file, source: e });
            }
            _ => {}
        }
        // What the type cannot hold is missing, as the statistics and the validity index count it.
        let int = |x: f64| if storable(dtype, fill, x) { x.round() } else { fill };
        let float = |x: f64| if storable(DType::Float32, fill, x) { x as f32 } else { f32::NAN };
        match dtype {
            DType::Float32 => store(self, array, indices, &converted(rows, float)),
            DType::Uint8 => store(self, array, indices, &converted(rows, |x| int(x) as u8)),
            DType::Uint16 => store(self, array, indices, &converted(rows, |x| int(x) as u16)),
            DType::Int16 => store(self, array, indices, &converted(rows, |x| int(x) as i16)),
            DType::Uint32 => store(self, array, indices, &converted(rows, |x| int(x) as u32)),
            DType::Int32 => store(self, array, indices, &converted(rows, |x| int(x) as i32)),
        }?;
        Ok(key)
    }

    /// Writes statistics, the validity index and consolidated metadata, then the completion marker.
    /// `validity[var]` holds one fraction per batch chunk in `(time, lat, lon)` chunk order; `unstorable[var]`
    /// counts the values stored as missing because its type cannot hold them (a note says so).
    ///
    /// # Errors
    /// [`CubeError`] when storing fails; the cube then stays incomplete.
    pub fn finish(
        mut self,
        stats: &[RunningStats],
        valid_cells: &[(u64, u64)],
        unstorable: &[u64],
        validity: &[Vec<f32>],
    ) -> Result<CubeMeta, CubeError> {
        let index_group = GroupBuilder::new()
            .attributes(
                json!({"description": "fraction of valid values per batch chunk, per variable"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            )
            .build(self.store.clone(), &format!("/{INDEX_GROUP}"))
            .map_err(|e| zarr_err(&self.path, e))?;
        index_group.store_metadata().map_err(|e| zarr_err(&self.path, e))?;
        let counts: Vec<[usize; 3]> =
            self.meta.variables.iter().map(|v| self.meta.geometry(v).chunk_counts()).collect();
        for (i, v) in self.meta.variables.iter_mut().enumerate() {
            let [ct, cy, cx] = counts[i];
            v.stats = stats[i].finish();
            // The extremes as stored, values a reader finds (the others are moments, not values).
            if let Some(stats) = v.stats.as_mut().filter(|_| v.dtype == DType::Float32) {
                (stats.min, stats.max) = (f64::from(stats.min as f32), f64::from(stats.max as f32));
            }
            // Batches are float32, whose integers are exact up to 2^24 only.
            let exact = f64::from(1u32 << 24);
            if v.kind == VariableKind::Categorical
                && v.stats.as_ref().is_some_and(|s| s.min < -exact || s.max > exact)
            {
                v.notes.push(format!(
                    "codes beyond ±{exact} are not exact in the loader's float32 batches (xarray reads them \
                     exactly): renumber the classes to keep them apart"
                ));
            }
            if unstorable[i] > 0 {
                let what = match (v.dtype, v.fill_value) {
                    (DType::Float32, _) | (_, None) => "infinite or beyond float32's range".to_string(),
                    (dtype, Some(fill)) => {
                        let name = format!("{dtype:?}").to_lowercase();
                        format!(
                            "not codes {name} holds apart from its fill value {fill} (infinite, out of its range, or equal to {fill})"
                        )
                    }
                };
                v.notes.push(format!(
                    "{} values were {what}: stored as missing, and left out of the statistics",
                    unstorable[i]
                ));
            }
            let (cells, valid) = valid_cells[i];
            v.valid_fraction = if cells == 0 { 0.0 } else { valid as f64 / cells as f64 };
            let (shape, dims): (Vec<u64>, Vec<&str>) = if v.is_static {
                (vec![cy as u64, cx as u64], vec!["lat_batch", "lon_batch"])
            } else {
                (vec![ct as u64, cy as u64, cx as u64], vec!["time_batch", "lat_batch", "lon_batch"])
            };
            // A level's chunks are counted on its own grid: dimensions of their own, so that xarray opens
            // the group (one name with two lengths is a conflict to it).
            let level = v.level.map(|l| format!("_{}", self.meta.levels[l].group)).unwrap_or_default();
            let dims: Vec<String> = dims.iter().map(|d| format!("{d}{level}")).collect();
            let mut builder = ArrayBuilder::new(shape.clone(), shape, data_type::float32(), f32::NAN);
            builder.dimension_names(Some(dims));
            // Checksummed as the chunks are: a damaged index would leave batches out of every epoch unseen.
            builder.bytes_to_bytes_codecs(vec![Arc::new(Crc32cCodec::new())]);
            let array = builder
                .build(self.store.clone(), &format!("/{INDEX_GROUP}/{}", v.name))
                .map_err(|e| zarr_err(&self.path, e))?;
            array.store_metadata().map_err(|e| zarr_err(&self.path, e))?;
            let zeros = vec![0u64; array.dimensionality()];
            array.store_chunk(&zeros, &validity[i]).map_err(|e| zarr_err(&self.path, e))?;
        }
        // Consolidate what is on disk now, then write the root group once more, complete.
        let node = Node::open(&self.store, "/").map_err(|e| zarr_err(&self.path, e))?;
        let consolidated = node.consolidate_metadata().expect("the root is a group");
        self.meta.complete = true;
        // The generator seals the manifest right after (`Manifest::seal`).
        self.meta.sealed = true;
        let mut attributes = self.root_attributes.clone();
        attributes.insert(META_KEY.into(), serde_json::to_value(&self.meta).expect("serializable"));
        let mut group = GroupBuilder::new()
            .attributes(attributes)
            .build(self.store.clone(), "/")
            .map_err(|e| zarr_err(&self.path, e))?;
        group.set_consolidated_metadata(Some(ConsolidatedMetadata {
            metadata: consolidated,
            kind: ConsolidatedMetadataKind::Inline,
        }));
        group.store_metadata().map_err(|e| zarr_err(&self.path, e))?;
        self.sort_root_metadata()?;
        Ok(self.meta)
    }

    /// Rewrites the root `zarr.json` for zarr-python 3, whose reading of the consolidated metadata of child
    /// groups (`coarse_5/t2m`, ...) needs two things zarrs does not promise: keys in order (it nests the flat
    /// entries by runs of consecutive keys with the same parent, and loses all runs but the last of a
    /// parent), and codecs spelled as objects (`{"name": "crc32c"}`, not the shorthand `"crc32c"`).
    fn sort_root_metadata(&self) -> Result<(), CubeError> {
        fn sorted(value: Value) -> Value {
            match value {
                Value::Object(map) => {
                    let mut entries: Vec<(String, Value)> = map.into_iter().collect();
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                    let spelled = |(key, value): (String, Value)| match (key.as_str(), value) {
                        ("codecs" | "index_codecs", Value::Array(codecs)) => {
                            let codecs = codecs.into_iter().map(|codec| match codec {
                                Value::String(name) => json!({ "name": name }),
                                other => sorted(other),
                            });
                            (key, Value::Array(codecs.collect()))
                        }
                        (_, value) => (key, sorted(value)),
                    };
                    Value::Object(entries.into_iter().map(spelled).collect())
                }
                Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
                other => other,
            }
        }
        let path = self.path.join("zarr.json");
        let io = |source| CubeError::Io { path: path.clone(), source };
        let value: Value = serde_json::from_slice(&std::fs::read(&path).map_err(io)?)
            .map_err(|e| zarr_err(&self.path, e))?;
        let text = serde_json::to_vec_pretty(&sorted(value)).expect("serializable");
        let partial = self.path.join("zarr.json.partial");
        std::fs::write(&partial, text).map_err(|source| CubeError::Io { path: partial.clone(), source })?;
        std::fs::rename(&partial, &path).map_err(io)
    }
}
