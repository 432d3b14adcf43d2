//! Bad input: every case gets a message naming the culprit, exit code 2 (config, usage) or 1 (runtime),
//! no panic, and nothing that existed before is modified.

use std::path::Path;

use crate::util::{cubeload, gen_err, gen_ok, shared_data, walk};

const GRID: &str = "grid: { bbox: [-8.0, 51.0, 0.0, 57.0], resolution: 0.5 }";

fn config(variables: &str) -> String {
    format!("output: cube.zarr\n{GRID}\nlayout: {{ kind: pixel_series, batch: 16 }}\nvariables:\n{variables}")
}

fn era5() -> String {
    shared_data("era5-2mt-2019-03-uk.grib").display().to_string()
}

fn era5_config() -> String {
    format!(
        "output: cube.zarr\n{GRID}\ntime: {{ from: t2m }}\nlayout: {{ kind: pixel_series, batch: 16 }}\n\
         variables:\n  t2m: {{ path: {} }}\n",
        era5()
    )
}

fn assert_mentions(stderr: &str, parts: &[&str]) {
    for part in parts {
        assert!(stderr.contains(part), "expected `{part}` in: {stderr}");
    }
}

#[test]
fn config_errors_exit_2_and_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(String, Vec<&str>)> = vec![
        (era5_config().replace("batch: 16", "batch: 16, bacth: 3"), vec!["bacth", "line 4"]),
        (era5_config().replace("batch: 16", "batch: sixteen"), vec!["line 4"]),
        (era5_config().replace("layout: {", "layout: {{"), vec!["line"]),
        (era5_config().replace("[-8.0, 51.0, 0.0, 57.0]", "[0.0, 51.0, -8.0, 57.0]"), vec!["grid.bbox"]),
        (era5_config().replace("resolution: 0.5", "resolution: 0"), vec!["grid.resolution"]),
        (
            era5_config().replace("resolution: 0.5", "resolution: 50"),
            vec!["grid.resolution", "smaller than one cell"],
        ),
        (era5_config().replace("from: t2m", "from: t3m"), vec!["time.from", "t3m"]),
        (
            era5_config().replace("from: t2m", "start: 2019-03-01, end: 2019-02-01, step: 1h"),
            vec!["time.end"],
        ),
        (
            era5_config().replace("from: t2m", "start: 2019-03-01, end: 2019-03-02, step: 1M"),
            vec!["time.step"],
        ),
        (era5_config().replace("batch: 16", "batch: 16, tile: [3, 3]"), vec!["layout.tile"]),
        (
            era5_config().replace("{ path:", "{ kind: categorical, resampling: bilinear, path:"),
            vec!["resampling"],
        ),
        (era5_config().replace("time: { from: t2m }\n", ""), vec!["time", "t2m"]),
        // A file of one dated map (a daily maximum): a series of one step, or a map with `static: true`.
        (
            config(&format!("  tmax: {{ path: {} }}\n", shared_data("tmmx_20190121.nc").display()))
                .replace(GRID, "grid: { bbox: [-91.0, 27.0, -84.6, 32.0], resolution: 0.2 }"),
            vec!["config key `time`", "`variables.tmax.static: true`"],
        ),
        (era5_config().replace("variables:", "variables: {}\nx:"), vec!["line"]),
    ];
    for (text, parts) in cases {
        let (code, stderr) = gen_err(dir.path(), &text);
        assert_eq!(code, 2, "{text}\n{stderr}");
        assert_mentions(&stderr, &parts);
    }
    assert!(!dir.path().join("cube.zarr").exists());
    let out = cubeload(dir.path(), &["gen", "-c", "no-such-config.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert_mentions(&String::from_utf8_lossy(&out.stderr), &["no-such-config.yaml"]);
    let out = cubeload(dir.path(), &["gen", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn misfit_disjoint_or_absurd_configs_exit_2_name_the_keys_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep.txt"), b"mine").unwrap();
    let before = snapshot(dir.path());
    let image = |layout: &str| era5_config().replace("{ kind: pixel_series, batch: 16 }", layout);
    let cases: Vec<(String, Vec<&str>)> = vec![
        // Misspelled keys at every level, wrong types, negative and zero sizes.
        (era5_config().replace("variables:", "varaibles:"), vec!["varaibles", "line 5"]),
        (era5_config().replace("{ path:", "{ resamplng: average, path:"), vec!["resamplng", "line 6"]),
        (era5_config().replace("[-8.0, 51.0, 0.0, 57.0]", "west"), vec!["line 2"]),
        (era5_config().replace("resolution: 0.5", "resolution: -0.5"), vec!["grid.resolution"]),
        (era5_config().replace("batch: 16", "batch: 0"), vec!["layout.batch"]),
        (era5_config().replace("batch: 16", "batch: -16"), vec!["line 4"]),
        (era5_config().replace("resolution: 0.5", "size: [0, 10]"), vec!["grid.size"]),
        (image("{ kind: image_sequence, seq_len: 4, patch: [0, 4], batch: 1 }"), vec!["layout.patch"]),
        (
            era5_config().replace("time: { from: t2m }", "time:\n\t- from"),
            vec!["line 4", "cannot start any token"],
        ),
        // Batches that do not fit the 12 × 16 grid or the 744 steps of the time axis.
        (
            era5_config().replace("batch: 16", "batch: 169"),
            vec!["layout.batch", "13 × 13 tile", "12 × 16 grid"],
        ),
        (era5_config().replace("batch: 16", "batch: 256"), vec!["layout.batch", "batch of 256 samples"]),
        (era5_config().replace("batch: 16", "batch: 32, tile: [1, 32]"), vec!["layout.tile", "1 × 32"]),
        (era5_config().replace("batch: 16", "batch: 16, window: 1000"), vec!["layout.window", "744"]),
        (image("{ kind: image_sequence, seq_len: 4, patch: [32, 32], batch: 1 }"), vec!["layout.patch"]),
        (
            image("{ kind: image_sequence, seq_len: 800, patch: [4, 4], batch: 1 }"),
            vec!["layout.seq_len", "744"],
        ),
        (
            image("{ kind: image_sequence, seq_len: 4, patch: [8, 8], batch: 4 }"),
            vec!["layout.batch", "2 × 2"],
        ),
        // Names of the cube's own files and groups, and of its description.
        (
            era5_config().replace("  t2m: {", "  cubeload_index: {"),
            vec!["variables.cubeload_index", "reserved"],
        ),
        (
            era5_config().replace("  t2m: {", "  cubeload_manifest.jsonl: {"),
            vec!["variables.cubeload_manifest.jsonl", "reserved"],
        ),
        (era5_config().replace("  t2m: {", "  zarr.json: {"), vec!["variables.zarr.json", "reserved"]),
        (era5_config().replace("  t2m: {", "  coarse_2: {"), vec!["variables.coarse_2", "reserved"]),
        (era5_config().replace("  t2m: {", "  sample: {"), vec!["variables.sample", "reserved"]),
        (format!("{}metadata: {{ cubeload: mine }}\n", era5_config()), vec!["metadata.cubeload", "reserved"]),
        // A native resolution finer than the target's by less than half a cell.
        (
            era5_config()
                .replace("batch: 16 }", "batch: 16, multires: true }")
                .replace("{ path:", "{ resolution: 0.3, path:"),
            vec!["variables.t2m.resolution", "finer than the target grid"],
        ),
        // A time axis beside the data's (March 2019).
        (
            era5_config().replace("from: t2m", "start: 2020-03-01, end: 2020-03-31, step: 1d"),
            vec![
                "config key `time`",
                "variable `t2m` no step",
                "2019-03-01T00:00:00Z … 2019-03-31T23:00:00Z",
            ],
        ),
        // A bbox beside the data (ERA5 covers the UK).
        (
            era5_config().replace("[-8.0, 51.0, 0.0, 57.0]", "[100.0, -10.0, 110.0, 0.0]"),
            vec!["grid.bbox", "`t2m`", "era5-2mt-2019-03-uk.grib", "covers lon"],
        ),
        // Sizes that would exhaust memory or disk, refused before anything is written.
        (
            era5_config()
                .replace("resolution: 0.5", "resolution: 0.004")
                .replace("batch: 16", "batch: 2250000"),
            vec!["layout.batch", "decoded", "6.7 GB"],
        ),
        (
            era5_config()
                .replace("resolution: 0.5", "resolution: 0.00002")
                .replace("batch: 16", "batch: 65536"),
            vec!["grid.resolution", "400000 cells", "744 time steps", "free"],
        ),
        (
            era5_config().replace("resolution: 0.5", "resolution: 0.000008"),
            vec!["layout.batch", "grid.resolution", "batch chunks"],
        ),
        (
            era5_config()
                .replace("resolution: 0.5", "resolution: 0.000008")
                .replace("batch: 16", "batch: 65536"),
            vec!["grid.resolution", "uncompressed, more than 1.1 PB"],
        ),
        (
            era5_config().replace("resolution: 0.5", "size: [100000000000, 10]"),
            vec!["grid.size", "too large"],
        ),
    ];
    for (text, parts) in cases {
        let (code, stderr) = gen_err(dir.path(), &text);
        assert_eq!(code, 2, "{text}\n{stderr}");
        assert_mentions(&stderr, &parts);
        std::fs::remove_file(dir.path().join("cube.yaml")).unwrap();
        assert_eq!(snapshot(dir.path()), before, "nothing written or modified:\n{text}");
    }
}

#[test]
fn unusable_sources_exit_1_and_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.tif");
    std::fs::write(&empty, b"").unwrap();
    let garbage = dir.path().join("garbage.nc");
    std::fs::write(&garbage, vec![0x42u8; 4096]).unwrap();
    let eraint = shared_data("extra/eraint_uvz.nc");
    let l3b = shared_data("extra/L3B_S2B_00390821JXN0L2A_20210319_20220730_C01.nc");
    let bcsd = shared_data("bcsd_obs_1999.nc");
    let rgb = shared_data("RGB.byte.tif");
    // Corrupt variants of the real files: cut in the middle of a GRIB message and of a NetCDF-4 (HDF5) file,
    // a GeoTIFF whose header is zeroed, a NetCDF whose time axis has no CF units.
    let era5 = std::fs::read(shared_data("era5-2mt-2019-03-uk.grib")).unwrap();
    let cut_grib = dir.path().join("cut.grib");
    std::fs::write(&cut_grib, &era5[..era5.len() / 2 + 1000]).unwrap();
    let empty_grib = dir.path().join("empty.grib");
    std::fs::write(&empty_grib, b"").unwrap();
    let tmean = std::fs::read(shared_data("tmean_1910_1910.nc")).unwrap();
    let cut_nc = dir.path().join("cut.nc");
    std::fs::write(&cut_nc, &tmean[..tmean.len() / 2]).unwrap();
    let mut dem = std::fs::read(shared_data("converted/eopatch_DEM_utm33n.tif")).unwrap();
    dem[..64].fill(0);
    let zeroed = dir.path().join("zeroed.tif");
    std::fs::write(&zeroed, &dem).unwrap();
    let tos = std::fs::read(shared_data("tos_O1_2001-2002.nc")).unwrap();
    let at = tos.windows(19).position(|w| w == b"days since 2001-1-1").expect("the CF units of tos");
    let mut no_cf = tos.clone();
    no_cf[at..at + 19].copy_from_slice(b"furlongs north fine");
    let no_cf_time = dir.path().join("no_cf_time.nc");
    std::fs::write(&no_cf_time, &no_cf).unwrap();
    // A classic NetCDF cut short: netCDF-C would read the rest as fill values, without an error.
    let cut_classic = dir.path().join("cut_classic.nc");
    std::fs::write(&cut_classic, &tos[..tos.len() - 5000]).unwrap();
    let with_time = |path: &Path, grid: &str| {
        format!(
            "output: cube.zarr\n{grid}\ntime: {{ from: a }}\nlayout: {{ kind: pixel_series, batch: 16 }}\n\
             variables:\n  a: {{ path: {} }}\n",
            path.display()
        )
    };
    // A series of dated maps with one file its name does not date.
    let series = dir.path().join("series");
    std::fs::create_dir(&series).unwrap();
    for name in ["lc_2020-01-01.tif", "lc_latest.tif", "lc_2020-01-02.tif"] {
        std::fs::copy(shared_data("lc.tif"), series.join(name)).unwrap();
    }
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            with_time(
                &series.join("lc_*.tif"),
                "grid: { bbox: [-67.0, 17.5, -65.5, 19.0], resolution: 0.1 }",
            ),
            vec!["lc_latest.tif".into(), "no date in its name".into()],
        ),
        (with_time(&cut_grib, GRID), vec!["cut.grib".into(), "band 373".into()]),
        (
            config(&format!("  a: {{ path: {} }}\n", empty_grib.display())),
            vec!["empty.grib".into(), "empty".into()],
        ),
        (
            config(&format!("  a: {{ path: {}, variable: tmean }}\n", cut_nc.display())),
            vec!["cut.nc".into(), "cannot read it".into()],
        ),
        (
            config(&format!("  a: {{ path: {} }}\n", zeroed.display())),
            vec!["zeroed.tif".into(), "variable `a`: GDAL cannot read it as a raster".into()],
        ),
        // A directory named as a file: the variable named, and how to read its files.
        (
            config(&format!("  a: {{ path: {} }}\n", series.display())),
            vec!["variable `a`: a directory, not a file".into(), "/*.tif".into()],
        ),
        (
            with_time(&cut_classic, "grid: { bbox: [60.0, -20.0, 90.0, 0.0], resolution: 1.0 }"),
            vec![
                "cut_classic.nc".into(),
                "is truncated".into(),
                format!("the file has {}", tos.len() - 5000),
            ],
        ),
        (
            with_time(&no_cf_time, "grid: { bbox: [60.0, -20.0, 90.0, 0.0], resolution: 1.0 }"),
            vec!["no_cf_time.nc".into(), "not a CF time axis".into(), "furlongs".into()],
        ),
        (config("  a: { path: missing.tif }\n"), vec!["missing.tif".into(), "no such file".into()]),
        (config("  a: { path: \"nothing/*.tif\" }\n"), vec!["nothing/*.tif".into()]),
        (
            config(&format!("  a: {{ path: {} }}\n", empty.display())),
            vec!["empty.tif".into(), "empty".into()],
        ),
        (config(&format!("  a: {{ path: {} }}\n", garbage.display())), vec!["garbage.nc".into()]),
        (
            config(&format!("  b: {{ path: {}, variable: blue }}\n", l3b.display())),
            vec!["L3B_S2B".into(), "crs".into()],
        ),
    ];
    for (text, parts) in cases {
        let (code, stderr) = gen_err(dir.path(), &text);
        assert_eq!(code, 1, "{text}\n{stderr}");
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        assert_mentions(&stderr, &parts);
        assert!(!dir.path().join("cube.zarr").exists());
    }
    // A config that names what the file does not have, or does not choose among what it has: exit 2, with
    // the key and the file.
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            config(&format!("  a: {{ path: {}, variable: prr }}\n", bcsd.display())),
            vec!["variables.a.variable", "bcsd_obs_1999.nc", "prr", "pr, tas"],
        ),
        (
            config(&format!("  a: {{ path: {} }}\n", bcsd.display())),
            vec!["variables.a.variable", "bcsd_obs_1999.nc", "variable:"],
        ),
        (
            config(&format!("  rgb: {{ path: {} }}\n", rgb.display())),
            vec!["variables.rgb.band", "RGB.byte.tif"],
        ),
        (
            config(&format!("  rgb: {{ path: {}, band: 4, static: true }}\n", rgb.display())),
            vec!["variables.rgb.band", "RGB.byte.tif", "band 4"],
        ),
        (
            config(&format!("  lc: {{ path: {}, crs: EPSG:999999 }}\n", shared_data("lc.tif").display())),
            vec!["variables.lc.crs", "lc.tif", "EPSG:999999"],
        ),
        (
            config(&format!(
                "  b: {{ path: {}, band: 1, crs: EPSG:4326 }}\n",
                shared_data("L7_ETMs.tif").display()
            )),
            vec!["variables.b.crs", "L7_ETMs.tif", "not degrees"],
        ),
        (
            config(&format!("  rgb: {{ path: {}, static: true }}\n", rgb.display())),
            vec!["variables.rgb.band", "RGB.byte.tif", "has 3 bands", "a static variable is one map"],
        ),
        (
            config(&format!("  z: {{ path: {}, variable: z }}\n", eraint.display())),
            vec!["variables.z.band", "eraint_uvz.nc", "non-spatial dimensions"],
        ),
        // A GeoTIFF names no variable: one given was ignored.
        (
            config(&format!("  lc: {{ path: {}, variable: landcover }}\n", shared_data("lc.tif").display())),
            vec!["variables.lc.variable", "lc.tif", "this GTiff file is one raster of bands"],
        ),
    ];
    for (text, parts) in cases {
        let (code, stderr) = gen_err(dir.path(), &text);
        assert_eq!(code, 2, "{text}\n{stderr}");
        assert_mentions(&stderr, &parts);
        assert!(!dir.path().join("cube.zarr").exists());
    }
}

fn snapshot(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if path.is_file() {
        out.push((path.display().to_string(), std::fs::read(path).unwrap()));
    } else if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for entry in entries {
            out.extend(snapshot(&entry));
        }
    }
    out
}

/// Coarse global grids (NCEP/NCAR, GPCP, many CMIP models) centre their first and last rows on the poles:
/// their cells reach half a cell past ±90°, and they are degrees all the same.
#[test]
fn a_global_grid_with_cells_centred_on_the_poles_is_read_as_degrees() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("global_2.5.tif");
    let values: Vec<f32> = (0..144 * 73).map(|i| (i % 97) as f32).collect();
    crate::util::write_lonlat_tif(&path, (-1.25, 91.25, 2.5), 144, values, None);
    let text = format!(
        "output: cube.zarr\ngrid: {{ bbox: [-180.0, -90.0, 180.0, 90.0], resolution: 2.5 }}\n\
         layout: {{ kind: pixel_series, batch: 16 }}\nvariables:\n  z: {{ path: {} }}\n",
        path.display()
    );
    gen_ok(dir.path(), &text);
}

#[test]
fn existing_outputs_are_never_modified() {
    let dir = tempfile::tempdir().unwrap();
    let text = era5_config();
    // A file, a directory that is not a cube, and a cube without --overwrite.
    std::fs::write(dir.path().join("cube.zarr"), b"precious").unwrap();
    let (code, stderr) = gen_err(dir.path(), &text);
    assert_eq!(code, 2, "the config's output is at fault");
    assert_mentions(&stderr, &["cube.zarr", "not a directory"]);
    // Nor is a cube made under it.
    let (code, stderr) =
        gen_err(dir.path(), &text.replace("output: cube.zarr", "output: cube.zarr/inner.zarr"));
    assert_eq!(code, 2, "{stderr}");
    assert_mentions(&stderr, &["cube.zarr/inner.zarr", "cube.zarr is a file"]);
    assert_eq!(std::fs::read(dir.path().join("cube.zarr")).unwrap(), b"precious");
    std::fs::remove_file(dir.path().join("cube.zarr")).unwrap();

    std::fs::create_dir(dir.path().join("cube.zarr")).unwrap();
    std::fs::write(dir.path().join("cube.zarr/notes.txt"), b"mine").unwrap();
    let path = dir.path().join("cube.yaml");
    std::fs::write(&path, &text).unwrap();
    let out = cubeload(dir.path(), &["gen", "-c", path.to_str().unwrap(), "--overwrite"]);
    assert_eq!(out.status.code(), Some(2), "--overwrite never replaces what is not a cube");
    assert_mentions(&String::from_utf8_lossy(&out.stderr), &["not a cubeload cube"]);
    assert_eq!(std::fs::read(dir.path().join("cube.zarr/notes.txt")).unwrap(), b"mine");
    std::fs::remove_dir_all(dir.path().join("cube.zarr")).unwrap();

    let cube = gen_ok(dir.path(), &text);
    let before = snapshot(&cube);
    let (code, stderr) = gen_err(dir.path(), &text);
    assert_eq!(code, 2, "the flags are at fault");
    assert_mentions(&stderr, &["--overwrite"]);
    assert_eq!(snapshot(&cube), before, "the existing cube is untouched");

    // Files of the user's put into a cube are not replaced with it, --overwrite or --append.
    std::fs::create_dir(cube.join("analysis")).unwrap();
    std::fs::write(cube.join("analysis/result.csv"), b"mine").unwrap();
    std::fs::write(cube.join("notes.txt"), b"mine").unwrap();
    std::fs::write(cube.join("t2m/notes.txt"), b"mine").unwrap();
    // What file browsers leave is not the user's.
    std::fs::write(cube.join(".DS_Store"), b"").unwrap();
    let before = snapshot(&cube);
    for flag in ["--overwrite", "--append"] {
        let out = cubeload(dir.path(), &["gen", "-c", path.to_str().unwrap(), flag]);
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_mentions(&stderr, &["3 entries that are not the cube's", "analysis"]);
        assert_eq!(snapshot(&cube), before, "{flag}: the cube and the files are untouched");
    }
    std::fs::remove_dir_all(cube.join("analysis")).unwrap();
    std::fs::remove_file(cube.join("notes.txt")).unwrap();
    let out = cubeload(dir.path(), &["gen", "-c", path.to_str().unwrap(), "--overwrite"]);
    assert_mentions(
        &String::from_utf8_lossy(&out.stderr),
        &["holding t2m/notes.txt, which is not the cube's"],
    );
    // Once they are moved out, the cube is replaced as asked.
    std::fs::remove_file(cube.join("t2m/notes.txt")).unwrap();
    assert!(cubeload(dir.path(), &["gen", "-c", path.to_str().unwrap(), "--overwrite"]).status.success());
}

#[test]
fn a_failure_while_writing_leaves_no_cube_and_keeps_the_old_one() {
    // A GeoTIFF whose header is intact but whose pixels are cut off: probing succeeds, reading fails.
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(shared_data("converted/eopatch_DEM_utm33n.tif")).unwrap();
    let truncated = dir.path().join("truncated.tif");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let bad = format!(
        "output: cube.zarr\ngrid: {{ bbox: [14.5513, 45.8659, 14.5643, 45.875], resolution: 0.0001 }}\n\
         layout: {{ kind: pixel_series, batch: 64 }}\nvariables:\n  dem: {{ path: {} }}\n",
        truncated.display()
    );
    let (code, stderr) = gen_err(dir.path(), &bad);
    assert_eq!(code, 1);
    assert_mentions(&stderr, &["truncated.tif"]);
    // No cube in place; the blocks finished before the failure are kept aside for a rerun, refused as
    // incomplete by every reader.
    assert!(!dir.path().join("cube.zarr").exists());
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("zarr"))
        .collect();
    assert!(leftovers.iter().all(|n| n == ".cube.zarr.cubeload-partial"), "{leftovers:?}");
    for kept in &leftovers {
        let err = cubeload::Cube::open(dir.path().join(kept)).unwrap_err().to_string();
        assert!(err.contains("incomplete cube"), "{err}");
    }
    let info = cubeload(dir.path(), &["info", "cube.zarr"]);
    assert_eq!(info.status.code(), Some(1));

    // With a previous cube in place and --overwrite, the failed run leaves the previous cube intact.
    let cube = gen_ok(dir.path(), &era5_config());
    let before = snapshot(&cube);
    let path = dir.path().join("cube.yaml");
    std::fs::write(&path, &bad).unwrap();
    let out = cubeload(dir.path(), &["gen", "-c", path.to_str().unwrap(), "--overwrite"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(snapshot(&cube), before);
    let out = cubeload(dir.path(), &["info", cube.to_str().unwrap()]);
    assert!(out.status.success());
}

#[test]
fn info_refuses_incomplete_cubes_and_non_cubes() {
    let dir = tempfile::tempdir().unwrap();
    let cube = gen_ok(dir.path(), &era5_config());
    let out = cubeload(dir.path(), &["info", cube.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["variables"][0]["name"], "t2m");
    assert!(json["bytes_on_disk"].as_u64().unwrap() > 0);
    assert!(json["compression_ratio"].as_f64().unwrap() > 1.0);
    let text =
        String::from_utf8_lossy(&cubeload(dir.path(), &["info", cube.to_str().unwrap()]).stdout).to_string();
    assert_mentions(&text, &["pixel_series", "744 steps", "t2m"]);

    // Remove the completion marker, as an interrupted run would leave it.
    let root = cube.join("zarr.json");
    let text = std::fs::read_to_string(&root).unwrap();
    assert!(text.contains("\"complete\": true"));
    std::fs::write(&root, text.replace("\"complete\": true", "\"complete\": false")).unwrap();
    let out = cubeload(dir.path(), &["info", cube.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_mentions(&String::from_utf8_lossy(&out.stderr), &["incomplete", "cubeload gen"]);

    let out = cubeload(dir.path(), &["info", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_mentions(&String::from_utf8_lossy(&out.stderr), &["not a Zarr"]);
}

/// `cubeload info CUBE | head` is everyday use: a reader that stops reading silences the command, which
/// ends with its own exit code (it panicked, exit code 101; `verify` of a damaged cube still exits 1);
/// standard output that cannot be written (a full disk) is an error, exit code 1.
#[test]
fn output_to_a_closed_pipe_ends_quietly_and_to_a_full_disk_fails() {
    let dir = tempfile::tempdir().unwrap();
    let cube = gen_ok(dir.path(), &era5_config());
    let to_closed_pipe = |args: &[&str]| {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        std::process::Command::new(env!("CARGO_BIN_EXE_cubeload")).args(args).stdout(writer).output().unwrap()
    };
    for args in [&["info", cube.to_str().unwrap()][..], &["info", "--json", cube.to_str().unwrap()][..]] {
        let out = to_closed_pipe(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
    let chunk = walk(&cube.join("t2m/c")).into_iter().next().unwrap();
    let mut bytes = std::fs::read(&chunk).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&chunk, bytes).unwrap();
    let out = to_closed_pipe(&["verify", cube.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "a damaged cube, whoever reads the list");
    if let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cubeload"))
            .args(["info", cube.to_str().unwrap()])
            .stdout(full)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert_mentions(&String::from_utf8_lossy(&out.stderr), &["cannot write to standard output"]);
    }
}

/// `demo` and `bench` run in `cubeload-torch` (the binary linked with libtorch); a `cubeload` without it beside
/// it says where it looked and how to build it, exit code 1, and writes nothing.
#[test]
fn demo_and_bench_without_the_torch_binary_say_how_to_build_it() {
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("cubeload");
    std::fs::copy(env!("CARGO_BIN_EXE_cubeload"), &alone).unwrap();
    for args in [&["demo", "--dir", "work"][..], &["bench"][..]] {
        let out = std::process::Command::new(&alone).args(args).current_dir(dir.path()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        let expected = dir.path().join("cubeload-torch").display().to_string();
        assert_mentions(&stderr, &[&expected, "cargo build --release"]);
        assert!(!dir.path().join("work").exists(), "{args:?}: nothing is written");
    }
    // `gen` and the other commands need no libtorch.
    let version = std::process::Command::new(&alone).arg("--version").output().unwrap();
    assert!(version.status.success());
}

/// A measurement's longest time must be a number of seconds above zero: anything else is a usage error naming
/// the flag, before anything is generated or read.
#[test]
fn bench_refuses_a_max_pass_time_that_is_not_positive() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["0", "-1", "nan", "inf", "soon"] {
        let out = cubeload(dir.path(), &["bench", "--max-pass-seconds", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_mentions(&stderr, &["--max-pass-seconds", &format!("`{bad}` is not a number of seconds")]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{bad}: nothing is written");
    }
}

/// No threads is a usage error for every command that takes `--threads` (gen took it as "all cores").
#[test]
fn zero_threads_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["gen", "-c", "cube.yaml"][..], &["demo", "--dir", "work"][..], &["bench"][..]] {
        let out = cubeload(dir.path(), &[args, &["--threads", "0"]].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_mentions(&String::from_utf8_lossy(&out.stderr), &["'0' for '--threads"]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{args:?}: nothing is written");
    }
    // bench's prefetch depths too, each named (they reached the loader's "mix and prefetch" message).
    for flag in ["--prefetch", "--remote-prefetch"] {
        let out = cubeload(dir.path(), &["bench", flag, "0"]);
        assert_eq!(out.status.code(), Some(2), "{flag}");
        assert_mentions(&String::from_utf8_lossy(&out.stderr), &[&format!("'0' for '{flag}")]);
    }
}

#[test]
fn files_of_one_variable_with_another_nodata_are_refused_unless_the_config_sets_one() {
    let dir = tempfile::tempdir().unwrap();
    let dates = dir.path().join("dates");
    std::fs::create_dir(&dates).unwrap();
    // Two dates of one tile; the second marks its gaps 255 where the first marks them 0.
    for (day, nodata) in [(1, 0.0), (2, 255.0)] {
        let values: Vec<u8> = (0..64).map(|i| if i % 4 == 0 { nodata as u8 } else { 100 }).collect();
        let path = dates.join(format!("ndvi_2024-06-{day:02}.tif"));
        crate::util::write_lonlat_tif(&path, (10.0, 46.0, 0.1), 8, values, Some(nodata));
    }
    let config = |nodata: &str| {
        format!(
            "output: cube.zarr\ngrid: {{ bbox: [10.0, 45.2, 10.8, 46.0], resolution: 0.1 }}\ntime: {{ from: ndvi }}\n\
             layout: {{ kind: pixel_series, batch: 16 }}\n\
             variables:\n  ndvi: {{ path: \"{}/ndvi_*.tif\", resampling: nearest{nodata} }}\n",
            dates.display()
        )
    };
    let (code, stderr) = gen_err(dir.path(), &config(""));
    assert_eq!(code, 1, "{stderr}");
    assert_mentions(
        &stderr,
        &["ndvi_2024-06-02.tif", "its nodata (255)", "ndvi_2024-06-01.tif", "(0)", "nodata:"],
    );
    assert!(!dir.path().join("cube.zarr").exists());
    // One nodata for both: the second date's 255s are gaps, its 0s would be too.
    let cube = gen_ok(dir.path(), &config(", nodata: 255"));
    let values = crate::util::read_f32(&cube, "ndvi", Some(0..2), 8, 8);
    let gaps = values[64..].iter().filter(|v| v.is_nan()).count();
    assert_eq!(gaps, 16, "{:?}", &values[64..]);
}

#[test]
fn verify_of_an_object_store_url_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    // Refused before any request: no store needs to answer.
    let out = cubeload(dir.path(), &["verify", "s3://cubes/era5.zarr"]);
    assert_eq!(out.status.code(), Some(2));
    assert_mentions(&String::from_utf8_lossy(&out.stderr), &["s3://cubes/era5.zarr", "a local copy"]);
}

/// A directory a glob reaches but may not read is named with the reason, not taken for one without
/// matching files. Run as `nobody` (`setpriv`, which needs root: root reads any directory).
#[test]
fn an_unreadable_directory_of_a_glob_is_named_not_taken_for_no_match() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let text = cubeload::demo::write_inputs(dir.path(), &cubeload::demo::DemoSpec::default()).unwrap();
    let config = dir.path().join("cube.yaml");
    std::fs::write(&config, text).unwrap();
    let mode = |path: &Path, mode: u32| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
    for path in walk(dir.path()).iter().chain([&dir.path().to_path_buf(), &dir.path().join("inputs")]) {
        mode(path, if path.is_dir() { 0o777 } else { 0o644 }).unwrap();
    }
    let ndvi = dir.path().join("inputs/ndvi");
    mode(&ndvi, 0o777).unwrap();
    let as_nobody = || {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_cubeload"), "gen"])
            .arg("-c")
            .arg(&config)
            .current_dir(dir.path())
            .output()
    };
    // Where nobody cannot run it (not root, no setpriv, a binary it may not reach), there is nothing to see.
    match as_nobody() {
        Ok(out) if out.status.success() => std::fs::remove_dir_all(dir.path().join("demo.zarr")).unwrap(),
        other => {
            eprintln!("skipped: cannot run cubeload as nobody: {other:?}");
            return;
        }
    }
    mode(&ndvi, 0o000).unwrap();
    let out = as_nobody().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_mentions(
        &stderr,
        &[ndvi.to_str().unwrap(), "variable `ndvi`", "cannot read", "Permission denied"],
    );
    assert!(!stderr.contains("no file matches"), "{stderr}");
    mode(&ndvi, 0o777).unwrap();
}
