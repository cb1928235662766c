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


def test_slice_data_cuts_every_per_image_array_and_the_suite_reads_the_slice(tmp_path):
    import numpy as np

    from ensemble_bench import data

    src = tmp_path / "full"
    src.mkdir()
    rng = np.random.default_rng(0)
    np.savez(src / "cifar10_train.npz", x_train=rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(50) % 10, train_index=np.arange(50))
    np.savez(src / "cifar10_test.npz", x_test=rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(30) % 10, x_test_exact=np.zeros((5, 32, 32, 3), np.uint8))
    np.savez(src / "svhn.npz", x=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), y=np.arange(20) % 10,
             source_split=np.array(["test"]), class_names=np.array([f"c{i}" for i in range(10)]))
    np.savez(src / "cifar100_test.npz", x=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), y=np.arange(20))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "slice_data.py"), str(src), str(tmp_path / "s"),
                           "--train", "40", "--test", "10", "--ood", "8", "--drop", "x_test_exact"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "s" / "cifar10_train.npz") as z:
        assert z["x_train"].shape[0] == z["y_train"].shape[0] == z["train_index"].shape[0] == 40
    with np.load(tmp_path / "s" / "cifar10_test.npz") as z:
        assert z["x_test"].shape[0] == 10 and "x_test_exact" not in z.files
    with np.load(tmp_path / "s" / "svhn.npz") as z:
        assert z["x"].shape[0] == z["y"].shape[0] == 8 and z["source_split"].tolist() == ["test"]
        assert len(z["class_names"]) == 10   # metadata, not a per-image array: copied whole
    bundle = data.load("cifar10", tmp_path / "s", val_fraction=0.1)
    assert len(bundle.train.y) + len(bundle.val.y) == 40 and len(bundle.test.y) == 10


def test_epoch_time_runs_on_the_real_data_and_says_how_it_was_made(tmp_path, shared_data):
    """epoch_time.py on 256 real CIFAR-10 images: every row measured, and the table names the command, the
    commit and the load (it once built its run config from the default data folder and stopped there)."""
    rows = _script(tmp_path, "epoch_time.py", "--data-dir", str(shared_data), "--n", "256", "--repeats", "1")
    assert len(rows) == 6 and all(float(r["seconds"]) > 0 for r in rows)
    md = (tmp_path / "bench" / "bench_epoch_time.md").read_text()
    assert "- command: `python " in md and "--n 256" in md and "- load average" in md
