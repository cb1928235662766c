"""Result records: one versioned JSON file per run, written atomically, loaded and validated.

A run writes ``<out>/<run_id>.json`` (see :data:`SCHEMA_VERSION` and the layout below) and beside it,
optionally, ``<run_id>.preds.npz`` (:mod:`ensemble_bench.predictions`), ``<run_id>.weights.safetensors``
(:func:`save_weights`) and ``<run_id>.curves.csv`` (:func:`write_curves`). Many Slurm jobs write into the
same folder at once, so every file is written atomically: the bytes go to a hidden temporary file in
the same directory, which is flushed, fsync'ed and then renamed over the final name with
``os.replace``. A reader therefore sees either the previous complete file or the new complete file,
never a partial one; two writers of the same run id leave one of the two complete versions.

Record layout (a plain dict; typed and validated as :class:`ensemble_bench.record_types.RunRecord`)::

    {"schema_version": 1, "run_id": str, "status": "complete" | "failed" | "running",
     "config":   {method, backbone, dataset, epochs, seed, batch_size, lr, ..., "options": {...}},
     "method":   {"name", "options" (resolved, with defaults), "combine", "num_members", "info"},
     "metrics":  {acc, nll, brier, ece, member_acc, disagreement, nll_ts, ece_ts, temperature,
                  "ood": {<set>: {<score>: {auroc, aupr_in, aupr_out, fpr95}}}},
     "cost":     {params, params_nonzero, flops, macs, flops_dense, latency_ms, latency_device,
                  throughput, throughput_device, peak_mem_mb, device},
     "training": {train_s, epochs_run: {stage: n}, samples_seen, train_flops, device},
     "env":      ensemble_bench.environment.environment_info(),
     "timings":  {started, finished, wall_s},
     "error":    None | str}

JSON written here is strict: NaN and +-inf become ``null`` (read back as missing -> NaN in the
leaderboard), numpy scalars/arrays and paths are converted to plain JSON values. A flat row of a record
(what the leaderboard aggregates) is :func:`ensemble_bench.columns.flatten_record`.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ensemble_bench.record_types import SCHEMA_VERSION as SCHEMA_VERSION
from ensemble_bench.record_types import STATUSES as STATUSES
from ensemble_bench.record_types import Cost as Cost
from ensemble_bench.record_types import MethodInfo as MethodInfo
from ensemble_bench.record_types import Metrics as Metrics
from ensemble_bench.record_types import RecordError as RecordError
from ensemble_bench.record_types import RunRecord as RunRecord
from ensemble_bench.record_types import Training as Training
from ensemble_bench.record_types import check_record as _check_record
from ensemble_bench.errors import UsageError

PREDS_SUFFIX = ".preds.npz"
WEIGHTS_SUFFIX = ".weights.safetensors"
_TMP_SUFFIX = ".tmp"


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
    now = time.time()
    for old in path.parent.glob(f".{glob_escape(path.name)}.*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > STALE_TEMP_S:
                old.unlink()


def glob_escape(name: str) -> str:
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

def _check_complete(rec: dict, where: str) -> RunRecord:
    """A record that counts (leaderboard, report) as complete has its config and metrics (acc, nll), every
    typed field of the right type (:class:`RunRecord`); returns it typed."""
    return RunRecord.from_dict(rec, where, complete=True)


def record_path(out_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(out_dir) / f"{run_id}.json"


def predictions_path(out_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(out_dir) / f"{run_id}{PREDS_SUFFIX}"


def write_record(out_dir: str | os.PathLike, record: dict) -> Path:
    """Validate ``record`` and write it atomically to ``<out_dir>/<run_id>.json``; returns the path."""
    _check_record(record, "record")
    return write_json_atomic(record_path(out_dir, record["run_id"]), record)


def read_record(path: str | os.PathLike, *, typed: bool = False) -> dict | RunRecord:
    """Read and validate one record (its identity, and the type of every typed field it has; a complete
    record's completeness is :func:`load_records`'s check). Raises :class:`RecordError` (one-line message)
    if it is not one. ``typed``: a :class:`RunRecord` instead of the dict."""
    rec, rr = _read(Path(path), complete=False)
    return rr if typed else rec


def _read(path: Path, *, complete: bool | None) -> tuple[dict, RunRecord]:
    """A record file as (the dict, the validated RunRecord); ``complete`` as in RunRecord.from_dict."""
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
    return rec, RunRecord.from_dict(rec, str(path), complete=complete)


def _record_files(runs_dir: Path, recursive: bool) -> list[Path]:
    """The ``*.json`` files of ``runs_dir`` (and its subfolders with ``recursive``), never inside a hidden
    folder (``.ckpt``, ``.members``, ``.submitit``): those are pruned before the walk enters them, so a
    checkpoint folder removed by a run finishing at that moment cannot break the scan."""
    files = []
    for root, dirs, names in os.walk(runs_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in names:
            if (name.startswith(".") or not name.endswith(".json") or name.endswith(PREDS_SUFFIX)
                    or name.endswith(_TMP_SUFFIX)):
                continue
            p = Path(root) / name
            if p.is_file():
                files.append(p)
    return sorted(files)


def as_folders(runs_dirs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """One folder or several, as a list of paths (what :func:`scan_records` and the commands that name
    their folders take)."""
    return [Path(runs_dirs)] if isinstance(runs_dirs, (str, os.PathLike)) else [Path(d) for d in runs_dirs]


def scan_records(
    runs_dirs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    statuses: tuple[str, ...] | None = ("complete",),
    recursive: bool = False,
    typed: bool = False,
) -> tuple[list[tuple[Path, Any]], list[str]]:
    """Every record in one folder or several (``recursive``: their subfolders too; hidden folders such as
    ``.ckpt`` never) whose status is in ``statuses`` (None: all), as ``(path, record)`` pairs.

    Returns ``(pairs, problems)``: ``problems`` has one line per file that is not a readable record
    (corrupt, truncated, not a record, a run id already found in another file). Predictions
    (``*.preds.npz``) and temporary files are skipped. Records are in folder, then file-name order. A
    missing folder raises :class:`RecordError`. Every record is validated through
    :meth:`RunRecord.from_dict` (a complete one must have its config and metrics); ``typed``: the records
    as :class:`RunRecord` instead of dicts.
    """
    dirs = as_folders(runs_dirs)
    for d in dirs:
        if not d.is_dir():
            raise RecordError(f"{d}: is a file, not a results folder (give the folder that holds the records)"
                              if d.exists() else f"{d}: results directory does not exist")
    pairs: list[tuple[Path, Any]] = []
    problems: list[str] = []
    seen: dict[str, Path] = {}
    files: dict[Path, Path] = {}   # a folder named twice, or inside another one: each file once
    for d in dirs:
        for f in _record_files(d, recursive):
            files.setdefault(f.resolve(), f)
    for p in files.values():
        try:
            rec, rr = _read(p, complete=None)   # a complete one: its config and metrics too
        except RecordError as e:
            problems.append(str(e))
            continue
        rid = rec["run_id"]
        if rid in seen:
            problems.append(f"{p}: duplicate run_id {rid!r} (also in {seen[rid]}); skipped")
            continue
        seen[rid] = p
        if statuses is None or rec["status"] in statuses:
            pairs.append((p, rr if typed else rec))
    return pairs, problems


def load_records(runs_dirs: str | os.PathLike | Sequence[str | os.PathLike], **kw: Any) -> tuple[list, list[str]]:
    """:func:`scan_records` without the paths: ``(records, problems)``."""
    pairs, problems = scan_records(runs_dirs, **kw)
    return [r for _, r in pairs], problems


def load_typed(runs_dirs: str | os.PathLike | Sequence[str | os.PathLike], **kw: Any) -> tuple[list[RunRecord], list[str]]:
    """:func:`load_records` with the records as :class:`RunRecord`."""
    return load_records(runs_dirs, typed=True, **kw)


RESULT_SUFFIXES = (".json", ".curves.csv", PREDS_SUFFIX, WEIGHTS_SUFFIX)   # a run's files: <run_id><suffix>


def result_file_of(path: str | os.PathLike) -> str | None:
    """The run id whose record, or file beside it (curves, predictions, weights), ``path`` is; None when it
    is none of those. A command that writes a table or a report refuses such a path: it would destroy a
    result."""
    p = Path(path)
    for suffix in RESULT_SUFFIXES:
        stem = p.name[:-len(suffix)] if p.name.endswith(suffix) else ""
        if stem and record_status(p.parent, stem) is not None:
            return stem
    return None


def record_status(runs_dir: str | os.PathLike, run_id: str) -> str | None:
    """Status of the record ``<runs_dir>/<run_id>.json``; None if it is absent, unreadable, or "complete"
    without what a complete record has (the leaderboard's check). A readable
    record of another run under that name is bad input (:class:`UsageError`): taken as this run's, it would
    be reported as its result; run over, it would be lost."""
    return read_status(runs_dir, run_id)[0]


def read_status(runs_dir: str | os.PathLike, run_id: str) -> tuple[str | None, dict | None]:
    """``record_status`` and the record it read (None where the status is None): one read for a caller that
    needs both (the sweep's state table reads every run's record once)."""
    p = record_path(runs_dir, run_id)
    if not p.is_file():
        return None, None
    try:
        rec = read_record(p)
    except RecordError:
        return None, None
    if rec["run_id"] != run_id:
        raise UsageError(f"{p} holds the record of run {rec['run_id']}, not {run_id} (a record's file is named "
                         f"by its run id): move it away or rename it {rec['run_id']}.json")
    if rec["status"] == "complete":
        try:
            _check_complete(rec, str(p))
        except RecordError:     # "complete" without its config or metrics: no result, as the leaderboard
            return None, None   # reads it; running it again writes the record (as for an unreadable file)
    return rec["status"], rec


# --------------------------------------------------------------------------------------------
# weights and learning curves beside the record
# --------------------------------------------------------------------------------------------


def save_weights(out_dir: str | os.PathLike, run_id: str, model: Any) -> Path:
    """The trained ensemble's state dict as ``<out>/<run_id>.weights.safetensors`` (atomic; tensors only,
    so loading it can never run code). ``method.build`` rebuilds the architecture it loads into."""
    from safetensors.torch import save_file

    path = Path(out_dir) / f"{run_id}{WEIGHTS_SUFFIX}"
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    save_file(state, str(tmp), metadata={"run_id": run_id})
    os.chmod(tmp, _file_mode())   # safetensors creates it 0o600: the mode of the record's other files
    os.replace(tmp, path)
    return path


def write_curves(out_dir: str | os.PathLike, run_id: str, stages: Mapping) -> Path:
    """The learning curves of a run as ``<out>/<run_id>.curves.csv``: one line per stage and epoch (lr,
    train loss, validation metrics with the NLL's standard error, epoch time; after a learning-rate cycle
    end, the paired standard error of the NLL's change since it); also to TensorBoard when it is installed."""
    cols = ["stage", "epoch", "lr", "loss", "val_acc", "val_nll", "val_nll_se", "val", "epoch_s", "val_s",
            "val_nll_diff_se", "diff_from_epoch"]
    lines = [",".join(cols)]
    for name, st in stages.items():
        for e in (st if isinstance(st, dict) else {}).get("curve") or []:
            lines.append(",".join([str(name)] + ["" if e.get(c) is None else repr(e.get(c)) for c in cols[1:]]))
    path = Path(out_dir) / f"{run_id}{RESULT_SUFFIXES[1]}"
    write_text_atomic(path, "\n".join(lines) + "\n")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:     # tensorboard is an optional extra
        return path
    with SummaryWriter(str(Path(out_dir) / "tensorboard" / run_id)) as w:
        for name, st in stages.items():
            for e in (st if isinstance(st, dict) else {}).get("curve") or []:
                for c in cols[2:]:
                    if c != "diff_from_epoch" and isinstance(e.get(c), (int, float)):
                        w.add_scalar(f"{name}/{c}", e[c], e["epoch"])
    return path

