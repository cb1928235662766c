"""Distribution shift: CIFAR-10-C / CIFAR-100-C style corrupted test sets, written in the release layout
(``write_corrupted``, the ``corrupt`` command), loaded (``load_shift_set``) and evaluated
(``evaluate_shift``). The 15 corruptions of Hendrycks & Dietterich (ICLR 2019) and what of the paper's
generator is reproduced exactly are in ``ensemble_bench.shift.corruptions``; their constants and numerical
helpers in ``ensemble_bench.shift.ops``; the command in ``ensemble_bench.shift.command``.

Every image is corrupted with its own seeded generator (``ops.image_rng``; see ``corruptions``), so the same
whatever the batch, ``--limit`` or order.

The release layout (as the official CIFAR-10-C download): ``<dir>/<corruption>.npy`` uint8 [S * N, 32, 32,
3] with the S severities stacked in order (official: 5 x 10,000), ``<dir>/labels.npy`` (the N labels tiled S
times, uint8 as in the official file) and, for sets made here, ``<dir>/metadata.json``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ensemble_bench.datafiles import numpy_error_detail
from ensemble_bench.errors import UsageError
from ensemble_bench.shift.corruptions import (_FUNCS, _apply, _brightness, _contrast, _defocus_blur,  # noqa: F401
                                              _elastic_transform, _fog, _frost, _gaussian_noise, _glass_blur,
                                              _impulse_noise, _jpeg_compression, _motion_blur, _pixelate,
                                              _shot_noise, _snow, _zoom_blur)
from ensemble_bench.shift.ops import (APPROXIMATE, CORRUPTIONS, EXTRA_CORRUPTIONS, FOLDERS, FROST_ENV,  # noqa: F401
                                      FROST_FILES, FROST_STATS, GENERATOR, IMAGE_SIZE, PARAMS, REFERENCE, SEVERITIES,
                                      SHIFT_SETS, _bilinear, _clipped_zoom, _CHUNK, _frost_dir, _gaussian, _load_frost,
                                      _motion_blur_u8, _plasma_fractal, image_rng, torch)

__all__ = [
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "SEVERITIES",
    "SHIFT_SETS",
    "PARAMS",
    "APPROXIMATE",
    "corrupt",
    "write_corrupted",
    "ShiftSet",
    "load_shift_set",
    "evaluate_shift",
    "corrupt_command",
    "add_corrupt_parser",
    "cli_corrupt",
]


# ------------------------------------------------------------------------------------------ validation
def _parse_list(value, name: str, convert=str) -> list:
    if value is None:
        return []
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    if isinstance(value, str) and any(v == "" for v in items):
        raise UsageError(f"--{name}: empty item in {value!r} (give a comma-separated list)")
    try:
        return [convert(v) for v in items]
    except (TypeError, ValueError):
        raise UsageError(f"--{name}: cannot read {value!r} (give a comma-separated list)") from None


def _check_corruptions(corruptions) -> list[str]:
    names = list(CORRUPTIONS) if corruptions is None else _parse_list(corruptions, "corruptions")
    if not names:
        raise UsageError(f"--corruptions: none given; choose from {', '.join(CORRUPTIONS)}")
    bad = [n for n in names if n not in CORRUPTIONS]
    if bad:
        held_out = set(bad) & set(EXTRA_CORRUPTIONS)
        extra = " (one of the paper's held-out corruptions, not generated here)" if held_out else ""
        raise UsageError(f"unknown corruption {bad[0]!r}{extra}; choose from {', '.join(CORRUPTIONS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"--corruptions: {names} names a corruption twice")
    return names


def _check_severities(severities) -> list[int]:
    def to_int(v):
        if isinstance(v, bool) or (isinstance(v, float) and not float(v).is_integer()):
            raise ValueError
        return int(v)

    sev = list(SEVERITIES) if severities is None else _parse_list(severities, "severities", to_int)
    if not sev:
        raise UsageError("--severities: none given; choose from 1, 2, 3, 4, 5")
    bad = [s for s in sev if s not in SEVERITIES]
    if bad:
        raise UsageError(f"severity {bad[0]} is outside 1..5")
    if len(set(sev)) != len(sev):
        raise UsageError(f"--severities: {sev} names a severity twice")
    return sev


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"--seed must be an integer >= 0; got {seed!r}")
    return int(seed)


def _check_images(images, labels) -> tuple[np.ndarray, np.ndarray]:
    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or x.shape[0] < 1:
        raise UsageError(f"images must be uint8 [N, 32, 32, 3] (NHWC); got {x.dtype} {list(x.shape)}")
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu":
        raise UsageError(f"labels must be integers [N = {len(x)}]; got {y.dtype} {list(y.shape)}")
    if y.min() < 0:
        raise UsageError(f"labels must be >= 0; got {int(y.min())}")
    return np.ascontiguousarray(x), y


def _out_metadata_compatible(out_dir: Path, meta: dict, corruptions: list[str]) -> dict | None:
    """An existing set in ``out_dir`` made with the same settings is extended; anything else is refused."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file, not a folder")
    if not out_dir.is_dir():
        return None
    present = sorted(p.stem for p in out_dir.glob("*.npy") if p.name != "labels.npy")
    mpath = out_dir / "metadata.json"
    if not mpath.is_file():
        if present:
            raise UsageError(f"{out_dir} already holds {', '.join(present)} without a metadata.json (not made by "
                             f"{GENERATOR}); choose another --out")
        return None
    try:
        old = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{mpath}: cannot read ({e}); choose another --out or delete it") from None
    keys = ("generator", "seed", "severities", "n_per_severity", "source_dataset")
    diff = [k for k in keys if old.get(k) != meta.get(k)]
    if diff:
        raise UsageError(f"{out_dir} holds a set made with other settings ({', '.join(diff)} differ); "
                         "choose another --out or delete it")
    return old


# ------------------------------------------------------------------------------------------ generation
def corrupt(images, corruption: str, severity: int, seed: int = 0, *, start_index: int = 0,
            frost_dir=None, _ctx: dict | None = None) -> np.ndarray:
    """Corrupt uint8 images [N, 32, 32, 3] (NHWC) at one severity; image k uses index start_index + k."""
    (name,) = _check_corruptions([corruption])
    (sev,) = _check_severities([severity])
    seed = _check_seed(seed)
    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise UsageError(f"images must be uint8 [N, 32, 32, 3] (NHWC); got {x.dtype} {list(x.shape)}")
    ctx = _ctx if _ctx is not None else _context([name], frost_dir)
    return _apply(name, sev, x, seed, start_index, ctx)


def _context(corruptions: list[str], frost_dir) -> dict:
    ctx: dict[str, Any] = {"frost": None, "frost_source": None}
    fd = _frost_dir(frost_dir)
    if "frost" in corruptions and fd is not None:
        ctx["frost"] = _load_frost(fd)
        ctx["frost_source"] = str(fd)
    return ctx



def _approximate(corruptions: Iterable[str], ctx: dict) -> dict[str, str]:
    out = {c: APPROXIMATE[c] for c in corruptions if c in APPROXIMATE}
    if ctx.get("frost") is not None:
        out.pop("frost", None)
    return out


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with the suite's dependencies
        return None
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


def write_corrupted(images_uint8_NHWC, labels, out_dir, corruptions: Sequence[str] | None = None,
                    severities: Sequence[int] | None = None, seed: int = 0, progress: bool = True, *,
                    source: str = "", frost_dir=None) -> dict:
    """Write ``out_dir/<corruption>.npy`` [len(severities) * N, 32, 32, 3] uint8 (severities stacked in
    order), ``out_dir/labels.npy`` (labels tiled the same way, uint8 when they fit, as the official file)
    and ``out_dir/metadata.json``; returns the metadata.

    Every argument is checked before anything is written. A folder that already holds a set made here with
    the same seed, severities, N, source and frost images is extended (its metadata merged); any other
    non-empty set is refused. Each .npy is written under a temporary name and renamed when complete, and
    metadata.json is rewritten after each corruption, so an interrupted run leaves a loadable set that a
    rerun with the same settings extends.
    """
    x, y = _check_images(images_uint8_NHWC, labels)
    names = _check_corruptions(corruptions)
    sev = _check_severities(severities)
    seed = _check_seed(seed)
    out_dir = Path(out_dir)
    ctx = _context(names, frost_dir)
    n = len(x)
    meta: dict[str, Any] = {
        "generator": GENERATOR,
        "version": _version(),
        "reference": REFERENCE,
        "seed": seed,
        "severities": sev,
        "n_per_severity": n,
        "corruptions": names,
        "parameters": {c: [_jsonable(PARAMS[c][s - 1]) for s in sev] for c in names},
        "approximate": _approximate(names, ctx),
        "frost": ctx["frost_source"] if "frost" in names else None,
        "source_dataset": source,
        "labels": "labels.npy: the N labels tiled once per severity, in the order of the severities",
    }
    old = _out_metadata_compatible(out_dir, meta, names)
    if old is not None:   # extend the set: files not rewritten keep their entries
        meta["corruptions"] = [c for c in CORRUPTIONS if c in set(old.get("corruptions", [])) | set(names)]
        meta["parameters"] = {**old.get("parameters", {}), **meta["parameters"]}
        approx = {k: v for k, v in old.get("approximate", {}).items() if k not in names}
        meta["approximate"] = {**approx, **meta["approximate"]}
        if "frost" not in names:
            meta["frost"] = old.get("frost")
        old_labels = out_dir / "labels.npy"
        if old_labels.is_file():
            prev = _read_npy(old_labels, mmap=False)
            if prev.shape != (len(sev) * n,) or not np.array_equal(prev, np.tile(y, len(sev))):
                raise UsageError(f"{out_dir} holds a set with other labels; choose another --out or delete it")
    out_dir.mkdir(parents=True, exist_ok=True)
    label_dtype = np.uint8 if int(y.max()) < 256 else np.int64
    def save_labels(path):
        with open(path, "wb") as f:           # a file object: np.save would append ".npy" to the name
            np.save(f, np.tile(y, len(sev)).astype(label_dtype))
    _atomic_save(out_dir / "labels.npy", save_labels)

    # metadata.json always describes the complete files only: written before the first corruption and again
    # after each one, so an interrupted run leaves a consistent set that a rerun extends
    complete = [c for c in meta["corruptions"] if c not in names]

    def save_meta() -> dict:
        cur = {**meta, "corruptions": [c for c in CORRUPTIONS if c in complete]}
        cur["parameters"] = {c: v for c, v in meta["parameters"].items() if c in cur["corruptions"]}
        cur["approximate"] = {c: v for c, v in meta["approximate"].items() if c in cur["corruptions"]}
        _atomic_save(out_dir / "metadata.json", lambda p: Path(p).write_text(json.dumps(cur, indent=1) + "\n"))
        return cur

    save_meta()
    bar = _progress(len(names) * len(sev) * n, progress, "corrupt")
    try:
        for name in names:
            def fill(path, name=name):
                arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(sev) * n, 32, 32, 3))
                for k, s in enumerate(sev):
                    if bar is not None:
                        bar.set_postfix_str(f"{name} {s}")
                    for i in range(0, n, _CHUNK):
                        chunk = x[i:i + _CHUNK]
                        arr[k * n + i:k * n + i + len(chunk)] = _apply(name, s, chunk, seed, i, ctx)
                        if bar is not None:
                            bar.update(len(chunk))
                arr.flush()
                del arr
            _atomic_save(out_dir / f"{name}.npy", fill)
            complete.append(name)
            final = save_meta()
    finally:
        if bar is not None:
            bar.close()
    return final


def _atomic_save(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".partial")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def _version() -> str:
    from ensemble_bench import __version__

    return __version__


# ------------------------------------------------------------------------------------------ loading
@dataclass
class ShiftSet:
    """A corrupted test set in the release layout. Images are read on demand (memory-mapped), so the full
    official CIFAR-10-C (2.3 GB for the 15 corruptions) is never held at once."""

    name: str                                # "cifar10c" or "cifar100c"
    root: Path                               # the release folder (.../CIFAR-10-C)
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    n_per_severity: int
    num_classes: int
    labels_all: torch.Tensor                 # int64 [len(severities) * n], as labels.npy
    approximate: dict[str, str] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def images(self, corruption: str, severity: int) -> torch.Tensor:
        """uint8 [n, 3, 32, 32] (NCHW, as data.Split.x) of one corruption at one severity."""
        k = self._sev_index(corruption, severity)
        arr = _read_npy(self.files[corruption], mmap=True)
        block = arr[k * self.n_per_severity:(k + 1) * self.n_per_severity]
        return torch.from_numpy(np.ascontiguousarray(block.transpose(0, 3, 1, 2)))

    def labels(self, severity: int) -> torch.Tensor:
        """int64 [n] labels of the images of one severity."""
        k = self._sev_index(None, severity)
        return self.labels_all[k * self.n_per_severity:(k + 1) * self.n_per_severity]

    def __iter__(self):
        """(corruption, severity) pairs in order."""
        return iter([(c, s) for c in self.corruptions for s in self.severities])

    def __len__(self) -> int:
        return len(self.corruptions) * len(self.severities)

    def describe(self) -> dict:
        return {"set": self.name, "root": str(self.root), "corruptions": list(self.corruptions),
                "severities": list(self.severities), "n_per_severity": self.n_per_severity,
                "approximate": dict(self.approximate),
                "generator": self.metadata.get("generator", "official release (no metadata.json)")}

    def _sev_index(self, corruption, severity) -> int:
        if corruption is not None and corruption not in self.files:
            raise UsageError(f"{self.name}: no corruption {corruption!r}; have {', '.join(self.corruptions)}")
        if severity not in self.severities:
            raise UsageError(f"{self.name}: no severity {severity!r}; have {list(self.severities)}")
        return self.severities.index(severity)


def load_shift_set(name: str, data_dir, corruptions: Sequence[str] | None = None) -> ShiftSet:
    """Open ``data_dir/CIFAR-10-C`` (name "cifar10c") or ``data_dir/CIFAR-100-C`` ("cifar100c").

    Reads every ``<corruption>.npy`` of the 15 benchmark corruptions present (or exactly ``corruptions``,
    which may also name the 4 held-out ones of the official release) and ``labels.npy``. Severities come
    from metadata.json when there is one, else they are 1..5, so the images per severity are
    len(labels) / 5 (the official release: 10,000). Every problem is a one-line UsageError.
    """
    if name not in SHIFT_SETS:
        raise UsageError(f"unknown shift set {name!r}; choose from {', '.join(SHIFT_SETS)}")
    folder, num_classes, _ = SHIFT_SETS[name]
    if data_dir is None:
        raise UsageError(f"{name}: no data folder given (it must contain {folder}/)")
    root = Path(data_dir) / folder
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder; {name} needs {folder}/ with <corruption>.npy files and "
                         f"labels.npy under {data_dir} (make one with `ensemble-bench corrupt`)")
    known = CORRUPTIONS + EXTRA_CORRUPTIONS
    present = {p.stem: p for p in sorted(root.glob("*.npy")) if p.name != "labels.npy"}
    unknown = sorted(set(present) - set(known))
    if unknown:
        raise UsageError(f"{root}: unknown corruption file {unknown[0]}.npy; expected names are "
                         f"{', '.join(known)} and labels.npy")
    if corruptions is None:
        names = [c for c in CORRUPTIONS if c in present]
        if not names:
            raise UsageError(f"{root}: no corruption files (<corruption>.npy for {', '.join(CORRUPTIONS)})")
    else:
        names = list(corruptions)
        bad = [c for c in names if c not in known]
        if bad:
            raise UsageError(f"unknown corruption {bad[0]!r}; choose from {', '.join(known)}")
        missing = [c for c in names if c not in present]
        if missing:
            raise UsageError(f"{root}: missing {missing[0]}.npy")
    lpath = root / "labels.npy"
    if not lpath.is_file():
        raise UsageError(f"{root}: missing labels.npy (the labels of the images, tiled once per severity)")
    labels = _read_npy(lpath, mmap=False)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) == 0:
        raise UsageError(f"{lpath}: labels must be a non-empty 1-D integer array; "
                         f"got {labels.dtype} {list(labels.shape)}")
    meta: dict = {}
    mpath = root / "metadata.json"
    if mpath.is_file():
        try:
            meta = json.loads(mpath.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UsageError(f"{mpath}: cannot read ({why})") from None
        sev = meta.get("severities")
        if (not isinstance(sev, list) or not sev or len(set(map(str, sev))) != len(sev)
                or any(isinstance(s, bool) or s not in SEVERITIES for s in sev)):
            raise UsageError(f"{mpath}: 'severities' must be a list of distinct integers in 1..5; got {sev!r}")
        severities = tuple(int(s) for s in sev)
    else:
        severities = SEVERITIES
    total = len(labels)
    if total % len(severities):
        raise UsageError(f"{lpath}: {total} labels are not divisible by the {len(severities)} severities")
    n = total // len(severities)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise UsageError(f"{lpath}: labels must lie in [0, {num_classes}) for {name}; got values in [{lo}, {hi}]")
    for c in names:
        arr = _read_npy(present[c], mmap=True)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise UsageError(f"{present[c]}: images must be uint8 [N, 32, 32, 3]; got {arr.dtype} {list(arr.shape)}")
        if arr.shape[0] != total:
            raise UsageError(f"{present[c]}: {arr.shape[0]} images but labels.npy has {total} "
                             f"({len(severities)} severities x {n})")
    approx = meta.get("approximate", {}) if isinstance(meta.get("approximate", {}), dict) else {}
    return ShiftSet(name=name, root=root, corruptions=tuple(names), severities=severities, n_per_severity=n,
                    num_classes=num_classes, labels_all=torch.from_numpy(labels.astype(np.int64)),
                    approximate={c: str(v) for c, v in approx.items() if c in names}, metadata=meta,
                    files={c: present[c] for c in names})


def _read_npy(path: Path, mmap: bool) -> np.ndarray:
    """One .npy array of a corrupted set, never unpickled; a file that is none is one UsageError line (in
    datafiles' words: without numpy's advice to load it with pickles allowed)."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        msg = numpy_error_detail(e) or "not a .npy array of numbers"
        raise UsageError(f"{path}: cannot read .npy ({msg})") from None


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_shift(predict: Callable[[torch.Tensor], Any], shift_set: ShiftSet, val_logits=None, val_labels=None,
                   combine: str = "probs", batch_size: int = 2000, *, progress: bool = False,
                   logits_out: dict | None = None) -> dict:
    """Metrics of a model on every (corruption, severity) of ``shift_set``.

    ``predict(x)`` takes uint8 images [B, 3, 32, 32] and returns member logits [M, B, C] (the runner passes
    ``lambda x: trainer.predict(model, x)``); it is called on chunks of ``batch_size`` images. With
    validation logits [M, V, C] and labels of the clean validation split, one temperature is fitted there
    (metrics.fit_temperature) and nll_ts / ece_ts are reported per cell. If ``logits_out`` is a dict it
    receives the member logits of every cell under the score-file keys ``shift_<corruption>_<severity>``
    (float32 [M, n, C]) plus ``shift_labels`` (when all severities share labels; else per-cell
    ``shift_labels_<corruption>_<severity>``), so that ``ensemble-bench score`` can recompute everything.

    Returns (JSON-serialisable): set, n_per_severity, severities, corruptions, approximate, combine,
    temperature, per_corruption {corruption: {"1": metrics, ...}}, by_corruption {corruption: mean over
    severities}, by_severity {"1": mean over corruptions, ...}, mean (over all corruption x severity cells).
    """
    from ensemble_bench import metrics as mt

    if not isinstance(shift_set, ShiftSet):
        raise UsageError(f"evaluate_shift needs a ShiftSet (load_shift_set); got {type(shift_set).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer; got {batch_size!r}")
    if (val_logits is None) != (val_labels is None):
        raise UsageError("val_logits and val_labels must be given together")
    temperature = None
    if val_logits is not None:
        temperature = mt.fit_temperature(val_logits, val_labels, combine)
    bar = _progress(len(shift_set) * shift_set.n_per_severity, progress, "shift eval")
    cells: dict[tuple[str, int], dict] = {}
    same_labels = all(torch.equal(shift_set.labels(s), shift_set.labels(shift_set.severities[0]))
                      for s in shift_set.severities)
    try:
        for c, s in shift_set:
            x = shift_set.images(c, s)
            y = shift_set.labels(s)
            parts = []
            for i in range(0, len(x), batch_size):
                out = predict(x[i:i + batch_size])
                out = out.detach().cpu() if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))
                parts.append(out.unsqueeze(0) if out.dim() == 2 else out)
                if bar is not None:
                    bar.update(min(batch_size, len(x) - i))
            logits = torch.cat(parts, dim=1)
            cells[(c, s)] = mt.shift_cell_metrics(logits, y, temperature=temperature, combine=combine)
            if logits_out is not None:
                logits_out[f"shift_{c}_{s}"] = logits.float().numpy()
                if not same_labels:
                    logits_out[f"shift_labels_{c}_{s}"] = y.numpy()
    finally:
        if bar is not None:
            bar.close()
    if logits_out is not None and same_labels:
        logits_out["shift_labels"] = shift_set.labels(shift_set.severities[0]).numpy()
    summary = mt.shift_summary(cells)
    return {"set": shift_set.name, "n_per_severity": shift_set.n_per_severity,
            "severities": list(shift_set.severities), "corruptions": list(shift_set.corruptions),
            "approximate": dict(shift_set.approximate), "combine": combine,
            "temperature": None if temperature is None else float(temperature), **summary}




from ensemble_bench.shift.command import add_corrupt_parser, cli_corrupt, corrupt_command  # noqa: E402
