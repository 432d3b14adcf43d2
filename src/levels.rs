//! Multi-resolution cubes: the pure arithmetic of resolution levels.
//!
//! A variable with a coarser native `resolution` or `time_step` is stored on a *level*: the target grid
//! coarsened by an integer factor `[ky, kx]` (one level cell = `ky × kx` target cells, same north-west
//! origin) and the target time axis by an integer factor `q` (one level step = a window of `q` target steps),
//! in a child group of its own. Level chunks nest: one level chunk covers exactly `my × mx` target chunks and
//! the same time window, so a target batch needs one level chunk (two per axis at most for bilinear
//! interpolation near a chunk edge). The index mapping, which any reader can reproduce:
//! - target cell `(r, c)` lies in level cell `(r / ky, c / kx)` (nearest upsampling takes that cell);
//! - its centre sits at level position `((r + ½) / ky − ½, (c + ½) / kx − ½)` in level cell-centre units
//!   (bilinear upsampling interpolates there between the four surrounding level cells);
//! - target step `t` lies in level step `t / q`, whose value is the variable's `aggregation` of the source
//!   steps inside the window `[t_{q·i}, t_{q·i+q})`; every target step of the window gets it;
//! - target chunk `(it, iy, ix)` lies in level chunk `(it, iy / my, ix / mx)`.

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, LayoutConfig, Resolution};
use crate::grid::Grid;
use crate::layout::{Layout, LayoutKind, shards_for};
use crate::time::Step;

/// One resolution level below the target grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Level {
    /// Child group holding the level's coordinates and variables, e.g. `coarse_10`.
    pub group: String,
    /// `[ky, kx]`: target cells per level cell along y and x.
    pub factor: [usize; 2],
    /// `q`: target time steps per level step (1: the target's time axis).
    #[serde(default = "one")]
    pub time_factor: usize,
    /// `[my, mx]`: target chunks per level chunk along y and x.
    pub nest: [usize; 2],
    /// The level's grid: the target's origin, cells `ky × kx` times larger, covering the target grid.
    pub grid: Grid,
    /// Chunk geometry and sharding of the level's arrays (`batch` = cells of a chunk's plane).
    pub layout: Layout,
    /// Valid shape `[time, lat, lon]`.
    pub shape: [usize; 3],
    /// Stored (padded) shape `[time, lat, lon]`: whole level chunks, covering the target's padded extent.
    pub padded_shape: [usize; 3],
}

/// The level factor `[ky, kx]` for a requested native resolution on `grid`, and a note when the request does
/// not nest (is not a whole number of target cells) and was snapped.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `variables.NAME.resolution` when it is finer than the target grid.
pub fn factor_for(
    name: &str,
    requested: Resolution,
    grid: &Grid,
) -> Result<([usize; 2], Option<String>), ConfigError> {
    let (rx, ry) = requested.xy();
    let key = format!("variables.{name}.resolution");
    let snap = |r: f64, cell: f64| (r / cell).round();
    let (kx, ky) = (snap(rx, grid.res_x), snap(ry, grid.res_y));
    // Finer by more than rounding: checked before snapping, which would make 0.07 on 0.125 cells a factor 1.
    let finer = |r: f64, cell: f64| r < cell * (1.0 - 1e-9);
    if finer(rx, grid.res_x) || finer(ry, grid.res_y) {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{rx} × {ry} is finer than the target grid's {} × {} cells: a level can only be coarser",
                grid.res_x, grid.res_y
            ),
        ));
    }
    if kx > grid.width as f64 || ky > grid.height as f64 {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{rx} × {ry} is coarser than the whole {} × {} grid: keep it on the target grid (no `resolution`) or enlarge grid.bbox",
                grid.width, grid.height
            ),
        ));
    }
    let (kx, ky) = (kx as usize, ky as usize);
    let (nx, ny) = (kx as f64 * grid.res_x, ky as f64 * grid.res_y);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
    let note = (!(close(nx, rx) && close(ny, ry))).then(|| {
        format!(
            "resolution {rx} × {ry} does not nest in the target grid ({} × {} cells): stored at {nx} × {ny}, \
             {kx} × {ky} target cells per cell",
            grid.res_x, grid.res_y
        )
    });
    Ok(([ky, kx], note))
}

fn one() -> usize {
    1
}

/// Name of the child group of a level: `coarse_10`, `coarse_4x5`, `coarse_10_t24`, `coarse_t24`.
#[must_use]
pub fn group_name([ky, kx]: [usize; 2], q: usize) -> String {
    let space = match (ky, kx) {
        (1, 1) => String::new(),
        _ if ky == kx => format!("_{kx}"),
        _ => format!("_{ky}x{kx}"),
    };
    let time = if q > 1 { format!("_t{q}") } else { String::new() };
    format!("coarse{space}{time}")
}

/// The time factor `q` of a native `time_step` over the cube's `step`.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `variables.NAME.time_step` when it does not parse, is not a whole multiple
/// of the cube's step, or the cube's time axis is irregular.
pub fn time_factor(name: &str, time_step: &str, step: Option<Step>) -> Result<usize, ConfigError> {
    let key = format!("variables.{name}.time_step");
    let native = Step::parse(time_step).map_err(|e| ConfigError::invalid(&key, e.to_string()))?;
    let Some(step) = step else {
        return Err(ConfigError::invalid(key, "needs a regular time axis (time: start, end, step)"));
    };
    let q = match (native, step) {
        (Step::Seconds(a), Step::Seconds(b)) if b > 0 && a % b == 0 && a >= b => a / b,
        (Step::Months(a), Step::Months(b)) if b > 0 && a % b == 0 && a >= b => i64::from(a / b),
        _ => {
            return Err(ConfigError::invalid(
                key,
                format!("{native} is not a whole multiple of the cube's time step {step}"),
            ));
        }
    };
    Ok(q as usize)
}

/// Least common multiple, `None` on overflow.
#[must_use]
pub fn lcm(a: usize, b: usize) -> Option<usize> {
    (a / gcd(a, b)).checked_mul(b)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl Level {
    /// The level of factor `[ky, kx]` and time factor `q` (which divides `target.chunk_t`) under a target
    /// `grid` chunked by `target` (with `n_time` steps): level chunks are the smallest whole number of level
    /// cells whose footprint is a whole number of target chunks. `item_bytes` and `config` decide the level's
    /// sharding as for the target arrays.
    #[must_use]
    pub fn new(
        factor: [usize; 2],
        q: usize,
        grid: &Grid,
        target: &Layout,
        config: &LayoutConfig,
        n_time: usize,
        item_bytes: usize,
    ) -> Level {
        let [ky, kx] = factor;
        let (cy, cx) = (target.chunk_y, target.chunk_x);
        // lcm(c, k) target cells = lcm / c target chunks = lcm / k level cells.
        let (ly, lx) = (cy / gcd(cy, ky) * ky, cx / gcd(cx, kx) * kx);
        let (chunk_y, chunk_x) = (ly / ky, lx / kx);
        let level_grid = Grid {
            west: grid.west,
            north: grid.north,
            res_x: grid.res_x * kx as f64,
            res_y: grid.res_y * ky as f64,
            width: grid.width.div_ceil(kx),
            height: grid.height.div_ceil(ky),
        };
        let pad = |n: usize, c: usize| n.div_ceil(c) * c;
        let (pt, _, _) = target.padded_shape(n_time, grid.height, grid.width);
        let (py, px) = (pad(level_grid.height, chunk_y), pad(level_grid.width, chunk_x));
        let plane = chunk_y * chunk_x * item_bytes;
        let chunks_x = px / chunk_x;
        let q = q.max(1);
        let chunk_t = (target.chunk_t / q).max(1);
        let layout = Layout {
            kind: LayoutKind::PixelSeries,
            batch: chunk_y * chunk_x,
            chunk_t,
            chunk_y,
            chunk_x,
            patch: [1, 1],
            shard_x: shards_for(config, plane * chunk_t, chunks_x),
            static_shard_x: shards_for(config, plane, chunks_x),
            shuffled: None,
        };
        Level {
            group: group_name(factor, q),
            factor,
            time_factor: q,
            nest: [ly / cy, lx / cx],
            grid: level_grid,
            layout,
            shape: [n_time.div_ceil(q), level_grid.height, level_grid.width],
            padded_shape: [pt / q, py, px],
        }
    }

    /// The level chunk `[it, iy, ix]` that holds target chunk `[it, iy, ix]`.
    #[must_use]
    pub fn chunk_of(&self, [it, iy, ix]: [usize; 3]) -> [usize; 3] {
        [it, iy / self.nest[0], ix / self.nest[1]]
    }

    /// The level chunks whose cells a target chunk of `[h, w]` cells at `[iy, ix]` may read: those under it
    /// and, with `halo` (bilinear upsampling), one level cell around it, within the level's valid shape.
    /// `(rows, columns)` of level chunks.
    #[must_use]
    pub fn chunks_read(
        &self,
        [iy, ix]: [usize; 2],
        [h, w]: [usize; 2],
        halo: bool,
    ) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let halo = usize::from(halo);
        let span = |first: usize, n: usize, k: usize, cells: usize, chunk: usize| {
            let lo = (first / k).saturating_sub(halo);
            let hi = ((first + n).div_ceil(k) + halo).min(cells.max(1));
            lo / chunk..hi.div_ceil(chunk).max(lo / chunk + 1)
        };
        (
            span(iy * h, h, self.factor[0], self.shape[1], self.layout.chunk_y),
            span(ix * w, w, self.factor[1], self.shape[2], self.layout.chunk_x),
        )
    }

    /// Level chunks along `(time, lat, lon)`.
    #[must_use]
    pub fn chunk_counts(&self) -> [usize; 3] {
        let [t, y, x] = self.padded_shape;
        [if t == 0 { 1 } else { t / self.layout.chunk_t }, y / self.layout.chunk_y, x / self.layout.chunk_x]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn grid(width: usize, height: usize) -> Grid {
        Grid { west: -10.0, north: 58.0, res_x: 0.05, res_y: 0.05, width, height }
    }

    fn pixel(batch: usize) -> LayoutConfig {
        LayoutConfig::unsharded_multires(batch)
    }

    #[test]
    fn snaps_to_whole_cells_and_says_so() {
        let g = grid(240, 160);
        assert_eq!(factor_for("t2m", Resolution::Square(0.25), &g).unwrap(), ([5, 5], None));
        let (factor, note) = factor_for("t2m", Resolution::Square(0.26), &g).unwrap();
        assert_eq!(factor, [5, 5]);
        assert!(note.unwrap().contains("does not nest"));
        assert_eq!(factor_for("t2m", Resolution::Xy([0.1, 0.2]), &g).unwrap().0, [4, 2]);
        let e = factor_for("t2m", Resolution::Square(0.01), &g).unwrap_err();
        assert!(e.to_string().contains("variables.t2m.resolution"), "{e}");
        assert!(factor_for("t2m", Resolution::Square(20.0), &g).is_err());
    }

    #[test]
    fn a_level_chunk_covers_whole_target_chunks() {
        // 16 × 16 tiles, factor 10: lcm(16, 10) = 80 target cells = 5 target chunks = 8 level cells.
        let g = grid(240, 160);
        let config = pixel(256);
        let target = Layout::resolve(&config, 48, g.height, g.width, 4);
        let level = Level::new([10, 10], 1, &g, &target, &config, 48, 4);
        assert_eq!((level.layout.chunk_y, level.layout.chunk_x, level.nest), (8, 8, [5, 5]));
        assert_eq!((level.grid.width, level.grid.height), (24, 16));
        assert_eq!(level.padded_shape, [48, 16, 24]);
        assert_eq!(level.chunk_of([0, 7, 12]), [0, 1, 2]);
        assert_eq!(group_name([10, 10], 1), "coarse_10");
        assert_eq!(group_name([1, 1], 24), "coarse_t24");
        assert_eq!(group_name([4, 5], 3), "coarse_4x5_t3");
    }

    #[test]
    fn a_target_chunk_reads_the_level_chunks_under_it_and_beside_its_edges() {
        let g = grid(240, 160);
        let config = pixel(256);
        let target = Layout::resolve(&config, 48, g.height, g.width, 4);
        let level = Level::new([10, 10], 1, &g, &target, &config, 48, 4);
        // Target chunk (1, 2): cells 16..32 × 32..48, level cells 1..4 × 3..5, in level chunk (0, 0).
        assert_eq!(level.chunks_read([1, 2], [16, 16], false), (0..1, 0..1));
        assert_eq!(level.chunks_read([1, 2], [16, 16], true), (0..1, 0..1));
        // Target chunk (4, 9): cells 64..80 × 144..160, level cells 6..8 × 14..16; one more cell reaches the
        // next level chunk along y (level row 8), none along x (16 is in chunk 2 already).
        assert_eq!(level.chunks_read([4, 9], [16, 16], false), (0..1, 1..2));
        assert_eq!(level.chunks_read([4, 9], [16, 16], true), (0..2, 1..3));
        // The level is 16 × 24 cells: no padding; a static chunk counts one step.
        assert_eq!(level.layout.cells_inside(level.shape, [0, 1, 2], false), 48 * 64);
        assert_eq!(level.layout.cells_inside(level.shape, [0, 1, 2], true), 64);
        assert_eq!(level.layout.chunk_cells(true), 64);
        // A 6 × 4 level in 8 × 8 chunks (factor 50 on 300 × 200 cells): 24 of 64 cells.
        let g = grid(200, 300);
        let target = Layout::resolve(&config, 48, g.height, g.width, 4);
        let level = Level::new([50, 50], 1, &g, &target, &config, 48, 4);
        assert_eq!(level.layout.cells_inside(level.shape, [0, 0, 0], true), 24);
        assert_eq!(level.layout.chunk_cells(true), 64);
    }

    proptest! {
        /// Nesting: every target cell lies in exactly the level cell `(r / ky, c / kx)`, which lies in the
        /// level chunk that nests the target chunk of the cell; level arrays cover the target's padded extent.
        #[test]
        fn levels_nest(
            batch in 1usize..200, h in 1usize..120, w in 1usize..120, ky in 1usize..12, kx in 1usize..12,
        ) {
            prop_assume!(ky <= h && kx <= w);
            let g = grid(w, h);
            let config = pixel(batch);
            let target = Layout::resolve(&config, 10, h, w, 4);
            prop_assume!(target.chunk_y <= h && target.chunk_x <= w);
            let level = Level::new([ky, kx], 1, &g, &target, &config, 10, 4);
            let (_, py, px) = target.padded_shape(10, h, w);
            prop_assert!(level.padded_shape[1] * ky >= py && level.padded_shape[2] * kx >= px);
            prop_assert_eq!(level.layout.chunk_y * ky, level.nest[0] * target.chunk_y);
            prop_assert_eq!(level.layout.chunk_x * kx, level.nest[1] * target.chunk_x);
            prop_assert!(level.grid.height * ky >= h && (level.grid.height - 1) * ky < h);
            for r in (0..py).step_by(7) {
                for c in (0..px).step_by(5) {
                    let chunk = [0, r / target.chunk_y, c / target.chunk_x];
                    let cell = (r / ky, c / kx);
                    let holder = level.chunk_of(chunk);
                    prop_assert_eq!(holder[1], cell.0 / level.layout.chunk_y);
                    prop_assert_eq!(holder[2], cell.1 / level.layout.chunk_x);
                    // The level cell's footprint contains the target cell's centre.
                    let lat = g.lat(r);
                    let lon = g.lon(c);
                    let (north, west) = (level.grid.north - cell.0 as f64 * level.grid.res_y, level.grid.west + cell.1 as f64 * level.grid.res_x);
                    prop_assert!(lat < north && lat > north - level.grid.res_y);
                    prop_assert!(lon > west && lon < west + level.grid.res_x);
                }
            }
        }
    }
}
