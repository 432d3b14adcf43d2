//! The warp computes in the narrowest type that holds the source's values: Float32 for bytes, 16-bit integers
//! and Float32 (GDAL's fast kernels), Float64 for 32-bit integers, whose codes Float32 would round.

use crate::util::{TestGrid, array, cubeload, gen_ok, write_lonlat_tif};

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
    let grid = TestGrid { bbox: [west, north - height as f64 * res, west + width as f64 * res, north], res };
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\n{}\nlayout: {{ kind: pixel_series, batch: 64 }}\n\
             variables:\n  basin: {{ path: {}, kind: categorical, resampling: nearest }}\n",
            grid.yaml(),
            tif.display()
        ),
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
    let grid = TestGrid { bbox: [west, north - height as f64 * res, west + width as f64 * res, north], res };
    let config = format!(
        "output: cube.zarr\n{}\nlayout: {{ kind: pixel_series, batch: 16 }}\n\
         variables:\n  v: {{ path: {}, static: true, resampling: nearest }}\n",
        grid.yaml(),
        tif.display()
    );
    let cube = gen_ok(dir.path(), &config);
    // A second run replaces it, as it does any cube.
    std::fs::write(dir.path().join("cube.yaml"), &config).unwrap();
    let out = cubeload(dir.path(), &["gen", "-c", "cube.yaml", "--overwrite"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("note: variable `v`: 4 values were infinite or beyond float32's range"),
        "{stderr}"
    );
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
    std::fs::write(dir.path().join("cube.yaml"), &shuffled).unwrap();
    let out = cubeload(dir.path(), &["gen", "-c", "cube.yaml", "--overwrite"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("note: variable `v`: 4 values were infinite or beyond float32's range"),
        "{stderr}"
    );
    let meta = cubeload::Cube::open(&cube).unwrap().meta().clone();
    assert!(meta.layout.shuffled.is_some());
    let again = meta.variables[0].stats.as_ref().unwrap();
    assert_eq!((again.min, again.max), (stats.min, stats.max));
}
