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
the loop over them are in ensemble_bench.shift): every (corruption, severity) cell gets acc, nll, brier, ece,
aurc, acc_at_95, ece_adaptive, member_acc, disagreement and, with a temperature fitted on the clean
validation split, nll_ts and ece_ts; ``mean`` is the unweighted mean over all cells, ``by_severity`` the
mean over corruptions per severity, ``by_corruption`` the mean over severities per corruption. A score
file stores the cells as ``shift_<corruption>_<severity>`` [M, N, C] with labels ``shift_labels_<corruption>_
<severity>`` [N] or one ``shift_labels`` [N] shared by all cells (see ``score_npz``).

Layout: ``_base`` (input checks, float64 kernels), ``core`` (the public metric functions and ``evaluate``),
``scoring`` (score files and the distribution-shift metrics); every public name is importable from here.
"""
from __future__ import annotations

from ensemble_bench.metrics._base import OOD_SCORES
from ensemble_bench.metrics.core import (acc_at_coverage, accuracy, aurc, brier, disagreement, ece, ece_adaptive,
                                         ensemble_log_probs, ensemble_probs, evaluate, fit_temperature,
                                         logits_from_probs, member_accuracy, member_probs, nll, ood_metrics, ood_scores,
                                         risk_coverage)
from ensemble_bench.metrics.scoring import SHIFT_KEYS, score_npz, score_shift_arrays, shift_cell_metrics, shift_summary  # noqa: F401

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
