"""Shared fixtures: the development data copies (../shared/data), a small real CIFAR-10 bundle and a
helper that fits one method through the real harness."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ENSEMBLE_BENCH_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_data_dir() -> Path:
    if not (SHARED_DATA / "cifar10_train.npz").is_file():
        pytest.skip(f"real CIFAR-10 copies not found in {SHARED_DATA} (set ENSEMBLE_BENCH_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_dir()


def subsample(bundle, n_train: int, n_test: int, n_val: int | None = None, n_ood: int = 500):
    """A smaller bundle of the same data: the first rows of every split (fixed, not seeded)."""
    from ensemble_bench.data import DataBundle, Split

    def cut(s, n):
        return Split(s.x[:n].clone(), s.y[:n].clone()) if s is not None else None

    return DataBundle(bundle.name, bundle.num_classes, cut(bundle.train, n_train),
                      cut(bundle.val, n_val or max(n_train // 10, 200)), cut(bundle.test, n_test),
                      {k: v[:n_ood].clone() for k, v in bundle.ood.items()}, bundle.mean, bundle.std,
                      bundle.augment, bundle.source + f" (test subset: {n_train} train / {n_test} test)")


def half_resolution(bundle):
    """The same real images at 16x16 (2x2 average pooling): a quarter of the CPU cost per epoch."""
    from ensemble_bench.data import Augment, DataBundle, Split

    def pool(x):
        return torch.nn.functional.avg_pool2d(x.float(), 2).round().to(torch.uint8)

    def cut(s):
        return Split(pool(s.x), s.y.clone()) if s is not None else None

    return DataBundle(bundle.name, bundle.num_classes, cut(bundle.train), cut(bundle.val), cut(bundle.test),
                      {k: pool(v) for k, v in bundle.ood.items()}, bundle.mean, bundle.std, Augment(crop_pad=2),
                      bundle.source + " (2x2 average-pooled to 16x16)")


@pytest.fixture(scope="session")
def cifar10_small(shared_data):
    """Real CIFAR-10 (JPEG-decoded development copy): 3,000 train, 300 val, 1,000 test, OOD sets."""
    from ensemble_bench import data

    return subsample(data.load("cifar10", shared_data), 3000, 1000, 300)


@pytest.fixture(scope="session")
def digits():
    from ensemble_bench import data

    return data.load("digits")


def fit_method(method: str, bundle, *, backbone: str = "cnn_small", epochs: int = 3, seed: int = 0,
               options: dict | None = None, ckpt_dir=None, device: str = "cpu", **run):
    """Fit ``method`` through the real harness on ``bundle`` (on ``device``); returns (model, trainer, ctx)."""
    import ensemble_bench.methods as methods
    from ensemble_bench.api import FitContext
    from ensemble_bench.config import build_options
    from ensemble_bench.resolve import make_run_config
    from ensemble_bench.train import Trainer

    torch.manual_seed(seed)
    if bundle.name != "digits":   # the run's data identity is read from the development copies
        run.setdefault("data_dir", str(shared_data_dir()))
    cfg = make_run_config({"method": method, "backbone": backbone, "dataset": bundle.name, "epochs": epochs,
                           "seed": seed, "options": dict(options or {}), "progress": False, **run})
    trainer = Trainer(bundle, cfg, device, ckpt_dir=ckpt_dir, log=lambda s: None)
    ctx = FitContext(config=cfg, num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                     image_size=bundle.image_size, device=torch.device(device), data=bundle, trainer=trainer)
    cls = methods.get(method)
    model = cls(build_options(cls.Config, cfg.options, method)).fit(ctx)
    return model, trainer, ctx


def ensemble_vs_members(model, trainer, split=None):
    """(ensemble NLL, mean member NLL, ensemble acc) on the bundle's test split."""
    from ensemble_bench.metrics import nll

    split = split or trainer.data.test
    logits = trainer.predict(model, split.x)
    y = split.y.cpu()
    ens = nll(logits, y, combine=getattr(model, "combine", "probs"))
    members = sum(nll(logits[m:m + 1], y) for m in range(logits.shape[0])) / logits.shape[0]
    acc = (logits.softmax(-1).mean(0).argmax(-1) == y).float().mean().item()
    return ens, members, acc


class Killed(Exception):
    """What ``kill_at`` raises: a stand-in for a process killed mid-run."""


@contextlib.contextmanager
def kill_at(stage: str, epoch: int, exc: type[BaseException] = Killed):
    """While open, ``Trainer.fit`` of stage ``stage`` raises ``exc`` at the end of epoch ``epoch``: after the
    stage's own ``on_epoch_end`` hook, before that epoch's checkpoint, so a run killed there resumes after
    epoch ``epoch - 1``."""
    import ensemble_bench.train as train_mod

    orig = train_mod.Trainer.fit

    def fit(self, model, **kw):
        inner = kw.get("on_epoch_end")

        def hook(m, e):
            if inner is not None:
                inner(m, e)
            if kw.get("stage") == stage and e == epoch:
                raise exc()
        kw["on_epoch_end"] = hook
        return orig(self, model, **kw)

    train_mod.Trainer.fit = fit
    try:
        yield
    finally:
        train_mod.Trainer.fit = orig


def growing_val_nll(monkeypatch) -> None:
    """Make every validation NLL larger (and accuracy smaller) than the one before, so each best_val stage
    keeps its first epoch whichever of the two it selects on."""
    import itertools

    from ensemble_bench.train import Trainer

    calls = itertools.count()

    def fake(self, m):
        n = float(next(calls))
        return {"val_acc": 1.0 / (1.0 + n), "val_nll": n}, torch.full((4,), n, dtype=torch.float64)

    monkeypatch.setattr(Trainer, "_validate", fake)
