//! Cubes from the real files in ../shared/data, compared with the `gdalwarp` program's warp of the same
//! sources onto the same grid, and time axes compared with the sources' own decoded times.

use crate::util::{
    TestGrid, array, assert_close, assert_close_area, cubeload, gdal_tool, gdalwarp, gen_ok, meta, read_f32,
    shared_data, unpacked_vrt,
};

/// Time coordinate of a cube as ISO strings (decoded from its CF units).
fn cube_times(cube: &std::path::Path) -> Vec<String> {
    let a = array(cube, "time");
    let units = a.attributes()["units"].as_str().unwrap().to_string();
    let calendar = a.attributes()["calendar"].as_str().unwrap().to_string();
    assert_eq!(calendar, "proleptic_gregorian");
    let n = a.shape()[0];
    #[allow(clippy::single_range_in_vec_init, reason = "a one-dimensional array subset, not a list")]
    let values = a.retrieve_array_subset::<Vec<i64>>(&[0..n]).unwrap();
    let cf = cubeload::time::CfTime::parse(&units, Some(&calendar)).unwrap();
    values.iter().map(|&v| cubeload::time::format_instant(cf.to_instant(v as f64).unwrap())).collect()
}

#[test]
fn era5_grib_hourly_equals_gdalwarp_bilinear() {
    let dir = tempfile::tempdir().unwrap();
    let grib = shared_data("era5-2mt-2019-03-uk.grib");
    let grid = TestGrid { bbox: [-8.0, 51.0, 0.0, 57.0], res: 0.1 };
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\n{}\ntime: {{ from: t2m }}\nlayout: {{ kind: pixel_series, batch: 64 }}\n\
             variables:\n  t2m: {{ path: {}, resampling: bilinear }}\n",
            grid.yaml(),
            grib.display()
        ),
    );
    // GRIB valid times: hourly through March 2019 (744 messages).
    let times = cube_times(&cube);
    assert_eq!(times.len(), 744);
    assert_eq!(times[0], "2019-03-01T00:00:00Z");
    assert_eq!(times[1], "2019-03-01T01:00:00Z");
    assert_eq!(times[743], "2019-03-31T23:00:00Z");
    // Chunk = batch: the whole series of 8 × 8 pixels.
    let t2m = array(&cube, "t2m");
    assert_eq!(t2m.shape(), &[744, 64, 80]);
    let m = meta(&cube);
    assert_eq!(m["layout"]["chunk_t"], 744);
    assert_eq!((m["layout"]["chunk_y"].as_u64(), m["layout"]["chunk_x"].as_u64()), (Some(8), Some(8)));
    assert_eq!(m["complete"], true);

    let (w, h, reference) = gdalwarp(grib.to_str().unwrap(), grid, "bilinear", dir.path());
    assert_eq!((w, h, reference.len()), (80, 60, 744));
    let values = read_f32(&cube, "t2m", Some(0..744), 60, 80);
    let plane = w * h;
    let mut compared = 0;
    for (t, band) in reference.iter().enumerate() {
        compared += assert_close(&format!("t2m step {t}"), &values[t * plane..(t + 1) * plane], band, 1e-6);
    }
    assert_eq!(compared, 744 * plane, "ERA5 has no missing values");
    // Kelvin, whatever GDAL's unit label says.
    let stats = &m["variables"][0]["stats"];
    assert!(stats["min"].as_f64().unwrap() > 260.0 && stats["max"].as_f64().unwrap() < 300.0, "{stats}");

    // The file's trailing bytes make GDAL's GRIB reader print some 40 lines with `printf`: neither on stdout,
    // which holds the summary alone, nor on stderr.
    let out = crate::util::cubeload(dir.path(), &["gen", "-c", "cube.yaml", "--overwrite"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("wrote ") && stdout.contains(": 1 variable, 744 × 60 × 80"), "{stdout}");
    assert!(!stderr.contains("GRIB2Inventory"), "{stderr}");
}

#[test]
fn cf_coordinates_rebuild_georeferencing_that_gdal_misses() {
    // tmean_1910: GDAL gives an identity geotransform (x/y lack standard_name), and reads the rows bottom-up
    // (its default when it sees no y axis), while the file's y runs north to south. The reference reads them
    // in the file's order (`GDAL_NETCDF_BOTTOMUP=NO`) and attaches the georeferencing the README documents
    // (x −200…700 km, y 1250…−200 km from the first row) with gdal_translate.
    let dir = tempfile::tempdir().unwrap();
    let nc = shared_data("tmean_1910_1910.nc");
    let grid = TestGrid { bbox: [-10.0, 50.0, 2.0, 58.0], res: 0.05 };
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\n{}\nlayout: {{ kind: pixel_series, batch: 256 }}\n\
             variables:\n  tmean: {{ path: {}, variable: tmean, static: true, resampling: average }}\n",
            grid.yaml(),
            nc.display()
        ),
    );
    let tif = dir.path().join("tmean.tif");
    let source = format!("NETCDF:\"{}\":tmean", nc.display());
    gdal_tool(
        "gdal_translate",
        &[
            "-q",
            "--config",
            "GDAL_NETCDF_BOTTOMUP",
            "NO",
            "-of",
            "GTiff",
            "-a_ullr",
            "-200000",
            "1250000",
            "700000",
            "-200000",
            &source,
            tif.to_str().unwrap(),
        ],
    );
    let (w, h, reference) = gdalwarp(tif.to_str().unwrap(), grid, "average", dir.path());
    let tmean = array(&cube, "tmean");
    assert_eq!(tmean.dimensionality(), 2, "static variables have no time axis");
    let values = read_f32(&cube, "tmean", None, h as u64, w as u64);
    let valid = assert_close_area("tmean", &values, &reference[0], w, 1e-5, 0.01);
    assert!(valid > 10_000, "{valid} valid cells");
    let m = meta(&cube);
    assert!(m["variables"][0]["notes"][0].as_str().unwrap().contains("CF x/y"), "{}", m["variables"][0]);
    let info = crate::util::cubeload(dir.path(), &["info", "cube.zarr"]);
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("\nnotes\n  tmean: ") && info.contains("CF x/y coordinate variables"), "{info}");
    // Its units, `degrees_celsius`, wider than the column's least width, leave the figures in line.
    let line = |start: &str| info.lines().find(|l| l.trim_start().starts_with(start)).unwrap();
    assert!(line("tmean").contains("degrees_celsius"), "{info}");
    // A cube of static variables only: its layout and chunks without a time axis.
    assert!(line("layout").ends_with("pixel_series: batch = 256 pixels (16 × 16)"), "{info}");
    assert!(line("chunks").starts_with("chunks     (16, 16) = one batch; "), "{info}");
    assert_eq!(
        line("name").find("valid").unwrap() + "valid".len(),
        line("tmean").find('%').unwrap() + 1,
        "{info}"
    );
}

#[test]
fn packed_int16_on_0_360_longitudes_is_wrapped_and_unpacked() {
    // The reference shifts the grid by −360° and unpacks with gdal_translate, then warps.
    let dir = tempfile::tempdir().unwrap();
    let nc = shared_data("SMALL_total_column_co2.nc");
    let grid = TestGrid { bbox: [-78.96, 23.56, -76.57, 25.56], res: 0.01 };
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\n{}\ntime: {{ start: 2006-01-01T06:00:00Z, end: 2006-01-08T18:00:00Z, step: 6h }}\n\
             layout: {{ kind: pixel_series, batch: 64 }}\nvariables:\n  tcco2: {{ path: {} }}\n",
            grid.yaml(),
            nc.display()
        ),
    );
    let times = cube_times(&cube);
    assert_eq!(times.len(), 31);
    assert_eq!(times[30], "2006-01-08T18:00:00Z");
    let vrt = dir.path().join("shifted.vrt");
    unpacked_vrt(
        &nc,
        &vrt,
        &["-a_srs", "EPSG:4326", "-a_ullr", "-360.5625", "90.5625", "-0.5625", "-90.5625"],
    );
    let (w, h, reference) = gdalwarp(vrt.to_str().unwrap(), grid, "bilinear", dir.path());
    let values = read_f32(&cube, "tcco2", Some(0..31), h as u64, w as u64);
    for (t, band) in reference.iter().enumerate() {
        let n = assert_close(&format!("tcco2 step {t}"), &values[t * w * h..(t + 1) * w * h], band, 1e-6);
        assert_eq!(n, w * h);
    }
    assert!((380.0..395.0).contains(&f64::from(values[0])), "unpacked kg m-2: {}", values[0]);
    // The extremes `info` gives are values of the cube, as stored (float32), not those before storing.
    let stats = &meta(&cube)["variables"][0]["stats"];
    let (min, max) =
        values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    assert_eq!((stats["min"].as_f64(), stats["max"].as_f64()), (Some(f64::from(min)), Some(f64::from(max))));
}

#[test]
fn packed_values_are_unpacked_before_kernels_that_do_not_commute_with_unpacking() {
    // tmmx is uint16 × 0.1 + 220: a sum of unpacked values counts the offset once per pixel, a root mean
    // square squares it. The same values under a negative scale (× −0.1 + 1000) swap min and max. The
    // reference unpacks with gdal_translate before gdalwarp.
    let dir = tempfile::tempdir().unwrap();
    let nc = shared_data("tmmx_20190121.nc");
    let negative = dir.path().join("negative.tif");
    gdal_tool(
        "gdal_translate",
        &["-q", "-a_scale", "-0.1", "-a_offset", "1000", nc.to_str().unwrap(), negative.to_str().unwrap()],
    );
    let grid = TestGrid { bbox: [-91.0, 27.0, -84.6, 32.0], res: 0.2 };
    let variable = |name: &str, path: &std::path::Path, resampling: &str| {
        format!("  {name}: {{ path: {}, static: true, resampling: {resampling} }}\n", path.display())
    };
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\n{}\nlayout: {{ kind: pixel_series, batch: 64 }}\nvariables:\n{}{}{}{}",
            grid.yaml(),
            variable("total", &nc, "sum"),
            variable("rms", &nc, "rms"),
            variable("warmest", &negative, "max"),
            variable("coldest", &negative, "min"),
        ),
    );
    for (name, source, resampling) in [
        ("total", &nc, "sum"),
        ("rms", &nc, "rms"),
        ("warmest", &negative, "max"),
        ("coldest", &negative, "min"),
    ] {
        let unpacked = dir.path().join(format!("{name}.vrt"));
        unpacked_vrt(source, &unpacked, &[]);
        let (w, h, reference) = gdalwarp(unpacked.to_str().unwrap(), grid, resampling, dir.path());
        let values = read_f32(&cube, name, None, h as u64, w as u64);
        let valid = assert_close_area(name, &values, &reference[0], w, 1e-5, 0.01);
        assert!(valid > w * h / 3, "{name}: {valid} cells compared (the rest is sea)");
    }
    // Physical values, not stored ones: a sum of some 23 kelvin temperatures per cell, a maximum of the
    // negatively scaled ones (1000 − 0.1 × stored) above their minimum.
    // The known fault of GDAL's sum kernel is said, and kept in the cube's notes.
    let info = cubeload(dir.path(), &["info", cube.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("total: GDAL's `sum` kernel may leave out"));
    let total = read_f32(&cube, "total", None, 25, 32).into_iter().fold(f32::NAN, f32::max);
    assert!(total > 20.0 * 250.0, "largest sum of kelvins: {total}");
    let (warmest, coldest) =
        (read_f32(&cube, "warmest", None, 25, 32), read_f32(&cube, "coldest", None, 25, 32));
    assert!(warmest.iter().zip(&coldest).all(|(w, c)| w >= c || w.is_nan() || c.is_nan()), "max below min");
    assert!(warmest.iter().zip(&coldest).any(|(w, c)| w > c), "max and min never differ");
}

#[test]
fn calendar_360_day_times_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let nc = shared_data("tos_O1_2001-2002.nc");
    let grid = TestGrid { bbox: [60.0, -20.0, 90.0, 0.0], res: 1.0 };
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\n{}\ntime: {{ from: tos }}\nlayout: {{ kind: pixel_series, batch: 25 }}\n\
             variables:\n  tos: {{ path: {}, resampling: nearest }}\n",
            grid.yaml(),
            nc.display()
        ),
    );
    // 15 days since 2001-01-01 in the 360_day calendar is 2001-01-16, then every 30 days: the 16th of each month.
    let times = cube_times(&cube);
    let expected: Vec<String> =
        (0..24).map(|i| format!("{}-{:02}-16T00:00:00Z", 2001 + i / 12, i % 12 + 1)).collect();
    assert_eq!(times, expected);
    let (w, h, reference) = gdalwarp(nc.to_str().unwrap(), grid, "near", dir.path());
    let values = read_f32(&cube, "tos", Some(0..24), h as u64, w as u64);
    for (t, band) in reference.iter().enumerate() {
        assert_close(&format!("tos step {t}"), &values[t * w * h..(t + 1) * w * h], band, 1e-6);
    }
}

#[test]
fn polar_stereographic_grib_equals_gdalwarp_average() {
    let dir = tempfile::tempdir().unwrap();
    let grib = shared_data("ST4.2013052210.01h");
    let grid = TestGrid { bbox: [-80.6, 33.0, -75.0, 37.0], res: 0.04 };
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\n{}\nlayout: {{ kind: pixel_series, batch: 100 }}\n\
             variables:\n  apcp: {{ path: {}, static: true, resampling: average }}\n",
            grid.yaml(),
            grib.display()
        ),
    );
    let (w, h, reference) = gdalwarp(grib.to_str().unwrap(), grid, "average", dir.path());
    let values = read_f32(&cube, "apcp", None, h as u64, w as u64);
    let valid = assert_close_area("apcp", &values, &reference[0], w, 1e-5, 0.01);
    assert!(valid > w * h / 2);
}

#[test]
fn categorical_albers_map_keeps_integer_classes() {
    let dir = tempfile::tempdir().unwrap();
    let tif = shared_data("lc.tif");
    let grid = TestGrid { bbox: [-67.5, 17.2, -64.96, 19.16], res: 0.02 };
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\n{}\nlayout: {{ kind: pixel_series, batch: 64 }}\n\
             variables:\n  lc: {{ path: {}, kind: categorical, resampling: mode }}\n",
            grid.yaml(),
            tif.display()
        ),
    );
    let lc = array(&cube, "lc");
    assert!(lc.data_type().to_string().starts_with("uint8"));
    assert_eq!(lc.dimensionality(), 2, "a single-band file without time is static");
    let (w, h, reference) = gdalwarp(tif.to_str().unwrap(), grid, "mode", dir.path());
    let values = lc.retrieve_array_subset::<Vec<u8>>(&[0..h as u64, 0..w as u64]).unwrap();
    let fill = meta(&cube)["variables"][0]["fill_value"].as_f64().unwrap();
    assert_eq!(fill, 255.0, "no nodata in the file: the largest uint8 is the declared fill value");
    let classes = [0u8, 11, 21, 22, 23, 24, 31, 42, 52, 71, 81, 82, 90, 95];
    for (i, &c) in values.iter().enumerate() {
        assert!(c == 255 || classes.contains(&c), "cell {i}: {c} is not an NLCD class");
    }
    let as_float: Vec<f32> = values.iter().map(|&c| if c == 255 { f32::NAN } else { f32::from(c) }).collect();
    // One ring of partially covered cells around the footprint: GDAL keeps them, cubeload does not.
    let valid = assert_close_area("lc", &as_float, &reference[0], w, 0.0, 0.06);
    assert!(valid > w * h / 3, "{valid}");
}

/// A nodata the bytes cannot hold marks no cell: the cube's fill value is then the largest byte, stored as
/// the array's own, so that a chunk left unstored (all fill) reads as missing by every reader.
#[test]
fn categorical_nodata_outside_the_data_type_leaves_a_fill_value_the_cube_can_store() {
    let dir = tempfile::tempdir().unwrap();
    let tif = shared_data("lc.tif");
    let grid = TestGrid { bbox: [-67.5, 17.2, -66.5, 18.2], res: 0.02 };
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\n{}\nlayout: {{ kind: pixel_series, batch: 64 }}\n\
             variables:\n  lc: {{ path: {}, kind: categorical, resampling: mode, nodata: -9999 }}\n",
            grid.yaml(),
            tif.display()
        ),
    );
    let variable = &meta(&cube)["variables"][0];
    assert_eq!(variable["fill_value"].as_f64(), Some(255.0), "{variable}");
    let notes = variable["notes"].to_string();
    assert!(notes.contains("nodata -9999 does not fit uint8"), "{notes}");
    let lc = array(&cube, "lc");
    assert_eq!(lc.fill_value().as_ne_bytes(), &[255u8][..], "the array stores the declared fill value");
}

#[test]
fn sentinel2_irregular_dates_equal_gdalwarp_per_date() {
    let dir = tempfile::tempdir().unwrap();
    let nc = shared_data("converted/eopatch_S2_NDVI_CLM_2015-2017_utm33n.nc");
    let grid = TestGrid { bbox: [14.5513, 45.8659, 14.5643, 45.875], res: 0.0001 };
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\n{}\ntime: {{ from: ndvi }}\n\
             layout: {{ kind: image_sequence, seq_len: 8, patch: [32, 32], batch: 4 }}\n\
             variables:\n  ndvi: {{ path: {}, variable: NDVI }}\n",
            grid.yaml(),
            nc.display()
        ),
    );
    let times = cube_times(&cube);
    assert_eq!(times.len(), 72, "68 dates padded to whole sequences of 8");
    assert_eq!(times[0], "2015-07-11T10:00:08Z");
    let same_day: Vec<&String> = times.iter().filter(|t| t.starts_with("2015-12-08")).collect();
    assert_eq!(same_day.len(), 2, "two acquisitions on 2015-12-08 stay two steps: {same_day:?}");
    let m = meta(&cube);
    assert_eq!(m["time"]["steps"], 68);
    assert_eq!(m["time"]["step"], serde_json::Value::Null, "irregular axis");
    let ndvi = array(&cube, "ndvi");
    let chunk = ndvi.chunk_shape(&[0, 0, 0]).unwrap();
    let chunk: Vec<u64> = chunk.iter().map(|c| c.get()).collect();
    assert!(chunk == [8, 64, 64] || chunk[1] == 64, "chunk (or shard) of 2 × 2 patches of 32: {chunk:?}");
    assert_eq!(ndvi.shape(), &[72, 128, 192], "padded to whole batches");
    // `info` gives the real and the stored lengths, as the README says xarray shows the stored ones.
    let info = cubeload(dir.path(), &["info", cube.to_str().unwrap()]);
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("68 steps") && info.contains("stored as 72 (padded"), "{info}");
    assert!(info.contains("130 × 91 cells") && info.contains("stored as 192 × 128 (padded"), "{info}");

    let source = format!("NETCDF:\"{}\":NDVI", nc.display());
    let (w, h, reference) = gdalwarp(&source, grid, "bilinear", dir.path());
    assert_eq!(reference.len(), 68);
    let values = read_f32(&cube, "ndvi", Some(0..68), h as u64, w as u64);
    let mut compared = 0;
    for (t, band) in reference.iter().enumerate() {
        compared += assert_close(&format!("ndvi date {t}"), &values[t * w * h..(t + 1) * w * h], band, 1e-5);
    }
    assert!(compared > 68 * w * h / 2);
}

#[test]
fn curvilinear_grid_uses_geolocation_arrays_like_gdalwarp() {
    let dir = tempfile::tempdir().unwrap();
    let nc = shared_data("test_stageiv_xyt.nc");
    let grid = TestGrid { bbox: [-80.0, 33.0, -75.0, 37.0], res: 0.05 };
    let var = "Total_precipitation_surface_1_Hour_Accumulation";
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\n{}\ntime: {{ from: precip }}\nlayout: {{ kind: pixel_series, batch: 100 }}\n\
             variables:\n  precip: {{ path: {}, variable: {var} }}\n",
            grid.yaml(),
            nc.display()
        ),
    );
    let times = cube_times(&cube);
    assert_eq!((times.len(), times[0].as_str()), (23, "2018-09-13T19:00:00Z"));
    let source = format!("NETCDF:\"{}\":{var}", nc.display());
    let (w, h, reference) = gdalwarp(&source, grid, "bilinear", dir.path());
    let values = read_f32(&cube, "precip", Some(0..23), h as u64, w as u64);
    let mut compared = 0;
    for (t, band) in reference.iter().enumerate() {
        compared +=
            assert_close(&format!("precip step {t}"), &values[t * w * h..(t + 1) * w * h], band, 1e-5);
    }
    assert!(compared > 23 * w * h / 2, "{compared}");
}

#[test]
fn blocks_split_along_x_give_the_same_cube() {
    // A tiny block budget splits every chunk row into one block per shard (one chunk each with shard: none):
    // the warp windows change, the cube must not.
    let dir = tempfile::tempdir().unwrap();
    let make = |name: &str, block_bytes: Option<usize>| {
        let text = format!(
            "output: {}\ngrid: {{ bbox: [-10.0, 50.0, 2.0, 58.0], resolution: 0.1 }}\ntime: {{ from: t2m }}\n\
             layout: {{ kind: pixel_series, batch: 64, shard: none }}\nvariables:\n  t2m: {{ path: {} }}\n  \
             tmean: {{ path: {}, variable: tmean, static: true, resampling: average }}\n",
            dir.path().join(name).display(),
            shared_data("era5-2mt-2019-03-uk.grib").display(),
            shared_data("tmean_1910_1910.nc").display()
        );
        let config = cubeload::Config::from_yaml(&text, std::path::Path::new("t.yaml")).unwrap();
        let plan = cubeload::Plan::new(config, text.clone()).unwrap();
        let options = cubeload::GenOptions { block_bytes, ..Default::default() };
        cubeload::generate(&plan, &options, &|_, _| {}).unwrap()
    };
    let whole = make("whole.zarr", None);
    let split = make("split.zarr", Some(1));
    assert!(split.blocks > whole.blocks, "{} blocks vs {}", split.blocks, whole.blocks);
    let t2m = |cube: &std::path::Path| read_f32(cube, "t2m", Some(0..744), 80, 120);
    let (a, b) = (t2m(&whole.path), t2m(&split.path));
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    let tmean = |cube: &std::path::Path| read_f32(cube, "tmean", None, 80, 120);
    let (a, b) = (tmean(&whole.path), tmean(&split.path));
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    // Statistics are merged in another order (and accumulated in f64 before the cast): equal to 1e-12.
    let (mw, ms) = (meta(&whole.path), meta(&split.path));
    for i in 0..2 {
        let (vw, vs) = (&mw["variables"][i], &ms["variables"][i]);
        assert_eq!(vw["valid_fraction"], vs["valid_fraction"]);
        assert_eq!(vw["stats"]["count"], vs["stats"]["count"]);
        for key in ["mean", "std", "min", "max"] {
            let (x, y) = (vw["stats"][key].as_f64().unwrap(), vs["stats"][key].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-12 * x.abs().max(1.0), "{key}: {x} vs {y}");
        }
        let name = vw["name"].as_str().unwrap();
        let index = |cube: &std::path::Path| {
            let a = array(cube, &format!("cubeload_index/{name}"));
            let subset: Vec<std::ops::Range<u64>> = a.shape().iter().map(|&n| 0..n).collect();
            a.retrieve_array_subset::<Vec<f32>>(&subset).unwrap()
        };
        assert_eq!(index(&whole.path), index(&split.path), "validity index of {name}");
    }
}

#[test]
fn cells_beyond_the_data_are_missing_in_blocks_that_no_source_pixel_reaches() {
    // The data ends at 37.125°N. Batches of 2 × 2 cells make chunk rows of 2 cells: those north of the edge
    // are warped from no source pixel at all, which GDAL skips, and must hold NaN as the cells beyond the
    // edge in the rows that touch it do (not the 0.0 of a buffer GDAL never wrote).
    let dir = tempfile::tempdir().unwrap();
    let nc = shared_data("bcsd_obs_1999.nc");
    let grid = TestGrid { bbox: [-80.0, 36.0, -79.0, 39.0], res: 0.125 };
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\n{}\ntime: {{ from: pr }}\nlayout: {{ kind: pixel_series, batch: 4 }}\n\
             variables:\n  pr: {{ path: {}, variable: pr }}\n",
            grid.yaml(),
            nc.display()
        ),
    );
    let (h, w) = (24, 8);
    let values = read_f32(&cube, "pr", Some(0..12), h as u64, w as u64);
    for (i, v) in values.iter().enumerate() {
        let row = (i / w) % h;
        let centre = 39.0 - (row as f64 + 0.5) * 0.125;
        // Inland North Carolina and Virginia: every cell inside the data has a value.
        assert_eq!(v.is_nan(), centre > 37.125, "step {}, row {row} (lat {centre}): {v}", i / (h * w));
    }
    let stats = &meta(&cube)["variables"][0]["stats"];
    assert!(stats["min"].as_f64().unwrap() > 10.0, "{stats}");

    // A bbox beside the data, within the margin the overlap check allows for interpolation: a cube, and a
    // warning that the variable has no value in it.
    let config = std::fs::read_to_string(dir.path().join("cube.yaml")).unwrap();
    let beside = dir.path().join("beside.yaml");
    let bbox = "bbox: [-80.0, 37.2, -79.0, 37.3], resolution: 0.05";
    std::fs::write(&beside, config.replace("bbox: [-80, 36, -79, 39], resolution: 0.125", bbox)).unwrap();
    assert!(std::fs::read_to_string(&beside).unwrap().contains(bbox));
    let out = crate::util::cubeload(dir.path(), &["gen", "-c", "beside.yaml", "--overwrite"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("warning: variable `pr` has no valid value in the cube"), "{stderr}");
}

#[test]
fn a_sum_onto_finer_steps_is_not_counted_again_in_each() {
    // Monthly precipitation totals onto a daily axis: each total lands on the day it is dated, and the days
    // without a source step are missing (copied from the nearest month, the year's cube summed to many
    // times the source's total).
    let dir = tempfile::tempdir().unwrap();
    let nc = shared_data("bcsd_obs_1999.nc");
    let grid = TestGrid { bbox: [-80.0, 35.0, -79.0, 36.0], res: 0.125 };
    let config = format!(
        "output: cube.zarr\n{}\ntime: {{ start: 1999-01-01, end: 1999-12-31, step: 1d }}\n\
         layout: {{ kind: pixel_series, batch: 64 }}\n\
         variables:\n  pr: {{ path: {}, variable: pr, resampling: nearest, aggregation: sum }}\n",
        grid.yaml(),
        nc.display()
    );
    std::fs::write(dir.path().join("cube.yaml"), &config).unwrap();
    let out = cubeload(dir.path(), &["gen", "-c", "cube.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("of 365 stored steps hold no source step and are missing"), "{stderr}");
    let cube = dir.path().join("cube.zarr");
    let (w, h, reference) = gdalwarp(&format!("NETCDF:\"{}\":pr", nc.display()), grid, "near", dir.path());
    assert_eq!(reference.len(), 12);
    let values = read_f32(&cube, "pr", Some(0..365), h as u64, w as u64);
    let (mut days_with_values, mut checked) = (0, 0);
    for cell in 0..w * h {
        let series: Vec<f32> = (0..365).map(|t| values[t * w * h + cell]).filter(|v| !v.is_nan()).collect();
        let total: f64 = reference.iter().map(|band| band[cell]).sum();
        if total.is_nan() {
            continue;
        }
        days_with_values = days_with_values.max(series.len());
        let cube_total: f64 = series.iter().map(|&v| f64::from(v)).sum();
        assert!(
            (cube_total - total).abs() < 1e-3 * total.abs().max(1.0),
            "cell {cell}: {cube_total} vs {total}"
        );
        checked += 1;
    }
    assert!(checked > w * h / 2, "{checked}");
    assert_eq!(days_with_values, 12, "one day per month");

    // A sum whose every step would be copied from a sparser source is refused, naming the key.
    let sparse = config.replace("start: 1999-01-01, end: 1999-12-31", "start: 1999-01-02, end: 1999-01-20");
    std::fs::write(dir.path().join("sparse.yaml"), sparse).unwrap();
    let out = cubeload(dir.path(), &["gen", "-c", "sparse.yaml", "--overwrite"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("variables.pr.aggregation"), "{stderr}");
}

#[test]
fn julian_calendar_dates_are_kept_as_written() {
    // A NetCDF in CF's julian calendar: its 1900-02-29, a day the Gregorian calendar lacks, goes on
    // February's last day (as a 360_day calendar's days past a month's end do); the others keep their dates
    // (cftime.num2date(v, "days since 1900-01-01", calendar="julian")).
    let dir = tempfile::tempdir().unwrap();
    let cdl = dir.path().join("julian.cdl");
    let mut text = String::from(
        "netcdf julian {\ndimensions:\n lat = 2 ;\n lon = 3 ;\n time = 3 ;\nvariables:\n\
         double lat(lat) ;\n  lat:units = \"degrees_north\" ;\n  lat:standard_name = \"latitude\" ;\n\
         double lon(lon) ;\n  lon:units = \"degrees_east\" ;\n  lon:standard_name = \"longitude\" ;\n\
         double time(time) ;\n  time:units = \"days since 1900-01-01\" ;\n  time:calendar = \"julian\" ;\n\
         time:standard_name = \"time\" ;\n float x(time, lat, lon) ;\ndata:\n lat = 46.5, 45.5 ;\n\
         lon = 10.5, 11.5, 12.5 ;\n time = 58, 60, 425 ;\n x = ",
    );
    text += &(0..18).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    text += " ;\n}\n";
    std::fs::write(&cdl, text).unwrap();
    let nc = dir.path().join("julian.nc");
    let status = std::process::Command::new("ncgen")
        .args(["-o", nc.to_str().unwrap(), cdl.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\ngrid: {{ bbox: [10.0, 45.0, 13.0, 47.0], resolution: 1.0 }}\n\
             time: {{ from: x }}\nlayout: {{ kind: pixel_series, batch: 6 }}\n\
             variables:\n  x: {{ path: {}, resampling: nearest }}\n",
            nc.display()
        ),
    );
    assert_eq!(cube_times(&cube), ["1900-02-28T00:00:00Z", "1900-03-01T00:00:00Z", "1901-03-01T00:00:00Z"]);
    let values = read_f32(&cube, "x", Some(0..3), 2, 3);
    let expected: Vec<f32> = (0..18).map(|i| i as f32).collect();
    assert_eq!(values, expected);
}
