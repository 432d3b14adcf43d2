"""A cube whose generation did not finish is refused, with the way to resume it."""

import json
import shutil

import pytest

import cubeload


def test_an_incomplete_cube_is_refused_with_how_to_resume(pixel_cube, tmp_path):
    half = tmp_path / "half.zarr"
    shutil.copytree(pixel_cube, half)
    root = half / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["cubeload"]["complete"] = False
    root.write_text(json.dumps(meta))
    with pytest.raises(cubeload.CubeError, match="incomplete cube.*resume"):
        cubeload.Loader(half)
    # The untouched original still opens.
    assert cubeload.Loader(pixel_cube).batches_per_epoch > 0
