//! The target grid: regular lon/lat cells, north-up, placed exactly as `gdalwarp -te W S E N -tr RX RY` places
//! them (origin at the north-west corner, size rounded to the nearest whole cell).

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, GridConfig};

/// A regular lon/lat grid. Row 0 is the northernmost row.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Grid {
    /// Western edge of column 0, degrees.
    pub west: f64,
    /// Northern edge of row 0, degrees.
    pub north: f64,
    /// Cell width, degrees.
    pub res_x: f64,
    /// Cell height, degrees (positive).
    pub res_y: f64,
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
}

/// Grids larger than this many cells per side are surely a typo (the limit a cube reader accepts).
const MAX_CELLS_PER_SIDE: f64 = crate::cube::validate::MAX_CELLS_PER_SIDE as f64;

impl Grid {
    /// Resolves the `grid` config section.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `grid.*` when the grid is empty or absurdly large.
    pub fn from_config(grid: &GridConfig) -> Result<Grid, ConfigError> {
        let [w, s, e, n] = grid.bbox;
        let (width, height, res_x, res_y) = match (grid.resolution, grid.size) {
            (Some(res), _) => {
                let (rx, ry) = res.xy();
                // gdalwarp: nPixels = (int)((maxX - minX + res / 2) / res)
                let width = ((e - w + rx / 2.0) / rx).floor();
                let height = ((n - s + ry / 2.0) / ry).floor();
                if width > MAX_CELLS_PER_SIDE || height > MAX_CELLS_PER_SIDE {
                    return Err(ConfigError::invalid(
                        "grid.resolution",
                        format!("{rx} × {ry} gives a {width} × {height} grid: too large"),
                    ));
                }
                (width as usize, height as usize, rx, ry)
            }
            (None, Some([sw, sh])) => {
                if sw as f64 > MAX_CELLS_PER_SIDE || sh as f64 > MAX_CELLS_PER_SIDE {
                    return Err(ConfigError::invalid(
                        "grid.size",
                        format!("{sw} × {sh} cells: too large (at most {MAX_CELLS_PER_SIDE} per side)"),
                    ));
                }
                (sw, sh, (e - w) / sw as f64, (n - s) / sh as f64)
            }
            (None, None) => return Err(ConfigError::invalid("grid", "give `resolution` or `size`")),
        };
        if width == 0 || height == 0 {
            return Err(ConfigError::invalid(
                "grid.resolution",
                format!("the bbox is smaller than one cell ({width} × {height} cells)"),
            ));
        }
        Ok(Grid { west: w, north: n, res_x, res_y, width, height })
    }

    /// Longitude of the centre of column `col` (may lie past the grid, for padding).
    #[must_use]
    pub fn lon(&self, col: usize) -> f64 {
        self.west + (col as f64 + 0.5) * self.res_x
    }

    /// Latitude of the centre of row `row` (may lie past the grid, for padding).
    #[must_use]
    pub fn lat(&self, row: usize) -> f64 {
        self.north - (row as f64 + 0.5) * self.res_y
    }

    /// GDAL geotransform of the window starting at row `row0` (full width).
    #[must_use]
    pub fn geotransform(&self, row0: usize) -> [f64; 6] {
        [self.west, self.res_x, 0.0, self.north - row0 as f64 * self.res_y, 0.0, -self.res_y]
    }

    /// `[west, south, east, north]` outer edges of the grid actually placed.
    #[must_use]
    pub fn bounds(&self) -> [f64; 4] {
        [
            self.west,
            self.north - self.height as f64 * self.res_y,
            self.west + self.width as f64 * self.res_x,
            self.north,
        ]
    }
}

/// `240 × 160 cells of 0.05° × 0.05°, bbox [-10, 50, 2, 58]`, as `info` and messages show a grid.
impl std::fmt::Display for Grid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [west, south, east, north] = self.bounds().map(degrees);
        write!(
            f,
            "{} × {} cells of {}° × {}°, bbox [{west}, {south}, {east}, {north}]",
            self.width,
            self.height,
            degrees(self.res_x),
            degrees(self.res_y)
        )
    }
}

/// Degrees without the noise of their binary sums (`2.0500000000000007` is `2.05`): 12 significant digits
/// are finer than any grid.
pub(crate) fn degrees(x: f64) -> String {
    let digits = 11 - x.abs().max(1e-300).log10().floor().clamp(-300.0, 300.0) as i32;
    let scale = 10f64.powi(digits.clamp(0, 15));
    format!("{}", (x * scale).round() / scale)
}

#[cfg(test)]
mod tests {
    #[test]
    fn degrees_drop_the_noise_of_binary_sums_not_digits() {
        assert_eq!(super::degrees(-10.0 + 241.0 * 0.05), "2.05");
        assert_eq!(format!("{}", -10.0 + 241.0 * 0.05), "2.0500000000000007", "the sum is noisy");
        for (x, shown) in
            [(0.0, "0"), (-179.875, "-179.875"), (0.000_277_777_777_8, "0.0002777777778"), (58.0, "58")]
        {
            assert_eq!(super::degrees(x), shown);
        }
    }

    use super::*;
    use crate::config::Resolution;

    fn cfg(bbox: [f64; 4], res: Option<f64>, size: Option<[usize; 2]>) -> GridConfig {
        GridConfig { crs: "EPSG:4326".into(), bbox, resolution: res.map(Resolution::Square), size }
    }

    #[test]
    fn places_cells_like_gdalwarp() {
        let g = Grid::from_config(&cfg([-10.0, 50.0, 2.0, 58.0], Some(0.05), None)).unwrap();
        assert_eq!((g.width, g.height), (240, 160));
        assert!((g.lon(0) - -9.975).abs() < 1e-12);
        assert!((g.lat(0) - 57.975).abs() < 1e-12);
        assert!((g.lat(159) - 50.025).abs() < 1e-9);
        // A bbox that is not a whole number of cells rounds to the nearest, origin kept (gdalwarp).
        let g = Grid::from_config(&cfg([0.0, 0.0, 1.04, 1.0], Some(0.1), None)).unwrap();
        assert_eq!(g.width, 10);
        let g = Grid::from_config(&cfg([0.0, 0.0, 1.06, 1.0], Some(0.1), None)).unwrap();
        assert_eq!(g.width, 11);
    }

    #[test]
    fn size_sets_resolution() {
        let g = Grid::from_config(&cfg([-10.0, 50.0, 2.0, 58.0], None, Some([120, 40]))).unwrap();
        assert!((g.res_x - 0.1).abs() < 1e-12 && (g.res_y - 0.2).abs() < 1e-12);
        assert_eq!(g.bounds(), [-10.0, 50.0, 2.0, 58.0]);
    }

    #[test]
    fn empty_grid_is_refused() {
        let e = Grid::from_config(&cfg([0.0, 0.0, 0.01, 0.01], Some(1.0), None)).unwrap_err();
        assert!(e.to_string().contains("grid.resolution"));
    }
}
