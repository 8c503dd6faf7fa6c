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
The sharpness-aware variants as objects: what each one does around the two passes of a step, in pure PyTorch.

A step of `SAMTrainer` calls, on the variant of its `SAMConfig.method`:

- `is_sam_step(global_step)`: a two-pass (perturbed) step, or a plain one-pass step (`SAMConfig.interval`);
- `direction(grads, grad_norm, finite=...)` after pass 1: the direction :math:`d` that becomes the perturbation
  :math:`e` (SAM: :math:`d = g`; F-SAM: :math:`d = g - \sigma m_{t-1}`);
- `after_second_pass(sam_grads, finite=...)` at the end of a perturbed step, when `needs_sam_grads` (LookSAM stores
  :math:`g_v`);
- `plain_step(grads, grad_norm, finite=..., inverse_loss_scale=...)` at the end of a plain step (F-SAM's EMA sees
  the step; LookSAM adds its reused component to `grads` in place);
- `state_dict()` / `load_state_dict()`: what a checkpoint carries (`sam_state.pt`), under `state_key`.

Every hook takes `finite`, a 0-d boolean tensor saying whether the step's gradient is finite: a non-finite step leaves
the variant's state exactly as it was, decided on the device (no host synchronization). Gradients passed to
`direction` are already unscaled (fp16 loss scale) and zeroed where not finite. A new variant is one subclass here,
registered in `VARIANTS`, plus its `SAMConfig` fields.
"""

from typing import ClassVar

import torch

from .perturbation import NORM_EPS, foreach_mul_by_scalar_tensor_, global_norm, zero_unless_


class SAMVariant:
    r"""
    SAM (Foret et al. 2021, https://huggingface.co/papers/2010.01412), with ASAM's and USAM's scalings: the direction
    is the gradient itself, :math:`d = g`, and no state is kept. The base class of the variants.
    """

    # Key of the variant's state in `sam_state.pt` (`None`: nothing to save) and what it is, for messages.
    state_key: ClassVar[str | None] = None
    state_description: ClassVar[str] = ""

    def __init__(self, config) -> None:
        self.config = config

    def is_sam_step(self, global_step: int) -> bool:
        """Whether optimizer step `global_step` is perturbed (two passes): every `interval`-th step."""
        return global_step % self.config.interval == 0

    def direction(
        self,
        grads: list[torch.Tensor],
        grad_norm: torch.Tensor,
        *,
        finite: torch.Tensor,
        weight: float = 1.0,
        last_micro_batch: bool = True,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        r"""
        The direction :math:`d` from the pass-1 gradient :math:`g` (`grads`, unscaled, zero where not `finite`), and
        :math:`\|d\|` when known. The caller turns :math:`d` into :math:`e` in place: here it is `grads` itself.

        `weight` and `last_micro_batch` describe per-micro-batch perturbations (`perturbation_sync="local"` under
        gradient accumulation): `grads` is then one micro-batch's gradient and `weight` its share of the step.
        """
        return grads, grad_norm

    def after_second_pass(self, sam_grads: list[torch.Tensor], *, finite: torch.Tensor) -> None:
        r"""End of a perturbed step; `sam_grads` is the applied gradient :math:`\nabla L(w + e)` (only read)."""

    def plain_step(
        self,
        grads: list[torch.Tensor],
        grad_norm: torch.Tensor,
        *,
        finite: torch.Tensor,
        inverse_loss_scale: torch.Tensor | None,
    ) -> None:
        """End of a plain (one-pass) step; `grads` is the step's gradient as the optimizer will see it."""

    @property
    def needs_plain_step(self) -> bool:
        """Whether `plain_step` does anything (so the trainer can skip collecting the gradients)."""
        return False

    @property
    def needs_sam_grads(self) -> bool:
        """Whether `after_second_pass` does anything (so the trainer can skip collecting the gradients)."""
        return False

    def state_dict(self) -> dict[str, list[torch.Tensor] | None]:
        """The per-parameter state, `{state_key: tensors or None}` (empty for a stateless variant)."""
        return {}

    def load_state_dict(self, state: dict[str, list[torch.Tensor] | None]) -> None:
        """Restore `state_dict()`'s output."""


class FriendlySAM(SAMVariant):
    r"""
    Friendly-SAM (Li et al., CVPR 2024, https://huggingface.co/papers/2403.12350), the official code's rule. At
    optimizer step :math:`t` with gradient :math:`g_t`:

    .. math::
        d_t = g_t - \sigma\, m_{t-1}, \qquad m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_t, \qquad m_0 = g_1,

    so the first step is plain SAM. The EMA averages the **raw** gradient :math:`g_t`, not :math:`d_t`
    (pytorch_optimizer's `FriendlySAM` averages :math:`d_t`). Plain steps of an `interval` schedule update the EMA too.
    With per-micro-batch perturbations each micro-batch uses its own :math:`g_{t,i} - \sigma m_{t-1}` and the EMA takes
    the step's mean raw gradient. A step with a non-finite gradient leaves :math:`m` untouched.

    Implementation: :math:`m` starts as zeros with a device flag `initialized`, so the first update
    :math:`m \leftarrow \mathrm{lerp}(m, g, w)` uses :math:`w = 1` (:math:`m_0 = g_1`) and later ones
    :math:`w = 1 - \lambda`, times the finiteness flag: no branch reads a tensor on the host.
    """

    state_key = "ema"
    state_description = "F-SAM gradient EMA"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.ema: list[torch.Tensor] | None = None
        self._initialized: torch.Tensor | None = None  # 0-d bool: whether m holds m_0 = g_1 or later
        self._step_sum: list[torch.Tensor] | None = None
        self._step_finite: torch.Tensor | None = None

    @torch.no_grad()
    def direction(self, grads, grad_norm, *, finite, weight=1.0, last_micro_batch=True):
        self._allocate(grads)
        direction = torch._foreach_add(grads, self.ema, alpha=-self.config.fsam_sigma)  # = g while m is empty
        self._accumulate(grads, weight, finite)
        if last_micro_batch:
            self._end_step()
        return direction, None

    @property
    def needs_plain_step(self) -> bool:
        return True

    @torch.no_grad()
    def plain_step(self, grads, grad_norm, *, finite, inverse_loss_scale):
        self._allocate(grads)
        # A copy: `grads` are the `.grad` the optimizer (or the GradScaler's skip) still needs; zeroed when not
        # finite, since lerp(m, g, 0) = m + 0 * (g - m) is NaN where g is inf.
        step_grad = _mul_by_tensor(grads, inverse_loss_scale if inverse_loss_scale is not None else finite.float())
        zero_unless_(step_grad, finite)
        self._accumulate(step_grad, 1.0, finite)
        self._end_step()

    def _allocate(self, grads: list[torch.Tensor]) -> None:
        if self.ema is None:
            self.ema = [torch.zeros_like(g) for g in grads]
            self._initialized = torch.zeros((), dtype=torch.bool, device=grads[0].device)

    def _accumulate(self, grads: list[torch.Tensor], weight: float, finite: torch.Tensor) -> None:
        self._step_finite = finite if self._step_finite is None else self._step_finite & finite
        if self._step_sum is None:
            # Taken over when weight is 1: the caller lets `grads` go after `direction` (`_end_step` overwrites them).
            self._step_sum = list(grads) if weight == 1.0 else torch._foreach_mul(grads, weight)
        else:
            torch._foreach_add_(self._step_sum, grads, alpha=weight)

    def _end_step(self) -> None:
        # m <- m + w (g - m), w = 1 for m_0 = g_1, 1 - lambda after, 0 when the step is not finite (the sum is zeroed
        # then). Not `torch._foreach_lerp_`: it takes its weight as a Scalar, which reads a 0-d tensor on the host (one
        # device sync per step, found by the GPU check). The step's sum is ours (a new list, or the pass-1 gradient the
        # trainer lets go after `direction`), so it holds g - m in place: no memory beyond the EMA.
        ema_weight = torch.where(self._initialized, 1.0 - self.config.fsam_lambda, 1.0) * self._step_finite
        torch._foreach_sub_(self._step_sum, self.ema)
        foreach_mul_by_scalar_tensor_(self._step_sum, ema_weight)
        torch._foreach_add_(self.ema, self._step_sum)
        self._initialized = self._initialized | self._step_finite
        self._step_sum, self._step_finite = None, None

    def state_dict(self):
        if self.ema is None or not bool(self._initialized):  # a host read, at checkpoint time only
            return {"ema": None}
        return {"ema": [m.detach().clone() for m in self.ema]}

    def load_state_dict(self, state):
        ema = state.get("ema")
        self.ema = None if ema is None else list(ema)
        self._initialized = None if ema is None else torch.ones((), dtype=torch.bool, device=ema[0].device)
        self._step_sum, self._step_finite = None, None


class LookSAM(SAMVariant):
    r"""
    LookSAM (Liu et al., CVPR 2022, https://huggingface.co/papers/2203.02714), Algorithm 1 with global vectors.

    Every :math:`k`-th optimizer step (`interval`) is a SAM step. From its gradients :math:`g = \nabla L(w)` (pass 1)
    and :math:`g_s = \nabla L(w + e)` (pass 2, the applied one) it keeps the part of :math:`g_s` orthogonal to
    :math:`g`,

    .. math::
        g_v = g_s - \frac{g^\top g_s}{\|g\|^2}\, g,

    and the :math:`k - 1` steps in between take **one** pass at :math:`w` and apply
    :math:`g + \alpha \frac{\|g\|}{\|g_v\|}\, g_v`. Both formulas are homogeneous in the gradients' scale, so
    loss-scaled (fp16) gradients can be used as they are. A SAM step whose gradients are not finite keeps the previous
    :math:`g_v`. (pytorch_optimizer's `LookSAM` still runs two passes on the reuse steps and doubles the gradient;
    here a reuse step is one pass.)
    """

    state_key = "orthogonal"
    state_description = "LookSAM orthogonal gradient component"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.orthogonal: list[torch.Tensor] | None = None
        self._orthogonal_norm: torch.Tensor | None = None
        self._first_pass_sum: list[torch.Tensor] | None = None
        self._step_finite: torch.Tensor | None = None

    @torch.no_grad()
    def direction(self, grads, grad_norm, *, finite, weight=1.0, last_micro_batch=True):
        self._step_finite = finite if self._step_finite is None else self._step_finite & finite
        if self._first_pass_sum is None:
            self._first_pass_sum = [torch.empty_like(g) for g in grads]
            torch._foreach_copy_(self._first_pass_sum, grads)  # copied: `grads` become e in place
        else:
            torch._foreach_add_(self._first_pass_sum, grads)
        return grads, grad_norm

    @property
    def needs_sam_grads(self) -> bool:
        return True

    @torch.no_grad()
    def after_second_pass(self, sam_grads, *, finite):
        g, self._first_pass_sum = self._first_pass_sum, None
        step_finite, self._step_finite = self._step_finite & finite, None
        dot = sum(torch.dot(a.reshape(-1).float(), b.reshape(-1).float()) for a, b in zip(g, sam_grads, strict=True))
        coefficient = dot / global_norm(g).clamp_min(NORM_EPS) ** 2
        torch._foreach_mul_(g, coefficient.to(g[0].dtype))  # the projection of g_s on g
        new = torch._foreach_sub(sam_grads, g)
        new_norm = global_norm(new)
        keep = step_finite & torch.isfinite(new_norm)
        if self.orthogonal is None:
            self.orthogonal = [torch.zeros_like(v) for v in new]
            self._orthogonal_norm = torch.zeros((), dtype=torch.float32, device=new_norm.device)
        for old, value in zip(self.orthogonal, new, strict=True):
            old.copy_(torch.where(keep, value, old))
        self._orthogonal_norm = torch.where(keep, new_norm, self._orthogonal_norm)

    @property
    def needs_plain_step(self) -> bool:
        return self.orthogonal is not None

    @torch.no_grad()
    def plain_step(self, grads, grad_norm, *, finite, inverse_loss_scale):
        if self.orthogonal is None:
            return
        # g_v = 0 (no finite SAM step yet) adds exactly 0: alpha ||g|| / eps * 0.
        scale = self.config.looksam_alpha * grad_norm / self._orthogonal_norm.clamp_min(NORM_EPS)
        torch._foreach_add_(grads, _mul_by_tensor(self.orthogonal, scale))

    def state_dict(self):
        return {"orthogonal": None if self.orthogonal is None else [v.detach().clone() for v in self.orthogonal]}

    def load_state_dict(self, state):
        orthogonal = state.get("orthogonal")
        self.orthogonal = None if orthogonal is None else list(orthogonal)
        self._orthogonal_norm = None if orthogonal is None else global_norm(self.orthogonal)
        self._first_pass_sum, self._step_finite = None, None


# `SAMConfig.method` -> variant class.
VARIANTS: dict[str, type[SAMVariant]] = {"sam": SAMVariant, "fsam": FriendlySAM, "looksam": LookSAM}


def variant_for(config) -> SAMVariant:
    """A fresh variant object for `config` (a `SAMConfig`), as at the start of training."""
    return VARIANTS[config.method](config)


def _mul_by_tensor(tensors: list[torch.Tensor], scale: torch.Tensor) -> list[torch.Tensor]:
    """`tensors * scale` (new tensors) for a 0-d float tensor, in each tensor's dtype and device, without a host sync."""
    products = [torch.empty_like(t) for t in tensors]
    torch._foreach_copy_(products, tensors)
    foreach_mul_by_scalar_tensor_(products, scale)
    return products
