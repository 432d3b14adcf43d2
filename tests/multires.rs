//! Multi-resolution cubes: the loader's regridding against a single-resolution cube and an independent
//! bilinear reference, native delivery against the stored level, the level against `gdalwarp`.

use std::path::{Path, PathBuf};

use cubeload::loader::{Loader, Regrid};
use cubeload::{Batch, Config, GenOptions, Plan, generate};

use crate::util::{TestGrid, array, assert_close, gdalwarp, gen_ok, meta, read_f32, shared_data};

const HOURS: usize = 48;

/// Demo inputs (t2m on a 0.25° grid aligned with the cube's 0.01° grid) and cubes made from their config
/// with `edit` applied to it.
struct Inputs {
    dir: tempfile::TempDir,
    text: String,
}

impl Inputs {
    fn new() -> Inputs {
        let dir = tempfile::tempdir().unwrap();
        let spec = cubeload::demo::DemoSpec { hours: HOURS, ..Default::default() };
        let text = cubeload::demo::write_inputs(dir.path(), &spec).unwrap();
        Inputs { dir, text }
    }

    /// The demo cube named `name`, with `t2m`'s settings replaced by `t2m` and the layout by `layout`.
    fn cube(&self, name: &str, layout: &str, t2m: &str) -> PathBuf {
        let d = self.dir.path().display();
        let text = self
            .text
            .replace("demo.zarr", &format!("{name}.zarr"))
            .replace("layout: { kind: pixel_series, batch: 256 }", &format!("layout: {layout}"))
            .replace(
                &format!(
                    "t2m: {{ path: {d}/inputs/t2m_hourly.nc, variable: t2m, resampling: bilinear, units: K }}"
                ),
                &format!("t2m: {{ path: {d}/inputs/t2m_hourly.nc, variable: t2m, units: K, {t2m} }}"),
            );
        assert!(text.contains(t2m), "the demo config changed: {text}");
        let plan =
            Plan::new(Config::from_yaml(&text, Path::new("test.yaml")).unwrap(), text.clone()).unwrap();
        generate(&plan, &GenOptions::default(), &|_, _| {}).unwrap().path
    }
}

fn batches(cube: &Path, regrid: Regrid) -> Vec<Batch> {
    Loader::builder(cube).regrid(regrid).build().unwrap().map(Result::unwrap).collect()
}

#[test]
fn nearest_upsampling_equals_a_single_resolution_cube_warped_with_nearest() {
    let inputs = Inputs::new();
    let layout = "{ kind: pixel_series, batch: 64 }";
    let single = inputs.cube("single", layout, "resampling: nearest");
    let multi = inputs.cube(
        "multi",
        &layout.replace(" }", ", multires: true }"),
        "resampling: nearest, resolution: 0.25, upsampling: nearest",
    );
    let m = meta(&multi);
    assert_eq!(m["levels"][0]["group"], "coarse_25");
    assert_eq!(m["levels"][0]["factor"], serde_json::json!([25, 25]));
    assert_eq!(m["variables"][0]["upsampling"], "nearest");
    // The level holds 6 × 4 cells of 0.25° instead of 150 × 100 of 0.01°.
    assert_eq!(array(&multi, "coarse_25/t2m").shape()[1..], [8, 8]);
    assert!(!multi.join("t2m").exists());

    let (a, b) = (batches(&single, Regrid::Target), batches(&multi, Regrid::Target));
    assert_eq!(a.len(), b.len());
    assert!(a.len() > 10);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.origin, &x.variables, &x.shape), (y.origin, &y.variables, &y.shape));
        assert_eq!(x.mask, y.mask, "batch {:?}: masks differ", x.origin);
        let bits = |b: &Batch| b.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(x), bits(y), "batch {:?}: values differ", x.origin);
    }
}

#[test]
fn bilinear_upsampling_equals_an_independent_reference_and_native_fields_equal_the_level() {
    let inputs = Inputs::new();
    let cube = inputs.cube(
        "bilinear",
        "{ kind: image_sequence, seq_len: 8, patch: [10, 10], batch: 4, multires: true }",
        "resampling: bilinear, resolution: 0.25",
    );
    let m = meta(&cube);
    assert_eq!(m["variables"][0]["upsampling"], "bilinear", "continuous variables default to bilinear");
    let level = &m["levels"][0];
    let (lh, lw) = (level["grid"]["height"].as_u64().unwrap(), level["grid"]["width"].as_u64().unwrap());
    assert_eq!((lh, lw), (4, 6));
    let n_time = m["padded_shape"][0].as_u64().unwrap();
    let coarse = read_f32(&cube, "coarse_25/t2m", Some(0..n_time), lh, lw);
    let (lh, lw) = (lh as usize, lw as usize);
    let (height, width, k) = (100usize, 150usize, 25.0f64);

    // The reference, written from the contract alone: the centre of target cell i lies at level position
    // (i + ½) / k − ½; interpolate between the two level centres around it, holding the edge values beyond.
    let axis = |i: usize, n: usize| -> (usize, usize, f64) {
        let u = ((i as f64 + 0.5) / k - 0.5).clamp(0.0, (n - 1) as f64);
        let lo = (u.floor() as usize).min(n - 1);
        (lo, (lo + 1).min(n - 1), u - lo as f64)
    };
    let reference = |t: usize, r: usize, c: usize| -> f64 {
        let ((r0, r1, fy), (c0, c1, fx)) = (axis(r, lh), axis(c, lw));
        let at = |y: usize, x: usize| f64::from(coarse[(t * lh + y) * lw + x]);
        (1.0 - fy) * ((1.0 - fx) * at(r0, c0) + fx * at(r0, c1))
            + fy * ((1.0 - fx) * at(r1, c0) + fx * at(r1, c1))
    };
    let lat: Vec<f64> = array(&cube, "lat").retrieve_array_subset::<Vec<f64>>(&[0..100]).unwrap();
    let lon: Vec<f64> = array(&cube, "lon").retrieve_array_subset::<Vec<f64>>(&[0..160]).unwrap();
    let mut compared = 0;
    for b in batches(&cube, Regrid::Target) {
        assert_eq!(b.variables, ["t2m", "ndvi", "landcover"]);
        let [n, s, v, ph, pw] = b.shape[..] else { panic!("{:?}", b.shape) };
        let t0 = b.time_index[0];
        for sample in 0..n {
            // Patch centre → first row and column of the patch.
            let y0 = lat.iter().position(|&x| (x - b.lat[sample]).abs() < 0.0051).unwrap() - (ph - 1) / 2;
            let x0 = lon.iter().position(|&x| (x - b.lon[sample]).abs() < 0.0051).unwrap() - (pw - 1) / 2;
            for t in 0..s {
                for py in 0..ph {
                    for px in 0..pw {
                        let (r, c) = (y0 + py, x0 + px);
                        let i = (((sample * s + t) * v) * ph + py) * pw + px;
                        if r >= height || c >= width || t0 + t >= HOURS {
                            assert_eq!(b.mask[i], 0, "padding is masked");
                            continue;
                        }
                        let expected = reference(t0 + t, r, c);
                        assert!(
                            (f64::from(b.data[i]) - expected).abs() <= 1e-5 * expected.abs(),
                            "step {} cell ({r}, {c}): {} vs {expected}",
                            t0 + t,
                            b.data[i]
                        );
                        compared += 1;
                    }
                }
            }
        }
    }
    assert_eq!(compared, HOURS * height * width, "every target cell of every step compared once");

    // Native: t2m leaves the target variables and comes as the level cells under each batch.
    for b in batches(&cube, Regrid::Native) {
        assert_eq!(b.variables, ["ndvi", "landcover"]);
        let [field] = &b.native[..] else { panic!("one native field") };
        assert_eq!((field.name.as_str(), field.factor), ("t2m", [25, 25]));
        let [t_len, h, w] = field.shape[..] else { panic!("{:?}", field.shape) };
        let [it, iy, ix] = b.origin.chunk;
        // A 20 × 20 chunk: rows 20·iy … 20·iy + 19 lie in level rows (20·iy) / 25 … (20·iy + 19) / 25.
        assert_eq!(field.origin, [20 * iy / 25, 20 * ix / 25]);
        assert_eq!(
            (h, w),
            ((20 * iy + 19).min(99) / 25 - 20 * iy / 25 + 1, (20 * ix + 19).min(149) / 25 - 20 * ix / 25 + 1)
        );
        for t in 0..t_len {
            for y in 0..h {
                for x in 0..w {
                    let stored =
                        coarse[((it * t_len + t) * lh + field.origin[0] + y) * lw + field.origin[1] + x];
                    let got = field.data[(t * h + y) * w + x];
                    if it * t_len + t < HOURS {
                        assert_eq!(got.to_bits(), stored.to_bits());
                        assert_eq!(field.mask[(t * h + y) * w + x], 1);
                    }
                }
            }
        }
    }
    assert!(Loader::builder(&cube).regrid(Regrid::Native).mix(2).build().is_err(), "native cannot mix");
}

#[test]
fn a_native_time_step_stores_one_window_per_step_and_the_loader_holds_it_over_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let spec = cubeload::demo::DemoSpec { hours: 96, ..Default::default() };
    let text = cubeload::demo::write_inputs(dir.path(), &spec).unwrap();
    let make = |name: &str, edit: &dyn Fn(String) -> String| {
        let text = edit(text.replace("demo.zarr", &format!("{name}.zarr")));
        let plan = Plan::new(Config::from_yaml(&text, Path::new("t.yaml")).unwrap(), text.clone()).unwrap();
        generate(&plan, &GenOptions::default(), &|_, _| {}).unwrap().path
    };
    let single = make("single", &|t| t);
    // NDVI every 2 days (images at 00:00 of days 1 and 3): 2 stored steps instead of 96.
    let multi = make("multi", &|t| {
        t.replace("batch: 256 }", "batch: 256, multires: true }").replace(
            "resampling: average, units: \"1\" }",
            "resampling: average, units: \"1\", time_step: 2d }",
        )
    });
    let m = meta(&multi);
    assert_eq!(m["levels"][0]["group"], "coarse_t48");
    assert_eq!(m["levels"][0]["time_factor"], 48);
    let level = read_f32(&multi, "coarse_t48/ndvi", Some(0..2), 100, 150);
    let hourly = read_f32(&single, "ndvi", Some(0..96), 100, 150);
    let plane = 100 * 150;
    for i in 0..2 {
        let (a, b) = (&level[i * plane..(i + 1) * plane], &hourly[48 * i * plane..(48 * i + 1) * plane]);
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "window {i}");
        assert!(a.iter().any(|x| !x.is_nan()));
    }
    let times = array(&multi, "coarse_t48/time").retrieve_array_subset::<Vec<i64>>(&[0..2]).unwrap();
    let target = array(&multi, "time").retrieve_array_subset::<Vec<i64>>(&[0..96]).unwrap();
    let units = |name: &str| array(&multi, name).attributes()["units"].as_str().unwrap().to_string();
    // CF units follow the step: days for the level, hours for the cube.
    assert!(units("coarse_t48/time").starts_with("days since") && units("time").starts_with("hours since"));
    assert_eq!([times[0] * 24, times[1] * 24], [target[0], target[48]]);

    // The loader: NDVI of hour t is the stored window value of t / 48; the other variables as before.
    let (a, b) = (batches(&single, Regrid::Target), batches(&multi, Regrid::Target));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.origin, &x.shape), (y.origin, &y.shape));
        let [n, t_len, v] = x.shape[..] else { panic!() };
        assert_eq!(t_len, 96);
        for p in 0..n {
            for t in 0..t_len {
                for var in 0..v {
                    let i = (p * t_len + t) * v + var;
                    let expected = if var == 1 { (p * t_len + 48 * (t / 48)) * v + var } else { i };
                    assert_eq!(
                        y.data[i].to_bits(),
                        x.data[expected].to_bits(),
                        "pixel {p} step {t} var {var}"
                    );
                    assert_eq!(y.mask[i], x.mask[expected]);
                }
            }
        }
    }
    // quicklook's `--time` is a step of the cube: hour 60 of the level variable is its window of hours
    // 48–95, drawn as the hourly cube's hour 48 (the pictures differ only in their title line).
    let picture = |cube: &Path, time: usize| {
        let out = dir.path().join(format!("{}-{time}.png", cube.file_stem().unwrap().to_string_lossy()));
        cubeload::plot::quicklook(&cubeload::Cube::open(cube).unwrap(), "ndvi", time, &out).unwrap();
        let mut reader = png::Decoder::new(std::fs::File::open(&out).unwrap()).read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut pixels).unwrap();
        pixels[30 * info.line_size..info.buffer_size()].to_vec()
    };
    assert!(picture(&multi, 60) == picture(&single, 48));
    assert!(picture(&multi, 47) == picture(&single, 0));
    assert!(picture(&multi, 47) != picture(&multi, 48), "two windows, two pictures");
    let past = cubeload::plot::quicklook(
        &cubeload::Cube::open(&multi).unwrap(),
        "ndvi",
        96,
        &dir.path().join("x.png"),
    );
    assert!(past.unwrap_err().to_string().contains("past the 96 steps of the cube"));

    let native = batches(&multi, Regrid::Native);
    assert_eq!(native[0].native[0].shape, [2, 16, 16]);
    assert_eq!(native[0].variables, ["t2m", "landcover"]);

    // Mixed across chunks, the batches of the level held over its windows hold the samples of unmixed ones.
    let epoch = |mix| Loader::builder(&multi).shuffle(2).mix(mix).build().unwrap().map(Result::unwrap);
    let (plain, mixed): (Vec<Batch>, Vec<Batch>) = (epoch(1).collect(), epoch(3).collect());
    assert!(mixed.iter().zip(&plain).any(|(m, p)| m.lat != p.lat), "mixed");
    assert!(crate::loader::samples_of(&mixed) == crate::loader::samples_of(&plain));
}

#[test]
fn the_coarse_level_equals_gdalwarp_at_its_resolution() {
    let dir = tempfile::tempdir().unwrap();
    let grib = shared_data("era5-2mt-2019-03-uk.grib");
    let target = TestGrid { bbox: [-8.0, 51.0, 0.0, 57.0], res: 0.1 };
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\n{}\ntime: {{ from: t2m }}\n\
             layout: {{ kind: pixel_series, batch: 64, multires: true }}\n\
             variables:\n  t2m: {{ path: {g}, resampling: bilinear, resolution: 0.5 }}\n  \
             t2m_fine: {{ path: {g}, resampling: bilinear }}\n",
            target.yaml(),
            g = grib.display()
        ),
    );
    let level = TestGrid { bbox: [-8.0, 51.0, 0.0, 57.0], res: 0.5 };
    let (w, h, reference) = gdalwarp(grib.to_str().unwrap(), level, "bilinear", dir.path());
    assert_eq!((w, h, reference.len()), (16, 12, 744));
    let values = read_f32(&cube, "coarse_5/t2m", Some(0..744), 12, 16);
    for (t, band) in reference.iter().enumerate() {
        assert_close(&format!("t2m step {t}"), &values[t * w * h..(t + 1) * w * h], band, 1e-6);
    }
    // The level's own coordinates: 0.5° cell centres from the target's north-west corner.
    let lat = array(&cube, "coarse_5/lat").retrieve_array_subset::<Vec<f64>>(&[0..12]).unwrap();
    let lon = array(&cube, "coarse_5/lon").retrieve_array_subset::<Vec<f64>>(&[0..16]).unwrap();
    assert!(
        (lat[0] - 56.75).abs() < 1e-12 && (lon[0] - -7.75).abs() < 1e-12 && (lat[11] - 51.25).abs() < 1e-12
    );
    // `info` shows the level; `verify` checks its files too.
    let out = crate::util::cubeload(dir.path(), &["info", "cube.zarr"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("coarse_5/") && text.contains("upsampled bilinear"), "{text}");
    let out = crate::util::cubeload(dir.path(), &["verify", "cube.zarr"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn requests_that_cannot_nest_are_snapped_or_refused_by_key() {
    let inputs = Inputs::new();
    let text = inputs.text.replace(
        "layout: { kind: pixel_series, batch: 256 }",
        "layout: { kind: pixel_series, batch: 64, multires: true }",
    );
    let with = |t2m: &str| {
        text.replace("resampling: bilinear, units: K }", &format!("resampling: bilinear, units: K, {t2m} }}"))
    };
    // 0.2549° is not a whole number of 0.01° cells: snapped to 25 of them, with a note that says so.
    let plan = Plan::new(
        Config::from_yaml(&with("resolution: 0.2549"), Path::new("t.yaml")).unwrap(),
        String::new(),
    )
    .unwrap();
    let note = plan.variables[0].notes.iter().find(|n| n.contains("does not nest")).expect("a note");
    assert!(note.contains("25 × 25 target cells"), "{note}");
    assert_eq!(plan.levels[0].factor, [25, 25]);
    let refused = |t2m: &str| match Plan::new(
        Config::from_yaml(&with(t2m), Path::new("t.yaml")).unwrap(),
        String::new(),
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("{t2m} should be refused"),
    };
    assert!(refused("resolution: 0.001").contains("variables.t2m.resolution"));
    let e = Config::from_yaml(&with("upsampling: nearest"), Path::new("t.yaml")).unwrap_err().to_string();
    assert!(e.contains("variables.t2m.upsampling"), "{e}");
    assert!(refused("time_step: 90min").contains("variables.t2m.time_step"));
    assert!(refused("time_step: 1mo").contains("not a whole multiple"));
    assert!(refused("time_step: 10d").contains("longer than the whole time axis"));
    // Full series are padded to whole native steps (48 h → 50 h for 5 h steps); windows must be whole.
    let plan =
        Plan::new(Config::from_yaml(&with("time_step: 5h"), Path::new("t.yaml")).unwrap(), String::new())
            .unwrap();
    assert_eq!((plan.layout.chunk_t, plan.levels[0].layout.chunk_t, plan.levels[0].shape[0]), (50, 10, 10));
    let cube = generate(&plan, &GenOptions::default(), &|_, _| {}).unwrap().path;
    let b = &batches(&cube, Regrid::Target)[0];
    assert_eq!(b.shape, [64, 50, 3]);
    for (i, &valid) in b.mask.iter().enumerate() {
        // [B, T, V]: t2m (variable 0, on the 5 h level) is valid everywhere but in the 2 padding steps, as
        // NDVI is (landcover, static, is repeated along every step).
        let (step, var) = (i / 3 % 50, i % 3);
        if step >= 48 && var < 2 {
            assert_eq!(valid, 0, "step {step} of variable {var} is padding");
        } else if var == 0 {
            assert_eq!(valid, 1, "t2m at step {step}");
        }
    }
    let windowed = with("time_step: 5h").replace("batch: 64, multires", "batch: 64, window: 12, multires");
    let e =
        Plan::new(Config::from_yaml(&windowed, Path::new("t.yaml")).unwrap(), String::new()).err().unwrap();
    assert!(e.to_string().contains("layout.window"), "{e}");
    let static_step = inputs
        .text
        .replace("batch: 256 }", "batch: 256, multires: true }")
        .replace("static: true, resampling: mode }", "static: true, resampling: mode, time_step: 1d }");
    let e = Config::from_yaml(&static_step, Path::new("t.yaml")).unwrap_err().to_string();
    assert!(e.contains("variables.landcover.time_step"), "{e}");
    let no_multires = inputs
        .text
        .replace("resampling: bilinear, units: K }", "resampling: bilinear, units: K, resolution: 0.25 }");
    let e = Config::from_yaml(&no_multires, Path::new("t.yaml")).unwrap_err().to_string();
    assert!(e.contains("variables.t2m.resolution") && e.contains("layout.multires"), "{e}");
}

#[test]
fn the_shipped_configs_plan_and_the_multiresolution_one_generates() {
    // Tests run in the repository root, where the configs' relative paths (../shared/data) start.
    let mut names = Vec::new();
    for entry in std::fs::read_dir("configs").unwrap() {
        let path = entry.unwrap().path();
        let config = Config::from_path(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let text = std::fs::read_to_string(&path).unwrap();
        Plan::new(config, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        names.push(path.file_name().unwrap().to_string_lossy().to_string());
    }
    assert!(names.contains(&"uk-multires.yaml".to_string()), "{names:?}");

    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string("configs/uk-multires.yaml")
        .unwrap()
        .replace("cubes/uk-multires.zarr", &dir.path().join("uk.zarr").display().to_string());
    let plan =
        Plan::new(Config::from_yaml(&text, Path::new("uk-multires.yaml")).unwrap(), text.clone()).unwrap();
    let groups: Vec<&str> = plan.levels.iter().map(|l| l.group.as_str()).collect();
    assert_eq!(groups, ["coarse_5", "coarse_t24"]);
    let cube = generate(&plan, &GenOptions::default(), &|_, _| {}).unwrap().path;
    let b = Loader::builder(&cube).build().unwrap().next().unwrap().unwrap();
    assert_eq!(b.variables, ["t2m", "t2m_daily", "tmean"]);
    assert_eq!(b.shape, [256, 744, 3]);
    let opened = cubeload::Cube::open(&cube).unwrap();
    let valid: Vec<f64> = opened.meta().variables.iter().map(|v| v.valid_fraction).collect();
    assert!(valid.iter().all(|&f| f > 0.3), "every variable mostly covers the bbox: {valid:?}");
}

/// The validity index of a variable on a level holds a fraction per level chunk. A batch takes the largest of
/// the level chunks it reads, padding left out: a batch at the edge of a gap, whose cells bilinear upsampling
/// fills from the next level chunk, is not skipped as empty, and `min_valid` compares a batch's own share of
/// valid cells, not one diluted by the level's padding.
#[test]
fn batches_of_a_level_variable_are_kept_or_skipped_by_the_cells_they_get() {
    let dir = tempfile::tempdir().unwrap();
    // 0.05° cells over [9, 11] × [45, 46], values only in the columns of 10.0°–10.5°E.
    let (width, height, res) = (40usize, 20usize, 0.05);
    let tif = dir.path().join("band.tif");
    let values: Vec<f32> =
        (0..width * height).map(|i| if (20..30).contains(&(i % width)) { 280.0 } else { -1.0 }).collect();
    crate::util::write_lonlat_tif(&tif, (9.0, 46.0, res), width, values, Some(-1.0));
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\ngrid: {{ bbox: [9.0, 45.0, 11.0, 46.0], resolution: 0.01 }}\n\
             layout: {{ kind: pixel_series, batch: 256, multires: true }}\n\
             variables:\n  v: {{ path: {}, static: true, resolution: 0.05 }}\n",
            tif.display()
        ),
    );
    let shares = |min_valid: Option<f64>| -> Vec<([usize; 3], f64)> {
        let mut builder = Loader::builder(&cube);
        if let Some(m) = min_valid {
            builder = builder.min_valid(m);
        }
        builder
            .build()
            .unwrap()
            .map(|b| {
                let b = b.unwrap();
                let valid = b.mask.iter().map(|&m| u64::from(m)).sum::<u64>() as f64 / b.mask.len() as f64;
                (b.origin.chunk, valid)
            })
            .collect()
    };
    let every = shares(Some(0.0));
    let kept: Vec<[usize; 3]> = shares(None).into_iter().map(|(chunk, _)| chunk).collect();
    let with_values: Vec<[usize; 3]> = every.iter().filter(|(_, v)| *v > 0.0).map(|&(c, _)| c).collect();
    let missing: Vec<_> = with_values.iter().filter(|c| !kept.contains(c)).collect();
    assert!(missing.is_empty(), "batches with values skipped as empty: {missing:?}");
    assert!(kept.len() < every.len(), "batches far from the values are skipped");
    let half: Vec<[usize; 3]> = shares(Some(0.5)).into_iter().map(|(chunk, _)| chunk).collect();
    let full: Vec<_> = every.iter().filter(|(_, v)| *v == 1.0).map(|&(c, _)| c).collect();
    assert!(!full.is_empty() && full.iter().all(|c| half.contains(c)), "{full:?} not all in {half:?}");
}

#[test]
fn a_damaged_level_chunk_is_refused_by_its_checksum_not_delivered() {
    let inputs = Inputs::new();
    let multi = inputs.cube(
        "multi",
        "{ kind: pixel_series, batch: 64, multires: true }",
        "resampling: bilinear, resolution: 0.25, upsampling: bilinear",
    );
    let shard = multi.join("coarse_25/t2m/c/0/0/0");
    let mut bytes = std::fs::read(&shard).unwrap();
    // Inside the first stored chunk (the shard's index is at its end): zstd may still decode it, to other
    // values, which only the chunk's CRC32C tells apart.
    bytes[40] ^= 0x10;
    std::fs::write(&shard, bytes).unwrap();
    for regrid in [Regrid::Target, Regrid::Native] {
        let mut loader = Loader::builder(&multi).regrid(regrid).build().unwrap();
        let error = loader.find_map(Result::err).expect("the damaged chunk is reported");
        let message = error.to_string();
        assert!(message.contains("variable `t2m`") && message.contains("coarse_25/t2m/c/0/0/0"), "{message}");
        assert!(message.contains("CRC32C checksum mismatch"), "{message}");
    }
}

#[test]
fn a_window_without_a_source_step_takes_the_one_nearest_its_middle() {
    // Six-hourly CO2 (from 06:00 on 2006-01-01) on an hourly axis, kept at 4 h and 6 h steps: a window with
    // no source step inside takes the one nearest its middle, within half the larger of the source's spacing
    // and the window, as a target step does (the nearest to the window's first hour gave NaN for [00, 06)
    // and 06:00 for [08, 12)).
    let dir = tempfile::tempdir().unwrap();
    let co2 = shared_data("SMALL_total_column_co2.nc");
    let var =
        |step: &str| format!("{{ path: {}, variable: tcco2, resampling: nearest{step} }}", co2.display());
    let cube = gen_ok(
        dir.path(),
        &format!(
            "output: cube.zarr\ngrid: {{ bbox: [0.0, 40.5, 9.0, 49.5], resolution: 1.125 }}\n\
             time: {{ start: 2006-01-01T00:00:00Z, end: 2006-01-03T03:00:00Z, step: 1h }}\n\
             layout: {{ kind: pixel_series, batch: 64, multires: true }}\nvariables:\n  co2: {}\n  \
             co2_4h: {}\n  co2_6h: {}\n",
            var(""),
            var(", time_step: 4h"),
            var(", time_step: 6h")
        ),
    );
    let plane = 64;
    let hourly = read_f32(&cube, "co2", Some(0..52), 8, 8);
    let hour = |h: usize| &hourly[h * plane..(h + 1) * plane];
    assert!(hour(6).iter().all(|v| !v.is_nan()) && hour(6) != hour(12));
    let m = meta(&cube);
    let group = |q: u64| {
        let levels = m["levels"].as_array().unwrap();
        let level = levels.iter().find(|l| l["time_factor"] == q).unwrap();
        level["group"].as_str().unwrap().to_string()
    };
    // The source hour each window holds (None: no source near enough, missing).
    let expected: [(u64, &[Option<usize>]); 2] = [
        (
            4,
            &[
                None,
                Some(6),
                Some(12),
                Some(12),
                Some(18),
                Some(24),
                Some(24),
                Some(30),
                Some(36),
                Some(36),
                Some(42),
                Some(48),
                Some(48),
            ],
        ),
        (6, &[Some(6), Some(6), Some(12), Some(18), Some(24), Some(30), Some(36), Some(42), Some(48)]),
    ];
    // A sum keeps to the source steps inside each window: the windows that took the nearest step are
    // missing, and a note counts them.
    let config = std::fs::read_to_string(dir.path().join("cube.yaml")).unwrap();
    let summed = config.replace(
        &format!("  co2_6h: {}", var(", time_step: 6h")),
        &format!(
            "  co2_6h: {}\n  co2_sum: {}",
            var(", time_step: 6h"),
            var(", time_step: 4h, aggregation: sum")
        ),
    );
    assert_ne!(summed, config);
    std::fs::write(dir.path().join("summed.yaml"), summed.replace("cube.zarr", "summed.zarr")).unwrap();
    let out = crate::util::cubeload(dir.path(), &["gen", "-c", "summed.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Five windows are missing (below), four of which another aggregation would fill from the nearest step.
    let note = "variable `co2_sum`: aggregation sum: 5 of 13 stored steps hold no source step and are missing, \
                4 of them because";
    assert!(stderr.contains(note), "{stderr}");
    let sums = read_f32(&dir.path().join("summed.zarr"), &format!("{}/co2_sum", group(4)), Some(0..13), 8, 8);
    for k in 0..13 {
        let window = &sums[k * plane..(k + 1) * plane];
        let inside = [1, 3, 4, 6, 7, 9, 10, 12].contains(&k);
        assert_eq!(window.iter().all(|v| !v.is_nan()), inside, "co2_sum window {k}");
    }
    for (q, hours) in expected {
        let name = format!("{}/co2_{q}h", group(q));
        let level = read_f32(&cube, &name, Some(0..hours.len() as u64), 8, 8);
        for (k, source) in hours.iter().enumerate() {
            let window = &level[k * plane..(k + 1) * plane];
            match source {
                Some(h) => assert_eq!(window, hour(*h), "{name} window {k}"),
                None => assert!(window.iter().all(|v| v.is_nan()), "{name} window {k}: {window:?}"),
            }
        }
    }
}
