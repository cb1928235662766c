"""Predictions beside a record: the member logits of a run as ``<out>/<run_id>.preds.npz`` (atomic).

Written by the runner (:func:`save_predictions`), extended by ``evaluate`` (:func:`update_predictions`),
read by the report (:func:`load_predictions`). Logits are stored as float16 (clipped to +-65504),
labels as int64.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ensemble_bench.records import PREDS_SUFFIX, SCHEMA_VERSION, _atomic_file, _check_record, predictions_path

_FLOAT16_MAX = float(np.finfo(np.float16).max)



def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach()
        if hasattr(x, "float") and str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x)


def _to_f16(x: Any) -> np.ndarray:
    a = _as_numpy(x).astype(np.float32, copy=False)
    # float16 overflows at 65504; clip instead of storing inf (NaN stays NaN)
    return np.clip(a, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)


def _to_labels(x: Any) -> np.ndarray:
    a = _as_numpy(x)
    if a.dtype.kind not in "iub":
        raise ValueError(f"labels must be integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _check_pair(name: str, logits: np.ndarray, labels: np.ndarray | None) -> None:
    if logits.ndim < 2:
        raise ValueError(f"{name} must be [M, N, C] or [N, C], got shape {logits.shape}")
    if labels is not None and (labels.ndim != 1 or labels.shape[0] != logits.shape[-2]):
        raise ValueError(f"{name} has {logits.shape[-2]} samples (shape {logits.shape}) but labels have shape {labels.shape}")


def save_predictions(
    out_dir: str | os.PathLike,
    run_id: str,
    *,
    logits: Any,
    labels: Any,
    val_logits: Any = None,
    val_labels: Any = None,
    ood: dict | None = None,
    combine: str = "probs",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save member logits beside the record as ``<out_dir>/<run_id>.preds.npz`` (atomic).

    Keys: ``logits`` (float16, shape kept, normally [M, N, C]), ``labels`` (int64 [N]),
    ``val_logits``/``val_labels`` (only when given), ``ood_<name>`` (float16) per OOD set and
    ``combine`` (0-d string). Values beyond the float16 range are clipped to +-65504.
    ``extra``: more arrays under their own names (letters, digits and ``_``; not one of the keys above),
    e.g. the shift cells ``shift_<corruption>_<severity>`` [M, K, C] and ``shift_labels`` of
    ``ensemble_bench.shift.evaluate_shift(logits_out=...)``: floating-point arrays are stored as float16 like
    the logits, integer arrays (labels) as int64.
    """
    _check_record({"schema_version": SCHEMA_VERSION, "run_id": run_id, "status": "running"}, "save_predictions")
    from ensemble_bench.api import COMBINE_RULES   # here: api imports torch, which reading never needs

    if combine not in COMBINE_RULES:
        raise ValueError(f"combine must be 'probs' or 'logits', got {combine!r}")
    arrays: dict[str, np.ndarray] = {}
    arrays["logits"] = _to_f16(logits)
    arrays["labels"] = _to_labels(labels)
    _check_pair("logits", arrays["logits"], arrays["labels"])
    if (val_logits is None) != (val_labels is None):
        raise ValueError("val_logits and val_labels must be given together")
    if val_logits is not None:
        arrays["val_logits"] = _to_f16(val_logits)
        arrays["val_labels"] = _to_labels(val_labels)
        _check_pair("val_logits", arrays["val_logits"], arrays["val_labels"])
    for name, z in (ood or {}).items():
        if not isinstance(name, str) or not name or "/" in name or "\\" in name:
            raise ValueError(f"bad OOD set name {name!r}")
        arrays[f"ood_{name}"] = _to_f16(z)
        _check_pair(f"ood_{name}", arrays[f"ood_{name}"], None)
    arrays["combine"] = np.array(combine)
    arrays.update(_extra_arrays(extra, reserved=set(arrays)))
    return _write_npz(predictions_path(out_dir, run_id), arrays)


_ARRAY_NAME = re.compile(r"[A-Za-z0-9_]+")


def _extra_arrays(extra: Mapping[str, Any] | None, reserved: set) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, a in (extra or {}).items():
        if not isinstance(name, str) or not _ARRAY_NAME.fullmatch(name):
            raise ValueError(f"bad array name {name!r} (letters, digits and _ only)")
        if name in reserved:
            raise ValueError(f"array name {name!r} is taken by the standard keys")
        arr = _as_numpy(a)
        if arr.dtype.kind in "iub":
            out[name] = _to_labels(arr)
        elif arr.dtype.kind == "f":
            out[name] = _to_f16(arr)
        else:
            raise ValueError(f"array {name!r} must be numeric; got dtype {arr.dtype}")
    return out


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with _atomic_file(path) as f:
        f.write(buf.getbuffer())
    return path


def update_predictions(
    path: str | os.PathLike,
    arrays: Mapping[str, Any],
    *,
    drop_prefixes: Sequence[str] = (),
) -> Path:
    """Add or replace arrays in an existing predictions file (atomic; every other array is kept as it is).

    ``drop_prefixes``: arrays whose names start with one of them are removed first (e.g. ``("shift_",)``
    when a new shift evaluation replaces the old cells). New arrays are converted as ``save_predictions``'s
    ``extra`` (float -> float16, integers -> int64); ``ood_<name>`` arrays may be given here too.
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        kept = {k: z[k] for k in z.files if not any(k.startswith(p) for p in drop_prefixes)}
    if not {"logits", "labels"} <= set(kept):
        raise ValueError(f"{path}: not a predictions file (keys {sorted(kept)})")
    reserved = {"logits", "labels", "val_logits", "val_labels", "combine"}
    kept.update(_extra_arrays(arrays, reserved=reserved))
    return _write_npz(path, kept)


def load_predictions(
    path_or_record_dir: str | os.PathLike,
    run_id: str | None = None,
    *,
    dtype: Any = np.float32,
) -> dict:
    """Load predictions saved by :func:`save_predictions`.

    ``load_predictions(out_dir, run_id)``, ``load_predictions(".../<id>.preds.npz")`` or
    ``load_predictions(".../<id>.json")`` (the record; its sibling npz is read). Returns
    ``{"logits", "labels", "val_logits" (or None), "val_labels" (or None), "ood": {name: logits},
    "shift": {"shift_<corruption>_<severity>": logits, "shift_labels...": labels} (empty without shift
    cells), "combine": str, "path"}``. Logits are cast to ``dtype`` (float32 by default; ``dtype=None``
    keeps the stored float16).
    """
    p = Path(path_or_record_dir)
    if run_id is not None:
        p = predictions_path(p, run_id)
    elif p.name.endswith(".json") and not p.name.endswith(PREDS_SUFFIX):
        p = p.with_name(p.name[: -len(".json")] + PREDS_SUFFIX)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no predictions file")

    def cast(a: np.ndarray) -> np.ndarray:
        return a if dtype is None else a.astype(dtype)

    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(getattr(z, "files", ()))
            if not {"logits", "labels"} <= keys:
                raise _NotPredictions(f"{p}: not a predictions file (" + (f"keys {sorted(keys)})" if keys else
                                      "a single array, not an .npz archive)"))
            return {
                "logits": cast(z["logits"]),
                "labels": z["labels"],
                "val_logits": cast(z["val_logits"]) if "val_logits" in keys else None,
                "val_labels": z["val_labels"] if "val_labels" in keys else None,
                "ood": {k[len("ood_"):]: cast(z[k]) for k in sorted(keys) if k.startswith("ood_")},
                # shift cells shift_<corruption>_<severity> (cast) and their labels shift_labels* (kept)
                "shift": {k: (z[k] if k.startswith("shift_labels") else cast(z[k]))
                          for k in sorted(keys) if k.startswith("shift_")},
                "combine": str(z["combine"]) if "combine" in keys else "probs",
                "path": p,
            }
    except _NotPredictions:
        raise
    except Exception as e:   # truncated (BadZipFile), random bytes or a pickle (ValueError, whose advice to allow
        # pickles is never repeated), a corrupt member (zlib), an OS error: one line, the file is not readable
        why = e.strerror if isinstance(e, OSError) and e.strerror else "not a valid .npz archive"
        raise ValueError(f"{p}: not a readable predictions file ({why})") from None


class _NotPredictions(ValueError):
    """A readable .npz that is not a predictions file (its own message, kept as is)."""

