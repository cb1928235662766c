"""Data-parallel training of one network over several processes (torch.distributed, DDP).

``torchrun --nproc-per-node N -m ensemble_bench run ...`` (or a sweep's ``[slurm] tasks_per_node`` /
``nodes``: submitit's tasks, exported as torch.distributed's environment by ``export_slurm_env``) starts N
ranks of the same run. Every rank builds the same data, model and trainer; ``Trainer.fit`` then:

- draws each GLOBAL batch exactly as the 1-process run does (the same data-order and augmentation
  generator on every rank: the same global batch order), applies the stage's batch transform (MIMO's
  batch repetition, the batched deep ensemble's member slots) to the global batch, and keeps this rank's
  contiguous shard of its rows (``shard``);
- weights each rank's loss by its share of the global batch, so DDP's gradient average is the gradient
  of the global batch's mean loss also when the last batch does not split evenly;
- synchronises batch-norm statistics over the ranks (``SyncedBatchNorm``: all-reduced sums, on gloo
  where torch's SyncBatchNorm does not run and on nccl alike), so that N ranks train the network the 1-process run with the same global batch
  trains, to float rounding: one step in float64 gives the 1-process gradients to ~1e-15 (tests/test_ddp.py).
  Over many steps the float32 rounding of a half-size batch (other kernels, another summation order) grows
  as any perturbation of SGD does: on an AMD EPYC, 2 ranks ended 4 epochs of the test's digits run at an NLL
  2.4e-3 (relative) from the 1-process run's, where another seed moves it 1.2e-2 (on an Intel Xeon the two
  agreed to 1e-5);
- lets rank 0 alone write checkpoints, the stage store and the record; every rank resumes from rank 0's
  checkpoint (a shared file system, as on one node or a cluster's shared storage).

The world size and the global batch enter the effective recipe (``recipe_fields``), hence the run id and
the leaderboard's row: a run on N devices is never pooled with one on another number. The record's
training device says ``N x <device>`` and its training time is per device (wall) and in total (x N).
Ranks > 0 run the training only (``follow``) and leave the evaluation to rank 0.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sys
from typing import Any, Callable, Iterator

import torch
from torch import nn

_ASSUMED: list[int] = []   # assume_world_size: the world size a sweep's jobs will have (run ids on the submitter)


def world_size() -> int:
    if _ASSUMED:
        return _ASSUMED[-1]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def active() -> bool:
    """Whether this process is one rank of several (after ``init``)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


@contextlib.contextmanager
def assume_world_size(n: int) -> Iterator[None]:
    """Run ids for jobs that will run on ``n`` ranks (a sweep submitting multi-task Slurm jobs)."""
    _ASSUMED.append(int(n))
    try:
        yield
    finally:
        _ASSUMED.pop()


def recipe_fields() -> dict[str, Any]:
    """What data-parallel training adds to the effective recipe: nothing on one process (run ids of
    1-process runs are unchanged), the world size otherwise (the global batch is the recipe's batch_size;
    the per-device batch is batch_size / world_size)."""
    n = world_size()
    return {"world_size": n} if n > 1 else {}


def export_slurm_env() -> None:
    """Inside a Slurm job of several tasks (submitit), export RANK / WORLD_SIZE / MASTER_ADDR / ... for
    torch.distributed. Nothing for a job of one task or a process that has them already (torchrun)."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1") or 1) <= 1:
        return
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export()


def init(device: torch.device) -> torch.device:
    """Join the process group (once): nccl on CUDA (this rank's GPU: LOCAL_RANK), gloo on CPU. Returns
    the device this rank trains on. A process that is not one of several ranks is left alone."""
    if world_size() <= 1 or _ASSUMED:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """This rank's contiguous rows of a global batch (x: batch first; y: batch last, e.g. [B] or member
    labels [M, B]) and the weight of its loss: rows here x world size / rows in all, so that DDP's average
    of the ranks' gradients is the gradient of the global batch's mean loss. A rank left without rows
    (a last batch smaller than the world) runs one row with weight 0, so every rank still synchronises."""
    n, r = world_size(), rank()
    b = x.shape[0]
    lo, hi = (b * r) // n, (b * (r + 1)) // n
    if hi <= lo:
        return x[:1], y[..., :1], 0.0
    return x[lo:hi], y[..., lo:hi], (hi - lo) * n / b


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean over the ranks of a (scalar) tensor; itself on one process."""
    if not active():
        return value
    t = value.detach().clone()
    torch.distributed.all_reduce(t)
    return t / world_size()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks of ``t``, differentiable (its gradient is the sum of the ranks' gradients):
    torch's functional collectives where they exist, else the older autograd-aware ``torch.distributed.nn``
    one (deprecated in their favour). tests/test_ddp.py's float64 step checks the gradient through it."""
    try:
        from torch.distributed._functional_collectives import all_reduce, wait_tensor
    except ImportError:
        from torch.distributed.nn.functional import all_reduce as legacy
        return legacy(t)
    return wait_tensor(all_reduce(t, "sum", torch.distributed.group.WORLD))


class SyncedBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (all ranks); it also runs on
    gloo on CPU, where torch's SyncBatchNorm does not. The sums travel through autograd-aware all-reduces, so the
    backward pass is that of one batch-norm over the global batch. In eval mode: plain BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        c = x.shape[1]
        xf = x if x.dtype == torch.float64 else x.float()     # statistics in float32 at least
        count = torch.full((1,), float(x.numel() // c), dtype=xf.dtype, device=x.device)
        stats = _all_reduce_sum(torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count]))
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (total / max(float(total) - 1, 1.0)) * m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def _swap_batchnorm(module: nn.Module, to_sync: bool) -> list[tuple[nn.Module, str, nn.Module]]:
    swapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if to_sync and type(child) is nn.BatchNorm2d:
                new = SyncedBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            elif not to_sync and type(child) is SyncedBatchNorm:
                new = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
            else:
                continue
            # the same parameter and buffer objects: the optimiser and the checkpoints see no difference
            new._parameters = child._parameters
            new._buffers = child._buffers
            new.train(child.training)
            setattr(parent, name, new)
            swapped.append((parent, name, new))
    return swapped


@contextlib.contextmanager
def local_batchnorm(model: nn.Module) -> Iterator[None]:
    """Plain batch-norm layers inside ``data_parallel`` for a moment (e.g. counting FLOPs on one rank)."""
    if not active():
        yield
        return
    _swap_batchnorm(model, False)
    try:
        yield
    finally:
        _swap_batchnorm(model, True)


@contextlib.contextmanager
def data_parallel(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``model`` wrapped for data-parallel training (batch-norm synchronised over the ranks); yields the
    module to call in the training loop and restores plain batch-norm layers afterwards. On one process:
    ``model`` itself."""
    if not active():
        yield model
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    # ours on CUDA too (its all-reduces run on nccl): it swaps the layers in place around the same parameters
    _swap_batchnorm(model, True)
    # buffers are not synchronised in the forward pass (SyncedBatchNorm keeps every rank's running statistics
    # equal: they are those of the global batch); newer torch names that forward_sync_buffers (it also
    # broadcasts rank 0's buffers once at wrapping: they are equal already), older torch broadcast_buffers
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
               else "broadcast_buffers")
    try:
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=False, **{no_sync: False})
        yield ddp
    finally:
        _swap_batchnorm(model, False)


def follow(cfg: Any, *, log: Callable[[str], None] | None = None) -> dict:
    """A rank > 0 of a data-parallel run: the same data, trainer and ``fit`` as rank 0 (which holds the
    run's lock and writes checkpoints and the record), training only; rank 0 evaluates. A run whose
    record is complete is skipped here as on rank 0."""
    from ensemble_bench import data as data_mod
    from ensemble_bench import records
    from ensemble_bench.api import FitContext
    from ensemble_bench.runner import (code_identity, make_method, make_trainer, resolve_device,
                                       seed_everything)
    import ensemble_bench.methods as methods
    from pathlib import Path

    out, run_id = Path(cfg.out), cfg.run_id()
    if records.record_status(out, run_id) == "complete":
        return records.read_record(out / f"{run_id}.json")
    method = make_method(cfg)
    device = resolve_device(cfg.device)
    bundle = data_mod.load(cfg.dataset, cfg.data_dir, cfg.download, cfg.val_fraction)
    seed_everything(cfg.seed)
    trainer = make_trainer(cfg, bundle, device, code_identity(methods.get(cfg.method)), lambda s: None)
    ctx = FitContext(config=cfg, num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                     image_size=bundle.image_size, device=trainer.device, data=bundle, trainer=trainer)
    method.fit(ctx)
    print(f"rank {rank()}/{world_size()}: {run_id} trained; rank 0 evaluates and writes the record",
          file=sys.stderr, flush=True)
    # the record is rank 0's: wait for it (a rank 0 that dies takes the job down: torchrun, Slurm)
    import time

    while True:
        status = records.record_status(out, run_id)
        if status in ("complete", "failed"):
            rec = records.read_record(out / f"{run_id}.json")
            if status == "failed":
                raise RuntimeError(f"rank 0 failed: {rec.get('error')}")
            return rec
        time.sleep(0.5)
