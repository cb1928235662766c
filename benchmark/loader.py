"""Batches of a dataset already on the training device: augmentation as tensor ops, normalisation, and
a loader that shuffles with its own generator (reproducible, resumable; no worker processes)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ensemble_bench.data import Augment, Split


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
