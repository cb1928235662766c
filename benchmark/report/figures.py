"""The report's figures (matplotlib's object API on the Agg canvas: no pyplot state, no display needed):
Pareto fronts against every cost, reliability diagrams, OOD score histograms, the deep-ensemble size curve,
training cost and learning curves. Each ``fig_*`` draws one kind for a section and returns its
:class:`Figure` entries (PNG + SVG under ``figures/<section>/``); the shift figures are in
:mod:`ensemble_bench.report.figures_shift`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np

from ensemble_bench.columns import as_dict, num
from ensemble_bench.formatting import dee_cell
from ensemble_bench.predictions import load_predictions
from ensemble_bench.report.canvas import Figure, finish, legend, log_x, new_figure, panel_title, wrap_text
from ensemble_bench.report.model import (
    Section,
    SizeFamily,
    config_differences,
    cost_axes,
    headline_configs,
    dee_for,
    make_slug,
    pareto_front,
    scale_prefix,
)

N_BINS = 15          # reliability diagram bins (= the ECE of specs/metrics.md)
HIST_BINS = 30       # OOD score histograms
FEW_SAMPLES = 0.01   # reliability bins holding less than this fraction of the samples are drawn faded
# direction of the metrics plotted against cost: (column prefix, axis label, scale, higher is better)
_FRONT_METRICS = (("acc", "accuracy (%)", 100.0, True), ("nll", "NLL", 1.0, False),
                  ("ece", "ECE (%)", 100.0, False))
_SIZE_METRICS = (("acc", "accuracy (%)", 100.0, True), ("nll", "NLL", 1.0, False),
                 ("nll_ts", "NLL temp-scaled", 1.0, False), ("ece", "ECE (%)", 100.0, False))


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
    # the front is drawn through converged configs only: an underfit row is shown (hollow), never ranked
    front = pareto_front([p if c.comparable else (math.nan, math.nan) for c, p in zip(sec.configs, pts)], higher)
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
                    alpha=1.0 if id(c) in on_front else 0.6,
                    markerfacecolor=c.face,
                    markeredgecolor="black" if id(c) in on_front else c.color,
                    markeredgewidth=1.5 if id(c) in on_front else 0.5 if c.comparable else 1.2, zorder=3)
    if len(front) >= 1:
        fx = [pts[i][0] * x_scale for i in front]
        fy = [pts[i][1] * y_scale for i in front]
        ax.step(fx, fy, where="post", color="black", linewidth=1, linestyle="--", alpha=0.7, zorder=2)
    if drawn:
        log_x(ax)
    ax.grid(True, which="both", alpha=0.25)
    return len(drawn)


def fig_pareto(sec: Section, out_dir: Path, base: str) -> list[Figure]:
    figs = []
    panels = _front_panels(sec)
    if not panels:
        return figs
    for col, device, stem, xlabel in cost_axes(sec):
        if col == "latency_ms":
            scale, unit = 1.0, ""
        else:
            scale, unit = scale_prefix((c.stat(col)[0] for c in sec.configs), "FLOPs" if col == "flops" else "")
        fig, axes = new_figure(len(panels), ncols=2)
        n = 0
        for ax, (ycol, ylab, ysc, hi) in zip(axes, panels):
            n = max(n, _draw_front(ax, sec, col, device, ycol, ysc, hi, x_scale=scale))
            ax.set_ylabel(ylab + (" ↑" if hi else " ↓"))
            ax.set_xlabel(f"{xlabel} ({unit + ', ' if unit else ''}log)", fontsize=8)
        legend(fig, [c for c in sec.configs], title=sec.labels_note)
        what = {"flops": "inference FLOPs per sample (whole ensemble)", "params": "parameters (whole ensemble)"}.get(
            col, f"batch-1 latency measured on {device}")
        figs.append(finish(fig, sec, out_dir, f"{base}/{stem}",
                           f"quality vs {xlabel}\nPareto front dashed, its points ringed; bars ±1 std over seeds",
                           f"Pareto fronts against {what}",
                           f"One point per config (mean over seeds; bars: ±1 std over seeds), {n} config(s) "
                           f"with a value. The dashed step line is the Pareto front (no other config is at "
                           f"most as costly and at least as good); its points are ringed. Hollow markers: configs the "
                           f"leaderboard marks as not converged, shown but never on the front. Log-scaled cost "
                           f"axis."))
    return figs


def load_preds(sec: Section, folder_of: Mapping[str, Path], notes: list[str]) -> dict[int, list[dict]]:
    """The saved test predictions of every run of the section, read from its record's folder (``folder_of``)."""
    out: dict[int, list[dict]] = {}
    for c in sec.configs:
        for r in c.rows:
            rid = r.get("run_id")
            try:
                p = load_predictions(folder_of[rid], rid)
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


def probs_of(logits: np.ndarray, combine: str) -> np.ndarray:
    from ensemble_bench.metrics import ensemble_probs

    return ensemble_probs(logits, combine).numpy()


def fig_reliability(sec: Section, preds: dict, out_dir: Path, base: str, notes: list[str]) -> list[Figure]:
    """One reliability diagram per config, each over a panel of the sample count per bin (log scale): a bin
    of a handful of samples can draw a full-height bar, the count shows what each bar weighs; bins with
    less than FEW_SAMPLES of the samples are drawn faded."""
    from matplotlib.figure import Figure as MplFigure

    cfgs = [c for c in sec.configs if preds.get(id(c))]
    if not cfgs:
        return []
    ncols = min(4, len(cfgs))
    nrows = math.ceil(len(cfgs) / ncols)
    fig = MplFigure(figsize=(3.2 * ncols, 4.3 * nrows), layout="constrained")
    gs = fig.add_gridspec(2 * nrows, ncols, height_ratios=[3.2, 1.1] * nrows)
    w = 1.0 / N_BINS
    for k, c in enumerate(cfgs):
        row, col = divmod(k, ncols)
        ax = fig.add_subplot(gs[2 * row, col], label=f"reliability {k}")
        axc = fig.add_subplot(gs[2 * row + 1, col], sharex=ax, label=f"bin counts {k}")
        probs, labels = [], []
        for p in preds[id(c)]:
            try:
                probs.append(probs_of(p["logits"], p["combine"]))
                labels.append(np.asarray(p["labels"]))
            except ValueError as e:
                notes.append(f"{p['path']}: test predictions unusable ({e})")
        if not probs:
            ax.set_visible(False)
            axc.set_visible(False)
            continue
        b = reliability_bins(np.concatenate(probs), np.concatenate(labels), N_BINS)
        centers = b["edges"][:-1] + w / 2
        n = int(b["count"].sum())
        has = b["count"] > 0
        few = has & (b["count"] < FEW_SAMPLES * n)
        ok = has & ~few
        gap_lo = np.minimum(b["acc"], b["conf"])
        gap_hi = np.maximum(b["acc"], b["conf"])
        for sel, face, alpha, hatch_col in ((ok, c.color, 0.85, "tab:red"), (few, "lightgrey", 0.6, "#e8a0a0")):
            if not sel.any():
                continue
            ax.bar(centers[sel], b["acc"][sel], width=w, color=face, alpha=alpha, edgecolor="black",
                   linewidth=0.5)
            ax.bar(centers[sel], (gap_hi - gap_lo)[sel], bottom=gap_lo[sel], width=w, fill=False, hatch="//",
                   edgecolor=hatch_col, linewidth=0.5)
            axc.bar(centers[sel], b["count"][sel], width=w, color=face, alpha=alpha, edgecolor="black",
                    linewidth=0.5)
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.tick_params(axis="x", labelbottom=False)
        panel_title(ax, f"{c.label}\nECE {100 * b['ece']:.2f}% (n = {n}, {len(probs)} seed(s))", 8)
        axc.set_yscale("log")
        axc.set_ylim(0.7, max(float(b["count"].max()), 1.0) * 3)
        axc.axhline(FEW_SAMPLES * n, color="grey", linestyle=":", linewidth=1)
        axc.set_ylabel("samples", fontsize=8)
        axc.set_xlabel("confidence (max p̄)")
        axc.tick_params(axis="y", labelsize=7)
        axc.grid(True, axis="y", alpha=0.25)
    return [finish(fig, sec, out_dir, f"{base}/reliability",
                   f"reliability diagrams (test split, {N_BINS} equal-width bins) and samples per bin",
                   "Reliability diagrams",
                   f"Per config, from the saved test predictions (ensemble predictive p̄, the config's "
                   f"combine rule), seeds pooled: bar = accuracy of the samples whose top confidence falls "
                   f"in the bin, hatched = gap to the bin's mean confidence, dashed = perfect calibration. "
                   f"Below each diagram, the sample count per bin (log scale; dotted line: "
                   f"{FEW_SAMPLES:.0%} of the samples), so a reader sees what each bar weighs: bins with "
                   f"fewer than {FEW_SAMPLES:.0%} of the samples are drawn faded (grey), their accuracy rests "
                   f"on few samples and they weigh little in the ECE. ECE on the pooled samples, the binning "
                   f"of the ECE metric ({N_BINS} bins).")]


def fig_ood(sec: Section, preds: dict, out_dir: Path, base: str) -> list[Figure]:
    from ensemble_bench.metrics import ood_scores

    figs = []
    sets = sorted({name for ps in preds.values() for p in ps for name in p["ood"]})
    for k, name in enumerate(sets, 1):
        cfgs = [c for c in sec.configs if any(name in p["ood"] for p in preds.get(id(c), []))]
        if not cfgs:
            continue
        fig, axes = new_figure(len(cfgs), ncols=4, panel_w=3.2, panel_h=2.6)
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
            runs = f"{len(c.rows)} run{'s' if len(c.rows) != 1 else ''}"
            drawn = "" if len(s_id) == len(c.rows) else f"; {len(s_id)} drawn"
            panel_title(ax, c.label + (f"\nAUROC {100 * auroc:.2f}% ({runs}{drawn})" if math.isfinite(auroc)
                                       else ""), 8)
            ax.set_xlabel("msp score = −max p̄ (higher: more OOD)", fontsize=8)
            ax.set_ylabel("density")
            ax.legend(fontsize=7, frameon=False)
        figs.append(finish(fig, sec, out_dir, f"{base}/ood_hist_{k}_{make_slug(name)}",
                           f"OOD score histograms, ID test vs {name}", f"OOD score histograms: ID test vs {name}",
                           f"msp score (−max p̄, the leaderboard's OOD score) of the ID test split and of the "
                           f"{name} set, per config from the saved predictions, seeds pooled; less overlap "
                           f"means better detection. Panel titles: the config's AUROC (msp), the mean over its "
                           f"runs (n runs); 'k drawn' when only k of them have saved predictions for the "
                           f"histograms."))
    return figs


def _label_ends(ax, ends: dict[tuple[str, float], list[float]]) -> None:
    """The "<1" / ">4" labels of the configs beyond the ends of the size curve: at one end, markers closer
    than about a label's height share one label (beside the middle of the group), so labels never overlap."""
    lo, hi = ax.get_ylim()
    gap = 0.07 * abs(hi - lo)    # ~ a 7-pt label's height on a panel of the default size
    for (bound, size), vs in sorted(ends.items()):
        vs = sorted(vs)
        groups = [[vs[0]]]
        for v in vs[1:]:
            if v - groups[-1][-1] < gap:
                groups[-1].append(v)
            else:
                groups.append([v])
        text = dee_cell(size, bound)
        for g in groups:
            ax.annotate(text + (f" ({len(g)})" if len(g) > 1 else ""), (size, (g[0] + g[-1]) / 2),
                        textcoords="offset points", xytext=(8, 0), va="center", fontsize=7)


def fig_size_curve(sec: Section, family: SizeFamily | None, out_dir: Path, base: str) -> list[Figure]:
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
    # a size whose configs the leaderboard marks as not converged is drawn hollow, as every other point is
    underfit = {m for m, cs in family.by_size.items() if any(not c.comparable for c in cs)}
    fig, axes = new_figure(len(panels), ncols=2)
    for ax, (col, lab, sc, hi) in zip(axes, panels):
        sizes = [m for m, _ in family.curve(col)]
        ys = [(y, family.spread(col, m)) for m, y in family.curve(col)]
        ax.errorbar(sizes, [y[0] * sc for y in ys],
                    yerr=[y[1] * sc if math.isfinite(y[1]) else 0.0 for y in ys],
                    color="black", marker="", linewidth=1.5, capsize=2, zorder=2)
        for m, (y, _) in zip(sizes, ys):
            ax.plot([m], [y * sc], marker="o", color="black", linestyle="", zorder=2.5,
                    markerfacecolor="white" if m in underfit else "black")
        sign = 1.0 if hi else -1.0
        env = np.maximum.accumulate([sign * y[0] for y in ys]) * sign
        if not np.allclose(env, [y[0] for y in ys]):   # DEE reads the running best: show it where it differs
            ax.plot(sizes, env * sc, color="grey", linestyle=":", linewidth=1.2, zorder=1)
        ends: dict[tuple[str, float], list[float]] = {}
        for c in others:
            d = dee_for(family, c, col, hi)
            if d is None:
                continue
            v = c.stat(col)[0] * sc
            marker = {"": c.marker, "<": "<", ">": ">"}.get(d.bound, c.marker)
            ax.plot([d.size], [v], marker=marker, color=c.color, markersize=8, linestyle="",
                    markerfacecolor=c.face,
                    markeredgecolor="black" if c.comparable else c.color, zorder=3)
            if d.bound:
                ends.setdefault((d.bound, d.size), []).append(v)
        _label_ends(ax, ends)
        ax.set_xlabel("ensemble size M (members)")
        ax.set_xticks(sizes)
        ax.set_ylabel(lab + (" ↑" if hi else " ↓"))
        ax.grid(True, alpha=0.25)
    curve = Line2D([], [], color="black", marker="o", label="size-reference runs: size curve")
    env_h = Line2D([], [], color="grey", linestyle=":", label="running best (DEE reads this)")
    extra = [curve, env_h]
    if underfit:
        extra.append(Line2D([], [], color="black", marker="o", markerfacecolor="white", linestyle="",
                            label=f"size curve, not converged: M = {', '.join(f'{m:g}' for m in sorted(underfit))}"))
    legend(fig, others, extra, title=sec.labels_note)
    return [finish(fig, sec, out_dir, f"{base}/size_curve", "deep-ensemble size curve; other configs at their DEE",
                   "Deep-ensemble size curve",
                   f"Metric against members M for the size curve ({family.reason}); mean ± std over "
                   f"seeds. Every other config of the same training recipe is drawn at its deep-ensemble-"
                   f"equivalent size (DEE, leaderboard.dee_size) for that metric: the M at which the (running-best) "
                   f"curve reaches its value, linear between sizes; ◀/▶ at the ends mean worse than the "
                   f"smallest / better than the largest ensemble; markers close together at one end share "
                   f"one label, with their number in brackets. Hollow markers: configs the leaderboard marks "
                   f"as not converged, the curve's own points included (a DEE read off a hollow point is read "
                   f"off an underfit reference).")]


def fig_train_cost(sec: Section, out_dir: Path, base: str) -> list[Figure]:
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
    fig, axes = new_figure(len(axes_spec), ncols=2)
    for ax, (col, dev, lab) in zip(axes, axes_spec):
        scale, unit = (scale_prefix((c.stat(col)[0] for c in sec.configs), "FLOPs") if col == "train_flops"
                       else (1.0, ""))
        _draw_front(ax, sec, col, dev, "acc", 100.0, True, x_scale=scale)
        ax.set_xlabel(lab + (f" ({unit}, log)" if unit else " (log)"), fontsize=8)
        ax.set_ylabel("accuracy (%) ↑")
    legend(fig, sec.configs, title=sec.labels_note)
    return [finish(fig, sec, out_dir, f"{base}/train_cost", "training cost vs accuracy (front dashed)",
                   "Training cost vs accuracy",
                   "Accuracy against the training FLOPs (counted by the trainer, every stage) and the training "
                   "wall time, one panel per training device (times from different devices are never mixed); "
                   "mean ± std over seeds, Pareto front dashed.")]



def run_curve(rec: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """A run's learning curve as one sequence over all its stages in training order: (epochs so far,
    training FLOPs so far, validation NLL, validation accuracy) after each epoch that has a validation
    NLL (a stage without one, e.g. a bridge's curve, adds its epochs and FLOPs but no point). A deep
    ensemble's members trained one after the other give one saw-tooth per member: that is what its
    budget buys."""
    stages = as_dict(as_dict(rec.get("training")).get("stages"))
    ep, fl, nll, acc = [], [], [], []
    e_done, f_done = 0, 0.0
    for st in stages.values():
        st = as_dict(st)
        curve = [c for c in st.get("curve") or [] if isinstance(c, dict)]
        n = max(len(curve), 1)
        f_epoch = 3.0 * num(st.get("flops_per_sample")) * num(st.get("samples_seen")) / n
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


def _nll_ylim(ax, curves: list[np.ndarray]) -> None:
    """A validation-NLL axis from just below the lowest point to the 95th percentile of all points: the
    first epochs' spikes would flatten the end of training, which is what a reader compares."""
    points = np.concatenate(curves)
    lo, hi = float(np.nanmin(points)), float(np.nanpercentile(points, 95))
    ax.set_ylim(lo * 0.95, max(hi, lo * 1.1))


def _stage_curves(records: list[dict]) -> dict[str, np.ndarray]:
    """Per training stage (in training order), its validation NLL after each epoch, mean over the seeds
    that have the stage (point by point over the epochs they share)."""
    per: dict[str, list[list[float]]] = {}
    for rec in records:
        for name, st in as_dict(as_dict(rec.get("training")).get("stages")).items():
            curve = [c for c in as_dict(st).get("curve") or [] if isinstance(c, dict)]
            nll = [float(c["val_nll"]) if isinstance(c.get("val_nll"), (int, float)) else math.nan for c in curve]
            if any(math.isfinite(v) for v in nll):
                per.setdefault(str(name), []).append(nll)
    out = {}
    for name, curves in per.items():
        n = min(len(c) for c in curves)
        out[name] = np.mean([c[:n] for c in curves], axis=0)
    return out


def fig_learning_curves_by_method(sec: Section, out_dir: Path, base: str) -> list[Figure]:
    """Small multiples of the learning curves: one panel per method, one colour per config of it (budgets,
    recipes, options), every training stage drawn from its own first epoch (a deep ensemble's members
    overlaid), its legend entry ending with the leaderboard's converged verdict. Drawn only when some method
    has several configs: the section-wide figure then holds too many lines to tell a row's curve, and the
    convergence rule is checked per stage, which is what this figure shows."""
    by_method: dict[str, list] = {}
    for c in sec.configs:
        stages = _stage_curves(c.records)
        if stages:
            by_method.setdefault(c.method, []).append((c, stages))
    if not any(len(v) > 1 for v in by_method.values()):
        return []
    verdict = {True: "converged", False: "NOT converged", None: "no verdict"}
    # a legend entry says what tells the configs of its panel apart (not of the whole section: a paper-recipe
    # row elsewhere would put the full recipe into every label), wrapped to the panel's width
    panel_w, font = 4.2, 6.5
    labels: dict[int, str] = {}
    for lines in by_method.values():
        cfgs = [c for c, _ in lines]
        for (c, stages), text in zip(lines, config_differences(cfgs)):
            label = f"{text or 'defaults'}: {verdict[c.converged]}" + (
                f" ({len(stages)} stages)" if len(stages) > 1 else "")
            labels[id(c)] = wrap_text(label, panel_w - 0.3, font)
    legend_lines = max(sum(labels[id(c)].count("\n") + 1 for c, _ in lines) for lines in by_method.values())
    fig, axes = new_figure(len(by_method), ncols=min(3, len(by_method)), panel_w=panel_w,
                           panel_h=3.0 + 0.13 * legend_lines)   # room below each panel for its legend
    for ax, (method, lines) in zip(axes, by_method.items()):
        values = []
        for c, stages in lines:
            for k, nll in enumerate(stages.values()):
                ax.plot(np.arange(1, len(nll) + 1), nll, color=c.color, lw=1.1, alpha=0.85,
                        linestyle="-" if c.converged is not False else (0, (4, 2)),
                        label=labels[id(c)] if k == 0 else None)
                values.append(nll)
        _nll_ylim(ax, values)
        panel_title(ax, method, 9)
        ax.set_xlabel("epoch of the stage", fontsize=8)
        ax.set_ylabel("validation NLL ↓", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=font, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=1)
    return [finish(fig, sec, out_dir, f"{base}/learning_curves_by_method", "learning curves per method and stage",
                   "Learning curves per method",
                   "Validation NLL after every epoch, one panel per method and one colour per config of it (its "
                   "budget, recipe or options; mean over seeds); every training stage (a member, a base model, "
                   "an exploration phase) starts at its own epoch 1, so the members of an ensemble overlay. "
                   "Each legend entry ends with the leaderboard's converged verdict (dashed: not converged, by "
                   "a stage's own curve or because a longer budget of the same config ended clearly lower).")]


def fig_learning_curves(sec: Section, out_dir: Path, base: str) -> list[Figure]:
    """The section's learning curves against epochs and training FLOPs, mean over seeds: one line per config,
    or, when a method has several configs (the per-method figure then draws every one), one line per method,
    its config at the section's most common settings (:func:`model.headline_configs`): the reference report's
    30 configs in one panel could not be told apart."""
    lines = [(c, _mean_curve([run_curve(r) for r in c.records])) for c in sec.configs]
    lines = [(c, m) for c, m in lines if m is not None]
    if not lines:
        return []
    per_method = len({c.method for c, _ in lines}) < len(lines)
    if per_method:
        headline = {id(c) for c in headline_configs(sec, among=[c for c, _ in lines])}
        lines = [(c, m) for c, m in lines if id(c) in headline]
    fig, axes = new_figure(4, ncols=2)
    f_scale, f_unit = scale_prefix((float(m[1][-1]) for _, m in lines if np.isfinite(m[1][-1])), "FLOPs")
    for c, (ep, fl, nll, acc) in lines:
        kw = dict(color=c.color, lw=1.2, alpha=0.9, linestyle=c.linestyle)
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
        _nll_ylim(ax, [m[2] for _, m in lines])
    legend(fig, [c for c, _ in lines], lines=True, title=sec.labels_note)
    return [finish(fig, sec, out_dir, f"{base}/learning_curves", "learning curves (mean over seeds)",
                   "Learning curves",
                   "Validation NLL and accuracy after every epoch of every stage (stages in training order: a deep "
                   "ensemble's members one after the other), against epochs and against the training FLOPs "
                   "spent so far; " + ("one line per method: its config at the section's most common settings where it has one "
                   "(the method's default options first; every config is in the per-method figure)"
                   if per_method else "one line per config") + ", mean over seeds. A curve still falling at its "
                   "end is a row the leaderboard marks as not converged.")]

