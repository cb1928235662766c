"""Result records: one versioned JSON file per run, predictions beside it, leaderboards from many.

A run writes ``<out>/<run_id>.json`` (see :data:`SCHEMA_VERSION` and the layout below) and,
optionally, ``<out>/<run_id>.preds.npz`` with the member logits. Many Slurm jobs write into the
same folder at once, so every file is written atomically: the bytes go to a hidden temporary file in
the same directory, which is flushed, fsync'ed and then renamed over the final name with
``os.replace``. A reader therefore sees either the previous complete file or the new complete file,
never a partial one; two writers of the same run id leave one of the two complete versions.

Record layout (a plain dict)::

    {"schema_version": 1, "run_id": str, "status": "complete" | "failed" | "running",
     "config":   {method, backbone, dataset, epochs, seed, batch_size, lr, ..., "options": {...}},
     "method":   {"name", "options" (resolved, with defaults), "combine", "num_members", "info"},
     "metrics":  {acc, nll, brier, ece, member_acc, disagreement, nll_ts, ece_ts, temperature,
                  "ood": {<set>: {<score>: {auroc, aupr_in, aupr_out, fpr95}}}},
     "cost":     {params, params_nonzero, flops, macs, flops_dense, latency_ms, latency_device,
                  throughput, throughput_device, peak_mem_mb, device},
     "training": {train_s, epochs_run: {stage: n}, samples_seen, train_flops, device},
     "env":      environment_info(),
     "timings":  {started, finished, wall_s},
     "error":    None | str}

JSON written here is strict: NaN and +-inf become ``null`` (read back as missing -> NaN in the
leaderboard), numpy scalars/arrays and paths are converted to plain JSON values.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ensemble_bench import recipe as _recipe

SCHEMA_VERSION = 1
STATUSES = ("complete", "failed", "running")
PREDS_SUFFIX = ".preds.npz"
_TMP_SUFFIX = ".tmp"
_FLOAT16_MAX = float(np.finfo(np.float16).max)

__all__ = [
    "SCHEMA_VERSION",
    "STATUSES",
    "RecordError",
    "write_json_atomic",
    "write_text_atomic",
    "write_record",
    "read_record",
    "load_records",
    "record_status",
    "record_path",
    "predictions_path",
    "save_predictions",
    "update_predictions",
    "load_predictions",
    "environment_info",
    "flatten_record",
    "leaderboard",
    "write_leaderboard",
    "format_markdown",
    "METRIC_COLUMNS",
    "COST_COLUMNS",
    "GROUP_KEYS",
]


class RecordError(ValueError):
    """A file is not a readable result record (or a results directory is missing)."""


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------


def _file_mode() -> int:
    """Permissions for new files: 0o666 minus the process umask (mkstemp would give 0o600)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort; not every platform/filesystem supports it)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[io.BufferedWriter]:
    """Yield a binary file object; on clean exit its content replaces ``path`` atomically.

    The temporary file is ``.<name>.<random>.tmp`` in the destination directory (same
    filesystem, so ``os.replace`` is atomic). On any exception it is removed and ``path`` is left
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            with contextlib.suppress(OSError, AttributeError):
                os.fchmod(f.fileno(), _file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    _remove_stale_temps(path)


STALE_TEMP_S = 600.0   # a temporary file of a write that old was left by a killed writer


def _remove_stale_temps(path: Path) -> None:
    """Remove temporary files of ``path`` that a killed writer left behind (older than STALE_TEMP_S; a
    concurrent writer's own temporary file is seconds old and is left alone)."""
    import time

    now = time.time()
    for old in path.parent.glob(f".{glob_escape(path.name)}.*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > STALE_TEMP_S:
                old.unlink()


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def _jsonable(obj: Any, where: str = "$") -> Any:
    """Convert ``obj`` to plain JSON types; non-finite floats -> None. Raises TypeError."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return _jsonable(obj.item(), where)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if isinstance(k, np.generic):
                k = k.item()
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"{where}: dict key {k!r} of type {type(k).__name__} is not JSON")
            out[k if isinstance(k, str) else json.dumps(k)] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    # torch tensors and similar array-likes, without importing torch here
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):
        return _jsonable(obj.detach().cpu().tolist(), where)
    raise TypeError(f"{where}: object of type {type(obj).__name__} is not JSON serializable")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    data = text.encode("utf-8")
    with _atomic_file(path) as f:
        f.write(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Serialise ``obj`` to strict JSON and write it to ``path`` atomically.

    Serialisation happens before any file is created, so an object JSON cannot encode raises
    ``TypeError`` and leaves an existing ``path`` (and the directory) untouched.
    """
    text = json.dumps(_jsonable(obj), indent=1, sort_keys=False, allow_nan=False, ensure_ascii=False)
    return write_text_atomic(path, text + "\n")


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------

_BAD_RUN_ID = re.compile(r"[/\\\x00]")


def _check_record(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: not a result record (top level is {type(rec).__name__}, not an object)")
    missing = [k for k in ("schema_version", "run_id", "status") if k not in rec]
    if missing:
        raise RecordError(f"{where}: not a result record (missing {', '.join(missing)})")
    version = rec["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RecordError(f"{where}: bad schema_version {version!r}")
    if version > SCHEMA_VERSION:
        raise RecordError(
            f"{where}: schema_version {version} is newer than this code understands ({SCHEMA_VERSION}); update ensemble-bench"
        )
    run_id = rec["run_id"]
    if not isinstance(run_id, str) or not run_id or run_id.startswith(".") or _BAD_RUN_ID.search(run_id):
        raise RecordError(f"{where}: bad run_id {run_id!r} (must be a non-empty file name without / or leading .)")
    if rec["status"] not in STATUSES:
        raise RecordError(f"{where}: bad status {rec['status']!r} (expected one of {', '.join(STATUSES)})")
    return rec


def _check_complete(rec: dict, where: str) -> None:
    """A record that counts (leaderboard, report) as complete has its config and metrics."""
    metrics = rec.get("metrics")
    if not isinstance(metrics, dict) or not all(isinstance(metrics.get(k), (int, float)) for k in ("acc", "nll")):
        raise RecordError(f"{where}: marked complete but has no metrics (acc, nll): not a finished result")
    if not isinstance(rec.get("config"), dict):
        raise RecordError(f"{where}: marked complete but has no config")


def record_path(out_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(out_dir) / f"{run_id}.json"


def predictions_path(out_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(out_dir) / f"{run_id}{PREDS_SUFFIX}"


def write_record(out_dir: str | os.PathLike, record: dict) -> Path:
    """Validate ``record`` and write it atomically to ``<out_dir>/<run_id>.json``; returns the path."""
    _check_record(record, "record")
    return write_json_atomic(record_path(out_dir, record["run_id"]), record)


def read_record(path: str | os.PathLike) -> dict:
    """Read and validate one record. Raises :class:`RecordError` (one-line message) if it is not one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RecordError(f"{path}: cannot read ({e.strerror or e})") from None
    if not text.strip():
        raise RecordError(f"{path}: empty file")
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise RecordError(f"{path}: invalid JSON (nested too deeply)") from None
    return _check_record(rec, str(path))


def _record_files(runs_dir: Path, recursive: bool) -> list[Path]:
    pattern = "**/*.json" if recursive else "*.json"
    files = []
    for p in runs_dir.glob(pattern):
        rel = p.relative_to(runs_dir).parts
        if any(part.startswith(".") for part in rel):  # temp files, hidden folders (e.g. .ckpt)
            continue
        if p.name.endswith(PREDS_SUFFIX) or p.name.endswith(_TMP_SUFFIX) or not p.is_file():
            continue
        files.append(p)
    return sorted(files)


def load_records(
    runs_dir: str | os.PathLike,
    *,
    statuses: tuple[str, ...] | None = ("complete",),
    recursive: bool = False,
) -> tuple[list[dict], list[str]]:
    """Load every record in ``runs_dir`` whose status is in ``statuses`` (None: all statuses).

    Returns ``(records, problems)``: ``problems`` has one line per file that is not a readable
    record (corrupt, truncated, not a record, duplicate run id). Predictions (``*.preds.npz``)
    and temporary files are skipped. Records are in file-name order. A missing ``runs_dir``
    raises :class:`RecordError`.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise RecordError(f"{runs_dir}: results directory does not exist")
    records: list[dict] = []
    problems: list[str] = []
    seen: dict[str, Path] = {}
    for p in _record_files(runs_dir, recursive):
        try:
            rec = read_record(p)
            if rec["status"] == "complete":
                _check_complete(rec, str(p))
        except RecordError as e:
            problems.append(str(e))
            continue
        rid = rec["run_id"]
        if rid in seen:
            problems.append(f"{p}: duplicate run_id {rid!r} (also in {seen[rid]}); skipped")
            continue
        seen[rid] = p
        if statuses is None or rec["status"] in statuses:
            records.append(rec)
    return records, problems


def record_status(runs_dir: str | os.PathLike, run_id: str) -> str | None:
    """Status of the record ``<runs_dir>/<run_id>.json``; None if it is absent or unreadable."""
    p = record_path(runs_dir, run_id)
    if not p.is_file():
        return None
    try:
        return read_record(p)["status"]
    except RecordError:
        return None


# --------------------------------------------------------------------------------------------
# predictions
# --------------------------------------------------------------------------------------------


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
    if combine not in ("probs", "logits"):
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

    with np.load(p, allow_pickle=False) as z:
        keys = set(z.files)
        if not {"logits", "labels"} <= keys:
            raise ValueError(f"{p}: not a predictions file (keys {sorted(keys)})")
        out = {
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
    return out


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------


def _pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(name)
        except PackageNotFoundError:
            return None
    except Exception:  # noqa: BLE001 - never fail
        return None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        r = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            r = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            if r.returncode == 0 and r.stdout.strip():
                return r.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or None


def environment_info() -> dict:
    """Versions, host, git commit and devices of this process. Never raises."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "numpy": np.__version__,
        "pandas": _pkg_version("pandas"),
        "torch": _pkg_version("torch"),
        "torchvision": _pkg_version("torchvision"),
        "timm": _pkg_version("timm"),
        "ensemble_bench": None,
        "git_commit": None,
        "git_dirty": None,
        "cpu": None,
        "cpu_count": os.cpu_count(),
        "cuda": None,
        "cudnn": None,
        "cuda_device": None,
        "cuda_device_count": 0,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    try:
        from ensemble_bench import __version__

        info["ensemble_bench"] = __version__
    except Exception:  # noqa: BLE001
        pass
    try:
        info["cpu"] = _cpu_model()
    except Exception:  # noqa: BLE001
        pass
    try:
        here = Path(__file__).resolve().parent
        head = _git(["rev-parse", "--verify", "-q", "HEAD"], here)
        info["git_commit"] = head.strip() or None if head is not None else None
        status = _git(["status", "--porcelain", "--untracked-files=no"], here)
        if status is not None:
            info["git_dirty"] = bool(status.strip())
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.backends.cudnn.is_available():
            info["cudnn"] = torch.backends.cudnn.version()
        if torch.cuda.is_available():
            info["cuda_device_count"] = torch.cuda.device_count()
            info["cuda_device"] = torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception:  # noqa: BLE001
        pass
    return info


# --------------------------------------------------------------------------------------------
# flat rows and leaderboards
# --------------------------------------------------------------------------------------------

METRIC_COLUMNS = ("acc", "nll", "ece", "brier", "nll_ts", "ece_ts", "temperature", "member_acc", "disagreement",
                  "aurc", "acc_at_95", "ece_adaptive")
# distribution shift (metrics.shift of a run with --shift, see ensemble_bench.shift.evaluate_shift): the mean over
# every corruption x severity cell, and the accuracy per severity (mean over corruptions)
SHIFT_MEAN_COLUMNS = ("acc", "nll", "ece")       # -> shift_acc, shift_nll, shift_ece
SHIFT_SEVERITY_COLUMNS = tuple(f"shift_acc_s{s}" for s in range(1, 6))
# mCE (Hendrycks & Dietterich 2019) of a row is relative to the single model (a size-reference record with
# one member) of the same data and training recipe: these keys
MCE_KEYS = ("dataset", "data_id", "backbone", "epochs", "batch_size", "lr", "recipe")
COST_COLUMNS = (
    "params", "params_nonzero", "flops", "macs", "flops_dense",
    "latency_ms", "throughput", "peak_mem_mb", "train_s", "train_flops",
)
DEVICE_COLUMNS = ("latency_device", "throughput_device", "train_device")
MSP_OOD_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95")
# rows of the leaderboard are one group of these keys; everything else numeric is mean/std over seeds
GROUP_KEYS = (
    "dataset", "data_id", "backbone", "method", "config_key", "epochs", "batch_size", "lr", "recipe",
    "combine", "num_members", "size_reference", *DEVICE_COLUMNS,
)
_STR_KEYS = ("dataset", "data_id", "backbone", "method", "config_key", "recipe", "combine", *DEVICE_COLUMNS)
# per-record columns that are not averaged over seeds (the row says how its seeds agree instead)
_ROW_FLAGS = ("converged", "code_id", "stage_recipes", "latency_busy")
_NOT_AGGREGATED = set(GROUP_KEYS) | {"seed", "run_id", "status", "_shift_errors", *_ROW_FLAGS}
# the recipe columns kept as numbers (group keys, DEE keys, the report's recipe of a config)
NUMERIC_RECIPE_KEYS = ("epochs", "batch_size", "lr")
# the rest of the effective training recipe (ensemble_bench.recipe.Recipe, as trained) and the run settings that
# change numbers: runs that differ in any of them are different experiments, never seeds of one row; the
# leaderboard keeps them as the "recipe" column (canonical JSON) and shows only the fields that differ
RECIPE_FIELDS = tuple(f for f in _recipe.RECIPE_FIELDS if f not in NUMERIC_RECIPE_KEYS) + (
    "val_fraction", "bf16", "channels_last")

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
CONVERGENCE_WINDOW = 0.10
CONVERGENCE_MIN_EPOCHS = 4
CONVERGENCE_TOL = 0.01
CONVERGENCE_NOISE = 1.0
# A latency whose spread inside its own measurement, (p90 - p10) / median, exceeds this was measured on a
# busy machine: the leaderboard marks it instead of presenting the median as a measurement.
LATENCY_BUSY_SPREAD = 0.5


def recipe_differences(recipes: Sequence[Any]) -> list[str]:
    """For recipe strings (the "recipe" column), the text of the fields that differ between them, one entry
    each ("weight_decay=0.0001, schedule=multistep"); "" for all when they are the same."""
    parsed = []
    for r in recipes:
        try:
            d = json.loads(r) if isinstance(r, str) else {}
        except json.JSONDecodeError:
            d = {}
        parsed.append(d if isinstance(d, dict) else {})
    keys = [k for k in RECIPE_FIELDS if len({json.dumps(d.get(k), sort_keys=True) for d in parsed}) > 1]
    return [", ".join(f"{k}={d.get(k)}" for k in keys) for d in parsed]


def _num(x: Any) -> float:
    if isinstance(x, bool) or x is None:
        return math.nan
    if isinstance(x, (int, float, np.integer, np.floating)):
        return float(x)
    return math.nan


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _canonical(obj: Any) -> str:
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def stage_converged(stage: Mapping) -> bool | None:
    """The convergence rule on one stage's learning curve (None: no validation curve to judge)."""
    curve = [e for e in (stage.get("curve") or []) if isinstance(e, dict)]
    key = "val_nll" if any("val_nll" in e for e in curve) else "val"
    vals = [float(e[key]) for e in curve if isinstance(e.get(key), (int, float))]
    if len(vals) < 2 or not all(math.isfinite(v) for v in vals):
        return None
    n = len(vals)
    fit = np.asarray(vals[-min(n, max(CONVERGENCE_MIN_EPOCHS, math.ceil(CONVERGENCE_WINDOW * n))):],
                     dtype=np.float64)
    level = float(np.abs(fit).mean())
    if len(fit) < 3 or level == 0:
        return bool(fit[-1] >= fit[0] - CONVERGENCE_TOL * level)
    t = np.arange(len(fit), dtype=np.float64)
    slope, intercept = np.polyfit(t, fit, 1)
    resid = fit - (intercept + slope * t)
    stderr = math.sqrt(float(resid @ resid) / (len(fit) - 2) / float(((t - t.mean()) ** 2).sum()))
    falling = -slope * (len(fit) - 1) / level > CONVERGENCE_TOL and -slope > CONVERGENCE_NOISE * stderr
    return not falling


def record_converged(rec: Mapping) -> bool | None:
    """All stages of the run that are meant to converge have (None: the record has no curves)."""
    stages = _dict(_dict(rec.get("training")).get("stages"))
    verdicts = [stage_converged(s) for s in stages.values() if isinstance(s, dict) and s.get("converges", True)]
    verdicts = [v for v in verdicts if v is not None]
    return all(verdicts) if verdicts else None


def _stage_recipes_text(training: Mapping) -> str:
    """The stage recipes that differ from the run's effective recipe: "explore: schedule=constant; ..."."""
    def show(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, list):
            return "[" + ",".join(show(x) for x in v) + "]"
        return str(v)

    by_text: dict[str, list[str]] = {}
    for name, st in _dict(training.get("stages")).items():
        ch = _dict(_dict(st).get("recipe_changes"))
        if ch:
            by_text.setdefault(", ".join(f"{k}={show(v)}" for k, v in sorted(ch.items())), []).append(str(name))
    return "; ".join(f"{'+'.join(names)}: {text}" for text, names in by_text.items())


WEIGHTS_SUFFIX = ".weights.safetensors"


def save_weights(out_dir: str | os.PathLike, run_id: str, model: Any) -> Path:
    """The trained ensemble's state dict as ``<out>/<run_id>.weights.safetensors`` (atomic; tensors only,
    so loading it can never run code). ``method.build`` rebuilds the architecture it loads into."""
    from safetensors.torch import save_file

    path = Path(out_dir) / f"{run_id}{WEIGHTS_SUFFIX}"
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    save_file(state, str(tmp), metadata={"run_id": run_id})
    os.replace(tmp, path)
    return path


def write_curves(out_dir: str | os.PathLike, run_id: str, stages: Mapping) -> Path:
    """The learning curves of a run as ``<out>/<run_id>.curves.csv``: one line per stage and epoch (lr,
    train loss, validation metrics, epoch time); also to TensorBoard when it is installed."""
    cols = ["stage", "epoch", "lr", "loss", "val_acc", "val_nll", "val", "epoch_s", "val_s"]
    lines = [",".join(cols)]
    for name, st in stages.items():
        for e in _dict(st).get("curve") or []:
            lines.append(",".join([str(name)] + ["" if e.get(c) is None else repr(e.get(c)) for c in cols[1:]]))
    path = Path(out_dir) / f"{run_id}.curves.csv"
    write_text_atomic(path, "\n".join(lines) + "\n")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:     # tensorboard is an optional extra
        return path
    with SummaryWriter(str(Path(out_dir) / "tensorboard" / run_id)) as w:
        for name, st in stages.items():
            for e in _dict(st).get("curve") or []:
                for c in cols[2:]:
                    if isinstance(e.get(c), (int, float)):
                        w.add_scalar(f"{name}/{c}", e[c], e["epoch"])
    return path


def flatten_record(rec: dict) -> dict:
    """One flat row of a record: identity columns, metrics, msp OOD metrics per set, cost, devices.

    Values that are absent from the record become NaN (numbers) or None (strings).
    """
    cfg = _dict(rec.get("config"))
    meth = _dict(rec.get("method"))
    metrics = _dict(rec.get("metrics"))
    cost = _dict(rec.get("cost"))
    training = _dict(rec.get("training"))
    options = meth.get("options") if isinstance(meth.get("options"), dict) else _dict(cfg.get("options"))
    # the effective recipe as trained (records before it existed: the run's settings)
    eff = {**cfg, **_dict(cfg.get("effective_recipe"))}
    code = _dict(rec.get("code"))
    p10, p90, med = _num(cost.get("latency_ms_p10")), _num(cost.get("latency_ms_p90")), _num(cost.get("latency_ms"))
    spread = (p90 - p10) / med if med > 0 else math.nan
    conv = record_converged(rec)

    row: dict[str, Any] = {
        "dataset": cfg.get("dataset", rec.get("dataset")),
        "data_id": _dict(cfg.get("data_id")).get("sha256"),
        "backbone": cfg.get("backbone", rec.get("backbone")),
        "method": meth.get("name") or cfg.get("method"),
        "config_key": _canonical(options),
        "epochs": eff.get("epochs"),
        "batch_size": eff.get("batch_size"),
        "lr": eff.get("lr"),
        "recipe": _canonical({k: eff[k] for k in RECIPE_FIELDS if k in eff}),
        "stage_recipes": _stage_recipes_text(training),
        "converged": None if conv is None else bool(conv),
        "code_id": f"{code.get('harness_sha256')}/{code.get('method_sha256')}" if code else None,
        "latency_spread": spread,
        "latency_busy": bool(spread > LATENCY_BUSY_SPREAD) if spread == spread else None,
        "seed": cfg.get("seed"),
        "run_id": rec.get("run_id"),
        "status": rec.get("status"),
        "combine": meth.get("combine"),
        "num_members": _num(meth.get("num_members")),
        # the method declares its members independent full copies of the backbone (api.Method.size_reference):
        # its records at sizes 1..M form the deep-ensemble size curve of DEE
        "size_reference": bool(meth.get("size_reference", False)),
    }
    for k in METRIC_COLUMNS:
        row[k] = _num(metrics.get(k))
    for set_name, by_score in sorted(_dict(metrics.get("ood")).items()):
        by_score = _dict(by_score)
        msp = _dict(by_score.get("msp"))
        for m in MSP_OOD_METRICS:
            row[f"{m}_{set_name}"] = _num(msp.get(m))
        for score, vals in sorted(by_score.items()):
            if score != "msp":
                row[f"auroc_{set_name}_{score}"] = _num(_dict(vals).get("auroc"))
    row.update(_shift_columns(metrics.get("shift"), _dict(_dict(rec.get("data")).get("shift"))))
    for k in COST_COLUMNS:
        src = training if k in ("train_s", "train_flops") else cost
        row[k] = _num(src.get(k))
    row["latency_device"] = cost.get("latency_device") or cost.get("device")
    row["throughput_device"] = cost.get("throughput_device") or cost.get("latency_device") or cost.get("device")
    row["train_device"] = training.get("device")
    return row


def _shift_columns(shift: Any, described: dict) -> dict:
    """The shift columns of a record with metrics.shift (none without): shift_acc / shift_nll / shift_ece
    (mean over all cells), shift_acc_s1..s5 (mean over corruptions at each severity; NaN for a severity the
    set lacks) and ``_shift_errors``, the per-cell errors (1 - acc) with the set's identity as JSON text,
    from which the leaderboard computes mCE (not aggregated itself)."""
    if not isinstance(shift, dict):
        return {}
    mean, by_sev = _dict(shift.get("mean")), _dict(shift.get("by_severity"))
    out: dict[str, Any] = {f"shift_{k}": _num(mean.get(k)) for k in SHIFT_MEAN_COLUMNS}
    for col in SHIFT_SEVERITY_COLUMNS:
        out[col] = _num(_dict(by_sev.get(col[len("shift_acc_s"):])).get("acc"))
    errors = {c: {str(sev): 1.0 - _num(_dict(m).get("acc")) for sev, m in _dict(cells).items()}
              for c, cells in _dict(shift.get("per_corruption")).items()}
    ident = [shift.get("set"), shift.get("n_per_severity"), described.get("generator")]
    out["_shift_errors"] = json.dumps({"set": ident, "errors": errors}, sort_keys=True)
    return out


def _mean_errors(texts: Sequence[Any]) -> tuple[str, dict] | None:
    """(set identity, {corruption: {severity: mean error}}) over records' ``_shift_errors``; None when one
    lacks them, they come from different sets or cover different cells."""
    parsed = []
    for t in texts:
        if not isinstance(t, str):
            return None
        parsed.append(json.loads(t))
    if not parsed:
        return None
    ident = json.dumps(parsed[0]["set"])
    cells = {(c, sev) for c, by in parsed[0]["errors"].items() for sev in by}
    for p in parsed[1:]:
        if json.dumps(p["set"]) != ident or {(c, sev) for c, by in p["errors"].items() for sev in by} != cells:
            return None
    mean: dict[str, dict[str, float]] = {}
    for c, sev in cells:
        mean.setdefault(c, {})[sev] = math.fsum(_num(p["errors"][c][sev]) for p in parsed) / len(parsed)
    return ident, mean


def corruption_error(errors: Mapping[str, Mapping[str, float]], reference: Mapping[str, Mapping[str, float]]) -> float:
    """mCE in percent (Hendrycks & Dietterich, ICLR 2019): for each corruption c, CE_c = sum over severities
    of the error / the same sum for the reference (the single model); mCE = 100 x mean over corruptions.
    Every (corruption, severity) of ``errors`` must be in ``reference`` (else NaN); NaN when a reference sum
    is 0 or an error is missing."""
    ces = []
    for c, by_sev in errors.items():
        ref = reference.get(c)
        if not by_sev or ref is None or any(s not in ref for s in by_sev):
            return math.nan
        den = math.fsum(_num(ref[s]) for s in by_sev)
        num = math.fsum(_num(v) for v in by_sev.values())
        if not den > 0 or math.isnan(num):
            return math.nan
        ces.append(num / den)
    return 100.0 * math.fsum(ces) / len(ces) if ces else math.nan


def mce_values(groups: Sequence[Sequence[Mapping]], rows: Sequence[Mapping]) -> list[float]:
    """mCE (percent, ``corruption_error``) of each group of flat rows (the seeds of one leaderboard row or
    report config), from their seed-mean errors, against the single model among ``rows``: every size-reference
    row with one member of the same MCE_KEYS whose errors come from the same shift set (all its seeds
    pooled). NaN for a group without shift errors in every seed, or without such a reference."""
    def key(r: Mapping) -> tuple:
        return tuple(_num(r.get(k)) if k in NUMERIC_RECIPE_KEYS else str(r.get(k)) for k in MCE_KEYS)

    refs: dict[tuple, dict[str, list]] = {}
    for r in rows:
        t = r.get("_shift_errors")
        if bool(r.get("size_reference")) and _num(r.get("num_members")) == 1 and isinstance(t, str):
            refs.setdefault(key(r), {}).setdefault(json.dumps(json.loads(t)["set"]), []).append(t)
    out = []
    for g in groups:
        errs = _mean_errors([r.get("_shift_errors") for r in g]) if g else None
        ref = None
        if errs is not None:
            texts = refs.get(key(g[0]), {}).get(errs[0])
            ref = _mean_errors(texts) if texts else None
        out.append(math.nan if ref is None else corruption_error(errs[1], ref[1]))
    return out


def _is_aggregated(col: str, series: Any) -> bool:
    import pandas as pd

    return col not in _NOT_AGGREGATED and pd.api.types.is_numeric_dtype(series)


def leaderboard(records: list[dict]):
    """Aggregate records into one row per configuration; mean and std over seeds.

    Rows are groups of :data:`GROUP_KEYS` (dataset, backbone, method, config_key, epochs,
    batch_size, lr, combine, num_members and the three device columns, so that timings from
    different devices are never averaged). For every numeric column ``x``: ``x_mean`` and
    ``x_std`` (sample std, ddof=1; NaN with one seed). A value missing in any seed of a group
    makes that group's mean/std NaN (no silent averaging over fewer seeds than ``n_seeds``).
    Also ``n_seeds`` (runs in the group), ``seeds`` (sorted list as a string) and ``run_ids``.
    Records whose status is not "complete" are left out with a warning. Sorted by dataset,
    backbone, then ``acc_mean`` descending.
    """
    import pandas as pd

    complete = [r for r in records if r.get("status", "complete") == "complete"]
    if len(complete) != len(records):
        warnings.warn(f"leaderboard: left out {len(records) - len(complete)} record(s) whose status is not 'complete'", stacklevel=2)
    flat = pd.DataFrame([flatten_record(r) for r in complete])
    base_cols = [*GROUP_KEYS, "n_seeds", "seeds"]
    if flat.empty:
        cols = base_cols + [f"{c}_{s}" for c in (*METRIC_COLUMNS, *COST_COLUMNS) for s in ("mean", "std")] + ["run_ids"]
        return pd.DataFrame(columns=cols)

    for k in _STR_KEYS:  # groupby must not drop or split on missing strings
        flat[k] = flat[k].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)).astype(object)
    for k in NUMERIC_RECIPE_KEYS:
        flat[k] = pd.to_numeric(flat[k], errors="coerce")
    has_shift = "_shift_errors" in flat.columns
    if has_shift:
        flat["_shift_errors"] = flat["_shift_errors"].astype(object)
    value_cols = [c for c in flat.columns if _is_aggregated(c, flat[c])]

    rows, groups = [], []
    for key, g in flat.groupby(list(GROUP_KEYS), dropna=False, sort=False):
        row = dict(zip(GROUP_KEYS, key))
        seeds = sorted(int(s) for s in g["seed"] if _num(s) == _num(s))
        if len(set(seeds)) != len(seeds):
            warnings.warn(f"leaderboard: duplicate seeds {seeds} for {row['method']} {row['config_key']}", stacklevel=2)
        row["n_seeds"] = len(g)
        row["seeds"] = str(seeds)
        verdicts = list(g["converged"])
        row["converged"] = (None if any(v is None or v != v for v in verdicts) else bool(all(verdicts)))
        row["code_versions"] = len({c for c in g["code_id"] if c is not None})
        row["stage_recipes"] = next((s for s in g["stage_recipes"] if s), "")
        row["latency_busy"] = any(bool(v) for v in g["latency_busy"] if v is not None and v == v)
        for c in value_cols:
            v = g[c].astype(float)
            row[f"{c}_mean"] = v.mean(skipna=False)
            row[f"{c}_std"] = v.std(ddof=1, skipna=False) if len(v) > 1 else math.nan
        row["run_ids"] = ",".join(sorted(str(r) for r in g["run_id"]))
        rows.append(row)
        groups.append(g.to_dict("records") if has_shift else [])
    df = pd.DataFrame(rows)
    if has_shift:   # mCE relative to the single model of the same data and recipe (never in the run)
        df["mce"] = mce_values(groups, flat.to_dict("records"))
    for k in ("epochs", "batch_size", "num_members"):
        if df[k].notna().all():
            df[k] = df[k].astype("int64")
    df = df.sort_values(
        ["dataset", "backbone", "acc_mean", "method", "config_key"],
        ascending=[True, True, False, True, True],
        na_position="last",
        kind="mergesort",
    ).reset_index(drop=True)
    # optional: deep-ensemble-equivalent sizes when the records hold a DE curve (add_dee_columns)
    df = add_dee_columns(df)
    return df


def write_leaderboard(df, csv_path: str | os.PathLike | None = None, md_path: str | os.PathLike | None = None) -> None:
    """Write the leaderboard as CSV (every column) and/or markdown (:func:`format_markdown`), atomically."""
    if csv_path is not None:
        write_text_atomic(csv_path, df.to_csv(index=False))
    if md_path is not None:
        write_text_atomic(md_path, format_markdown(df))


def _fmt(mean: Any, std: Any, scale: float = 1.0, digits: int = 2) -> str:
    m = _num(mean)
    if math.isnan(m):
        return "–"
    s = _num(std)
    text = f"{m * scale:.{digits}f}"
    if not math.isnan(s) and s != 0:
        text += f" ± {s * scale:.{digits}f}"
    return text


def _options_text(config_key: Any) -> str:
    try:
        opts = json.loads(config_key) if isinstance(config_key, str) and config_key else {}
    except json.JSONDecodeError:
        return str(config_key)
    if not isinstance(opts, dict) or not opts:
        return "–" if not opts else str(opts)
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in opts.items())


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _device_name(d: Any) -> str:
    return d if isinstance(d, str) and d else "?"


def format_markdown(df) -> str:
    """Compact human tables of a leaderboard, one per (dataset, backbone).

    Columns: method, options, n (seeds), acc (%), nll, ece (%), brier, AUROC (%) per OOD set (msp
    score), params (M), GFLOPs, latency ms, train s, as ``mean ± std`` (just the mean when there
    is one seed or no spread). The latency / training device is named in the column header when it
    is the same for every row of a table, otherwise in a devices column. Columns for epochs,
    batch size, lr, the rest of the recipe and members' combine rule appear only when they differ between
    rows of a table.
    """
    if df is None or len(df) == 0:
        return "_no results_\n"
    ood_sets = sorted(c[len("fpr95_"): -len("_mean")] for c in df.columns if c.startswith("fpr95_") and c.endswith("_mean"))
    any_shift = "shift_acc_mean" in df.columns and df["shift_acc_mean"].map(lambda v: math.isfinite(_num(v))).any()
    parts: list[str] = []
    for (dataset, backbone), t in df.groupby(["dataset", "backbone"], sort=False, dropna=False):
        lat_devs = sorted({_device_name(d) for d in t["latency_device"]})
        train_devs = sorted({_device_name(d) for d in t["train_device"]})
        lat_hdr = "latency ms" + (f" ({lat_devs[0]})" if len(lat_devs) == 1 else "")
        train_hdr = "train s" + (f" ({train_devs[0]})" if len(train_devs) == 1 else "")
        varying = [k for k in NUMERIC_RECIPE_KEYS if t[k].astype(str).nunique() > 1]
        recipe_text = recipe_differences(list(t["recipe"]))
        show_combine = any(c not in ("probs", "") for c in t["combine"])
        out_rows = []
        for i, (_, r) in enumerate(t.iterrows()):
            row: dict[str, str] = {"method": r["method"], "options": _options_text(r["config_key"])}
            for k in varying:
                row[k] = str(r[k])
            if any(recipe_text):
                row["recipe"] = recipe_text[i] or "-"
            if show_combine:
                row["combine"] = r["combine"] or "probs"
            row["n"] = str(r["n_seeds"]) + (" ‡" if _num(r.get("code_versions")) > 1 else "")
            conv = r.get("converged")
            row["converged"] = "?" if conv is None or conv != conv else ("yes" if conv else "**no**")

            def g(col: str, scale: float = 1.0, digits: int = 2) -> str:
                return _fmt(r.get(f"{col}_mean"), r.get(f"{col}_std"), scale, digits)

            row["acc (%)"] = g("acc", 100)
            row["nll"] = g("nll", 1, 3)
            row["ece (%)"] = g("ece", 100)
            row["brier"] = g("brier", 1, 4)
            for s in ood_sets:
                row[f"AUROC {s} (%)"] = g(f"auroc_{s}", 100)
            if any_shift:
                row["shift acc (%)"] = g("shift_acc", 100)
                row["shift nll"] = g("shift_nll", 1, 3)
                row["shift ece (%)"] = g("shift_ece", 100)
                row["mCE (%)"] = _fmt(r.get("mce"), math.nan, 1, 1)
            row["params (M)"] = g("params", 1e-6)
            row["non-zero params (M)"] = g("params_nonzero", 1e-6)   # sparse methods' live weights
            row["GFLOPs"] = g("flops", 1e-9, 3)                        # sparse-aware (per-layer density)
            row["train TFLOPs"] = g("train_flops", 1e-12, 2)
            row[lat_hdr] = g("latency_ms", 1, 2) + (" †" if bool(r.get("latency_busy")) else "")
            row[train_hdr] = g("train_s", 1, 0)
            if len(lat_devs) > 1 or len(train_devs) > 1:
                row["devices"] = f"latency: {_device_name(r['latency_device'])}; train: {_device_name(r['train_device'])}"
            if any(str(s or "") for s in t.get("stage_recipes", [])):
                row["stage recipes"] = str(r.get("stage_recipes") or "") or "-"
            out_rows.append(row)
        header = list(out_rows[0])
        lines = [f"### {dataset or '?'} · {backbone or '?'}", ""]
        lines.append("| " + " | ".join(_cell(h) for h in header) + " |")
        text_cols = {"method", "options", "combine", "devices", "converged", "stage recipes", "recipe"}
        lines.append("|" + "|".join("---" if h in text_cols else "---:" for h in header) + "|")
        for row in out_rows:
            lines.append("| " + " | ".join(_cell(row.get(h, "")) for h in header) + " |")
        parts.append("\n".join(lines))
    note = ("_mean ± std over seeds (sample std, ddof=1); n = number of seeds; OOD AUROC uses the msp score; "
            "GFLOPs are inference FLOPs per image counting only live weights (sparse methods run on dense kernels, "
            "so their latency shows no saving); train TFLOPs ~ 3 x forward FLOPs x samples seen. "
            f"converged: in every seed, every training stage's validation NLL was not still falling at the end: "
            f"**no** when the least-squares line through its last {CONVERGENCE_WINDOW:.0%} of epochs (at least "
            f"{CONVERGENCE_MIN_EPOCHS}) falls by more than {CONVERGENCE_TOL:.0%} and its slope is more than "
            f"{CONVERGENCE_NOISE:g} standard error below zero; "
            "**no** = still improving when it stopped, so the row is not a verdict on the method; "
            f"? = no learning curve in the record. † latency spread (p90 - p10) / median above "
            f"{LATENCY_BUSY_SPREAD:.0%}: measured on a busy machine. ‡ seeds made by different code "
            "(harness or method file hash). stage recipes: stages that a method trains with its own "
            "recipe (part of the method, recorded per stage)."
            + (" shift: mean over every corruption x severity of the corrupted test set; mCE: corruption error "
               "relative to the single model of the same data and recipe (Hendrycks & Dietterich 2019: per "
               "corruption, the errors summed over severities divided by the single model's, averaged over "
               "corruptions; 100 = the single model; – without a single-model row)." if any_shift else "")
            + "_")
    return "\n\n".join(parts) + "\n\n" + note + "\n"


# --------------------------------------------------------------------------------------------
# deep-ensemble-equivalent size (DEE)
# --------------------------------------------------------------------------------------------
#
# DEE of a result (Yun et al. 2023, after Kim et al.'s "deep ensemble equivalent"): the size of a deep
# ensemble that reaches the same metric, read off a DE curve measured on the same harness.
#
# The DE curve of a recipe (same dataset, backbone, epochs, batch size, lr and the rest of the recipe:
# DEE_KEYS) is made of the complete records of the size-reference methods (record method.size_reference, set from the method's
# class: deep ensembles of any size, and the single model as size 1), the metric averaged over seeds at each size. A curve needs size 1 and at
# least one other size. Rule: with g = the metric oriented so that larger is better (-nll, acc), the
# curve is taken as its running best over sizes (a larger DE is credited with the best value any smaller
# one reached, so seed noise cannot make the answer ambiguous) and linearly interpolated between the
# measured sizes; DEE is the smallest size s at which this curve reaches g. Outside the curve nothing is
# extrapolated: a result better than the largest DE measured (size M) is reported as DEE(M, ">") and
# one worse than the single model as DEE(1, "<").

from typing import NamedTuple  # noqa: E402

DEE_KEYS = ("dataset", "backbone", "epochs", "batch_size", "lr", "recipe")
DEE_LEADERBOARD_METRICS = ("nll_ts", "acc")


class DEE(NamedTuple):
    """A deep-ensemble-equivalent size: ``size`` (interpolated; the curve's end when out of range) and
    ``bound``: "" inside the DE curve, ">" better than the largest DE measured, "<" worse than one model."""

    size: float
    bound: str = ""

    def __str__(self) -> str:
        return f"{self.bound}{self.size:.2f}"


def higher_is_better(metric: str) -> bool:
    """acc, member_acc, acc_at_95, shift_acc* (shifted accuracy, also per severity), auroc*, aupr*: larger is
    better; every other metric (nll, nll_ts, ece, ece_adaptive, brier, aurc, fpr95, shift_nll, shift_ece,
    mce): smaller is better."""
    return metric in ("acc", "member_acc", "acc_at_95") or metric.startswith(("auroc", "aupr", "shift_acc"))


def dee_size(value: float, curve: list[tuple[float, float]], larger_better: bool) -> DEE:
    """DEE of ``value`` on ``curve`` = [(size, metric), ...] (any order; sizes distinct, smallest 1). See
    the rule above."""
    pts = sorted((float(m), float(v) if larger_better else -float(v)) for m, v in curve)
    if len(pts) < 2 or pts[0][0] != 1.0:
        raise ValueError("a DE curve needs size 1 and at least one larger size")
    env, best = [], -math.inf
    for m, g in pts:
        best = max(best, g)
        env.append((m, best))
    g = float(value) if larger_better else -float(value)
    if g < env[0][1]:
        return DEE(env[0][0], "<")
    if g > env[-1][1]:
        return DEE(env[-1][0], ">")
    if g == env[0][1]:
        return DEE(env[0][0])
    for (m0, g0), (m1, g1) in zip(env, env[1:]):
        if g0 < g <= g1:
            return DEE(m0 + (g - g0) / (g1 - g0) * (m1 - m0))
    return DEE(env[-1][0])   # unreachable: g lies within [env[0], env[-1]]


def _dee_key(row: Mapping) -> tuple:
    return tuple(_num(row.get(k)) if k in NUMERIC_RECIPE_KEYS else str(row.get(k)) for k in DEE_KEYS)


def _dee_curves(points: list[tuple[tuple, float, float, float]]) -> dict[tuple, list[tuple[float, float]]]:
    """{key: [(size, mean metric)]} from (key, size, metric, weight) entries; keys without a usable curve
    (no size 1, or a single size) are left out."""
    sums: dict[tuple, dict[float, list[float]]] = {}
    for key, size, v, w in points:
        if math.isnan(size) or math.isnan(v) or size < 1:
            continue
        acc = sums.setdefault(key, {}).setdefault(size, [0.0, 0.0])
        acc[0] += w * v
        acc[1] += w
    curves = {}
    for key, by_size in sums.items():
        if 1.0 in by_size and len(by_size) >= 2:
            curves[key] = sorted((m, s / w) for m, (s, w) in by_size.items())
    return curves


def dee(records: list[dict], metric: str = "nll_ts") -> dict[str, DEE]:
    """DEE of every complete record whose recipe (DEE_KEYS) has a DE curve among ``records``, by run id.
    The curve is the seed-mean of ``metric`` at each size of the reference methods' records (the single
    model counts as size 1). Records without the metric, or without a curve, are left out."""
    rows = [flatten_record(r) for r in records if r.get("status", "complete") == "complete"]
    if metric not in METRIC_COLUMNS and not any(metric in r for r in rows):
        raise ValueError(f"unknown metric {metric!r} for DEE")
    pts = [(_dee_key(r), _num(r["num_members"]), _num(r.get(metric)), 1.0)
           for r in rows if r["size_reference"]]
    curves = _dee_curves(pts)
    better = higher_is_better(metric)
    out: dict[str, DEE] = {}
    for r in rows:
        curve = curves.get(_dee_key(r))
        v = _num(r.get(metric))
        if curve is not None and not math.isnan(v):
            out[str(r["run_id"])] = dee_size(v, curve, better)
    return out


def add_dee_columns(df, metrics: tuple[str, ...] = DEE_LEADERBOARD_METRICS):
    """Add ``dee_<metric>`` (float) and ``dee_<metric>_bound`` ("", ">" or "<") to a leaderboard for every
    metric whose DE curve exists: DEE of the row's seed-mean ``<metric>_mean`` on the curve of the
    reference rows' means (weighted by their n_seeds), same DEE_KEYS. Rows without a curve get NaN / "".
    Returns ``df`` unchanged when no curve exists (no deep-ensemble rows of two sizes)."""
    if df is None or len(df) == 0 or "method" not in df.columns:
        return df
    for metric in metrics:
        col = f"{metric}_mean"
        if col not in df.columns:
            continue
        pts = [(_dee_key(r), _num(r.get("num_members")), _num(r.get(col)), max(_num(r.get("n_seeds")), 1.0))
               for _, r in df.iterrows() if bool(r.get("size_reference"))]
        curves = _dee_curves(pts)
        if not curves:
            continue
        better = higher_is_better(metric)
        sizes, bounds = [], []
        for _, r in df.iterrows():
            curve = curves.get(_dee_key(r))
            v = _num(r.get(col))
            if curve is None or math.isnan(v):
                sizes.append(math.nan)
                bounds.append("")
            else:
                d = dee_size(v, curve, better)
                sizes.append(d.size)
                bounds.append(d.bound)
        df[f"dee_{metric}"] = sizes
        df[f"dee_{metric}_bound"] = bounds
    return df


__all__ += ["DEE", "dee", "dee_size", "add_dee_columns", "higher_is_better", "DEE_KEYS", "corruption_error",
            "mce_values", "MCE_KEYS"]
