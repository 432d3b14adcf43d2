//! Bad input: every case gets a message naming the culprit, exit code 2 (config, usage) or 1 (runtime),
//! no panic, and nothing that existed before is modified.

use std::path::Path;

use crate::util::{cubeload, gen_err, gen_ok, shared_data};

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
    let cases: Vec<(String, Vec<String>)> = vec![
        (config("  a: { path: missing.tif }\n"), vec!["missing.tif".into(), "no such file".into()]),
        (config("  a: { path: \"nothing/*.tif\" }\n"), vec!["nothing/*.tif".into()]),
        (
            config(&format!("  a: {{ path: {} }}\n", empty.display())),
            vec!["empty.tif".into(), "empty".into()],
        ),
        (config(&format!("  a: {{ path: {} }}\n", garbage.display())), vec!["garbage.nc".into()]),
        (
            config(&format!("  a: {{ path: {}, variable: prr }}\n", bcsd.display())),
            vec!["bcsd_obs_1999.nc".into(), "prr".into(), "pr, tas".into()],
        ),
        (
            config(&format!("  a: {{ path: {} }}\n", bcsd.display())),
            vec!["bcsd_obs_1999.nc".into(), "variable:".into()],
        ),
        (
            config(&format!("  z: {{ path: {}, variable: z }}\n", eraint.display())),
            vec!["eraint_uvz.nc".into(), "non-spatial dimensions".into()],
        ),
        (
            config(&format!("  b: {{ path: {}, variable: blue }}\n", l3b.display())),
            vec!["L3B_S2B".into(), "crs".into()],
        ),
        (
            config(&format!("  rgb: {{ path: {} }}\n", rgb.display())),
            vec!["RGB.byte.tif".into(), "band".into()],
        ),
        (
            config(&format!("  rgb: {{ path: {}, band: 4, static: true }}\n", rgb.display())),
            vec!["RGB.byte.tif".into(), "band 4".into()],
        ),
    ];
    for (text, parts) in cases {
        let (code, stderr) = gen_err(dir.path(), &text);
        assert_eq!(code, 1, "{text}\n{stderr}");
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
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

#[test]
fn existing_outputs_are_never_modified() {
    let dir = tempfile::tempdir().unwrap();
    let text = era5_config();
    // A file, a directory that is not a cube, and a cube without --overwrite.
    std::fs::write(dir.path().join("cube.zarr"), b"precious").unwrap();
    let (code, stderr) = gen_err(dir.path(), &text);
    assert_eq!(code, 1);
    assert_mentions(&stderr, &["cube.zarr", "not a directory"]);
    assert_eq!(std::fs::read(dir.path().join("cube.zarr")).unwrap(), b"precious");
    std::fs::remove_file(dir.path().join("cube.zarr")).unwrap();

    std::fs::create_dir(dir.path().join("cube.zarr")).unwrap();
    std::fs::write(dir.path().join("cube.zarr/notes.txt"), b"mine").unwrap();
    let path = dir.path().join("cube.yaml");
    std::fs::write(&path, &text).unwrap();
    let out = cubeload(dir.path(), &["gen", "-c", path.to_str().unwrap(), "--overwrite"]);
    assert_eq!(out.status.code(), Some(1), "--overwrite never replaces what is not a cube");
    assert_mentions(&String::from_utf8_lossy(&out.stderr), &["not a cubeload cube"]);
    assert_eq!(std::fs::read(dir.path().join("cube.zarr/notes.txt")).unwrap(), b"mine");
    std::fs::remove_dir_all(dir.path().join("cube.zarr")).unwrap();

    let cube = gen_ok(dir.path(), &text);
    let before = snapshot(&cube);
    let (code, stderr) = gen_err(dir.path(), &text);
    assert_eq!(code, 1);
    assert_mentions(&stderr, &["--overwrite"]);
    assert_eq!(snapshot(&cube), before, "the existing cube is untouched");
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
