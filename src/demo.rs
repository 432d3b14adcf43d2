//! Synthetic but realistic inputs, written with GDAL, for `cubeload demo` and for tests that must run
//! anywhere: the three kinds of source a cube usually mixes.
//!
//! - `t2m_hourly.nc`: a coarse (0.25°) hourly 2 m temperature field in `NetCDF` with CF time, lon/lat;
//! - `ndvi/ndvi_YYYY-MM-DD.tif`: a fine (250 m) NDVI time series every two days, in UTM 32N `GeoTIFFs`, with
//!   cloud gaps (NaN), dated by file name as image archives are;
//! - `landcover.tif`: a static categorical map (uint8 classes 1–5, 0 = no data) on the same UTM grid.
//!
//! Fields are smooth (sums of random waves), with a diurnal cycle, a lapse with latitude and noise, so that a
//! model has something to learn. Everything is seeded: the same seed gives byte-identical files.

use std::f64::consts::PI;
use std::path::{Path, PathBuf};

use gdal::raster::Buffer;
use gdal::{DriverManager, Metadata};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::source::{SourceError, init_gdal};

/// Hours of the demo time axis (one week).
pub const DEMO_HOURS: usize = 24 * 7;

/// Sizes of the synthetic inputs; `scale` multiplies the fine raster's resolution (1 = 250 m).
#[derive(Debug, Clone, Copy)]
pub struct DemoSpec {
    /// Seed of every random field.
    pub seed: u64,
    /// Hours in the coarse field and the target axis.
    pub hours: usize,
    /// Days between NDVI acquisitions.
    pub ndvi_every_days: usize,
    /// The `layout:` mapping of the cube.
    pub layout: &'static str,
    /// Target cell size in degrees.
    pub resolution: f64,
}

/// The demo's LSTM layout: batches of 256 full pixel series.
pub const PIXEL_LAYOUT: &str = "{ kind: pixel_series, batch: 256 }";
/// A video-prediction layout over the same inputs: 4 sequences of 8 frames of 16 × 16 pixels.
pub const IMAGE_LAYOUT: &str = "{ kind: image_sequence, seq_len: 8, patch: [16, 16], batch: 4 }";

impl Default for DemoSpec {
    fn default() -> Self {
        DemoSpec { seed: 42, hours: DEMO_HOURS, ndvi_every_days: 2, layout: PIXEL_LAYOUT, resolution: 0.01 }
    }
}

/// Writes the demo inputs under `dir`, its config as `dir/demo.yaml`, and generates `dir/demo.zarr`
/// (replacing an earlier demo cube).
///
/// # Errors
/// Any error of writing the inputs, planning or generating.
pub fn build_cube(dir: &Path, spec: &DemoSpec, threads: Option<usize>) -> crate::Result<crate::GenReport> {
    let text = write_inputs(dir, spec)?;
    let config_path = dir.join("demo.yaml");
    std::fs::write(&config_path, &text)
        .map_err(|source| crate::cube::CubeError::Io { path: config_path.clone(), source })?;
    let config = crate::Config::from_yaml(&text, &config_path)?;
    let plan = crate::Plan::new(config, text)?;
    Ok(crate::generate(
        &plan,
        &crate::GenOptions { threads, overwrite: true, ..Default::default() },
        &|_, _| {},
    )?)
}

/// The demo config (as [`write_inputs`] returns it) as a multi-resolution cube `multires.zarr` of the same
/// inputs and batches: `t2m` kept at its native 0.25° (bilinear upsampling at load), NDVI at its revisit
/// (one stored step per acquisition interval, held over it at load).
#[must_use]
pub fn multires_config(text: &str, spec: &DemoSpec) -> String {
    let text = text.replace("demo.zarr", "multires.zarr");
    let layout_start = text.find("layout: {").expect("the demo config has a layout");
    let layout_end = layout_start + text[layout_start..].find('}').expect("closed");
    let text = format!("{}, multires: true{}", &text[..layout_end].trim_end(), &text[layout_end..]);
    text.replace("resampling: bilinear, units: K }", "resampling: bilinear, units: K, resolution: 0.25 }")
        .replace(
            "resampling: average, units: \"1\" }",
            &format!("resampling: average, units: \"1\", time_step: {}d }}", spec.ndvi_every_days.max(1)),
        )
}

/// A smooth random field: a sum of waves with random directions, wavelengths and phases.
struct Waves(Vec<(f64, f64, f64, f64)>);

impl Waves {
    fn new(rng: &mut ChaCha8Rng, n: usize, min_wavelength: f64, max_wavelength: f64) -> Self {
        Waves(
            (0..n)
                .map(|_| {
                    let angle = rng.random::<f64>() * 2.0 * PI;
                    let k = 2.0 * PI / rng.random_range(min_wavelength..max_wavelength);
                    (
                        k * angle.cos(),
                        k * angle.sin(),
                        rng.random::<f64>() * 2.0 * PI,
                        rng.random_range(0.5..1.0),
                    )
                })
                .collect(),
        )
    }
    /// Roughly in −1…1.
    fn at(&self, x: f64, y: f64) -> f64 {
        let total: f64 = self.0.iter().map(|(kx, ky, p, a)| a * (kx * x + ky * y + p).sin()).sum();
        total / (self.0.len() as f64).sqrt()
    }
}

fn gdal_err(path: &Path, e: &gdal::errors::GdalError) -> SourceError {
    SourceError::Gdal { path: path.to_path_buf(), message: e.to_string() }
}

/// Writes the demo inputs under `dir/inputs` and returns the config text of a cube over them
/// (output `dir/demo.zarr`).
///
/// # Errors
/// [`SourceError`] when GDAL cannot write a file.
pub fn write_inputs(dir: &Path, spec: &DemoSpec) -> Result<String, SourceError> {
    init_gdal();
    let inputs = dir.join("inputs");
    let ndvi_dir = inputs.join("ndvi");
    std::fs::create_dir_all(&ndvi_dir)
        .map_err(|source| SourceError::Io { path: ndvi_dir.clone(), source })?;
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let t2m = inputs.join("t2m_hourly.nc");
    write_temperature(&t2m, spec, &mut rng)?;
    let landcover = inputs.join("landcover.tif");
    let classes = write_landcover(&landcover, &mut rng)?;
    let days = spec.hours.div_ceil(24);
    for day in (0..days).step_by(spec.ndvi_every_days.max(1)) {
        let path = ndvi_dir.join(format!("ndvi_2024-06-{:02}.tif", day + 1));
        write_ndvi(&path, &classes, day, &mut rng)?;
    }
    let d = dir.display();
    let end_hour = spec.hours - 1;
    Ok(format!(
        "# cubeload demo: synthetic inputs written by `cubeload demo` (src/demo.rs)
output: {d}/demo.zarr
grid: {{ bbox: [9.5, 45.0, 11.0, 46.0], resolution: {} }}
time: {{ start: 2024-06-01T00:00:00Z, end: 2024-06-{:02}T{:02}:00:00Z, step: 1h }}
layout: {}
compression: {{ codec: zstd, level: 3 }}
variables:
  t2m: {{ path: {d}/inputs/t2m_hourly.nc, variable: t2m, resampling: bilinear, units: K }}
  ndvi: {{ path: \"{d}/inputs/ndvi/ndvi_*.tif\", resampling: average, units: \"1\" }}
  landcover: {{ path: {d}/inputs/landcover.tif, kind: categorical, static: true, resampling: mode }}
metadata: {{ title: cubeload demo cube (synthetic data) }}
",
        spec.resolution,
        end_hour / 24 + 1,
        end_hour % 24,
        spec.layout
    ))
}

/// Coarse hourly temperature (K) on a 0.25° lon/lat grid, `NetCDF` with CF time.
fn write_temperature(path: &Path, spec: &DemoSpec, rng: &mut ChaCha8Rng) -> Result<(), SourceError> {
    let (west, north, res, width, height) = (9.0, 46.5, 0.25, 10usize, 8usize);
    let waves = Waves::new(rng, 6, 0.8, 3.0);
    let driver = DriverManager::get_driver_by_name("MEM").map_err(|e| gdal_err(path, &e))?;
    let mut ds = driver
        .create_with_band_type::<f32, _>("", width, height, spec.hours)
        .map_err(|e| gdal_err(path, &e))?;
    ds.set_geo_transform(&[west, res, 0.0, north, 0.0, -res]).map_err(|e| gdal_err(path, &e))?;
    let wkt = gdal::spatial_ref::SpatialRef::from_epsg(4326)
        .and_then(|s| s.to_wkt())
        .map_err(|e| gdal_err(path, &e))?;
    ds.set_projection(&wkt).map_err(|e| gdal_err(path, &e))?;
    let values: Vec<String> = (0..spec.hours).map(|h| h.to_string()).collect();
    for (key, value) in [
        ("NETCDF_DIM_EXTRA", "{time}".to_string()),
        ("NETCDF_DIM_time_DEF", format!("{{{},6}}", spec.hours)),
        ("NETCDF_DIM_time_VALUES", format!("{{{}}}", values.join(","))),
        ("time#units", "hours since 2024-06-01 00:00:00".to_string()),
        ("time#calendar", "standard".to_string()),
        ("time#standard_name", "time".to_string()),
        ("t2m#units", "K".to_string()),
        ("t2m#long_name", "2 metre temperature".to_string()),
    ] {
        ds.set_metadata_item(key, &value, "").map_err(|e| gdal_err(path, &e))?;
    }
    for h in 0..spec.hours {
        let mut data = Vec::with_capacity(width * height);
        for row in 0..height {
            for col in 0..width {
                let lon = west + (col as f64 + 0.5) * res;
                let lat = north - (row as f64 + 0.5) * res;
                let local_hour = h as f64 + lon / 15.0;
                let diurnal = 5.0 * (2.0 * PI * (local_hour - 9.0) / 24.0).sin();
                let synoptic = 3.0 * waves.at(lon + h as f64 * 0.02, lat);
                let value = 291.0 - 0.9 * (lat - 45.0) + diurnal + synoptic + rng.random_range(-0.3..0.3);
                data.push(value as f32);
            }
        }
        let mut band = ds.rasterband(h + 1).map_err(|e| gdal_err(path, &e))?;
        band.set_metadata_item("NETCDF_VARNAME", "t2m", "").map_err(|e| gdal_err(path, &e))?;
        band.set_metadata_item("NETCDF_DIM_time", &h.to_string(), "").map_err(|e| gdal_err(path, &e))?;
        let mut buffer = Buffer::new((width, height), data);
        band.write((0, 0), (width, height), &mut buffer).map_err(|e| gdal_err(path, &e))?;
    }
    let netcdf = DriverManager::get_driver_by_name("netCDF").map_err(|e| gdal_err(path, &e))?;
    let _ = std::fs::remove_file(path);
    ds.create_copy(&netcdf, path, &gdal::cpl::CslStringList::new()).map_err(|e| gdal_err(path, &e))?;
    Ok(())
}

/// UTM 32N grid of the fine rasters: 250 m cells covering the demo area with a margin.
const UTM: (f64, f64, f64, usize, usize) = (525_000.0, 5_110_000.0, 250.0, 600, 580);

fn utm_dataset(path: &Path, bands: usize, data_type_u8: bool) -> Result<gdal::Dataset, SourceError> {
    let (x0, y0, res, width, height) = UTM;
    let driver = DriverManager::get_driver_by_name("GTiff").map_err(|e| gdal_err(path, &e))?;
    let options = gdal::raster::RasterCreationOptions::from_iter(["COMPRESS=DEFLATE", "TILED=YES"]);
    let mut ds = if data_type_u8 {
        driver.create_with_band_type_with_options::<u8, _>(path, width, height, bands, &options)
    } else {
        driver.create_with_band_type_with_options::<f32, _>(path, width, height, bands, &options)
    }
    .map_err(|e| gdal_err(path, &e))?;
    ds.set_geo_transform(&[x0, res, 0.0, y0, 0.0, -res]).map_err(|e| gdal_err(path, &e))?;
    let wkt = gdal::spatial_ref::SpatialRef::from_epsg(32632)
        .and_then(|s| s.to_wkt())
        .map_err(|e| gdal_err(path, &e))?;
    ds.set_projection(&wkt).map_err(|e| gdal_err(path, &e))?;
    Ok(ds)
}

/// Land cover classes 1–5 from a smooth field, with a no-data (0) margin in the south-west.
fn write_landcover(path: &Path, rng: &mut ChaCha8Rng) -> Result<Vec<u8>, SourceError> {
    let (_, _, _, width, height) = UTM;
    let waves = Waves::new(rng, 8, 8_000.0, 40_000.0);
    let mut classes = Vec::with_capacity(width * height);
    for row in 0..height {
        for col in 0..width {
            let (x, y) = (col as f64 * 250.0, row as f64 * 250.0);
            let v = waves.at(x, y);
            let class = if row > height - 40 && col < 60 {
                0
            } else {
                match v {
                    v if v < -0.6 => 1, // water
                    v if v < -0.1 => 2, // cropland
                    v if v < 0.4 => 3,  // grassland
                    v if v < 0.8 => 4,  // forest
                    _ => 5,             // urban
                }
            };
            classes.push(class);
        }
    }
    let ds = utm_dataset(path, 1, true)?;
    let mut band = ds.rasterband(1).map_err(|e| gdal_err(path, &e))?;
    band.set_no_data_value(Some(0.0)).map_err(|e| gdal_err(path, &e))?;
    let mut buffer = Buffer::new((width, height), classes.clone());
    band.write((0, 0), (width, height), &mut buffer).map_err(|e| gdal_err(path, &e))?;
    Ok(classes)
}

/// NDVI for one acquisition day: a class-dependent level, a smooth anomaly that greens up over the week,
/// noise, and clouds (NaN).
fn write_ndvi(path: &Path, classes: &[u8], day: usize, rng: &mut ChaCha8Rng) -> Result<(), SourceError> {
    let (_, _, _, width, height) = UTM;
    let anomaly = Waves::new(rng, 5, 10_000.0, 60_000.0);
    let clouds = Waves::new(rng, 6, 6_000.0, 30_000.0);
    let mut data = Vec::with_capacity(width * height);
    for row in 0..height {
        for col in 0..width {
            let (x, y) = (col as f64 * 250.0, row as f64 * 250.0);
            let class = classes[row * width + col];
            let base = [f64::NAN, -0.05, 0.55, 0.45, 0.8, 0.15][class as usize];
            let value = base + 0.01 * day as f64 + 0.08 * anomaly.at(x, y) + rng.random_range(-0.02..0.02);
            let cloudy = clouds.at(x, y) > 0.75;
            data.push(if cloudy || class == 0 { f32::NAN } else { value.clamp(-1.0, 1.0) as f32 });
        }
    }
    let ds = utm_dataset(path, 1, false)?;
    let mut band = ds.rasterband(1).map_err(|e| gdal_err(path, &e))?;
    band.set_no_data_value(Some(f64::NAN)).map_err(|e| gdal_err(path, &e))?;
    let mut buffer = Buffer::new((width, height), data);
    band.write((0, 0), (width, height), &mut buffer).map_err(|e| gdal_err(path, &e))?;
    Ok(())
}

/// The default demo directory.
#[must_use]
pub fn default_dir() -> PathBuf {
    PathBuf::from("cubeload-demo")
}
