"""The typed record (ensemble_bench.record_types): every stored record round-trips exactly, validation is one
line naming the field, unknown keys survive, and flatten_record reads a dict and a RunRecord alike."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from ensemble_bench import columns, records
from ensemble_bench.record_types import Cost, Metrics, MethodInfo, RunRecord, Training

ROOT = Path(__file__).resolve().parent.parent
STORED = sorted(p for p in (ROOT / "results").rglob("*.json")
                if "runs" in p.relative_to(ROOT / "results").parts and not p.name.startswith("."))


def _dump(d) -> str:
    return json.dumps(d, sort_keys=True)


def complete_record(run_id="r0", **over) -> dict:
    rec = {
        "schema_version": records.SCHEMA_VERSION, "run_id": run_id, "status": "complete",
        "config": {"method": "deep_ensemble", "backbone": "resnet18", "dataset": "cifar10", "epochs": 10, "seed": 0,
                   "batch_size": 128, "lr": 0.1, "options": {"num_members": 4}},
        "method": {"name": "deep_ensemble", "options": {"num_members": 4}, "size_reference": True,
                   "combine": "probs", "num_members": 4, "info": {}},
        "data": {"name": "cifar10"}, "code": {"harness_sha256": "a", "method_sha256": "b"}, "env": {},
        "timings": {"started": "2024-01-01T00:00:00", "wall_s": 3.0}, "error": None,
        "metrics": {"acc": 0.9, "nll": 0.3, "ece": 0.02, "brier": 0.15, "nll_ts": None,
                    "ood": {"svhn": {"msp": {"auroc": 0.9, "aupr_in": 0.8, "aupr_out": 0.85, "fpr95": 0.3}}}},
        "cost": {"params": 1000, "flops": 2e9, "latency_ms": 3.0, "latency_ms_p10": 2.9, "latency_ms_p90": 3.1,
                 "latency_device": "cpu", "device": "cpu", "per_layer": {"conv": 1}},
        "training": {"train_s": 10.0, "epochs_run": {"main": 10}, "samples_seen": 5000, "train_flops": None,
                     "stages": {"main": {"curve": [{"epoch": 1, "val_nll": 1.0}, {"epoch": 2, "val_nll": 0.9}]}},
                     "device": "cpu"},
    }
    rec.update(over)
    return rec


def test_there_are_stored_records():
    assert any("dev-leaderboard" in str(p) for p in STORED), STORED


@pytest.mark.parametrize("path", STORED, ids=lambda p: str(p.relative_to(ROOT / "results")))
def test_every_stored_record_round_trips_exactly(path):
    d = json.loads(path.read_text(encoding="utf-8"))       # reading only
    rec = RunRecord.from_dict(d, str(path))
    assert _dump(rec.to_dict()) == _dump(d)
    assert json.dumps(rec.to_dict()) == json.dumps(d)      # key order too: a rewrite changes nothing
    assert rec.schema_version == d["schema_version"] and rec.run_id == d["run_id"] and rec.status == d["status"]
    if rec.status == "complete":
        assert isinstance(rec.metrics, Metrics) and rec.metrics.acc == d["metrics"]["acc"]
        assert isinstance(rec.method, MethodInfo) and rec.method.name == d["method"]["name"]
        assert isinstance(rec.cost, Cost) and isinstance(rec.training, Training)
    # the loader gives the same typed record
    assert records.read_record(path, typed=True) == rec
    assert _dump(columns.flatten_record(d)) == _dump(columns.flatten_record(rec))


@pytest.mark.parametrize("folder", sorted({p.parent for p in STORED}), ids=lambda p: p.name)
def test_stored_folders_load_typed_without_problems(folder):
    typed, problems = records.load_records(folder, typed=True, statuses=None)
    plain, _ = records.load_records(folder, statuses=None)
    assert problems == [] and all(isinstance(r, RunRecord) for r in typed)
    assert [_dump(r.to_dict()) for r in typed] == [_dump(r) for r in plain]
    assert [r.run_id for r in records.load_typed(folder)[0]] == [r["run_id"] for r in records.load_records(folder)[0]]


def test_round_trip_of_a_made_record_and_typed_access():
    d = complete_record()
    rec = RunRecord.from_dict(d, "x.json")
    assert json.dumps(rec.to_dict()) == json.dumps(d)
    assert rec.is_complete and rec.metrics.acc == 0.9 and rec.metrics.nll_ts is None
    assert rec.method.num_members == 4 and rec.cost.params == 1000 and isinstance(rec.cost.params, int)
    assert rec.cost.extra == {"per_layer": {"conv": 1}} and rec.training.epochs_run == {"main": 10}
    assert rec.metrics.get("ood")["svhn"]["msp"]["auroc"] == 0.9 and rec.cost.get("per_layer") == {"conv": 1}
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.status = "failed"  # type: ignore[misc]


def test_unknown_keys_survive_the_round_trip(tmp_path):
    d = complete_record(weights="r0.weights.safetensors", future_section={"a": [1, 2]})
    d["metrics"]["new_metric"] = 0.5
    d["method"]["new_field"] = "x"
    d["cost"]["energy_j"] = 12.0
    d["training"]["train_s_extra"] = 1.5
    rec = RunRecord.from_dict(d, "x.json")
    assert rec.extra == {"weights": "r0.weights.safetensors", "future_section": {"a": [1, 2]}}
    assert rec.metrics.extra == {"new_metric": 0.5} and rec.method.extra == {"new_field": "x"}
    assert json.dumps(rec.to_dict()) == json.dumps(d)
    # through a file, as the loader reads it
    records.write_record(tmp_path, d)
    back = records.read_record(tmp_path / "r0.json", typed=True)
    assert _dump(back.to_dict()) == _dump(d)
    (typed,), problems = records.load_records(tmp_path, typed=True)
    assert problems == [] and typed.metrics.extra["new_metric"] == 0.5


def _one_line_error(d, where="runs/r0.json", **kw) -> str:
    with pytest.raises(records.RecordError) as e:
        RunRecord.from_dict(d, where, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(where + ":")
    return msg


@pytest.mark.parametrize("section,key,expected", [
    ("metrics", "acc", "a number"), ("metrics", "nll", "a number"), (None, "config", "an object"),
    (None, "metrics", "acc, nll"),
])
def test_missing_required_field_is_one_line_naming_it(section, key, expected):
    d = complete_record()
    (d[section] if section else d).pop(key)
    msg = _one_line_error(d)
    assert "marked complete" in msg and (f"{section}.{key}" if section else key) in msg and expected in msg
    # a running record need not have them
    d["status"] = "running"
    assert RunRecord.from_dict(d, "x").status == "running"


@pytest.mark.parametrize("section,key,value,expected", [
    ("metrics", "acc", "0.9", "metrics.acc must be a number in [0, 1], not string"),
    ("metrics", "ece", True, "metrics.ece must be a number in [0, 1], not bool"),
    ("metrics", "acc", 5.0, "metrics.acc must be a number in [0, 1], not float (5.0)"),   # a percentage
    ("metrics", "ece", -0.01, "metrics.ece must be a number in [0, 1]"),
    ("metrics", "nll", -0.5, "metrics.nll must be a number >= 0"),
    ("metrics", "temperature", -1, "metrics.temperature must be a number >= 0"),
    ("metrics", "acc", 10**400, "metrics.acc must be a number in [0, 1]"),   # too big for a float: no OverflowError
    ("metrics", "ood", [1], "metrics.ood must be an object, not array"),
    ("method", "num_members", 4.5, "method.num_members must be an integer, not float"),
    ("method", "size_reference", "yes", "method.size_reference must be true or false"),
    ("cost", "latency_device", 3, "cost.latency_device must be a string, not int"),
    ("cost", "flops", -5, "cost.flops must be a number >= 0"),            # sizes, FLOPs and times are never < 0
    ("training", "train_s", -1.0, "training.train_s must be a number >= 0"),
    ("training", "stages", "x", "training.stages must be an object"),
    (None, "config", [], "config must be an object, not array"),
    (None, "method", "single", "method must be an object, not string"),
    (None, "error", 1, "error must be a string, not int"),
])
def test_wrong_type_is_one_line_naming_field_and_type(section, key, value, expected):
    d = complete_record()
    (d[section] if section else d)[key] = value
    assert expected in _one_line_error(d)
    d["status"] = "failed"        # types are checked whatever the status
    assert expected in _one_line_error(d)


def test_a_metric_that_could_not_be_computed_is_nan_not_out_of_range():
    d = complete_record()
    d["metrics"].update(acc_at_95=float("nan"), nll_ts=float("nan"), acc=0.0, ece=1.0)
    assert RunRecord.from_dict(d, "x").metrics.ece == 1.0


@pytest.mark.parametrize("key", ["acc", "nll"])
def test_a_complete_record_whose_result_is_nan_is_not_complete(key):
    """acc and nll are what "complete" means: NaN there is no result (the leaderboard leaves the record out
    with this line instead of blanking its row's mean); a running or failed record may hold it."""
    d = complete_record()
    d["metrics"][key] = float("nan")
    assert f"marked complete but its metrics.{key} is NaN" in _one_line_error(d)
    d["status"] = "failed"
    assert RunRecord.from_dict(d, "x").status == "failed"


def test_identity_errors_are_the_loaders_messages():
    assert "missing run_id" in _one_line_error({k: v for k, v in complete_record().items() if k != "run_id"})
    assert "newer" in _one_line_error(complete_record(schema_version=records.SCHEMA_VERSION + 1))
    assert "bad status" in _one_line_error(complete_record(status="done"))
    assert "not a result record" in _one_line_error([1, 2])


def test_loader_reports_a_bad_record_as_one_problem_line(tmp_path):
    records.write_record(tmp_path, complete_record("good"))
    bad = complete_record("bad")
    bad["metrics"]["acc"] = "high"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    recs, problems = records.load_records(tmp_path)
    assert [r["run_id"] for r in recs] == ["good"]
    assert len(problems) == 1 and "bad.json" in problems[0] and "metrics.acc must be a number" in problems[0]
    with pytest.raises(records.RecordError, match="metrics.acc"):
        records.read_record(tmp_path / "bad.json")


def shift_metrics() -> dict:
    """metrics.shift as shift.evaluate_shift writes it (one corruption, severities 1 and 2)."""
    cell = {"acc": 0.7, "nll": 0.9, "brier": 0.4, "ece": 0.05, "aurc": 0.1, "acc_at_95": 0.72, "ece_adaptive": 0.05,
            "member_acc": 0.68, "disagreement": 0.1, "nll_ts": 0.85, "ece_ts": 0.03}
    return {"set": "cifar10c", "n_per_severity": 100, "severities": [1, 2], "corruptions": ["gaussian_noise"],
            "approximate": {}, "combine": "probs", "temperature": 1.3,
            "per_corruption": {"gaussian_noise": {"1": dict(cell), "2": dict(cell)}},
            "by_corruption": {"gaussian_noise": dict(cell)}, "by_severity": {"1": dict(cell), "2": dict(cell)},
            "mean": dict(cell)}


def _set(d: dict, dotted: str, value) -> None:
    *keys, last = dotted.split("/")
    for k in keys:
        d = d[k]
    d[last] = value


@pytest.mark.parametrize("field,value,expected", [
    ("ood/svhn/msp/auroc", 35.97, "metrics.ood.svhn.msp.auroc must be a number in [0, 1], not float (35.97)"),
    ("ood/svhn/msp/auroc", "0.36", "metrics.ood.svhn.msp.auroc must be a number in [0, 1], not string ('0.36')"),
    ("ood/svhn/msp/fpr95", -0.1, "metrics.ood.svhn.msp.fpr95 must be a number in [0, 1]"),
    ("ood/svhn/msp/aupr_in", True, "metrics.ood.svhn.msp.aupr_in must be a number in [0, 1], not bool"),
    ("ood/svhn/msp", 0.9, "metrics.ood.svhn.msp must be an object, not float"),
    ("ood/svhn", [0.9], "metrics.ood.svhn must be an object, not array"),
    ("shift/mean/acc", 48.7, "metrics.shift.mean.acc must be a number in [0, 1], not float (48.7)"),
    ("shift/per_corruption/gaussian_noise/2/nll", -1.0, "metrics.shift.per_corruption.gaussian_noise.2.nll must be "
                                                        "a number >= 0"),
    ("shift/by_severity/1/ece", "0.1", "metrics.shift.by_severity.1.ece must be a number in [0, 1], not string"),
    ("shift/by_corruption/gaussian_noise/acc", 70, "metrics.shift.by_corruption.gaussian_noise.acc must be a number "
                                                   "in [0, 1]"),
    ("shift/temperature", -2.0, "metrics.shift.temperature must be a number >= 0"),
    ("shift/mean", 5, "metrics.shift.mean must be an object, not int"),
])
def test_ood_and_shift_numbers_are_checked_like_the_top_level_metrics(tmp_path, field, value, expected):
    """The leaderboard averages the OOD and shift numbers too: a percentage or a string there leaves the
    record out with one line naming the field, as metrics.acc = 48.7 does (not a 1237 % AUROC in its row)."""
    d = complete_record("bad")
    d["metrics"]["shift"] = shift_metrics()
    good = json.loads(json.dumps(d).replace('"bad"', '"good"'))
    assert RunRecord.from_dict(good, "x").metrics.shift == shift_metrics()
    _set(d["metrics"], field, value)
    assert expected in _one_line_error(d)
    records.write_record(tmp_path, good)
    (tmp_path / "bad.json").write_text(json.dumps(d))
    recs, problems = records.load_records(tmp_path)
    assert [r["run_id"] for r in recs] == ["good"]
    assert len(problems) == 1 and "bad.json" in problems[0] and expected in problems[0]


def test_ood_and_shift_nan_and_unknown_keys_pass():
    """NaN is a metric that could not be computed, as at the top level; keys this code does not know (a newer
    writer's, the shift set's identity) are kept as read."""
    d = complete_record()
    d["metrics"]["shift"] = shift_metrics()
    d["metrics"]["ood"]["svhn"]["msp"].update(auroc=float("nan"), n_ood=26032)
    d["metrics"]["ood"]["svhn"]["mi"] = {"auroc": 0.5, "aupr_in": 1.0, "aupr_out": 0.0, "fpr95": 1.0}
    d["metrics"]["shift"]["mean"]["acc"] = float("nan")
    d["metrics"]["shift"]["mean"]["future_metric"] = "x"
    d["metrics"]["shift"]["temperature"] = None
    rec = RunRecord.from_dict(d, "x")
    assert json.dumps(rec.to_dict()) == json.dumps(d)


def test_numpy_numbers_are_numbers():
    d = complete_record()
    d["metrics"]["acc"] = np.float32(0.5)
    d["method"]["num_members"] = np.int64(4)
    rec = RunRecord.from_dict(d, "x")
    assert rec.metrics.acc == 0.5 and rec.method.num_members == 4


def test_a_record_built_in_code_writes_in_the_runners_order():
    rec = RunRecord(run_id="r1", status="complete", config={"seed": 0},
                    method=MethodInfo(name="single", options={}, size_reference=True, combine="probs",
                                      num_members=1, info={}),
                    data={}, code={}, env={}, timings={"started": "t"}, error=None, extra={"weights": "w"},
                    metrics=Metrics.from_dict({"acc": 0.5, "nll": 1.0, "ece": None}),
                    cost=Cost(params=10), training=Training(train_s=1.0))
    d = rec.to_dict()
    assert list(d) == ["schema_version", "run_id", "status", "config", "method", "data", "code", "env", "timings",
                       "error", "weights", "metrics", "cost", "training"]
    assert d["schema_version"] == records.SCHEMA_VERSION and d["error"] is None
    assert list(d["method"]) == ["name", "options", "size_reference", "combine", "num_members", "info"]
    assert d["metrics"] == {"acc": 0.5, "nll": 1.0, "ece": None} and d["cost"] == {"params": 10}
    assert _dump(RunRecord.from_dict(d, "x").to_dict()) == _dump(d)
    # a field set after reading is written too
    changed = dataclasses.replace(RunRecord.from_dict(d, "x"), cost=Cost(params=10, latency_ms=2.0))
    assert changed.to_dict()["cost"] == {"params": 10, "latency_ms": 2.0}


def test_flatten_record_same_row_for_dict_and_typed():
    for d in (complete_record(), complete_record(status="running"),
              {"schema_version": 1, "run_id": "x", "status": "complete"}):
        rec = RunRecord.from_dict(d, "x", complete=False)
        a, b = columns.flatten_record(d), columns.flatten_record(rec)
        assert _dump(a) == _dump(b)
    row = columns.flatten_record(RunRecord.from_dict(complete_record(), "x"))
    assert row["acc"] == 0.9 and row["method"] == "deep_ensemble" and row["num_members"] == 4.0
    assert row["auroc_svhn"] == 0.9 and row["latency_device"] == "cpu" and row["train_s"] == 10.0
    assert row["converged"] is False and row["size_reference"] is True   # val NLL still falling
