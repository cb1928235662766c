"""Shared pieces of the corruptions (``ensemble_bench.shift.corruptions``): the generator's constants
(``PARAMS``, the frost stand-in's statistics), the per-image random generator, and the numerical helpers
(Gaussian filter, clipped zoom, ImageMagick's motion blur, bilinear gathers, the plasma fractal, frost)."""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

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

