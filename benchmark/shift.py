"""Distribution shift: the CIFAR-10-C / CIFAR-100-C corruptions, their release layout, and shift evaluation.

Paper: D. Hendrycks and T. Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019. The 15 benchmark corruptions, each at severities 1..5, with the constants of the
paper's CIFAR generator: ``ImageNet-C/create_c/make_cifar_c.py`` of github.com/hendrycks/robustness (last
changed in commit ca360085d57889288c4143fddd8a707bbcae01bd; read at 8190fe329f5f072a06e3a2aea02bb5dda69aed9f).
The CIFAR constants differ from ImageNet-C's (e.g. Gaussian noise sigma = 0.04 .. 0.10 on [0, 1] pixels, not
0.08 .. 0.38); every one is in ``PARAMS`` below, in the generator's order, with the generator's meaning.

What is exactly the generator's recipe and what is not (``APPROXIMATE`` lists the latter, and every written
set records it in its metadata.json):

* numpy / scipy / PIL give the same operations the generator used for gaussian_noise, shot_noise,
  impulse_noise (skimage ``random_noise(mode="s&p")``: each value independently replaced with probability
  ``amount``, by 1 or 0 with equal odds), defocus_blur (OpenCV filter2D with BORDER_REFLECT_101 =
  scipy ``mode="mirror"``), glass_blur (skimage ``gaussian`` = scipy ``gaussian_filter(mode="nearest",
  truncate=4)`` on the two image axes), zoom_blur (``scipy.ndimage.zoom(order=1)``, applied as the exact
  linear operator it is), fog (the diamond-square plasma fractal), brightness (skimage's HSV round trip with
  V + c: the closed form ``x * V'/V``), contrast, elastic_transform (OpenCV getAffineTransform / warpAffine
  bilinear with BORDER_REFLECT_101, then scipy ``map_coordinates(order=1, mode="reflect")``; both as a
  bilinear gather with the same values), pixelate (PIL BOX resizes) and jpeg_compression (PIL JPEG at the
  given quality). The random numbers differ, of course (the generator drew from numpy's global, unseeded
  state).
* Quirks of the generator that shaped the released data are kept on purpose: glass_blur's "swap" of two
  numpy row views is a copy (``x[h, w] = x[h + dy, w + dx]``) and its offsets are drawn from
  ``randint(-1, 1)``, i.e. from {-1, 0}; zoom_blur's ``np.arange(1, 1.06, 0.01)`` has 7 zoom factors (1.00
  .. 1.06), not 6; fog's plasma noise has amplitude wibble^2; the final ``np.uint8`` cast truncates.
* motion_blur and snow used ImageMagick's MotionBlurImage through Wand (no Python package here): it is
  re-implemented from ImageMagick's effect.c / gem.c and gives byte-identical output to ImageMagick 6.9.11
  Q16's ``convert -motion-blur`` (checked by a test where that program is installed; other ImageMagick
  builds, e.g. Q8 or HDRI, may round differently by one level).
* ``APPROXIMATE`` (only frost): the generator blends crops of frost photographs that this package does not
  ship; a statistically matched stand-in is used unless ``frost_dir`` gives the official files.
  Small numerical differences that are not listed: OpenCV quantises warpAffine's interpolation weights to
  1/32 pixel, and older skimage releases drew salt-and-pepper positions slightly differently.

Every image's randomness comes from its own ``numpy.random.Generator`` seeded by a hash of (corruption,
severity, image index, seed), so an image is corrupted identically whatever the batch, ``--limit`` or order.

The release layout (as the official CIFAR-10-C download): ``<dir>/<corruption>.npy`` uint8 [S * N, 32, 32,
3] with the S severities stacked in order (official: 5 x 10,000), ``<dir>/labels.npy`` (the N labels tiled S
times, uint8 as in the official file) and, for sets made here, ``<dir>/metadata.json``.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ensemble_bench.errors import UsageError


class _LazyModule:
    """A module imported on first use: the CLI builds its parser (add_corrupt_parser) from this file, and
    ``ensemble-bench --help`` or ``leaderboard`` should not pay for importing torch and scipy."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        import importlib

        mod = importlib.import_module(self._name)
        self.__dict__.update(mod.__dict__)   # later look-ups find the attribute directly
        return getattr(mod, attr)


torch = _LazyModule("torch")
ndi = _LazyModule("scipy.ndimage")

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

GENERATOR = "ensemble-bench"
REFERENCE = ("Hendrycks & Dietterich, ICLR 2019; constants of ImageNet-C/create_c/make_cifar_c.py in "
             "github.com/hendrycks/robustness (commit ca360085d57889288c4143fddd8a707bbcae01bd)")

# The 15 benchmark corruptions in the paper's order (noise, blur, weather, digital).
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
# The paper's 4 held-out corruptions, also in the official release folders: recognised when loading (and
# loaded when named), never generated here and never part of the 15-corruption means.
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)
IMAGE_SIZE = 32
# shift set name -> (release folder, number of classes, clean dataset of data.load)
SHIFT_SETS = {"cifar10c": ("CIFAR-10-C", 10, "cifar10"), "cifar100c": ("CIFAR-100-C", 100, "cifar100")}
FOLDERS = {dataset: folder for folder, _, dataset in SHIFT_SETS.values()}

# make_cifar_c.py's constants, one entry per severity 1..5 (pixels on [0, 1] unless said otherwise).
PARAMS: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],            # sigma of N(0, sigma^2) added
    "shot_noise": [500, 250, 100, 75, 50],                       # Poisson(x * c) / c
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],             # salt-and-pepper amount
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],   # disk radius, alias blur
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],  # sigma, max delta, iterations
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],   # ImageMagick radius, sigma; angle U(-45, 45)
    "zoom_blur": [1.06, 1.11, 1.16, 1.21, 1.26],                 # zoom factors np.arange(1, stop, 0.01)
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95),                     # loc, scale, zoom, threshold, blur radius,
             (0.1, 0.2, 1, 0.5, 10, 4, 0.9),                     # blur sigma, blend; angle U(-135, -45)
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],   # image weight, frost weight
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],          # fog weight, plasma wibble decay
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],                   # added to V of HSV
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],                     # (x - mean) * c + mean
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                          (0.1, 0.03, 0.03)],                    # alpha, sigma, affine range, x image size 32
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],                   # BOX down to int(32 c), BOX back up
    "jpeg_compression": [80, 65, 58, 50, 40],                    # JPEG quality
}

APPROXIMATE = {
    "frost": "the generator blends crops of frost photographs (frost1-5 of hendrycks/robustness) that are not "
             "shipped here: a random 1/f texture with each photograph's measured mean colour, spread and "
             "spectrum stands in (pass frost_dir or set ENSEMBLE_BENCH_FROST_DIR to a folder with the official "
             "files for the exact recipe)",
}

# Stand-in for the frost photographs: per photograph (frost1.png .. frost5.jpg; the generator draws
# randint(5), so frost6.jpg is never used), at the generator's 0.2 scale (OpenCV INTER_LINEAR), over 3,000
# random 32x32 crops each: mean RGB of a crop, RMS within-crop std RGB, std of the crop means RGB, and the
# slope of the radially averaged power spectrum of a grey crop (log power vs log frequency, f = 1..16).
# Measured by this project on the files of hendrycks/robustness at 8190fe3.
FROST_STATS = (
    ((76.4, 148.0, 164.6), (21.6, 13.2, 12.6), (16.7, 9.3, 7.7), -1.54),
    ((198.3, 202.7, 212.0), (17.9, 18.3, 18.9), (8.2, 9.0, 9.6), -1.18),
    ((198.3, 202.8, 212.1), (18.0, 18.4, 19.0), (8.3, 9.1, 9.7), -1.18),
    ((143.7, 158.6, 171.3), (26.0, 26.0, 27.0), (10.1, 10.0, 10.7), -0.89),
    ((102.9, 114.3, 126.1), (35.2, 34.8, 34.1), (16.6, 16.0, 15.1), -1.19),
)
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
FROST_ENV = "ENSEMBLE_BENCH_FROST_DIR"

_CHUNK = 500  # images per vectorised step (bounds memory: a few float64 copies of 500 x 32 x 32 x 3)


# ------------------------------------------------------------------------------------------ randomness
def image_rng(corruption: str, severity: int, index: int, seed: int) -> np.random.Generator:
    """The Generator of one corrupted image: seeded by a BLAKE2b hash of (corruption, severity, index, seed)."""
    key = f"{GENERATOR}/shift|{corruption}|{int(severity)}|{int(index)}|{int(seed)}".encode()
    return np.random.default_rng(int.from_bytes(hashlib.blake2b(key, digest_size=16).digest(), "little"))


# ------------------------------------------------------------------------------------------ helpers
def _gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian on the image axes of a batch [B, H, W(, C)] (channels not mixed)."""
    sig = (0.0, sigma, sigma) + (0.0,) * (x.ndim - 3)
    return ndi.gaussian_filter(x, sig, mode=mode, truncate=truncate)


def _zoom_matrix(h: int, zoom: float) -> np.ndarray:
    """[H, H] linear map of one image axis equal to the generator's clipped_zoom along that axis: centre
    crop of side ceil(H / zoom), scipy.ndimage.zoom(order=1) by ``zoom``, centre H cut. Linear interpolation
    is separable, so zooming the identity matrix gives the exact operator (applied as two matrix products,
    far faster than ndimage.zoom on a batch)."""
    ch = int(np.ceil(h / zoom))
    top = (h - ch) // 2
    z = ndi.zoom(np.eye(ch), (zoom, 1), order=1)         # [round(ch * zoom), ch]
    trim = (z.shape[0] - h) // 2
    a = np.zeros((h, h))
    a[:, top:top + ch] = z[trim:trim + h]
    return a


def _clipped_zoom(x: np.ndarray, zoom: float) -> np.ndarray:
    """The generator's clipped_zoom on a batch [B, H, H, C]: zoom the centre crop of side ceil(H / zoom)
    (scipy.ndimage.zoom, order 1), then cut the centre H x H."""
    a = _zoom_matrix(x.shape[1], zoom).astype(x.dtype)
    return np.einsum("ph,bhwc,qw->bpqc", a, x, a, optimize=True)


def _motion_blur_u8(img: np.ndarray, radius: float, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """ImageMagick's MotionBlurImage on uint8 images [B, H, W] or [B, H, W, C], one angle per image.

    From ImageMagick's effect.c / gem.c: width = 2 * ceil(radius) + 1 taps; tap i (i = 0 .. width-1) has
    weight exp(-i^2 / (2 sigma^2)), normalised to sum 1, and reads the pixel at column offset
    ceil(i cos(angle) - 0.5) and row offset ceil(i sin(angle) - 0.5) (rows grow downwards); pixels outside
    the image repeat the nearest edge pixel (the default virtual-pixel method). The sum is rounded to a
    16-bit quantum (x 257) and written as 8 bits by truncation, as ImageMagick 6 (Q16) does through a PNG:
    byte-identical to ``convert -motion-blur RxS+A`` of ImageMagick 6.9.11 Q16 (tests/test_shift.py checks it
    where that program is installed).
    """
    b, h, w = img.shape[:3]
    width = int(2 * math.ceil(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    k = np.exp(-(i * i) / (2.0 * sigma * sigma))
    k /= k.sum()
    rad = np.pi * np.asarray(angles_deg, dtype=np.float64) / 180.0
    px, py = width * np.sin(rad), width * np.cos(rad)             # ImageMagick's point.x, point.y
    hyp = np.hypot(px, py)
    off_x = np.ceil(i[None, :] * py[:, None] / hyp[:, None] - 0.5).astype(np.int64)   # [B, width] columns
    off_y = np.ceil(i[None, :] * px[:, None] / hyp[:, None] - 0.5).astype(np.int64)   # [B, width] rows
    rows = np.arange(h)[None, :, None]
    cols = np.arange(w)[None, None, :]
    bidx = np.arange(b)[:, None, None]
    src = img.astype(np.float64)
    out = np.zeros(src.shape, dtype=np.float64)
    for t in range(width):
        r = np.clip(rows + off_y[:, t, None, None], 0, h - 1)
        c = np.clip(cols + off_x[:, t, None, None], 0, w - 1)
        out += k[t] * src[bidx, r, c]
    q16 = np.floor(out * 257.0 + 0.5)
    return np.clip(np.floor(q16 / 257.0), 0, 255).astype(np.uint8)


def _fold(i: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Integer sample indices outside [0, n) mapped into it as scipy.ndimage's boundary modes do:
    "mirror" = d c b | a b c d | c b a (OpenCV BORDER_REFLECT_101), "reflect" = d c b a | a b c d | d c b a."""
    if mode == "mirror":
        if n == 1:
            return np.zeros_like(i)
        period = 2 * n - 2
        i = np.mod(i, period)
        return np.where(i >= n, period - i, i)
    period = 2 * n
    i = np.mod(i, period)
    return np.where(i >= n, period - 1 - i, i)


def _bilinear(img: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str) -> np.ndarray:
    """img [B, H, W, C] sampled at (rows, cols) [B, H, W]: the same values as scipy.ndimage.map_coordinates
    (order=1, ``mode``) with integer batch and channel coordinates, at a quarter of its cost (4 neighbours,
    not the 16 of a 4-D linear spline)."""
    b, h, w, _ = img.shape
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    r0, c0 = r0.astype(np.int64), c0.astype(np.int64)
    bi = np.arange(b)[:, None, None]
    ra, rb = _fold(r0, h, mode), _fold(r0 + 1, h, mode)
    ca, cb = _fold(c0, w, mode), _fold(c0 + 1, w, mode)
    return ((1 - fr) * ((1 - fc) * img[bi, ra, ca] + fc * img[bi, ra, cb])
            + fr * ((1 - fc) * img[bi, rb, ca] + fc * img[bi, rb, cb]))


def _plasma_fractal(rng: np.random.Generator, size: int = 32, decay: float = 3.0) -> np.ndarray:
    """Diamond-square height map on a torus, as the generator's plasma_fractal: every new point is the
    mean of its 4 neighbours plus wibble * U(-wibble, wibble), wibble = 100 divided by ``decay`` per level;
    the map is rescaled to [0, 1]."""
    m = np.zeros((size, size), dtype=np.float64)
    step, wibble = size, 100.0

    def jitter(total: np.ndarray) -> np.ndarray:
        return total / 4.0 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corner = m[0::step, 0::step]
        # square step: centre of each square <- its four corners (right and lower neighbours wrap around)
        right = np.roll(corner, -1, axis=1)
        m[half::step, half::step] = jitter(corner + np.roll(corner, -1, axis=0) + right + np.roll(right, -1, axis=0))
        centre = m[half::step, half::step]
        # diamond step: edge midpoints <- the two corners and the two centres beside them
        m[0::step, half::step] = jitter(corner + right + centre + np.roll(centre, 1, axis=0))
        m[half::step, 0::step] = jitter(corner + np.roll(corner, -1, axis=0) + centre + np.roll(centre, 1, axis=1))
        step, wibble = half, wibble / decay
    m -= m.min()
    return m / m.max()


def _cv2_linear_resize(img: np.ndarray, scale: float) -> np.ndarray:
    """cv2.resize(img, (0, 0), fx=scale, fy=scale) with INTER_LINEAR (no anti-aliasing): output size
    round(size * scale), source coordinate (d + 0.5) / scale - 0.5 clamped to the image, rounded to uint8."""
    def axis(n_in: int):
        n_out = int(round(n_in * scale))
        s = (np.arange(n_out) + 0.5) / scale - 0.5
        i0 = np.floor(s).astype(np.int64)
        t = s - i0
        t = np.where((i0 < 0) | (i0 >= n_in - 1), 0.0, t)
        i0 = np.clip(i0, 0, n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), t

    r0, r1, tr = axis(img.shape[0])
    c0, c1, tc = axis(img.shape[1])
    x = img.astype(np.float64)
    top = x[r0][:, c0] * (1 - tc)[None, :, None] + x[r0][:, c1] * tc[None, :, None]
    bot = x[r1][:, c0] * (1 - tc)[None, :, None] + x[r1][:, c1] * tc[None, :, None]
    return np.clip(np.rint(top * (1 - tr)[:, None, None] + bot * tr[:, None, None]), 0, 255).astype(np.uint8)


def _frost_dir(frost_dir) -> Path | None:
    d = frost_dir if frost_dir is not None else os.environ.get(FROST_ENV) or None
    return Path(d) if d is not None else None


def _load_frost(frost_dir: Path) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for name in FROST_FILES:
        p = frost_dir / name
        if not p.is_file():
            raise UsageError(f"frost images: {p} not found (need {', '.join(FROST_FILES)} of hendrycks/robustness "
                             "ImageNet-C/create_c)")
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise UsageError(f"frost images: cannot read {p}: {e}") from None
        out.append(_cv2_linear_resize(arr, 0.2))
    return out


def _frost_texture(rng: np.random.Generator, k: int) -> np.ndarray:
    """Stand-in frost crop [32, 32, 3] in [0, 255] for photograph k (see FROST_STATS)."""
    mean, spread, crop_std, slope = FROST_STATS[k]
    n = IMAGE_SIZE
    f = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.fftfreq(n)[None, :]) * n
    amp = np.where(f > 0, np.maximum(f, 1e-9) ** (slope / 2.0), 0.0)
    g = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * amp))
    g = (g - g.mean()) / max(g.std(), 1e-12)
    offset = rng.standard_normal()
    tex = (np.asarray(mean)[None, None, :] + np.asarray(crop_std)[None, None, :] * offset
           + np.asarray(spread)[None, None, :] * g[:, :, None])
    return np.clip(tex, 0, 255)


# ------------------------------------------------------------------------------------------ corruptions
# Each takes uint8 images [B, 32, 32, 3], the severity's constants and one Generator per image, and returns
# values on [0, 255] (float or uint8); _apply truncates to uint8 as the generator's np.uint8 did.
def _gaussian_noise(x, c, rngs, ctx):
    noise = np.stack([r.normal(size=x.shape[1:], scale=c) for r in rngs])
    return np.clip(x / 255.0 + noise, 0, 1) * 255


def _shot_noise(x, c, rngs, ctx):
    lam = x / 255.0 * c
    return np.clip(np.stack([r.poisson(lam[i]) for i, r in enumerate(rngs)]) / c, 0, 1) * 255


def _impulse_noise(x, c, rngs, ctx):
    out = x / 255.0
    draws = np.stack([r.random((2,) + x.shape[1:]) for r in rngs])       # [B, 2, H, W, C]
    flipped, salted = draws[:, 0] < c, draws[:, 1] < 0.5
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return out * 255


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """The generator's disk kernel: aliased disk on a 17x17 grid (radius <= 8), normalised, then
    cv2.GaussianBlur with a 3x3 kernel of sigma alias_blur (separable, BORDER_REFLECT_101)."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 9), 3
    else:
        grid, ksize = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    t = np.arange(ksize) - (ksize - 1) / 2.0
    g = np.exp(-(t * t) / (2.0 * alias_blur * alias_blur))
    g /= g.sum()
    disk = ndi.correlate1d(ndi.correlate1d(disk, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")
    nz = np.flatnonzero(disk.any(axis=0))        # drop all-zero borders: same result, far less work
    lo, hi = nz.min(), nz.max()
    r = max(int(hi) - len(grid) // 2, len(grid) // 2 - int(lo))
    mid = len(grid) // 2
    return disk[mid - r:mid + r + 1, mid - r:mid + r + 1]


def _defocus_blur(x, c, rngs, ctx):
    kernel = _disk(c[0], c[1])
    out = ndi.correlate(x / 255.0, kernel[None, :, :, None], mode="mirror")
    return np.clip(out, 0, 1) * 255


def _glass_blur(x, c, rngs, ctx):
    sigma, delta, iterations = c
    b, h, w = x.shape[:3]
    y = (_gaussian(x / 255.0, sigma) * 255).astype(np.uint8)
    # The generator loops h = H-delta .. delta+1 and w likewise (descending), drawing (dx, dy) from
    # randint(-delta, delta) and "swapping" pixel rows with numpy views, which copies x[h+dy, w+dx] into
    # x[h, w]. Offsets are <= 0, so each copy reads a pixel not yet written in that sweep: one gather.
    lo, hi = delta + 1, h - delta               # 2 .. 31 for delta = 1
    n = hi - lo + 1
    bidx = np.arange(b)[:, None, None]
    hh = np.arange(lo, hi + 1)[None, :, None]
    ww = np.arange(lo, hi + 1)[None, None, :]
    for it in range(iterations):
        d = np.stack([r.integers(-delta, delta, size=(n, n, 2)) for r in rngs])   # [B, n, n, (dx, dy)]
        # draws come in the generator's loop order (h, w descending): flip to ascending positions
        d = d[:, ::-1, ::-1]
        y[:, lo:hi + 1, lo:hi + 1] = y[bidx, hh + d[..., 1], ww + d[..., 0]]
    return np.clip(_gaussian(y / 255.0, sigma), 0, 1) * 255


def _motion_blur(x, c, rngs, ctx):
    angles = np.array([r.uniform(-45, 45) for r in rngs])
    return _motion_blur_u8(x, c[0], c[1], angles)


@functools.lru_cache(maxsize=8)
def _zoom_blur_operator(h: int, stop: float) -> np.ndarray:
    """[H*H, H*H] float32 operator of zoom_blur on one channel: (identity + sum over the zoom factors of
    clipped_zoom) / (number of factors + 1), each clipped_zoom the Kronecker product of its axis maps."""
    zooms = np.arange(1, stop, 0.01)            # the generator's np.arange(1, 1.06, 0.01), ... (7 .. 26 factors)
    k = np.eye(h * h)
    for z in zooms:
        a = _zoom_matrix(h, z)
        k += np.kron(a, a)
    return (k / (len(zooms) + 1)).astype(np.float32)


def _zoom_blur(x, c, rngs, ctx):
    b, h, w, ch = x.shape
    xf = (x / 255.0).astype(np.float32).transpose(0, 3, 1, 2).reshape(b * ch, h * w)
    out = (xf @ _zoom_blur_operator(h, c).T).reshape(b, ch, h, w).transpose(0, 2, 3, 1)
    return np.clip(out, 0, 1) * 255


def _snow(x, c, rngs, ctx):
    loc, scale, zoom, thresh, radius, sigma, blend = c
    xf = (x / 255.0).astype(np.float32)
    layer = np.stack([r.normal(size=x.shape[1:3], loc=loc, scale=scale) for r in rngs])[..., None]
    layer = _clipped_zoom(layer, zoom)
    layer[layer < thresh] = 0
    layer = (np.clip(layer[..., 0], 0, 1) * 255).astype(np.uint8)
    angles = np.array([r.uniform(-135, -45) for r in rngs])
    layer = (_motion_blur_u8(layer, radius, sigma, angles) / 255.0)[..., None]
    grey = (0.299 * xf[..., 0] + 0.587 * xf[..., 1] + 0.114 * xf[..., 2])[..., None]   # cv2 RGB2GRAY
    xf = blend * xf + (1 - blend) * np.maximum(xf, grey * 1.5 + 0.5)
    return np.clip(xf + layer + np.rot90(layer, k=2, axes=(1, 2)), 0, 1) * 255


def _frost(x, c, rngs, ctx):
    textures = ctx.get("frost")
    crops = []
    for r in rngs:
        k = int(r.integers(5))                  # the generator's np.random.randint(5): frost1..frost5
        if textures is None:
            crops.append(_frost_texture(r, k))
        else:
            t = textures[k]
            y0, x0 = int(r.integers(0, t.shape[0] - 32)), int(r.integers(0, t.shape[1] - 32))
            crops.append(t[y0:y0 + 32, x0:x0 + 32].astype(np.float64))
    return np.clip(c[0] * x.astype(np.float64) + c[1] * np.stack(crops), 0, 255)


def _fog(x, c, rngs, ctx):
    xf = x / 255.0
    vmax = xf.max(axis=(1, 2, 3), keepdims=True)
    plasma = np.stack([_plasma_fractal(r, IMAGE_SIZE, c[1]) for r in rngs])[..., None]
    xf = xf + c[0] * plasma
    return np.clip(xf * vmax / (vmax + c[0]), 0, 1) * 255


def _brightness(x, c, rngs, ctx):
    # skimage rgb2hsv -> V = min(V + c, 1) -> hsv2rgb. H and S are kept and every RGB value of hsv2rgb is
    # V times a function of (H, S), so the result is x * V'/V; a black pixel (V = 0, S = 0) becomes grey V'.
    xf = x / 255.0
    v = xf.max(axis=3, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    out = np.where(v > 0, xf * (v_new / np.where(v > 0, v, 1.0)), v_new)
    return np.clip(out, 0, 1) * 255


def _contrast(x, c, rngs, ctx):
    xf = x / 255.0
    means = xf.mean(axis=(1, 2), keepdims=True)
    return np.clip((xf - means) * c + means, 0, 1) * 255


def _elastic_transform(x, c, rngs, ctx):
    b, h, w, ch = x.shape
    alpha, sigma, affine = (v * IMAGE_SIZE for v in c)
    img = (x / 255.0).astype(np.float32)
    # random affine: cv2.getAffineTransform(pts1, pts2) then cv2.warpAffine (dst(p) = src(M^-1 p)),
    # bilinear, BORDER_REFLECT_101 (= scipy mode "mirror")
    centre = np.float32([h, w]) // 2
    size = min(h, w) // 3
    pts1 = np.float32([centre + size, [centre[0] + size, centre[1] - size], centre - size])
    gy, gx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    src_r = np.empty((b, h, w))
    src_c = np.empty((b, h, w))
    for i, r in enumerate(rngs):
        pts2 = pts1 + r.uniform(-affine, affine, size=pts1.shape).astype(np.float32)
        a = np.c_[pts1.astype(np.float64), np.ones(3)]          # rows [x, y, 1] (points are (x, y))
        m = np.linalg.solve(a, pts2.astype(np.float64)).T        # 2 x 3, maps pts1 -> pts2
        inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
        src_c[i] = inv[0, 0] * gx + inv[0, 1] * gy + inv[0, 2]
        src_r[i] = inv[1, 0] * gx + inv[1, 1] * gy + inv[1, 2]
    img = _bilinear(img.astype(np.float64), src_r, src_c, "mirror").astype(np.float32)
    # elastic displacement: Gaussian-smoothed U(-1, 1) fields (skimage gaussian, mode "reflect",
    # truncate 3) times alpha, then map_coordinates(order=1, mode="reflect")
    fields = np.stack([r.uniform(-1, 1, size=(2, h, w)) for r in rngs])          # [B, (dx, dy), H, W]
    if sigma > 0:
        fields = ndi.gaussian_filter(fields, (0, 0, sigma, sigma), mode="reflect", truncate=3)
    fields = (fields * alpha).astype(np.float32).astype(np.float64)
    out = _bilinear(img.astype(np.float64), gy + fields[:, 1], gx + fields[:, 0], "reflect")
    return np.clip(out, 0, 1) * 255


def _pixelate(x, c, rngs, ctx):
    from PIL import Image

    s = int(IMAGE_SIZE * c)
    size = (IMAGE_SIZE, IMAGE_SIZE)
    return np.stack([np.asarray(Image.fromarray(im).resize((s, s), Image.BOX).resize(size, Image.BOX)) for im in x])


def _jpeg_compression(x, c, rngs, ctx):
    from PIL import Image

    out = []
    for im in x:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=int(c))
        buf.seek(0)
        with Image.open(buf) as decoded:
            out.append(np.asarray(decoded.convert("RGB")))
    return np.stack(out)


_FUNCS: dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost, "fog": _fog, "brightness": _brightness,
    "contrast": _contrast, "elastic_transform": _elastic_transform, "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}
assert tuple(_FUNCS) == CORRUPTIONS


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


def _apply(name: str, severity: int, x: np.ndarray, seed: int, start: int, ctx: dict) -> np.ndarray:
    c = PARAMS[name][severity - 1]
    rngs = [image_rng(name, severity, start + k, seed) for k in range(len(x))]
    out = np.asarray(_FUNCS[name](x, c, rngs, ctx))
    # the generator's np.uint8(...) truncates; every function has already clipped to [0, 255]
    return np.clip(out, 0, 255).astype(np.uint8)


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
            prev = np.load(old_labels)
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
        arr = np.load(self.files[corruption], mmap_mode="r")
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
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
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


# ------------------------------------------------------------------------------------------ command
def corrupt_command(dataset: str = "cifar10", data_dir=None, out=None, corruptions=None, severities=None,
                    limit: int | None = None, seed: int = 0, *, progress: bool = True, frost_dir=None) -> dict:
    """``ensemble-bench corrupt``: corrupt the clean test split of ``dataset`` (ensemble_bench.data.load) and write
    the release layout under ``out/CIFAR-10-C`` (or ``CIFAR-100-C``), so that ``--data-dir out`` finds it.
    ``corruptions`` / ``severities`` are lists or comma-separated strings; ``limit`` keeps the first N test
    images. Everything is validated before anything is written. Returns {dir, files, metadata, seconds}."""
    from ensemble_bench import data

    if dataset not in FOLDERS:
        raise UsageError(f"corrupt: dataset {dataset!r} has no corrupted release layout; choose from "
                         f"{', '.join(FOLDERS)}")
    names = _check_corruptions(corruptions)
    sev = _check_severities(severities)
    seed = _check_seed(seed)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise UsageError(f"--limit must be an integer >= 1; got {limit!r}")
    if out is None:
        raise UsageError("corrupt needs --out DIR")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    target = out / FOLDERS[dataset]
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} is a file, not a folder")
    fd = _frost_dir(frost_dir)
    if "frost" in names and fd is not None:
        _load_frost(fd)   # fail now, not after an hour of other corruptions
    bundle = data.load(dataset, data_dir)
    x = bundle.test.x
    y = bundle.test.y
    if limit is not None:
        x, y = x[:limit], y[:limit]
    x = x.cpu().numpy()
    if x.ndim != 4 or x.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise UsageError(f"corrupt needs 3 x 32 x 32 images; {dataset} test images are {list(x.shape[1:])}")
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    source = f"{dataset} test split, first {len(x)} images; {bundle.source}"
    # the same checks write_corrupted makes, before the (long) generation starts
    _out_metadata_compatible(target, {"generator": GENERATOR, "seed": seed, "severities": sev,
                                      "n_per_severity": len(x), "source_dataset": source}, names)
    t0 = time.perf_counter()
    meta = write_corrupted(x, y.cpu().numpy(), target, names, sev, seed, progress, source=source, frost_dir=fd)
    return {"dir": str(target), "files": [f"{c}.npy" for c in names] + ["labels.npy", "metadata.json"],
            "metadata": meta, "seconds": round(time.perf_counter() - t0, 2)}


def cli_corrupt(args) -> int:
    """Entry point of the ``corrupt`` sub-command (argparse namespace of add_corrupt_parser)."""
    res = corrupt_command(args.dataset, args.data_dir, args.out, args.corruptions, args.severities, args.limit,
                          args.seed, progress=not args.no_progress, frost_dir=args.frost_dir)
    meta = res["metadata"]
    print(json.dumps({"dir": res["dir"], "corruptions": meta["corruptions"], "severities": meta["severities"],
                      "n_per_severity": meta["n_per_severity"], "approximate": sorted(meta["approximate"]),
                      "seconds": res["seconds"]}, indent=1))
    return 0


def add_corrupt_parser(subparsers) -> Any:
    """Add ``corrupt`` to the CLI's sub-parsers; sets ``fn`` (the CLI's dispatch attribute) to cli_corrupt."""
    p = subparsers.add_parser(
        "corrupt", help="write CIFAR-10-C / CIFAR-100-C style corrupted test sets (Hendrycks & Dietterich 2019)",
        description="Corrupt the clean test split with the 15 corruptions of CIFAR-10-C at severities 1-5 and "
                    "write the official release layout to OUT/CIFAR-10-C (or OUT/CIFAR-100-C).")
    p.add_argument("--dataset", default="cifar10", help="cifar10 or cifar100 (default cifar10)")
    p.add_argument("--data-dir", dest="data_dir", help="folder with the clean data (as for run)")
    p.add_argument("--out", required=True, help="output folder; the set is written to OUT/CIFAR-10-C")
    p.add_argument("--corruptions", help="comma-separated subset (default: all 15)")
    p.add_argument("--severities", help="comma-separated subset of 1,2,3,4,5 (default: all)")
    p.add_argument("--limit", type=int, help="only the first N test images")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruption noise (default 0)")
    p.add_argument("--frost-dir", dest="frost_dir",
                   help=f"folder with the official frost images (default ${FROST_ENV}); "
                        "without it frost is approximate")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cli_corrupt)
    return p
