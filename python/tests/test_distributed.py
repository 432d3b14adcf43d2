"""examples/train_ddp.py under torchrun (2 processes, gloo on CPU): disjoint, equal shares per rank, and a
restarted job that trains on exactly the batches an uninterrupted one does."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cubeload

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 2


def torchrun(cube: Path, log: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "examples" / "train_ddp.py"), str(cube), "--epochs", str(EPOCHS), "--seed", "11",
               "--steps-log", str(log), *extra]
    log.mkdir(parents=True, exist_ok=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def succeeded(run: subprocess.CompletedProcess) -> bool:
    assert run.returncode == 0, run.stderr[-3000:]
    return True


def records(log: Path, rank: int) -> tuple[list[tuple], dict | None]:
    """(epoch, position, chunk, step) of every step of a rank, and its final line."""
    lines = [json.loads(line) for line in (log / f"rank{rank}.jsonl").read_text().splitlines()]
    steps = [(r["epoch"], r["position"], tuple(r["chunk"]), r["step"]) for r in lines if "step" in r]
    finals = [r for r in lines if "final" in r]
    return steps, finals[-1] if finals else None


def test_ranks_get_disjoint_equal_shares_and_a_restart_resumes_exactly(pixel_cube, tmp_path):
    per_epoch = cubeload.Loader(pixel_cube).batches_per_epoch
    uninterrupted = torchrun(pixel_cube, tmp_path / "full")
    assert succeeded(uninterrupted)
    # Rank 0 says each epoch's loss, once.
    assert re.findall(r"epoch (\d+) loss [0-9.]+", uninterrupted.stdout) == [str(e) for e in range(EPOCHS)]
    full = [records(tmp_path / "full", rank) for rank in range(2)]
    for epoch in range(EPOCHS):
        shares = [[chunk for e, _, chunk, _ in steps if e == epoch] for steps, _ in full]
        assert len(shares[0]) == len(shares[1]) == per_epoch // 2
        assert not set(shares[0]) & set(shares[1]), "a batch went to both ranks"
        assert len(set(shares[0])) == len(shares[0])

    # Killed right after the checkpoint of step 7 (mid-epoch), and three steps after it, then started again
    # from it: the steps after the checkpoint are trained again, on the same batches.
    for stop in (7, 10):
        run = tmp_path / f"restarted-{stop}"
        ckpt = ["--checkpoint", str(run / "ckpt"), "--every", "7"]
        killed = torchrun(pixel_cube, run, *ckpt, "--stop-after", str(stop))
        assert killed.returncode != 0
        for rank in range(2):
            steps, final = records(run, rank)
            assert [s[3] for s in steps] == list(range(1, stop + 1)) and final is None
        assert succeeded(torchrun(pixel_cube, run, *ckpt))
        for rank in range(2):
            steps, final = records(run, rank)
            full_steps, full_final = full[rank]
            assert [s[3] for s in steps[stop:]] == list(range(8, len(full_steps) + 1))
            # The last record of each step: the steps redone after the restart replace the killed run's.
            assert sorted({s[3]: s for s in steps}.values(), key=lambda s: s[3]) == full_steps, (
                f"rank {rank}: the restarted job's batches differ"
            )
            assert steps[:stop] == full_steps[:stop]
            # Same batches, same order, same optimizer state: the same weights at the end.
            assert final["steps"] == full_final["steps"]
            for a, b in zip(final["final"], full_final["final"]):
                assert abs(a - b) < 1e-6, (final, full_final)
