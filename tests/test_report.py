"""Reports: the Pareto front and reliability bins by hand; the DEE size curve from method.size_reference
(DEE itself is the leaderboard engine's, ensemble_bench.leaderboard, tested in test_dee.py); a report from a real run folder (every
figure present, every HTML reference resolves); partial sweeps; devices never share a column; bad
folders give one line and exit code 2."""
from __future__ import annotations

import copy
import json
import io
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from ensemble_bench import report
from ensemble_bench.cli import main
from ensemble_bench.leaderboard import DEE
from ensemble_bench.report import pareto_front
from ensemble_bench.formatting import dee_cell
from ensemble_bench.report.model import dee_for, dee_metric
from ensemble_bench.report.render import leaderboard_columns


def dee_text(d: DEE) -> str:
    """The DEE cell of the report (formatting.dee_cell; the report has no DEE text of its own)."""
    return dee_cell(d.size, d.bound)


# --------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------
def test_pareto_front_higher_is_better_with_ties_and_dominated_points():
    pts = [
        (1.0, 0.50),   # 0 front
        (2.0, 0.70),   # 1 front
        (2.0, 0.60),   # 2 same cost as 1, worse value: dominated
        (3.0, 0.70),   # 3 same value as 1, higher cost: dominated
        (4.0, 0.90),   # 4 front
        (4.0, 0.90),   # 5 identical to 4: both on the front
        (0.5, 0.20),   # 6 cheapest: front
        (5.0, 0.85),   # 7 dominated by 4
        (math.nan, 1.0),   # 8 no cost: never on the front, dominates nothing
        (6.0, math.inf),   # 9 non-finite value: left out
    ]
    assert pareto_front(pts, higher_is_better=True) == [6, 0, 1, 4, 5]
    # the same points read as lower-is-better: the cheapest point has the lowest value and dominates all
    assert pareto_front(pts, higher_is_better=False) == [6]


def test_pareto_front_lower_is_better_with_ties():
    pts = [(1, 0.10), (1, 0.10), (2, 0.05), (2, 0.08), (3, 0.05), (0.5, 0.30), (4, 0.01), (4, 0.02)]
    # 3 (same cost as 2, higher value), 4 (same value as 2, higher cost), 7 (same cost as 6, worse) are dominated
    assert pareto_front(pts, higher_is_better=False) == [5, 0, 1, 2, 6]
    # negating the values swaps the direction
    assert pareto_front([(c, -v) for c, v in pts], higher_is_better=True) == [5, 0, 1, 2, 6]
    assert pareto_front([], True) == []
    assert pareto_front([(3, 1.0)], False) == [0]
    with pytest.raises(ValueError):
        pareto_front([(1.0,)], True)


def test_pareto_front_is_exactly_the_non_dominated_set_on_random_points():
    rng = np.random.default_rng(0)
    for higher in (True, False):
        for _ in range(20):
            pts = [(float(c), float(v)) for c, v in zip(rng.integers(1, 6, 15), rng.integers(0, 6, 15))]
            front = pareto_front(pts, higher)
            g = [(c, v if higher else -v) for c, v in pts]

            def dominates(a, b):
                return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

            for i in range(len(pts)):
                dominated = any(dominates(g[j], g[i]) for j in range(len(pts)))
                assert (i in front) == (not dominated)
            assert [pts[i][0] for i in front] == sorted(pts[i][0] for i in front)


def test_dee_text_and_guards():
    # the rule itself (running best, interpolation, bounds) is leaderboard.dee_size: tests/test_dee.py
    assert dee_text(DEE(4.0, ">")) == ">4" and dee_text(DEE(2.5)) == "2.5"
    assert dee_text(DEE(1.0, "<")) == "<1" and dee_text(DEE(3.0)) == "3"


def test_reliability_bins_reproduce_the_ece_metric():
    from ensemble_bench.metrics import ece

    rng = np.random.default_rng(1)
    z = rng.normal(size=(500, 10)) * 3
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    p[:7] = np.eye(10)[rng.integers(0, 10, 7)]            # confidence exactly 1.0: a bin of its own in the ECE
    y = np.where(rng.random(500) < 0.7, p.argmax(1), rng.integers(0, 10, 500))
    b = report.reliability_bins(p, y, 15)
    assert b["ece"] == pytest.approx(ece(p, y, n_bins=15), abs=1e-12)
    assert b["count"].sum() == 500 and len(b["acc"]) == 15
    conf = p.max(1)
    in_bin = (conf >= 14 / 15)
    assert b["count"][14] == in_bin.sum()
    assert b["acc"][14] == pytest.approx((p.argmax(1) == y)[in_bin].mean())


# --------------------------------------------------------------------------------------------
# hand-made records (schema of ensemble_bench.records)
# --------------------------------------------------------------------------------------------
DEV_A, DEV_B = "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"


def make_record(run_id, method, options, seed, members, *, acc, nll, params, flops, latency, device,
                train_s=10.0, status="complete", size_reference=False, epochs=200):
    return {
        "schema_version": 1, "run_id": run_id, "status": status, "error": None,
        "config": {"method": method, "backbone": "resnet18", "dataset": "cifar10", "epochs": epochs, "seed": seed,
                   "batch_size": 128, "lr": 0.1, "val_fraction": 0.1, "options": options},
        "method": {"name": method, "options": options, "combine": "probs", "num_members": members,
                   "size_reference": size_reference},
        "metrics": {"acc": acc, "nll": nll, "nll_ts": nll * 0.9, "ece": 0.02, "brier": 0.1,
                    "ood": {"svhn": {"msp": {"auroc": 0.9, "aupr_in": 0.9, "aupr_out": 0.9, "fpr95": 0.3}}}},
        "cost": {"params": params, "flops": flops, "latency_ms": latency, "latency_device": device,
                 "throughput": 1000.0 / latency, "throughput_device": device, "device": device},
        "training": {"train_s": train_s, "train_flops": flops * 3e6, "device": device},
    }


def write_records(folder: Path, recs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for r in recs:
        (folder / f"{r['run_id']}.json").write_text(json.dumps(r))
    return folder


def test_size_family_comes_from_size_reference():
    p1, f1 = 11_000_000, 1.1e9
    ref = dict(size_reference=True)
    recs = [
        make_record("one", "alpha", {}, 0, 1, acc=0.90, nll=0.40, params=p1, flops=f1, latency=1, device=DEV_A, **ref),
        make_record("x2", "beta", {"m": 2}, 0, 2, acc=0.92, nll=0.30, params=2 * p1, flops=2 * f1, latency=2,
                    device=DEV_A, **ref),
        make_record("x4", "beta", {"m": 4}, 0, 4, acc=0.94, nll=0.20, params=4 * p1, flops=4 * f1, latency=4,
                    device=DEV_A, **ref),
        # not size-reference: members share weights, it gets placed on the curve
        make_record("g2", "gamma", {"m": 2}, 0, 2, acc=0.93, nll=0.25, params=p1, flops=2 * f1, latency=2, device=DEV_A),
        make_record("g4", "gamma", {"m": 4}, 0, 4, acc=0.95, nll=0.10, params=p1, flops=4 * f1, latency=3, device=DEV_A),
        # params and FLOPs exactly M x one member, but not size-reference: never part of the curve
        make_record("d2", "delta", {"m": 2}, 0, 2, acc=0.91, nll=0.35, params=2 * p1, flops=2 * f1, latency=2,
                    device=DEV_A),
        make_record("d3", "delta", {"m": 3}, 0, 3, acc=0.96, nll=0.05, params=3 * p1, flops=3 * f1, latency=3,
                    device=DEV_A),
    ]
    (sec,) = report.group_sections(recs)
    fam = report.find_size_family(sec.configs)
    assert fam is not None
    assert sorted(fam.by_size) == [1.0, 2.0, 4.0]
    assert [c.method for c in fam.by_size[1.0]] == ["alpha"]       # the single network is the M = 1 point
    assert {c.method for c in fam.configs} == {"alpha", "beta"}
    assert "size-reference" in fam.reason and "M = 1, 2, 4" in fam.reason
    g2 = next(c for c in sec.configs if c.method == "gamma" and c.num_members == 2)
    g4 = next(c for c in sec.configs if c.method == "gamma" and c.num_members == 4)
    # NLL curve 0.40 / 0.30 / 0.20 at M = 1 / 2 / 4: 0.25 sits halfway between 2 and 4 -> 3.0 (nll_ts = 0.9 x)
    assert dee_for(fam, g2, "nll_ts", False).size == pytest.approx(3.0)
    assert dee_for(fam, g4, "nll_ts", False) == DEE(4.0, ">")
    cols = {c.header: c for c in leaderboard_columns(sec, fam)}
    dee = cols["DEE (by nll_ts, members)"]
    by_label = dict(zip(cols["method"].cells, dee.cells))
    assert by_label["beta (m=4)"] == "4 (curve)" and by_label["alpha"] == "1 (curve)"
    assert by_label["gamma (m=2)"] == "3" and by_label["gamma (m=4)"] == ">4"
    assert by_label["delta (m=2)"] == "1.5" and by_label["delta (m=3)"] == ">4"
    assert dict(zip(cols["method"].cells, dee.best)) == {"alpha": False, "beta (m=2)": False, "beta (m=4)": False,
                                                          "gamma (m=2)": False, "gamma (m=4)": True,
                                                          "delta (m=2)": False, "delta (m=3)": True}
    # the table shows the engine's DEE of every config
    for c in sec.configs:
        d = dee_for(fam, c, "nll_ts", False)
        assert by_label[c.label].split(" ")[0] == dee_text(d)    # "2 (curve)" on the curve
    # params exactly M x one member without size_reference: no family (and no DEE column)
    (sec_d,) = report.group_sections(recs[:1] + recs[5:])
    assert report.find_size_family(sec_d.configs) is None
    assert not any(c.header.startswith("DEE") for c in leaderboard_columns(sec_d, None))
    # no family without two sizes
    (sec1,) = report.group_sections(recs[:1] + recs[3:])
    assert report.find_size_family(sec1.configs) is None
    # no family without size 1
    (sec2,) = report.group_sections(recs[1:])
    assert report.find_size_family(sec2.configs) is None


def test_size_family_prefers_the_recipe_with_most_sizes_and_never_crashes_on_odd_curves():
    p1, f1 = 1_000, 1e6
    kw = dict(params=p1, flops=f1, latency=1, device=DEV_A)
    recs = [
        make_record("s200", "alpha", {}, 0, 1, acc=0.90, nll=0.40, size_reference=True, **kw),
        make_record("b200", "beta", {"m": 2}, 0, 2, acc=0.92, nll=0.30, size_reference=True, **kw),
        make_record("s100", "alpha", {}, 0, 1, acc=0.80, nll=0.60, size_reference=True, epochs=100, **kw),
        make_record("b100", "beta", {"m": 2}, 0, 2, acc=0.82, nll=0.50, size_reference=True, epochs=100, **kw),
        make_record("c100", "beta", {"m": 4}, 0, 4, acc=0.84, nll=0.40, size_reference=True, epochs=100, **kw),
        make_record("g200", "gamma", {}, 0, 2, acc=0.91, nll=0.35, **kw),
        make_record("g100", "gamma", {}, 0, 2, acc=0.81, nll=0.55, epochs=100, **kw),
    ]
    (sec,) = report.group_sections(recs)
    fam = report.find_size_family(sec.configs)
    assert sorted(fam.by_size) == [1.0, 2.0, 4.0] and fam.recipe[0] == 100 and "epochs=100" in fam.reason
    g = {c.fields["epochs"]: c for c in sec.configs if c.method == "gamma"}
    assert dee_for(fam, g[100], "nll_ts", False).size == pytest.approx(1.5)
    assert dee_for(fam, g[200], "nll_ts", False) is None     # another recipe: not read off this curve
    cells = dict(zip(*(c.cells for c in leaderboard_columns(sec, fam) if c.header in ("method", "DEE (by nll_ts, members)"))))
    assert list(cells.values()).count("–") == 3   # gamma and the size-reference configs of epochs 200
    # a missing value and an unusable curve give no DEE, never an exception
    g[100].rows[0]["nll_ts"] = math.nan
    assert dee_for(fam, g[100], "nll_ts", False) is None
    for c in fam.by_size[1.0]:
        for r in c.rows:
            r["nll_ts"] = math.nan
    assert not fam.usable("nll_ts") and dee_for(fam, g[200], "nll_ts", False) is None
    assert dee_metric(fam) == ("nll", False)
    assert any(c.header == "DEE (by nll, members)" for c in leaderboard_columns(sec, fam))


def _table(html_text: str, index: int = 0) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Headers, cell texts and bold flags of the index-th <table> of an HTML page."""
    class P(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.cell, self.bold, self.in_cell = [], None, False, False

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.tables.append({"head": [], "rows": [], "bold": []})
            elif tag == "tr":
                self.tables[-1]["rows"].append([])
                self.tables[-1]["bold"].append([])
            elif tag in ("td", "th"):
                self.cell, self.bold, self.in_cell = "", False, True
            elif tag == "strong":
                self.bold = True

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                t = self.tables[-1]
                if tag == "th":
                    t["head"].append(self.cell)
                else:
                    t["rows"][-1].append(self.cell)
                    t["bold"][-1].append(self.bold)
                self.in_cell = False

        def handle_data(self, data):
            if self.in_cell:
                self.cell += data

    p = P()
    p.feed(html_text)
    t = p.tables[index]
    rows = [(r, b) for r, b in zip(t["rows"], t["bold"]) if r]
    return t["head"], [r for r, _ in rows], [b for _, b in rows]


def test_mixed_devices_are_never_mixed_in_a_column(tmp_path, capsys):
    p1, f1 = 11_000_000, 1.1e9
    recs = [
        make_record("a0", "alpha", {}, 0, 1, acc=0.90, nll=0.40, params=p1, flops=f1, latency=1.0, device=DEV_A, train_s=100,
                    size_reference=True),
        make_record("a1", "alpha", {}, 1, 1, acc=0.92, nll=0.38, params=p1, flops=f1, latency=1.2, device=DEV_A, train_s=110,
                    size_reference=True),
        make_record("a2", "alpha", {}, 2, 1, acc=0.91, nll=0.39, params=p1, flops=f1, latency=10.0, device=DEV_B, train_s=50,
                    size_reference=True),
        make_record("b0", "beta", {"m": 4}, 0, 4, acc=0.95, nll=0.2, params=4 * p1, flops=4 * f1, latency=2.0, device=DEV_A, train_s=400,
                    size_reference=True),
    ]
    runs = write_records(tmp_path / "runs", recs)
    out = tmp_path / "rep"
    assert main(["report", str(runs), "-o", str(out)]) == 0
    capsys.readouterr()
    head, rows, bold = _table((out / "report.html").read_text())
    time_cols = [h for h in head if h.startswith(("latency", "throughput", "train time", "peak memory"))]
    assert time_cols, head
    for h in time_cols:   # every timing column names exactly one device
        assert (DEV_A in h) != (DEV_B in h), h
    lat_a = head.index(f"latency (ms, batch 1) · {DEV_A}")
    lat_b = head.index(f"latency (ms, batch 1) · {DEV_B}")
    alpha = next(r for r in rows if r[0] == "alpha")
    beta = next(r for r in rows if r[0].startswith("beta"))
    assert alpha[lat_a] == "1.10 ± 0.14 (2 runs)"      # seeds 0 and 1 only
    assert alpha[lat_b] == "10.00 (1 run)"              # seed 2 alone, never averaged with the A100 runs
    assert beta[lat_a] == "2.00" and beta[lat_b] == "–"
    train_a = head.index(f"train time (s) · {DEV_A}")
    assert alpha[train_a].startswith("105.0 ± 7.1")
    # quality is over all three seeds; best per column in bold (acc: beta, latency on A100: alpha)
    acc = head.index("acc (%)")
    assert alpha[acc] == "91.00 ± 1.00" and beta[acc] == "95.00"
    b_alpha = bold[rows.index(alpha)]
    b_beta = bold[rows.index(beta)]
    assert b_beta[acc] and not b_alpha[acc]
    assert b_alpha[lat_a] and not b_beta[lat_a]
    assert not b_alpha[lat_b]      # one value in a column: nothing to compare, nothing bold
    md = (out / "report.md").read_text()
    assert f"latency (ms, batch 1) · {DEV_A}" in md and f"latency (ms, batch 1) · {DEV_B}" in md
    # one latency Pareto figure per device
    figs = sorted(p.name for p in (out / "figures" / "cifar10_resnet18").glob("pareto_latency_*.png"))
    assert figs == ["pareto_latency_1.png", "pareto_latency_2.png"]
    # a config with fewer seeds than the section is listed; runs without prediction files are named
    assert "FEWER SEEDS" in md and "missing [1, 2]" in md
    assert "b0 (beta): no saved predictions" in md
    _check_refs(out)


# --------------------------------------------------------------------------------------------
# a report from a small real run folder
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def real_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("report_runs") / "runs"
    code = main(["quickstart", "--methods", "single,deep_ensemble", "--epochs", "1", "--out", str(out), "--quiet"])
    assert code == 0
    return out


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v is not None:
                self.refs.append((tag, k, v))


def _check_refs(out: Path) -> list[str]:
    p = _Refs()
    p.feed((out / "report.html").read_text(encoding="utf-8"))
    assert p.refs
    for tag, attr, ref in p.refs:
        assert "://" not in ref and not ref.startswith(("/", "data:")), ref   # relative, beside the page
        target = (out / ref).resolve()
        assert target.is_file() and target.stat().st_size > 0, f"<{tag} {attr}={ref}> does not exist"
        assert out.resolve() in target.parents
    return [ref for tag, attr, ref in p.refs if tag == "img"]


def test_report_from_real_runs_has_every_figure_and_only_existing_references(real_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(real_runs), "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "report.html" in stdout
    imgs = _check_refs(out)
    base = "figures/digits_cnn_small/"
    expected = {"pareto_flops", "pareto_params", "pareto_latency_1", "reliability", "ood_hist_1_photos",
                "size_curve", "train_cost", "learning_curves"}
    assert {Path(i).stem for i in imgs} == expected and all(i.startswith(base) for i in imgs)
    for stem in expected:
        png, svg = out / base / f"{stem}.png", out / base / f"{stem}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in svg.read_text(encoding="utf-8")[:2000]
    md = (out / "report.md").read_text(encoding="utf-8")
    for stem in expected:   # the markdown shows the same figures, relatively
        assert f"]({base}{stem}.png)" in md and f"]({base}{stem}.svg)" in md
    # the table: one row per config, values from the records, protocol stated
    recs = {json.loads(p.read_text())["method"]["name"]: json.loads(p.read_text())
            for p in real_runs.glob("*.json")}
    head, rows, _ = _table((out / "report.html").read_text(encoding="utf-8"))
    assert sorted(r[0] for r in rows) == ["deep_ensemble", "single"]
    for r in rows:
        rec = recs[r[0]]
        assert r[head.index("acc (%)")] == f"{100 * rec['metrics']['acc']:.2f}"
        assert r[head.index("combine")] == rec["method"]["combine"]
        assert r[head.index("M")] == str(rec["method"]["num_members"])
    assert "the last 10% of the training set is held out" in md and "temperature" in md
    assert "probs = the mean of the members' softmax probabilities" in md
    # the size curve: the size-reference records, the single network at M = 1 and deep_ensemble at M = 4
    assert all(r["method"]["size_reference"] for r in recs.values())
    assert "size-reference methods" in md and "at M = 1, 4" in md and ": single, deep_ensemble" in md
    assert "params or FLOPs" in md
    assert (out / "leaderboard.csv").is_file()


def test_partial_sweep_lists_failed_running_and_unreadable(real_runs, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(real_runs, runs)
    single = next(json.loads(p.read_text()) for p in runs.glob("single-*.json"))
    failed = copy.deepcopy(single)
    failed.update(run_id="single-boom", status="failed", error="RuntimeError: CUDA out of memory (GPU 0)")
    failed["config"]["seed"] = 7
    for k in ("metrics", "cost", "training"):
        failed.pop(k)
    running = copy.deepcopy(failed)
    running.update(run_id="single-still", status="running", error=None)
    running["config"]["seed"] = 8
    running["timings"] = {"started": "2026-12-05T07:16:09+00:00", "first_started": "2026-12-04T20:01:00+00:00",
                          "processes": 3}     # a run resumed twice: the report gives its first start too
    extra_seed = copy.deepcopy(single)     # a second seed of single without predictions on disk
    extra_seed["run_id"] = "single-seed1"
    extra_seed["config"]["seed"] = 1
    de = next(json.loads(p.read_text()) for p in runs.glob("deep_ensemble-*.json"))
    de_more = copy.deepcopy(de)            # another config short of the same seed: one item for both
    de_more["run_id"] = "deep_ensemble-five"
    de_more["method"]["options"]["num_members"] = de_more["method"]["num_members"] = 5
    write_records(runs, [failed, running, extra_seed, de_more])
    (runs / "truncated.json").write_text('{"schema_version": 1, "run_')
    out = tmp_path / "report"
    rep = report.build_report(runs, out, figures=False)     # the figures of this folder: test above
    assert rep.figures == [] and not (out / "figures").exists()
    md = (out / "report.md").read_text(encoding="utf-8")
    section = md.split("## Missing and incomplete runs", 1)[1].split("\n## ", 1)[0]
    assert "FAILED single-boom" in section and "CUDA out of memory (GPU 0)" in section
    # no process holds its lock: the report says it was stopped and how to resume it
    assert "STOPPED single-still" in section and "run it again to resume" in section
    assert "started 2026-12-04T20:01:00+00:00, resumed 2026-12-05T07:16:09+00:00 (process 3)" in section
    assert "UNREADABLE" in section and "truncated.json" in section
    assert "FEWER SEEDS" in section and "deep_ensemble" in section     # 1 seed, single has 2
    # the configs short of the same seeds are one item, naming each (a half-done sweep lists one line, not 27)
    fewer = [ln for ln in section.splitlines() if "FEWER SEEDS" in ln]
    assert len(fewer) == 1 and "seeds [0], missing [1]" in fewer[0] and "in 2 config(s): deep_ensemble" in fewer[0]
    assert sum(item.startswith("FAILED") for item in rep.notes) == 1
    head, rows, _ = _table((out / "report.html").read_text(encoding="utf-8"))
    single_row = next(r for r in rows if r[0] == "single")
    assert single_row[head.index("seeds")] == "2"          # the failed/running seeds are not aggregated
    assert sorted(r[0] for r in rows) == ["deep_ensemble (num_members=4)", "deep_ensemble (num_members=5)", "single"]
    # the CLI also names failures and unreadable files on stderr, one line each
    from ensemble_bench.report import cli_report

    class Args:
        runs_dirs, out = [str(runs)], str(tmp_path / "again")

    report_build = report.build_report
    try:   # the same path as `ensemble-bench report`, without drawing the figures a second time
        report.build_report = lambda r, o, **kw: report_build(r, o, figures=False)
        assert cli_report(Args) == 0
    finally:
        report.build_report = report_build
    err = capsys.readouterr().err
    assert "warning: FAILED single-boom" in err and "warning: UNREADABLE" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------
def _bad(capsys, *argv) -> str:
    code = main(["report", *argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ensemble-bench: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_empty_corrupt_and_missing_folders_give_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "nothing to report: no run records" in _bad(capsys, str(empty), "-o", str(out))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.json").write_text("{not json")
    (corrupt / "b.json").write_text("[1, 2, 3]")
    (corrupt / "c.json").write_bytes(b"\xff\xfe\x00garbage")
    (corrupt / "d.json").write_text("")
    msg = _bad(capsys, str(corrupt), "-o", str(out))
    assert "nothing to report: none of the 4 .json file(s)" in msg and "a.json" in msg
    assert "does not exist" in _bad(capsys, str(tmp_path / "nope"), "-o", str(out))
    # only failed / running runs: nothing to report, the first failure named
    rec = make_record("f1", "alpha", {}, 0, 1, acc=0.9, nll=0.4, params=1, flops=1, latency=1, device=DEV_A,
                      status="failed")
    rec["error"] = "ValueError: bad lr"
    only_failed = write_records(tmp_path / "failed", [rec])
    msg = _bad(capsys, str(only_failed), "-o", str(out))
    assert "no complete run records" in msg and "1 failed" in msg and "ValueError: bad lr" in msg
    assert not out.exists()          # nothing written on bad input
    # an output path that is a file
    good = write_records(tmp_path / "good", [make_record("g", "alpha", {}, 0, 1, acc=0.9, nll=0.4, params=10,
                                                         flops=10, latency=1, device=DEV_A)])
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "not a directory" in _bad(capsys, str(good), "-o", str(afile))


# --------------------------------------------------------------------------------------------
# the HTML table, the row order, colours and the reliability figure
# --------------------------------------------------------------------------------------------
class _Cells(HTMLParser):
    """Every <td> of an HTML page: (text, attributes)."""

    def __init__(self):
        super().__init__()
        self.cells, self.cur = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "td":
            self.cur = ["", dict(attrs)]

    def handle_endtag(self, tag):
        if tag == "td" and self.cur is not None:
            self.cells.append(tuple(self.cur))
            self.cur = None

    def handle_data(self, data):
        if self.cur is not None:
            self.cur[0] += data


def _registered_defaults(method: str) -> dict:
    import ensemble_bench.methods as methods
    from ensemble_bench.config import options_dict

    return options_dict(methods.get(method).Config())


def test_html_options_cell_shows_non_default_options_with_every_option_in_its_title(tmp_path):
    bridge = {**_registered_defaults("bridge"), "mixup_alpha": 0.2, "num_bridges": 2}
    assert len(bridge) >= 6        # a method with many options: the cell shows only the two changed
    de = _registered_defaults("deep_ensemble")       # every option at its default: "–"
    kw = dict(params=1_000, flops=1e6, latency=1.0, device=DEV_A)
    recs = [make_record("b0", "bridge", bridge, 0, 2, acc=0.91, nll=0.3, **kw),
            make_record("d0", "deep_ensemble", de, 0, de["num_members"], acc=0.92, nll=0.3, **kw)]
    out = tmp_path / "rep"
    report.build_report(write_records(tmp_path / "runs", recs), out, figures=False)
    page = (out / "report.html").read_text(encoding="utf-8")
    head, rows, _ = _table(page)
    opt = head.index("options")
    cells = _Cells()
    cells.feed(page)
    by_method = {r[0]: r for r in rows}
    assert by_method["bridge"][opt] == "mixup_alpha=0.2, num_bridges=2"
    assert by_method["deep_ensemble"][opt] == "–"
    full = {text: attrs for text, attrs in cells.cells if "wrap" in attrs.get("class", "")}
    title = full["mixup_alpha=0.2, num_bridges=2"]["title"]
    for k, v in bridge.items():        # the tooltip holds every option, defaults included
        assert f"{k}=" in title, (k, title)
    assert "bridge_lr=0.1" in title and "mixup_alpha=0.2" in title
    assert "num_members=" in full["–"]["title"] and "batched=" in full["–"]["title"]
    # text columns wrap, numbers do not
    assert "td.wrap{white-space:normal" in page and "white-space:nowrap" in page
    acc_cells = [attrs for text, attrs in cells.cells if text in ("91.00", "92.00")]
    assert len(acc_cells) == 2 and all("wrap" not in a["class"] for a in acc_cells)
    # the markdown shows the same short options
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| bridge | mixup_alpha=0.2, num_bridges=2 |" in md


def relative_luminance(color: str) -> float:
    """WCAG 2 relative luminance of a ``#rrggbb`` colour (0 black .. 1 white)."""
    def lin(x: float) -> float:
        return x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4

    r, g, b = (int(color[k:k + 2], 16) / 255 for k in (1, 3, 5))
    return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b)


def test_report_rows_are_ordered_by_accuracy_and_colours_are_stable_and_strong(tmp_path):
    from ensemble_bench.report.model import PALETTE

    kw = dict(params=1_000, flops=1e6, latency=1.0, device=DEV_A)
    accs = {"alpha": 0.80, "beta": 0.95, "gamma": 0.70, "delta": 0.90}
    recs = [make_record(m, m, {}, 0, 1 if m == "alpha" else 2, acc=a, nll=1 - a, size_reference=m == "alpha", **kw)
            for m, a in accs.items()]
    recs += [make_record("beta1", "beta", {}, 1, 2, acc=0.87, nll=0.2, **kw)]   # beta: mean 0.91 over 2 seeds
    recs += [make_record("eps", "eps", {"k": 1}, 0, 2, acc=0.90, nll=0.2, **kw),   # ties delta and beta: method
             make_record("eps2", "eps", {"k": 2}, 0, 2, acc=0.90, nll=0.2, **kw)]  # then options break the tie
    out = tmp_path / "rep"
    report.build_report(write_records(tmp_path / "runs", recs), out, figures=False)
    head, rows, _ = _table((out / "report.html").read_text(encoding="utf-8"))
    expected = ["beta", "delta", "eps (k=1)", "eps (k=2)", "alpha", "gamma"]
    assert [r[0] for r in rows] == expected
    accs_shown = [float(r[head.index("acc (%)")].split()[0]) for r in rows]
    assert accs_shown == sorted(accs_shown, reverse=True)
    # the order of the leaderboard engine (and so of the markdown leaderboard)
    from ensemble_bench.leaderboard import leaderboard

    df = leaderboard(recs)
    assert [m + (f" (k={json.loads(k)['k']})" if k != "{}" else "") for m, k in zip(df["method"], df["config_key"])] \
        == expected
    md = (out / "report.md").read_text(encoding="utf-8")
    table = md.split("### Leaderboard", 1)[1].split("\n\n")[1]
    assert [ln.split(" | ")[0].lstrip("| ") for ln in table.splitlines()[2:]] == expected
    (sec,) = report.group_sections(recs)
    assert [c.label for c in sec.configs] == expected
    colours = {c.label: (c.color, c.marker) for c in sec.configs}
    # the single model (size reference, M = 1) gets the first, dark colour
    assert colours["alpha"][0] == PALETTE[0] and relative_luminance(PALETTE[0]) < 0.1
    # colours and markers do not depend on the results: swapping accuracies keeps them
    swapped = copy.deepcopy(recs)
    for r in swapped:
        r["metrics"]["acc"] = 1.0 - r["metrics"]["acc"]
    (sec2,) = report.group_sections(swapped)
    assert [c.label for c in sec2.configs] == ["gamma", "alpha", "delta", "eps (k=1)", "eps (k=2)", "beta"]
    assert {c.label: (c.color, c.marker) for c in sec2.configs} == colours
    # many configs: every colour is a strong one (no pale tab20 shade), every config looks different
    many = [make_record(f"m{i}", "zeta", {"i": i}, 0, 2, acc=0.5 + i / 100, nll=0.5, **kw) for i in range(20)]
    (sec3,) = report.group_sections(many + recs[:1])
    assert all(relative_luminance(c.color) < 0.4 for c in sec3.configs)
    assert len({(c.color, c.marker) for c in sec3.configs}) == len(sec3.configs)
    assert len({(c.color, str(c.linestyle)) for c in sec3.configs}) == len(sec3.configs)   # curves too
    # many methods (the reference leaderboard: 20 configs of 10 methods gave single-30 and packed-30 the same
    # colour and marker): the 17th config's marker moved by one onto the next method's marker
    mixed = [make_record(f"x{m}{j}", f"method{m:02d}", {"j": j}, 0, 2, acc=0.5, nll=0.5, **kw)
             for m in range(11) for j in range(3)]
    (sec4,) = report.group_sections(mixed)
    assert len({(c.color, c.marker) for c in sec4.configs}) == len(sec4.configs) == 33


def test_reliability_figure_has_a_sample_count_panel_and_fades_sparse_bins(tmp_path, monkeypatch):
    import matplotlib.colors as mcolors

    from ensemble_bench.report import canvas, figures

    kw = dict(params=1_000, flops=1e6, latency=1.0, device=DEV_A)
    recs = [make_record("a", "alpha", {}, 0, 1, acc=0.9, nll=0.3, **kw),
            make_record("b", "beta", {}, 0, 2, acc=0.8, nll=0.3, **kw)]
    (sec,) = report.group_sections(recs)
    rng = np.random.default_rng(0)
    n, k = 400, 10
    logits = rng.normal(size=(2, n, k)) * 0.5
    logits[:, 0, 0] = 50.0               # one sample at confidence ~1: a bin of one sample (< 1% of 400)
    labels = rng.integers(0, k, n)
    preds = {id(c): [{"logits": logits[:int(c.num_members)], "labels": labels, "combine": "probs",
                      "path": "x", "ood": {}}] for c in sec.configs}
    drawn = []
    monkeypatch.setattr(canvas, "save", lambda fig, out_dir, stem: drawn.append(fig))
    (f,) = figures.fig_reliability(sec, preds, tmp_path, "figures/x", [])
    (fig,) = drawn
    counts = [ax for ax in fig.axes if ax.get_label().startswith("bin counts")]
    diagrams = [ax for ax in fig.axes if ax.get_label().startswith("reliability")]
    assert len(counts) == len(diagrams) == len(sec.configs) == 2
    for ax in counts:
        assert ax.get_yscale() == "log" and ax.get_ylabel() == "samples"
        heights = sorted(round(p.get_height()) for p in ax.patches)
        assert sum(heights) == n and heights[0] == 1      # the lone sample's bin is there, counted
    for ax in diagrams:   # the bar of the one-sample bin is faded grey, the others in the config's colour
        faces = [mcolors.to_hex(p.get_facecolor()[:3]) for p in ax.patches if p.get_fill()]
        assert mcolors.to_hex("lightgrey") in faces and len(set(faces)) == 2
    assert "sample count per bin" in f.caption and "faded" in f.caption and "1%" in f.caption
    assert f.width_in > 0


def test_shared_legend_fits_inside_its_figure_however_long_the_labels():
    """A legend wider than its figure is cut at both edges (the reference report lost the first column's
    markers and the last column's text): the columns are chosen, and overlong labels wrapped, to fit."""
    from ensemble_bench.report.canvas import legend, legend_columns, new_figure
    from ensemble_bench.report.model import Config

    assert legend_columns(["single"] * 5, 8.0) == 3
    assert legend_columns(["deep_ensemble (num_members=4, epochs=30)"] * 5, 8.0) == 2
    assert legend_columns(["x" * 200], 8.0) == 1
    for labels, lines in ([f"deep_ensemble (num_members={k}, epochs={e})" for k in (2, 3, 4) for e in (30, 60)]
                          + ["dst_ensemble (update_frequency=80, epochs=60)"], False), (["packed (alpha=2, gamma=2, num_estimators=4, "
                                                                  "epochs=60, recipe=paper, " * 6, "single"], True):
        fig, axes = new_figure(4, ncols=2)
        for ax in axes:
            ax.plot([0, 1], [0, 1])
        configs = [Config({}, label=s, color="#1f4e9c", marker="o") for s in labels]
        legend(fig, configs, lines=lines)
        fig.savefig(io.BytesIO(), format="png")   # lays the figure out (a bare Figure's canvas.draw does not)
        box, page = fig.legends[0].get_window_extent(), fig.bbox
        assert box.x0 >= page.x0 - 0.5 and box.x1 <= page.x1 + 0.5, (box, page)
        assert box.y0 >= page.y0 - 0.5
    # 26 configs under three panels (the reference report's training-cost figure): the figure grows by the
    # legend, so the layout does not collapse (matplotlib warned and squeezed the panels) and each panel
    # keeps about the height it was given
    import warnings

    fig, axes = new_figure(3, ncols=2)
    for ax in axes:
        ax.plot([0, 1], [0, 1])
    labels = [f"method{i} (epochs=60, schedule=multistep, warmup_epochs=0.24, milestones=[0.4, 0.8, 0.9], "
              f"lr_decay=0.2, nesterov=True, weight_decay=0.0006)" for i in range(26)]
    legend(fig, [Config({}, label=s, color="#1f4e9c", marker="o") for s in labels], title="common: epochs=60")
    assert fig.get_size_inches()[1] > 6.4 + 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.savefig(io.BytesIO(), format="png")
    assert all(ax.get_window_extent().height / fig.dpi > 2.0 for ax in axes)
    box, page = fig.legends[0].get_window_extent(), fig.bbox
    assert box.y0 >= page.y0 - 0.5 and box.y1 < min(ax.get_window_extent().y0 for ax in axes)


def test_fronts_rank_only_converged_configs_and_busy_latency_is_marked(tmp_path):
    """An underfit row is shown, never recommended: "which config at my budget" and the Pareto fronts leave
    out a config the leaderboard marks as not converged, even when it would be on the front; a latency whose
    spread shows a busy machine gets the leaderboard's dagger in the report too, and is never bold."""
    from ensemble_bench.report.render import budget_lines

    flat = [2.0, 1.5, 1.2, 1.1, 1.05, 1.02, 1.01, 1.005, 1.003, 1.002]
    falling = [2.0, 1.8, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0, 0.9]
    kw = dict(params=1_000, flops=1e6, device=DEV_A)
    recs = [make_record("good", "alpha", {}, 0, 1, acc=0.80, nll=0.5, latency=2.0, **kw),
            # cheaper and better, but still falling when it stopped: would be the whole front
            make_record("fast", "beta", {}, 0, 1, acc=0.90, nll=0.3, latency=1.0, **kw)]
    for r, curve in zip(recs, (flat, falling)):
        r["training"]["stages"] = {"member0": {"curve": [{"epoch": i + 1, "val_nll": v} for i, v in enumerate(curve)]}}
    recs[0]["cost"].update(latency_ms_p10=0.5, latency_ms_p90=4.0)          # spread 175 %: a busy machine
    (sec,) = report.group_sections(recs)
    assert {c.label: c.converged for c in sec.configs} == {"alpha": True, "beta": False}
    lines = budget_lines(sec)
    assert lines and all("beta" not in ln for ln in lines[:-1]) and all("alpha" in ln for ln in lines[:-1])
    assert lines[-1].startswith("left out, not converged") and "beta" in lines[-1]
    out = tmp_path / "rep"
    report.build_report(write_records(tmp_path / "runs", recs), out)
    head, rows, _ = _table((out / "report.html").read_text(encoding="utf-8"))
    lat = next(i for i, h in enumerate(head) if h.startswith("latency"))
    by = {r[0]: r for r in rows}
    assert by["alpha"][lat].endswith("†") and not by["beta"][lat].endswith("†")
    assert by["beta"][head.index("converged")] == "no (seed 0 member0: -28.57 % over epochs 7-10)"   # an exact line
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "† a busy machine" in md and "**2.00 †**" not in md
    assert "Hollow markers" in md
    assert "alpha (2.00 ms †, 80.00%)" in md     # the budget line by latency carries the dagger too
    # a second seed measured busy on another device: two latency columns marked, the meaning told once
    other = make_record("good1", "alpha", {}, 1, 1, acc=0.80, nll=0.5, latency=2.0, params=1_000, flops=1e6,
                        device=DEV_B)
    other["training"]["stages"] = recs[0]["training"]["stages"]
    other["cost"].update(latency_ms_p10=0.5, latency_ms_p90=4.0)
    report.build_report(write_records(tmp_path / "runs", [other]), out, figures=False)
    head, rows, _ = _table((out / "report.html").read_text(encoding="utf-8"))
    alpha = next(r for r in rows if r[0] == "alpha")
    marked = [h for i, h in enumerate(head) if h.startswith("latency") and alpha[i].endswith("†")]
    assert len(marked) == 2
    assert (out / "report.md").read_text(encoding="utf-8").count("† a busy machine") == 1


def test_learning_curves_per_method_when_a_method_has_several_configs(tmp_path):
    """Several budgets of one method: a panel per method, every stage from its own epoch 1, the legend
    naming each config's verdict; with one config per method the figure is not drawn (the section-wide
    figure suffices)."""
    from ensemble_bench.report.figures import _stage_curves, fig_learning_curves, fig_learning_curves_by_method
    from ensemble_bench.report.model import headline_configs

    kw = dict(params=1_000, flops=1e6, latency=1.0, device=DEV_A)
    recs = []
    for run_id, method, epochs, seed, end in (("a30", "alpha", 30, 0, 0.74), ("a60", "alpha", 60, 0, 0.66),
                                               ("a60s1", "alpha", 60, 1, 0.68), ("b30", "beta", 30, 0, 0.9)):
        r = make_record(run_id, method, {}, seed, 2, acc=0.8, nll=end, epochs=epochs, **kw)
        flat = epochs // 5 + 4
        r["training"]["stages"] = {f"member{k}": {"curve": [{"epoch": i + 1, "val_nll": v} for i, v in
                                                            enumerate([2.0] * (epochs - flat) + [end + k / 100] * flat)]}
                                   for k in range(2)}
        recs.append(r)
    (sec,) = report.group_sections(recs)
    a60 = next(c for c in sec.configs if c.method == "alpha" and c.fields.get("epochs") == 60)
    st = _stage_curves(a60.records)
    assert list(st) == ["member0", "member1"] and st["member1"][-1] == pytest.approx((0.67 + 0.69) / 2)
    figs = fig_learning_curves_by_method(sec, tmp_path, "f")
    assert [f.stem for f in figs] == ["f/learning_curves_by_method"] and (tmp_path / "f/learning_curves_by_method.svg").is_file()
    svg = (tmp_path / "f/learning_curves_by_method.svg").read_text(encoding="utf-8")
    assert "epochs=30: NOT converged (2 stages)" in svg and "epochs=60: converged (2 stages)" in svg
    # another method at another lr: the section's labels name the lr, a panel's legend only what tells its
    # own configs apart (the reference report's paper-recipe rows put their whole recipe into every label)
    gamma = make_record("g60", "gamma", {}, 0, 2, acc=0.8, nll=0.7, epochs=60, **kw)
    gamma["config"]["lr"] = 0.05
    (sec,) = report.group_sections(recs + [gamma])
    # (a section's label names a setting only where its config departs from the most common value, which the
    # legends' title names: 26 configs of the reference report each repeating five common settings hid its
    # points; 30 and 60 epochs tie at two configs each: the smaller value is the common one)
    labels = {(c.method, c.fields.get("epochs")): c.label for c in sec.configs}
    assert labels == {("alpha", 30): "alpha", ("alpha", 60): "alpha (epochs=60)", ("beta", 30): "beta",
                      ("gamma", 60): "gamma (epochs=60, lr=0.05)"}
    assert sec.labels_note.endswith("most common: epochs=30, lr=0.1")
    # the section-wide learning curves: one line per method, its config at the common settings where it has one
    assert sorted((c.method, c.fields.get("epochs")) for c in headline_configs(sec)) == [
        ("alpha", 30), ("beta", 30), ("gamma", 60)]
    # ... the method's default options before more seeds (a method not registered: every option is a change)
    tuned = [make_record(f"b30k{i}", "beta", {"k": 2}, i, 2, acc=0.8, nll=0.9, epochs=30, **kw) for i in (0, 1)]
    (sec_k,) = report.group_sections(recs + [gamma] + tuned)
    assert [c.options for c in headline_configs(sec_k) if c.method == "beta"] == [{}]
    # a method whose config at the common settings has no curve keeps a line: its config that has one
    no_curve = copy.deepcopy(recs[0])
    no_curve["training"]["stages"] = {}
    (sec_nc,) = report.group_sections([no_curve, recs[1], recs[3], tuned[0]])
    fig_learning_curves(sec_nc, tmp_path, "nc")
    assert "alpha" in (tmp_path / "nc/learning_curves.svg").read_text(encoding="utf-8")
    (lc,) = fig_learning_curves(sec, tmp_path, "lc")
    assert "one line per method" in lc.caption
    assert "one line per config" in fig_learning_curves(report.group_sections([recs[1], recs[3]])[0], tmp_path,
                                                        "lc1")[0].caption
    report.build_report(write_records(tmp_path / "lr_runs", recs + [gamma]), tmp_path / "lr_rep", figures=False)
    assert f"Config labels: {sec.labels_note}." in (tmp_path / "lr_rep/report.md").read_text(encoding="utf-8")
    # the table's recipe column, as the markdown leaderboard's: – for the common recipe, a departure named
    gamma["config"].update(schedule="linear", nesterov=True)
    report.build_report(write_records(tmp_path / "nesterov_runs", recs + [gamma]), tmp_path / "nesterov_rep",
                        figures=False)
    head, rows, _ = _table((tmp_path / "nesterov_rep/report.html").read_text(encoding="utf-8"))
    col = head.index("recipe")
    assert sorted(r[col] for r in rows) == sorted(["–"] * 3 + ["schedule=linear, nesterov=True"])
    fig_learning_curves_by_method(sec, tmp_path, "h")
    svg = (tmp_path / "h/learning_curves_by_method.svg").read_text(encoding="utf-8")
    assert "epochs=30: NOT converged (2 stages)" in svg and "lr=0.1" not in svg
    (one,) = report.group_sections([recs[1], recs[3]])
    assert fig_learning_curves_by_method(one, tmp_path, "g") == []


def test_size_family_prefers_a_converged_recipe_over_an_underfit_one():
    """The budget check leaves a deep-ensemble family at 30 epochs beside its 60-epoch twin, with as many
    sizes and runs: the size curve (and so every DEE the report draws) is the converged one."""
    kw = dict(params=1_000, flops=1e6, latency=1.0, device=DEV_A)
    recs = []
    for run_id, method, opts, m, epochs, end in (("s30", "alpha", {}, 1, 30, 0.74), ("b30", "beta", {"m": 2}, 2, 30, 0.70),
                                                  ("s60", "alpha", {}, 1, 60, 0.66), ("b60", "beta", {"m": 2}, 2, 60, 0.62)):
        r = make_record(run_id, method, opts, 0, m, acc=1 - end / 2, nll=end, epochs=epochs, size_reference=True, **kw)
        flat = epochs // 5 + 4
        r["training"]["stages"] = {"member0": {"curve": [{"epoch": i + 1, "val_nll": v} for i, v in
                                                         enumerate([2.0] * (epochs - flat) + [end] * flat)]}}
        recs.append(r)
    (sec,) = report.group_sections(recs)
    assert {(c.method, c.fields["epochs"]): c.converged for c in sec.configs} == {
        ("alpha", 30): False, ("beta", 30): False, ("alpha", 60): True, ("beta", 60): True}
    fam = report.find_size_family(sec.configs)
    assert fam.recipe[0] == 60 and "epochs=60" in fam.reason


def test_size_curve_draws_its_own_underfit_sizes_hollow(tmp_path):
    """The size curve's points follow the rule of every other point: a size whose config the leaderboard
    marks as not converged is hollow and the legend names it (the reference's deep ensembles are not
    converged from one member of one seed; drawn filled, the curve looked like converged evidence)."""
    from ensemble_bench.report.figures import fig_size_curve

    kw = dict(params=1_000, flops=1e6, latency=1.0, device=DEV_A)

    def svg_of(tail_of_beta, name):
        recs = []
        for run_id, method, opts, m, end, tail in (("s", "alpha", {}, 1, 0.66, [0.66] * 10),
                                                   ("b", "beta", {"m": 2}, 2, 0.62, tail_of_beta)):
            r = make_record(run_id, method, opts, 0, m, acc=1 - end / 2, nll=end, epochs=30, size_reference=True, **kw)
            r["training"]["stages"] = {"member0": {"curve": [{"epoch": i + 1, "val_nll": v} for i, v in
                                                             enumerate([2.0] * 20 + tail)]}}
            recs.append(r)
        (sec,) = report.group_sections(recs)
        fam = report.find_size_family(sec.configs)
        (fig,) = fig_size_curve(sec, fam, tmp_path, name)
        return {c.method: c.converged for c in sec.configs}, (tmp_path / f"{name}/size_curve.svg").read_text(encoding="utf-8")

    verdicts, svg = svg_of([0.62] * 10, "flat")
    assert verdicts == {"alpha": True, "beta": True} and "not converged" not in svg
    verdicts, svg = svg_of([0.72 - 0.01 * i for i in range(10)], "falling")   # still falling at the end
    assert verdicts == {"alpha": True, "beta": False}
    assert "size curve, not converged: M = 2" in svg
