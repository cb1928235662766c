"""The report's drawing kit: a figure's report entry (:class:`Figure`), panels on a fresh Agg canvas
(:func:`new_figure`, no pyplot state), titles that wrap to their width, the shared legend, a log axis with
readable ticks, and :func:`finish`: title, save as PNG + SVG, return the entry. The figures themselves are
in :mod:`ensemble_bench.report.figures` and :mod:`ensemble_bench.report.figures_shift`.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ensemble_bench.report.model import Config, Section

DPI = 150            # PNG pixels per inch: the HTML shows a figure at up to the content width


@dataclass
class Figure:
    stem: str          # path relative to OUT without suffix, e.g. figures/digits_cnn_small/pareto_flops
    title: str
    caption: str
    width_in: float = 0.0   # the figure's width in inches (0: unknown); the HTML caps its size with it

    @property
    def png(self) -> str:
        return self.stem + ".png"

    @property
    def svg(self) -> str:
        return self.stem + ".svg"


def new_figure(n_panels: int, ncols: int, panel_w: float = 4.0, panel_h: float = 3.2):
    from matplotlib.figure import Figure as MplFigure

    ncols = max(1, min(ncols, n_panels))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = MplFigure(figsize=(panel_w * ncols, panel_h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def save(fig, out_dir: Path, stem: str) -> None:
    path = out_dir / stem
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path.with_suffix(".png"), dpi=DPI, metadata={"Software": None})
    fig.set_layout_engine("none")   # keep the layout just computed: the SVG does not redo it
    fig.savefig(path.with_suffix(".svg"), metadata={"Date": None})


def wrap_text(text: str, width_in: float, fontsize: float) -> str:
    """``text`` with each of its lines wrapped to fit ``width_in`` inches at ``fontsize`` points (a title
    wider than its panel or figure would be cut at the edge of the image)."""
    chars = max(12, int(width_in * 72 / (0.56 * fontsize)))
    return "\n".join(textwrap.fill(line, chars, break_long_words=True, break_on_hyphens=False) or line
                     for line in text.split("\n"))


def panel_title(ax, text: str, fontsize: float = 8) -> None:
    """A panel title wrapped to the panel's width."""
    fig = ax.get_figure()
    w = fig.get_size_inches()[0] * ax.get_position().width
    ax.set_title(wrap_text(text, w, fontsize), fontsize=fontsize)


def finish(fig, sec: Section, out_dir: Path, stem: str, what: str, title: str, caption: str) -> Figure:
    """Title the figure "<section title>: <what>" (wrapped to its width), save it as PNG and SVG under
    out_dir/stem, and return its report entry."""
    width = float(fig.get_size_inches()[0])
    fig.suptitle(wrap_text(f"{sec.title}: {what}", width * 0.95, 10), fontsize=10)
    save(fig, out_dir, stem)
    return Figure(stem, title, caption, width)


def legend_columns(labels: Sequence[str], width_in: float, fontsize: float = 8, most: int = 3) -> int:
    """How many legend columns fit ``width_in`` inches: a legend wider than its figure is cut at both edges
    (the markers of the first column and the text of the last). An entry is its longest label (about 0.6 em
    a character) plus the handle and the gaps (about 0.6 inch); a column is as wide as its widest entry."""
    if not labels:
        return 1
    entry = max(len(s) for s in labels) * 0.6 * fontsize / 72 + 0.6
    return max(1, min(most, len(labels), int(width_in // entry)))


def legend(fig, configs: Sequence[Config], extra: Sequence = (), lines: bool = False, title: str = "") -> None:
    """The figure's shared legend below its panels, as many columns as fit its width, ``title`` (wrapped)
    above it. ``lines``: the handles are line segments in the config's colour (for figures of curves)
    rather than its marker; a marker is hollow for a config that is not converged, as every figure of
    points draws it. The figure grows by the legend's height, so its panels keep theirs (26 configs of
    the reference report took 5 inches of a 6.4-inch figure, and the layout collapsed)."""
    from matplotlib.lines import Line2D

    fontsize = 8
    handles = [Line2D([], [], color=c.color, lw=1.6, linestyle=c.linestyle, label=c.label) if lines else
               Line2D([], [], color=c.color, marker=c.marker, linestyle="", markersize=7, label=c.label,
                      markerfacecolor=c.face)
               for c in configs]
    handles += list(extra)
    if handles:
        width, height = (float(x) for x in fig.get_size_inches())
        for h in handles:      # a label longer than the whole figure is wrapped to fit one column
            h.set_label(wrap_text(h.get_label(), width - 0.8, fontsize))
        longest = [max(h.get_label().split("\n"), key=len) for h in handles]
        ncols = legend_columns(longest, width, fontsize)
        title = wrap_text(title, width - 0.4, fontsize) if title else ""
        fig.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize=fontsize, frameon=False,
                   title=title or None, title_fontsize=fontsize)
        fig.set_size_inches(width, height + legend_height([h.get_label() for h in handles], ncols, title, fontsize))


def legend_height(labels: Sequence[str], ncols: int, title: str = "", fontsize: float = 8) -> float:
    """About how many inches a legend of ``labels`` in ``ncols`` columns (matplotlib fills them column by
    column) and its ``title`` take: a row is as tall as its tallest label (1.2 em a line) plus the
    spacing between entries (0.5 em), and a little padding."""
    rows = math.ceil(len(labels) / ncols)
    lines = [s.count("\n") + 1 for s in labels]
    row_lines = sum(max(lines[r::rows]) for r in range(rows))
    title_lines = title.count("\n") + 1 if title else 0
    em = fontsize / 72
    return (row_lines + title_lines) * 1.2 * em + (rows + title_lines) * 0.5 * em + 0.2


def log_x(ax) -> None:
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
