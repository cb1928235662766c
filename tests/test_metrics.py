"""Tests of ensemble_bench.metrics against hand-computed cases and independent references
(torchmetrics for ECE, scikit-learn / brute force for the OOD metrics and the temperature)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ensemble_bench import metrics as mt


def _log(p):
    return np.log(np.asarray(p, dtype=np.float64))


def _rand_logits(seed, m, n, c, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, c, generator=g, dtype=torch.float64) * scale


def _rand_labels(seed, n, c):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, c, (n,), generator=g)


# ------------------------------------------------------------------------------------------
# ensemble distribution
# ------------------------------------------------------------------------------------------
def test_ensemble_probs_averages_probabilities():
    z = np.array([[[4.0, 0.0]], [[0.0, 0.0]]])  # M=2, N=1, C=2
    p1 = math.exp(4) / (math.exp(4) + 1)
    expected = [(p1 + 0.5) / 2, ((1 - p1) + 0.5) / 2]
    np.testing.assert_allclose(mt.ensemble_probs(z).numpy()[0], expected, rtol=1e-12)
    np.testing.assert_allclose(mt.ensemble_log_probs(z).exp().numpy()[0], expected, rtol=1e-12)
    np.testing.assert_allclose(mt.member_probs(z).numpy()[:, 0, 0], [p1, 0.5], rtol=1e-12)


def test_combine_logits_is_softmax_of_mean_logits():
    z = np.array([[[4.0, 0.0]], [[0.0, 0.0]]])
    q = math.exp(2) / (math.exp(2) + 1)  # softmax([2, 0])
    np.testing.assert_allclose(mt.ensemble_probs(z, combine="logits").numpy()[0], [q, 1 - q], rtol=1e-12)
    np.testing.assert_allclose(mt.ensemble_log_probs(z, "logits").numpy()[0], np.log([q, 1 - q]), rtol=1e-12)
    # differs from the probability average
    assert abs(mt.ensemble_probs(z)[0, 0].item() - q) > 0.01
    assert mt.nll(z, [0], combine="logits") == pytest.approx(-math.log(q), rel=1e-12)
    # member-based quantities keep each member's own softmax under combine="logits"
    s = mt.ood_scores(z, combine="logits")
    h_members = (-(q1 := math.exp(4) / (math.exp(4) + 1)) * math.log(q1) - (1 - q1) * math.log(1 - q1) + math.log(2)) / 2
    h_bar = -q * math.log(q) - (1 - q) * math.log(1 - q)
    assert s["mi"].item() == pytest.approx(h_bar - h_members, rel=1e-10)
    with pytest.raises(ValueError, match="combine"):
        mt.ensemble_probs(z, combine="mean")


def test_two_dim_logits_are_one_model():
    z = _rand_logits(0, 1, 20, 4)
    y = _rand_labels(0, 20, 4)
    assert mt.nll(z[0], y) == pytest.approx(mt.nll(z, y), rel=1e-14)
    assert mt.ensemble_probs(z[0].numpy()).shape == (20, 4)


# ------------------------------------------------------------------------------------------
# in-distribution metrics
# ------------------------------------------------------------------------------------------
def test_nll_hand_case_is_mixture_not_mean_of_member_nlls():
    z = _log([[[0.9, 0.1]], [[0.1, 0.9]]])  # two members, one sample, label 0
    assert mt.nll(z, [0]) == pytest.approx(math.log(2), rel=1e-12)  # -log((0.9+0.1)/2)
    mean_member_nll = (-math.log(0.9) - math.log(0.1)) / 2
    assert abs(mt.nll(z, [0]) - mean_member_nll) > 0.5
    # two samples, one model
    z1 = _log([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    assert mt.nll(z1, [0, 2]) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2, rel=1e-12)


def test_nll_finite_when_probabilities_underflow():
    # true-class probability underflows to 0 in one member, the mixture is about 1/2
    z = np.array([[[1e4, -1e4]], [[-1e4, 1e4]]])
    assert mt.nll(z, [0]) == pytest.approx(math.log(2), rel=1e-12)
    # ... and in every member: log p̄(0) = logsumexp(-2e4, -4e4) - log 2
    z = np.array([[[-1e4, 1e4]], [[-2e4, 2e4]]])
    v = mt.nll(z, [0])
    assert math.isfinite(v)
    assert v == pytest.approx(2e4 + math.log(2), rel=1e-12)
    assert math.isfinite(mt.nll(z, [0], combine="logits"))
    assert mt.nll(z, [0], combine="logits") == pytest.approx(3e4, rel=1e-12)


def test_brier_and_accuracy_hand_case():
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    # sample 0, y=0: 0.3^2 + 0.2^2 + 0.1^2 = 0.14 ; sample 1, y=2: 0.2^2 + 0.5^2 + 0.7^2 = 0.78
    assert mt.brier(p, [0, 2]) == pytest.approx(0.46, abs=1e-12)
    assert mt.brier(torch.tensor(p), torch.tensor([0, 2])) == pytest.approx(0.46, abs=1e-12)
    assert mt.accuracy(p, [0, 2]) == pytest.approx(0.5)
    assert mt.accuracy(p, [0, 1]) == pytest.approx(1.0)
    # extreme values: a confident wrong prediction scores 2
    assert mt.brier([[1.0, 0.0]], [1]) == pytest.approx(2.0)
    res = mt.evaluate(_log([p]), [0, 2])
    assert res["brier"] == pytest.approx(0.46, abs=1e-12)
    assert res["acc"] == pytest.approx(0.5)


def _onehot_logits(preds, c):
    preds = np.asarray(preds)
    return np.eye(c)[preds] * 5.0  # [M, N, C]


def test_member_accuracy_and_disagreement_three_members():
    preds = [[0, 1, 2, 0], [0, 1, 1, 1], [0, 2, 2, 0]]
    z = _onehot_logits(preds, 3)
    y = [0, 1, 2, 0]
    # pairs: (1,2) differ on 2 of 4, (1,3) on 1 of 4, (2,3) on 3 of 4 -> mean 0.5
    assert mt.disagreement(z) == pytest.approx(0.5, abs=1e-12)
    # member accuracies 4/4, 2/4, 3/4 -> 0.75
    assert mt.member_accuracy(z, y) == pytest.approx(0.75, abs=1e-12)
    res = mt.evaluate(z, y)
    assert res["acc"] == pytest.approx(1.0)  # the majority vote is right everywhere
    assert res["member_acc"] == pytest.approx(0.75)
    assert res["disagreement"] == pytest.approx(0.5)


def test_disagreement_matches_pairwise_loop_random():
    z = _rand_logits(3, 5, 200, 4)
    preds = z.argmax(-1).numpy()
    vals = [np.mean(preds[i] != preds[j]) for i in range(5) for j in range(i + 1, 5)]
    assert mt.disagreement(z) == pytest.approx(float(np.mean(vals)), abs=1e-12)


def test_single_model_disagreement_and_mi_are_zero():
    z = _rand_logits(1, 1, 50, 5)
    assert mt.disagreement(z) == 0.0
    assert torch.all(mt.ood_scores(z)["mi"] == 0)
    assert torch.all(mt.ood_scores(z, "logits")["mi"] == 0)
    # identical members also have no disagreement and (numerically) no MI
    z3 = z.repeat(3, 1, 1)
    assert mt.disagreement(z3) == 0.0
    assert float(mt.ood_scores(z3)["mi"].abs().max()) < 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("m", [1, 4])
def test_ece_matches_torchmetrics(seed, m):
    from torchmetrics.classification import MulticlassCalibrationError

    c, n = 10, 2000
    z = _rand_logits(seed, m, n, c, scale=1.0 + seed)
    y = _rand_labels(seed, n, c)
    p_bar = mt.ensemble_probs(z)
    ref = MulticlassCalibrationError(num_classes=c, n_bins=15, norm="l1")(p_bar.float(), y).item()
    assert mt.ece(p_bar, y) == pytest.approx(ref, abs=1e-5)
    assert mt.evaluate(z, y)["ece"] == pytest.approx(ref, abs=1e-5)


def test_ece_matches_torchmetrics_saturated_confidences():
    # Overconfident model: float64 confidences just below 1 round to 1.0 in float32, where
    # torchmetrics puts them in a bin of their own, apart from the [0.933, 1) bin.
    from torchmetrics.classification import MulticlassCalibrationError

    n, c = 400, 3
    z = torch.zeros(n, c, dtype=torch.float64)
    even = torch.arange(n) % 2 == 0
    z[:, 0] = torch.where(even, 25.0, math.log(38.0))  # confidence 1 - 3e-11 / 0.95
    # the confidence-0.95 half is always right, the saturated half is right one time in two
    y = torch.where(~even | (torch.arange(n) % 4 == 0), 0, 1)
    p = torch.softmax(z, -1)
    ref = MulticlassCalibrationError(num_classes=c, n_bins=15, norm="l1")(p.float(), y).item()
    assert ref == pytest.approx(0.5 * 0.05 + 0.5 * 0.5, abs=1e-6)
    assert mt.ece(p, y) == pytest.approx(ref, abs=1e-6)


def test_ece_hand_case():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct); bins [0.8667,0.9333) and [0.6,0.6667)
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    y = [0, 1, 1]
    expected = (2 / 3) * abs(0.5 - 0.9) + (1 / 3) * abs(1.0 - 0.6)
    assert mt.ece(p, y) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------------------
# temperature scaling
# ------------------------------------------------------------------------------------------
def _sample_from_model(seed, n, c, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    return z, y


def test_temperature_recovers_overconfidence_factor():
    z, y = _sample_from_model(0, 20000, 10)
    t = mt.fit_temperature(5.0 * z.unsqueeze(0), y)
    assert t == pytest.approx(5.0, rel=0.05)
    # the same with three identical members (the mixture equals each member)
    t3 = mt.fit_temperature((5.0 * z).unsqueeze(0).repeat(3, 1, 1), y)
    assert t3 == pytest.approx(t, rel=1e-5)
    # calibrated logits -> T close to 1; underconfident -> T < 1
    assert mt.fit_temperature(z.unsqueeze(0), y) == pytest.approx(1.0, rel=0.05)
    assert mt.fit_temperature(0.5 * z.unsqueeze(0), y) == pytest.approx(0.5, rel=0.05)


@pytest.mark.parametrize("combine", ["probs", "logits"])
def test_temperature_is_the_nll_minimiser(combine):
    # four noisy, overconfident members of a known model: the optimum is inside (0.05, 20)
    z0, y = _sample_from_model(5, 500, 6)
    z = 3.0 * z0 + _rand_logits(6, 4, 500, 6, scale=1.5)
    t = mt.fit_temperature(z, y, combine=combine)
    assert 0.3 < t < 19
    f = lambda temp: mt.nll(z / temp, y, combine=combine)  # noqa: E731
    assert f(t) <= f(0.9 * t) and f(t) <= f(1.1 * t)
    assert f(t) <= f(0.999 * t) + 1e-12 and f(t) <= f(1.001 * t) + 1e-12
    # independent brute force over a dense grid
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 2001))
    best = min(f(float(g)) for g in grid)
    assert f(t) <= best + 1e-9


def test_temperature_scaling_on_validation_itself_never_hurts():
    z = _rand_logits(11, 3, 800, 10, scale=3.0)
    y = _rand_labels(11, 800, 10)
    res = mt.evaluate(z, y, val_logits=z, val_labels=y)
    assert res["nll_ts"] <= res["nll"] + 1e-12
    assert res["temperature"] == pytest.approx(mt.fit_temperature(z, y), rel=1e-12)
    t = res["temperature"]
    assert res["nll_ts"] == pytest.approx(mt.nll(z / t, y), rel=1e-12)
    assert res["ece_ts"] == pytest.approx(mt.ece(mt.ensemble_probs(z / t), y), rel=1e-12)


def test_temperature_is_fitted_on_validation_not_test():
    zv, yv = _sample_from_model(1, 5000, 10)
    zt, yt = _sample_from_model(2, 2000, 10)
    res = mt.evaluate(3.0 * zt.unsqueeze(0), yt, val_logits=0.5 * zv.unsqueeze(0), val_labels=yv)
    assert res["temperature"] == pytest.approx(0.5, rel=0.1)  # from the validation split only


# ------------------------------------------------------------------------------------------
# OOD scores and metrics
# ------------------------------------------------------------------------------------------
def test_entropy_and_mi_hand_case():
    p1, p2 = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    z = _log([[p1], [p2]])
    pbar = (p1 + p2) / 2  # [0.7, 0.3]
    h = lambda p: -sum(x * math.log(x) for x in p)  # noqa: E731
    s = mt.ood_scores(z)
    assert s["msp"].item() == pytest.approx(-0.7, abs=1e-12)
    assert s["entropy"].item() == pytest.approx(h(pbar), abs=1e-12)
    assert s["mi"].item() == pytest.approx(h(pbar) - (h(p1) + h(p2)) / 2, abs=1e-12)
    # zero probabilities contribute 0 to the entropy (no NaN)
    s0 = mt.ood_scores(np.array([[[1e4, -1e4, 0.0]]]))
    assert s0["entropy"].item() == pytest.approx(0.0, abs=1e-12)
    assert all(torch.isfinite(v).all() for v in s0.values())


def test_ood_metrics_hand_case_with_ties():
    id_s = [1.0, 2.0, 3.0, 5.0]
    ood_s = [3.0, 6.0, 7.0, 8.0]
    r = mt.ood_metrics(torch.tensor(id_s), np.array(ood_s))
    # AUROC: pairs (ood > id) = 2 + 0.5 (tie at 3) + 4 + 4 + 4 = 14.5 of 16
    assert r["auroc"] == pytest.approx(14.5 / 16)
    # AUPR-Out: thresholds 8,7,6 -> precision 1 at recall .25,.5,.75; 5 -> FP; 3 -> P 4/6 at R 1
    assert r["aupr_out"] == pytest.approx(0.75 + 0.25 * 4 / 6)
    # AUPR-In (ID positive, ranking -score): 1,2 -> P 1 at R .25,.5; 3 -> P 3/4 at R .75;
    # 5 -> P 4/5 at R 1
    assert r["aupr_in"] == pytest.approx(0.5 + 0.25 * 0.75 + 0.25 * 0.8)
    # FPR95: all OOD flagged first at threshold 3, where 2 of 4 ID (3 and 5) are flagged
    assert r["fpr95"] == pytest.approx(0.5)


def test_ood_metrics_perfect_and_reversed():
    r = mt.ood_metrics([0.0, 1.0, 2.0], [3.0, 4.0])
    assert r == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    r = mt.ood_metrics([3.0, 4.0], [0.0, 1.0, 2.0])
    assert r["auroc"] == 0.0 and r["fpr95"] == 1.0


def test_fpr95_uses_first_threshold_reaching_95_percent():
    # thresholds 10 (tpr .90, fpr 0), 5 (tpr .95, fpr .05), 4 (tpr 1, fpr .1): the three ROC
    # points are collinear, and the definition takes the one at threshold 5.
    ood_s = [10.0] * 18 + [5.0, 4.0]
    id_s = [5.0, 4.0] + [0.0] * 18
    assert mt.ood_metrics(id_s, ood_s)["fpr95"] == pytest.approx(0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ood_metrics_match_sklearn_and_bruteforce_random(seed):
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    rng = np.random.default_rng(seed)
    id_s = rng.normal(0, 1, 300)
    ood_s = rng.normal(1, 1, 200)
    if seed == 2:  # heavy ties
        id_s, ood_s = np.round(id_s, 1), np.round(ood_s, 1)
    r = mt.ood_metrics(id_s, ood_s)
    y = np.r_[np.zeros(300), np.ones(200)]
    s = np.r_[id_s, ood_s]
    assert r["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert r["aupr_out"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert r["aupr_in"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    # brute-force AUROC with ties counted half
    diff = ood_s[:, None] - id_s[None, :]
    assert r["auroc"] == pytest.approx(((diff > 0) + 0.5 * (diff == 0)).mean(), abs=1e-12)
    # brute-force FPR95: the largest threshold flagging >= 95% of OOD
    thr = max(t for t in np.unique(s) if np.mean(ood_s >= t) >= 0.95)
    assert r["fpr95"] == pytest.approx(np.mean(id_s >= thr), abs=1e-12)
    if seed != 2:  # without ties this is also sklearn's default roc_curve
        fpr, tpr, _ = roc_curve(y, s)
        assert r["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)


def test_evaluate_structure_and_json():
    m, c = 3, 5
    z = _rand_logits(0, m, 100, c)
    y = _rand_labels(0, 100, c)
    ood = {"svhn": _rand_logits(1, m, 60, c, scale=1.0), "c100": _rand_logits(2, m, 40, c).numpy()}
    res = mt.evaluate(z, y, val_logits=_rand_logits(3, m, 50, c), val_labels=_rand_labels(3, 50, c), ood=ood)
    assert list(res) == ["acc", "nll", "brier", "ece", "member_acc", "disagreement", "aurc", "acc_at_95",
                         "ece_adaptive", "nll_ts", "ece_ts", "temperature", "ood"]
    assert set(res["ood"]) == {"svhn", "c100"}
    for name in res["ood"]:
        assert set(res["ood"][name]) == {"msp", "entropy", "mi"}
        for d in res["ood"][name].values():
            assert set(d) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
            assert all(type(v) is float for v in d.values())
    assert all(type(res[k]) is float for k in res if k != "ood")
    json.dumps(res)
    # OOD entries agree with the building blocks
    ids, oods = mt.ood_scores(z), mt.ood_scores(ood["svhn"])
    assert res["ood"]["svhn"]["mi"] == mt.ood_metrics(ids["mi"], oods["mi"])
    # no validation / OOD data: only the base keys, and an empty ood dict
    res0 = mt.evaluate(z.numpy(), y.numpy())
    assert list(res0) == ["acc", "nll", "brier", "ece", "member_acc", "disagreement", "aurc", "acc_at_95",
                          "ece_adaptive", "ood"]
    assert res0["ood"] == {}
    assert res0["nll"] == pytest.approx(mt.nll(z, y), rel=1e-14)


def test_float32_and_float16_inputs_accepted():
    z = _rand_logits(4, 2, 64, 3)
    y = _rand_labels(4, 64, 3)
    r64 = mt.evaluate(z, y)
    r32 = mt.evaluate(z.float(), y)
    r16 = mt.evaluate(z.numpy().astype(np.float16), y.numpy().astype(np.int32))
    assert r32["nll"] == pytest.approx(r64["nll"], rel=1e-5)
    assert r16["nll"] == pytest.approx(r64["nll"], rel=1e-2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: mt.evaluate(np.zeros(5), [0]), r"logits must be \[M, N, C\].*got shape \(5,\)"),
        (lambda: mt.evaluate(np.zeros((1, 2, 3, 4)), [0]), r"got shape \(1, 2, 3, 4\)"),
        (lambda: mt.evaluate(np.zeros((2, 4, 3)), [0, 1, 2]), r"labels has length 3 .* N = 4"),
        (lambda: mt.evaluate(np.zeros((2, 4, 3)), [0, 1, 2, 3]), r"labels must lie in \[0, 3\)"),
        (lambda: mt.evaluate(np.zeros((2, 4, 3)), [[0, 1, 2, 0]]), r"labels must be 1-D"),
        (lambda: mt.evaluate(np.zeros((2, 4, 3)), [0.5, 1, 2, 0]), r"integer"),
        (lambda: mt.evaluate(np.full((2, 4, 3), np.nan), [0, 1, 2, 0]), r"logits contains NaN or inf"),
        (lambda: mt.evaluate(np.zeros((2, 4, 3)), [0, 1, 2, 0], ood={"x": np.zeros((3, 4, 3))}),
         r"ood\['x'\] must be \[M=2, K, C=3\]"),
        (lambda: mt.evaluate(np.zeros((2, 4, 3)), [0, 1, 2, 0], ood={"x": np.zeros((2, 4, 5))}),
         r"ood\['x'\]"),
        (lambda: mt.evaluate(np.zeros((2, 4, 3)), [0, 1, 2, 0], val_logits=np.zeros((2, 4, 3))),
         r"val_logits and val_labels"),
        (lambda: mt.evaluate(np.zeros((2, 4, 3)), [0, 1, 2, 0], val_logits=np.zeros((1, 4, 3)),
                             val_labels=[0, 0, 0, 0]), r"val_logits must be \[M=2"),
        (lambda: mt.evaluate(np.zeros((2, 4, 3)), [0, 1, 2, 0], combine="avg"), r"combine"),
        (lambda: mt.ood_metrics([], [1.0]), r"id_scores is empty"),
        (lambda: mt.logits_from_probs(np.array([[0.5, -0.5]])), r"negative"),
        (lambda: mt.ece(np.ones((2, 2)) / 2, [0, 1], n_bins=0), r"n_bins"),
    ],
)
def test_bad_input_raises_one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as ei:
        call()
    assert "\n" not in str(ei.value)


# ------------------------------------------------------------------------------------------
# scoring saved runs
# ------------------------------------------------------------------------------------------
def _run_arrays(m=3, c=6):
    z = _rand_logits(20, m, 120, c).numpy()
    y = _rand_labels(20, 120, c).numpy()
    vz = _rand_logits(21, m, 80, c).numpy()
    vy = _rand_labels(21, 80, c).numpy()
    oz = _rand_logits(22, m, 70, c, scale=1.0).numpy()
    return z, y, vz, vy, oz


def _softmax(z):
    return torch.softmax(torch.from_numpy(z), -1).numpy()


def test_logits_from_probs_roundtrip():
    z = _rand_logits(30, 2, 10, 4)
    p = torch.softmax(z, -1)
    np.testing.assert_allclose(torch.softmax(mt.logits_from_probs(p), -1).numpy(), p.numpy(), rtol=1e-12)
    lz = mt.logits_from_probs(np.array([[1.0, 0.0]]))
    assert torch.isfinite(lz).all()


def test_score_npz_roundtrip_logits_and_probs(tmp_path):
    z, y, vz, vy, oz = _run_arrays()
    ref = mt.evaluate(z, y, val_logits=vz, val_labels=vy, ood={"svhn": oz})

    f1 = tmp_path / "run_logits.npz"
    np.savez(f1, logits=z, labels=y, val_logits=vz, val_labels=vy, ood_svhn=oz)
    assert mt.score_npz(f1) == ref
    assert mt.score_npz(str(f1)) == ref

    f2 = tmp_path / "run_probs.npz"
    np.savez(f2, probs=_softmax(z), labels=y, val_probs=_softmax(vz), val_labels=vy, ood_svhn=_softmax(oz))
    r2 = mt.score_npz(f2)
    assert set(r2) == set(ref)
    for k in ref:
        if k == "ood":
            for s in ("msp", "entropy", "mi"):
                for met, v in ref["ood"]["svhn"][s].items():
                    assert r2["ood"]["svhn"][s][met] == pytest.approx(v, abs=1e-9)
        else:
            assert r2[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-9)


def test_score_npz_options(tmp_path):
    z, y, vz, vy, oz = _run_arrays()
    # combine stored as 0-d string, several OOD sets, no validation data
    f = tmp_path / "run.npz"
    np.savez(f, logits=z, labels=y, combine=np.array("logits"), ood_a=oz, ood_b=oz[:, :30])
    r = mt.score_npz(f)
    assert r == mt.evaluate(z, y, ood={"a": oz, "b": oz[:, :30]}, combine="logits")
    assert "temperature" not in r
    # float16 arrays are accepted (cast to float64)
    f16 = tmp_path / "run16.npz"
    np.savez(f16, logits=z.astype(np.float16), labels=y)
    r16 = mt.score_npz(f16)
    assert r16 == mt.evaluate(z.astype(np.float16).astype(np.float64), y)
    # a single model saved as [N, C]
    f1 = tmp_path / "single.npz"
    np.savez(f1, logits=z[0], labels=y)
    assert mt.score_npz(f1)["disagreement"] == 0.0


def _bad_files(tmp_path):
    z, y, vz, vy, oz = _run_arrays()
    cases = {
        "no_labels": (dict(logits=z), r"missing array 'labels'"),
        "no_logits": (dict(labels=y), r"missing array 'logits'"),
        "both": (dict(logits=z, probs=_softmax(z), labels=y), r"both 'logits' and 'probs'"),
        "bad_shape": (dict(logits=z[0, 0], labels=y), r"'logits' must be \[M, N, C\]"),
        "label_len": (dict(logits=z, labels=y[:-1]), r"labels has length 119"),
        "nan": (dict(logits=np.where(z > 2, np.nan, z), labels=y), r"'logits' contains NaN or inf"),
        "inf_ood": (dict(logits=z, labels=y, ood_x=np.full_like(oz, np.inf)), r"'ood_x' contains NaN or inf"),
        "ood_c": (dict(logits=z, labels=y, ood_x=oz[:, :, :4]), r"ood\['x'\] must be"),
        "val_no_labels": (dict(logits=z, labels=y, val_logits=vz), r"no 'val_labels'"),
        "combine": (dict(logits=z, labels=y, combine=np.array("mean")), r"combine must be one of"),
        "neg_probs": (dict(probs=z, labels=y), r"negative"),
    }
    out = []
    for name, (arrays, match) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        out.append((path, match))
    text = tmp_path / "notes.txt"
    text.write_text("not an npz\n")
    out.append((text, r"not an \.npz"))
    npy = tmp_path / "arr.npy"
    np.save(npy, z)
    out.append((npy, r"not an \.npz"))
    out.append((tmp_path / "missing.npz", r"no such file"))
    out.append((tmp_path, r"not a file"))
    return out


def test_score_npz_bad_inputs_raise_one_line_value_error(tmp_path):
    for path, match in _bad_files(tmp_path):
        with pytest.raises(ValueError, match=match) as ei:
            mt.score_npz(path)
        msg = str(ei.value)
        assert "\n" not in msg, msg
        assert str(path.name) in msg, msg


# ------------------------------------------------------------------------------------------
# selective prediction (risk-coverage, AURC, acc@95) and adaptive ECE
# ------------------------------------------------------------------------------------------
def _binary(conf, correct):
    """Ensemble probabilities [N, 2] with top confidence ``conf`` (>= 0.5) on class 0, and labels making
    each prediction correct or not."""
    conf = np.asarray(conf, dtype=np.float64)
    p = np.stack([conf, 1 - conf], axis=1)
    y = np.where(np.asarray(correct, dtype=bool), 0, 1)
    return p, y


def _naive_rc(conf, err):
    """Plain-loop risk-coverage with ties broken by input order (stable sort, most confident first)."""
    order = sorted(range(len(conf)), key=lambda i: -conf[i])
    risks, errors = [], 0
    for k, i in enumerate(order, start=1):
        errors += err[i]
        risks.append(errors / k)
    return risks


def _naive_ece_adaptive(conf, correct, n_bins):
    order = sorted(range(len(conf)), key=lambda i: conf[i])
    n = len(conf)
    sizes = [n // n_bins + (1 if b < n % n_bins else 0) for b in range(n_bins)]
    total, start = 0.0, 0
    for size in sizes:
        idx = order[start:start + size]
        start += size
        if idx:
            acc = sum(correct[i] for i in idx) / len(idx)
            cf = sum(conf[i] for i in idx) / len(idx)
            total += len(idx) / n * abs(acc - cf)
    return total


def test_aurc_and_acc_at_95_hand_cases():
    # most confident first: correct, wrong, correct, wrong -> risks 0, 1/2, 1/3, 2/4
    p, y = _binary([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    cov, risk = mt.risk_coverage(p, y)
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0, 1 / 2, 1 / 3, 1 / 2])
    assert mt.aurc(p, y) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4, abs=1e-15)
    # input order does not matter
    assert mt.aurc(p[::-1], y[::-1]) == pytest.approx(mt.aurc(p, y), abs=1e-15)
    # perfect ranking (errors least confident): AURC = (1/N) sum_{k > N - e} (k - (N - e)) / k
    conf = np.linspace(0.99, 0.6, 20)
    p, y = _binary(conf, [1] * 18 + [0] * 2)
    assert mt.aurc(p, y) == pytest.approx((1 / 19 + 2 / 20) / 20, abs=1e-15)
    # acc@95 on N = 20: the 19 most confident, one of which is wrong
    assert mt.acc_at_coverage(p, y) == pytest.approx(18 / 19, abs=1e-15)
    assert mt.acc_at_coverage(p, y, 0.9) == 1.0
    assert mt.acc_at_coverage(p, y, 1.0) == pytest.approx(18 / 20)
    # all correct / all wrong
    p, y = _binary([0.7, 0.8, 0.9], [1, 1, 1])
    assert mt.aurc(p, y) == 0.0 and mt.acc_at_coverage(p, y) == 1.0
    p, y = _binary([0.7, 0.8, 0.9], [0, 0, 0])
    assert mt.aurc(p, y) == 1.0 and mt.acc_at_coverage(p, y) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aurc_matches_plain_loop_random(seed):
    z = _rand_logits(seed, 3, 257, 7)
    y = _rand_labels(seed, 257, 7)
    p = mt.ensemble_probs(z)
    conf = p.max(dim=1).values.numpy().tolist()
    err = (p.argmax(dim=1) != y).numpy().astype(float).tolist()
    assert len(set(conf)) == len(conf)                       # distinct: the plain definition applies
    risks = _naive_rc(conf, err)
    assert mt.aurc(p, y) == pytest.approx(sum(risks) / len(risks), abs=1e-13)
    np.testing.assert_allclose(mt.risk_coverage(p, y)[1], risks, atol=1e-13)
    k = math.ceil(0.95 * 257)
    order = sorted(range(257), key=lambda i: -conf[i])[:k]
    assert mt.acc_at_coverage(p, y) == pytest.approx(1 - sum(err[i] for i in order) / k, abs=1e-13)
    # through evaluate
    res = mt.evaluate(z, y)
    assert res["aurc"] == mt.aurc(p, y) and res["acc_at_95"] == mt.acc_at_coverage(p, y, 0.95)
    assert res["ece_adaptive"] == mt.ece_adaptive(p, y)


def test_ties_average_over_all_orderings():
    """With tied confidences, AURC, the risk-coverage curve and acc@95 equal the average of the plain
    definitions over every ordering of the input (brute force over all 7! permutations)."""
    import itertools

    conf = [0.9, 0.7, 0.7, 0.7, 0.6, 0.9, 0.55]
    correct = [1, 0, 1, 1, 0, 0, 1]
    err = [1 - c for c in correct]
    p, y = _binary(conf, correct)
    aurcs, curves, accs = [], [], []
    k = math.ceil(0.95 * 7)
    for perm in itertools.permutations(range(7)):
        c = [conf[i] for i in perm]
        e = [err[i] for i in perm]
        r = _naive_rc(c, e)
        curves.append(r)
        aurcs.append(sum(r) / 7)
        accs.append(1 - r[k - 1])
    assert mt.aurc(p, y) == pytest.approx(np.mean(aurcs), abs=1e-13)
    np.testing.assert_allclose(mt.risk_coverage(p, y)[1], np.mean(curves, axis=0), atol=1e-13)
    assert mt.acc_at_coverage(p, y) == pytest.approx(np.mean(accs), abs=1e-13)
    # a single tie group (all confidences equal): every point of the curve is the overall error rate
    p, y = _binary([0.8] * 5, [1, 0, 1, 1, 0])
    np.testing.assert_allclose(mt.risk_coverage(p, y)[1], [0.4] * 5)


def test_ece_adaptive_hand_cases():
    # 2 bins of 2: {0.6 wrong, 0.7 right} -> |0.5 - 0.65| ; {0.8, 0.9 right} -> |1 - 0.85|
    p, y = _binary([0.9, 0.6, 0.8, 0.7], [1, 0, 1, 1])
    assert mt.ece_adaptive(p, y, n_bins=2) == pytest.approx(0.5 * 0.15 + 0.5 * 0.15, abs=1e-15)
    # all correct: every bin has accuracy 1 >= confidence, so ECE = mean(1 - confidence) for any binning
    conf = np.linspace(0.55, 0.95, 31)
    p, y = _binary(conf, [1] * 31)
    for b in (1, 4, 15, 31, 40):
        assert mt.ece_adaptive(p, y, n_bins=b) == pytest.approx(np.mean(1 - conf), abs=1e-14)
    # one bin: |accuracy - mean confidence|
    p, y = _binary([0.6, 0.9, 0.75], [1, 0, 0])
    assert mt.ece_adaptive(p, y, n_bins=1) == pytest.approx(abs(1 / 3 - 0.75), abs=1e-15)
    with pytest.raises(ValueError, match="n_bins"):
        mt.ece_adaptive(p, y, n_bins=0)


@pytest.mark.parametrize("n", [15, 17, 256, 1000])
def test_ece_adaptive_matches_plain_loop_random(n):
    z = _rand_logits(n, 2, n, 5)
    y = _rand_labels(n, n, 5)
    p = mt.ensemble_probs(z)
    conf = p.max(dim=1).values.numpy().tolist()
    correct = (p.argmax(dim=1) == y).numpy().astype(float).tolist()
    assert len(set(conf)) == n
    assert mt.ece_adaptive(p, y) == pytest.approx(_naive_ece_adaptive(conf, correct, 15), abs=1e-13)
    assert mt.ece_adaptive(p, y, n_bins=7) == pytest.approx(_naive_ece_adaptive(conf, correct, 7), abs=1e-13)
    # equal-mass bins with one sample each are |correct - confidence| per sample
    assert mt.ece_adaptive(p, y, n_bins=n) == pytest.approx(
        np.mean(np.abs(np.array(correct) - np.array(conf))), abs=1e-13)


def test_ece_adaptive_ties_do_not_depend_on_order():
    conf = [0.7] * 6 + [0.9] * 4
    correct = [1, 0, 0, 1, 1, 0, 1, 1, 0, 1]
    p, y = _binary(conf, correct)
    rng = np.random.default_rng(0)
    vals = set()
    for _ in range(20):
        perm = rng.permutation(10)
        vals.add(round(mt.ece_adaptive(p[perm], y[perm], n_bins=3), 15))
    assert len(vals) == 1
    # bins of 4, 3, 3 (ascending): the tied 0.7 group has mean accuracy 1/2 wherever its samples fall
    # bin 1: 4 x 0.7, acc 1/2; bin 2: 2 x 0.7 + 0.9, acc (1/2 + 1/2 + 3/4) / 3; bin 3: 3 x 0.9, acc 3/4
    expected = (abs(4 * 0.5 - 4 * 0.7) + abs(0.5 + 0.5 + 0.75 - (0.7 + 0.7 + 0.9)) + abs(3 * 0.75 - 3 * 0.9)) / 10
    assert vals.pop() == pytest.approx(expected, abs=1e-14)


def test_selective_metrics_bad_input():
    p, y = _binary([0.9, 0.6], [1, 0])
    for call, match in [
        (lambda: mt.acc_at_coverage(p, y, 0.0), r"coverage must be a number in \(0, 1\]"),
        (lambda: mt.acc_at_coverage(p, y, 1.5), r"coverage"),
        (lambda: mt.aurc(p, [0, 2]), r"labels must lie in \[0, 2\)"),
        (lambda: mt.risk_coverage(p[None], y), r"probs_bar must be \[N, C\]"),
        (lambda: mt.evaluate(np.zeros((1, 2, 2)), y, temperature=0.0), r"temperature must be a finite number > 0"),
        (lambda: mt.evaluate(np.zeros((1, 2, 2)), y, temperature=1.0, val_logits=np.zeros((1, 2, 2)), val_labels=y),
         r"not both"),
    ]:
        with pytest.raises(ValueError, match=match) as ei:
            call()
        assert "\n" not in str(ei.value)


def test_evaluate_with_a_given_temperature():
    """temperature= reuses a temperature fitted elsewhere (shift evaluation: once, on clean validation data)."""
    z, vz = _rand_logits(40, 3, 80, 4), _rand_logits(41, 3, 60, 4)
    y, vy = _rand_labels(40, 80, 4), _rand_labels(41, 60, 4)
    fitted = mt.evaluate(z, y, val_logits=vz, val_labels=vy)
    given = mt.evaluate(z, y, temperature=mt.fit_temperature(vz, vy))
    assert given == fitted
    assert mt.shift_cell_metrics(z, y, temperature=fitted["temperature"]) == {
        k: fitted[k] for k in mt.SHIFT_KEYS}
