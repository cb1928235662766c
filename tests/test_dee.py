"""Deep-ensemble-equivalent size (ensemble_bench.leaderboard: dee, the leaderboard's dee_* columns) on hand-made records."""
from __future__ import annotations

import math

import pytest

from ensemble_bench import columns, formatting, leaderboard, records

# the DE curve used throughout: size -> (nll_ts, acc)
CURVE = {1: (0.30, 0.90), 2: (0.24, 0.92), 3: (0.22, 0.93), 4: (0.21, 0.935)}


def rec(run_id, method, *, members=1, nll_ts, acc=0.9, seed=0, backbone="resnet32", epochs=200,
        status="complete"):
    opts = {"num_members": members} if method == "deep_ensemble" else {}
    return {"schema_version": records.SCHEMA_VERSION, "run_id": run_id, "status": status,
            "config": {"method": method, "backbone": backbone, "dataset": "cifar10", "epochs": epochs,
                       "seed": seed, "batch_size": 128, "lr": 0.1, "options": opts},
            "method": {"name": method, "options": opts, "combine": "probs", "num_members": members, "info": {},
                       "size_reference": method in ("single", "deep_ensemble")},
            "metrics": {"acc": acc, "nll": nll_ts + 0.02, "nll_ts": nll_ts, "ece": 0.01, "brier": 0.1}}


def de_records():
    out = [rec("single-0", "single", nll_ts=0.31, acc=0.89, seed=0),     # size 1 = mean of the two seeds
           rec("single-1", "single", nll_ts=0.29, acc=0.91, seed=1)]
    for m in (2, 3, 4):
        out.append(rec(f"de{m}", "deep_ensemble", members=m, nll_ts=CURVE[m][0], acc=CURVE[m][1]))
    return out


def test_dee_size_interpolates_piecewise_linearly():
    nll = [(m, v[0]) for m, v in CURVE.items()]
    acc = [(m, v[1]) for m, v in CURVE.items()]
    assert leaderboard.dee_size(0.27, nll, False) == leaderboard.DEE(pytest.approx(1.5), "")
    assert leaderboard.dee_size(0.215, nll, False).size == pytest.approx(3.5)
    assert leaderboard.dee_size(0.24, nll, False) == leaderboard.DEE(2.0, "")
    assert leaderboard.dee_size(0.30, nll, False) == leaderboard.DEE(1.0, "")
    assert leaderboard.dee_size(0.925, acc, True).size == pytest.approx(2.5)
    assert leaderboard.dee_size(0.9325, acc, True).size == pytest.approx(3.5)
    # outside the curve: no extrapolation, the bound is reported
    assert leaderboard.dee_size(0.20, nll, False) == leaderboard.DEE(4.0, ">") and str(leaderboard.dee_size(0.20, nll, False)) == ">4.00"
    assert leaderboard.dee_size(0.35, nll, False) == leaderboard.DEE(1.0, "<")
    assert leaderboard.dee_size(0.95, acc, True) == leaderboard.DEE(4.0, ">")
    with pytest.raises(ValueError):
        leaderboard.dee_size(0.25, [(2, 0.24), (3, 0.22)], False)     # no size 1


def test_dee_uses_the_running_best_of_a_noisy_curve():
    noisy = [(1, 0.30), (2, 0.24), (3, 0.25), (4, 0.21)]   # DE-3 measured worse than DE-2
    # 0.245 is first reached between sizes 1 and 2, not again between 2 and 3
    assert leaderboard.dee_size(0.245, noisy, False).size == pytest.approx(1 + 0.055 / 0.06)
    # between 2 and 4 the curve is the envelope: 0.24 at size 3, 0.21 at size 4
    assert leaderboard.dee_size(0.23, noisy, False).size == pytest.approx(3 + 0.01 / 0.03)
    assert leaderboard.dee_size(0.24, noisy, False).size == pytest.approx(2.0)


def test_dee_of_records():
    recs = de_records() + [
        rec("bridge-a", "bridge", members=2, nll_ts=0.27, acc=0.925),
        rec("bridge-b", "bridge", members=3, nll_ts=0.19),
        rec("other-backbone", "bridge", members=2, nll_ts=0.27, backbone="resnet56"),   # no DE curve there
        rec("other-epochs", "bridge", members=2, nll_ts=0.27, epochs=100),
        rec("failed", "bridge", members=2, nll_ts=0.1, status="failed"),
    ]
    got = leaderboard.dee(recs)                       # default metric: temperature-scaled NLL
    assert set(got) == {"single-0", "single-1", "de2", "de3", "de4", "bridge-a", "bridge-b"}
    assert got["bridge-a"].size == pytest.approx(1.5) and got["bridge-a"].bound == ""
    assert got["bridge-b"] == leaderboard.DEE(4.0, ">")
    assert got["de3"] == leaderboard.DEE(3.0, "")
    assert got["single-0"] == leaderboard.DEE(1.0, "<")                      # worse than the seed mean
    assert got["single-1"].size == pytest.approx(1 + 0.01 / 0.06)
    acc = leaderboard.dee(recs, metric="acc")
    assert acc["bridge-a"].size == pytest.approx(2.5)
    assert leaderboard.dee([r for r in recs if r["method"]["name"] != "deep_ensemble"]) == {}   # one size only: no curve


def test_leaderboard_adds_dee_columns_when_a_de_curve_exists():
    recs = de_records() + [rec("bridge-a", "bridge", members=2, nll_ts=0.27, acc=0.925, seed=0),
                           rec("bridge-a1", "bridge", members=2, nll_ts=0.25, acc=0.915, seed=1)]
    df = leaderboard.leaderboard(recs)
    row = df[df["method"] == "bridge"].iloc[0]
    # the row's seed means (nll_ts 0.26, acc 0.92) read off the DE curve of the rows' means
    assert row["dee_nll_ts"] == pytest.approx(1 + 0.04 / 0.06) and row["dee_nll_ts_bound"] == ""
    assert row["dee_acc"] == pytest.approx(2.0)
    de4 = df[(df["method"] == "deep_ensemble") & (df["num_members"] == 4)].iloc[0]
    assert de4["dee_nll_ts"] == pytest.approx(4.0)
    no_curve = leaderboard.leaderboard([r for r in recs if r["method"]["name"] != "deep_ensemble"])
    assert not any(c.startswith("dee_") for c in no_curve.columns)
    other = leaderboard.leaderboard(de_records() + [rec("x", "bridge", members=2, nll_ts=0.2, backbone="resnet56")])
    x = other[other["method"] == "bridge"].iloc[0]
    assert math.isnan(x["dee_nll_ts"]) and x["dee_nll_ts_bound"] == ""


def _with(record, **cfg):
    record["config"].update(cfg)
    return record


def test_leaderboard_and_dee_keep_training_recipes_apart():
    """Runs that differ only in a recipe field (here weight decay) are two rows, never two seeds of one,
    and a result is read off the DE curve of its own recipe only."""
    recs = [_with(r, weight_decay=5e-4) for r in de_records()] + [
        _with(rec("bridge-a", "bridge", members=2, nll_ts=0.27), weight_decay=5e-4),
        _with(rec("bridge-wd", "bridge", members=2, nll_ts=0.27, seed=1), weight_decay=1e-4),
        _with(rec("single-wd", "single", nll_ts=0.5, seed=2), weight_decay=1e-4),
    ]
    got = leaderboard.dee(recs)
    assert got["bridge-a"].size == pytest.approx(1.5)
    assert "bridge-wd" not in got and "single-wd" not in got      # its recipe has no DE curve
    df = leaderboard.leaderboard(recs)
    bridges = df[df["method"] == "bridge"]
    assert len(bridges) == 2 and list(bridges["n_seeds"]) == [1, 1]
    singles = df[df["method"] == "single"]
    assert sorted(singles["n_seeds"]) == [1, 2]
    md = formatting.format_markdown(df)
    assert "weight_decay=0.0001" in md and "weight_decay=0.0005" in md
    assert columns.recipe_differences(['{"a":1,"momentum":0.9}', '{"momentum":0.9}']) == ["", ""]   # unknown keys
    assert columns.recipe_differences(['{"momentum":0.9}', '{"momentum":0.0}']) == ["momentum=0.9", "momentum=0.0"]
    # a field the row's schedule never reads is not shown for that row (milestones: multistep only)
    cos = '{"schedule":"cosine","milestones":[0.5,0.75],"lr_decay":0.1,"nesterov":false}'
    step = '{"schedule":"multistep","milestones":[0.3,0.6,0.8],"lr_decay":0.2,"nesterov":true}'
    assert columns.recipe_differences([cos, step]) == [
        "schedule=cosine, nesterov=False", "schedule=multistep, milestones=[0.3, 0.6, 0.8], lr_decay=0.2, nesterov=True"]
    # against the common recipe (figure legends): the common rows say nothing, a departing row names its
    # departures and what its own schedule reads that the common one does not, even at the common value
    step_common = '{"schedule":"multistep","milestones":[0.5,0.75],"lr_decay":0.1,"nesterov":false}'
    assert columns.recipe_differences([cos, cos, step, step_common], against_common=True) == [
        "", "", "schedule=multistep, milestones=[0.3, 0.6, 0.8], lr_decay=0.2, nesterov=True",
        "schedule=multistep, milestones=[0.5, 0.75], lr_decay=0.1"]
    assert columns.common_recipe([cos, cos, step, step_common]) == {"schedule": "cosine", "nesterov": False}
    assert columns.common_recipe([step, cos]) == {"schedule": "cosine", "nesterov": False}   # a tie: the smaller


def test_dee_curve_is_of_the_same_data_and_precision_and_counts_a_seed_once():
    """A result is read off the DE curve of its own data (fingerprint) and training precision only, as a
    row's seeds are pooled; a seed recorded twice (two run ids) counts once in the curve."""
    other_data = _with(rec("bridge-data", "bridge", members=2, nll_ts=0.27), data_id={"sha256": "other"})
    bf16 = rec("bridge-bf16", "bridge", members=2, nll_ts=0.27)
    bf16["training"] = {"precision": "bf16"}
    recs = de_records() + [rec("bridge-a", "bridge", members=2, nll_ts=0.27), other_data, bf16]
    got = leaderboard.dee(recs)
    assert got["bridge-a"].size == pytest.approx(1.5)
    assert "bridge-data" not in got and "bridge-bf16" not in got
    df = leaderboard.leaderboard(recs)
    apart = df[(df["method"] == "bridge") & ((df["precision"] == "bf16") | (df["data_id"] == "other"))]
    assert len(apart) == 2 and apart["dee_nll_ts"].isna().all()
    # seed 1 of the single model recorded again under another run id: the curve's size 1 stays (0.31 + 0.29) / 2
    twice = de_records() + [rec("single-1-again", "single", nll_ts=0.41, acc=0.8, seed=1),
                            rec("bridge-a", "bridge", members=2, nll_ts=0.27)]
    with pytest.warns(UserWarning, match="counted once"):
        assert leaderboard.dee(twice)["bridge-a"].size == pytest.approx(1.5)
