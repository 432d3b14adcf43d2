"""cubeload: shuffled, aligned batches from cubeload Zarr cubes, straight into numpy (and PyTorch).

>>> import cubeload
>>> for batch in cubeload.Loader("cubes/uk.zarr", variables=["t2m"], seed=0, epochs=2):
...     t2m = batch["t2m"]        # float32 [B, T] (pixel_series) or [B, S, h, w] (image_sequence)
...     mask = batch["mask"]      # bool [V, B, T] / [V, B, S, h, w], axis 0 in loader.variables order

Multi-resolution cubes deliver coarser variables regridded onto the batch's cells (``regrid="target"``), or
with ``regrid="native"`` at their own resolution in ``batch["native"][name]`` (``data``, ``mask``, the level
cell ``origin`` and the level ``factor``).

The arrays are views of a buffer filled by the Rust loader: no copy is made, and ``torch.from_numpy`` shares
them. When numpy frees a batch's last array, its values and mask go back to the loaders, which make their next
batches in them instead of in fresh memory (:func:`kept_buffer_bytes` says how much is kept). For PyTorch's DataLoader (several workers, distributed ranks) use :class:`cubeload.torch.CubeDataset`.
"""

# numpy must be imported before the extension starts threads that create arrays.
import numpy as _numpy  # noqa: F401

from ._cubeload import (
    CorruptChunkError,
    CubeError,
    CubeloadError,
    Loader,
    UnknownVariableError,
    kept_buffer_bytes,
)

__all__ = ["Loader", "CubeloadError", "CubeError", "UnknownVariableError", "CorruptChunkError", "kept_buffer_bytes"]
