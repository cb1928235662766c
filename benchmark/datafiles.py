"""Reading data files into arrays: .npz archives and image folders, each problem one UsageError line.

No dataset is named here: ``data`` (the built-in datasets) and ``userdata`` (datasets a user declares)
check what these functions return against what the dataset declares. Reads are cached per process while
the files keep their sizes and modification times (``path_stamp``).
"""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import numpy as np

from ensemble_bench.errors import UsageError


def shown(p) -> str:
    """A path as a message shows it: relative to the current folder when under it, else absolute."""
    try:
        rel = os.path.relpath(p)
    except ValueError:
        return str(p)
    return str(p) if rel.startswith("..") else rel


def path_stamp(p: Path) -> tuple:
    """(path, size, mtime) of a file, or of every file under a folder."""
    if p.is_file():
        st = p.stat()
        return ((str(p), st.st_size, st.st_mtime_ns),)
    out = []
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames.sort()
        for f in sorted(filenames):
            q = os.path.join(dirpath, f)
            with contextlib.suppress(OSError):
                st = os.stat(q)
                out.append((q, st.st_size, st.st_mtime_ns))
    return tuple(out)


def read_npz(path: str | Path, keys: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """The arrays ``keys`` of the .npz file ``path`` (see ``_read_npz_cached``)."""
    p = Path(path)
    try:
        st = p.stat()
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = None
    return _read_npz_cached(str(p), keys, stamp)


def numpy_error_detail(e: BaseException) -> str:
    """The first line of numpy's error reading a .npy/.npz file, for a message, or "" when it is long or
    speaks of pickles: numpy says "This file contains pickled (object) data" of any file that is not an
    array (random bytes, a text file) and advises loading it unsafely with ``allow_pickle``; this suite
    never unpickles a data file (that runs whatever code the file holds), so it never repeats that advice.
    The suite's .npy/.npz readers that show numpy's reason take it from here."""
    detail = str(e).splitlines()[0] if str(e) else ""
    return "" if "pickle" in detail.lower() or len(detail) > 120 else detail


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
        detail = numpy_error_detail(e)
        raise UsageError(f"cannot read data file {path}: not a valid .npz data file"
                         + (f" ({detail})" if detail else "")) from None


def _pil_open(path: str, mode: str, size: int) -> np.ndarray:
    """One image file -> uint8 [size, size, C]: converted to ``mode``, the shorter side resized to
    ``size`` (bilinear, antialiased) and the centre ``size`` x ``size`` cropped, so the aspect ratio is
    kept (a plain resize would squash non-square images)."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
    except Exception as e:   # PIL.UnidentifiedImageError, truncated files, ...
        raise UsageError(f"cannot read image {shown(path)}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    if im.size != (size, size):
        im = TF.center_crop(TF.resize(im, size), [size, size])
    a = np.asarray(im, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a


@functools.lru_cache(maxsize=8)
def decode_imagefolder(root: str, mode: str, size: int, classes: tuple, stamp: tuple):
    """torchvision ImageFolder ``root`` (one folder per class) decoded ONCE per process (cached while its
    files keep their sizes and mtimes) to (x uint8 [N, size, size, C], y int64 [N], class names). With
    ``classes`` (the training folder's), labels follow those names, so a test/ folder that lacks a class
    keeps the training label of every other class; a class the training folder lacks is refused."""
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(root, loader=lambda p: p)   # only the file list and labels; decoded below
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f"{shown(root)}: {str(e).splitlines()[0][:200]} (ImageFolder layout: "
                         f"{shown(root)}/<class>/<image>)") from None
    if classes:
        extra = [cl for cl in ds.classes if cl not in classes]
        if extra:
            raise UsageError(f"{shown(root)}: class folder {extra[0]!r} is not among the training classes "
                             f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
        remap = np.array([classes.index(cl) for cl in ds.classes], dtype=np.int64)
    else:
        remap = np.arange(len(ds.classes), dtype=np.int64)
    x = np.stack([_pil_open(p, mode, size) for p, _ in ds.samples])
    y = remap[np.array([t for _, t in ds.samples], dtype=np.int64)]
    return x, y, tuple(ds.classes)


@functools.lru_cache(maxsize=8)
def decode_images(root: str, mode: str, size: int, stamp: tuple):
    """Every image file under ``root`` (any depth, sorted by path; an OOD set needs no classes), decoded
    as by ``_pil_open``: (x, None, None)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files = sorted(str(p) for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise UsageError(f"{shown(root)}: no image files ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
    return np.stack([_pil_open(p, mode, size) for p in files]), None, None
