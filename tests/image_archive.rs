//! An image archive: one file per date, every file on the same tile (as Sentinel-2 or MODIS products are
//! stored). cubeload warps such files together, with one coordinate transformation for all dates; each date
//! must still equal the `gdalwarp` program's warp of its own file, cloud gaps included.

use cubeload::demo::{DemoSpec, write_inputs};

use crate::util::{TestGrid, assert_close_area, gdalwarp, gen_err, gen_ok, read_f32};

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
