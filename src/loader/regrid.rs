//! On-the-fly regridding of multi-resolution cubes: a variable stored on a coarser level is brought onto the
//! target cells of a batch from the level chunks around it, following the contract of [`crate::levels`].
//! Decoded level chunks are kept in a small cache: the batches that share a level chunk read it once.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::config::Upsampling;
use crate::levels::Level;

/// A dense block of level cells `[t][row][col]` (rows `rows`, cols `cols` of the level grid), NaN where
/// missing.
#[derive(Debug, Clone)]
pub struct Window {
    /// Level rows held.
    pub rows: Range<usize>,
    /// Level columns held.
    pub cols: Range<usize>,
    /// Time steps held (1 for static variables).
    pub steps: usize,
    /// `steps × rows × cols` values.
    pub values: Vec<f32>,
}

/// Level rows (or columns) an upsampling of target cells `cells` reads, clamped to the `n` valid level cells.
#[must_use]
pub fn level_span(upsampling: Upsampling, cells: &Range<usize>, k: usize, n: usize) -> Range<usize> {
    let last = n.saturating_sub(1);
    let (lo, hi) = match upsampling {
        Upsampling::Nearest => (cells.start / k, (cells.end - 1) / k),
        Upsampling::Bilinear => {
            let (a, b) = (taps(cells.start, k, n), taps(cells.end - 1, k, n));
            (a.0, b.1)
        }
    };
    lo.min(last)..hi.min(last) + 1
}

/// The two level cells around the centre of target cell `i` (factor `k`, `n` valid level cells) and the
/// weight of the second: `((i + ½) / k − ½)` split into whole and fractional parts, clamped at the edges.
#[inline]
#[must_use]
pub fn taps(i: usize, k: usize, n: usize) -> (usize, usize, f32) {
    let u = (i as f64 + 0.5) / k as f64 - 0.5;
    let last = n.saturating_sub(1);
    if u <= 0.0 {
        return (0, 0, 0.0);
    }
    let lo = u.floor() as usize;
    let fraction = u - lo as f64;
    // On a centre (or past the last one) one cell: a batch then reads no level chunk it does not use.
    if lo >= last || fraction == 0.0 {
        return (lo.min(last), lo.min(last), 0.0);
    }
    (lo, lo + 1, fraction as f32)
}

/// Target cells `rows × cols` (of a grid of `valid = (height, width)` cells; cells past it are padding and
/// come out NaN) upsampled from `window`, as `[t][row][col]`. Where each cell reads, and with which weights,
/// is the same at every step: it is worked out once, then applied step after step.
#[must_use]
pub fn upsample(
    window: &Window,
    level: &Level,
    upsampling: Upsampling,
    rows: Range<usize>,
    cols: Range<usize>,
    valid: (usize, usize),
) -> Vec<f32> {
    let [ky, kx] = level.factor;
    let (n_rows, n_cols) = (level.grid.height, level.grid.width);
    let (h, w) = (rows.len(), cols.len());
    let width = window.cols.len();
    let plane = window.rows.len() * width;
    // Offset of level cell (row, col) in a step of the window.
    let at = |row: usize, col: usize| (row - window.rows.start) * width + col - window.cols.start;
    let inside = |y: usize, x: usize| rows.start + y < valid.0 && cols.start + x < valid.1;
    let mut out = vec![f32::NAN; window.steps * h * w];
    match upsampling {
        Upsampling::Nearest => {
            // Each row of cells reads one level row, and runs of `kx` cells one level cell: worked out once,
            // each run filled at every step (cells past the valid grid stay NaN).
            let (hv, wv) =
                (valid.0.saturating_sub(rows.start).min(h), valid.1.saturating_sub(cols.start).min(w));
            let from_rows: Vec<usize> =
                (0..hv).map(|y| at(((rows.start + y) / ky).min(n_rows - 1), window.cols.start)).collect();
            let mut runs: Vec<(Range<usize>, usize)> = Vec::new();
            for x in 0..wv {
                let col = ((cols.start + x) / kx).min(n_cols - 1) - window.cols.start;
                match runs.last_mut() {
                    Some((run, c)) if *c == col => run.end = x + 1,
                    _ => runs.push((x..x + 1, col)),
                }
            }
            for (step, values) in out.chunks_exact_mut(h * w).zip(window.values.chunks_exact(plane)) {
                for (row, &from) in step.chunks_exact_mut(w).zip(&from_rows) {
                    for (run, col) in &runs {
                        row[run.clone()].fill(values[from + col]);
                    }
                }
            }
        }
        Upsampling::Bilinear => {
            let col_taps: Vec<(usize, usize, f32)> = cols.clone().map(|c| taps(c, kx, n_cols)).collect();
            let row_taps: Vec<(usize, usize, f32)> = rows.clone().map(|r| taps(r, ky, n_rows)).collect();
            // The four corners of each cell, as (offset, weight).
            let corners: Vec<Option<[(usize, f32); 4]>> = (0..h * w)
                .map(|cell| {
                    let (y, x) = (cell / w, cell % w);
                    let ((r0, r1, fy), (c0, c1, fx)) = (row_taps[y], col_taps[x]);
                    inside(y, x).then(|| {
                        [
                            (at(r0, c0), (1.0 - fy) * (1.0 - fx)),
                            (at(r0, c1), (1.0 - fy) * fx),
                            (at(r1, c0), fy * (1.0 - fx)),
                            (at(r1, c1), fy * fx),
                        ]
                    })
                })
                .collect();
            // Each step is interpolated across columns, then down rows: its cells vectorize, and the
            // window's few rows are interpolated once for all cells below them (a factor of 50 puts a tile
            // of 16 × 16 cells between 2 × 2 level cells). As the weights of the four corners sum to 1, this
            // is their weighted mean, to rounding. A missing corner makes its cells NaN there; in a step with
            // missing values those cells alone are then worked out again, corner by corner.
            let (hv, wv) =
                (valid.0.saturating_sub(rows.start).min(h), valid.1.saturating_sub(cols.start).min(w));
            let (r_first, c_first) = (window.rows.start, window.cols.start);
            let across_cols: Vec<(usize, usize, f32)> =
                col_taps[..wv].iter().map(|&(c0, c1, fx)| (c0 - c_first, c1 - c_first, fx)).collect();
            let down_rows: Vec<(usize, usize, f32)> =
                row_taps[..hv].iter().map(|&(r0, r1, fy)| (r0 - r_first, r1 - r_first, fy)).collect();
            let mut across = vec![0.0f32; window.rows.len() * wv];
            for (step, values) in out.chunks_exact_mut(h * w).zip(window.values.chunks_exact(plane)) {
                for (row, across) in values.chunks_exact(width).zip(across.chunks_exact_mut(wv.max(1))) {
                    for (a, &(c0, c1, fx)) in across.iter_mut().zip(&across_cols) {
                        *a = row[c0] * (1.0 - fx) + row[c1] * fx;
                    }
                }
                for (y, &(r0, r1, fy)) in down_rows.iter().enumerate() {
                    let (upper, lower) = (&across[r0 * wv..(r0 + 1) * wv], &across[r1 * wv..(r1 + 1) * wv]);
                    for ((o, a), b) in step[y * w..y * w + wv].iter_mut().zip(upper).zip(lower) {
                        *o = a * (1.0 - fy) + b * fy;
                    }
                }
                if !values.iter().any(|x| x.is_nan()) {
                    continue;
                }
                for (o, corners) in step.iter_mut().zip(&corners) {
                    let Some(corners) = corners.filter(|_| o.is_nan()) else { continue };
                    // Missing corners are left out and the others' weights renormalised.
                    let (mut sum, mut weight) = (0.0f32, 0.0f32);
                    for &(from, wgt) in &corners {
                        let x = values[from];
                        if !x.is_nan() && wgt > 0.0 {
                            sum += x * wgt;
                            weight += wgt;
                        }
                    }
                    if weight > 0.0 {
                        *o = sum / weight;
                    }
                }
            }
        }
    }
    out
}

/// Decoded level chunks, shared by the reader threads, bounded in bytes (oldest first out).
#[derive(Debug)]
pub struct ChunkCache {
    budget: usize,
    inner: Mutex<Cached>,
}

#[derive(Debug, Default)]
struct Cached {
    chunks: HashMap<[usize; 3], Arc<Vec<f32>>>,
    /// Keys in the order they came in.
    order: VecDeque<[usize; 3]>,
    bytes: usize,
}

impl ChunkCache {
    /// A cache holding at most `budget` bytes of decoded chunks (always at least the last one).
    #[must_use]
    pub fn new(budget: usize) -> Self {
        ChunkCache { budget, inner: Mutex::new(Cached::default()) }
    }

    /// The chunk `id`, decoded by `read` unless cached.
    ///
    /// # Errors
    /// What `read` returns.
    pub fn get_or_read<E>(
        &self,
        id: [usize; 3],
        read: impl FnOnce() -> Result<Vec<f32>, E>,
    ) -> Result<Arc<Vec<f32>>, E> {
        if let Some(hit) = self.lock().chunks.get(&id) {
            return Ok(hit.clone());
        }
        // Read outside the lock: other threads keep being served meanwhile.
        let chunk = Arc::new(read()?);
        let mut cached = self.lock();
        if cached.chunks.insert(id, chunk.clone()).is_none() {
            cached.order.push_back(id);
            cached.bytes += chunk.len() * 4;
        }
        while cached.bytes > self.budget && cached.order.len() > 1 {
            let old = cached.order.pop_front().expect("non-empty");
            if let Some(gone) = cached.chunks.remove(&old) {
                cached.bytes -= gone.len() * 4;
            }
        }
        Ok(chunk)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LayoutConfig;
    use crate::grid::Grid;
    use crate::layout::Layout;

    fn level(k: usize, width: usize, height: usize) -> Level {
        let grid = Grid { west: 0.0, north: 10.0, res_x: 0.1, res_y: 0.1, width, height };
        let config = LayoutConfig::unsharded_multires(16);
        let target = Layout::resolve(&config, 2, height, width, 4);
        Level::new([k, k], 1, &grid, &target, &config, 2, 4)
    }

    #[test]
    fn taps_follow_the_cell_centres() {
        // k = 2: target cell 1's centre is level position 0.25; cell 0's (-0.25) clamps to level cell 0.
        assert_eq!(taps(0, 2, 5), (0, 0, 0.0));
        assert_eq!(taps(1, 2, 5), (0, 1, 0.25));
        assert_eq!(taps(2, 2, 5), (0, 1, 0.75));
        assert_eq!(taps(9, 2, 5), (4, 4, 0.0));
        // k = 3: the middle cell of each level cell sits on its centre; k = 1 is the identity.
        assert_eq!(taps(4, 3, 5), (1, 1, 0.0));
        assert_eq!(taps(7, 1, 9), (7, 7, 0.0));
        assert_eq!(level_span(Upsampling::Bilinear, &(16..32), 1, 64), 16..32);
        assert_eq!(level_span(Upsampling::Bilinear, &(0..4), 2, 5), 0..3);
        assert_eq!(level_span(Upsampling::Nearest, &(4..8), 2, 5), 2..4);
    }

    #[test]
    fn nearest_repeats_and_bilinear_interpolates_a_linear_field_exactly() {
        let (width, height) = (12, 8);
        let level = level(4, width, height);
        let (lh, lw) = (level.grid.height, level.grid.width);
        let field = |r: f32, c: f32| 3.0 * r - 2.0 * c + 1.0;
        let window = Window {
            rows: 0..lh,
            cols: 0..lw,
            steps: 1,
            values: (0..lh * lw).map(|i| field((i / lw) as f32, (i % lw) as f32)).collect(),
        };
        let near = upsample(&window, &level, Upsampling::Nearest, 0..height, 0..width, (height, width));
        assert_eq!(near[5 * width + 9], field(1.0, 2.0));
        let bil = upsample(&window, &level, Upsampling::Bilinear, 0..height, 0..width, (height, width));
        // Inside the level cell centres a linear field is reproduced exactly.
        for r in 2..6 {
            for c in 2..10 {
                let (u, v) = ((r as f32 + 0.5) / 4.0 - 0.5, (c as f32 + 0.5) / 4.0 - 0.5);
                assert!((bil[r * width + c] - field(u, v)).abs() < 1e-5, "{r} {c}");
            }
        }
        // Padding cells stay missing.
        let padded =
            upsample(&window, &level, Upsampling::Bilinear, 0..height, 0..width + 2, (height, width));
        assert!(padded[width + 1].is_nan() && !padded[width - 1].is_nan());
    }

    /// Upsamples, with `upsampling` and a factor `k`, a window of `steps` steps whose value `i` is
    /// `value(i)` onto 16 × 21 target cells that start on neither the level's first row nor its first
    /// column, the last 5 columns past the valid grid: checks that those come out missing, and calls
    /// `check(t, (r, c), got, at)` for the others, `(r, c)` the target cell and `at(t, row, col)` the value
    /// of a level cell at step `t`.
    fn each_upsampled_cell(
        upsampling: Upsampling,
        k: usize,
        steps: usize,
        value: impl Fn(usize) -> f32,
        mut check: impl FnMut(usize, (usize, usize), f32, &dyn Fn(usize, usize, usize) -> f32),
    ) {
        let level = level(k, 150, 100);
        let (lh, lw) = (level.grid.height, level.grid.width);
        let (rows, cols) = (k * 3 / 2..k * 3 / 2 + 16, 7..7 + 16 + 5);
        let (wr, wc) = (level_span(upsampling, &rows, k, lh), level_span(upsampling, &cols, k, lw));
        let plane = wr.len() * wc.len();
        let values = (0..steps * plane).map(value).collect();
        let window = Window { rows: wr.clone(), cols: wc.clone(), steps, values };
        let valid = (100, cols.start + 16);
        let out = upsample(&window, &level, upsampling, rows.clone(), cols.clone(), valid);
        let at = |t: usize, r: usize, c: usize| {
            window.values[t * plane + (r - wr.start) * wc.len() + c - wc.start]
        };
        let (height, width) = (rows.len(), cols.len());
        for t in 0..steps {
            for y in 0..height {
                for x in 0..width {
                    let (got, (r, c)) = (out[(t * height + y) * width + x], (rows.start + y, cols.start + x));
                    if c >= valid.1 {
                        assert!(got.is_nan(), "padding: k {k}, step {t}, cell ({r}, {c})");
                        continue;
                    }
                    check(t, (r, c), got, &at);
                }
            }
        }
    }

    /// The width and height of the level of factor `k` of the tests' grid.
    fn level_size(k: usize) -> (usize, usize) {
        let level = level(k, 150, 100);
        (level.grid.width, level.grid.height)
    }

    /// Every cell takes the level cell it lies in, at every step.
    #[test]
    fn nearest_takes_the_level_cell_each_cell_lies_in() {
        for k in [1, 2, 3, 8, 50] {
            let (lw, lh) = level_size(k);
            each_upsampled_cell(
                Upsampling::Nearest,
                k,
                2,
                |i| i as f32 * 0.5,
                |t, (r, c), got, at| {
                    let expected = at(t, (r / k).min(lh - 1), (c / k).min(lw - 1));
                    assert_eq!(got.to_bits(), expected.to_bits(), "k {k}, step {t}, cell ({r}, {c})");
                },
            );
        }
    }

    /// Steps without missing values (interpolated across columns, then down rows) and steps with some (the
    /// cells next to a missing corner: the weighted mean of the valid corners) against the definition in
    /// f64, with one missing value and with one in seven.
    #[test]
    fn bilinear_is_the_weighted_mean_of_the_corners() {
        for (k, sparse) in [1, 2, 3, 25, 50].into_iter().flat_map(|k| [(k, false), (k, true)]) {
            let (lw, lh) = level_size(k);
            // Step 1 (and 2) has missing values.
            let plane = {
                let span =
                    |cells: std::ops::Range<usize>, n| level_span(Upsampling::Bilinear, &cells, k, n).len();
                span(k * 3 / 2..k * 3 / 2 + 16, lh) * span(7..7 + 21, lw)
            };
            let value = |i: usize| {
                let missing = if sparse { i >= plane && i % 7 == 3 } else { i == plane + plane / 2 };
                if missing { f32::NAN } else { ((i * 7919) % 1013) as f32 * 0.37 - 100.0 }
            };
            each_upsampled_cell(Upsampling::Bilinear, k, 3, value, |t, (r, c), got, at| {
                let ((r0, r1, fy), (c0, c1, fx)) = (taps(r, k, lh), taps(c, k, lw));
                let (fy, fx) = (f64::from(fy), f64::from(fx));
                let corners = [
                    (at(t, r0, c0), (1.0 - fy) * (1.0 - fx)),
                    (at(t, r0, c1), (1.0 - fy) * fx),
                    (at(t, r1, c0), fy * (1.0 - fx)),
                    (at(t, r1, c1), fy * fx),
                ];
                let valid = corners.iter().filter(|(v, wgt)| !v.is_nan() && *wgt > 0.0);
                let (sum, weight) =
                    valid.fold((0.0, 0.0), |(s, n), (v, wgt)| (s + f64::from(*v) * wgt, n + wgt));
                if weight == 0.0 {
                    assert!(got.is_nan(), "no valid corner: k {k}, step {t}, cell ({r}, {c})");
                    return;
                }
                let expected = sum / weight;
                assert!(
                    (f64::from(got) - expected).abs() <= 1e-5 * expected.abs().max(1.0),
                    "k {k}, step {t}, cell ({r}, {c}): {got} vs {expected}"
                );
            });
        }
    }

    #[test]
    fn missing_corners_are_left_out() {
        let level = level(2, 4, 4);
        let window = Window { rows: 0..2, cols: 0..2, steps: 1, values: vec![1.0, f32::NAN, 3.0, f32::NAN] };
        let out = upsample(&window, &level, Upsampling::Bilinear, 0..4, 0..4, (4, 4));
        // Cell (1, 1) sits between all four: only the left column is valid, so it is their weighted mean.
        assert!((out[4 + 1] - 1.5).abs() < 1e-6, "{out:?}");
        assert!(out[3].is_nan());
    }

    #[test]
    fn the_cache_is_bounded_and_reads_once() {
        let cache = ChunkCache::new(4 * 4 * 2);
        let mut reads = 0;
        for id in [[0, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 0]] {
            cache
                .get_or_read::<()>(id, || {
                    reads += 1;
                    Ok(vec![0.0; 4])
                })
                .unwrap();
        }
        // [0,0,0] was evicted by the third chunk (budget: two chunks), so it is read twice in all.
        assert_eq!(reads, 4);
    }
}
