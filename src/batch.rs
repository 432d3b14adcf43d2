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

/// Where a batch comes from: enough to find its chunk in the cube again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BatchOrigin {
    /// Epoch (0-based).
    pub epoch: usize,
    /// Position in this rank's epoch order (0-based).
    pub position: usize,
    /// Chunk indices `[time, lat, lon]` of the cube (the first of the group when mixing).
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
}

#[cfg(feature = "tch")]
mod tensor {
    use tch::kind::Element;
    use tch::{Device, Kind, Tensor};

    use super::Batch;

    /// Runs `f` on a tensor viewing `values` as `shape` (no copy); `f` must return a tensor of its own
    /// memory (a copy or a conversion), which is all that outlives the view.
    fn with_view<T: Element>(values: &[T], shape: &[usize], f: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let mut strides = vec![1i64; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * dims[i + 1];
        }
        assert_eq!(values.len() as i64, dims.iter().product::<i64>(), "batch values and shape disagree");
        // SAFETY: the view points into `values` with their length (checked above), kind and contiguous
        // strides, and is dropped before this function returns, while `values` is still borrowed; `f` copies
        // out of it synchronously (a CPU copy, a conversion or a copy into page-locked memory).
        let view =
            unsafe { Tensor::from_blob(values.as_ptr().cast(), &dims, &strides, T::KIND, Device::Cpu) };
        f(&view)
    }

    /// A copy of `values` on `device`, made by one copy out of them: `Tensor::from_slice` would zero the new
    /// memory first. For a GPU the copy goes into page-locked memory, from which the copy to the device runs
    /// without blocking, alongside the next batch's assembly.
    fn copied<T: Element>(values: &[T], shape: &[usize], device: Device) -> Tensor {
        with_view(values, shape, |view| match device {
            Device::Cpu => {
                let mut host = Tensor::empty(view.size(), (T::KIND, Device::Cpu));
                host.copy_(view);
                host
            }
            device => view.pin_memory(device).to_device_(device, T::KIND, true, false),
        })
    }

    impl Batch {
        /// The data as one tensor `[B, T, V]` or `[B, S, V, h, w]` (float32): one copy into tensor memory,
        /// or, for a CUDA device, into pinned memory and from there without blocking to the device.
        pub fn to_tensor(&self, device: Device) -> Tensor {
            copied(&self.data, &self.shape, device)
        }

        /// The mask as a float32 tensor of the data's shape (1 valid, 0 missing), ready to weight a loss.
        pub fn mask_tensor(&self, device: Device) -> Tensor {
            let mask = with_view(&self.mask, &self.shape, |view| view.to_kind(Kind::Float));
            match device {
                Device::Cpu => mask,
                device => mask.pin_memory(device).to_device_(device, Kind::Float, true, false),
            }
        }

        /// Static variables returned separately, `[B, Vs]` or `[B, Vs, h, w]`.
        pub fn statics_tensor(&self, device: Device) -> Tensor {
            copied(&self.statics, &self.statics_shape(), device)
        }
    }
}
