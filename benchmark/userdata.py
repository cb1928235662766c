"""Your own datasets (issue 14, part 2): a dataset described in TOML or registered by a plugin.

Wherever a dataset name is accepted, a path ending in ``.toml`` names a dataset described in TOML
(``load_spec``; the schema is in ``parse_spec``), and a plugin can give a dataset a name with
``register_dataset``. Both load (``load_user``) through the same checks as the built-in ones
(``ensemble_bench.data``) and identify themselves (``data.fingerprint``) by their arrays AND their
declared settings (``DatasetSpec.identity``), so two different user datasets never share a run id and the
same files always give the same one.
"""
from __future__ import annotations

import functools
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ensemble_bench.data import (DATASETS, Augment, DataBundle, _bundle, _check_labels, _chw, _labels, _shape_text,
                                 is_toml_path)
from ensemble_bench.datafiles import decode_imagefolder, decode_images, path_stamp, read_npz, shown
from ensemble_bench.errors import UsageError
from ensemble_bench.registry import Registry

# The keys of a dataset TOML (and of a dict given to register_dataset); see parse_spec for each.
SPEC_KEYS = ("name", "num_classes", "image_size", "channels", "mean", "std", "format", "train", "test",
             "test_fraction", "root", "shuffle", "augment", "ood")
AUGMENT_KEYS = ("crop_padding", "hflip")
FORMATS = ("npz", "imagefolder")
MAX_IMAGE_SIZE = 4096          # a typo guard, not a limit of the suite
# the fixed generator of a user dataset's test hold-out (test_fraction) and training order (shuffle):
# never the run seed, so every seed of a row sees the same splits
USER_SPLIT_SEED = 20240101
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
_OOD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*\Z")   # becomes ood_<name> in predictions and metric keys


@dataclass(frozen=True)
class DatasetSpec:
    """A user dataset as declared (TOML or ``register_dataset``), parsed and checked by ``parse_spec``;
    no array is read until ``load_user``. File locations are absolute paths; a registered spec may hold
    arrays instead (``train = (x, y)``, an OOD set ``x``)."""
    name: str
    num_classes: int
    image_size: int
    channels: int
    format: str                      # "npz" or "imagefolder"
    train: Any                       # npz: Path or (x, y); imagefolder: the root/train folder
    test: Any                        # the same, or None: test_fraction of train is held out
    test_fraction: float | None
    mean: tuple[float, ...] | None   # None: measured on the training split, as for the built-in datasets
    std: tuple[float, ...] | None
    crop_padding: int
    hflip: bool
    shuffle: bool
    ood: dict                        # OOD name -> Path (.npz with x, or a folder of images) or array x
    file: Path | None = None         # the TOML file
    origin: str = ""                 # for a registered spec: "dataset 'x' registered by plugin.py:12"

    @property
    def where(self) -> str:
        return shown(self.file) if self.file is not None else self.origin

    @property
    def augment(self) -> Augment:
        return Augment(crop_pad=self.crop_padding, flip=self.hflip)

    def identity(self) -> dict:
        """Everything declared that changes what is computed, without where the files are (the arrays'
        own sha256 stands for them in ``fingerprint``): the TOML's content, normalised, so a comment, the
        order of keys or a moved folder keeps the run id and any declared value changes it."""
        return {"name": self.name, "num_classes": self.num_classes, "image_size": self.image_size,
                "channels": self.channels, "format": self.format,
                "mean": list(self.mean) if self.mean is not None else None,
                "std": list(self.std) if self.std is not None else None,
                "augment": {"crop_padding": self.crop_padding, "hflip": self.hflip}, "shuffle": self.shuffle,
                "test_fraction": self.test_fraction, "ood": sorted(self.ood)}


_REGISTERED = Registry("dataset")   # name -> DatasetSpec, its source the file and line that registered it
_GENERATION = [0]                                       # bumped by every registration (identity's cache key)


def registered_names() -> tuple[str, ...]:
    """The names plugins registered (``register_dataset``)."""
    return tuple(_REGISTERED.names())


def user_spec(name: Any) -> DatasetSpec | None:
    """The spec of a user dataset (a registered name or a ``.toml`` path), None for anything else."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        return None
    if name in _REGISTERED:
        return _REGISTERED.get(name)
    if is_toml_path(name):
        return load_spec(name)
    return None


def load_spec(path: str | os.PathLike) -> DatasetSpec:
    """The dataset TOML at ``path``, parsed and checked (cached while the file keeps its size and
    modification time). Relative paths inside it are relative to the TOML file's folder, so a dataset
    folder can be moved or shared as a whole."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"dataset file not found: {path}" + (" (a folder, not a .toml file)" if p.is_dir() else ""))
    p = p.resolve()
    st = p.stat()
    return _load_spec_cached(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _load_spec_cached(path: str, size: int, mtime: int) -> DatasetSpec:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_bytes().decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot parse {shown(p)}: {e}") from None
    except OSError as e:
        raise UsageError(f"cannot read {shown(p)}: {e.strerror or type(e).__name__}") from None
    return parse_spec(doc, where=shown(p), base=p.parent, file=p)


def parse_spec(doc: dict, where: str, base: Path, *, file: Path | None = None, origin: str = "",
               allow_arrays: bool = False) -> DatasetSpec:
    """Check a dataset declaration; every problem is one UsageError line ``<where>: ...``. The schema::

        name = "mydata"          # required: letters, digits, _ - . (records, leaderboards, the run id)
        num_classes = 10         # required, >= 2; every label must be in [0, num_classes)
        image_size = 32          # required: images are image_size x image_size (square, as the backbones assume)
        channels = 3             # default 3
        mean = [0.49, 0.48, 0.45]   # optional, with std: per channel, on [0, 1] pixels; by default both are
        std = [0.25, 0.24, 0.26]    #   measured on the training split (as for the built-in datasets)
        format = "npz"           # "npz" (default) or "imagefolder"
        train = "train.npz"      # npz: x uint8 [N, H, W, C] ([N, H, W] when channels = 1), y integers [N]
        test = "test.npz"        # or test_fraction = 0.2: a fixed stratified hold-out of train (one file)
        # format = "imagefolder": root = "images", read as root/train/<class>/* and root/test/<class>/*
        #   (torchvision ImageFolder; test/ may be replaced by test_fraction), decoded once per process
        shuffle = true           # default: train is put in a fixed order (not the run seed's) before the
                                 #   validation split (the last --val-fraction) so a class-sorted file
                                 #   still validates on every class; false keeps the file's order
        [augment]
        crop_padding = 4         # random crops from the zero-padded image; default image_size // 8
        hflip = true             # random horizontal flips; default true (false for digits, text, ...)
        [ood]
        noise = "noise.npz"      # named OOD sets: an .npz with x (labels ignored) or a folder of images

    Validation is always the run's ``val_fraction`` (a run setting, so the TOML has no such key). Paths
    are relative to ``base`` (the TOML's folder). ``allow_arrays`` (register_dataset): ``train``/``test``
    may be ``(x, y)`` arrays and an OOD set an array ``x``."""
    from ensemble_bench.registry import did_you_mean

    def bad(msg: str):
        raise UsageError(f"{where}: {msg}")

    if not isinstance(doc, dict):
        bad(f"a dataset is a table of keys; got {type(doc).__name__}")
    for k in doc:
        if k not in SPEC_KEYS:
            hint = " (validation is the run's --val-fraction / val_fraction setting; a single-file dataset " \
                   "holds out its test split with test_fraction)" if k == "val_fraction" else ""
            bad(f"unknown key {k!r}{did_you_mean(k, list(SPEC_KEYS))}{hint}; valid keys: {', '.join(SPEC_KEYS)}")

    def integer(k: str, lo: int, hi: int | None = None, default: int | None = None) -> int:
        v = doc.get(k, default)
        if v is None:
            bad(f"missing {k} = ...")
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            bad(f"{k} must be an integer {rng}; got {v!r}")
        return int(v)

    name = doc.get("name")
    if name is None:
        bad('missing name = "..." (the dataset\'s name in records and leaderboards)')
    if not isinstance(name, str) or not _NAME_RE.match(name) or is_toml_path(name):
        bad(f"name must be letters, digits, '_', '-' or '.' (first a letter or digit, not ending in .toml); got {name!r}")
    if name in DATASETS:
        bad(f"name {name!r} is a built-in dataset; give your dataset its own name")
    num_classes = integer("num_classes", 2)
    image_size = integer("image_size", 1, MAX_IMAGE_SIZE)
    channels = integer("channels", 1, 64, default=3)
    fmt = doc.get("format", "npz")
    if fmt not in FORMATS:
        bad(f"unknown format {fmt!r}{did_you_mean(str(fmt), list(FORMATS))}; choose from {', '.join(FORMATS)}")

    stats = {}
    for k in ("mean", "std"):
        v = doc.get(k)
        if v is None:
            continue
        if not isinstance(v, list) or len(v) != channels or not all(
                isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) for e in v):
            bad(f"{k} must be a list of {channels} numbers (one per channel, on [0, 1] pixels); got {v!r}")
        if k == "std" and min(v) <= 0:
            bad(f"std must be > 0 for every channel; got {v!r}")
        # images are scaled to [0, 1] before they are normalised: torchvision's 0-255 values (mean = [125.3])
        # would turn every image into a near-constant and train at chance without any error
        if min(v) < 0 or max(v) > 1:
            rng = "[0, 1]" if k == "mean" else "(0, 1]"
            bad(f"{k} = {v!r} is outside {rng}: mean and std are on [0, 1] pixels"
                + (" (0-255 units? divide by 255)" if max(v) > 1 else ""))
        stats[k] = tuple(float(e) for e in v)
    if len(stats) == 1:
        bad(f"{next(iter(stats))} is set without {'std' if 'mean' in stats else 'mean'}; give both, or neither "
            f"(both are then measured on the training split)")

    aug = doc.get("augment", {})
    if not isinstance(aug, dict):
        bad(f"augment must be a table ([augment] with {', '.join(AUGMENT_KEYS)}); got {aug!r}")
    for k in aug:
        if k not in AUGMENT_KEYS:
            bad(f"unknown [augment] key {k!r}{did_you_mean(k, list(AUGMENT_KEYS))}; valid keys: {', '.join(AUGMENT_KEYS)}")
    pad = aug.get("crop_padding", image_size // 8)
    if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad <= image_size:
        bad(f"[augment] crop_padding must be an integer in [0, image_size = {image_size}]; got {pad!r}")
    hflip = aug.get("hflip", True)
    if not isinstance(hflip, bool):
        bad(f"[augment] hflip must be true or false; got {hflip!r}")
    shuffle = doc.get("shuffle", True)
    if not isinstance(shuffle, bool):
        bad(f"shuffle must be true or false; got {shuffle!r}")
    frac = doc.get("test_fraction")
    if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1):
        bad(f"test_fraction must be a number in (0, 1); got {frac!r}")

    def path(k: str, v: Any, folder: bool | None = False) -> Path:
        """``v`` (key ``k``) as an existing path: a file (folder False), a folder (True) or either (None)."""
        if not isinstance(v, (str, os.PathLike)) or not os.fspath(v).strip() or any(ord(c) < 32 for c in os.fspath(v)):
            bad(f"{k} must be a path (a string); got {v!r}")
        p = Path(v).expanduser()
        p = p if p.is_absolute() else base / p
        ok = p.is_dir() if folder else (p.is_file() if folder is False else p.exists())
        if not ok:
            kind = "folder" if folder else ("file" if folder is False else "file or folder")
            bad(f"{k} = {os.fspath(v)!r}: {kind} not found ({shown(p)})")
        return p.resolve()

    def source(k: str, v: Any):
        if allow_arrays and isinstance(v, (tuple, list)) and len(v) == 2 and all(hasattr(a, "shape") for a in v):
            return tuple(np.asarray(a) for a in v)
        return path(k, v)

    if fmt == "npz":
        if "root" in doc:
            bad('root is for format = "imagefolder"; an npz dataset names its files with train = ... and test = ...')
        if "train" not in doc:
            bad('missing train = "train.npz" (x: uint8 images [N, H, W, C], y: labels [N])')
        train = source("train", doc["train"])
        test = source("test", doc["test"]) if "test" in doc else None
        if test is not None and frac is not None:
            bad("test and test_fraction are both set; keep one")
        if test is None and frac is None:
            bad('say where the test split comes from: test = "test.npz", or test_fraction = 0.2 (a fixed '
                'stratified hold-out of train)')
    else:
        for k in ("train", "test"):
            if k in doc:
                bad(f'{k} is for format = "npz"; an imagefolder dataset reads root/train/ and root/test/')
        if channels not in (1, 3):
            bad(f"an imagefolder dataset has channels = 1 (decoded grey) or 3 (RGB); got {channels}")
        if "root" not in doc:
            bad('missing root = "folder" (with train/<class>/ and test/<class>/ image folders)')
        root = path("root", doc["root"], folder=True)
        train = root / "train"
        if not train.is_dir():
            bad(f"no train/ folder in root {shown(root)} (the ImageFolder layout: root/train/<class>/*.png, "
                f"root/test/<class>/*.png)")
        test = root / "test" if (root / "test").is_dir() else None
        if test is not None and frac is not None:
            bad(f"root {shown(root)} has a test/ folder and test_fraction is set; keep one")
        if test is None and frac is None:
            bad(f"no test/ folder in root {shown(root)}; add one, or hold out test_fraction = 0.2 of train/")

    ood_doc = doc.get("ood", {})
    if not isinstance(ood_doc, dict):
        bad(f'ood must be a table ([ood] with name = "file.npz" lines); got {ood_doc!r}')
    ood = {}
    for k, v in ood_doc.items():
        if not _OOD_RE.match(k):
            bad(f"OOD set name {k!r} must be letters, digits, '_' or '-' (first a letter or digit)")
        if allow_arrays and hasattr(v, "shape"):
            ood[k] = np.asarray(v)
        else:
            ood[k] = path(f"[ood] {k}", v, folder=None)
    return DatasetSpec(name=name, num_classes=num_classes, image_size=image_size, channels=channels, format=fmt,
                       train=train, test=test, test_fraction=float(frac) if frac is not None else None,
                       mean=stats.get("mean"), std=stats.get("std"), crop_padding=int(pad), hflip=hflip,
                       shuffle=shuffle, ood=ood, file=file, origin=origin)


def register_dataset(name: str, spec: Any, *, base_dir: str | os.PathLike | None = None) -> DatasetSpec:
    """Give a dataset a name, from a plugin: ``spec`` is the path of a dataset TOML, a dict of the same
    keys (``parse_spec``; ``train``/``test`` may also be ``(x, y)`` numpy arrays and an OOD set an array)
    or a ``DatasetSpec``. Relative paths (of the TOML, or in the dict) are relative to ``base_dir``, by
    default the folder of the file that calls this, so a plugin finds its data from any working folder
    (a Slurm job's too). The name then works wherever a built-in one does (``--dataset NAME``, a sweep's
    ``dataset``). The spec is checked now (a bad one fails the plugin's import with one line); arrays
    are read when a run loads the dataset.

    A name already taken is a UsageError naming both sources (a built-in, or the file and line that
    registered it first), except the same file and line registering it again (a plugin imported twice),
    which replaces it."""
    frame = sys._getframe(1)
    caller = f"{frame.f_globals.get('__name__', '?')} ({frame.f_code.co_filename}:{frame.f_lineno})"
    if not isinstance(name, str) or not _NAME_RE.match(name) or is_toml_path(name):
        raise UsageError(f"register_dataset: bad dataset name {name!r} (letters, digits, '_', '-', '.'; not "
                         f"ending in .toml) from {caller}")
    if name in DATASETS:
        raise UsageError(f"dataset {name!r} is registered twice: by ensemble_bench.data (built-in) and by {caller}")
    if name in _REGISTERED and _REGISTERED.source(name) != caller:   # before the spec is read: one line
        raise UsageError(f"dataset {name!r} is registered twice: by {_REGISTERED.source(name)} and by {caller}")
    origin = f"dataset {name!r} (registered by {caller})"
    base = Path(base_dir) if base_dir is not None else Path(frame.f_code.co_filename).resolve().parent
    if isinstance(spec, DatasetSpec):
        parsed = spec
    elif isinstance(spec, (str, os.PathLike)):   # relative to base too: the plugin works from any folder
        p = Path(spec).expanduser()
        parsed = load_spec(p if p.is_absolute() else base / p)
    elif isinstance(spec, dict):
        doc = dict(spec)
        doc.setdefault("name", name)
        parsed = parse_spec(doc, where=origin, base=base, origin=origin, allow_arrays=True)
    else:
        raise UsageError(f"register_dataset({name!r}): spec must be a .toml path, a dict or a DatasetSpec; got "
                         f"{type(spec).__name__} (from {caller})")
    if parsed.name != name:
        raise UsageError(f"{parsed.where}: declares name = {parsed.name!r} but is registered as {name!r} by {caller}; "
                         f"use one name")
    _REGISTERED.add(name, parsed, source=caller)
    _GENERATION[0] += 1
    return parsed


def unregister_dataset(name: str) -> None:
    """Remove a registered dataset (tests; a plugin has no need to)."""
    if _REGISTERED.remove(name):
        _GENERATION[0] += 1




def spec_stamp(key: str, spec: DatasetSpec) -> tuple:
    """What identity's cache is keyed on: the TOML file and every file it names (sizes, mtimes), and for
    a registered name the registration (arrays given in memory do not change under it)."""
    paths = [spec.file] if spec.file is not None else []
    for v in (spec.train, spec.test, *spec.ood.values()):
        if isinstance(v, Path):
            paths.append(v)
    return (_GENERATION[0] if key in _REGISTERED else 0, tuple(path_stamp(p) for p in paths))


def load_user(spec: DatasetSpec, val_fraction: float = 0.1) -> DataBundle:
    """A user dataset as a DataBundle. Each array is checked against the declaration first (uint8, image
    size, channels; integer labels in [0, num_classes); as many labels as images; non-empty splits),
    one UsageError line naming the file otherwise. Then: the test split (the test file or folder, or a
    fixed stratified ``test_fraction`` of train), the training order (``shuffle``: a fixed permutation,
    not the run seed's), and validation as for every dataset (the last ``val_fraction``)."""
    c, s, k = spec.channels, spec.image_size, spec.num_classes
    if spec.format == "npz":
        xtr, ytr = _user_npz(spec, "train", spec.train, "training")
        test = _user_npz(spec, "test", spec.test, "test") if spec.test is not None else None
    else:
        mode = "L" if c == 1 else "RGB"
        xtr, ytr, classes = decode_imagefolder(str(spec.train), mode, s, (), path_stamp(spec.train))
        if len(classes) != k:
            raise UsageError(f"{shown(spec.train)}: {len(classes)} class folders ({', '.join(classes[:10])}"
                             f"{', ...' if len(classes) > 10 else ''}) but num_classes = {k} in {spec.where}")
        test = None
        if spec.test is not None:
            xte, yte, _ = decode_imagefolder(str(spec.test), mode, s, tuple(classes), path_stamp(spec.test))
            test = (xte, yte)
    if test is None:   # a fixed stratified hold-out of train, independent of the run seed
        rng = np.random.default_rng(USER_SPLIT_SEED)
        held = np.concatenate([rng.permutation(np.flatnonzero(ytr == cl))[: int(round((ytr == cl).sum() * spec.test_fraction))]
                               for cl in np.unique(ytr)]) if len(ytr) else np.zeros(0, np.int64)
        mask = np.zeros(len(ytr), bool)
        mask[held] = True
        if not mask.any():
            raise UsageError(f"{spec.where}: test_fraction = {spec.test_fraction} holds out no test image from the "
                             f"{len(ytr)} training images; use a larger fraction or a test file")
        test = (xtr[mask], ytr[mask])
        xtr, ytr = xtr[~mask], ytr[~mask]
        if not len(xtr):
            raise UsageError(f"{spec.where}: test_fraction = {spec.test_fraction} leaves no training image")
    if spec.shuffle:
        order = np.random.default_rng(USER_SPLIT_SEED + 1).permutation(len(ytr))
        xtr, ytr = xtr[order], ytr[order]
    ood = {}
    for name, v in spec.ood.items():
        what = f"OOD ({name})"
        if isinstance(v, Path) and v.is_dir():
            if c not in (1, 3):
                raise UsageError(f"{spec.where}: [ood] {name} is a folder of images, which decode to 1 or 3 channels; "
                                 f"the dataset has channels = {c} (give an .npz with x instead)")
            x, _, _ = decode_images(str(v), "L" if c == 1 else "RGB", s, path_stamp(v))
        elif isinstance(v, Path):
            (x,) = read_npz(v, ("x",))
        else:
            x = v
        x = _user_images(spec, v, x, what)
        if not len(x):
            raise UsageError(f"{_where(spec, v)}: no {what} images (shape {_shape_text(x.shape)})")
        ood[name] = _chw(x)
    source = f"user dataset {spec.name} ({spec.where}, format {spec.format})"
    return _bundle(spec.name, k, (_chw(xtr), ytr), (_chw(test[0]), test[1]), ood, spec.augment, source,
                   _where(spec, spec.train), val_fraction, spec.mean, spec.std, spec.identity())


def _where(spec: DatasetSpec, v: Any) -> str:
    return shown(v) if isinstance(v, Path) else f"{spec.where}"


def _user_images(spec: DatasetSpec, v: Any, x: Any, what: str) -> np.ndarray:
    """``x`` as uint8 [N, H, W, C] of the declared size and channels ([N, H, W] accepted for one channel)."""
    c, s = spec.channels, spec.image_size
    shape = tuple(getattr(x, "shape", ()))
    dtype = getattr(x, "dtype", type(x).__name__)
    if c == 1 and len(shape) == 3 and shape[1:] == (s, s) and dtype == np.uint8:
        return x[..., None]
    if len(shape) != 4 or shape[1:] != (s, s, c) or dtype != np.uint8:
        raise UsageError(f"{_where(spec, v)}: {what} images must be uint8 [N, {s}, {s}, {c}] (image_size = {s}, "
                         f"channels = {c} in {spec.where}); got {dtype} {_shape_text(shape)}")
    return x


def _user_npz(spec: DatasetSpec, key: str, v: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The checked (x [N, H, W, C], y int64 [N]) of a train or test source (an .npz with x and y, or arrays)."""
    x, y = read_npz(v, ("x", "y")) if isinstance(v, Path) else v
    x = _user_images(spec, v, x, what)
    if not len(x):
        raise UsageError(f"{_where(spec, v)}: no {what} images (shape {_shape_text(x.shape)})")
    y = np.asarray(y)
    _check_labels(_where(spec, v), y, len(x), spec.name, what, k=spec.num_classes)
    return x, _labels(y)
