//! An image archive: one file per date, every file on the same tile (as Sentinel-2 or MODIS products are
//! stored). cubeload warps such files together, with one coordinate transformation for all dates; each date
//! must still equal the `gdalwarp` program's warp of its own file, cloud gaps included.

use cubeload::demo::{DemoSpec, write_inputs};

use crate::util::{
    TestGrid, array, assert_close_area, cubeload, gdalwarp, gen_err, gen_ok, read_f32, write_lonlat_tif,
};

#[test]
fn dates_on_one_tile_equal_gdalwarp_of_each_file() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path(), &DemoSpec::default()).unwrap();
    let mut files: Vec<_> =
        std::fs::read_dir(dir.path().join("inputs/ndvi")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert_eq!(files.len(), 4, "{files:?}");
    let grid = TestGrid { bbox: [9.5, 45.0, 11.0, 46.0], res: 0.01 };
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\n{}\ntime: {{ from: ndvi }}\nlayout: {{ kind: pixel_series, batch: 64 }}\n\
             variables:\n  ndvi: {{ path: \"{}/inputs/ndvi/ndvi_*.tif\", resampling: average }}\n",
            grid.yaml(),
            dir.path().display()
        ),
    );
    let (w, h) = (150, 100);
    let values = read_f32(&cube, "ndvi", Some(0..4), h as u64, w as u64);
    let mut references = Vec::new();
    for (t, file) in files.iter().enumerate() {
        let (rw, rh, mut reference) = gdalwarp(&file.display().to_string(), grid, "average", dir.path());
        assert_eq!((rw, rh), (w, h));
        let reference = reference.remove(0);
        let valid = assert_close_area(
            &format!("{} (date {t})", file.display()),
            &values[t * w * h..(t + 1) * w * h],
            &reference,
            w,
            1e-5,
            0.02,
        );
        assert!(valid > w * h / 2, "{valid}");
        references.push(reference);
    }
    // Each date has its own gaps: a warp that merged the files' nodata masks would fail above.
    let gaps = |r: &[f64]| r.iter().map(|x| x.is_nan()).collect::<Vec<bool>>();
    assert_ne!(gaps(&references[0]), gaps(&references[1]), "the dates' cloud gaps differ");
}

#[test]
fn a_damaged_date_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path(), &DemoSpec::default()).unwrap();
    // The third date's tiles overwritten in the middle: its header still reads, its pixels do not.
    let damaged = dir.path().join("inputs/ndvi/ndvi_2024-06-05.tif");
    let mut bytes = std::fs::read(&damaged).unwrap();
    let n = bytes.len();
    bytes[n / 3..n / 3 + 20_000].fill(0x5a);
    std::fs::write(&damaged, bytes).unwrap();
    let (code, stderr) = gen_err(
        dir.path(),
        &format!(
            "output: cube.zarr\ngrid: {{ bbox: [9.5, 45.0, 11.0, 46.0], resolution: 0.01 }}\n\
             time: {{ from: ndvi }}\nlayout: {{ kind: pixel_series, batch: 64 }}\n\
             variables:\n  ndvi: {{ path: \"{}/inputs/ndvi/ndvi_*.tif\" }}\n",
            dir.path().display()
        ),
    );
    assert_eq!(code, 1, "{stderr}");
    let first_line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(first_line.starts_with(&format!("error: {}: ", damaged.display())), "{stderr}");
    assert!(!dir.path().join("cube.zarr").exists());
}

/// Writes a 4 × 3 one-degree lon/lat tile at 10°E 46°N named `name` in `dir`, every cell `value` plus its
/// index / 100.
fn tile(dir: &std::path::Path, name: &str, value: f32) {
    let values = (0..12).map(|i| value + i as f32 / 100.0).collect();
    write_lonlat_tif(&dir.join(name), (10.0, 46.0, 1.0), 4, values, None);
}

/// A config of one variable `x` from `path` on the tiles' grid, with `extra` keys for it, on `time`.
fn tile_config(path: &str, time: &str, extra: &str) -> String {
    format!(
        "output: cube.zarr\ngrid: {{ bbox: [10.0, 43.0, 14.0, 46.0], resolution: 1.0 }}\n{time}\n\
         layout: {{ kind: pixel_series, batch: 4 }}\n\
         variables:\n  x: {{ path: \"{path}\", resampling: nearest{extra} }}\n"
    )
}

#[test]
fn times_of_day_in_file_names_make_steps_of_their_own() {
    // Four six-hourly files, their times written four ways: each is a step of its own (read as midnight,
    // all four were averaged into the first step and the others were empty).
    let dir = tempfile::tempdir().unwrap();
    for (name, hour) in [
        ("t2m_20190301T0000.tif", 0.0),
        ("t2m_20190301_0600.tif", 6.0),
        ("t2m_2019-03-01T12-00-00.tif", 12.0),
        ("t2m_2019030118.tif", 18.0),
    ] {
        tile(dir.path(), name, hour);
    }
    let path = format!("{}/t2m_*.tif", dir.path().display());
    let axis = "time: { start: 2019-03-01T00:00:00Z, end: 2019-03-01T18:00:00Z, step: 6h }";
    let cube = gen_ok(dir.path(), &tile_config(&path, axis, ""));
    let values = read_f32(&cube, "x", Some(0..4), 3, 4);
    for (t, hour) in [0.0f32, 6.0, 12.0, 18.0].into_iter().enumerate() {
        let expected: Vec<f32> = (0..12).map(|i| hour + i as f32 / 100.0).collect();
        assert_eq!(values[t * 12..(t + 1) * 12], expected[..], "step {t}");
    }
    // The axis taken from the files has their four instants.
    let cube = gen_ok(dir.path(), &tile_config(&path, "time: { from: x }", ""));
    assert_eq!(array(&cube, "time").shape(), &[4]);
}

#[test]
fn files_a_cube_cannot_tell_apart_are_named_and_undated_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    // One date, one grid (a time of day written as cubeload does not read it, a repeated file, or Terra's
    // and Aqua's product of a day): combined into one step by the aggregation, and a note names both.
    tile(dir.path(), "a_20190301.tif", 1.0);
    tile(dir.path(), "a_20190301_06.tif", 2.0);
    let axis = "time: { start: 2019-03-01, end: 2019-03-02, step: 1d }";
    std::fs::write(
        dir.path().join("cube.yaml"),
        tile_config(&format!("{}/a_*.tif", dir.path().display()), axis, ""),
    )
    .unwrap();
    let out = cubeload(dir.path(), &["gen", "-c", "cube.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let note = stderr.lines().find(|l| l.contains("one time (")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(note.contains("their step holds their mean (aggregation: mean)"), "{note}");
    assert!(note.contains("a_20190301.tif") && note.contains("a_20190301_06.tif"), "{note}");
    assert!(note.contains("2019-03-01T00:00:00Z") && note.contains("T103021"), "{note}");
    assert_eq!(read_f32(&dir.path().join("cube.zarr"), "x", Some(0..1), 3, 4)[0], 1.5);

    // Undated files on one grid: refused unless declared static, which takes the first.
    tile(dir.path(), "dem_v1.tif", 3.0);
    tile(dir.path(), "dem_v2.tif", 4.0);
    let path = format!("{}/dem_*.tif", dir.path().display());
    let (code, stderr) = gen_err(dir.path(), &tile_config(&path, axis, ""));
    // The config's to change: a usage error naming its key.
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("config key `variables.x.path`"), "{stderr}");
    assert!(stderr.contains("dem_v1.tif") && stderr.contains("dem_v2.tif"), "{stderr}");
    assert!(stderr.contains("static: true"), "{stderr}");
    let cube = gen_ok(dir.path(), &tile_config(&path, axis, ", static: true"));
    assert_eq!(read_f32(&cube, "x", None, 3, 4)[0], 3.0);

    // One date on tiles of different grids is a mosaic, as before.
    let tiles = tempfile::tempdir().unwrap();
    tile(tiles.path(), "s2_20190301_T32TNR.tif", 5.0);
    write_lonlat_tif(
        &tiles.path().join("s2_20190301_T32TPR.tif"),
        (12.0, 46.0, 1.0),
        2,
        vec![6.0f32; 6],
        None,
    );
    let cube = gen_ok(tiles.path(), &tile_config(&format!("{}/s2_*.tif", tiles.path().display()), axis, ""));
    assert_eq!(read_f32(&cube, "x", Some(0..1), 3, 4)[0], 5.0);
}
