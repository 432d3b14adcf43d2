//! Batches into tch tensors: by one copy out of a view of the batch (`to_tensor`, the batch stays usable), or
//! without a copy by handing the batch's buffer to the tensor (`into_tensor`). An extension trait, because
//! [`Batch`] belongs to `cubeload`, which does not link libtorch.

use std::ffi::{c_char, c_void};

use tch::kind::Element;
use tch::{Device, Kind, TchError, Tensor};

use cubeload::Batch;
use cubeload::loader::buffers;

/// Runs `f` on a tensor viewing `values` as `shape` (no copy); `f` must return a tensor of its own
/// memory (a copy or a conversion), which is all that outlives the view.
fn with_view<T: Element, R>(values: &[T], shape: &[usize], f: impl FnOnce(&Tensor) -> R) -> R {
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let mut strides = vec![1i64; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    assert_eq!(values.len() as i64, dims.iter().product::<i64>(), "batch values and shape disagree");
    // SAFETY: the view points into `values` with their length (checked above), kind and contiguous
    // strides, and is dropped before this function returns, while `values` is still borrowed; `f` copies
    // out of it synchronously (a CPU copy, a conversion or a copy into page-locked memory).
    let view = unsafe { Tensor::from_blob(values.as_ptr().cast(), &dims, &strides, T::KIND, Device::Cpu) };
    f(&view)
}

/// A copy of `values` on `device`, made by one copy out of them: `Tensor::from_slice` would zero the new
/// memory first. For a GPU the copy goes into page-locked memory, from which the copy to the device runs
/// without blocking, alongside the next batch's assembly; `kind` converts on the device (a mask goes as
/// bytes).
fn copied<T: Element>(values: &[T], shape: &[usize], device: Device, kind: Kind) -> Result<Tensor, TchError> {
    with_view(values, shape, |view| match device {
        // A conversion makes memory of its own in the one pass; a copy only where there is none to make.
        Device::Cpu if kind != T::KIND => view.f_to_kind(kind),
        Device::Cpu => {
            let mut host = Tensor::f_empty(view.size(), (T::KIND, Device::Cpu))?;
            host.f_copy_(view)?;
            Ok(host)
        }
        device => {
            usable(device)?;
            pinned(view)?.f_to_device_(device, T::KIND, true, false)?.f_to_kind(kind)
        }
    })
}

/// An error rather than libtorch's panic ("Cannot initialize CUDA without `ATen_cuda` library") for a device
/// this libtorch cannot use.
fn usable(device: Device) -> Result<(), TchError> {
    if let Device::Cuda(index) = device
        && (!tch::Cuda::is_available() || index >= tch::Cuda::device_count() as usize)
    {
        return Err(TchError::Torch(format!(
            "CUDA device {index} asked for, but this libtorch sees {} (a CPU build, or no GPU): use \
             Device::cuda_if_available()",
            if tch::Cuda::is_available() {
                format!("{} GPUs", tch::Cuda::device_count())
            } else {
                "none".into()
            }
        )));
    }
    Ok(())
}

/// A copy of `view` in page-locked memory, through `src/owned_tensor.cpp`: tch's `pin_memory` passes a device,
/// which libtorch deprecates with a warning printed on every call.
fn pinned(view: &Tensor) -> Result<Tensor, TchError> {
    let mut error = [0 as c_char; 512];
    // SAFETY: `view` is a live tensor; the C++ side returns a new tensor or null with a message in `error`.
    let tensor = unsafe { cubeload_pinned_copy(view.as_ptr(), error.as_mut_ptr(), error.len()) };
    if tensor.is_null() {
        // SAFETY: the C++ side wrote a NUL-terminated message into `error` (snprintf).
        let message = unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) };
        return Err(TchError::Torch(message.to_string_lossy().into_owned()));
    }
    // SAFETY: a tensor newly allocated by the C++ side, owned from here on by the returned `Tensor`.
    Ok(unsafe { Tensor::from_ptr(tensor) })
}

unsafe extern "C" {
    /// `src/owned_tensor.cpp`: a copy of `src` in page-locked memory (null on failure, with the reason in
    /// `error`).
    fn cubeload_pinned_copy(
        src: *const torch_sys::C_tensor,
        error: *mut c_char,
        error_len: usize,
    ) -> *mut torch_sys::C_tensor;
    /// `src/owned_tensor.cpp`: a float32 CPU tensor over `data` that calls `release(ctx)` when libtorch frees
    /// its storage (also when it fails, after writing the reason into `error`, and returning null).
    fn cubeload_owned_cpu_tensor(
        data: *mut c_void,
        dims: *const i64,
        ndims: usize,
        ctx: *mut c_void,
        release: unsafe extern "C" fn(*mut c_void),
        error: *mut c_char,
        error_len: usize,
    ) -> *mut torch_sys::C_tensor;
}

/// Gives a buffer handed to libtorch by [`owned`] back to the loaders ([`buffers`]), which make their next
/// batches in it.
unsafe extern "C" fn release(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `Box<Vec<f32>>` leaked by `owned`, and libtorch calls this once, when it frees the
    // tensor's storage.
    buffers::give_back(*unsafe { Box::from_raw(ctx.cast::<Vec<f32>>()) });
}

/// A CPU tensor of `shape` that owns `values`: no copy; the vector is given back to the loaders
/// ([`buffers`]) when libtorch frees the tensor.
fn owned(values: Vec<f32>, shape: &[usize]) -> Result<Tensor, TchError> {
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    assert_eq!(values.len() as i64, dims.iter().product::<i64>(), "batch values and shape disagree");
    let mut values = Box::new(values);
    let data = values.as_mut_ptr().cast::<c_void>();
    let ctx = Box::into_raw(values).cast::<c_void>();
    let mut error = [0 as c_char; 512];
    // SAFETY: `data` points to `dims`' product of contiguous floats, owned by `ctx`, which stays alive (the
    // heap block of a vector does not move when the box holding the vector does) until libtorch calls
    // `release(ctx)`; from this call on, libtorch alone frees `ctx`, also on failure.
    let tensor = unsafe {
        cubeload_owned_cpu_tensor(
            data,
            dims.as_ptr(),
            dims.len(),
            ctx,
            release,
            error.as_mut_ptr(),
            error.len(),
        )
    };
    if tensor.is_null() {
        // SAFETY: the C++ side wrote a NUL-terminated message into `error` (snprintf).
        let message = unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) };
        return Err(TchError::Torch(format!("a tensor over a batch: {}", message.to_string_lossy())));
    }
    // SAFETY: a tensor newly allocated by the C++ side, owned from here on by the returned `Tensor`.
    Ok(unsafe { Tensor::from_ptr(tensor) })
}

/// A batch's data, mask and statics as tensors. Errors are libtorch's, or a CUDA device this libtorch cannot
/// use.
pub trait BatchTensors {
    /// The data as one tensor `[B, T, V]` or `[B, S, V, h, w]` (`[V, B, T]` or `[V, B, S, h, w]` with
    /// `variable_major`; float32): one copy into tensor memory, or, for a CUDA device, into pinned memory and
    /// from there without blocking to the device.
    ///
    /// # Errors
    /// [`TchError`] from libtorch, or for a CUDA device it does not have.
    fn to_tensor(&self, device: Device) -> Result<Tensor, TchError>;

    /// The data as one tensor of the batch's shape (float32), without a copy on the CPU: the tensor takes
    /// the batch's buffer and gives it back to the loaders ([`buffers`]) when libtorch frees the tensor. For
    /// a CUDA device, as [`BatchTensors::to_tensor`]. Take the mask (and the statics) first when the training
    /// step needs them: the batch's other buffers are given back at once.
    ///
    /// # Errors
    /// As [`BatchTensors::to_tensor`].
    fn into_tensor(self, device: Device) -> Result<Tensor, TchError>;

    /// The mask as a float32 tensor of the data's shape (1 valid, 0 missing), ready to weight a loss. For a
    /// CUDA device the bytes go, and are converted there.
    ///
    /// # Errors
    /// As [`BatchTensors::to_tensor`].
    fn mask_tensor(&self, device: Device) -> Result<Tensor, TchError>;

    /// Static variables returned separately, `[B, Vs]` or `[B, Vs, h, w]`.
    ///
    /// # Errors
    /// As [`BatchTensors::to_tensor`].
    fn statics_tensor(&self, device: Device) -> Result<Tensor, TchError>;

    /// The mask of the statics returned separately, float32 of their shape (1 valid, 0 missing).
    ///
    /// # Errors
    /// As [`BatchTensors::to_tensor`].
    fn statics_mask_tensor(&self, device: Device) -> Result<Tensor, TchError>;

    /// The coarser variables of a multi-resolution cube at their native resolution (a loader built with
    /// [`cubeload::Regrid::Native`]; none otherwise), in the batch's order: each field's values and mask
    /// as float32 tensors `[T, h, w]` (the level's own steps) or `[h, w]` (static), copied.
    ///
    /// # Errors
    /// As [`BatchTensors::to_tensor`].
    fn native_tensors(&self, device: Device) -> Result<Vec<NativeTensors>, TchError>;
}

/// One coarser variable of a batch at its native resolution, as tensors ([`BatchTensors::native_tensors`]).
/// Where its cells lie on the target grid is in the batch's [`cubeload::batch::NativeField`]
/// (`factor`, `origin`).
#[derive(Debug)]
pub struct NativeTensors {
    /// Variable name.
    pub name: String,
    /// Values, float32 `[T, h, w]` or `[h, w]`.
    pub data: Tensor,
    /// 1 where `data` holds a value, 0 where missing (float32, `data`'s shape).
    pub mask: Tensor,
}

impl BatchTensors for Batch {
    fn to_tensor(&self, device: Device) -> Result<Tensor, TchError> {
        copied(&self.data, &self.shape, device, Kind::Float)
    }

    fn into_tensor(mut self, device: Device) -> Result<Tensor, TchError> {
        let tensor = match device {
            Device::Cpu => owned(std::mem::take(&mut self.data), &self.shape)?,
            device => self.to_tensor(device)?,
        };
        self.recycle();
        Ok(tensor)
    }

    fn mask_tensor(&self, device: Device) -> Result<Tensor, TchError> {
        copied(&self.mask, &self.shape, device, Kind::Float)
    }

    fn statics_tensor(&self, device: Device) -> Result<Tensor, TchError> {
        copied(&self.statics, &self.statics_shape(), device, Kind::Float)
    }

    fn statics_mask_tensor(&self, device: Device) -> Result<Tensor, TchError> {
        copied(&self.statics_mask, &self.statics_shape(), device, Kind::Float)
    }

    fn native_tensors(&self, device: Device) -> Result<Vec<NativeTensors>, TchError> {
        self.native
            .iter()
            .map(|field| {
                Ok(NativeTensors {
                    name: field.name.clone(),
                    data: copied(&field.data, &field.shape, device, Kind::Float)?,
                    mask: copied(&field.mask, &field.shape, device, Kind::Float)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubeload::batch::BatchOrigin;
    use cubeload::layout::LayoutKind;

    fn batch(shape: Vec<usize>) -> Batch {
        let n = shape.iter().product();
        Batch {
            origin: BatchOrigin { epoch: 0, position: 0, chunk: [0, 0, 0] },
            kind: LayoutKind::PixelSeries,
            variable_major: false,
            variables: vec!["x".into()],
            data: (0..n).map(|i| i as f32).collect(),
            mask: vec![1; n],
            shape,
            static_variables: Vec::new(),
            statics: Vec::new(),
            statics_mask: Vec::new(),
            lat: Vec::new(),
            lon: Vec::new(),
            time_index: Vec::new(),
            native: Vec::new(),
        }
    }

    fn resident_mb() -> f64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0
    }

    #[test]
    fn an_owning_tensor_holds_the_batch_values_and_frees_them_with_itself() {
        let b = batch(vec![4, 5, 3]);
        let expected = b.data.clone();
        let at = b.data.as_ptr();
        let x = b.into_tensor(Device::Cpu).unwrap();
        assert_eq!(x.size(), vec![4, 5, 3]);
        assert_eq!(x.data_ptr().cast_const().cast::<f32>(), at);
        // A view shares the storage: the buffer lives until the last tensor over it is gone.
        let row = x.select(0, 2);
        drop(x);
        assert_eq!(Vec::<f32>::try_from(row.flatten(0, -1)).unwrap(), expected[30..45]);

        // 40 tensors over 64 MB buffers, each written (resident) and dropped: without the release, 2.5 GB.
        let before = resident_mb();
        for _ in 0..40 {
            drop(std::hint::black_box(batch(vec![1 << 24]).into_tensor(Device::Cpu).unwrap()));
        }
        let grown = resident_mb() - before;
        assert!(
            grown < 640.0,
            "resident memory grew by {grown:.0} MB: the tensors did not free their buffers"
        );
    }
}
