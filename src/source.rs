//! Sources: what a variable's input files hold, as GDAL sees them, with the traps of real files handled.
//!
//! [`Source::probe`] opens every file of a variable once, up front, and records what generation needs: the
//! time of every band (CF time in `NetCDF`, `GRIB_VALID_TIME` in GRIB, a date in the file name otherwise),
//! packing (`scale_factor`/`add_offset`), nodata, and a georeferencing GDAL's warper can use. Where GDAL
//! misses the georeferencing (CF x/y variables without `standard_name` give an identity geotransform), it is
//! rebuilt from the CF coordinate variables; where nothing usable exists, probing fails with a message that
//! names the file. Nothing is ever guessed silently: an assumed CRS is recorded in the cube's provenance.
//!
//! [`warp`] then reads windows of those files onto the target grid with GDAL's warper.

mod name_date;
pub mod warp;

pub use name_date::{NAME_DATE_FORMS, time_from_file_name};

use std::fmt::Write;
use std::path::{Path, PathBuf};

use gdal::Metadata;
use gdal::cpl::CslStringList;
use gdal::raster::GdalDataType;
use gdal::{Dataset, DatasetOptions, GdalOpenFlags};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Aggregation, VariableConfig, VariableKind};
use crate::time::{self, CfTime, Instant};

/// A source error: always names the file (and variable) at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// No file matches the path or pattern.
    #[error("variable `{variable}`: no file matches `{pattern}`")]
    NoFiles {
        /// The cube variable.
        variable: String,
        /// The configured path.
        pattern: String,
    },
    /// GDAL cannot open or read the file.
    #[error("{path}: {message}")]
    Gdal {
        /// The file.
        path: PathBuf,
        /// GDAL's message.
        message: String,
    },
    /// The file is readable but unusable as configured.
    #[error("{path}: {message}")]
    Unusable {
        /// The file.
        path: PathBuf,
        /// What is wrong, and what to do about it.
        message: String,
    },
    /// The config does not fit the file (a variable or band it does not have, or none chosen where it has
    /// several): the config is at fault (exit code 2).
    #[error("config key `{key}`: {path}: {message}")]
    Misconfigured {
        /// The config key (`variables.NAME.variable` or `.band`).
        key: String,
        /// The file.
        path: PathBuf,
        /// What the file has instead.
        message: String,
    },
    /// Reading the file for hashing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl SourceError {
    /// Whether the configuration is at fault (exit code 2) rather than the file (1).
    #[must_use]
    pub fn is_usage(&self) -> bool {
        matches!(self, SourceError::Misconfigured { .. })
    }

    fn misconfigured(name: &str, key: &str, path: &Path, message: impl Into<String>) -> Self {
        SourceError::Misconfigured {
            key: format!("variables.{name}.{key}"),
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    fn unusable(path: &Path, message: impl Into<String>) -> Self {
        SourceError::Unusable { path: path.to_path_buf(), message: message.into() }
    }
    fn gdal(path: &Path, err: &gdal::errors::GdalError) -> Self {
        SourceError::Gdal { path: path.to_path_buf(), message: err.to_string() }
    }
}

/// An input file, for provenance: what was read, how big, and its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// The path as configured (glob expanded).
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Hex SHA-256 of the content.
    pub sha256: String,
}

/// How GDAL's warper locates the pixels of one file.
#[derive(Debug, Clone, PartialEq)]
pub enum Georef {
    /// An affine geotransform in a CRS.
    Transform {
        /// GDAL geotransform.
        geotransform: [f64; 6],
        /// CRS as WKT.
        wkt: String,
        /// Longitude copies to add, in cells: a lon/lat grid reaching past 180°E is mosaicked with itself
        /// shifted by −360° so that targets west of Greenwich find their data.
        wrap_cols: Option<usize>,
    },
    /// Per-pixel longitude/latitude arrays (curvilinear grids): GDAL's geolocation transformer.
    Geolocation {
        /// The file's `GEOLOCATION` metadata domain.
        metadata: Vec<(String, String)>,
    },
}

/// One file of a source as GDAL opens it.
#[derive(Debug, Clone)]
pub struct FileView {
    /// The path of the file.
    pub path: PathBuf,
    /// What to pass to GDAL to open it (a subdataset name for a `NetCDF` variable).
    pub gdal_name: String,
    /// Raster size `(width, height)`.
    pub size: (usize, usize),
    /// Georeferencing.
    pub georef: Georef,
    /// Cell size in degrees as GDAL sees it in lon/lat: fixes the warper's resampling scale.
    pub native_res: (f64, f64),
    /// Signed bytes (an `int8` `GeoTIFF`, a `NetCDF` `byte`), which GDAL before 3.7 gives as unsigned bytes
    /// with the tag `PIXELTYPE=SIGNEDBYTE`: read back into −128…127 (the source's type is then Int16).
    pub signed_bytes: bool,
}

impl FileView {
    /// Whether `other` has the same pixels on Earth (size, georeferencing, native cell size): the bands of
    /// such files can be warped together, with one coordinate transformation.
    #[must_use]
    pub fn same_grid(&self, other: &FileView) -> bool {
        self.size == other.size && self.georef == other.georef && self.native_res == other.native_res
    }
}

/// One source time step: a band of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceStep {
    /// Index into [`Source::files`].
    pub file: usize,
    /// 1-based band.
    pub band: usize,
    /// Valid time, when the source has one.
    pub time: Option<Instant>,
}

/// Everything generation needs to know about one variable's inputs.
#[derive(Debug, Clone)]
pub struct Source {
    /// Files, in order.
    pub files: Vec<FileView>,
    /// Provenance of the files (same order).
    pub provenance: Vec<SourceFile>,
    /// What the file system said of each file (same order) as it was hashed.
    pub stamps: Vec<FileStamp>,
    /// Steps (bands) in file order; all have a time, or the source is static.
    pub steps: Vec<SourceStep>,
    /// Sample type of the stored values.
    pub data_type: GdalDataType,
    /// Stored value meaning "missing", after the config's override.
    pub nodata: Option<f64>,
    /// A second stored value meaning "missing" that GDAL does not mask: a `NetCDF` `missing_value` beside a
    /// different `_FillValue` (xarray masks both). None when the config sets `nodata:`.
    pub missing_value: Option<f64>,
    /// Unpacking: physical = stored × scale + offset.
    pub scale: f64,
    /// Unpacking offset.
    pub offset: f64,
    /// Units as the file states them.
    pub units: Option<String>,
    /// Things a user should know that were decided for them (an assumed CRS, ...).
    pub notes: Vec<String>,
}

impl Source {
    /// Whether every step carries a time.
    #[must_use]
    pub fn has_time(&self) -> bool {
        !self.steps.is_empty() && self.steps.iter().all(|s| s.time.is_some())
    }

    /// Opens and inspects every file of variable `name`.
    ///
    /// # Errors
    /// [`SourceError`] naming the file: missing, unreadable, unknown variable or band, no usable
    /// georeferencing, a time axis that is not CF time, files of one variable that disagree.
    pub fn probe(name: &str, config: &VariableConfig) -> Result<Source, SourceError> {
        init_gdal();
        let paths = expand_paths(name, &config.path)?;
        let mut files = Vec::new();
        let mut provenance = Vec::new();
        let mut stamps = Vec::new();
        let mut steps = Vec::new();
        let mut first: Option<BandInfo> = None;
        let mut notes = Vec::new();
        for (index, path) in paths.iter().enumerate() {
            let (view, file_steps, band_info, note) = probe_file(name, path, config)?;
            if let Some(note) = note
                && !notes.contains(&note)
            {
                notes.push(note);
            }
            match &first {
                None => first = Some(band_info.clone()),
                Some(f)
                    if f.data_type != band_info.data_type
                        || f.scale != band_info.scale
                        || f.offset != band_info.offset =>
                {
                    return Err(SourceError::unusable(
                        path,
                        format!(
                            "its data type or packing differs from {} (all files of variable `{name}` must agree)",
                            paths[0].display()
                        ),
                    ));
                }
                // The warp masks one nodata value for all the files: another one's would pass as data.
                Some(f)
                    if !same_nodata(f.nodata, band_info.nodata)
                        || !same_nodata(f.missing_value, band_info.missing_value) =>
                {
                    let show = |b: &BandInfo| {
                        let one = |n: Option<f64>| n.map_or_else(|| "none".to_string(), |n| n.to_string());
                        match b.missing_value {
                            Some(m) => format!("{}, missing_value {m}", one(b.nodata)),
                            None => one(b.nodata),
                        }
                    };
                    return Err(SourceError::unusable(
                        path,
                        format!(
                            "its nodata ({}) differs from that of {} ({}): all files of variable `{name}` must \
                             agree, or `nodata:` in its config sets one for all",
                            show(&band_info),
                            paths[0].display(),
                            show(f)
                        ),
                    ));
                }
                Some(_) => {}
            }
            steps.extend(file_steps.into_iter().map(|(band, time)| SourceStep { file: index, band, time }));
            files.push(view);
            let (file, stamp) = file_provenance(path)?;
            provenance.push(file);
            stamps.push(stamp);
        }
        let BandInfo { data_type, nodata, missing_value, scale, offset, units } =
            first.expect("at least one file");
        // Named by a file without a time (one not dated by its name, in a series of dated files).
        if steps.iter().any(|s| s.time.is_some())
            && let Some(untimed) = steps.iter().find(|s| s.time.is_none())
        {
            return Err(SourceError::unusable(
                &files[untimed.file].path,
                format!(
                    "has no time (no time axis, no date in its name) while other files of variable `{name}` \
                     have one: remove it from the series, or date it (names are read as {NAME_DATE_FORMS})"
                ),
            ));
        }
        if let Some(note) = check_files_apart(name, config, &files, &steps)? {
            notes.push(note);
        }
        Ok(Source {
            files,
            provenance,
            stamps,
            steps,
            data_type,
            nodata,
            missing_value,
            scale,
            offset,
            units,
            notes,
        })
    }

    /// Instants of all steps (empty when static).
    #[must_use]
    pub fn instants(&self) -> Vec<Instant> {
        self.steps.iter().filter_map(|s| s.time).collect()
    }
}

/// Registers GDAL's drivers once and keeps its own printing quiet: GDAL's warnings (e.g. the GRIB reader's
/// "Ran out of file reading SECT0" at a file's end) would drown the progress bar; failures reach the user
/// through the errors of the calls that failed. `CUBELOAD_GDAL_LOG=1` shows them all.
pub fn init_gdal() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        gdal::DriverManager::register_all();
        // ERA5 GRIB files label Kelvin values "[C]" when GDAL normalizes units; keep the file's own label.
        let _ = gdal::config::set_config_option("GRIB_NORMALIZE_UNITS", "NO");
        let verbose = std::env::var_os("CUBELOAD_GDAL_LOG").is_some();
        if !verbose {
            quiet_hdf5_in_this_thread();
        }
        gdal::config::set_error_handler(move |kind, _, message| {
            if verbose {
                eprintln!("GDAL {kind:?}: {message}");
            }
        });
    });
}

/// Turns off HDF5's automatic error printing in the calling thread.
///
/// netCDF-C disables it, but HDF5 keeps that setting per thread: in our worker threads every probe of an
/// optional attribute (`_QuantizeBitRoundNumberOfSignificantBits`, ...) of a NetCDF-4 file would print a
/// dozen lines of "HDF5-DIAG" to stderr. HDF5 is reached through GDAL, so the symbol is looked up at run time;
/// without HDF5 loaded this does nothing.
pub fn quiet_hdf5_in_this_thread() {
    type SetAuto = unsafe extern "C" fn(i64, *const libc::c_void, *const libc::c_void) -> i32;
    // SAFETY: dlsym with RTLD_DEFAULT only looks a symbol up. When found, H5Eset_auto2 has the C signature
    // herr_t H5Eset_auto2(hid_t estack_id, H5E_auto2_t func, void *client_data), hid_t being int64_t since
    // HDF5 1.10; H5E_DEFAULT is 0 and a NULL func disables printing.
    unsafe {
        let symbol = libc::dlsym(libc::RTLD_DEFAULT, c"H5Eset_auto2".as_ptr());
        if !symbol.is_null() {
            let set_auto: SetAuto = std::mem::transmute(symbol);
            set_auto(0, std::ptr::null(), std::ptr::null());
        }
    }
}

/// Expands a path or glob pattern into sorted existing files.
fn expand_paths(name: &str, pattern: &str) -> Result<Vec<PathBuf>, SourceError> {
    let is_glob = pattern.contains(['*', '?', '[']);
    let mut paths: Vec<PathBuf> = if is_glob {
        let matches = glob::glob(pattern).map_err(|e| SourceError::Unusable {
            path: PathBuf::from(pattern),
            message: format!("variable `{name}`: bad glob pattern: {e}"),
        })?;
        // A directory the pattern reaches but cannot read would leave its files out without a word.
        let mut files = Vec::new();
        for found in matches {
            let path = found.map_err(|e| SourceError::Unusable {
                path: e.path().to_path_buf(),
                message: format!(
                    "variable `{name}`: cannot read this directory of `{pattern}`: {}",
                    e.error()
                ),
            })?;
            if path.is_file() {
                files.push(path);
            }
        }
        files
    } else {
        let path = PathBuf::from(pattern);
        if !path.exists() {
            return Err(SourceError::Unusable { path, message: format!("variable `{name}`: no such file") });
        }
        if path.is_dir() {
            let message = format!(
                "variable `{name}`: a directory, not a file (a glob such as `{pattern}/*.tif` reads its files)"
            );
            return Err(SourceError::Unusable { path, message });
        }
        vec![path]
    };
    paths.sort();
    if paths.is_empty() {
        return Err(SourceError::NoFiles { variable: name.to_string(), pattern: pattern.to_string() });
    }
    Ok(paths)
}

/// A file as the file system describes it (device, inode, size, modification and status change times): a
/// file replaced or written to has another. The status change time (`ctime`) catches a write whose
/// modification time was put back (`touch -r`, `os.utime`), which no one can set back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
    changed: (i64, i64),
}

impl FileStamp {
    fn of(metadata: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: metadata.dev(),
            ino: metadata.ino(),
            len: metadata.len(),
            modified: metadata.modified().ok(),
            changed: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

impl SourceFile {
    /// Whether the file at this path now holds other content than when it was hashed (stamped `stamp`): its
    /// stamp differs and so does its hash (a file only touched holds the same).
    ///
    /// # Errors
    /// [`SourceError::Io`] when the file cannot be read.
    pub fn changed_since(&self, stamp: &FileStamp) -> Result<bool, SourceError> {
        let now = std::fs::metadata(&self.path)
            .map_err(|source| SourceError::Io { path: self.path.clone(), source })?;
        if FileStamp::of(&now) == *stamp {
            return Ok(false);
        }
        Ok(file_provenance(&self.path)?.0 != *self)
    }
}

fn file_provenance(path: &Path) -> Result<(SourceFile, FileStamp), SourceError> {
    use std::io::Read;
    let io = |source| SourceError::Io { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let stamp = FileStamp::of(&file.metadata().map_err(io)?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    let sha256 = hasher.finalize().iter().fold(String::new(), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    });
    Ok((SourceFile { path: path.to_path_buf(), size, sha256 }, stamp))
}

/// How the values of a file's band are stored: what [`Source`] holds for all the files of a variable.
#[derive(Debug, Clone)]
struct BandInfo {
    data_type: GdalDataType,
    nodata: Option<f64>,
    missing_value: Option<f64>,
    scale: f64,
    offset: f64,
    units: Option<String>,
}

/// Nodata values that mark the same cells (NaN marks NaN).
fn same_nodata(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b || (a.is_nan() && b.is_nan()),
        (a, b) => a.is_none() && b.is_none(),
    }
}

/// What [`probe_file`] learns about one file: its view, its steps (band, time), its band info and a note.
type FileProbe = (FileView, Vec<(usize, Option<Instant>)>, BandInfo, Option<String>);

/// Opens a file, selects the variable, and reads its steps, band info and georeferencing.
fn probe_file(name: &str, path: &Path, config: &VariableConfig) -> Result<FileProbe, SourceError> {
    check_classic_netcdf_length(path)?;
    let container = open(name, path, path.to_string_lossy().as_ref())?;
    let gdal_name = select_variable(name, path, &container, config.variable.as_deref())?;
    let dataset = if gdal_name == path.to_string_lossy() { container } else { open(name, path, &gdal_name)? };
    let count = dataset.raster_count();
    if count == 0 {
        return Err(SourceError::unusable(path, "has no raster bands"));
    }
    if let Some(band) = config.band
        && band > count
    {
        return Err(SourceError::misconfigured(
            name,
            "band",
            path,
            format!("band {band} requested, the file has {count}"),
        ));
    }
    // The band chosen, or band 1 for all the bands of a time series.
    let signed_bytes;
    let info = {
        let band = dataset.rasterband(config.band.unwrap_or(1)).map_err(|e| SourceError::gdal(path, &e))?;
        let mut data_type = band.band_type();
        if matches!(data_type, GdalDataType::Unknown) {
            return Err(SourceError::unusable(path, "has a complex or unknown data type"));
        }
        signed_bytes = data_type == GdalDataType::UInt8
            && band.metadata_item("PIXELTYPE", "IMAGE_STRUCTURE").as_deref() == Some("SIGNEDBYTE");
        if signed_bytes {
            data_type = GdalDataType::Int16;
        }
        let nodata = config.nodata.or_else(|| band.no_data_value());
        let missing_value = band
            .metadata_item("missing_value", "")
            .and_then(|m| m.trim().parse::<f64>().ok())
            .filter(|&m| config.nodata.is_none() && !same_nodata(nodata, Some(m)));
        BandInfo {
            data_type,
            nodata: nodata.or(missing_value),
            missing_value: missing_value.filter(|_| nodata.is_some()),
            scale: band.scale().unwrap_or(1.0),
            offset: band.offset().unwrap_or(0.0),
            units: Some(band.unit()).filter(|u| !u.is_empty()).or_else(|| grib_units(&band)),
        }
    };

    let steps = if config.is_static {
        // A static variable is one band: the first of several would be taken for the whole map silently.
        let band = one_band(name, path, config.band, count, |n| {
            format!(
                "has {n} bands (time steps, levels or channels) and a static variable is one map: choose its \
                 band with `band:`"
            )
        })?;
        vec![(band, None)]
    } else {
        let times = band_times(name, path, &dataset)?;
        match (times, config.band) {
            (Some(times), None) => times.into_iter().enumerate().map(|(i, t)| (i + 1, Some(t))).collect(),
            (Some(times), Some(band)) => vec![(band, Some(times[band - 1]))],
            (None, band) => {
                let band = one_band(name, path, band, count, |n| {
                    format!(
                        "has {n} bands and no time axis (no CF time, no GRIB valid time); choose one with \
                         `band:` (and mark the variable `static: true` if it is a map without time)"
                    )
                })?;
                vec![(band, path.file_stem().and_then(|stem| time_from_file_name(&stem.to_string_lossy())))]
            }
        }
    };
    let (georef, note) = georeference(name, path, &dataset, config.crs.as_deref())?;
    let mut view = FileView {
        path: path.to_path_buf(),
        gdal_name,
        size: dataset.raster_size(),
        georef,
        native_res: (0.0, 0.0),
        signed_bytes,
    };
    view.native_res = warp::native_resolution(&view, info.data_type, info.nodata)?;
    Ok((view, steps, info, note))
}

/// Opens `gdal_name` (the file at `path`, or a subdataset of it) for variable `variable`.
fn open(variable: &str, path: &Path, gdal_name: &str) -> Result<Dataset, SourceError> {
    Dataset::open_ex(
        gdal_name,
        DatasetOptions {
            open_flags: GdalOpenFlags::GDAL_OF_RASTER | GdalOpenFlags::GDAL_OF_READONLY,
            ..Default::default()
        },
    )
    .map_err(|e| {
        // GDAL's own message, where it gave one (often none: "… returned a NULL pointer. Error msg: ''").
        let detail = e.to_string();
        let detail = if detail.ends_with("Error msg: ''") { String::new() } else { format!(" ({detail})") };
        SourceError::Unusable {
            path: path.to_path_buf(),
            message: if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
                format!("variable `{variable}`: is empty")
            } else {
                format!("variable `{variable}`: GDAL cannot read it as a raster{detail}")
            },
        }
    })
}

/// Picks the subdataset for `variable`, or checks that the file is a single raster.
fn select_variable(
    name: &str,
    path: &Path,
    dataset: &Dataset,
    variable: Option<&str>,
) -> Result<String, SourceError> {
    let subdatasets: Vec<String> = dataset
        .metadata_domain("SUBDATASETS")
        .unwrap_or_default()
        .into_iter()
        .filter_map(|item| {
            let (key, value) = item.split_once('=')?;
            key.ends_with("_NAME").then(|| value.to_string())
        })
        .collect();
    let short = |s: &str| s.rsplit(':').next().unwrap_or(s).trim_matches('"').to_string();
    let own_name = path.to_string_lossy().to_string();
    match variable {
        Some(var) => {
            if let Some(found) = subdatasets.iter().find(|s| short(s) == var) {
                return Ok(found.clone());
            }
            // A single-variable NetCDF opens directly; check that it is the requested one.
            if subdatasets.is_empty() && dataset.raster_count() > 0 {
                let band = dataset.rasterband(1).map_err(|e| SourceError::gdal(path, &e))?;
                let driver = dataset.driver().short_name();
                // A GeoTIFF or GRIB file names no variable: one given for it was ignored without a word.
                if !["netCDF", "HDF5", "HDF5Image", "HDF4", "HDF4Image", "Zarr"].contains(&driver.as_str()) {
                    return Err(SourceError::misconfigured(
                        name,
                        "variable",
                        path,
                        format!(
                            "`{var}` names a variable of a NetCDF or HDF file; this {driver} file is one raster \
                             of bands: leave `variable` out (`band:` picks a band)"
                        ),
                    ));
                }
                if band.metadata_item("NETCDF_VARNAME", "").is_none_or(|v| v == var) {
                    return Ok(own_name);
                }
            }
            let names: Vec<String> = subdatasets.iter().map(|s| short(s)).collect();
            Err(SourceError::misconfigured(
                name,
                "variable",
                path,
                if names.is_empty() {
                    format!("has no variable `{var}`")
                } else {
                    format!("has no variable `{var}`; it has: {}", names.join(", "))
                },
            ))
        }
        None if dataset.raster_count() == 0 && !subdatasets.is_empty() => {
            let names: Vec<String> = subdatasets.iter().map(|s| short(s)).collect();
            Err(SourceError::misconfigured(
                name,
                "variable",
                path,
                format!("holds several variables; choose one with `variable:` ({})", names.join(", ")),
            ))
        }
        None => Ok(own_name),
    }
}

fn grib_units(band: &gdal::raster::RasterBand) -> Option<String> {
    band.metadata_item("GRIB_UNIT", "")
        .map(|u| u.trim_matches(['[', ']']).to_string())
        .filter(|u| !u.is_empty())
}

/// The band of a variable read as one map: the configured one, or the file's only band; with several and
/// none configured, an error on `variables.NAME.band` saying why (`why` of the band count).
fn one_band(
    name: &str,
    path: &Path,
    band: Option<usize>,
    count: usize,
    why: impl Fn(usize) -> String,
) -> Result<usize, SourceError> {
    match (band, count) {
        (Some(band), _) => Ok(band),
        (None, 1) => Ok(1),
        (None, n) => Err(SourceError::misconfigured(name, "band", path, why(n))),
    }
}

/// Times of all bands, when the file has a time axis: CF time in `NetCDF`, valid time in GRIB.
fn band_times(name: &str, path: &Path, dataset: &Dataset) -> Result<Option<Vec<Instant>>, SourceError> {
    let count = dataset.raster_count();
    let band_item = |i: usize, key: &str| -> Result<Option<String>, SourceError> {
        let band = dataset.rasterband(i).map_err(|e| SourceError::gdal(path, &e))?;
        Ok(band.metadata_item(key, ""))
    };
    // GRIB: epoch seconds per band (older GDALs append " sec UTC").
    if band_item(1, "GRIB_VALID_TIME")?.is_some() {
        let mut times = Vec::with_capacity(count);
        for i in 1..=count {
            let text = band_item(i, "GRIB_VALID_TIME")?.unwrap_or_default();
            let secs: i64 = text.split_whitespace().next().and_then(|s| s.parse().ok()).ok_or_else(|| {
                SourceError::unusable(path, format!("band {i}: cannot read GRIB_VALID_TIME `{text}`"))
            })?;
            times.push(secs);
        }
        return Ok(Some(times));
    }
    // NetCDF: the extra (non-spatial) dimensions; exactly one, and a CF time.
    let Some(extra) = dataset.metadata_item("NETCDF_DIM_EXTRA", "") else { return Ok(None) };
    let dims: Vec<&str> =
        extra.trim_matches(['{', '}']).split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    let [dim] = dims.as_slice() else {
        return Err(SourceError::misconfigured(
            name,
            "band",
            path,
            format!(
                "has {} non-spatial dimensions ({}); cubeload reads one time dimension: pick one band with \
                 `band:` and mark the variable `static: true`",
                dims.len(),
                dims.join(", ")
            ),
        ));
    };
    let units = dataset.metadata_item(&format!("{dim}#units"), "").unwrap_or_default();
    let calendar = dataset.metadata_item(&format!("{dim}#calendar"), "");
    let cf = CfTime::parse(&units, calendar.as_deref()).map_err(|e| {
        let message = match e {
            // A time axis all the same, in a calendar the cube cannot place its dates in.
            time::TimeError::UnsupportedCalendar(_) => format!("time dimension `{dim}`: {e}"),
            _ => format!(
                "dimension `{dim}` is not a CF time axis (units `{units}`: {e}); \
                 for one map of it, mark the variable `static: true` and pick its band with `band:`"
            ),
        };
        SourceError::unusable(path, message)
    })?;
    let mut times = Vec::with_capacity(count);
    for i in 1..=count {
        let text = band_item(i, &format!("NETCDF_DIM_{dim}"))?.unwrap_or_default();
        let value: f64 = text
            .trim()
            .parse()
            .map_err(|_| SourceError::unusable(path, format!("band {i}: cannot read time value `{text}`")))?;
        times.push(cf.to_instant(value).map_err(|e| SourceError::unusable(path, format!("band {i}: {e}")))?);
    }
    Ok(Some(times))
}

/// Files of variable `name` that the cube cannot tell apart. Two on one grid without any time, for a
/// variable not declared static, are refused: a static map would show the first and hide the other. Two on
/// one grid with one time are combined into one step by the variable's aggregation (as Terra's and Aqua's
/// product of a day may be meant to be), which the returned note says, naming them, since it is also what
/// times of day written as cubeload does not read them come to. Files of one time on different grids are
/// the tiles of one date, and undated files on different grids the tiles of one map.
fn check_files_apart(
    name: &str,
    config: &VariableConfig,
    files: &[FileView],
    steps: &[SourceStep],
) -> Result<Option<String>, SourceError> {
    let declared_static = config.is_static;
    let mut dated: Vec<(Option<Instant>, usize)> = steps.iter().map(|s| (s.time, s.file)).collect();
    dated.sort_unstable();
    dated.dedup();
    let mut shared: Vec<(Instant, usize, usize)> = Vec::new();
    for group in dated.chunk_by(|a, b| a.0 == b.0) {
        for (k, &(time, first)) in group.iter().enumerate() {
            let Some(&(_, second)) = group[k + 1..].iter().find(|(_, f)| files[*f].same_grid(&files[first]))
            else {
                continue;
            };
            match time {
                Some(t) => shared.push((t, first, second)),
                None if declared_static => {}
                None => {
                    // The config's to change (`static: true`, or a path that matches dated files): exit 2.
                    return Err(SourceError::misconfigured(
                        name,
                        "path",
                        &files[second].path,
                        format!(
                            "has no time, nor has {} (no time axis, no date in their names as cubeload reads \
                             them: {NAME_DATE_FORMS}), and the two share one grid: variable `{name}` would be \
                             one static map showing the first. Date the files, or declare `static: true` to \
                             take the first",
                            files[first].path.display()
                        ),
                    ));
                }
            }
        }
    }
    let categorical = config.kind == VariableKind::Categorical;
    let combined = match config.aggregation.unwrap_or(if categorical {
        Aggregation::Nearest
    } else {
        Aggregation::Mean
    }) {
        Aggregation::Mean => "their mean (aggregation: mean)",
        Aggregation::Sum => "their sum (aggregation: sum)",
        Aggregation::Min => "the smaller value (aggregation: min)",
        Aggregation::Max => "the larger value (aggregation: max)",
        Aggregation::Nearest => "the first one's value where it has one (aggregation: nearest)",
    };
    Ok(shared.first().map(|&(t, first, second)| {
        let more = match shared.len() {
            1 => String::new(),
            n => format!(" (and {} more like them)", n - 1),
        };
        format!(
            "{} and {} have one time ({}) on one grid{more}: their step holds {combined}. If their names \
             hold times cubeload does not read (it reads {NAME_DATE_FORMS}), rename them; if one repeats \
             the other, leave it out",
            files[first].path.display(),
            files[second].path.display(),
            time::format_instant(t)
        )
    }))
}

fn is_identity(gt: &[f64; 6]) -> bool {
    *gt == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
}

/// Finds a georeferencing the warper can use, or explains why there is none.
fn georeference(
    name: &str,
    path: &Path,
    dataset: &Dataset,
    crs_override: Option<&str>,
) -> Result<(Georef, Option<String>), SourceError> {
    let mut note = None;
    let geotransform = dataset.geo_transform().ok().filter(|gt| !is_identity(gt));
    let geolocation: Vec<(String, String)> = dataset
        .metadata_domain("GEOLOCATION")
        .unwrap_or_default()
        .into_iter()
        .filter_map(|item| item.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    // An affine transform in a known CRS is exact; geolocation arrays are sampled. So when GDAL missed the
    // transform but knows the CRS, regular 1-D CF coordinates come before 2-D lat/lon arrays.
    let rebuilt = || {
        (geotransform.is_none() && (crs_override.is_some() || !dataset.projection().is_empty()))
            .then(|| cf_coordinate_geotransform(path, dataset))
            .flatten()
    };
    let geotransform = match (geotransform, rebuilt()) {
        (Some(gt), _) => gt,
        (None, Some(gt)) => {
            note = Some(format!(
                "{}: georeferencing rebuilt from its CF x/y coordinate variables (GDAL saw none)",
                path.display()
            ));
            gt
        }
        (None, None) if !geolocation.is_empty() => {
            return Ok((Georef::Geolocation { metadata: geolocation }, None));
        }
        (None, None) => {
            let gt = cf_coordinate_geotransform(path, dataset).ok_or_else(|| {
                SourceError::unusable(
                    path,
                    "has no usable georeferencing: no geotransform, no geolocation arrays, and no regular \
                     1-D CF coordinate variables",
                )
            })?;
            note = Some(format!(
                "{}: georeferencing rebuilt from its CF x/y coordinate variables (GDAL saw none)",
                path.display()
            ));
            gt
        }
    };
    let mut wkt = match crs_override {
        Some(def) => {
            gdal::spatial_ref::SpatialRef::from_definition(def).and_then(|s| s.to_wkt()).map_err(|e| {
                SourceError::misconfigured(name, "crs", path, format!("cannot use crs `{def}`: {e}"))
            })?
        }
        None => dataset.projection(),
    };
    let (w, h) = dataset.raster_size();
    let xs = [geotransform[0], geotransform[0] + w as f64 * geotransform[1]];
    let ys = [geotransform[3], geotransform[3] + h as f64 * geotransform[5]];
    if wkt.is_empty() {
        // Outer cells centred on a pole or on 180° reach half a cell past it.
        let (dx, dy) = (geotransform[1].abs(), geotransform[5].abs());
        let lonlat = xs.iter().all(|x| (-180.0 - dx..=360.0 + dx).contains(x))
            && ys.iter().all(|y| (-90.0 - dy..=90.0 + dy).contains(y));
        if !lonlat {
            return Err(SourceError::unusable(
                path,
                "has no CRS and its coordinates are not longitudes/latitudes; give the variable a `crs:`",
            ));
        }
        wkt = gdal::spatial_ref::SpatialRef::from_epsg(4326)
            .and_then(|s| s.to_wkt())
            .map_err(|e| SourceError::gdal(path, &e))?;
        note = Some(format!("{}: no CRS in the file; assumed EPSG:4326 (a CF lon/lat grid)", path.display()));
    }
    let geographic = gdal::spatial_ref::SpatialRef::from_wkt(&wkt).is_ok_and(|s| s.is_geographic());
    let east = xs[0].max(xs[1]);
    let wrap_cols = if geographic && east > 180.0 + 1e-9 {
        let cols = 360.0 / geotransform[1].abs();
        ((cols - cols.round()).abs() < 1e-6).then_some(cols.round() as usize).or_else(|| {
            note = Some(format!(
                "{}: longitudes reach {east}°E and 360° is not a whole number of cells: not wrapped",
                path.display()
            ));
            None
        })
    } else {
        None
    };
    Ok((Georef::Transform { geotransform, wkt, wrap_cols }, note))
}

/// Rebuilds a geotransform from regular 1-D coordinate variables named like the raster's dimensions, for
/// GDAL's rows: GDAL reads a `NetCDF` variable bottom-up (its last row first) unless it recognises a y axis
/// that decreases (and its `GDAL_NETCDF_BOTTOMUP` option changes that default), so which file row each of
/// its rows is is found by reading rows both ways ([`rows_in_file_order`]).
fn cf_coordinate_geotransform(path: &Path, dataset: &Dataset) -> Option<[f64; 6]> {
    let var = dataset.rasterband(1).ok()?.metadata_item("NETCDF_VARNAME", "")?;
    let md = Dataset::open_ex(
        path,
        DatasetOptions { open_flags: GdalOpenFlags::GDAL_OF_MULTIDIM_RASTER, ..Default::default() },
    )
    .ok()?;
    let root = md.root_group().ok()?;
    let array = root.open_md_array(&var, CslStringList::default()).ok()?;
    let dims = array.dimensions().ok()?;
    let names: Vec<String> = dims.iter().map(gdal::raster::Dimension::name).collect();
    let [.., ydim, xdim] = names.as_slice() else { return None };
    let read = |name: &str| -> Option<Vec<f64>> {
        let coord = root.open_md_array(name, CslStringList::default()).ok()?;
        let n = coord.num_elements() as usize;
        coord.read_as::<f64>(vec![0], vec![n]).ok()
    };
    let (x, y) = (read(xdim)?, read(ydim)?);
    let regular = |v: &[f64]| -> Option<f64> {
        let d = v.get(1)? - v.first()?;
        (d != 0.0 && v.windows(2).all(|w| ((w[1] - w[0]) - d).abs() <= 1e-6 * d.abs())).then_some(d)
    };
    let (dx, dy) = (regular(&x)?, regular(&y)?);
    let (width, height) = dataset.raster_size();
    if x.len() != width || y.len() != height {
        return None;
    }
    let (first, step) =
        if rows_in_file_order(dataset, &array, (width, height))? { (y[0], dy) } else { (y[height - 1], -dy) };
    Some([x[0] - dx / 2.0, dx, 0.0, first - step / 2.0, 0.0, step])
}

/// Whether GDAL's row `k` of band 1 is row `k` of the file's `array` (`[.., y, x]`, band 1 its first
/// index along the others) rather than row `height - 1 - k`: told by rows that differ from their mirror
/// image (rows of fill values alone, as a sea's, tell nothing), a few spread over the height, or all of them
/// until one tells. Rows all equal to their mirror images read the same either way. `None` when rows tell
/// both ways, a row of GDAL's is neither, or a read fails.
fn rows_in_file_order(
    dataset: &Dataset,
    array: &gdal::raster::MDArray<'_>,
    (width, height): (usize, usize),
) -> Option<bool> {
    let band = dataset.rasterband(1).ok()?;
    let dims = array.num_dimensions();
    let file_row = |k: usize| -> Option<Vec<f64>> {
        let mut start = vec![0u64; dims];
        start[dims - 2] = k as u64;
        let mut count = vec![1usize; dims];
        count[dims - 1] = width;
        array.read_as::<f64>(start, count).ok()
    };
    let gdal_row = |k: usize| -> Option<Vec<f64>> {
        let row = band.read_as::<f64>((0, isize::try_from(k).ok()?), (width, 1), (width, 1), None).ok()?;
        Some(row.into_shape_and_vec().1)
    };
    // Equal as stored: NaN fill values equal too.
    let same = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
    let half = height / 2;
    let step = (half / ROW_ORDER_SAMPLES).max(1);
    let spread = (0..half).step_by(step);
    let rest = (0..half).filter(|k| k % step != 0);
    let (mut kept, mut flipped) = (0, 0);
    for (i, k) in spread.chain(rest).enumerate() {
        if i >= ROW_ORDER_SAMPLES && kept + flipped > 0 {
            break;
        }
        let (top, bottom) = (file_row(k)?, file_row(height - 1 - k)?);
        if same(&top, &bottom) {
            continue;
        }
        let row = gdal_row(k)?;
        match (same(&row, &top), same(&row, &bottom)) {
            (true, _) => kept += 1,
            (_, true) => flipped += 1,
            _ => return None,
        }
    }
    match (kept, flipped) {
        (_, 0) => Some(true),
        (0, _) => Some(false),
        _ => None,
    }
}

/// Rows (and their mirror images) read to tell the order of a `NetCDF` file's rows in GDAL's raster.
const ROW_ORDER_SAMPLES: usize = 32;

/// Refuses a classic (CDF-1, -2 or -5) `NetCDF` file shorter than its header says: netCDF-C reads the missing
/// values as fill values without an error, so a truncated file would silently become missing data.
fn check_classic_netcdf_length(path: &Path) -> Result<(), SourceError> {
    use std::io::Read;
    let mut header = Vec::new();
    let file =
        std::fs::File::open(path).map_err(|source| SourceError::Io { path: path.to_path_buf(), source })?;
    let len = file.metadata().map_err(|source| SourceError::Io { path: path.to_path_buf(), source })?.len();
    // Headers of real files are a few KB; a longer one is read only as far as this.
    file.take(1 << 24)
        .read_to_end(&mut header)
        .map_err(|source| SourceError::Io { path: path.to_path_buf(), source })?;
    match classic_netcdf_extent(&header) {
        Some(expected) if expected > len => Err(SourceError::unusable(
            path,
            format!("is truncated: its NetCDF header describes {expected} bytes, the file has {len}"),
        )),
        _ => Ok(()),
    }
}

/// The bytes a classic `NetCDF` file must have according to its header (the end of its last variable), or
/// `None` when `bytes` does not start with a classic header that can tell (other formats, streamed records,
/// variables over 4 GiB).
fn classic_netcdf_extent(bytes: &[u8]) -> Option<u64> {
    struct Reader<'a> {
        bytes: &'a [u8],
        at: usize,
        wide: bool,
    }
    impl Reader<'_> {
        fn take(&mut self, n: usize) -> Option<&[u8]> {
            let slice = self.bytes.get(self.at..self.at.checked_add(n)?)?;
            self.at += n;
            Some(slice)
        }
        fn u32(&mut self) -> Option<u64> {
            self.take(4).map(|b| u64::from(u32::from_be_bytes(b.try_into().expect("4 bytes"))))
        }
        fn u64(&mut self) -> Option<u64> {
            self.take(8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        }
        /// A count: 8 bytes in CDF-5, else 4.
        fn count(&mut self) -> Option<u64> {
            if self.wide { self.u64() } else { self.u32() }
        }
        fn skip_padded(&mut self, n: u64) -> Option<()> {
            self.take(usize::try_from(n.checked_add(3)? / 4 * 4).ok()?).map(|_| ())
        }
        fn name(&mut self) -> Option<()> {
            let n = self.count()?;
            self.skip_padded(n)
        }
        /// A list's tag (or ABSENT) and its length.
        fn list(&mut self, tag: u64) -> Option<u64> {
            let (t, n) = (self.u32()?, self.count()?);
            (t == tag || (t == 0 && n == 0)).then_some(n)
        }
        fn attributes(&mut self) -> Option<()> {
            for _ in 0..self.list(0x0C)? {
                self.name()?;
                let size = type_size(self.u32()?)?;
                let n = self.count()?;
                self.skip_padded(n.checked_mul(size)?)?;
            }
            Some(())
        }
    }
    fn type_size(nc_type: u64) -> Option<u64> {
        Some(match nc_type {
            1 | 2 | 7 => 1,
            3 | 8 => 2,
            4 | 5 | 9 => 4,
            6 | 10 | 11 => 8,
            _ => return None,
        })
    }
    let version = match bytes.get(..4)? {
        b"CDF\x01" => 1,
        b"CDF\x02" => 2,
        b"CDF\x05" => 5,
        _ => return None,
    };
    let mut r = Reader { bytes, at: 4, wide: version == 5 };
    let records = r.count()?;
    if records == if r.wide { u64::MAX } else { u64::from(u32::MAX) } {
        return None; // streamed: the record count is not in the header
    }
    let mut dims = Vec::new();
    for _ in 0..r.list(0x0A)? {
        r.name()?;
        dims.push(r.count()?);
    }
    r.attributes()?;
    let (mut end, mut record_size, mut record_begin) = (0u64, 0u64, u64::MAX);
    for _ in 0..r.list(0x0B)? {
        r.name()?;
        let ndims = r.count()?;
        let mut first_dim = None;
        for k in 0..ndims {
            let id = r.count()?;
            if k == 0 {
                first_dim = Some(*dims.get(usize::try_from(id).ok()?)?);
            }
        }
        r.attributes()?;
        type_size(r.u32()?)?;
        let vsize = r.count()?;
        let begin = if version == 1 { r.u32()? } else { r.u64()? };
        if !r.wide && vsize == u64::from(u32::MAX) {
            return None; // a variable over 4 GiB: its size is not in the header
        }
        if first_dim == Some(0) {
            record_size = record_size.checked_add(vsize)?;
            record_begin = record_begin.min(begin);
        } else {
            end = end.max(begin.checked_add(vsize)?);
        }
    }
    if records > 0 && record_begin != u64::MAX {
        let records_end = record_begin.checked_add(records.checked_mul(record_size)?)?;
        end = end.max(records_end);
    }
    // The last variable's padding to 4 bytes may be missing at the very end.
    Some(end.saturating_sub(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An input replaced or rewritten after it was hashed has changed; one only touched, or rewritten with
    /// the same bytes, has not.
    #[test]
    fn inputs_changed_since_they_were_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t2m.tif");
        std::fs::write(&path, b"first version").unwrap();
        let (file, stamp) = file_provenance(&path).unwrap();
        assert!(!file.changed_since(&stamp).unwrap());
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(later).unwrap();
        assert!(!file.changed_since(&stamp).unwrap(), "touched only");
        std::fs::write(&path, b"first version").unwrap();
        assert!(!file.changed_since(&stamp).unwrap(), "the same bytes written again");
        std::fs::write(&path, b"other version").unwrap();
        assert!(file.changed_since(&stamp).unwrap(), "rewritten in place, same size");
        // Rewritten in place with its modification time put back, as a tool keeping times would.
        let (file, stamp) = file_provenance(&path).unwrap();
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, b"third version").unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(modified).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), modified);
        assert!(file.changed_since(&stamp).unwrap(), "rewritten, its modification time put back");
        let (file, stamp) = file_provenance(&path).unwrap();
        let replacement = dir.path().join("new.tif");
        std::fs::write(&replacement, b"replacement").unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        assert!(file.changed_since(&stamp).unwrap(), "replaced by another file");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(file.changed_since(&stamp), Err(SourceError::Io { .. })), "gone");
    }

    #[test]
    fn classic_netcdf_extent_is_the_file_length_and_catches_truncation() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
        let mut checked = 0;
        for name in [
            "tos_O1_2001-2002.nc",
            "bcsd_obs_1999.nc",
            "SMALL_total_column_co2.nc",
            "test_stageiv_xyt.nc",
            "extra/eraint_uvz.nc",
            "extra/small_rotPole_precipitation.nc",
        ] {
            let bytes = std::fs::read(data.join(name)).unwrap();
            let extent = classic_netcdf_extent(&bytes).unwrap_or_else(|| panic!("{name}: no extent"));
            let len = bytes.len() as u64;
            assert!(extent <= len && extent + 4 > len, "{name}: extent {extent}, length {len}");
            assert_eq!(
                classic_netcdf_extent(&bytes[..bytes.len() / 2]),
                Some(extent),
                "{name}: header intact"
            );
            checked += 1;
        }
        assert_eq!(checked, 6);
        assert_eq!(classic_netcdf_extent(b"\x89HDF\r\n"), None);
        assert_eq!(classic_netcdf_extent(b"CDF\x01\xff"), None, "a cut header tells nothing");
    }
}
