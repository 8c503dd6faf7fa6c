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
The SAM maths, in pure PyTorch: lists of tensors in, lists of tensors out, no `Trainer`.

SAM (Foret et al. 2021) minimises :math:`\max_{\|e\| \le \rho} L(w + e)`. One step:

1. :math:`g = \nabla L(w)` on the minibatch;
2. a direction :math:`d` (:math:`d = g` for SAM; :math:`d = g - \sigma m_{t-1}` for F-SAM, Li et al. 2024);
3. the perturbation

   - SAM:  :math:`e = \rho\, d / \|d\|`
   - ASAM: :math:`e = \rho\, T^2 d / \|T d\|`, :math:`T = |w| + \eta` (Kwon et al. 2021)
   - USAM: :math:`e = \rho\, d` (or :math:`\rho\, T^2 d` with ASAM's scaling; Dai, Ahn & Sra 2023);

4. :math:`\nabla L(w + e)` is the gradient the optimizer applies at :math:`w`, which is restored by copying the saved
   tensors back (bitwise; never by subtracting :math:`e`).

All norms are global over every perturbed tensor and computed in float32. Hot-path work is done with fused
`torch._foreach_*` kernels over all tensors at once.
"""

import torch

from .distributed import group_by_device_and_dtype


# The small constant added to the norm, as in davda54/sam, the official F-SAM code and pytorch_optimizer.
NORM_EPS = 1e-12


def global_norm(tensors: list[torch.Tensor], process_group=None) -> torch.Tensor:
    """
    The L2 norm of all `tensors` seen as one vector, in float32 (inf or NaN if any entry is).

    With a `process_group`, `tensors` are this process's shards of larger tensors (FSDP): the squared norms of the
    shards are summed over the group, so every process gets the norm of the whole vector.
    """
    if not tensors:
        norm = torch.zeros((), dtype=torch.float32)
    else:
        device = tensors[0].device
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    if process_group is None:
        return norm
    squared = norm.square()
    torch.distributed.all_reduce(squared, group=process_group)
    return squared.sqrt()


@torch.no_grad()
def sam_perturbation_(
    direction: list[torch.Tensor],
    params: list[torch.Tensor],
    *,
    rho: float,
    adaptive: bool = False,
    adaptive_eta: float = 0.0,
    normalize: bool = True,
    direction_norm: torch.Tensor | None = None,
    process_group=None,
) -> torch.Tensor:
    r"""
    Turn `direction` (:math:`d`) into the perturbation :math:`e`, **in place**, and return :math:`\|e\|`.

    - `normalize and not adaptive`: :math:`e = \rho\, d / (\|d\| + \epsilon)` (pass `direction_norm` if known);
    - `normalize and adaptive`: :math:`e = \rho\, T^2 d / (\|T d\| + \epsilon)`, :math:`T = |w| + \eta`;
    - `not normalize`: :math:`e = \rho\, d` or :math:`\rho\, T^2 d`.

    `params` are the weights :math:`w` (only read, for ASAM's :math:`T`). :math:`\epsilon` is `NORM_EPS`. With a
    `process_group`, the tensors are this process's shards (FSDP) and norms are taken over the whole vectors.
    """
    if adaptive:
        scaling = torch._foreach_abs(params)
        if adaptive_eta:
            torch._foreach_add_(scaling, adaptive_eta)
        torch._foreach_mul_(direction, scaling)  # T d
        direction_norm = None
    if normalize:
        if direction_norm is None:
            direction_norm = global_norm(direction, process_group)
        scale = rho / (direction_norm + NORM_EPS)
    else:
        scale = torch.tensor(rho, dtype=torch.float32)
    if adaptive:
        torch._foreach_mul_(direction, scaling)  # T^2 d
    _foreach_mul_by_scalar_tensor_(direction, scale)
    if normalize and not adaptive:
        return scale * direction_norm
    return global_norm(direction, process_group)


def _foreach_mul_by_scalar_tensor_(tensors: list[torch.Tensor], scale: torch.Tensor) -> None:
    """`tensors *= scale` for a 0-d float32 tensor, without a host sync and in each tensor's own dtype."""
    for (device, dtype), group in group_by_device_and_dtype(tensors).items():
        torch._foreach_mul_(group, scale.to(device=device, dtype=dtype))


@torch.no_grad()
def perturb_(params: list[torch.Tensor], perturbation: list[torch.Tensor]) -> list[torch.Tensor]:
    """Save a copy of `params`, then add `perturbation` to them in place. Returns the saved copy for `restore_`."""
    saved = [torch.empty_like(p) for p in params]
    torch._foreach_copy_(saved, params)
    torch._foreach_add_(params, perturbation)
    return saved


@torch.no_grad()
def restore_(params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """Copy the saved weights back into `params`: bitwise the weights before `perturb_`, in any dtype."""
    torch._foreach_copy_(params, saved)


class FriendlySAMDirection:
    r"""
    The F-SAM direction and its EMA of raw minibatch gradients (Li et al., CVPR 2024; the official code's rule).

    At optimizer step :math:`t` with minibatch gradient :math:`g_t`:

    .. math::
        d_t = g_t - \sigma\, m_{t-1}, \qquad m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_t, \qquad m_0 = g_1,

    so the first step is plain SAM (:math:`d_1 = g_1`). The EMA averages the **raw** gradient :math:`g_t`, not
    :math:`d_t` (pytorch_optimizer's `FriendlySAM` averages :math:`d_t`, which at :math:`\sigma = 1` removes only about
    half of the full-gradient component).

    Gradient accumulation: every micro-batch of step :math:`t` is perturbed along its own
    :math:`g_{t,i} - \sigma m_{t-1}`; the EMA is updated once per optimizer step with the mean raw gradient of the
    step's micro-batches (pass `accumulate_scale = 1 / num_micro_batches` and `last_micro_batch`). A step during which
    any micro-batch had a non-finite gradient (`skip_ema_update`) leaves the EMA untouched.
    """

    def __init__(self, sigma: float = 1.0, lam: float = 0.9):
        self.sigma = sigma
        self.lam = lam
        self.ema: list[torch.Tensor] | None = None
        self._step_grad_sum: list[torch.Tensor] | None = None
        self._step_skipped = False

    @torch.no_grad()
    def direction(
        self,
        grads: list[torch.Tensor],
        *,
        accumulate_scale: float = 1.0,
        last_micro_batch: bool = True,
    ) -> list[torch.Tensor]:
        r"""
        Return new tensors :math:`d = g - \sigma m_{t-1}` (a copy of :math:`g` on the first step).

        `grads` (:math:`g`, the unscaled minibatch gradient of one micro-batch) are taken over, not copied, when
        `accumulate_scale == 1`: the caller must not modify them afterwards. Their mean over the step's micro-batches
        (`accumulate_scale` times their sum) feeds the EMA when `last_micro_batch`.
        """
        if self.ema is None:
            direction = [torch.empty_like(g) for g in grads]
            torch._foreach_copy_(direction, grads)
        else:
            direction = torch._foreach_add(grads, self.ema, alpha=-self.sigma)
        self._accumulate(grads, accumulate_scale)
        if last_micro_batch:
            self._end_step()
        return direction

    @torch.no_grad()
    def observe_step(self, step_grad: list[torch.Tensor]) -> None:
        r"""
        Update the EMA with the mean raw gradient of an optimizer step taken **without** perturbation (the plain steps
        of `SAMConfig.interval`), so the EMA still sees every step: :math:`m_t = \lambda m_{t-1} + (1-\lambda) g_t`.
        `step_grad` is only read.
        """
        if self.ema is None:
            self.ema = [torch.empty_like(g) for g in step_grad]
            torch._foreach_copy_(self.ema, step_grad)
        else:
            torch._foreach_lerp_(self.ema, step_grad, 1.0 - self.lam)

    def skip_ema_update(self, *, last_micro_batch: bool = True) -> None:
        """Record a micro-batch with non-finite gradients: this optimizer step will not touch the EMA."""
        self._step_skipped = True
        if last_micro_batch:
            self._end_step()

    def _accumulate(self, grads: list[torch.Tensor], scale: float) -> None:
        if self._step_skipped:
            return
        if self._step_grad_sum is None:
            self._step_grad_sum = list(grads) if scale == 1.0 else torch._foreach_mul(grads, scale)
        else:
            torch._foreach_add_(self._step_grad_sum, grads, alpha=scale)

    def _end_step(self) -> None:
        if not self._step_skipped and self._step_grad_sum is not None:
            if self.ema is None:
                self.ema = self._step_grad_sum
            else:  # m + (1 - lam) (g - m) = lam m + (1 - lam) g, in one fused pass
                torch._foreach_lerp_(self.ema, self._step_grad_sum, 1.0 - self.lam)
        self._step_grad_sum = None
        self._step_skipped = False

    def state_dict(self) -> dict:
        """The EMA (or `None` before the first step). Taken between optimizer steps."""
        return {"ema": None if self.ema is None else [m.detach().clone() for m in self.ema]}

    def load_state_dict(self, state: dict) -> None:
        self.ema = None if state["ema"] is None else list(state["ema"])
        self._step_grad_sum = None
        self._step_skipped = False


class LookSAMGradient:
    r"""
    LookSAM (Liu et al., CVPR 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization",
    https://huggingface.co/papers/2203.02714), Algorithm 1, with global vectors.

    Every :math:`k`-th optimizer step is a full SAM step. With its gradients :math:`g = \nabla L(w)` (pass 1) and
    :math:`g_s = \nabla L(w + e)` (pass 2, the applied one), it keeps the part of :math:`g_s` orthogonal to :math:`g`,

    .. math::
        g_v = g_s - \frac{g^\top g_s}{\|g\|^2}\, g,

    and the :math:`k - 1` steps in between take **one** pass at :math:`w` and apply

    .. math::
        g_s \approx g + \alpha \frac{\|g\|}{\|g_v\|}\, g_v.

    Under gradient accumulation :math:`g` and :math:`g_s` are the step's summed micro-batch gradients. Both formulas are
    homogeneous in the gradients' scale, so loss-scaled (fp16) gradients can be used as they are. (pytorch_optimizer's
    `LookSAM` returns before clearing gradients on the reuse steps, so its documented usage still runs two passes and
    doubles the gradient; here a reuse step is one pass.)
    """

    def __init__(self, alpha: float = 0.7):
        self.alpha = alpha
        self.orthogonal: list[torch.Tensor] | None = None
        self._first_pass_sum: list[torch.Tensor] | None = None
        self._step_skipped = False

    @torch.no_grad()
    def accumulate_first_pass(self, grads: list[torch.Tensor]) -> None:
        """Add one micro-batch's pass-1 gradient of a SAM step (copied: the caller may then modify `grads`)."""
        if self._step_skipped:
            return
        if self._first_pass_sum is None:
            self._first_pass_sum = [torch.empty_like(g) for g in grads]
            torch._foreach_copy_(self._first_pass_sum, grads)
        else:
            torch._foreach_add_(self._first_pass_sum, grads)

    def skip_step(self) -> None:
        r"""A micro-batch of this SAM step had non-finite gradients: the step keeps the previous :math:`g_v`."""
        self._first_pass_sum = None
        self._step_skipped = True

    @torch.no_grad()
    def decompose(self, sam_grads: list[torch.Tensor]) -> None:
        r"""End of a SAM step: store :math:`g_v` from the summed pass-1 gradient and `sam_grads` (:math:`g_s`, read)."""
        g, self._first_pass_sum, self._step_skipped = self._first_pass_sum, None, False
        if g is None:
            return
        dot = sum(torch.dot(a.reshape(-1).float(), b.reshape(-1).float()) for a, b in zip(g, sam_grads, strict=True))
        coefficient = dot / global_norm(g).clamp_min(NORM_EPS) ** 2
        torch._foreach_mul_(g, coefficient)  # the projection of g_s on g
        self.orthogonal = torch._foreach_sub(sam_grads, g)

    @torch.no_grad()
    def reuse_(self, grads: list[torch.Tensor], grad_norm: torch.Tensor | None = None) -> None:
        r"""A step between SAM steps: `grads` (:math:`g`) becomes :math:`g + \alpha \|g\| / \|g_v\| g_v` in place."""
        if self.orthogonal is None:
            return
        if grad_norm is None:
            grad_norm = global_norm(grads)
        scale = self.alpha * grad_norm / global_norm(self.orthogonal).clamp_min(NORM_EPS)
        scaled = torch._foreach_mul(self.orthogonal, scale.to(self.orthogonal[0].device))
        torch._foreach_add_(grads, scaled)

    def state_dict(self) -> dict:
        return {"orthogonal": None if self.orthogonal is None else [v.detach().clone() for v in self.orthogonal]}

    def load_state_dict(self, state: dict) -> None:
        self.orthogonal = None if state["orthogonal"] is None else list(state["orthogonal"])
        self._first_pass_sum = None
        self._step_skipped = False
