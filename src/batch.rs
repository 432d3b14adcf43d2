//! A training batch as the loader delivers it: plain buffers, no tensor types (sinks convert at the edge).
//!
//! Layout of `data` and `mask` (row-major):
//! - `pixel_series`: `[B, T, V]`: B pixel series of T steps, V variables (static ones repeated along T);
//! - `image_sequence`: `[B, S, V, h, w]`: B samples of S frames of an `h × w` patch.
//!
//! Variable-major batches (`LoaderBuilder::variable_major`) put `V` first: `[V, B, T]`, `[V, B, S, h, w]`.
//!
//! With static variables returned separately, `data` holds the time-varying variables only and `statics`
//! holds `[B, Vs]` (`pixel_series`) or `[B, Vs, h, w]` (`image_sequence`).
//!
//! Multi-resolution cubes regrid coarser variables onto the target cells; loaded with native regridding,
//! those come instead in `native`, one [`NativeField`] each, at their own resolution.

use serde::{Deserialize, Serialize};

use crate::layout::LayoutKind;

/// Where a batch comes from: enough to find its chunk in the cube again (unmixed; a mixed batch's samples
/// come from every chunk of its group, and their own places are in `lat`, `lon` and `time_index`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BatchOrigin {
    /// Epoch (0-based).
    pub epoch: usize,
    /// Position in this rank's epoch order (0-based).
    pub position: usize,
    /// Chunk indices `[time, lat, lon]` of the cube; when mixing, the chunk of its group whose place in the
    /// group is the batch's (the group's `j`-th batch names its `j`-th chunk).
    pub chunk: [usize; 3],
}

/// One batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Where it comes from.
    pub origin: BatchOrigin,
    /// Layout kind, which fixes the meaning of `shape`.
    pub kind: LayoutKind,
    /// `data` and `mask` are `[V, B, ...]` (each variable contiguous) rather than `[B, ..., V, ...]`.
    pub variable_major: bool,
    /// Names along the `V` axis of `data`.
    pub variables: Vec<String>,
    /// `[B, T, V]` or `[B, S, V, h, w]`.
    pub shape: Vec<usize>,
    /// Values, normalized if asked, missing values replaced by the fill value.
    pub data: Vec<f32>,
    /// 1 where `data` holds a real value, 0 where it was missing (NaN, fill value, padding).
    pub mask: Vec<u8>,
    /// Static variables when returned separately: their names.
    pub static_variables: Vec<String>,
    /// `[B, Vs]` or `[B, Vs, h, w]` static values (empty unless returned separately).
    pub statics: Vec<f32>,
    /// 1 where `statics` holds a real value, 0 where it was missing (the map's gaps, padding).
    pub statics_mask: Vec<u8>,
    /// Latitude of each sample (pixel centre, or patch centre).
    pub lat: Vec<f64>,
    /// Longitude of each sample.
    pub lon: Vec<f64>,
    /// Index on the cube's time axis of each sample's first step.
    pub time_index: Vec<usize>,
    /// Multi-resolution cubes loaded with native regridding: each coarser variable at its own resolution.
    pub native: Vec<NativeField>,
}

/// A variable of a multi-resolution cube at its native resolution: the cells of its level under the batch's
/// footprint (see [`crate::levels`] for the index mapping).
#[derive(Debug, Clone)]
pub struct NativeField {
    /// Variable name.
    pub name: String,
    /// `[ky, kx]`: target cells per level cell.
    pub factor: [usize; 2],
    /// `[row, col]` on the level grid of the field's first cell.
    pub origin: [usize; 2],
    /// `[T, h, w]` in the level's own steps (`T` = the batch's steps ÷ the level's time factor), or `[h, w]`
    /// for a static variable.
    pub shape: Vec<usize>,
    /// Values, normalized if asked, missing values replaced by the fill value.
    pub data: Vec<f32>,
    /// 1 where `data` holds a real value.
    pub mask: Vec<u8>,
}

impl Batch {
    /// Samples in the batch (B).
    #[must_use]
    pub fn len(&self) -> usize {
        self.shape.get(usize::from(self.variable_major)).copied().unwrap_or(0)
    }

    /// Whether the batch holds no sample.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shape of `statics`.
    #[must_use]
    pub fn statics_shape(&self) -> Vec<usize> {
        match self.kind {
            LayoutKind::PixelSeries => vec![self.len(), self.static_variables.len()],
            LayoutKind::ImageSequence => {
                vec![self.len(), self.static_variables.len(), self.shape[3], self.shape[4]]
            }
        }
    }

    /// Gives the batch's buffers back, for the next batches of any loader of this process to be made in
    /// instead of fresh memory, whose pages the reader would fault in ([`crate::loader::buffers`]). For a
    /// training loop done with a batch; dropping it frees them, as any vector. The tensors of
    /// `cubeload-torch` and the arrays of the Python module give their buffers back themselves.
    pub fn recycle(self) {
        use crate::loader::buffers::give_back;
        give_back(self.data);
        give_back(self.mask);
        give_back(self.statics);
    }
}
