"""One run, end to end: RunConfig -> data -> method.fit -> predictions -> metrics -> cost -> record.

The record is written atomically as ``<out>/<run_id>.json``; while the run is going a record with
status "running" stands there, a failure leaves status "failed" with the error, and only a complete
record counts for the leaderboard. Checkpoints live in ``<out>/.ckpt/<run_id>/`` and are removed once
the record is complete, so a killed run resumes where it stopped when started again.
"""
from __future__ import annotations

import datetime as _dt
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

import methods
from benchmark.api import COMBINE_RULES, EnsembleModel, FitContext
from benchmark.config import RunConfig, build_options
from benchmark.errors import UsageError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def make_method(cfg: RunConfig):
    cls = methods.get(cfg.method)
    return cls(build_options(cls.Config, cfg.options, cfg.method))


def check_model(model: Any, method: str) -> EnsembleModel:
    if not isinstance(model, EnsembleModel):
        raise TypeError(f"method {method!r} returned {type(model).__name__}, not an EnsembleModel")
    if model.combine not in COMBINE_RULES:
        raise TypeError(f"method {method!r} declares combine={model.combine!r}; expected one of {COMBINE_RULES}")
    return model


def check_buildable(method: Any, cfg: RunConfig) -> None:
    """Build the method's architecture on the meta device (no memory, no compute, no data) so that a
    method / backbone combination it refuses (a ``UsageError`` from ``build``) is bad input before any
    record or folder exists (and a sweep refuses it before submitting). Any other failure here is left
    for the real build inside ``fit`` to report."""
    from benchmark.data import IMAGE_SHAPES, NUM_CLASSES

    channels, size = IMAGE_SHAPES[cfg.dataset]
    ctx = FitContext(config=cfg, num_classes=NUM_CLASSES[cfg.dataset], in_channels=channels, image_size=size,
                     device=torch.device("meta"))
    rng = torch.get_rng_state()
    try:
        with torch.device("meta"):
            method.build(ctx)
    except UsageError:
        raise
    except Exception:
        pass
    finally:
        torch.set_rng_state(rng)


def execute(cfg: RunConfig, *, log: Callable[[str], None] | None = None, force: bool = False) -> dict:
    """Run one configuration and return its complete record (an existing complete record is returned
    as is unless ``force``)."""
    from benchmark import cost as cost_mod
    from benchmark import data as data_mod
    from benchmark import metrics as metrics_mod
    from benchmark import results
    from benchmark.train import Trainer

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(cfg.out)
    run_id = cfg.run_id()
    if not force and results.record_status(out, run_id) == "complete":
        log(f"{run_id}: complete record exists, skipped")
        return results.read_record(out / f"{run_id}.json")
    method = make_method(cfg)            # bad options fail here, before anything is written
    device = resolve_device(cfg.device)
    check_buildable(method, cfg)   # a method that cannot take this backbone: refused, nothing written
    bundle = data_mod.load(cfg.dataset, cfg.data_dir, cfg.download, cfg.val_fraction)
    record: dict[str, Any] = {
        "schema_version": results.SCHEMA_VERSION, "run_id": run_id, "status": "running",
        "config": cfg.to_dict(),
        "method": {"name": cfg.method, "options": dict(cfg.options),
                   "size_reference": bool(getattr(type(method), "size_reference", False))},
        "data": bundle.describe(),
        "env": results.environment_info(),
        "timings": {"started": _now()}, "error": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    results.write_record(out, record)
    t_start = time.perf_counter()
    try:
        seed_everything(cfg.seed)
        trainer = Trainer(bundle, cfg, device, ckpt_dir=out / ".ckpt" / run_id, log=log)
        ctx = FitContext(config=cfg, num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                         image_size=bundle.image_size, device=device, data=bundle, trainer=trainer)
        log(f"{run_id}: {cfg.method} on {cfg.backbone} / {cfg.dataset}, {cfg.epochs} epochs, seed {cfg.seed}, {device}")
        model = check_model(method.fit(ctx), cfg.method)
        model = trainer.prepare(model).eval()
        t_eval = time.perf_counter()
        test = trainer.data.test
        logits = trainer.predict(model, test.x)
        val_logits = trainer.predict(model, trainer.data.val.x) if trainer.data.val is not None else None
        ood = {k: trainer.predict(model, v) for k, v in trainer.data.ood.items()}
        labels = test.y.cpu()
        val_labels = trainer.data.val.y.cpu() if val_logits is not None else None
        metrics = metrics_mod.evaluate(logits, labels, val_logits=val_logits, val_labels=val_labels,
                                       ood=ood, combine=model.combine)
        eval_s = time.perf_counter() - t_eval
        cost = cost_mod.measure(model, (bundle.in_channels, bundle.image_size, bundle.image_size), device,
                                latency=True, latency_runs=cfg.latency_runs,
                                bf16=trainer.bf16, channels_last=trainer.channels_last)
        training = trainer.summary()
        # work a method does outside Trainer.fit (e.g. mask updates, batch-norm passes) joins the totals
        extra = ctx.info.pop("train_flops_extra", None)
        if extra is not None and training["train_flops"] is not None:
            training["train_flops"] += float(extra)
        extra_s = ctx.info.pop("train_s_extra", None)
        if extra_s is not None:
            training["train_s"] += float(extra_s)
            training["train_s_extra"] = float(extra_s)
        training["device"] = cost_mod.device_name(device)
        if cfg.save_predictions:
            results.save_predictions(out, run_id, logits=logits, labels=labels, val_logits=val_logits,
                                     val_labels=val_labels, ood=ood, combine=model.combine)
        record["method"].update({"combine": model.combine, "num_members": model.num_members, "info": ctx.info})
        record.update(status="complete", metrics=metrics, cost=cost, training=training)
        record["timings"].update(finished=_now(), wall_s=time.perf_counter() - t_start, eval_s=eval_s)
        results.write_record(out, record)
        shutil.rmtree(out / ".ckpt" / run_id, ignore_errors=True)
        return record
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or type(e).__name__ in ("JobInterrupted",):
            raise   # interrupted, not failed: the "running" record stays and the checkpoint resumes it
        record.update(status="failed", error=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc(limit=20))
        record["timings"].update(finished=_now(), wall_s=time.perf_counter() - t_start)
        results.write_record(out, record)
        raise


def build_for_cost(method_name: str, backbone: str, num_classes: int, in_channels: int, image_size: int,
                   options: dict[str, Any], device: torch.device) -> EnsembleModel:
    """The method's deployed architecture, untrained (``cost`` without training)."""
    from benchmark import backbones

    backbones.check_name(backbone)
    cls = methods.get(method_name)
    opts = build_options(cls.Config, options, method_name)
    cfg = RunConfig(method=method_name, backbone=backbone, dataset="digits", options=dict(vars(opts)))
    ctx = FitContext(config=cfg, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                     device=device)
    return check_model(cls(opts).build(ctx), method_name).to(device).eval()
