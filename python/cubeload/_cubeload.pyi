"""Type stubs of the native module."""

from os import PathLike
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import numpy.typing as npt

class CubeloadError(Exception): ...
class CubeError(CubeloadError): ...
class UnknownVariableError(CubeloadError): ...
class CorruptChunkError(CubeloadError): ...

def kept_buffer_bytes() -> int:
    """Bytes of batch buffers this process keeps for its loaders' next batches: the values and masks of
    batches whose arrays numpy has freed (at most 64 MiB of each)."""

class Loader:
    """An iterator over the batches of a cubeload cube: one pass over its ``epochs`` (a second ``for`` loop
    over the same loader yields nothing; build another, or resume one from ``state()``).

    Each batch is a dict: one float32 array per variable (``[B, T]`` for pixel_series, ``[B, S, h, w]`` for
    image_sequence), ``"mask"`` (bool, ``[V, B, ...]`` in ``variables`` order: True where a value is real),
    per-sample ``"lat"``, ``"lon"`` (float64) and ``"time_index"`` (int64, first step on the cube's time
    axis), and ``"epoch"``, ``"position"``, ``"chunk"``. The variables' arrays and the mask are views of the
    batch's Rust-owned buffers (no copy), which go back to the loaders when numpy frees the last array over
    them; ``"lat"``, ``"lon"``, ``"time_index"`` and statics delivered apart are small arrays of their own.
    Missing values hold ``fill_value``; ``normalize=True`` gives continuous variables as ``(x - mean) / std``
    with the cube's stored statistics (categorical ones keep their codes). The GIL is released while a batch is awaited, and a signal (Ctrl-C)
    interrupts that wait.

    With ``separate_statics=True`` each static variable comes once per sample (``[B]``, or ``[B, h, w]`` for
    image_sequence) instead of repeated along time: ``variables`` and ``"mask"`` then hold the time-varying
    variables only, ``static_variables`` names the others, and ``"static_mask"`` (bool, ``[S, B]`` or
    ``[S, B, h, w]`` in ``static_variables`` order) says where they hold a real value. A batch then carries fewer bytes (a third fewer
    on the demo cube); broadcast them on the device (``x_s[:, None].expand(-1, T)``) where a model wants them
    at every step.

    Multi-resolution cubes: variables stored at a coarser resolution come regridded onto the batch's cells
    (``regrid="target"``: nearest or bilinear, as the cube declares), or with ``regrid="native"`` in
    ``batch["native"][name]`` as ``{"data", "mask", "origin", "factor"}``: the level cells under the batch
    (``[T, h, w]``, ``T`` in the level's own time steps), the first one's ``(row, col)`` on the level grid, and
    target cells per level cell.

    ``threads`` reader threads decode (default 2); on an object store (``s3://``, ...) ``fetchers`` threads
    (default 32) wait on the requests of the batches ahead: raise it for cubes of many variables.

    ``shuffle`` (default True), ``seed`` (0), ``rank`` and ``world_size`` (0 of 1), ``worker`` and ``workers``
    (0 of 1) and ``mix`` (1) default to those of ``state`` when one is given, and must then agree with it.
    ``mix=K`` mixes the samples of K consecutive batches of the rank's order; the workers of a rank take whole
    groups of K, so a batch's samples do not depend on the number of workers. ``"position"`` is the batch's
    place in the rank's epoch order, whatever the worker.

    A chunk that cannot be read or decoded (every chunk carries a checksum) raises ``CorruptChunkError``
    naming the variable and chunk; with ``on_corrupt="skip"`` its batch is left out and counted in
    ``corrupt_chunks`` instead.
    """

    def __init__(
        self,
        path: str | PathLike[str],
        variables: Sequence[str] | None = None,
        *,
        shuffle: bool | None = None,
        seed: int | None = None,
        epochs: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        worker: int | None = None,
        workers: int | None = None,
        prefetch: int | None = None,
        threads: int | None = None,
        fetchers: int | None = None,
        mix: int | None = None,
        normalize: bool = False,
        fill_value: float = 0.0,
        min_valid: float | None = None,
        state: dict[str, Any] | None = None,
        on_corrupt: Literal["error", "skip"] = "error",
        regrid: Literal["target", "native"] = "target",
        separate_statics: bool = False,
    ) -> None: ...
    def __iter__(self) -> Iterator[dict[str, Any]]: ...
    def __next__(self) -> dict[str, Any]: ...
    def state(self) -> dict[str, Any]:
        """Where the loader stands (JSON-able), with the epochs and variables of its run;
        ``Loader(path, state=...)`` continues exactly after it. The state decides the batches: ``shuffle``,
        ``seed``, ``rank``, ``world_size``, ``worker``, ``workers``, ``mix`` and ``variables`` given with it
        must agree with it (they default to it), ``epochs`` must reach its epoch, and a state whose cube,
        variables or ``min_valid`` left other batches eligible is refused (its ``digest``)."""
    @property
    def variables(self) -> list[str]: ...
    @property
    def static_variables(self) -> list[str]:
        """Static variables delivered once per sample (``separate_statics=True``; empty otherwise)."""
    @property
    def batches_per_epoch(self) -> int: ...
    @property
    def prefetch_depth(self) -> int:
        """Batches the reader threads may hold ready: ``prefetch``, or by default as many as 32 MiB hold
        (4 to 1024)."""
    @property
    def corrupt_chunks(self) -> int:
        """Corrupt chunks left out so far with ``on_corrupt="skip"``."""
    @property
    def layout(self) -> str: ...
