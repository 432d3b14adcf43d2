//! Pictures for people: the benchmark's throughput and latency, and a quicklook of one time slice of a cube
//! (values and valid mask), so that a user can see that a cube is right before training on it.
//!
//! Text is drawn with `DejaVu Sans` (Debian's `fonts-dejavu-core`, installed by `scripts/setup.sh`); a
//! missing font is a clear error, not a picture without labels.

// Colour and pixel arithmetic reads best with short names; `&[0..n]` is a one-dimensional array subset.
#![allow(clippy::many_single_char_names, clippy::single_range_in_vec_init)]

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::bench::BenchReport;
use crate::cube::reader::Cube;

/// A plotting error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlotError {
    /// The font is missing.
    #[error(
        "cannot read the font {path}: {source} (install Debian's fonts-dejavu-core, or run scripts/setup.sh)"
    )]
    Font {
        /// Where it was looked for.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Drawing or writing the PNG failed.
    #[error("{path}: {message}")]
    Draw {
        /// The PNG.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The cube cannot be read as asked.
    #[error("{0}")]
    Cube(String),
    /// The cube has no such variable or time step as asked: the invocation is at fault (exit code 2).
    #[error("{0}")]
    NotInCube(String),
    /// The output is not a `.png` path: the invocation is at fault (exit code 2).
    #[error("{path}: the picture is written as PNG: give a path ending in .png")]
    NotPng {
        /// The path given.
        path: PathBuf,
    },
}

impl PlotError {
    /// Whether the invocation is at fault (exit code 2) rather than the cube or the machine (1).
    #[must_use]
    pub fn is_usage(&self) -> bool {
        matches!(self, PlotError::NotInCube(_) | PlotError::NotPng { .. })
    }
}

/// Checks, before anything is computed, that a picture can be written at `out`: a `.png` path (the drawing
/// backend picks the format from the extension) in a directory that exists.
///
/// # Errors
/// [`PlotError::NotPng`], or [`PlotError::Draw`] naming the missing directory.
pub fn check_png(out: &Path) -> Result<(), PlotError> {
    if !out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        return Err(PlotError::NotPng { path: out.to_path_buf() });
    }
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(PlotError::Draw {
            path: out.to_path_buf(),
            message: format!("cannot write: the directory {} does not exist", dir.display()),
        });
    }
    Ok(())
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> Result<(), PlotError> {
    // Set once the font is registered: a failed registration is tried again, and fails again, by the next
    // picture of the process rather than letting it draw without text.
    static REGISTERED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if REGISTERED.get().is_none() {
        let bytes = std::fs::read(FONT).map_err(|source| PlotError::Font { path: FONT.into(), source })?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| {
            PlotError::Font { path: FONT.into(), source: std::io::Error::other("not a TrueType font") }
        })?;
        let _ = REGISTERED.set(());
    }
    Ok(())
}

fn draw_err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> PlotError + '_ {
    move |e| PlotError::Draw { path: path.to_path_buf(), message: e.to_string() }
}

/// Throughput bars (loader, ceiling with writes, ceiling, image-chunked) and the per-batch latency of the
/// loader epoch. The bars are batches per second, the ceilings' and the image-chunked copy's as the ratios
/// make them (the loader's rate ÷ its ratio to each): their GB/s count decoded bytes, which a batch that
/// repeats static variables along time outnumbers.
///
/// # Errors
/// [`PlotError`] when the font is missing or the PNG cannot be written.
pub fn bench(report: &BenchReport, out: &Path) -> Result<(), PlotError> {
    check_png(out)?;
    register_font()?;
    let err = draw_err(out);
    let root = BitMapBackend::new(out, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(520);

    let per_batch_s = 1.0 / report.batches_per_s.max(f64::MIN_POSITIVE);
    let rate = report.batches_per_s;
    let image = report.speedup_vs_image_chunked.map(|s| rate / s);
    let bars: Vec<(&str, f64, RGBColor)> = [
        Some(("loader", rate, RGBColor(31, 119, 180))),
        Some(("ceiling with writes", rate / report.ratio_to_ceiling_with_writes, RGBColor(188, 189, 34))),
        Some(("ceiling", report.ceiling_batches_per_s, RGBColor(127, 127, 127))),
        image.map(|v| ("image-chunked", v, RGBColor(214, 39, 40))),
    ]
    .into_iter()
    .flatten()
    .collect();
    let top = bars.iter().map(|b| b.1).fold(0.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&left)
        .caption("throughput (batches/s)", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(30)
        .y_label_area_size(50)
        // Segments, so that each name stands under the middle of its bar.
        .build_cartesian_2d((0..bars.len() - 1).into_segmented(), 0.0..top.max(1e-9))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|segment| match segment {
            SegmentValue::CenterOf(i) => bars.get(*i).map_or(String::new(), |b| b.0.to_string()),
            _ => String::new(),
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, v, color))| {
            let mut bar = Rectangle::new(
                [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), *v)],
                color.filled(),
            );
            bar.set_margin(0, 0, 20, 20);
            bar
        }))
        .map_err(|e| err(&e))?;
    let centred =
        ("sans-serif", 15).into_font().into_text_style(&left).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, v, _))| {
            Text::new(format!("{v:.0}"), (SegmentValue::CenterOf(i), *v + top * 0.01), centred.clone())
        }))
        .map_err(|e| err(&e))?;

    let latencies = &report.latencies_ms;
    let max_latency = latencies.iter().copied().fold(0.0, f64::max).max(per_batch_s * 1e3) * 1.1;
    let mut chart = ChartBuilder::on(&right)
        .caption(
            format!(
                "wait per batch (ms): p50 {:.2}, p99 {:.2}, first {:.1}",
                report.latency_ms_p50, report.latency_ms_p99, report.time_to_first_batch_ms
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0..latencies.len().max(1), 0.0..max_latency.max(1e-6))
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc("batch").label_style(("sans-serif", 15)).draw().map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            latencies.iter().enumerate().map(|(i, &v)| (i, v)),
            &RGBColor(31, 119, 180),
        ))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// A colour for `t` in 0…1 (viridis, from its endpoints and three stops).
fn viridis(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let x = t.clamp(0.0, 1.0) * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// The step of `cube`'s time axis that `text` names: its index, or its instant (any form a config's times
/// take), which must be one of the axis's.
///
/// # Errors
/// [`PlotError::NotInCube`] for text that is neither, or an instant the axis does not have (the nearest it
/// has is named); [`PlotError::Cube`] when the time coordinate cannot be read.
pub fn time_step(cube: &Cube, text: &str) -> Result<usize, PlotError> {
    if let Ok(index) = text.parse::<usize>() {
        return Ok(index);
    }
    let instant = crate::time::parse_timestamp(text).map_err(|_| {
        PlotError::NotInCube(format!("--time {text}: neither a step index nor a date and time"))
    })?;
    let times = cube.times().map_err(|e| PlotError::Cube(e.to_string()))?;
    let nearest = times.iter().enumerate().min_by_key(|(_, t)| (**t - instant).unsigned_abs());
    match nearest {
        Some((i, &t)) if t == instant => Ok(i),
        Some((i, &t)) => Err(PlotError::NotInCube(format!(
            "--time {text}: no step of the cube at {}; the nearest is {} (step {i})",
            crate::time::format_instant(instant),
            crate::time::format_instant(t)
        ))),
        None => Err(PlotError::NotInCube(format!("--time {text}: the cube has no time axis"))),
    }
}

/// One time slice of `variable` (values and valid mask) as a PNG. `time` is a step of the cube's time
/// axis (ignored for a static variable); a variable on a coarser time level is drawn at the level step that
/// holds it.
///
/// # Errors
/// [`PlotError`] when the variable or time index does not exist, a chunk cannot be read or fails its
/// checksum, or the PNG cannot be written.
pub fn quicklook(cube: &Cube, variable: &str, time: usize, out: &Path) -> Result<(), PlotError> {
    check_png(out)?;
    register_font()?;
    let meta = cube.meta();
    let v = meta.variables.iter().find(|v| v.name == variable).ok_or_else(|| {
        let names: Vec<&str> = meta.variables.iter().map(|v| v.name.as_str()).collect();
        PlotError::NotInCube(format!(
            "no variable `{variable}` in {} (its variables: {})",
            cube.path().display(),
            names.join(", ")
        ))
    })?;
    let geometry = meta.geometry(v);
    let [_, height, width] = geometry.shape;
    let n_time = meta.shape[0];
    if !v.is_static && time >= n_time {
        return Err(PlotError::NotInCube(format!(
            "time index {time} is past the {n_time} steps of the cube"
        )));
    }
    // The level step holding the cube's step `time` (the same step on the target's time axis).
    let q = geometry.level.map_or(1, |l| l.time_factor.max(1));
    let step = time / q;
    // The loader's errors name the cube, the variable and the chunk.
    let values = slice(cube, v, step, height, width).map_err(PlotError::Cube)?;
    let fill = v.fill_value;
    let valid = |x: f64| !x.is_nan() && Some(x) != fill;
    let (lo, hi) = values
        .iter()
        .copied()
        .filter(|&x| valid(x))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    let scale = (700 / width.max(height)).clamp(1, 12);
    let (w, h) = ((width * scale) as u32, (height * scale) as u32);
    let err = draw_err(out);
    let when = match (&meta.time, v.is_static) {
        (Some(_), false) => {
            // The step's instant too: a date given to `--time` is found again in the title.
            let times = cube.times().map_err(|e| PlotError::Cube(e.to_string()))?;
            let mut about: Vec<String> =
                times.get(time).map(|&t| crate::time::format_instant(t)).into_iter().collect();
            if let Some(level) = geometry.level.filter(|_| q > 1) {
                about.push(format!("step {step} of {}, {q} steps each", level.group));
            }
            format!("time index {time} ({})", about.join("; "))
        }
        _ => "static".to_string(),
    };
    let valid_count = values.iter().filter(|&&x| valid(x)).count();
    let range =
        if valid_count == 0 { "no valid value".to_string() } else { format!("min {lo:.4}, max {hi:.4}") };
    // A variable kept coarser is drawn on its level's cells: the title says so.
    let on_level = geometry
        .level
        .filter(|l| l.factor != [1, 1])
        .map(|l| format!(" on {} ({} × {} target cells each)", l.group, l.factor[0], l.factor[1]))
        .unwrap_or_default();
    let title = format!(
        "{variable} ({}){on_level}, {when}: {range}; valid {:.1} %",
        v.units.as_deref().unwrap_or("-"),
        100.0 * valid_count as f64 / values.len().max(1) as f64
    );
    let caption = "valid mask (dark = valid)";
    let (title_font, caption_font) = (("sans-serif", 18).into_font(), ("sans-serif", 14).into_font());
    // Wide enough for the title and the mask's caption, however small the grid.
    let text_width = |font: &FontDesc, text: &str| font.box_size(text).map_or(0, |(w, _)| w);
    let canvas = (2 * w + 60)
        .max(text_width(&title_font, &title) + 40)
        .max(w + text_width(&caption_font, caption) + 60);
    let root = BitMapBackend::new(out, (canvas, h + 90)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    root.draw(&Text::new(title, (20, 15), title_font)).map_err(|e| err(&e))?;
    let span = if hi > lo { hi - lo } else { 1.0 };
    for y in 0..height {
        for x in 0..width {
            let value = values[y * width + x];
            let (color, mask) = if valid(value) {
                (viridis((value - lo) / span), RGBColor(20, 20, 20))
            } else {
                (RGBColor(200, 200, 200), RGBColor(235, 235, 235))
            };
            for (offset, c) in [(20, color), (40 + w as i32, mask)] {
                let x0 = offset + (x * scale) as i32;
                let y0 = 50 + (y * scale) as i32;
                root.draw(&Rectangle::new([(x0, y0), (x0 + scale as i32, y0 + scale as i32)], c.filled()))
                    .map_err(|e| err(&e))?;
            }
        }
    }
    root.draw(&Text::new(caption, (40 + w as i32, 32), caption_font)).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// What [`slice()`] does with a stored chunk: its region in the array and its decoded values.
type Place<'a> = dyn FnMut(&[std::ops::Range<u64>], &[f32]) + 'a;

/// `height × width` values of step `time` of `v` (on its own grid and time axis, north-up), NaN where
/// nothing is stored. Whole stored chunks are read as the loader reads them, checksums checked: zarrs'
/// reading of a part of a chunk does not check the chunk's CRC32C, and a damaged chunk could be drawn.
fn slice(
    cube: &Cube,
    v: &crate::cube::VariableMeta,
    time: usize,
    height: usize,
    width: usize,
) -> Result<Vec<f64>, String> {
    use crate::loader::assemble::{Assembler, Transform};
    let meta = cube.meta();
    let geometry = meta.geometry(v);
    let layout = geometry.layout;
    let assembler = Assembler::new(cube, std::slice::from_ref(&v.name), Transform::default())
        .map_err(|e| e.to_string())?;
    // With the validity index read, a chunk not stored although it has values is an error, not a gap.
    assembler.validity(cube).map_err(|e| e.to_string())?;
    let [_, rows_n, cols_n] = geometry.chunk_counts();
    let it = if v.is_static { 0 } else { time / layout.chunk_t };
    // Each stored chunk's region and values, placed straight from the decoded buffer.
    let chunk = |id, place: &mut Place<'_>| -> Result<(), String> {
        let subset = layout.chunk_subset(v.is_static, id);
        assembler
            .decode_stored_then(0, id, |values| place(&subset, values))
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let mut out = vec![f64::NAN; height * width];
    if layout.shuffled.is_none() {
        for iy in 0..rows_n {
            for ix in 0..cols_n {
                chunk([it, iy, ix], &mut |subset, values| {
                    let (rows, cols) = (&subset[subset.len() - 2], &subset[subset.len() - 1]);
                    let (cy, cx) = ((rows.end - rows.start) as usize, (cols.end - cols.start) as usize);
                    let plane = if v.is_static { 0 } else { (time - subset[0].start as usize) * cy * cx };
                    for y in 0..cy.min(height.saturating_sub(rows.start as usize)) {
                        let row = rows.start as usize + y;
                        for x in 0..cx.min(width.saturating_sub(cols.start as usize)) {
                            out[row * width + cols.start as usize + x] =
                                f64::from(values[plane + y * cx + x]);
                        }
                    }
                })?;
            }
        }
        return Ok(out);
    }
    // Sample-major: each sample put back on the grid from its coordinates.
    let samples = (height * width) as u64;
    let coordinate = |name: &str| -> Result<Vec<f64>, String> {
        use zarrs::array::ArraySubset;
        let error =
            |e: &dyn std::fmt::Display| format!("{}: coordinate `{name}`: {e}", cube.path().display());
        let a = cube.array(name).map_err(|e| error(&e))?;
        a.retrieve_array_subset::<Vec<f64>>(&ArraySubset::new_with_ranges(&[0..samples]))
            .map_err(|e| error(&e))
    };
    let (lat, lon) = (coordinate("lat")?, coordinate("lon")?);
    let grid = meta.grid;
    for ib in 0..rows_n {
        chunk([it, ib, 0], &mut |subset, values| {
            let (first, per_sample) =
                (subset[0].start as usize, if v.is_static { 1 } else { layout.chunk_t });
            let offset = if v.is_static { 0 } else { time - subset[1].start as usize };
            for (k, value) in values.iter().skip(offset).step_by(per_sample).enumerate() {
                let sample = first + k;
                let (Some(la), Some(lo)) = (lat.get(sample), lon.get(sample)) else { continue };
                let y = ((grid.north - la) / grid.res_y - 0.5).round() as usize;
                let x = ((lo - grid.west) / grid.res_x - 0.5).round() as usize;
                if y < height && x < width {
                    out[y * width + x] = f64::from(*value);
                }
            }
        })?;
    }
    Ok(out)
}
