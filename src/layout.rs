//! Chunk = batch: the pure arithmetic that maps training batches onto Zarr chunks.
//!
//! Every variable of a cube shares one chunk grid, so a batch is one chunk of each variable.
//! - `pixel_series`: chunk `(T, h, w)` with `h·w = batch`: B full (or windowed) pixel time series.
//! - `image_sequence`: chunk `(S, gy·ph, gx·pw)`: `batch = gy·gx` samples of S frames of a `ph × pw` patch.
//!
//! The array extent is padded up to whole chunks, so every batch has exactly B samples; padded cells hold the
//! fill value and are masked. Shards, when used, group several batches along x (the last shard of a row may
//! reach past the array, as Zarr allows): storage detail only, the unit of reading stays one batch.

use serde::{Deserialize, Serialize};

use crate::config::{LayoutConfig, Order, ShardConfig, ShardMode};

/// What a batch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayoutKind {
    /// B pixel time series: delivered `[B, T, V]`.
    PixelSeries,
    /// B image sequences: delivered `[B, S, V, h, w]`.
    ImageSequence,
}

/// A resolved layout: chunk shape and padding for one cube.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// What a batch is.
    pub kind: LayoutKind,
    /// Samples per batch.
    pub batch: usize,
    /// Time steps per chunk (T window or sequence length S); 1 for cubes without time.
    pub chunk_t: usize,
    /// Rows per chunk.
    pub chunk_y: usize,
    /// Columns per chunk.
    pub chunk_x: usize,
    /// Patch `[h, w]` of one sample (`image_sequence`), `[1, 1]` for `pixel_series`.
    pub patch: [usize; 2],
    /// Batches per shard along x for time-varying arrays (1: no sharding).
    pub shard_x: usize,
    /// Batches per shard along x for static arrays (1: no sharding).
    pub static_shard_x: usize,
    /// `Some(seed)` for `order: shuffled`: pixels permuted once and stored sample-major, `(sample, time)`
    /// chunked `(B, T)`; `chunk_y` is then B, `chunk_x` 1, and "rows" count samples, "x" shards them.
    #[serde(default)]
    pub shuffled: Option<u64>,
}

/// Chunks below this size are sharded under `shard: auto` (many small files are slow on every filesystem).
pub const SHARD_BELOW_BYTES: usize = 1 << 20;
/// Target shard size under `shard: auto`.
pub const SHARD_TARGET_BYTES: usize = 8 << 20;

impl Layout {
    /// Resolves a layout for a cube of `n_time` steps (0 for static-only cubes) on a `height × width` grid.
    /// `item_bytes` is the widest element size among the variables (for the sharding decision).
    #[must_use]
    pub fn resolve(
        config: &LayoutConfig,
        n_time: usize,
        height: usize,
        width: usize,
        item_bytes: usize,
    ) -> Layout {
        let (kind, batch, chunk_t, chunk_y, chunk_x, patch, shard, shuffled) = match *config {
            LayoutConfig::PixelSeries { batch, tile, window, shard, order, seed, .. } => {
                let t = window.unwrap_or(n_time).min(n_time.max(1)).max(1);
                if order == Order::Shuffled {
                    (LayoutKind::PixelSeries, batch, t, batch, 1, [1, 1], shard, Some(seed))
                } else {
                    let [h, w] = tile.unwrap_or_else(|| squarest_factors(batch));
                    (LayoutKind::PixelSeries, batch, t, h, w, [1, 1], shard, None)
                }
            }
            LayoutConfig::ImageSequence { seq_len, patch, batch, grid, shard, .. } => {
                let [gy, gx] = grid.unwrap_or_else(|| squarest_factors(batch));
                (LayoutKind::ImageSequence, batch, seq_len, gy * patch[0], gx * patch[1], patch, shard, None)
            }
        };
        let chunks_x =
            if shuffled.is_some() { (height * width).div_ceil(batch) } else { width.div_ceil(chunk_x) };
        let shard_for = |chunk_bytes: usize| shard_batches(shard, chunk_bytes, chunks_x);
        let plane = chunk_y * chunk_x * item_bytes;
        Layout {
            kind,
            batch,
            chunk_t,
            chunk_y,
            chunk_x,
            patch,
            shard_x: shard_for(plane * chunk_t),
            static_shard_x: shard_for(plane),
            shuffled,
        }
    }

    /// Array extent padded to whole chunks: `(time, rows, cols)`. Time is padded only when chunked.
    #[must_use]
    pub fn padded_shape(&self, n_time: usize, height: usize, width: usize) -> (usize, usize, usize) {
        let pad = |n: usize, c: usize| n.div_ceil(c) * c;
        let time = if n_time == 0 { 0 } else { pad(n_time, self.chunk_t) };
        if self.shuffled.is_some() {
            return (time, pad(height * width, self.batch), 1);
        }
        (time, pad(height, self.chunk_y), pad(width, self.chunk_x))
    }

    /// Cells of chunk `[it, iy, ix]` inside `shape`, the valid `[time, lat, lon]` extent (the padding left
    /// out): what a fraction of valid values is taken over. A static variable's chunk counts one step; a
    /// sample-major cube's counts its samples along `lat`.
    #[must_use]
    pub fn cells_inside(&self, shape: [usize; 3], [it, iy, ix]: [usize; 3], is_static: bool) -> usize {
        let inside = |i: usize, chunk: usize, n: usize| n.saturating_sub(i * chunk).min(chunk);
        let steps = if is_static { 1 } else { inside(it, self.chunk_t, shape[0]) };
        let plane = if self.shuffled.is_some() {
            inside(iy, self.chunk_y, shape[1] * shape[2])
        } else {
            inside(iy, self.chunk_y, shape[1]) * inside(ix, self.chunk_x, shape[2])
        };
        steps * plane
    }

    /// Cells of a chunk, padding included (a static variable's: one step).
    #[must_use]
    pub fn chunk_cells(&self, is_static: bool) -> usize {
        (if is_static { 1 } else { self.chunk_t }) * self.chunk_y * self.chunk_x
    }

    /// Number of batch chunks along each axis `(time, rows, cols)` of the padded array.
    #[must_use]
    pub fn chunk_counts(&self, n_time: usize, height: usize, width: usize) -> (usize, usize, usize) {
        let (t, y, x) = self.padded_shape(n_time, height, width);
        (t / self.chunk_t, y / self.chunk_y, x / self.chunk_x)
    }

    /// The array region of batch chunk `[time, lat, lon]` of a variable (static ones have no time axis;
    /// sample-major cubes index `(sample, time)` with the sample chunk in the `lat` slot).
    #[must_use]
    pub fn chunk_subset(&self, is_static: bool, [it, iy, ix]: [usize; 3]) -> Vec<std::ops::Range<u64>> {
        let span = |index: usize, size: usize| (index * size) as u64..((index + 1) * size) as u64;
        let (times, rows, cols) = (span(it, self.chunk_t), span(iy, self.chunk_y), span(ix, self.chunk_x));
        match (self.shuffled.is_some(), is_static) {
            (true, true) => vec![rows],
            (true, false) => vec![rows, times],
            (false, true) => vec![rows, cols],
            (false, false) => vec![times, rows, cols],
        }
    }

    /// Shape of a delivered batch, without the variable axis: `[B, T]` or `[B, S, h, w]`.
    #[must_use]
    pub fn batch_shape(&self) -> Vec<usize> {
        match self.kind {
            LayoutKind::PixelSeries => vec![self.batch, self.chunk_t],
            LayoutKind::ImageSequence => vec![self.batch, self.chunk_t, self.patch[0], self.patch[1]],
        }
    }
}

/// Batches per shard along x under `config`'s `shard` setting, for chunks of `chunk_bytes` and a row of
/// `chunks_x` chunks.
#[must_use]
pub fn shards_for(config: &LayoutConfig, chunk_bytes: usize, chunks_x: usize) -> usize {
    match *config {
        LayoutConfig::PixelSeries { shard, .. } | LayoutConfig::ImageSequence { shard, .. } => {
            shard_batches(shard, chunk_bytes, chunks_x)
        }
    }
}

fn shard_batches(shard: ShardConfig, chunk_bytes: usize, chunks_x: usize) -> usize {
    match shard {
        ShardConfig::Named(ShardMode::None) => 1,
        ShardConfig::Batches(k) => k.min(chunks_x).max(1),
        ShardConfig::Named(ShardMode::Auto) | ShardConfig::Default => {
            if chunk_bytes >= SHARD_BELOW_BYTES {
                1
            } else {
                (SHARD_TARGET_BYTES / chunk_bytes.max(1)).clamp(1, chunks_x)
            }
        }
    }
}

/// The seeded permutation of `cells` grid cells that orders the samples of an `order: shuffled` cube.
#[must_use]
pub fn sample_permutation(cells: usize, seed: u64) -> Vec<u32> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut order: Vec<u32> = (0..cells as u32).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    order
}

/// `[h, w]` with `h·w = n` and `h ≤ w` as close as possible: the most compact spatial tile.
#[must_use]
pub fn squarest_factors(n: usize) -> [usize; 2] {
    let mut h = (n as f64).sqrt() as usize;
    while h > 1 && !n.is_multiple_of(h) {
        h -= 1;
    }
    let h = h.max(1);
    [h, n / h]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pixel(batch: usize, window: Option<usize>, shard: ShardConfig) -> LayoutConfig {
        LayoutConfig::PixelSeries {
            batch,
            tile: None,
            window,
            shard,
            order: Order::Tiled,
            seed: 0,
            multires: false,
        }
    }

    #[test]
    fn squarest() {
        assert_eq!(squarest_factors(256), [16, 16]);
        assert_eq!(squarest_factors(128), [8, 16]);
        assert_eq!(squarest_factors(7), [1, 7]);
        assert_eq!(squarest_factors(1), [1, 1]);
    }

    #[test]
    fn cells_inside_leave_the_padding_out() {
        let none = ShardConfig::Named(ShardMode::None);
        // 16 × 16 tiles of 48-step windows over 50 steps of 20 × 40 cells.
        let l = Layout::resolve(&pixel(256, Some(48), none), 50, 20, 40, 4);
        assert_eq!(l.chunk_cells(false), 48 * 256);
        assert_eq!(l.cells_inside([50, 20, 40], [0, 0, 0], false), 48 * 256);
        assert_eq!(l.cells_inside([50, 20, 40], [1, 1, 2], false), 2 * 4 * 8);
        assert_eq!(l.cells_inside([50, 20, 40], [1, 1, 2], true), 4 * 8);
        // Shuffled: 150 samples in chunks of 64, the third holding 22.
        let config = LayoutConfig::PixelSeries {
            batch: 64,
            tile: None,
            window: None,
            shard: none,
            order: Order::Shuffled,
            seed: 1,
            multires: false,
        };
        let l = Layout::resolve(&config, 48, 10, 15, 4);
        assert_eq!(l.cells_inside([48, 10, 15], [0, 2, 0], false), 48 * 22);
        assert_eq!(l.cells_inside([48, 10, 15], [0, 1, 0], true), 64);
    }

    #[test]
    fn pixel_series_chunk_is_full_series_of_b_pixels() {
        let l = Layout::resolve(&pixel(256, None, ShardConfig::Named(ShardMode::None)), 744, 160, 240, 4);
        assert_eq!((l.chunk_t, l.chunk_y, l.chunk_x), (744, 16, 16));
        assert_eq!(l.batch_shape(), vec![256, 744]);
        assert_eq!(l.padded_shape(744, 160, 240), (744, 160, 240));
        assert_eq!(l.padded_shape(744, 161, 241), (744, 176, 256));
    }

    #[test]
    fn image_sequence_chunk_holds_gy_gx_patches() {
        let cfg = LayoutConfig::ImageSequence {
            seq_len: 8,
            patch: [32, 32],
            batch: 4,
            grid: None,
            shard: ShardConfig::Named(ShardMode::None),
            multires: false,
        };
        let l = Layout::resolve(&cfg, 100, 100, 100, 4);
        assert_eq!((l.chunk_t, l.chunk_y, l.chunk_x), (8, 64, 64));
        assert_eq!(l.padded_shape(100, 100, 100), (104, 128, 128));
        assert_eq!(l.batch_shape(), vec![4, 8, 32, 32]);
    }

    #[test]
    fn auto_sharding_only_for_small_chunks() {
        // 744 × 16 × 16 × 4 B = 762 KB < 1 MiB: sharded.
        let l = Layout::resolve(&pixel(256, None, ShardConfig::Default), 744, 160, 240, 4);
        assert!(l.shard_x > 1 && l.shard_x <= 15, "{l:?}");
        assert!(l.static_shard_x >= l.shard_x);
        let l = Layout::resolve(&pixel(1024, None, ShardConfig::Default), 744, 160, 240, 4);
        assert_eq!(l.shard_x, 1);
        let l = Layout::resolve(&pixel(256, None, ShardConfig::Batches(4)), 744, 160, 240, 4);
        assert_eq!(l.shard_x, 4);
    }

    proptest! {
        /// Every cell of the grid lies in exactly one chunk, and every chunk holds exactly one batch.
        #[test]
        fn every_cell_in_exactly_one_chunk(
            batch in 1usize..300, window in proptest::option::of(1usize..50),
            n_time in 1usize..60, h in 1usize..90, w in 1usize..90, shard in 0usize..4,
        ) {
            let shard = if shard == 0 { ShardConfig::Default } else { ShardConfig::Batches(shard) };
            let l = Layout::resolve(&pixel(batch, window, shard), n_time, h, w, 4);
            prop_assert_eq!(l.chunk_y * l.chunk_x, batch);
            let (pt, py, px) = l.padded_shape(n_time, h, w);
            let (ct, cy, cx) = l.chunk_counts(n_time, h, w);
            prop_assert!(pt >= n_time && py >= h && px >= w);
            prop_assert!(l.shard_x >= 1 && l.shard_x <= cx);
            let mut hits = vec![0u8; h * w];
            for iy in 0..cy {
                for ix in 0..cx {
                    for y in iy * l.chunk_y..(iy + 1) * l.chunk_y {
                        for x in ix * l.chunk_x..(ix + 1) * l.chunk_x {
                            if y < h && x < w { hits[y * w + x] += 1; }
                        }
                    }
                }
            }
            prop_assert!(hits.iter().all(|&c| c == 1));
            prop_assert_eq!(ct * l.chunk_t, pt);
        }
    }
}
