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
r"""
Sharpness diagnostics: the quantities that Wen, Ma & Li (ICLR 2023, "How Does Sharpness-Aware Minimization Minimize
Sharpness?", https://huggingface.co/papers/2211.05729) tell apart, measured on any model that returns a loss.

With :math:`L(w)` the loss over `batches` (below) and :math:`g = \nabla L(w)`, :math:`H = \nabla^2 L(w)`:

- worst-case sharpness :math:`\max_{\|e\| \le \rho} L(w + e) - L(w) \approx \rho \|g\| + \frac{\rho^2}{2}
  \lambda_{\max}(H)`, which SAM's full (non-stochastic) step minimises; near a minimum it is driven by the top Hessian
  eigenvalue;
- ascent-direction sharpness :math:`L(w + \rho\, g / \|g\|) - L(w)`: the quantity SAM's update actually evaluates
  (`sam/sharpness` of `SAMTrainer` is its per-minibatch, free version);
- average sharpness :math:`\mathbb{E}_{z \sim N(0, I)} L(w + \rho\, z / \|z\|) - L(w) \approx
  \frac{\rho^2}{2 d} \operatorname{tr}(H)` (:math:`d` the number of trainable weights), tied to the Hessian trace;
- :math:`\lambda_{\max}(H)` (power iteration, stopped on the eigenvector's residual :math:`\|Hv - \lambda v\|`) and
  :math:`\operatorname{tr}(H)` (Hutchinson or Hutch++), by Hessian-vector products;
- :math:`|\cos(g, v_{\max})|`, the alignment of the gradient with the top eigenvector: Wen et al.'s mechanism, by which
  SAM's ascent direction lines up with :math:`v_{\max}` and so penalises :math:`\lambda_{\max}`.

Conventions shared by every function:

- `batches` is an iterable of input dicts the model accepts (`model(**batch)` must return an object or dict with a
  scalar `loss`). It is read into a list once, so a generator is fine. **The loss is the mean of the per-batch
  losses**, :math:`L(w) = \frac{1}{B} \sum_b L_b(w)`, and so are its gradient and Hessian. Tensors are moved to the
  device of the model's first trainable parameter.
- Only the parameters with `requires_grad` are perturbed and differentiated (:math:`w` is the trainable subset: the
  adapters of a PEFT model, say).
- The model is left exactly as it was: trainable parameters and all buffers are copied back bitwise from saved copies
  (never by subtracting a perturbation), and every module's train/eval mode, every `requires_grad` flag and every
  `.grad` (including `None`) are put back; `.backward()` is never called, so `.grad` is never written to. The model is
  evaluated in eval mode (dropout off, BatchNorm running statistics used) unless `eval_mode=False`, in which case
  every forward pass draws its own dropout mask.
- Randomness (random directions, Rademacher probes, the power-iteration start) comes from a local `torch.Generator`
  seeded with `seed`, on the model's device; the global RNG states (CPU and the model's CUDA devices) are forked, so a
  call is reproducible and does not change the random numbers of the training that surrounds it.
- Forward and backward passes run in the model's own dtype, with no autocast. Direction vectors, perturbations,
  Hessian-vector products and their reductions are kept in float32 (float64 for a float64 model). For bf16/fp16
  weights the perturbed weights are rounded to the weight dtype and Hessian-vector products (double backward) are
  computed in that dtype, so second-order quantities are noisy: treat them as trends, not as exact values.
- Hessian-vector products use double backward (:math:`Hv = \nabla (g^\top v)`); the forward passes that build them run
  with PyTorch's math attention kernel (`torch.nn.attention.sdpa_kernel`), because the fused SDPA kernels have no
  double backward. Models with custom attention kernels (FlashAttention-2) need `attn_implementation="eager"` or
  `"sdpa"` for the Hessian functions.
- Distributed: when `torch.distributed` is initialized, every process must call the function with the same
  `batches`; process `r` of `n` evaluates `batches[r::n]`, and the loss sums, gradients and Hessian-vector products are
  summed across processes with `all_reduce` and divided by the total number of batches, so every process gets the same
  result (the mean over all batches). A `DistributedDataParallel` wrapper is unwrapped. FSDP and DeepSpeed ZeRO-3
  (sharded parameters) are not supported.
"""

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from accelerate.logging import get_logger
from accelerate.state import PartialState
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .distributed import all_reduce_sum_


logger = get_logger(__name__)

Batch = dict[str, Any]


@dataclass(frozen=True)
class SharpnessResult:
    """
    One diagnostic: `value` (a float; `float(result)` gives it), `stderr` (the standard error of a Monte-Carlo mean,
    `None` for deterministic quantities) and `iterations` (random samples, ascent steps or power iterations used).
    """

    value: float
    stderr: float | None = None
    iterations: int = 1

    def __float__(self) -> float:
        return float(self.value)


@dataclass(frozen=True)
class HessianEigenResult(SharpnessResult):
    r"""
    The top Hessian eigenvalue (`value`, the Rayleigh quotient :math:`\lambda = v^\top H v`) with its unit-norm
    `eigenvector` :math:`v` (one tensor per trainable parameter, shaped like it, float32 or float64, on its device; the
    sign is arbitrary), the `residual` :math:`\|Hv - \lambda v\|` of that very pair, and whether power iteration met its
    residual tolerance (`converged`). `stderr` is `None`.

    The residual certifies the pair: :math:`H` has an eigenvalue within `residual` of `value`, and with :math:`\delta`
    the distance from `value` to the rest of the spectrum, the angle :math:`\theta` between :math:`v` and the
    eigenvector of that eigenvalue obeys :math:`\sin\theta \le \text{residual} / \delta`, and the eigenvalue error is at
    most :math:`\text{residual}^2 / \delta` (Davis-Kahan; Parlett, "The Symmetric Eigenvalue Problem", ch. 11).
    """

    eigenvector: list[torch.Tensor] = field(default_factory=list, repr=False, compare=False)
    converged: bool = True
    residual: float | None = None


@dataclass(frozen=True)
class AlignmentResult(SharpnessResult):
    r"""
    :math:`|\cos(g, v_{\max})|` (`value`), with the power iteration that gave :math:`v_{\max}`: its `eigenvalue`,
    `residual` :math:`\|Hv - \lambda v\|` and `converged`, as in `HessianEigenResult` (`eigenvalue` and `residual` are
    `None` when the eigenvector was passed in). Since :math:`|\cos(g, v)|` is 1-Lipschitz in the unit vector :math:`v`,
    the value is off by at most :math:`\min_\pm \|v \mp v_{\max}\| \le \sqrt{2} \sin\theta \le \sqrt{2}\,
    \text{residual} / \delta`, :math:`\delta` the distance from `eigenvalue` to the rest of the spectrum.
    """

    eigenvalue: float | None = None
    residual: float | None = None
    converged: bool = True


# ---------------------------------------------------------------------------------------------- public functions


def ascent_sharpness(
    model: nn.Module, batches: Iterable[Batch], *, rho: float = 0.05, eval_mode: bool = True
) -> SharpnessResult:
    r"""
    Ascent-direction sharpness :math:`L(w + \rho\, g / \|g\|) - L(w)`, :math:`g = \nabla L(w)`, over all `batches`.

    This is what one full-batch SAM step evaluates (Foret et al. 2021; Wen et al. 2023 call it the ascent-direction
    sharpness). It is 0 when :math:`g = 0`. Cost: one forward and backward pass, then one forward pass, per batch.
    """
    _check_rho(rho)
    with _Evaluator.open(model, batches, eval_mode) as ev:
        loss, grad = ev.loss_and_grad()
        grad_norm = _norm(grad)
        if grad_norm == 0:
            return SharpnessResult(0.0, None, 1)
        _scale_(grad, rho / grad_norm)
        return SharpnessResult(ev.loss(grad) - loss, None, 1)


def worst_case_sharpness(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    rho: float = 0.05,
    steps: int = 10,
    step_size: float = 1.0,
    tol: float = 1e-4,
    seed: int = 0,
    eval_mode: bool = True,
) -> SharpnessResult:
    r"""
    Worst-case sharpness :math:`\max_{\|e\| \le \rho} L(w + e) - L(w)`, by projected normalized gradient ascent.

    Starts from SAM's :math:`e_0 = \rho\, g / \|g\|` (a random direction of norm :math:`\rho` if :math:`g = 0`), then

    .. math::
        e_{k+1} = P_\rho\!\left(e_k + \eta\, \rho\, \frac{g_k}{\|g_k\|}\right), \qquad g_k = \nabla L(w + e_k),

    with :math:`P_\rho` the projection onto the ball :math:`\|e\| \le \rho` and :math:`\eta` = `step_size`. A large
    :math:`\eta` gives the fixed-point iteration :math:`e = \rho\, \nabla L(w + e) / \|\nabla L(w + e)\|`, which
    increases :math:`L` at every step when :math:`L` is convex; :math:`\eta = 1` (the default) damps it.

    Evaluates :math:`L(w + e_k)` at up to `steps` iterates (stopping early once :math:`\|e_{k+1} - e_k\| \le`
    `tol` :math:`\rho`) and returns the largest :math:`L(w + e_k) - L(w)` seen: a lower bound on the true maximum that
    is never below the ascent sharpness (`steps=1` is exactly `ascent_sharpness`). `iterations` is the number of
    evaluated iterates. Cost: one forward and backward pass per batch at :math:`w`, then one per iterate.
    """
    _check_rho(rho)
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}.")
    if step_size <= 0:
        raise ValueError(f"`step_size` must be > 0, got {step_size}.")
    with _Evaluator.open(model, batches, eval_mode) as ev:
        loss, direction = ev.loss_and_grad()
        norm = _norm(direction)
        if norm == 0:  # at a stationary point: start from a random direction
            direction = ev.randn(seed)
            norm = _norm(direction)
        perturbation = _scale_(direction, rho / norm)
        best = -math.inf
        iterations = 0
        for _ in range(steps):
            perturbed_loss, grad = ev.loss_and_grad(perturbation)
            iterations += 1
            best = max(best, perturbed_loss)
            grad_norm = _norm(grad)
            if grad_norm == 0:
                break
            candidate = torch._foreach_add(perturbation, grad, alpha=step_size * rho / grad_norm)
            candidate_norm = _norm(candidate)
            if candidate_norm > rho:
                _scale_(candidate, rho / candidate_norm)
            moved = _norm(torch._foreach_sub(candidate, perturbation))
            perturbation = candidate
            if moved <= tol * rho:
                break
        return SharpnessResult(best - loss, None, iterations)


def average_sharpness(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    rho: float = 0.05,
    samples: int = 10,
    antithetic: bool = True,
    seed: int = 0,
    eval_mode: bool = True,
) -> SharpnessResult:
    r"""
    Average sharpness :math:`\mathbb{E}_{z \sim N(0, I)}\, L(w + \rho\, z / \|z\|) - L(w)`, by Monte Carlo.

    :math:`e = \rho\, z / \|z\|` is uniform on the sphere of radius :math:`\rho` in the space of trainable weights, so
    the first-order term vanishes in expectation and the value is :math:`\approx \frac{\rho^2}{2d}
    \operatorname{tr}(H)` for small :math:`\rho`. With `antithetic` (the default) each sample is the symmetric
    difference :math:`\frac{1}{2}(L(w + e) + L(w - e)) - L(w)`, which has the same expectation and cancels the
    first-order term exactly (so much less variance); otherwise it is :math:`L(w + e) - L(w)`. `stderr` is the
    standard error of the mean over the `samples` (`None` for one sample). Cost: one forward pass per batch at
    :math:`w`, then one (two with `antithetic`) per sample. On a large model the value can fall below the resolution
    of the loss's dtype (with 22.7M weights and rho=0.05 it is about 1e-8, under float32's 6e-8 at a loss of 0.6):
    a warning then says the result is rounding noise.
    """
    _check_rho(rho)
    if samples < 1:
        raise ValueError(f"`samples` must be >= 1, got {samples}.")
    with _Evaluator.open(model, batches, eval_mode) as ev:
        loss = ev.loss()
        generator = ev.generator(seed)
        values = []
        for _ in range(samples):
            perturbation = ev.randn(generator)
            _scale_(perturbation, rho / _norm(perturbation))
            value = ev.loss(perturbation)
            if antithetic:
                value = 0.5 * (value + ev.loss(torch._foreach_neg(perturbation)))
            values.append(value - loss)
        result = SharpnessResult(*_mean_and_stderr(values), samples)
        # L(w + e) - L(w) is about rho^2 tr(H) / (2 d): on large models it can sink below what the loss's dtype resolves.
        resolution = torch.finfo(ev.params[0].dtype).eps * abs(loss)
        if abs(result.value) + 2 * (result.stderr or 0.0) < 4 * resolution:
            _warn(
                f"average_sharpness: the value {result.value:.3g} is below the resolution of the loss in "
                f"{ev.params[0].dtype} (about {resolution:.1g} at L(w)={loss:.3g}): it is rounding noise, and its "
                "stderr does not show it. Use a larger `rho` (the value grows as rho^2) or a float64 model."
            )
        return result


def top_hessian_eigenvalue(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    max_iterations: int = 100,
    tol: float = 1e-5,
    which: str = "algebraic",
    seed: int = 0,
    eval_mode: bool = True,
) -> HessianEigenResult:
    r"""
    The top eigenvalue of the Hessian of :math:`L` and its eigenvector, by power iteration on Hessian-vector products.

    Power iteration :math:`v \leftarrow Hv / \|Hv\|` from a random unit :math:`v_0` finds the eigenvalue of largest
    **magnitude**. At each iterate the estimate is the Rayleigh quotient :math:`\lambda = v^\top H v` and iteration
    stops at the first :math:`v` whose **residual** is small:

    .. math::
        \|Hv - \lambda v\| \le \text{tol}\, |\lambda|,

    or after `max_iterations` (then `converged` is False and one warning gives the residual reached). That :math:`v`,
    its :math:`\lambda` and its `residual` are returned. The residual bounds the eigenvector's error, not only the
    eigenvalue's: :math:`\sin\theta(v, v_{\max}) \le \text{residual} / \delta` with :math:`\delta` the eigengap
    (the distance from :math:`\lambda` to the rest of the spectrum), while the Rayleigh quotient's error is only
    :math:`\le \text{residual}^2 / \delta` (which is why stopping when :math:`\lambda` stalls leaves the eigenvector,
    and `gradient_eigenvector_alignment`, far less accurate than the eigenvalue). The residual shrinks by about
    :math:`|\lambda_2 / \lambda_1|` per iteration (the ratio of the two largest eigenvalues in magnitude), so the
    iterations needed grow as :math:`\log(1 / \text{tol}) / \log|\lambda_1 / \lambda_2|`: about 17 for a ratio of 2
    at the default `tol`, about 120 for a ratio of 1.1. The residual cannot go below the rounding noise of the
    Hessian-vector products (about 1e-3 :math:`|\lambda|` in bf16), so a smaller `tol` then only spends
    `max_iterations`.

    - `which="algebraic"` (the default) returns the largest eigenvalue :math:`\lambda_{\max}`: if the dominant
      eigenvalue :math:`\lambda_d` is negative, a second power iteration on :math:`H - \lambda_d I` (whose spectrum is
      :math:`\ge 0` with top :math:`\mu = \lambda_{\max} - \lambda_d`) finds it (up to twice the cost); that run
      stops when :math:`\|Hv - \lambda_{\max} v\| \le \text{tol}\, \mu` (the same residual, measured against the
      shifted operator's scale, as :math:`\lambda_{\max}` itself may be about 0), and its result alone decides
      `converged`. `iterations` counts both runs.
    - `which="magnitude"` returns the dominant eigenvalue :math:`\lambda_d` itself.

    Power iteration cannot separate :math:`\pm\lambda` pairs of equal magnitude; with a repeated top eigenvalue the
    eigenvector is one unit vector of its eigenspace (its residual is still small). Cost: one Hessian-vector product (a
    forward, a backward building the graph, and a double backward) per batch and iteration; with a single (local)
    batch the forward and first backward are done once and their graph is kept for all iterations.
    """
    _check_power_iteration(max_iterations, tol)
    if which not in ("algebraic", "magnitude"):
        raise ValueError(f"`which` must be 'algebraic' or 'magnitude', got {which!r}.")
    with _Evaluator.open(model, batches, eval_mode) as ev:
        return _top_eigen(
            ev, max_iterations=max_iterations, tol=tol, which=which, seed=seed, caller="top_hessian_eigenvalue"
        )


def hessian_trace(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    samples: int = 100,
    deflation_rank: int = 0,
    seed: int = 0,
    eval_mode: bool = True,
) -> SharpnessResult:
    r"""
    The Hessian trace :math:`\operatorname{tr}(H)`: Hutchinson's estimator, or Hutch++ with `deflation_rank` > 0.

    **Hutchinson** (`deflation_rank=0`): :math:`\operatorname{tr}(H) = \mathbb{E}_z[z^\top H z]` with :math:`z`
    of independent Rademacher (:math:`\pm 1`) entries; the value is the mean of :math:`z^\top H z` over `samples`
    probes (the same probes for every batch) and `stderr` its standard error (`None` for one sample). It is exact for a
    diagonal Hessian; its variance is :math:`2 \sum_{i \ne j} H_{ij}^2` per probe, which for a network's Hessian is
    dominated by its few large outlier eigenvalues (Sagun et al. 2018; Papyan 2020): there the standard error can
    exceed the trace itself at any affordable `samples`.

    **Hutch++** (Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal Stochastic Trace Estimation", SOSA 2021) takes that
    top of the spectrum exactly. With :math:`S` a :math:`d \times k` Rademacher sketch (:math:`k` =
    `deflation_rank`), :math:`Q` an orthonormal basis of :math:`HS` and :math:`P = QQ^\top`,

    .. math::
        \operatorname{tr}(H) = \operatorname{tr}(Q^\top H Q) + \operatorname{tr}\big((I - P) H (I - P)\big),

    the first term computed exactly from :math:`HQ` and the second by Hutchinson with `samples` projected probes
    :math:`(I - P) z`. The estimate is unbiased for any :math:`Q` (the probes are drawn independently of the sketch);
    its variance per probe is :math:`2 \sum_{i \ne j} B_{ij}^2` with :math:`B = (I - P) H (I - P)`, :math:`H`
    without (approximately) its :math:`k` largest-magnitude eigenvalues, and `stderr` is that part's standard error
    (the exact part, given :math:`Q`, has none). `iterations` counts the Hessian-vector products per batch:
    `samples` (Hutchinson) or `2 * deflation_rank + samples` (Hutch++; with more sketch columns than trainable
    weights :math:`d`, :math:`Q` has :math:`d` columns and the count is `deflation_rank + d + samples`). Memory: at
    the peak (the orthonormalisation) about :math:`2k` float32 parameter-sized vectors, :math:`k` of them kept.

    Cost: per batch one forward and one graph-building backward (two with Hutch++), then one double backward per
    Hessian-vector product. The sketch and the probes come from generators seeded by `seed` (the probes exactly as
    Hutchinson's, so `deflation_rank=0` reproduces it).
    """
    if samples < 1:
        raise ValueError(f"`samples` must be >= 1, got {samples}.")
    if deflation_rank < 0:
        raise ValueError(f"`deflation_rank` must be >= 0 (0: Hutchinson), got {deflation_rank}.")
    with _Evaluator.open(model, batches, eval_mode) as ev:
        basis = _range_basis(ev, deflation_rank, seed) if deflation_rank else []
        exact_parts = torch.zeros(len(basis), dtype=ev.scalar_dtype, device=ev.device)
        estimates = torch.zeros(samples, dtype=ev.scalar_dtype, device=ev.device)
        for batch in ev.batches:
            grad = ev.grad_with_graph(batch)
            for i, vector in enumerate(basis):
                exact_parts[i] += _dot(vector, ev.hvp_from(grad, vector, retain_graph=True))
            generator = ev.generator(seed)  # the same probes for every batch
            for i in range(samples):
                probe = _project_out(ev.rademacher(generator), basis)
                estimates[i] += _dot(probe, ev.hvp_from(grad, probe, retain_graph=i < samples - 1))
            del grad
        exact = ev.all_reduce_mean_scalars(exact_parts).sum().item() if basis else 0.0
        estimates = ev.all_reduce_mean_scalars(estimates)
        mean, stderr = _mean_and_stderr(estimates.tolist())
        products = deflation_rank + len(basis) + samples if basis else samples
        return SharpnessResult(exact + mean, stderr, products)


# The sketch of Hutch++ has its own random stream, independent of the probes (which stay Hutchinson's).
_SKETCH_SEED_OFFSET = 0x5EED5EED


def _range_basis(ev: "_Evaluator", rank: int, seed: int) -> list[list[torch.Tensor]]:
    """Orthonormal columns spanning :math:`HS`, :math:`S` `rank` Rademacher vectors (the range sketch of Hutch++)."""
    products = [ev.zeros() for _ in range(rank)]
    for batch in ev.batches:
        grad = ev.grad_with_graph(batch)
        generator = ev.generator(seed + _SKETCH_SEED_OFFSET)  # the same sketch for every batch
        for i, product in enumerate(products):
            sketch = ev.rademacher(generator)
            torch._foreach_add_(product, ev.hvp_from(grad, sketch, retain_graph=i < rank - 1))
        del grad
    for product in products:
        ev.all_reduce_mean_(product)
    templates = [torch.empty(0, dtype=t.dtype, device=t.device) for t in products[0]]
    sizes = [t.numel() for t in products[0]]
    shapes = [t.shape for t in products[0]]
    # One d x k matrix on the evaluator's device (parameters may sit on several), each product freed once copied in;
    # float64 when the model has float64 weights, else float32 (the projection is applied twice, so ~1e-7 is enough).
    matrix = torch.empty(sum(sizes), rank, dtype=ev.scalar_dtype, device=ev.device)
    for i in range(rank):
        matrix[:, i] = torch.cat([t.reshape(-1).to(device=ev.device, dtype=ev.scalar_dtype) for t in products[i]])
        products[i] = None
    q, _ = torch.linalg.qr(matrix, mode="reduced")  # orthonormal even if HS is rank-deficient; min(d, k) columns
    del matrix
    basis = []
    for column in q.T:
        pieces = torch.split(column, sizes)
        basis.append(
            [
                piece.reshape(shape).to(dtype=t.dtype, device=t.device)
                for piece, shape, t in zip(pieces, shapes, templates, strict=True)
            ]
        )
    return basis


def _project_out(vector: list[torch.Tensor], basis: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    r""":math:`(I - QQ^\top) v` for the orthonormal columns `basis` of :math:`Q` (classical Gram-Schmidt, twice)."""
    for _ in range(2 if basis else 0):
        for column in basis:
            torch._foreach_add_(vector, column, alpha=-_dot(column, vector).item())
    return vector


def gradient_eigenvector_alignment(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    eigenvector: list[torch.Tensor] | None = None,
    max_iterations: int = 100,
    tol: float = 1e-5,
    seed: int = 0,
    eval_mode: bool = True,
) -> AlignmentResult:
    r"""
    :math:`|\cos(g, v_{\max})| = |g^\top v_{\max}| / (\|g\| \|v_{\max}\|)`: how well the gradient over `batches` lines
    up with the top Hessian eigenvector (Wen et al. 2023: SAM's ascent direction aligns with :math:`v_{\max}`).

    :math:`v_{\max}` is `eigenvector` (e.g. `top_hessian_eigenvalue(...).eigenvector` on the same model and
    batches) or, if `None`, computed as by `top_hessian_eigenvalue(which="algebraic")` with `max_iterations`, `tol`
    and `seed`: power iteration until :math:`\|Hv - \lambda v\| \le \text{tol}\, |\lambda|`. The result's
    `iterations`, `eigenvalue`, `residual` and `converged` are that power iteration's (0, `None`, `None`, True when
    `eigenvector` is given). The error of the value is at most :math:`\sqrt{2}\, \text{residual} / \delta`,
    :math:`\delta` the eigengap (see `AlignmentResult`): at the default `tol` and an eigengap of half the top
    eigenvalue, below :math:`3 \cdot 10^{-5}`. NaN when :math:`g = 0`. Cost: one forward and backward pass per batch,
    plus the power iteration if it is run.
    """
    if eigenvector is None:
        _check_power_iteration(max_iterations, tol)
    with _Evaluator.open(model, batches, eval_mode) as ev:
        eigen = None
        if eigenvector is None:
            eigen = _top_eigen(
                ev,
                max_iterations=max_iterations,
                tol=tol,
                which="algebraic",
                seed=seed,
                caller="gradient_eigenvector_alignment",
            )
            eigenvector = eigen.eigenvector
        else:
            eigenvector = ev.as_vector(eigenvector)
        _, grad = ev.loss_and_grad()
        denominator = _norm(grad) * _norm(eigenvector)
        value = abs(_dot(grad, eigenvector).item()) / denominator if denominator > 0 else math.nan
        if eigen is None:
            return AlignmentResult(value, None, 0)
        return AlignmentResult(
            value,
            None,
            eigen.iterations,
            eigenvalue=eigen.value,
            residual=eigen.residual,
            converged=eigen.converged,
        )


# ---------------------------------------------------------------------------------------------- internals


def _top_eigen(
    ev: "_Evaluator", *, max_iterations: int, tol: float, which: str, seed: int, caller: str
) -> HessianEigenResult:
    generator = ev.generator(seed)
    value, vector, iterations, converged, residual = _power_iteration(
        ev, ev.randn(generator), 0.0, max_iterations, tol
    )
    if which == "algebraic" and value < 0:
        # The dominant eigenvalue is negative: the top one is the dominant eigenvalue of H - value * I (spectrum >= 0).
        # Its residual ||(H - value I) v - mu v|| is ||H v - (mu + value) v||: the residual of the final pair for H.
        shifted, vector, more, converged, residual = _power_iteration(
            ev, ev.randn(generator), value, max_iterations, tol
        )
        value, iterations = shifted + value, iterations + more
    if not converged:
        _warn(
            f"{caller}: power iteration stopped at max_iterations={max_iterations} before the residual criterion "
            f"||Hv - lambda v|| <= tol * |lambda| with tol={tol}: the residual reached is {residual:.3g} at "
            f"lambda={value:.6g}. The eigenvector (and the gradient alignment) is off by up to residual / eigengap "
            "(the eigenvalue by residual^2 / eigengap); raise `max_iterations`, or `tol` to accept that."
        )
    return HessianEigenResult(value, None, iterations, eigenvector=vector, converged=converged, residual=residual)


def _power_iteration(
    ev: "_Evaluator", vector: list[torch.Tensor], shift: float, max_iterations: int, tol: float
) -> tuple[float, list[torch.Tensor], int, bool, float]:
    r"""
    Power iteration on :math:`M = H - \text{shift}\, I` from `vector`: (Rayleigh quotient :math:`\mu = v^\top M v`,
    unit :math:`v`, iterations, converged, residual :math:`\|Mv - \mu v\|`) for the first iterate :math:`v` with
    :math:`\|Mv - \mu v\| \le \text{tol}\, |\mu|`, or the last one after `max_iterations`.
    """
    vector = _scale_(vector, 1.0 / _norm(vector))
    iterations = 0
    while True:
        iterations += 1
        product = ev.hvp(vector)
        if shift:
            torch._foreach_add_(product, vector, alpha=-shift)
        estimate = _dot(vector, product).item()
        # ||Mv - mu v|| computed from the difference itself (sqrt(||Mv||^2 - mu^2) would lose half the digits).
        residual = _norm(torch._foreach_add(product, vector, alpha=-estimate))
        converged = residual <= tol * abs(estimate)  # also when M v = 0 exactly (a zero Hessian): v is an eigenvector
        if converged or iterations >= max_iterations:
            return estimate, vector, iterations, converged, residual
        vector = _scale_(product, 1.0 / _norm(product))


class _Evaluator:
    """The loss, its gradient and Hessian-vector products over the (local shard of the) batches, as means."""

    def __init__(self, model: nn.Module, batches: list[Batch], saved_params: list[torch.Tensor]):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.saved_params = saved_params
        self.device = self.params[0].device
        self.vector_dtypes = [torch.promote_types(p.dtype, torch.float32) for p in self.params]
        self.scalar_dtype = torch.float64 if torch.float64 in self.vector_dtypes else torch.float32
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed:
            batches = batches[dist.get_rank() :: dist.get_world_size()]
        self.batches = batches
        count = torch.tensor(len(batches), dtype=torch.int64, device=self._collective_device())
        if self.distributed:
            dist.all_reduce(count)
        self.num_batches = int(count.item())
        if self.num_batches == 0:
            raise ValueError("`batches` is empty: the diagnostics need at least one batch.")
        self._cached_grad: list[torch.Tensor] | None = None

    @classmethod
    @contextlib.contextmanager
    def open(cls, model: nn.Module, batches: Iterable[Batch], eval_mode: bool) -> Iterator["_Evaluator"]:
        """Unwrap DDP, read `batches`, and put the model back exactly as it was on exit."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("The model has no parameter with `requires_grad=True`: nothing to measure.")
        batches = list(batches)
        with _preserved_model_state(model, params, eval_mode) as saved_params:
            yield cls(model, batches, saved_params)

    # ---------------------------------------------------------------- passes

    def _forward_loss(self, batch: Batch) -> torch.Tensor:
        output = self.model(**_to_device(batch, self.device))
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is None:
            raise ValueError("The model returned no loss: every batch must hold the labels the model needs.")
        if loss.dim() != 0:
            raise ValueError(f"The model's loss must be a scalar, got shape {tuple(loss.shape)}.")
        return loss

    @contextlib.contextmanager
    def _perturbed(self, perturbation: list[torch.Tensor] | None) -> Iterator[None]:
        """Weights `w + perturbation` inside, bitwise `w` after (copied back from the saved weights)."""
        if perturbation is None:
            yield
            return
        with torch.no_grad():
            for p, saved, e in zip(self.params, self.saved_params, perturbation, strict=True):
                p.copy_(saved).add_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.saved_params)

    def loss(self, perturbation: list[torch.Tensor] | None = None) -> float:
        """:math:`L(w + e)` (the mean over all batches), forward passes only."""
        total = torch.zeros((), dtype=self.scalar_dtype, device=self.device)
        with self._perturbed(perturbation), torch.no_grad():
            for batch in self.batches:
                total += self._forward_loss(batch).detach().to(self.scalar_dtype)
        return self.all_reduce_mean_scalars(total).item()

    def loss_and_grad(self, perturbation: list[torch.Tensor] | None = None) -> tuple[float, list[torch.Tensor]]:
        """:math:`L(w + e)` and :math:`\\nabla L(w + e)` (means over all batches)."""
        total = torch.zeros((), dtype=self.scalar_dtype, device=self.device)
        grad = self.zeros()
        with self._perturbed(perturbation):
            for batch in self.batches:
                loss = self._forward_loss(batch)
                parts = torch.autograd.grad(loss, self.params, allow_unused=True)
                total += loss.detach().to(self.scalar_dtype)
                for acc, part in zip(grad, parts, strict=True):
                    if part is not None:
                        acc.add_(part)
        return self.all_reduce_mean_scalars(total).item(), self.all_reduce_mean_(grad)

    def grad_with_graph(self, batch: Batch) -> list[torch.Tensor | None]:
        """:math:`\\nabla L_b(w)` with its graph, for Hessian-vector products (math attention kernel)."""
        with sdpa_kernel([SDPBackend.MATH]):
            loss = self._forward_loss(batch)
        return list(torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True))

    def hvp_from(
        self, grad: list[torch.Tensor | None], vector: list[torch.Tensor], *, retain_graph: bool
    ) -> list[torch.Tensor]:
        """:math:`H_b v = \\nabla (g_b^\\top v)` for a gradient `grad` built by `grad_with_graph` (not reduced)."""
        terms = [(g * v.to(g.dtype)).sum() for g, v in zip(grad, vector, strict=True) if g is not None]
        dot = torch.stack(terms).sum() if terms else None
        if dot is None or not dot.requires_grad:  # the gradient does not depend on w: H = 0
            return self.zeros()
        parts = torch.autograd.grad(dot, self.params, retain_graph=retain_graph, allow_unused=True)
        return [
            torch.zeros_like(p, dtype=dtype) if part is None else part.to(dtype)
            for p, part, dtype in zip(self.params, parts, self.vector_dtypes, strict=True)
        ]

    def hvp(self, vector: list[torch.Tensor]) -> list[torch.Tensor]:
        """:math:`H v` (the mean over all batches). With one local batch its gradient graph is built once and kept."""
        if len(self.batches) == 1:
            if self._cached_grad is None:
                self._cached_grad = self.grad_with_graph(self.batches[0])
            return self.all_reduce_mean_(self.hvp_from(self._cached_grad, vector, retain_graph=True))
        total = self.zeros()
        for batch in self.batches:
            torch._foreach_add_(total, self.hvp_from(self.grad_with_graph(batch), vector, retain_graph=False))
        return self.all_reduce_mean_(total)

    # ---------------------------------------------------------------- vectors

    def zeros(self) -> list[torch.Tensor]:
        return [torch.zeros_like(p, dtype=dtype) for p, dtype in zip(self.params, self.vector_dtypes, strict=True)]

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def randn(self, generator: torch.Generator | int) -> list[torch.Tensor]:
        """Standard normal entries (a fresh generator seeded with `generator` if it is an int)."""
        if isinstance(generator, int):
            generator = self.generator(generator)
        return [
            torch.randn(p.shape, generator=generator, dtype=dtype, device=self.device).to(p.device)
            for p, dtype in zip(self.params, self.vector_dtypes, strict=True)
        ]

    def rademacher(self, generator: torch.Generator) -> list[torch.Tensor]:
        return [
            (torch.randint(0, 2, p.shape, generator=generator, dtype=dtype, device=self.device) * 2 - 1).to(p.device)
            for p, dtype in zip(self.params, self.vector_dtypes, strict=True)
        ]

    def as_vector(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Check that `tensors` has one tensor shaped like each trainable parameter, in the vector dtypes."""
        tensors = list(tensors)
        shapes = [tuple(p.shape) for p in self.params]
        if [tuple(t.shape) for t in tensors] != shapes:
            raise ValueError("`eigenvector` must hold one tensor shaped like each trainable parameter, in order.")
        return [
            t.to(device=p.device, dtype=d) for t, p, d in zip(tensors, self.params, self.vector_dtypes, strict=True)
        ]

    # ---------------------------------------------------------------- reductions across batches and processes

    def _collective_device(self) -> torch.device:
        if self.distributed and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return self.device

    def all_reduce_mean_scalars(self, total: torch.Tensor) -> torch.Tensor:
        """Sum of per-batch values (any shape) over processes, divided by the total number of batches."""
        if self.distributed:
            total = total.to(self._collective_device())
            dist.all_reduce(total)
        return total / self.num_batches

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """In place: sum of per-batch vectors over processes, divided by the total number of batches."""
        if self.distributed:
            all_reduce_sum_(tensors)
        torch._foreach_div_(tensors, float(self.num_batches))
        return tensors


@contextlib.contextmanager
def _preserved_model_state(model: nn.Module, params: list[torch.Tensor], eval_mode: bool) -> Iterator[list]:
    """Save what a diagnostic could touch and put it back bitwise on exit; fork the global RNGs meanwhile."""
    modes = [(module, module.training) for module in model.modules()]
    all_params = list(model.parameters())
    flags = [p.requires_grad for p in all_params]
    grads = [p.grad for p in all_params]
    saved_params = [p.detach().clone() for p in params]
    buffers = [b for b in model.buffers()]
    saved_buffers = [b.detach().clone() for b in buffers]
    cuda_devices = sorted({p.device.index for p in all_params if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.enable_grad():
            if eval_mode:
                model.eval()
            yield saved_params
    finally:
        with torch.no_grad():
            for p, saved in zip(params, saved_params, strict=True):
                p.copy_(saved)
            for b, saved in zip(buffers, saved_buffers, strict=True):
                b.copy_(saved)
        for module, training in modes:
            module.training = training
        for p, flag, grad in zip(all_params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _dot(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """:math:`x^\\top y` over all tensors, a 0-d tensor in the widest of their dtypes (float32 at least)."""
    terms = [(x * y.to(x.dtype)).sum() for x, y in zip(xs, ys, strict=True)]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in terms) else torch.float32
    device = terms[0].device
    return torch.stack([t.to(device=device, dtype=dtype) for t in terms]).sum()


def _norm(xs: list[torch.Tensor]) -> float:
    return math.sqrt(max(_dot(xs, xs).item(), 0.0))


def _scale_(xs: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    torch._foreach_mul_(xs, scale)
    return xs


def _mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _check_power_iteration(max_iterations: int, tol: float) -> None:
    if max_iterations < 1:
        raise ValueError(f"`max_iterations` must be >= 1, got {max_iterations}.")
    if not tol >= 0:
        raise ValueError(f"`tol` must be >= 0, got {tol}.")


def _check_rho(rho: float) -> None:
    if not rho > 0:
        raise ValueError(f"`rho` must be > 0, got {rho}.")


def _warn(message: str) -> None:
    """Log a warning through accelerate's logger once its state exists (it refuses before), else the stdlib one."""
    if PartialState._shared_state:
        logger.warning(message)
    else:
        logging.getLogger(__name__).warning(message)
