"""Cost of a deployed ensemble: parameters, FLOPs (sparsity-aware), latency, throughput, peak memory.

Conventions (docs: shared/specs/metrics.md, section Cost):

* FLOPs follow ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add is 2 FLOPs; bias additions,
  norms and activations are not counted). Numbers are per sample, inference, whole ensemble; MACs are
  FLOPs / 2.
* Sparse layers count ``density x dense FLOPs``. Every module that owns a ``weight`` tensor (conv,
  linear, or any custom layer) gets the FLOPs run *inside its own forward call* and not inside a nested
  weighted module; its density comes from, in this order: the ``density`` argument, the model's
  ``layer_density()`` hook, else the fraction of non-zero entries of its weight (exact for methods that
  keep pruned weights at exactly zero; 1.0 for dense models). FLOPs run outside any weighted module
  (e.g. a functional matmul in a parent forward) count at density 1.
* Latency: batch 1, median of many timed forwards after warm-up; CUDA events on GPU, ``perf_counter`` on
  CPU. Throughput: images/s at a large batch. A device name is always recorded beside a time.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import threading
import time
from functools import lru_cache
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["count_params", "count_flops", "measure_latency", "measure_throughput", "device_name", "measure"]


# ------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own flag afterwards (a training model
    may hold sub-modules deliberately kept in eval, e.g. frozen norms)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in flags:
            m.training = t


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _weight_of(module: nn.Module) -> Tensor | None:
    """The module's ``weight`` tensor (a parameter, or the computed tensor of a parametrization /
    ``torch.nn.utils.prune``), or None."""
    try:
        w = getattr(module, "weight", None)
    except Exception:   # a computed weight that cannot be evaluated on its own
        return None
    return w if isinstance(w, Tensor) else None


def _nonzero_fraction(w: Tensor) -> float:
    if w.numel() == 0 or w.is_meta:
        return 1.0
    w = w.detach()
    if w.layout != torch.strided:
        w = w.to_dense()
    return float(torch.count_nonzero(w).item()) / w.numel()


# ------------------------------------------------------------------------------------------ params
def count_params(model: nn.Module) -> dict:
    """``{"params": total parameters, "params_nonzero": non-zero (live) entries of all parameters}``.

    Shared parameters count once. A weight pruned with ``torch.nn.utils.prune`` (``<name>_orig``
    parameter with a ``<name>_mask`` buffer) counts its live entries, ``orig * mask``."""
    total = 0
    nonzero = 0
    seen: set[int] = set()
    for module in model.modules():
        buffers = dict(module.named_buffers(recurse=False))
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if p.is_meta:
                nonzero += p.numel()
                continue
            t = p.detach()
            if name.endswith("_orig") and isinstance(buffers.get(name[:-5] + "_mask"), Tensor):
                mask = buffers[name[:-5] + "_mask"]
                if mask.shape == t.shape:
                    t = t * mask.to(t.device, t.dtype)
            nonzero += int(torch.count_nonzero(t).item())
    return {"params": int(total), "params_nonzero": int(nonzero)}


# ------------------------------------------------------------------------------------------ FLOPs
def _resolve_density(model: nn.Module, density: dict[str, float] | None) -> dict[str, float]:
    """Layer densities by qualified module name: the model's ``layer_density()`` hook, overridden
    entry by entry by an explicit ``density`` dict."""
    merged: dict[str, float] = {}
    hook = getattr(model, "layer_density", None)
    if callable(hook):
        got = hook()
        if got is not None:
            merged.update(got)
    if density is not None:
        merged.update(density)
    names = {n for n, _ in model.named_modules()}
    unknown = sorted(set(merged) - names)
    if unknown:
        raise ValueError(f"density given for module(s) not in the model: {', '.join(unknown[:5])}"
                         + (" ..." if len(unknown) > 5 else ""))
    for k, v in merged.items():
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"density of {k!r} must be in [0, 1]; got {v}")
    return {k: float(v) for k, v in merged.items()}


def count_flops(model: nn.Module, example_input: Tensor, density: dict[str, float] | None = None) -> dict:
    """Inference FLOPs per sample of ``model`` on ``example_input`` (any batch size).

    Returns ``{"flops", "flops_dense", "macs", "macs_dense", "flops_other", "per_layer"}``:
    ``flops`` counts every weighted layer at its density, ``flops_other`` is the (dense) part that ran
    outside any weighted module, ``per_layer`` maps each weighted module that ran FLOPs to
    ``{"flops_dense", "density", "flops"}`` (per sample). The model runs once in eval mode under
    ``torch.no_grad`` and gets its train/eval flags back afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    if example_input.dim() == 0 or example_input.shape[0] < 1:
        raise ValueError("example_input needs a batch dimension of size >= 1")
    batch = int(example_input.shape[0])
    dens = _resolve_density(model, density)

    weighted = {name: m for name, m in model.named_modules() if _weight_of(m) is not None}
    counter = FlopCounterMode(display=False)
    dense: dict[str, int] = {}
    # stack of [name, global count at entry, FLOPs of nested weighted calls]
    stack: list[list[Any]] = []

    def pre_hook(name: str) -> Callable:
        def hook(module, args):
            stack.append([name, counter.get_total_flops(), 0])
        return hook

    def post_hook(name: str) -> Callable:
        def hook(module, args, output):
            # pop down to our own frame (robust to a nested call that raised and never popped)
            while stack:
                top = stack.pop()
                if top[0] == name:
                    break
            else:
                return
            inside = counter.get_total_flops() - top[1]
            dense[name] = dense.get(name, 0) + inside - top[2]
            if stack:
                stack[-1][2] += inside
        return hook

    handles = []
    try:
        for name, m in weighted.items():
            handles.append(m.register_forward_pre_hook(pre_hook(name)))
            handles.append(m.register_forward_hook(post_hook(name)))
        with _eval_mode(model), torch.no_grad(), counter:
            model(example_input)
    finally:
        for h in handles:
            h.remove()

    total_dense = counter.get_total_flops()
    per_layer: dict[str, dict[str, float]] = {}
    attributed = 0
    sparse_total = 0.0
    for name, module in weighted.items():
        f = dense.get(name, 0)
        if f <= 0:
            continue
        d = dens[name] if name in dens else _nonzero_fraction(_weight_of(module))
        attributed += f
        sparse_total += d * f
        per_layer[name] = {"flops_dense": f / batch, "density": d, "flops": d * f / batch}
    other = total_dense - attributed
    flops = (sparse_total + other) / batch
    flops_dense = total_dense / batch
    return {"flops": float(flops), "flops_dense": float(flops_dense), "macs": float(flops) / 2,
            "macs_dense": float(flops_dense) / 2, "flops_other": float(other / batch), "per_layer": per_layer}


# ------------------------------------------------------------------------------------------ devices
@lru_cache(maxsize=1)
def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device) -> str:
    """``"cpu: <model name> (N threads)"`` or the CUDA device's name."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return f"cpu: {_cpu_model_name()} ({torch.get_num_threads()} threads)"
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return str(dev)


# ------------------------------------------------------------------------------------------ timing
def _autocast(dev: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; otherwise exact float32 (no TF32: the precision the record names)."""
    if bf16 and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    from ensemble_bench.environment import exact_float32

    return exact_float32()


def _prepare_input(x: Tensor, dev: torch.device, channels_last: bool) -> Tensor:
    x = x.to(dev)
    if channels_last and dev.type == "cuda" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _graphed(model: nn.Module, x: Tensor, dev: torch.device, bf16: bool) -> Callable[[], Any]:
    """The forward on ``x`` captured as one CUDA graph (``replay`` launches all its kernels at once), after
    3 warm-up forwards on a side stream as torch's CUDA-graph notes ask; autocast's weight cache is off
    inside the capture (cached casts would outlive the graph's memory pool)."""
    side = torch.cuda.Stream(dev)   # (measure_latency makes dev the current device around this)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    cast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if bf16 else contextlib.nullcontext()
    with torch.cuda.graph(graph), cast:
        model(x)
    return graph.replay


def _timed_runs(model: nn.Module, x: Tensor, dev: torch.device, runs: int, warmup: int, bf16: bool,
                cuda_graph: bool = False) -> list[float]:
    """Milliseconds of each of ``runs`` forwards after ``warmup`` untimed ones."""
    times: list[float] = []
    cuda = dev.type == "cuda"
    with torch.inference_mode(), _autocast(dev, bf16):
        forward = _graphed(model, x, dev, bf16) if cuda_graph else (lambda: model(x))
        for _ in range(warmup):
            forward()
        if cuda:
            torch.cuda.synchronize(dev)
            for _ in range(runs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                forward()
                end.record()
                torch.cuda.synchronize(dev)
                times.append(float(start.elapsed_time(end)))
        else:
            for _ in range(runs):
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def measure_latency(model: nn.Module, example_input: Tensor, device, runs: int = 50, warmup: int = 10, *,
                    bf16: bool = False, channels_last: bool = False, cuda_graph: bool = False) -> dict:
    """Batch-1 forward latency in milliseconds: median, 10th and 90th percentile of ``runs`` timed
    forwards after ``warmup`` ones (eval mode, ``torch.inference_mode``).

    ``cuda_graph`` (CUDA only; the benchmarks' diagnostic, never a record's number): time the replay of the
    forward captured as one CUDA graph, i.e. the GPU's own time without the host's kernel launches. At batch
    1 a small CNN's eager forward on a fast GPU is bound by those launches, so its latency follows the host's
    speed; the graph's does not (benchmarks/README.md has both, measured)."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1; got {runs}")
    dev = torch.device(device)
    if cuda_graph and dev.type != "cuda":
        raise ValueError("cuda_graph needs a CUDA device")
    x = _prepare_input(example_input, dev, channels_last)
    on_dev = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with _eval_mode(model), on_dev:   # events and replay on the model's device, whichever is current
        times = _timed_runs(model, x, dev, runs, max(warmup, 0), bf16, cuda_graph)
    return {"latency_ms": float(statistics.median(times)), "latency_ms_p10": float(_percentile(times, 10)),
            "latency_ms_p90": float(_percentile(times, 90)), "latency_runs": len(times),
            "latency_device": device_name(dev)}


def _current_rss_mib() -> float | None:
    """Resident set size of this process now (Linux /proc), None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class _RssPeak:
    """Peak RSS growth over a block, sampled every ``interval`` s by a thread. (``ru_maxrss`` is a
    process-lifetime high-water mark: after training it no longer moves, so its growth reads 0.)"""

    def __init__(self, interval: float = 0.002, enabled: bool = True):
        self.enabled = enabled
        self.interval, self.peak, self.base = interval, None, None
        self._stop = threading.Event()

    def __enter__(self):
        self.base = _current_rss_mib() if self.enabled else None
        self.peak = self.base
        if self.base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            v = _current_rss_mib()
            if v is not None and v > self.peak:
                self.peak = v
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        if self.base is not None:
            self._thread.join()
            v = _current_rss_mib()
            if v is not None and v > self.peak:
                self.peak = v
        return False

    @property
    def growth_mib(self) -> float | None:
        return None if self.base is None else max(self.peak - self.base, 0.0)


def measure_throughput(model: nn.Module, example_input_one: Tensor, device, batch_size: int = 256, runs: int = 10,
                       warmup: int = 2, *, bf16: bool = False, channels_last: bool = False) -> dict:
    """Images per second at ``batch_size`` (median over ``runs`` timed forwards) and the peak memory of
    that batch: on CUDA the allocator's peak; on CPU the peak growth of the process's resident memory
    during the runs, sampled by a thread (memory the allocator already holds from earlier work is not
    counted again, so this is a lower bound). On CUDA a batch that runs out of memory is halved until it
    fits; the batch used is recorded."""
    if runs < 1 or batch_size < 1:
        raise ValueError("runs and batch_size must be >= 1")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    one = example_input_one[:1]
    bs = int(batch_size)
    with _eval_mode(model):
        while True:
            x = _prepare_input(one.repeat(bs, *([1] * (one.dim() - 1))), dev, channels_last)
            if cuda:
                torch.cuda.synchronize(dev)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            oom = False
            try:
                with _RssPeak(enabled=not cuda) as rss:   # CUDA: the allocator's own peak below
                    times = _timed_runs(model, x, dev, runs, max(warmup, 0), bf16)
            except torch.OutOfMemoryError:
                if not cuda or bs == 1:
                    raise
                oom = True
            if not oom:
                break
            del x                     # outside the except block: the traceback no longer pins tensors
            torch.cuda.empty_cache()
            bs //= 2
        if cuda:
            peak = torch.cuda.max_memory_allocated(dev) / 2**20
        else:
            peak = rss.growth_mib       # activations of the batch beyond the RSS before it
    sec = statistics.median(times) / 1e3
    return {"throughput": float(bs / sec) if sec > 0 else float("inf"), "throughput_batch": bs,
            "throughput_device": device_name(dev), "peak_mem_mb": None if peak is None else float(peak)}


# ------------------------------------------------------------------------------------------ all
def measure(model: nn.Module, input_shape: tuple, device, *, latency: bool = True, latency_runs: int = 50,
            throughput_batch: int = 256, density: dict[str, float] | None = None, bf16: bool = False,
            channels_last: bool = False) -> dict:
    """Params, FLOPs and (when ``latency``) batch-1 latency, throughput and peak memory in one dict.

    FLOPs are counted on the model's current device. Timing runs on ``device`` (the model is moved
    there if it is elsewhere). ``bf16`` (autocast) and ``channels_last`` apply on CUDA only; the
    precision used is recorded as ``"precision"``."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    out: dict[str, Any] = dict(count_params(model))
    here = _model_device(model) or dev
    x = torch.randn(1, *input_shape, device=here)
    out.update(count_flops(model, x, density=density))
    out["device"] = device_name(dev)
    out["precision"] = "bf16" if (bf16 and cuda) else "fp32"
    if latency:
        if here != dev and not (here.type == dev.type and dev.index is None):
            model.to(dev)
        if channels_last and cuda:
            model.to(memory_format=torch.channels_last)
        x = torch.randn(1, *input_shape, device=dev)
        out.update(measure_latency(model, x, dev, runs=latency_runs, bf16=bf16, channels_last=channels_last))
        out.update(measure_throughput(model, x, dev, batch_size=throughput_batch, bf16=bf16,
                                      channels_last=channels_last))
    return out
