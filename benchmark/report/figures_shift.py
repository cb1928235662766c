"""The report's shift-track figures: accuracy and ECE against corruption severity (Ovadia et al., NeurIPS
2019) and risk-coverage curves on the clean and the corrupted test set."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ensemble_bench.columns import as_dict, num
from ensemble_bench.report.canvas import Figure, finish, legend, new_figure
from ensemble_bench.report.figures import probs_of
from ensemble_bench.report.model import Config, Section


def _shift_of(rec: dict) -> dict | None:
    sh = as_dict(as_dict(rec.get("metrics")).get("shift"))
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
    cells = [{(c, s) for c, by in as_dict(sh["per_corruption"]).items() for s in as_dict(by)} for sh in shifts]
    if any(cl != cells[0] for cl in cells[1:]):
        return None
    sevs = sorted({int(s) for _, s in cells[0]})
    corrs = sorted({c for c, _ in cells[0]})
    clean = [num(as_dict(r.get("metrics")).get(metric)) for r in records]
    xs, mean, lo, hi = [0], [float(np.mean(clean))], [math.nan], [math.nan]
    for s in sevs:
        per_c = [np.mean([num(as_dict(as_dict(sh["per_corruption"][c]).get(str(s))).get(metric)) for sh in shifts])
                 for c in corrs if str(s) in as_dict(shifts[0]["per_corruption"][c])]
        xs.append(s)
        mean.append(float(np.mean(per_c)))
        lo.append(float(np.percentile(per_c, 25)))
        hi.append(float(np.percentile(per_c, 75)))
    return np.asarray(xs, float), np.asarray(mean), np.asarray(lo), np.asarray(hi)


def fig_shift(sec: Section, out_dir: Path, base: str, notes: list[str]) -> list[Figure]:
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
        fig, axes = new_figure(len(panels), ncols=2)
        for ax, (m, lab, sc) in zip(axes, panels):
            for c, curves, _ in lines:
                xs, mean, lo, hi = curves[m]
                ax.plot(xs, mean * sc, color=c.color, marker=c.marker, linestyle=c.linestyle, lw=1.4, ms=5,
                        markerfacecolor=c.face)
                ax.fill_between(xs[1:], lo[1:] * sc, hi[1:] * sc, color=c.color, alpha=0.12, lw=0)
            ax.set_xticks(range(0, 6))
            ax.set_xticklabels(["clean", "1", "2", "3", "4", "5"])
            ax.set_xlabel("corruption severity")
            ax.set_ylabel(lab)
            ax.grid(alpha=0.3)
        legend(fig, [c for c, _, _ in lines], title=sec.labels_note)
        stem = f"{base}/shift_severity" + (f"_{k}" if len(by_set) > 1 else "")
        figs.append(finish(fig, sec, out_dir, stem, f"accuracy and calibration under corruption ({set_text})",
                           f"Accuracy and ECE under distribution shift ({set_text})",
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
        probs.append(probs_of(z, p["combine"]))
        labels.append(np.asarray(y))
    return np.concatenate(probs), np.concatenate(labels)


def fig_risk_coverage(sec: Section, preds: dict, out_dir: Path, base: str, notes: list[str]) -> list[Figure]:
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
                cov, risk = risk_coverage(probs_of(p["logits"], p["combine"]), np.asarray(p["labels"]))
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
    fig, axes = new_figure(len(panels), ncols=2, panel_w=5.0, panel_h=3.8)
    titles = {"clean": "clean test split", "shifted": "corrupted test set (all cells pooled)"}
    for ax, (part, lines) in zip(axes, panels.items()):
        for c, risk, aurc, n in lines:
            ax.plot(RC_GRID * 100, risk * 100, color=c.color, lw=1.4, linestyle=c.linestyle,
                    label=f"{c.label}: AURC {100 * aurc:.2f}%" + (" (pooled)" if part == "shifted" else "")
                    + (f" ({n} seeds)" if n > 1 else ""))
        ax.set_title(titles[part], fontsize=9)
        ax.set_xlabel("coverage (%): the most confident fraction", fontsize=8)
        ax.set_ylabel("selective risk (%, error on the covered) ↓", fontsize=8)
        ax.set_xlim(0, 100)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False, loc="upper left")
    return [finish(fig, sec, out_dir, f"{base}/risk_coverage", "risk-coverage", "Risk-coverage curves",
                   "Selective prediction from the saved predictions: samples are accepted in order of the "
                   "ensemble's confidence (max p̄); the error among the accepted against the fraction accepted; "
                   "one line per config, mean over seeds; on the clean test split and, where the predictions "
                   "hold them, on the corrupted test set (every corruption and severity pooled). AURC (area "
                   "under the curve, lower is better) as in the metrics.")]

