//! Batches into tch tensors: by one copy out of a view of the batch (`to_tensor`, the batch stays usable), or
//! without a copy by handing the batch's buffer to the tensor (`into_tensor`). An extension trait, because
//! [`Batch`] belongs to `cubeload`, which does not link libtorch.

use std::ffi::{c_char, c_void};

use tch::kind::Element;
use tch::{Device, Kind, Tensor};

use cubeload::Batch;
use cubeload::loader::buffers;

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
    let view = unsafe { Tensor::from_blob(values.as_ptr().cast(), &dims, &strides, T::KIND, Device::Cpu) };
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

unsafe extern "C" {
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
fn owned(values: Vec<f32>, shape: &[usize]) -> Tensor {
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
        panic!("libtorch refused a tensor over a batch: {}", message.to_string_lossy());
    }
    // SAFETY: a tensor newly allocated by the C++ side, owned from here on by the returned `Tensor`.
    unsafe { Tensor::from_ptr(tensor) }
}

/// A batch's data, mask and statics as tensors.
pub trait BatchTensors {
    /// The data as one tensor `[B, T, V]` or `[B, S, V, h, w]` (float32): one copy into tensor memory,
    /// or, for a CUDA device, into pinned memory and from there without blocking to the device.
    fn to_tensor(&self, device: Device) -> Tensor;

    /// The data as one tensor `[B, T, V]` or `[B, S, V, h, w]` (float32), without a copy on the CPU: the
    /// tensor takes the batch's buffer and gives it back to the loaders ([`buffers`]) when libtorch frees
    /// the tensor. For a CUDA device, as [`BatchTensors::to_tensor`]. Take the mask (and the statics)
    /// first when the training step needs them: the batch's other buffers are given back at once.
    fn into_tensor(self, device: Device) -> Tensor;

    /// The mask as a float32 tensor of the data's shape (1 valid, 0 missing), ready to weight a loss.
    fn mask_tensor(&self, device: Device) -> Tensor;

    /// Static variables returned separately, `[B, Vs]` or `[B, Vs, h, w]`.
    fn statics_tensor(&self, device: Device) -> Tensor;
}

impl BatchTensors for Batch {
    fn to_tensor(&self, device: Device) -> Tensor {
        copied(&self.data, &self.shape, device)
    }

    fn into_tensor(mut self, device: Device) -> Tensor {
        let tensor = match device {
            Device::Cpu => owned(std::mem::take(&mut self.data), &self.shape),
            device => self.to_tensor(device),
        };
        self.recycle();
        tensor
    }

    fn mask_tensor(&self, device: Device) -> Tensor {
        let mask = with_view(&self.mask, &self.shape, |view| view.to_kind(Kind::Float));
        match device {
            Device::Cpu => mask,
            device => mask.pin_memory(device).to_device_(device, Kind::Float, true, false),
        }
    }

    fn statics_tensor(&self, device: Device) -> Tensor {
        copied(&self.statics, &self.statics_shape(), device)
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
        let x = b.into_tensor(Device::Cpu);
        assert_eq!(x.size(), vec![4, 5, 3]);
        assert_eq!(x.data_ptr().cast_const().cast::<f32>(), at);
        // A view shares the storage: the buffer lives until the last tensor over it is gone.
        let row = x.select(0, 2);
        drop(x);
        assert_eq!(Vec::<f32>::try_from(row.flatten(0, -1)).unwrap(), expected[30..45]);

        // 40 tensors over 64 MB buffers, each written (resident) and dropped: without the release, 2.5 GB.
        let before = resident_mb();
        for _ in 0..40 {
            drop(std::hint::black_box(batch(vec![1 << 24]).into_tensor(Device::Cpu)));
        }
        let grown = resident_mb() - before;
        assert!(
            grown < 640.0,
            "resident memory grew by {grown:.0} MB: the tensors did not free their buffers"
        );
    }
}
