"""Tests of ensemble_bench.shift: the 15 corruptions with the constants of the CIFAR generator of Hendrycks &
Dietterich (ICLR 2019), the CIFAR-10-C release layout, the ``corrupt`` command, shift evaluation and shift
arrays in score files. Small subsets only (the whole file runs in well under a minute on 2 cores)."""
from __future__ import annotations

import argparse
import colorsys
import io
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from ensemble_bench import metrics as mt
from ensemble_bench import shift as sh
from ensemble_bench.errors import UsageError


@pytest.fixture(scope="module")
def real_images(shared_data):
    """The first 48 CIFAR-10 test images (uint8 NHWC) and labels of the development copy."""
    with np.load(shared_data / "cifar10_test.npz") as z:
        return np.ascontiguousarray(z["x_test"][:48]), z["y_test"][:48].astype(np.int64)


def _random_images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour images (a low-resolution random image upsampled): enough structure for blurs."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(n, 8, 8, 3)).astype(np.float64)
    return np.clip(np.repeat(np.repeat(small, 4, axis=1), 4, axis=2) + rng.normal(0, 8, (n, 32, 32, 3)), 0, 255).astype(np.uint8)


def _one_line_usage_error(call, match: str) -> str:
    with pytest.raises(UsageError, match=match) as ei:
        call()
    msg = str(ei.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ constants
def test_constants_are_the_cifar_generators():
    assert sh.CORRUPTIONS == ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                              "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                              "elastic_transform", "pixelate", "jpeg_compression")
    assert all(len(sh.PARAMS[c]) == 5 for c in sh.CORRUPTIONS)
    # make_cifar_c.py (not make_imagenet_c.py, whose Gaussian noise is 0.08 .. 0.38 and JPEG 25 .. 7)
    assert sh.PARAMS["gaussian_noise"] == [0.04, 0.06, 0.08, 0.09, 0.10]
    assert sh.PARAMS["jpeg_compression"] == [80, 65, 58, 50, 40]
    assert sh.PARAMS["motion_blur"][4] == (9, 2.5)
    # zoom_blur keeps np.arange's float end point: 7, 12, 16, 21, 26 zoom factors
    assert [len(np.arange(1, c, 0.01)) for c in sh.PARAMS["zoom_blur"]] == [7, 12, 16, 21, 26]
    assert set(sh.APPROXIMATE) == {"frost"}


# ------------------------------------------------------------------------------------------ strength
def _mad(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _corr_loss(a, b) -> float:
    """1 - mean per-image Pearson correlation with the clean image."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a -= a.mean(1, keepdims=True)
    b -= b.mean(1, keepdims=True)
    return float(1 - ((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))).mean())


def _grad_energy(a) -> float:
    a = a.astype(np.float64)
    return float((np.diff(a, axis=1) ** 2).mean() + (np.diff(a, axis=2) ** 2).mean())


def test_strength_grows_with_severity(real_images):
    """Mean absolute change from the clean image never falls from one severity to the next (2% slack:
    motion_blur's severities 3 and 4 differ only in ImageMagick's kernel radius 6 vs 8 at sigma 2, which
    adds 0.1% of the weight), and severity 5 changes clearly more than severity 1. Three corruptions need
    another measure, because their constants trade one effect against another:
    * frost: x * c0 + frost * c1 with c0 falling and c1 rising: the brightening partly cancels, so use the
      loss of correlation with the clean image, which grows with c1 / c0;
    * glass_blur: (sigma, iterations) = (.05, 1), (.25, 1), (.4, 1), (.25, 2), (.4, 2) are only partly ordered:
      at equal iterations more sigma removes more detail (gradient energy falls: 1 >= 2 > 3, 4 > 5), at equal
      sigma more iterations move more pixels (change grows: 4 > 2, 5 > 3); 3 and 4 are not ordered;
    * elastic_transform: see test_elastic_transform_warp_strength (synthetic ramps).
    """
    x, _ = real_images
    for name in sh.CORRUPTIONS:
        out = {s: sh.corrupt(x, name, s, seed=0) for s in sh.SEVERITIES}
        if name == "elastic_transform":
            continue
        if name == "frost":
            loss = [_corr_loss(out[s], x) for s in sh.SEVERITIES]
            assert all(b > a for a, b in zip(loss, loss[1:])), (name, loss)
            continue
        mad = [_mad(out[s], x) for s in sh.SEVERITIES]
        if name == "glass_blur":
            ge = [_grad_energy(out[s]) for s in sh.SEVERITIES]
            assert ge[1] <= ge[0] * 1.01 and ge[2] < ge[1] and ge[4] < ge[3], ge
            assert mad[3] > mad[1] and mad[4] > mad[2], mad
            continue
        assert all(b >= 0.98 * a for a, b in zip(mad, mad[1:])), (name, mad)
        assert mad[4] > 1.4 * mad[0], (name, mad)


def test_elastic_transform_warp_strength():
    """On ramps (R = 20 + 7 * row, G = 20 + 7 * column) bilinear warps are read back exactly as
    displacements: the affine part shrinks with severity (affine range 0.08 .. 0.03 x 32 px) while the
    non-affine, elastic part grows (alpha 0 .. 3.2 px, sigma 6.4 .. 0.96 px); severity 1 is affine only."""
    n, m = 32, 6
    r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ramp = np.stack([20 + 7 * r, 20 + 7 * c, np.full_like(r, 128)], -1).astype(np.uint8)
    x = np.repeat(ramp[None], 24, axis=0)
    design = np.c_[r[m:-m, m:-m].ravel(), c[m:-m, m:-m].ravel(), np.ones((n - 2 * m) ** 2)]
    non_affine, affine = [], []
    for s in sh.SEVERITIES:
        y = sh.corrupt(x, "elastic_transform", s).astype(np.float64) + 0.5   # undo the uint8 truncation bias
        res, aff = [], []
        for img in y:
            for d in ((img[..., 0] - 20) / 7 - r, (img[..., 1] - 20) / 7 - c):
                v = d[m:-m, m:-m].ravel()
                coef, *_ = np.linalg.lstsq(design, v, rcond=None)
                res.append(np.sqrt(np.mean((v - design @ coef) ** 2)))
                aff.append(np.sqrt(np.mean((design @ coef) ** 2)))
        non_affine.append(np.mean(res))
        affine.append(np.mean(aff))
    assert non_affine[0] < 0.06                      # only the uint8 quantisation (0.29 / 7 px)
    assert max(non_affine[:2]) < non_affine[2] < non_affine[3] < non_affine[4], non_affine
    assert all(b < a for a, b in zip(affine, affine[1:])), affine


def test_gaussian_noise_has_the_published_std():
    """Mid-grey images never clip, so the added noise is N(0, (c * 255)^2) (plus the uint8 truncation:
    mean -0.5, variance 1/12)."""
    x = np.full((16, 32, 32, 3), 128, dtype=np.uint8)
    for s, c in zip(sh.SEVERITIES, sh.PARAMS["gaussian_noise"]):
        d = sh.corrupt(x, "gaussian_noise", s, seed=3).astype(np.float64) - 128
        assert d.std() == pytest.approx(np.sqrt((c * 255) ** 2 + 1 / 12), rel=0.02), (s, d.std())
        assert abs(d.mean() + 0.5) < 0.3


def test_shot_and_impulse_noise_statistics():
    x = np.full((16, 32, 32, 3), 128, dtype=np.uint8)
    for s, c in zip(sh.SEVERITIES, sh.PARAMS["shot_noise"]):
        d = sh.corrupt(x, "shot_noise", s, seed=1).astype(np.float64) / 255
        # Poisson(x c) / c has variance x / c
        assert d.std() == pytest.approx(np.sqrt(128 / 255 / c), rel=0.05)
    for s, c in zip(sh.SEVERITIES, sh.PARAMS["impulse_noise"]):
        y = sh.corrupt(x, "impulse_noise", s, seed=1)
        assert (y != 128).mean() == pytest.approx(c, rel=0.1)         # each value replaced with prob. c
        assert set(np.unique(y)) <= {0, 128, 255}
        assert (y == 255).sum() == pytest.approx((y == 0).sum(), rel=0.25)


def test_brightness_matches_hsv_round_trip():
    """The closed form x * V'/V equals skimage's rgb2hsv -> V + c -> hsv2rgb (here: the standard library's
    colorsys, an independent HSV implementation), black pixels included. Compared before the uint8 cast,
    where both sides sit on the same values up to rounding (a truncation could split 159.0 / 158.99999)."""
    x = _random_images(2, seed=5)
    x[0, :4, :4] = 0                                   # black pixels: become grey V'
    for s in (1, 5):
        c = sh.PARAMS["brightness"][s - 1]
        got = sh._brightness(x, c, None, {})
        ref = np.empty(x.shape, dtype=np.float64)
        for idx in np.ndindex(x.shape[:3]):
            h, sat, v = colorsys.rgb_to_hsv(*(x[idx] / 255.0))
            ref[idx] = colorsys.hsv_to_rgb(h, sat, min(v + c, 1.0))
        np.testing.assert_allclose(got, np.clip(ref, 0, 1) * 255, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(sh.corrupt(x, "brightness", s), got.astype(np.uint8))


def test_pixelate_and_jpeg_are_pils():
    x = _random_images(3, seed=2)
    for s, q in zip(sh.SEVERITIES, sh.PARAMS["jpeg_compression"]):
        y = sh.corrupt(x, "jpeg_compression", s)
        buf = io.BytesIO()
        Image.fromarray(x[1]).save(buf, "JPEG", quality=q)
        np.testing.assert_array_equal(y[1], np.asarray(Image.open(buf)))
    y = sh.corrupt(x, "pixelate", 5)
    ref = Image.fromarray(x[2]).resize((20, 20), Image.BOX).resize((32, 32), Image.BOX)
    np.testing.assert_array_equal(y[2], np.asarray(ref))


def test_motion_blur_kernel_properties():
    x = np.repeat(np.linspace(0, 255, 32).astype(np.uint8)[None, :, None, None], 32, axis=2)   # rows differ
    x = np.repeat(np.repeat(x, 3, axis=3), 2, axis=0)                                         # [2, 32, 32, 3]
    # angle 0 blurs along rows only: an image constant along each row is unchanged; so is a constant one
    np.testing.assert_array_equal(sh._motion_blur_u8(x, 6, 2, np.array([0.0, 0.0])), x)
    flat = np.full((1, 32, 32), 77, dtype=np.uint8)
    np.testing.assert_array_equal(sh._motion_blur_u8(flat, 9, 2.5, np.array([33.0])), flat)
    # angle 90 blurs along columns: that image changes
    assert (sh._motion_blur_u8(x, 6, 2, np.array([90.0, 90.0])) != x).any()


def _imagemagick6_q16():
    for exe in ("convert-im6.q16", "convert"):
        path = shutil.which(exe)
        if path is None:
            continue
        try:
            out = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if "Version: ImageMagick 6" in out and "Q16" in out and "HDRI" not in out:
            return path
    return None


def test_motion_blur_is_imagemagicks(tmp_path):
    """Byte-identical to ImageMagick 6 Q16's -motion-blur (what the generator called through Wand)."""
    exe = _imagemagick6_q16()
    if exe is None:
        pytest.skip("ImageMagick 6 (Q16, non-HDRI) not installed")
    x = _random_images(6, seed=9)
    rng = np.random.default_rng(0)
    for i, (radius, sigma) in enumerate([(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5), (12, 6)]):
        angle = float(rng.uniform(-180, 180))
        img = x[i] if i % 2 == 0 else np.asarray(Image.fromarray(x[i]).convert("L"))
        Image.fromarray(img).save(tmp_path / "in.png")
        subprocess.run([exe, str(tmp_path / "in.png"), "-motion-blur", f"{radius}x{sigma}{angle:+.6f}",
                        str(tmp_path / "out.png")], check=True, timeout=60)
        ref = np.asarray(Image.open(tmp_path / "out.png"))
        np.testing.assert_array_equal(sh._motion_blur_u8(img[None], radius, sigma, np.array([angle]))[0], ref)


def test_frost_stand_in_and_official_files(tmp_path):
    """The stand-in frost has the brightness the official photographs give (on grey images the corrupted
    mean is c0 * 128 + c1 * mean frost); a folder with frost files switches to them and drops the flag."""
    x = np.full((64, 32, 32, 3), 128, dtype=np.uint8)
    official_mean = np.mean([np.mean(m) for m, _, _, _ in sh.FROST_STATS])
    for s, (c0, c1) in zip(sh.SEVERITIES, sh.PARAMS["frost"]):
        y = sh.corrupt(x, "frost", s)
        assert y.mean() == pytest.approx(c0 * 128 + c1 * official_mean, rel=0.05)
    with pytest.raises(UsageError, match="frost1.png"):
        sh.corrupt(x, "frost", 1, frost_dir=tmp_path)
    for name in sh.FROST_FILES:    # stand-in "photographs": flat colours, 200x200 -> 40x40 at scale 0.2
        Image.fromarray(np.full((200, 200, 3), 200, dtype=np.uint8)).save(tmp_path / name)
    y = sh.corrupt(x, "frost", 2, frost_dir=tmp_path)
    assert (y == int(1 * 128 + 0.3 * 200)).all()
    meta = sh.write_corrupted(x[:2], np.zeros(2, dtype=np.int64), tmp_path / "out", ["frost"], [1], frost_dir=tmp_path,
                              progress=False)
    assert meta["approximate"] == {} and meta["frost"] == str(tmp_path)


# ------------------------------------------------------------------------------------------ determinism
def test_deterministic_per_image_and_seed():
    x = _random_images(6, seed=1)
    for name in sh.CORRUPTIONS:
        a = sh.corrupt(x, name, 3, seed=7)
        assert a.dtype == np.uint8 and a.shape == x.shape
        assert a.tobytes() == sh.corrupt(x, name, 3, seed=7).tobytes(), name
        # an image's corruption depends on its index, not on the batch it is in
        np.testing.assert_array_equal(sh.corrupt(x[2:5], name, 3, seed=7, start_index=2), a[2:5], err_msg=name)
        if name not in ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"):
            assert a.tobytes() != sh.corrupt(x, name, 3, seed=8).tobytes(), name    # random ones change
        else:
            assert a.tobytes() == sh.corrupt(x, name, 3, seed=8).tobytes(), name    # deterministic ones do not


# ------------------------------------------------------------------------------------------ layout
def test_write_and_load_release_layout(tmp_path):
    x = _random_images(6, seed=4)
    y = np.array([0, 1, 2, 9, 4, 5])
    root = tmp_path / "CIFAR-10-C"
    meta = sh.write_corrupted(x, y, root, ["gaussian_noise", "frost", "contrast"], [1, 2, 5], seed=3, progress=False,
                              source="unit test")
    assert sorted(p.name for p in root.iterdir()) == ["contrast.npy", "frost.npy", "gaussian_noise.npy", "labels.npy",
                                                      "metadata.json"]
    arr = np.load(root / "contrast.npy")
    assert arr.shape == (18, 32, 32, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[12:], sh.corrupt(x, "contrast", 5, seed=3))     # severities stacked in order
    labels = np.load(root / "labels.npy")
    assert labels.dtype == np.uint8 and labels.tolist() == y.tolist() * 3
    on_disk = json.loads((root / "metadata.json").read_text())
    assert on_disk == meta
    assert meta["generator"] == "ensemble-bench" and meta["seed"] == 3 and meta["severities"] == [1, 2, 5]
    assert meta["n_per_severity"] == 6 and meta["source_dataset"] == "unit test"
    assert meta["parameters"]["gaussian_noise"] == [0.04, 0.06, 0.1]
    assert set(meta["approximate"]) == {"frost"}

    s = sh.load_shift_set("cifar10c", tmp_path)
    assert s.corruptions == ("gaussian_noise", "frost", "contrast") and s.severities == (1, 2, 5)
    assert s.n_per_severity == 6 and len(s) == 9 and list(s)[:2] == [("gaussian_noise", 1), ("gaussian_noise", 2)]
    img = s.images("frost", 2)
    assert img.dtype == torch.uint8 and tuple(img.shape) == (6, 3, 32, 32)             # NCHW like data.Split.x
    np.testing.assert_array_equal(img.numpy().transpose(0, 2, 3, 1), sh.corrupt(x, "frost", 2, seed=3))
    assert s.labels(5).tolist() == y.tolist() and s.labels(5).dtype == torch.int64
    assert set(s.approximate) == {"frost"}
    assert sh.load_shift_set("cifar10c", tmp_path, corruptions=["contrast"]).corruptions == ("contrast",)
    with pytest.raises(UsageError, match="no severity 3"):
        s.images("frost", 3)


def test_official_layout_without_metadata(tmp_path):
    """The official release: 5 severities, no metadata.json, the 4 held-out corruptions beside the 15."""
    root = tmp_path / "CIFAR-100-C"
    root.mkdir()
    n = 4
    rng = np.random.default_rng(0)
    for name in ("fog", "saturate"):
        np.save(root / f"{name}.npy", rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.tile(np.array([99, 0, 50, 7], dtype=np.uint8), 5))
    s = sh.load_shift_set("cifar100c", tmp_path)
    assert s.corruptions == ("fog",) and s.severities == (1, 2, 3, 4, 5) and s.n_per_severity == n
    assert s.num_classes == 100 and s.approximate == {}
    np.testing.assert_array_equal(s.images("fog", 4).numpy().transpose(0, 2, 3, 1), np.load(root / "fog.npy")[3 * n:4 * n])
    assert sh.load_shift_set("cifar100c", tmp_path, corruptions=["saturate"]).corruptions == ("saturate",)


def test_write_extends_a_compatible_set_only(tmp_path):
    x = _random_images(4, seed=6)
    y = np.arange(4)
    root = tmp_path / "CIFAR-10-C"
    sh.write_corrupted(x, y, root, ["fog"], [1, 2], seed=0, progress=False)
    meta = sh.write_corrupted(x, y, root, ["frost", "gaussian_noise"], [1, 2], seed=0, progress=False)
    assert meta["corruptions"] == ["gaussian_noise", "frost", "fog"] and set(meta["parameters"]) == set(meta["corruptions"])
    assert sh.load_shift_set("cifar10c", tmp_path).corruptions == ("gaussian_noise", "frost", "fog")
    before = sorted(p.name for p in root.iterdir())
    for kwargs in ({"seed": 1}, {"severities": [1, 3]}):
        args = {"seed": 0, "severities": [1, 2], **kwargs}
        _one_line_usage_error(lambda: sh.write_corrupted(x, y, root, ["contrast"], args["severities"], args["seed"],
                                                         progress=False), "other settings")
    _one_line_usage_error(lambda: sh.write_corrupted(x, y[::-1].copy(), root, ["contrast"], [1, 2], 0, progress=False),
                          "other labels")
    assert sorted(p.name for p in root.iterdir()) == before


def _bad_layouts(tmp_path):
    """(data_dir, name, message regex) of broken shift folders."""
    good_x = np.zeros((10, 32, 32, 3), np.uint8)
    good_y = np.zeros(10, np.uint8)

    def make(tag, files: dict, meta=None):
        root = tmp_path / tag / "CIFAR-10-C"
        root.mkdir(parents=True)
        for fname, arr in files.items():
            if isinstance(arr, bytes):
                (root / fname).write_bytes(arr)
            else:
                np.save(root / fname, arr)
        if meta is not None:
            (root / "metadata.json").write_text(meta)
        return tmp_path / tag

    return [
        (tmp_path / "absent", "cifar10c", r"no such folder.*CIFAR-10-C"),
        (make("empty", {}), "cifar10c", r"no corruption files"),
        (make("only_labels", {"labels.npy": good_y}), "cifar10c", r"no corruption files"),
        (make("no_labels", {"fog.npy": good_x}), "cifar10c", r"missing labels\.npy"),
        (make("unknown", {"fog.npy": good_x, "rain.npy": good_x, "labels.npy": good_y}), "cifar10c",
         r"unknown corruption file rain\.npy"),
        (make("dtype", {"fog.npy": good_x.astype(np.float32), "labels.npy": good_y}), "cifar10c",
         r"fog\.npy: images must be uint8 \[N, 32, 32, 3\]; got float32"),
        (make("shape", {"fog.npy": np.zeros((10, 3, 32, 32), np.uint8), "labels.npy": good_y}), "cifar10c",
         r"images must be uint8 \[N, 32, 32, 3\]; got uint8 \[10, 3, 32, 32\]"),
        (make("count", {"fog.npy": good_x[:5], "labels.npy": good_y}), "cifar10c", r"5 images but labels\.npy has 10"),
        (make("divisible", {"fog.npy": np.zeros((12, 32, 32, 3), np.uint8), "labels.npy": np.zeros(12, np.uint8)}),
         "cifar10c", r"12 labels are not divisible by the 5 severities"),
        (make("meta_sev", {"fog.npy": good_x, "labels.npy": good_y}, json.dumps({"severities": [1, 2, 3]})),
         "cifar10c", r"10 labels are not divisible by the 3 severities"),
        (make("meta_bad", {"fog.npy": good_x, "labels.npy": good_y}, json.dumps({"severities": [0, 7]})),
         "cifar10c", r"'severities' must be a list of distinct integers in 1\.\.5"),
        (make("meta_json", {"fog.npy": good_x, "labels.npy": good_y}, "{not json"), "cifar10c", r"metadata\.json: cannot read"),
        (make("range", {"fog.npy": good_x, "labels.npy": np.full(10, 10, np.uint8)}), "cifar10c",
         r"labels must lie in \[0, 10\) for cifar10c; got values in \[10, 10\]"),
        (make("labels_2d", {"fog.npy": good_x, "labels.npy": np.zeros((10, 1), np.uint8)}), "cifar10c",
         r"labels must be a non-empty 1-D integer array"),
        (make("corrupt_file", {"fog.npy": b"not an npy file", "labels.npy": good_y}), "cifar10c", r"fog\.npy: cannot read"),
        (tmp_path, "cifar10-c", r"unknown shift set 'cifar10-c'; choose from cifar10c, cifar100c"),
    ]


def test_unreadable_files_never_repeat_numpys_advice_to_unpickle(tmp_path):
    """numpy calls any file that is not an array "pickled (object) data" and advises loading it with
    allow_pickle; the shift readers say what is wrong in one line without that advice, as datafiles does."""
    root = tmp_path / "CIFAR-10-C"
    sh.write_corrupted(_random_images(2), [0, 1], root, ["fog"], [1], progress=False)
    good_labels = (root / "labels.npy").read_bytes()
    garbage, objects = b"garbage\n", tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    for name, content in (("labels.npy", garbage), ("fog.npy", garbage), ("labels.npy", objects.read_bytes())):
        saved = (root / name).read_bytes()
        (root / name).write_bytes(content)
        msg = _one_line_usage_error(lambda: sh.load_shift_set("cifar10c", tmp_path), rf"{name}: cannot read \.npy")
        assert "pickle" not in msg, msg
        (root / name).write_bytes(saved)
    # extending a set whose labels.npy is unreadable; a file replaced after the set was loaded
    (root / "labels.npy").write_bytes(garbage)
    msg = _one_line_usage_error(lambda: sh.write_corrupted(_random_images(2), [0, 1], root, ["contrast"], [1],
                                                           progress=False), r"labels\.npy: cannot read \.npy")
    assert "pickle" not in msg and not (root / "contrast.npy").exists()
    (root / "labels.npy").write_bytes(good_labels)
    s = sh.load_shift_set("cifar10c", tmp_path)
    (root / "fog.npy").write_bytes(garbage)
    assert "pickle" not in _one_line_usage_error(lambda: s.images("fog", 1), r"fog\.npy: cannot read \.npy")
    # a score file holding an array of Python objects
    np.savez(tmp_path / "objects.npz", logits=np.zeros((1, 2, 3)), labels=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match=r"objects\.npz: cannot read \.npz") as ei:
        mt.score_npz(tmp_path / "objects.npz")
    assert "pickle" not in str(ei.value), str(ei.value)


def test_load_shift_set_bad_inputs(tmp_path):
    for data_dir, name, match in _bad_layouts(tmp_path):
        _one_line_usage_error(lambda: sh.load_shift_set(name, data_dir), match)
    d = tmp_path / "ok"
    sh.write_corrupted(_random_images(2), [0, 1], d / "CIFAR-10-C", ["fog"], [1], progress=False)
    _one_line_usage_error(lambda: sh.load_shift_set("cifar10c", d, corruptions=["snow"]), r"missing snow\.npy")
    _one_line_usage_error(lambda: sh.load_shift_set("cifar10c", d, corruptions=["rain"]), r"unknown corruption 'rain'")


# ------------------------------------------------------------------------------------------ command
def _parser():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    sh.add_corrupt_parser(sub)
    return p


def test_corrupt_command_validates_before_writing(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (dict(corruptions="gaussian_noise,rain"), r"unknown corruption 'rain'; choose from gaussian_noise"),
        (dict(corruptions="spatter"), r"held-out"),
        (dict(severities="1,6"), r"severity 6 is outside 1\.\.5"),
        (dict(severities="0"), r"severity 0 is outside 1\.\.5"),
        (dict(severities="1,x"), r"--severities: cannot read"),
        (dict(severities="1,1"), r"names a severity twice"),
        (dict(limit=0), r"--limit must be an integer >= 1; got 0"),
        (dict(seed=-1), r"--seed must be an integer >= 0"),
        (dict(out=a_file), r"is a file, not a folder"),
        (dict(dataset="digits"), r"dataset 'digits' has no corrupted release layout; choose from cifar10, cifar100"),
        (dict(dataset="svhn"), r"choose from cifar10, cifar100"),
    ]
    for kwargs, match in cases:
        args = dict(dataset="cifar10", data_dir=tmp_path / "no_data", out=tmp_path / "out", progress=False, **{})
        args.update(kwargs)
        _one_line_usage_error(lambda: sh.corrupt_command(**args), match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]        # nothing written
    # the target folder exists as a file
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "CIFAR-10-C").write_text("x")
    _one_line_usage_error(lambda: sh.corrupt_command("cifar10", tmp_path, tmp_path / "out2", progress=False),
                          r"CIFAR-10-C is a file")


def test_corrupt_command_end_to_end(shared_data, tmp_path, capsys):
    args = _parser().parse_args(["corrupt", "--dataset", "cifar10", "--data-dir", str(shared_data), "--out",
                                 str(tmp_path), "--corruptions", "gaussian_noise,contrast", "--severities", "1,5",
                                 "--limit", "6", "--seed", "2", "--no-progress"])
    assert args.fn(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_per_severity"] == 6 and printed["corruptions"] == ["gaussian_noise", "contrast"]
    s = sh.load_shift_set("cifar10c", tmp_path)                # `--data-dir out` finds the set
    assert s.severities == (1, 5) and tuple(s.images("contrast", 5).shape) == (6, 3, 32, 32)
    with np.load(shared_data / "cifar10_test.npz") as z:
        x, y = z["x_test"][:6], z["y_test"][:6]
    np.testing.assert_array_equal(s.images("gaussian_noise", 1).numpy().transpose(0, 2, 3, 1),
                                  sh.corrupt(x, "gaussian_noise", 1, seed=2))
    assert s.labels(1).tolist() == y.tolist()
    assert "cifar10 test split, first 6 images" in s.metadata["source_dataset"]


# ------------------------------------------------------------------------------------------ evaluation
def _tiny_set(tmp_path, n=12, corruptions=("gaussian_noise", "contrast"), severities=(1, 3, 5)):
    x = _random_images(n, seed=11)
    y = np.arange(n) % 10
    sh.write_corrupted(x, y, tmp_path / "CIFAR-10-C", list(corruptions), list(severities), seed=0, progress=False)
    return sh.load_shift_set("cifar10c", tmp_path), x, y


def _fake_predictor(members=2, classes=10):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(members, 3 * 32 * 32, classes, generator=g, dtype=torch.float64) * 0.05
    calls = []

    def predict(xb):
        assert xb.dtype == torch.uint8 and xb.shape[1:] == (3, 32, 32)
        calls.append(len(xb))
        return torch.einsum("bi,mic->mbc", xb.double().flatten(1) / 255, w).float()
    return predict, calls


def test_evaluate_shift_keys_and_summaries(tmp_path):
    s, x, y = _tiny_set(tmp_path)
    predict, calls = _fake_predictor()
    val_x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    val_logits = predict(val_x)
    logits_out = {}
    res = sh.evaluate_shift(predict, s, val_logits, torch.from_numpy(y), batch_size=5, logits_out=logits_out)
    json.dumps(res)
    assert calls[1:4] == [5, 5, 2]                                        # chunks of batch_size
    keys = {"acc", "nll", "brier", "ece", "aurc", "acc_at_95", "ece_adaptive", "member_acc", "disagreement",
            "nll_ts", "ece_ts"}
    assert res["set"] == "cifar10c" and res["severities"] == [1, 3, 5] and res["n_per_severity"] == 12
    assert res["corruptions"] == ["gaussian_noise", "contrast"]
    assert res["temperature"] == pytest.approx(mt.fit_temperature(val_logits, y))
    assert set(res["per_corruption"]) == {"gaussian_noise", "contrast"}
    for c in res["per_corruption"]:
        assert set(res["per_corruption"][c]) == {"1", "3", "5"}
        assert all(set(m) == keys for m in res["per_corruption"][c].values())
    cells = [m for c in res["per_corruption"].values() for m in c.values()]
    assert res["mean"]["nll"] == pytest.approx(np.mean([m["nll"] for m in cells]))
    assert set(res["by_severity"]) == {"1", "3", "5"}
    assert res["by_severity"]["3"]["acc"] == pytest.approx(np.mean([res["per_corruption"][c]["3"]["acc"]
                                                                    for c in res["corruptions"]]))
    assert res["by_corruption"]["contrast"]["ece"] == pytest.approx(np.mean([m["ece"] for m in
                                                                             res["per_corruption"]["contrast"].values()]))
    # a cell agrees with the metrics module on the same logits
    z = predict(s.images("contrast", 5))
    ref = mt.evaluate(z, y, temperature=res["temperature"])
    got = res["per_corruption"]["contrast"]["5"]
    assert all(got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7) for k in keys)
    # without validation data: no temperature-scaled keys
    res0 = sh.evaluate_shift(predict, s)
    assert res0["temperature"] is None and "nll_ts" not in res0["mean"]
    # the saved logits are a score file's shift section: score_npz reproduces the numbers
    assert sorted(logits_out) == sorted([f"shift_{c}_{v}" for c in res["corruptions"] for v in (1, 3, 5)] + ["shift_labels"])
    f = tmp_path / "preds.npz"
    np.savez(f, logits=val_logits.numpy(), labels=y, val_logits=val_logits.numpy(), val_labels=y, **logits_out)
    scored = mt.score_npz(f)["shift"]
    for part in ("per_corruption", "by_corruption", "by_severity", "mean"):
        assert json.dumps(scored[part], sort_keys=True) == json.dumps(res[part], sort_keys=True)
    with pytest.raises(UsageError, match="batch_size"):
        sh.evaluate_shift(predict, s, batch_size=0)


# ------------------------------------------------------------------------------------------ score files
def _shift_arrays(m=3, c=10, n=40):
    g = torch.Generator().manual_seed(5)
    z = lambda k: (torch.randn(m, n, c, generator=g, dtype=torch.float64) * 2).numpy()   # noqa: E731
    y = torch.randint(0, c, (n,), generator=g).numpy()
    return z, y


def test_score_npz_with_shift_arrays(tmp_path):
    z, y = _shift_arrays()
    main, val = z(0), z(1)
    cells = {"gaussian_noise_1": z(2), "gaussian_noise_5": z(3), "motion_blur_2": z(4)}
    own = np.roll(y, 3)
    f = tmp_path / "run.npz"
    np.savez(f, logits=main, labels=y, val_logits=val, val_labels=y, shift_labels=y,
             shift_labels_motion_blur_2=own, **{f"shift_{k}": v for k, v in cells.items()})
    res = mt.score_npz(f)
    base = mt.evaluate(main, y, val_logits=val, val_labels=y)
    assert {k: v for k, v in res.items() if k != "shift"} == base          # the rest is unchanged
    sft = res["shift"]
    t = base["temperature"]
    assert sft["temperature"] == t and sft["severities"] == [1, 2, 5]
    assert sft["corruptions"] == ["gaussian_noise", "motion_blur"]
    assert sft["per_corruption"]["gaussian_noise"]["5"] == mt.shift_cell_metrics(cells["gaussian_noise_5"], y, temperature=t)
    assert sft["per_corruption"]["motion_blur"]["2"] == mt.shift_cell_metrics(cells["motion_blur_2"], own, temperature=t)
    assert sft["by_severity"]["2"] == sft["per_corruption"]["motion_blur"]["2"]
    assert sft["mean"]["acc"] == pytest.approx(np.mean([sft["per_corruption"][c][s]["acc"]
                                                        for c, s in (("gaussian_noise", "1"), ("gaussian_noise", "5"),
                                                                     ("motion_blur", "2"))]))
    json.dumps(res)
    # probabilities are read like the main array
    soft = lambda a: torch.softmax(torch.from_numpy(a), -1).numpy()        # noqa: E731
    f2 = tmp_path / "probs.npz"
    np.savez(f2, probs=soft(main), labels=y, shift_labels=y, shift_fog_3=soft(cells["gaussian_noise_1"]))
    r2 = mt.score_npz(f2)["shift"]["per_corruption"]["fog"]["3"]
    ref = mt.shift_cell_metrics(cells["gaussian_noise_1"], y)
    assert r2.keys() == ref.keys() and all(r2[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-9) for k in ref)
    # no shift arrays: no "shift" key
    f3 = tmp_path / "plain.npz"
    np.savez(f3, logits=main, labels=y)
    assert "shift" not in mt.score_npz(f3)


def test_score_npz_shift_bad_inputs(tmp_path):
    z, y = _shift_arrays()
    main = z(0)
    cases = {
        "no_labels": (dict(shift_fog_1=z(1)), r"'shift_fog_1' has no labels"),
        "bad_name": (dict(shift_fog=z(1), shift_labels=y), r"shift_<corruption>_<severity>"),
        "sev0": (dict(shift_fog_0=z(1), shift_labels=y), r"severity an integer >= 1"),
        "orphan": (dict(shift_fog_1=z(1), shift_labels=y, shift_labels_snow_2=y), r"'shift_labels_snow_2' but no 'shift_snow_2'"),
        "only_labels": (dict(shift_labels=y), r"shift labels but no shift_"),
        "classes": (dict(shift_fog_1=z(1)[:, :, :5], shift_labels=y), r"must be \[M=3, K, C=10\]"),
        "members": (dict(shift_fog_1=z(1)[:2], shift_labels=y), r"must be \[M=3, K, C=10\]"),
        "label_len": (dict(shift_fog_1=z(1), shift_labels=y[:-1]), r"shift_labels has length 39"),
        "label_range": (dict(shift_fog_1=z(1), shift_labels=y + 10), r"shift_labels must lie in \[0, 10\)"),
        "nan": (dict(shift_fog_1=np.full_like(z(1), np.nan), shift_labels=y), r"'shift_fog_1' contains NaN"),
        "unused_shared": (dict(shift_fog_1=z(1), shift_labels_fog_1=y, shift_labels=y), r"'shift_labels' is not used"),
    }
    for name, (arrays, match) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, logits=main, labels=y, **arrays)
        with pytest.raises(ValueError, match=match) as ei:
            mt.score_npz(path)
        assert "\n" not in str(ei.value) and path.name in str(ei.value), (name, str(ei.value))


def test_interrupted_write_leaves_a_consistent_set(tmp_path, monkeypatch):
    x = _random_images(3, seed=8)
    y = np.arange(3)
    root = tmp_path / "CIFAR-10-C"
    orig = sh._apply

    def failing(name, *a, **k):
        if name == "contrast":
            raise KeyboardInterrupt
        return orig(name, *a, **k)

    monkeypatch.setattr(sh, "_apply", failing)
    with pytest.raises(KeyboardInterrupt):
        sh.write_corrupted(x, y, root, ["fog", "contrast", "snow"], [2, 4], seed=1, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["fog.npy", "labels.npy", "metadata.json"]   # no .partial
    assert json.loads((root / "metadata.json").read_text())["corruptions"] == ["fog"]
    assert sh.load_shift_set("cifar10c", tmp_path).corruptions == ("fog",)
    monkeypatch.setattr(sh, "_apply", orig)
    meta = sh.write_corrupted(x, y, root, ["contrast", "snow"], [2, 4], seed=1, progress=False)   # the rerun extends it
    assert meta["corruptions"] == ["snow", "fog", "contrast"] and set(meta["parameters"]) == set(meta["corruptions"])


def test_fast_paths_equal_scipy():
    """The vectorised forms equal the generator's scipy calls: clipped_zoom (ndimage.zoom, order 1, per
    image), zoom_blur's single operator (the sum of clipped zooms) and the bilinear gather
    (ndimage.map_coordinates, order 1, modes "mirror" and "reflect", far outside the image too)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    x = rng.random((3, 32, 32, 3))

    def clipped_zoom(img, z):           # make_cifar_c.py's clipped_zoom, one image
        h = img.shape[0]
        ch = int(np.ceil(h / z))
        top = (h - ch) // 2
        img = ndi.zoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
        trim = (img.shape[0] - h) // 2
        return img[trim:trim + h, trim:trim + h]

    for z in (1.0, 1.03, 1.06, 1.25, 1.75, 2.25):
        np.testing.assert_allclose(sh._clipped_zoom(x, z), np.stack([clipped_zoom(i, z) for i in x]), atol=1e-12)
    u8 = (x * 255).astype(np.uint8)
    for stop in (sh.PARAMS["zoom_blur"][0], sh.PARAMS["zoom_blur"][4]):
        zs = np.arange(1, stop, 0.01)
        ref = (u8 / 255.0 + sum(np.stack([clipped_zoom(i / 255.0, z) for i in u8]) for z in zs)) / (len(zs) + 1)
        np.testing.assert_allclose(sh._zoom_blur(u8, stop, None, {}), np.clip(ref, 0, 1) * 255, atol=2e-4)
    rows, cols = rng.uniform(-40, 72, (2, 3, 32, 32))
    rows[0, 0, :4] = [-0.5, -1.0, 31.5, 32.0]
    coords = np.empty((4, 3, 32, 32, 3))
    coords[0] = np.arange(3)[:, None, None, None]
    coords[1], coords[2], coords[3] = rows[..., None], cols[..., None], np.arange(3)
    for mode in ("mirror", "reflect"):
        np.testing.assert_allclose(sh._bilinear(x, rows, cols, mode),
                                   ndi.map_coordinates(x, coords, order=1, mode=mode), atol=1e-12)


def test_corrupt_is_a_command_of_the_cli(tmp_path, capsys):
    """`ensemble-bench corrupt` is registered in the CLI (bad input: one line, exit 2, nothing written), and
    building the CLI's parser does not import torch or scipy (the corruption code loads them on first use)."""
    import subprocess
    import sys

    from ensemble_bench.cli import build_parser, main

    args = build_parser().parse_args(["corrupt", "--out", str(tmp_path / "o"), "--limit", "3"])
    assert args.fn is sh.cli_corrupt and args.limit == 3 and args.dataset == "cifar10"
    code = main(["corrupt", "--dataset", "digits", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "no corrupted release layout" in err
    assert not (tmp_path / "out").exists()
    probe = ("import sys; from ensemble_bench.cli import build_parser; build_parser(); "
             "print('torch' in sys.modules, 'scipy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
