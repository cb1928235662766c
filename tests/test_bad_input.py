"""Issue 16, the bad-input table: every bad input the issue lists gives ONE line on stderr (no
traceback), exit code 2, and writes nothing (every file and folder under the test's folder listed
before and after; the inputs a case makes count as "before"). Also: a pickle planted in a checkpoint
is refused without running it, two processes of the same run id (the second exits 2 naming the
holder; the first's complete record survives), a killed local run shown as interrupted by
``sweep-status`` (not running forever) and resumed by the sweep, with its progress line.

Each case runs ``ensemble_bench.cli.main`` in a fresh tmp folder (the current directory), with
``$T = --backbone cnn_small --dataset digits --epochs 1`` and ``--out out`` where the issue says so,
and bad data files made from small generated arrays."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ensemble_bench.cli import main

REPO = Path(__file__).resolve().parents[1]
T = ["--backbone", "cnn_small", "--dataset", "digits", "--epochs", "1", "--no-progress"]
RUN_T = ["run", "--method", "single", *T, "--out", "out"]
# a tiny run in TOML (the tests that train: 1 epoch on the 10% of digits left after a 90% validation
# split, 3 latency repeats)
TINY_TOML = """\
method = "single"
backbone = "cnn_small"
dataset = "digits"
epochs = {epochs}
val_fraction = 0.9
latency_runs = 3
progress = false
device = "cpu"
lr = 0.05
out = "{out}"
"""
BAD_TOML = 'method = "single"\nbackbone = "cnn_small"\ndataset = "digits"\nepochs = 1\nout = "out"\n'
SPEC = """\
name = "tiny"
[grid]
method = ["single"]
[run]
backbone = "cnn_small"
dataset = "digits"
epochs = 1
out = "{out}"
"""


# ------------------------------------------------------------------------------------------ helpers
def listing(root: Path) -> list[tuple]:
    """Every file and folder under ``root`` (hidden ones too), with size and mtime of the files."""
    out = []
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out.append((str(p.relative_to(root)), p.is_dir(), None if p.is_dir() else (st.st_size, st.st_mtime_ns)))
    return out


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)``: (exit code, stdout, stderr). An exception escaping ``main`` is a traceback a user
    would see: reported as exit code None with the exception in stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:   # what `ensemble-bench` would show as a traceback
        out, err = capsys.readouterr()
        return None, out, err + f"\nTraceback (escaped main): {type(e).__name__}: {e}"
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_exit_2(code, err: str, *must: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert code == 2, f"exit code {code}; stderr: {err[-2000:]}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {err[-2000:]}"
    for m in must:
        assert m in lines[0], f"{m!r} not in {lines[0]!r}"
    return lines[0]


def bad_input(tmp: Path, argv: list[str], capsys, *must: str) -> str:
    """Run ``argv`` in ``tmp``: exit 2, one line (containing every ``must``), nothing written."""
    before = listing(tmp)
    code, _, err = call(argv, capsys)
    line = assert_one_line_exit_2(code, err, *must)
    assert listing(tmp) == before, "files were written: " + str(sorted(set(map(str, listing(tmp))) - set(map(str, before))))
    return line


def write_cifar(folder: Path, *, n_train: int = 40, n_test: int = 20, train_size: int = 32, test_size: int = 32,
                svhn_size: int = 32, c100_size: int = 32, y_train=None, y_test=None) -> Path:
    """A small cifar10 .npz layout (random uint8 images) in ``folder``, optionally with one thing wrong."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)

    def images(n, s):
        return rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)

    np.savez(folder / "cifar10_train.npz", x_train=images(n_train, train_size),
             y_train=np.arange(n_train) % 10 if y_train is None else np.asarray(y_train))
    np.savez(folder / "cifar10_test.npz", x_test=images(n_test, test_size),
             y_test=np.arange(n_test) % 10 if y_test is None else np.asarray(y_test))
    np.savez(folder / "svhn.npz", x=images(10, svhn_size), y=np.arange(10) % 10)
    np.savez(folder / "cifar100_test.npz", x=images(10, c100_size), y=np.arange(10))
    return folder


def write_probs(path: Path, probs: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, probs=probs, labels=labels)
    return path


# ------------------------------------------------------------------------- a complete record (once)
@pytest.fixture(scope="module")
def complete_runs(tmp_path_factory) -> Path:
    """A folder with one real complete record (and its predictions, weights, curves)."""
    base = tmp_path_factory.mktemp("complete")
    out = base / "runs"
    cfg = base / "run.toml"
    cfg.write_text(TINY_TOML.format(epochs=1, out=out))
    code = main(["run", "--config", str(cfg)])
    assert code == 0
    shutil.rmtree(out / ".submitit", ignore_errors=True)
    return out


def copy_runs(src: Path, dst: Path, *, drop_metrics: bool = False) -> Path:
    shutil.copytree(src, dst)
    if drop_metrics:   # a record marked complete, but without metrics
        for p in dst.glob("*.json"):
            rec = json.loads(p.read_text())
            rec.pop("metrics", None)
            p.write_text(json.dumps(rec))
    return dst


# ------------------------------------------------------------------------------------- the table
# Each case: (id, setup) where setup(tmp) makes the inputs in tmp (the current directory) and returns
# (argv, substrings the error line must contain).
def _toml(tmp: Path, extra: str, name: str = "bad.toml") -> Path:
    p = tmp / name
    p.write_text(BAD_TOML + extra)
    return p


def _spec(tmp: Path, text: str) -> Path:
    p = tmp / "spec.toml"
    p.write_text(text)
    return p


def _file(tmp: Path, name: str = "afile") -> Path:
    p = tmp / name
    p.write_text("not a folder\n")
    return p


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _npz(tmp: Path, **arrays) -> Path:
    np.savez(tmp / "a.npz", **arrays)
    return tmp / "a.npz"


def _in_the_way(tmp: Path, rel: str, kind: str) -> list:
    """RUN_T with ``out/<rel>`` ("{rid}": RUN_T's run id) made a file or a folder, the kind the run does not
    write there."""
    from ensemble_bench.resolve import make_run_config

    rid = make_run_config(dict(method="single", backbone="cnn_small", dataset="digits", epochs=1)).run_id()
    p = tmp / "out" / rel.format(rid=rid)
    p.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        p.write_text("in the way\n")
    elif kind == "dangling":   # e.g. scratch space that is not mounted on this node
        p.symlink_to(tmp / "not-mounted")
    else:
        p.mkdir()
    return RUN_T


def _link(tmp: Path, target: str) -> Path:
    p = tmp / "loop" if target == "loop" else tmp / "dangling"
    p.symlink_to(p if target == "loop" else target)
    return p


CASES = {
    # --- "Tracebacks instead of one line"
    "val_fraction_0.9999": lambda t: ([*RUN_T, "--val-fraction", "0.9999"], ["--val-fraction 0.9999"]),
    "train_npz_zero_images": lambda t: (
        ["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "cifar10", "--epochs", "1",
         "--data-dir", write_cifar(t / "data", n_train=0), "--out", "out"], ["cifar10_train.npz", "no training images"]),
    "weight_decay_-1": lambda t: ([*RUN_T, "--weight-decay", "-1"], ["weight_decay"]),
    "seed_overflows_int64": lambda t: ([*RUN_T, "--seed", str(2**63)], ["seed"]),
    "toml_momentum_-1": lambda t: (["run", "--config", _toml(t, "momentum = -1.0\n")], ["momentum"]),
    "toml_nesterov_momentum_0": lambda t: (["run", "--config", _toml(t, "momentum = 0.0\nnesterov = true\n")],
                                          ["nesterov"]),
    "out_is_a_file": lambda t: (["run", "--method", "single", *T, "--out", _file(t)], ["afile"]),
    "out_under_a_file": lambda t: (["run", "--method", "single", *T, "--out", _file(t) / "sub"], ["afile"]),
    "train_label_ge_num_classes": lambda t: (
        ["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "cifar10", "--epochs", "1",
         "--data-dir", write_cifar(t / "data", y_train=[*range(9), 10] * 4), "--out", "out"],
        ["cifar10_train.npz", "label 10"]),
    "test_label_out_of_range": lambda t: (
        ["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "cifar10", "--epochs", "1",
         "--data-dir", write_cifar(t / "data", y_test=[*range(9), -1] * 2), "--out", "out"],
        ["cifar10_test.npz", "label -1"]),
    "cost_image_size_0": lambda t: (["cost", "--method", "single", "--backbone", "cnn_small", "--num-classes", "10",
                                     "--image-size", "0"], ["image-size"]),
    "cost_image_size_-4": lambda t: (["cost", "--method", "single", "--backbone", "cnn_small", "--num-classes", "10",
                                      "--image-size", "-4"], ["image-size"]),
    "cost_in_channels_0": lambda t: (["cost", "--method", "single", "--backbone", "cnn_small", "--num-classes", "10",
                                      "--in-channels", "0"], ["in-channels"]),
    "cost_latency_runs_0": lambda t: (["cost", "--method", "single", "--backbone", "cnn_small", "--num-classes", "10",
                                       "--latency", "--runs", "0"], ["runs"]),
    "cost_timm_hf_hub_offline": lambda t: (["cost", "--method", "single", "--backbone",
                                            "timm:hf-hub:timm/resnet18.a1_in1k", "--num-classes", "10"], ["hf-hub"]),
    "leaderboard_o_under_a_file": "records",
    "report_o_under_a_file": "records",
    # --- found by an adversarial probe (2026-12-04): a table written over a result, a misnamed record
    "leaderboard_o_is_a_record": "records",
    "leaderboard_o_is_a_records_weights": "records",
    "leaderboard_o_is_the_markdown": "records",
    "leaderboard_o_is_a_folder": "records",
    "record_file_of_another_run": "records",
    "out_dangling_symlink": lambda t: (["run", "--method", "single", *T, "--out", _link(t, "/nonexistent/target")],
                                       ["symbolic link to nothing"]),
    "out_symlink_loop": lambda t: (["run", "--method", "single", *T, "--out", _link(t, "loop")],
                                   ["symbolic link to nothing"]),
    "score_unknown_array_typo": lambda t: (["score", _npz(t, logits=np.zeros((1, 4, 3)), labels=np.arange(4) % 3,
                                                         val_logit=np.zeros((1, 4, 3)))],
                                           ["unknown array 'val_logit'", "did you mean 'val_logits'"]),
    "plugin_calls_sys_exit": lambda t: (["list", "--plugin", _write(t / "quits.py", "import sys\nsys.exit(0)\n")],
                                        ["quits.py", "sys.exit(0)"]),
    "plugin_option_without_default": lambda t: (
        ["list", "--plugin", _write(t / "nodefault.py", (
            "from dataclasses import dataclass\nimport ensemble_bench as eb\n\n"
            "@eb.register('nodefault')\nclass M(eb.Method):\n"
            "    @dataclass\n    class Config:\n        k: int\n"))],
        ["nodefault.py", "option 'k'", "has no default"]),
    "toml_out_a_number": lambda t: (["run", "--config", _write(t / "n.toml", BAD_TOML.replace('"out"', "5"))],
                                    ["out", "5"]),
    "toml_data_dir_a_list": lambda t: (["run", "--config", _toml(t, "data_dir = []\n")], ["data_dir"]),
    "cost_device_tpu": lambda t: (["cost", "--method", "single", "--backbone", "cnn_small", "--num-classes", "10",
                                   "--device", "tpu"], ["--device"]),
    "milestones_repeated": lambda t: ([*RUN_T, "--schedule", "multistep", "--milestones", "0.5,0.5"],
                                      ["milestones are increasing"]),
    "lr_overflows_float32": lambda t: ([*RUN_T, "--lr", "1e39"], ["lr must be", "float32"]),
    "out_members_is_a_file": lambda t: (_in_the_way(t, ".members", "file"), ["out/.members", "in the way"]),
    "out_ckpt_is_a_file": lambda t: (_in_the_way(t, ".ckpt", "file"), ["out/.ckpt", "in the way"]),
    "out_locks_is_a_file": lambda t: (_in_the_way(t, ".submitit/locks", "file"), ["out/.submitit/locks"]),
    "out_submitit_is_a_file": lambda t: (_in_the_way(t, ".submitit", "file"), ["out/.submitit", "in the way"]),
    "out_ckpt_dangling_link": lambda t: (_in_the_way(t, ".ckpt", "dangling"), ["out/.ckpt", "link to nothing"]),
    "out_preds_is_a_folder": lambda t: (_in_the_way(t, "{rid}.preds.npz", "folder"), [".preds.npz", "a file"]),
    "out_record_is_a_folder": lambda t: (_in_the_way(t, "{rid}.json", "folder"), [".json", "in the way"]),
    "out_empty_string": lambda t: (["run", "--config", _write(t / "e.toml", BAD_TOML.replace('"out"', '""'))],
                                   ["out must name a folder"]),
    "latency_runs_huge": lambda t: (["run", "--config", _toml(t, "latency_runs = 1000000000000\n")],
                                    ["latency_runs must be in"]),
    "plugin_method_without_fit": lambda t: (
        ["list", "--plugin", _write(t / "nofit.py", (
            "import ensemble_bench as eb\n\n"
            "@eb.register('nofit')\nclass M(eb.Method):\n"
            "    def build(self, ctx):\n        return None\n"))],
        ["nofit.py", "does not define fit"]),
    "weights_larger_than_memory": lambda t: (["run", "--method", "single", "--backbone", "wrn28_2000", "--dataset",
                                              "digits", "--epochs", "1", "--out", "out"],
                                             ["1,457,", "parameters", "GiB", "memory here"]),
    "leaderboard_given_a_file": lambda t: (["leaderboard", _file(t)], ["is a file, not a results folder"]),
    "plugin_backbone_fixed_channels": lambda t: (
        ["run", "--method", "single", "--backbone", "rgb_only", "--dataset", "digits", "--epochs", "1", "--out", "out",
         "--plugin", _write(t / "rgb.py", (
             "import torch.nn as nn\nimport ensemble_bench as eb\n\n"
             "@eb.register_backbone('rgb_only')\ndef rgb_only(num_classes, in_channels, layers):\n"
             "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
             "                         nn.Linear(8, num_classes))\n"))],
        ["backbone 'rgb_only' cannot take the digits data", "(2, 1, 8, 8)", "3 channels"]),
    "plugin_backbone_lazy_layer": lambda t: (
        ["run", "--method", "single", "--backbone", "lazy", "--dataset", "digits", "--epochs", "1", "--out", "out",
         "--plugin", _write(t / "lazy.py", (
             "import torch.nn as nn\nimport ensemble_bench as eb\n\n"
             "@eb.register_backbone('lazy')\ndef lazy(num_classes, in_channels, layers):\n"
             "    return nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.Flatten(), nn.LazyLinear(num_classes))\n"))],
        ["backbone 'lazy'", "lazy (unsized) parameters", "members.0.2.weight", "nn.LazyLinear"]),
    "timm_vit_fixed_image_size": lambda t: (
        ["run", "--method", "deep_ensemble", "--backbone", "timm:vit_tiny_patch16_224", "--dataset", "digits",
         "--epochs", "1", "--out", "out"],
        ["cannot take the digits data", "(2, 1, 8, 8)", "Input height (8) doesn't match model (224)"]),
    "report_o_in_proc": "records",
    # --- "A silent number"
    "cifar10_train_16x16": lambda t: (
        ["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "cifar10", "--epochs", "1",
         "--data-dir", write_cifar(t / "data", train_size=16), "--out", "out"],
        ["cifar10_train.npz", "[N, 32, 32, 3]", "16, 16, 3]"]),
    "cifar10_test_16x16": lambda t: (
        ["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "cifar10", "--epochs", "1",
         "--data-dir", write_cifar(t / "data", test_size=16), "--out", "out"],
        ["cifar10_test.npz", "[N, 32, 32, 3]", "16, 16, 3]"]),
    "ood_svhn_16x16": lambda t: (
        ["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "cifar10", "--epochs", "1",
         "--data-dir", write_cifar(t / "data", svhn_size=16), "--out", "out"],
        ["svhn.npz", "[N, 32, 32, 3]", "16, 16, 3]"]),
    "ood_cifar100_16x16": lambda t: (
        ["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "cifar10", "--epochs", "1",
         "--data-dir", write_cifar(t / "data", c100_size=16), "--out", "out"],
        ["cifar100_test.npz", "[N, 32, 32, 3]", "16, 16, 3]"]),
    "toml_lr_decay_-1": lambda t: (["run", "--config", _toml(t, 'schedule = "multistep"\nlr_decay = -1.0\n')],
                                   ["lr_decay"]),
    "toml_warmup_epochs_-3": lambda t: (["run", "--config", _toml(t, "warmup_epochs = -3.0\n")], ["warmup_epochs"]),
    "score_rows_sum_to_5": lambda t: (
        ["score", write_probs(t / "p.npz", np.full((2, 6, 5), 1.0), np.arange(6) % 5)], []),
    "score_values_above_1": lambda t: (
        ["score", write_probs(t / "p.npz", np.tile(np.array([1.5, 0.0, 0.0]), (2, 6, 1)), np.arange(6) % 3)], []),
    "score_one_class": lambda t: (["score", write_probs(t / "p.npz", np.ones((2, 6, 1)), np.zeros(6, int))], []),
    "leaderboard_complete_without_metrics": "records",
    # --- "Other"
    "report_complete_without_metrics": "records",
    "sweep_weight_decay_-1": lambda t: (["sweep", _spec(t, SPEC.format(out="runs") + "weight_decay = -1.0\n")],
                                        ["weight_decay"]),
    "quickstart_second_method_refused_before_the_first_trains": lambda t: (
        ["quickstart", "--methods", "single,snapshot", "--epochs", "2", "--out", "qs", "--quiet"],
        ["snapshot", "num_snapshots"]),
    "abbreviated_flag_is_not_taken_for_another": lambda t: ([*RUN_T[:-2], "--members", "2", "--out", "out"],
                                                            ["unrecognized arguments: --members 2"]),
    "set_the_same_option_twice": lambda t: (["run", "--method", "deep_ensemble", *RUN_T[3:-2], "--set",
                                             "num_members=2", "--set", "num_members=3", "--out", "out"],
                                            ["num_members is given twice"]),
    "quickstart_methods_names_none": lambda t: (["quickstart", "--methods", ",", "--out", "qs", "--quiet"],
                                                ["names no method"]),
    "leaderboard_o_dot": "records",
    "leaderboard_o_json_in_the_records_folder": "records",
    "quickstart_single_nope": lambda t: (["quickstart", "--methods", "single,nope", "--epochs", "1", "--out", "qs",
                                          "--quiet"], ["nope"]),
    "epochs_1e12": lambda t: ([*RUN_T[:-2], "--out", "out", "--epochs", "1000000000000"], ["epochs"]),
    "config_is_a_folder": lambda t: (["run", "--config", _mkdir(t / "dir.toml")], ["is a folder"]),
    "data_dir_is_a_file": lambda t: (["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "cifar10",
                                      "--epochs", "1", "--data-dir", _file(t), "--out", "out"], ["is a file"]),
    "corrupt_data_dir_is_a_file": lambda t: (["corrupt", "--data-dir", _file(t), "--out", "cc", "--limit", "4"],
                                             ["is a file"]),
    "toml_option_typo_did_you_mean": lambda t: (["run", "--config", _toml(t, "epocs = 3\n")], ["did you mean 'epochs'"]),
    # --- data files: the messages themselves
    "data_random_bytes": "random",
    "data_missing_ends_with_suite_hint": lambda t: (
        ["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "cifar10", "--epochs", "1",
         "--data-dir", t / "nodata", "--out", "out"], ["not found", "--download"]),
    "train_labels_float": lambda t: (
        ["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "cifar10", "--epochs", "1",
         "--data-dir", write_cifar(t / "data", y_train=np.arange(40) % 10 + 0.5), "--out", "out"],
        ["cifar10_train.npz", "integers"]),
    "train_label_count_mismatch": lambda t: (
        ["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "cifar10", "--epochs", "1",
         "--data-dir", write_cifar(t / "data", y_train=np.arange(39) % 10), "--out", "out"],
        ["cifar10_train.npz", "40 training images but 39 labels"]),
    "test_npz_zero_images": lambda t: (
        ["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "cifar10", "--epochs", "1",
         "--data-dir", write_cifar(t / "data", n_test=0), "--out", "out"], ["cifar10_test.npz", "no test images"]),
    # --- sweeps: out folder, spec fields that reach the sbatch script
    "sweep_out_is_a_file": lambda t: (["sweep", _spec(t, SPEC.format(out=_file(t)))], ["afile", "not a folder"]),
    "sweep_out_under_a_file": lambda t: (["sweep", _spec(t, SPEC.format(out=_file(t) / "runs"))],
                                         ["afile", "not a folder"]),
}

# a newline (or another control character) in a spec string that reaches the sbatch script
INJECTIONS = {
    "name": ('name = "tiny\\nrm -rf ~"\n', "name"),
    "job_name": ('[slurm]\njob_name = "x\\ntouch /tmp/pwned"\n', "[slurm] job_name"),
    "partition": ('[slurm]\npartition = "gpu\\ntouch /tmp/pwned"\n', "[slurm] partition"),
    "account": ('[slurm]\naccount = "me\\r\\ntouch /tmp/pwned"\n', "[slurm] account"),
    "qos": ('[slurm]\nqos = "normal\\u0000"\n', "[slurm] qos"),
    "constraint": ('[slurm]\nconstraint = "a100\\u001b[2J"\n', "[slurm] constraint"),
    "comment": ('[slurm]\ncomment = "c\\ttab"\n', "[slurm] comment"),
    "additional_parameters": ('[slurm]\nadditional_parameters = {hint = "x\\ntouch /tmp/pwned"}\n',
                              "[slurm] additional_parameters.hint"),
    "srun_args": ('[slurm]\nsrun_args = ["--x", "y\\ntouch /tmp/pwned"]\n', "[slurm] srun_args[1]"),
    "run_out": (None, "[run] out"),
}


def _injection_spec(tmp: Path, field: str) -> Path:
    text, _ = INJECTIONS[field]
    base = SPEC.format(out="runs")
    if field == "name":
        base = base.replace('name = "tiny"\n', text)
    elif field == "run_out":
        base = base.replace('out = "runs"', 'out = "runs\\ntouch /tmp/pwned"')
    else:
        base += text
    return _spec(tmp, base)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_table(case, tmp_path, capsys, monkeypatch, complete_runs):
    monkeypatch.chdir(tmp_path)
    setup = CASES[case]
    if case == "cost_timm_hf_hub_offline":   # offline, without minutes of retries
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        if "huggingface_hub.constants" in sys.modules:
            monkeypatch.setattr(sys.modules["huggingface_hub.constants"], "HF_HUB_OFFLINE", True)
    if setup == "records":
        runs = copy_runs(complete_runs, tmp_path / "runs", drop_metrics="without_metrics" in case)
        if case == "leaderboard_o_under_a_file":
            argv, must = ["leaderboard", runs, "-o", _file(tmp_path) / "lb.csv"], ["afile"]
        elif case == "report_o_under_a_file":
            argv, must = ["report", runs, "-o", _file(tmp_path) / "report"], ["afile"]
        elif case in ("leaderboard_o_is_a_record", "leaderboard_o_is_a_records_weights"):
            rid = next(runs.glob("*.json")).stem
            target = runs / (f"{rid}.json" if case.endswith("record") else f"{rid}.weights.safetensors")
            argv, must = ["leaderboard", runs, "-o", target], [rid, "destroy"]
        elif case == "leaderboard_o_dot":
            argv, must = ["leaderboard", runs, "-o", "."], ["names no file"]
        elif case == "leaderboard_o_json_in_the_records_folder":   # every later scan would warn of it
            argv, must = ["leaderboard", runs, "-o", runs / "zz.json"], ["ending in .csv"]
        elif case == "leaderboard_o_is_the_markdown":
            argv, must = ["leaderboard", runs, "-o", tmp_path / "lb.md"], ["name the CSV"]
        elif case == "leaderboard_o_is_a_folder":
            (tmp_path / "afolder").mkdir()
            argv, must = ["leaderboard", runs, "-o", tmp_path / "afolder"], ["is a folder"]
        elif case == "record_file_of_another_run":   # seed 1's file name holding seed 0's record
            from ensemble_bench.resolve import make_run_config

            seed0 = next(runs.glob("*.json"))
            rec = json.loads(seed0.read_text())
            settings = dict(method="single", backbone="cnn_small", dataset="digits", epochs=1, val_fraction=0.9,
                            lr=0.05, seed=1, device="cpu")
            shutil.copy(seed0, runs / f"{make_run_config(settings).run_id()}.json")
            argv = ["run", *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items()], "--out", runs]
            must = [rec["run_id"], "move it away"]
        elif case == "report_o_in_proc":   # /proc: the permission bits say writable, mkdir says no
            argv, must = ["report", runs, "-o", "/proc/ensemble-bench-report"], ["/proc"]   # root: mkdir fails; others: not writable
        elif case == "leaderboard_complete_without_metrics":
            argv, must = ["leaderboard", runs], []
        else:
            argv, must = ["report", runs, "-o", tmp_path / "report"], []
    elif setup == "random":
        data = tmp_path / "data"
        data.mkdir()
        rng = np.random.default_rng(16)
        for name in ("cifar10_train.npz", "cifar10_test.npz"):
            blob = rng.bytes(4096)
            assert not blob.startswith((b"PK", b"\x93NUMPY"))
            (data / name).write_bytes(blob)
        argv = ["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "cifar10", "--epochs", "1",
                "--data-dir", data, "--out", "out"]
        must = ["not a valid .npz data file"]
    else:
        argv, must = setup(tmp_path)
    line = bad_input(tmp_path, argv, capsys, *must)
    assert "allow_pickle" not in line and "download=True" not in line
    if case == "data_missing_ends_with_suite_hint":
        assert line.rstrip(" .").endswith("--download"), line


@pytest.mark.parametrize("field", list(INJECTIONS))
def test_sweep_spec_control_characters_are_refused(field, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = _injection_spec(tmp_path, field)
    must = INJECTIONS[field][1]
    for argv in (["sweep", spec, "--executor", "slurm", "--dry-run"], ["sweep", spec], ["sweep-status", spec]):
        line = bad_input(tmp_path, argv, capsys, must, "control character")
        assert "\n" not in line
    assert not Path("/tmp/pwned").exists()


def test_slurm_setup_stays_shell_by_design(tmp_path, capsys, monkeypatch):
    """``[slurm] setup`` lines are shell commands written into the sbatch script as they are (by
    design); they are not refused."""
    from ensemble_bench import sweep

    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path, SPEC.format(out="runs") + '[slurm]\nsetup = ["module load cuda", "export A=1\\nexport B=2"]\n')
    params, _ = sweep.slurm_parameters(sweep.load_spec(spec))
    assert params["setup"] == ["module load cuda", "export A=1\nexport B=2"]
    code, out, _ = call(["sweep", spec, "--executor", "slurm", "--dry-run"], capsys)
    assert code == 0 and "dry run: nothing submitted" in out


# --------------------------------------------------------------------------- not writable folders
_CASES_SCRIPT = """
import contextlib, io, json, sys, traceback
from ensemble_bench.cli import main
res = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = None
    res.append({"argv": argv, "code": code, "err": err.getvalue()})
print(json.dumps(res))
"""


def _without_dac_override() -> None:
    """In the child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the capability
    bounding set, so that root (uid 0 stays: the interpreter and files stay readable) obeys the
    permission bits of folders it does not own the write bit of."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):   # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:   # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_not_writable_outputs(tmp_path, capsys, complete_runs):
    """``run --out``, ``leaderboard -o``, ``report -o`` and a sweep's ``out`` into a folder this user
    cannot write: one line, exit 2, nothing written. As root (who may write anywhere) the commands run
    in a subprocess without the capabilities that let root ignore permission bits."""
    as_root = os.geteuid() == 0
    base = tmp_path / "case"
    base.mkdir()
    runs = copy_runs(complete_runs, base / "runs")
    ro = base / "ro"
    ro.mkdir()
    spec = base / "spec.toml"
    spec.write_text(SPEC.format(out=ro / "sweep-runs"))
    cases = [
        ["run", "--method", "single", *T, "--out", str(ro / "out")],
        ["leaderboard", str(runs), "-o", str(ro / "lb.csv")],
        ["report", str(runs), "-o", str(ro / "report")],
        ["sweep", str(spec)],
    ]
    ro.chmod(0o555)
    try:
        before = listing(base)
        if as_root:
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
            r = subprocess.run([sys.executable, "-c", _CASES_SCRIPT, json.dumps(cases)], cwd=base, env=env,
                               preexec_fn=_without_dac_override, capture_output=True, text=True, timeout=300,
                               check=False)
            assert r.returncode == 0, r.stderr[-3000:]
            results = json.loads(r.stdout.strip().splitlines()[-1])
        else:
            results = []
            for argv in cases:
                code, _, err = call(argv, capsys)
                results.append({"argv": argv, "code": code, "err": err})
        failures = []
        for res in results:
            try:
                assert_one_line_exit_2(res["code"], res["err"], str(ro))
            except AssertionError as e:
                last = [ln for ln in (res["err"] or "").splitlines() if ln.strip()][-1:] or ["(no stderr)"]
                failures.append(f"{res['argv'][0]}: {str(e).splitlines()[0][:200]} / last line: {last[0][:300]}")
        assert listing(base) == before, "files were written"
        assert not failures, "\n".join(failures)
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------------------- planted pickle
class _Planted:
    """Unpickling this creates the marker file (a harmless stand-in for code a planted pickle runs)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    import torch

    from ensemble_bench.resolve import make_run_config
    from ensemble_bench.errors import UsageError
    from ensemble_bench.train import load_checkpoint

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    rid = make_run_config({"method": "single", "backbone": "cnn_small", "dataset": "digits", "epochs": 1,
                           "progress": False, "out": "out"}).run_id()
    ckpt = tmp_path / "out" / ".ckpt" / rid / "member0.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": _Planted(str(marker)), "done": False}, ckpt)
    with pytest.raises(UsageError, match="checkpoint"):
        load_checkpoint(ckpt, "cpu")
    assert not marker.exists()
    code, _, err = call(["run", "--method", "single", *T, "--out", "out"], capsys)
    assert not marker.exists(), "the planted pickle ran"
    # the run had started (its log line), so the rule is: exit 2, the LAST line is the one clear error
    assert "Traceback" not in err and code == 2, err[-2000:]
    line = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert line.startswith("ensemble-bench: error:") and "checkpoint" in line and "member0.pt" in line, line
    # one plain line: no terminal escape codes, no advice to load the file unsafely after all
    assert "\x1b" not in line and "weights_only=False" not in line and "can still be loaded" not in line, line


# ----------------------------------------------------------------- two processes, one run id
def _start_run(cfg: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ensemble_bench", "run", "--config", str(cfg)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until_running(proc: subprocess.Popen, out: Path, rid: str, timeout: float = 240) -> None:
    """Until ``proc`` holds the run's lock (its pid in the lock file) and its "running" record stands.
    Read only: the lock itself is not probed (a probe would take it for an instant)."""
    from ensemble_bench import records

    lock = out / ".submitit" / "locks" / f"{rid}.lock"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            mine = lock.read_text().split()[:1] == [str(proc.pid)]
        except OSError:
            mine = False
        if mine and records.record_status(out, rid) == "running":
            return
        time.sleep(0.05)
    raise AssertionError("the run did not start in time")


def _tiny(tmp: Path, epochs: int = 1) -> tuple[Path, Path, str]:
    from ensemble_bench.resolve import run_config_from_toml

    out = tmp / "out"
    cfg = tmp / "run.toml"
    cfg.write_text(TINY_TOML.format(epochs=epochs, out=out))
    return cfg, out, run_config_from_toml(cfg).run_id()


def test_same_run_id_twice_at_once(tmp_path, capsys, monkeypatch):
    """While process A trains a run, process B of the same run id exits 2 with one line naming A;
    A's complete record survives, and ``sweep-status`` shows A as running meanwhile. (A is held
    stopped (SIGSTOP) while B tries, so the overlap does not depend on timing.)"""
    from ensemble_bench import records

    monkeypatch.chdir(tmp_path)
    cfg, out, rid = _tiny(tmp_path)
    spec = _spec(tmp_path, TINY_TOML.format(epochs=1, out=out).replace('method = "single"\n', "")
                 .replace("backbone", '[grid]\nmethod = ["single"]\n[run]\nbackbone', 1))
    a = _start_run(cfg, tmp_path)
    try:
        _wait_until_running(a, out, rid)
        a.send_signal(signal.SIGSTOP)
        before = listing(tmp_path)
        code, _, err = call(["run", "--config", cfg], capsys)
        assert_one_line_exit_2(code, err, rid, f"pid {a.pid}")
        assert listing(tmp_path) == before, "the second process wrote something"
        code, text, _ = call(["sweep-status", spec], capsys)
        assert code == 0 and "running 1" in text and f"pid {a.pid}" in text, text
    finally:
        a.send_signal(signal.SIGCONT)
    _, a_err = a.communicate(timeout=300)
    assert a.returncode == 0, a_err[-3000:]
    rec = records.read_record(out / f"{rid}.json")
    assert rec["status"] == "complete" and rec["metrics"]["acc"] > 0
    mtime = (out / f"{rid}.json").stat().st_mtime_ns
    # started again: the complete record is left as it is
    code, _, _ = call(["run", "--config", cfg], capsys)
    assert code == 0 and (out / f"{rid}.json").stat().st_mtime_ns == mtime


def test_killed_local_run_is_interrupted_not_running_and_resumes(tmp_path, capsys, monkeypatch):
    """``sweep-status`` shows a killed local run as interrupted (no live process holds its lock), not
    running forever; the sweep then runs it to completion and prints "[i/n] run_id done in Xs (status);
    ~Y left"."""
    from ensemble_bench import records

    monkeypatch.chdir(tmp_path)
    cfg, out, rid = _tiny(tmp_path)
    spec = _spec(tmp_path, TINY_TOML.format(epochs=1, out=out).replace('method = "single"\n', "")
                 .replace("backbone", '[grid]\nmethod = ["single"]\n[run]\nbackbone', 1))
    a = _start_run(cfg, tmp_path)
    try:
        _wait_until_running(a, out, rid)
    finally:
        a.kill()
        a.communicate(timeout=60)
    assert records.record_status(out, rid) == "running"
    code, text, _ = call(["sweep-status", spec], capsys)
    assert code == 0, text
    assert "running 0" in text and "pending 1" in text and "interrupted" in text, text
    code, text, err = call(["sweep", spec], capsys)
    assert code == 0 and "1 to run on local" in text, text + err
    progress = [ln for ln in err.splitlines() if ln.startswith("[1/1] ")]
    assert progress and f"[1/1] {rid} done in " in progress[0] and "(complete); ~0s left" in progress[0], err[-2000:]
    assert records.record_status(out, rid) == "complete"
    code, text, _ = call(["sweep-status", spec], capsys)
    assert "done 1   running 0   pending 0   failed 0" in text


def test_progress_line_and_eta():
    from ensemble_bench.sweep import LocalOutcome, progress_line, time_left

    o = LocalOutcome("single-abc", "complete", seconds=12.0)
    # no estimates: every run left counts as the mean of those finished, over the workers
    assert progress_line(1, 5, o, time_left([None] * 4, [12.0], 1)) == \
        "[1/5] single-abc done in 12.0s (complete); ~48.0s left"
    assert progress_line(2, 5, o, time_left([None] * 3, [12.0, 8.0], 2)) == \
        "[2/5] single-abc done in 12.0s (complete); ~15.0s left"
    assert time_left([None], [10.0] * 4, 4) == 10.0                  # one run left, one worker busy
    assert progress_line(5, 5, o, time_left([], [10.0] * 5, 1)).endswith("~0s left")
    assert progress_line(1, 100, LocalOutcome("x", "failed", "E", 90.0), time_left([None] * 99, [90.0], 1)) \
        .endswith("(failed); ~2h28m left")
    # estimates: the longest run bounds the time from below; an unknown one counts as the mean of the known
    assert time_left([3600.0, 60.0, 60.0], [5.0], 2) == 3600.0
    assert time_left([100.0, None, 10.0], [], 2) == 100.0 and time_left([100.0, None, 10.0], [], 1) == 165.0
    assert time_left([None, None], [], 2) is None
    assert progress_line(1, 3, o, None).endswith("~? left")


def test_a_forced_run_that_fails_or_is_interrupted_keeps_the_complete_record(tmp_path, capsys, monkeypatch,
                                                                            complete_runs):
    """`run --force` over a complete record: the record (and the files beside it) stay as they were until the
    new record is complete; no "running" record replaces it while the run trains, so a failure or a kill part
    way loses nothing."""
    from ensemble_bench import metrics

    runs = copy_runs(complete_runs, tmp_path / "runs")
    files = {p.name: p.read_bytes() for p in runs.iterdir() if p.is_file()}
    cfg = tmp_path / "run.toml"
    cfg.write_text(TINY_TOML.format(epochs=1, out=runs))
    seen = []

    def fail(*a, **k):   # after training: what the folder holds then is what a kill would leave
        seen.append({p.name: p.read_bytes() for p in runs.iterdir() if p.is_file()})
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(metrics, "evaluate", fail)
    code, _, err = call(["run", "--config", cfg, "--force"], capsys)
    assert code is None and "evaluation failed" in err and "the complete record is kept as it was" in err
    assert seen == [files]
    assert {p.name: p.read_bytes() for p in runs.iterdir() if p.is_file()} == files

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(metrics, "evaluate", interrupt)
    code, _, _ = call(["run", "--config", cfg, "--force"], capsys)
    assert code == 130
    assert {p.name: p.read_bytes() for p in runs.iterdir() if p.is_file()} == files


def test_a_member_count_beyond_memory_is_refused_before_any_write(tmp_path, capsys, monkeypatch):
    """The weights-only lower bound counts every member the method builds (here on a pretend 4 MiB
    machine): 3 members pass where 30 do not, and the refusal names the options."""
    from ensemble_bench import runner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "device_memory", lambda device: 4 * 2**20)
    from ensemble_bench.resolve import make_run_config

    def need(m):
        cfg = make_run_config(dict(method="deep_ensemble", options={"num_members": m}, backbone="cnn_small",
                                   dataset="digits", epochs=1, device="cpu"))
        model = runner.check_buildable(runner.make_method(cfg), cfg)
        return sum(p.numel() * p.element_size() for p in model.parameters())

    assert need(30) == 10 * need(3) and need(3) < 4 * 2**20 < need(30)
    bad_input(tmp_path, ["run", "--method", "deep_ensemble", "--set", "num_members=30", "--backbone", "cnn_small",
                         "--dataset", "digits", "--epochs", "1", "--out", "out"], capsys,
              "num_members': 30", "more than the 0.0 GiB of cpu memory")
    # `cost` builds the model for real: the same line before it tries (not an allocator error, or a kill)
    bad_input(tmp_path, ["cost", "--method", "deep_ensemble", "--set", "num_members=30", "--backbone", "cnn_small",
                         "--dataset", "digits"], capsys, "num_members': 30", "more than the 0.0 GiB of cpu memory")


def test_a_batch_larger_than_the_training_split_is_said(capsys):
    """A batch larger than the training split trains one full-batch step an epoch: said in one warning line
    when the run is planned (a small dataset still runs with the shared batch; the record holds both numbers)."""
    import warnings

    from ensemble_bench.resolve import make_run_config

    settings = dict(method="single", backbone="cnn_small", dataset="digits", epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_run_config(dict(settings, batch_size=128))
        assert not [w for w in caught if "full-batch" in str(w.message)]
        make_run_config(dict(settings, batch_size=5000))
    (w,) = [w for w in caught if "full-batch" in str(w.message)]
    assert "5000" in str(w.message) and "1,294" in str(w.message) and "digits" in str(w.message)


def test_compile_on_a_cpu_without_a_cxx_compiler_is_refused_before_any_write(tmp_path, capsys, monkeypatch):
    """`--compile` on a CPU needs a C++ compiler (inductor's kernels): without one the run would fail at its
    first step with a traceback and a failed record; it is one line, exit 2, nothing written."""
    from torch._inductor import config as inductor_config

    monkeypatch.chdir(tmp_path)
    with inductor_config.patch({"cpp.cxx": ("no-such-cxx-compiler",)}):   # (monkeypatch's undo breaks this config)
        bad_input(tmp_path, ["run", "--method", "single", *T, "--device", "cpu", "--compile", "--out", "out"], capsys,
                  "--compile on the CPU needs a C++ compiler", "no-such-cxx-compiler")
    assert inductor_config.cpp.cxx != ("no-such-cxx-compiler",)
