"""Score files (``score_npz``: ``evaluate`` on the arrays of a saved .npz) and distribution-shift metrics
(``shift_cell_metrics``, ``shift_summary``, ``score_shift_arrays``; the images and the loop over them are in
``ensemble_bench.shift``)."""
from __future__ import annotations

import math
import os
import zipfile

import numpy as np
import torch
from torch import Tensor

from ensemble_bench.api import COMBINE_RULES
from ensemble_bench.datafiles import numpy_error_detail
from ensemble_bench.metrics._base import (_check_combine, _check_labels, _check_logits, _one_line, _shape)
from ensemble_bench.metrics.core import evaluate, logits_from_probs

def score_npz(path) -> dict:
    """Score a saved run: ``evaluate`` on the arrays of an .npz file (see module docs / spec).

    Arrays: ``logits`` [M,N,C] or ``probs`` [M,N,C]; ``labels`` [N]; optional ``val_logits`` /
    ``val_probs`` [M,V,C] with ``val_labels`` [V]; optional ``combine`` (0-d string); any number of
    ``ood_<name>`` [M,K,C] (logits, or probabilities when the file stores ``probs``); any number of
    distribution-shift cells ``shift_<corruption>_<severity>`` [M,K,C] (logits or probabilities likewise;
    severity a positive integer, the corruption name may contain underscores) with their labels in
    ``shift_labels_<corruption>_<severity>`` [K] or, for cells that share them, one ``shift_labels`` [K].
    With shift cells the result gets a ``shift`` entry (see ``score_shift_arrays``; nll_ts / ece_ts use
    the temperature fitted on the validation arrays); without them the result is unchanged.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ValueError(f"{p}: no such file")
    if not os.path.isfile(p):
        raise ValueError(f"{p}: not a file")
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{p}: not an .npz archive")
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:   # an object array asks for allow_pickle: never repeated (datafiles.numpy_error_detail)
        detail = numpy_error_detail(exc)
        why = f"{type(exc).__name__}: {detail}" if detail else "not an .npz archive of numeric arrays"
        raise ValueError(_one_line(f"{p}: cannot read .npz ({why})")) from None

    def get_float(key: str) -> np.ndarray:
        a = arrays[key]
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{p}: array '{key}' must be numeric; got dtype {a.dtype}")
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"{p}: array '{key}' contains NaN or inf")
        return a

    def as_logits(key: str, from_probs: bool) -> Tensor:
        a = get_float(key)
        if a.ndim not in (2, 3):
            raise ValueError(f"{p}: array '{key}' must be [M, N, C]; got shape {a.shape}")
        if from_probs:
            try:
                return logits_from_probs(a)
            except ValueError as exc:
                raise ValueError(f"{p}: array '{key}': {exc}") from None
        return torch.from_numpy(a)

    known = ("logits", "probs", "labels", "val_logits", "val_probs", "val_labels", "combine")
    for k in sorted(arrays):   # a misspelt array would drop its metric without a word (val_logit: no nll_ts)
        if k not in known and not k.startswith(("ood_", "shift_")):
            from ensemble_bench.registry import did_you_mean

            raise ValueError(f"{p}: unknown array {k!r}{did_you_mean(k, known)}; the arrays are "
                             f"{', '.join(known)}, ood_<name> and shift_<corruption>_<severity>")
    has_logits, has_probs = "logits" in arrays, "probs" in arrays
    if has_logits and has_probs:
        raise ValueError(f"{p}: holds both 'logits' and 'probs'; keep one")
    if not (has_logits or has_probs):
        raise ValueError(f"{p}: missing array 'logits' (or 'probs'); found {sorted(arrays)}")
    if "labels" not in arrays:
        raise ValueError(f"{p}: missing array 'labels'; found {sorted(arrays)}")
    from_probs = has_probs

    combine = "probs"
    if "combine" in arrays:
        c = arrays["combine"]
        if c.ndim != 0 or c.dtype.kind not in "US":
            raise ValueError(f"{p}: 'combine' must be a 0-d string array ('probs' or 'logits')")
        combine = str(c.item().decode() if isinstance(c.item(), bytes) else c.item())
        if combine not in COMBINE_RULES:
            raise ValueError(f"{p}: combine must be one of {COMBINE_RULES}; got {combine!r}")

    logits = as_logits("probs" if from_probs else "logits", from_probs)
    labels = arrays["labels"]

    val_logits = val_labels = None
    has_vl, has_vp = "val_logits" in arrays, "val_probs" in arrays
    if has_vl and has_vp:
        raise ValueError(f"{p}: holds both 'val_logits' and 'val_probs'; keep one")
    if has_vl or has_vp:
        if "val_labels" not in arrays:
            raise ValueError(f"{p}: has {'val_probs' if has_vp else 'val_logits'} but no 'val_labels'")
        val_logits = as_logits("val_probs" if has_vp else "val_logits", has_vp)
        val_labels = arrays["val_labels"]
    elif "val_labels" in arrays:
        raise ValueError(f"{p}: has 'val_labels' but no 'val_logits' (or 'val_probs')")

    ood = {}
    for key in sorted(arrays):
        if key.startswith("ood_"):
            name = key[len("ood_"):]
            if not name:
                raise ValueError(f"{p}: OOD array name 'ood_' has an empty set name")
            ood[name] = as_logits(key, from_probs)

    try:
        out = evaluate(logits, labels, val_logits=val_logits, val_labels=val_labels, ood=ood, combine=combine)
        shift = score_shift_arrays(arrays, temperature=out.get("temperature"), combine=combine,
                                   from_probs=from_probs, num_members=int(logits.shape[0]) if logits.dim() == 3 else 1,
                                   num_classes=int(logits.shape[-1]))
    except ValueError as exc:
        raise ValueError(_one_line(f"{p}: {exc}")) from None
    if shift is not None:
        out["shift"] = shift
    return out


# --------------------------------------------------------------------------------------------
# distribution shift (corrupted test sets; the images themselves are in ensemble_bench.shift)
# --------------------------------------------------------------------------------------------
SHIFT_KEYS = ("acc", "nll", "brier", "ece", "aurc", "acc_at_95", "ece_adaptive", "member_acc", "disagreement",
              "nll_ts", "ece_ts")


def shift_cell_metrics(logits, labels, *, temperature: float | None = None, combine: str = "probs") -> dict:
    """Metrics of one (corruption, severity) cell: ``evaluate``'s in-distribution keys (SHIFT_KEYS) with
    nll_ts / ece_ts at the given temperature (fitted elsewhere, on clean validation data), no OOD."""
    res = evaluate(logits, labels, combine=combine, temperature=temperature)
    return {k: res[k] for k in SHIFT_KEYS if k in res}


def _mean_dicts(dicts: list[dict]) -> dict:
    keys = [k for k in dicts[0] if all(k in d for d in dicts)]
    # fsum: exactly rounded, so a mean does not depend on the order of the cells
    return {k: math.fsum(d[k] for d in dicts) / len(dicts) for k in keys}


def shift_summary(cells: dict) -> dict:
    """Summaries of cell metrics {(corruption, severity): metrics}: per_corruption {corruption: {"<severity>":
    metrics}}, by_corruption (mean over its severities), by_severity {"<severity>": mean over corruptions}
    and mean (over all cells). Severities are JSON string keys in increasing order."""
    if not cells:
        raise ValueError("no shift cells to summarise")
    corruptions = list(dict.fromkeys(c for c, _ in cells))
    severities = sorted({int(s) for _, s in cells})
    per = {c: {str(s): cells[(c, s)] for s in severities if (c, s) in cells} for c in corruptions}
    return {
        "per_corruption": per,
        "by_corruption": {c: _mean_dicts(list(per[c].values())) for c in corruptions},
        "by_severity": {str(s): _mean_dicts([cells[(c, x)] for c, x in cells if x == s]) for s in severities},
        "mean": _mean_dicts(list(cells.values())),
    }


def score_shift_arrays(arrays: dict, *, temperature: float | None = None, combine: str = "probs",
                       from_probs: bool = False, num_members: int | None = None,
                       num_classes: int | None = None) -> dict | None:
    """The ``shift`` entry of a score file from its arrays (None when it has no ``shift_*`` arrays).

    ``shift_<corruption>_<severity>`` [M, K, C] member logits (probabilities with ``from_probs``) with
    labels ``shift_labels_<corruption>_<severity>`` [K] or the shared ``shift_labels`` [K]. M and C must
    match ``num_members`` / ``num_classes`` when given. Returns {severities, corruptions, combine,
    temperature} and shift_summary's per_corruption, by_corruption, by_severity, mean.
    """
    combine = _check_combine(combine)
    cells_in: dict[tuple[str, int], str] = {}
    label_keys: dict[tuple[str, int], str] = {}
    for key in sorted(arrays):
        if not key.startswith("shift_") or key == "shift_labels":
            continue
        is_label = key.startswith("shift_labels_")
        rest = key[len("shift_labels_"):] if is_label else key[len("shift_"):]
        name, _, sev = rest.rpartition("_")
        if not name or not sev.isdigit() or int(sev) < 1:
            raise ValueError(f"array '{key}': shift arrays must be named shift_<corruption>_<severity> "
                             "(or shift_labels_<corruption>_<severity>) with severity an integer >= 1")
        (label_keys if is_label else cells_in)[(name, int(sev))] = key
    if not cells_in:
        if label_keys or "shift_labels" in arrays:
            raise ValueError("has shift labels but no shift_<corruption>_<severity> arrays")
        return None
    orphans = sorted(set(label_keys) - set(cells_in))
    if orphans:
        raise ValueError(f"has '{label_keys[orphans[0]]}' but no 'shift_{orphans[0][0]}_{orphans[0][1]}'")
    shared = arrays.get("shift_labels")
    if shared is not None and all(cell in label_keys for cell in cells_in):
        raise ValueError("'shift_labels' is not used: every shift cell has its own "
                         "shift_labels_<corruption>_<severity>")
    cells = {}
    for cell, key in sorted(cells_in.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        a = np.asarray(arrays[key])
        if a.dtype.kind not in "biuf":
            raise ValueError(f"array '{key}' must be numeric; got dtype {a.dtype}")
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"array '{key}' contains NaN or inf")
        if a.ndim not in (2, 3):
            raise ValueError(f"array '{key}' must be [M, N, C]; got shape {a.shape}")
        z = logits_from_probs(a) if from_probs else torch.from_numpy(a)
        z = _check_logits(z, key)
        if ((num_members is not None and z.shape[0] != num_members)
                or (num_classes is not None and z.shape[2] != num_classes)):
            raise ValueError(f"array '{key}' must be [M={num_members}, K, C={num_classes}] like the test logits; "
                             f"got shape {_shape(z)}")
        lkey = label_keys.get(cell)
        if lkey is None:
            if shared is None:
                raise ValueError(f"array '{key}' has no labels: add 'shift_labels_{cell[0]}_{cell[1]}' or 'shift_labels'")
            lkey = "shift_labels"
        y = _check_labels(np.asarray(arrays[lkey]), z.shape[1], z.shape[2], lkey)
        cells[cell] = shift_cell_metrics(z, y, temperature=temperature, combine=combine)
    summary = shift_summary(cells)
    return {"severities": sorted({s for _, s in cells}), "corruptions": list(dict.fromkeys(c for c, _ in cells)),
            "combine": combine, "temperature": None if temperature is None else float(temperature), **summary}
