"""Data-parallel training (benchmark/distributed.py): 2 ranks with gloo on CPU under torchrun train the
network that 1 process trains with the same global batch (to float rounding); only rank 0 writes; the
world size is in the effective recipe (so in the run id) and in the record's device column."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from ensemble_bench import distributed, runner
from ensemble_bench.resolve import make_run_config

ARGS = ["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "digits", "--epochs", "2",
        "--lr", "0.05", "--device", "cpu", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_splits_the_global_batch_and_weights_the_loss(monkeypatch):
    import torch

    x, y = torch.arange(5).view(5, 1), torch.arange(5)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    parts = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.shard(x, y))
    assert [p[1].tolist() for p in parts] == [[0, 1], [2, 3, 4]]
    assert [p[2] for p in parts] == pytest.approx([0.8, 1.2])   # rows x world / global rows: mean of the means
    ym = torch.arange(10).view(2, 5)      # member labels [M, B]: sharded along the batch
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.shard(x, ym)[1].tolist() == [[2, 3, 4], [7, 8, 9]]


def test_world_size_is_in_the_effective_recipe_and_run_id():
    base = dict(method="single", backbone="cnn_small", dataset="digits", epochs=1)
    one = make_run_config(dict(base))
    assert "world_size" not in one.effective_recipe          # 1-process run ids unchanged
    with distributed.assume_world_size(2):
        two = make_run_config(dict(base))
    assert two.effective_recipe["world_size"] == 2 and two.run_id() != one.run_id()


def test_two_gloo_ranks_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ensemble_bench", *ARGS, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "ensemble_bench", *ARGS,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    [r1] = [json.loads(p.read_text()) for p in (tmp_path / "one").glob("single-*.json")]
    [r2] = [json.loads(p.read_text()) for p in (tmp_path / "two").glob("single-*.json")]   # rank 0's only
    assert r1["run_id"] != r2["run_id"]
    assert r2["config"]["effective_recipe"]["world_size"] == 2
    t1, t2 = r1["training"], r2["training"]
    assert t2["world_size"] == 2 and t2["device"].startswith("2 x ") and t1["world_size"] == 1
    assert t2["samples_seen"] == t1["samples_seen"]           # the same global batches
    assert t2["train_device_s_total"] == pytest.approx(2 * t2["train_s"])
    for k in ("acc", "nll", "ece", "brier"):
        assert r2["metrics"][k] == pytest.approx(r1["metrics"][k], abs=1e-5), k
    c1, c2 = t1["stages"]["member0"]["curve"], t2["stages"]["member0"]["curve"]
    assert [e["loss"] for e in c2] == pytest.approx([e["loss"] for e in c1], abs=1e-5)
    assert not (tmp_path / "two" / ".ckpt").exists()
    assert runner.resolve_device("cpu").type == "cpu"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: Linux)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_a_killed_two_rank_run_resumes_from_rank_0s_checkpoint(tmp_path):
    """Both ranks killed (SIGKILL to torchrun's process group) after the first epoch's checkpoint, then
    the same command again: it resumes from rank 0's checkpoint and ends where 1 process ends."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [a if a != "2" else "4" for a in ARGS]                           # 4 epochs
    one = subprocess.run([sys.executable, "-m", "ensemble_bench", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    def two_ranks() -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(_free_port()), "-m", "ensemble_bench", *args, "--out", str(tmp_path / "two")]

    proc = subprocess.Popen(two_ranks(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "two" / ".ckpt").glob("*/member0.pt")):
        assert proc.poll() is None, "the 2-rank run ended before its first checkpoint"
        time.sleep(0.2)
    for pid in [proc.pid, *_descendants(proc.pid)]:     # torchrun and its workers (their own sessions)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    [rec] = [json.loads(p.read_text()) for p in (tmp_path / "two").glob("single-*.json")]
    assert rec["status"] == "running"
    again = subprocess.run(two_ranks(), capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[member0] resuming after epoch" in again.stderr
    [r1] = [json.loads(p.read_text()) for p in (tmp_path / "one").glob("single-*.json")]
    [r2] = [json.loads(p.read_text()) for p in (tmp_path / "two").glob("single-*.json")]
    assert r2["status"] == "complete"
    for k in ("acc", "nll", "ece"):
        assert r2["metrics"][k] == pytest.approx(r1["metrics"][k], abs=1e-5), k
