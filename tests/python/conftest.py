"""Fixtures for the xarray suite: the cubeload binary, the shared real data, and cube generation.

The binary comes from `CUBELOAD_BIN` (default `<repo>/target/debug/cubeload`), the real test rasters from
`<repo>/../shared/data` (CI has `shared/` beside the checkout). Every test writes its own YAML config into
pytest's `tmp_path` and runs `cubeload gen` on it.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(args, cwd, env=None):
    """Runs a program with `env` added to the environment; fails the test with its stderr and stdout
    when it does not exit with 0."""
    args = [str(a) for a in args]
    out = subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )
    if out.returncode != 0:
        pytest.fail(
            f"`{' '.join(args)}` failed with exit code {out.returncode}\n"
            f"--- stderr ---\n{out.stderr}\n--- stdout ---\n{out.stdout}",
            pytrace=False,
        )
    return out


def yaml_str(value) -> str:
    """A path or string as a YAML scalar (a JSON string is a valid double-quoted YAML scalar)."""
    return json.dumps(str(value))


@pytest.fixture(scope="session")
def cubeload_bin() -> Path:
    path = Path(os.environ.get("CUBELOAD_BIN", REPO / "target" / "debug" / "cubeload"))
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"cubeload binary not found at {path}: build it (cargo build) or set CUBELOAD_BIN",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = (REPO / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.fail(f"the real test data must be at {path} (see its README.md)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def run_tool():
    """`run_tool(args, cwd, env=None)`: runs a GDAL program (scripts/setup.sh installs gdal-bin) and fails
    the test with its stderr on error."""
    missing = [t for t in ("gdalwarp", "gdalinfo") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{missing} not on PATH: run scripts/setup.sh", pytrace=False)
    return _run


@pytest.fixture
def run_cubeload(cubeload_bin, tmp_path):
    """`run_cubeload(*args)`: runs the binary in `tmp_path`, failing the test with its stderr on error."""

    def run(*args):
        return _run([cubeload_bin, *args], tmp_path)

    return run


@pytest.fixture
def gen_cube(run_cubeload, tmp_path):
    """`gen_cube(body, name="cube")`: writes `output: <tmp_path>/<name>.zarr` plus `body` (YAML) to
    `tmp_path/<name>.yaml`, runs `cubeload gen -c`, and returns the cube's path."""

    def gen(body: str, name: str = "cube") -> Path:
        cube = tmp_path / f"{name}.zarr"
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"output: {yaml_str(cube)}\n{body}")
        run_cubeload("gen", "-c", config, "--overwrite")
        assert (cube / "zarr.json").is_file(), f"cubeload gen reported success but wrote no {cube}"
        return cube

    return gen
