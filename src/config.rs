//! The `cubeload gen` configuration file (YAML), as users write it.
//!
//! Parsing is strict: unknown keys and wrong types are errors that name the key and its line (`serde_yaml`
//! reports both). Keys of `xcube gen` configurations (`output_path`, `output_size`, `output_region`,
//! `output_spatial_res`, `output_metadata`, `output_resampling`) are accepted as aliases so that users of that
//! tool can bring their configs along. Semantic checks that need the sources (time axes, extents) live in
//! [`crate::plan`]; this module checks what the file alone can tell.
//!
//! Relative paths are relative to the current working directory, as for any command-line tool.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// A configuration error: what is wrong and where (file, key).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// YAML syntax error, unknown key or wrong type (`serde_yaml` names the key, line and column).
    #[error("{path}: {message}")]
    Parse {
        /// The config file (or `<string>`).
        path: PathBuf,
        /// `serde_yaml`'s message, which names the key and its line.
        message: String,
    },
    /// A value that parses but makes no sense.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted path of the key at fault, e.g. `grid.bbox`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// The same error about a grid given by xcube's keys, named by them.
    fn in_xcube_keys(self) -> Self {
        match self {
            ConfigError::Invalid { key, message } => {
                let (key, message) = match key.as_str() {
                    "grid.bbox" => ("output_region".to_string(), message),
                    "grid.resolution" => ("output_spatial_res".to_string(), message),
                    "grid.size" => ("output_size".to_string(), message),
                    "grid" => (
                        "output_size".to_string(),
                        message
                            .replace("`resolution`", "`output_spatial_res`")
                            .replace("`size`", "`output_size`"),
                    ),
                    _ => (key, message),
                };
                ConfigError::Invalid { key, message }
            }
            other => other,
        }
    }

    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid { key: key.into(), message: message.into() }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the cube is written (a directory ending in `.zarr` by convention).
    #[serde(alias = "output_path")]
    pub output: PathBuf,
    /// The target grid. Optional only when the xcube aliases give it.
    #[serde(default)]
    pub grid: Option<GridConfig>,
    /// The target time axis; absent for cubes made only of static variables.
    #[serde(default)]
    pub time: Option<TimeConfig>,
    /// How chunks map to training batches.
    pub layout: LayoutConfig,
    /// Chunk compression.
    /// > default: zstd level 3
    #[serde(default)]
    pub compression: CompressionConfig,
    /// Variables by name, in the order the loader delivers them.
    pub variables: VariableMap,
    /// Free-form attributes copied to the cube's root group (title, license, ...).
    #[serde(default, alias = "output_metadata", deserialize_with = "metadata_map")]
    pub metadata: BTreeMap<String, serde_json::Value>,

    /// xcube alias: `[width, height]` of the target grid.
    #[serde(default, skip_serializing)]
    pub output_size: Option<[usize; 2]>,
    /// xcube alias: `[west, south, east, north]` of the target grid.
    #[serde(default, skip_serializing)]
    pub output_region: Option<[f64; 4]>,
    /// xcube alias: target resolution in degrees.
    #[serde(default, skip_serializing)]
    pub output_spatial_res: Option<f64>,
    /// xcube alias: default resampling for continuous variables.
    #[serde(default, skip_serializing)]
    pub output_resampling: Option<Resampling>,
}

/// Variables keep the order of the file: the loader's `V` axis follows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VariableMap(pub Vec<(String, VariableConfig)>);

impl<'de> Deserialize<'de> for VariableMap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = VariableMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping from variable names to variable settings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<VariableMap, A::Error> {
                let mut out: Vec<(String, VariableConfig)> = Vec::new();
                while let Some((name, value)) = map.next_entry::<String, VariableConfig>()? {
                    if out.iter().any(|(n, _)| *n == name) {
                        return Err(serde::de::Error::custom(format!("variable `{name}` is defined twice")));
                    }
                    out.push((name, value));
                }
                Ok(VariableMap(out))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// The key YAML merges a mapping with.
fn is_merge_key(key: &serde_yaml::Value) -> bool {
    key.as_str() == Some("<<")
}

/// Whether a merge key appears anywhere in `value`.
fn holds_merge_key(value: &serde_yaml::Value) -> bool {
    match value {
        serde_yaml::Value::Mapping(m) => m.iter().any(|(k, v)| is_merge_key(k) || holds_merge_key(v)),
        serde_yaml::Value::Sequence(items) => items.iter().any(holds_merge_key),
        serde_yaml::Value::Tagged(tagged) => holds_merge_key(&tagged.value),
        _ => false,
    }
}

/// Applies YAML's merge keys throughout `value`, innermost first, so that a merged mapping's own merges (a
/// chain of anchors) are applied too: `<<: M` or `<<: [M1, M2, ...]` gives the mapping the keys of the
/// `M`s it does not have itself (of two `M`s, the earlier wins), in the place of the `<<` (the order of
/// variables is theirs).
fn apply_merge_keys(value: &mut serde_yaml::Value) -> Result<(), String> {
    use serde_yaml::{Mapping, Value};
    match value {
        Value::Mapping(mapping) => {
            for (_, v) in mapping.iter_mut() {
                apply_merge_keys(v)?;
            }
            if !mapping.keys().any(is_merge_key) {
                return Ok(());
            }
            let own: Vec<Value> = mapping.keys().filter(|k| !is_merge_key(k)).cloned().collect();
            let mut merged = Mapping::new();
            for (k, v) in std::mem::take(mapping) {
                if !is_merge_key(&k) {
                    merged.insert(k, v);
                    continue;
                }
                let sources = match v {
                    Value::Mapping(m) => vec![m],
                    Value::Sequence(items) => items
                        .into_iter()
                        .map(|item| match item {
                            Value::Mapping(m) => Ok(m),
                            _ => Err("a merge key (`<<`) takes a mapping or a list of mappings".to_string()),
                        })
                        .collect::<Result<_, _>>()?,
                    _ => return Err("a merge key (`<<`) takes a mapping or a list of mappings".into()),
                };
                for source in sources {
                    for (k, v) in source {
                        if !own.contains(&k) && !merged.contains_key(&k) {
                            merged.insert(k, v);
                        }
                    }
                }
            }
            *mapping = merged;
        }
        Value::Sequence(items) => items.iter_mut().try_for_each(apply_merge_keys)?,
        Value::Tagged(tagged) => apply_merge_keys(&mut tagged.value)?,
        _ => {}
    }
    Ok(())
}

/// `serde_yaml`'s message, where a key is given twice with the line of the repeat: `serde_yaml` places the
/// error at the start of the mapping holding it (and a repeated top-level key nowhere).
fn with_repeat_line(text: &str, error: &serde_yaml::Error) -> String {
    let message = error.to_string();
    let key = [
        ("variable `", "` is defined twice"),
        ("metadata `", "` is given twice"),
        ("duplicate field `", "`"),
        ("duplicate entry with key \"", "\""),
    ]
    .iter()
    .find_map(|(before, after)| {
        let start = message.find(before)? + before.len();
        let end = start + message[start..].find(after)?;
        Some(&message[start..end])
    });
    let Some(key) = key else { return message };
    let from = error.location().map_or(0, |l| l.line().saturating_sub(1));
    // The key's lines from the mapping's start, at the indentation of the first: the second is the repeat.
    let mut found = text.lines().enumerate().skip(from).filter_map(|(i, line)| {
        let body = line.trim_start();
        let named = body.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with(':'));
        named.then_some((i + 1, line.len() - body.len()))
    });
    let Some((_, indent)) = found.next() else { return message };
    let Some((repeat, _)) = found.find(|&(_, i)| i == indent) else { return message };
    let bare = match error.location() {
        Some(l) => {
            message.trim_end_matches(&format!(" at line {} column {}", l.line(), l.column())).to_string()
        }
        None => message,
    };
    format!("{bare}, again at line {repeat}")
}

/// `metadata:`, whose keys must differ (YAML lets the last of two equal keys win without a word).
fn metadata_map<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, serde_json::Value>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = BTreeMap<String, serde_json::Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a mapping of attribute names to values")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((key, value)) = map.next_entry::<String, serde_json::Value>()? {
                if out.contains_key(&key) {
                    return Err(serde::de::Error::custom(format!("metadata `{key}` is given twice")));
                }
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_map(Visitor)
}

/// The target grid: geographic lon/lat (EPSG:4326), north-up.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridConfig {
    /// Target CRS. Only `EPSG:4326` is supported.
    /// > default: EPSG:4326
    #[serde(default = "default_crs")]
    pub crs: String,
    /// `[west, south, east, north]`: outer edges of the outer cells.
    #[serde(alias = "region")]
    pub bbox: [f64; 4],
    /// Cell size in degrees, one number or `[x, y]` (as `gdalwarp -tr`).
    #[serde(default)]
    pub resolution: Option<Resolution>,
    /// `[width, height]` in cells, instead of `resolution` (as `gdalwarp -ts`).
    #[serde(default)]
    pub size: Option<[usize; 2]>,
}

fn default_crs() -> String {
    "EPSG:4326".to_string()
}

/// One resolution for both axes or `[x, y]`.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(untagged)]
pub enum Resolution {
    /// Square cells.
    Square(f64),
    /// `[x, y]` cell size.
    Xy([f64; 2]),
}

/// By hand rather than `untagged`, so that a wrong value is named with its key and line (`grid.resolution: invalid
/// type: string "abc", expected ... at line 4`), not as "data did not match any variant" of the whole grid.
impl<'de> Deserialize<'de> for Resolution {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ResolutionVisitor;
        impl<'de> Visitor<'de> for ResolutionVisitor {
            type Value = Resolution;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a cell size in degrees: one number or [x, y]")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Resolution, E> {
                Ok(Resolution::Square(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Resolution, E> {
                Ok(Resolution::Square(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Resolution, E> {
                Ok(Resolution::Square(v as f64))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Resolution, A::Error> {
                <[f64; 2]>::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Resolution::Xy)
            }
        }
        deserializer.deserialize_any(ResolutionVisitor)
    }
}

/// The target time axis: `start`/`end`/`step`, or `from: VARIABLE` to take that input's own instants.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeConfig {
    /// First step, e.g. `2019-03-01T00:00:00Z`.
    #[serde(default)]
    pub start: Option<String>,
    /// Last step (inclusive when it falls on a step).
    #[serde(default)]
    pub end: Option<String>,
    /// Step: `1h`, `30min`, `1d`, `1mo`, or ISO 8601 (`PT1H`).
    #[serde(default)]
    pub step: Option<String>,
    /// Name of a variable whose source instants become the axis (may be irregular).
    #[serde(default)]
    pub from: Option<String>,
}

/// Chunk = batch layouts.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LayoutConfig {
    /// LSTM batches: `batch` pixels × T steps, stored as `(T, h, w)` chunks with `h·w = batch`.
    PixelSeries {
        /// Pixels per batch.
        batch: usize,
        /// `[h, w]` spatial tile with `h·w = batch`.
        /// > default: the most square factorisation of `batch`
        #[serde(default)]
        tile: Option<[usize; 2]>,
        /// Time steps per chunk. > default: the full series
        #[serde(default)]
        window: Option<usize>,
        /// Sharding: `auto` (shards when a chunk is under 1 MiB), `none`, or the number of batches per shard.
        #[serde(default)]
        shard: ShardConfig,
        /// `tiled` (chunks are spatial tiles) or `shuffled` (pixels permuted once, stored sample-major).
        /// > default: tiled
        #[serde(default)]
        order: Order,
        /// Seed of the permutation of `order: shuffled`. > default: 0
        #[serde(default)]
        seed: u64,
        /// Variables may keep a coarser native `resolution` (multi-resolution cube). > default: false
        #[serde(default)]
        multires: bool,
    },
    /// Video-prediction batches: `batch` sequences of `seq_len` frames of `patch` pixels.
    ImageSequence {
        /// Frames per sample.
        seq_len: usize,
        /// `[h, w]` of one sample's patch.
        patch: [usize; 2],
        /// Samples per batch.
        batch: usize,
        /// `[gy, gx]` patches per chunk with `gy·gx = batch`. > default: most square factorisation
        #[serde(default)]
        grid: Option<[usize; 2]>,
        /// Sharding, as for `pixel_series`.
        #[serde(default)]
        shard: ShardConfig,
        /// Variables may keep a coarser native `resolution` (multi-resolution cube). > default: false
        #[serde(default)]
        multires: bool,
    },
}

/// Read as the flat `RawLayout`, then checked inside the layout's own mapping, so that `serde_yaml` names the
/// section and its line in the error (a `try_from` conversion runs after the mapping and loses both).
impl<'de> Deserialize<'de> for LayoutConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LayoutVisitor;
        impl<'de> Visitor<'de> for LayoutVisitor {
            type Value = LayoutConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a layout mapping with `kind: pixel_series` or `kind: image_sequence`")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<LayoutConfig, A::Error> {
                let raw = RawLayout::deserialize(de::value::MapAccessDeserializer::new(map))?;
                LayoutConfig::try_from(raw).map_err(de::Error::custom)
            }
        }
        deserializer.deserialize_map(LayoutVisitor)
    }
}

/// How the pixels of a `pixel_series` cube are grouped into batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// A batch is a spatial tile of `h × w` pixels: arrays `(time, lat, lon)` chunked `(T, h, w)`.
    #[default]
    Tiled,
    /// A batch is B pixels drawn at random once, at generation: arrays `(sample, time)` chunked `(B, T)`,
    /// with `lat(sample)`, `lon(sample)`. Neighbouring pixels are strongly correlated; this makes every
    /// chunk an i.i.d.-like batch that is still one sequential read.
    Shuffled,
}

/// The layout section as written: a flat mapping, so that `serde_yaml` reports the line of a bad key or value
/// (an internally tagged enum would buffer the mapping and lose positions).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLayout {
    kind: RawLayoutKind,
    batch: usize,
    #[serde(default)]
    tile: Option<[usize; 2]>,
    #[serde(default)]
    window: Option<usize>,
    #[serde(default)]
    shard: ShardConfig,
    #[serde(default)]
    seq_len: Option<usize>,
    #[serde(default)]
    patch: Option<[usize; 2]>,
    #[serde(default)]
    grid: Option<[usize; 2]>,
    #[serde(default)]
    order: Option<Order>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    multires: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawLayoutKind {
    PixelSeries,
    ImageSequence,
}

impl TryFrom<RawLayout> for LayoutConfig {
    type Error = String;
    fn try_from(raw: RawLayout) -> Result<Self, String> {
        let RawLayout { kind, batch, tile, window, shard, seq_len, patch, grid, order, seed, multires } = raw;
        match kind {
            RawLayoutKind::PixelSeries => {
                for (key, given) in
                    [("seq_len", seq_len.is_some()), ("patch", patch.is_some()), ("grid", grid.is_some())]
                {
                    if given {
                        return Err(format!("`{key}` is not a key of the pixel_series layout"));
                    }
                }
                let order = order.unwrap_or_default();
                if order == Order::Shuffled && tile.is_some() {
                    return Err("`tile` has no meaning with order: shuffled".to_string());
                }
                if seed.is_some() && order != Order::Shuffled {
                    return Err("`seed` is only used with order: shuffled".to_string());
                }
                if multires && order == Order::Shuffled {
                    return Err(
                        "`multires` needs spatial tiles: it cannot be used with order: shuffled".to_string()
                    );
                }
                let seed = seed.unwrap_or(0);
                Ok(LayoutConfig::PixelSeries { batch, tile, window, shard, order, seed, multires })
            }
            RawLayoutKind::ImageSequence => {
                for (key, given) in [
                    ("tile", tile.is_some()),
                    ("window", window.is_some()),
                    ("order", order.is_some()),
                    ("seed", seed.is_some()),
                ] {
                    if given {
                        return Err(format!("`{key}` is not a key of the image_sequence layout"));
                    }
                }
                let seq_len = seq_len.ok_or("`seq_len` is required for image_sequence")?;
                let patch = patch.ok_or("`patch` is required for image_sequence")?;
                Ok(LayoutConfig::ImageSequence { seq_len, patch, batch, grid, shard, multires })
            }
        }
    }
}

/// Zarr sharding: shard = several batches along x, inner chunk = one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ShardConfig {
    /// `auto` or `none`.
    Named(ShardMode),
    /// Batches per shard along x.
    Batches(usize),
    /// Not given: auto.
    #[default]
    #[serde(skip)]
    Default,
}

/// By hand rather than `untagged`, so that a wrong value is named with its key and line.
impl<'de> Deserialize<'de> for ShardConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ShardVisitor;
        impl Visitor<'_> for ShardVisitor {
            type Value = ShardConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`auto`, `none` or a number of batches per shard")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ShardConfig, E> {
                usize::try_from(v)
                    .map(ShardConfig::Batches)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ShardConfig, E> {
                u64::try_from(v)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ShardConfig, E> {
                ShardMode::deserialize(de::value::StrDeserializer::new(v)).map(ShardConfig::Named)
            }
        }
        deserializer.deserialize_any(ShardVisitor)
    }
}

/// Named sharding modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardMode {
    /// Shard when chunks are smaller than 1 MiB.
    Auto,
    /// Never shard.
    None,
}

/// Chunk compression.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    /// `zstd`, `gzip` or `none`.
    /// > default: zstd
    #[serde(default = "default_codec")]
    pub codec: Codec,
    /// Codec level. > default: 3 (zstd), 5 (gzip)
    #[serde(default)]
    pub level: Option<i32>,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig { codec: Codec::Zstd, level: None }
    }
}

fn default_codec() -> Codec {
    Codec::Zstd
}

/// Supported chunk codecs (named in any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    /// Zstandard: fast decode, the default.
    Zstd,
    /// gzip: slower, for readers without zstd.
    Gzip,
    /// Uncompressed.
    None,
}

impl<'de> Deserialize<'de> for Codec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const NAMES: &[(&str, Codec)] =
            &[("zstd", Codec::Zstd), ("gzip", Codec::Gzip), ("none", Codec::None)];
        named_in_any_case(deserializer, NAMES, &["zstd", "gzip", "none"])
    }
}

/// One variable of the cube.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariableConfig {
    /// Source file, or a glob pattern (`data/s2/*.tif`) for a series of files.
    pub path: String,
    /// Variable (NetCDF/HDF subdataset) inside the file.
    #[serde(default)]
    pub variable: Option<String>,
    /// 1-based band for multi-band files without a time axis, or the time step of a static variable.
    #[serde(default)]
    pub band: Option<usize>,
    /// `(lat, lon)` only: no time axis.
    #[serde(default, rename = "static")]
    pub is_static: bool,
    /// `continuous` (float32, NaN fill) or `categorical` (integer dtype kept, nearest/mode resampling).
    /// > default: continuous
    #[serde(default)]
    pub kind: VariableKind,
    /// Spatial resampling. > default: bilinear (continuous), nearest (categorical)
    #[serde(default)]
    pub resampling: Option<Resampling>,
    /// Temporal aggregation when several source steps fall in one target step.
    /// > default: mean (continuous), nearest (categorical)
    #[serde(default)]
    pub aggregation: Option<Aggregation>,
    /// Source nodata value, overriding (or supplying) the file's own.
    #[serde(default)]
    pub nodata: Option<f64>,
    /// CRS of the source when the file has none (e.g. `EPSG:32633`).
    #[serde(default)]
    pub crs: Option<String>,
    /// Units attribute of the cube variable. > default: the source's units
    #[serde(default)]
    pub units: Option<String>,
    /// Native cell size (degrees, one number or `[x, y]`) kept in a multi-resolution cube
    /// (`layout.multires: true`); snapped to a whole multiple of the target grid's cells.
    /// > default: the target grid
    #[serde(default)]
    pub resolution: Option<Resolution>,
    /// How the loader brings a coarser variable onto the target grid.
    /// > default: bilinear (continuous), nearest (categorical)
    #[serde(default)]
    pub upsampling: Option<Upsampling>,
    /// Native time step kept in a multi-resolution cube (`5d`, `1d`, ...): a whole multiple of `time.step`.
    /// Each stored step is the `aggregation` of the source steps in its window; the loader gives every target
    /// step of the window that value. > default: the cube's time step
    #[serde(default)]
    pub time_step: Option<String>,
}

/// How a variable stored at a coarser resolution is interpolated onto the target grid at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Upsampling {
    /// Each target cell takes the coarse cell that contains its centre.
    Nearest,
    /// Bilinear between the centres of the four nearest coarse cells (edges clamped, missing neighbours
    /// left out and the weights renormalised).
    Bilinear,
}

/// Continuous or categorical.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VariableKind {
    /// Float values, NaN for missing.
    #[default]
    Continuous,
    /// Class labels: integer dtype, declared fill value, never interpolated.
    Categorical,
}

/// GDAL warp resampling algorithms (`gdalwarp -r`), named in any case (xcube's configs write `Nearest`,
/// `CubicSpline`, `Median`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Resampling {
    Nearest,
    Bilinear,
    Cubic,
    Cubicspline,
    Lanczos,
    Average,
    Rms,
    Mode,
    Min,
    Max,
    Med,
    Q1,
    Q3,
    Sum,
}

impl<'de> Deserialize<'de> for Resampling {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use Resampling::{
            Average, Bilinear, Cubic, Cubicspline, Lanczos, Max, Med, Min, Mode, Nearest, Q1, Q3, Rms, Sum,
        };
        const NAMES: &[(&str, Resampling)] = &[
            ("nearest", Nearest),
            ("near", Nearest),
            ("bilinear", Bilinear),
            ("cubic", Cubic),
            ("cubicspline", Cubicspline),
            ("cubic_spline", Cubicspline),
            ("lanczos", Lanczos),
            ("average", Average),
            ("rms", Rms),
            ("mode", Mode),
            ("min", Min),
            ("max", Max),
            ("med", Med),
            ("median", Med),
            ("q1", Q1),
            ("q3", Q3),
            ("sum", Sum),
        ];
        const EXPECTED: &[&str] = &[
            "nearest",
            "near",
            "bilinear",
            "cubic",
            "cubicspline",
            "cubic_spline",
            "lanczos",
            "average",
            "rms",
            "mode",
            "min",
            "max",
            "med",
            "median",
            "q1",
            "q3",
            "sum",
        ];
        named_in_any_case(deserializer, NAMES, EXPECTED)
    }
}

/// One of `names`, in any case, or serde's "unknown variant" error listing `expected`.
fn named_in_any_case<'de, D: serde::Deserializer<'de>, T: Copy>(
    deserializer: D,
    names: &[(&str, T)],
    expected: &'static [&'static str],
) -> Result<T, D::Error> {
    let name = String::deserialize(deserializer)?;
    names
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(&name))
        .map(|&(_, value)| value)
        .ok_or_else(|| serde::de::Error::unknown_variant(&name, expected))
}

impl Resampling {
    /// The name `gdalwarp -r` takes.
    #[must_use]
    pub fn gdal_name(self) -> &'static str {
        match self {
            Resampling::Nearest => "near",
            Resampling::Bilinear => "bilinear",
            Resampling::Cubic => "cubic",
            Resampling::Cubicspline => "cubicspline",
            Resampling::Lanczos => "lanczos",
            Resampling::Average => "average",
            Resampling::Rms => "rms",
            Resampling::Mode => "mode",
            Resampling::Min => "min",
            Resampling::Max => "max",
            Resampling::Med => "med",
            Resampling::Q1 => "q1",
            Resampling::Q3 => "q3",
            Resampling::Sum => "sum",
        }
    }

    /// Whether the algorithm aggregates all source pixels under a target cell (rather than interpolating
    /// at the cell's centre).
    #[must_use]
    pub fn is_area(self) -> bool {
        !matches!(
            self,
            Resampling::Nearest
                | Resampling::Bilinear
                | Resampling::Cubic
                | Resampling::Cubicspline
                | Resampling::Lanczos
        )
    }

    /// Whether warping stored values, then unpacking the result (`stored × scale + offset`), gives what
    /// warping the unpacked values gives. Weighted means (weights summing to one) and the mode commute with
    /// any unpacking; selections by rank only where the scale keeps the order (a negative one swaps min and
    /// max); a sum counts the offset once per source pixel, and a root mean square squares it.
    #[must_use]
    pub fn commutes_with_unpacking(self, scale: f64, offset: f64) -> bool {
        match self {
            Resampling::Nearest
            | Resampling::Bilinear
            | Resampling::Cubic
            | Resampling::Cubicspline
            | Resampling::Lanczos
            | Resampling::Average => true,
            // The mode's ties and the median of an even count are decided by the order of the values.
            Resampling::Mode
            | Resampling::Min
            | Resampling::Max
            | Resampling::Med
            | Resampling::Q1
            | Resampling::Q3 => scale > 0.0,
            Resampling::Sum => offset == 0.0,
            Resampling::Rms => offset == 0.0 && scale > 0.0,
        }
    }

    /// Whether the algorithm only ever returns one of the source values (safe for class labels).
    #[must_use]
    pub fn keeps_values(self) -> bool {
        matches!(
            self,
            Resampling::Nearest
                | Resampling::Mode
                | Resampling::Min
                | Resampling::Max
                | Resampling::Med
                | Resampling::Q1
                | Resampling::Q3
        )
    }
}

/// Temporal aggregation of the source steps that fall in one target step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Mean of the valid values.
    Mean,
    /// Sum of the valid values (NaN when none is valid).
    Sum,
    /// Minimum of the valid values.
    Min,
    /// Maximum of the valid values.
    Max,
    /// The valid value of the source step nearest to the target step's start.
    Nearest,
}

impl Aggregation {
    /// The name a config gives it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Aggregation::Mean => "mean",
            Aggregation::Sum => "sum",
            Aggregation::Min => "min",
            Aggregation::Max => "max",
            Aggregation::Nearest => "nearest",
        }
    }

    /// Whether the result is always one of the source values (safe for class labels).
    #[must_use]
    pub fn keeps_values(self) -> bool {
        matches!(self, Aggregation::Min | Aggregation::Max | Aggregation::Nearest)
    }
}

impl Config {
    /// Reads and parses a config file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read, [`ConfigError::Parse`] for YAML errors, unknown
    /// keys and wrong types (with the line), [`ConfigError::Invalid`] for values that make no sense.
    pub fn from_path(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::from_yaml(&text, path)
    }

    /// Parses YAML text; `origin` names it in errors.
    ///
    /// # Errors
    /// As [`Config::from_path`], without the read error.
    pub fn from_yaml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        // A byte-order mark (editors on Windows write one) is not YAML: the first key would read as another.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let parse_error = |message| ConfigError::Parse { path: origin.to_path_buf(), message };
        // YAML merge keys (`<<: *common`), which serde_yaml leaves to its `Value`: a config holding one is
        // read with its merges applied, unless it fails where no merge is involved, which keeps the line.
        let document = serde_yaml::from_str::<serde_yaml::Value>(text);
        let merges = document.as_ref().is_ok_and(holds_merge_key);
        let mut config: Config = match serde_yaml::from_str(text) {
            Ok(config) if !merges => config,
            Err(e) if !e.to_string().contains("<<") => return Err(parse_error(with_repeat_line(text, &e))),
            // A merge key in a document that is not one (a key given twice): the error is the document's.
            Err(e) if !merges => {
                return Err(parse_error(with_repeat_line(text, &document.err().unwrap_or(e))));
            }
            _ => Config::with_merge_keys(text).map_err(parse_error)?,
        };
        let xcube = config.apply_xcube_aliases()?;
        config.validate().map_err(|e| if xcube { e.in_xcube_keys() } else { e })?;
        Ok(config)
    }

    /// The config of `text` with its merge keys (`<<`) applied, read as the YAML of the merged document, so
    /// that a plain scalar where a string is expected is read as one (`units: 1` is the string "1"), as
    /// without merges; a number is written back in `serde_yaml`'s spelling, though (`1e3` reads "1000.0",
    /// `1.50` "1.5"). Errors name the key by its path instead of its line: a merged mapping has no line of
    /// its own.
    fn with_merge_keys(text: &str) -> Result<Config, String> {
        let mut value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| with_repeat_line(text, &e))?;
        apply_merge_keys(&mut value)?;
        let merged = serde_yaml::to_string(&value).map_err(|e| e.to_string())?;
        serde_yaml::from_str(&merged).map_err(|e| {
            let message = e.to_string();
            let bare = match e.location() {
                Some(l) => message.trim_end_matches(&format!(" at line {} column {}", l.line(), l.column())),
                None => &message,
            };
            format!("{bare} (with the merge keys applied)")
        })
    }

    /// Folds the xcube top-level keys into `grid` (an error if both spell the same thing); whether the grid
    /// came from them.
    fn apply_xcube_aliases(&mut self) -> Result<bool, ConfigError> {
        let any =
            self.output_size.is_some() || self.output_region.is_some() || self.output_spatial_res.is_some();
        if any {
            if self.grid.is_some() {
                return Err(ConfigError::invalid(
                    "grid",
                    "give either `grid` or the xcube keys output_size/output_region/output_spatial_res, not both",
                ));
            }
            let bbox = self.output_region.take().ok_or_else(|| {
                ConfigError::invalid("output_region", "required with output_size/output_spatial_res")
            })?;
            self.grid = Some(GridConfig {
                crs: default_crs(),
                bbox,
                resolution: self.output_spatial_res.take().map(Resolution::Square),
                size: self.output_size.take(),
            });
        }
        if let Some(resampling) = self.output_resampling.take() {
            for (_, var) in &mut self.variables.0 {
                if var.kind == VariableKind::Continuous && var.resampling.is_none() {
                    var.resampling = Some(resampling);
                }
            }
        }
        Ok(any)
    }

    /// Checks what the file alone can tell; each error names its key.
    fn validate(&self) -> Result<(), ConfigError> {
        // YAML's nulls (`~`, `null`, `Null`, `NULL`) are read as a path of that name; `output: ""` names nothing.
        let null = ["", "~", "null", "Null", "NULL"].iter().any(|n| self.output == Path::new(n));
        if null {
            return Err(ConfigError::invalid("output", "the cube's path (or s3:// URL) is missing"));
        }
        // No shell reads the config: `~/x.zarr` made a directory named `~` in the working directory.
        if self.output.starts_with("~") {
            return Err(ConfigError::invalid(
                "output",
                format!(
                    "`{}`: `~` is not expanded here; write the home directory's path",
                    self.output.display()
                ),
            ));
        }
        if let Some(why) = crate::store::unsupported_url(&self.output) {
            return Err(ConfigError::invalid("output", format!("`{}`: {why}", self.output.display())));
        }
        let grid = self.grid.as_ref().ok_or_else(|| ConfigError::invalid("grid", "missing"))?;
        if !grid.crs.eq_ignore_ascii_case("EPSG:4326") {
            return Err(ConfigError::invalid(
                "grid.crs",
                format!("`{}` is not supported: the cube grid is lon/lat (EPSG:4326)", grid.crs),
            ));
        }
        let [w, s, e, n] = grid.bbox;
        if !grid.bbox.iter().all(|v| v.is_finite()) {
            return Err(ConfigError::invalid("grid.bbox", "values must be finite numbers"));
        }
        if !(w < e && s < n) {
            return Err(ConfigError::invalid(
                "grid.bbox",
                format!(
                    "[{w}, {s}, {e}, {n}] is not [west, south, east, north] with west < east and south < north"
                ),
            ));
        }
        if w < -180.0 || e > 180.0 || s < -90.0 || n > 90.0 {
            return Err(ConfigError::invalid(
                "grid.bbox",
                format!("[{w}, {s}, {e}, {n}] leaves lon -180..180 / lat -90..90"),
            ));
        }
        match (&grid.resolution, &grid.size) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid("grid", "give `resolution` or `size`, not both"));
            }
            (None, None) => return Err(ConfigError::invalid("grid", "give `resolution` or `size`")),
            (Some(res), None) => {
                let (rx, ry) = res.xy();
                if !(rx > 0.0 && ry > 0.0 && rx.is_finite() && ry.is_finite()) {
                    return Err(ConfigError::invalid("grid.resolution", "must be positive"));
                }
            }
            (None, Some([sw, sh])) => {
                if *sw == 0 || *sh == 0 {
                    return Err(ConfigError::invalid("grid.size", "width and height must be at least 1"));
                }
            }
        }
        if self.variables.0.is_empty() {
            return Err(ConfigError::invalid("variables", "at least one variable is required"));
        }
        // `{ title: NDVI, 2015-2017 }` is a title and a key `2015-2017` without a value.
        if let Some((key, _)) = self.metadata.iter().find(|(_, value)| value.is_null()) {
            return Err(ConfigError::invalid(
                format!("metadata.{key}"),
                "has no value (a comma inside `{ ... }` starts a new key: quote a text that holds one)",
            ));
        }
        if self.metadata.contains_key("cubeload") {
            return Err(ConfigError::invalid(
                "metadata.cubeload",
                "reserved: the cube's own description (layout, variables, statistics) is written there",
            ));
        }
        for (name, var) in &self.variables.0 {
            let key = |k: &str| format!("variables.{name}.{k}");
            if name.is_empty() || name.starts_with('.') || name.contains('/') || name.contains('\\') {
                return Err(ConfigError::invalid(
                    format!("variables.{name}"),
                    "a variable name must be non-empty and contain no `/`",
                ));
            }
            if ["time", "lat", "lon", "spatial_ref", "sample"].contains(&name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("variables.{name}"),
                    "this name is reserved for a coordinate",
                ));
            }
            // The cube's own files and groups lie beside the variables' arrays.
            if name == "zarr.json" || name.starts_with("cubeload") || name.starts_with("coarse_") {
                return Err(ConfigError::invalid(
                    format!("variables.{name}"),
                    "names `zarr.json` and those starting with `cubeload` or `coarse_` are reserved for the \
                     cube's metadata, manifest, validity index and resolution levels",
                ));
            }
            if var.band == Some(0) {
                return Err(ConfigError::invalid(key("band"), "bands are numbered from 1"));
            }
            if let Some(res) = var.resolution {
                if !self.layout.multires() {
                    return Err(ConfigError::invalid(
                        key("resolution"),
                        "a native resolution needs a multi-resolution cube: set layout.multires: true",
                    ));
                }
                let (rx, ry) = res.xy();
                if !(rx > 0.0 && ry > 0.0 && rx.is_finite() && ry.is_finite()) {
                    return Err(ConfigError::invalid(key("resolution"), "must be positive"));
                }
            }
            if var.time_step.is_some() {
                if !self.layout.multires() {
                    return Err(ConfigError::invalid(
                        key("time_step"),
                        "a native time step needs a multi-resolution cube: set layout.multires: true",
                    ));
                }
                if var.is_static {
                    return Err(ConfigError::invalid(key("time_step"), "a static variable has no time axis"));
                }
            }
            if var.upsampling.is_some() && var.resolution.is_none() {
                return Err(ConfigError::invalid(
                    key("upsampling"),
                    "only a variable with a coarser `resolution` is upsampled",
                ));
            }
            if var.kind == VariableKind::Categorical {
                if var.upsampling == Some(Upsampling::Bilinear) {
                    return Err(ConfigError::invalid(
                        key("upsampling"),
                        "bilinear invents values between classes; use nearest for a categorical variable",
                    ));
                }
                if let Some(r) = var.resampling.filter(|r| !r.keeps_values()) {
                    return Err(ConfigError::invalid(
                        key("resampling"),
                        format!(
                            "`{}` invents values between classes; use nearest or mode for a categorical variable",
                            r.gdal_name()
                        ),
                    ));
                }
                if let Some(a) = var.aggregation.filter(|a| !a.keeps_values()) {
                    return Err(ConfigError::invalid(
                        key("aggregation"),
                        format!(
                            "`{}` invents classes; use nearest, min or max for a categorical variable",
                            a.name()
                        ),
                    ));
                }
            }
        }
        match &self.layout {
            LayoutConfig::PixelSeries { batch, tile, window, shard, .. } => {
                check_batch(*batch, tile.as_ref(), "layout.tile")?;
                if *window == Some(0) {
                    return Err(ConfigError::invalid("layout.window", "must be at least 1"));
                }
                check_shard(*shard)?;
            }
            LayoutConfig::ImageSequence { seq_len, patch, batch, grid, shard, .. } => {
                if *seq_len == 0 {
                    return Err(ConfigError::invalid("layout.seq_len", "must be at least 1"));
                }
                if patch[0] == 0 || patch[1] == 0 {
                    return Err(ConfigError::invalid("layout.patch", "must be at least [1, 1]"));
                }
                check_batch(*batch, grid.as_ref(), "layout.grid")?;
                check_shard(*shard)?;
            }
        }
        if let Some(level) = self.compression.level {
            let ok = match self.compression.codec {
                Codec::Zstd => (-7..=22).contains(&level),
                Codec::Gzip => (0..=9).contains(&level),
                Codec::None => false,
            };
            if !ok {
                let why = match self.compression.codec {
                    Codec::None => format!("{level}: `codec: none` compresses nothing, at no level"),
                    codec => format!("{level} is out of range for {codec:?}"),
                };
                return Err(ConfigError::invalid("compression.level", why));
            }
        }
        if let Some(time) = &self.time {
            match (&time.from, &time.start, &time.end, &time.step) {
                (Some(from), None, None, None) => {
                    if !self.variables.0.iter().any(|(n, _)| n == from) {
                        return Err(ConfigError::invalid(
                            "time.from",
                            format!("`{from}` is not one of the variables"),
                        ));
                    }
                }
                (None, Some(_), Some(_), Some(_)) => {}
                (Some(_), ..) => {
                    return Err(ConfigError::invalid("time", "`from` excludes start/end/step"));
                }
                (None, ..) => {
                    return Err(ConfigError::invalid(
                        "time",
                        "give `from: VARIABLE`, or all of start, end, step",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The validated grid section.
    #[must_use]
    pub fn grid(&self) -> &GridConfig {
        self.grid.as_ref().expect("validated: grid is present")
    }
}

impl LayoutConfig {
    /// An unsharded multi-resolution `pixel_series` layout of `batch` pixels in the most square tile: the
    /// level arithmetic needs a layout config where none is at hand (checking a cube's levels, benchmarks).
    #[must_use]
    pub fn unsharded_multires(batch: usize) -> LayoutConfig {
        LayoutConfig::PixelSeries {
            batch,
            tile: None,
            window: None,
            shard: ShardConfig::Named(ShardMode::None),
            order: Order::Tiled,
            seed: 0,
            multires: true,
        }
    }

    /// Whether variables may keep a coarser native resolution (`layout.multires`).
    #[must_use]
    pub fn multires(&self) -> bool {
        match self {
            LayoutConfig::PixelSeries { multires, .. } | LayoutConfig::ImageSequence { multires, .. } => {
                *multires
            }
        }
    }
}

impl Resolution {
    /// `(x, y)` cell size.
    #[must_use]
    pub fn xy(self) -> (f64, f64) {
        match self {
            Resolution::Square(r) => (r, r),
            Resolution::Xy([x, y]) => (x, y),
        }
    }
}

fn check_batch(batch: usize, factors: Option<&[usize; 2]>, key: &str) -> Result<(), ConfigError> {
    if batch == 0 {
        return Err(ConfigError::invalid("layout.batch", "must be at least 1"));
    }
    // Checked: `[2^32, 2^32]` overflows, and a wrapped product could even equal the batch.
    if let Some([a, b]) = factors
        && a.checked_mul(*b) != Some(batch)
    {
        return Err(ConfigError::invalid(key, format!("{a} × {b} must equal layout.batch = {batch}")));
    }
    Ok(())
}

fn check_shard(shard: ShardConfig) -> Result<(), ConfigError> {
    if shard == ShardConfig::Batches(0) {
        return Err(ConfigError::invalid("layout.shard", "must be auto, none or at least 1"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(text, Path::new("test.yaml"))
    }

    const BASE: &str = "output: out.zarr
grid: { bbox: [-10.0, 50.0, 2.0, 58.0], resolution: 0.05 }
time: { start: 2019-03-01T00:00:00Z, end: 2019-03-31T23:00:00Z, step: 1h }
layout: { kind: pixel_series, batch: 256 }
variables:
  t2m: { path: era5.grib, resampling: bilinear, aggregation: mean }
  lc: { path: lc.tif, kind: categorical, static: true }
";

    #[test]
    fn parses_the_design_example_in_order() {
        let c = parse(BASE).unwrap();
        let names: Vec<_> = c.variables.0.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["t2m", "lc"]);
        assert_eq!(c.grid().resolution.unwrap().xy(), (0.05, 0.05));
        assert!(c.variables.0[1].1.is_static);
        assert_eq!(c.compression.codec, Codec::Zstd);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = BASE.replace("batch: 256 }", "batch: 256, bacth: 3 }");
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("bacth") && msg.contains("line 4"), "{msg}");
        let text = BASE.replace("resampling: bilinear,", "resampling: bilinear, resamplnig: x,");
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("resamplnig") && msg.contains("line 6"), "{msg}");
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_key() {
        let c = parse(&format!("\u{feff}{BASE}")).unwrap();
        assert_eq!(c.output, Path::new("out.zarr"));
    }

    #[test]
    fn wrong_type_names_line() {
        let msg = parse(&BASE.replace("batch: 256", "batch: many")).unwrap_err().to_string();
        assert!(msg.contains("line 4"), "{msg}");
    }

    /// Values of a key that takes several forms, and keys of the other layout, are named with their key and
    /// line: not as "data did not match any variant of untagged enum" of the enclosing section.
    #[test]
    fn values_of_several_forms_and_layout_keys_name_key_and_line() {
        let block = "output: out.zarr
grid:
  bbox: [-10.0, 50.0, 2.0, 58.0]
  resolution: 0.05
layout:
  kind: pixel_series
  batch: 256
variables:
  t2m: { path: era5.grib }
";
        let cases = [
            (
                "resolution: 0.05",
                "resolution: abc",
                "grid.resolution: invalid type: string \"abc\"",
                "line 4",
            ),
            ("resolution: 0.05", "resolution: [0.1, x]", "grid.resolution[1]", "line 4"),
            ("batch: 256", "batch: 256\n  shard: maybe", "layout.shard: unknown variant `maybe`", "line 8"),
            ("batch: 256", "batch: 256\n  shard: -3", "layout.shard: invalid value: integer `-3`", "line 8"),
            (
                "batch: 256",
                "batch: 256\n  seq_len: 4",
                "layout: `seq_len` is not a key of the pixel_series",
                "line 6",
            ),
            (
                "batch: 256",
                "batch: 256\n  order: shuffled\n  tile: [16, 16]",
                "layout: `tile` has no meaning",
                "line 6",
            ),
            ("pixel_series", "image_sequence\n  patch: [8, 8]", "layout: `seq_len` is required", "line 6"),
        ];
        for (from, to, what, line) in cases {
            let msg = parse(&block.replace(from, to)).unwrap_err().to_string();
            assert!(msg.contains(what) && msg.contains(line), "{to}: {msg}");
            assert!(!msg.contains("did not match"), "{to}: {msg}");
        }
        let c = parse(&block.replace("resolution: 0.05", "resolution: [1, 0.5]")).unwrap();
        assert_eq!(c.grid().resolution.unwrap().xy(), (1.0, 0.5));
        assert_eq!(parse(&block.replace("0.05", "2")).unwrap().grid().resolution.unwrap().xy(), (2.0, 2.0));
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let cases = [
            (BASE.replace("[-10.0, 50.0, 2.0, 58.0]", "[2.0, 50.0, -10.0, 58.0]"), "grid.bbox"),
            (BASE.replace("resolution: 0.05", "resolution: -1"), "grid.resolution"),
            (BASE.replace("batch: 256 }", "batch: 256, tile: [10, 10] }"), "layout.tile"),
            (BASE.replace("batch: 256 }", "batch: 256, tile: [4294967296, 4294967296] }"), "layout.tile"),
            (
                BASE.replace("kind: categorical,", "kind: categorical, resampling: bilinear,"),
                "variables.lc.resampling",
            ),
            (
                BASE.replace("kind: categorical,", "kind: categorical, aggregation: mean,"),
                "variables.lc.aggregation`: `mean` invents classes",
            ),
            (BASE.replace("EPSG", "x").replace("grid: {", "grid: { crs: EPSG:3857,"), "grid.crs"),
            (BASE.replace("step: 1h }", "step: 1h, from: t2m }"), "time"),
            (BASE.replace("output: out.zarr", "output: ~"), "output"),
            (BASE.replace("output: out.zarr", "output: ''"), "output"),
            (
                format!("{BASE}compression: {{ codec: none, level: 99 }}\n"),
                "compression.level`: 99: `codec: none`",
            ),
            // YAML's other nulls, and URLs of other stores: they made local directories `Null`, `gs:`.
            (
                BASE.replace("output: out.zarr", "output: Null"),
                "output`: the cube's path (or s3:// URL) is missing",
            ),
            (BASE.replace("output: out.zarr", "output: gs://b/o.zarr"), "`gs:` URLs are not supported"),
            (BASE.replace("output: out.zarr", "output: ~/o.zarr"), "`~` is not expanded here"),
            (
                BASE.replace("output: out.zarr", "output: file:///tmp/o.zarr"),
                "`file:` URLs are not supported",
            ),
            (BASE.replace("output: out.zarr", "output: S3://b/o.zarr"), "written s3://BUCKET/PREFIX"),
            (BASE.replace("output: out.zarr", "output: s3:/b/o.zarr"), "written s3://BUCKET/PREFIX"),
        ];
        for (text, key) in cases {
            let msg = parse(&text).unwrap_err().to_string();
            assert!(msg.contains(key), "{key}: {msg}");
        }
    }

    #[test]
    fn xcube_aliases() {
        let text = "output_path: out.zarr
output_region: [-10.0, 50.0, 2.0, 58.0]
output_size: [240, 160]
output_metadata: { title: demo }
output_resampling: average
layout: { kind: pixel_series, batch: 64 }
variables:
  t2m: { path: era5.grib }
";
        let c = parse(text).unwrap();
        assert_eq!(c.output, PathBuf::from("out.zarr"));
        assert_eq!(c.grid().size, Some([240, 160]));
        assert_eq!(c.metadata["title"], "demo");
        assert_eq!(c.variables.0[0].1.resampling, Some(Resampling::Average));
        // Errors name the xcube keys given, not the `grid` they stand for.
        let error = |from: &str, to: &str| parse(&text.replace(from, to)).unwrap_err().to_string();
        let both = error("output_size: [240, 160]", "output_size: [240, 160]\noutput_spatial_res: 0.05");
        assert!(both.contains("`output_size`") && both.contains("`output_spatial_res`"), "{both}");
        assert!(!both.contains("grid"), "{both}");
        let region = error("[-10.0, 50.0, 2.0, 58.0]", "[2.0, 50.0, -10.0, 58.0]");
        assert!(region.starts_with("config key `output_region`"), "{region}");
        let size = error("[240, 160]", "[0, 160]");
        assert!(size.starts_with("config key `output_size`"), "{size}");
        // xcube's own configs name resamplings capitalized (`Nearest`, `CubicSpline`, `Median`); they were
        // refused. Names are taken in any case, codecs too.
        for (name, resampling) in [
            ("Nearest", Resampling::Nearest),
            ("CubicSpline", Resampling::Cubicspline),
            ("Median", Resampling::Med),
        ] {
            let c = parse(&text.replace("average", name)).unwrap();
            assert_eq!(c.variables.0[0].1.resampling, Some(resampling), "{name}");
        }
        let unknown = error("average", "Smooth");
        assert!(unknown.contains("unknown variant `Smooth`, expected one of `nearest`"), "{unknown}");
        let zstd = parse(&format!("{BASE}compression: {{ codec: ZSTD, level: 5 }}\n")).unwrap();
        assert_eq!(zstd.compression.codec, Codec::Zstd);
    }

    #[test]
    fn metadata_keys_without_a_value_or_given_twice_are_errors() {
        let with = |metadata: &str| parse(&format!("{BASE}metadata: {metadata}\n"));
        assert_eq!(with("{ title: \"NDVI, 2015-2017\" }").unwrap().metadata["title"], "NDVI, 2015-2017");
        let comma = with("{ title: NDVI, 2015-2017 }").unwrap_err().to_string();
        assert!(comma.contains("`metadata.2015-2017`") && comma.contains("quote"), "{comma}");
        let twice = with("{ title: a, title: b }").unwrap_err().to_string();
        assert!(twice.contains("`title` is given twice"), "{twice}");
    }

    #[test]
    fn duplicate_variable_is_an_error() {
        let text = BASE.replace("  lc: { path: lc.tif", "  t2m: { path: lc.tif");
        assert!(parse(&text).unwrap_err().to_string().contains("t2m"));
    }

    /// A key given twice is placed at its repeat (`serde_yaml` places it at the start of the mapping, or, at
    /// the top level, nowhere).
    #[test]
    fn a_repeated_key_names_the_line_of_its_repeat() {
        let text = BASE.replace("  lc: { path: lc.tif", "  t2m: { path: lc.tif");
        let message = parse(&text).unwrap_err().to_string();
        assert!(message.contains("variable `t2m` is defined twice, again at line 7"), "{message}");
        let message =
            parse(&format!("{BASE}grid: {{ bbox: [0, 0, 1, 1], resolution: 1 }}\n")).unwrap_err().to_string();
        assert!(message.contains("duplicate field `grid`, again at line 8"), "{message}");
        let block = BASE.replace(
            "  lc: { path: lc.tif, kind: categorical, static: true }",
            "  lc:\n    path: lc.tif\n    kind: categorical\n    static: true\n    kind: continuous",
        );
        let message = parse(&block).unwrap_err().to_string();
        assert!(message.contains("duplicate field `kind`, again at line 11"), "{message}");
    }

    /// YAML merge keys give a mapping the keys of others, its own winning, wherever they are (a variable, the
    /// variables, `metadata`), through chains of anchors and lists of them: the config is the one spelled
    /// out, plain scalars read as they are without merges. An error inside a merged mapping names its key by
    /// path; one where no merge is involved keeps its line.
    #[test]
    fn merge_keys_are_applied() {
        let (head, _) = BASE.split_once("variables:").unwrap();
        let same = |merged: &str, spelled: &str| {
            let want = parse(&format!("{head}{spelled}")).unwrap();
            let got = parse(&format!("{head}{merged}")).unwrap_or_else(|e| panic!("{merged}: {e}"));
            assert_eq!(format!("{got:?}"), format!("{want:?}"), "{merged}");
        };
        same(
            "variables:
  t2m: &hourly { path: era5.grib, resampling: bilinear, aggregation: mean, units: 1 }
  d2m: { <<: *hourly, path: d2m.grib, aggregation: max }
  lc: { path: lc.tif, kind: categorical, static: true }
",
            "variables:
  t2m: { path: era5.grib, resampling: bilinear, aggregation: mean, units: 1 }
  d2m: { path: d2m.grib, resampling: bilinear, aggregation: max, units: 1 }
  lc: { path: lc.tif, kind: categorical, static: true }
",
        );
        // A chain of anchors, a list of them (the earlier wins), and merged variables in the place of `<<`.
        same(
            "variables:
  t2m: &a { path: era5.grib, resampling: bilinear }
  t2m_k: &b { <<: *a, units: K }
  t2m_max: { <<: *b, aggregation: max }
  d2m: { <<: [{ aggregation: min, units: C }, *b], path: d2m.grib }
",
            "variables:
  t2m: { path: era5.grib, resampling: bilinear }
  t2m_k: { path: era5.grib, resampling: bilinear, units: K }
  t2m_max: { path: era5.grib, resampling: bilinear, units: K, aggregation: max }
  d2m: { aggregation: min, units: C, path: d2m.grib, resampling: bilinear }
",
        );
        same(
            "variables:
  <<: { t2m: { path: era5.grib }, d2m: { path: d2m.grib } }
  lc: { path: lc.tif, kind: categorical, static: true }
",
            "variables:
  t2m: { path: era5.grib }
  d2m: { path: d2m.grib }
  lc: { path: lc.tif, kind: categorical, static: true }
",
        );
        // Metadata takes any key: its merge key was a key like the others.
        let vars = "variables:\n  t2m: { path: era5.grib }\n";
        same(
            &format!("metadata: {{ <<: {{ license: CC-BY-4.0, title: X }}, title: T }}\n{vars}"),
            &format!("metadata: {{ license: CC-BY-4.0, title: T }}\n{vars}"),
        );

        let wrong = "variables:\n  t2m: &a { path: era5.grib }\n  d2m: { <<: *a, aggregation: maximum }\n";
        let message = parse(&format!("{head}{wrong}")).unwrap_err().to_string();
        assert!(message.contains("variables.d2m.aggregation") && message.contains("maximum"), "{message}");
        assert!(message.contains("with the merge keys applied") && !message.contains(" line "), "{message}");
        let elsewhere =
            format!("{}{wrong}", head.replace("batch: 256", "batch: many")).replace("maximum", "max");
        let message = parse(&elsewhere).unwrap_err().to_string();
        assert!(message.contains("layout.batch") && message.contains("line 4"), "{message}");
        let twice = "variables:\n  t2m: &a { path: era5.grib }\n  d2m: { <<: *a }\n  t2m: { path: x.grib }\n";
        let message = parse(&format!("{head}{twice}")).unwrap_err().to_string();
        assert!(message.contains("key \"t2m\", again at line 8"), "{message}");
    }

    #[test]
    fn shard_forms() {
        for (s, want) in [
            ("auto", ShardConfig::Named(ShardMode::Auto)),
            ("none", ShardConfig::Named(ShardMode::None)),
            ("4", ShardConfig::Batches(4)),
        ] {
            let c = parse(&BASE.replace("batch: 256 }", &format!("batch: 256, shard: {s} }}"))).unwrap();
            let LayoutConfig::PixelSeries { shard, .. } = c.layout else { panic!() };
            assert_eq!(shard, want);
        }
    }
}
