"""The metrics' input checks (one-line ``ValueError``) and float64 kernels on checked tensors; the public
functions built on them are in ``ensemble_bench.metrics.core`` (conventions: ``ensemble_bench.metrics``)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ensemble_bench.api import COMBINE_RULES

OOD_SCORES = ("msp", "entropy", "mi")

# Search range of the temperature (log-space), see fit_temperature.
_T_MIN, _T_MAX = 0.05, 20.0
_T_GRID = 49  # coarse grid points over [log T_MIN, log T_MAX]
_T_TOL = 1e-7  # golden-section tolerance on log T

_DTYPE = torch.float64


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _to_tensor(x: Any, name: str) -> Tensor:
    """Any array-like -> CPU tensor (dtype kept for the caller to decide)."""
    if isinstance(x, Tensor):
        return x.detach().cpu()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(_one_line(f"{name} must be an array or tensor; got {type(x).__name__} ({exc})")) from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a numeric array; got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _float_tensor(x: Any, name: str) -> Tensor:
    t = _to_tensor(x, name)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be a real floating-point array; got dtype {t.dtype}")
    t = t.to(_DTYPE)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _shape(t: Tensor) -> tuple:
    return tuple(int(s) for s in t.shape)


def _check_logits(logits: Any, name: str = "logits") -> Tensor:
    """Validate and return float64 logits of shape [M, N, C] (2-D [N, C] becomes M = 1)."""
    z = _float_tensor(logits, name)
    if z.dim() == 2:
        z = z.unsqueeze(0)
    if z.dim() != 3:
        raise ValueError(f"{name} must be [M, N, C] (or [N, C] for one model); got shape {_shape(z)}")
    if min(z.shape) == 0:
        raise ValueError(f"{name} must have M, N, C >= 1; got shape {_shape(z)}")
    if z.shape[-1] < 2:
        raise ValueError(f"{name} must have C >= 2 classes; got shape {_shape(z)}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return z


def _check_probs_bar(probs_bar: Any, name: str = "probs_bar") -> Tensor:
    p = _float_tensor(probs_bar, name)
    if p.dim() != 2:
        raise ValueError(f"{name} must be [N, C] ensemble probabilities; got shape {_shape(p)}")
    if min(p.shape) == 0:
        raise ValueError(f"{name} must have N, C >= 1; got shape {_shape(p)}")
    return p


def _check_labels(labels: Any, n: int, c: int, name: str = "labels") -> Tensor:
    y = _to_tensor(labels, name)
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N]; got shape {_shape(y)}")
    if y.shape[0] != n:
        raise ValueError(f"{name} has length {y.shape[0]} but the predictions have N = {n}")
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"{name} contains NaN or inf")
        if not bool((y == torch.round(y)).all()):
            raise ValueError(f"{name} must be integer class indices; got non-integer values")
    elif y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{name} must be integer class indices; got dtype {y.dtype}")
    y = y.to(torch.int64)
    if n and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ValueError(
            f"{name} must lie in [0, {c}) for C = {c} classes; got values in [{int(y.min())}, {int(y.max())}]"
        )
    return y


def _check_combine(combine: Any) -> str:
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {COMBINE_RULES}; got {combine!r}")
    return combine


def _check_scores(s: Any, name: str) -> np.ndarray:
    t = _float_tensor(s, name)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D; got shape {_shape(t)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    return t.numpy()


# --------------------------------------------------------------------------------------------
# predictive distributions (internal versions take validated float64 [M, N, C] tensors)
# --------------------------------------------------------------------------------------------
def _ensemble_log_probs(z: Tensor, combine: str) -> Tensor:
    if combine == "logits":
        return torch.log_softmax(z.mean(dim=0), dim=-1)
    m = z.shape[0]
    return torch.logsumexp(torch.log_softmax(z, dim=-1), dim=0) - math.log(m)


def _ensemble_probs(z: Tensor, combine: str) -> Tensor:
    if combine == "logits":
        return torch.softmax(z.mean(dim=0), dim=-1)
    return torch.softmax(z, dim=-1).mean(dim=0)


def _nll(z: Tensor, y: Tensor, combine: str) -> float:
    lp = _ensemble_log_probs(z, combine)
    return float(-lp.gather(1, y.unsqueeze(1)).mean())


def _accuracy(p: Tensor, y: Tensor) -> float:
    return float((p.max(dim=1).indices == y).to(_DTYPE).mean())


def _brier(p: Tensor, y: Tensor) -> float:
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(_DTYPE)
    return float(((p - onehot) ** 2).sum(dim=1).mean())


def _ece(p: Tensor, y: Tensor, n_bins: int) -> float:
    conf, pred = p.max(dim=1)
    conf = conf.clamp(0.0, 1.0)
    correct = (pred == y).to(_DTYPE)
    # Bin assignment exactly as torchmetrics does it: float32 confidences, float32 linspace
    # boundaries, bucketize(right=True) - 1, so bin i = [b_i, b_{i+1}) and a confidence equal to
    # 1.0 (after float32 rounding) gets a bin of its own. Sums are accumulated in float64.
    bounds = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)
    idx = torch.bucketize(conf.to(torch.float32), bounds, right=True) - 1
    idx = idx.clamp(0, n_bins)
    conf_sum = torch.zeros(n_bins + 1, dtype=_DTYPE).scatter_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins + 1, dtype=_DTYPE).scatter_add_(0, idx, correct)
    # sum_b (n_b / N) * |acc_b - conf_b|  ==  sum_b |acc_sum_b - conf_sum_b| / N
    return float((acc_sum - conf_sum).abs().sum() / p.shape[0])


def _ranked_errors(p: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Confidences sorted descending and the matching 0/1 errors, each tie group's errors replaced by the
    group's mean error (see the module docs: the result does not depend on the input order)."""
    conf, pred = p.max(dim=1)
    conf = conf.numpy()
    err = (pred != y).numpy().astype(np.float64)
    order = np.argsort(-conf, kind="stable")
    conf, err = conf[order], err[order]
    starts = np.flatnonzero(np.r_[True, conf[1:] != conf[:-1]])
    sizes = np.diff(np.r_[starts, len(conf)])
    return conf, np.repeat(np.add.reduceat(err, starts) / sizes, sizes)


def _risk_coverage(p: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray]:
    _, err = _ranked_errors(p, y)
    k = np.arange(1, len(err) + 1, dtype=np.float64)
    return k / len(err), np.cumsum(err) / k


def _aurc(p: Tensor, y: Tensor) -> float:
    return float(_risk_coverage(p, y)[1].mean())


def _acc_at_coverage(p: Tensor, y: Tensor, coverage: float) -> float:
    _, err = _ranked_errors(p, y)
    n = len(err)
    k = max(1, int(math.ceil(round(coverage * n, 9))))   # round() keeps 0.95 * 20 = 19, not 19.000000000000004
    return float(1.0 - err[:k].sum() / k)


def _ece_adaptive(p: Tensor, y: Tensor, n_bins: int) -> float:
    conf, err = _ranked_errors(p, y)
    conf, acc = conf[::-1], 1.0 - err[::-1]            # ascending confidence
    total = 0.0
    for cb, ab in zip(np.array_split(conf, n_bins), np.array_split(acc, n_bins)):
        if len(cb):
            total += abs(ab.sum() - cb.sum())           # = n_b * |acc_b - conf_b|
    return float(total / len(conf))


def _member_preds(z: Tensor) -> Tensor:
    return torch.softmax(z, dim=-1).max(dim=-1).indices  # [M, N]


def _member_accuracy(z: Tensor, y: Tensor) -> float:
    return float((_member_preds(z) == y.unsqueeze(0)).to(_DTYPE).mean())


def _disagreement(z: Tensor) -> float:
    m, n, c = z.shape
    if m < 2:
        return 0.0
    preds = _member_preds(z)  # [M, N]
    counts = torch.zeros(n, c, dtype=_DTYPE).scatter_add_(1, preds.T.contiguous(), torch.ones(n, m, dtype=_DTYPE))
    pairs = m * (m - 1) / 2.0
    agree_pairs = (counts * (counts - 1) / 2.0).sum(dim=1)  # per sample
    return float(((pairs - agree_pairs) / pairs).mean())


def _entropy(p: Tensor) -> Tensor:
    return torch.special.entr(p).sum(dim=-1)


def _ood_scores(z: Tensor, combine: str) -> dict[str, Tensor]:
    p_bar = _ensemble_probs(z, combine)
    h_bar = _entropy(p_bar)
    if z.shape[0] == 1:
        mi = torch.zeros_like(h_bar)
    else:
        mi = h_bar - _entropy(torch.softmax(z, dim=-1)).mean(dim=0)
        if combine == "probs":
            mi = mi.clamp_min(0.0)  # >= 0 by Jensen; remove rounding noise
    return {"msp": -p_bar.max(dim=1).values, "entropy": h_bar, "mi": mi}


def _fit_temperature(z: Tensor, y: Tensor, combine: str) -> float:
    """argmin_T NLL(z / T) over T in [_T_MIN, _T_MAX]: coarse log-grid, then golden section."""
    cache: dict[float, float] = {}

    def f(log_t: float) -> float:
        if log_t not in cache:
            cache[log_t] = _nll(z / math.exp(log_t), y, combine)
        return cache[log_t]

    lo, hi = math.log(_T_MIN), math.log(_T_MAX)
    grid = np.linspace(lo, hi, _T_GRID)
    vals = [f(float(g)) for g in grid]
    k = int(np.argmin(vals))
    a = float(grid[max(k - 1, 0)])
    b = float(grid[min(k + 1, _T_GRID - 1)])
    # golden-section search on [a, b] (the grid minimum lies inside, so the refined point can only
    # improve on it; the ensemble NLL need not be convex in log T, hence the grid first)
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    c = b - inv_phi * (b - a)
    d = a + inv_phi * (b - a)
    while b - a > _T_TOL:
        if f(c) <= f(d):
            b, d = d, c
            c = b - inv_phi * (b - a)
        else:
            a, c = c, d
            d = a + inv_phi * (b - a)
    best = min(cache, key=lambda t: (cache[t], abs(t)))
    return float(math.exp(best))


