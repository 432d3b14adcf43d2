//! Helpers: the built binary, the shared real data, and independent references (the `gdalwarp` program).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use zarrs::array::Array;
use zarrs::filesystem::FilesystemStore;

/// `../shared/data`, beside the repository (CI has it there too).
pub(crate) fn shared_data(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    assert!(dir.is_dir(), "the real test data must be at {} (see README)", dir.display());
    dir.join(name).canonicalize().unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Writes a one-band `EPSG:4326` GeoTIFF of `values` (row-major, `width` columns), its north-west corner at
/// `(west, north)`, cells of `res` degrees, with `nodata` when given.
pub(crate) fn write_lonlat_tif<T: gdal::raster::GdalType + Copy>(
    path: &Path,
    (west, north, res): (f64, f64, f64),
    width: usize,
    values: Vec<T>,
    nodata: Option<f64>,
) {
    let height = values.len() / width;
    let driver = gdal::DriverManager::get_driver_by_name("GTiff").unwrap();
    let mut ds = driver.create_with_band_type::<T, _>(path, width, height, 1).unwrap();
    ds.set_geo_transform(&[west, res, 0.0, north, 0.0, -res]).unwrap();
    ds.set_projection(&gdal::spatial_ref::SpatialRef::from_epsg(4326).unwrap().to_wkt().unwrap()).unwrap();
    let mut band = ds.rasterband(1).unwrap();
    if nodata.is_some() {
        band.set_no_data_value(nodata).unwrap();
    }
    band.write((0, 0), (width, height), &mut gdal::raster::Buffer::new((width, height), values)).unwrap();
}

/// Runs the `cubeload` binary with `args` in `cwd`.
pub(crate) fn cubeload(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cubeload")).args(args).current_dir(cwd).output().expect("cubeload runs")
}

/// Writes `config` to `dir/cube.yaml`, runs `cubeload gen`, and panics with its stderr on failure.
pub(crate) fn gen_ok(dir: &Path, config: &str) -> PathBuf {
    let path = dir.join("cube.yaml");
    std::fs::write(&path, config).unwrap();
    let out = cubeload(dir, &["gen", "-c", path.to_str().unwrap(), "--overwrite"]);
    assert!(
        out.status.success(),
        "gen failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    dir.join("cube.zarr")
}

/// Runs `cubeload gen` expecting failure; returns (exit code, stderr).
pub(crate) fn gen_err(dir: &Path, config: &str) -> (i32, String) {
    let path = dir.join("cube.yaml");
    std::fs::write(&path, config).unwrap();
    let out = cubeload(dir, &["gen", "-c", path.to_str().unwrap()]);
    assert!(!out.status.success(), "gen should fail:\n{}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "a panic is never an error message: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

/// Opens an array of a cube with zarrs.
pub(crate) fn array(cube: &Path, name: &str) -> Array<FilesystemStore> {
    let store = std::sync::Arc::new(FilesystemStore::new(cube).unwrap());
    Array::open(store, &format!("/{name}")).unwrap()
}

/// The cube's root `cubeload` attribute.
pub(crate) fn meta(cube: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(cube.join("zarr.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value["attributes"]["cubeload"].clone()
}

/// Reads `[t0, t1) × rows × cols` of a float32 (time, lat, lon) array, or rows × cols of a 2-D one.
pub(crate) fn read_f32(
    cube: &Path,
    name: &str,
    t: Option<std::ops::Range<u64>>,
    rows: u64,
    cols: u64,
) -> Vec<f32> {
    let a = array(cube, name);
    let subset: Vec<std::ops::Range<u64>> = match t {
        Some(t) => vec![t, 0..rows, 0..cols],
        None => vec![0..rows, 0..cols],
    };
    a.retrieve_array_subset::<Vec<f32>>(&subset).unwrap()
}

/// Target grid of a test: bbox and resolution, as given to both cubeload and gdalwarp.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TestGrid {
    pub(crate) bbox: [f64; 4],
    pub(crate) res: f64,
}

impl TestGrid {
    pub(crate) fn yaml(&self) -> String {
        let [w, s, e, n] = self.bbox;
        format!("grid: {{ bbox: [{w}, {s}, {e}, {n}], resolution: {} }}", self.res)
    }
}

/// The independent reference: `gdalwarp` (the program) of `source` onto `grid`, every band, as f64 rasters.
/// `pre` runs first (e.g. `gdal_translate` to attach georeferencing) and names the file to warp.
/// The resampling scale is fixed to the ratio of the source's own lon/lat resolution (as `gdalwarp -t_srs
/// EPSG:4326` chooses it) to the target's: without it GDAL derives kernel footprints from each processing
/// chunk, and two correct warps of the same grid may differ in a few cells.
pub(crate) fn gdalwarp(
    source: &str,
    grid: TestGrid,
    resampling: &str,
    work: &Path,
) -> (usize, usize, Vec<Vec<f64>>) {
    let out = work.join(format!("ref-{}.tif", rand_suffix()));
    let native = work.join(format!("native-{}.tif", rand_suffix()));
    let status = Command::new("gdalwarp")
        .args(["-q", "-overwrite", "-of", "VRT", "-t_srs", "EPSG:4326"])
        .arg(source)
        .arg(&native)
        .output()
        .unwrap();
    assert!(status.status.success(), "gdalwarp failed: {}", String::from_utf8_lossy(&status.stderr));
    let gt = gdal::Dataset::open(&native).unwrap().geo_transform().unwrap();
    let (xscale, yscale) = (gt[1] / grid.res, gt[5].abs() / grid.res);
    let [w, s, e, n] = grid.bbox;
    let status = Command::new("gdalwarp")
        .args(["-wo", &format!("XSCALE={xscale}"), "-wo", &format!("YSCALE={yscale}")])
        .args([
            "-q",
            "-overwrite",
            "-of",
            "GTiff",
            "-ot",
            "Float64",
            "-et",
            "0",
            "-dstnodata",
            "nan",
            "-t_srs",
            "EPSG:4326",
            "-r",
        ])
        .arg(resampling)
        .args(["-te", &w.to_string(), &s.to_string(), &e.to_string(), &n.to_string()])
        .args(["-tr", &grid.res.to_string(), &grid.res.to_string()])
        .arg(source)
        .arg(&out)
        .env("GRIB_NORMALIZE_UNITS", "NO")
        .output()
        .expect("gdalwarp is installed (scripts/setup.sh installs gdal-bin)");
    assert!(status.status.success(), "gdalwarp failed: {}", String::from_utf8_lossy(&status.stderr));
    read_raster(&out)
}

/// All bands of a raster as f64.
pub(crate) fn read_raster(path: &Path) -> (usize, usize, Vec<Vec<f64>>) {
    let ds = gdal::Dataset::open(path).unwrap();
    let (w, h) = ds.raster_size();
    let bands = (1..=ds.raster_count())
        .map(|i| {
            ds.rasterband(i).unwrap().read_as::<f64>((0, 0), (w, h), (w, h), None).unwrap().data().to_vec()
        })
        .collect();
    (w, h, bands)
}

/// Runs a GDAL utility and asserts success.
pub(crate) fn gdal_tool(tool: &str, args: &[&str]) {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// `gdal_translate` of `source` to a Float64 VRT at `out` with its packed values unpacked (scale and offset
/// applied, nodata left out), with `extra` options (e.g. georeferencing to attach).
pub(crate) fn unpacked_vrt(source: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["-q", "-of", "VRT", "-unscale", "-ot", "Float64"];
    args.extend_from_slice(extra);
    args.extend([source.to_str().unwrap(), out.to_str().unwrap()]);
    gdal_tool("gdal_translate", &args);
}

/// Copies the directory `from` (a cube) to `to`, file by file.
pub(crate) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target)
        } else {
            std::fs::copy(&path, &target).map(|_| ()).unwrap()
        }
    }
}

/// Every file under `dir`.
pub(crate) fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { out.extend(walk(&path)) } else { out.push(path) }
    }
    out
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Asserts that the cube slice equals the reference raster: same NaN pattern, values within `tol`
/// (relative to the value's magnitude, at least absolute `tol`). Returns the number of valid cells compared.
pub(crate) fn assert_close(what: &str, cube: &[f32], reference: &[f64], tol: f64) -> usize {
    assert_eq!(cube.len(), reference.len(), "{what}: sizes differ");
    let mut valid = 0;
    for (i, (&c, &r)) in cube.iter().zip(reference).enumerate() {
        if r.is_nan() {
            assert!(c.is_nan(), "{what}: cell {i}: cube {c}, reference NaN");
            continue;
        }
        assert!(!c.is_nan(), "{what}: cell {i}: cube NaN, reference {r}");
        let err = (f64::from(c) - r).abs();
        assert!(err <= tol * r.abs().max(1.0), "{what}: cell {i}: cube {c}, reference {r}");
        valid += 1;
    }
    valid
}

/// As [`assert_close`], for area kernels (average, mode): GDAL decides cells on the edge of a source's
/// footprint from the source window of its processing chunk, so such cells may be valid in one correct warp
/// and empty in another (cubeload keeps a cell only when its centre falls inside the source). Cells farther than
/// 3 cells from the edge of either footprint must agree; at most `edge_share` of the valid cells may differ
/// in validity; values must agree wherever both are valid.
pub(crate) fn assert_close_area(
    what: &str,
    cube: &[f32],
    reference: &[f64],
    width: usize,
    tol: f64,
    edge_share: f64,
) -> usize {
    assert_eq!(cube.len(), reference.len(), "{what}: sizes differ");
    let height = reference.len() / width;
    let (mut valid, mut edge_mismatch) = (0usize, 0usize);
    for y in 0..height {
        for x in 0..width {
            let i = y * width + x;
            let (c, r) = (cube[i], reference[i]);
            if !r.is_nan() && !c.is_nan() {
                let err = (f64::from(c) - r).abs();
                assert!(err <= tol * r.abs().max(1.0), "{what}: cell {i}: cube {c}, reference {r}");
                valid += 1;
                continue;
            }
            if r.is_nan() && c.is_nan() {
                continue;
            }
            let mut neighbours = (0, 0);
            for ny in y.saturating_sub(3)..(y + 4).min(height) {
                for nx in x.saturating_sub(3)..(x + 4).min(width) {
                    let (r, c) = (reference[ny * width + nx], cube[ny * width + nx]);
                    if r.is_nan() || c.is_nan() { neighbours.0 += 1 } else { neighbours.1 += 1 }
                }
            }
            assert!(
                neighbours.0 > 0 && neighbours.1 > 0,
                "{what}: cell {i} (not on a footprint edge): cube {c}, reference {r}"
            );
            edge_mismatch += 1;
        }
    }
    assert!(
        edge_mismatch as f64 <= edge_share * valid.max(1) as f64,
        "{what}: {edge_mismatch} edge cells differ of {valid}"
    );
    valid
}
