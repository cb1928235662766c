"""Plots and a readable comparison report from a folder of result records.

``ensemble-bench report RUNS_DIR -o OUT`` writes::

    OUT/report.md                      the report (markdown; figures referenced relatively)
    OUT/report.html                    the same as a static page (inline CSS, no scripts, no network)
    OUT/leaderboard.csv                results.leaderboard() of the complete records (every column)
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
  equal-width bins, the ECE binning of :mod:`ensemble_bench.metrics`; seeds pooled);
* ``ood_hist_<set>``: the msp score (-max p̄) of the ID test split against each OOD set, per config;
* ``size_curve``: metric against the number of members M for the deep-ensemble size curve (the records
  the methods mark ``method.size_reference``, see :func:`find_size_family`), the other configs of the
  same training recipe placed on it at their deep-ensemble-equivalent size (:func:`results.dee_size`);
* ``train_cost``: accuracy against training FLOPs and training seconds (per device);
* ``learning_curves``: validation NLL and accuracy after every epoch, against epochs and training FLOPs;
* ``shift_severity`` (records evaluated with ``--shift``): accuracy and ECE against corruption severity
  (0 = clean; mean over corruptions, band: 25th-75th percentile over corruptions), one line per config,
  in the style of Ovadia et al. (NeurIPS 2019);
* ``risk_coverage`` (sections with shift evaluations, from the saved predictions): selective risk against
  coverage on the clean test split and on the corrupted test set (cells pooled), one line per config (mean
  over seeds), with its AURC.

Partial sweeps are reported, not fatal: failed runs (with their error), running runs, configs with
fewer seeds than the section's seed set, unreadable files and missing prediction files are listed.
The harness never names a method here: everything is derived from what the records say.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ensemble_bench import results
from ensemble_bench.errors import UsageError

__all__ = [
    "pareto_front",
    "find_size_family",
    "group_sections",
    "reliability_bins",
    "build_report",
    "cli_report",
    "Report",
]

N_BINS = 15          # reliability diagram bins (= the ECE of specs/metrics.md)
HIST_BINS = 30       # OOD score histograms
DPI = 100

# (column, table header, scale, higher is better (None: no "best"), digits)
_QUALITY = (
    ("acc", "acc (%)", 100.0, True, 2),
    ("nll", "NLL (nats)", 1.0, False, 3),
    ("nll_ts", "NLL temp-scaled (nats)", 1.0, False, 3),
    ("ece", "ECE (%, 15 bins)", 100.0, False, 2),
    ("ece_ts", "ECE temp-scaled (%)", 100.0, False, 2),
    ("brier", "Brier", 1.0, False, 4),
    ("member_acc", "member acc (%)", 100.0, None, 2),
    ("disagreement", "disagreement (%)", 100.0, None, 2),
    ("aurc", "AURC (%)", 100.0, False, 2),
    ("acc_at_95", "acc at 95% coverage (%)", 100.0, True, 2),
    ("shift_acc", "shift acc (%)", 100.0, True, 2),
    ("shift_nll", "shift NLL (nats)", 1.0, False, 3),
    ("shift_ece", "shift ECE (%)", 100.0, False, 2),
)
# device-dependent columns -> the record column naming their device
TIMED = {"latency_ms": "latency_device", "throughput": "throughput_device",
         "peak_mem_mb": "latency_device", "train_s": "train_device"}
_TIMED_HEADER = {"latency_ms": ("latency (ms, batch 1)", False, None),
                 "throughput": ("throughput (img/s)", True, 0),
                 "peak_mem_mb": ("peak memory (MB)", False, 1),
                 "train_s": ("train time (s)", False, 1)}
# direction of the metrics plotted against cost: (column prefix, axis label, scale, higher is better)
_FRONT_METRICS = (("acc", "accuracy (%)", 100.0, True), ("nll", "NLL", 1.0, False),
                  ("ece", "ECE (%)", 100.0, False))
_SIZE_METRICS = (("acc", "accuracy (%)", 100.0, True), ("nll", "NLL", 1.0, False),
                 ("nll_ts", "NLL temp-scaled", 1.0, False), ("ece", "ECE (%)", 100.0, False))
_MARKERS = "osD^vP*Xh<>p"


# --------------------------------------------------------------------------------------------
# pure computations
# --------------------------------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the non-dominated points, in increasing cost (ties in input order).

    A point (c, v) is dominated when another point has cost <= c and a value at least as good, and is
    strictly better in one of the two (lower cost, or better value: higher when ``higher_is_better``,
    else lower). Identical points do not dominate each other, so all copies of a front point are on
    the front. Points with a non-finite cost or value are never on the front and dominate nothing.
    """
    pts = []
    for i, p in enumerate(points):
        try:
            c, v = float(p[0]), float(p[1])
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"point {i} is not a (cost, value) pair: {p!r}") from None
        if math.isfinite(c) and math.isfinite(v):
            pts.append((i, c, v if higher_is_better else -v))   # larger g is better from here on
    front = []
    for i, c, g in pts:
        dominated = any(c2 <= c and g2 >= g and (c2 < c or g2 > g) for j, c2, g2 in pts if j != i)
        if not dominated:
            front.append((c, i))
    return [i for _, i in sorted(front)]


def reliability_bins(probs_bar: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Per-bin count, accuracy and mean confidence of the top label, plus the ECE.

    The binning is the one of :func:`ensemble_bench.metrics.ece` (float32 confidences, bins [b_i, b_i+1),
    a confidence of exactly 1.0 in a bin of its own that the diagram draws with the last bin), so the
    returned ``ece`` equals the metric. Empty bins have NaN accuracy and confidence.
    """
    p = np.asarray(probs_bar, dtype=np.float64)
    y = np.asarray(labels)
    conf = np.clip(p.max(axis=1), 0.0, 1.0)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bounds = np.linspace(0, 1, n_bins + 1, dtype=np.float32)
    idx = np.searchsorted(bounds, conf.astype(np.float32), side="right") - 1
    idx = np.clip(idx, 0, n_bins)
    count = np.bincount(idx, minlength=n_bins + 1).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins + 1)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins + 1)
    ece = float(np.abs(acc_sum - conf_sum).sum() / max(len(y), 1))
    # the diagram: fold the conf == 1.0 bin into the last one
    count[n_bins - 1] += count[n_bins]
    conf_sum[n_bins - 1] += conf_sum[n_bins]
    acc_sum[n_bins - 1] += acc_sum[n_bins]
    count, conf_sum, acc_sum = count[:n_bins], conf_sum[:n_bins], acc_sum[:n_bins]
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(count > 0, acc_sum / count, np.nan)
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
    return {"edges": bounds.astype(np.float64), "count": count, "acc": acc, "conf": mean_conf, "ece": ece}


# --------------------------------------------------------------------------------------------
# configs: seeds of one method configuration
# --------------------------------------------------------------------------------------------
CONFIG_KEYS = tuple(k for k in results.GROUP_KEYS if k not in results.DEVICE_COLUMNS)


def _nan(x: Any) -> float:
    if isinstance(x, bool) or x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _hashable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (list, dict)):
        return json.dumps(v, sort_keys=True)
    return v


@dataclass
class Config:
    """One method configuration of a section and its runs (flat rows of the complete records)."""

    key: tuple
    fields: dict
    rows: list = field(default_factory=list)
    records: list = field(default_factory=list)
    label: str = ""
    color: Any = None
    marker: str = "o"

    @property
    def method(self) -> str:
        return str(self.fields.get("method") or "?")

    @property
    def options(self) -> dict:
        try:
            o = json.loads(self.fields.get("config_key") or "{}")
        except (TypeError, json.JSONDecodeError):
            return {}
        return o if isinstance(o, dict) else {}

    @property
    def num_members(self) -> float:
        return _nan(self.fields.get("num_members"))

    @property
    def seeds(self) -> list:
        return sorted({r.get("seed") for r in self.rows if r.get("seed") is not None}, key=str)

    def values(self, col: str, device: str | None = None) -> list[float]:
        rows = self.rows if device is None else [r for r in self.rows if _dev(r.get(TIMED[col])) == device]
        return [_nan(r.get(col)) for r in rows]

    def stat(self, col: str, device: str | None = None) -> tuple[float, float, int]:
        """(mean, sample std, n) over the seeds (on ``device`` for a timed column). A value missing
        in any seed makes the mean NaN, as in results.leaderboard (no silent averaging)."""
        v = np.asarray(self.values(col, device), dtype=np.float64)
        if len(v) == 0 or not np.isfinite(v).all():
            return math.nan, math.nan, len(v)
        return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)

    def devices(self, col: str) -> list[str]:
        return sorted({_dev(r.get(TIMED[col])) for r in self.rows})


def _dev(d: Any) -> str:
    return d if isinstance(d, str) and d else "unknown device"


@dataclass
class Section:
    dataset: str
    backbone: str
    configs: list[Config]
    slug: str = ""
    seed_set: list = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.dataset} · {self.backbone}"

    def ood_sets(self) -> list[str]:
        sets = set()
        for c in self.configs:
            for r in c.rows:
                sets.update(k[len("fpr95_"):] for k in r if k.startswith("fpr95_"))
        return sorted(sets)

    def timed_columns(self) -> list[tuple[str, str]]:
        """(column, device) pairs with at least one finite value, devices sorted."""
        out = []
        for col in TIMED:
            devs = sorted({d for c in self.configs for d in c.devices(col)
                           if any(math.isfinite(x) for x in c.values(col, d))})
            out += [(col, d) for d in devs]
        return out

    def has(self, col: str) -> bool:
        return any(math.isfinite(x) for c in self.configs for x in c.values(col))


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return s[:60] or "x"


def _options_text(opts: dict, keys: Iterable[str] | None = None) -> str:
    keys = list(opts) if keys is None else [k for k in opts if k in set(keys)]
    parts = []
    for k in keys:
        v = opts[k]
        parts.append(f"{k}={v if isinstance(v, str) else json.dumps(v)}")
    return ", ".join(parts)


def group_sections(complete: list[dict]) -> list[Section]:
    by_section: dict[tuple, dict[tuple, Config]] = {}
    for rec in complete:
        row = results.flatten_record(rec)
        key = tuple(_hashable(row.get(k)) for k in CONFIG_KEYS)
        sec = (str(row.get("dataset") or "?"), str(row.get("backbone") or "?"))
        cfgs = by_section.setdefault(sec, {})
        if key not in cfgs:
            cfgs[key] = Config(key=key, fields={k: row.get(k) for k in CONFIG_KEYS})
        cfgs[key].rows.append(row)
        cfgs[key].records.append(rec)
    sections = []
    used_slugs: set[str] = set()
    for (dataset, backbone), cfgs in sorted(by_section.items()):
        configs = list(cfgs.values())
        slug = _slug(f"{dataset}_{backbone}")
        while slug in used_slugs:
            slug += "_"
        used_slugs.add(slug)
        sec = Section(dataset, backbone, configs, slug)
        sec.seed_set = sorted({s for c in configs for s in c.seeds}, key=str)
        _label_configs(sec)
        sections.append(sec)
    return sections


def _label_configs(sec: Section) -> None:
    """Short unique labels: the method, the options that vary between its configs, and the training
    settings that vary in the section; a colour per config and a marker per method."""
    varying_train = [k for k in results.NUMERIC_RECIPE_KEYS
                     if len({_hashable(c.fields.get(k)) for c in sec.configs}) > 1]
    recipe_text = dict(zip(map(id, sec.configs),
                           results.recipe_differences([c.fields.get("recipe") for c in sec.configs])))
    by_method: dict[str, list[Config]] = {}
    for c in sec.configs:
        by_method.setdefault(c.method, []).append(c)
    for cfgs in by_method.values():
        keys = sorted({k for c in cfgs for k in c.options})
        vary = [k for k in keys if len({json.dumps(c.options.get(k), sort_keys=True) for c in cfgs}) > 1]
        for c in cfgs:
            extra = _options_text(c.options, vary)
            tr = ", ".join([f"{k}={c.fields.get(k)}" for k in varying_train]
                           + ([recipe_text[id(c)]] if recipe_text[id(c)] else []))
            c.label = c.method + (f" ({', '.join(x for x in (extra, tr) if x)})" if extra or tr else "")
    seen: dict[str, int] = {}
    for c in sec.configs:
        if c.label in seen:
            seen[c.label] += 1
            c.label += f" #{seen[c.label]}"
        else:
            seen[c.label] = 1
    # order: method, then members, then label (stable colours across figures)
    sec.configs.sort(key=lambda c: (c.method, _nan(c.num_members) if math.isfinite(c.num_members) else 0, c.label))
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if len(sec.configs) <= 10 else colormaps["tab20"]
    methods = sorted(by_method)
    for i, c in enumerate(sec.configs):
        c.color = cmap(i % cmap.N)
        c.marker = _MARKERS[methods.index(c.method) % len(_MARKERS)]


# --------------------------------------------------------------------------------------------
# the deep-ensemble reference family and DEE
# --------------------------------------------------------------------------------------------
_RECIPE_KEYS = tuple(k for k in results.DEE_KEYS if k not in ("dataset", "backbone"))   # a section has those two


def _recipe(c: Config) -> tuple:
    """The training recipe of a config, compared as results._dee_key does (numbers, missing = None)."""
    return tuple(_hashable(_nan(c.fields.get(k))) if k in results.NUMERIC_RECIPE_KEYS else str(c.fields.get(k))
                 for k in _RECIPE_KEYS)


@dataclass
class SizeFamily:
    """The deep-ensemble size curve of a section: its size-reference configs of one training recipe."""

    by_size: dict          # M -> [Config, ...]: every size-reference config of the recipe with M members
    recipe: tuple          # (epochs, batch_size, lr, recipe)
    reason: str

    @property
    def configs(self) -> list[Config]:
        return [c for m in sorted(self.by_size) for c in self.by_size[m]]

    def point(self, col: str, m: float) -> tuple[float, float, int]:
        """(mean, sample std, n) of ``col`` at size ``m``: the seeds of every config at that size pooled,
        configs whose mean is missing left out (the weighted row means of results.add_dee_columns)."""
        v = [x for c in self.by_size.get(m, []) if math.isfinite(c.stat(col)[0]) for x in c.values(col)]
        if not v:
            return math.nan, math.nan, 0
        a = np.asarray(v, dtype=np.float64)
        return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan, len(a)

    def curve(self, col: str) -> list[tuple[float, float]]:
        """[(M, mean)] at the sizes where ``col`` is known; usable by results.dee_size only when it holds
        size 1 and another size (see :meth:`usable`)."""
        return [(m, y) for m in sorted(self.by_size) for y in (self.point(col, m)[0],) if math.isfinite(y)]

    def usable(self, col: str) -> bool:
        sizes = [m for m, _ in self.curve(col)]
        return 1.0 in sizes and len(sizes) >= 2

    def covers(self, c: Config) -> bool:
        """Whether ``c`` is read off this curve (same recipe; results.dee gives DEE only then)."""
        return _recipe(c) == self.recipe


def find_size_family(configs: Sequence[Config]) -> SizeFamily | None:
    """The deep-ensemble size curve of a section, as the records declare it.

    A method marks its records ``method.size_reference`` when its members are independent full copies
    of the backbone trained with the single-model recipe (the single model as size 1, deep ensembles of
    any size); nothing is guessed from params or FLOPs. The family is the size-reference configs of one
    training recipe (epochs, batch size, lr), M = their member count, and it needs M = 1 and at least one
    other size (the rule of results.dee). When several recipes qualify, the one with the most sizes wins
    (then the most runs, then the smallest recipe). Configs of one size are pooled, as in results.dee.
    """
    groups: dict[tuple, dict[float, list[Config]]] = {}
    for c in configs:
        m = c.num_members
        if c.fields.get("size_reference") is True and math.isfinite(m) and m >= 1:
            groups.setdefault(_recipe(c), {}).setdefault(float(m), []).append(c)
    candidates = []
    for recipe, by_size in groups.items():
        if 1.0 not in by_size or len(by_size) < 2:
            continue
        runs = sum(len(c.rows) for cs in by_size.values() for c in cs)
        candidates.append((-len(by_size), -runs, str(recipe), recipe, by_size))
    if not candidates:
        return None
    candidates.sort(key=lambda t: t[:3])
    _, _, _, recipe, by_size = candidates[0]
    for cs in by_size.values():
        cs.sort(key=lambda c: c.label)
    sizes = ", ".join(f"{m:g}" for m in sorted(by_size))
    labels = ", ".join(c.label for m in sorted(by_size) for c in by_size[m])
    train = ", ".join(f"{k}={'?' if v is None else f'{v:g}'}" for k, v in zip(_RECIPE_KEYS, recipe)
                      if k in results.NUMERIC_RECIPE_KEYS)
    reason = (f"the records of the size-reference methods at M = {sizes} ({train}): {labels}; "
              f"method.size_reference marks members that are independent full copies of the backbone trained "
              f"with the single-model recipe; seeds pooled at each size, nothing guessed from params or FLOPs")
    return SizeFamily(by_size, recipe, reason)


def _dee_for(family: SizeFamily, config: Config, col: str, higher: bool) -> results.DEE | None:
    """results.dee_size of the config's seed mean on the family's curve; None when the config has another
    recipe, the value is missing or the curve is unusable (the report never fails on odd curves)."""
    v = config.stat(col)[0]
    if not family.covers(config) or not math.isfinite(v):
        return None
    try:
        return results.dee_size(v, family.curve(col), higher)
    except (ValueError, TypeError):
        return None


def _dee_text(d: results.DEE) -> str:
    """``>4`` / ``<1`` beyond the curve, else the size with up to two decimals (``2.5``, ``3``)."""
    if d.bound:
        return f"{d.bound}{d.size:g}"
    return f"{d.size:.2f}".rstrip("0").rstrip(".")


def _dee_metric(sec: Section, family: SizeFamily | None) -> tuple[str, bool] | None:
    """Calibrated NLL (Ashukha et al.) when the curve has it, else NLL, else accuracy."""
    if family is None:
        return None
    for col in ("nll_ts", "nll", "acc"):
        if family.usable(col):
            return col, results.higher_is_better(col)
    return None


# --------------------------------------------------------------------------------------------
# figures (matplotlib's object API on the Agg canvas: no pyplot state, no display needed)
# --------------------------------------------------------------------------------------------
@dataclass
class Figure:
    stem: str          # path relative to OUT without suffix, e.g. figures/digits_cnn_small/pareto_flops
    title: str
    caption: str

    @property
    def png(self) -> str:
        return self.stem + ".png"

    @property
    def svg(self) -> str:
        return self.stem + ".svg"


def _new_figure(n_panels: int, ncols: int, panel_w: float = 4.0, panel_h: float = 3.2):
    from matplotlib.figure import Figure as MplFigure

    ncols = max(1, min(ncols, n_panels))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = MplFigure(figsize=(panel_w * ncols, panel_h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def _save(fig, out_dir: Path, stem: str) -> None:
    path = out_dir / stem
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path.with_suffix(".png"), dpi=DPI, metadata={"Software": None})
    fig.set_layout_engine("none")   # keep the layout just computed: the SVG does not redo it
    fig.savefig(path.with_suffix(".svg"), metadata={"Date": None})


def _legend(fig, configs: Sequence[Config], extra: Sequence = ()) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c.color, marker=c.marker, linestyle="", markersize=7, label=c.label)
               for c in configs]
    handles += list(extra)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize=8,
                   frameon=False)


def _log_x(ax) -> None:
    """Log-scaled cost axis with plain numbers (2, 5, 10, 20, ...) instead of 2x10^0."""
    from matplotlib.ticker import FuncFormatter

    def major(v, _pos):
        return f"{v:g}"

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    span = hi / max(lo, 1e-300)
    shown = ({1, 2, 3, 4, 5, 6, 7, 8, 9} if span < 3 else {2, 3, 5} if span < 30
             else {2, 5} if span < 1e3 else set())

    def minor(v, _pos):
        if v <= 0:
            return ""
        lead = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
        return f"{v:.3g}" if lead in shown else ""

    ax.xaxis.set_major_formatter(FuncFormatter(major))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor))
    ax.tick_params(axis="x", which="both", labelsize=7)


def _scale_prefix(values: Iterable[float], unit: str) -> tuple[float, str]:
    vals = [abs(v) for v in values if math.isfinite(v) and v != 0]
    if not vals:
        return 1.0, unit
    top = max(vals)
    for exp, p in ((18, "E"), (15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "K")):
        if top >= 10 ** exp:
            return 10.0 ** -exp, p + unit
    return 1.0, unit


def _cost_axes(sec: Section) -> list[tuple[str, str | None, str, str]]:
    """(column, device, file stem, axis label) of every cost axis of the Pareto figures."""
    axes = []
    if sec.has("flops"):
        axes.append(("flops", None, "pareto_flops", "inference FLOPs per sample"))
    if sec.has("params"):
        axes.append(("params", None, "pareto_params", "parameters"))
    lat_devs = [d for col, d in sec.timed_columns() if col == "latency_ms"]
    for k, d in enumerate(lat_devs, 1):
        axes.append(("latency_ms", d, f"pareto_latency_{k}", f"latency (ms, batch 1) on {d}"))
    return axes


def _front_panels(sec: Section) -> list[tuple[str, str, float, bool]]:
    panels = [(col, lab, s, hi) for col, lab, s, hi in _FRONT_METRICS if sec.has(col)]
    for name in sec.ood_sets():
        if sec.has(f"auroc_{name}"):
            panels.append((f"auroc_{name}", f"OOD AUROC vs {name} (%, msp)", 100.0, True))
    return panels


def _draw_front(ax, sec: Section, xs_col: str, device: str | None, y_col: str, y_scale: float,
                higher: bool, x_scale: float = 1.0) -> int:
    """Points with error bars, front as a step line; returns how many points were drawn."""
    pts, drawn = [], set()
    for c in sec.configs:
        xm, ym = c.stat(xs_col, device)[0], c.stat(y_col)[0]
        pts.append((xm, ym) if xm > 0 else (math.nan, ym))   # a log axis has no place for cost <= 0
        if math.isfinite(pts[-1][0]) and math.isfinite(ym):
            drawn.add(id(c))
    front = pareto_front(pts, higher)
    on_front = {id(sec.configs[i]) for i in front}
    for c, (xm, ym) in zip(sec.configs, pts):
        if id(c) not in drawn:
            continue
        xs = c.stat(xs_col, device)[1]
        ys = c.stat(y_col)[1]
        ax.errorbar(xm * x_scale, ym * y_scale,
                    xerr=xs * x_scale if math.isfinite(xs) else None,
                    yerr=ys * y_scale if math.isfinite(ys) else None,
                    color=c.color, marker=c.marker, markersize=7, linestyle="", capsize=2,
                    alpha=1.0 if id(c) in on_front else 0.45,
                    markeredgecolor="black" if id(c) in on_front else c.color,
                    markeredgewidth=1.5 if id(c) in on_front else 0.5, zorder=3)
    if len(front) >= 1:
        fx = [pts[i][0] * x_scale for i in front]
        fy = [pts[i][1] * y_scale for i in front]
        ax.step(fx, fy, where="post", color="black", linewidth=1, linestyle="--", alpha=0.7, zorder=2)
    if drawn:
        _log_x(ax)
    ax.grid(True, which="both", alpha=0.25)
    return len(drawn)


def _fig_pareto(sec: Section, out_dir: Path, base: str) -> list[Figure]:
    figs = []
    panels = _front_panels(sec)
    if not panels:
        return figs
    for col, device, stem, xlabel in _cost_axes(sec):
        if col == "latency_ms":
            scale, unit = 1.0, ""
        else:
            scale, unit = _scale_prefix((c.stat(col)[0] for c in sec.configs), "FLOPs" if col == "flops" else "")
        fig, axes = _new_figure(len(panels), ncols=2)
        n = 0
        for ax, (ycol, ylab, ysc, hi) in zip(axes, panels):
            n = max(n, _draw_front(ax, sec, col, device, ycol, ysc, hi, x_scale=scale))
            ax.set_ylabel(ylab + (" ↑" if hi else " ↓"))
            ax.set_xlabel(f"{xlabel} ({unit + ', ' if unit else ''}log)", fontsize=8)
        _legend(fig, [c for c in sec.configs])
        fig.suptitle(f"{sec.title}: quality vs {xlabel}\nPareto front dashed, its points ringed; bars ±1 std "
                     f"over seeds", fontsize=10)
        _save(fig, out_dir, f"{base}/{stem}")
        what = {"flops": "inference FLOPs per sample (whole ensemble)", "params": "parameters (whole ensemble)"}.get(
            col, f"batch-1 latency measured on {device}")
        figs.append(Figure(f"{base}/{stem}", f"Pareto fronts against {what}",
                           f"One point per config (mean over seeds; bars: ±1 std over seeds), {n} config(s) "
                           f"with a value. The dashed step line is the Pareto front (no other config is at "
                           f"most as costly and at least as good); its points are ringed. Log-scaled cost axis."))
    return figs


def _load_preds(sec: Section, runs_dir: Path, notes: list[str]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for c in sec.configs:
        for r in c.rows:
            rid = r.get("run_id")
            try:
                p = results.load_predictions(runs_dir, rid)
            except FileNotFoundError:
                notes.append(f"{rid} ({c.label}): no saved predictions; left out of the reliability diagrams "
                             "and OOD histograms")
                continue
            except Exception as e:  # noqa: BLE001 - a bad file is reported, not fatal
                notes.append(f"{rid} ({c.label}): predictions unreadable ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})")
                continue
            out.setdefault(id(c), []).append(p)
    return out


def _probs(logits: np.ndarray, combine: str) -> np.ndarray:
    from ensemble_bench.metrics import ensemble_probs

    return ensemble_probs(logits, combine).numpy()


def _fig_reliability(sec: Section, preds: dict, out_dir: Path, base: str, notes: list[str]) -> list[Figure]:
    cfgs = [c for c in sec.configs if preds.get(id(c))]
    if not cfgs:
        return []
    fig, axes = _new_figure(len(cfgs), ncols=4, panel_w=3.2, panel_h=3.2)
    for ax, c in zip(axes, cfgs):
        probs, labels = [], []
        for p in preds[id(c)]:
            try:
                probs.append(_probs(p["logits"], p["combine"]))
                labels.append(np.asarray(p["labels"]))
            except ValueError as e:
                notes.append(f"{p['path']}: test predictions unusable ({e})")
        if not probs:
            ax.set_visible(False)
            continue
        b = reliability_bins(np.concatenate(probs), np.concatenate(labels), N_BINS)
        w = 1.0 / N_BINS
        centers = b["edges"][:-1] + w / 2
        has = b["count"] > 0
        ax.bar(centers[has], b["acc"][has], width=w, color=c.color, alpha=0.8, edgecolor="black",
               linewidth=0.5, label="accuracy")
        gap_lo = np.minimum(b["acc"], b["conf"])[has]
        gap_hi = np.maximum(b["acc"], b["conf"])[has]
        ax.bar(centers[has], gap_hi - gap_lo, bottom=gap_lo, width=w, fill=False, hatch="//",
               edgecolor="tab:red", linewidth=0.5, label="gap to confidence")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (max p̄)")
        ax.set_ylabel("accuracy")
        n = int(b["count"].sum())
        ax.set_title(f"{c.label}\nECE {100 * b['ece']:.2f}% (n = {n}, {len(probs)} seed(s))", fontsize=8)
    fig.suptitle(f"{sec.title}: reliability diagrams (test split, {N_BINS} equal-width bins)", fontsize=10)
    _save(fig, out_dir, f"{base}/reliability")
    return [Figure(f"{base}/reliability", "Reliability diagrams",
                   f"Per config, from the saved test predictions (ensemble predictive p̄, the config's "
                   f"combine rule), seeds pooled: bar = accuracy of the samples whose top confidence falls "
                   f"in the bin, hatched = gap to the bin's mean confidence, dashed = perfect calibration. "
                   f"ECE on the pooled samples, the binning of the ECE metric ({N_BINS} bins).")]


def _fig_ood(sec: Section, preds: dict, out_dir: Path, base: str) -> list[Figure]:
    from ensemble_bench.metrics import ood_scores

    figs = []
    sets = sorted({name for ps in preds.values() for p in ps for name in p["ood"]})
    for k, name in enumerate(sets, 1):
        cfgs = [c for c in sec.configs if any(name in p["ood"] for p in preds.get(id(c), []))]
        if not cfgs:
            continue
        fig, axes = _new_figure(len(cfgs), ncols=4, panel_w=3.2, panel_h=2.6)
        for ax, c in zip(axes, cfgs):
            s_id, s_ood = [], []
            for p in preds[id(c)]:
                if name not in p["ood"]:
                    continue
                try:
                    s_id.append(ood_scores(p["logits"], p["combine"])["msp"].numpy())
                    s_ood.append(ood_scores(p["ood"][name], p["combine"])["msp"].numpy())
                except ValueError:
                    continue
            if not s_id:
                ax.set_visible(False)
                continue
            a, o = np.concatenate(s_id), np.concatenate(s_ood)
            lo, hi = float(min(a.min(), o.min())), float(max(a.max(), o.max()))
            bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, HIST_BINS + 1)
            ax.hist(a, bins=bins, density=True, histtype="stepfilled", alpha=0.55, color="tab:blue",
                    label=f"ID test ({len(a)})")
            ax.hist(o, bins=bins, density=True, histtype="stepfilled", alpha=0.55, color="tab:orange",
                    label=f"{name} ({len(o)})")
            auroc = c.stat(f"auroc_{name}")[0]
            ax.set_title(c.label + (f"\nAUROC {100 * auroc:.2f}% (mean of {len(c.rows)} run(s); "
                                    f"{len(s_id)} with predictions)" if math.isfinite(auroc) else ""), fontsize=8)
            ax.set_xlabel("msp score = −max p̄ (higher: more OOD)", fontsize=8)
            ax.set_ylabel("density")
            ax.legend(fontsize=7, frameon=False)
        fig.suptitle(f"{sec.title}: OOD score histograms, ID test vs {name}", fontsize=10)
        stem = f"{base}/ood_hist_{k}_{_slug(name)}"
        _save(fig, out_dir, stem)
        figs.append(Figure(stem, f"OOD score histograms: ID test vs {name}",
                           f"msp score (−max p̄, the leaderboard's OOD score) of the ID test split and of the "
                           f"{name} set, per config from the saved predictions, seeds pooled; less overlap "
                           f"means better detection."))
    return figs


def _fig_size_curve(sec: Section, family: SizeFamily | None, out_dir: Path, base: str) -> list[Figure]:
    if family is None:
        return []
    from matplotlib.lines import Line2D

    panels = [(col, lab, s, hi) for col, lab, s, hi in _SIZE_METRICS if family.usable(col)]
    for name in sec.ood_sets():
        col = f"auroc_{name}"
        if family.usable(col):
            panels.append((col, f"OOD AUROC vs {name} (%, msp)", 100.0, True))
    if not panels:
        return []
    members = {id(c) for c in family.configs}
    others = [c for c in sec.configs if id(c) not in members and family.covers(c)]
    fig, axes = _new_figure(len(panels), ncols=2)
    for ax, (col, lab, sc, hi) in zip(axes, panels):
        sizes = [m for m, _ in family.curve(col)]
        ys = [family.point(col, m) for m in sizes]
        ax.errorbar(sizes, [y[0] * sc for y in ys],
                    yerr=[y[1] * sc if math.isfinite(y[1]) else 0.0 for y in ys],
                    color="black", marker="o", linewidth=1.5, capsize=2, zorder=2)
        sign = 1.0 if hi else -1.0
        env = np.maximum.accumulate([sign * y[0] for y in ys]) * sign
        if not np.allclose(env, [y[0] for y in ys]):   # DEE reads the running best: show it where it differs
            ax.plot(sizes, env * sc, color="grey", linestyle=":", linewidth=1.2, zorder=1)
        for c in others:
            d = _dee_for(family, c, col, hi)
            if d is None:
                continue
            v = c.stat(col)[0] * sc
            marker = {"": c.marker, "<": "<", ">": ">"}.get(d.bound, c.marker)
            ax.plot([d.size], [v], marker=marker, color=c.color, markersize=8, linestyle="",
                    markeredgecolor="black", zorder=3)
            if d.bound:
                ax.annotate(_dee_text(d), (d.size, v), textcoords="offset points", xytext=(6, 4), fontsize=7)
        ax.set_xlabel("ensemble size M (members)")
        ax.set_xticks(sizes)
        ax.set_ylabel(lab + (" ↑" if hi else " ↓"))
        ax.grid(True, alpha=0.25)
    curve = Line2D([], [], color="black", marker="o", label="size-reference runs: size curve")
    env_h = Line2D([], [], color="grey", linestyle=":", label="running best (DEE reads this)")
    _legend(fig, others, [curve, env_h])
    fig.suptitle(f"{sec.title}: deep-ensemble size curve; other configs at their DEE", fontsize=10)
    _save(fig, out_dir, f"{base}/size_curve")
    return [Figure(f"{base}/size_curve", "Deep-ensemble size curve",
                   f"Metric against members M for the size curve ({family.reason}); mean ± std over "
                   f"seeds. Every other config of the same training recipe is drawn at its deep-ensemble-"
                   f"equivalent size (DEE, results.dee_size) for that metric: the M at which the (running-best) "
                   f"curve reaches its value, linear between sizes; ◀/▶ at the ends mean worse than the "
                   f"smallest / better than the largest ensemble.")]


def _fig_train_cost(sec: Section, out_dir: Path, base: str) -> list[Figure]:
    if not sec.has("acc"):
        return []
    axes_spec = []
    if sec.has("train_flops"):
        axes_spec.append(("train_flops", None, "training FLOPs (all stages)"))
    for col, d in sec.timed_columns():
        if col == "train_s":
            axes_spec.append(("train_s", d, f"training time (s) on {d}"))
    if not axes_spec:
        return []
    fig, axes = _new_figure(len(axes_spec), ncols=2)
    for ax, (col, dev, lab) in zip(axes, axes_spec):
        scale, unit = (_scale_prefix((c.stat(col)[0] for c in sec.configs), "FLOPs") if col == "train_flops"
                       else (1.0, ""))
        _draw_front(ax, sec, col, dev, "acc", 100.0, True, x_scale=scale)
        ax.set_xlabel(lab + (f" ({unit}, log)" if unit else " (log)"), fontsize=8)
        ax.set_ylabel("accuracy (%) ↑")
    _legend(fig, sec.configs)
    fig.suptitle(f"{sec.title}: training cost vs accuracy (front dashed)", fontsize=10)
    _save(fig, out_dir, f"{base}/train_cost")
    return [Figure(f"{base}/train_cost", "Training cost vs accuracy",
                   "Accuracy against the training FLOPs (counted by the trainer, every stage) and the training "
                   "wall time, one panel per training device (times from different devices are never mixed); "
                   "mean ± std over seeds, Pareto front dashed.")]


def _shift_of(rec: dict) -> dict | None:
    sh = _dict(_dict(rec.get("metrics")).get("shift"))
    return sh if sh.get("by_severity") and sh.get("per_corruption") else None


def _shift_set_text(sh: dict) -> str:
    return f"{sh.get('set', '?')}, {sh.get('n_per_severity', '?')} images per cell"


def shift_curve(records: Sequence[dict], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """A config's ``metric`` against severity in the style of Ovadia et al. (2019): severities [0, s1, ...]
    (0 = the clean test split), the mean over corruptions at each severity, and its 25th / 75th percentiles
    over corruptions; each corruption's value is first averaged over the seeds. ``records``: the seeds, each
    with metrics.shift of the same set (None when there are none, or their cells differ)."""
    shifts = [_shift_of(r) for r in records]
    if not shifts or any(sh is None for sh in shifts):
        return None
    cells = [{(c, s) for c, by in _dict(sh["per_corruption"]).items() for s in _dict(by)} for sh in shifts]
    if any(cl != cells[0] for cl in cells[1:]):
        return None
    sevs = sorted({int(s) for _, s in cells[0]})
    corrs = sorted({c for c, _ in cells[0]})
    clean = [_nan(_dict(r.get("metrics")).get(metric)) for r in records]
    xs, mean, lo, hi = [0], [float(np.mean(clean))], [math.nan], [math.nan]
    for s in sevs:
        per_c = [np.mean([_nan(_dict(_dict(sh["per_corruption"][c]).get(str(s))).get(metric)) for sh in shifts])
                 for c in corrs if str(s) in _dict(shifts[0]["per_corruption"][c])]
        xs.append(s)
        mean.append(float(np.mean(per_c)))
        lo.append(float(np.percentile(per_c, 25)))
        hi.append(float(np.percentile(per_c, 75)))
    return np.asarray(xs, float), np.asarray(mean), np.asarray(lo), np.asarray(hi)


def _fig_shift(sec: Section, out_dir: Path, base: str, notes: list[str]) -> list[Figure]:
    """Accuracy and ECE against corruption severity, one line per config (Ovadia et al., NeurIPS 2019)."""
    by_set: dict[str, list[tuple[Config, list[dict]]]] = {}
    for c in sec.configs:
        recs = [r for r in c.records if _shift_of(r) is not None]
        if not recs:
            continue
        if len(recs) < len(c.records):
            notes.append(f"{c.label}: {len(c.records) - len(recs)} of {len(c.records)} run(s) without a shift "
                         f"evaluation; the severity figure uses the other {len(recs)}")
        sets = {_shift_set_text(_shift_of(r)) for r in recs}
        for st in sorted(sets):
            by_set.setdefault(st, []).append((c, [r for r in recs if _shift_set_text(_shift_of(r)) == st]))
    figs = []
    panels = (("acc", "accuracy (%) ↑", 100.0), ("ece", "ECE (%, 15 bins) ↓", 100.0))
    for k, (set_text, entries) in enumerate(sorted(by_set.items()), 1):
        lines = []
        for c, recs in entries:
            curves = {m: shift_curve(recs, m) for m, _, _ in panels}
            if any(v is None for v in curves.values()):
                notes.append(f"{c.label}: its runs' shift evaluations cover different cells; left out of the "
                             f"severity figure")
                continue
            lines.append((c, curves, len(recs)))
        if not lines:
            continue
        fig, axes = _new_figure(len(panels), ncols=2)
        for ax, (m, lab, sc) in zip(axes, panels):
            for c, curves, _ in lines:
                xs, mean, lo, hi = curves[m]
                ax.plot(xs, mean * sc, color=c.color, marker=c.marker, lw=1.4, ms=5)
                ax.fill_between(xs[1:], lo[1:] * sc, hi[1:] * sc, color=c.color, alpha=0.12, lw=0)
            ax.set_xticks(range(0, 6))
            ax.set_xticklabels(["clean", "1", "2", "3", "4", "5"])
            ax.set_xlabel("corruption severity")
            ax.set_ylabel(lab)
            ax.grid(alpha=0.3)
        _legend(fig, [c for c, _, _ in lines])
        fig.suptitle(f"{sec.title}: accuracy and calibration under corruption ({set_text})", fontsize=10)
        stem = f"{base}/shift_severity" + (f"_{k}" if len(by_set) > 1 else "")
        _save(fig, out_dir, stem)
        figs.append(Figure(stem, f"Accuracy and ECE under distribution shift ({set_text})",
                           "In the style of Ovadia et al. (NeurIPS 2019): severity 0 is the clean test split, "
                           "1-5 the corrupted test set; the line is the mean over corruptions (each corruption "
                           "first averaged over the config's seeds), the band its 25th-75th percentile over "
                           "corruptions. One line per config."))
    return figs


RC_GRID = np.linspace(0.0, 1.0, 201)[1:]   # coverages at which the seeds' risk-coverage curves are averaged


def _shift_pool(p: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """Ensemble probabilities and labels of every shift cell of a predictions file, pooled (None without)."""
    cells = {k: v for k, v in p.get("shift", {}).items() if not k.startswith("shift_labels")}
    if not cells:
        return None
    probs, labels = [], []
    for k, z in sorted(cells.items()):
        y = p["shift"].get("shift_labels_" + k[len("shift_"):], p["shift"].get("shift_labels"))
        if y is None:
            return None
        probs.append(_probs(z, p["combine"]))
        labels.append(np.asarray(y))
    return np.concatenate(probs), np.concatenate(labels)


def _fig_risk_coverage(sec: Section, preds: dict, out_dir: Path, base: str, notes: list[str]) -> list[Figure]:
    """Selective risk against coverage from the saved predictions, one line per config (mean over seeds):
    on the clean test split and, where the predictions hold the shift cells, on the corrupted test set (all
    corruptions and severities pooled). Part of the shift track: drawn for sections with shift evaluations."""
    from ensemble_bench.metrics import risk_coverage

    if not any(_shift_of(r) is not None for c in sec.configs for r in c.records):
        return []
    panels: dict[str, list] = {"clean": [], "shifted": []}
    for c in sec.configs:
        curves: dict[str, list] = {"clean": [], "shifted": []}
        for p in preds.get(id(c), []):
            try:
                cov, risk = risk_coverage(_probs(p["logits"], p["combine"]), np.asarray(p["labels"]))
                curves["clean"].append(np.interp(RC_GRID, cov, risk))
                pooled = _shift_pool(p)
                if pooled is not None:
                    cov, risk = risk_coverage(*pooled)
                    curves["shifted"].append(np.interp(RC_GRID, cov, risk))
            except ValueError as e:
                notes.append(f"{p['path']}: predictions unusable for risk-coverage ({e})")
        for part, risks in curves.items():
            if not risks:
                continue
            # the records' exact AURC when they have it (clean: metrics.aurc; shifted: the mean over cells,
            # which weights the cells equally as the pooled curve does when they are of one size)
            aurc = c.stat("aurc")[0] if part == "clean" else math.nan
            if not math.isfinite(aurc):
                aurc = float(np.mean([r.mean() for r in risks]))
            panels[part].append((c, np.mean(risks, axis=0), aurc, len(risks)))
    panels = {k: v for k, v in panels.items() if v}
    if "clean" not in panels:
        return []
    fig, axes = _new_figure(len(panels), ncols=2, panel_w=5.0, panel_h=3.8)
    titles = {"clean": "clean test split", "shifted": "corrupted test set (all cells pooled)"}
    for ax, (part, lines) in zip(axes, panels.items()):
        for c, risk, aurc, n in lines:
            ax.plot(RC_GRID * 100, risk * 100, color=c.color, lw=1.4,
                    label=f"{c.label}: AURC {100 * aurc:.2f}%" + (" (pooled)" if part == "shifted" else "")
                    + (f" ({n} seeds)" if n > 1 else ""))
        ax.set_title(titles[part], fontsize=9)
        ax.set_xlabel("coverage (%): the most confident fraction", fontsize=8)
        ax.set_ylabel("selective risk (%, error on the covered) ↓", fontsize=8)
        ax.set_xlim(0, 100)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False, loc="upper left")
    fig.suptitle(f"{sec.title}: risk-coverage", fontsize=10)
    _save(fig, out_dir, f"{base}/risk_coverage")
    return [Figure(f"{base}/risk_coverage", "Risk-coverage curves",
                   "Selective prediction from the saved predictions: samples are accepted in order of the "
                   "ensemble's confidence (max p̄); the error among the accepted against the fraction accepted; "
                   "one line per config, mean over seeds; on the clean test split and, where the predictions "
                   "hold them, on the corrupted test set (every corruption and severity pooled). AURC (area "
                   "under the curve, lower is better) as in the metrics.")]


def run_curve(rec: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """A run's learning curve as one sequence over all its stages in training order: (epochs so far,
    training FLOPs so far, validation NLL, validation accuracy) after each epoch that has a validation
    NLL (a stage without one, e.g. a bridge's curve, adds its epochs and FLOPs but no point). A deep
    ensemble's members trained one after the other give one saw-tooth per member: that is what its
    budget buys."""
    stages = _dict(_dict(rec.get("training")).get("stages"))
    ep, fl, nll, acc = [], [], [], []
    e_done, f_done = 0, 0.0
    for st in stages.values():
        st = _dict(st)
        curve = [c for c in st.get("curve") or [] if isinstance(c, dict)]
        n = max(len(curve), 1)
        f_epoch = 3.0 * _nan(st.get("flops_per_sample")) * _nan(st.get("samples_seen")) / n
        for c in curve:
            e_done += 1
            f_done += f_epoch
            if isinstance(c.get("val_nll"), (int, float)):
                ep.append(e_done)
                fl.append(f_done)
                nll.append(float(c["val_nll"]))
                acc.append(float(c.get("val_acc", math.nan)))
    if not ep:
        return None
    return np.asarray(ep, float), np.asarray(fl, float), np.asarray(nll, float), np.asarray(acc, float)


def _mean_curve(curves: list[tuple]) -> tuple | None:
    """Mean over seeds, point by point (seeds of one config have the same stages and epochs)."""
    curves = [c for c in curves if c is not None]
    if not curves:
        return None
    n = min(len(c[0]) for c in curves)
    return tuple(np.mean([c[i][:n] for c in curves], axis=0) for i in range(4))


def _fig_learning_curves(sec: Section, out_dir: Path, base: str) -> list[Figure]:
    lines = [(c, _mean_curve([run_curve(r) for r in c.records])) for c in sec.configs]
    lines = [(c, m) for c, m in lines if m is not None]
    if not lines:
        return []
    fig, axes = _new_figure(4, ncols=2)
    f_scale, f_unit = _scale_prefix((float(m[1][-1]) for _, m in lines if np.isfinite(m[1][-1])), "FLOPs")
    for c, (ep, fl, nll, acc) in lines:
        kw = dict(color=c.color, lw=1.2, alpha=0.9)
        axes[0].plot(ep, nll, **kw)
        axes[1].plot(ep, 100 * acc, **kw)
        if np.isfinite(fl).all():
            axes[2].plot(fl * f_scale, nll, **kw)
            axes[3].plot(fl * f_scale, 100 * acc, **kw)
    for ax, (x, y) in zip(axes, [("epochs trained (all stages)", "validation NLL ↓"),
                                 ("epochs trained (all stages)", "validation accuracy (%) ↑"),
                                 (f"training FLOPs ({f_unit})", "validation NLL ↓"),
                                 (f"training FLOPs ({f_unit})", "validation accuracy (%) ↑")]):
        ax.set_xlabel(x, fontsize=8)
        ax.set_ylabel(y, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in (axes[0], axes[2]):
        lo = min(float(np.nanmin(m[2])) for _, m in lines)
        hi = np.nanpercentile(np.concatenate([m[2] for _, m in lines]), 95)
        ax.set_ylim(lo * 0.95, max(hi, lo * 1.1))
    _legend(fig, [c for c, _ in lines])
    fig.suptitle(f"{sec.title}: learning curves (mean over seeds)", fontsize=10)
    _save(fig, out_dir, f"{base}/learning_curves")
    return [Figure(f"{base}/learning_curves", "Learning curves",
                   "Validation NLL and accuracy after every epoch of every stage (stages in training order: a deep "
                   "ensemble's members one after the other), against epochs and against the training FLOPs "
                   "spent so far; one line per config, mean over seeds. A curve still falling at its end is a "
                   "row the leaderboard marks as not converged.")]


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
@dataclass
class Column:
    header: str
    cells: list[str]
    best: list[bool]
    align: str = "right"
    title: str = ""


def _fmt(mean: float, std: float, scale: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "–"
    sep = "," if abs(mean * scale) >= 1e4 else ""
    s = f"{mean * scale:{sep}.{digits}f}"
    if math.isfinite(std) and round(std * scale, digits) != 0:   # no "± 0.000" for rounding noise
        s += f" ± {std * scale:{sep}.{digits}f}"
    return s


def _digits_for(values: Iterable[float], scale: float) -> int:
    vals = [abs(v * scale) for v in values if math.isfinite(v) and v != 0]
    if not vals:
        return 2
    top = max(vals)
    return 0 if top >= 1000 else 1 if top >= 100 else 2 if top >= 1 else 3


def _numeric_column(header: str, stats: list[tuple[float, float, int]],
                    scale: float, digits: int | None, higher: bool | None, n_expected: list[int] | None = None) -> Column:
    means = [s[0] for s in stats]
    if digits is None:
        digits = _digits_for(means, scale)
    cells = []
    for k, (m, sd, n) in enumerate(stats):
        text = _fmt(m, sd, scale, digits)
        if n_expected is not None and math.isfinite(m) and n != n_expected[k]:
            text += f" ({n} run{'s' if n != 1 else ''})"
        cells.append(text)
    best = [False] * len(stats)
    finite = [m for m in means if math.isfinite(m)]
    if higher is not None and len(finite) >= 2:
        target = max(finite) if higher else min(finite)
        shown = _fmt(target, math.nan, scale, digits)
        best = [math.isfinite(m) and _fmt(m, math.nan, scale, digits) == shown for m in means]
        if sum(best) == len(finite):   # every config ties: nothing stands out
            best = [False] * len(stats)
    return Column(header, cells, best)


def leaderboard_columns(sec: Section, family: SizeFamily | None) -> list[Column]:
    """The report table of a section: one row per config, mean ± std, best in bold, units in the
    headers and one column per (timing, device)."""
    cf = sec.configs
    cols = [Column("method", [c.label for c in cf], [False] * len(cf), "left"),
            Column("options", [_options_text(c.options) or "–" for c in cf], [False] * len(cf), "left"),
            Column("combine", [str(c.fields.get("combine") or "probs") for c in cf], [False] * len(cf), "left"),
            Column("M", [f"{c.num_members:g}" if math.isfinite(c.num_members) else "?" for c in cf],
                   [False] * len(cf))]
    for k in results.NUMERIC_RECIPE_KEYS:
        if len({_hashable(c.fields.get(k)) for c in cf}) > 1:
            cols.append(Column(k, [str(c.fields.get(k)) for c in cf], [False] * len(cf)))
    recipe_text = results.recipe_differences([c.fields.get("recipe") for c in cf])
    if any(recipe_text):
        cols.append(Column("recipe", [t or "–" for t in recipe_text], [False] * len(cf), "left"))
    n_max = len(sec.seed_set)
    cols.append(Column("seeds", [str(len(c.rows)) + (f" of {n_max}" if len(c.seeds) < n_max else "") for c in cf],
                       [False] * len(cf), title="runs aggregated (of the section's seed set)"))
    for col, header, scale, higher, digits in _QUALITY:
        if sec.has(col):
            cols.append(_numeric_column(header, [c.stat(col) for c in cf], scale, digits, higher))
    for name in sec.ood_sets():
        if sec.has(f"auroc_{name}"):
            cols.append(_numeric_column(f"AUROC {name} (%, msp)", [c.stat(f"auroc_{name}") for c in cf],
                                        100.0, 2, True))
    if sec.has("shift_acc"):   # corruption error relative to the single model of the same recipe
        mce = results.mce_values([c.rows for c in cf], [r for c in cf for r in c.rows])
        if any(math.isfinite(v) for v in mce):
            col = _numeric_column("mCE (%)", [(v, math.nan, len(c.rows)) for v, c in zip(mce, cf)], 1.0, 1, False)
            col.title = "corruption error relative to the single model (Hendrycks & Dietterich 2019); 100 = single"
            cols.append(col)
    dm = _dee_metric(sec, family)
    if dm is not None:
        col, higher = dm
        cells, best = [], []
        vals = []
        on_curve = {id(c): m for m, cs in family.by_size.items() for c in cs}
        for c in cf:
            if id(c) in on_curve:
                cells.append(f"{on_curve[id(c)]:g} (curve)")
                vals.append(math.nan)
                continue
            d = _dee_for(family, c, col, higher)
            cells.append(_dee_text(d) if d else "–")
            vals.append(math.nan if d is None else d.size if not d.bound
                        else math.inf if d.bound == ">" else -math.inf)
        finite = [v for v in vals if not math.isnan(v)]
        top = max(finite) if len(finite) >= 2 else -math.inf
        best = [top > -math.inf and v == top for v in vals]   # "<M" (worse than the curve) is never best
        cols.append(Column(f"DEE (by {col}, members)", cells, best,
                           title="deep-ensemble-equivalent size on the size curve"))
    for col, unit in (("params", ""), ("flops", "FLOPs")):
        if sec.has(col):
            scale, u = _scale_prefix((c.stat(col)[0] for c in cf), unit)
            header = f"params ({u or 'count'})" if col == "params" else f"inference {u} / sample"
            cols.append(_numeric_column(header, [c.stat(col) for c in cf], scale, None, False))
    n_all = [len(c.rows) for c in cf]
    for col, dev in sec.timed_columns():
        label, higher, digits = _TIMED_HEADER[col]
        if col == "train_s":
            continue
        cols.append(_numeric_column(f"{label} · {dev}", [c.stat(col, dev) for c in cf], 1.0, digits,
                                    higher, n_all))
    for col, dev in sec.timed_columns():
        if col == "train_s":
            label, higher, digits = _TIMED_HEADER[col]
            cols.append(_numeric_column(f"{label} · {dev}", [c.stat(col, dev) for c in cf], 1.0, digits,
                                        higher, n_all))
    if sec.has("train_flops"):
        scale, u = _scale_prefix((c.stat("train_flops")[0] for c in cf), "FLOPs")
        cols.append(_numeric_column(f"train {u}", [c.stat("train_flops") for c in cf], scale, None, False))
    return cols


def _budget_lines(sec: Section) -> list[str]:
    """Plain-text answer to 'which config at my budget': the accuracy and NLL fronts per cost axis."""
    lines = []
    for col, dev, _stem, xlabel in _cost_axes(sec):
        scale, unit = ((1.0, "ms") if col == "latency_ms"
                       else _scale_prefix((c.stat(col)[0] for c in sec.configs), "FLOPs" if col == "flops" else ""))
        for ycol, yname, ysc, hi in (("acc", "accuracy", 100.0, True), ("nll", "NLL", 1.0, False)):
            pts = [(c.stat(col, dev)[0], c.stat(ycol)[0]) for c in sec.configs]
            front = pareto_front(pts, hi)
            if not front:
                continue
            steps: list[tuple[list[str], float, float]] = []
            for i in front:
                x, y = pts[i]
                if steps and (steps[-1][1], steps[-1][2]) == (x, y):   # identical cost and value: one step
                    steps[-1][0].append(sec.configs[i].label)
                else:
                    steps.append(([sec.configs[i].label], x, y))
            texts = []
            for names, x, y in steps:
                yt = f"{y * ysc:.2f}%" if ycol == "acc" else f"{y:.3f}"
                xt = f"{x * scale:.{_digits_for([x], scale)}f} {unit}".rstrip()
                texts.append(f"{' = '.join(names)} ({xt}, {yt})")
            lines.append(f"{yname} by {xlabel}: " + " → ".join(texts))
    return lines


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(cols: list[Column]) -> str:
    lines = ["| " + " | ".join(_md_cell(c.header) for c in cols) + " |",
             "|" + "|".join(":---" if c.align == "left" else "---:" for c in cols) + "|"]
    for i in range(len(cols[0].cells)):
        cells = [f"**{_md_cell(c.cells[i])}**" if c.best[i] else _md_cell(c.cells[i]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _html_table(cols: list[Column]) -> str:
    e = html.escape
    out = ["<table>", "<thead><tr>"]
    for c in cols:
        t = f' title="{e(c.title)}"' if c.title else ""
        out.append(f'<th class="{c.align}"{t}>{e(c.header)}</th>')
    out.append("</tr></thead><tbody>")
    for i in range(len(cols[0].cells)):
        out.append("<tr>" + "".join(
            f'<td class="{c.align}">' + (f"<strong>{e(c.cells[i])}</strong>" if c.best[i] else e(c.cells[i])) + "</td>"
            for c in cols) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


@dataclass
class Report:
    out_dir: Path
    markdown: Path
    html: Path
    csv: Path | None
    figures: list[Figure]
    notes: list[str]


@dataclass
class _Doc:
    """The report as blocks rendered twice (markdown and HTML), so both always say the same."""

    blocks: list = field(default_factory=list)

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]):
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, cols: list[Column]):
        self.blocks.append(("table", cols))

    def figure(self, f: Figure):
        self.blocks.append(("fig", f))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {_md_cell(x)}" for x in b[1]))
            elif b[0] == "table":
                out.append(_md_table(b[1]))
            elif b[0] == "fig":
                f = b[1]
                out.append(f"**{f.title}**\n\n![{f.title}]({f.png})\n\n{f.caption} ([SVG]({f.svg}))")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        e = html.escape
        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{e(b[1])}</p>")
            elif b[0] == "ul":
                body.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b[1]) + "</ul>")
            elif b[0] == "table":
                body.append('<div class="scroll">' + _html_table(b[1]) + "</div>")
            elif b[0] == "fig":
                f = b[1]
                body.append(f'<figure><img src="{e(f.png)}" alt="{e(f.title)}" loading="lazy">'
                            f"<figcaption><b>{e(f.title)}.</b> {e(f.caption)} "
                            f'<a href="{e(f.svg)}">SVG</a></figcaption></figure>')
        css = ("body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1400px;margin:2em auto;"
               "padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;font-size:13px}"
               "th,td{border:1px solid #ccc;padding:3px 7px;white-space:nowrap}th{background:#f3f3f3}"
               ".right{text-align:right}.left{text-align:left}.scroll{overflow-x:auto}"
               "figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;"
               "color:#444;max-width:1000px}li{margin:2px 0}")
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{e(title)}</title><style>{css}</style></head><body>\n" + "\n".join(body)
                + "\n</body></html>\n")


def _describe_protocol(complete: list[dict]) -> list[str]:
    fracs = sorted({_nan(r.get("config", {}).get("val_fraction")) if isinstance(r.get("config"), dict) else math.nan
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
    combines = sorted({str(_dict(r.get("method")).get("combine") or "probs") for r in complete})
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


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _one_line(text: Any, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _run_desc(rec: dict) -> str:
    row = results.flatten_record(rec)
    try:
        options = json.loads(row.get("config_key") or "{}")
    except (TypeError, json.JSONDecodeError):
        options = {}
    opts = _options_text(options) if isinstance(options, dict) else str(options)
    return (f"{rec.get('run_id')}: {row.get('method') or '?'}" + (f" ({opts})" if opts else "")
            + f" on {row.get('dataset') or '?'} · {row.get('backbone') or '?'}, seed {row.get('seed')}")


def _incomplete_items(all_recs: list[dict], problems: list[str], sections: list[Section],
                      notes: list[str]) -> list[str]:
    items = []
    for rec in all_recs:
        if rec.get("status") == "failed":
            err = rec.get("error") or "no error message recorded"
            items.append(f"FAILED {_run_desc(rec)} — {_one_line(err)}")
    for rec in all_recs:
        if rec.get("status") == "running":
            started = _dict(rec.get("timings")).get("started")
            items.append(f"RUNNING (or killed) {_run_desc(rec)}" + (f", started {started}" if started else ""))
    for sec in sections:
        for c in sec.configs:
            missing = [s for s in sec.seed_set if s not in c.seeds]
            if missing:
                items.append(f"FEWER SEEDS {sec.title} / {c.label}: {len(c.rows)} run(s), seeds {c.seeds}; "
                             f"missing {missing} of the section's seeds {sec.seed_set}")
    items += [f"UNREADABLE {_one_line(p)}" for p in problems]
    items += [f"NOTE {n}" for n in notes]
    return items


def build_report(runs_dir: str | Path, out_dir: str | Path, *, figures: bool = True,
                 log: Callable[[str], None] | None = None) -> Report:
    """Build the report of every record in ``runs_dir`` into ``out_dir`` (``figures=False``: tables and
    lists only, no figures and no prediction files read).

    Raises :class:`~ensemble_bench.errors.UsageError` (one line) when ``runs_dir`` is missing, ``out_dir``
    is a file, or there is nothing to report (no records, only unreadable files, or no complete run).
    """
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    log = log or (lambda s: None)
    try:
        all_recs, problems = results.load_records(runs_dir, statuses=None)
    except results.RecordError as e:
        raise UsageError(str(e)) from None
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

    import matplotlib

    matplotlib.rcParams["svg.hashsalt"] = "ensemble-bench"   # stable SVG ids
    sections = group_sections(complete)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = _Doc()
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
        sec_doc = _Doc()
        sec_doc.h(2, sec.title)
        sec_doc.h(3, "Leaderboard")
        sec_doc.table(leaderboard_columns(sec, family))
        dm = _dee_metric(sec, family)
        if family is not None and dm is not None:
            sec_doc.p(f"DEE: deep-ensemble-equivalent size by {dm[0]} on the reference size curve "
                      f"({family.reason}), as results.dee computes it; '>M' / '<M' = better than the largest / "
                      f"worse than the smallest ensemble on the curve; '–' = no DEE (another training recipe, "
                      f"or the metric is missing).")
        else:
            sec_doc.p("No deep-ensemble size curve (and no DEE column): it needs complete runs of the "
                      "size-reference methods (records with method.size_reference: members are independent "
                      "full copies of the backbone, single-model recipe) of one training recipe at M = 1 and "
                      "at least one other M.")
        budget = _budget_lines(sec)
        if budget:
            sec_doc.h(3, "Which config at my budget")
            sec_doc.p("The Pareto-optimal configs per cost, cheapest first (each next one costs more and is "
                      "better): pick the last one within your budget.")
            sec_doc.ul(budget)
        figs = []
        if figures:
            sec_doc.h(3, "Figures")
            preds = _load_preds(sec, runs_dir, sec_notes)
            figs += _fig_pareto(sec, out_dir, base)
            figs += _fig_reliability(sec, preds, out_dir, base, sec_notes)
            figs += _fig_ood(sec, preds, out_dir, base)
            figs += _fig_size_curve(sec, family, out_dir, base)
            figs += _fig_train_cost(sec, out_dir, base)
            figs += _fig_learning_curves(sec, out_dir, base)
            figs += _fig_shift(sec, out_dir, base, sec_notes)
            figs += _fig_risk_coverage(sec, preds, out_dir, base, sec_notes)
        if figures and not figs:
            sec_doc.p("No figures: the records of this section have no metric with a cost to plot against "
                      "and no saved predictions.")
        for f in figs:
            sec_doc.figure(f)
        all_figs += figs
        notes += [f"{sec.title}: {n}" for n in sec_notes]
        sec_blocks.append(sec_doc)

    incomplete = _incomplete_items(all_recs, problems, sections, notes)
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
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results.write_text_atomic(csv_path, results.leaderboard(complete).to_csv(index=False))
    md_path = results.write_text_atomic(out_dir / "report.md", doc.markdown())
    html_path = results.write_text_atomic(out_dir / "report.html", doc.html("ensemble-bench report"))
    return Report(out_dir, md_path, html_path, csv_path, all_figs, incomplete)


def cli_report(args) -> int:
    """``ensemble-bench report RUNS_DIR -o OUT``."""
    from ensemble_bench.cli import check_output_path

    check_output_path(Path(args.out), "-o")
    rep = build_report(args.runs_dir, args.out, log=lambda s: print(s, file=sys.stderr, flush=True))
    for item in rep.notes:
        if item.startswith(("FAILED", "UNREADABLE")):
            print(f"warning: {item}", file=sys.stderr)
    print(f"report: {rep.html} and {rep.markdown} ({len(rep.figures)} figures as PNG + SVG in "
          f"{rep.out_dir / 'figures'}; {len(rep.notes)} missing/incomplete item(s) listed)")
    return 0
