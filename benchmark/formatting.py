"""Text of results, in one place: the cell helpers the markdown leaderboard and the report share, and the
markdown leaderboard itself (:func:`format_markdown`, one table per dataset and backbone).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Iterable

from ensemble_bench.columns import (
    BUDGET_TOL,
    CONVERGENCE_MIN_EPOCHS,
    CONVERGENCE_NOISE,
    CONVERGENCE_TOL,
    CONVERGENCE_WINDOW,
    LATENCY_BUSY_SPREAD,
    NUMERIC_RECIPE_KEYS,
    num,
    common_recipe,
    recipe_differences,
)


def mean_std_text(mean: Any, std: Any = math.nan, scale: float = 1.0, digits: int = 2, *,
                  thousands: bool = False, drop_rounded_std: bool = False) -> str:
    """``mean ± std`` (times ``scale``, ``digits`` decimals); "–" for a missing mean, just the mean for a
    missing or zero std. ``thousands``: a comma every three digits from 10,000 on; ``drop_rounded_std``: no
    "± 0.000" when the std rounds to zero at ``digits``."""
    m, s = num(mean), num(std)
    if not math.isfinite(m):
        return "–"
    sep = "," if thousands and abs(m * scale) >= 1e4 else ""
    text = f"{m * scale:{sep}.{digits}f}"
    shown = round(s * scale, digits) != 0 if drop_rounded_std else s != 0
    if math.isfinite(s) and shown:
        text += f" ± {s * scale:{sep}.{digits}f}"
    return text


def options_text(options: Any, keys: Iterable[str] | None = None, empty: str = "") -> str:
    """``k=v, ...`` of a method's options (a dict, or its canonical JSON: the leaderboard's config_key),
    only ``keys`` when given; ``empty`` when there are none. Text that is not JSON is shown as it is."""
    if isinstance(options, str):
        try:
            options = json.loads(options) if options else {}
        except json.JSONDecodeError:
            return options
    if not isinstance(options, dict):
        return str(options) if options and not isinstance(options, float) else empty
    wanted = list(options) if keys is None else [k for k in options if k in set(keys)]
    text = ", ".join(f"{k}={options[k] if isinstance(options[k], str) else json.dumps(options[k])}" for k in wanted)
    return text or empty


@functools.lru_cache(maxsize=None)
def _option_defaults(method: str) -> str | None:
    """The method's default options as canonical JSON; None when the method is not registered here (a
    plugin that was not loaded, a method from another version): its rows then show every option."""
    try:
        import ensemble_bench.methods as methods
        from ensemble_bench.config import options_dict

        return json.dumps(options_dict(methods.get(method).Config()), sort_keys=True)
    except Exception:   # noqa: BLE001 - display only: fall back to the full options
        return None


def non_default_options(method: Any, options: Any) -> Any:
    """The options of a row that differ from its method's defaults (a dict; every option when the defaults
    are unknown). Rows are told apart by what was changed, not by a dozen default values (full options: CSV,
    record, the HTML cell's tooltip)."""
    if isinstance(options, str):
        try:
            options = json.loads(options) if options else {}
        except json.JSONDecodeError:
            return options
    if not isinstance(options, dict) or not isinstance(method, str):
        return options
    defaults = _option_defaults(method)
    if defaults is None:
        return options
    d = json.loads(defaults)
    return {k: v for k, v in options.items() if k not in d or json.dumps(d[k], sort_keys=True) != json.dumps(v, sort_keys=True)}


def md_cell(text: Any) -> str:
    """A markdown table cell: pipes escaped, one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def device_name(d: Any, unknown: str = "?") -> str:
    """The device of a timing column; ``unknown`` when the record names none."""
    return d if isinstance(d, str) and d else unknown


def dee_cell(size: Any, bound: Any) -> str:
    """A DEE cell: ``2.5``, ``>4`` (better than the largest ensemble), ``<1`` (worse than the smallest), "–"."""
    v = num(size)
    if not math.isfinite(v):
        return "–"
    if isinstance(bound, str) and bound in ("<", ">"):
        return f"{bound}{v:g}"
    return f"{v:.2f}".rstrip("0").rstrip(".")


def converged_text(verdict: Any, budget_epochs: Any, budget_gain: Any, strong: str = "**", why: Any = "") -> str:
    """A row's converged cell: yes / **no** / ? (no curves). A **no** says why: a longer budget that did clearly
    better, with its gain in validation NLL ("60 ep: val NLL -9.8 %"), and ``why``, the curves' evidence
    (leaderboard.curve_evidence: "seed 1 member1: -1.26 % over epochs 55-60, 3.1 SE"). ``strong``: the
    markdown emphasis."""
    if verdict is None or verdict != verdict:
        return "?"
    if verdict:
        return "yes"
    gain = num(budget_gain)
    reasons = [f"{num(budget_epochs):g} ep: val NLL {-100 * gain:+.1f} %"] if math.isfinite(gain) and gain >= BUDGET_TOL else []
    reasons += [("curves: " if reasons else "") + why] if isinstance(why, str) and why else []
    return f"{strong}no{strong}" + (f" ({'; '.join(reasons)})" if reasons else "")


def format_markdown(df) -> str:
    """Compact human tables of a leaderboard, one per (dataset, backbone).

    Columns: method, options, n (seeds), acc (%), nll, ece (%), brier, AUROC (%) per OOD set (msp
    score), params (M), GFLOPs, latency ms, train s, as ``mean ± std`` (just the mean when there
    is one seed or no spread). The latency / training device (a row's main device: most of its seeds) is
    named in the column header when it is the same for every row of a table, otherwise in a devices column;
    § marks a row whose seeds trained on different machines. Columns for epochs,
    batch size, lr and the rest of the recipe appear only when they differ between rows of a table; the
    members' combine rule whenever a row's is not the average of probabilities.
    """
    if df is None or len(df) == 0:
        return "_no results_\n"
    ood_sets = sorted(c[len("fpr95_"): -len("_mean")] for c in df.columns if c.startswith("fpr95_") and c.endswith("_mean"))
    def has_values(col: str) -> bool:   # a column some row has a number in (else it is not shown)
        return col in df.columns and bool(df[col].map(lambda v: math.isfinite(num(v))).any())

    has_ts = has_values("nll_ts_mean")
    dee_metrics = [c[len("dee_"):] for c in df.columns if c.startswith("dee_") and not c.endswith("_bound")
                   and has_values(c)]
    any_shift = has_values("shift_acc_mean")
    mixed = "train_devices" in df.columns and bool((df["train_devices"].map(num) > 1).any())
    devices_column = False     # any table with a devices column (its footnote line)
    parts: list[str] = []
    for (dataset, backbone), t in df.groupby(["dataset", "backbone"], sort=False, dropna=False):
        lat_devs = sorted({device_name(d) for d in t["latency_device"]})
        train_devs = sorted({device_name(d) for d in t["train_device"]})
        lat_hdr = "latency ms" + (f" ({lat_devs[0]})" if len(lat_devs) == 1 else "")
        train_hdr = "train s" + (f" ({train_devs[0]})" if len(train_devs) == 1 else "")
        varying = [k for k in NUMERIC_RECIPE_KEYS if t[k].astype(str).nunique() > 1]
        show_precision = "precision" in t.columns and t["precision"].astype(str).nunique() > 1
        # the recipe column names what departs from the table's most common recipe, stated under its heading
        common = common_recipe(list(t["recipe"]))
        recipe_text = recipe_differences(list(t["recipe"]), against_common=True, common=common)
        any_recipe = any(recipe_text)
        show_combine = any(c not in ("probs", "") for c in t["combine"])
        out_rows = []
        for i, (_, r) in enumerate(t.iterrows()):
            row: dict[str, str] = {"method": r["method"],
                                   "options": options_text(non_default_options(r["method"], r["config_key"]), empty="–")}
            for k in varying:
                row[k] = str(r[k])
            if any_recipe:
                row["recipe"] = recipe_text[i] or "–"
            if show_precision:
                row["precision"] = r["precision"] or "?"
            if show_combine:
                row["combine"] = r["combine"] or "probs"
            members = num(r.get("num_members"))
            row["M"] = f"{members:g}" if math.isfinite(members) else "?"
            row["n"] = (str(r["n_seeds"]) + (" ‡" if num(r.get("code_versions")) > 1 else "")
                        + (" §" if num(r.get("train_devices")) > 1 else ""))
            row["converged"] = converged_text(r.get("converged"), r.get("budget_epochs"), r.get("budget_gain"),
                                              why=r.get("converged_why"))

            def g(col: str, scale: float = 1.0, digits: int = 2) -> str:
                return mean_std_text(r.get(f"{col}_mean"), r.get(f"{col}_std"), scale, digits)

            row["acc (%)"] = g("acc", 100)
            row["nll"] = g("nll", 1, 3)
            row["ece (%)"] = g("ece", 100)
            row["brier"] = g("brier", 1, 4)
            if has_ts:   # temperature-scaled on the validation split (runs with one)
                row["nll TS"] = g("nll_ts", 1, 3)
            for metric in dee_metrics:   # deep-ensemble-equivalent size on the size curve of the row's recipe
                row[f"DEE by {metric}"] = dee_cell(r.get(f"dee_{metric}"), r.get(f"dee_{metric}_bound"))
            for s in ood_sets:
                row[f"AUROC {s} (%)"] = g(f"auroc_{s}", 100)
            if any_shift:
                row["shift acc (%)"] = g("shift_acc", 100)
                row["shift nll"] = g("shift_nll", 1, 3)
                row["shift ece (%)"] = g("shift_ece", 100)
                row["mCE (%)"] = mean_std_text(r.get("mce"), math.nan, 1, 1)
            row["params (M)"] = g("params", 1e-6)
            row["non-zero params (M)"] = g("params_nonzero", 1e-6)   # sparse methods' live weights
            row["GFLOPs"] = g("flops", 1e-9, 3)                        # sparse-aware (per-layer density)
            row["train TFLOPs"] = g("train_flops", 1e-12, 2)
            row[lat_hdr] = g("latency_ms", 1, 2) + (" †" if bool(r.get("latency_busy")) else "")
            row[train_hdr] = g("train_s", 1, 0)
            if len(lat_devs) > 1 or len(train_devs) > 1:
                devices_column = True
                lat_dev, train_dev = device_name(r["latency_device"]), device_name(r["train_device"])
                row["devices"] = lat_dev if lat_dev == train_dev else f"latency: {lat_dev}; train: {train_dev}"
            if any(str(s or "") for s in t.get("stage_recipes", [])):
                row["stage recipes"] = str(r.get("stage_recipes") or "") or "-"
            out_rows.append(row)
        header = list(out_rows[0])
        lines = [f"### {dataset or '?'} · {backbone or '?'}", ""]
        if any_recipe:
            lines += ["recipe: – = the table's most common values of the recipe fields that vary ("
                      + ", ".join(f"{k}={v}" for k, v in common.items())
                      + "); a cell names where its row departs from them (the CSV's recipe column has every field)", ""]
        lines.append("| " + " | ".join(md_cell(h) for h in header) + " |")
        text_cols = {"method", "options", "combine", "devices", "converged", "stage recipes", "recipe", "precision"}
        lines.append("|" + "|".join("---" if h in text_cols else "---:" for h in header) + "|")
        for row in out_rows:
            lines.append("| " + " | ".join(md_cell(row.get(h, "")) for h in header) + " |")
        parts.append("\n".join(lines))
    note = ("_mean ± std over seeds (sample std, ddof=1); n = number of seeds; M = members; options: those that "
            "differ from the method's defaults (every option is in the CSV); OOD AUROC uses the msp score; "
            + ("nll TS: NLL after temperature scaling fitted on the validation split; " if has_ts else "")
            + ("DEE by X: deep-ensemble-equivalent size, the number of members at which the deep-ensemble size "
               "curve of the same recipe reaches the row's X (>M better than the largest ensemble, <1 worse than "
               "one model); " if dee_metrics else "") +
            "GFLOPs are inference FLOPs per image counting only live weights (sparse methods run on dense kernels, "
            "so their latency shows no saving); train TFLOPs ~ 3 x forward FLOPs x samples seen; train s: per "
            "training stage its first epoch plus its median epoch time x its other epochs, plus the method's "
            "extra training time (a stalled epoch counts as a typical one; the CSV's train_s_recorded_mean is "
            "the record's sum of every epoch). "
            f"converged: in every seed, every training stage's validation NLL was not still falling at the end: "
            f"**no** when the least-squares line through its last {CONVERGENCE_WINDOW:.0%} of epochs (at least "
            f"{CONVERGENCE_MIN_EPOCHS}) falls by more than {CONVERGENCE_TOL:.0%} and its slope is more than "
            f"{CONVERGENCE_NOISE:g} standard errors below zero (a stage whose learning rate restarts, e.g. "
            f"cyclic cosine: when its last cycle end is below the one before by more than {CONVERGENCE_TOL:.0%} and "
            f"by more than {CONVERGENCE_NOISE:g} standard errors of that change, image by image); "
            f"also **no** when the table holds the same configuration trained longer whose end-of-training "
            f"validation NLL is {BUDGET_TOL:.0%} or more lower (the cell names that budget and the gain); "
            "a **no** from the curves names, per seed, the stage still falling the most, its fall relative to "
            "its level (the fitted line's across the window, or from the previous cycle end) and that fall in "
            "standard errors; "
            "**no** = still improving when it stopped, so the row is not a verdict on the method; "
            f"? = no learning curve in the record. "
            + ("devices: where a row's latency and training ran (one name: both). " if devices_column else "")
            + f"† latency spread (p90 - p10) / median above "
            f"{LATENCY_BUSY_SPREAD:.0%}: measured on a busy machine. ‡ seeds made by different code "
            "(harness, method file or plugin hash). stage recipes: stages that a method trains with its own "
            "recipe (part of the method, recorded per stage)."
            + (" § seeds trained on different machines: every metric pools them (the machine moves a number by "
               "floating-point rounding, as a seed does); a timing is the mean over the seeds timed on the "
               "device its header (or the devices column) names, never across devices." if mixed else "")
            + (" shift: mean over every corruption x severity of the corrupted test set; mCE: corruption error "
               "relative to the single model of the same data and recipe (Hendrycks & Dietterich 2019: per "
               "corruption, the errors summed over severities divided by the single model's, averaged over "
               "corruptions; 100 = the single model; – without a single-model row)." if any_shift else "")
            + "_")
    return "\n\n".join(parts) + "\n\n" + note + "\n"
