import numpy as np
import pytest
import torch

from ensemble_bench import data, loader
from ensemble_bench.errors import UsageError


def test_digits_offline_default(digits):
    assert digits.num_classes == 10 and digits.in_channels == 1 and digits.image_size == 8
    assert digits.train.x.dtype == torch.uint8
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert abs(len(digits.val) - 0.1 * (len(digits.train) + len(digits.val))) < 1
    assert set(digits.ood) == {"photos"} and digits.ood["photos"].shape[1:] == (1, 8, 8)
    # the test split is fixed: a second load gives the same test images
    again = data.load("digits")
    assert torch.equal(again.test.x, digits.test.x)


def test_validation_is_the_last_fraction_of_train():
    b = data.load("digits", val_fraction=0.2)
    full = data.load("digits", val_fraction=0.0)
    assert b.val is not None and full.val is None
    assert torch.equal(torch.cat([b.train.x, b.val.x]), full.train.x)


def test_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.int32).view(2, 3, 6, 6).to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = loader.augment_batch(x, data.Augment(crop_pad=2, flip=False), g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        windows = [padded[b, :, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)
    assert out.dtype == torch.uint8


def test_flip_and_crop_statistics():
    x = torch.zeros(4000, 1, 4, 4, dtype=torch.uint8)
    x[:, :, :, 0] = 255                                     # left column white
    out = loader.augment_batch(x, data.Augment(crop_pad=0, flip=True), torch.Generator().manual_seed(1))
    flipped = (out[:, 0, 0, 3] == 255).float().mean().item()
    assert 0.45 < flipped < 0.55
    assert torch.equal(loader.augment_batch(x, data.Augment(0, False)), x)


def test_loader_is_reproducible_and_normalises(digits):
    norm = loader.Normalizer(digits.mean, digits.std, "cpu")
    a = [b for b in loader.TensorLoader(digits.train, 100, norm, augment=digits.augment,
                                       generator=torch.Generator().manual_seed(3))]
    b = [b for b in loader.TensorLoader(digits.train, 100, norm, augment=digits.augment,
                                       generator=torch.Generator().manual_seed(3))]
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    xs = torch.cat([x for x, _ in loader.TensorLoader(digits.train, 100, norm, shuffle=False)])
    assert abs(xs.mean().item()) < 0.05 and abs(xs.std().item() - 1) < 0.05


def test_cifar10_from_shared_npz(shared_data):
    b = data.load("cifar10", shared_data)
    assert (len(b.train), len(b.val), len(b.test)) == (17100, 1900, 10000)
    assert set(b.ood) == {"svhn", "cifar100"}
    assert b.train.x.shape[1:] == (3, 32, 32) and b.train.x.dtype == torch.uint8
    assert "JPEG" in b.source


def test_missing_and_corrupt_data_files(tmp_path):
    with pytest.raises(UsageError, match="not found.*--download"):
        data.load("cifar10", tmp_path)
    (tmp_path / "cifar10_train.npz").write_bytes(b"not a zip")
    (tmp_path / "cifar10_test.npz").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="cannot read data file"):
        data.load("cifar10", tmp_path)
    np.savez(tmp_path / "cifar10_train.npz", wrong=np.zeros(3))
    with pytest.raises(UsageError, match="missing x_train"):
        data.load("cifar10", tmp_path)
    with pytest.raises(UsageError, match="unknown dataset"):
        data.load("imagenet")
