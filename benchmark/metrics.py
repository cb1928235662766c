"""Shared metric functions: every leaderboard number is computed here from member outputs.

Conventions (see shared/specs/metrics.md):

* member logits ``z`` have shape ``[M, N, C]`` (a 2-D ``[N, C]`` array is a single model, M = 1);
* member probabilities ``p_m = softmax(z_m)``; the ensemble predictive distribution is
  ``p̄ = mean_m p_m`` (probabilities are averaged).  ``combine="logits"`` is the one explicit
  exception: ``p̄ = softmax(mean_m z_m)``.  Member-based quantities (member accuracy,
  disagreement, the mean member entropy inside the mutual information) always use each
  member's own softmax;
* everything is computed in float64 on the CPU; inputs may be torch tensors or numpy arrays;
* bad input raises ``ValueError`` with a single-line message (the CLI turns it into exit code 2).

Selective prediction and adaptive calibration (keys ``aurc``, ``acc_at_95``, ``ece_adaptive`` of
``evaluate``), in the style of shared/specs/metrics.md. Confidence is the top ensemble probability
``max_c p̄_c`` (float64); a sample is an error when ``argmax p̄ != y``. Samples are ranked by confidence,
most confident first. **Ties:** samples of equal confidence cannot be ranked, so within each group of equal
confidence every sample counts the group's mean error (and correctness). The values therefore never depend
on the order of the input; for the risk-coverage curve, AURC and acc_at_95 they equal the average over all
orderings of the tied samples, and with distinct confidences they are the plain definitions.

| name | definition |
|---|---|
| risk-coverage curve | for k = 1..N: coverage k/N, selective risk = (errors among the k most confident samples) / k (Geifman & El-Yaniv, NeurIPS 2017) |
| aurc | area under that curve: the mean of the N selective risks, (1/N) sum_k risk_k (a fraction in [0, 1], not x1000) |
| acc_at_95 | accuracy of the k = ceil(0.95 N) most confident samples (selective accuracy at 95% coverage) |
| ece_adaptive | top-label ECE with 15 equal-mass bins (Nixon et al., CVPR-W 2019, top-label): samples sorted by confidence ascending and split as ``numpy.array_split`` (the first N mod 15 bins hold one more sample); sum over bins of (bin count / N) * abs(bin accuracy - bin mean confidence); empty bins (N < 15) count 0 |

Distribution shift (``shift_cell_metrics``, ``shift_summary``, ``score_shift_arrays``; the images and
the loop over them are in benchmark/shift.py): every (corruption, severity) cell gets acc, nll, brier, ece,
aurc, acc_at_95, ece_adaptive, member_acc, disagreement and, with a temperature fitted on the clean
validation split, nll_ts and ece_ts; ``mean`` is the unweighted mean over all cells, ``by_severity`` the
mean over corruptions per severity, ``by_corruption`` the mean over severities per corruption. A score
file stores the cells as ``shift_<corruption>_<severity>`` [M, N, C] with labels ``shift_labels_<corruption>_
<severity>`` [N] or one ``shift_labels`` [N] shared by all cells (see ``score_npz``).
"""

from __future__ import annotations

import math
import os
import zipfile
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ensemble_bench.api import COMBINE_RULES

__all__ = [
    "member_probs",
    "ensemble_probs",
    "ensemble_log_probs",
    "accuracy",
    "nll",
    "brier",
    "ece",
    "risk_coverage",
    "aurc",
    "acc_at_coverage",
    "ece_adaptive",
    "member_accuracy",
    "disagreement",
    "fit_temperature",
    "ood_scores",
    "ood_metrics",
    "evaluate",
    "logits_from_probs",
    "score_npz",
    "shift_cell_metrics",
    "shift_summary",
    "score_shift_arrays",
    "OOD_SCORES",
]

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


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def member_probs(logits: Tensor) -> Tensor:
    """[M, N, C] logits -> [M, N, C] per-member softmax (float64)."""
    return torch.softmax(_check_logits(logits), dim=-1)


def ensemble_probs(logits: Tensor, combine: str = "probs") -> Tensor:
    """[M, N, C] logits -> [N, C] ensemble predictive distribution p̄ (float64)."""
    return _ensemble_probs(_check_logits(logits), _check_combine(combine))


def ensemble_log_probs(logits: Tensor, combine: str = "probs") -> Tensor:
    """[M, N, C] logits -> [N, C] log p̄, finite even where a probability underflows."""
    return _ensemble_log_probs(_check_logits(logits), _check_combine(combine))


def accuracy(probs_bar, labels) -> float:
    """Mean of [argmax p̄ == y]."""
    p = _check_probs_bar(probs_bar)
    return _accuracy(p, _check_labels(labels, p.shape[0], p.shape[1]))


def nll(logits, labels, combine: str = "probs") -> float:
    """-mean log p̄(y) of the ensemble (the mixture, not the mean of member NLLs)."""
    z = _check_logits(logits)
    return _nll(z, _check_labels(labels, z.shape[1], z.shape[2]), _check_combine(combine))


def brier(probs_bar, labels) -> float:
    """Mean over samples of sum over classes (p̄_c - onehot(y)_c)^2, in [0, 2]."""
    p = _check_probs_bar(probs_bar)
    return _brier(p, _check_labels(labels, p.shape[0], p.shape[1]))


def _check_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
    return int(n_bins)


def ece(probs_bar, labels, n_bins: int = 15) -> float:
    """Top-label expected calibration error, equal-width bins; = torchmetrics MulticlassCalibrationError(norm="l1")."""
    n_bins = _check_bins(n_bins)
    p = _check_probs_bar(probs_bar)
    return _ece(p, _check_labels(labels, p.shape[0], p.shape[1]), n_bins)


def risk_coverage(probs_bar, labels) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, selective risk), each float64 [N]: point k is the k most confident samples (ties: module docs)."""
    p = _check_probs_bar(probs_bar)
    return _risk_coverage(p, _check_labels(labels, p.shape[0], p.shape[1]))


def aurc(probs_bar, labels) -> float:
    """Area under the risk-coverage curve: mean over k = 1..N of the selective risk of the k most confident."""
    p = _check_probs_bar(probs_bar)
    return _aurc(p, _check_labels(labels, p.shape[0], p.shape[1]))


def acc_at_coverage(probs_bar, labels, coverage: float = 0.95) -> float:
    """Accuracy of the ceil(coverage * N) most confident samples (acc_at_95 is coverage = 0.95)."""
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float, np.floating)) or not 0 < coverage <= 1:
        raise ValueError(f"coverage must be a number in (0, 1]; got {coverage!r}")
    p = _check_probs_bar(probs_bar)
    return _acc_at_coverage(p, _check_labels(labels, p.shape[0], p.shape[1]), float(coverage))


def ece_adaptive(probs_bar, labels, n_bins: int = 15) -> float:
    """Top-label ECE with equal-mass bins (15 by default); see the module docs for binning and ties."""
    n_bins = _check_bins(n_bins)
    p = _check_probs_bar(probs_bar)
    return _ece_adaptive(p, _check_labels(labels, p.shape[0], p.shape[1]), n_bins)


def member_accuracy(logits, labels) -> float:
    """Mean over members of each member's accuracy."""
    z = _check_logits(logits)
    return _member_accuracy(z, _check_labels(labels, z.shape[1], z.shape[2]))


def disagreement(logits) -> float:
    """Mean over member pairs of the fraction of samples whose argmax differ (0 for M = 1)."""
    return _disagreement(_check_logits(logits))


def fit_temperature(val_logits, val_labels, combine: str = "probs") -> float:
    """One temperature T for all members (logits / T) minimising the ensemble NLL on validation data.

    T is searched in [0.05, 20]: a 49-point grid in log T followed by golden-section refinement
    around the best grid point (tolerance 1e-7 in log T).
    """
    z = _check_logits(val_logits, "val_logits")
    y = _check_labels(val_labels, z.shape[1], z.shape[2], "val_labels")
    return _fit_temperature(z, y, _check_combine(combine))


def ood_scores(logits, combine: str = "probs") -> dict[str, Tensor]:
    """OOD scores (higher = more likely OOD), each [N] float64: msp = -max p̄, entropy = H(p̄),
    mi = H(p̄) - mean_m H(p_m) (0 for M = 1)."""
    return _ood_scores(_check_logits(logits), _check_combine(combine))


def ood_metrics(id_scores: Tensor, ood_scores: Tensor) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR@95%TPR with OOD as the positive class.

    fpr95 is the false-positive rate at the first threshold (scanning from the most OOD-looking
    score down) at which at least 95% of OOD samples are flagged, i.e. ``fpr[argmax(tpr >= 0.95)]``
    over *every* distinct threshold (roc_curve with drop_intermediate=False).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    s_id = _check_scores(id_scores, "id_scores")
    s_ood = _check_scores(ood_scores, "ood_scores")
    y = np.concatenate([np.zeros(len(s_id), dtype=np.int64), np.ones(len(s_ood), dtype=np.int64)])
    s = np.concatenate([s_id, s_ood])
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_in": float(average_precision_score(1 - y, -s)),
        "aupr_out": float(average_precision_score(y, s)),
        "fpr95": float(fpr[int(np.argmax(tpr >= 0.95))]),
    }


def evaluate(
    logits,
    labels,
    *,
    val_logits=None,
    val_labels=None,
    ood: dict[str, Tensor] | None = None,
    combine: str = "probs",
    temperature: float | None = None,
) -> dict:
    """All metrics of one run as a JSON-serialisable dict of python floats.

    Keys: acc, nll, brier, ece, member_acc, disagreement, aurc, acc_at_95, ece_adaptive; with validation
    data (or a given ``temperature``, e.g. one fitted once on the clean validation split and reused on
    shifted data) also nll_ts, ece_ts, temperature; and ``ood`` = {name: {"msp"|"entropy"|"mi": {auroc,
    aupr_in, aupr_out, fpr95}}} (empty dict when no OOD sets are given). ``ood`` values are member logits
    [M, K, C].
    """
    combine = _check_combine(combine)
    z = _check_logits(logits)
    m, n, c = z.shape
    y = _check_labels(labels, n, c)

    vz = vy = None
    if (val_logits is None) != (val_labels is None):
        raise ValueError("val_logits and val_labels must be given together")
    if temperature is not None:
        if val_logits is not None:
            raise ValueError("give val_logits/val_labels or temperature, not both")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating))
                or not math.isfinite(temperature) or temperature <= 0):
            raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    if val_logits is not None:
        vz = _check_logits(val_logits, "val_logits")
        if vz.shape[0] != m or vz.shape[2] != c:
            raise ValueError(
                f"val_logits must be [M={m}, V, C={c}] like the test logits; got shape {_shape(vz)}"
            )
        vy = _check_labels(val_labels, vz.shape[1], c, "val_labels")

    ood_z: dict[str, Tensor] = {}
    if ood is not None:
        if not isinstance(ood, dict):
            raise ValueError(f"ood must be a dict of name -> logits [M, K, C]; got {type(ood).__name__}")
        for name, arr in ood.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"ood set names must be non-empty strings; got {name!r}")
            oz = _check_logits(arr, f"ood[{name!r}]")
            if oz.shape[0] != m or oz.shape[2] != c:
                raise ValueError(
                    f"ood[{name!r}] must be [M={m}, K, C={c}] like the test logits; got shape {_shape(oz)}"
                )
            ood_z[name] = oz

    p_bar = _ensemble_probs(z, combine)
    out: dict[str, Any] = {
        "acc": _accuracy(p_bar, y),
        "nll": _nll(z, y, combine),
        "brier": _brier(p_bar, y),
        "ece": _ece(p_bar, y, 15),
        "member_acc": _member_accuracy(z, y),
        "disagreement": _disagreement(z),
        "aurc": _aurc(p_bar, y),
        "acc_at_95": _acc_at_coverage(p_bar, y, 0.95),
        "ece_adaptive": _ece_adaptive(p_bar, y, 15),
    }
    if vz is not None or temperature is not None:
        t = _fit_temperature(vz, vy, combine) if vz is not None else float(temperature)
        zt = z / t
        out["nll_ts"] = _nll(zt, y, combine)
        out["ece_ts"] = _ece(_ensemble_probs(zt, combine), y, 15)
        out["temperature"] = float(t)

    out["ood"] = {}
    if ood_z:
        id_s = _ood_scores(z, combine)
        for name, oz in ood_z.items():
            o_s = _ood_scores(oz, combine)
            out["ood"][name] = {k: ood_metrics(id_s[k], o_s[k]) for k in OOD_SCORES}
    return out


def logits_from_probs(probs: Tensor) -> Tensor:
    """log(clamp(p, tiny)) as float64, so that saved probabilities can be scored like logits
    (softmax of the result gives back p, renormalised)."""
    p = _float_tensor(probs, "probs")
    if p.dim() not in (2, 3) or p.numel() == 0:
        raise ValueError(f"probs must be [M, N, C] (or [N, C]); got shape {_shape(p)}")
    if p.shape[-1] < 2:
        raise ValueError(f"probs must have C >= 2 classes; got shape {_shape(p)}")
    if not bool(torch.isfinite(p).all()):
        raise ValueError("probs contains NaN or infinite values")
    if bool((p < 0).any()):
        raise ValueError("probs contains negative values (were logits saved as probs?)")
    if bool((p > 1).any()):
        raise ValueError("probs contains values above 1 (were logits saved as probs?)")
    sums = p.double().sum(dim=-1)
    tol = 1e-2 if p.dtype in (torch.float16, torch.bfloat16) else 1e-3   # a float16 file rounds each entry
    worst = float((sums - 1).abs().max())
    if worst > tol:
        raise ValueError(f"probs rows must sum to 1 (within {tol:g}); one sums to {float(sums.flatten()[(sums - 1).abs().argmax()]):.6g}")
    return torch.log(p.clamp_min(torch.finfo(_DTYPE).tiny))


def score_npz(path) -> dict:
    """Score a saved run: ``evaluate`` on the arrays of an .npz file (see module docs / spec).

    Arrays: ``logits`` [M,N,C] or ``probs`` [M,N,C]; ``labels`` [N]; optional ``val_logits`` /
    ``val_probs`` [M,V,C] with ``val_labels`` [V]; optional ``combine`` (0-d string); any number of
    ``ood_<name>`` [M,K,C] (logits, or probabilities when the file stores ``probs``); any number of
    distribution-shift cells ``shift_<corruption>_<severity>`` [M,K,C] (logits or probabilities likewise;
    severity a positive integer, the corruption name may contain underscores) with their labels in
    ``shift_labels_<corruption>_<severity>`` [K] or, for cells that share them, one ``shift_labels`` [K].
    With shift cells the result gets a ``shift`` entry (see ``score_shift_arrays``; nll_ts / ece_ts use
    the temperature fitted on the validation arrays); without them the result is unchanged.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ValueError(f"{p}: no such file")
    if not os.path.isfile(p):
        raise ValueError(f"{p}: not a file")
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{p}: not an .npz archive")
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise ValueError(_one_line(f"{p}: cannot read .npz ({type(exc).__name__}: {exc})")) from None

    def get_float(key: str) -> np.ndarray:
        a = arrays[key]
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{p}: array '{key}' must be numeric; got dtype {a.dtype}")
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"{p}: array '{key}' contains NaN or inf")
        return a

    def as_logits(key: str, from_probs: bool) -> Tensor:
        a = get_float(key)
        if a.ndim not in (2, 3):
            raise ValueError(f"{p}: array '{key}' must be [M, N, C]; got shape {a.shape}")
        if from_probs:
            try:
                return logits_from_probs(a)
            except ValueError as exc:
                raise ValueError(f"{p}: array '{key}': {exc}") from None
        return torch.from_numpy(a)

    has_logits, has_probs = "logits" in arrays, "probs" in arrays
    if has_logits and has_probs:
        raise ValueError(f"{p}: holds both 'logits' and 'probs'; keep one")
    if not (has_logits or has_probs):
        raise ValueError(f"{p}: missing array 'logits' (or 'probs'); found {sorted(arrays)}")
    if "labels" not in arrays:
        raise ValueError(f"{p}: missing array 'labels'; found {sorted(arrays)}")
    from_probs = has_probs

    combine = "probs"
    if "combine" in arrays:
        c = arrays["combine"]
        if c.ndim != 0 or c.dtype.kind not in "US":
            raise ValueError(f"{p}: 'combine' must be a 0-d string array ('probs' or 'logits')")
        combine = str(c.item().decode() if isinstance(c.item(), bytes) else c.item())
        if combine not in COMBINE_RULES:
            raise ValueError(f"{p}: combine must be one of {COMBINE_RULES}; got {combine!r}")

    logits = as_logits("probs" if from_probs else "logits", from_probs)
    labels = arrays["labels"]

    val_logits = val_labels = None
    has_vl, has_vp = "val_logits" in arrays, "val_probs" in arrays
    if has_vl and has_vp:
        raise ValueError(f"{p}: holds both 'val_logits' and 'val_probs'; keep one")
    if has_vl or has_vp:
        if "val_labels" not in arrays:
            raise ValueError(f"{p}: has {'val_probs' if has_vp else 'val_logits'} but no 'val_labels'")
        val_logits = as_logits("val_probs" if has_vp else "val_logits", has_vp)
        val_labels = arrays["val_labels"]
    elif "val_labels" in arrays:
        raise ValueError(f"{p}: has 'val_labels' but no 'val_logits' (or 'val_probs')")

    ood = {}
    for key in sorted(arrays):
        if key.startswith("ood_"):
            name = key[len("ood_"):]
            if not name:
                raise ValueError(f"{p}: OOD array name 'ood_' has an empty set name")
            ood[name] = as_logits(key, from_probs)

    try:
        out = evaluate(logits, labels, val_logits=val_logits, val_labels=val_labels, ood=ood, combine=combine)
        shift = score_shift_arrays(arrays, temperature=out.get("temperature"), combine=combine,
                                   from_probs=from_probs, num_members=int(logits.shape[0]) if logits.dim() == 3 else 1,
                                   num_classes=int(logits.shape[-1]))
    except ValueError as exc:
        raise ValueError(_one_line(f"{p}: {exc}")) from None
    if shift is not None:
        out["shift"] = shift
    return out


# --------------------------------------------------------------------------------------------
# distribution shift (corrupted test sets; the images themselves are in benchmark/shift.py)
# --------------------------------------------------------------------------------------------
SHIFT_KEYS = ("acc", "nll", "brier", "ece", "aurc", "acc_at_95", "ece_adaptive", "member_acc", "disagreement",
              "nll_ts", "ece_ts")


def shift_cell_metrics(logits, labels, *, temperature: float | None = None, combine: str = "probs") -> dict:
    """Metrics of one (corruption, severity) cell: ``evaluate``'s in-distribution keys (SHIFT_KEYS) with
    nll_ts / ece_ts at the given temperature (fitted elsewhere, on clean validation data), no OOD."""
    res = evaluate(logits, labels, combine=combine, temperature=temperature)
    return {k: res[k] for k in SHIFT_KEYS if k in res}


def _mean_dicts(dicts: list[dict]) -> dict:
    keys = [k for k in dicts[0] if all(k in d for d in dicts)]
    # fsum: exactly rounded, so a mean does not depend on the order of the cells
    return {k: math.fsum(d[k] for d in dicts) / len(dicts) for k in keys}


def shift_summary(cells: dict) -> dict:
    """Summaries of cell metrics {(corruption, severity): metrics}: per_corruption {corruption: {"<severity>":
    metrics}}, by_corruption (mean over its severities), by_severity {"<severity>": mean over corruptions}
    and mean (over all cells). Severities are JSON string keys in increasing order."""
    if not cells:
        raise ValueError("no shift cells to summarise")
    corruptions = list(dict.fromkeys(c for c, _ in cells))
    severities = sorted({int(s) for _, s in cells})
    per = {c: {str(s): cells[(c, s)] for s in severities if (c, s) in cells} for c in corruptions}
    return {
        "per_corruption": per,
        "by_corruption": {c: _mean_dicts(list(per[c].values())) for c in corruptions},
        "by_severity": {str(s): _mean_dicts([cells[(c, x)] for c, x in cells if x == s]) for s in severities},
        "mean": _mean_dicts(list(cells.values())),
    }


def score_shift_arrays(arrays: dict, *, temperature: float | None = None, combine: str = "probs",
                       from_probs: bool = False, num_members: int | None = None,
                       num_classes: int | None = None) -> dict | None:
    """The ``shift`` entry of a score file from its arrays (None when it has no ``shift_*`` arrays).

    ``shift_<corruption>_<severity>`` [M, K, C] member logits (probabilities with ``from_probs``) with
    labels ``shift_labels_<corruption>_<severity>`` [K] or the shared ``shift_labels`` [K]. M and C must
    match ``num_members`` / ``num_classes`` when given. Returns {severities, corruptions, combine,
    temperature} and shift_summary's per_corruption, by_corruption, by_severity, mean.
    """
    combine = _check_combine(combine)
    cells_in: dict[tuple[str, int], str] = {}
    label_keys: dict[tuple[str, int], str] = {}
    for key in sorted(arrays):
        if not key.startswith("shift_") or key == "shift_labels":
            continue
        is_label = key.startswith("shift_labels_")
        rest = key[len("shift_labels_"):] if is_label else key[len("shift_"):]
        name, _, sev = rest.rpartition("_")
        if not name or not sev.isdigit() or int(sev) < 1:
            raise ValueError(f"array '{key}': shift arrays must be named shift_<corruption>_<severity> "
                             "(or shift_labels_<corruption>_<severity>) with severity an integer >= 1")
        (label_keys if is_label else cells_in)[(name, int(sev))] = key
    if not cells_in:
        if label_keys or "shift_labels" in arrays:
            raise ValueError("has shift labels but no shift_<corruption>_<severity> arrays")
        return None
    orphans = sorted(set(label_keys) - set(cells_in))
    if orphans:
        raise ValueError(f"has '{label_keys[orphans[0]]}' but no 'shift_{orphans[0][0]}_{orphans[0][1]}'")
    shared = arrays.get("shift_labels")
    if shared is not None and all(cell in label_keys for cell in cells_in):
        raise ValueError("'shift_labels' is not used: every shift cell has its own "
                         "shift_labels_<corruption>_<severity>")
    cells = {}
    for cell, key in sorted(cells_in.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        a = np.asarray(arrays[key])
        if a.dtype.kind not in "biuf":
            raise ValueError(f"array '{key}' must be numeric; got dtype {a.dtype}")
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"array '{key}' contains NaN or inf")
        if a.ndim not in (2, 3):
            raise ValueError(f"array '{key}' must be [M, N, C]; got shape {a.shape}")
        z = logits_from_probs(a) if from_probs else torch.from_numpy(a)
        z = _check_logits(z, key)
        if ((num_members is not None and z.shape[0] != num_members)
                or (num_classes is not None and z.shape[2] != num_classes)):
            raise ValueError(f"array '{key}' must be [M={num_members}, K, C={num_classes}] like the test logits; "
                             f"got shape {_shape(z)}")
        lkey = label_keys.get(cell)
        if lkey is None:
            if shared is None:
                raise ValueError(f"array '{key}' has no labels: add 'shift_labels_{cell[0]}_{cell[1]}' or 'shift_labels'")
            lkey = "shift_labels"
        y = _check_labels(np.asarray(arrays[lkey]), z.shape[1], z.shape[2], lkey)
        cells[cell] = shift_cell_metrics(z, y, temperature=temperature, combine=combine)
    summary = shift_summary(cells)
    return {"severities": sorted({s for _, s in cells}), "corruptions": list(dict.fromkeys(c for c, _ in cells)),
            "combine": combine, "temperature": None if temperature is None else float(temperature), **summary}
