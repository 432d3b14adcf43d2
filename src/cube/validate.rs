//! Sanity checks of a cube's metadata, before anything is allocated from it.
//!
//! A cube is untrusted input: a directory copied half-way, hand-edited, or made by something else. Its root
//! `cubeload` attribute sizes every buffer the loader allocates (chunks, batches, the validity index,
//! coordinates), so [`validate`] checks it as a whole first: nonzero chunk sizes, a layout that is one of those
//! [`Layout::resolve`] makes, a padded shape that is the shape padded to whole chunks, a grid of the shape's
//! size, and sizes within limits that no cube `cubeload gen` makes exceeds (the planner refuses the same
//! sizes, naming the config keys). All arithmetic is checked: an absurd value is an error, never an
//! overflow. [`check_array`] then holds each stored array to what the metadata says, before it is read.
//!
//! [`Layout::resolve`]: crate::layout::Layout::resolve

use zarrs::array::{Array, ArrayShardedExt, DataType, data_type};

use super::{CubeError, CubeMeta, FORMAT_VERSION, INDEX_GROUP, META_KEY, VariableMeta};
use crate::layout::LayoutKind;
use crate::levels::Level;
use crate::plan::DType;

/// One decoded chunk of one variable: a reader allocates it whole.
pub const MAX_CHUNK_BYTES: u64 = 4 << 30;
/// One delivered batch, all variables: `f32` data and `u8` mask.
pub const MAX_BATCH_BYTES: u64 = 16 << 30;
/// Batch chunks of a cube: the validity index and each epoch's permutation hold one entry per chunk.
pub const MAX_CHUNKS: u64 = 1 << 26;
/// Cells per side of the grid (0.00001° over the globe: surely a typo).
pub const MAX_CELLS_PER_SIDE: usize = 10_000_000;
/// Samples of an `order: shuffled` cube (the permutation and the per-sample coordinates are held whole).
pub const MAX_SAMPLES: usize = 1 << 28;
/// Time steps (a century of minutes).
pub const MAX_TIME_STEPS: usize = 60_000_000;
/// Variables of a cube.
pub const MAX_VARIABLES: usize = 4096;
/// Size of a root `zarr.json`: metadata only, consolidated (a few KB per variable).
pub const MAX_ROOT_JSON_BYTES: u64 = 64 << 20;

/// Array names a variable may not take: coordinates and cubeload's own groups.
const RESERVED: [&str; 5] = ["time", "lat", "lon", "spatial_ref", INDEX_GROUP];

/// What is wrong with a cube's metadata: the field (as a dotted path into the `cubeload` attribute or the
/// array) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaError {
    /// The field at fault, e.g. `layout.chunk_y` or `variables[1].name`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for MetaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` {}", self.field, self.message)
    }
}

impl std::error::Error for MetaError {}

fn fail<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, MetaError> {
    Err(MetaError { field: field.into(), message: message.into() })
}

/// `a · b · …`, `None` on overflow.
fn product(factors: &[usize]) -> Option<u64> {
    factors.iter().try_fold(1u64, |acc, &f| acc.checked_mul(f as u64))
}

/// Parses the bytes of a cube's root `zarr.json` into its validated [`CubeMeta`]; `path` (the cube) names
/// it in errors. Pure: no file is read, nothing is allocated from the metadata's sizes.
///
/// # Errors
/// [`CubeError::NotACube`] naming the path and, for invalid metadata, the field.
pub fn meta_from_root_json(path: &std::path::Path, bytes: &[u8]) -> Result<CubeMeta, CubeError> {
    let not_a_cube = |message: String| CubeError::NotACube { path: path.to_path_buf(), message };
    if bytes.len() as u64 > MAX_ROOT_JSON_BYTES {
        return Err(not_a_cube(format!(
            "zarr.json is {} bytes, more than the {MAX_ROOT_JSON_BYTES} of any cube's metadata",
            bytes.len()
        )));
    }
    let root: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| not_a_cube(format!("unreadable Zarr group: zarr.json is not JSON: {e}")))?;
    if root.get("zarr_format").and_then(serde_json::Value::as_u64) != Some(3)
        || root.get("node_type").and_then(serde_json::Value::as_str) != Some("group")
    {
        return Err(not_a_cube(
            "not a Zarr v3 group (zarr.json lacks zarr_format 3, node_type group)".into(),
        ));
    }
    let value = root.get("attributes").and_then(|a| a.get(META_KEY)).ok_or_else(|| {
        not_a_cube(format!("a Zarr group without the `{META_KEY}` attribute: not made by cubeload"))
    })?;
    // The error names the field (`layout.chunk_x: invalid value: integer -1, expected usize`).
    let meta: CubeMeta = serde_path_to_error::deserialize(value)
        .map_err(|e| not_a_cube(format!("invalid `{META_KEY}` metadata: `{}`: {}", e.path(), e.inner())))?;
    validate(&meta).map_err(|e| not_a_cube(format!("invalid `{META_KEY}` metadata: {e}")))?;
    Ok(meta)
}

/// Checks that `meta` describes a cube a reader can open with bounded memory; see the module docs.
///
/// # Errors
/// The first [`MetaError`] found.
pub fn validate(meta: &CubeMeta) -> Result<(), MetaError> {
    if meta.format_version == 0 || meta.format_version > FORMAT_VERSION {
        return fail(
            "format_version",
            format!("is {}; this cubeload reads versions 1 to {FORMAT_VERSION}", meta.format_version),
        );
    }
    check_grid(meta)?;
    check_variables(meta)?;
    check_layout(meta)?;
    check_padding(meta)?;
    check_sizes(meta)?;
    check_levels(meta)
}

/// Levels must be exactly what [`Level::new`] derives from their factor (their group names are paths in
/// the store, and the loader indexes their chunks from the target's), and every variable's level must exist.
fn check_levels(meta: &CubeMeta) -> Result<(), MetaError> {
    let unsharded = crate::config::LayoutConfig::unsharded_multires(1);
    if meta.levels.len() > MAX_VARIABLES {
        return fail("levels", format!("{} levels, more than {MAX_VARIABLES}", meta.levels.len()));
    }
    if !meta.levels.is_empty() && meta.layout.shuffled.is_some() {
        return fail("levels", "a shuffled cube has no resolution levels");
    }
    for (i, level) in meta.levels.iter().enumerate() {
        let field = |name: &str| format!("levels[{i}].{name}");
        let [ky, kx] = level.factor;
        let q = level.time_factor;
        if ky == 0
            || kx == 0
            || ky > meta.grid.height
            || kx > meta.grid.width
            || ([ky, kx] == [1, 1] && q == 1)
        {
            return fail(field("factor"), format!("{:?} is not a coarsening of the grid", level.factor));
        }
        if q == 0 || !meta.layout.chunk_t.is_multiple_of(q) || (q > 1 && meta.shape[0] == 0) {
            return fail(
                field("time_factor"),
                format!("is {q}, which does not divide the {} steps of a batch", meta.layout.chunk_t),
            );
        }
        let mut expected =
            Level::new(level.factor, q, &meta.grid, &meta.layout, &unsharded, meta.shape[0], 4);
        let chunks_x = expected.chunk_counts()[2];
        for (name, k) in
            [("layout.shard_x", level.layout.shard_x), ("layout.static_shard_x", level.layout.static_shard_x)]
        {
            if k == 0 || k > chunks_x {
                return fail(field(name), format!("is {k}, not 1 to {chunks_x} chunks per shard"));
            }
        }
        (expected.layout.shard_x, expected.layout.static_shard_x) =
            (level.layout.shard_x, level.layout.static_shard_x);
        if *level != expected {
            return fail(
                field("group"),
                format!(
                    "`{}` is not the level of factor {:?} of this cube's grid and layout",
                    level.group, level.factor
                ),
            );
        }
        if meta.levels[..i].iter().any(|l| (l.factor, l.time_factor) == (level.factor, q)) {
            return fail(field("factor"), format!("{:?} appears twice", level.factor));
        }
    }
    for (i, v) in meta.variables.iter().enumerate() {
        if let Some(l) = v.level.filter(|&l| l >= meta.levels.len()) {
            return fail(
                format!("variables[{i}].level"),
                format!("is {l}, but the cube has {} levels", meta.levels.len()),
            );
        }
        if v.level.is_some() != v.upsampling.is_some() {
            return fail(
                format!("variables[{i}].upsampling"),
                "is given exactly for the variables on a level",
            );
        }
        if v.kind == crate::config::VariableKind::Categorical
            && v.upsampling == Some(crate::config::Upsampling::Bilinear)
        {
            return fail(format!("variables[{i}].upsampling"), "bilinear would invent classes");
        }
    }
    Ok(())
}

fn check_grid(meta: &CubeMeta) -> Result<(), MetaError> {
    let g = &meta.grid;
    if !(g.west.is_finite() && g.north.is_finite()) {
        return fail("grid", format!("origin ({}, {}) is not finite", g.west, g.north));
    }
    for (field, res) in [("grid.res_x", g.res_x), ("grid.res_y", g.res_y)] {
        if !(res.is_finite() && res > 0.0) {
            return fail(field, format!("is {res}, not a positive cell size"));
        }
    }
    for (field, cells) in [("grid.width", g.width), ("grid.height", g.height)] {
        if cells == 0 || cells > MAX_CELLS_PER_SIDE {
            return fail(field, format!("is {cells}, not 1 to {MAX_CELLS_PER_SIDE} cells"));
        }
    }
    let [steps, rows, cols] = meta.shape;
    if (rows, cols) != (g.height, g.width) {
        return fail("shape", format!("{:?} does not match the {} × {} grid", meta.shape, g.height, g.width));
    }
    if steps > MAX_TIME_STEPS {
        return fail("shape[0]", format!("{steps} time steps, more than {MAX_TIME_STEPS}"));
    }
    match &meta.time {
        None if steps > 0 => fail("time", format!("is missing, but shape[0] is {steps} steps")),
        Some(t) if t.steps != steps => fail("time.steps", format!("is {}, but shape[0] is {steps}", t.steps)),
        _ => Ok(()),
    }
}

fn check_variables(meta: &CubeMeta) -> Result<(), MetaError> {
    if meta.variables.is_empty() || meta.variables.len() > MAX_VARIABLES {
        return fail("variables", format!("{} variables, not 1 to {MAX_VARIABLES}", meta.variables.len()));
    }
    for (i, v) in meta.variables.iter().enumerate() {
        let field = |name: &str| format!("variables[{i}].{name}");
        // The name becomes a path in the store: it must stay one array inside the cube.
        let n = &v.name;
        if n.is_empty() || n.starts_with('.') || n.contains(['/', '\\']) || RESERVED.contains(&n.as_str()) {
            return fail(field("name"), format!("`{n}` is not a variable name (empty, a path or reserved)"));
        }
        if meta.variables[..i].iter().any(|w| w.name == *n) {
            return fail(field("name"), format!("`{n}` appears twice"));
        }
        if !v.is_static && meta.shape[0] == 0 {
            return fail(field("static"), format!("`{n}` has a time axis, but the cube has no time steps"));
        }
        if v.fill_value.is_some_and(|f| !f.is_finite()) {
            return fail(field("fill_value"), "must be finite (NaN is written as null)");
        }
        if !(0.0..=1.0).contains(&v.valid_fraction) {
            return fail(field("valid_fraction"), format!("is {}, not a fraction", v.valid_fraction));
        }
        // Normalization divides by these: a NaN here would silently turn every value into NaN.
        if let Some(s) = v.stats
            && !([s.mean, s.std, s.min, s.max].iter().all(|x| x.is_finite())
                && s.std >= 0.0
                && s.min <= s.max)
        {
            return fail(field("stats"), format!("{s:?} are not statistics of finite values"));
        }
    }
    Ok(())
}

fn check_layout(meta: &CubeMeta) -> Result<(), MetaError> {
    let l = &meta.layout;
    for (field, value) in [
        ("layout.batch", l.batch),
        ("layout.chunk_t", l.chunk_t),
        ("layout.chunk_y", l.chunk_y),
        ("layout.chunk_x", l.chunk_x),
        ("layout.patch", l.patch[0].min(l.patch[1])),
        ("layout.shard_x", l.shard_x),
        ("layout.static_shard_x", l.static_shard_x),
    ] {
        if value == 0 {
            return fail(field, "must be at least 1");
        }
    }
    match (l.kind, l.shuffled) {
        (LayoutKind::PixelSeries, _) if l.patch != [1, 1] => {
            fail("layout.patch", format!("is {:?}; pixel_series samples are single pixels", l.patch))
        }
        (LayoutKind::PixelSeries, Some(_)) if (l.chunk_y, l.chunk_x) != (l.batch, 1) => fail(
            "layout.chunk_y",
            format!("{} × {} is not (batch, 1) = ({}, 1) in a shuffled cube", l.chunk_y, l.chunk_x, l.batch),
        ),
        (LayoutKind::PixelSeries, None) if product(&[l.chunk_y, l.chunk_x]) != Some(l.batch as u64) => fail(
            "layout.batch",
            format!("is {}, not chunk_y × chunk_x = {} × {}", l.batch, l.chunk_y, l.chunk_x),
        ),
        (LayoutKind::ImageSequence, Some(_)) => fail("layout.shuffled", "applies to pixel_series only"),
        (LayoutKind::ImageSequence, None) => {
            let [ph, pw] = l.patch;
            if !(l.chunk_y.is_multiple_of(ph) && l.chunk_x.is_multiple_of(pw)) {
                return fail(
                    "layout.patch",
                    format!("{ph} × {pw} does not tile the {} × {} chunk", l.chunk_y, l.chunk_x),
                );
            }
            if product(&[l.chunk_y / ph, l.chunk_x / pw]) != Some(l.batch as u64) {
                return fail(
                    "layout.batch",
                    format!(
                        "is {}, but a {} × {} chunk holds {} × {} patches",
                        l.batch,
                        l.chunk_y,
                        l.chunk_x,
                        l.chunk_y / ph,
                        l.chunk_x / pw
                    ),
                );
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The padded shape must be exactly the shape padded to whole chunks (as [`crate::layout::Layout`] pads):
/// every chunk the loader reads then lies inside the arrays.
fn check_padding(meta: &CubeMeta) -> Result<(), MetaError> {
    let l = &meta.layout;
    let [steps, rows, cols] = meta.shape;
    let pad = |n: usize, chunk: usize| n.div_ceil(chunk).checked_mul(chunk);
    let expected = if l.shuffled.is_some() {
        let samples = rows.checked_mul(cols).filter(|&s| s <= MAX_SAMPLES);
        let Some(samples) = samples else {
            return fail(
                "shape",
                format!("{rows} × {cols} pixels, more than the {MAX_SAMPLES} samples allowed"),
            );
        };
        [if steps == 0 { Some(0) } else { pad(steps, l.chunk_t) }, pad(samples, l.batch), Some(1)]
    } else {
        [if steps == 0 { Some(0) } else { pad(steps, l.chunk_t) }, pad(rows, l.chunk_y), pad(cols, l.chunk_x)]
    };
    if expected != meta.padded_shape.map(Some) {
        return fail(
            "padded_shape",
            format!(
                "{:?} is not the shape {:?} padded to whole chunks of ({}, {}, {})",
                meta.padded_shape, meta.shape, l.chunk_t, l.chunk_y, l.chunk_x
            ),
        );
    }
    Ok(())
}

fn check_sizes(meta: &CubeMeta) -> Result<(), MetaError> {
    let l = &meta.layout;
    let cells = product(&[l.chunk_t, l.chunk_y, l.chunk_x]).unwrap_or(u64::MAX);
    for (i, v) in meta.variables.iter().enumerate() {
        let chunk_cells =
            if v.is_static { product(&[l.chunk_y, l.chunk_x]).unwrap_or(u64::MAX) } else { cells };
        let bytes = chunk_cells.saturating_mul(v.dtype.size() as u64);
        if bytes > MAX_CHUNK_BYTES {
            return fail(
                format!("variables[{i}]"),
                format!(
                    "a batch chunk of `{}` would be {bytes} bytes decoded ({} × {} × {} cells), more than \
                     {MAX_CHUNK_BYTES}",
                    v.name, l.chunk_t, l.chunk_y, l.chunk_x
                ),
            );
        }
    }
    let batch = cells.saturating_mul(meta.variables.len() as u64).saturating_mul(5);
    if batch > MAX_BATCH_BYTES {
        return fail(
            "layout",
            format!(
                "a batch of {} variables would be {batch} bytes (data and mask), more than {MAX_BATCH_BYTES}",
                meta.variables.len()
            ),
        );
    }
    let counts = meta.chunk_counts();
    let chunks = product(&counts).unwrap_or(u64::MAX);
    if chunks > MAX_CHUNKS {
        return fail("padded_shape", format!("{counts:?} batch chunks, more than {MAX_CHUNKS}"));
    }
    // Shards group batches along the last chunk axis (samples in shuffled cubes).
    let along = if l.shuffled.is_some() { counts[1] } else { counts[2] };
    for (field, k) in [("layout.shard_x", l.shard_x), ("layout.static_shard_x", l.static_shard_x)] {
        if k > along.max(1) {
            return fail(field, format!("is {k}, but a shard row holds at most {along} batches"));
        }
    }
    Ok(())
}

/// An array of a cube, as [`check_array`] expects it.
#[derive(Debug, Clone, Copy)]
pub enum ArrayRole<'a> {
    /// A variable's data.
    Variable(&'a VariableMeta),
    /// Its validity index (`cubeload_index/<name>`).
    Index(&'a VariableMeta),
    /// The `lat` coordinate (per sample in shuffled cubes).
    Lat,
    /// The `lon` coordinate (per sample in shuffled cubes).
    Lon,
}

/// The Zarr data type a [`DType`] is stored as.
#[must_use]
pub fn zarr_data_type(dtype: DType) -> DataType {
    match dtype {
        DType::Float32 => data_type::float32(),
        DType::Uint8 => data_type::uint8(),
        DType::Uint16 => data_type::uint16(),
        DType::Int16 => data_type::int16(),
        DType::Uint32 => data_type::uint32(),
        DType::Int32 => data_type::int32(),
    }
}

/// Checks a stored array against the (validated) metadata before it is read: the shape and data type the
/// reader sizes its buffers with, and chunks no larger than the metadata's (a decoder allocates a whole
/// chunk, and a shard index one entry per inner chunk). Variables must be chunked exactly as batches.
///
/// # Errors
/// A [`MetaError`] whose field names the array.
pub fn check_array<S: ?Sized>(
    meta: &CubeMeta,
    role: ArrayRole<'_>,
    array: &Array<S>,
) -> Result<(), MetaError> {
    let (l, [pt, py, px], [ct, cy, cx]) = match role {
        ArrayRole::Variable(v) | ArrayRole::Index(v) => {
            let g = meta.geometry(v);
            (g.layout, g.padded_shape.map(|n| n as u64), g.chunk_counts().map(|n| n as u64))
        }
        ArrayRole::Lat | ArrayRole::Lon => {
            (&meta.layout, meta.padded_shape.map(|n| n as u64), meta.chunk_counts().map(|n| n as u64))
        }
    };
    let shuffled = l.shuffled.is_some();
    let (name, shape, dtype) = match role {
        ArrayRole::Variable(v) => {
            let shape = match (shuffled, v.is_static) {
                (true, true) => vec![py],
                (true, false) => vec![py, pt],
                (false, true) => vec![py, px],
                (false, false) => vec![pt, py, px],
            };
            (meta.geometry(v).array_path(&v.name), shape, zarr_data_type(v.dtype))
        }
        ArrayRole::Index(v) => {
            let shape = if v.is_static { vec![cy, cx] } else { vec![ct, cy, cx] };
            (format!("{INDEX_GROUP}/{}", v.name), shape, data_type::float32())
        }
        ArrayRole::Lat => ("lat".to_string(), vec![py], data_type::float64()),
        ArrayRole::Lon => ("lon".to_string(), vec![if shuffled { py } else { px }], data_type::float64()),
    };
    if array.shape() != shape.as_slice() {
        return fail(name, format!("has shape {:?}, the cube's metadata says {shape:?}", array.shape()));
    }
    if *array.data_type() != dtype {
        return fail(name, format!("has data type {}, the cube's metadata says {dtype}", array.data_type()));
    }
    if array.chunk_grid().metadata().name() != "regular" {
        return fail(name, "has an irregular chunk grid");
    }
    let zeros = vec![0; shape.len()];
    let outer: Vec<u64> = array
        .chunk_shape(&zeros)
        .map_err(|e| MetaError { field: name.clone(), message: e.to_string() })?
        .iter()
        .map(|n| n.get())
        .collect();
    let inner: Vec<u64> =
        array.subchunk_shape().map_or_else(|| outer.clone(), |s| s.iter().map(|n| n.get()).collect());
    let ArrayRole::Variable(v) = role else {
        // Coordinates and the index are read whole: chunks within the array suffice.
        if outer.iter().zip(&shape).any(|(&c, &n)| c > n.max(1)) {
            return fail(name, format!("has chunks {outer:?} larger than its shape {shape:?}"));
        }
        return Ok(());
    };
    // One batch chunk per read; shards group `k` of them along the last (tiled) or sample axis.
    let chunk: Vec<u64> = l.chunk_subset(v.is_static, [0, 0, 0]).iter().map(|r| r.end).collect();
    let k = (if v.is_static { l.static_shard_x } else { l.shard_x }) as u64;
    let mut shard = chunk.clone();
    let axis = if shuffled { 0 } else { shard.len() - 1 };
    shard[axis] *= k;
    if inner != chunk || outer != shard {
        return fail(
            name,
            format!(
                "is chunked {inner:?} in shards {outer:?}; its batches are {chunk:?} in shards {shard:?}"
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Aggregation, Resampling, VariableKind};
    use crate::cube::{Stats, TimeMeta};
    use crate::grid::Grid;
    use crate::layout::Layout;

    fn variable(name: &str, is_static: bool) -> VariableMeta {
        VariableMeta {
            name: name.to_string(),
            kind: VariableKind::Continuous,
            dtype: DType::Float32,
            fill_value: None,
            units: None,
            is_static,
            resampling: Resampling::Bilinear,
            aggregation: Aggregation::Mean,
            sources: Vec::new(),
            notes: Vec::new(),
            stats: Some(Stats { count: 10, mean: 1.0, std: 0.5, min: 0.0, max: 2.0 }),
            valid_fraction: 0.5,
            level: None,
            upsampling: None,
        }
    }

    /// What the writer stores for a 48-step, 100 × 150 cube in 8 × 8 × 48 chunks.
    fn good() -> CubeMeta {
        let layout = Layout {
            kind: LayoutKind::PixelSeries,
            batch: 64,
            chunk_t: 48,
            chunk_y: 8,
            chunk_x: 8,
            patch: [1, 1],
            shard_x: 4,
            static_shard_x: 19,
            shuffled: None,
        };
        CubeMeta {
            format_version: FORMAT_VERSION,
            generator: "cubeload test".into(),
            created: "2024-06-01T00:00:00Z".into(),
            complete: true,
            sealed: true,
            layout,
            grid: Grid { west: 9.5, north: 46.0, res_x: 0.01, res_y: 0.01, width: 150, height: 100 },
            shape: [48, 100, 150],
            padded_shape: [48, 104, 152],
            time: Some(TimeMeta {
                steps: 48,
                start: "2024-06-01T00:00:00Z".into(),
                end: "2024-06-02T23:00:00Z".into(),
                step: Some("1h".into()),
            }),
            variables: vec![variable("t2m", false), variable("landcover", true)],
            compression: "zstd(3)".into(),
            config: String::new(),
            levels: Vec::new(),
        }
    }

    /// [`good`] with `t2m` on a level of factor 5.
    fn multires() -> CubeMeta {
        use crate::config::{LayoutConfig, Order, ShardConfig, ShardMode, Upsampling};
        let mut meta = good();
        let config = LayoutConfig::PixelSeries {
            batch: 64,
            tile: None,
            window: None,
            shard: ShardConfig::Named(ShardMode::Auto),
            order: Order::Tiled,
            seed: 0,
            multires: true,
        };
        meta.levels.push(Level::new([5, 5], 1, &meta.grid, &meta.layout, &config, 48, 4));
        meta.variables[0].level = Some(0);
        meta.variables[0].upsampling = Some(Upsampling::Bilinear);
        meta
    }

    type Edit = Box<dyn FnOnce(&mut CubeMeta)>;

    /// Applies `edit` to a good cube's metadata and returns the field validation names.
    fn field_of(edit: impl FnOnce(&mut CubeMeta)) -> String {
        let mut meta = good();
        edit(&mut meta);
        validate(&meta).expect_err("invalid metadata must be refused").field
    }

    #[test]
    fn what_the_writer_writes_is_valid() {
        validate(&good()).unwrap();
        let mut shuffled = good();
        shuffled.layout.shuffled = Some(5);
        (shuffled.layout.chunk_y, shuffled.layout.chunk_x) = (64, 1);
        shuffled.padded_shape = [48, 15_040, 1];
        validate(&shuffled).unwrap();
        let mut image = good();
        image.layout.kind = LayoutKind::ImageSequence;
        (image.layout.batch, image.layout.chunk_t, image.layout.chunk_y, image.layout.chunk_x) =
            (4, 8, 16, 16);
        image.layout.patch = [8, 8];
        image.layout.static_shard_x = 10;
        image.padded_shape = [48, 112, 160];
        validate(&image).unwrap();
        validate(&multires()).unwrap();
    }

    #[test]
    fn inconsistent_levels_name_the_field() {
        let cases: Vec<(&str, Edit)> = vec![
            ("levels[0].group", Box::new(|m| m.levels[0].group = "../x".into())),
            ("levels[0].group", Box::new(|m| m.levels[0].nest = [1, 1])),
            ("levels[0].group", Box::new(|m| m.levels[0].padded_shape[2] += 8)),
            ("levels[0].factor", Box::new(|m| m.levels[0].factor = [0, 5])),
            ("levels[0].factor", Box::new(|m| m.levels[0].factor = [1, 1])),
            ("levels[0].layout.shard_x", Box::new(|m| m.levels[0].layout.shard_x = 1000)),
            ("levels[1].factor", Box::new(|m| m.levels.push(m.levels[0].clone()))),
            ("levels[0].time_factor", Box::new(|m| m.levels[0].time_factor = 5)),
            ("levels[0].time_factor", Box::new(|m| m.levels[0].time_factor = 0)),
            ("levels[0].group", Box::new(|m| m.levels[0].time_factor = 2)),
            ("variables[0].level", Box::new(|m| m.variables[0].level = Some(3))),
            ("variables[0].upsampling", Box::new(|m| m.variables[0].upsampling = None)),
            (
                "variables[0].upsampling",
                Box::new(|m| m.variables[0].kind = crate::config::VariableKind::Categorical),
            ),
        ];
        for (field, edit) in cases {
            let mut meta = multires();
            edit(&mut meta);
            let found = validate(&meta).expect_err("invalid levels must be refused").field;
            assert_eq!(found, field);
        }
    }

    #[test]
    fn absurd_or_inconsistent_metadata_names_the_field() {
        let cases: Vec<(&str, Edit)> = vec![
            ("format_version", Box::new(|m| m.format_version = 99)),
            ("layout.chunk_y", Box::new(|m| m.layout.chunk_y = 0)),
            ("layout.chunk_t", Box::new(|m| m.layout.chunk_t = 0)),
            ("layout.shard_x", Box::new(|m| m.layout.shard_x = 0)),
            ("layout.shard_x", Box::new(|m| m.layout.shard_x = 1000)),
            ("layout.batch", Box::new(|m| m.layout.batch = 65)),
            ("layout.patch", Box::new(|m| m.layout.patch = [2, 2])),
            (
                "layout.shuffled",
                Box::new(|m| {
                    m.layout.kind = LayoutKind::ImageSequence;
                    m.layout.shuffled = Some(1);
                }),
            ),
            // Overflowing products are errors, not panics.
            ("layout.batch", Box::new(|m| (m.layout.chunk_y, m.layout.chunk_x) = (usize::MAX, 2))),
            ("padded_shape", Box::new(|m| m.padded_shape = [48, 100, 150])),
            ("padded_shape", Box::new(|m| m.padded_shape = [48, 1 << 40, 152])),
            ("padded_shape", Box::new(|m| m.padded_shape[0] = usize::MAX)),
            ("shape", Box::new(|m| m.shape[1] = 99)),
            ("shape[0]", Box::new(|m| m.shape[0] = usize::MAX)),
            ("time.steps", Box::new(|m| m.time.as_mut().unwrap().steps = 47)),
            ("time", Box::new(|m| m.time = None)),
            ("grid.width", Box::new(|m| (m.grid.width, m.shape[2]) = (0, 0))),
            ("grid.height", Box::new(|m| (m.grid.height, m.shape[1]) = (usize::MAX, usize::MAX))),
            ("grid.res_x", Box::new(|m| m.grid.res_x = f64::NAN)),
            ("variables", Box::new(|m| m.variables.clear())),
            ("variables[1].name", Box::new(|m| m.variables[1].name = "../../etc".into())),
            ("variables[1].name", Box::new(|m| m.variables[1].name = "t2m".into())),
            ("variables[1].name", Box::new(|m| m.variables[1].name = "lat".into())),
            ("variables[0].stats", Box::new(|m| m.variables[0].stats.as_mut().unwrap().std = f64::NAN)),
            ("variables[0].valid_fraction", Box::new(|m| m.variables[0].valid_fraction = 2.0)),
            ("variables[0].fill_value", Box::new(|m| m.variables[0].fill_value = Some(f64::INFINITY))),
            (
                "variables[0].static",
                Box::new(|m| {
                    m.shape[0] = 0;
                    m.padded_shape[0] = 0;
                    m.time = None;
                }),
            ),
        ];
        for (field, edit) in cases {
            assert_eq!(field_of(edit), field);
        }
    }

    #[test]
    fn chunks_that_would_exhaust_memory_are_refused() {
        // A (60 000 000, 8, 8) float32 chunk: 15 GB decoded.
        let err = {
            let mut meta = good();
            meta.shape[0] = 60_000_000;
            meta.time.as_mut().unwrap().steps = 60_000_000;
            meta.layout.chunk_t = 60_000_000;
            meta.padded_shape[0] = 60_000_000;
            validate(&meta).unwrap_err()
        };
        assert_eq!(err.field, "variables[0]");
        assert!(err.message.contains("t2m") && err.message.contains("15360000000 bytes"), "{err}");
        // Many small chunks: the validity index would be too large.
        let mut meta = good();
        meta.layout = Layout {
            batch: 1,
            chunk_t: 1,
            chunk_y: 1,
            chunk_x: 1,
            shard_x: 1,
            static_shard_x: 1,
            ..meta.layout
        };
        (meta.grid.width, meta.grid.height) = (10_000, 10_000);
        meta.shape = [48, 10_000, 10_000];
        meta.padded_shape = [48, 10_000, 10_000];
        assert_eq!(validate(&meta).unwrap_err().field, "padded_shape");
    }

    #[test]
    fn root_json_is_parsed_and_checked() {
        let path = std::path::Path::new("/data/x.zarr");
        let json = |meta: serde_json::Value| {
            serde_json::to_vec(&serde_json::json!({
                "zarr_format": 3, "node_type": "group", "attributes": {"cubeload": meta}
            }))
            .unwrap()
        };
        let meta = serde_json::to_value(good()).unwrap();
        assert_eq!(meta_from_root_json(path, &json(meta.clone())).unwrap().shape, [48, 100, 150]);
        let mut bad = meta.clone();
        bad["layout"]["chunk_x"] = 0.into();
        let message = meta_from_root_json(path, &json(bad)).unwrap_err().to_string();
        assert!(message.contains("/data/x.zarr") && message.contains("`layout.chunk_x`"), "{message}");
        let mut bad = meta;
        bad["layout"]["chunk_x"] = (-1).into();
        let message = meta_from_root_json(path, &json(bad)).unwrap_err().to_string();
        assert!(message.contains("`layout.chunk_x`: invalid value: integer `-1`"), "{message}");
        for (bytes, expected) in [
            (
                &b"{\"zarr_format\": 3, \"node_type\": \"group\", \"attributes\": {}}"[..],
                "without the `cubeload`",
            ),
            (b"{\"zarr_format\": 2}", "not a Zarr v3 group"),
            (b"\xff\xfe", "not JSON"),
            (b"", "not JSON"),
        ] {
            let message = meta_from_root_json(path, bytes).unwrap_err().to_string();
            assert!(message.contains(expected), "{message}");
        }
    }
}
