//! `cubeload info`: what a cube holds, as a table or as JSON.

use std::fmt::Write;

use crate::Cube;
use crate::layout::LayoutKind;
use serde_json::{Value, json};

pub(crate) fn human_bytes(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.2} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.1} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.1} kB", n / 1e3),
        n => format!("{n} B"),
    }
}

/// The metadata plus storage figures, as one JSON object.
pub(crate) fn json(cube: &Cube) -> Value {
    let on_disk = cube.bytes_on_disk();
    let raw = cube.uncompressed_bytes();
    let mut value = serde_json::to_value(cube.meta()).expect("serializable");
    // An integer variable's fill value as the integer it is (`255`, not `255.0`, as the metadata keeps it).
    let variables = value["variables"].as_array_mut().into_iter().flatten();
    for (v, meta) in variables.zip(&cube.meta().variables) {
        if let Some(fill) = meta.fill_value.filter(|_| meta.dtype != crate::plan::DType::Float32) {
            v["fill_value"] = json!(fill as i64);
        }
    }
    let object = value.as_object_mut().expect("a struct");
    object.insert("path".into(), json!(cube.path()));
    object.insert("bytes_on_disk".into(), json!(on_disk));
    object.insert("uncompressed_bytes".into(), json!(raw));
    object.insert("compression_ratio".into(), json!(raw as f64 / on_disk.max(1) as f64));
    object.insert("batches".into(), json!(cube.meta().chunk_counts().iter().product::<usize>()));
    object.insert("gen_running".into(), json!(crate::generator::run_in_progress(cube.path())));
    value
}

/// A human-readable description.
pub(crate) fn table(cube: &Cube) -> String {
    let meta = cube.meta();
    let layout = &meta.layout;
    let [ct, cy, cx] = meta.chunk_counts();
    let mut out = String::new();
    let _ =
        writeln!(out, "cube       {} ({}, created {})", cube.path().display(), meta.generator, meta.created);
    let what = match layout.kind {
        LayoutKind::PixelSeries if layout.shuffled.is_some() => format!(
            "pixel_series, order shuffled (seed {}): batch = {} random pixels × {} steps, stored (sample, time)",
            layout.shuffled.unwrap_or_default(),
            layout.batch,
            layout.chunk_t
        ),
        // A cube of static variables only has no time axis to count steps along.
        LayoutKind::PixelSeries if meta.time.is_none() => {
            format!("pixel_series: batch = {} pixels ({} × {})", layout.batch, layout.chunk_y, layout.chunk_x)
        }
        LayoutKind::PixelSeries => {
            format!(
                "pixel_series: batch = {} pixels ({} × {}) × {} steps",
                layout.batch, layout.chunk_y, layout.chunk_x, layout.chunk_t
            )
        }
        LayoutKind::ImageSequence => format!(
            "image_sequence: batch = {} samples of {} frames × {} × {} pixels",
            layout.batch, layout.chunk_t, layout.patch[0], layout.patch[1]
        ),
    };
    let _ = writeln!(out, "layout     {what}");
    let shards =
        if layout.shard_x > 1 { format!(", {} batches per shard", layout.shard_x) } else { String::new() };
    // Chunks and their counts along the stored axes: (sample, time) for a shuffled cube, (lat, lon) for one
    // of static variables only, (time, lat, lon) otherwise.
    let (chunk, counts) = if layout.shuffled.is_some() {
        (format!("({}, {})", layout.chunk_y, layout.chunk_t), format!("{cy} × {ct}"))
    } else if meta.time.is_none() {
        (format!("({}, {})", layout.chunk_y, layout.chunk_x), format!("{cy} × {cx}"))
    } else {
        (
            format!("({}, {}, {})", layout.chunk_t, layout.chunk_y, layout.chunk_x),
            format!("{ct} × {cy} × {cx}"),
        )
    };
    let _ = writeln!(out, "chunks     {chunk} = one batch; {counts} = {} batches{shards}", ct * cy * cx);
    let grid = &meta.grid;
    let [_, height, width] = meta.shape;
    let [padded_steps, padded_height, padded_width] = meta.padded_shape;
    let stored = if layout.shuffled.is_some() && padded_height > height * width {
        format!(", stored as {padded_height} samples (padded to whole batches)")
    } else if layout.shuffled.is_none() && (padded_height, padded_width) != (height, width) {
        format!(", stored as {padded_width} × {padded_height} (padded to whole batches)")
    } else {
        String::new()
    };
    let _ = writeln!(out, "grid       {grid} (EPSG:4326){stored}");
    match &meta.time {
        Some(t) => {
            let step = t.step.as_deref().map_or_else(|| "irregular".to_string(), |s| format!("step {s}"));
            let padded = if padded_steps > t.steps {
                format!(", stored as {padded_steps} (padded to whole batches)")
            } else {
                String::new()
            };
            let steps = if t.steps == 1 { "step" } else { "steps" };
            let _ = writeln!(out, "time       {} {steps}, {} … {}, {step}{padded}", t.steps, t.start, t.end);
        }
        None => {
            let _ = writeln!(out, "time       none (static variables only)");
        }
    }
    let on_disk = cube.bytes_on_disk();
    let raw = cube.uncompressed_bytes();
    let _ = writeln!(
        out,
        "storage    {} on disk, {} uncompressed (ratio {:.2}), {}",
        human_bytes(on_disk),
        human_bytes(raw),
        raw as f64 / on_disk.max(1) as f64,
        meta.compression
    );
    for level in &meta.levels {
        let g = &level.grid;
        let names: Vec<&str> = meta
            .variables
            .iter()
            .filter(|v| v.level.is_some_and(|l| meta.levels[l].group == level.group))
            .map(|v| v.name.as_str())
            .collect();
        let _ = writeln!(
            out,
            "level      {}/: {} × {} cells of {}° × {}° ({} × {} target cells each), chunks ({}, {}, {}) = {} × {} \
             batches; {}",
            level.group,
            g.width,
            g.height,
            g.res_x,
            g.res_y,
            level.factor[1],
            level.factor[0],
            level.layout.chunk_t,
            level.layout.chunk_y,
            level.layout.chunk_x,
            level.nest[0],
            level.nest[1],
            names.join(", ")
        );
    }
    let _ = writeln!(out, "variables");
    // Columns as wide as their longest name and units (`degrees_celsius`), so that the figures stay in line.
    let width = |texts: &mut dyn Iterator<Item = &str>, least: usize| {
        texts.map(|t| t.chars().count()).max().unwrap_or(0).max(least)
    };
    let name_width = width(&mut meta.variables.iter().map(|v| v.name.as_str()), 14);
    let units_width = width(&mut meta.variables.iter().map(|v| v.units.as_deref().unwrap_or("-")), 11);
    let _ = writeln!(
        out,
        "  {:<name_width$} {:<16} {:<8} {:<units_width$} {:>7} {:>11} {:>10} {:>11} {:>11}",
        "name", "dims", "dtype", "units", "valid", "mean", "std", "min", "max"
    );
    for v in &meta.variables {
        let dims = match (layout.shuffled.is_some(), v.is_static) {
            (true, true) => "(sample)",
            (true, false) => "(sample, time)",
            (false, true) => "(lat, lon)",
            (false, false) => "(time, lat, lon)",
        };
        let level = match (v.level, v.upsampling) {
            (Some(l), Some(up)) => {
                let up = if up == crate::config::Upsampling::Bilinear { "bilinear" } else { "nearest" };
                format!("  on {}/, upsampled {up}", meta.levels[l].group)
            }
            _ => String::new(),
        };
        let dtype = serde_json::to_value(v.dtype)
            .ok()
            .and_then(|d| d.as_str().map(str::to_string))
            .unwrap_or_default();
        let (mean, std, min, max) = v.stats.map_or_else(
            || ("-".to_string(), "-".to_string(), "-".to_string(), "-".to_string()),
            |s| {
                (
                    format!("{:.4}", s.mean),
                    format!("{:.4}", s.std),
                    format!("{:.4}", s.min),
                    format!("{:.4}", s.max),
                )
            },
        );
        let _ = writeln!(
            out,
            "  {:<name_width$} {:<16} {:<8} {:<units_width$} {:>6.1}% {:>11} {:>10} {:>11} {:>11}{level}",
            v.name,
            dims,
            dtype,
            v.units.as_deref().unwrap_or("-"),
            v.valid_fraction * 100.0,
            mean,
            std,
            min,
            max
        );
    }
    // What generation said about each variable (a snapped resolution, an assumed CRS, ...).
    let notes: Vec<(&str, &String)> =
        meta.variables.iter().flat_map(|v| v.notes.iter().map(|n| (v.name.as_str(), n))).collect();
    if !notes.is_empty() {
        let _ = writeln!(out, "notes");
        for (name, note) in notes {
            let _ = writeln!(out, "  {name}: {note}");
        }
    }
    if crate::generator::run_in_progress(cube.path()) {
        let _ = writeln!(out, "{RUNNING}");
    }
    out
}

/// Said of a cube whose output a `gen` run holds: `--overwrite`, `--append` or `--finalize` may replace it.
const RUNNING: &str = "running    a run of `cubeload gen` on this output is in progress; this cube stays as \
                       shown until that run completes and may then be replaced";
