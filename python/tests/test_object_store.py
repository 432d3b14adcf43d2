"""The loader on an S3-compatible object store: moto's real S3 server on loopback, a cube uploaded by
``cubeload gen``, and the same batches as from the local cube."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import cubeload

from conftest import cubeload_bin


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server with a bucket `cubes`; yields the AWS environment that reaches it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("moto's S3 server did not start", pytrace=False)
                time.sleep(0.1)
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/cubes", method="PUT")).close()
        yield {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
        }
    finally:
        server.terminate()
        server.wait()


def test_loader_reads_the_same_batches_from_s3(demo_dir, pixel_cube, s3_env, monkeypatch):
    config = demo_dir / "s3.yaml"
    config.write_text((demo_dir / "demo.yaml").read_text().replace(str(pixel_cube), "s3://cubes/py/demo.zarr"))
    assert "s3://cubes/py/demo.zarr" in config.read_text()
    env = {**os.environ, **s3_env, "TMPDIR": str(demo_dir)}
    out = subprocess.run([str(cubeload_bin()), "gen", "-c", str(config)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)

    remote = list(cubeload.Loader("s3://cubes/py/demo.zarr", seed=4, threads=8, prefetch=16))
    local = list(cubeload.Loader(pixel_cube, seed=4))
    assert len(remote) == len(local) > 0
    for r, l in zip(remote, local):
        assert r["chunk"] == l["chunk"]
        for name in ["t2m", "ndvi", "landcover", "mask"]:
            np.testing.assert_array_equal(r[name], l[name])

    with pytest.raises(cubeload.CubeError, match="no such cube"):
        cubeload.Loader("s3://cubes/py/missing.zarr")
