"""The trust contract: one effective recipe per run (shared / paper), learning curves and a convergence
verdict in every record, and a row that is one experiment (data and code identity)."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from ensemble_bench import columns, formatting, leaderboard
from ensemble_bench.cli import main
from ensemble_bench.resolve import make_run_config
from ensemble_bench.errors import UsageError
from ensemble_bench.recipe import Recipe, cycle_ends, lr_factor

T = ["--backbone", "cnn_small", "--dataset", "digits", "--no-progress", "--device", "cpu"]


def run_cli(args, capsys):
    code = main(args)
    out, _ = capsys.readouterr()
    assert code == 0
    return json.loads(out)


# --------------------------------------------------------------------------------------- recipe
def test_cyclic_cosine_restarts_every_cycle():
    r = Recipe(epochs=12, schedule="cyclic_cosine", cycles=3)
    assert [r.lr_factor(t) for t in (0, 4, 8)] == pytest.approx([1, 1, 1])
    assert r.lr_factor(2) == pytest.approx(0.5) and r.lr_factor(3.999) < 1e-6
    assert lr_factor("cosine", 6, 12) == pytest.approx(0.5)


@pytest.mark.parametrize("bad,msg", [
    ({"weight_decay": -1.0}, "weight_decay"), ({"momentum": -1.0}, "momentum"), ({"lr_decay": -1.0}, "lr_decay"),
    ({"warmup_epochs": -3.0}, "warmup_epochs"), ({"momentum": 0.0, "nesterov": True}, "nesterov"),
    ({"milestones": (0.75, 0.5)}, "milestones"), ({"cycles": 20, "epochs": 10}, "cycles"),
    ({"schedule": "step"}, "schedule"), ({"lr": 0.0}, "lr")])
def test_bad_recipes_are_one_line_usage_errors(bad, msg):
    with pytest.raises(UsageError, match=msg) as e:
        Recipe(**bad)
    assert "\n" not in str(e.value)


def test_paper_mode_changes_the_id_only_where_the_recipe_changes():
    base = {"backbone": "cnn_small", "dataset": "digits", "epochs": 4}
    for method, same in (("single", True), ("deep_ensemble", True), ("edst_ensemble", True), ("nfe", False),
                         ("mimo", False), ("packed", False), ("dst_ensemble", False), ("bridge", False)):
        shared = make_run_config(dict(base, method=method))
        paper = make_run_config(dict(base, method=method, recipe="paper"))
        assert (shared.run_id() == paper.run_id()) is same, method
        assert shared.effective_recipe == shared.run_recipe().to_dict()


def test_one_training_has_one_run_id_whatever_the_unused_settings_and_spelling():
    """Settings the schedule never reads, and another spelling of the same backbone, are aliases: the
    same run id. Settings it reads (and another backbone) are another experiment."""
    base = {"method": "single", "backbone": "resnet8", "dataset": "digits", "epochs": 4}
    ref = make_run_config(dict(base)).run_id()
    for alias in ({"milestones": [0.3, 0.6]}, {"lr_decay": 0.5}, {"backbone": "resnet08"},
                  {"backbone": "resnet8x1"}):
        cfg = make_run_config(dict(base, **alias))
        assert cfg.run_id() == ref, alias
        assert cfg.backbone == "resnet8" and cfg.effective_recipe["milestones"] == [0.5, 0.75]
    for other in ({"schedule": "multistep"}, {"backbone": "resnet8x2"}, {"schedule": "cyclic_cosine"}):
        assert make_run_config(dict(base, **other)).run_id() != ref, other
    multi = dict(base, schedule="multistep")
    assert make_run_config(dict(multi, milestones=[0.3, 0.6])).run_id() != make_run_config(multi).run_id()
    assert make_run_config(dict(multi, lr_decay=0.5)).run_id() != make_run_config(multi).run_id()
    # cycles is a method's setting (snapshot ensembles), read by cyclic_cosine only
    assert Recipe(epochs=8, cycles=4) == Recipe(epochs=8)
    assert Recipe(epochs=8, schedule="cyclic_cosine", cycles=4) != Recipe(epochs=8, schedule="cyclic_cosine")
    assert make_run_config(dict(base, backbone="wrn016_04")).backbone == "wrn16_4"
    # an invalid unused setting is still refused (a typo is not made silent by the schedule)
    with pytest.raises(UsageError, match="milestones"):
        Recipe(milestones=(0.75, 0.5))
    # under a method that changes the schedule (NFE's paper recipe: linear), the run's milestones are unused
    nfe = dict(base, method="nfe", recipe="paper")
    assert make_run_config(dict(nfe, milestones=[0.3])).run_id() == make_run_config(nfe).run_id()


# ------------------------------------------------------------------------------ curves in records
def test_every_record_has_its_learning_curves_and_effective_recipe(tmp_path, capsys):
    out = tmp_path / "runs"
    s = run_cli(["run", "--method", "single", *T, "--epochs", "3", "--out", str(out)], capsys)
    rec = json.loads((out / f"{s['run_id']}.json").read_text())
    assert rec["config"]["effective_recipe"]["schedule"] == "cosine"
    st = rec["training"]["stages"]["member0"]
    assert st["recipe"] == rec["config"]["effective_recipe"] and st["recipe_changes"] == {}
    curve = st["curve"]
    assert [e["epoch"] for e in curve] == [1, 2, 3]
    for e in curve:
        assert {"lr", "loss", "val_acc", "val_nll", "epoch_s"} <= set(e)
        assert 0 <= e["val_acc"] <= 1 and e["val_nll"] > 0
    assert curve[0]["lr"] > curve[1]["lr"] > curve[2]["lr"]             # cosine, per epoch
    csv = (out / f"{s['run_id']}.curves.csv").read_text().splitlines()
    assert csv[0].startswith("stage,epoch,lr,loss,val_acc,val_nll") and len(csv) == 4
    assert (out / f"{s['run_id']}.weights.safetensors").is_file()
    assert rec["code"]["method_file"] == "single.py" and len(rec["code"]["harness_sha256"]) == 16


def test_stage_recipes_of_a_multi_stage_method_are_recorded(tmp_path, capsys):
    out = tmp_path / "runs"
    s = run_cli(["run", "--method", "edst_ensemble", *T, "--epochs", "3", "--out", str(out),
                 "--set", "num_members=2", "--set", "update_frequency=10"], capsys)
    stages = json.loads((out / f"{s['run_id']}.json").read_text())["training"]["stages"]
    assert stages["explore"]["recipe_changes"] == {"schedule": "constant"} and stages["explore"]["converges"] is False
    assert stages["window0"]["recipe_changes"]["lr"] == pytest.approx(0.01)
    df = leaderboard.leaderboard([json.loads((out / f"{s['run_id']}.json").read_text())])
    assert "explore: schedule=constant" in df.loc[0, "stage_recipes"]


# ------------------------------------------------------------------------------------ convergence
def _rec(curves: dict, seed=0, **kw):
    stages = {k: {"curve": [{"epoch": i + 1, "val_nll": v} for i, v in enumerate(c)], **kw} for k, c in curves.items()}
    return {"status": "complete", "run_id": f"r{seed}", "config": {"method": "single", "dataset": "d", "backbone": "b",
                                                                   "seed": seed, "epochs": 10},
            "method": {"name": "single", "options": {}, "num_members": 1}, "metrics": {"acc": 0.5, "nll": 1.0},
            "cost": {}, "training": {"stages": stages}}


def test_convergence_rule():
    flat = [2.0, 1.5, 1.2, 1.1, 1.05, 1.02, 1.01, 1.005, 1.003, 1.002]
    noisy = [2.0, 1.5, 1.2, 1.1, 1.05, 1.02, 1.00, 1.06, 0.99, 1.04]      # flat within noise: converged
    steep = [2.0, 1.8, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0, 0.9]
    assert columns.stage_converged({"curve": [{"val_nll": v} for v in flat]}) is True
    assert columns.stage_converged({"curve": [{"val_nll": v} for v in steep]}) is False
    worse = flat[:-1] + [1.2]                                            # overfitting: not improving
    assert columns.stage_converged({"curve": [{"val_nll": v} for v in worse]}) is True
    assert columns.stage_converged({"curve": [{"val_nll": v} for v in noisy]}) is True
    annealed = [2.0, 1.6, 1.3, 1.1, 1.0, 0.9, 0.8, 0.79, 0.788, 0.787, 0.787, 0.786]   # cosine: drop, then flat
    assert columns.stage_converged({"curve": [{"val_nll": v} for v in annealed]}) is True
    falling = [2.0, 1.6, 1.3, 1.1, 1.0, 0.95, 0.90, 0.86, 0.82, 0.78, 0.74, 0.70]
    assert columns.stage_converged({"curve": [{"val_nll": v} for v in falling]}) is False
    assert columns.stage_converged({"curve": [{"val_nll": 1.0}]}) is None
    assert columns.record_converged(_rec({"a": flat, "b": steep})) is False
    assert columns.record_converged(_rec({"a": flat, "b": steep}) | {}) is False
    explore = _rec({"a": flat})
    explore["training"]["stages"]["x"] = {"curve": [{"val_nll": v} for v in steep], "converges": False}
    assert columns.record_converged(explore) is True
    df = leaderboard.leaderboard([_rec({"a": flat}, 0), _rec({"a": steep}, 1)])
    assert len(df) == 1 and df.loc[0, "converged"] is False or df.loc[0, "converged"] == False  # noqa: E712
    md = formatting.format_markdown(df)
    assert "**no**" in md and f"{columns.CONVERGENCE_TOL:.0%}" in md


def test_a_not_converged_row_shows_its_evidence():
    """A **no** from the curves names the seed and stage still falling the most, the fitted line's fall across
    the rule's window and that fall in standard errors (checked against scipy's regression); flat stages and
    seeds say nothing."""
    from scipy.stats import linregress

    flat = [2.0, 1.5, 1.2, 1.1, 1.05, 1.02, 1.01, 1.005, 1.003, 1.002]
    tail = [0.83, 0.76, 0.75, 0.70]                  # the rule's window: max(4, 10 % of 10 epochs)
    falling = [2.0, 1.6, 1.3, 1.1, 1.0, 0.9] + tail
    fit = linregress(range(4), tail)
    fall = -fit.slope * 3 / np.mean(tail)
    trend = columns.stage_trend({"curve": [{"epoch": i + 1, "val_nll": v} for i, v in enumerate(falling)]})
    assert trend.converged is False and (trend.first, trend.last) == ("7", "10") and not trend.cyclic
    assert trend.fall == pytest.approx(fall) and trend.se == pytest.approx(-fit.slope / fit.stderr)
    assert trend.text() == f"{-100 * fall:+.2f} % over epochs 7-10, {-fit.slope / fit.stderr:.1f} SE"
    assert columns.stage_trend({"curve": [{"epoch": i + 1, "val_nll": v} for i, v in enumerate(flat)]}).converged
    # two epochs: no line to fit, no standard error; an exact rising line: its fall is negative, "infinitely" sure
    short = columns.stage_trend({"curve": [{"epoch": 1.0, "val_nll": 1.0}, {"epoch": 2.0, "val_nll": 0.5}]})
    assert not short.converged and math.isnan(short.se) and short.text() == "-66.67 % over epochs 1-2"
    rising = columns.stage_trend({"curve": [{"val_nll": 1.0 + 0.1 * i} for i in range(6)]})
    assert rising.converged and rising.fall < 0 and rising.se == -math.inf and (rising.first, rising.last) == ("3", "6")
    # the record: the stage falling the most, and how many more; a converged record has no evidence
    steeper = falling[:6] + [v - 0.1 * k for k, v in enumerate(tail)]
    rec = _rec({"a": flat, "b": falling, "c": steeper})
    assert columns.not_converged_text(columns.record_trends(rec)).startswith("c: ")
    assert columns.not_converged_text(columns.record_trends(rec)).endswith("(+1 more stage)")
    assert columns.not_converged_text(columns.record_trends(_rec({"a": flat}))) == ""
    # two stages falling alike: the first by name; the run's verdict in words (the quickstart's line)
    assert columns.not_converged_text(columns.record_trends(_rec({"b": falling, "a": falling}))).startswith("a: ")
    assert columns.verdict_text(columns.record_trends(rec)) == f"NO ({columns.not_converged_text(columns.record_trends(rec))})"
    assert columns.verdict_text(columns.record_trends(_rec({"a": flat}))) == "yes"
    assert columns.verdict_text({}) == "?"
    df = leaderboard.leaderboard([_rec({"a": flat}, 0), _rec({"a": falling}, 1)])
    cell = formatting.converged_text(df.loc[0, "converged"], df.loc[0, "budget_epochs"], df.loc[0, "budget_gain"],
                                     why=df.loc[0, "converged_why"])
    assert cell == f"**no** (seed 1 a: {trend.text()})"
    assert cell in formatting.format_markdown(df)


def test_a_schedule_that_restarts_is_judged_on_its_cycle_ends():
    """Cyclic cosine (snapshot ensembles): the last 10 % of the epochs is inside the last anneal, falling by
    design; the rule compares the last two cycle ends instead, with the paired standard error when the curve
    has it. Numbers: the reference snapshot row's cycle ends (results/reference)."""
    r = Recipe(epochs=20, schedule="cyclic_cosine", cycles=4)
    lrs = [r.lr_at(k + 0.99) for k in range(20)]
    assert cycle_ends(lrs) == [4, 9, 14]
    ends = [0.772, 0.686, 0.655]                               # then the last cycle's end
    anneal = [1.30, 1.15, 1.00, 0.90]                          # each cycle: high after the restart, then down

    def curve(last_end, se=None, stop=20):
        vals = []
        for end in ends + [last_end]:
            vals += [a + end - 0.90 for a in anneal] + [end]
        entries = [{"epoch": k + 1, "lr": lrs[k], "val_nll": v} for k, v in enumerate(vals[:stop])]
        if se is not None:
            entries[-1].update(val_nll_diff_se=se, diff_from_epoch=15)
        return {"curve": entries}

    flat = curve(0.653)                                        # the last anneal falls 0.3 in 5 epochs ...
    assert columns.stage_converged(flat) is True               # ... but the cycle ends are flat (-0.3 %)
    assert columns.stage_converged(curve(0.659)) is True       # worse than the cycle before: not improving
    assert columns.stage_converged(curve(0.60)) is False       # the last cycle still gained 8 %
    assert columns.stage_converged(curve(0.60, se=0.01)) is False     # ... 5.5 standard errors of its change
    assert columns.stage_converged(curve(0.60, se=0.04)) is True      # ... inside 2 (a tiny validation split)
    assert columns.stage_trend(curve(0.60, se=0.01)).text() == "cycle ends 15 -> 20: -8.76 %, 5.5 SE"
    assert columns.stage_trend(curve(0.60)).text() == "cycle ends 15 -> 20: -8.76 %"   # no paired error
    wrong_anchor = curve(0.60, se=0.04)
    wrong_anchor["curve"][-1]["diff_from_epoch"] = 10           # an error against another epoch is not used
    assert columns.stage_converged(wrong_anchor) is False
    # a run stopped inside a cycle (its last rate above the last end's) is judged by the fit rule
    assert columns.stage_converged(curve(0.653, stop=19)) is False      # mid-anneal: still falling
    # schedules without a restart have no cycle end: warm-up, step decay, cosine, linear
    for rec in (Recipe(epochs=20, warmup_epochs=3), Recipe(epochs=20, schedule="multistep"),
                Recipe(epochs=20, schedule="linear"), Recipe(epochs=20, schedule="constant")):
        assert cycle_ends([rec.lr_at(k + 0.99) for k in range(20)]) == [], rec


def test_a_longer_budget_that_ends_clearly_better_marks_the_shorter_row_not_converged():
    def rec(epochs, end, seed=0, method="single"):
        flat = epochs // 5 + 4                                            # flat at its end: converged by the curve
        r = _rec({"member0": [2.0] * (epochs - flat) + [end] * flat}, seed)
        r["run_id"] = f"{method}-{epochs}-{seed}"
        r["config"] = {**r["config"], "epochs": epochs, "method": method}
        r["method"] = {**r["method"], "name": method}
        return r
    assert columns.record_end_val_nll(rec(30, 0.74)) == pytest.approx(0.74)
    # 60 epochs ends 10 % lower than 30: the 30-epoch row was too short; 120 only 1 % below 60: 60 stands
    recs = [rec(30, 0.74), rec(30, 0.76, 1), rec(60, 0.675), rec(120, 0.668),
            rec(30, 0.74, method="other"), rec(60, 0.735, method="other")]   # another method: 0.7 % gain
    df = leaderboard.leaderboard(recs).set_index(["method", "epochs"])
    assert df.loc[("single", 30), "budget_epochs"] == 120
    assert df.loc[("single", 30), "budget_gain"] == pytest.approx((0.75 - 0.668) / 0.75)
    assert df.loc[("single", 30), "converged"] == False   # noqa: E712
    assert df.loc[("single", 60), "budget_gain"] == pytest.approx((0.675 - 0.668) / 0.675)
    assert df.loc[("single", 60), "converged"] == True    # noqa: E712
    # the strongest longer budget is the evidence, not the longest: a 240-epoch run that overfits changes nothing
    over = leaderboard.leaderboard(recs + [rec(240, 0.70)]).set_index(["method", "epochs"])
    assert over.loc[("single", 30), "budget_epochs"] == 120 and over.loc[("single", 60), "budget_epochs"] == 120
    assert math.isnan(df.loc[("single", 120), "budget_gain"]) and df.loc[("single", 120), "converged"] == True  # noqa: E712
    assert df.loc[("other", 30), "converged"] == True     # noqa: E712  (never compared with another method)
    md = formatting.format_markdown(df.reset_index())
    assert "**no** (120 ep: val NLL -10.9 %)" in md and f"{columns.BUDGET_TOL:.0%} or more lower" in md
    # a row whose own curve was still falling stays not converged, with or without a longer budget
    falling = rec(60, 0.675)
    for i, e in enumerate(falling["training"]["stages"]["member0"]["curve"]):
        e["val_nll"] = 2.0 - 0.02 * i
    df = leaderboard.leaderboard([rec(30, 0.74), falling]).set_index("epochs")
    assert df.loc[60, "converged"] == False   # noqa: E712


def test_busy_latency_is_marked():
    rec = _rec({"a": [1.0, 1.0]})
    rec["cost"] = {"latency_ms": 151.0, "latency_ms_p10": 15.0, "latency_ms_p90": 160.0}
    df = leaderboard.leaderboard([rec])
    assert bool(df.loc[0, "latency_busy"]) and "†" in formatting.format_markdown(df)


def test_training_time_leaves_stalls_out():
    """A stalled epoch (a paused process: 700 s where the others take 30) counts as a typical one in the row's
    train_s; the record's sum stays in train_s_recorded. Two seeds, one stalled, have the same train_s. A
    stage's first epoch counts as measured (one-off costs such as compilation are the method's)."""
    def timed(seed: int, stall: bool = False, first: float = 30.0) -> dict:
        rec = _rec({"member0": [1.0] * 10, "member1": [1.0] * 10}, seed)
        for name, st in rec["training"]["stages"].items():
            times = [first] + [30.0 + 0.1 * i for i in range(1, 10)] if name == "member0" else [60.0] * 10
            if stall and name == "member0":
                times[7] = 700.0   # 30.7, above the median of epochs 2-10 (30.5): the median stays
            for e, t in zip(st["curve"], times):
                e["epoch_s"] = t
            st["train_s"] = sum(times)
        rec["training"].update(train_s=sum(st["train_s"] for st in rec["training"]["stages"].values()) + 5.0,
                               train_s_extra=5.0, device="cpu: X")
        return rec

    typical = 30.0 + 30.5 * 9 + 60.0 * 10 + 5.0   # member0's first epoch, its median x 9, member1's, the extra
    calm, stalled = columns.flatten_record(timed(0)), columns.flatten_record(timed(1, stall=True))
    assert calm["train_s"] == pytest.approx(typical) and stalled["train_s"] == pytest.approx(typical)
    assert calm["train_s_recorded"] == pytest.approx(typical - 30.5 * 9 + sum(30.0 + 0.1 * i for i in range(1, 10)))
    assert stalled["train_s_recorded"] == pytest.approx(calm["train_s_recorded"] - 30.7 + 700.0)
    row = leaderboard.leaderboard([timed(0), timed(1, stall=True)]).iloc[0]
    assert row["train_s_mean"] == pytest.approx(typical) and row["train_s_std"] == pytest.approx(0.0)
    assert row["train_s_recorded_mean"] == pytest.approx((calm["train_s_recorded"] + stalled["train_s_recorded"]) / 2)
    # a first epoch that compiles (10x the others) is the method's cost: counted as measured
    assert columns.flatten_record(timed(0, first=300.0))["train_s"] == pytest.approx(typical + 270.0)
    # a curve that lacks some epoch times (or all: older code) counts the stage's recorded train_s
    old = timed(0, stall=True)
    for st in old["training"]["stages"].values():
        del st["curve"][3]["epoch_s"]
    assert columns.flatten_record(old)["train_s"] == pytest.approx(old["training"]["train_s"])


# ----------------------------------------------------------------------------- a row is one experiment
def test_a_data_subset_is_another_experiment(tmp_path, shared_data):
    sub = tmp_path / "subset"
    sub.mkdir()
    with np.load(shared_data / "cifar10_train.npz") as z:
        np.savez(sub / "cifar10_train.npz", x_train=z["x_train"][:5000], y_train=z["y_train"][:5000])
    for f in ("cifar10_test.npz", "svhn.npz", "cifar100_test.npz"):
        shutil.copy(shared_data / f, sub / f)
    base = {"method": "single", "backbone": "resnet8", "dataset": "cifar10", "epochs": 1}
    full = make_run_config(dict(base, data_dir=str(shared_data)))
    part = make_run_config(dict(base, data_dir=str(sub)))
    assert full.run_id() != part.run_id()
    assert part.data_id["n_train"] == 4500 and full.data_id["n_train"] == 17100
    assert full.data_id["sha256"] != part.data_id["sha256"]
    # the same files in another folder: the same experiment
    same = tmp_path / "copy"
    shutil.copytree(shared_data, same, ignore=shutil.ignore_patterns("*.md"))
    assert make_run_config(dict(base, data_dir=str(same))).run_id() == full.run_id()
    # and the leaderboard never pools them as seeds
    recs = [{**_rec({"a": [1.0, 1.0]}, seed=s), "config": {**_rec({}, s)["config"], "data_id": d}}
            for s, d in ((0, full.data_id), (1, part.data_id))]
    assert len(leaderboard.leaderboard(recs)) == 2


def test_a_complete_record_from_other_code_is_named_when_skipped(tmp_path, capsys):
    out = tmp_path / "runs"
    s = run_cli(["run", "--method", "single", *T, "--epochs", "1", "--out", str(out)], capsys)
    path = out / f"{s['run_id']}.json"
    rec = json.loads(path.read_text())
    made_by = rec["code"]["method_sha256"]
    rec["code"]["method_sha256"] = "0" * 16
    path.write_text(json.dumps(rec))
    code = main(["run", "--method", "single", *T, "--epochs", "1", "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0 and "made by other code" in err and "method_sha256" in err and "--force" in err
    # seeds made by different code are marked in the leaderboard
    other = {**rec, "run_id": "x", "config": {**rec["config"], "seed": 1}, "code": {**rec["code"], "method_sha256": "1" * 16}}
    df = leaderboard.leaderboard([rec, other])
    assert df.loc[0, "code_versions"] == 2 and "‡" in formatting.format_markdown(df)
    # a plugin (it may define the backbone or the data) is code too: when skipping, and in the leaderboard
    rec["code"]["method_sha256"] = made_by
    rec["code"]["plugins"] = [{"spec": "/x/my_backbones.py", "module": "my_backbones", "sha256": "a" * 16}]
    path.write_text(json.dumps(rec))
    code = main(["run", "--method", "single", *T, "--epochs", "1", "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0 and "made by other code (plugins' sha256 differ)" in err
    edited = {**rec, "run_id": "y", "config": {**rec["config"], "seed": 1},
              "code": {**rec["code"], "plugins": [{**rec["code"]["plugins"][0], "sha256": "b" * 16}]}}
    assert leaderboard.leaderboard([rec, edited]).loc[0, "code_versions"] == 2
    assert leaderboard.leaderboard([rec, {**edited, "code": rec["code"]}]).loc[0, "code_versions"] == 1


def test_an_installed_copy_has_the_repositorys_code_hashes(tmp_path):
    """`pip install .` nests methods/ as ensemble_bench/methods/: the same code must keep the same harness and
    method hashes there (else its records read as other code, and a method file would be part of the harness)."""
    import subprocess
    from pathlib import Path
    import sys

    from ensemble_bench import runner
    from ensemble_bench.methods.single import Single

    from ensemble_bench.config import load_toml

    # the copy a wheel holds: each package pyproject.toml lists, from the folder its package-dir maps it to
    repo = runner.HARNESS_DIR.parent
    tool = load_toml(repo / "pyproject.toml")["tool"]["setuptools"]
    site = tmp_path / "site"
    for pkg in tool["packages"]:
        top = max((k for k in tool["package-dir"] if pkg == k or pkg.startswith(k + ".")), key=len)
        src = repo / tool["package-dir"][top] / Path(*pkg[len(top):].split(".")[1:])
        (site / Path(*pkg.split("."))).mkdir(parents=True, exist_ok=True)
        for f in src.glob("*.py"):
            shutil.copy(f, site / Path(*pkg.split(".")) / f.name)
    # every source file of the checkout is in it (a sub-package missing from the list would be missing here)
    tracked = {p.relative_to(repo / "benchmark") for p in runner.HARNESS_DIR.rglob("*.py")}
    tracked |= {Path("methods") / p.relative_to(runner.METHODS_DIR) for p in runner.METHODS_DIR.rglob("*.py")}
    assert {p.relative_to(site / "ensemble_bench") for p in site.rglob("*.py")} == tracked
    probe = ("import json, sys; sys.path.insert(0, sys.argv[1]); import ensemble_bench; "
             "from ensemble_bench import runner; from ensemble_bench.methods.single import Single; "
             "print(json.dumps([ensemble_bench.__file__, runner.code_identity(Single)]))")
    out = subprocess.run([sys.executable, "-c", probe, str(site)], capture_output=True, text=True, check=True)
    where, theirs = json.loads(out.stdout)
    assert where.startswith(str(site))      # the copy ran, not the checkout
    mine = runner.code_identity(Single)
    assert theirs["harness_sha256"] == mine["harness_sha256"] and theirs["method_sha256"] == mine["method_sha256"]
    # a method file is not part of the harness: editing one changes its own hash only
    (site / "ensemble_bench" / "methods" / "packed.py").write_text("# edited\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-c", probe, str(site)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)[1]["harness_sha256"] == mine["harness_sha256"]


def test_a_record_of_another_precision_is_not_taken_for_this_run(tmp_path, capsys, monkeypatch):
    """bf16 acts only on CUDA and the run id is fixed before the device is known: a CPU record (fp32) is not
    this run on a CUDA device (bf16, the same id). One line and exit 2 before any work, the record kept."""
    import torch

    from ensemble_bench import runner

    out = tmp_path / "runs"
    s = run_cli(["run", "--method", "single", *T, "--epochs", "1", "--out", str(out)], capsys)
    before = (out / f"{s['run_id']}.json").read_bytes()
    monkeypatch.setattr(runner, "resolve_device", lambda name: torch.device("cuda"))
    code = main(["run", "--method", "single", *T[:-2], "--device", "auto", "--epochs", "1", "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 2 and "trained in fp32; on cuda this run would train in bf16" in err and "Traceback" not in err
    assert (out / f"{s['run_id']}.json").read_bytes() == before
    monkeypatch.undo()
    assert main(["run", "--method", "single", *T, "--epochs", "1", "--out", str(out)]) == 0     # CPU: skipped
    assert "complete record exists, skipped" in capsys.readouterr()[1]


def test_data_parallel_world_size_is_its_own_row():
    """The world size is in the run id of a data-parallel run (distributed.recipe_fields): in the group key
    too, so a 2-rank run is never a seed of the 1-process row, and the recipe column names it."""
    one = _rec({"a": [1.0, 1.0]}, seed=0)
    two = _rec({"a": [1.0, 1.0]}, seed=1)
    two["config"]["effective_recipe"] = {"world_size": 2}
    df = leaderboard.leaderboard([one, two])
    assert len(df) == 2 and sorted(df["n_seeds"]) == [1, 1]
    assert sorted(columns.recipe_differences(list(df["recipe"]))) == ["world_size=1", "world_size=2"]
    assert len(leaderboard.leaderboard([one, {**two, "config": {**two["config"], "effective_recipe": {}}}])) == 1


def test_identical_runs_keep_identical_ids_whatever_the_spelling():
    a = make_run_config({"method": "nfe", "backbone": "cnn_small", "dataset": "digits", "recipe": "paper"})
    b = make_run_config({"method": "nfe", "backbone": "cnn_small", "dataset": "digits", "schedule": "linear",
                         "nesterov": True, "lr": 0.1})
    assert a.effective_recipe == b.effective_recipe and a.run_id() == b.run_id()
    assert math.isclose(a.effective_recipe["lr"], 0.1)


def test_a_plain_stage_trained_by_another_run_is_reused_bitwise(tmp_path, capsys):
    """DE-2 after `single` of the same seed reuses member 0 (the single model) instead of training it; its
    record equals that of a DE-2 trained from scratch, and says which stage it reused."""
    out, fresh = tmp_path / "runs", tmp_path / "fresh"
    run_cli(["run", "--method", "single", *T, "--epochs", "2", "--out", str(out)], capsys)
    de = ["run", "--method", "deep_ensemble", *T, "--epochs", "2", "--set", "num_members=2"]
    a = run_cli([*de, "--out", str(out)], capsys)
    b = run_cli([*de, "--out", str(fresh)], capsys)
    ra = json.loads((out / f"{a['run_id']}.json").read_text())
    rb = json.loads((fresh / f"{b['run_id']}.json").read_text())
    assert a["run_id"] == b["run_id"]
    assert list(ra["training"]["reused_stages"]) == ["member0"] and rb["training"]["reused_stages"] == {}
    assert ra["training"]["reused_stages"]["member0"].startswith("single-")
    assert ra["metrics"] == rb["metrics"]
    def untimed(curve):
        return [{k: v for k, v in e.items() if not k.endswith("_s")} for e in curve]

    assert untimed(ra["training"]["stages"]["member0"]["curve"]) == untimed(rb["training"]["stages"]["member0"]["curve"])
    # a changed recipe makes every stage another one: nothing reused
    c = run_cli([*de, "--out", str(out), "--weight-decay", "1e-4"], capsys)
    assert json.loads((out / f"{c['run_id']}.json").read_text())["training"]["reused_stages"] == {}


def test_the_stage_store_key_holds_the_code_of_the_models_own_classes(tmp_path, monkeypatch):
    """A plain stage's key hashes the files that define its module classes outside torch and the harness (a
    method's or a plugin's): edit that file and the stage is another one; a harness backbone has none, so
    DE-2's member 0 stays the single model's stage (test above)."""
    import importlib
    import sys

    from ensemble_bench.backbones import build_backbone
    from ensemble_bench.train import model_code

    assert model_code(build_backbone("cnn_small", 10, 1)) == ""
    src = tmp_path / "user_net.py"
    src.write_text("from torch import nn\nclass Net(nn.Sequential):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_net", raising=False)
    net = importlib.import_module("user_net").Net(build_backbone("cnn_small", 10, 1))
    before = model_code(net)
    assert len(before) == 16 and model_code(net) == before
    src.write_text(src.read_text() + "    def forward(self, x):\n        return 3 * super().forward(x)\n")
    assert model_code(net) != before


def test_stage_recipe_text_names_parameter_groups():
    # a stage's optimiser groups (BatchEnsemble's fast weights) read as "name(setting=value ...)", not a dict repr
    from ensemble_bench.columns import _stage_recipes_text
    from ensemble_bench.record_types import Training

    t = Training(stages={"s": {"recipe_changes": {"param_groups": [
        {"name": "slow", "weight_decay": 0.0005}, {"name": "fast_weights", "lr_scale": 0.5, "weight_decay": 0.0}]}}})
    assert _stage_recipes_text(t) == "s: param_groups=[slow(weight_decay=0.0005), fast_weights(lr_scale=0.5 weight_decay=0)]"


def test_a_setting_the_schedule_never_reads_is_named_not_silently_dropped(tmp_path, capsys, monkeypatch):
    """--milestones under cosine changes nothing (the recipe keeps the default, so the run id is the cosine
    run's): run says so in one note line per setting; under multistep there is no note."""
    from types import SimpleNamespace

    from ensemble_bench.cli import main
    from ensemble_bench.recipe import ignored_settings

    assert ignored_settings(SimpleNamespace(schedule="cosine", milestones=(0.5, 0.75), lr_decay=0.1)) == []
    assert ignored_settings(SimpleNamespace(schedule="multistep", milestones=(0.3,), lr_decay=0.5)) == []
    assert ignored_settings(SimpleNamespace(schedule="cosine", milestones=[0.3, 0.6], lr_decay=0.1)) == [
        "milestones=0.3,0.6 is read only by schedule 'multistep'; this run's schedule is 'cosine', so it is ignored"]
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--method", "single", "--backbone", "cnn_small", "--dataset", "digits", "--epochs", "1",
            "--no-progress", "--out", "runs"]
    assert main([*argv, "--milestones", "0.3", "--lr-decay", "0.5"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert notes == ["ensemble-bench: note: milestones=0.3 is read only by schedule 'multistep'; this run's "
                     "schedule is 'cosine', so it is ignored",
                     "ensemble-bench: note: lr_decay=0.5 is read only by schedule 'multistep'; this run's "
                     "schedule is 'cosine', so it is ignored"]


def test_fp32_means_float32_not_tf32(tmp_path, capsys, monkeypatch):
    """CUDA runs float32 convolutions as TF32 by default (cudnn.allow_tf32): a record labelled fp32 would
    hide a 10-bit mantissa. Every convolution a run computes (training, evaluation, the latency timing) runs
    with TF32 off, and the user's flags are restored after the run. (The flags act on CUDA only; on a CPU
    the test reads what a CUDA kernel would be allowed.)"""
    import torch

    seen = []
    conv_forward = torch.nn.Conv2d.forward

    def spy(self, x):
        seen.append((torch.is_grad_enabled(), torch.backends.cudnn.allow_tf32,
                     torch.backends.cuda.matmul.allow_tf32))
        return conv_forward(self, x)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True   # a user allowing TF32
    try:
        run_cli(["run", "--method", "single", *T, "--epochs", "1", "--out", str(tmp_path / "runs")], capsys)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32   # restored
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert {g for g, _, _ in seen} == {True, False}            # training and evaluation forwards both seen
    assert {(c, m) for _, c, m in seen} == {(False, False)}    # all in float32


def test_compile_acts_on_cpu_is_recorded_and_is_its_own_stage(tmp_path, capsys):
    """`--compile` acts on the CPU too (inductor's C++ kernels: ResNet-8's training step 1.6x faster on one
    Xeon core, README): the record says so (training.compiled, a compiled segment), and the stage it
    trained is another computation than the eager one (other floating-point rounding), so a later run
    without the flag trains its own member 0 rather than reuse the compiled one."""
    out = tmp_path / "runs"
    s = run_cli(["run", "--method", "single", *T, "--epochs", "1", "--compile", "--out", str(out)], capsys)
    rec = json.loads((out / f"{s['run_id']}.json").read_text())
    assert rec["config"]["compile"] is True and rec["training"]["compiled"] is True
    assert [seg["compiled"] for st in rec["training"]["stages"].values() for seg in st["segments"]] == [True]
    de = run_cli(["run", "--method", "deep_ensemble", *T, "--epochs", "1", "--set", "num_members=2",
                  "--out", str(out)], capsys)
    de_rec = json.loads((out / f"{de['run_id']}.json").read_text())
    assert de_rec["training"]["compiled"] is False and not de_rec["training"]["reused_stages"]


def test_a_killed_compiled_run_resumes_to_the_same_weights(digits, tmp_path):
    """A compiled CPU run killed after epoch 1 and started again ends with the weights of the run that was
    never killed, bit for bit: the resume contract holds under ``--compile`` (a checkpoint holds the
    eager module's state; the compiled forward is rebuilt around it)."""
    import torch

    from conftest import Killed, fit_method, kill_at, subsample

    bundle = subsample(digits, 300, 100)
    ref, trainer, _ = fit_method("single", bundle, epochs=3, compile=True, ckpt_dir=tmp_path / "ref")
    assert trainer.summary()["compiled"] is True
    with kill_at("member0", 2), pytest.raises(Killed):
        fit_method("single", bundle, epochs=3, compile=True, ckpt_dir=tmp_path / "run")
    resumed, trainer, _ = fit_method("single", bundle, epochs=3, compile=True, ckpt_dir=tmp_path / "run")
    assert trainer.stages["member0"].resumed_from_epoch == 1
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    # the same computation as eager, up to rounding: every weight and every batch-norm statistic close
    eager, trainer, _ = fit_method("single", bundle, epochs=3, ckpt_dir=tmp_path / "eager")
    assert trainer.summary()["compiled"] is False
    for k, v in eager.state_dict().items():
        assert torch.allclose(v.double(), ref.state_dict()[k].double(), rtol=1e-3, atol=1e-4), k
