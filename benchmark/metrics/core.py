"""The public metric functions (``evaluate`` and the single metrics) on member logits [M, N, C];
conventions in the ``ensemble_bench.metrics`` docstring."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ensemble_bench.metrics._base import (OOD_SCORES, _DTYPE, _acc_at_coverage, _accuracy, _aurc, _brier,
                                          _check_combine, _check_labels, _check_logits, _check_probs_bar,
                                          _check_scores, _disagreement, _ece, _ece_adaptive, _ensemble_log_probs,
                                          _ensemble_probs, _fit_temperature, _float_tensor, _member_accuracy, _nll,
                                          _ood_scores, _risk_coverage, _shape)

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


