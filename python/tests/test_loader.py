"""The Python binding with real numpy, xarray and torch: coverage, values, determinism, resume, sharding,
DataLoader workers, zero-copy arrays and exceptions."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import xarray as xr
from torch.utils.data import DataLoader

import cubeload
from cubeload.torch import CubeDataset
from conftest import cubeload_bin, run


def fingerprint(batches):
    return [(b["epoch"], b["position"], b["chunk"], hash(b["t2m"].tobytes())) for b in batches]


def test_every_pixel_once_per_epoch_with_xarrays_values(pixel_cube):
    ds = xr.open_zarr(pixel_cube)
    loader = cubeload.Loader(pixel_cube, seed=1, epochs=2)
    assert loader.variables == ["t2m", "ndvi", "landcover"]
    assert loader.layout == "pixel_series"
    per_epoch = loader.batches_per_epoch
    batches = list(loader)
    assert len(batches) == 2 * per_epoch
    lat_index = {v: i for i, v in enumerate(ds.lat.values)}
    lon_index = {v: i for i, v in enumerate(ds.lon.values)}
    t2m = ds.t2m.values  # (time, lat, lon), padded
    ndvi = ds.ndvi.values
    lc = ds.landcover.values.astype(np.float32)
    for epoch in (0, 1):
        seen = set()
        for b in (b for b in batches if b["epoch"] == epoch):
            assert b["t2m"].shape == (256, 168) and b["t2m"].dtype == np.float32
            assert b["mask"].shape == (3, 256, 168) and b["mask"].dtype == np.bool_
            for s in range(0, 256, 17):
                y, x = lat_index[b["lat"][s]], lon_index[b["lon"][s]]
                for v, (name, ref) in enumerate([("t2m", t2m[:, y, x]), ("ndvi", ndvi[:, y, x]), ("landcover", np.full(168, lc[y, x]))]):
                    valid = ~np.isnan(ref)
                    if name == "landcover":
                        valid &= ref != 0  # declared fill value of the categorical map (no data)
                    np.testing.assert_array_equal(b["mask"][v, s], valid)
                    np.testing.assert_array_equal(b[name][s][valid], ref[valid])
                    assert np.all(b[name][s][~valid] == 0.0)
            seen.update(zip(b["lat"].tolist(), b["lon"].tolist()))
        assert seen == {(a, o) for a in ds.lat.values.tolist() for o in ds.lon.values.tolist()}


def test_statics_apart_once_per_sample_with_the_same_values(pixel_cube):
    ds = xr.open_zarr(pixel_cube)
    lat_index = {v: i for i, v in enumerate(ds.lat.values)}
    lon_index = {v: i for i, v in enumerate(ds.lon.values)}
    lc = ds.landcover.values.astype(np.float32)
    loader = cubeload.Loader(pixel_cube, seed=3, separate_statics=True)
    assert loader.variables == ["t2m", "ndvi"] and loader.static_variables == ["landcover"]
    repeated = cubeload.Loader(pixel_cube, seed=3)
    missing = 0
    for apart, whole in zip(loader, repeated):
        assert apart["landcover"].shape == (256,) and apart["mask"].shape == (2, 256, 168)
        # The same batches as with statics repeated along time, whose first step gives the static value.
        assert apart["chunk"] == whole["chunk"]
        np.testing.assert_array_equal(apart["t2m"], whole["t2m"])
        np.testing.assert_array_equal(apart["mask"], whole["mask"][:2])
        np.testing.assert_array_equal(apart["landcover"], whole["landcover"][:, 0])
        # And xarray's map where it has data (0 is its declared fill value), the fill value elsewhere.
        ref = lc[[lat_index[a] for a in apart["lat"]], [lon_index[o] for o in apart["lon"]]]
        np.testing.assert_array_equal(apart["landcover"], np.where(np.isnan(ref), 0.0, ref))
        # Their mask: xarray's missing cells (the fill value, padding), as the repeated mask says at step 0.
        assert apart["static_mask"].shape == (1, 256) and apart["static_mask"].dtype == np.bool_
        np.testing.assert_array_equal(apart["static_mask"][0], ~np.isnan(ref))
        np.testing.assert_array_equal(apart["static_mask"][0], whole["mask"][2, :, 0])
        missing += int((~apart["static_mask"]).sum())
    assert missing > 0, "the demo map's gaps and padding are among the statics"
    dataset = CubeDataset(pixel_cube, seed=3, separate_statics=True)
    batch = next(iter(dataset))
    assert batch["landcover"].shape == (256,) and batch["t2m"].shape == (256, 168)
    assert batch["static_mask"].shape == (1, 256) and batch["static_mask"].dtype == torch.bool


def test_statics_apart_are_arrays_of_their_own(two_statics_cube):
    """Each static delivered apart, and their mask, are contiguous arrays (torch's `.view` works on them), with
    the values of the statics repeated along time."""
    apart = next(cubeload.Loader(two_statics_cube, seed=1, separate_statics=True))
    whole = next(cubeload.Loader(two_statics_cube, seed=1))
    assert apart["chunk"] == whole["chunk"]
    names = ["landcover", "landcover2"]
    for s, name in enumerate(names):
        assert apart[name].flags.c_contiguous and apart[name].shape == (256,)
        torch.from_numpy(apart[name]).view(16, 16)
        np.testing.assert_array_equal(apart[name], whole[name][:, 0])
        np.testing.assert_array_equal(apart["static_mask"][s], whole["mask"][2 + s, :, 0])
    assert apart["static_mask"].flags.c_contiguous and apart["static_mask"].shape == (2, 256)
    # Their own memory: writing one changes neither the other nor the mask.
    before = apart["landcover2"].copy(), apart["static_mask"].copy()
    apart["landcover"][:] = -1
    np.testing.assert_array_equal(apart["landcover2"], before[0])
    np.testing.assert_array_equal(apart["static_mask"], before[1])


def test_image_sequences(image_cube):
    ds = xr.open_zarr(image_cube)
    loader = cubeload.Loader(image_cube, ["ndvi", "t2m"], shuffle=False)
    b = next(loader)
    assert b["ndvi"].shape == (4, 8, 16, 16) and b["mask"].shape == (2, 4, 8, 16, 16)
    it, iy, ix = b["chunk"]
    np.testing.assert_array_equal(b["t2m"][0], ds.t2m.values[it * 8:(it + 1) * 8, iy * 32:iy * 32 + 16, ix * 32:ix * 32 + 16])


def test_same_seed_same_batches_whatever_the_threads(pixel_cube):
    runs = [fingerprint(cubeload.Loader(pixel_cube, seed=7, epochs=2, threads=t, prefetch=p)) for t, p in [(0, 1), (1, 2), (3, 8)]]
    assert runs[0] == runs[1] == runs[2]
    assert fingerprint(cubeload.Loader(pixel_cube, seed=8, epochs=2)) != runs[0]


def test_prefetch_depth_by_default_and_given(pixel_cube):
    loader = cubeload.Loader(pixel_cube, seed=1)
    batch = next(loader)
    # The batch's values and mask as the Rust loader holds them (float32 and one byte per value).
    batch_bytes = sum(batch[v].size for v in loader.variables) * 5
    assert loader.prefetch_depth == min(1024, max(4, (32 << 20) // batch_bytes))
    assert cubeload.Loader(pixel_cube, prefetch=2).prefetch_depth == 2


def test_resume_from_json_state(pixel_cube):
    full = fingerprint(cubeload.Loader(pixel_cube, seed=3, epochs=2, mix=2))
    for stop in (1, 5, len(full) // 2 + 1):
        first = cubeload.Loader(pixel_cube, seed=3, epochs=2, mix=2)
        head = [next(first) for _ in range(stop)]
        state = json.loads(json.dumps(first.state()))
        del first
        rest = list(cubeload.Loader(pixel_cube, epochs=2, state=state))
        assert fingerprint(head) + fingerprint(rest) == full


def test_a_state_resumes_its_runs_epochs_and_variables(pixel_cube):
    full = fingerprint(cubeload.Loader(pixel_cube, ["t2m", "landcover"], seed=4, epochs=3))
    first = cubeload.Loader(pixel_cube, ["t2m", "landcover"], seed=4, epochs=3)
    per_epoch = first.batches_per_epoch
    head = [next(first) for _ in range(per_epoch + 3)]
    state = json.loads(json.dumps(first.state()))
    assert state["epochs"] == 3 and sorted(state["variables"]) == ["landcover", "t2m"]
    # Neither the epochs nor the variables given: the state's.
    rest = cubeload.Loader(pixel_cube, state=state)
    assert rest.variables == ["t2m", "landcover"]
    assert fingerprint(head) + fingerprint(rest) == full
    with pytest.raises(ValueError, match="differ from those of the state"):
        cubeload.Loader(pixel_cube, ["t2m"], state=state)
    with pytest.raises(ValueError, match="past the 1 epochs asked"):
        cubeload.Loader(pixel_cube, epochs=1, state=state)


def test_a_state_resumes_with_its_runs_min_valid(pixel_cube):
    # The demo's NDVI has cloud gaps: 0.98 of the cells of a batch, its variables averaged, leaves some out.
    full = fingerprint(cubeload.Loader(pixel_cube, seed=4, min_valid=0.98))
    first = cubeload.Loader(pixel_cube, seed=4, min_valid=0.98)
    assert first.batches_per_epoch < cubeload.Loader(pixel_cube).batches_per_epoch, "0.98 leaves some out"
    head = [next(first) for _ in range(2)]
    state = json.loads(json.dumps(first.state()))
    assert state["min_valid"] == 0.98
    assert fingerprint(head) + fingerprint(cubeload.Loader(pixel_cube, state=state)) == full


def test_a_state_is_refused_where_it_would_resume_other_batches(pixel_cube, image_cube):
    first = cubeload.Loader(pixel_cube, seed=4, epochs=2)
    [next(first) for _ in range(3)]
    state = json.loads(json.dumps(first.state()))
    # Arguments that contradict it: the state decides; the same values are accepted.
    for given in (dict(seed=5), dict(shuffle=False), dict(mix=2), dict(rank=1, world_size=2), dict(workers=2)):
        name = next(iter(given))
        with pytest.raises(ValueError, match=f"{name}=.* differs from the state's {name}"):
            cubeload.Loader(pixel_cube, state=state, **given)
    assert len(list(cubeload.Loader(pixel_cube, state=state, seed=4, mix=1))) == 2 * first.batches_per_epoch - 3
    # Another cube, or another threshold leaving other batches eligible: its digest differs.
    for path, options in ((image_cube, {}), (pixel_cube, dict(min_valid=0.99))):
        with pytest.raises(ValueError, match="another cube, or with other variables or another min_valid"):
            cubeload.Loader(path, state=state, **options)
    # A dataset takes the state's seed, shuffle and mixing when not given, and refuses others.
    mixed = cubeload.Loader(pixel_cube, seed=4, mix=3, shuffle=False)
    head = [next(mixed)["chunk"] for _ in range(4)]
    saved = mixed.state()
    rest = [b["chunk"] for b in CubeDataset(pixel_cube, state=saved)]
    assert head + rest == [b["chunk"] for b in cubeload.Loader(pixel_cube, seed=4, mix=3, shuffle=False)]
    with pytest.raises(ValueError, match="seed=5 differs from the state's seed"):
        next(iter(CubeDataset(pixel_cube, seed=5, state=saved)))
    # Without shuffling the seed still mixes, the same in both; a dataset keeps the seed, shuffle and mixing
    # it took from a state in the epochs after it.
    def lats(batches):
        return [np.asarray(b["lat"]).tobytes() for b in batches]

    plain = lats(cubeload.Loader(pixel_cube, seed=4, mix=3, shuffle=False, epochs=2))
    assert plain[: len(plain) // 2] == lats(CubeDataset(pixel_cube, seed=4, mix=3, shuffle=False))
    assert plain != lats(cubeload.Loader(pixel_cube, seed=0, mix=3, shuffle=False, epochs=2))
    resumed = CubeDataset(pixel_cube, state=saved)
    list(resumed)
    resumed.set_epoch(1)
    assert (resumed.seed, resumed.shuffle, resumed.mix) == (4, False, 3)
    assert lats(resumed) == plain[len(plain) // 2 :]
    # A dataset refuses another rank's state.
    rank0 = dict(state, epoch=0)
    with pytest.raises(ValueError, match="saved by rank 0 of 1, not 1 of 2"):
        next(iter(CubeDataset(pixel_cube, seed=4, rank=1, world_size=2, state=rank0)))


def test_mixed_batches_are_the_same_whatever_the_dataloader_workers(pixel_cube):
    def batches(workers):
        loader = DataLoader(CubeDataset(pixel_cube, seed=6, mix=3, threads=1), batch_size=None, num_workers=workers)
        return sorted((b["position"], tuple(b["chunk"]), hash(b["lat"].numpy().tobytes()),
                       hash(b["t2m"].numpy().tobytes())) for b in loader)

    alone = batches(0)
    assert [b[0] for b in alone] == list(range(cubeload.Loader(pixel_cube).batches_per_epoch))
    assert batches(2) == alone


def test_a_loader_built_before_a_fork_raises_in_the_child_which_can_let_go_of_it(pixel_cube):
    loader = cubeload.Loader(pixel_cube, seed=1)
    next(loader)
    pid = os.fork()
    if pid == 0:
        try:
            next(loader)
            code = 1
        except cubeload.CubeloadError as e:
            code = 0 if "before a fork" in str(e) else 2
        except BaseException:
            code = 3
        # A DataLoader worker that replaces or deletes a dataset's loader made in the parent: the child has
        # none of its reader threads, so dropping it must not try to join them.
        try:
            del loader
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert next(loader)["t2m"].shape == (256, 168), "the parent's loader goes on"
    del loader  # and the parent's own drop joins its threads


def test_a_variable_named_like_a_batch_key_is_refused(demo_dir, tmp_path):
    text = (demo_dir / "demo.yaml").read_text()
    text = text.replace(str(demo_dir / "demo.zarr"), str(tmp_path / "mask.zarr"))
    text = re.sub(r"\n  ndvi:", "\n  mask:", text)
    config = tmp_path / "mask.yaml"
    config.write_text(text)
    run(cubeload_bin(), "gen", "-c", config)
    with pytest.raises(ValueError, match="variable `mask` has the name of a batch key"):
        cubeload.Loader(tmp_path / "mask.zarr")
    assert cubeload.Loader(tmp_path / "mask.zarr", ["t2m"]).variables == ["t2m"]


@pytest.mark.parametrize("layout", ["{ kind: pixel_series, batch: 256, window: 50 }",
                                    "{ kind: image_sequence, seq_len: 25, patch: [16, 16], batch: 4 }"])
@pytest.mark.parametrize("mix", [1, 3])
def test_steps_past_the_time_axis_are_missing_for_every_variable(demo_dir, tmp_path, layout, mix):
    # 168 steps in windows of 50 (or sequences of 25): the last one reaches past the axis. The static
    # landcover, repeated along time, is missing there as the time-varying variables are.
    text = (demo_dir / "demo.yaml").read_text().replace(str(demo_dir / "demo.zarr"), str(tmp_path / "w.zarr"))
    text = re.sub(r"layout: \{[^}]*\}", f"layout: {layout}", text)
    config = tmp_path / "w.yaml"
    config.write_text(text)
    run(cubeload_bin(), "gen", "-c", config)
    loader = cubeload.Loader(tmp_path / "w.zarr", seed=1, mix=mix)
    padded = 0
    for b in loader:
        steps = b["t2m"].shape[1]
        for s, t0 in enumerate(b["time_index"]):
            past = max(0, t0 + steps - 168)
            inside = steps - past
            mask = b["mask"][:, s]
            assert mask[:, inside:].sum() == 0, (b["chunk"], s, t0)
            assert (b["landcover"][s, inside:] == 0.0).all()
            assert mask[loader.variables.index("landcover"), :inside].any() or not b["mask"][:, s].any()
            padded += past > 0
    assert padded > 0


def test_a_dataset_state_resumes_its_epoch_with_the_workers_it_was_saved_with(pixel_cube):
    per_epoch = cubeload.Loader(pixel_cube).batches_per_epoch
    ds = CubeDataset(pixel_cube, seed=2, epoch=1)
    it = iter(ds)
    head = [next(it) for _ in range(3)]
    state = ds.state_dict()
    resumed = CubeDataset(pixel_cube, seed=2, state=state)
    rest = list(resumed)
    assert len(head) + len(rest) == per_epoch and all(b["epoch"] == 1 for b in rest)
    with pytest.raises(ValueError, match="saved by DataLoader worker 0 of 1"):
        list(DataLoader(CubeDataset(pixel_cube, seed=2, state=state), batch_size=None, num_workers=2))


def test_ranks_are_disjoint_and_equal(pixel_cube):
    total = cubeload.Loader(pixel_cube).batches_per_epoch
    shares = [[b["chunk"] for b in cubeload.Loader(pixel_cube, seed=5, rank=r, world_size=3)] for r in range(3)]
    assert all(len(s) == total // 3 for s in shares)
    flat = [c for s in shares for c in s]
    assert len(set(flat)) == len(flat) == total - total % 3


def test_dataloader_with_two_workers_sees_every_batch_once(pixel_cube):
    total = cubeload.Loader(pixel_cube).batches_per_epoch
    dataset = CubeDataset(str(pixel_cube), seed=11, threads=1)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=None, num_workers=2)
        chunks = []
        for batch in loader:
            assert isinstance(batch["t2m"], torch.Tensor) and batch["t2m"].shape == (256, 168)
            assert batch["epoch"] == epoch
            chunks.append(tuple(batch["chunk"]))
        assert len(chunks) == len(set(chunks)) == total


def test_set_epoch_reaches_persistent_workers(pixel_cube):
    total = cubeload.Loader(pixel_cube).batches_per_epoch
    dataset = CubeDataset(str(pixel_cube), seed=11, threads=1)
    loader = DataLoader(dataset, batch_size=None, num_workers=2, persistent_workers=True)
    orders = []
    for epoch in (0, 1, 2):
        dataset.set_epoch(epoch)
        batches = list(loader)
        assert {b["epoch"] for b in batches} == {epoch}
        chunks = sorted(tuple(b["chunk"]) for b in batches)
        assert len(chunks) == len(set(chunks)) == total
        expected = sorted(tuple(b["chunk"]) for b in cubeload.Loader(pixel_cube, seed=11, epochs=epoch + 1) if b["epoch"] == epoch)
        assert chunks == expected
        orders.append([b["position"] for b in batches])
    # A state loaded once the workers run cannot reach them: an error, not the whole epoch again.
    dataset.load_state_dict(dict(seed=11, shuffle=True, epoch=2, cursor=3, rank=0, world_size=1, mix=1))
    with pytest.raises(RuntimeError, match="before the DataLoader's first iteration"):
        list(loader)


def test_a_state_loaded_after_persistent_workers_started_on_another_is_refused(pixel_cube):
    first = cubeload.Loader(pixel_cube, seed=1)
    per_epoch = first.batches_per_epoch
    for _ in range(10):
        next(first)
    early = first.state()
    for _ in range(20):
        next(first)
    later = first.state()
    dataset = CubeDataset(str(pixel_cube), state=early)
    loader = DataLoader(dataset, batch_size=None, num_workers=1, persistent_workers=True)
    assert len(list(loader)) == per_epoch - 10
    # The worker still holds the first state: resuming it again would deliver 20 batches twice.
    dataset.load_state_dict(later)
    with pytest.raises(RuntimeError, match="before the DataLoader's first iteration"):
        list(loader)


def test_a_resumed_dataset_keeps_its_runs_variables_and_min_valid_in_later_epochs(pixel_cube):
    run = CubeDataset(str(pixel_cube), ["ndvi"], seed=3, min_valid=0.96)
    per_epoch = len(run)
    assert per_epoch < len(CubeDataset(str(pixel_cube))), "0.96 of NDVI's cells leaves some batches out"
    it = iter(run)
    head = [next(it) for _ in range(3)]
    resumed = CubeDataset(str(pixel_cube), state=run.state_dict())
    assert len(resumed) == per_epoch
    rest = list(resumed)
    assert len(head) + len(rest) == per_epoch
    resumed.set_epoch(1)
    later = list(resumed)
    assert len(later) == per_epoch
    assert all("ndvi" in b and "t2m" not in b and "landcover" not in b for b in rest + later)


def test_workers_started_by_spawn_read_the_share_of_the_rank_that_started_them(pixel_cube, monkeypatch):
    # A spawned worker starts a new interpreter, outside the process group: the rank is the parent's.
    import cubeload.torch as cubeload_torch

    # Pickled before there is a process group (as torch.multiprocessing.spawn(main, args=(dataset,)) does),
    # a dataset keeps looking the rank up where it is unpickled, rather than freezing rank 0 of 1.
    early = pickle.loads(pickle.dumps(CubeDataset(str(pixel_cube), seed=2)))
    assert (early.rank, early.world_size) == (None, None)
    monkeypatch.setattr(cubeload_torch.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(cubeload_torch.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(cubeload_torch.dist, "get_world_size", lambda: 2)
    dataset = CubeDataset(str(pixel_cube), seed=2, threads=1)
    loader = DataLoader(dataset, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    chunks = [tuple(b["chunk"]) for b in loader]
    expected = [tuple(b["chunk"]) for b in cubeload.Loader(pixel_cube, seed=2, rank=1, world_size=2)]
    assert chunks == expected and len(chunks) == len(dataset)
    assert early._share()[:2] == (1, 2)


def test_distributed_ranks_times_workers(pixel_cube):
    total = cubeload.Loader(pixel_cube).batches_per_epoch
    seen = []
    for rank in range(2):
        loader = DataLoader(CubeDataset(str(pixel_cube), seed=2, rank=rank, world_size=2), batch_size=None, num_workers=2)
        mine = [tuple(b["chunk"]) for b in loader]
        assert len(mine) == total // 2 == len(loader), "len() of the DataLoader says what an epoch delivers"
        sparse = CubeDataset(str(pixel_cube), rank=rank, world_size=2, min_valid=0.98)
        assert len(sparse) == len(list(DataLoader(sparse, batch_size=None, num_workers=2))) < total // 2
        seen += mine
    assert len(set(seen)) == len(seen) == total - total % 2


def test_arrays_are_views_of_one_rust_buffer_without_copies(pixel_cube):
    b = next(cubeload.Loader(pixel_cube, shuffle=False))
    t2m, ndvi = b["t2m"], b["ndvi"]
    assert not t2m.flags.owndata and not ndvi.flags.owndata
    assert t2m.base is not None and t2m.base is ndvi.base, "both are views of the same [V, B, T] array"
    assert ndvi.ctypes.data - t2m.ctypes.data == t2m.nbytes, "variable-major: ndvi right after t2m"
    owner = t2m.base
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    assert not isinstance(owner, np.ndarray), f"memory owned by the Rust buffer, got {type(owner)}"
    tensor = torch.from_numpy(t2m)
    assert tensor.data_ptr() == t2m.ctypes.data, "torch shares the array"


FREED_BATCH_SCRIPT = """
import sys
import cubeload, torch
loader = cubeload.Loader(sys.argv[1], seed=4, threads=0)
first = next(loader)
size = sum(first[v].nbytes for v in loader.variables) + first["mask"].nbytes
assert cubeload.kept_buffer_bytes() == 0
held = torch.from_numpy(first["ndvi"])
at = held.data_ptr()
del first
assert cubeload.kept_buffer_bytes() == 0, "a tensor still shares the buffer"
del held
assert cubeload.kept_buffer_bytes() == size, (cubeload.kept_buffer_bytes(), size)
second = next(loader)
assert cubeload.kept_buffer_bytes() == 0, "the next batch was made in the buffers given back"
assert second["ndvi"].ctypes.data == at
print("ok")
"""


def test_a_batch_freed_by_numpy_gives_its_buffers_to_the_next_batch(pixel_cube):
    """When numpy frees a batch's last array (here after a torch tensor sharing it), its values and mask go
    back to the loaders, which make the next batch in them. In a child process, whose store starts empty."""
    out = subprocess.run([sys.executable, "-c", FREED_BATCH_SCRIPT, str(pixel_cube)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_errors_are_python_exceptions(pixel_cube, tmp_path):
    with pytest.raises(cubeload.CubeError, match="no such cube"):
        cubeload.Loader(tmp_path / "nothing.zarr")
    with pytest.raises(cubeload.UnknownVariableError, match="precip"):
        cubeload.Loader(pixel_cube, ["t2m", "precip"])
    with pytest.raises(ValueError, match="rank"):
        cubeload.Loader(pixel_cube, rank=2, world_size=2)
    # Options that would deliver nothing, or the same variable twice, silently.
    for options, says in (
        (dict(variables=[]), "asks for no variable"),
        (dict(variables=["t2m", "t2m"]), "asked twice"),
        (dict(min_valid=float("nan")), "0 to 1"),
        (dict(min_valid=2.0), "0 to 1"),
        (dict(world_size=1000), "fewer than the ranks"),
    ):
        with pytest.raises(ValueError, match=says):
            cubeload.Loader(pixel_cube, **options)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(pixel_cube, copy)
    for chunk in (copy / "ndvi" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"\xa5" * chunk.stat().st_size)
    with pytest.raises(cubeload.CorruptChunkError, match="ndvi"):
        next(cubeload.Loader(copy))
    assert issubclass(cubeload.CorruptChunkError, cubeload.CubeloadError)


def test_bad_arguments_and_state_values_are_named(pixel_cube):
    """A negative count or a value of the wrong type, as an argument or in a state, is named in the error
    (Python's own conversion errors name neither a dict's key nor a negative count's argument)."""
    for options, error, says in (
        (dict(seed=-1), ValueError, "seed=-1"),
        (dict(epochs=-1), ValueError, "epochs=-1"),
        (dict(rank=-1, world_size=2), ValueError, "rank=-1"),
        (dict(threads="2"), TypeError, "threads='2'"),
        (dict(mix=1.5), TypeError, "mix=1.5"),
    ):
        with pytest.raises(error, match=re.escape(says)):
            cubeload.Loader(pixel_cube, **options)
    state = json.loads(json.dumps(cubeload.Loader(pixel_cube, seed=1, epochs=2).state()))
    for key, value, error in (
        ("cursor", "x", TypeError),
        ("cursor", -1, ValueError),
        ("epoch", None, TypeError),
        ("digest", float(state["digest"]), TypeError),
        ("variables", "t2m", TypeError),
        ("epochs", -2, ValueError),
        ("min_valid", "high", TypeError),
    ):
        with pytest.raises(error, match=re.escape(f'state["{key}"]=')):
            cubeload.Loader(pixel_cube, state={**state, key: value})
    # The state as saved still resumes.
    assert len(list(cubeload.Loader(pixel_cube, state=state))) == 2 * cubeload.Loader(pixel_cube).batches_per_epoch



def test_a_fill_value_beyond_float32_is_refused(pixel_cube):
    """Batches are float32: a finite fill beyond its range became inf without a word. NaN and inf, given as
    such, are taken and written where data is missing."""
    with pytest.raises(ValueError, match=re.escape("fill_value 1e39")):
        cubeload.Loader(pixel_cube, fill_value=1e39)
    for fill in (float("nan"), float("-inf"), 3.0e38):
        filled = [b["ndvi"][~b["mask"][0]] for b in cubeload.Loader(pixel_cube, ["ndvi"], fill_value=fill)]
        got = np.concatenate(filled)
        assert got.size > 0, "the demo's cloud gaps"
        assert (np.isnan(got).all() if np.isnan(fill) else (got == np.float32(fill)).all()), fill


def test_bad_dataset_arguments_are_named_when_the_dataset_is_built(pixel_cube):
    """A variable's name alone, a rank without a world size (it was dropped for torch.distributed's: every
    rank read the whole epoch), bad counts and a state lacking keys are refused by the constructor, naming
    the argument, not at the first iteration in a worker as keys of a state the user never gave."""
    for args, options, error, says in (
        (("t2m",), {}, TypeError, "variables='t2m' is one string"),
        ((), dict(rank=1), ValueError, "rank=1, world_size=None: give both"),
        ((), dict(world_size=2), ValueError, "rank=None, world_size=2: give both"),
        ((), dict(rank=-1, world_size=2), ValueError, "rank=-1:"),
        ((), dict(rank=2, world_size=2), ValueError, "rank=2 of world_size=2"),
        ((), dict(rank=0, world_size=0), ValueError, "world_size=0:"),
        ((), dict(epoch=-1), ValueError, "epoch=-1:"),
        ((), dict(epoch=1.5), TypeError, "epoch=1.5:"),
        ((), dict(state={"seed": 1}), ValueError, "state lacks shuffle, epoch, cursor, rank, world_size"),
    ):
        with pytest.raises(error, match=re.escape(says)):
            CubeDataset(pixel_cube, *args, **options)
    with pytest.raises(TypeError, match=re.escape("variables='t2m' is one string")):
        cubeload.Loader(pixel_cube, "t2m")
    with pytest.raises(ValueError, match=re.escape("epoch=-2:")):
        CubeDataset(pixel_cube).set_epoch(-2)
    dataset = CubeDataset(pixel_cube, ["t2m"], rank=1, world_size=2)
    assert len(dataset) == len(list(dataset)) == cubeload.Loader(pixel_cube).batches_per_epoch // 2


def test_a_dataset_read_by_workers_has_no_state_of_the_main_process(pixel_cube):
    """After an epoch read by DataLoader workers, the main process's state would be that of an older epoch it
    read itself (or None): asking for it is an error; after an epoch read in the process, it is the state."""
    dataset = CubeDataset(pixel_cube, seed=3, threads=1)
    first = next(iter(dataset))
    assert dataset.state_dict()["cursor"] == 1 and first["epoch"] == 0
    dataset.set_epoch(1)
    assert len(list(DataLoader(dataset, batch_size=None, num_workers=1))) == len(dataset)
    with pytest.raises(RuntimeError, match="read by DataLoader workers"):
        dataset.state_dict()
    dataset.set_epoch(2)
    next(iter(dataset))
    assert (dataset.state_dict()["epoch"], dataset.state_dict()["cursor"]) == (2, 1)

THREADS_REFUSED_SCRIPT = """
import os, resource, sys, cubeload
threads = lambda: len(os.listdir("/proc/self/task"))
# A loader built and dropped first: the threads of the process's pools that outlive loaders are counted.
next(cubeload.Loader(sys.argv[1], threads=2))
before = threads()
# Address space for a few hundred more thread stacks, not ten thousand.
with open("/proc/self/status") as status:
    size = next(int(l.split()[1]) for l in status if l.startswith("VmSize")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.RLIM_INFINITY))
try:
    cubeload.Loader(sys.argv[1], threads=10_000, epochs=1000)  # jobs for every thread
except cubeload.CubeloadError as e:
    assert "cannot start the loader's threads" in str(e), e
    assert threads() == before, (before, threads())
    print("ok")
"""


@pytest.fixture
def keyboard_interrupt():
    """SIGINT raising KeyboardInterrupt, as in a terminal: a process started in the background inherits SIGINT
    ignored, and Python then leaves it ignored (the test would wait forever)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_interrupts_the_wait_for_a_batch_a_stalled_store_keeps_back(pixel_cube, tmp_path, keyboard_interrupt):
    cube = tmp_path / "stalled.zarr"
    shutil.copytree(pixel_cube, cube)
    # t2m's chunk files become named pipes nobody writes to: a reader opening one waits, as on a stalled
    # object store, and the Python thread waits for its batch.
    pipes = [p for p in (cube / "t2m" / "c").rglob("*") if p.is_file()]
    assert pipes
    for p in pipes:
        p.unlink()
        os.mkfifo(p)
    loader = cubeload.Loader(cube, threads=1, seed=0)
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        next(loader)
    assert time.monotonic() - started < 5, "the interrupt waited for the store"

    # Let the reader go (each pipe opened for writing and closed: its chunk reads short, an error) so that
    # the loader can be dropped; from another process, since dropping a loader holds the GIL.
    release = (
        "import os, sys, time\n"
        "while True:\n"
        "    for p in sys.argv[1:]:\n"
        "        try: os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))\n"
        "        except OSError: pass\n"
        "    time.sleep(0.01)\n"
    )
    releaser = subprocess.Popen([sys.executable, "-c", release, *map(str, pipes)])
    try:
        with pytest.raises(cubeload.CorruptChunkError, match="t2m"):
            next(loader)
        del loader
    finally:
        releaser.kill()
        releaser.wait()


@pytest.mark.parametrize("threads", [0, 1])
def test_a_ctrl_c_caught_loses_no_batch(pixel_cube, threads, keyboard_interrupt):
    # A training loop that catches KeyboardInterrupt (to save a checkpoint, say) and goes on. Each SIGINT
    # comes within 2 ms of the call to next(), often while the batch is read (threads=0) or awaited: the
    # batch is kept for the next call and state() stays before it; Python raised the interrupt as the call
    # returned, losing a batch the state counted as delivered.
    import random

    loader = cubeload.Loader(pixel_cube, ["t2m", "ndvi"], seed=3, epochs=2, threads=threads, prefetch=1)
    n = loader.batches_per_epoch
    entering, done = threading.Event(), threading.Event()
    rng = random.Random(0)

    def fire():
        while True:
            entering.wait()
            entering.clear()
            if done.is_set():
                return
            time.sleep(rng.uniform(0, 0.002))
            os.kill(os.getpid(), signal.SIGINT)

    firing = threading.Thread(target=fire)
    firing.start()
    got, interrupts = [], 0
    try:
        while True:
            try:
                entering.set()
                batch = next(loader)
                got.append((int(batch["epoch"]), int(batch["position"])))
                # The interrupt, if it has not come yet, comes here, inside the try.
                time.sleep(0.05)
            except KeyboardInterrupt:
                interrupts += 1
                state = loader.state()
                assert state["epoch"] * n + state["cursor"] == len(got), (state, len(got))
            except StopIteration:
                break
        # The SIGINT sent for the last call comes within 2 ms: taken here.
        try:
            time.sleep(0.05)
        except KeyboardInterrupt:
            pass
    finally:
        done.set()
        entering.set()
        firing.join()
    assert interrupts >= n, interrupts
    assert got == [(e, p) for e in range(2) for p in range(n)], [k for k in range(len(got)) if got[k] != got[k - 1]]


STALLED_EXIT_SCRIPT = """
import os, signal, sys, threading, time
import cubeload
signal.signal(signal.SIGINT, signal.default_int_handler)
loader = cubeload.Loader(sys.argv[1], threads=1, seed=0)
threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    next(loader)
except KeyboardInterrupt:
    pass
started = time.monotonic()
del loader
print(f"dropped {time.monotonic() - started:.2f}", flush=True)
"""


def test_after_ctrl_c_a_loader_stalled_on_its_store_is_dropped_and_the_process_exits(pixel_cube, tmp_path):
    # As above, a store that never answers; nobody releases it here. Dropping the loader (its reader still
    # waiting) and the interpreter's exit must not wait for the store.
    cube = tmp_path / "stalled.zarr"
    shutil.copytree(pixel_cube, cube)
    for p in [p for p in (cube / "t2m" / "c").rglob("*") if p.is_file()]:
        p.unlink()
        os.mkfifo(p)
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", STALLED_EXIT_SCRIPT, str(cube)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    dropped = float(out.stdout.split()[-1])
    assert dropped < 10, f"dropping the loader took {dropped} s"
    assert time.monotonic() - started < 60


def test_threads_the_system_will_not_start_are_an_error_and_leave_none_running(pixel_cube):
    out = subprocess.run(
        [sys.executable, "-c", THREADS_REFUSED_SCRIPT, str(pixel_cube)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_flipped_byte_raises_or_is_skipped_and_counted(pixel_cube, tmp_path):
    copy = tmp_path / "flipped.zarr"
    shutil.copytree(pixel_cube, copy)
    first = sorted(p for p in (copy / "ndvi" / "c").rglob("*") if p.is_file())[0]
    data = bytearray(first.read_bytes())
    data[0] ^= 0x01  # one bit of the first stored chunk of a shard: its checksum no longer matches
    first.write_bytes(bytes(data))
    reference = {b["chunk"]: hash(b["ndvi"].tobytes()) for b in cubeload.Loader(pixel_cube, shuffle=False)}
    with pytest.raises(cubeload.CorruptChunkError, match=r"`ndvi`, chunk \[\d+, \d+, \d+\]"):
        list(cubeload.Loader(copy, shuffle=False))
    with pytest.raises(ValueError, match="on_corrupt"):
        cubeload.Loader(copy, on_corrupt="ignore")
    loader = cubeload.Loader(copy, shuffle=False, on_corrupt="skip")
    batches = {b["chunk"]: hash(b["ndvi"].tobytes()) for b in loader}
    assert loader.corrupt_chunks == 1
    assert len(batches) == len(reference) - 1
    assert all(reference[chunk] == h for chunk, h in batches.items()), "the others as in the intact cube"
    dataset = CubeDataset(str(copy), shuffle=False, on_corrupt="skip")
    assert len(list(DataLoader(dataset, batch_size=None, num_workers=0))) == len(reference) - 1
    # In a DataLoader worker, the error reaches the training loop as itself (pickled across the processes),
    # rather than ending the epoch early.
    failing = DataLoader(CubeDataset(str(copy), shuffle=False), batch_size=None, num_workers=2)
    with pytest.raises(cubeload.CorruptChunkError, match=r"`ndvi`, chunk \[\d+, \d+, \d+\]"):
        list(failing)
    error = cubeload.CorruptChunkError("a message")
    assert type(pickle.loads(pickle.dumps(error))) is cubeload.CorruptChunkError


def test_example_training_loss_falls(pixel_cube):
    import re
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "train_lstm.py"
    out = subprocess.run([sys.executable, example, str(pixel_cube), "--epochs", "3"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    losses = [float(v) for v in re.findall(r"epoch \d+ loss ([0-9.]+)", out.stdout)]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0], out.stdout


def test_example_refuses_an_image_sequence_cube(image_cube):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "train_lstm.py"
    out = subprocess.run([sys.executable, example, str(image_cube), "--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "layout is image_sequence" in out.stderr, out.stderr


def test_multiresolution_regrid_target_and_native(multires_cube):
    """The demo inputs with t2m kept at its native 0.25° (a 25 × 25 level, bilinear): the loader's target
    batches equal xarray's linear interpolation of the level between cell centres, and native batches carry
    the level cells under each batch."""
    cube = multires_cube
    level = xr.open_zarr(cube, group="coarse_25").t2m.load()
    root = xr.open_zarr(cube)
    # xarray's own bilinear interpolation between the level's cell centres (NaN outside their hull).
    reference = level.interp(lat=root.lat, lon=root.lon, method="linear")
    lat_index = {round(v, 9): i for i, v in enumerate(root.lat.values)}
    lon_index = {round(v, 9): i for i, v in enumerate(root.lon.values)}
    compared = 0
    for batch in cubeload.Loader(cube, ["t2m"], shuffle=False):
        rows = [lat_index[round(v, 9)] for v in batch["lat"]]
        cols = [lon_index[round(v, 9)] for v in batch["lon"]]
        expected = reference.values[:, rows, cols].T  # [B, T]
        inside = ~np.isnan(expected)
        np.testing.assert_allclose(batch["t2m"][inside], expected[inside], rtol=1e-5)
        compared += int(inside.sum())
    # Every target cell between the level's outer centres (edge cells are held, not interpolated, there
    # xarray gives NaN) was compared once.
    assert compared == int((~np.isnan(reference.values)).sum()) > 0.6 * 168 * 100 * 150

    native = next(iter(cubeload.Loader(cube, shuffle=False, regrid="native")))
    field = native["native"]["t2m"]
    assert "t2m" not in native and field["factor"] == (25, 25)
    r, c = field["origin"]
    t, h, w = field["data"].shape
    np.testing.assert_array_equal(field["data"], level.values[:t, r : r + h, c : c + w])
    assert field["mask"].all()


def test_a_state_resumes_native_variables(multires_cube):
    """A state of a loader delivering t2m at its native resolution names it among its variables, so that a
    resume delivers it too, also when it is the only variable (which leaves the batch's `V` axis empty)."""
    def fields(batches):
        return [
            (b["chunk"], sorted(b), {k: f["data"].tobytes() for k, f in b.get("native", {}).items()})
            for b in batches
        ]

    for variables in (None, ["t2m"]):
        full = fields(cubeload.Loader(multires_cube, variables, seed=7, epochs=2, regrid="native"))
        assert all("t2m" in native for _, _, native in full)
        first = cubeload.Loader(multires_cube, variables, seed=7, epochs=2, regrid="native")
        head = fields(next(first) for _ in range(5))
        state = json.loads(json.dumps(first.state()))
        assert "t2m" in state["variables"] and "t2m" not in first.variables
        resumed = cubeload.Loader(multires_cube, state=state, regrid="native")
        assert head + fields(resumed) == full
        dataset = CubeDataset(multires_cube, variables, seed=7, regrid="native")
        batches = iter(dataset)
        next(batches)
        saved = dataset.state_dict()
        expected = next(batches)
        again = CubeDataset(multires_cube, variables, regrid="native")
        again.load_state_dict(saved)
        got = next(iter(again))
        assert got["chunk"] == expected["chunk"]
        assert torch.equal(got["native"]["t2m"]["data"], expected["native"]["t2m"]["data"])
