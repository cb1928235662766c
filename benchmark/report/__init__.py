"""Plots and a readable comparison report from a folder of result records.

``ensemble-bench report RUNS_DIR [RUNS_DIR ...] -o OUT`` (folders and their subfolders) writes::

    OUT/report.md                      the report (markdown; figures referenced relatively)
    OUT/report.html                    the same as a static page (inline CSS, no scripts, no network)
    OUT/leaderboard.csv                leaderboard.leaderboard() of the complete records (every column)
    OUT/figures/<dataset>_<backbone>/  PNG + SVG of every figure of that section

One section per (dataset, backbone). In a section, one *config* is one method configuration (method,
resolved options, epochs, batch size, lr, combine rule, members); its seeds are aggregated (mean and
sample std). Quality metrics and device-free costs (FLOPs, params, train FLOPs) are aggregated over
every seed; timings (latency, throughput, peak memory, train seconds) only over the runs measured on
the same device, so each time column of the table (and each latency plot) belongs to one device.

Figures per section:

* ``pareto_flops``, ``pareto_params``, ``pareto_latency_<k>`` (one per latency device): accuracy, NLL,
  ECE and OOD AUROC (msp score, one panel per OOD set) against the cost on a log axis, error bars over
  seeds, the Pareto front (:func:`pareto_front`) drawn as a step line with ringed points;
* ``reliability``: one reliability diagram per config from the saved test predictions (15
  equal-width bins, the ECE binning of :mod:`ensemble_bench.metrics`; seeds pooled), with the samples
  per bin below it (bins with under 1 % of the samples faded);
* ``ood_hist_<set>``: the msp score (-max p̄) of the ID test split against each OOD set, per config;
* ``size_curve``: metric against the number of members M for the deep-ensemble size curve (the records
  the methods mark ``method.size_reference``, see :func:`find_size_family`), the other configs of the
  same training recipe placed on it at their deep-ensemble-equivalent size (:func:`ensemble_bench.leaderboard.dee_size`);
* ``train_cost``: accuracy against training FLOPs and training seconds (per device);
* ``learning_curves``: validation NLL and accuracy after every epoch, against epochs and training FLOPs;
* ``shift_severity`` (records evaluated with ``--shift``): accuracy and ECE against corruption severity
  (0 = clean; mean over corruptions, band: 25th-75th percentile over corruptions), one line per config,
  in the style of Ovadia et al. (NeurIPS 2019);
* ``risk_coverage`` (sections with shift evaluations, from the saved predictions): selective risk against
  coverage on the clean test split and on the corrupted test set (cells pooled), one line per config (mean
  over seeds), with its AURC.

Partial sweeps are reported, not fatal: failed runs (with their error), running runs (live, or stopped:
no process holds the run's lock), configs with
fewer seeds than the section's seed set, unreadable files and missing prediction files are listed.
The harness never names a method here: everything is derived from what the records say.

Every number comes from the leaderboard engine (:mod:`ensemble_bench.leaderboard`). The package:
``model`` (sections, configs in leaderboard order, colours, the size family), ``render`` (tables,
markdown and HTML), ``canvas`` (the drawing kit every figure ends with), ``figures`` and
``figures_shift`` (one function per figure); this module builds the report.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ensemble_bench.columns import as_dict, flatten_record, num
from ensemble_bench.errors import UsageError
from ensemble_bench.formatting import options_text
from ensemble_bench.leaderboard import leaderboard
from ensemble_bench.records import RecordError, as_folders, scan_records, write_text_atomic
from ensemble_bench.runlock import running_state
from ensemble_bench.report.canvas import Figure
from ensemble_bench.report.figures import (
    fig_learning_curves,
    fig_learning_curves_by_method,
    fig_ood,
    fig_pareto,
    fig_reliability,
    fig_size_curve,
    fig_train_cost,
    load_preds,
    reliability_bins,
)
from ensemble_bench.report.figures_shift import fig_risk_coverage, fig_shift, shift_curve
from ensemble_bench.report.model import Section, dee_metric, find_size_family, group_sections, pareto_front
from ensemble_bench.report.render import Doc, budget_lines, leaderboard_columns

__all__ = [
    "pareto_front",
    "find_size_family",
    "group_sections",
    "reliability_bins",
    "shift_curve",
    "build_report",
    "cli_report",
    "Report",
]


@dataclass
class Report:
    out_dir: Path
    markdown: Path
    html: Path
    csv: Path | None
    figures: list[Figure]
    notes: list[str]


def _describe_protocol(complete: list[dict]) -> list[str]:
    fracs = sorted({num(r.get("config", {}).get("val_fraction")) if isinstance(r.get("config"), dict) else math.nan
                    for r in complete}, key=lambda x: (math.isnan(x), x))
    known = [f for f in fracs if math.isfinite(f)]
    if not known:
        val = "Validation protocol: not recorded in these records."
    else:
        parts = [f"{f:.0%}" for f in known if f > 0]
        val = ("Validation protocol: the last " + " / ".join(parts) + " of the training set is held out "
               "(never trained on); temperature scaling (the temp-scaled NLL / ECE columns) fits one "
               "temperature shared by all members on it by minimising NLL; the test split is never used for "
               "fitting." if parts else "")
        if any(f == 0 for f in known):
            val += (" " if val else "") + "Some runs used no validation split (val_fraction 0): they have no " \
                   "temperature-scaled metrics."
    combines = sorted({str(as_dict(r.get("method")).get("combine") or "probs") for r in complete})
    rule = {"probs": "probs = the mean of the members' softmax probabilities",
            "logits": "logits = the softmax of the mean of the members' logits"}
    comb = "Combine rule (the record's method.combine, column 'combine'): " + "; ".join(
        rule.get(c, c) for c in combines) + ". Every metric is computed from the ensemble predictive p̄ of that rule."
    return [val, comb,
            "Metrics: test split; ECE top-label, 15 equal-width bins; OOD AUROC with the msp score (−max p̄), "
            "OOD positive, one column per OOD set. Mean ± sample std over seeds; best mean per column in bold.",
            "Costs: whole ensemble, per sample; FLOPs count a multiply-add as 2; latency is the median batch-1 "
            "forward; throughput at a large batch. Every timing column names its device; timings from different "
            "devices are never averaged together (separate columns)."]



def _one_line(text: Any, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _run_desc(rec: dict) -> str:
    row = flatten_record(rec)
    try:
        options = json.loads(row.get("config_key") or "{}")
    except (TypeError, json.JSONDecodeError):
        options = {}
    opts = options_text(options) if isinstance(options, dict) else str(options)
    return (f"{rec.get('run_id')}: {row.get('method') or '?'}" + (f" ({opts})" if opts else "")
            + f" on {row.get('dataset') or '?'} · {row.get('backbone') or '?'}, seed {row.get('seed')}")


def _incomplete_items(all_recs: list[dict], folder_of: dict[str, Path], problems: list[str],
                      sections: list[Section], notes: list[str]) -> list[str]:
    items = []
    for rec in all_recs:
        if rec.get("status") == "failed":
            err = rec.get("error") or "no error message recorded"
            items.append(f"FAILED {_run_desc(rec)} — {_one_line(err)}")
    for rec in all_recs:
        if rec.get("status") == "running":
            t = as_dict(rec.get("timings"))
            started = t.get("first_started") or t.get("started")
            resumed = f", resumed {t.get('started')} (process {t['processes']})" if t.get("processes") else ""
            stale, state = running_state(folder_of[rec["run_id"]], rec["run_id"])
            items.append(f"{'STOPPED' if stale else 'RUNNING'} {_run_desc(rec)}" + (f", started {started}" if started else "")
                         + resumed + f": {state}")
    for sec in sections:   # one item per set of seeds a section's configs have fewer of (a sweep half done: 27 configs)
        short: dict[tuple, list[str]] = {}
        for c in sec.configs:
            if any(s not in c.seeds for s in sec.seed_set):
                short.setdefault(tuple(c.seeds), []).append(c.label)
        for seeds, labels in short.items():
            missing = [s for s in sec.seed_set if s not in seeds]
            items.append(f"FEWER SEEDS {sec.title}: seeds {list(seeds)}, missing {missing} of the section's seeds "
                         f"{sec.seed_set}, in {len(labels)} config(s): " + "; ".join(labels))
    items += [f"UNREADABLE {_one_line(p)}" for p in problems]
    items += [f"NOTE {n}" for n in notes]
    return items


def build_report(runs_dirs: str | Path | Sequence[str | Path], out_dir: str | Path, *, figures: bool = True,
                 log: Callable[[str], None] | None = None) -> Report:
    """Build the report of every record in ``runs_dirs`` (one folder or several, subfolders too) into
    ``out_dir`` (``figures=False``: tables and lists only, no figures and no prediction files read).

    Raises :class:`~ensemble_bench.errors.UsageError` (one line) when ``runs_dir`` is missing, ``out_dir``
    is a file, or there is nothing to report (no records, only unreadable files, or no complete run).
    """
    out_dir = Path(out_dir)
    runs_dir = ", ".join(str(d) for d in as_folders(runs_dirs))
    log = log or (lambda s: None)
    try:
        pairs, problems = scan_records(runs_dirs, statuses=None, recursive=True)
    except RecordError as e:
        raise UsageError(str(e)) from None
    all_recs = [r for _, r in pairs]
    folder_of = {r["run_id"]: p.parent for p, r in pairs}   # a run's predictions and lock are beside its record
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a directory")
    complete = [r for r in all_recs if r.get("status") == "complete"]
    if not complete:
        if not all_recs and not problems:
            raise UsageError(f"nothing to report: no run records (*.json) in {runs_dir}")
        if not all_recs:
            raise UsageError(f"nothing to report: none of the {len(problems)} .json file(s) in {runs_dir} is a "
                             f"readable run record (first: {_one_line(problems[0], 200)})")
        failed = [r for r in all_recs if r.get("status") == "failed"]
        running = len(all_recs) - len(failed)
        what = ", ".join(x for x in (f"{len(failed)} failed" if failed else "", f"{running} running" if running else "") if x)
        eg = f"; first failure {failed[0].get('run_id')}: {_one_line(failed[0].get('error'), 150)}" if failed else ""
        raise UsageError(f"nothing to report: no complete run records in {runs_dir} ({what}{eg})")

    import matplotlib   # only when drawing: the CLI imports this package

    matplotlib.rcParams["svg.hashsalt"] = "ensemble-bench"   # stable SVG ids
    sections = group_sections(complete)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = Doc()
    notes: list[str] = []
    all_figs: list[Figure] = []
    n_fail = sum(r.get("status") == "failed" for r in all_recs)
    n_run = sum(r.get("status") == "running" for r in all_recs)
    doc.h(1, "ensemble-bench report")
    doc.p(f"Runs folder: {runs_dir} · {len(complete)} complete run(s) in {sum(len(s.configs) for s in sections)} "
          f"config(s), {n_fail} failed, {n_run} running, {len(problems)} unreadable file(s) · generated "
          f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}")
    doc.h(2, "Protocol")
    doc.ul(_describe_protocol(complete))

    sec_blocks = []
    for sec in sections:
        base = f"figures/{sec.slug}"
        sec_notes: list[str] = []
        log(f"report: {sec.title}: {len(sec.configs)} config(s)")
        family = find_size_family(sec.configs)
        sec_doc = Doc()
        sec_doc.h(2, sec.title)
        sec_doc.h(3, "Leaderboard")
        cols = leaderboard_columns(sec, family)
        sec_doc.table(cols)
        if sec.labels_note:   # the tables' and figures' labels name departures only: say from what
            sec_doc.p(f"Config labels: {sec.labels_note}.")
        # a marked cell's meaning is in the text too, not only in the HTML tooltip (once, however many
        # devices' latency columns carry the mark)
        for title in dict.fromkeys(col.title for col in cols if any(t.endswith(" †") for t in col.cells)):
            sec_doc.p(title)
        dm = dee_metric(family)
        if family is not None and dm is not None:
            sec_doc.p(f"DEE: deep-ensemble-equivalent size by {dm[0]} on the reference size curve "
                      f"({family.reason}), as the leaderboard computes it; '>M' / '<M' = better than the largest / "
                      f"worse than the smallest ensemble on the curve; '–' = no DEE (another training recipe, "
                      f"or the metric is missing).")
        else:
            sec_doc.p("No deep-ensemble size curve (and no DEE column): it needs complete runs of the "
                      "size-reference methods (records with method.size_reference: members are independent "
                      "full copies of the backbone, single-model recipe) of one training recipe at M = 1 and "
                      "at least one other M.")
        budget = budget_lines(sec)
        if budget:
            sec_doc.h(3, "Which config at my budget")
            sec_doc.p("The Pareto-optimal configs per cost, cheapest first (each next one costs more and is "
                      "better): pick the last one within your budget. Only converged configs are ranked: a row "
                      "the leaderboard marks as not converged is left out (listed last).")
            sec_doc.ul(budget)
        figs = []
        if figures:
            sec_doc.h(3, "Figures")
            preds = load_preds(sec, folder_of, sec_notes)
            figs += fig_pareto(sec, out_dir, base)
            figs += fig_reliability(sec, preds, out_dir, base, sec_notes)
            figs += fig_ood(sec, preds, out_dir, base)
            figs += fig_size_curve(sec, family, out_dir, base)
            figs += fig_train_cost(sec, out_dir, base)
            figs += fig_learning_curves(sec, out_dir, base)
            figs += fig_learning_curves_by_method(sec, out_dir, base)
            figs += fig_shift(sec, out_dir, base, sec_notes)
            figs += fig_risk_coverage(sec, preds, out_dir, base, sec_notes)
        if figures and not figs:
            sec_doc.p("No figures: the records of this section have no metric with a cost to plot against "
                      "and no saved predictions.")
        for f in figs:
            sec_doc.figure(f)
        all_figs += figs
        notes += [f"{sec.title}: {n}" for n in sec_notes]
        sec_blocks.append(sec_doc)

    incomplete = _incomplete_items(all_recs, folder_of, problems, sections, notes)
    doc.h(2, "Missing and incomplete runs")
    if incomplete:
        doc.p("Partial sweeps are reported, not fatal: these runs or files are not in the tables and figures.")
        doc.ul(incomplete)
    else:
        doc.p("None: every record is complete, every config has every seed of its section, every run has "
              "its predictions.")
    for sd in sec_blocks:
        doc.blocks += sd.blocks

    csv_path = out_dir / "leaderboard.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_text_atomic(csv_path, leaderboard(complete).to_csv(index=False))
    md_path = write_text_atomic(out_dir / "report.md", doc.markdown())
    html_path = write_text_atomic(out_dir / "report.html", doc.html("ensemble-bench report"))
    return Report(out_dir, md_path, html_path, csv_path, all_figs, incomplete)


def cli_report(args) -> int:
    """``ensemble-bench report RUNS_DIR [RUNS_DIR ...] -o OUT``."""
    from ensemble_bench.cli import check_output_path

    check_output_path(Path(args.out), "-o")
    rep = build_report(args.runs_dirs, args.out, log=lambda s: print(s, file=sys.stderr, flush=True))
    for item in rep.notes:
        if item.startswith(("FAILED", "UNREADABLE")):
            print(f"warning: {item}", file=sys.stderr)
    print(f"report: {rep.html} and {rep.markdown} ({len(rep.figures)} figures as PNG + SVG in "
          f"{rep.out_dir / 'figures'}; {len(rep.notes)} missing/incomplete item(s) listed)")
    return 0

