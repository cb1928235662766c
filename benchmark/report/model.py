"""The report's model: sections (dataset x backbone) of configurations, their labels and colours, and the
deep-ensemble size family a section's DEE is read from. Every number comes from the leaderboard engine
(:mod:`ensemble_bench.leaderboard`): a :class:`Config` is its :class:`~ensemble_bench.leaderboard.Group` of
the configuration keys (timings per device), the DE curve and DEE are its :func:`dee_curves` and
:func:`dee_size`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ensemble_bench.columns import NUMERIC_RECIPE_KEYS, TIMED, common_recipe, most_common, num, recipe_differences
from ensemble_bench.formatting import non_default_options, options_text
from ensemble_bench.leaderboard import (
    DEE,
    DEE_KEYS,
    Group,
    complete_groups,
    converged_verdicts,
    dee_curves,
    dee_key,
    dee_size,
    higher_is_better,
    mean_std,
)

MARKERS = "osD^vP*Xh<>p"
# line styles of the configs past the palette's length (solid, dashed, dotted, dash-dot), so that no two
# configs' curves look the same in a figure of lines
LINESTYLES = ("-", (0, (5, 2)), (0, (1, 1.2)), (0, (6, 2, 1, 2)))
# strong colours only, every one readable on white (WCAG relative luminance below 0.4): tab10 with its pale
# olive and cyan replaced by darker shades and its grey moved last (faded reliability bars are light grey),
# then more dark ones. The first, a dark blue, goes to the single model (see _label_configs).
PALETTE = ("#1f4e9c", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#00838f",
           "#8a8a00", "#b8860b", "#000000", "#6a3d9a", "#a6005a", "#33691e", "#4e342e", "#636363")


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


def hashable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (list, dict)):
        return json.dumps(v, sort_keys=True)
    return v


@dataclass
class Config(Group):
    """One method configuration of a section: the engine's group of its seeds (GROUP_KEYS), and how the
    figures draw it."""

    label: str = ""
    color: Any = None
    marker: str = "o"
    linestyle: Any = "-"              # for lines: changes past the palette, as the marker does for points
    converged: bool | None = None     # the leaderboard's verdict (leaderboard.converged_verdicts)
    budget: Any = None                # the longer budget it was judged against (leaderboard.Budget), or None

    @property
    def comparable(self) -> bool:
        """May stand on a Pareto front or in "which config at my budget": not marked as not converged (an
        underfit row is shown, never ranked; None, curves that cannot say, is not a verdict against it)."""
        return self.converged is not False

    @property
    def face(self) -> Any:
        """The marker face colour: the config's colour, or hollow ("none") when it is not comparable, the one
        rule every figure of points and the shared legend draw."""
        return self.color if self.comparable else "none"

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
        return num(self.fields.get("num_members"))


@dataclass
class Section:
    dataset: str
    backbone: str
    configs: list[Config]
    slug: str = ""
    seed_set: list = field(default_factory=list)
    labels_note: str = ""    # what the labels leave unsaid (the common settings): the legends' title

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


def make_slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return s[:60] or "x"


def group_sections(complete: list[dict]) -> list[Section]:
    """The complete records as sections of configs (the engine's groups of GROUP_KEYS), labelled."""
    by_section: dict[tuple, list[Config]] = {}
    for g in complete_groups(complete):
        sec = (str(g.fields.get("dataset") or "?"), str(g.fields.get("backbone") or "?"))
        by_section.setdefault(sec, []).append(Config(g.fields, g.rows, g.records))
    sections = []
    used_slugs: set[str] = set()
    for (dataset, backbone), configs in sorted(by_section.items()):
        slug = make_slug(f"{dataset}_{backbone}")
        while slug in used_slugs:
            slug += "_"
        used_slugs.add(slug)
        sec = Section(dataset, backbone, configs, slug)
        sec.seed_set = sorted({s for c in configs for s in c.seeds}, key=str)
        for c, (verdict, budget) in zip(configs, converged_verdicts(configs)):
            c.converged, c.budget = verdict, budget
        _label_configs(sec)
        sections.append(sec)
    return sections


def config_differences(cfgs: list[Config], scope: list[Config] | None = None,
                       against_common: bool = False, common: dict | None = None) -> list[str]:
    """What tells each of ``cfgs`` (configs of one method) apart: the options that vary between them, and
    the training settings (budget, recipe, precision) that vary within ``scope`` (a superset of ``cfgs``;
    default ``cfgs`` themselves); "" where nothing does. ``against_common``: a training setting is named
    only where the config departs from the most common value in ``scope`` (:func:`common_settings`;
    ``common``: that answer when the caller has it already)."""
    scope = cfgs if scope is None else scope
    varying_train = [k for k in (*NUMERIC_RECIPE_KEYS, "precision")
                     if len({hashable(c.fields.get(k)) for c in scope}) > 1]
    common = (common_settings(scope) if common is None else common) if against_common else {}
    recipe_text = dict(zip(map(id, scope), recipe_differences(
        [c.fields.get("recipe") for c in scope], against_common,
        {k: v for k, v in common.items() if k not in (*NUMERIC_RECIPE_KEYS, "precision")})))
    keys = sorted({k for c in cfgs for k in c.options})
    vary = [k for k in keys if len({json.dumps(c.options.get(k), sort_keys=True) for c in cfgs}) > 1]
    out = []
    for c in cfgs:
        tr = ", ".join([f"{k}={c.fields.get(k)}" for k in varying_train
                        if k not in common or hashable(c.fields.get(k)) != hashable(common[k])]
                       + ([recipe_text[id(c)]] if recipe_text[id(c)] else []))
        out.append(", ".join(x for x in (options_text(c.options, vary), tr) if x))
    return out


def headline_configs(sec: Section, among: Sequence[Config] | None = None) -> list[Config]:
    """One config per method of ``among`` (default: the section's), the one a reader compares across methods:
    among its configs at the section's most common training settings (budget, recipe, precision;
    :func:`common_settings` of every config of the section), else among all of them, the one with the method's
    default options, then the most seeds (ties: table order). The section-wide learning curves draw these
    (``among``: the configs that have a curve); every config is in the per-method figure."""
    common = common_settings(sec.configs)
    by_method: dict[str, list[Config]] = {}
    for c in (sec.configs if among is None else among):
        by_method.setdefault(c.method, []).append(c)
    out = []
    for cfgs in by_method.values():
        at_common = [c for c in cfgs if not config_differences([c], sec.configs, against_common=True, common=common)[0]]
        pool = at_common or cfgs
        out.append(min(pool, key=lambda c: (bool(non_default_options(c.method, c.options)), -len(c.rows),
                                            pool.index(c))))
    return out


def common_settings(scope: list[Config]) -> dict:
    """The most common value of each training setting (budget, precision, recipe field) that varies within
    ``scope``, in the order a label names them (a tie goes to the smallest value, so it does not depend on
    the order of the configs): what the section's labels leave unsaid."""
    out = {}
    for k in (*NUMERIC_RECIPE_KEYS, "precision"):
        value, n_distinct = most_common([hashable(c.fields.get(k)) for c in scope])
        if n_distinct > 1:
            out[k] = value
    return {**out, **common_recipe([c.fields.get("recipe") for c in scope])}


def _label_configs(sec: Section) -> None:
    """Short unique labels: the method, the options that vary between its configs, and the training
    settings that vary in the section; a colour per config and a marker per method."""
    by_method: dict[str, list[Config]] = {}
    for c in sec.configs:
        by_method.setdefault(c.method, []).append(c)
    common = common_settings(sec.configs)
    for cfgs in by_method.values():
        for c, text in zip(cfgs, config_differences(cfgs, sec.configs, against_common=True, common=common)):
            c.label = c.method + (f" ({text})" if text else "")
    sec.labels_note = ("a label names only the training settings where its config departs from this section's "
                       "most common: " + ", ".join(f"{k}={v}" for k, v in common.items())) if common else ""
    seen: dict[str, int] = {}
    for c in sec.configs:
        if c.label in seen:
            seen[c.label] += 1
            c.label += f" #{seen[c.label]}"
        else:
            seen[c.label] = 1
    # colours and markers: assigned in an order that does not depend on the results (size-reference configs
    # first, smallest M first, so the single model gets the first, darkest colour; then method, members,
    # label), so a config keeps its colour when a number changes
    def _identity(c: Config) -> tuple:
        m = c.num_members if math.isfinite(c.num_members) else math.inf
        if c.fields.get("size_reference") is True:
            return (0, "", m, c.method, c.label)
        return (1, c.method, m, c.method, c.label)

    methods = sorted(by_method)
    used: set[tuple[str, str]] = set()
    for i, c in enumerate(sorted(sec.configs, key=_identity)):
        c.color = PALETTE[i % len(PALETTE)]
        # a method keeps its marker while the palette lasts; past it the marker moves on, and it moves again
        # while another config already has this colour and marker (two methods' markers can meet), so no two
        # configs look the same until the colour x marker pairs run out
        k = methods.index(c.method) + i // len(PALETTE)
        for _ in range(len(MARKERS)):
            if (c.color, MARKERS[k % len(MARKERS)]) not in used:
                break
            k += 1
        c.marker = MARKERS[k % len(MARKERS)]
        used.add((c.color, c.marker))
        c.linestyle = LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)]
    # rows, legends and panels: best accuracy first, as the markdown leaderboard (leaderboard.leaderboard)
    sec.configs.sort(key=config_order)


def config_order(c: Config) -> tuple:
    """The leaderboard's row order within a section: accuracy mean descending (missing last), then method,
    then options (config_key), then the label (other training settings)."""
    acc = c.stat("acc").mean
    return (not math.isfinite(acc), -acc if math.isfinite(acc) else 0.0, c.method,
            str(c.fields.get("config_key") or ""), c.label)


# --------------------------------------------------------------------------------------------
# the deep-ensemble reference family and DEE
# --------------------------------------------------------------------------------------------
@dataclass
class SizeFamily:
    """The deep-ensemble size curve of a section: its size-reference configs of one training recipe."""

    by_size: dict          # M -> [Config, ...]: every size-reference config of the recipe with M members
    key: tuple             # the recipe as leaderboard.dee_key gives it
    reason: str

    @property
    def recipe(self) -> tuple:
        """(epochs, batch_size, lr, recipe, data_id, precision): the key without dataset and backbone (the
        section's)."""
        return self.key[2:]

    @property
    def configs(self) -> list[Config]:
        return [c for m in sorted(self.by_size) for c in self.by_size[m]]

    def curve(self, col: str) -> list[tuple[float, float]]:
        """[(M, mean)]: the engine's DE curve of ``col`` (leaderboard.dee_curves); empty when unusable (no
        size 1 or a single size)."""
        return dee_curves(self.configs, col).get(self.key, [])

    def spread(self, col: str, m: float) -> float:
        """Sample std of ``col`` over the seeds pooled at size ``m`` (configs whose mean is known): the
        curve's error bar."""
        return mean_std([x for c in self.by_size.get(m, []) if not math.isnan(c.stat(col).mean)
                         for x in c.values(col)]).std

    def usable(self, col: str) -> bool:
        return bool(self.curve(col))

    def covers(self, c: Config) -> bool:
        """Whether ``c`` is read off this curve (same recipe; the engine gives DEE only then)."""
        return dee_key(c.fields) == self.key


def find_size_family(configs: Sequence[Config]) -> SizeFamily | None:
    """The deep-ensemble size curve of a section, as the records declare it.

    A method marks its records ``method.size_reference`` when its members are independent full copies
    of the backbone trained with the single-model recipe (the single model as size 1, deep ensembles of
    any size); nothing is guessed from params or FLOPs. The family is the size-reference configs of one
    training recipe (epochs, batch size, lr), M = their member count, and it needs M = 1 and at least one
    other size (the rule of leaderboard.dee_curves). When several recipes qualify, one whose configs are all
    converged wins (a size curve of underfit runs is no reference: the budget check's 30-epoch ensembles beside
    their 60-epoch twins), then the one with the most sizes, then the most runs, then the smallest recipe.
    Configs of one size are pooled, as in leaderboard.dee_curves.
    """
    groups: dict[tuple, dict[float, list[Config]]] = {}
    for c in configs:
        m = c.num_members
        if c.fields.get("size_reference") is True and math.isfinite(m) and m >= 1:
            groups.setdefault(dee_key(c.fields), {}).setdefault(float(m), []).append(c)
    candidates = []
    for key, by_size in groups.items():
        if 1.0 not in by_size or len(by_size) < 2:
            continue
        runs = sum(len(c.rows) for cs in by_size.values() for c in cs)
        underfit = any(not c.comparable for cs in by_size.values() for c in cs)
        candidates.append((underfit, -len(by_size), -runs, str(key[2:]), key, by_size))
    if not candidates:
        return None
    candidates.sort(key=lambda t: t[:4])
    *_, key, by_size = candidates[0]
    for cs in by_size.values():
        cs.sort(key=lambda c: c.label)
    sizes = ", ".join(f"{m:g}" for m in sorted(by_size))
    labels = ", ".join(c.label for m in sorted(by_size) for c in by_size[m])
    train = ", ".join(f"{k}={'?' if v != v else f'{v:g}'}" for k, v in zip(DEE_KEYS, key)
                      if k in NUMERIC_RECIPE_KEYS)
    reason = (f"the records of the size-reference methods at M = {sizes} ({train}): {labels}; "
              f"method.size_reference marks members that are independent full copies of the backbone trained "
              f"with the single-model recipe; seeds pooled at each size, nothing guessed from params or FLOPs")
    return SizeFamily(by_size, key, reason)

def dee_for(family: SizeFamily, config: Config, col: str, higher: bool) -> DEE | None:
    """The engine's DEE (leaderboard.dee_size) of the config's seed mean on the family's curve; None when the
    config has another recipe, the value is missing or the curve is unusable."""
    v = config.stat(col).mean
    curve = family.curve(col)
    if not family.covers(config) or not math.isfinite(v) or not curve:
        return None
    return dee_size(v, curve, higher)


def dee_metric(family: SizeFamily | None) -> tuple[str, bool] | None:
    """Calibrated NLL (Ashukha et al.) when the curve has it, else NLL, else accuracy."""
    if family is None:
        return None
    for col in ("nll_ts", "nll", "acc"):
        if family.usable(col):
            return col, higher_is_better(col)
    return None


def scale_prefix(values: Iterable[float], unit: str) -> tuple[float, str]:
    """(scale, prefixed unit) that shows the largest of ``values`` below 1000 (K, M, G, ...)."""
    vals = [abs(v) for v in values if math.isfinite(v) and v != 0]
    if not vals:
        return 1.0, unit
    top = max(vals)
    for exp, p in ((18, "E"), (15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "K")):
        if top >= 10 ** exp:
            return 10.0 ** -exp, p + unit
    return 1.0, unit


def cost_axes(sec: Section) -> list[tuple[str, str | None, str, str]]:
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

