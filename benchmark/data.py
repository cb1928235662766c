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
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ensemble_bench.errors import UsageError

DATASETS = ("digits", "cifar10", "cifar100", "svhn")
OOD_SETS = {"digits": ("photos",), "cifar10": ("svhn", "cifar100"), "cifar100": ("svhn", "cifar10"),
            "svhn": ("cifar10", "cifar100")}
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}
IMAGE_SHAPES = {"digits": (1, 8), "cifar10": (3, 32), "cifar100": (3, 32), "svhn": (3, 32)}   # (channels, size)
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
                          self.source)


def fingerprint(bundle: DataBundle) -> dict:
    """The identity of the data a run trains and is scored on: the dataset's name, its split sizes and
    a sha256 of every array actually loaded (images and labels of train, val, test, and the OOD sets), so
    a subset, another copy or another validation split is another experiment."""
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
    return {"name": bundle.name, "n_train": len(bundle.train), "n_val": len(bundle.val) if bundle.val is not None else 0,
            "n_test": len(bundle.test), "ood": {k: int(v.shape[0]) for k, v in sorted(bundle.ood.items())},
            "sha256": h.hexdigest()[:16]}


@functools.lru_cache(maxsize=16)
def _identity(name: str, root: str | None, download: bool, val_fraction: float, stamp: tuple) -> dict:
    return fingerprint(load(name, root, download, val_fraction))


def identity(name: str, data_dir: str | os.PathLike | None = None, download: bool = False,
             val_fraction: float = 0.1) -> dict:
    """``fingerprint`` of the dataset as ``load`` would give it (cached per process while the data
    folder's files keep their sizes and modification times)."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    stamp = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.glob("*") if p.is_file())) \
        if root.is_dir() else ()
    return dict(_identity(name, str(data_dir) if data_dir is not None else None, bool(download),
                          float(val_fraction), stamp))


def check_name(name: str) -> None:
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def default_data_dir() -> Path:
    return Path(os.environ.get("ENSEMBLE_BENCH_DATA", "data"))


# ------------------------------------------------------------------------------------------ loading
def load(name: str, data_dir: str | os.PathLike | None = None, download: bool = False,
         val_fraction: float = 0.1) -> DataBundle:
    """The dataset as uint8 tensors. Every array is checked before anything else happens (shape, dtype
    and size per dataset, label type and range, matching counts, non-empty training split after the
    validation split is taken, non-empty test split): a bad data file is one :class:`UsageError` line
    naming the file."""
    check_name(name)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
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
    n_val = int(round(len(xtr) * val_fraction))
    if len(xtr) - n_val < 1:
        raise UsageError(f"--val-fraction {val_fraction} leaves no training images: the validation split takes "
                         f"{n_val} of the {len(xtr)} training images of {name} ({where_tr}); use a smaller "
                         f"fraction (default 0.1)")
    xtr, ytr, xte, yte = map(torch.from_numpy, (xtr, ytr, xte, yte))
    if n_val > 0:
        train, val = Split(xtr[:-n_val], ytr[:-n_val]), Split(xtr[-n_val:], ytr[-n_val:])
    else:
        train, val = Split(xtr, ytr), None
    xf = train.x.float().div_(255)
    mean = tuple(xf.mean(dim=(0, 2, 3)).tolist())
    std = tuple(xf.std(dim=(0, 2, 3)).nan_to_num(1.0).clamp_min(1e-3).tolist())   # std of 1 image: nan
    return DataBundle(name, NUM_CLASSES[name], train, val, Split(xte, yte),
                      {k: torch.from_numpy(v) for k, v in ood.items()}, mean, std, augment, source)


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


def _check_labels(where, y, n: int, name: str, what: str) -> None:
    k = NUM_CLASSES[name]
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


def _read_npz(path: str | Path, keys: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    p = Path(path)
    try:
        st = p.stat()
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = None
    return _read_npz_cached(str(p), keys, stamp)


@functools.lru_cache(maxsize=8)
def _read_npz_cached(path: str, keys: tuple[str, ...], stamp) -> tuple[np.ndarray, ...]:
    """The arrays ``keys`` of one .npz file (cached while the file keeps its size and mtime). Never
    unpickles; a file that is no .npz (random bytes, a pickle, a truncated archive) is one line that
    says so, without numpy's advice to load it with pickles allowed."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):    # a bare .npy array, not an archive of named arrays
                raise UsageError(f"cannot read data file {path}: not a valid .npz data file (a single array, "
                                 f"expected an archive with {', '.join(keys)})")
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise UsageError(f"{path} is not a valid data file: missing {', '.join(missing)}")
            return tuple(z[k] for k in keys)
    except UsageError:
        raise
    except OSError as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise UsageError(f"cannot read data file {path}: {e.strerror or type(e).__name__}") from None
        raise UsageError(f"cannot read data file {path}: not a valid .npz data file") from None
    except Exception as e:   # BadZipFile, a pickle or random bytes (ValueError), a corrupt member (zlib, lzma), ...
        detail = str(e).splitlines()[0] if str(e) else ""
        if "pickle" in detail.lower() or len(detail) > 120:   # numpy suggests loading pickles: never repeat that
            detail = ""
        raise UsageError(f"cannot read data file {path}: not a valid .npz data file"
                         + (f" ({detail})" if detail else "")) from None


def _load_id(name: str, root: Path, download: bool):
    """((x_train, y_train), (x_test, y_test), (where_train, where_test)); x as uint8 [N, C, H, W]."""
    if name == "cifar10":
        tr, te = _npz_path(root, "cifar10_train"), _npz_path(root, "cifar10_test")
        if tr and te:
            xtr, ytr = _read_npz(tr, ("x_train", "y_train"))
            xte, yte = _read_npz(te, ("x_test", "y_test"))
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
        (x,) = _read_npz(p, ("x",))
        _check_images(p, x, name, f"OOD ({name})")
        return _chw(x)
    if name == "cifar10" and (p := _npz_path(root, "cifar10_test")):
        (x,) = _read_npz(p, ("x_test",))
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


# ------------------------------------------------------------------------------------ batch loading
def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (zero padding ``aug.crop_pad``) then random horizontal flip of a whole batch
    [B, C, H, W] (uint8 or float), as tensor ops on x's device: one gather of a flat index that encodes
    each image's offset and flip; no per-image Python. Random numbers come from ``generator`` (CPU)."""
    b, c, h, w = x.shape
    p = aug.crop_pad
    if p <= 0 and not aug.flip:
        return x
    dev = x.device
    hp, wp = h + 2 * p, w + 2 * p
    padded = F.pad(x, (p, p, p, p)) if p > 0 else x
    dy = torch.randint(0, 2 * p + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (b, 1), generator=generator)
    j = torch.arange(w).expand(b, w)
    if aug.flip:
        flip = torch.rand(b, 1, generator=generator) < 0.5
        j = torch.where(flip, (w - 1) - j, j)      # crop, then mirror the crop
    rows = (dy + torch.arange(h)) * wp              # [B, H]
    cols = dx + j                                   # [B, W]
    idx = (rows[:, :, None] + cols[:, None, :]).view(b, 1, h * w).to(dev).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, idx).view(b, c, h, w)


class Normalizer:
    """uint8 -> float, (x/255 - mean) / std, on the batch's device."""

    def __init__(self, mean, std, device, channels_last: bool = False):
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device))).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(1, -1, 1, 1)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addcmul(self.shift, x.float(), self.scale)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out


class TensorLoader:
    """Batches of a Split already on the device: one randperm per epoch (own generator, so the data
    order is reproducible and resumable), gather, augment, normalise. Nothing waits, so nothing needs
    worker processes or prefetching."""

    def __init__(self, split: Split, batch_size: int, normalizer: Normalizer, *, shuffle: bool = True,
                 augment: Augment | None = None, generator: torch.Generator | None = None, drop_last: bool = False):
        self.split, self.batch_size, self.normalizer = split, batch_size, normalizer
        self.shuffle, self.augment, self.generator, self.drop_last = shuffle, augment, generator, drop_last

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.split)
        dev = self.split.x.device
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator, device="cpu").to(dev)
        else:
            order = torch.arange(n, device=dev)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.split.x[idx]
            if self.augment is not None:
                x = augment_batch(x, self.augment, self.generator)
            yield self.normalizer(x), self.split.y[idx]
