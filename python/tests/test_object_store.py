"""The loader on an S3-compatible object store: moto's real S3 server on loopback, a cube uploaded by
``cubeload gen``, and the same batches as from the local cube."""

import os
import re
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
def moto_log(tmp_path_factory):
    """The S3 server's log: a line per request, written before its answer."""
    return tmp_path_factory.mktemp("moto") / "requests.log"


def requests(log) -> dict:
    """Requests in `log` so far, by method."""
    counts = {}
    for line in log.read_text().splitlines():
        match = re.search(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) /', line)
        if match:
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


@pytest.fixture(scope="module")
def s3_env(moto_log):
    """A moto S3 server with a bucket `cubes`; yields the AWS environment that reaches it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(moto_log, "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=log,
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
        log.close()


def test_loader_reads_the_same_batches_from_s3(demo_dir, pixel_cube, s3_env, monkeypatch):
    config = demo_dir / "s3.yaml"
    config.write_text((demo_dir / "demo.yaml").read_text().replace(str(pixel_cube), "s3://cubes/py/demo.zarr"))
    assert "s3://cubes/py/demo.zarr" in config.read_text()
    env = {**os.environ, **s3_env, "TMPDIR": str(demo_dir)}
    out = subprocess.run([str(cubeload_bin()), "gen", "-c", str(config)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)

    local = list(cubeload.Loader(pixel_cube, seed=4))
    # The fetch threads, 32 by default, or one that waits on every request in turn.
    for fetchers in (None, 1):
        remote = list(cubeload.Loader("s3://cubes/py/demo.zarr", seed=4, threads=8, fetchers=fetchers, prefetch=16))
        assert len(remote) == len(local) > 0
        for r, l in zip(remote, local):
            assert r["chunk"] == l["chunk"]
            for name in ["t2m", "ndvi", "landcover", "mask"]:
                np.testing.assert_array_equal(r[name], l[name])

    with pytest.raises(cubeload.CubeError, match="no such cube"):
        cubeload.Loader("s3://cubes/py/missing.zarr")


def test_each_remote_read_is_one_request(demo_dir, pixel_cube, s3_env, moto_log, monkeypatch):
    """A chunk (or shard index) read is one ranged GET: no HEAD asks the object's size first (zarrs'
    object_store adapter sends one before every partial read, two round trips where one does)."""
    config = demo_dir / "s3-count.yaml"
    config.write_text((demo_dir / "demo.yaml").read_text().replace(str(pixel_cube), "s3://cubes/py/count.zarr"))
    env = {**os.environ, **s3_env, "TMPDIR": str(demo_dir)}
    out = subprocess.run([str(cubeload_bin()), "gen", "-c", str(config)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)

    loader = cubeload.Loader("s3://cubes/py/count.zarr", seed=4, threads=2, prefetch=16)
    built = requests(moto_log)
    batches = list(loader)
    loaded = requests(moto_log)
    assert len(batches) > 0
    assert loaded.get("HEAD", 0) == built.get("HEAD", 0)
    # About 2.4 GETs a batch on the demo cube (its chunks, and each shard's index once); 4.8 with a HEAD each.
    gets = loaded.get("GET", 0) - built.get("GET", 0)
    assert gets / len(batches) < 3, (gets, len(batches))
