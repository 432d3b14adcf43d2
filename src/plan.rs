//! Planning: the config resolved against the sources into everything generation needs, before any byte of
//! the cube is written. Every decision that depends on the inputs (time axis, which source steps feed which
//! target step, dtypes and fill values, chunk layout) is taken here, so that errors surface before work starts.

use crate::config::{Aggregation, Config, ConfigError, Resampling, VariableKind};
use crate::grid::Grid;
use crate::layout::Layout;
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
    /// For each target step, the source steps (indices into `source.steps`) feeding it.
    pub step_sources: Vec<StepSources>,
    /// Decisions the user should know about.
    pub notes: Vec<String>,
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
}

impl Plan {
    /// Resolves `config` against its sources (opens each file once).
    ///
    /// # Errors
    /// [`PlanError`] naming the key, variable or file at fault.
    pub fn new(config: Config, config_text: String) -> Result<Plan, PlanError> {
        let grid = Grid::from_config(config.grid())?;
        let mut sources = Vec::with_capacity(config.variables.0.len());
        for (name, var) in &config.variables.0 {
            sources.push(Source::probe(name, var)?);
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
                        format!("categorical needs integer data, the source holds {:?}", source.data_type),
                    )
                })?
            } else {
                DType::Float32
            };
            let fill =
                if categorical { source.nodata.unwrap_or_else(|| dtype.max_value()) } else { f64::NAN };
            let step_sources = match (&time, is_static) {
                (Some(axis), false) => time::map_steps(axis, &source.instants()),
                _ => Vec::new(),
            };
            let default_resampling = if categorical { Resampling::Nearest } else { Resampling::Bilinear };
            let default_aggregation = if categorical { Aggregation::Nearest } else { Aggregation::Mean };
            variables.push(VariablePlan {
                name: name.clone(),
                kind: var.kind,
                resampling: var.resampling.unwrap_or(default_resampling),
                aggregation: var.aggregation.unwrap_or(default_aggregation),
                is_static,
                dtype,
                fill,
                units: var.units.clone().or_else(|| source.units.clone()),
                step_sources,
                notes,
                source,
            });
        }
        let n_time =
            if variables.iter().all(|v| v.is_static) { 0 } else { time.as_ref().map_or(0, TimeAxis::len) };
        let item = variables.iter().map(|v| v.dtype.size()).max().unwrap_or(4);
        let layout = Layout::resolve(&config.layout, n_time, grid.height, grid.width, item);
        let time = if n_time == 0 { None } else { time };
        Ok(Plan { config, config_text, grid, time, layout, variables })
    }

    /// Number of target time steps (0 for static-only cubes).
    #[must_use]
    pub fn n_time(&self) -> usize {
        self.time.as_ref().map_or(0, TimeAxis::len)
    }
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
            return Err(ConfigError::invalid(
                "time",
                format!(
                    "missing, but variable `{name}` has a time axis (give start/end/step or `from: {name}`)"
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
