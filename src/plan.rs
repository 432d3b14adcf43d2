//! Planning: the config resolved against the sources into everything generation needs, before any byte of
//! the cube is written. Every decision that depends on the inputs (time axis, which source steps feed which
//! target step, dtypes and fill values, chunk layout) is taken here, so that errors surface before work starts:
//! a bbox that misses a variable's data, batches that do not fit the grid or the time axis, and sizes that
//! would exhaust memory or disk (see [`Estimate`]) are refused here, naming the config keys at fault.

use std::path::Path;

use crate::config::{
    Aggregation, Codec, Config, ConfigError, LayoutConfig, Order, Resampling, Upsampling, VariableKind,
};
use crate::cube::validate::{MAX_BATCH_BYTES, MAX_CHUNK_BYTES, MAX_CHUNKS, MAX_SAMPLES, MAX_TIME_STEPS};
use crate::grid::Grid;
use crate::layout::{Layout, squarest_factors};
use crate::levels::{self, Level};
use crate::source::{Source, SourceError};
use crate::time::{self, Instant, Step, StepSources, TimeAxis};

/// A planning error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The configuration is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A source is unusable.
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// Stored sample types of cube variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum DType {
    Float32,
    Uint8,
    Uint16,
    Int16,
    Uint32,
    Int32,
}

impl DType {
    /// Bytes per element.
    #[must_use]
    pub fn size(self) -> usize {
        match self {
            DType::Uint8 => 1,
            DType::Uint16 | DType::Int16 => 2,
            DType::Float32 | DType::Uint32 | DType::Int32 => 4,
        }
    }

    /// Whether a value of this type can equal `x` (NaN for float32, whose fill value it is).
    #[must_use]
    pub fn holds(self, x: f64) -> bool {
        let (lo, hi) = match self {
            DType::Float32 => return x.is_nan(),
            DType::Uint8 => (0.0, f64::from(u8::MAX)),
            DType::Uint16 => (0.0, f64::from(u16::MAX)),
            DType::Int16 => (f64::from(i16::MIN), f64::from(i16::MAX)),
            DType::Uint32 => (0.0, f64::from(u32::MAX)),
            DType::Int32 => (f64::from(i32::MIN), f64::from(i32::MAX)),
        };
        x.fract() == 0.0 && (lo..=hi).contains(&x)
    }

    /// The largest value of an integer type (a fill value that is rarely a class).
    #[must_use]
    pub fn max_value(self) -> f64 {
        match self {
            DType::Float32 => f64::NAN,
            DType::Uint8 => f64::from(u8::MAX),
            DType::Uint16 => f64::from(u16::MAX),
            DType::Int16 => f64::from(i16::MAX),
            DType::Uint32 => f64::from(u32::MAX),
            DType::Int32 => f64::from(i32::MAX),
        }
    }
}

/// One variable, resolved.
#[derive(Debug, Clone)]
pub struct VariablePlan {
    /// Name in the cube.
    pub name: String,
    /// Continuous or categorical.
    pub kind: VariableKind,
    /// The inputs.
    pub source: Source,
    /// Spatial resampling.
    pub resampling: Resampling,
    /// Temporal aggregation.
    pub aggregation: Aggregation,
    /// `(lat, lon)` only.
    pub is_static: bool,
    /// Stored type.
    pub dtype: DType,
    /// Stored fill value (NaN for float).
    pub fill: f64,
    /// Units attribute.
    pub units: Option<String>,
    /// For each stored step, the source steps (indices into `source.steps`) feeding it: each target step, or,
    /// on a level with time factor `q`, each window of `q` target steps.
    pub step_sources: Vec<StepSources>,
    /// Decisions the user should know about.
    pub notes: Vec<String>,
    /// Index into [`Plan::levels`] of a variable kept at a coarser native resolution; `None`: target grid.
    pub level: Option<usize>,
    /// How the loader brings it onto the target grid (variables on a level only).
    pub upsampling: Option<Upsampling>,
}

/// The resolved plan of a cube.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The parsed config.
    pub config: Config,
    /// The config as the user wrote it (provenance).
    pub config_text: String,
    /// Target grid.
    pub grid: Grid,
    /// Target time axis; `None` when every variable is static.
    pub time: Option<TimeAxis>,
    /// Chunk layout.
    pub layout: Layout,
    /// Variables in delivery order.
    pub variables: Vec<VariablePlan>,
    /// Coarser resolution levels of a multi-resolution cube (empty otherwise).
    pub levels: Vec<Level>,
    /// What generating it takes.
    pub estimate: Estimate,
}

/// What generating a cube takes at least, estimated before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Bytes of the stored (padded) arrays, uncompressed: what `codec: none` writes.
    pub uncompressed_bytes: u64,
    /// Scratch bytes on the output's filesystem during generation: the uncompressed tiled copy that an
    /// `order: shuffled` cube is rewritten from.
    pub scratch_bytes: u64,
    /// Least bytes the output's filesystem must have free: the cube compressed at best
    /// ([`BEST_COMPRESSION_RATIO`]), plus the scratch.
    pub min_disk_bytes: u64,
    /// Least memory of one generation thread: one shard of a chunk row (an f64 value and a u32 count per
    /// cell).
    pub min_block_bytes: u64,
}

/// The best compression assumed: zstd and gzip shrink fields of real data 1.5 to 4 times (mostly empty ones
/// more), so a cube is refused for lack of disk only when even this ratio could not make it fit.
pub const BEST_COMPRESSION_RATIO: u64 = 10;
/// The largest cube generated, uncompressed (1 PiB): beyond it a config surely has a typo.
pub const MAX_CUBE_BYTES: u64 = 1 << 50;

impl Plan {
    /// Resolves `config` against its sources (opens each file once).
    ///
    /// # Errors
    /// [`PlanError`] naming the key, variable or file at fault.
    pub fn new(config: Config, config_text: String) -> Result<Plan, PlanError> {
        let grid = Grid::from_config(config.grid())?;
        let mut sources = Vec::with_capacity(config.variables.0.len());
        for (name, var) in &config.variables.0 {
            let source = Source::probe(name, var)?;
            check_overlap(&grid, name, &source)?;
            sources.push(source);
        }
        let time = resolve_time(&config, &sources)?;
        let mut variables = Vec::new();
        for ((name, var), source) in config.variables.0.iter().zip(sources) {
            let is_static = var.is_static || !source.has_time();
            let mut notes = source.notes.clone();
            if is_static && !var.is_static {
                notes.push("no time axis in the source: stored as a static (lat, lon) variable".to_string());
            }
            let categorical = var.kind == VariableKind::Categorical;
            let dtype = if categorical {
                integer_dtype(source.data_type).ok_or_else(|| {
                    ConfigError::invalid(
                        format!("variables.{name}.kind"),
                        format!(
                            "categorical needs integer data, the source holds {}",
                            source.data_type.name()
                        ),
                    )
                })?
            } else {
                DType::Float32
            };
            // A nodata the data type cannot hold (-9999 on bytes) marks no cell of the source: the cube then
            // needs a fill value of its own, which its chunks can store (the loader reads a chunk left
            // unstored, all fill, as all missing).
            let nodata = source.nodata.filter(|&n| dtype.holds(n));
            if let Some(n) = source.nodata.filter(|_| categorical && nodata.is_none()) {
                notes.push(format!(
                    "nodata {n} does not fit {}: no cell of the source is missing; {} marks cells outside it",
                    format!("{dtype:?}").to_lowercase(),
                    dtype.max_value()
                ));
            }
            let fill = if categorical { nodata.unwrap_or_else(|| dtype.max_value()) } else { f64::NAN };
            let default_aggregation = if categorical { Aggregation::Nearest } else { Aggregation::Mean };
            let aggregation = var.aggregation.unwrap_or(default_aggregation);
            let step_sources = match (&time, is_static) {
                (Some(axis), false) => time::map_steps(axis, &source.instants()),
                _ => Vec::new(),
            };
            if !is_static && let Some(note) = shared_instants(&source.steps) {
                notes.push(note);
            }
            if let Some(axis) = time.as_ref().filter(|_| !is_static)
                && step_sources.iter().all(|s| matches!(s, StepSources::Empty))
            {
                return Err(
                    ConfigError::invalid("time", no_time_overlap(name, axis, &source.instants())).into()
                );
            }
            let default_resampling = if categorical { Resampling::Nearest } else { Resampling::Bilinear };
            let resampling = var.resampling.unwrap_or(default_resampling);
            if resampling == Resampling::Mode && matches!(dtype, DType::Int32 | DType::Uint32) {
                notes.push(
                    "GDAL's `mode` kernel counts values as float32 (seen with GDAL 3.6): 32-bit codes above \
                     16777216 that differ only in their last bits come out as one; `nearest` keeps every code"
                        .to_string(),
                );
            }
            if resampling == Resampling::Sum {
                notes.push(
                    "GDAL's `sum` kernel may leave out source pixels whose edges fall on a cell's edges \
                     (OSGeo/gdal#13539, seen with GDAL 3.6: a cell 7.6 % low, the cells hit depending on the \
                     window warped, so on the layout); `average` has no such fault"
                        .to_string(),
                );
            }
            variables.push(VariablePlan {
                name: name.clone(),
                kind: var.kind,
                resampling,
                aggregation,
                is_static,
                dtype,
                fill,
                units: var.units.clone().or_else(|| source.units.clone()),
                step_sources,
                notes,
                source,
                level: None,
                upsampling: None,
            });
        }
        let n_time =
            if variables.iter().all(|v| v.is_static) { 0 } else { time.as_ref().map_or(0, TimeAxis::len) };
        let stored: Vec<(DType, bool)> = variables.iter().map(|v| (v.dtype, v.is_static)).collect();
        let time_factors = time_factors(&config, time.as_ref(), &variables)?;
        let multiple = time_factors.iter().try_fold(1usize, |l, &q| levels::lcm(l, q)).ok_or_else(|| {
            ConfigError::invalid("variables", "the native time steps have no common multiple of a sane size")
        })?;
        let (layout, mut estimate) = resolve_layout(&config, &grid, n_time, &stored, multiple)?;
        let levels = assign_levels(&config, &grid, &layout, n_time, &time_factors, &mut variables)?;
        // Stored steps: a level's windows are mapped as a whole; then sums keep to the steps inside them.
        for v in variables.iter_mut().filter(|v| !v.is_static) {
            if let (Some(axis), Some(q)) = (&time, v.level.map(|l| levels[l].time_factor).filter(|&q| q > 1))
            {
                v.step_sources = window_sources(axis, q, &v.source.instants());
            }
            if v.aggregation == Aggregation::Sum
                && let Some(note) = sums_not_spread(&v.name, &mut v.step_sources)?
            {
                v.notes.push(note);
            }
        }
        if !levels.is_empty() {
            estimate.uncompressed_bytes = variables
                .iter()
                .map(|v| {
                    let target = || {
                        let (t, y, x) = layout.padded_shape(n_time, grid.height, grid.width);
                        [t, y, x]
                    };
                    let [pt, py, px] = v.level.map_or_else(target, |l| levels[l].padded_shape);
                    let plane = (py * px) as u64;
                    v.dtype.size() as u64 * if v.is_static { plane } else { plane * pt as u64 }
                })
                .sum();
            // Levels need no scratch (a multi-resolution cube is never shuffled).
            estimate.min_disk_bytes =
                compressed_at_best(config.compression.codec, estimate.uncompressed_bytes);
        }
        check_machine(&config, &grid, n_time, &layout, &estimate)?;
        let time = if n_time == 0 { None } else { time };
        Ok(Plan { config, config_text, grid, time, layout, variables, levels, estimate })
    }

    /// Chunks of variable `var` along `(time, lat, lon)`, on its level or the target grid.
    #[must_use]
    pub fn chunk_counts(&self, var: usize) -> [usize; 3] {
        let target = || {
            let (t, y, x) = self.layout.chunk_counts(self.n_time(), self.grid.height, self.grid.width);
            [t, y, x]
        };
        self.variables[var].level.map_or_else(target, |l| self.levels[l].chunk_counts())
    }

    /// The grid and chunk layout variable `var` is stored on: its level's, or the target's.
    #[must_use]
    pub fn geometry(&self, var: usize) -> (&Grid, &Layout) {
        match self.variables[var].level {
            Some(l) => (&self.levels[l].grid, &self.levels[l].layout),
            None => (&self.grid, &self.layout),
        }
    }

    /// Number of target time steps (0 for static-only cubes).
    #[must_use]
    pub fn n_time(&self) -> usize {
        self.time.as_ref().map_or(0, TimeAxis::len)
    }
}

/// The time factor of each variable's native `time_step` (1 without one).
fn time_factors(
    config: &Config,
    time: Option<&TimeAxis>,
    variables: &[VariablePlan],
) -> Result<Vec<usize>, ConfigError> {
    config
        .variables
        .0
        .iter()
        .zip(variables)
        .map(|((name, var), v)| match &var.time_step {
            None => Ok(1),
            Some(_) if v.is_static => Err(ConfigError::invalid(
                format!("variables.{name}.time_step"),
                "the variable is static (its source has no time axis)",
            )),
            Some(step) => {
                let q = levels::time_factor(name, step, time.and_then(|t| t.step))?;
                let steps = time.map_or(0, TimeAxis::len);
                if q > steps {
                    return Err(ConfigError::invalid(
                        format!("variables.{name}.time_step"),
                        format!("{step} is longer than the whole time axis ({steps} steps)"),
                    ));
                }
                Ok(q)
            }
        })
        .collect()
}

/// Puts each variable with a coarser native `resolution` or `time_step` on its level (one level per distinct
/// pair of factors, in the order of first use) and records the snapping and upsampling decisions in its
/// notes.
fn assign_levels(
    config: &Config,
    grid: &Grid,
    layout: &Layout,
    n_time: usize,
    time_factors: &[usize],
    variables: &mut [VariablePlan],
) -> Result<Vec<Level>, ConfigError> {
    let mut levels: Vec<Level> = Vec::new();
    let item = variables.iter().map(|v| v.dtype.size()).max().unwrap_or(4);
    for (((name, var), v), &q) in config.variables.0.iter().zip(variables.iter_mut()).zip(time_factors) {
        let factor = match var.resolution {
            Some(resolution) => {
                let (factor, note) = levels::factor_for(name, resolution, grid)?;
                v.notes.extend(note);
                if factor == [1, 1] {
                    v.notes.push("resolution equals the target grid's: kept on the target grid".to_string());
                }
                factor
            }
            None => [1, 1],
        };
        if factor == [1, 1] && q == 1 {
            continue;
        }
        let index =
            levels.iter().position(|l| (l.factor, l.time_factor) == (factor, q)).unwrap_or_else(|| {
                levels.push(Level::new(factor, q, grid, layout, &config.layout, n_time, item));
                levels.len() - 1
            });
        v.level = Some(index);
        // Categorical values are never interpolated; on a time-only level space is the target's anyway.
        let nearest = v.kind == VariableKind::Categorical || factor == [1, 1];
        v.upsampling =
            Some(var.upsampling.unwrap_or(if nearest { Upsampling::Nearest } else { Upsampling::Bilinear }));
    }
    Ok(levels)
}

fn integer_dtype(t: gdal::raster::GdalDataType) -> Option<DType> {
    use gdal::raster::GdalDataType as G;
    Some(match t {
        G::UInt8 => DType::Uint8,
        G::UInt16 => DType::Uint16,
        G::Int16 => DType::Int16,
        G::UInt32 => DType::Uint32,
        G::Int32 => DType::Int32,
        _ => return None,
    })
}

fn resolve_time(config: &Config, sources: &[Source]) -> Result<Option<TimeAxis>, ConfigError> {
    let varying: Vec<&str> = config
        .variables
        .0
        .iter()
        .zip(sources)
        .filter(|((_, v), s)| !v.is_static && s.has_time())
        .map(|((n, _), _)| n.as_str())
        .collect();
    let Some(time) = &config.time else {
        if let Some(name) = varying.first() {
            // A file of one dated image (a daily map) is a series of one step: perhaps meant as a map.
            let one_step =
                sources[config.variables.0.iter().position(|(n, _)| n == name).expect("listed")].steps.len()
                    == 1;
            let or_static = if one_step {
                format!(", or `variables.{name}.static: true` to use its one dated image as a map")
            } else {
                String::new()
            };
            return Err(ConfigError::invalid(
                "time",
                format!(
                    "missing, but variable `{name}` has a time axis (give start/end/step or `from: {name}`{or_static})"
                ),
            ));
        }
        return Ok(None);
    };
    if let Some(from) = &time.from {
        let (index, _) =
            config.variables.0.iter().enumerate().find(|(_, (n, _))| n == from).expect("validated");
        if !varying.contains(&from.as_str()) {
            return Err(ConfigError::invalid("time.from", format!("variable `{from}` has no time axis")));
        }
        return Ok(Some(TimeAxis::from_instants(&sources[index].instants())));
    }
    let parse = |key: &str, text: &Option<String>| -> Result<Instant, ConfigError> {
        time::parse_timestamp(text.as_deref().unwrap_or_default())
            .map_err(|e| ConfigError::invalid(format!("time.{key}"), e.to_string()))
    };
    let start = parse("start", &time.start)?;
    let end = parse("end", &time.end)?;
    let step = Step::parse(time.step.as_deref().unwrap_or_default())
        .map_err(|e| ConfigError::invalid("time.step", e.to_string()))?;
    if end < start {
        return Err(ConfigError::invalid("time.end", "is before time.start"));
    }
    TimeAxis::regular(start, end, step).map(Some).map_err(|e| ConfigError::invalid("time", e.to_string()))
}

/// The config key that sets the grid's size.
fn grid_key(config: &Config) -> &'static str {
    if config.grid().resolution.is_some() { "grid.resolution" } else { "grid.size" }
}

/// `n` bytes for people.
fn human(n: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB", "PB", "EB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < units.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", units[unit]) }
}

/// Resolves the chunk layout of a cube on `grid` with `n_time` steps (0: static only) and `variables`
/// (stored type, static), whose batches hold a whole multiple of `time_multiple` steps (the variables'
/// native time steps in a multi-resolution cube; full series are padded up to one), after checking that its batches fit the grid and the time axis and that its sizes
/// stay within what a cube reader accepts (the limits of [`crate::cube::validate`]). Pure: no file is read.
///
/// # Errors
/// [`ConfigError::Invalid`] naming the keys that make a batch misfit or a size too large.
pub fn resolve_layout(
    config: &Config,
    grid: &Grid,
    n_time: usize,
    variables: &[(DType, bool)],
    time_multiple: usize,
) -> Result<(Layout, Estimate), ConfigError> {
    let (height, width) = (grid.height, grid.width);
    let multiple = time_multiple.max(1);
    let not_whole = |key: &str, steps: usize| {
        ConfigError::invalid(
            key,
            format!(
                "{steps} steps per batch is not a whole number of the variables' native time steps \
                 ({multiple} cube steps): choose a multiple of {multiple}"
            ),
        )
    };
    let gkey = grid_key(config);
    if n_time > MAX_TIME_STEPS {
        return Err(ConfigError::invalid("time", format!("{n_time} steps, more than {MAX_TIME_STEPS}")));
    }
    let fits = |[h, w]: [usize; 2]| h <= height && w <= width;
    let misfit = |key: &str, what: String| {
        ConfigError::invalid(
            key,
            format!("{what} does not fit the {height} × {width} grid: every batch would be partly padding"),
        )
    };
    // First, as factorising a huge batch into a tile takes up to √batch steps: no batch holds more samples
    // than the grid has cells.
    let batch = match config.layout {
        LayoutConfig::PixelSeries { batch, .. } | LayoutConfig::ImageSequence { batch, .. } => batch,
    };
    if batch > height.saturating_mul(width) {
        return Err(misfit("layout.batch", format!("a batch of {batch} samples")));
    }
    // Cells of one time step of a chunk, and the steps of a chunk.
    let (plane, steps) = match config.layout {
        LayoutConfig::PixelSeries { batch, tile, window, order, .. } => {
            if let Some(window) = window.filter(|&w| n_time > 0 && w > n_time) {
                return Err(ConfigError::invalid(
                    "layout.window",
                    format!("{window} steps per batch, but the time axis has {n_time}"),
                ));
            }
            if let Some(window) = window.filter(|w| !w.is_multiple_of(multiple)) {
                return Err(not_whole("layout.window", window));
            }
            if order == Order::Shuffled {
                let pixels = height.saturating_mul(width);
                if pixels > MAX_SAMPLES {
                    return Err(ConfigError::invalid(
                        gkey,
                        format!("{pixels} pixels, more than the {MAX_SAMPLES} an order: shuffled cube holds"),
                    ));
                }
                if batch > pixels {
                    return Err(misfit("layout.batch", format!("a batch of {batch} pixels")));
                }
            } else {
                let tile_hw = tile.unwrap_or_else(|| squarest_factors(batch));
                if !fits(tile_hw) {
                    let key = if tile.is_some() { "layout.tile" } else { "layout.batch" };
                    let [h, w] = tile_hw;
                    return Err(misfit(key, format!("a {h} × {w} tile of layout.batch = {batch} pixels")));
                }
            }
            (batch, window.unwrap_or(n_time.next_multiple_of(multiple)).max(1))
        }
        LayoutConfig::ImageSequence { seq_len, patch, batch, grid: arrangement, .. } => {
            if n_time > 0 && seq_len > n_time {
                return Err(ConfigError::invalid(
                    "layout.seq_len",
                    format!("{seq_len} frames per sample, but the time axis has {n_time} steps"),
                ));
            }
            if !seq_len.is_multiple_of(multiple) {
                return Err(not_whole("layout.seq_len", seq_len));
            }
            if !fits(patch) {
                return Err(misfit("layout.patch", format!("a {} × {} patch", patch[0], patch[1])));
            }
            let [gy, gx] = arrangement.unwrap_or_else(|| squarest_factors(batch));
            let chunk = [gy.saturating_mul(patch[0]), gx.saturating_mul(patch[1])];
            if !fits(chunk) {
                let key = if arrangement.is_some() { "layout.grid" } else { "layout.batch" };
                return Err(misfit(
                    key,
                    format!("a batch of {gy} × {gx} patches ({} × {} cells)", chunk[0], chunk[1]),
                ));
            }
            (chunk[0] * chunk[1], seq_len)
        }
    };
    let item = variables.iter().map(|(d, _)| d.size()).max().unwrap_or(4) as u64;
    let chunk_cells = (plane as u64).saturating_mul(steps as u64);
    let time_key = match config.layout {
        LayoutConfig::PixelSeries { window: Some(_), .. } => "layout.window",
        LayoutConfig::PixelSeries { .. } => "time",
        LayoutConfig::ImageSequence { .. } => "layout.seq_len",
    };
    if chunk_cells.saturating_mul(item) > MAX_CHUNK_BYTES {
        return Err(ConfigError::invalid(
            "layout.batch",
            format!(
                "a batch chunk of {plane} cells × {steps} steps ({time_key}) would be {} decoded, more than a \
                 reader accepts ({}); choose a smaller layout.batch or a layout.window",
                human(chunk_cells.saturating_mul(item)),
                human(MAX_CHUNK_BYTES)
            ),
        ));
    }
    let batch_bytes = chunk_cells.saturating_mul(variables.len() as u64).saturating_mul(5);
    if batch_bytes > MAX_BATCH_BYTES {
        return Err(ConfigError::invalid(
            "variables",
            format!(
                "{} variables make a batch of {} (data and mask), more than {}; choose a smaller layout.batch",
                variables.len(),
                human(batch_bytes),
                human(MAX_BATCH_BYTES)
            ),
        ));
    }
    // Safe now: every product below is bounded by the checks above. Full series (no window) are padded to a
    // whole number of native time steps: the layout then sees the padded length.
    let full_series = matches!(config.layout, LayoutConfig::PixelSeries { window: None, .. });
    let layout_steps = if full_series && n_time > 0 { n_time.next_multiple_of(multiple) } else { n_time };
    let layout = Layout::resolve(&config.layout, layout_steps, height, width, item as usize);
    let (pt, py, px) = layout.padded_shape(n_time, height, width);
    let (ct, cy, cx) = layout.chunk_counts(n_time, height, width);
    let chunks = (ct as u64).saturating_mul(cy as u64).saturating_mul(cx as u64);
    if chunks > MAX_CHUNKS {
        return Err(ConfigError::invalid(
            "layout.batch",
            format!(
                "{ct} × {cy} × {cx} batch chunks on the {height} × {width} grid ({gkey}), more than a reader \
                 accepts ({MAX_CHUNKS}); choose a larger layout.batch or a coarser {gkey}"
            ),
        ));
    }
    let cells = |is_static: bool, padded: bool| -> u64 {
        let (t, y, x) = if padded { (pt, py, px) } else { (n_time, height, width) };
        let plane = (y as u64).saturating_mul(x as u64);
        if is_static { plane } else { plane.saturating_mul(t as u64) }
    };
    let bytes = |padded: bool| -> u64 {
        variables
            .iter()
            .fold(0u64, |sum, &(d, s)| sum.saturating_add(cells(s, padded).saturating_mul(d.size() as u64)))
    };
    let uncompressed_bytes = bytes(true);
    if uncompressed_bytes > MAX_CUBE_BYTES {
        return Err(ConfigError::invalid(
            gkey,
            format!(
                "{height} × {width} cells × {n_time} time steps × {} variables make a cube of {} uncompressed, \
                 more than {}: choose a coarser {gkey}, a shorter time axis or fewer variables",
                variables.len(),
                human(uncompressed_bytes),
                human(MAX_CUBE_BYTES)
            ),
        ));
    }
    let scratch_bytes = if layout.shuffled.is_some() { bytes(false) } else { 0 };
    let compressed = compressed_at_best(config.compression.codec, uncompressed_bytes);
    let min_block_bytes = variables
        .iter()
        .map(|&(_, s)| {
            let (t, k) = if s { (1, layout.static_shard_x) } else { (layout.chunk_t, layout.shard_x) };
            (layout.chunk_y as u64 * layout.chunk_x as u64).saturating_mul((t * k) as u64).saturating_mul(12)
        })
        .max()
        .unwrap_or(0);
    let estimate = Estimate {
        uncompressed_bytes,
        scratch_bytes,
        min_disk_bytes: compressed + scratch_bytes,
        min_block_bytes,
    };
    Ok((layout, estimate))
}

/// `bytes` of arrays compressed by `codec` at best ([`BEST_COMPRESSION_RATIO`]).
fn compressed_at_best(codec: Codec, bytes: u64) -> u64 {
    match codec {
        Codec::None => bytes,
        Codec::Zstd | Codec::Gzip => bytes / BEST_COMPRESSION_RATIO,
    }
}

/// Refuses a cube that cannot fit this machine: the output's filesystem (`statvfs` of its nearest existing
/// ancestor) or the memory of one generation thread.
fn check_machine(
    config: &Config,
    grid: &Grid,
    n_time: usize,
    layout: &Layout,
    estimate: &Estimate,
) -> Result<(), ConfigError> {
    let memory = physical_memory();
    if memory > 0 && estimate.min_block_bytes > memory {
        let key = if layout.shard_x > 1 { "layout.shard" } else { "layout.batch" };
        return Err(ConfigError::invalid(
            key,
            format!(
                "generating one shard of batch chunks takes {} of memory, more than this machine's {}",
                human(estimate.min_block_bytes),
                human(memory)
            ),
        ));
    }
    let Some((dir, mut free)) = free_space(&config.output) else { return Ok(()) };
    // What an interrupted run left is either reused or discarded (`--overwrite`): space the cube may use.
    free += crate::store::dir_bytes(&crate::generator::staging_dir(&config.output));
    if estimate.min_disk_bytes > free {
        let gkey = grid_key(config);
        let shuffled = if estimate.scratch_bytes > 0 {
            format!(" plus {} of scratch for order: shuffled", human(estimate.scratch_bytes))
        } else {
            String::new()
        };
        return Err(ConfigError::invalid(
            gkey,
            format!(
                "{} × {} cells × {n_time} time steps × {} variables make a cube of {} uncompressed: at least {}{shuffled} \
                 on disk, but {} has {} free; choose a coarser {gkey}, a shorter time axis or fewer variables",
                grid.height,
                grid.width,
                config.variables.0.len(),
                human(estimate.uncompressed_bytes),
                human(estimate.min_disk_bytes - estimate.scratch_bytes),
                dir.display(),
                human(free)
            ),
        ));
    }
    Ok(())
}

/// The machine's physical memory in bytes (0 where the system does not say).
#[must_use]
pub(crate) fn physical_memory() -> u64 {
    // SAFETY: sysconf only reads system constants.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    u64::try_from(pages).unwrap_or(0).saturating_mul(u64::try_from(size).unwrap_or(0))
}

/// Bytes available to this user on the filesystem of `path`'s nearest existing ancestor, and that ancestor.
fn free_space(path: &Path) -> Option<(std::path::PathBuf, u64)> {
    let mut dir = path.to_path_buf();
    while !dir.exists() {
        dir = match dir.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => ".".into(),
        };
    }
    let c_path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: c_path is a valid NUL-terminated path; statvfs only writes the struct it is given.
    let stat = unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c_path.as_ptr(), &raw mut stat) == 0).then_some(stat)
    }?;
    Some((dir, stat.f_bavail.saturating_mul(stat.f_frsize)))
}

/// A note when steps of one file fall on one instant: the days past a Gregorian month's end of a `360_day`
/// or `all_leap` calendar go on the month's last day, and a target step then aggregates them together.
/// (Steps of different files at one instant are tiles of one date, mosaicked.)
fn shared_instants(steps: &[crate::source::SourceStep]) -> Option<String> {
    let mut sorted: Vec<(usize, Instant)> = steps.iter().filter_map(|s| Some((s.file, s.time?))).collect();
    sorted.sort_unstable();
    let shared = sorted.windows(2).filter(|w| w[0] == w[1]).count();
    (shared > 0).then(|| {
        format!(
            "{shared} of its {} steps fall on the instant of another step of their file (a time written \
             twice, or a calendar's days past a Gregorian month's end, as in 360_day, put on the month's last \
             day): a target step aggregates them together",
            sorted.len()
        )
    })
}

/// The source steps of each window of `q` target steps (the last one cut at the axis' end), by the rule of a
/// target step ([`time::map_steps`]): those inside the window, or else the one nearest its middle, within
/// half the larger of the source's spacing and the window.
fn window_sources(axis: &TimeAxis, q: usize, source: &[Instant]) -> Vec<StepSources> {
    let mut bounds: Vec<Instant> = axis.times.iter().step_by(q).copied().collect();
    bounds.push(axis.interval(axis.len() - 1).1);
    let windows = bounds.len() - 1;
    let mut sources = time::map_steps(&TimeAxis { times: bounds, step: None }, source);
    sources.truncate(windows);
    sources
}

/// With `aggregation: sum`, a stored step (a target step, or a level's window) without a source step inside
/// it is missing, not the nearest step's value: a total over a source step longer than the stored step
/// would be counted again in every stored step near it (a monthly total in each day of the month). The note
/// says how many steps that leaves missing; an error names `variables.NAME.aggregation` when it leaves all
/// of them.
fn sums_not_spread(name: &str, step_sources: &mut [StepSources]) -> Result<Option<String>, ConfigError> {
    let mut emptied = 0;
    for step in step_sources.iter_mut().filter(|s| matches!(s, StepSources::Nearest(_))) {
        *step = StepSources::Empty;
        emptied += 1;
    }
    if step_sources.iter().all(|s| matches!(s, StepSources::Empty)) {
        return Err(ConfigError::invalid(
            format!("variables.{name}.aggregation"),
            "sum: no stored step has a source step inside it (the source's steps are sparser than the \
             axis's), and a sum is not spread over finer steps; use mean, or a coarser time step",
        ));
    }
    let empty = step_sources.iter().filter(|s| matches!(s, StepSources::Empty)).count();
    Ok((empty > 0).then(|| {
        let spread = if emptied > 0 {
            format!(
                ", {emptied} of them because a sum is not copied from the nearest source step, as the other \
                 aggregations are"
            )
        } else {
            String::new()
        };
        format!(
            "aggregation sum: {empty} of {} stored steps hold no source step and are missing{spread}",
            step_sources.len()
        )
    }))
}

/// Why a time axis that gives a variable no step is refused: its steps and the variable's.
fn no_time_overlap(name: &str, axis: &TimeAxis, source: &[Instant]) -> String {
    let span = |mut times: Vec<Instant>| {
        times.sort_unstable();
        match (times.first(), times.last()) {
            (Some(&first), Some(&last)) => {
                format!("{} … {}", time::format_instant(first), time::format_instant(last))
            }
            _ => "no step".to_string(),
        }
    };
    format!(
        "{} gives variable `{name}` no step: its files cover {}",
        span(axis.times.clone()),
        span(source.to_vec())
    )
}

/// Refuses a grid that misses every file of a variable: the cube would hold nothing of it. Files whose
/// extent GDAL cannot tell are given the benefit of the doubt (their warp reports the problem).
fn check_overlap(grid: &Grid, name: &str, source: &Source) -> Result<(), ConfigError> {
    let [w, s, e, n] = grid.bounds();
    let mut first = None;
    for file in &source.files {
        let Ok([fw, fs, fe, fn_]) = crate::source::warp::lonlat_bounds(file, source.data_type, source.nodata)
        else {
            return Ok(());
        };
        // Far beyond any longitude or latitude: the CRS the file is read in (its own, or `crs:`) is not its
        // coordinates' (metres read as degrees). Coarse global grids with cells centred on the poles or on
        // ±180° reach past ±90° and ±180° by half a cell; metres are thousands.
        if fs < -180.0 || fn_ > 180.0 || fw < -720.0 || fe > 720.0 {
            return Err(ConfigError::invalid(
                format!("variables.{name}.crs"),
                format!(
                    "{}: its coordinates in the CRS it is read in are not degrees (x {fw:.1}…{fe:.1}, y \
                     {fs:.1}…{fn_:.1}): give the CRS they are in",
                    file.path.display()
                ),
            ));
        }
        // A margin of two source cells: interpolation reaches half a cell past the centres.
        let (mx, my) = (2.0 * file.native_res.0, 2.0 * file.native_res.1);
        let lon = [-360.0, 0.0, 360.0].iter().any(|shift| fw - mx + shift < e && w < fe + mx + shift);
        if lon && fs - my < n && s < fn_ + my {
            return Ok(());
        }
        first.get_or_insert((file.path.clone(), [fw, fs, fe, fn_]));
    }
    let Some((path, [fw, fs, fe, fn_])) = first else { return Ok(()) };
    let more = match source.files.len() {
        1 => String::new(),
        n => format!(" (and its {} other files)", n - 1),
    };
    Err(ConfigError::invalid(
        "grid.bbox",
        format!(
            "[{w}, {s}, {e}, {n}] does not overlap the data of variable `{name}`: {} covers lon {fw:.3}…{fe:.3}, \
             lat {fs:.3}…{fn_:.3}{more}",
            path.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layout: &str) -> (Config, Grid) {
        let text = format!(
            "output: out.zarr\ngrid: {{ bbox: [9.5, 45.0, 11.0, 46.0], resolution: 0.01 }}\nlayout: {layout}\n\
             variables:\n  t2m: {{ path: t2m.nc }}\n  lc: {{ path: lc.tif, static: true }}\n"
        );
        let config = Config::from_yaml(&text, Path::new("test.yaml")).unwrap();
        let grid = Grid::from_config(config.grid()).unwrap();
        (config, grid)
    }

    const VARIABLES: [(DType, bool); 2] = [(DType::Float32, false), (DType::Uint8, true)];

    /// Days 29 and 30 of February in a 360-day file fall on the 28th; tiles of one date in two files do not
    /// count.
    #[test]
    fn steps_of_one_file_on_one_instant_get_a_note() {
        use crate::source::SourceStep;
        let feb = |d: u32| crate::time::parse_timestamp(&format!("2001-02-{d:02}")).unwrap();
        let step = |file: usize, time: Instant| SourceStep { file, band: 1, time: Some(time) };
        assert_eq!(shared_instants(&[step(0, feb(27)), step(1, feb(27)), step(0, feb(28))]), None);
        let note = shared_instants(&[step(0, feb(27)), step(0, feb(28)), step(0, feb(28)), step(0, feb(28))]);
        assert!(
            note.unwrap().starts_with("2 of its 4 steps fall on the instant of another step of their file")
        );
    }

    /// The note of a sum counts every stored step left missing: those without a source step near them as
    /// well as those the nearest step would have filled (it counted only the latter).
    #[test]
    fn the_note_of_a_sum_counts_every_missing_step() {
        use StepSources::{Aggregate, Empty, Nearest};
        let mut steps = vec![Empty, Aggregate(vec![0]), Nearest(vec![0]), Empty, Aggregate(vec![1]), Empty];
        let note = sums_not_spread("pr", &mut steps).unwrap().unwrap();
        assert_eq!(
            note,
            "aggregation sum: 4 of 6 stored steps hold no source step and are missing, 1 of them because a \
             sum is not copied from the nearest source step, as the other aggregations are"
        );
        assert!(matches!(steps[2], Empty));
        let mut gaps = vec![Aggregate(vec![0]), Empty];
        let note = sums_not_spread("pr", &mut gaps).unwrap().unwrap();
        assert_eq!(note, "aggregation sum: 1 of 2 stored steps hold no source step and are missing");
        assert_eq!(sums_not_spread("pr", &mut [Aggregate(vec![0])]).unwrap(), None);
        assert!(sums_not_spread("pr", &mut [Nearest(vec![0]), Empty]).is_err());
    }

    /// The values each type can hold, fill values among them.
    #[test]
    fn a_data_type_holds_its_own_whole_numbers() {
        assert!(DType::Uint8.holds(0.0) && DType::Uint8.holds(255.0));
        assert!(!DType::Uint8.holds(-1.0) && !DType::Uint8.holds(256.0) && !DType::Uint8.holds(1.5));
        assert!(DType::Int16.holds(-32768.0) && !DType::Int16.holds(-9999.5));
        assert!(DType::Int32.holds(-9999.0) && !DType::Uint32.holds(-9999.0));
        assert!(DType::Float32.holds(f64::NAN) && !DType::Uint16.holds(f64::NAN));
    }

    #[test]
    fn estimate_counts_the_padded_arrays_and_the_shuffled_scratch() {
        // 100 × 150 cells, 48 steps, 8 × 8 tiles: padded to 104 × 152.
        let (c, grid) = config("{ kind: pixel_series, batch: 64 }");
        let (layout, e) = resolve_layout(&c, &grid, 48, &VARIABLES, 1).unwrap();
        assert_eq!((layout.chunk_y, layout.chunk_x), (8, 8));
        assert_eq!(e.uncompressed_bytes, 48 * 104 * 152 * 4 + 104 * 152);
        assert_eq!((e.scratch_bytes, e.min_disk_bytes), (0, e.uncompressed_bytes / BEST_COMPRESSION_RATIO));
        // One shard of a chunk row of t2m: 48 × 8 × 8 cells per batch, 12 bytes each while generating.
        assert_eq!(e.min_block_bytes, 48 * 64 * 12 * layout.shard_x as u64);
        // Shuffled: 15 000 samples padded to 15 040, plus the uncompressed tiled copy as scratch.
        let (c, grid) = config("{ kind: pixel_series, batch: 64, order: shuffled }");
        let (_, e) = resolve_layout(&c, &grid, 48, &VARIABLES, 1).unwrap();
        assert_eq!(e.uncompressed_bytes, 48 * 15_040 * 4 + 15_040);
        assert_eq!(e.scratch_bytes, 48 * 15_000 * 4 + 15_000);
        assert_eq!(e.min_disk_bytes, e.uncompressed_bytes / BEST_COMPRESSION_RATIO + e.scratch_bytes);
    }

    #[test]
    fn batches_must_fit_the_grid_and_the_time_axis() {
        let key = |layout: &str, n_time: usize| {
            let (c, grid) = config(layout);
            match resolve_layout(&c, &grid, n_time, &VARIABLES, 1).unwrap_err() {
                ConfigError::Invalid { key, .. } => key,
                other => panic!("{other}"),
            }
        };
        assert_eq!(key("{ kind: pixel_series, batch: 40000 }", 48), "layout.batch");
        // The largest 64-bit prime: refused at once, not after 2^32 trial divisions.
        assert_eq!(key("{ kind: pixel_series, batch: 18446744073709551557 }", 48), "layout.batch");
        assert_eq!(
            key("{ kind: image_sequence, seq_len: 8, patch: [1, 1], batch: 18446744073709551557 }", 48),
            "layout.batch"
        );
        assert_eq!(key("{ kind: pixel_series, batch: 101, tile: [101, 1] }", 48), "layout.tile");
        assert_eq!(key("{ kind: pixel_series, batch: 64, window: 49 }", 48), "layout.window");
        assert_eq!(key("{ kind: pixel_series, batch: 20000, order: shuffled }", 48), "layout.batch");
        assert_eq!(
            key("{ kind: image_sequence, seq_len: 49, patch: [8, 8], batch: 4 }", 48),
            "layout.seq_len"
        );
        assert_eq!(
            key("{ kind: image_sequence, seq_len: 8, patch: [101, 8], batch: 1 }", 48),
            "layout.patch"
        );
        assert_eq!(
            key("{ kind: image_sequence, seq_len: 8, patch: [60, 8], batch: 2, grid: [2, 1] }", 48),
            "layout.grid"
        );
        // A static-only cube has no time axis to fit.
        let (c, grid) = config("{ kind: pixel_series, batch: 64, window: 49 }");
        assert!(resolve_layout(&c, &grid, 0, &[(DType::Uint8, true)], 1).is_ok());
    }
}
