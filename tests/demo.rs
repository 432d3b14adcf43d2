//! `cubeload demo`: synthetic inputs → cube, as a new user runs it.

use crate::util::{array, cubeload, meta};

#[test]
fn demo_makes_a_complete_cube_from_synthetic_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = cubeload(dir.path(), &["demo", "--dir", "work"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for part in ["t2m", "ndvi", "landcover", "pixel_series", "168 steps", "ratio_to_ceiling"] {
        assert!(stdout.contains(part), "{part} missing from:\n{stdout}");
    }
    // Its benchmark of the small demo cube is not judged against the goals, which `cubeload bench` measures.
    assert!(stdout.contains("`cubeload bench` judges them") && !stdout.contains("MISSED"), "{stdout}");
    let cube = dir.path().join("work/demo.zarr");
    let m = meta(&cube);
    assert_eq!(m["complete"], true);
    let vars = &m["variables"];
    // The coarse hourly field covers the whole grid; NDVI has cloud gaps; land cover is static uint8.
    assert_eq!(vars[0]["name"], "t2m");
    assert!((vars[0]["valid_fraction"].as_f64().unwrap() - 1.0).abs() < 1e-12);
    let ndvi_valid = vars[1]["valid_fraction"].as_f64().unwrap();
    assert!((0.5..1.0).contains(&ndvi_valid), "{ndvi_valid}");
    assert!(array(&cube, "landcover").data_type().to_string().starts_with("uint8"));
    assert_eq!(array(&cube, "landcover").dimensionality(), 2);
    let t2m = &vars[0]["stats"];
    assert!(t2m["min"].as_f64().unwrap() > 270.0 && t2m["max"].as_f64().unwrap() < 310.0, "{t2m}");
    // Running it again replaces the demo's own cube.
    let again = cubeload(dir.path(), &["demo", "--dir", "work"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
}
