"""PyTorch integration: :class:`CubeDataset`, an ``IterableDataset`` of whole batches.

Use it with ``DataLoader(dataset, batch_size=None, num_workers=N)``: every item already is a batch. Each
DataLoader worker, in each ``torch.distributed`` rank, reads its own share of the cube's batches:

- ranks get disjoint, equal shares (the last ``n mod world_size`` batches of an epoch's permutation are left
  out, so that every rank runs the same number of steps);
- the workers of a rank split its share without losing any;
- the rank is decided in the process that builds the DataLoader, so workers started by ``spawn`` or
  ``forkserver``, outside the process group, read their rank's share too.

The Rust reader threads are started inside ``__iter__``, i.e. in the worker process after DataLoader forked:
threads do not survive a fork, so none is started before it.
"""

from __future__ import annotations

import operator
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from ._cubeload import Loader

__all__ = ["CubeDataset"]


class CubeDataset(IterableDataset):
    """Batches of one epoch of a cube as dicts of tensors (``set_epoch`` moves to the next epoch).

    Args:
        path: the cube.
        variables: variables to load (default: all, in the cube's order).
        seed: seed of the shuffle and of the mixing (default 0, or the state's); the same seed gives the same
            batches in every run.
        shuffle: shuffle the batches of each epoch (default True, or as the state did).
        epoch: the epoch to iterate (see ``set_epoch``).
        rank, world_size: the distributed share; default: ``torch.distributed``'s when initialized, else 0, 1.
        prefetch, threads, fetchers, mix, normalize, fill_value, min_valid, on_corrupt, regrid, separate_statics: as for
            :class:`cubeload.Loader` (``mix`` default 1, or the state's).
        state: a ``state()`` of an interrupted epoch (single-worker use) to resume it exactly.
    """

    def __init__(
        self,
        path: str,
        variables: Sequence[str] | None = None,
        *,
        seed: int | None = None,
        shuffle: bool | None = None,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        prefetch: int | None = None,
        threads: int | None = None,
        fetchers: int | None = None,
        mix: int | None = None,
        normalize: bool = False,
        fill_value: float = 0.0,
        min_valid: float | None = None,
        state: dict[str, Any] | None = None,
        on_corrupt: str = "error",
        regrid: str = "target",
        separate_statics: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(variables, str):
            raise TypeError(f"variables={variables!r} is one string: give a list of names, such as [{variables!r}]")
        if (rank is None) != (world_size is None):
            # One alone was dropped for torch.distributed's (or 0 of 1): every rank then read the whole epoch.
            raise ValueError(
                f"rank={rank!r}, world_size={world_size!r}: give both, or neither to take torch.distributed's"
            )
        epoch = _count("epoch", epoch)
        if rank is not None:
            rank, world_size = _count("rank", rank), _count("world_size", world_size, least=1)
            if rank >= world_size:
                raise ValueError(f"rank={rank} of world_size={world_size}: a rank is below the world size")
        if state is not None:
            _check_state(state)
        self.path = str(path)
        self.variables = list(variables) if variables is not None else None
        self.seed, self.shuffle = seed, shuffle
        # The epoch, and whether the next iteration resumes ``state``, in shared memory: persistent DataLoader
        # workers keep the copies of the dataset they were started with, and would otherwise deliver the
        # first epoch (and resume the same state) every time.
        self._epoch = torch.tensor(epoch, dtype=torch.int64).share_memory_()
        self._resume = torch.tensor(state is not None).share_memory_()
        # How many states were loaded, shared, against the number of the one this copy holds: a persistent
        # worker's copy keeps the state it was started with, and must not resume it in place of a later one.
        self._loads = torch.tensor(int(state is not None), dtype=torch.int64).share_memory_()
        self._state_load = int(self._loads)
        # Whether DataLoader workers read the last epoch, shared: their positions are theirs, and a state of
        # this process would be that of an older epoch it read itself.
        self._read_by_workers = torch.tensor(False).share_memory_()
        self.rank, self.world_size = rank, world_size
        self.mix = mix
        self.options = dict(
            prefetch=prefetch, threads=threads, fetchers=fetchers, normalize=normalize, fill_value=fill_value,
            min_valid=min_valid, on_corrupt=on_corrupt, regrid=regrid, separate_statics=separate_statics,
        )
        self.state = state
        if state is not None:
            self._take(state)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration delivers."""
        return int(self._epoch)

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self._epoch.fill_(_count("epoch", epoch))

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch the next iteration delivers (each has its own permutation), whole: a state being
        resumed is dropped. Reaches DataLoader workers, persistent ones too."""
        self.epoch = epoch
        self._resume.fill_(False)
        self.state = None

    def __len__(self) -> int:
        """Batches of an epoch for this rank, all DataLoader workers together: what ``len(DataLoader)``
        reports (to size a learning-rate schedule, say). An epoch resumed from a state delivers fewer."""
        rank, world, _, _ = self._share()
        # Read on the calling thread: no thread is started before DataLoader forks its workers.
        loader = Loader(
            self.path, self.variables, threads=0, rank=rank, world_size=world, min_valid=self.options["min_valid"]
        )
        return loader.batches_per_epoch

    def _ranks(self) -> tuple[int, int]:
        """This rank and the world size: as given, else ``torch.distributed``'s when initialized, else 0, 1."""
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by spawn or forkserver (macOS, Windows, Python 3.14's Linux default) get
        # the dataset pickled, without the process group: the share is decided here, where it is known. A
        # dataset pickled before the process group exists (handed to torch.multiprocessing.spawn) keeps
        # looking it up, in the process that unpickles it.
        fields = self.__dict__.copy()
        if (self.rank is None or self.world_size is None) and dist.is_available() and dist.is_initialized():
            fields["rank"], fields["world_size"] = self._ranks()
        return fields

    def _share(self) -> tuple[int, int, int, int]:
        rank, world = self._ranks()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank, world, worker, workers

    def loader(self) -> Loader:
        """The Rust loader of this process's share (call it in the process that iterates)."""
        rank, world, worker, workers = self._share()
        resume = self.state if bool(self._resume) else None
        if bool(self._resume) and (resume is None or self._state_load != int(self._loads)):
            raise RuntimeError(
                "load_state_dict was called after this persistent DataLoader worker started, which keeps the "
                "dataset it was started with: load the state before the DataLoader's first iteration"
            )
        if resume is not None:
            if (resume["rank"], resume["world_size"]) != (rank, world):
                # Another rank's state would train this rank on that rank's batches, and a changed world size
                # on shares that overlap: resume each rank from its own state, in a job of the same size.
                raise ValueError(
                    f"the state was saved by rank {resume['rank']} of {resume['world_size']}, not {rank} of "
                    f"{world}: resume each rank from its own state, with the world size it was saved with"
                )
            saved = (resume.get("worker", 0), resume.get("workers", 1))
            if saved != (worker, workers):
                # Each worker would deliver the whole share the state was saved for: every batch again.
                raise ValueError(
                    f"the state was saved by DataLoader worker {saved[0]} of {saved[1]}, not {worker} of "
                    f"{workers}: resume with the num_workers it was saved with"
                )
        # Given ones must agree with a state being resumed (the Loader checks); left out, the state's are taken.
        given = {k: v for k, v in dict(seed=self.seed, shuffle=self.shuffle, mix=self.mix).items() if v is not None}
        state = resume or {
            "seed": 0, "shuffle": True, "mix": 1, **given, "epoch": self.epoch, "cursor": 0, "rank": rank,
            "world_size": world, "worker": worker, "workers": workers,
        }
        return Loader(self.path, self.variables, epochs=self.epoch + 1, state=state, **given, **self.options)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = self.loader()
        self._read_by_workers.fill_(get_worker_info() is not None)
        names = loader.variables + loader.static_variables
        for batch in loader:
            out: dict[str, Any] = {name: torch.from_numpy(batch[name]) for name in names}
            out["mask"] = torch.from_numpy(batch["mask"])
            if "static_mask" in batch:
                out["static_mask"] = torch.from_numpy(batch["static_mask"])
            out["lat"] = torch.from_numpy(batch["lat"])
            out["lon"] = torch.from_numpy(batch["lon"])
            out["time_index"] = torch.from_numpy(batch["time_index"])
            out["epoch"], out["position"], out["chunk"] = batch["epoch"], batch["position"], batch["chunk"]
            if "native" in batch:
                out["native"] = {
                    name: dict(field, data=torch.from_numpy(field["data"]), mask=torch.from_numpy(field["mask"]))
                    for name, field in batch["native"].items()
                }
            self._delivered = loader.state()
            yield out

    def state_dict(self) -> dict[str, Any] | None:
        """Where this process's share stands after the last batch it yielded (``None`` before the first), for
        a checkpoint; :meth:`load_state_dict` in a restarted process continues with exactly the next batch.
        Exact with ``num_workers=0``; with DataLoader workers each worker has its own position, which the main
        process does not see: there it raises ``RuntimeError`` (inside a worker it gives the worker's)."""
        if bool(self._read_by_workers) and get_worker_info() is None:
            raise RuntimeError(
                "the last epoch was read by DataLoader workers, whose positions this process does not see: "
                "checkpoint a position with num_workers=0, or resume at the start of an epoch (set_epoch)"
            )
        return getattr(self, "_delivered", None)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (same cube, seed and share). Call it before a DataLoader with
        persistent workers first iterates: they keep the dataset they were started with."""
        _check_state(state)
        self.state = dict(state)
        self._take(state)
        self._loads += 1
        self._state_load = int(self._loads)
        self._resume.fill_(True)

    def _take(self, state: dict[str, Any]) -> None:
        """The state's epoch, and its seed, shuffle, mixing, variables and ``min_valid`` where not given: the
        epochs after it keep them (and ``len`` counts with them)."""
        self.epoch = state["epoch"]
        self.seed = state["seed"] if self.seed is None else self.seed
        self.shuffle = state["shuffle"] if self.shuffle is None else self.shuffle
        self.mix = state.get("mix", 1) if self.mix is None else self.mix
        if self.variables is None and state.get("variables") is not None:
            self.variables = list(state["variables"])
        if self.options["min_valid"] is None:
            self.options["min_valid"] = state.get("min_valid")


def _count(name: str, value: Any, least: int = 0) -> int:
    """``value`` as a whole number of at least ``least``, or an error naming the argument."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: a whole number is needed")
    if number < least:
        raise ValueError(f"{name}={value!r}: a whole number of at least {least} is needed")
    return number


def _check_state(state: Any) -> None:
    """Refuses what is not a state of a loader, naming the keys it lacks."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state={state!r}: a dict from state_dict() or Loader.state() is needed")
    missing = [key for key in ("seed", "shuffle", "epoch", "cursor", "rank", "world_size") if key not in state]
    if missing:
        raise ValueError(
            f"state lacks {', '.join(missing)}: give a dict from state_dict() or Loader.state(), as it was saved"
        )
