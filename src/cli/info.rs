//! `cubeload info`: what a cube holds, as a table or as JSON.

use std::fmt::Write;

use cubeload::Cube;
use cubeload::layout::LayoutKind;
use serde_json::{Value, json};

fn human_bytes(n: u64) -> String {
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
    let object = value.as_object_mut().expect("a struct");
    object.insert("path".into(), json!(cube.path()));
    object.insert("bytes_on_disk".into(), json!(on_disk));
    object.insert("uncompressed_bytes".into(), json!(raw));
    object.insert("compression_ratio".into(), json!(raw as f64 / on_disk.max(1) as f64));
    object.insert("batches".into(), json!(cube.meta().chunk_counts().iter().product::<usize>()));
    value
}

/// A human-readable description.
pub(crate) fn table(cube: &Cube) -> String {
    let m = cube.meta();
    let l = &m.layout;
    let [ct, cy, cx] = m.chunk_counts();
    let mut out = String::new();
    let _ = writeln!(out, "cube       {} ({}, created {})", cube.path().display(), m.generator, m.created);
    let what = match l.kind {
        LayoutKind::PixelSeries => {
            format!(
                "pixel_series: batch = {} pixels ({} × {}) × {} steps",
                l.batch, l.chunk_y, l.chunk_x, l.chunk_t
            )
        }
        LayoutKind::ImageSequence => format!(
            "image_sequence: batch = {} samples of {} frames × {} × {} pixels",
            l.batch, l.chunk_t, l.patch[0], l.patch[1]
        ),
    };
    let _ = writeln!(out, "layout     {what}");
    let shards = if l.shard_x > 1 { format!(", {} batches per shard", l.shard_x) } else { String::new() };
    let _ = writeln!(
        out,
        "chunks     ({}, {}, {}) = one batch; {} × {} × {} = {} batches{shards}",
        l.chunk_t,
        l.chunk_y,
        l.chunk_x,
        ct,
        cy,
        cx,
        ct * cy * cx
    );
    let g = &m.grid;
    let b = g.bounds();
    let _ = writeln!(
        out,
        "grid       {} × {} cells of {}° × {}°, bbox [{}, {}, {}, {}] (EPSG:4326), stored {} × {} (padded to whole batches)",
        g.width, g.height, g.res_x, g.res_y, b[0], b[1], b[2], b[3], m.padded_shape[2], m.padded_shape[1]
    );
    match &m.time {
        Some(t) => {
            let step = t.step.as_deref().map_or_else(|| "irregular".to_string(), |s| format!("step {s}"));
            let _ = writeln!(out, "time       {} steps, {} … {}, {step}", t.steps, t.start, t.end);
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
        m.compression
    );
    let _ = writeln!(out, "variables");
    let _ = writeln!(
        out,
        "  {:<14} {:<16} {:<8} {:<11} {:>7} {:>11} {:>10} {:>11} {:>11}",
        "name", "dims", "dtype", "units", "valid", "mean", "std", "min", "max"
    );
    for v in &m.variables {
        let dims = if v.is_static { "(lat, lon)" } else { "(time, lat, lon)" };
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
            "  {:<14} {:<16} {:<8} {:<11} {:>6.1}% {:>11} {:>10} {:>11} {:>11}",
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
    out
}
