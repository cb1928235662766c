"""The report's text: the per-section table (its columns from the engine's numbers, best in bold), the
"which config at my budget" lines, and the document rendered twice, as markdown and as HTML."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ensemble_bench.columns import BUDGET_TOL, LATENCY_BUSY_SPREAD, NUMERIC_RECIPE_KEYS, recipe_differences
from ensemble_bench.formatting import (
    converged_text,
    dee_cell,
    md_cell,
    mean_std_text,
    non_default_options,
    options_text,
)
from ensemble_bench.leaderboard import curve_evidence, mce_values, timing_device
from ensemble_bench.report.canvas import Figure
from ensemble_bench.report.model import (
    Section,
    SizeFamily,
    cost_axes,
    dee_for,
    dee_metric,
    hashable,
    pareto_front,
    scale_prefix,
)

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
_TIMED_HEADER = {"latency_ms": ("latency (ms, batch 1)", False, None),
                 "throughput": ("throughput (img/s)", True, 0),
                 "peak_mem_mb": ("peak memory (MB)", False, 1),
                 "train_s": ("train time (s)", False, 1)}
FIG_PX_PER_INCH = 180   # the HTML shows a figure at most this many CSS px per inch wide (PNGs: canvas.DPI)

# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
@dataclass
class Column:
    """A table column: its header (``title``: the header's tooltip), cells, which cells are the best (bold)
    and, per cell, a tooltip (``cell_titles``, "" for none: the HTML ``<td title>``). ``wrap``: a text
    column whose cells may wrap in the HTML (numbers never do)."""

    header: str
    cells: list[str]
    best: list[bool]
    align: str = "right"
    title: str = ""
    cell_titles: list[str] | None = None
    wrap: bool = False



def _cell_text(mean: float, std: float, scale: float, digits: int) -> str:
    """A table cell: mean ± std, thousands grouped, no std that rounds to zero."""
    return mean_std_text(mean, std, scale, digits, thousands=True, drop_rounded_std=True)


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
        text = _cell_text(m, sd, scale, digits)
        if n_expected is not None and math.isfinite(m) and n != n_expected[k]:
            text += f" ({n} run{'s' if n != 1 else ''})"
        cells.append(text)
    best = [False] * len(stats)
    finite = [m for m in means if math.isfinite(m)]
    if higher is not None and len(finite) >= 2:
        target = max(finite) if higher else min(finite)
        shown = _cell_text(target, math.nan, scale, digits)
        best = [math.isfinite(m) and _cell_text(m, math.nan, scale, digits) == shown for m in means]
        if sum(best) == len(finite):   # every config ties: nothing stands out
            best = [False] * len(stats)
    return Column(header, cells, best)


def leaderboard_columns(sec: Section, family: SizeFamily | None) -> list[Column]:
    """The report table of a section: one row per config, mean ± std, best in bold, units in the
    headers and one column per (timing, device)."""
    cf = sec.configs
    cols = [Column("method", [c.label for c in cf], [False] * len(cf), "left", wrap=True),
            # the options that differ from the method's defaults, as the markdown leaderboard; every option
            # in the cell's tooltip (and the CSV)
            Column("options", [options_text(non_default_options(c.method, c.options), empty="–") for c in cf],
                   [False] * len(cf), "left",
                   title="options that differ from the method's defaults (hover a cell for every option)",
                   cell_titles=[options_text(c.options) for c in cf], wrap=True),
            Column("combine", [str(c.fields.get("combine") or "probs") for c in cf], [False] * len(cf), "left"),
            Column("M", [f"{c.num_members:g}" if math.isfinite(c.num_members) else "?" for c in cf],
                   [False] * len(cf))]
    for k in NUMERIC_RECIPE_KEYS:
        if len({hashable(c.fields.get(k)) for c in cf}) > 1:
            cols.append(Column(k, [str(c.fields.get(k)) for c in cf], [False] * len(cf)))
    # as the markdown leaderboard: where a config's recipe departs from the section's most common one (which
    # the "Config labels" line states); the cell's tooltip names every recipe field that varies in the section
    recipes = [c.fields.get("recipe") for c in cf]
    recipe_text = recipe_differences(recipes, against_common=True)
    if any(recipe_text):
        cols.append(Column("recipe", [t or "–" for t in recipe_text], [False] * len(cf), "left",
                           title="where the config's recipe departs from the section's most common (Config labels)",
                           cell_titles=recipe_differences(recipes), wrap=True))
    n_max = len(sec.seed_set)
    cols.append(Column("seeds", [str(len(c.rows)) + (f" of {n_max}" if len(c.seeds) < n_max else "") for c in cf],
                       [False] * len(cf), title="runs aggregated (of the section's seed set)"))
    cols.append(Column("converged", [converged_text(c.converged, c.budget.epochs if c.budget else None,
                                                    c.budget.gain if c.budget else None, strong="",
                                                    why=curve_evidence(c))
                                     for c in cf], [False] * len(cf), "left",
                       title="every seed's validation NLL flat at its end, and no longer budget of the same config "
                             f"ending {BUDGET_TOL:.0%} or more lower (the leaderboard's rule; README)", wrap=True))
    for col, header, scale, higher, digits in _QUALITY:
        if sec.has(col):
            cols.append(_numeric_column(header, [c.stat(col) for c in cf], scale, digits, higher))
    for name in sec.ood_sets():
        if sec.has(f"auroc_{name}"):
            cols.append(_numeric_column(f"AUROC {name} (%, msp)", [c.stat(f"auroc_{name}") for c in cf],
                                        100.0, 2, True))
    if sec.has("shift_acc"):   # corruption error relative to the single model of the same recipe
        mce = mce_values([c.rows for c in cf], [r for c in cf for r in c.rows])
        if any(math.isfinite(v) for v in mce):
            col = _numeric_column("mCE (%)", [(v, math.nan, len(c.rows)) for v, c in zip(mce, cf)], 1.0, 1, False)
            col.title = "corruption error relative to the single model (Hendrycks & Dietterich 2019); 100 = single"
            cols.append(col)
    dm = dee_metric(family)
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
            d = dee_for(family, c, col, higher)
            cells.append(dee_cell(d.size, d.bound) if d else "–")
            vals.append(math.nan if d is None else d.size if not d.bound
                        else math.inf if d.bound == ">" else -math.inf)
        finite = [v for v in vals if not math.isnan(v)]
        top = max(finite) if len(finite) >= 2 else -math.inf
        best = [top > -math.inf and v == top for v in vals]   # "<M" (worse than the curve) is never best
        cols.append(Column(f"DEE (by {col}, members)", cells, best,
                           title="deep-ensemble-equivalent size on the size curve"))
    for col, unit in (("params", ""), ("flops", "FLOPs")):
        if sec.has(col):
            scale, u = scale_prefix((c.stat(col)[0] for c in cf), unit)
            header = f"params ({u or 'count'})" if col == "params" else f"inference {u} / sample"
            cols.append(_numeric_column(header, [c.stat(col) for c in cf], scale, None, False))
    n_all = [len(c.rows) for c in cf]
    for col, dev in sec.timed_columns():
        label, higher, digits = _TIMED_HEADER[col]
        if col == "train_s":
            continue
        cols.append(_numeric_column(f"{label} · {dev}", [c.stat(col, dev) for c in cf], 1.0, digits,
                                    higher, n_all))
        if col == "latency_ms":   # a spread that shows a busy machine: marked, never the best (as the leaderboard)
            busy = [latency_busy(c, dev) for c in cf]
            if any(busy):
                last = cols[-1]
                last.cells = [t + " †" if b else t for t, b in zip(last.cells, busy)]
                last.best = [bo and not b for bo, b in zip(last.best, busy)]
                last.title = (f"† a busy machine: the latency's spread (p90 - p10) / median is above "
                              f"{LATENCY_BUSY_SPREAD:.0%} in a seed; the median is not a clean measurement")
    for col, dev in sec.timed_columns():
        if col == "train_s":
            label, higher, digits = _TIMED_HEADER[col]
            cols.append(_numeric_column(f"{label} · {dev}", [c.stat(col, dev) for c in cf], 1.0, digits,
                                        higher, n_all))
            cols[-1].title = ("per training stage, its first epoch plus its median epoch time x its other epochs: "
                              "an epoch stalled by a paused or busy machine counts as a typical one (the record "
                              "keeps every epoch's time)")
    if sec.has("train_flops"):
        scale, u = scale_prefix((c.stat("train_flops")[0] for c in cf), "FLOPs")
        cols.append(_numeric_column(f"train {u}", [c.stat("train_flops") for c in cf], scale, None, False))
    return cols


def latency_busy(c, device: str) -> bool:
    """Whether a seed's latency on ``device`` shows a busy machine (the leaderboard's † flag)."""
    return any(r.get("latency_busy") is True for r in c.rows if timing_device(r, "latency_ms") == device)


def budget_lines(sec: Section) -> list[str]:
    """Plain-text answer to 'which config at my budget': the accuracy and NLL fronts per cost axis."""
    lines = []
    ranked = [c for c in sec.configs if c.comparable]     # an underfit row is shown, never recommended
    for col, dev, _stem, xlabel in cost_axes(sec):
        scale, unit = ((1.0, "ms") if col == "latency_ms"
                       else scale_prefix((c.stat(col)[0] for c in sec.configs), "FLOPs" if col == "flops" else ""))
        for ycol, yname, ysc, hi in (("acc", "accuracy", 100.0, True), ("nll", "NLL", 1.0, False)):
            pts = [(c.stat(col, dev)[0], c.stat(ycol)[0]) for c in ranked]
            front = pareto_front(pts, hi)
            if not front:
                continue
            steps: list[tuple[list, float, float]] = []
            for i in front:
                x, y = pts[i]
                if steps and (steps[-1][1], steps[-1][2]) == (x, y):   # identical cost and value: one step
                    steps[-1][0].append(ranked[i])
                else:
                    steps.append(([ranked[i]], x, y))
            texts = []
            for configs, x, y in steps:
                yt = f"{y * ysc:.2f}%" if ycol == "acc" else f"{y:.3f}"
                xt = f"{x * scale:.{_digits_for([x], scale)}f} {unit}".rstrip()
                if col == "latency_ms" and any(latency_busy(c, dev) for c in configs):
                    xt += " †"
                texts.append(f"{' = '.join(c.label for c in configs)} ({xt}, {yt})")
            lines.append(f"{yname} by {xlabel}: " + " → ".join(texts))
    left_out = [c.label for c in sec.configs if not c.comparable]
    if lines and left_out:
        lines.append("left out, not converged (the leaderboard's converged column): " + ", ".join(left_out))
    return lines


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
def _md_table(cols: list[Column]) -> str:
    lines = ["| " + " | ".join(md_cell(c.header) for c in cols) + " |",
             "|" + "|".join(":---" if c.align == "left" else "---:" for c in cols) + "|"]
    for i in range(len(cols[0].cells)):
        cells = [f"**{md_cell(c.cells[i])}**" if c.best[i] else md_cell(c.cells[i]) for c in cols]
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
        tds = []
        for c in cols:
            cls = c.align + (" wrap" if c.wrap else "")
            tip = c.cell_titles[i] if c.cell_titles else ""
            t = f' title="{e(tip)}"' if tip else ""
            text = f"<strong>{e(c.cells[i])}</strong>" if c.best[i] else e(c.cells[i])
            tds.append(f'<td class="{cls}"{t}>{text}</td>')
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)



@dataclass
class Doc:
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
                out.append("\n".join(f"- {md_cell(x)}" for x in b[1]))
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
                # the content width, up to FIG_PX_PER_INCH px per inch of the figure (a one-panel figure is
                # not blown up to the page)
                cap = f' style="max-width:{round(f.width_in * FIG_PX_PER_INCH)}px"' if f.width_in else ""
                body.append(f'<figure><img src="{e(f.png)}" alt="{e(f.title)}" loading="lazy"{cap}>'
                            f"<figcaption><b>{e(f.title)}.</b> {e(f.caption)} "
                            f'<a href="{e(f.svg)}">SVG</a></figcaption></figure>')
        css = ("body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1400px;margin:2em auto;"
               "padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;font-size:13px}"
               "th,td{border:1px solid #ccc;padding:3px 7px;white-space:nowrap;vertical-align:top}"
               "th{background:#f3f3f3}td.wrap{white-space:normal;min-width:9em;max-width:22em;"
               "overflow-wrap:break-word}td[title]{cursor:help}"
               ".right{text-align:right}.left{text-align:left}.scroll{overflow-x:auto}"
               "figure{margin:1.5em 0}figure img{display:block;width:100%;height:auto;border:1px solid #eee}"
               "figcaption{font-size:13px;color:#444;max-width:1000px}li{margin:2px 0}")
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{e(title)}</title><style>{css}</style></head><body>\n" + "\n".join(body)
                + "\n</body></html>\n")
