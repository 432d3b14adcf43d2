"""Fixtures: demo cubes made by the cubeload binary (pixel_series and image_sequence), once per session."""

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def cubeload_bin() -> Path:
    path = Path(os.environ.get("CUBELOAD_BIN", REPO / "target" / "debug" / "cubeload"))
    if not path.is_file():
        pytest.fail(f"cubeload binary not found at {path}: run cargo build or set CUBELOAD_BIN", pytrace=False)
    return path


def run(*args, cwd=None):
    out = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        pytest.fail(f"{args} failed:\n{out.stderr}\n{out.stdout}", pytrace=False)
    return out


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """`cubeload demo` without training: inputs, demo.yaml and the pixel_series cube demo.zarr."""
    work = tmp_path_factory.mktemp("demo")
    run(cubeload_bin(), "demo", "--dir", work, "--epochs", "0")
    return work


@pytest.fixture(scope="session")
def pixel_cube(demo_dir) -> Path:
    return demo_dir / "demo.zarr"


@pytest.fixture(scope="session")
def multires_cube(demo_dir) -> Path:
    """The demo inputs in a multi-resolution cube: t2m kept at its native 0.25° (bilinear upsampling)."""
    text = (demo_dir / "demo.yaml").read_text().replace("demo.zarr", "multires.zarr")
    text = re.sub(r"layout: \{[^}]*\}", "layout: { kind: pixel_series, batch: 256, multires: true }", text)
    text = text.replace("resampling: bilinear, units: K }", "resampling: bilinear, units: K, resolution: 0.25 }")
    assert "resolution: 0.25 }" in text, "the demo config changed"
    config = demo_dir / "multires.yaml"
    config.write_text(text)
    run(cubeload_bin(), "gen", "-c", config, "--overwrite")
    return demo_dir / "multires.zarr"


@pytest.fixture(scope="session")
def image_cube(demo_dir) -> Path:
    text = (demo_dir / "demo.yaml").read_text()
    text = text.replace("demo.zarr", "image.zarr")
    text = re.sub(r"layout: \{[^}]*\}", "layout: { kind: image_sequence, seq_len: 8, patch: [16, 16], batch: 4 }", text)
    config = demo_dir / "image.yaml"
    config.write_text(text)
    run(cubeload_bin(), "gen", "-c", config, "--overwrite")
    return demo_dir / "image.zarr"


@pytest.fixture(scope="session")
def two_statics_cube(demo_dir) -> Path:
    """The demo cube with a second static variable: the land cover again, as `landcover2`."""
    text = (demo_dir / "demo.yaml").read_text().replace("demo.zarr", "two_statics.zarr")
    line = next(l for l in text.splitlines() if l.strip().startswith("landcover:"))
    text = text.replace(line, line + "\n" + line.replace("landcover:", "landcover2:"))
    config = demo_dir / "two_statics.yaml"
    config.write_text(text)
    run(cubeload_bin(), "gen", "-c", config, "--overwrite")
    return demo_dir / "two_statics.zarr"
