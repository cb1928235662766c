"""The shift track wired in: ``run --shift``, ``ensemble-bench evaluate`` (metrics added to complete records
from their kept weights, no training), the rebuild + strict load of every registered method, the shift
columns and mCE of the leaderboard, and the report's severity and risk-coverage figures.

CIFAR-10 tests use a small real subset of the development copies (2,000 training and 500 test images, the
first images of each file, written to a temporary data folder with a 50-image, 2-corruption CIFAR-10-C made
by ``corrupt``), so one resnet8 epoch takes seconds; the digits tests train every method for one epoch."""
from __future__ import annotations

import copy
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from ensemble_bench import formatting, leaderboard, predictions, records
from ensemble_bench.cli import main

CORRUPTIONS = ("gaussian_noise", "contrast")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_close(a, b, where="$"):
    """Nested dicts / lists with the same keys and numbers equal to 1e-6 (relative)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, a, b)
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-9), (where, a, b)
    else:
        assert a == b, (where, a, b)


def _one_line_exit_2(capsys, *argv) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("ensemble-bench: error:"), err
    return lines[-1]


def _exit_2_lines(capsys, *argv) -> list[str]:
    """The stderr lines of a command that exits 2 (the last one the error line)."""
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("ensemble-bench: error:"), err
    return lines


def _only_line(capsys, *argv) -> str:
    """A command given one record that cannot be evaluated: exit 2 and its reason once, as the only line."""
    lines = _exit_2_lines(capsys, *argv)
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cifar_dir(shared_data, tmp_path_factory) -> Path:
    """A data folder: the first 2,000 training / 500 test / 300 OOD images of the development copies and
    CIFAR-10-C made from its test split by `corrupt` (2 corruptions x 5 severities x 50 images)."""
    from ensemble_bench.shift import corrupt_command

    d = tmp_path_factory.mktemp("cifar_data")
    with np.load(shared_data / "cifar10_train.npz") as z:
        np.savez(d / "cifar10_train.npz", x_train=z["x_train"][:2000], y_train=z["y_train"][:2000])
    with np.load(shared_data / "cifar10_test.npz") as z:
        np.savez(d / "cifar10_test.npz", x_test=z["x_test"][:500], y_test=z["y_test"][:500])
    for name in ("svhn", "cifar100_test"):
        with np.load(shared_data / f"{name}.npz") as z:
            np.savez(d / f"{name}.npz", x=z["x"][:300], y=z["y"][:300])
    corrupt_command("cifar10", d, d, corruptions=list(CORRUPTIONS), limit=50, seed=0, progress=False)
    return d


@pytest.fixture(scope="module")
def cifar_run(cifar_dir, tmp_path_factory):
    """One resnet8 epoch of `single` with --shift cifar10c: (runs folder, record)."""
    out = tmp_path_factory.mktemp("cifar_runs")
    code = main(["run", "--method", "single", "--backbone", "resnet8", "--dataset", "cifar10", "--epochs", "1",
                 "--data-dir", str(cifar_dir), "--shift", "cifar10c", "--device", "cpu", "--no-progress",
                 "--out", str(out)])
    assert code == 0
    (path,) = [p for p in out.glob("*.json")]
    return out, json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ run --shift
@pytest.mark.slow
def test_run_with_shift_writes_shift_metrics_and_predictions(cifar_run, cifar_dir, capsys):
    out, rec = cifar_run
    rid = rec["run_id"]
    assert rec["status"] == "complete" and rec["config"]["shift"] == "cifar10c"
    sft = rec["metrics"]["shift"]
    assert sft["set"] == "cifar10c" and sft["corruptions"] == list(CORRUPTIONS)
    assert sft["severities"] == [1, 2, 3, 4, 5] and sft["n_per_severity"] == 50
    assert sft["temperature"] == pytest.approx(rec["metrics"]["temperature"])    # fitted on clean validation
    assert set(sft["per_corruption"]["contrast"]) == {"1", "2", "3", "4", "5"}
    for k in ("acc", "nll", "ece", "brier", "nll_ts", "ece_ts", "aurc", "acc_at_95", "ece_adaptive"):
        assert math.isfinite(sft["mean"][k]), k
    assert rec["data"]["shift"]["root"] == str(cifar_dir / "CIFAR-10-C")
    assert rec["data"]["shift"]["generator"] == "ensemble-bench"
    assert rec["timings"]["shift_eval_s"] > 0
    # --shift is not part of the experiment: the same run id as without it
    from ensemble_bench.resolve import make_run_config

    values = {k: v for k, v in rec["config"].items() if k != "shift"}
    assert make_run_config(values).run_id() == rid
    # the shift logits are in the predictions file, and `score` recomputes the shift metrics from it
    with np.load(out / f"{rid}.preds.npz") as z:
        keys = set(z.files)
        assert z["shift_contrast_5"].dtype == np.float16 and z["shift_contrast_5"].shape == (1, 50, 10)
    assert {f"shift_{c}_{s}" for c in CORRUPTIONS for s in range(1, 6)} | {"shift_labels"} <= keys
    code, stdout, _ = run_cli(capsys, "score", out / f"{rid}.preds.npz")
    assert code == 0
    scored = json.loads(stdout)["shift"]
    for k in ("acc", "nll", "ece", "nll_ts"):
        assert scored["mean"][k] == pytest.approx(sft["mean"][k], abs=3e-3), k
    # a second `run --shift` of the complete run is skipped, and says how to add a shift evaluation
    code, _, err = run_cli(capsys, "run", "--method", "single", "--backbone", "resnet8", "--dataset", "cifar10",
                           "--epochs", "1", "--data-dir", cifar_dir, "--shift", "cifar10c", "--device", "cpu",
                           "--no-progress", "--out", out)
    assert code == 0 and "complete record exists, skipped" in err


@pytest.mark.slow
def test_shift_bad_input_is_refused_before_any_work(cifar_dir, tmp_path, capsys):
    no_set = tmp_path / "no_set"
    no_set.mkdir()
    for f in cifar_dir.glob("*.npz"):
        (no_set / f.name).symlink_to(f)
    base = ["run", "--method", "single", "--backbone", "resnet8", "--epochs", "1", "--no-progress"]
    cases = [
        ([*base, "--dataset", "cifar10", "--data-dir", no_set, "--shift", "cifar10c"], "CIFAR-10-C: no such folder"),
        ([*base, "--dataset", "cifar10", "--data-dir", cifar_dir, "--shift", "cifar100c"], "corrupted cifar100 test set"),
        ([*base, "--dataset", "digits", "--shift", "cifar10c"], "corrupted cifar10 test set"),
        ([*base, "--dataset", "cifar10", "--data-dir", cifar_dir, "--shift", "imagenetc"], "unknown shift set 'imagenetc'"),
    ]
    for k, (argv, msg) in enumerate(cases):
        out = tmp_path / f"out{k}"
        line = _one_line_exit_2(capsys, *argv, "--out", out)
        assert msg in line, line
        assert not out.exists()
    # a sweep takes `shift` in [run] (refusing a missing set before anything runs), never in [grid]
    from ensemble_bench import sweep
    from ensemble_bench.errors import UsageError

    def spec(text: str) -> Path:
        p = tmp_path / "spec.toml"
        p.write_text(text)
        return p

    ok = sweep.expand(sweep.load_spec(spec(f"""
        [grid]
        seed = [0]
        [run]
        method = "single"
        backbone = "resnet8"
        dataset = "cifar10"
        epochs = 1
        data_dir = "{cifar_dir}"
        shift = "cifar10c"
        out = "{tmp_path / 'sweep'}"
        """)))
    assert len(ok) == 1 and ok[0].shift == "cifar10c"
    assert ok[0].run_id() == ok[0].replace(shift=None).run_id()
    with pytest.raises(UsageError, match="CIFAR-10-C: no such folder"):
        sweep.expand(sweep.load_spec(spec(f"""
            [grid]
            seed = [0]
            [run]
            method = "single"
            backbone = "resnet8"
            dataset = "cifar10"
            data_dir = "{no_set}"
            shift = "cifar10c"
            """)))
    with pytest.raises(UsageError, match="set it in \\[run\\]"):
        sweep.load_spec(spec("""
            [grid]
            shift = ["cifar10c"]
            [run]
            method = "single"
            backbone = "resnet8"
            dataset = "cifar10"
            """))


# ------------------------------------------------------------------------------------------ evaluate
def _strip_shift(folder: Path, rid: str) -> dict:
    """Make the copied run look like one made without --shift: no shift metrics, data, timing or logits."""
    path = folder / f"{rid}.json"
    rec = json.loads(path.read_text())
    del rec["metrics"]["shift"], rec["data"]["shift"], rec["timings"]["shift_eval_s"]
    rec["config"]["shift"] = None
    rec["metrics"]["ood"].pop("svhn")
    path.write_text(json.dumps(rec))
    p = folder / f"{rid}.preds.npz"
    with np.load(p) as z:
        kept = {k: z[k] for k in z.files if not k.startswith("shift_") and k != "ood_svhn"}
    np.savez_compressed(p, **kept)
    return rec


@pytest.mark.slow
def test_evaluate_adds_shift_and_ood_metrics_and_keeps_the_rest(cifar_run, cifar_dir, tmp_path, capsys):
    src, ran = cifar_run
    rid = ran["run_id"]
    runs = tmp_path / "runs"
    shutil.copytree(src, runs)
    before = _strip_shift(runs, rid)
    record = runs / f"{rid}.json"
    # bad input first: one line, exit 2, the record untouched
    assert "needs --shift NAME and/or --ood NAME" in _one_line_exit_2(capsys, "evaluate", record)
    assert "unknown OOD set 'mnist'" in _one_line_exit_2(capsys, "evaluate", record, "--ood", "mnist")
    assert "unknown shift set" in _one_line_exit_2(capsys, "evaluate", record, "--shift", "cifar10-c")
    no_set = tmp_path / "no_set"
    no_set.mkdir()
    for f in cifar_dir.glob("*.npz"):
        (no_set / f.name).symlink_to(f)
    assert "CIFAR-10-C: no such folder" in _one_line_exit_2(capsys, "evaluate", record, "--shift", "cifar10c",
                                                            "--data-dir", no_set)
    assert json.loads(record.read_text()) == before

    code, stdout, err = run_cli(capsys, "evaluate", record, "--shift", "cifar10c", "--ood", "svhn",
                                "--data-dir", cifar_dir, "--device", "cpu", "--no-progress")
    assert code == 0, err
    (summary,) = json.loads(stdout)
    assert summary["run_id"] == rid and summary["shift"] == "cifar10c"
    after = json.loads(record.read_text())
    # the added metrics are those the run computed (same weights, same data, same code path)
    assert_close(after["metrics"]["shift"], ran["metrics"]["shift"])
    assert_close(after["metrics"]["ood"]["svhn"], ran["metrics"]["ood"]["svhn"])
    assert after["data"]["shift"] == ran["data"]["shift"]
    # everything else is kept as it was
    rest = copy.deepcopy(after)
    del rest["metrics"]["shift"], rest["data"]["shift"], rest["timings"]["shift_eval_s"], rest["evaluations"]
    rest["metrics"]["ood"].pop("svhn")
    assert rest == before
    (entry,) = after["evaluations"]
    assert entry["shift"] == "cifar10c" and entry["ood"] == ["svhn"] and entry["test_logits_max_abs_diff"] == 0.0
    # the predictions file gained the new logits; `score` reads them
    with np.load(runs / f"{rid}.preds.npz") as z:
        assert "ood_svhn" in z.files and "shift_gaussian_noise_3" in z.files and "val_logits" in z.files
    code, stdout, _ = run_cli(capsys, "score", runs / f"{rid}.preds.npz")
    assert code == 0 and json.loads(stdout)["shift"]["mean"]["acc"] == pytest.approx(
        after["metrics"]["shift"]["mean"]["acc"], abs=3e-3)
    # evaluating again replaces the shift entry and appends to the evaluations
    code, _, _ = run_cli(capsys, "evaluate", runs, "--shift", "cifar10c", "--data-dir", cifar_dir, "--no-progress")
    assert code == 0 and len(json.loads(record.read_text())["evaluations"]) == 2

    # a record without kept weights: one line that says why, exit 2 when nothing could be evaluated
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(record, bare / record.name)
    *why, last = _exit_2_lines(capsys, "evaluate", bare, "--shift", "cifar10c", "--data-dir", cifar_dir)
    assert len(why) == 1 and "--no-keep-weights or before weights were kept" in why[0]
    assert "nothing evaluated: all 1 record(s) skipped" in last
    # other data than the run's (another subset): the run id check refuses it
    other = tmp_path / "other_data"
    shutil.copytree(cifar_dir, other, symlinks=True)
    with np.load(cifar_dir / "cifar10_test.npz") as z:
        np.savez(other / "cifar10_test.npz", x_test=z["x_test"][:400], y_test=z["y_test"][:400])
    line = _one_line_exit_2(capsys, "evaluate", record, "--shift", "cifar10c", "--data-dir", other)
    assert "differ from the run's" in line
    # another model's weights beside the record (they rebuild, but not into the model that made it): refused,
    # the record untouched, not another model's OOD numbers written into it
    from safetensors.torch import load_file, save_file

    weights = runs / f"{rid}.weights.safetensors"
    state = load_file(str(weights))
    save_file({k: (v * 1.5 if v.is_floating_point() else v) for k, v in state.items()}, str(weights))
    kept = record.read_text()
    line = _only_line(capsys, "evaluate", record, "--ood", "svhn", "--data-dir", cifar_dir)
    assert "not the model this record was made with" in line
    assert record.read_text() == kept


# ------------------------------------------------------------------------------------------ evaluate: plugins, skips
@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """Two complete `single` runs (cnn_small, one epoch on digits, seeds 0 and 1) with kept weights and
    predictions: (runs folder, [run ids]). Tests evaluate copies of the folder."""
    from ensemble_bench.resolve import make_run_config
    from ensemble_bench.runner import execute

    out = tmp_path_factory.mktemp("digits_runs")
    rids = []
    for seed in (0, 1):
        cfg = make_run_config({"method": "single", "backbone": "cnn_small", "dataset": "digits", "epochs": 1,
                               "lr": 0.05, "seed": seed, "device": "cpu", "progress": False, "latency_runs": 2,
                               "out": str(out)})
        rids.append(execute(cfg, log=lambda s: None)["run_id"])
    return out, rids


def _copy_runs(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _marker_plugin(path: Path, marker: Path) -> Path:
    """A plugin file that, when imported, writes ``marker``."""
    path.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n")
    return path


@pytest.fixture
def own_plugin_state(monkeypatch):
    """Plugins a test imports (--plugin) are forgotten after it (the process's plugin list as it was)."""
    from ensemble_bench import plugins

    monkeypatch.setattr(plugins, "_loaded", dict(plugins._loaded))


EVAL = ("--ood", "photos", "--device", "cpu", "--no-progress")


def test_evaluate_never_imports_a_plugin_a_record_names(digits_runs, tmp_path, capsys, monkeypatch):
    """A copied complete record edited to name a plugin (a file, or a module on the import path), even with
    that file's sha256 in code.plugins: evaluate imports nothing, refuses the record with one line that
    names the plugin and says how to pass it, evaluates the folder's other record, exits 2."""
    from ensemble_bench import plugins

    src, (rid, other) = digits_runs
    runs = _copy_runs(src, tmp_path / "runs")
    marker = tmp_path / "MARKER"
    evil = _marker_plugin(tmp_path / "evil_planted.py", marker)
    _marker_plugin(tmp_path / "evil_planted_module.py", marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    record = runs / f"{rid}.json"
    rec = json.loads(record.read_text())
    assert rec["config"]["plugins"] == [] and "plugins" not in rec["code"]
    for n, spec in enumerate((str(evil), "evil_planted_module")):
        rec["config"]["plugins"] = [spec]
        rec["code"]["plugins"] = [{"spec": spec, "module": "m", "sha256": plugins.file_sha256(evil)}]
        record.write_text(json.dumps(rec))
        planted = record.read_text()
        line = _only_line(capsys, "evaluate", record, *EVAL)
        assert f"plugin {spec}," in line and f"pass --plugin {spec} if you trust" in line, line
        *why, last = _exit_2_lines(capsys, "evaluate", runs, *EVAL)
        assert len(why) == 2 and [w for w in why if f"pass --plugin {spec}" in w] == [
            next(w for w in why if w.startswith(f"{rid}: "))], why
        assert any(w.startswith(f"{other}: evaluated") for w in why), why
        assert last == "ensemble-bench: error: 1 of 2 record(s) skipped (why: the lines above); the other 1 evaluated"
        assert not marker.exists()
        assert "evil_planted_module" not in sys.modules
        assert record.read_text() == planted
        assert len(json.loads((runs / f"{other}.json").read_text())["evaluations"]) == n + 1
    # the API's rebuild refuses it too, before anything is imported
    from ensemble_bench.errors import UsageError
    from ensemble_bench.evaluate import rebuild

    with pytest.raises(UsageError, match="pass --plugin evil_planted_module if you trust"):
        rebuild(json.loads(record.read_text()), runs)
    assert not marker.exists()


def test_evaluate_uses_a_records_plugin_only_when_given_and_unchanged(digits_runs, tmp_path, capsys,
                                                                      own_plugin_state):
    """A record whose run used a plugin file (config.plugins and its sha256 in code.plugins, as `run
    --plugin` records them): refused until the plugin is given with --plugin; refused when the given file
    is not the one the run was trained with; evaluated when it is (also from where it was moved to)."""
    from ensemble_bench import plugins

    src, (rid, _) = digits_runs
    runs = _copy_runs(src, tmp_path / "runs")
    marker = tmp_path / "IMPORTED"
    mine = _marker_plugin(tmp_path / "mine_given.py", marker)
    record = runs / f"{rid}.json"
    rec = json.loads(record.read_text())
    rec["config"]["plugins"] = [str(mine)]
    rec["code"]["plugins"] = [{"spec": str(mine), "module": "m", "sha256": plugins.file_sha256(mine)}]
    record.write_text(json.dumps(rec))
    written = record.read_text()
    # not given: one line, not imported, the record as it was
    line = _only_line(capsys, "evaluate", record, *EVAL)
    assert f"pass --plugin {mine} if you trust" in line
    assert not marker.exists() and record.read_text() == written
    # given, but the record was trained with another file of that name: one line, the record as it was
    changed = copy.deepcopy(rec)
    changed["code"]["plugins"][0]["sha256"] = "0" * 16
    record.write_text(json.dumps(changed))
    line = _only_line(capsys, "evaluate", record, *EVAL, "--plugin", mine)
    assert f"plugin {mine} is not the code this run was trained with" in line and "0" * 16 in line, line
    assert marker.exists()   # given explicitly: imported (by --plugin, before the record is read)
    assert json.loads(record.read_text()) == changed
    # given and the same file: evaluated, the evaluation names the plugin it used
    record.write_text(written)
    code, out, err = run_cli(capsys, "evaluate", record, *EVAL, "--plugin", mine)
    assert code == 0, err
    (entry,) = json.loads(record.read_text())["evaluations"]
    assert entry["code"]["plugins"][0]["spec"] == str(mine) and entry["test_logits_max_abs_diff"] == 0.0
    # the file was moved since the run: the given file of the same content stands for it
    moved = copy.deepcopy(rec)
    moved["config"]["plugins"] = [str(tmp_path / "gone" / "mine_given.py")]
    moved["code"]["plugins"][0]["spec"] = moved["config"]["plugins"][0]
    record.write_text(json.dumps(moved))
    code, out, err = run_cli(capsys, "evaluate", record, *EVAL, "--plugin", mine)
    assert code == 0, err


def test_evaluate_folder_exits_2_after_the_others_when_it_skipped_a_record(digits_runs, tmp_path, capsys):
    """A folder with one record whose weights do not reproduce its saved predictions: the other record is
    evaluated, the skipped one's reason printed once, a last line counts the skipped, exit 2; the record
    alone: its reason once, exit 2. The same for a record without kept weights."""
    from safetensors.torch import load_file, save_file

    from ensemble_bench.evaluate import EvaluationIncomplete, evaluate_records

    src, (good, bad) = digits_runs
    runs = _copy_runs(src, tmp_path / "runs")
    weights = runs / f"{bad}.weights.safetensors"
    save_file({k: (v * 1.5 if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()},
              str(weights))
    kept = (runs / f"{bad}.json").read_text()
    *why, last = _exit_2_lines(capsys, "evaluate", runs, *EVAL)
    reason = [w for w in why if "not the model this record was made with" in w]
    assert len(reason) == 1 and reason[0].startswith(f"{bad}: "), why
    assert sum("not the model" in w for w in why + [last]) == 1
    assert last == "ensemble-bench: error: 1 of 2 record(s) skipped (why: the lines above); the other 1 evaluated"
    assert len(json.loads((runs / f"{good}.json").read_text())["evaluations"]) == 1
    assert (runs / f"{bad}.json").read_text() == kept
    line = _only_line(capsys, "evaluate", runs / f"{bad}.json", *EVAL)
    assert line.startswith(f"ensemble-bench: error: {bad}: ") and "not the model this record was made with" in line
    # the API: EvaluationIncomplete (a UsageError) with the summaries of those done, each skip logged once
    logs: list[str] = []
    with pytest.raises(EvaluationIncomplete) as info:
        evaluate_records(runs, ood=["photos"], device="cpu", progress=False, log=logs.append)
    assert [d["run_id"] for d in info.value.done] == [good] and len(info.value.skipped) == 1
    assert sum("not the model" in ln for ln in logs) == 1
    # no kept weights: skipped before any work, the same exit and single message
    weights.unlink()
    *why, last = _exit_2_lines(capsys, "evaluate", runs, *EVAL)
    assert sum("--no-keep-weights" in w for w in why + [last]) == 1 and "1 of 2 record(s) skipped" in last
    line = _only_line(capsys, "evaluate", runs / f"{bad}.json", *EVAL)
    assert "--no-keep-weights or before weights were kept" in line and not line.endswith("skipped")
    assert (runs / f"{bad}.json").read_text() == kept
    assert len(json.loads((runs / f"{good}.json").read_text())["evaluations"]) == 3


# ------------------------------------------------------------------------------------------ rebuild + load
@pytest.mark.slow
def test_every_method_rebuilds_from_its_weights(tmp_path, capsys):
    """Every registered method (and the batched deep ensemble) trained one epoch on digits: the model that
    ``rebuild`` makes from the record (method.build + strict load of the kept weights) predicts what the run
    saved, to the float16 the predictions are stored in; `evaluate --ood photos` then recomputes the run's
    OOD metrics and changes nothing else; `--shift cifar10c` is refused for digits records."""
    import ensemble_bench.methods as methods
    from ensemble_bench import data
    from ensemble_bench.resolve import make_run_config
    from ensemble_bench.evaluate import rebuild
    from ensemble_bench.runner import execute
    from ensemble_bench.train import Trainer

    out = tmp_path / "runs"
    # two members where a method has a size (the architecture is what is checked), one snapshot per epoch
    small = {"batch_ensemble": {"num_members": 2}, "deep_ensemble": {"num_members": 2},
             "dst_ensemble": {"num_members": 2}, "edst_ensemble": {"num_members": 2},
             "mc_dropout": {"num_estimators": 4}, "mimo": {"num_estimators": 2},
             "packed": {"num_estimators": 2}, "snapshot": {"num_snapshots": 2}}
    variants = [(name, {**methods.get(name).quickstart_options, **small.get(name, {})}) for name in methods.names()]
    variants.append(("deep_ensemble", {"num_members": 2, "batched": True}))
    assert {"single", "deep_ensemble", "packed", "mimo", "nfe", "bridge", "dst_ensemble"} <= {n for n, _ in variants}
    records = []
    for name, options in variants:
        cfg = make_run_config({"method": name, "backbone": "cnn_small", "dataset": "digits",
                               "epochs": 2 if name == "snapshot" else 1, "lr": 0.05, "device": "cpu",
                               "progress": False, "latency_runs": 2, "out": str(out), "options": options})
        records.append(execute(cfg, log=lambda s: None))
    bundle = data.load("digits")
    for rec in records:
        rid = rec["run_id"]
        assert rec["weights"] == f"{rid}.weights.safetensors"
        cfg, _, model = rebuild(rec, out)
        assert cfg.run_id() == rid
        logits = Trainer(bundle, cfg, "cpu").predict(model, bundle.test.x)
        saved = predictions.load_predictions(out, rid, dtype=None)["logits"]
        np.testing.assert_array_equal(logits.numpy().astype(np.float16), saved, err_msg=rec["method"]["name"])
    before = {r["run_id"]: json.loads((out / f"{r['run_id']}.json").read_text()) for r in records}
    code, stdout, err = run_cli(capsys, "evaluate", out, "--ood", "photos", "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert sorted(s["run_id"] for s in json.loads(stdout)) == sorted(before)
    for rid, old in before.items():
        new = json.loads((out / f"{rid}.json").read_text())
        assert_close(new["metrics"]["ood"]["photos"], old["metrics"]["ood"]["photos"], rid)
        assert new["evaluations"][0]["test_logits_max_abs_diff"] == 0.0, rid
        new.pop("evaluations")
        new["metrics"]["ood"] = old["metrics"]["ood"]
        assert new == old, rid
    *why, last = _exit_2_lines(capsys, "evaluate", out, "--shift", "cifar10c")
    assert len(why) == len(records) and all("corrupted cifar10 test set" in w for w in why)
    assert f"nothing evaluated: all {len(records)} record(s) skipped" in last


# ------------------------------------------------------------------------------------------ leaderboard
def _shift_record(run_id, method, seed, accs, *, members=1, size_reference=True, lr=0.1, n=50):
    """A complete record with metrics.shift: ``accs`` = {corruption: [acc at severity 1..5]}."""
    per = {c: {str(s + 1): {"acc": a, "nll": 1.0 - a, "ece": 0.1 * (s + 1)} for s, a in enumerate(v)}
           for c, v in accs.items()}
    cells = [m for by in per.values() for m in by.values()]
    by_sev = {str(s): {k: float(np.mean([per[c][str(s)][k] for c in per])) for k in ("acc", "nll", "ece")}
              for s in range(1, 6)}
    return {
        "schema_version": 1, "run_id": run_id, "status": "complete",
        "config": {"method": method, "backbone": "resnet8", "dataset": "cifar10", "epochs": 1, "seed": seed,
                   "batch_size": 128, "lr": lr, "options": {}, "data_id": {"sha256": "abc"}},
        "method": {"name": method, "options": {"num_members": members} if members > 1 else {},
                   "combine": "probs", "num_members": members, "size_reference": size_reference},
        "data": {"shift": {"set": "cifar10c", "generator": "ensemble-bench"}},
        "metrics": {"acc": 0.9, "nll": 0.3, "ece": 0.02, "aurc": 0.01, "acc_at_95": 0.93, "ece_adaptive": 0.02,
                    "shift": {"set": "cifar10c", "n_per_severity": n, "per_corruption": per,
                              "by_severity": by_sev,
                              "mean": {k: float(np.mean([m[k] for m in cells])) for k in ("acc", "nll", "ece")}}},
        "cost": {"params": 1.0, "latency_device": "cpu"},
        "training": {"device": "cpu"},
    }


def test_leaderboard_shift_columns_and_mce():
    single = {0: {"fog": [0.9, 0.8, 0.7, 0.6, 0.5], "snow": [0.8, 0.8, 0.8, 0.8, 0.8]},
              1: {"fog": [0.8, 0.8, 0.7, 0.6, 0.5], "snow": [0.8, 0.7, 0.8, 0.8, 0.8]}}
    de = {"fog": [0.95, 0.9, 0.8, 0.7, 0.6], "snow": [0.9, 0.9, 0.9, 0.9, 0.9]}
    recs = [_shift_record(f"s{s}", "single", s, single[s]) for s in (0, 1)]
    recs.append(_shift_record("de0", "deep_ensemble", 0, de, members=4))
    recs.append(_shift_record("pk0", "packed", 0, de, members=4, size_reference=False, lr=0.05))   # other recipe
    recs.append(_shift_record("mm0", "mimo", 0, de, members=3, size_reference=False, n=10))        # other set size
    df = leaderboard.leaderboard(recs)
    row = {r["method"]: r for _, r in df.iterrows()}
    assert "_shift_errors" not in df.columns
    # by hand: per corruption, the errors summed over severities / the single model's (mean of its 2 seeds)
    err = lambda accs: sum(1 - a for a in accs)                                       # noqa: E731
    ref = {c: (err(single[0][c]) + err(single[1][c])) / 2 for c in ("fog", "snow")}
    expected = 100 * np.mean([err(de[c]) / ref[c] for c in ("fog", "snow")])
    assert row["deep_ensemble"]["mce"] == pytest.approx(expected)
    assert row["single"]["mce"] == pytest.approx(100.0)
    assert math.isnan(row["packed"]["mce"]) and math.isnan(row["mimo"]["mce"])       # no single-model row to compare
    # a seed of the single model recorded twice counts once: in its row and in the reference alike
    again = _shift_record("s1-again", "single", 1, {"fog": [0.1] * 5, "snow": [0.1] * 5})
    with pytest.warns(UserWarning, match="counted once"):
        twice = {r["method"]: r for _, r in leaderboard.leaderboard([*recs, again]).iterrows()}
    assert twice["single"]["mce"] == pytest.approx(100.0) and twice["deep_ensemble"]["mce"] == pytest.approx(expected)
    # a bf16 run is not compared with the fp32 single model
    bf16 = _shift_record("de-bf16", "deep_ensemble", 0, de, members=4)
    bf16["training"]["precision"] = "bf16"
    by_precision = leaderboard.leaderboard([*recs, bf16])
    assert math.isnan(by_precision[by_precision["precision"] == "bf16"].iloc[0]["mce"])
    assert row["deep_ensemble"]["shift_acc_mean"] == pytest.approx(np.mean(de["fog"] + de["snow"]))
    assert row["single"]["shift_acc_s2_mean"] == pytest.approx(np.mean([0.8, 0.8, 0.8, 0.7]))
    assert row["single"]["shift_acc_s2_std"] == pytest.approx(np.std([0.8, 0.75], ddof=1))
    assert row["deep_ensemble"]["acc_at_95_mean"] == 0.93 and row["deep_ensemble"]["aurc_mean"] == 0.01
    md = formatting.format_markdown(df)
    assert "shift acc (%)" in md and "mCE (%)" in md and "| 100.0 |" in md
    # a seed without a shift evaluation: the row's shift values are NaN, never averaged over fewer seeds
    partial = copy.deepcopy(recs[:2])
    del partial[1]["metrics"]["shift"]
    r2 = leaderboard.leaderboard(partial).iloc[0]
    assert math.isnan(r2["shift_acc_mean"]) and math.isnan(r2["mce"])
    # without any shift evaluation: no shift columns, and the markdown has none
    plain = copy.deepcopy(recs[:2])
    for r in plain:
        del r["metrics"]["shift"]
    df3 = leaderboard.leaderboard(plain)
    assert "shift_acc_mean" not in df3.columns and "mce" not in df3.columns
    assert "shift acc" not in formatting.format_markdown(df3)


def test_higher_is_better_directions():
    for m in ("acc", "member_acc", "acc_at_95", "shift_acc", "shift_acc_s3", "auroc_svhn", "aupr_in_svhn"):
        assert leaderboard.higher_is_better(m), m
    for m in ("nll", "ece", "ece_adaptive", "aurc", "brier", "fpr95_svhn", "shift_nll", "shift_ece", "mce"):
        assert not leaderboard.higher_is_better(m), m


def test_corruption_error_edge_cases():
    assert leaderboard.corruption_error({"fog": {"1": 0.2}}, {"fog": {"1": 0.4}}) == pytest.approx(50.0)
    assert math.isnan(leaderboard.corruption_error({"fog": {"1": 0.2}}, {"snow": {"1": 0.4}}))       # cell missing
    assert math.isnan(leaderboard.corruption_error({"fog": {"1": 0.2}}, {"fog": {"1": 0.0}}))        # reference perfect
    assert math.isnan(leaderboard.corruption_error({}, {"fog": {"1": 0.4}}))


# ------------------------------------------------------------------------------------------ report
@pytest.mark.slow
def test_report_has_severity_and_risk_coverage_figures(cifar_run, tmp_path):
    from ensemble_bench.report import build_report, shift_curve

    out, rec = cifar_run
    rep = build_report(out, tmp_path / "report")
    stems = {Path(f.stem).name for f in rep.figures}
    assert {"shift_severity", "risk_coverage"} <= stems
    from ensemble_bench.report.figures_shift import _shift_pool

    pooled = _shift_pool(predictions.load_predictions(out, rec["run_id"]))     # the risk-coverage of the shifted panel
    assert pooled is not None and pooled[0].shape == (2 * 5 * 50, 10) and pooled[1].shape == (500,)
    for stem in ("shift_severity", "risk_coverage"):
        assert (tmp_path / "report" / "figures" / "cifar10_resnet8" / f"{stem}.png").is_file()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "shift acc (%)" in md and "mCE (%)" in md and "AURC (%)" in md
    xs, mean, lo, hi = shift_curve([rec], "acc")
    assert list(xs) == [0, 1, 2, 3, 4, 5] and mean[0] == rec["metrics"]["acc"]
    assert mean[3] == pytest.approx(rec["metrics"]["shift"]["by_severity"]["3"]["acc"])
    assert all(lo[1:] <= mean[1:] + 1e-12) and all(mean[1:] <= hi[1:] + 1e-12)
    # records without shift metrics: no severity figure
    plain = tmp_path / "plain"
    plain.mkdir()
    r = copy.deepcopy(rec)
    del r["metrics"]["shift"]
    records.write_record(plain, r)
    rep2 = build_report(plain, tmp_path / "report2")
    assert not {"shift_severity", "risk_coverage"} & {Path(f.stem).name for f in rep2.figures}


@pytest.mark.parametrize("preds", ["missing", "truncated", "garbage"])
def test_another_models_weights_are_refused_without_saved_predictions(digits_runs, tmp_path, capsys, preds):
    """Seed 1's weights under seed 0's name, with seed 0's predictions file missing (save_predictions = false),
    truncated or random bytes: the rebuilt model's test accuracy and NLL are not the record's, so the record
    is refused (one line, exit 2) and keeps its numbers; never seed 1's OOD metrics written into it. An
    unreadable predictions file is a one-line warning (no traceback, no advice to unpickle), not a crash."""
    src, (rid, other) = digits_runs
    runs = _copy_runs(src, tmp_path / "runs")
    ppath = runs / f"{rid}.preds.npz"
    if preds == "missing":
        ppath.unlink()
    elif preds == "truncated":
        ppath.write_bytes(ppath.read_bytes()[:300])
    else:
        ppath.write_bytes(b"garbage\n")
    record = runs / f"{rid}.json"
    # the record's own weights: evaluated (the unreadable predictions only warned about, not updated)
    code, out, err = run_cli(capsys, "evaluate", record, *EVAL)
    assert code == 0 and "Traceback" not in err, err
    if preds != "missing":
        warning = [ln for ln in err.splitlines() if "saved predictions unreadable" in ln]
        assert len(warning) == 1 and "not a readable predictions file" in warning[0]
        assert "pickle" not in err
    # another model's weights: refused
    shutil.copy(runs / f"{other}.weights.safetensors", runs / f"{rid}.weights.safetensors")
    kept = record.read_text()
    line = _only_line(capsys, "evaluate", record, *EVAL)
    assert line.startswith(f"ensemble-bench: error: {rid}: the rebuilt model's test ")
    assert "not the model this record was made with" in line
    assert record.read_text() == kept


def test_evaluate_refuses_a_folder_it_cannot_write(digits_runs, tmp_path, capsys, monkeypatch):
    """Records are rewritten in place: a folder where nothing can be created is one line, exit 2, before any
    work (as `run --out`), not a traceback from the lock file."""
    import tempfile

    src, (rid, _) = digits_runs
    runs = _copy_runs(src, tmp_path / "runs")
    before = {p.name: p.stat().st_mtime_ns for p in runs.iterdir()}

    def refuse(*a, **k):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    for target in (runs, runs / f"{rid}.json"):
        line = _only_line(capsys, "evaluate", target, *EVAL)
        assert "cannot create anything in" in line and "Operation not permitted" in line
    assert {p.name: p.stat().st_mtime_ns for p in runs.iterdir()} == before
