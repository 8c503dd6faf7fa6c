"""`hf_sam.calibration`: every metric against a hand computation on fixed arrays, the temperature fit against its
closed-form minimum and a brute-force grid, and the cross-fitting."""

import math

import numpy as np
import pytest
import torch

from hf_sam.calibration import (
    T_MAX,
    T_MIN,
    brier,
    calibration_metrics,
    cross_fitted_temperature_metrics,
    ece,
    fit_temperature,
    nll,
)


# Five examples, three classes, written as probabilities (logits = log p, so softmax(logits) = p).
PROBS = np.array(
    [
        [0.70, 0.20, 0.10],  # label 0: right, confidence 0.70 -> bin ((10/15, 11/15]) = (0.667, 0.733]
        [0.30, 0.62, 0.08],  # label 0: wrong, confidence 0.62 -> bin (0.600, 0.667]
        [0.25, 0.25, 0.50],  # label 2: right, confidence 0.50 -> bin (0.467, 0.533]
        [0.10, 0.05, 0.85],  # label 1: wrong, confidence 0.85 -> bin (0.800, 0.867]
        [0.72, 0.18, 0.10],  # label 1: wrong, confidence 0.72 -> bin (0.667, 0.733], with the first example
    ]
)
LABELS = np.array([0, 0, 2, 1, 1])
LOGITS = np.log(PROBS)


def test_nll_by_hand():
    # -(1/5) (log 0.70 + log 0.30 + log 0.50 + log 0.05 + log 0.18)
    expected = -(math.log(0.70) + math.log(0.30) + math.log(0.50) + math.log(0.05) + math.log(0.18)) / 5
    assert nll(LOGITS, LABELS) == pytest.approx(expected, rel=1e-12)
    from sklearn.metrics import log_loss  # the same definition

    assert nll(LOGITS, LABELS) == pytest.approx(log_loss(LABELS, PROBS, labels=[0, 1, 2]), rel=1e-12)


def test_brier_by_hand():
    # sum_k (p_k - y_k)^2 per example, then the mean:
    per_example = [
        0.30**2 + 0.20**2 + 0.10**2,  # 0.14
        0.70**2 + 0.62**2 + 0.08**2,  # 0.8808
        0.25**2 + 0.25**2 + 0.50**2,  # 0.375
        0.10**2 + 0.95**2 + 0.85**2,  # 1.635
        0.72**2 + 0.82**2 + 0.10**2,  # 1.2008
    ]
    assert per_example == pytest.approx([0.14, 0.8808, 0.375, 1.635, 1.2008], abs=1e-12)
    assert brier(LOGITS, LABELS) == pytest.approx(4.2316 / 5, rel=1e-12)


def test_ece_by_hand():
    # Bins of width 1/15: (0.667, 0.733] holds examples 1 and 5 (accuracy 1/2, confidence (0.70 + 0.72) / 2 = 0.71);
    # the others are alone in their bins: |0 - 0.62|, |1 - 0.50|, |0 - 0.85|.
    expected = (2 * abs(0.5 - 0.71) + abs(0 - 0.62) + abs(1 - 0.50) + abs(0 - 0.85)) / 5
    assert expected == pytest.approx(0.478, abs=1e-12)
    assert ece(LOGITS, LABELS) == pytest.approx(expected, rel=1e-12)
    # One bin, M = 1: |accuracy - mean confidence| = |2/5 - (0.70 + 0.62 + 0.50 + 0.85 + 0.72) / 5|.
    assert ece(LOGITS, LABELS, n_bins=1) == pytest.approx(abs(0.4 - 3.39 / 5), rel=1e-12)
    # A confidence on a bin edge goes to the bin below (the bins are (a, b]): with M = 2, 0.5 is in (0, 0.5], apart
    # from 0.9 in (0.5, 1]: (|1 - 0.5| + |0 - 0.9|) / 2 (both in one bin it would be |1/2 - 0.7| = 0.2).
    edge_logits, edge_labels = np.array([[0.0, 0.0], [math.log(0.9), math.log(0.1)]]), np.array([0, 1])
    assert ece(edge_logits, edge_labels, n_bins=2) == pytest.approx((0.5 + 0.9) / 2, rel=1e-12)
    # Confidence 1 falls in the last bin (the bins are closed on the right): right and sure is perfectly calibrated.
    assert ece(np.array([[100.0, 0.0]]), np.array([0])) == pytest.approx(0.0, abs=1e-12)


def test_metrics_at_a_temperature_by_hand():
    # At T = 2, p_k is proportional to sqrt(p_k).
    scaled = np.sqrt(PROBS) / np.sqrt(PROBS).sum(axis=1, keepdims=True)
    one_hot = np.eye(3)[LABELS]
    assert nll(LOGITS, LABELS, 2.0) == pytest.approx(-np.log(scaled[np.arange(5), LABELS]).mean(), rel=1e-12)
    assert brier(LOGITS, LABELS, 2.0) == pytest.approx(((scaled - one_hot) ** 2).sum(axis=1).mean(), rel=1e-12)
    # A temperature per example: each row at its own.
    temperatures = np.array([1.0, 2.0, 1.0, 2.0, 1.0])
    rows = np.where(temperatures[:, None] == 2.0, scaled, PROBS)
    assert nll(LOGITS, LABELS, temperatures) == pytest.approx(-np.log(rows[np.arange(5), LABELS]).mean(), rel=1e-12)
    # torch tensors in float32 give the same (computed in float64).
    as_torch = nll(torch.tensor(LOGITS, dtype=torch.float32), torch.tensor(LABELS))
    assert as_torch == pytest.approx(nll(LOGITS, LABELS), rel=1e-6)
    assert calibration_metrics(LOGITS, LABELS) == {
        "nll": nll(LOGITS, LABELS),
        "ece": ece(LOGITS, LABELS),
        "brier": brier(LOGITS, LABELS),
    }


def test_fit_temperature_closed_form():
    # Every example has logits (2, 0); 3 in 4 are labelled 0. softmax(z / T)_0 = sigmoid(2 / T), and the NLL
    # -(3/4 log s + 1/4 log(1 - s)) is smallest at s = 3/4: 2 / T = logit(3/4) = log 3, T = 2 / log 3.
    logits = np.array([[2.0, 0.0]] * 8)
    labels = np.array([0, 0, 0, 1] * 2)
    assert fit_temperature(logits, labels) == pytest.approx(2 / math.log(3), rel=1e-6)


def test_fit_temperature_at_the_ends_of_its_range():
    # Every example right with a margin: each term log(1 + sum_k exp(-(z_y - z_k) / T)) falls as T falls, so the
    # NLL's minimum over [T_MIN, T_MAX] is T_MIN, with margins of 40 (the gradient at T = 1 underflows: L-BFGS alone
    # stopped there, at T = 1) or of 1, and with a tie (margin 0: that term is flat, log 2) among them.
    labels = np.array([0, 1, 0])
    assert fit_temperature(np.array([[40.0, 0.0], [0.0, 40.0], [30.0, 0.0]]), labels) == T_MIN
    assert fit_temperature(np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.0]]), labels) == T_MIN
    assert fit_temperature(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), labels) == T_MIN
    # Every example wrong (logits (2, 0), label 1): -log sigmoid(-2 / T) falls as T grows, so T_MAX.
    assert fit_temperature(np.array([[2.0, 0.0]] * 4), np.array([1] * 4)) == T_MAX
    # Equal logits within every example: the NLL is log K at every T; T = 1 leaves the logits as they are (values
    # that are not exact in binary: the slope must be exactly 0, not a rounding error's sign).
    assert fit_temperature(np.array([[1.0, 1.0]] * 4), np.array([1, 0, 1, 0])) == 1.0
    assert fit_temperature(np.full((4, 5), 0.1), np.array([0, 1, 2, 3])) == 1.0
    assert fit_temperature(np.full((4, 7), 1e5 + 0.1), np.array([0, 1, 2, 3])) == 1.0
    # Every example wrong, yet the minimum inside: logits (2, 1.9, -100), label 1. The slope in beta = 1/T is
    # 0.1 p_0 - 101.9 p_2, zero where p_0 / p_2 = exp(102 beta) = 1019: T = 102 / log 1019.
    assert fit_temperature(np.array([[2.0, 1.9, -100.0]] * 4), np.array([1] * 4)) == pytest.approx(
        102 / math.log(1019), rel=1e-6
    )
    # One example in 8 wrong, margins 40: inside the range, at 40 / T = logit(7/8) = log 7 (as in the test above).
    assert fit_temperature(np.array([[40.0, 0.0]] * 8), np.array([0] * 7 + [1])) == pytest.approx(
        40 / math.log(7), rel=1e-6
    )


def test_fit_temperature_ignores_a_class_of_probability_zero():
    # A -inf logit (a masked class) has probability 0 at every T: the fit is that of the other columns, not NaN.
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0], [3.0, 0.5]])
    labels = np.array([0, 1, 1, 0, 0])
    masked = np.concatenate([logits, np.full((5, 1), -np.inf)], axis=1)
    assert math.isfinite(fit_temperature(logits, labels))
    assert fit_temperature(masked, labels) == pytest.approx(fit_temperature(logits, labels), rel=1e-9)


def test_fit_temperature_matches_a_brute_force_grid():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 5)) * 3
    labels = np.where(rng.random(200) < 0.6, logits.argmax(axis=1), rng.integers(0, 5, 200))  # over-confident
    grid = np.exp(np.linspace(math.log(0.05), math.log(20), 20001))  # steps of 0.03% in T
    best = grid[np.argmin([nll(logits, labels, t) for t in grid[::10]]) * 10]
    fine = grid[max(0, np.searchsorted(grid, best) - 20) : np.searchsorted(grid, best) + 20]
    best = fine[np.argmin([nll(logits, labels, t) for t in fine])]
    fitted = fit_temperature(logits, labels)
    assert fitted > 1.0  # over-confident logits are cooled
    assert fitted == pytest.approx(best, rel=1e-3)
    assert nll(logits, labels, fitted) <= nll(logits, labels, best) + 1e-12


def test_cross_fitted_temperature_scores_each_half_with_the_other_halfs_temperature():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(9, 3)) * 4
    labels = np.where(np.arange(9) % 3 == 0, (logits.argmax(axis=1) + 1) % 3, logits.argmax(axis=1))  # 6 in 9 right
    metrics = cross_fitted_temperature_metrics(logits, labels, seed=0)
    half_a = np.zeros(9, dtype=bool)
    half_a[np.random.Generator(np.random.PCG64(0)).permutation(9)[:4]] = True
    t_from_b, t_from_a = (
        fit_temperature(logits[~half_a], labels[~half_a]),
        fit_temperature(logits[half_a], labels[half_a]),
    )
    assert t_from_a != pytest.approx(t_from_b)
    per_example = np.where(half_a, t_from_b, t_from_a)
    # NLL and Brier are means over examples: the halves' own means, weighted by their sizes.
    nll_a, nll_b = nll(logits[half_a], labels[half_a], t_from_b), nll(logits[~half_a], labels[~half_a], t_from_a)
    assert metrics["nll_ts"] == pytest.approx((4 * nll_a + 5 * nll_b) / 9, rel=1e-12)
    assert metrics["brier_ts"] == pytest.approx(brier(logits, labels, per_example), rel=1e-12)
    assert metrics["ece_ts"] == pytest.approx(ece(logits, labels, per_example), rel=1e-12)
    assert metrics["temperature"] == pytest.approx(fit_temperature(logits, labels), rel=1e-12)
    assert cross_fitted_temperature_metrics(logits[:1], labels[:1]) == {}  # nothing to fit on


def test_bad_shapes_and_labels_are_refused():
    with pytest.raises(ValueError, match=r"shape \(N, K\)"):
        nll(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="class ids in 0..2"):
        brier(LOGITS, np.array([0, 1, 2, 3, 0]))
