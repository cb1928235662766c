"""Datasets as uint8 tensors kept on the training device, and a batch loader that augments on tensors.

Sources, in order of preference for ``--data-dir P``:
  1. the .npz layout of the development copies (P/cifar10_train.npz, cifar10_test.npz, svhn.npz,
     cifar100_test.npz),
  2. torchvision's datasets under P (``--download`` fetches the official files).
``digits`` (the offline default) ships with scikit-learn: 1,797 8x8 grey handwritten digits; its OOD
set ``photos`` is 8x8 grey patches of the two photographs scikit-learn ships (china.jpg, flower.jpg).

The test split is always the dataset's own test split (digits: a fixed 20% stratified hold-out that
does not depend on the run seed); validation is the LAST ``val_fraction`` of the training set (the
45k/5k CIFAR split of FreeTickets and the bridge paper).

Your own data: wherever a dataset name is accepted, a ``.toml`` path or a name a plugin registered
works too (``ensemble_bench.userdata``); ``load``, ``identity`` and the per-dataset tables answer for it.
Files are read by ``ensemble_bench.datafiles``; batches are made by ``ensemble_bench.loader``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ensemble_bench.datafiles import read_npz
from ensemble_bench.errors import UsageError

DATASETS = ("digits", "cifar10", "cifar100", "svhn")   # the built-in names (user datasets: names())


class _PerDataset(dict):
    """A table keyed by dataset name that holds the built-in datasets and answers for a user dataset (a
    registered name or a ``.toml`` path) from its spec, without loading any array: the harness indexes
    ``NUM_CLASSES[cfg.dataset]`` and ``IMAGE_SHAPES[cfg.dataset]`` whatever the dataset is. An unknown
    name is a KeyError as for a plain dict; a bad TOML file is the UsageError of ``load_spec``."""

    def __init__(self, builtin: dict, of_spec):
        super().__init__(builtin)
        self._of_spec = of_spec

    def __missing__(self, key):
        from ensemble_bench.userdata import user_spec

        spec = user_spec(key) if isinstance(key, (str, os.PathLike)) else None
        if spec is None:
            raise KeyError(key)
        return self._of_spec(spec)

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default


OOD_SETS = _PerDataset({"digits": ("photos",), "cifar10": ("svhn", "cifar100"), "cifar100": ("svhn", "cifar10"),
                        "svhn": ("cifar10", "cifar100")}, lambda spec: tuple(spec.ood))
NUM_CLASSES = _PerDataset({"digits": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}, lambda spec: spec.num_classes)
IMAGE_SHAPES = _PerDataset({"digits": (1, 8), "cifar10": (3, 32), "cifar100": (3, 32), "svhn": (3, 32)},
                           lambda spec: (spec.channels, spec.image_size))   # (channels, size)
NPZ_FILES = {"cifar10_train": "cifar10_train.npz", "cifar10_test": "cifar10_test.npz",
             "svhn": "svhn.npz", "cifar100_test": "cifar100_test.npz"}


@dataclass
class Augment:
    crop_pad: int = 4        # random crop of the original size from the image zero-padded by this
    flip: bool = True        # random horizontal flip


@dataclass
class Split:
    x: torch.Tensor          # uint8 [N, C, H, W]
    y: torch.Tensor          # int64 [N]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class DataBundle:
    name: str
    num_classes: int
    train: Split
    val: Split | None
    test: Split
    ood: dict[str, torch.Tensor]           # uint8 [K, C, H, W] per OOD set
    mean: tuple[float, ...]                # per channel, on [0, 1] pixels
    std: tuple[float, ...]
    augment: Augment = field(default_factory=Augment)
    source: str = ""
    # a user dataset's declared settings (DatasetSpec.identity()); None for the built-in ones, whose
    # settings are fixed by their name. fingerprint() hashes it with the arrays.
    spec_id: dict | None = None

    @property
    def in_channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.x.shape[-1])

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "num_classes": self.num_classes,
                "n_train": len(self.train), "n_val": len(self.val) if self.val is not None else 0,
                "n_test": len(self.test), "ood": {k: int(v.shape[0]) for k, v in self.ood.items()},
                "image_shape": list(self.train.x.shape[1:]), "augment": vars(self.augment)}

    def to(self, device) -> "DataBundle":
        return DataBundle(self.name, self.num_classes, self.train.to(device),
                          self.val.to(device) if self.val is not None else None, self.test.to(device),
                          {k: v.to(device) for k, v in self.ood.items()}, self.mean, self.std, self.augment,
                          self.source, self.spec_id)


def fingerprint(bundle: DataBundle) -> dict:
    """The identity of the data a run trains and is scored on: the dataset's name, its split sizes and
    a sha256 of every array actually loaded (images and labels of train, val, test, and the OOD sets), so
    a subset, another copy or another validation split is another experiment.

    A user dataset (``bundle.spec_id`` set) also hashes its declared settings (normalisation, augmentation,
    image size, classes, split rule, OOD names: ``DatasetSpec.identity``) into the same ``sha256``, and
    adds ``spec_sha256``: the same arrays with another augmentation train another model, and ``sha256``
    is what the trainer's stage reuse is keyed on. Built-in datasets hash exactly as before (their run
    ids do not change)."""
    h = hashlib.sha256()
    parts = [("train", bundle.train), ("val", bundle.val), ("test", bundle.test)]
    for name, split in parts:
        h.update(name.encode())
        if split is not None:
            for t in (split.x, split.y):
                h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
                h.update(t.contiguous().cpu().numpy().tobytes())
    for name in sorted(bundle.ood):
        t = bundle.ood[name]
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(t.contiguous().cpu().numpy().tobytes())
    if bundle.spec_id is not None:
        h.update(b"spec" + _canonical(bundle.spec_id).encode())
    out = {"name": bundle.name, "n_train": len(bundle.train), "n_val": len(bundle.val) if bundle.val is not None else 0,
           "n_test": len(bundle.test), "ood": {k: int(v.shape[0]) for k, v in sorted(bundle.ood.items())},
           "sha256": h.hexdigest()[:16]}
    if bundle.spec_id is not None:
        out["spec_sha256"] = hashlib.sha256(_canonical(bundle.spec_id).encode()).hexdigest()[:16]
    return out


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=16)
def _identity(name: str, root: str | None, download: bool, val_fraction: float, stamp: tuple) -> dict:
    return fingerprint(load(name, root, download, val_fraction))


def identity(name: str, data_dir: str | os.PathLike | None = None, download: bool = False,
             val_fraction: float = 0.1) -> dict:
    """``fingerprint`` of the dataset as ``load`` would give it (cached per process while the data
    folder's files keep their sizes and modification times; for a user dataset: its TOML file and every
    file or folder it names)."""
    from ensemble_bench.userdata import spec_stamp, user_spec

    key = check_name(name)
    spec = user_spec(key)
    if spec is not None:   # data_dir and download do not apply: the TOML names its own files
        return dict(_identity(key, None, False, float(val_fraction), spec_stamp(key, spec)))
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    stamp = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.glob("*") if p.is_file())) \
        if root.is_dir() else ()
    return dict(_identity(name, str(data_dir) if data_dir is not None else None, bool(download),
                          float(val_fraction), stamp))


def names() -> tuple[str, ...]:
    """Every dataset name: the built-in ones, then those registered by plugins (``register_dataset``).
    A path ending in ``.toml`` is accepted besides these (``userdata.load_spec``)."""
    from ensemble_bench.userdata import registered_names

    return DATASETS + registered_names()


def is_toml_path(name: Any) -> bool:
    """A dataset given as a TOML file: any string (or path) ending in ``.toml``."""
    return isinstance(name, (str, os.PathLike)) and os.fspath(name).lower().endswith(".toml")


def check_name(name: str) -> str:
    """The dataset's canonical name: a built-in or registered name as given, a TOML file as its absolute
    path (parsed and checked: one UsageError line for any bad field or missing file). The absolute path
    lets a sweep's Slurm job and ``evaluate`` find the file from any folder and makes two spellings of
    one file one leaderboard row; the run id holds the dataset's declared name instead of the path
    (``identity_name``), so moving the files keeps the id."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        raise UsageError(f"dataset must be a name or a .toml file; got {name!r}")
    from ensemble_bench.userdata import load_spec, registered_names

    if name in DATASETS or name in registered_names():
        return name
    if is_toml_path(name):
        return str(load_spec(name).file)
    from ensemble_bench.registry import did_you_mean

    raise UsageError(f"unknown dataset {name!r}{did_you_mean(name, list(names()))}; choose from {', '.join(names())}, "
                     f"or a dataset described in a .toml file (README: Your own dataset)")


def identity_name(dataset: str, data_id: dict | None = None) -> str:
    """What a run id holds for ``dataset``: the name itself, or for a TOML file the ``name`` it declares
    (from ``data_id`` when given, else from the file), never its path: the data themselves are in the
    run id through ``data_id``."""
    if not is_toml_path(dataset):
        return dataset
    if data_id and data_id.get("name"):
        return str(data_id["name"])
    from ensemble_bench.userdata import load_spec

    return load_spec(dataset).name


def default_data_dir() -> Path:
    return Path(os.environ.get("ENSEMBLE_BENCH_DATA", "data"))


# ------------------------------------------------------------------------------------------ loading
def load(name: str, data_dir: str | os.PathLike | None = None, download: bool = False,
         val_fraction: float = 0.1) -> DataBundle:
    """The dataset as uint8 tensors. Every array is checked before anything else happens (shape, dtype
    and size per dataset, label type and range, matching counts, non-empty training split after the
    validation split is taken, non-empty test split): a bad data file is one :class:`UsageError` line
    naming the file. A user dataset (a ``.toml`` path or a registered name) loads through
    ``userdata.load_user`` with the same checks against its declared image size, channels and classes."""
    from ensemble_bench.userdata import load_user, user_spec

    name = check_name(name)
    spec = user_spec(name)
    if spec is not None:
        return load_user(spec, val_fraction)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if name != "digits" and root.exists() and not root.is_dir():
        raise UsageError(f"--data-dir {root} is a file, not a folder with the {name} data")
    if name == "digits":
        (xtr, ytr), (xte, yte), ood, source = _digits()
        augment = Augment(crop_pad=1, flip=False)   # 8x8 digits: 1-pixel shifts; mirrored digits are other digits
        where_tr = where_te = "scikit-learn digits"
    else:
        (xtr, ytr), (xte, yte), (where_tr, where_te) = _load_id(name, root, download)
        ood = {o: _load_ood(o, root, download) for o in OOD_SETS[name]}
        source = _source(name, root)
        augment = Augment(crop_pad=4, flip=name != "svhn")
    _check_split(name, where_tr, "training", xtr, ytr)
    _check_split(name, where_te, "test", xte, yte)
    return _bundle(name, NUM_CLASSES[name], (xtr, ytr), (xte, yte), ood, augment, source, where_tr, val_fraction)


def _bundle(name: str, num_classes: int, train, test, ood: dict, augment: Augment, source: str, where_tr,
            val_fraction: float, mean=None, std=None, spec_id: dict | None = None) -> DataBundle:
    """Checked arrays ([N, C, H, W] uint8, int64 labels) -> DataBundle: validation is the LAST
    ``val_fraction`` of the training set; mean and std (unless given) are measured on what trains."""
    (xtr, ytr), (xte, yte) = train, test
    n_val = int(round(len(xtr) * val_fraction))
    if len(xtr) - n_val < 1:
        raise UsageError(f"--val-fraction {val_fraction} leaves no training images: the validation split takes "
                         f"{n_val} of the {len(xtr)} training images of {name} ({where_tr}); use a smaller "
                         f"fraction (default 0.1)")
    xtr, ytr, xte, yte = map(torch.from_numpy, (xtr, ytr, xte, yte))
    if n_val > 0:
        train_s, val = Split(xtr[:-n_val], ytr[:-n_val]), Split(xtr[-n_val:], ytr[-n_val:])
    else:
        train_s, val = Split(xtr, ytr), None
    if mean is None or std is None:
        xf = train_s.x.float().div_(255)
        mean = tuple(xf.mean(dim=(0, 2, 3)).tolist())
        std = tuple(xf.std(dim=(0, 2, 3)).nan_to_num(1.0).clamp_min(1e-3).tolist())   # std of 1 image: nan
    return DataBundle(name, num_classes, train_s, val, Split(xte, yte),
                      {k: torch.from_numpy(v) for k, v in ood.items()}, tuple(mean), tuple(std), augment, source,
                      spec_id)


# ------------------------------------------------------------------------------------- validation
def _shape_text(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _check_images(where, x, name: str, what: str, layout: str = "NHWC") -> None:
    """``x`` (of the dataset ``name``) is uint8 [N, H, W, C] (``layout`` NHWC: the .npz files) or
    [N, C, H, W] (NCHW: decoded arrays) with the dataset's size and channels; one line naming the file,
    the expected and the actual shape otherwise."""
    c, s = IMAGE_SHAPES[name]
    per = (s, s, c) if layout == "NHWC" else (c, s, s)
    expected = "[N, " + ", ".join(map(str, per)) + "]"
    shape = tuple(getattr(x, "shape", ()))
    dtype = getattr(x, "dtype", type(x).__name__)
    if len(shape) != 4 or tuple(shape[1:]) != per or dtype != np.uint8:
        raise UsageError(f"{where}: {what} images must be uint8 {expected} for {name}; got {dtype} {_shape_text(shape)}")


def _check_labels(where, y, n: int, name: str, what: str, k: int | None = None) -> None:
    k = NUM_CLASSES[name] if k is None else k
    if not (np.issubdtype(y.dtype, np.integer) and y.dtype != np.bool_):
        raise UsageError(f"{where}: {what} labels must be integers; got {y.dtype}")
    if y.ndim > 2 or y.size != n:
        raise UsageError(f"{where}: {n} {what} images but {y.size} labels (labels shape {_shape_text(y.shape)})")
    flat = y.reshape(-1)
    bad = np.flatnonzero((flat < 0) | (flat >= k))
    if bad.size:
        i = int(bad[0])
        raise UsageError(f"{where}: {what} label {int(flat[i])} (index {i}) is outside [0, {k}) for {name} "
                         f"({bad.size} of {flat.size} labels out of range)")


def _check_split(name: str, where, what: str, x, y) -> None:
    """One split of dataset ``name`` as ``load`` uses it (images [N, C, H, W], labels [N])."""
    _check_images(where, x, name, what, layout="NCHW")
    if len(x) == 0:
        raise UsageError(f"{where}: no {what} images (shape {_shape_text(x.shape)})")
    _check_labels(where, y, len(x), name, what)


def _chw(x: np.ndarray) -> np.ndarray:
    """[N, H, W, C] uint8 -> contiguous [N, C, H, W]."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _labels(y) -> np.ndarray:
    return np.asarray(y, dtype=np.int64).reshape(-1)


def _npz_path(root: Path, key: str) -> Path | None:
    p = root / NPZ_FILES[key]
    return p if p.is_file() else None


def _load_id(name: str, root: Path, download: bool):
    """((x_train, y_train), (x_test, y_test), (where_train, where_test)); x as uint8 [N, C, H, W]."""
    if name == "cifar10":
        tr, te = _npz_path(root, "cifar10_train"), _npz_path(root, "cifar10_test")
        if tr and te:
            xtr, ytr = read_npz(tr, ("x_train", "y_train"))
            xte, yte = read_npz(te, ("x_test", "y_test"))
            for p, x, y, what in ((tr, xtr, ytr, "training"), (te, xte, yte, "test")):
                _check_images(p, x, name, what)
                if len(x) == 0:
                    raise UsageError(f"{p}: no {what} images (shape {_shape_text(x.shape)})")
                _check_labels(p, y, len(x), name, what)
            return (_chw(xtr), _labels(ytr)), (_chw(xte), _labels(yte)), (str(tr), str(te))
        if tr or te:
            have, lack = (tr, NPZ_FILES["cifar10_test"]) if tr else (te, NPZ_FILES["cifar10_train"])
            if not _torchvision_present(name, root):
                raise UsageError(f"cifar10 data incomplete in {root}: {have.name} is there but {lack} is not; "
                                 f"copy both .npz files, or pass --download")
    where = f"torchvision {name} under {root}"
    return (_torchvision(name, root, download, train=True), _torchvision(name, root, download, train=False),
            (f"{where} (train)", f"{where} (test)"))


def _load_ood(name: str, root: Path, download: bool) -> np.ndarray:
    key = {"svhn": "svhn", "cifar100": "cifar100_test"}.get(name)
    if key and (p := _npz_path(root, key)):
        (x,) = read_npz(p, ("x",))
        _check_images(p, x, name, f"OOD ({name})")
        return _chw(x)
    if name == "cifar10" and (p := _npz_path(root, "cifar10_test")):
        (x,) = read_npz(p, ("x_test",))
        _check_images(p, x, name, "OOD (cifar10)")
        return _chw(x)
    x = _torchvision(name, root, download, train=False)[0]
    _check_images(f"torchvision {name} under {root}", x, name, f"OOD ({name})", layout="NCHW")
    return x


def _source(name: str, root: Path) -> str:
    if name == "cifar10" and _npz_path(root, "cifar10_train"):
        return (f"npz copies in {root}: CIFAR-10 JPEG-decoded 19k-image class-balanced training subset, "
                "complete 10k test set; SVHN train-split 1,083 images and CIFAR-100 first 916 test images as OOD")
    return f"torchvision {name} under {root}"


def _torchvision_present(name: str, root: Path) -> bool:
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}.get(name)
    if folder:
        return (root / folder).is_dir()
    return any((root / f).is_file() for f in ("train_32x32.mat", "test_32x32.mat"))


def _torchvision(name: str, root: Path, download: bool, train: bool):
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "svhn": torchvision.datasets.SVHN}[name]
    part = "train" if train else "test"
    existed = root.exists()
    if name == "cifar10":
        missing = (f"{name} {part} data not found in {root} (no cifar10_train.npz + cifar10_test.npz, no torchvision "
                   f"files); pass --data-dir to a folder with the .npz files, or --download")
    else:
        missing = (f"{name} {part} data not found in {root} (no torchvision files; the .npz copies hold {name} only "
                   f"as an OOD set); pass --download")
    try:
        if name == "svhn":
            ds = cls(str(root), split=part, download=download)
            return np.ascontiguousarray(ds.data), _labels(ds.labels)
        ds = cls(str(root), train=train, download=download)
        return _chw(ds.data), _labels(ds.targets)
    except RuntimeError as e:   # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        if download:
            raise UsageError(f"{name} {part} data not usable in {root} after --download "
                             f"({str(e).split('.')[0] or type(e).__name__}); delete the partial files and retry") from None
        raise UsageError(missing) from None
    except OSError as e:        # the download itself (no network, refused, disk full)
        if download and not existed:   # leave no empty folder behind
            with contextlib.suppress(OSError):
                root.rmdir()
        reason = str(getattr(e, "reason", "") or e.strerror or e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"cannot download {name} {part} data into {root}: {reason}; put the .npz files in a "
                         f"folder and pass --data-dir, or retry --download") from None
    except ImportError as e:    # torchvision's SVHN reader needs scipy
        raise UsageError(f"cannot read torchvision's {name} files: {e}") from None


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits, load_sample_images

    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]  # [N,1,8,8]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(20170101)       # fixed: the test split never depends on the run seed
    test_idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: int(round((y == c).sum() * 0.2))]
                               for c in range(10)])
    is_test = np.zeros(len(y), bool)
    is_test[test_idx] = True
    order = rng.permutation(np.flatnonzero(~is_test))
    photos = []
    for img in load_sample_images().images:      # two 427x640 RGB photographs
        grey = img.astype(np.float64).mean(axis=2)
        for _ in range(300):
            r, c = rng.integers(0, grey.shape[0] - 32), rng.integers(0, grey.shape[1] - 32)
            patch = grey[r:r + 32, c:c + 32].reshape(8, 4, 8, 4).mean(axis=(1, 3))
            lo, hi = patch.min(), patch.max()
            patch = (patch - lo) / (hi - lo + 1e-8) * 255.0   # stretched to the digits' full range
            photos.append(np.rint(patch).astype(np.uint8))
    ood = {"photos": np.stack(photos)[:, None]}
    source = "scikit-learn handwritten digits (1,797 8x8 images; fixed 20% test split); OOD: 600 8x8 patches of scikit-learn's sample photos"
    return (x[order], y[order]), (x[is_test], y[is_test]), ood, source
