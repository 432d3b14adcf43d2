// A float32 CPU tensor over memory that Rust owns, handed back to Rust when libtorch frees the tensor; and a
// copy of a tensor in page-locked memory (below).
//
// tch's `Tensor::from_blob` takes no deleter: the memory must outlive every tensor that views it, which a
// batch handed to a training loop cannot promise. libtorch's `for_blob(...).context(ctx, release)` can:
// `release(ctx)` runs when the last tensor sharing the storage is freed, on whatever thread frees it.

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>

#include <cstdio>
#include <exception>

extern "C" void* cubeload_owned_cpu_tensor(void* data, const int64_t* dims, size_t ndims, void* ctx,
                                          void (*release)(void*), char* error, size_t error_len) {
  try {
    // From here on `ctx` belongs to libtorch: `context` frees it through `release` with the storage, or on
    // an exception when the maker is destroyed.
    at::Tensor tensor = at::for_blob(data, at::IntArrayRef(dims, ndims))
                            .context(ctx, release)
                            .options(at::TensorOptions().dtype(at::kFloat))
                            .make_tensor();
    return new at::Tensor(std::move(tensor));
  } catch (const std::exception& e) {
    std::snprintf(error, error_len, "%s", e.what());
    return nullptr;
  }
}

// A copy of `src` in page-locked memory, for a copy to a GPU that does not block. `pin_memory()` without a
// device: libtorch deprecates the device argument tch passes, with a warning on every call.
extern "C" void* cubeload_pinned_copy(const void* src, char* error, size_t error_len) {
  try {
    return new at::Tensor(static_cast<const at::Tensor*>(src)->pin_memory());
  } catch (const std::exception& e) {
    std::snprintf(error, error_len, "%s", e.what());
    return nullptr;
  }
}
