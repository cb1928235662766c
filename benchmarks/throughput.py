"""Training and inference throughput of every registered method, side by side with the bare backbone.

For every registered method (default options; ``--methods a,b`` for a subset, ``--set method.key=value``
to change an option), its deployed model built untrained by ``ensemble_bench.runner.build_for_cost`` on one
backbone, and measured with the suite's own cost code where it has one:

  params, params_nonzero   ensemble_bench.cost.count_params
  gflops                   inference GFLOPs per sample, whole ensemble (ensemble_bench.cost.count_flops)
  latency_ms               batch 1, median of --latency-runs (>= 50) timed forwards after warm-up
                           (ensemble_bench.cost.measure_latency; CUDA events on GPU, perf_counter on CPU)
  infer_img_s              images/s at --batch (256), median of --infer-runs timed forwards
                           (ensemble_bench.cost.measure_throughput; halves the batch on CUDA OOM)
  train_img_s              images/s of an optimiser-step loop on one random batch of --train-batch (128):
                           forward, the default loss (cross-entropy summed over the members of model(x),
                           [M, B, C]), backward, SGD step. Median over --train-repeats windows of
                           --train-steps steps after --warmup steps; CUDA events around each window on
                           GPU, perf_counter on CPU. Every image of the batch goes through all M members.
  train_note               how that loop differs from the method's own training, read from the model's
                           structure, never from its name (e.g. a model trained on an M-slot input is
                           timed on its deployed forward, which tiles the image into the M slots)

Reference rows (the plain backbone, ``ensemble_bench.backbones.build_backbone``):
  bare fwd+bwd             forward, cross-entropy, backward, no optimiser: the reference of issue 9's GPU
                           target (suite training >= 80% of this)
  bare step                the same plus the SGD step
  suite Trainer.fit        the suite's real training loop (ensemble_bench.train.Trainer.fit) on the plain
                           backbone over --suite-images synthetic uint8 images on the device: batch
                           augmentation, normalisation, loss, backward, step, NaN checks; median epoch time
                           of --train-repeats epochs after a warm-up epoch (the Trainer's own epoch_s,
                           perf_counter)
The column train_vs_bare is train_img_s / bare fwd+bwd images/s.

``--bf16`` (autocast) and ``--channels-last`` (model and input) apply on CUDA only; with either, every row
is measured in that setting, and also in plain fp32 / NCHW with ``--compare-fp32``.

    python benchmarks/throughput.py --device cpu --backbone resnet20
    python benchmarks/throughput.py --device cuda --backbone resnet18 --bf16 --channels-last --compare-fp32
Writes results/bench_throughput_<cpu|cuda>.{md,csv} (``--out`` for another folder).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import math
import os
import pkgutil
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

import ensemble_bench.methods as methods
from ensemble_bench import cost
from ensemble_bench.api import StackedEnsemble, default_loss
from ensemble_bench.backbones import build_backbone, check_name
from ensemble_bench.config import build_options, options_dict
from ensemble_bench.errors import UsageError
from ensemble_bench.runner import build_for_cost, resolve_device


# ------------------------------------------------------------------------------------ shared helpers
# (latency_noise.py imports these)
def load_registry() -> tuple[list[str], dict[str, str]]:
    """Registered method names, and ``{module: error}`` of method files that fail to import (another
    engineer's file half-written must not stop the benchmark of every other method)."""
    problems: dict[str, str] = {}
    for mod in sorted(pkgutil.iter_modules(methods.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{methods.__name__}.{mod.name}")
        except Exception as e:  # noqa: BLE001
            problems[mod.name] = f"{type(e).__name__}: {e}"
    try:
        names = methods.names()
    except Exception:  # noqa: BLE001  the registry re-raises a broken module's error once, then lists the rest
        names = methods.names()
    return names, problems


def parse_sets(items: list[str] | None, known: list[str]) -> dict[str, dict[str, str]]:
    """``["packed.alpha=4", ...]`` -> ``{"packed": {"alpha": "4"}}``; every value is checked against the
    method's Config here, so a typo is one line and exit code 2, not a failed row."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        method, dot, opt = key.strip().partition(".")
        if not eq or not dot or not method or not opt.strip():
            raise UsageError(f"--set expects method.key=value; got {item!r}")
        if method not in known:
            raise UsageError(f"--set {item!r}: unknown method {method!r}; choose from {', '.join(known)}")
        out.setdefault(method, {})[opt.strip()] = value
    for method, opts in out.items():
        build_options(methods.get(method).Config, opts, method)
    return out


def select_methods(arg: str | None, known: list[str]) -> list[str]:
    if not arg:
        return list(known)
    chosen = [s.strip() for s in arg.split(",") if s.strip()]
    bad = [s for s in chosen if s not in known]
    if bad:
        raise UsageError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(known)}")
    return chosen


def resolved_options(name: str, overrides: dict[str, str]) -> dict[str, Any]:
    return options_dict(build_options(methods.get(name).Config, overrides, name))


def short_error(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:200]}"


def release(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


def environment_lines(dev: torch.device, args, argv: list[str], started_load: tuple[float, ...] | None) -> list[str]:
    """Header lines that say where and how the numbers were made."""
    lines = [f"- device: {cost.device_name(dev)}",
             f"- torch {torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
             f"{torch.get_num_threads()} torch threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"]
    if dev.type == "cuda":
        lines.append(f"- CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                     f"cudnn.benchmark={torch.backends.cudnn.benchmark}, "
                     f"TF32 conv={torch.backends.cudnn.allow_tf32}, "
                     f"TF32 matmul={torch.backends.cuda.matmul.allow_tf32}")
    try:
        import subprocess

        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit:
            lines.append(f"- git {commit}{' (uncommitted changes in the tree)' if dirty else ''}")
    except Exception:  # noqa: BLE001
        pass
    if started_load is not None and hasattr(os, "getloadavg"):
        lines.append(f"- load average (1 min) at start {started_load[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    if getattr(args, "note", None):
        lines.append(f"- note: {args.note}")
    lines.append(f"- command: `python {shlex.join(argv)}`")
    return lines


def fmt(v: Any, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def write_table(out_dir: Path, stem: str, rows: list[dict], md_lines: list[str], dev: torch.device,
                first: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """The rows as CSV (columns ``first`` leading, the device and torch version on every row, since a
    time means nothing without them) and the markdown lines."""
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    df = pd.DataFrame(rows)
    df["device"] = cost.device_name(dev)
    df["torch"] = torch.__version__
    cols = [c for c in first if c in df.columns]
    df[cols + [c for c in df.columns if c not in cols]].to_csv(csv_path, index=False)
    md_path.write_text("\n".join(md_lines) + "\n")
    return csv_path, md_path


def autocast_ctx(dev: torch.device, bf16: bool):
    if bf16 and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(dev.type if dev.type in ("cpu", "cuda") else "cpu", enabled=False)


# ------------------------------------------------------------------------------------ timing
def time_windows(step: Callable[[], Any], dev: torch.device, steps: int, repeats: int, warmup: int) -> list[float]:
    """Seconds of each of ``repeats`` windows of ``steps`` calls of ``step``, after ``warmup`` calls.
    CUDA events around each window (the GPU's time from the first launch to the last kernel) on GPU,
    ``perf_counter`` on CPU."""
    cuda = dev.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
    out = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            out.append(time.perf_counter() - t0)
    return out


@dataclasses.dataclass
class Setting:
    bf16: bool
    channels_last: bool

    @property
    def label(self) -> str:
        return ("bf16" if self.bf16 else "fp32") + (" + channels_last" if self.channels_last else "")


def train_throughput(model: nn.Module, loss_fn: Callable, x1: torch.Tensor, num_classes: int, batch: int,
                     dev: torch.device, setting: Setting, args, *, optimiser: bool = True) -> dict:
    """Images/s of ``steps`` x (forward, ``loss_fn(model, x, y)``, backward[, SGD step]) on one random
    batch. On CUDA a batch that runs out of memory is halved until it fits (the batch used is recorded)."""
    cuda = dev.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters")
    # the suite's default recipe (RunConfig): SGD, momentum 0.9, weight decay 5e-4; a small lr keeps the
    # random-data steps finite (the lr does not change the cost of a step)
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4) if optimiser else None
    model.train()
    bs = int(batch)
    while True:
        x = x1.repeat(bs, *([1] * (x1.dim() - 1)))
        x.normal_()
        if setting.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, num_classes, (bs,), device=dev)
        last = {}

        def step():
            with autocast_ctx(dev, setting.bf16):
                loss = loss_fn(model, x, y)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            else:
                for p in params:
                    p.grad = None
            loss.backward()
            if opt is not None:
                opt.step()
            last["loss"] = loss

        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            times = time_windows(step, dev, args.train_steps, args.train_repeats, args.warmup)
            break
        except torch.OutOfMemoryError:
            if not cuda or bs == 1:
                raise
        # outside the except block, so the traceback no longer pins the batch's tensors
        del x, y, last
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            opt.state.clear()
        release(dev)
        bs //= 2
    finite = bool(torch.isfinite(last["loss"].detach().float()).item())
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None
    sec = statistics.median(times) / args.train_steps
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    return {"img_s": bs / sec, "batch": bs, "peak_mem_mb": peak, "finite": finite,
            "windows_s": [round(t, 4) for t in times]}


def bare_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def train_note(model: nn.Module, method_cls: type | None, live_flops_frac: float | None) -> str:
    """How the timed loop differs from the method's own training, from the model's structure only."""
    notes = []
    m = int(getattr(model, "num_members", 1))
    repeat = int(getattr(model, "input_repeat", 1) or 1)
    if repeat > 1 and callable(getattr(model, "forward_raw", None)):
        notes.append(f"trained on an input of {repeat} slots (forward_raw); timed on the deployed forward, which "
                     f"tiles each image into the {repeat} slots; one image = one training row")
    if isinstance(model, StackedEnsemble) and m > 1:
        notes.append(f"{m} members stepped together on one shared batch (a run may train them one after the other)")
    if live_flops_frac is not None and live_flops_frac < 0.999:
        notes.append(f"sparse (live weights do {100 * live_flops_frac:.0f}% of the dense FLOPs), timed on dense "
                     f"kernels; mask / topology updates not timed")
    for obj in (model, method_cls):
        extra = getattr(obj, "train_note", None)
        if isinstance(extra, str) and extra and extra not in notes:
            notes.append(extra)
    return "; ".join(notes)


# ------------------------------------------------------------------------------------ measurement
def measure_inference(model: nn.Module, x1: torch.Tensor, dev: torch.device, setting: Setting, args, row: dict,
                      errors: list[str]) -> None:
    try:
        p = cost.count_params(model)
        row.update(params=p["params"], params_nonzero=p["params_nonzero"])
    except Exception as e:  # noqa: BLE001
        errors.append("params: " + short_error(e))
    try:
        f = cost.count_flops(model, x1)
        row.update(gflops=f["flops"] / 1e9, gflops_dense=f["flops_dense"] / 1e9)
    except Exception as e:  # noqa: BLE001
        errors.append("flops: " + short_error(e))
    if setting.channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        lat = cost.measure_latency(model, x1, dev, runs=args.latency_runs, warmup=args.latency_warmup,
                                   bf16=setting.bf16, channels_last=setting.channels_last)
        row.update(latency_ms=lat["latency_ms"], latency_ms_p10=lat["latency_ms_p10"],
                   latency_ms_p90=lat["latency_ms_p90"], latency_runs=lat["latency_runs"])
    except Exception as e:  # noqa: BLE001
        errors.append("latency: " + short_error(e))
        release(dev)
    try:
        thr = cost.measure_throughput(model, x1, dev, batch_size=args.batch, runs=args.infer_runs,
                                      warmup=args.infer_warmup, bf16=setting.bf16, channels_last=setting.channels_last)
        row.update(infer_img_s=thr["throughput"], infer_batch=thr["throughput_batch"],
                   infer_peak_mem_mb=thr["peak_mem_mb"])
    except Exception as e:  # noqa: BLE001
        errors.append("inference throughput: " + short_error(e))
        release(dev)


def measure_training(model: nn.Module, loss_fn: Callable, x1: torch.Tensor, dev: torch.device, setting: Setting,
                     args, row: dict, errors: list[str], prefix: str = "train", optimiser: bool = True) -> None:
    try:
        t = train_throughput(model, loss_fn, x1, args.num_classes, args.train_batch, dev, setting, args,
                             optimiser=optimiser)
        row.update({f"{prefix}_img_s": t["img_s"], f"{prefix}_batch": t["batch"],
                    f"{prefix}_peak_mem_mb": t["peak_mem_mb"], f"{prefix}_windows_s": t["windows_s"]})
        if row.get("gflops") is not None:
            # achieved training compute, with the harness's convention of 3 x forward FLOPs per sample
            row[f"{prefix}_tflop_s"] = 3 * row["gflops"] * 1e9 * t["img_s"] / 1e12
        if not t["finite"]:
            errors.append(f"{prefix}: loss not finite on random data (timing kept)")
    except Exception as e:  # noqa: BLE001
        errors.append(f"{prefix} throughput: " + short_error(e))
        release(dev)


def synthetic_bundle(n: int, num_classes: int, in_channels: int, image_size: int):
    from ensemble_bench.data import DataBundle, Split

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, in_channels, image_size, image_size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return DataBundle(name="synthetic", num_classes=num_classes, train=Split(x, y), val=None,
                      test=Split(x[:1].clone(), y[:1].clone()), ood={}, mean=(0.5,) * in_channels,
                      std=(0.25,) * in_channels, source="random uint8 images")


def measure_suite_fit(args, dev: torch.device, setting: Setting, row: dict, errors: list[str]) -> None:
    """The suite's own loop, Trainer.fit, on the plain backbone; images/s from its per-epoch times."""
    from ensemble_bench.resolve import make_run_config
    from ensemble_bench.train import Trainer

    try:
        epochs = args.train_repeats + 1
        # The images are the synthetic bundle below; the config's dataset only has to resolve, and resolving
        # identifies (loads) its data: digits ships with scikit-learn, so no data folder is needed.
        cfg = make_run_config({"method": "single", "backbone": args.backbone, "dataset": "digits",
                               "epochs": epochs, "batch_size": args.train_batch, "lr": 1e-3, "progress": False,
                               "bf16": setting.bf16, "channels_last": setting.channels_last, "val_fraction": 0.0})
        bundle = synthetic_bundle(args.suite_images, args.num_classes, args.in_channels, args.image_size)
        trainer = Trainer(bundle, cfg, dev, log=lambda s: None)
        torch.manual_seed(0)
        net = build_backbone(args.backbone, args.num_classes, args.in_channels)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        res = trainer.fit(net, stage="throughput")
        ts = [h["epoch_s"] for h in res.history[1:]]
        row.update(train_img_s=args.suite_images / statistics.median(ts), train_batch=args.train_batch,
                   train_windows_s=[round(t, 4) for t in ts],
                   train_peak_mem_mb=torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None)
        if row.get("gflops") is not None:
            row["train_tflop_s"] = 3 * row["gflops"] * 1e9 * row["train_img_s"] / 1e12
        del trainer, net, bundle
    except Exception as e:  # noqa: BLE001
        errors.append("suite Trainer.fit: " + short_error(e))
    release(dev)


def finish(row: dict, errors: list[str], t0: float) -> dict:
    row["error"] = "; ".join(errors)
    if row["status"] == "ok" and errors:
        row["status"] = "partial"
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def bench_reference(args, dev: torch.device, setting: Setting) -> list[dict]:
    x1 = torch.randn(1, args.in_channels, args.image_size, args.image_size, device=dev)
    rows = []
    t0 = time.perf_counter()
    row: dict[str, Any] = {"row": "bare fwd+bwd", "method": "(bare backbone)", "setting": setting.label,
                           "status": "ok", "num_members": 1, "options": "",
                           "train_note": "plain backbone: forward, cross-entropy, backward; no optimiser step"}
    errors: list[str] = []
    torch.manual_seed(0)
    net = build_backbone(args.backbone, args.num_classes, args.in_channels).to(dev).eval()
    measure_inference(net, x1, dev, setting, args, row, errors)
    measure_training(net, bare_loss, x1, dev, setting, args, row, errors, optimiser=False)
    rows.append(finish(row, errors, t0))
    print(summary_line(rows[-1]), flush=True)

    t0 = time.perf_counter()
    keep = {k: row.get(k) for k in ("params", "params_nonzero", "gflops", "gflops_dense", "latency_ms",
                                    "latency_ms_p10", "latency_ms_p90", "latency_runs", "infer_img_s",
                                    "infer_batch", "infer_peak_mem_mb")}
    step_row = {"row": "bare step", "method": "(bare backbone)", "setting": setting.label, "status": "ok",
                "num_members": 1, "options": "", **keep,
                "train_note": "plain backbone: forward, cross-entropy, backward, SGD step"}
    errors = []
    measure_training(net, bare_loss, x1, dev, setting, args, step_row, errors, optimiser=True)
    rows.append(finish(step_row, errors, t0))
    print(summary_line(rows[-1]), flush=True)
    del net
    release(dev)

    if args.suite_images > 0:
        t0 = time.perf_counter()
        suite_row = {"row": "suite Trainer.fit", "method": "(bare backbone)", "setting": setting.label,
                     "status": "ok", "num_members": 1, "options": "", **keep,
                     "train_note": (f"ensemble_bench.train.Trainer.fit over {args.suite_images} synthetic uint8 images on "
                                    f"the device (batch augmentation, normalisation, SGD step, NaN checks); "
                                    f"the Trainer's own epoch times")}
        errors = []
        measure_suite_fit(args, dev, setting, suite_row, errors)
        rows.append(finish(suite_row, errors, t0))
        print(summary_line(rows[-1]), flush=True)
    return rows


def bench_method(name: str, overrides: dict[str, str], args, dev: torch.device, setting: Setting) -> dict:
    t0 = time.perf_counter()
    cls = methods.get(name)
    opts = resolved_options(name, overrides)
    row: dict[str, Any] = {"row": "method", "method": name, "setting": setting.label, "status": "ok",
                           "options": ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults",
                           "options_json": json.dumps(opts, sort_keys=True)}
    errors: list[str] = []
    try:
        torch.manual_seed(0)
        model = build_for_cost(name, args.backbone, args.num_classes, args.in_channels, args.image_size,
                               overrides, dev)
    except Exception as e:  # noqa: BLE001
        row["status"] = f"build failed for {args.backbone}"
        errors.append("build: " + short_error(e))
        release(dev)
        return finish(row, errors, t0)
    row["num_members"] = int(getattr(model, "num_members", 1))
    x1 = torch.randn(1, args.in_channels, args.image_size, args.image_size, device=dev)
    measure_inference(model, x1, dev, setting, args, row, errors)
    frac = row["gflops"] / row["gflops_dense"] if row.get("gflops_dense") else None
    row["train_note"] = train_note(model, cls, frac)
    measure_training(model, default_loss, x1, dev, setting, args, row, errors)
    del model
    release(dev)
    return finish(row, errors, t0)


# ------------------------------------------------------------------------------------ report
CSV_FIRST = ("method", "row", "setting", "status", "num_members", "options", "params", "params_nonzero", "gflops",
             "gflops_dense", "latency_ms", "latency_ms_p10", "latency_ms_p90", "latency_runs", "infer_img_s",
             "infer_batch", "infer_peak_mem_mb", "train_img_s", "train_batch", "train_vs_bare", "train_tflop_s",
             "train_peak_mem_mb", "train_windows_s", "train_note", "error", "wall_s")

def summary_line(r: dict) -> str:
    return (f"{r['method']:<16} {r.get('row', ''):<18} {r['setting']:<22} {r['status']:<10} "
            f"lat {fmt(r.get('latency_ms'))} ms  infer {fmt(r.get('infer_img_s'), '.0f')} img/s  "
            f"train {fmt(r.get('train_img_s'), '.0f')} img/s  {r.get('wall_s', '')}s"
            + (f"  [{r['error']}]" if r.get("error") else ""))


def add_ratios(rows: list[dict]) -> None:
    bare = {r["setting"]: r.get("train_img_s") for r in rows if r.get("row") == "bare fwd+bwd"}
    for r in rows:
        b = bare.get(r["setting"])
        r["train_vs_bare"] = r["train_img_s"] / b if b and r.get("train_img_s") else None


def markdown(rows: list[dict], args, dev: torch.device, argv: list[str], load0, problems: dict[str, str],
             wall: float) -> list[str]:
    kind = dev.type
    lines = [f"# Throughput of every method: {args.backbone}, {args.image_size}x{args.image_size}x{args.in_channels}, "
             f"{args.num_classes} classes ({cost.device_name(dev)})", ""]
    lines += environment_lines(dev, args, argv, load0)
    lines += [f"- untrained deployed models (ensemble_bench.runner.build_for_cost), default options unless listed; "
              f"latency: batch 1, median of {args.latency_runs} runs after {args.latency_warmup} warm-up"
              + (" (below the 50 runs of the metric spec: a quick check, not a recorded number)"
                 if args.latency_runs < 50 else "")
              + f"; inference: batch {args.batch}, median of {args.infer_runs} runs; training: batch "
              f"{args.train_batch}, median of {args.train_repeats} windows of {args.train_steps} steps after "
              f"{args.warmup} warm-up steps, {'CUDA events' if kind == 'cuda' else 'perf_counter'}",
              "- train img/s: one optimiser step = forward, summed member cross-entropy of model(x) [M, B, C], "
              "backward, SGD; every image goes through all M members. train vs bare = train img/s / bare fwd+bwd img/s "
              "(issue 9's GPU target: the suite's training >= 80% of the bare forward+backward, rows "
              "`suite Trainer.fit` and `single`)",
              f"- total wall time {wall:.0f} s", ""]
    lines += ["| method | row | setting | M | options | params (M) | live (M) | GFLOPs/img | latency ms (p10-p90) "
              "| infer img/s (batch) | train img/s (batch) | train vs bare | train TFLOP/s | status | train_note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = "-" if r.get("latency_ms") is None else (
            f"{r['latency_ms']:.3g} ({r['latency_ms_p10']:.3g}-{r['latency_ms_p90']:.3g})")
        inf = "-" if r.get("infer_img_s") is None else f"{r['infer_img_s']:.4g} ({r['infer_batch']})"
        tr = "-" if r.get("train_img_s") is None else f"{r['train_img_s']:.4g} ({r['train_batch']})"
        ratio = "-" if r.get("train_vs_bare") is None else f"{100 * r['train_vs_bare']:.0f}%"
        params = "-" if r.get("params") is None else f"{r['params'] / 1e6:.3g}"
        live = "-" if r.get("params_nonzero") is None else f"{r['params_nonzero'] / 1e6:.3g}"
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        lines.append(f"| {r['method']} | {r.get('row', '')} | {r['setting']} | {fmt(r.get('num_members'))} | "
                     f"{r.get('options', '')} | {params} | {live} | {fmt(r.get('gflops'), '.4g')} | {lat} | {inf} | "
                     f"{tr} | {ratio} | {fmt(r.get('train_tflop_s'), '.3g')} | {status} | {r.get('train_note', '')} |")
    if problems:
        lines += ["", "Method files that failed to import (their methods are missing above):"]
        lines += [f"- methods/{k}.py: {v}" for k, v in problems.items()]
    lines += [""]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        by = {(r["method"], r.get("row")): r for r in rows if r["setting"] == setting}
        for key, label in ((("(bare backbone)", "suite Trainer.fit"), "suite Trainer.fit"),
                           (("single", "method"), "`single` step loop")):
            r = by.get(key)
            if r is not None and r.get("train_vs_bare") is not None:
                lines.append(f"- {setting}: {label} at {100 * r['train_vs_bare']:.1f}% of the bare forward+backward "
                             f"throughput (GPU target: >= 80%)")
    return lines


def config_args(ap: argparse.ArgumentParser) -> None:
    """The arguments that say what is measured, shared by the benchmark scripts (their backbone argument is
    their own: one here, a list in latency_noise.py)."""
    ap.add_argument("--methods", help="comma-separated subset of the registered methods (default: all)")
    ap.add_argument("--set", dest="sets", action="append", metavar="METHOD.KEY=VALUE",
                    help="a method option, e.g. packed.alpha=4 (repeatable)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))


def machine_args(ap: argparse.ArgumentParser) -> None:
    """The arguments that say how the device runs and where the table goes, shared by the benchmark scripts."""
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    ap.add_argument("--channels-last", action="store_true", help="channels_last model and input (CUDA only)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--note", help="a line for the report, e.g. 'shared machine: not final numbers'")
    ap.add_argument("--out", default="results")


def run_cli(ap: argparse.ArgumentParser, run: Callable[[Any, list[str]], int], argv: list[str] | None) -> int:
    """Parse ``argv`` and call ``run(args, the command line as given)``; bad input is one line and exit code 2."""
    args = ap.parse_args(argv)
    argv_used = [sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))
    try:
        return run(args, argv_used)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    config_args(ap)
    ap.add_argument("--backbone", default="resnet20")
    ap.add_argument("--batch", type=int, default=256, help="inference throughput batch")
    ap.add_argument("--infer-runs", type=int, default=10)
    ap.add_argument("--infer-warmup", type=int, default=2)
    ap.add_argument("--latency-runs", type=int, default=50)
    ap.add_argument("--latency-warmup", type=int, default=10)
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=10, help="optimiser steps per timed window")
    ap.add_argument("--train-repeats", type=int, default=3,
                    help="timed windows (and suite epochs after the warm-up one)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    ap.add_argument("--suite-images", type=int, default=None,
                    help="images per epoch of the suite Trainer.fit row (default train-batch x train-steps; 0: skip)")
    ap.add_argument("--compare-fp32", action="store_true",
                    help="with --bf16/--channels-last: also measure every row in plain fp32 / NCHW")
    machine_args(ap)
    return run_cli(ap, run, argv)


def run(args, argv_used: list[str]) -> int:
    for k in ("image_size", "in_channels", "batch", "infer_runs", "latency_runs", "train_batch", "train_steps",
              "train_repeats"):
        if getattr(args, k) < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be >= 1")
    if args.num_classes < 2:
        raise UsageError("--num-classes must be >= 2")
    if args.warmup < 0 or args.latency_warmup < 0 or args.infer_warmup < 0:
        raise UsageError("warm-up counts must be >= 0")
    if args.suite_images is None:
        args.suite_images = args.train_batch * args.train_steps
    if args.threads:
        torch.set_num_threads(args.threads)
    check_name(args.backbone)
    dev = resolve_device(args.device)
    if dev.type != "cuda" and (args.bf16 or args.channels_last or args.cudnn_benchmark):
        raise UsageError("--bf16, --channels-last and --cudnn-benchmark apply on CUDA only")
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    known, problems = load_registry()
    chosen = select_methods(args.methods, known)
    sets = parse_sets(args.sets, known)
    if args.methods:
        problems = {}
    settings = [Setting(args.bf16, args.channels_last)]
    if args.compare_fp32 and (args.bf16 or args.channels_last):
        settings.insert(0, Setting(False, False))
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"device {cost.device_name(dev)}; torch {torch.__version__}; methods: {', '.join(chosen)}", flush=True)
    for mod, err in problems.items():
        print(f"warning: methods/{mod}.py failed to import: {err}", file=sys.stderr, flush=True)
    out_dir = Path(args.out)
    stem = f"bench_throughput_{dev.type}"
    rows: list[dict] = []
    t_all = time.perf_counter()
    for setting in settings:
        rows += bench_reference(args, dev, setting)
        for name in chosen:
            try:
                rows.append(bench_method(name, sets.get(name, {}), args, dev, setting))
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001  one method never stops the table
                traceback.print_exc()
                rows.append({"row": "method", "method": name, "setting": setting.label, "status": "failed",
                             "error": short_error(e)})
            print(summary_line(rows[-1]), flush=True)
            add_ratios(rows)
            write_table(out_dir, stem, rows, markdown(rows, args, dev, argv_used, load0, problems,
                                                      time.perf_counter() - t_all), dev, CSV_FIRST)
    add_ratios(rows)
    md = markdown(rows, args, dev, argv_used, load0, problems, time.perf_counter() - t_all)
    csv_path, md_path = write_table(out_dir, stem, rows, md, dev, CSV_FIRST)
    print()
    print("\n".join(md))
    print(f"\nwrote {md_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
