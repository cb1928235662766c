"""End to end through the CLI, and the bad inputs: one line, exit code 2, nothing written."""
import json
import subprocess
import sys

import numpy as np
import pytest

from ensemble_bench.cli import main

TINY = ["--backbone", "cnn_small", "--dataset", "digits", "--epochs", "2", "--no-progress"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_writes_a_complete_record_and_leaderboard(tmp_path, capsys):
    out = tmp_path / "runs"
    for seed in ("0", "1"):
        code, stdout, _ = run_cli(capsys, "run", "--method", "single", *TINY, "--seed", seed, "--out", str(out))
        assert code == 0
    code, stdout, _ = run_cli(capsys, "run", "--method", "deep_ensemble", *TINY, "--set", "num_members=2",
                              "--out", str(out))
    assert code == 0
    rid = json.loads(stdout)["run_id"]
    rec = json.loads((out / f"{rid}.json").read_text())
    assert rec["status"] == "complete" and rec["schema_version"] == 1
    assert rec["method"]["num_members"] == 2 and rec["method"]["combine"] == "probs"
    assert rec["config"]["options"] == {"num_members": 2, "batched": False}
    for k in ("acc", "nll", "brier", "ece", "member_acc", "disagreement", "nll_ts", "ece_ts"):
        assert np.isfinite(rec["metrics"][k]), k
    assert set(rec["metrics"]["ood"]["photos"]) == {"msp", "entropy", "mi"}
    c = rec["cost"]
    from ensemble_bench.backbones import build_backbone
    one = sum(p.numel() for p in build_backbone("cnn_small", 10, in_channels=1).parameters())
    assert c["params"] == 2 * one and c["flops"] > 0 and c["latency_ms"] > 0 and "cpu" in c["latency_device"]
    assert rec["training"]["epochs_run"] == {"member0": 2, "member1": 2}
    assert rec["training"]["precision"] == "fp32"        # as trained (bf16 autocast applies on CUDA only)
    assert rec["env"]["torch"] and rec["timings"]["wall_s"] > 0
    assert (out / f"{rid}.preds.npz").is_file() and not (out / ".ckpt" / rid).exists()
    # the saved predictions reproduce the record's metrics through `score`
    code, stdout, _ = run_cli(capsys, "score", str(out / f"{rid}.preds.npz"))
    assert code == 0
    scored = json.loads(stdout)
    assert scored["nll"] == pytest.approx(rec["metrics"]["nll"], abs=2e-3)
    # a second run of the same config is skipped, not retrained
    code, _, err = run_cli(capsys, "run", "--method", "deep_ensemble", *TINY, "--set", "num_members=2", "--out", str(out))
    assert code == 0
    # leaderboard: one row per config, two seeds for single
    csv = tmp_path / "lb.csv"
    code, stdout, _ = run_cli(capsys, "leaderboard", str(out), "-o", str(csv))
    assert code == 0 and csv.is_file() and csv.with_suffix(".md").is_file()
    import pandas as pd
    df = pd.read_csv(csv)
    assert len(df) == 2
    assert sorted(df["n_seeds"].tolist()) == [1, 2]


@pytest.mark.parametrize("argv,msg", [
    (["run", "--method", "nope", *TINY], "unknown method 'nope'; choose from"),
    (["run", "--method", "single", "--backbone", "vgg", "--dataset", "digits"], "unknown backbone 'vgg'"),
    (["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["run", "--method", "deep_ensemble", *TINY, "--set", "members=3"], "unknown option 'members'"),
    (["run", "--method", "deep_ensemble", *TINY, "--set", "num_members=x"], "bad value for deep_ensemble.num_members"),
    (["run", "--method", "single", *TINY, "--set", "novalue"], "--set expects key=value"),
    (["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "digits", "--epochs", "zero"], "invalid int value"),
    (["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "cifar10", "--data-dir", "MISSING"], "not found"),
    (["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "cifar10", "--data-dir", "CORRUPT"], "cannot read data file"),
    # a method that cannot take the backbone is refused before a record or the out folder exists
    (["run", "--method", "packed", "--backbone", "timm:resnet18", "--dataset", "digits"], "packed needs a staged backbone"),
    (["run", "--method", "bridge", "--backbone", "timm:resnet18", "--dataset", "digits"], "bridge needs a staged backbone"),
    (["run", "--method", "nfe", "--backbone", "timm:resnet18", "--dataset", "digits"], "nfe needs a staged backbone"),
    (["run", "--method", "deep_ensemble", "--backbone", "timm:resnet18", "--dataset", "digits", "--set", "batched=true"],
     "needs a staged backbone (batched=true"),
    (["cost", "--method", "single", "--backbone", "cnn_small", "--num-classes", "1"], "--num-classes must be >= 2"),
    (["score", "MISSING.npz"], ""),
    (["leaderboard", "MISSING"], ""),
    (["bogus"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, argv, msg):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "CORRUPT").mkdir()
    (tmp_path / "CORRUPT" / "cifar10_train.npz").write_bytes(b"garbage")
    (tmp_path / "CORRUPT" / "cifar10_test.npz").write_bytes(b"garbage")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = run_cli(capsys, *argv, *(["--out", "runs"] if argv[0] == "run" else []))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ensemble-bench: error:"), err
    assert msg in lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before      # nothing written


def test_list_shows_methods_options_backbones_datasets(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    assert "deep_ensemble" in out and "num_members=4" in out and "wrn28_10" in out and "digits" in out


def test_cost_without_training(capsys):
    code, out, _ = run_cli(capsys, "cost", "--method", "deep_ensemble", "--backbone", "resnet18", "--num-classes", "10",
                           "--set", "num_members=2")
    assert code == 0
    res = json.loads(out)
    assert res["params"] == 2 * 11_173_962
    assert res["macs"] == pytest.approx(2 * 0.5559e9, rel=0.005)


def test_console_script_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "ensemble_bench", "run", "--method", "nope", *TINY],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_a_run_whose_log_reader_goes_away_still_completes(tmp_path):
    """`ensemble-bench run ... 2>&1 | head -1`: the pipe closes after the first line; the run goes on with
    its log going nowhere and writes its complete record (before: BrokenPipeError, a failed record)."""
    import os

    proc = subprocess.Popen([sys.executable, "-m", "ensemble_bench", "run", "--method", "single", "--backbone",
                             "cnn_small", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "runs")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline()          # the first line, as `head -1` reads it
    proc.stdout.close()                    # ... and goes away
    assert proc.wait(timeout=300) == 0
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert rec["status"] == "complete"


def test_quickstart_too_few_epochs_names_only_quickstarts_flags(tmp_path, capsys, monkeypatch):
    """The quickstart sets each method's options itself and has no --set: a method that refuses --epochs
    (snapshot: one epoch per cycle, 3 cycles here) is told to raise --epochs or be left out of --methods,
    not to "lower --set num_snapshots" (which the quickstart refuses as an unrecognised argument)."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "quickstart", "--methods", "snapshot", "--epochs", "1", "--out", "qs")
    assert code == 2 and err.count("\n") == 1, err
    assert "--epochs 1 is too few for snapshot with the quickstart's num_snapshots=3" in err
    assert "raise --epochs" in err and "leave snapshot out of --methods" in err and "--set" not in err
    assert not (tmp_path / "qs").exists()
    # another cause is reported as it is, whatever the epochs
    (tmp_path / "a_file").write_text("x")
    code, _, err = run_cli(capsys, "quickstart", "--methods", "snapshot", "--epochs", "1", "--out", "a_file")
    assert code == 2 and "a_file is a file, not a directory" in err and "too few" not in err, err
