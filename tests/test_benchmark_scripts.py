"""The benchmark scripts in benchmarks/ run through on the CPU and measure every row they list.

They are scripts, not tests, but they call the harness's own code (Trainer.fit, the cost functions, the run
config), so a change there can break a row without a word: the suite Trainer.fit row of throughput.py once
reported "partial: TypeError" on a GPU machine for that reason. These quick checks (numbers not for the
record) catch that here.
"""
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(tmp_path, name: str, *args: str) -> list[dict]:
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (table,) = out.glob("*.csv")
    return list(csv.DictReader(table.open()))


def test_throughput_measures_every_row_on_cpu(tmp_path):
    rows = _script(tmp_path, "throughput.py", "--device", "cpu", "--backbone", "cnn_small", "--methods",
                   "single,deep_ensemble", "--latency-runs", "3", "--batch", "16", "--infer-runs", "1",
                   "--train-batch", "16", "--train-steps", "2", "--train-repeats", "2")
    assert {r["row"] for r in rows} == {"bare fwd+bwd", "bare step", "suite Trainer.fit", "method"}
    assert [r["status"] for r in rows] == ["ok"] * len(rows), [r["error"] for r in rows]
    suite = next(r for r in rows if r["row"] == "suite Trainer.fit")
    assert float(suite["train_img_s"]) > 0


def test_latency_noise_measures_every_config_on_cpu(tmp_path):
    rows = _script(tmp_path, "latency_noise.py", "--device", "cpu", "--backbones", "cnn_small", "--methods",
                   "single", "--repeats", "2", "--runs", "3", "--warmup", "1")
    assert [r["method"] for r in rows] == ["(bare backbone)", "single"]
    assert all(r["status"] == "ok" and int(r["repeats"]) == 2 for r in rows)
