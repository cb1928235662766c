"""The leaderboard engine: complete records grouped into configurations x seeds, and every aggregate
anybody shows (the ``leaderboard`` command, its CSV and markdown, the report).

* :class:`Group`: the seeds of one row, as flat rows (:func:`ensemble_bench.columns.flatten_record`);
  :meth:`Group.stat` is the one mean / sample std rule (a value missing in any seed makes both NaN; timed
  columns per device);
* :func:`group_rows`: rows grouped by :data:`~ensemble_bench.columns.GROUP_KEYS`, one group per configuration
  (a leaderboard row, a report configuration): its seeds pooled whatever machine each ran on, its timings
  per device (:meth:`Group.stat` with a device; a leaderboard row shows those of its main device,
  :func:`main_devices`);
* :func:`leaderboard`: the DataFrame (CSV) of the groups, with mCE and DEE columns;
* mCE (:func:`mce_values`) and the deep-ensemble-equivalent size (:func:`group_dee`, :func:`dee`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from ensemble_bench.columns import (
    BUDGET_TOL,
    COST_COLUMNS,
    DEVICE_COLUMNS,
    DEVICE_OF,
    GROUP_KEYS,
    MCE_KEYS,
    METRIC_COLUMNS,
    NOT_AGGREGATED,
    NUMERIC_RECIPE_KEYS,
    TEXT_KEYS,
    flatten_record,
    num,
)
from ensemble_bench.formatting import device_name, format_markdown
from ensemble_bench.records import write_text_atomic

UNKNOWN_DEVICE = "unknown device"
# DEE (below): the curve of a recipe is made of the records with these keys in common: the same data (by
# their fingerprint) and training precision too, as a row's seeds (GROUP_KEYS)
DEE_KEYS = ("dataset", "backbone", "epochs", "batch_size", "lr", "recipe", "data_id", "precision")
DEE_LEADERBOARD_METRICS = ("nll_ts", "acc")


# --------------------------------------------------------------------------------------------
# groups of seeds
# --------------------------------------------------------------------------------------------


class Stat(NamedTuple):
    """Mean, sample std (ddof=1; NaN with one value) and the number of values."""

    mean: float
    std: float
    n: int


def mean_std(values: Sequence[Any]) -> Stat:
    """The aggregation rule of every leaderboard cell: mean and sample std over the seeds' values; a value
    missing (NaN) in any seed makes both NaN (no silent averaging over fewer seeds than there are)."""
    v = np.asarray([num(x) for x in values], dtype=np.float64)
    if len(v) == 0 or np.isnan(v).any():
        return Stat(math.nan, math.nan, len(v))
    return Stat(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v))


def timing_device(row: Mapping, col: str) -> str:
    """The device a timed column of a flat row was measured on (:data:`UNKNOWN_DEVICE` when not recorded)."""
    return device_name(row.get(DEVICE_OF[col]), UNKNOWN_DEVICE)


@dataclass
class Group:
    """The seeds of one leaderboard row (or one report configuration): the flat rows of its complete
    records, ``fields`` the values of the keys they share."""

    fields: dict
    rows: list = field(default_factory=list)
    records: list = field(default_factory=list)

    @property
    def seeds(self) -> list:
        return sorted({r.get("seed") for r in self.rows if r.get("seed") is not None}, key=str)

    def values(self, col: str, device: str | None = None) -> list[float]:
        """``col`` of every seed (only those measured on ``device`` for a timed column)."""
        rows = self.rows if device is None else [r for r in self.rows if timing_device(r, col) == device]
        return [num(r.get(col)) for r in rows]

    def stat(self, col: str, device: str | None = None) -> Stat:
        """(mean, sample std, n) of ``col`` over the seeds (on ``device`` for a timed column)."""
        return mean_std(self.values(col, device))

    def devices(self, col: str) -> list[str]:
        """The devices the timed column ``col`` was measured on, sorted."""
        return sorted({timing_device(r, col) for r in self.rows})


def _as_number(v: Any) -> Any:
    """A numeric key as pandas.to_numeric(errors="coerce") reads it: ints stay ints, text is parsed."""
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        return v.item() if isinstance(v, np.generic) else v
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return math.nan
    return math.nan


def _key_value(k: str, v: Any) -> Any:
    if k in TEXT_KEYS:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
    if k in NUMERIC_RECIPE_KEYS:
        return _as_number(v)
    return v


def _key_tuple(fields: Mapping, keys: Sequence[str]) -> tuple:
    """The values of ``keys`` as a comparable tuple: a missing number (NaN) is None, so it equals another."""
    return tuple(None if isinstance(v, float) and math.isnan(v) else v for v in (fields.get(k) for k in keys))


def group_rows(rows: Sequence[dict], keys: Sequence[str], records: Sequence[dict] | None = None) -> list[Group]:
    """Flat rows grouped by ``keys``, groups in the order of their first row. Text keys are compared as text
    (missing = ""), the numeric recipe keys as numbers, a missing number equals a missing number. The rows'
    key values are normalised in place; ``records`` (same order as ``rows``) are kept beside them."""
    groups: dict[tuple, Group] = {}
    for i, row in enumerate(rows):
        for k in keys:
            row[k] = _key_value(k, row.get(k))
        key = _key_tuple(row, keys)
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group({k: row[k] for k in keys})
        g.rows.append(row)
        if records is not None:
            g.records.append(records[i])
    return list(groups.values())


def aggregated_columns(rows: Sequence[Mapping]) -> list[str]:
    """The numeric columns averaged over seeds, in the order they first appear: every column but the keys and
    flags whose values are all numbers (NaN included) or missing, at least one of them a number."""
    numeric: dict[str, bool] = {}
    present: set[str] = set()
    for r in rows:
        for k, v in r.items():
            if k in NOT_AGGREGATED:
                continue
            is_num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            numeric[k] = numeric.get(k, True) and (is_num or v is None)
            if is_num:
                present.add(k)
    return [k for k, ok in numeric.items() if ok and k in present]


def complete_groups(records: Sequence[dict], keys: Sequence[str] = GROUP_KEYS) -> list[Group]:
    """The complete records (status "complete") as groups of ``keys``."""
    complete = [r for r in records if r.get("status", "complete") == "complete"]
    groups = group_rows([flatten_record(r) for r in complete], keys, complete)
    return one_record_per_seed(groups) if tuple(keys) == tuple(GROUP_KEYS) else groups


def one_record_per_seed(groups: list[Group]) -> list[Group]:
    """Each row's records, one per seed. Two records of one row with the same seed are the same experiment
    twice (under two run ids: a flag that does not act on this device, a copied file); pooled, they would
    count as two seeds and shrink the spread. The one of the smallest run id is kept, with a warning that
    names both (the same rule everywhere, so the leaderboard and the report agree)."""
    for g in groups:
        order = sorted(range(len(g.rows)), key=lambda i: str(g.rows[i].get("run_id")))
        kept: dict[Any, int] = {}
        for i in order:
            seed = g.rows[i].get("seed")
            if seed is None or num(seed) != num(seed):
                kept[("no seed", i)] = i
            elif seed in kept:
                warnings.warn(f"{g.rows[i].get('run_id')} is seed {seed} of the same row as "
                              f"{g.rows[kept[seed]].get('run_id')} (same data, recipe, options and precision): "
                              f"counted once, as {g.rows[kept[seed]].get('run_id')}", stacklevel=2)
            else:
                kept[seed] = i
        keep = sorted(kept.values())
        if len(keep) != len(g.rows):
            g.rows = [g.rows[i] for i in keep]
            if g.records:
                g.records = [g.records[i] for i in keep]
    return groups


# --------------------------------------------------------------------------------------------
# the leaderboard table
# --------------------------------------------------------------------------------------------


def main_devices(g: Group) -> dict[str, str]:
    """Per device column (latency, throughput, training): the device most of the row's seeds name there
    (ties: the first by name; :data:`UNKNOWN_DEVICE` when none names one). A leaderboard row shows the
    timings of these devices, so that a timing is never averaged across devices."""
    out = {}
    for dcol in DEVICE_COLUMNS:
        counts: dict[str, int] = {}
        for r in g.rows:
            d = device_name(r.get(dcol), UNKNOWN_DEVICE)
            counts[d] = counts.get(d, 0) + 1
        out[dcol] = min(counts, key=lambda d: (-counts[d], d)) if counts else UNKNOWN_DEVICE
    return out


def _flags(g: Group, devices: Mapping[str, str] | None = None) -> dict:
    """The per-run columns a row reports as how its seeds agree instead of a mean (the latency's busy flag:
    of the seeds timed on ``devices``' latency device, all seeds without it)."""
    code_ids = {r.get("code_id") for r in g.rows}
    lat = None if devices is None else devices["latency_device"]
    timed = [r for r in g.rows if lat is None or timing_device(r, "latency_ms") == lat]
    return {
        "converged": seeds_converged(g),
        "converged_why": curve_evidence(g),
        # an unknown code next to known code counts as one more version
        "code_versions": len(code_ids) if code_ids != {None} else 0,
        "stage_recipes": next((s for s in (r.get("stage_recipes") for r in g.rows) if s), ""),
        "latency_busy": any(bool(v) for v in (r.get("latency_busy") for r in timed) if v is not None and v == v),
        # machines the seeds trained on: more than one pools seeds across machines (timings: main device only)
        "train_devices": len(g.devices("train_s")),
    }


def seeds_converged(g: Group) -> bool | None:
    """Whether every seed's curves converged (its record's ``converged``); None when a seed's cannot say."""
    verdicts = [r.get("converged") for r in g.rows]
    return None if any(v is None or v != v for v in verdicts) else bool(all(verdicts))


def curve_evidence(g: Group) -> str:
    """Why a row's curves say it had not converged: per seed still falling at its end (in seed order), the
    stage falling the most and its trend (columns.not_converged_text): "seed 1 member1: -1.26 % over epochs
    55-60, 3.1 SE"; "" when every seed with curves is flat (a seed without curves makes the row's verdict
    None, "?", while this still names the seeds that were falling)."""
    rows = sorted(g.rows, key=lambda r: str(r.get("seed")))
    return "; ".join(f"seed {r.get('seed')} {r['converged_why']}" for r in rows if r.get("converged_why"))


class Budget(NamedTuple):
    """A longer budget of the same configuration: its epochs and how much lower (relative) its mean end-of-training
    validation NLL was than this row's; ``short``: at least columns.BUDGET_TOL, so this budget was too short."""

    epochs: int
    gain: float

    @property
    def short(self) -> bool:
        return self.gain >= BUDGET_TOL


def longer_budgets(groups: Sequence[Group]) -> list[Budget | None]:
    """Per group, among the groups that are the same configuration (GROUP_KEYS but the epochs) trained for
    more epochs, the one whose mean end-of-training validation NLL is lowest relative to this group's (the
    strongest evidence that this budget was short; a still longer run may overfit); None: no such group."""
    keys = [k for k in GROUP_KEYS if k != "epochs"]
    # (configuration without the epochs, epochs, mean end-of-training validation NLL) of every group, once
    facts = [(_key_tuple(g.fields, keys), num(g.fields.get("epochs")), g.stat("val_nll_end").mean) for g in groups]
    out: list[Budget | None] = []
    for config, ep, mine in facts:
        best = None
        for other_config, other, theirs in facts:
            if (other > ep and math.isfinite(mine) and mine > 0 and math.isfinite(theirs) and other_config == config
                    and (best is None or (mine - theirs) / mine > best.gain)):
                best = Budget(int(other), (mine - theirs) / mine)
        out.append(best)
    return out


def converged_verdicts(groups: Sequence[Group]) -> list[tuple[bool | None, Budget | None]]:
    """Per group, the row's convergence verdict and the longer budget it was judged against: converged when
    every seed's curves converged (columns.record_converged) and no longer budget of the same configuration
    ended clearly better (:func:`longer_budgets`); None when the curves cannot say."""
    out = []
    for g, budget in zip(groups, longer_budgets(groups)):
        verdict = seeds_converged(g)
        out.append((None if verdict is None else verdict and not (budget is not None and budget.short), budget))
    return out


def leaderboard(records: list[dict]):
    """Aggregate records into one row per configuration; mean and std over seeds.

    Rows are groups of :data:`GROUP_KEYS` (dataset, data, backbone, method, config_key, epochs, batch_size,
    lr, the rest of the recipe, combine, num_members): one experiment, its seeds pooled whatever machine
    each ran on. Timings are never averaged across devices: a timed column is the mean over the seeds timed
    on the row's main device of it (:func:`main_devices`, in ``latency_device`` / ``throughput_device`` /
    ``train_device``); ``train_devices`` counts the machines its seeds trained on. For every numeric column ``x``: ``x_mean`` and
    ``x_std`` (:func:`mean_std`: sample std, ddof=1; NaN with one seed; a value missing in any seed
    of a group makes that group's mean/std NaN). Also ``n_seeds`` (runs in the group), ``seeds``
    (sorted list as a string) and ``run_ids``; ``converged`` (:func:`converged_verdicts`), its curves' evidence
    ``converged_why`` (:func:`curve_evidence`), with
    ``budget_epochs`` / ``budget_gain`` (:func:`longer_budgets`); ``mce`` with shift evaluations; ``dee_<metric>`` and
    ``dee_<metric>_bound`` when a deep-ensemble curve exists (:data:`DEE_LEADERBOARD_METRICS`).
    Records whose status is not "complete" are left out with a warning. Sorted by dataset,
    backbone, then ``acc_mean`` descending.
    """
    import pandas as pd

    complete = [r for r in records if r.get("status", "complete") == "complete"]
    if len(complete) != len(records):
        warnings.warn(f"leaderboard: left out {len(records) - len(complete)} record(s) whose status is not 'complete'", stacklevel=2)
    flat = [flatten_record(r) for r in complete]
    if not flat:
        cols = [*GROUP_KEYS, *DEVICE_COLUMNS, "n_seeds", "seeds"]
        cols += [f"{c}_{s}" for c in (*METRIC_COLUMNS, *COST_COLUMNS) for s in ("mean", "std")] + ["run_ids"]
        return pd.DataFrame(columns=cols)
    groups = one_record_per_seed(group_rows(flat, GROUP_KEYS, complete))
    value_cols = aggregated_columns(flat)
    has_shift = any("_shift_errors" in r for r in flat)
    rows = []
    for g, (verdict, budget) in zip(groups, converged_verdicts(groups)):
        row = dict(g.fields)
        devices = main_devices(g)
        row.update({k: "" if d == UNKNOWN_DEVICE else d for k, d in devices.items()})
        seeds = sorted(int(s) for s in (r.get("seed") for r in g.rows) if num(s) == num(s))
        row["n_seeds"] = len(g.rows)
        row["seeds"] = str(seeds)
        row.update(_flags(g, devices))
        row["converged"] = verdict
        row["budget_epochs"] = budget.epochs if budget is not None else math.nan
        row["budget_gain"] = budget.gain if budget is not None else math.nan
        for c in value_cols:   # a timed column: over the seeds timed on the row's device of it
            row[f"{c}_mean"], row[f"{c}_std"], _ = g.stat(c, devices[DEVICE_OF[c]] if c in DEVICE_OF else None)
        row["run_ids"] = ",".join(sorted(str(r.get("run_id")) for r in g.rows))
        rows.append(row)
    df = pd.DataFrame(rows)
    if has_shift:   # mCE relative to the single model of the same data and recipe (never in the run)
        df["mce"] = mce_values([g.rows for g in groups], [r for g in groups for r in g.rows])
    for k in ("epochs", "batch_size", "num_members"):
        if df[k].notna().all():
            df[k] = df[k].astype("int64")
    df = df.sort_values(
        ["dataset", "backbone", "acc_mean", "method", "config_key"],
        ascending=[True, True, False, True, True],
        na_position="last",
        kind="mergesort",
    )
    groups = [groups[i] for i in df.index]
    df = df.reset_index(drop=True)
    # deep-ensemble-equivalent sizes when the records hold a DE curve
    for metric in DEE_LEADERBOARD_METRICS:
        if metric not in value_cols:
            continue
        if not dee_curves(groups, metric):
            continue
        sizes = group_dee(groups, metric)
        df[f"dee_{metric}"] = [math.nan if d is None else d.size for d in sizes]
        df[f"dee_{metric}_bound"] = ["" if d is None else d.bound for d in sizes]
    return df


def write_leaderboard(df, csv_path: str | os.PathLike | None = None, md_path: str | os.PathLike | None = None) -> None:
    """Write the leaderboard as CSV (every column) and/or markdown (:func:`format_markdown`), atomically."""
    if csv_path is not None:
        write_text_atomic(csv_path, df.to_csv(index=False))
    if md_path is not None:
        write_text_atomic(md_path, format_markdown(df))


# --------------------------------------------------------------------------------------------
# corruption error (mCE)
# --------------------------------------------------------------------------------------------


def _mean_errors(texts: Sequence[Any]) -> tuple[str, dict] | None:
    """(set identity, {corruption: {severity: mean error}}) over records' ``_shift_errors``; None when one
    lacks them, they come from different sets or cover different cells."""
    parsed = []
    for t in texts:
        if not isinstance(t, str):
            return None
        parsed.append(json.loads(t))
    if not parsed:
        return None
    ident = json.dumps(parsed[0]["set"])
    cells = {(c, sev) for c, by in parsed[0]["errors"].items() for sev in by}
    for p in parsed[1:]:
        if json.dumps(p["set"]) != ident or {(c, sev) for c, by in p["errors"].items() for sev in by} != cells:
            return None
    mean: dict[str, dict[str, float]] = {}
    for c, sev in cells:
        mean.setdefault(c, {})[sev] = math.fsum(num(p["errors"][c][sev]) for p in parsed) / len(parsed)
    return ident, mean


def corruption_error(errors: Mapping[str, Mapping[str, float]], reference: Mapping[str, Mapping[str, float]]) -> float:
    """mCE in percent (Hendrycks & Dietterich, ICLR 2019): for each corruption c, CE_c = sum over severities
    of the error / the same sum for the reference (the single model); mCE = 100 x mean over corruptions.
    Every (corruption, severity) of ``errors`` must be in ``reference`` (else NaN); NaN when a reference sum
    is 0 or an error is missing."""
    ces = []
    for c, by_sev in errors.items():
        ref = reference.get(c)
        if not by_sev or ref is None or any(s not in ref for s in by_sev):
            return math.nan
        den = math.fsum(num(ref[s]) for s in by_sev)
        total = math.fsum(num(v) for v in by_sev.values())
        if not den > 0 or math.isnan(total):
            return math.nan
        ces.append(total / den)
    return 100.0 * math.fsum(ces) / len(ces) if ces else math.nan


def mce_values(groups: Sequence[Sequence[Mapping]], rows: Sequence[Mapping]) -> list[float]:
    """mCE (percent, ``corruption_error``) of each group of flat rows (the seeds of one leaderboard row or
    report config), from their seed-mean errors, against the single model among ``rows``: every size-reference
    row with one member of the same MCE_KEYS whose errors come from the same shift set (all its seeds
    pooled). NaN for a group without shift errors in every seed, or without such a reference."""
    def key(r: Mapping) -> tuple:
        return tuple(num(r.get(k)) if k in NUMERIC_RECIPE_KEYS else str(r.get(k)) for k in MCE_KEYS)

    refs: dict[tuple, dict[str, list]] = {}
    for r in rows:
        t = r.get("_shift_errors")
        if bool(r.get("size_reference")) and num(r.get("num_members")) == 1 and isinstance(t, str):
            refs.setdefault(key(r), {}).setdefault(json.dumps(json.loads(t)["set"]), []).append(t)
    out = []
    for g in groups:
        errs = _mean_errors([r.get("_shift_errors") for r in g]) if g else None
        ref = None
        if errs is not None:
            texts = refs.get(key(g[0]), {}).get(errs[0])
            ref = _mean_errors(texts) if texts else None
        out.append(math.nan if ref is None else corruption_error(errs[1], ref[1]))
    return out



# --------------------------------------------------------------------------------------------
# deep-ensemble-equivalent size (DEE)
# --------------------------------------------------------------------------------------------
#
# DEE of a result (Yun et al. 2023, after Kim et al.'s "deep ensemble equivalent"): the size of a deep
# ensemble that reaches the same metric, read off a DE curve measured on the same harness.
#
# The DE curve of a recipe (same dataset, data, backbone, epochs, batch size, lr, the rest of the recipe and
# precision: DEE_KEYS) is made of the complete records of the size-reference methods (record method.size_reference, set from the method's
# class: deep ensembles of any size, and the single model as size 1), the metric averaged over seeds at each size. A curve needs size 1 and at
# least one other size. Rule: with g = the metric oriented so that larger is better (-nll, acc), the
# curve is taken as its running best over sizes (a larger DE is credited with the best value any smaller
# one reached, so seed noise cannot make the answer ambiguous) and linearly interpolated between the
# measured sizes; DEE is the smallest size s at which this curve reaches g. Outside the curve nothing is
# extrapolated: a result better than the largest DE measured (size M) is reported as DEE(M, ">") and
# one worse than the single model as DEE(1, "<").


class DEE(NamedTuple):
    """A deep-ensemble-equivalent size: ``size`` (interpolated; the curve's end when out of range) and
    ``bound``: "" inside the DE curve, ">" better than the largest DE measured, "<" worse than one model."""

    size: float
    bound: str = ""

    def __str__(self) -> str:
        return f"{self.bound}{self.size:.2f}"


def higher_is_better(metric: str) -> bool:
    """acc, member_acc, acc_at_95, shift_acc* (shifted accuracy, also per severity), auroc*, aupr*: larger is
    better; every other metric (nll, nll_ts, ece, ece_adaptive, brier, aurc, fpr95, shift_nll, shift_ece,
    mce): smaller is better."""
    return metric in ("acc", "member_acc", "acc_at_95") or metric.startswith(("auroc", "aupr", "shift_acc"))


def dee_size(value: float, curve: list[tuple[float, float]], larger_better: bool) -> DEE:
    """DEE of ``value`` on ``curve`` = [(size, metric), ...] (any order; sizes distinct, smallest 1). See
    the rule above."""
    pts = sorted((float(m), float(v) if larger_better else -float(v)) for m, v in curve)
    if len(pts) < 2 or pts[0][0] != 1.0:
        raise ValueError("a DE curve needs size 1 and at least one larger size")
    env, best = [], -math.inf
    for m, g in pts:
        best = max(best, g)
        env.append((m, best))
    g = float(value) if larger_better else -float(value)
    if g < env[0][1]:
        return DEE(env[0][0], "<")
    if g > env[-1][1]:
        return DEE(env[-1][0], ">")
    if g == env[0][1]:
        return DEE(env[0][0])
    for (m0, g0), (m1, g1) in zip(env, env[1:]):
        if g0 < g <= g1:
            return DEE(m0 + (g - g0) / (g1 - g0) * (m1 - m0))
    return DEE(env[-1][0])   # unreachable: g lies within [env[0], env[-1]]


def dee_key(fields: Mapping) -> tuple:
    """The training recipe of a row or group as DE curves compare it (:data:`DEE_KEYS`, numbers as numbers)."""
    return tuple(num(fields.get(k)) if k in NUMERIC_RECIPE_KEYS else str(fields.get(k)) for k in DEE_KEYS)


def dee_curves(groups: Sequence[Group], metric: str) -> dict[tuple, list[tuple[float, float]]]:
    """{recipe (:func:`dee_key`): [(size, mean), ...]}: the DE curve of every recipe among ``groups``. At each
    size (members), the mean of ``metric`` over the size-reference groups of that size: each group's seed
    mean weighted by its seeds, groups whose mean is missing left out. A recipe without size 1 and another
    size has no curve."""
    sums: dict[tuple, dict[float, list[float]]] = {}
    for g in groups:
        if not bool(g.fields.get("size_reference")):
            continue
        size, v = num(g.fields.get("num_members")), g.stat(metric).mean
        if math.isnan(size) or math.isnan(v) or size < 1:
            continue
        w = float(max(len(g.rows), 1))
        acc = sums.setdefault(dee_key(g.fields), {}).setdefault(size, [0.0, 0.0])
        acc[0] += w * v
        acc[1] += w
    return {key: sorted((m, s / w) for m, (s, w) in by_size.items())
            for key, by_size in sums.items() if 1.0 in by_size and len(by_size) >= 2}


def group_dee(groups: Sequence[Group], metric: str) -> list[DEE | None]:
    """DEE of every group's seed mean of ``metric`` on the DE curve of its recipe among ``groups`` (None
    without a curve or without the value)."""
    curves = dee_curves(groups, metric)
    better = higher_is_better(metric)
    out: list[DEE | None] = []
    for g in groups:
        curve, v = curves.get(dee_key(g.fields)), g.stat(metric).mean
        out.append(None if curve is None or math.isnan(v) else dee_size(v, curve, better))
    return out


def dee(records: list[dict], metric: str = "nll_ts") -> dict[str, DEE]:
    """DEE of every complete record whose recipe (DEE_KEYS) has a DE curve among ``records``, by run id.
    The curve is the seed-mean of ``metric`` at each size of the reference methods' records (the single
    model counts as size 1; a seed recorded twice counts once, :func:`one_record_per_seed`). Records without
    the metric, or without a curve, are left out."""
    complete = [r for r in records if r.get("status", "complete") == "complete"]
    rows = [flatten_record(r) for r in complete]
    if metric not in METRIC_COLUMNS and not any(metric in r for r in rows):
        raise ValueError(f"unknown metric {metric!r} for DEE")
    # group_rows normalises every row's keys in place, so each record is then compared as its row is
    curves = dee_curves(one_record_per_seed(group_rows(rows, GROUP_KEYS, complete)), metric)
    better = higher_is_better(metric)
    out: dict[str, DEE] = {}
    for row in rows:        # every record on its own
        curve, v = curves.get(dee_key(row)), num(row.get(metric))
        if curve is not None and not math.isnan(v):
            out[str(row["run_id"])] = dee_size(v, curve, better)
    return out