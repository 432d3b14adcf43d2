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


def start_moto(log) -> tuple[subprocess.Popen, dict]:
    """A moto S3 server with a bucket `cubes`, its requests logged to the open file `log`, and the AWS
    environment that reaches it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                server.kill()
                pytest.fail("moto's S3 server did not start", pytrace=False)
            time.sleep(0.1)
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/cubes", method="PUT")).close()
    return server, {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }


@pytest.fixture(scope="module")
def s3_env(moto_log):
    """A moto S3 server with a bucket `cubes`; yields the AWS environment that reaches it."""
    log = open(moto_log, "w")
    server, env = start_moto(log)
    try:
        yield env
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


def test_a_forked_process_reads_a_cube_its_parent_was_reading(demo_dir, pixel_cube, s3_env, monkeypatch):
    """A process forked while its parent reads an S3 cube (a DataLoader starting its workers after a first
    look at the data) reads it too: it inherits the parent's runtime for requests without its threads, and
    waited forever on its first request."""
    config = demo_dir / "s3-fork.yaml"
    config.write_text((demo_dir / "demo.yaml").read_text().replace(str(pixel_cube), "s3://cubes/py/fork.zarr"))
    env = {**os.environ, **s3_env, "TMPDIR": str(demo_dir)}
    out = subprocess.run([str(cubeload_bin()), "gen", "-c", str(config)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    url = "s3://cubes/py/fork.zarr"
    expected = [b["chunk"] for b in cubeload.Loader(url, seed=2)]
    reading = cubeload.Loader(url, seed=1)
    next(reading)
    pid = os.fork()
    if pid == 0:
        try:
            chunks = [b["chunk"] for b in cubeload.Loader(url, seed=2)]
            os._exit(0 if chunks == expected else 3)
        except BaseException:
            os._exit(4)
    deadline = time.time() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.time() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked process waited forever on its first request")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert len(list(reading)) == len(expected) - 1, "the parent reads on"


def test_a_store_that_stops_answering_is_an_error_not_chunks_to_skip(demo_dir, pixel_cube, monkeypatch):
    """An object store gone out of reach mid-epoch (here its server killed) fails the loader, with
    on_corrupt="skip" too: before, each batch was retried, counted as corrupt and skipped, an epoch of
    nothing without an error."""
    server, env = start_moto(subprocess.DEVNULL)
    try:
        config = demo_dir / "s3-outage.yaml"
        text = (demo_dir / "demo.yaml").read_text().replace(str(pixel_cube), "s3://cubes/py/outage.zarr")
        config.write_text(text)
        run_env = {**os.environ, **env, "TMPDIR": str(demo_dir)}
        out = subprocess.run([str(cubeload_bin()), "gen", "-c", str(config)], capture_output=True, text=True,
                             env=run_env)
        assert out.returncode == 0, out.stderr
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        loader = cubeload.Loader("s3://cubes/py/outage.zarr", seed=1, threads=1, fetchers=1, prefetch=1,
                                 on_corrupt="skip")
        next(loader)
        server.kill()
        server.wait()
        started = time.time()
        with pytest.raises(cubeload.CubeloadError, match="the store does not answer") as raised:
            for _ in loader:
                pass
        assert not isinstance(raised.value, cubeload.CorruptChunkError)
        assert loader.corrupt_chunks == 0 and time.time() - started < 300
    finally:
        server.kill()
        server.wait()


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


@pytest.mark.parametrize("on_corrupt", ["error", "skip"])
def test_a_loader_reading_a_cube_gen_replaces_delivers_none_of_the_new_cube(
    demo_dir, pixel_cube, s3_env, monkeypatch, on_corrupt
):
    """An object store cannot hold a cube still under a loader as a directory held open does: a loader that
    opened the cube reads none of the objects of the cube `gen --overwrite` puts in its place (it read them
    under the old metadata), and says that the cube was replaced, skipping corrupt chunks or not."""
    url = f"s3://cubes/py/replaced-{on_corrupt}.zarr"
    text = (demo_dir / "demo.yaml").read_text().replace(str(pixel_cube), url)
    first, second = demo_dir / f"replaced-{on_corrupt}-1.yaml", demo_dir / f"replaced-{on_corrupt}-2.yaml"
    first.write_text(text)
    # The cube that replaces it: t2m resampled otherwise, so that its values differ.
    second.write_text(text.replace("t2m_hourly.nc, variable: t2m, resampling: bilinear", "t2m_hourly.nc, variable: t2m, resampling: nearest"))
    assert second.read_text() != text
    env = {**os.environ, **s3_env, "TMPDIR": str(demo_dir)}
    for args in (["-c", str(first)], ["--overwrite", "-c", str(second)]):
        if args[0] == "--overwrite":
            loader = cubeload.Loader(url, seed=5, threads=1, fetchers=1, prefetch=2, on_corrupt=on_corrupt)
            got = [next(loader) for _ in range(3)]
        out = subprocess.run([str(cubeload_bin()), "gen", *args], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        if args[0] == "-c":
            for key, value in s3_env.items():
                monkeypatch.setenv(key, value)
            old = list(cubeload.Loader(url, seed=5))
    with pytest.raises(cubeload.CubeloadError, match="deleted or replaced while this loader read it"):
        for batch in loader:
            got.append(batch)
    assert 3 <= len(got) < len(old)
    new = list(cubeload.Loader(url, seed=5))
    assert any(not np.array_equal(n["t2m"], o["t2m"], equal_nan=True) for n, o in zip(new, old)), "the cubes differ"
    for g, o in zip(got, old):
        assert g["chunk"] == o["chunk"]
        for name in ["t2m", "ndvi", "landcover", "mask"]:
            np.testing.assert_array_equal(g[name], o[name])
