# Copyright 2026 The hf_sam contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Calibration of a classifier from its logits: negative log-likelihood, expected calibration error, Brier score, and
the same three after temperature scaling. Arrays in (numpy or torch, any float dtype, computed in float64), floats
out; no `Trainer` in sight.

For N examples with logits z_i in R^K, labels y_i in {0..K-1} and probabilities p_i = softmax(z_i / T):

- `nll` = -(1/N) sum_i log p_{i, y_i}.
- `ece` (top-label expected calibration error, Guo et al. 2017, https://huggingface.co/papers/1706.04599, eq. 3):
  with confidence c_i = max_k p_ik and prediction argmax_k p_ik, the examples are binned by c_i into M = 15 bins of
  equal width on (0, 1], bin m = ((m-1)/M, m/M]; ECE = sum_m |B_m|/N * |acc(B_m) - conf(B_m)|, where acc is the
  fraction of correct predictions in the bin and conf the mean confidence there (empty bins contribute 0).
- `brier` (the multi-class Brier score, Brier 1950): (1/N) sum_i sum_k (p_ik - 1[k = y_i])^2, the squared error
  summed over the K classes (between 0 and 2), not divided by K and not the binary score of the top class.
- Temperature scaling (Guo et al. 2017, section 4.2): one scalar T > 0 fitted by minimising the NLL of
  softmax(z / T) on held-out data; it changes no prediction, so accuracy is unchanged. The NLL is convex in
  beta = 1/T (a log-sum-exp of functions linear in beta, minus a linear term), so every stationary point in log T is
  the global minimum. Its slope, dNLL/dbeta = (1/N) sum_i (sum_k p_ik z_ik - z_{i, y_i}), increases with beta, so its
  sign at the two ends of [`T_MIN`, `T_MAX`] says whether the minimum lies inside; `fit_temperature` finds an inside
  one with L-BFGS on log T.

Where the temperature is fitted. Fitted on the examples it is then scored on, the `*_ts` metrics would be in-sample
(optimistic). `cross_fitted_temperature_metrics`, which the recipes use on their evaluation data, is 2-fold
cross-fitting: the examples are split in two fixed random halves, each half is scored with the temperature fitted on
the other, and the three metrics are taken over all examples so scored. No example is scored with a temperature fitted
on itself, on a held-out split carved from the training data and on a dev/test set alike.
"""

import math

import numpy as np
import torch


ECE_BINS = 15
T_MIN, T_MAX = 1e-2, 1e2


def _scaled(logits: torch.Tensor, temperature) -> torch.Tensor:
    """`logits / T` for one temperature, or for one per example (a length-N array)."""
    temperature = torch.as_tensor(np.asarray(temperature, dtype=np.float64))
    return logits / (temperature[:, None] if temperature.ndim == 1 else temperature)


def _as_tensors(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.as_tensor(np.asarray(logits, dtype=np.float64) if not torch.is_tensor(logits) else logits)
    labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
    logits, labels = logits.detach().to(torch.float64).cpu(), labels.detach().to(torch.long).cpu()
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise ValueError(
            f"Expected logits of shape (N, K) and labels of shape (N,), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"Labels must be class ids in 0..{logits.shape[1] - 1}, got {labels.unique().tolist()}.")
    return logits, labels


def nll(logits, labels, temperature=1.0) -> float:
    """-(1/N) sum_i log softmax(z_i / T)_{y_i}: the mean cross-entropy (log-sum-exp form, stable for large logits)."""
    logits, labels = _as_tensors(logits, labels)
    log_probs = torch.log_softmax(_scaled(logits, temperature), dim=1)
    return float(-log_probs.gather(1, labels[:, None]).mean())


def ece(logits, labels, temperature=1.0, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE with `n_bins` equal-width confidence bins ((m-1)/M, m/M], m = 1..M (see the module docstring)."""
    logits, labels = _as_tensors(logits, labels)
    confidence, prediction = torch.softmax(_scaled(logits, temperature), dim=1).max(dim=1)
    # Bin m (0-based) holds the confidences in (m/M, (m+1)/M]: index ceil(c * M) - 1 (c > 0 always: c >= 1/K).
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp_(0, n_bins - 1)
    correct = (prediction == labels).to(torch.float64)
    total = 0.0
    for m in range(n_bins):
        in_bin = bins == m
        if in_bin.any():
            total += float(in_bin.sum()) * abs(float(correct[in_bin].mean() - confidence[in_bin].mean()))
    return total / len(labels)


def brier(logits, labels, temperature=1.0) -> float:
    """The multi-class Brier score (1/N) sum_i sum_k (p_ik - 1[k = y_i])^2 (summed over classes, in [0, 2])."""
    logits, labels = _as_tensors(logits, labels)
    probs = torch.softmax(_scaled(logits, temperature), dim=1)
    one_hot = torch.nn.functional.one_hot(labels, logits.shape[1]).to(torch.float64)
    return float(((probs - one_hot) ** 2).sum(dim=1).mean())


def _nll_slope(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> float:
    """
    dNLL/dbeta at beta = 1/T: (1/N) sum_i sum_k softmax(beta z_i)_k (z_ik - z_{i, y_i}), non-decreasing in beta. On
    the differences to the label's logit, so that it is exactly 0 where a row's logits are equal; a class of
    probability 0 (a -inf logit) adds nothing.
    """
    probs = torch.softmax(logits * beta, dim=1)
    differences = logits - logits.gather(1, labels[:, None])
    return float(torch.where(probs > 0, probs * differences, 0.0).sum(dim=1).mean())


def fit_temperature(logits, labels) -> float:
    """
    The temperature T in [`T_MIN`, `T_MAX`] minimising `nll(logits, labels, T)` (Guo et al. 2017), in float64.

    The NLL is convex in beta = 1/T (module docstring), so the sign of its slope at the two ends decides: slope <= 0
    at beta = 1/`T_MIN` (the NLL still falls as T shrinks, as when every example is classified right with a margin)
    gives `T_MIN`; slope >= 0 at beta = 1/`T_MAX` (it still falls as T grows, a model worse than uniform) gives
    `T_MAX`; both (logits equal within every example, the NLL flat in T) give 1. Otherwise the minimum is inside and
    L-BFGS (strong Wolfe line search) on log T from T = 1 finds it, clipped to the range. The end checks matter:
    from T = 1 on large-margin logits the gradient underflows and L-BFGS would stop at once, at T = 1. A -inf logit
    (a masked class) has probability 0 at every T and is left out of the fit.
    """
    logits, labels = _as_tensors(logits, labels)
    falls_when_colder = _nll_slope(logits, labels, 1 / T_MIN) <= 0
    falls_when_hotter = _nll_slope(logits, labels, 1 / T_MAX) >= 0
    if falls_when_colder and falls_when_hotter:
        return 1.0
    if falls_when_colder:
        return T_MIN
    if falls_when_hotter:
        return T_MAX
    finite = torch.isfinite(logits)  # a -inf logit stays -inf at every T, with no gradient (not 0 * inf = NaN)
    finite_logits = torch.where(finite, logits, 0.0)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        scaled = torch.where(finite, finite_logits * torch.exp(-log_t), logits)
        loss = torch.nn.functional.cross_entropy(scaled, labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(min(max(math.exp(log_t.item()), T_MIN), T_MAX))


def cross_fitted_temperature_metrics(logits, labels, seed: int = 0) -> dict[str, float]:
    """
    `{"temperature", "nll_ts", "ece_ts", "brier_ts"}` by 2-fold cross-fitting (module docstring): a fixed random
    half A of the examples (numpy's PCG64 with `seed`, floor(N/2) examples) is scored with the temperature fitted on
    the other half B and B with the one fitted on A; `temperature` is the one fitted on all N (the temperature a user
    would apply, reported for information: no metric here uses it). Empty with fewer than 2 examples.
    """
    logits, labels = _as_tensors(logits, labels)
    n = len(labels)
    if n < 2:
        return {}
    half_a = np.zeros(n, dtype=bool)
    half_a[np.random.Generator(np.random.PCG64(seed)).permutation(n)[: n // 2]] = True
    a, b = torch.from_numpy(half_a), torch.from_numpy(~half_a)
    per_example = np.where(half_a, fit_temperature(logits[b], labels[b]), fit_temperature(logits[a], labels[a]))
    return {
        "temperature": fit_temperature(logits, labels),
        "nll_ts": nll(logits, labels, per_example),
        "ece_ts": ece(logits, labels, per_example),
        "brier_ts": brier(logits, labels, per_example),
    }


def calibration_metrics(logits, labels) -> dict[str, float]:
    """`{"nll", "ece", "brier"}` of the logits as they are (T = 1)."""
    return {"nll": nll(logits, labels), "ece": ece(logits, labels), "brier": brier(logits, labels)}


def temperature_scaled_metrics(logits, labels, fit_logits, fit_labels) -> dict[str, float]:
    """
    `{"temperature", "nll_ts", "ece_ts", "brier_ts"}`: the temperature fitted on (`fit_logits`, `fit_labels`), and
    the metrics of `logits` against `labels` scaled by it. Pass held-out data to fit on: fitted on the very examples
    it is scored on, the `*_ts` metrics are an in-sample (optimistic) figure.
    """
    temperature = fit_temperature(fit_logits, fit_labels)
    return {
        "temperature": temperature,
        "nll_ts": nll(logits, labels, temperature),
        "ece_ts": ece(logits, labels, temperature),
        "brier_ts": brier(logits, labels, temperature),
    }
