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
"""
from __future__ import annotations

import functools
import io
from typing import Callable

import numpy as np

from ensemble_bench.shift.ops import (CORRUPTIONS, IMAGE_SIZE, PARAMS, _bilinear, _clipped_zoom,
                                      _frost_texture, _gaussian, _motion_blur_u8, _plasma_fractal, _zoom_matrix,
                                      image_rng, ndi)

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


def _apply(name: str, severity: int, x: np.ndarray, seed: int, start: int, ctx: dict) -> np.ndarray:
    c = PARAMS[name][severity - 1]
    rngs = [image_rng(name, severity, start + k, seed) for k in range(len(x))]
    out = np.asarray(_FUNCS[name](x, c, rngs, ctx))
    # the generator's np.uint8(...) truncates; every function has already clipped to [0, 255]
    return np.clip(out, 0, 255).astype(np.uint8)

