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
