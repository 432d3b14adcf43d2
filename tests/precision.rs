//! The warp computes in the narrowest type that holds the source's values: Float32 for bytes, 16-bit integers
//! and Float32 (GDAL's fast kernels), Float64 for 32-bit integers, whose codes Float32 would round.

use std::path::{Path, PathBuf};

use crate::util::{TestGrid, array, cubeload, gen_ok, write_lonlat_tif};

/// The grid of a map of `width × height` cells of `res` from `(west, north)`, as a target grid: every cell
/// then takes exactly one source cell.
fn own_grid((west, north, res): (f64, f64, f64), width: usize, height: usize) -> TestGrid {
    TestGrid { bbox: [west, north - height as f64 * res, west + width as f64 * res, north], res }
}

/// Generates `dir/cube.zarr` on `grid`, in batches of 64 pixel series, of the config's `variables` lines.
fn gen_on(dir: &Path, grid: TestGrid, variables: &str) -> PathBuf {
    gen_ok(
        dir,
        &format!(
            "output: cube.zarr\n{}\nlayout: {{ kind: pixel_series, batch: 64 }}\nvariables:\n{variables}",
            grid.yaml()
        ),
    )
}

/// Basin codes of ten digits (HydroBASINS-like) in a 32-bit integer map come through `nearest` unchanged: a
/// Float32 working type would round them to multiples of 64 (1_060_000_011 → 1_060_000_000). GDAL 3.6's `mode`
/// kernel counts values as Float32 whatever the working type (`gdalwarp -r mode` rounds these codes too):
/// asked for `mode`, `gen` says so.
#[test]
fn ten_digit_class_codes_survive_the_warp() {
    let dir = tempfile::tempdir().unwrap();
    let (width, height, res) = (40usize, 30usize, 0.01);
    let (west, north) = (10.0, 46.0);
    let codes: Vec<i32> = (0..width * height).map(|i| 1_060_000_011 + ((i / 7) % 13) as i32).collect();
    let tif = dir.path().join("basins.tif");
    write_lonlat_tif(&tif, (west, north, res), width, codes.clone(), None);
    // The target grid is the map's own: every cell takes exactly one source cell.
    let grid = own_grid((west, north, res), width, height);
    let cube = gen_on(
        dir.path(),
        grid,
        &format!("  basin: {{ path: {}, kind: categorical, resampling: nearest }}\n", tif.display()),
    );
    let basin = array(&cube, "basin");
    assert!(basin.data_type().to_string().starts_with("int32"));
    let stored = basin.retrieve_array_subset::<Vec<i32>>(&[0..height as u64, 0..width as u64]).unwrap();
    let wrong = stored.iter().zip(&codes).filter(|(s, c)| s != c).count();
    let first = stored.iter().zip(&codes).find(|(s, c)| s != c);
    assert_eq!(wrong, 0, "{wrong} cells changed, the first: {first:?} (stored, source)");
    // The loader's float32 batches round such codes (1_060_000_011 → 1_060_000_000): the cube says so.
    let meta = cubeload::Cube::open(&cube).unwrap().meta().clone();
    let notes = &meta.variables.iter().find(|v| v.name == "basin").unwrap().notes;
    assert!(notes.iter().any(|n| n.contains("not exact in the loader's float32 batches")), "{notes:?}");

    let mode = dir.path().join("mode.yaml");
    let config = std::fs::read_to_string(dir.path().join("cube.yaml")).unwrap();
    std::fs::write(&mode, config.replace("resampling: nearest", "resampling: mode")).unwrap();
    let out = cubeload(dir.path(), &["gen", "-c", mode.to_str().unwrap(), "--overwrite"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("note: variable `basin`: GDAL's `mode` kernel counts values as float32"),
        "{stderr}"
    );
}

/// Values a float32 variable cannot hold (±∞ in a source, or a float64 beyond float32's range, which would
/// become ∞) are stored as missing, left out of the statistics, and counted in a note: they were written as
/// ∞ with statistics of ∞, which JSON has no number for, and the cube's metadata then held `null`, so that
/// no command could open the cube, nor `gen --overwrite` replace it.
#[test]
fn values_a_float32_cannot_hold_are_missing_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let (width, height, res) = (20usize, 20usize, 0.1);
    let (west, north) = (9.0, 46.0);
    let mut values: Vec<f64> = (0..width * height).map(|i| 270.0 + (i % 37) as f64 * 0.5).collect();
    let unstorable = [(3, f64::INFINITY), (57, f64::NEG_INFINITY), (200, 1e300), (311, -4e38)];
    for (i, v) in unstorable {
        values[i] = v;
    }
    let tif = dir.path().join("v.tif");
    write_lonlat_tif(&tif, (west, north, res), width, values.clone(), None);
    let grid = own_grid((west, north, res), width, height);
    let config = format!(
        "output: cube.zarr\n{}\nlayout: {{ kind: pixel_series, batch: 16 }}\n\
         variables:\n  v: {{ path: {}, static: true, resampling: nearest }}\n",
        grid.yaml(),
        tif.display()
    );
    let cube = gen_ok(dir.path(), &config);
    // Generates `config` over the cube: it says what it left out.
    let regenerate = |config: &str| {
        std::fs::write(dir.path().join("cube.yaml"), config).unwrap();
        let out = cubeload(dir.path(), &["gen", "-c", "cube.yaml", "--overwrite"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let note = "note: variable `v`: 4 values were infinite or beyond float32's range";
        assert!(stderr.contains(note), "{stderr}");
    };
    // A second run replaces it, as it does any cube.
    regenerate(&config);
    let info = cubeload(dir.path(), &["info", "cube.zarr"]);
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));

    let stored =
        array(&cube, "v").retrieve_array_subset::<Vec<f32>>(&[0..height as u64, 0..width as u64]).unwrap();
    for (i, (&s, &v)) in stored.iter().zip(&values).enumerate() {
        if unstorable.iter().any(|&(j, _)| j == i) {
            assert!(s.is_nan(), "cell {i}: {s}");
        } else {
            assert_eq!(s, v as f32, "cell {i}");
        }
    }
    let meta = cubeload::Cube::open(&cube).unwrap().meta().clone();
    let v = &meta.variables[0];
    let stats = v.stats.as_ref().unwrap();
    let finite: Vec<f64> = values.iter().copied().filter(|x| (*x as f32).is_finite()).collect();
    assert_eq!(stats.max, finite.iter().copied().fold(f64::MIN, f64::max));
    assert_eq!(stats.min, finite.iter().copied().fold(f64::MAX, f64::min));
    assert!((v.valid_fraction - finite.len() as f64 / values.len() as f64).abs() < 1e-12);

    // Stored sample-major (`order: shuffled`), through its own writer: the same note and statistics.
    let shuffled = config.replace("batch: 16 }", "batch: 16, order: shuffled }");
    regenerate(&shuffled);
    let meta = cubeload::Cube::open(&cube).unwrap().meta().clone();
    assert!(meta.layout.shuffled.is_some());
    let again = meta.variables[0].stats.as_ref().unwrap();
    assert_eq!((again.min, again.max), (stats.min, stats.max));
}

/// Class codes an integer variable cannot hold apart from its fill value (a packed byte map whose offset
/// takes its codes past 255 or below 0, or a class equal to the fill chosen for a source without nodata) are
/// stored as missing, left out of the statistics and counted in a note. They were clamped into the type:
/// codes below 0 became class 0, and codes past 255 the fill value while the validity index counted them
/// valid, so that every reader took the cube's chunks for damaged.
#[test]
fn codes_an_integer_type_cannot_hold_are_missing_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let (width, height, res) = (16usize, 16usize, 0.01);
    let (west, north) = (10.0, 46.0);
    let codes: Vec<u8> = (0..width * height).map(|i| (i % 251) as u8).collect();
    // Packed: the class is code − 10, so codes 0…9 give −10…−1; and a map whose codes include 255, with no
    // nodata, whose fill is then 255.
    let packed = dir.path().join("packed.tif");
    write_lonlat_tif(&packed, (west, north, res), width, codes.clone(), None);
    {
        let ds = gdal::Dataset::open_ex(
            &packed,
            gdal::DatasetOptions { open_flags: gdal::GdalOpenFlags::GDAL_OF_UPDATE, ..Default::default() },
        )
        .unwrap();
        ds.rasterband(1).unwrap().set_offset(-10.0).unwrap();
    }
    let full: Vec<u8> = (0..width * height).map(|i| 250 + (i % 6) as u8).collect();
    let with_255 = dir.path().join("full.tif");
    write_lonlat_tif(&with_255, (west, north, res), width, full.clone(), None);
    let grid = own_grid((west, north, res), width, height);
    std::fs::write(
        dir.path().join("cube.yaml"),
        format!(
            "output: cube.zarr\n{}\nlayout: {{ kind: pixel_series, batch: 64 }}\nvariables:\n  \
             packed: {{ path: {}, kind: categorical, static: true }}\n  \
             full: {{ path: {}, kind: categorical, static: true }}\n",
            grid.yaml(),
            packed.display(),
            with_255.display()
        ),
    )
    .unwrap();
    let out = cubeload(dir.path(), &["gen", "-c", "cube.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let negative = codes.iter().filter(|&&c| c < 10).count();
    let at_fill: usize = full.iter().map(|&c| usize::from(c == 255)).sum();
    for (name, n) in [("packed", negative), ("full", at_fill)] {
        let note = format!(
            "note: variable `{name}`: {n} values were not codes uint8 holds apart from its fill value 255"
        );
        assert!(stderr.contains(&note), "{note}\n{stderr}");
    }
    let cube = dir.path().join("cube.zarr");
    let read = |name: &str| {
        array(&cube, name).retrieve_array_subset::<Vec<u8>>(&[0..height as u64, 0..width as u64]).unwrap()
    };
    for (i, (&stored, &code)) in read("packed").iter().zip(&codes).enumerate() {
        let class = i32::from(code) - 10;
        let want = if class < 0 { 255 } else { class as u8 };
        assert_eq!(stored, want, "cell {i}, code {code}");
    }
    assert_eq!(read("full"), full, "255 is stored, as the fill: missing");
    let meta = cubeload::Cube::open(&cube).unwrap().meta().clone();
    let packed = meta.variables.iter().find(|v| v.name == "packed").unwrap();
    assert_eq!(packed.stats.as_ref().unwrap().min, 0.0, "the missing codes are out of the statistics");
    let valid = (codes.len() - negative) as f64 / codes.len() as f64;
    assert!((packed.valid_fraction - valid).abs() < 1e-12, "{}", packed.valid_fraction);
    // The validity index agrees with the chunks: `verify` passes and the loader reads every batch.
    let verify = cubeload(dir.path(), &["verify", "cube.zarr"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let batches = cubeload::Loader::builder(&cube).build().unwrap().map(Result::unwrap).count();
    assert_eq!(batches, 4);
}

/// A spread so small that float32 cannot hold 1/std (denormal values) normalizes as no spread, centred only
/// as a constant field is: it gave ±∞ for every valid cell.
#[test]
fn a_spread_below_float32s_reach_normalizes_to_finite_values() {
    let dir = tempfile::tempdir().unwrap();
    let (width, height, res) = (8usize, 8usize, 0.01);
    let (west, north) = (10.0, 46.0);
    let values: Vec<f32> = (0..width * height).map(|i| (i % 5) as f32 * 2.5e-40).collect();
    let tif = dir.path().join("tiny.tif");
    write_lonlat_tif(&tif, (west, north, res), width, values, None);
    let grid = own_grid((west, north, res), width, height);
    let cube = gen_on(
        dir.path(),
        grid,
        &format!("  tiny: {{ path: {}, static: true, resampling: nearest }}\n", tif.display()),
    );
    let std = cubeload::Cube::open(&cube).unwrap().meta().variables[0].stats.unwrap().std;
    assert!(std > 0.0 && !((1.0 / std) as f32).is_finite(), "the spread is below float32's reach: {std}");
    let batch = cubeload::Loader::builder(&cube).normalize(true).build().unwrap().next().unwrap().unwrap();
    assert!(batch.mask.iter().all(|&m| m == 1));
    assert!(batch.data.iter().all(|x| x.is_finite() && x.abs() < 1e-30), "{:?}", &batch.data[..8]);
}

/// Signed bytes (an int8 GeoTIFF), which GDAL 3.6 gives as unsigned bytes tagged `PIXELTYPE=SIGNEDBYTE`,
/// keep their sign, and their nodata its cells: −5…−1 were stored as 251…255 (and as a categorical, −1 met
/// the fill value 255), and a nodata of −127 marked no cell.
#[test]
fn signed_bytes_keep_their_sign() {
    let dir = tempfile::tempdir().unwrap();
    let (width, height, res) = (16usize, 16usize, 0.01);
    let (west, north) = (10.0, 46.0);
    let codes: Vec<i8> =
        (0..width * height).map(|i| if i % 17 == 3 { -127 } else { (i % 11) as i8 - 5 }).collect();
    let tif = dir.path().join("i8.tif");
    {
        let driver = gdal::DriverManager::get_driver_by_name("GTiff").unwrap();
        let options: gdal::raster::RasterCreationOptions = "PIXELTYPE=SIGNEDBYTE".parse().unwrap();
        let mut ds =
            driver.create_with_band_type_with_options::<u8, _>(&tif, width, height, 1, &options).unwrap();
        ds.set_geo_transform(&[west, res, 0.0, north, 0.0, -res]).unwrap();
        ds.set_projection(&gdal::spatial_ref::SpatialRef::from_epsg(4326).unwrap().to_wkt().unwrap())
            .unwrap();
        let mut band = ds.rasterband(1).unwrap();
        band.set_no_data_value(Some(-127.0)).unwrap();
        let bytes: Vec<u8> = codes.iter().map(|&c| c as u8).collect();
        band.write((0, 0), (width, height), &mut gdal::raster::Buffer::new((width, height), bytes)).unwrap();
    }
    let grid = own_grid((west, north, res), width, height);
    let cube = gen_on(
        dir.path(),
        grid,
        &format!(
            "  value: {{ path: {tif}, static: true, resampling: nearest }}\n  \
             class: {{ path: {tif}, static: true, kind: categorical }}\n",
            tif = tif.display()
        ),
    );
    let cells = [0..height as u64, 0..width as u64];
    let values = array(&cube, "value").retrieve_array_subset::<Vec<f32>>(&cells).unwrap();
    let class = array(&cube, "class");
    assert!(class.data_type().to_string().starts_with("int16"), "{}", class.data_type());
    let classes = class.retrieve_array_subset::<Vec<i16>>(&cells).unwrap();
    let fill = -127; // the source's nodata, which int16 holds
    for (i, &code) in codes.iter().enumerate() {
        if code == -127 {
            assert!(values[i].is_nan(), "cell {i}: nodata");
            assert_eq!(classes[i], fill, "cell {i}: nodata");
        } else {
            assert_eq!(values[i], f32::from(code), "cell {i}");
            assert_eq!(classes[i], i16::from(code), "cell {i}");
        }
    }
}
