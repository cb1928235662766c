"""A record as one flat row: the columns the leaderboard aggregates and the rules that make them.

:func:`flatten_record` turns a record (:mod:`ensemble_bench.records`) into identity columns (what makes
two runs seeds of one configuration: :data:`GROUP_KEYS`), metric, OOD, shift and cost columns, the
devices, and per-run flags: whether training converged (the convergence rule below), whether the
latency was measured on a busy machine, and which code made it. To add a leaderboard column, add it
here; :mod:`ensemble_bench.leaderboard` aggregates every numeric column over seeds.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from ensemble_bench import recipe as _recipe
from ensemble_bench.config import RUN_SETTING_FIELDS
from ensemble_bench.record_types import Cost, Metrics, MethodInfo, RunRecord, Training
from ensemble_bench.records import _jsonable

METRIC_COLUMNS = ("acc", "nll", "ece", "brier", "nll_ts", "ece_ts", "temperature", "member_acc", "disagreement",
                  "aurc", "acc_at_95", "ece_adaptive")
# distribution shift (metrics.shift of a run with --shift, see ensemble_bench.shift.evaluate_shift): the mean over
# every corruption x severity cell, and the accuracy per severity (mean over corruptions)
SHIFT_MEAN_COLUMNS = ("acc", "nll", "ece")       # -> shift_acc, shift_nll, shift_ece
SHIFT_SEVERITY_COLUMNS = tuple(f"shift_acc_s{s}" for s in range(1, 6))
# mCE (Hendrycks & Dietterich 2019) of a row is relative to the single model (a size-reference record with
# one member) of the same data, training recipe and precision: these keys
MCE_KEYS = ("dataset", "data_id", "backbone", "epochs", "batch_size", "lr", "recipe", "precision")
COST_COLUMNS = (
    "params", "params_nonzero", "flops", "macs", "flops_dense",
    "latency_ms", "throughput", "peak_mem_mb", "train_s", "train_flops",
)
DEVICE_COLUMNS = ("latency_device", "throughput_device", "train_device")
MSP_OOD_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95")
# a row of the leaderboard (a configuration of the report) is one group of these keys: one experiment, whose
# seeds are pooled whatever machine each ran on (the machine is where a run ran, not what was run: it moves
# its numbers by floating-point rounding, as a seed does); everything else numeric is mean/std over seeds,
# except the timed columns, which are never averaged across devices (TIMED, DEVICE_OF)
GROUP_KEYS = (
    "dataset", "data_id", "backbone", "method", "config_key", "epochs", "batch_size", "lr", "recipe",
    "precision", "combine", "num_members", "size_reference",
)
TEXT_KEYS = ("dataset", "data_id", "backbone", "method", "config_key", "recipe", "precision", "combine",
             *DEVICE_COLUMNS)
# per-record columns that are not averaged over seeds (the row says how its seeds agree instead)
ROW_FLAGS = ("converged", "converged_why", "code_id", "stage_recipes", "latency_busy")
NOT_AGGREGATED = set(GROUP_KEYS) | set(DEVICE_COLUMNS) | {"seed", "run_id", "status", "_shift_errors", *ROW_FLAGS}
# the timed columns (a figure or a table column each, per device) -> the column naming their device
TIMED = {"latency_ms": "latency_device", "throughput": "throughput_device",
         "peak_mem_mb": "latency_device", "train_s": "train_device"}
# every device-dependent column -> the column naming its device: aggregated only over the seeds of one device
DEVICE_OF = {**TIMED, "latency_spread": "latency_device", "train_s_recorded": "train_device"}
# the recipe columns kept as numbers (group keys, DEE keys, the report's recipe of a config)
NUMERIC_RECIPE_KEYS = _recipe.OWN_COLUMN_FIELDS   # ("epochs", "batch_size", "lr"): declared on Recipe
# the rest of the effective training recipe (ensemble_bench.recipe.Recipe, as trained) and the run settings that
# change numbers: runs that differ in any of them are different experiments, never seeds of one row; the
# leaderboard keeps them as the "recipe" column (canonical JSON) and shows only the fields that differ
# (and data-parallel training's world size: distributed.recipe_fields puts it in the effective recipe, and so
# in the run id, only when it is above 1; a recipe without it is read as 1 process)
RECIPE_FIELDS = tuple(f for f in _recipe.RECIPE_FIELDS if f not in NUMERIC_RECIPE_KEYS) + RUN_SETTING_FIELDS + (
    "world_size",)
_RECIPE_DEFAULTS = {"world_size": 1}

# Convergence rule (one rule for every row; the numbers are printed under every table): a training stage
# that is meant to converge has converged unless its validation NLL (a stage without one: its own validation
# metric, e.g. a bridge's KL) was still falling at the end. "Still falling" = both of
#   - the least-squares line through its last max(CONVERGENCE_MIN_EPOCHS, ceil(CONVERGENCE_WINDOW * E))
#     epochs falls by more than CONVERGENCE_TOL of the metric's mean across those epochs, and
#   - its slope is more than CONVERGENCE_NOISE standard errors (of the fit's residuals) below zero: a small
#     validation split moves epoch to epoch; a drop inside that noise is not evidence of improvement.
# A run has converged when all its stages have; a row when all its seeds have. Why the last 10 % and not a
# longer fit: a schedule that decays to zero (cosine) makes its largest gains while it anneals; a fit that
# reaches back into the anneal calls every finished cosine run unconverged (measured: the reference single
# model's val NLL 0.789 -> 0.738 over epochs 23-26 of 30, then flat within 0.006 for 4 epochs). Whether the
# budget itself is long enough is a separate question, answered by a longer run (results/reference/).
# A schedule that restarts (cyclic cosine: snapshot ensembles) anneals within every cycle, so the last 10 % is
# the middle of the last anneal, falling by design. Such a stage (its curve's lr rises after a fall,
# ``recipe.cycle_ends``, and its last epoch ends a cycle too) is judged on its last two cycle ends instead:
# still falling when the last is below the one before by more than CONVERGENCE_TOL of their mean and by more
# than CONVERGENCE_NOISE standard errors of that difference, taken image by image on the validation split
# (the curve's ``val_nll_diff_se``; a record without it is judged on CONVERGENCE_TOL alone). Measured: the
# reference snapshot's cycle ends 0.884, 0.772, 0.686, 0.655, 0.659 (the fit rule read 0.879 -> 0.659 inside
# the last anneal); the quickstart's 144-image digits split moves by one confident image. A cycle end is an
# epoch end: when the cycles do not divide the epochs, it is the last epoch end before the restart, a little
# short of the annealed point (the snapshot itself is mid-epoch), so the comparison leans toward "falling".
CONVERGENCE_WINDOW = 0.10
CONVERGENCE_MIN_EPOCHS = 4
CONVERGENCE_TOL = 0.01
CONVERGENCE_NOISE = 2.0   # measured: 1.0 flagged flat, noisy quickstart curves (4 of 11 rows); 2.0 only the underfit ones
# Budget rule (the second question, answered where the evidence exists): when the table also holds the same
# configuration trained for more epochs, a row is not converged if that longer budget ended at a validation
# NLL lower by BUDGET_TOL or more (relative; "val_nll_end": the mean over the run's converging stages of their
# last epoch's validation NLL, the data the suite selects on, never the test set). A cosine run always ends
# flat, so only a longer run can say a budget was short: measured on the reference ResNet-8 (results/reference,
# budget_check.py), 60 epochs ended the single model's validation NLL well below 30 epochs'.
BUDGET_TOL = 0.03
# A latency whose spread inside its own measurement, (p90 - p10) / median, exceeds this was measured on a
# busy machine: the leaderboard marks it instead of presenting the median as a measurement.
LATENCY_BUSY_SPREAD = 0.5


def recipe_differences(recipes: Sequence[Any], against_common: bool = False,
                       common: Mapping | None = None) -> list[str]:
    """For recipe strings (the "recipe" column), the text of the fields that differ between them, one entry
    each ("weight_decay=0.0001, schedule=multistep"); "" for all when they are the same.

    ``against_common`` (figure legends, where a label repeated for 26 configs hides the points): an entry
    names only the fields where it departs from the most common value (:func:`common_recipe`), and the
    fields its own schedule reads that the common one does not (a step schedule's milestones); ``common``:
    that answer when the caller has it already."""
    parsed = [_parse_recipe(r) for r in recipes]
    keys = [k for k in RECIPE_FIELDS if len({json.dumps(d.get(k), sort_keys=True) for d in parsed}) > 1]
    if not against_common:
        return [", ".join(f"{k}={d.get(k)}" for k in keys if _used(k, d)) for d in parsed]
    common = common_recipe(recipes) if common is None else common
    return [", ".join(f"{k}={d.get(k)}" for k in keys if _used(k, d) and (
        json.dumps(d.get(k), sort_keys=True) != json.dumps(common.get(k), sort_keys=True) or not _used(k, common)))
        for d in parsed]


def common_recipe(recipes: Sequence[Any]) -> dict:
    """The most common value of each recipe field that differs between ``recipes`` (a tie goes to the
    smallest value's JSON, so the answer does not depend on the order), leaving out the fields the
    common schedule does not read: what a label that names only departures leaves unsaid."""
    parsed = [_parse_recipe(r) for r in recipes]
    out = {}
    for k in RECIPE_FIELDS:
        value, n_distinct = most_common([d.get(k) for d in parsed])
        if n_distinct > 1:
            out[k] = value
    return {k: v for k, v in out.items() if _used(k, out)}


def most_common(values: Sequence[Any]) -> tuple[Any, int]:
    """The most frequent of ``values`` (compared as canonical JSON; a tie goes to the smallest JSON, so the
    answer does not depend on the order) and how many distinct values there are."""
    counts: dict[str, int] = {}
    first: dict[str, Any] = {}
    for v in values:
        key = json.dumps(v, sort_keys=True, default=str)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, v)
    if not counts:
        return None, 0
    return first[min(counts, key=lambda key: (-counts[key], key))], len(counts)


def _parse_recipe(r: Any) -> dict:
    try:
        d = json.loads(r) if isinstance(r, str) else {}
    except json.JSONDecodeError:
        d = {}
    return {**_RECIPE_DEFAULTS, **d} if isinstance(d, dict) else {}


def _used(field: str, recipe: Mapping) -> bool:
    """Whether ``recipe``'s schedule reads ``field`` (``recipe.UNUSED_UNLESS``: a cosine row does not show the
    milestones that only a multistep row beside it uses)."""
    needs = _recipe.UNUSED_UNLESS.get(field)
    return needs is None or "schedule" not in recipe or recipe.get("schedule") == needs



def num(x: Any) -> float:
    """A number of a record as a float; NaN for None, booleans and anything that is not a number."""
    if isinstance(x, bool) or x is None:
        return math.nan
    if isinstance(x, (int, float, np.integer, np.floating)):
        return float(x)
    return math.nan


def as_dict(x: Any) -> dict:
    """``x`` when it is a dict, else an empty one (records are read defensively)."""
    return x if isinstance(x, dict) else {}


def _canonical(obj: Any) -> str:
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class Trend(NamedTuple):
    """How a stage's validation curve ended, as the convergence rule reads it: ``fall`` is the drop the rule
    compares with CONVERGENCE_TOL, relative to the mean level (of the fitted line across the window, relative
    to the window's mean; or from the previous cycle end to the last, relative to the two ends' mean;
    negative: it rose), ``se`` that drop in standard errors (NaN where the rule has none: a window under 3
    points, a cycle end without ``val_nll_diff_se``; +-inf: an exact line), ``first`` / ``last`` the window's
    epochs (a cycle: the two cycle ends), ``cyclic`` whether it was judged on cycle ends."""

    converged: bool
    fall: float
    se: float
    first: str
    last: str
    cyclic: bool

    def text(self) -> str:
        """"-1.26 % over epochs 55-60, 3.1 SE" / "cycle ends 48 -> 60: -3.10 %, 2.4 SE"."""
        se = f", {self.se:.1f} SE" if math.isfinite(self.se) else ""
        if self.cyclic:
            return f"cycle ends {self.first} -> {self.last}: {-100 * self.fall:+.2f} %{se}"
        return f"{-100 * self.fall:+.2f} % over epochs {self.first}-{self.last}{se}"


def stage_trend(stage: Mapping) -> Trend | None:
    """The convergence rule on one stage's learning curve, with its evidence (None: no validation curve to
    judge)."""
    curve = [e for e in (stage.get("curve") or []) if isinstance(e, dict)]
    key = "val_nll" if any("val_nll" in e for e in curve) else "val"
    entries = [e for e in curve if isinstance(e.get(key), (int, float)) and not isinstance(e.get(key), bool)]
    vals = [float(e[key]) for e in entries]
    if len(vals) < 2 or not all(math.isfinite(v) for v in vals):
        return None
    def epoch(i: int) -> str:   # the curve's epoch number of entry i (its position when it has none)
        i %= len(entries)
        e = entries[i].get("epoch", i + 1)
        return f"{e:g}" if isinstance(e, (int, float)) else str(e)
    cycle = _last_cycle(entries)
    if cycle is not None:
        (i_before, before), (_, last) = cycle
        drop, level = float(before[key]) - float(last[key]), (abs(float(before[key])) + abs(float(last[key]))) / 2
        paired = key == "val_nll" and last.get("diff_from_epoch") == before.get("epoch")
        se = last.get("val_nll_diff_se") if paired else None
        has_se = isinstance(se, (int, float)) and math.isfinite(se) and se > 0
        noise = CONVERGENCE_NOISE * float(se) if has_se else 0.0
        return Trend(not (drop > CONVERGENCE_TOL * level and drop > noise), drop / level if level else 0.0,
                     drop / float(se) if has_se else math.nan, epoch(i_before), epoch(-1), True)
    n = len(vals)
    k = min(n, max(CONVERGENCE_MIN_EPOCHS, math.ceil(CONVERGENCE_WINDOW * n)))
    fit = np.asarray(vals[-k:], dtype=np.float64)
    level = float(np.abs(fit).mean())
    if len(fit) < 3 or level == 0:
        fall = float(fit[0] - fit[-1]) / level if level else 0.0
        return Trend(bool(fit[-1] >= fit[0] - CONVERGENCE_TOL * level), fall, math.nan, epoch(n - k), epoch(-1), False)
    t = np.arange(len(fit), dtype=np.float64)
    slope, intercept = np.polyfit(t, fit, 1)
    resid = fit - (intercept + slope * t)
    stderr = math.sqrt(float(resid @ resid) / (len(fit) - 2) / float(((t - t.mean()) ** 2).sum()))
    fall = float(-slope * (len(fit) - 1) / level)
    falling = fall > CONVERGENCE_TOL and -slope > CONVERGENCE_NOISE * stderr
    # a window on an exact line (a made-up curve) has residuals of rounding size: its fall is not noise at all
    se = float(-slope / stderr) if stderr > 1e-9 * level else math.copysign(math.inf, -slope) if slope else 0.0
    return Trend(not falling, fall, se, epoch(n - k), epoch(-1), False)


def stage_converged(stage: Mapping) -> bool | None:
    """The convergence rule on one stage's learning curve (None: no validation curve to judge)."""
    trend = stage_trend(stage)
    return None if trend is None else trend.converged


def _last_cycle(entries: Sequence[Mapping]) -> tuple[tuple[int, Mapping], tuple[int, Mapping]] | None:
    """For a curve whose learning rate restarts (``recipe.cycle_ends`` on its ``lr``) and whose last epoch
    ends a cycle as well (its rate no higher than the previous cycle end's), (index, entry) of the previous
    cycle end and of the last epoch; None otherwise."""
    lrs = [e.get("lr") for e in entries]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in lrs):
        return None
    ends = _recipe.cycle_ends(lrs)
    if not ends or lrs[-1] > lrs[ends[-1]] * (1 + 1e-6) + 1e-12:
        return None
    return (ends[-1], entries[ends[-1]]), (len(entries) - 1, entries[-1])


def stage_end_val_nll(stage: Mapping) -> float:
    """The validation NLL of a stage's last epoch (NaN without one)."""
    vals = [e.get("val_nll") for e in (stage.get("curve") or []) if isinstance(e, dict)]
    return num(vals[-1]) if vals else math.nan


def typed_record(rec: RunRecord | Mapping) -> RunRecord:
    """``rec`` as a :class:`RunRecord`: a dict's typed fields are validated (not its identity, nor what a
    complete record has: hand-made and partial records flatten to NaN where they lack a value)."""
    if isinstance(rec, RunRecord):
        return rec
    return RunRecord.from_dict(rec, f"record {as_dict(rec).get('run_id')!r}", complete=False, identity=False)


def record_trends(rec: RunRecord | Mapping) -> dict[str, Trend]:
    """The trend of every stage of the run that is meant to converge and has a validation curve, by stage."""
    training = typed_record(rec).training
    stages = as_dict(training.stages if training is not None else None)
    trends = {name: stage_trend(s) for name, s in stages.items() if isinstance(s, dict) and s.get("converges", True)}
    return {name: t for name, t in trends.items() if t is not None}


def trends_converged(trends: Mapping[str, Trend]) -> bool | None:
    """All of ``trends`` (a run's stages, :func:`record_trends`) converged; None when there are none."""
    return all(t.converged for t in trends.values()) if trends else None


def record_converged(rec: RunRecord | Mapping) -> bool | None:
    """All stages of the run that are meant to converge have (None: the record has no curves)."""
    return trends_converged(record_trends(rec))


def verdict_text(trends: Mapping[str, Trend], no: str = "NO") -> str:
    """A run's own verdict in words: "?" (no curves), "yes", or ``no`` with the evidence
    ("NO (member1: -1.26 % over epochs 55-60, 3.1 SE)")."""
    verdict = trends_converged(trends)
    return "?" if verdict is None else "yes" if verdict else f"{no} ({not_converged_text(trends)})"


def not_converged_text(trends: Mapping[str, Trend]) -> str:
    """The evidence against a run's convergence: its stage still falling the most, with its trend, and how
    many other stages were still falling ("member1: -1.26 % over epochs 55-60, 3.1 SE"); "" when none was."""
    falling = sorted(((-t.fall, name) for name, t in trends.items() if not t.converged))
    if not falling:
        return ""
    name = falling[0][1]
    more = f" (+{len(falling) - 1} more stage{'s' if len(falling) > 2 else ''})" if len(falling) > 1 else ""
    return f"{name}: {trends[name].text()}{more}"


def record_end_val_nll(rec: RunRecord | Mapping) -> float:
    """The mean, over the run's stages meant to converge, of their last epoch's validation NLL (NaN when
    none has one): the quantity the budget rule compares between budgets."""
    training = typed_record(rec).training
    stages = as_dict(training.stages if training is not None else None)
    ends = [stage_end_val_nll(s) for s in stages.values() if isinstance(s, dict) and s.get("converges", True)]
    ends = [v for v in ends if math.isfinite(v)]
    return float(np.mean(ends)) if ends else math.nan


def _stage_recipes_text(training: Training) -> str:
    """The stage recipes that differ from the run's effective recipe: "explore: schedule=constant; ..."."""
    def show(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, list):
            return "[" + ", ".join(show(x) for x in v) + "]"
        if isinstance(v, dict):   # a parameter group: "fast_weights(lr_scale=0.5 weight_decay=0)"
            rest = " ".join(f"{k}={show(x)}" for k, x in v.items() if k != "name")
            return f"{v['name']}({rest})" if "name" in v else "{" + rest + "}"
        return str(v)

    by_text: dict[str, list[str]] = {}
    for name, st in as_dict(training.stages).items():
        ch = as_dict(as_dict(st).get("recipe_changes"))
        if ch:
            by_text.setdefault(", ".join(f"{k}={show(v)}" for k, v in sorted(ch.items())), []).append(str(name))
    return "; ".join(f"{'+'.join(names)}: {text}" for text, names in by_text.items())


def device_kind(device: Any) -> str | None:
    """"cpu" or "cuda" of a record's device string (``cost.device_name``: "cpu: <model> (N threads)", "N x
    cpu: ..." for DDP, the GPU's name on CUDA); "mixed" for a run whose epochs trained on both (devices
    joined by " + ", ``train.Trainer.training_device``); None when there is none."""
    if not isinstance(device, str) or not device:
        return None
    kinds = {"cpu" if re.search(r"(^|x )(cpu|mps)\b", d.strip()) else "cuda" for d in device.split(" + ")}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def train_precision(cfg: Mapping, training: Training) -> str:
    """The arithmetic a run trained in, "bf16" or "fp32": as the record states it (``training.precision``,
    written by ``train.Trainer``), else as the Trainer decides it (autocast when ``bf16`` is set and the
    training device is a CUDA one: records from before the field); "" when the record names neither. A group
    key: seeds of one row may come from different machines, never from different precisions."""
    if training.precision:
        return str(training.precision)
    kind = device_kind(training.device)
    if kind is None:
        return ""
    return "bf16" if kind == "cuda" and bool(cfg.get("bf16", False)) else "fp32"


def _as_trained(recipe: dict, training: Training) -> dict:
    """The recipe column's settings as they acted: ``bf16`` acts only through the precision (its own group
    key), and ``channels_last`` only on CUDA (train.Trainer), so two CPU runs that differ in either flag
    trained identically and are seeds of one row."""
    out = {k: v for k, v in recipe.items() if k != "bf16"}
    if device_kind(training.device) == "cpu":
        out.pop("channels_last", None)
    return out


def plugin_hashes(code: Mapping) -> list[tuple[str, str]]:
    """(module, sha256) of every plugin a record's ``code`` names, sorted; [] without plugins."""
    return sorted((str(p.get("module")), str(p.get("sha256"))) for p in code.get("plugins") or []
                  if isinstance(p, Mapping))


def code_id(code: Mapping | None) -> str | None:
    """The code that made a record, as one string: the harness's and the method's hashes and every plugin's
    (a plugin may define the backbone or the data a method trains on); None when the record does not say."""
    if not code:
        return None
    plugins = ",".join(f"{module}:{sha}" for module, sha in plugin_hashes(code))
    return f"{code.get('harness_sha256')}/{code.get('method_sha256')}" + (f"/{plugins}" if plugins else "")


def record_train_s(training: Training) -> tuple[float, float]:
    """(typical, recorded) training seconds of a run, the leaderboard's ``train_s`` and ``train_s_recorded``.

    recorded: the record's ``train_s``, the sum of every epoch's wall time plus the method's own extra training
    time (``train_s_extra``, e.g. a calibration fit). typical: per stage, its first epoch as measured (one-off
    costs of a stage such as compilation, autotuning or the first allocations are the method's) plus the median
    of its other epochs times their number, plus the same extra; a stage whose curve lacks some epoch times
    counts its recorded ``train_s`` (or, without one, its median epoch times its epochs), and a record whose
    stages say nothing is its recorded total. An epoch stretched by a stall (the process paused, the machine
    busy with something else) thus counts as a typical epoch of its stage, so a row's training time is the
    method's, not the machine's history: on the reference sweep's CPU records the recorded sums were up to 2.2
    times the typical ones (lanes paused for the tests, busy session starts), while a stage's ordinary epochs
    vary by a few percent. A run trained on two machines (resumed elsewhere) counts its stage's median epoch,
    the row naming both devices."""
    recorded = num(training.train_s)
    stages = [as_dict(st) for st in as_dict(training.stages).values() if isinstance(st, Mapping)]
    extra = num(training.extra.get("train_s_extra"))
    extra = extra if math.isfinite(extra) else 0.0
    typical = 0.0
    for st in stages:
        curve = st.get("curve") or []
        times = [num(as_dict(e).get("epoch_s")) for e in curve]
        times = [t for t in times if math.isfinite(t)]
        own = num(st.get("train_s"))
        if times and len(times) == len(curve):
            typical += times[0] + (float(np.median(times[1:])) * (len(times) - 1) if len(times) > 1 else 0.0)
        elif math.isfinite(own):
            typical += own
        elif times:
            typical += float(np.median(times)) * len(curve)
        else:
            return recorded, recorded
    return (typical + extra if stages else recorded), recorded


def flatten_record(rec: RunRecord | Mapping) -> dict:
    """One flat row of a record (a :class:`RunRecord`, or its dict): identity columns, metrics, msp OOD
    metrics per set, cost, devices.

    Values that are absent from the record become NaN (numbers) or None (strings).
    """
    rec = typed_record(rec)
    cfg = as_dict(rec.config)
    meth = rec.method or MethodInfo()
    metrics = rec.metrics or Metrics()
    cost = rec.cost or Cost()
    training = rec.training or Training()
    data = as_dict(rec.data)
    options = meth.options if isinstance(meth.options, dict) else as_dict(cfg.get("options"))
    # the effective recipe as trained (records before it existed: the run's settings)
    eff = {**cfg, **as_dict(cfg.get("effective_recipe"))}
    code = as_dict(rec.code)
    p10, p90, med = num(cost.latency_ms_p10), num(cost.latency_ms_p90), num(cost.latency_ms)
    spread = (p90 - p10) / med if med > 0 else math.nan
    trends = record_trends(rec)
    conv = trends_converged(trends)

    row: dict[str, Any] = {
        # a user's dataset is a TOML path in the config: the table shows the name it declares
        "dataset": (data.get("name") or cfg.get("dataset")
                    if str(cfg.get("dataset", "")).endswith(".toml") else cfg.get("dataset", rec.extra.get("dataset"))),
        "data_id": as_dict(cfg.get("data_id")).get("sha256"),
        "backbone": cfg.get("backbone", rec.extra.get("backbone")),
        "method": meth.name or cfg.get("method"),
        "config_key": _canonical(options),
        "epochs": eff.get("epochs"),
        "batch_size": eff.get("batch_size"),
        "lr": eff.get("lr"),
        "recipe": _canonical(_as_trained({k: eff[k] for k in RECIPE_FIELDS if k in eff}, training)),
        "precision": train_precision(cfg, training),
        "stage_recipes": _stage_recipes_text(training),
        "converged": conv,
        "converged_why": not_converged_text(trends),
        "val_nll_end": record_end_val_nll(rec),
        "code_id": code_id(code),
        "latency_spread": spread,
        "latency_busy": bool(spread > LATENCY_BUSY_SPREAD) if spread == spread else None,
        "seed": cfg.get("seed"),
        "run_id": rec.run_id,
        "status": rec.status,
        "combine": meth.combine,
        "num_members": num(meth.num_members),
        # the method declares its members independent full copies of the backbone (api.Method.size_reference):
        # its records at sizes 1..M form the deep-ensemble size curve of DEE
        "size_reference": bool(meth.size_reference or False),
    }
    for k in METRIC_COLUMNS:
        row[k] = num(metrics.get(k))
    for set_name, by_score in sorted(as_dict(metrics.ood).items()):
        by_score = as_dict(by_score)
        msp = as_dict(by_score.get("msp"))
        for m in MSP_OOD_METRICS:
            row[f"{m}_{set_name}"] = num(msp.get(m))
        for score, vals in sorted(by_score.items()):
            if score != "msp":
                row[f"auroc_{set_name}_{score}"] = num(as_dict(vals).get("auroc"))
    row.update(_shift_columns(metrics.shift, as_dict(data.get("shift"))))
    for k in COST_COLUMNS:
        if k != "train_s":
            row[k] = num((training if k == "train_flops" else cost).get(k))
    row["train_s"], row["train_s_recorded"] = record_train_s(training)   # stalls left out (record_train_s)
    row["latency_device"] = cost.latency_device or cost.device
    row["throughput_device"] = cost.throughput_device or cost.latency_device or cost.device
    row["train_device"] = training.device
    return row


def _shift_columns(shift: Any, described: dict) -> dict:
    """The shift columns of a record with metrics.shift (none without): shift_acc / shift_nll / shift_ece
    (mean over all cells), shift_acc_s1..s5 (mean over corruptions at each severity; NaN for a severity the
    set lacks) and ``_shift_errors``, the per-cell errors (1 - acc) with the set's identity as JSON text,
    from which the leaderboard computes mCE (not aggregated itself)."""
    if not isinstance(shift, dict):
        return {}
    mean, by_sev = as_dict(shift.get("mean")), as_dict(shift.get("by_severity"))
    out: dict[str, Any] = {f"shift_{k}": num(mean.get(k)) for k in SHIFT_MEAN_COLUMNS}
    for col in SHIFT_SEVERITY_COLUMNS:
        out[col] = num(as_dict(by_sev.get(col[len("shift_acc_s"):])).get("acc"))
    errors = {c: {str(sev): 1.0 - num(as_dict(m).get("acc")) for sev, m in as_dict(cells).items()}
              for c, cells in as_dict(shift.get("per_corruption")).items()}
    ident = [shift.get("set"), shift.get("n_per_severity"), described.get("generator")]
    out["_shift_errors"] = json.dumps({"set": ident, "errors": errors}, sort_keys=True)
    return out

