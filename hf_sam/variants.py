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
The sharpness-aware methods, one class each, and their registry: everything a method is, in pure PyTorch.

A method class declares what is specific to it: its `name` (`SAMConfig.method`), `display_name` and `paper` (the model
card), the `SAMConfig` fields it owns with their validation (`config_fields`, and `check_config` for rules across
fields; `upgrade_config` reads an old spelling with a `FutureWarning`), the state a checkpoint must carry
(`state_key`; `None`: stateless), what it cannot do (`unsupported`: `"fsdp"`, `"local_sync"`, `"accumulation"`, each
with the reason, refused before training) and its hooks. A step of `SAMTrainer` calls, on the method object:

- `is_sam_step(global_step)`: a two-pass (perturbed) step, or a plain one-pass step (`SAMConfig.interval`; LookSAM:
  `looksam_k`);
- `perturbs(unscaled_grad_norm, global_step, max_steps)` after pass 1 (global mode): whether this step perturbs after
  all (AE-SAM decides from :math:`\|g\|^2`; a host read, so the other methods do not override it);
- `step_rho(global_step, learning_rate, peak_learning_rate)`: the radius :math:`\rho_t` of this step;
- `direction(grads, grad_norm, finite=...)` after pass 1: the direction :math:`d` that becomes the perturbation
  :math:`e` (SAM: :math:`d = g`; F-SAM: :math:`d = g - \sigma m_{t-1}`); a stateful method updates its state here;
- `after_second_pass(sam_grads, finite=..., inverse_loss_scale=...)` at the end of a perturbed step, when
  `needs_sam_grads`: `sam_grads` is the applied gradient :math:`\nabla L(w + e)` (loss-scaled under fp16), which the
  method may read (LookSAM stores :math:`g_v`) or rewrite in place;
- `plain_step(grads, grad_norm, finite=..., inverse_loss_scale=...)` at the end of a plain step (F-SAM's EMA sees
  the step; LookSAM adds its reused component to `grads` in place);
- `state_dict()` / `load_state_dict()`: what a checkpoint carries (`sam_state.pt`), under `state_key`.

Every hook takes `finite`, a 0-d boolean tensor saying whether the step's gradient is finite: a non-finite step leaves
the method's state exactly as it was, decided on the device (no host synchronization). Gradients passed to
`direction` are already unscaled (fp16 loss scale) and zeroed where not finite.

A new method is one subclass registered with `register_method` (from inside or outside the package): `SAMConfig`
validation, the model card, the checkpoint checks and the set-up checks all read `METHODS`, and nothing else lists
methods. The fields it owns must be `SAMConfig` dataclass fields (so the command line has them).
"""

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .perturbation import NORM_EPS, foreach_mul_by_scalar_tensor_, global_dot, global_norm, zero_unless_


# What a method may be unable to do, as keys of `SAMVariant.unsupported`.
FEATURES = ("fsdp", "local_sync", "accumulation")


@dataclass(frozen=True)
class NumberField:
    """The rule of a numeric `SAMConfig` field: a finite number >= `low` (`None`: any), below `high` (or up to it)."""

    low: float | None = 0.0
    high: float | None = None
    closed: bool = False
    integer: bool = False

    @property
    def rule(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low is None:
            return kind
        if self.high is None:
            return f"{kind} >= {self.low:g}"
        return f"{kind} in [{self.low:g}, {self.high:g}{']' if self.closed else ')'}"

    def check(self, name: str, value: Any) -> None:
        """Raise a `ValueError` naming the field, the value and the rule when `value` breaks it."""
        number = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        ok = number and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (self.low is None or value >= self.low)
        if ok and self.high is not None:
            ok = value <= self.high if self.closed else value < self.high
        if not ok:
            raise ValueError(f"`{name}` must be {self.rule}, got {value!r}.")


class SAMVariant:
    r"""
    SAM (Foret et al. 2021, https://huggingface.co/papers/2010.01412), with ASAM's and USAM's scalings: the direction
    is the gradient itself, :math:`d = g`, and no state is kept. The base class of the methods.
    """

    name: ClassVar[str] = "sam"
    display_name: ClassVar[str] = "SAM"
    # (citation, link) of the method's paper, for the model card.
    paper: ClassVar[tuple[str, str]] = ("Foret et al., 2021", "https://huggingface.co/papers/2010.01412")
    # The `SAMConfig` fields this method owns, with their rules (checked whatever the method, like every field).
    config_fields: ClassVar[dict[str, NumberField]] = {}
    # Key of the method's state in `sam_state.pt` (`None`: nothing to save) and what it is, for messages.
    state_key: ClassVar[str | None] = None
    state_description: ClassVar[str] = ""
    # `FEATURES` this method cannot do, each with the reason (refused when the config is built or training starts).
    unsupported: ClassVar[dict[str, str]] = {}
    # FSDP2/HSDP: the process group over which the gradients' shards make up whole tensors (set by the trainer at
    # the first step); norms and dot products of per-parameter tensors are summed over it. `None`: not sharded.
    process_group = None

    def __init__(self, config) -> None:
        self.config = config

    @classmethod
    def check_config(cls, config) -> None:
        """Raise a `ValueError` naming the field when `config` (a `SAMConfig` of this method) cannot run."""
        if config.perturbation_sync == "local" and "local_sync" in cls.unsupported:
            raise ValueError(
                f"`perturbation_sync` must be 'global' with `method={cls.name!r}`: {cls.unsupported['local_sync']}, "
                f"got {config.perturbation_sync!r}."
            )

    @classmethod
    def upgrade_config(cls, config) -> None:
        """Rewrite a config in an old spelling of this method's fields, in place, with a `FutureWarning` (at build)."""

    def is_sam_step(self, global_step: int) -> bool:
        """Whether optimizer step `global_step` is perturbed (two passes): every `interval`-th step."""
        return global_step % self.config.interval == 0

    def perturbs(self, unscaled_grad_norm: Callable[[], torch.Tensor], global_step: int, max_steps: int) -> bool:
        r"""
        After pass 1 of a step `is_sam_step` chose (global mode), whether to perturb it after all; `False` applies
        pass 1's gradient (one pass). `unscaled_grad_norm()` computes :math:`\|g\|`. Deciding is a host read (the
        answer is control flow), so only a method that needs it overrides this (AE-SAM); SAM always perturbs.
        """
        return True

    def step_rho(self, global_step: int, learning_rate: float, peak_learning_rate: float) -> float:
        """The radius of step `global_step`, run at `learning_rate` (the schedule's peak: `peak_learning_rate`)."""
        return self.config.rho

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

    def after_second_pass(
        self, sam_grads: list[torch.Tensor], *, finite: torch.Tensor, inverse_loss_scale: torch.Tensor | None
    ) -> None:
        r"""
        End of a perturbed step; `sam_grads` is the applied gradient :math:`\nabla L(w + e)` (times the fp16 loss
        scale, `1 / inverse_loss_scale`), which a method may rewrite in place (GSAM).
        """

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

    def state_dict(self) -> dict[str, list[torch.Tensor] | torch.Tensor | None]:
        """
        The state, `{state_key: per-parameter tensors, one tensor of the method's own statistics, or None}` (empty for
        a stateless method).
        """
        return {}

    def load_state_dict(self, state: dict[str, list[torch.Tensor] | None]) -> None:
        """Restore `state_dict()`'s output."""


class _GradientAverage(SAMVariant):
    r"""
    A method that keeps an exponential average :math:`m` of the raw (unscaled) step gradients :math:`g_t`,

    .. math::
        m_1 = g_1, \qquad m_t = m_{t-1} + w\, (g_t - m_{t-1}),

    updated once per optimizer step (perturbed or plain: plain steps of an `interval` schedule update it too) with
    the step's mean raw gradient. A step with a non-finite gradient leaves :math:`m` untouched. Subclasses give the
    weight :math:`w` (`_later_weight`) and the direction.

    Implementation: :math:`m` starts as zeros with a device flag `initialized`, so the first update uses :math:`w = 1`
    (:math:`m_1 = g_1`), times the finiteness flag: no branch reads a tensor on the host.
    """

    state_key = "ema"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.ema: list[torch.Tensor] | None = None
        self._initialized: torch.Tensor | None = None  # 0-d bool: whether m holds m_1 = g_1 or later
        self._step_sum: list[torch.Tensor] | None = None
        self._step_finite: torch.Tensor | None = None

    def _later_weight(self) -> float:
        raise NotImplementedError

    def _weight(self) -> torch.Tensor:
        """:math:`w` of the next update: 1 for :math:`m_1 = g_1`, `_later_weight()` after (a 0-d device tensor)."""
        return torch.where(self._initialized, self._later_weight(), 1.0)

    @property
    def needs_plain_step(self) -> bool:
        return True

    @torch.no_grad()
    def plain_step(self, grads, grad_norm, *, finite, inverse_loss_scale):
        self._allocate(grads)
        # A copy: `grads` are the `.grad` the optimizer (or the GradScaler's skip) still needs; zeroed when not
        # finite, since m + 0 * (g - m) is NaN where g is inf.
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
        # m <- m + w (g - m), w = 0 when the step is not finite (the sum is zeroed then). Not `torch._foreach_lerp_`:
        # it takes its weight as a Scalar, which reads a 0-d tensor on the host (one device sync per step, found by the
        # GPU check). The step's sum is ours (a new list, or the pass-1 gradient the trainer lets go after
        # `direction`), so it holds g - m in place: no memory beyond the average.
        torch._foreach_sub_(self._step_sum, self.ema)
        foreach_mul_by_scalar_tensor_(self._step_sum, self._weight() * self._step_finite)
        torch._foreach_add_(self.ema, self._step_sum)
        self._initialized = self._initialized | self._step_finite
        self._step_sum, self._step_finite = None, None

    def state_dict(self):
        if self.ema is None or not bool(self._initialized):  # a host read, at checkpoint time only
            return {self.state_key: None}
        return {self.state_key: [m.detach().clone() for m in self.ema]}

    def load_state_dict(self, state):
        ema = state.get(self.state_key)
        self.ema = None if ema is None else list(ema)
        self._initialized = None if ema is None else torch.ones((), dtype=torch.bool, device=ema[0].device)
        self._step_sum, self._step_finite = None, None


class FriendlySAM(_GradientAverage):
    r"""
    Friendly-SAM (Li et al., CVPR 2024, https://huggingface.co/papers/2403.12350), the official code's rule. At
    optimizer step :math:`t` with gradient :math:`g_t`:

    .. math::
        d_t = g_t - \sigma\, m_{t-1}, \qquad m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_t, \qquad m_0 = g_1,

    so the first step is plain SAM. The EMA averages the **raw** gradient :math:`g_t`, not :math:`d_t`
    (pytorch_optimizer's `FriendlySAM` averages :math:`d_t`). Plain steps of an `interval` schedule update the EMA too.
    With per-micro-batch perturbations each micro-batch uses its own :math:`g_{t,i} - \sigma m_{t-1}` and the EMA takes
    the step's mean raw gradient. A step with a non-finite gradient leaves :math:`m` untouched.
    """

    name = "fsam"
    display_name = "F-SAM"
    paper = ("Li et al., 2024", "https://huggingface.co/papers/2403.12350")
    config_fields = {"fsam_sigma": NumberField(), "fsam_lambda": NumberField(0.0, 1.0)}
    state_key = "ema"
    state_description = "F-SAM gradient EMA"

    def _later_weight(self) -> float:
        return 1.0 - self.config.fsam_lambda

    @torch.no_grad()
    def direction(self, grads, grad_norm, *, finite, weight=1.0, last_micro_batch=True):
        self._allocate(grads)
        direction = torch._foreach_add(grads, self.ema, alpha=-self.config.fsam_sigma)  # = g while m is empty
        self._accumulate(grads, weight, finite)
        if last_micro_batch:
            self._end_step()
        return direction, None


class VaSSO(_GradientAverage):
    r"""
    VaSSO, variance-suppressed sharpness-aware optimization (Li & Giannakis, NeurIPS 2023,
    https://huggingface.co/papers/2309.15639), Algorithm 1. At optimizer step :math:`t` with gradient :math:`g_t`:

    .. math::
        d_t = (1 - \theta)\, d_{t-1} + \theta\, g_t, \qquad d_1 = g_1, \qquad e_t = \rho\, d_t / \|d_t\|,

    so :math:`\theta = 1` is SAM. :math:`d` averages the raw (unscaled) gradients, and the steps of an `interval`
    schedule that are not perturbed update it too (as F-SAM's EMA). With per-micro-batch perturbations each micro-batch
    perturbs along its own :math:`(1 - \theta) d_{t-1} + \theta g_{t,i}` and :math:`d_t` takes the step's mean raw
    gradient. A step with a non-finite gradient leaves :math:`d` untouched. ASAM's and USAM's scalings apply to
    :math:`d_t` as to SAM's :math:`g`.
    """

    name = "vasso"
    display_name = "VaSSO"
    paper = ("Li & Giannakis, 2023", "https://huggingface.co/papers/2309.15639")
    config_fields = {"vasso_theta": NumberField(0.0, 1.0, closed=True)}
    state_key = "average"
    state_description = "VaSSO averaged direction d"

    def _later_weight(self) -> float:
        return self.config.vasso_theta

    @torch.no_grad()
    def direction(self, grads, grad_norm, *, finite, weight=1.0, last_micro_batch=True):
        self._allocate(grads)
        # d = d_{t-1} + w (g - d_{t-1}): the new average with this (micro-)batch's gradient (g at the first step).
        direction = torch._foreach_sub(grads, self.ema)
        foreach_mul_by_scalar_tensor_(direction, self._weight())
        torch._foreach_add_(direction, self.ema)
        self._accumulate(grads, weight, finite)
        if last_micro_batch:
            self._end_step()
        return direction, None


class _DecomposesAgainstFirstPass(SAMVariant):
    """
    A method that, after pass 2, splits one of the step's two gradients against the other (GSAM, LookSAM): pass 1's
    gradient :math:`g` is copied before it becomes :math:`e`, and kept with the step's finiteness until the end of
    pass 2 (one gradient's memory). Called once per optimizer step: both methods refuse `perturbation_sync="local"`.
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        self._first_pass: list[torch.Tensor] | None = None
        self._step_finite: torch.Tensor | None = None

    @torch.no_grad()
    def direction(self, grads, grad_norm, *, finite, weight=1.0, last_micro_batch=True):
        self._first_pass = [torch.empty_like(g) for g in grads]
        torch._foreach_copy_(self._first_pass, grads)  # copied: `grads` become e in place
        self._step_finite = finite
        return grads, grad_norm

    @property
    def needs_sam_grads(self) -> bool:
        return True

    def _take_first_pass(self, finite: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Pass 1's gradient (let go here) and whether both passes of the step were finite."""
        first_pass, step_finite = self._first_pass, self._step_finite & finite
        self._first_pass, self._step_finite = None, None
        return first_pass, step_finite


class GSAM(_DecomposesAgainstFirstPass):
    r"""
    GSAM, surrogate gap guided SAM (Zhuang et al., ICLR 2022, https://huggingface.co/papers/2203.08065), Algorithm 1
    with the authors' radius schedule. Step :math:`t` runs at learning rate :math:`\eta_t` (the peak :math:`\eta`
    is `args.learning_rate`) with the radius

    .. math::
        \rho_t = \rho_{\min} + (\rho - \rho_{\min})\, \eta_t / \eta,

    perturbs as SAM along the pass-1 gradient :math:`g` (ASAM's and USAM's scalings apply; `adaptive=True` with
    `adaptive_eta=0` is the authors' adaptive GSAM), and applies, with :math:`g_p = \nabla L(w + e)`,

    .. math::
        g_p - \alpha\, g_\perp, \qquad g_\perp = g - \frac{g^\top g_p}{\|g_p\|^2}\, g_p,

    the part of :math:`g` orthogonal to :math:`g_p` (`gsam_alpha`). Both use the raw gradients, whatever the
    scalings. :math:`g_\perp` is homogeneous of degree 1 in :math:`g` (unscaled) and 0 in :math:`g_p`, so under fp16
    it is multiplied by the loss scale before it is subtracted from the loss-scaled :math:`g_p`. A step whose pass-1
    gradient is not finite applies :math:`g_p` unchanged. Stateless across steps: the copy of :math:`g` lives from
    pass 1 to the end of pass 2 (one gradient's memory, like LookSAM).
    """

    name = "gsam"
    display_name = "GSAM"
    paper = ("Zhuang et al., 2022", "https://huggingface.co/papers/2203.08065")
    config_fields = {"gsam_alpha": NumberField(), "rho_min": NumberField()}
    unsupported = {
        "local_sync": "its decomposition needs the pass-1 gradient of the same (all-reduced) batch as pass 2's",
    }

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if config.rho_min > config.rho:
            raise ValueError(f"`rho_min` must be <= `rho` ({config.rho}) with `method='gsam'`, got {config.rho_min}.")

    def step_rho(self, global_step, learning_rate, peak_learning_rate):
        config = self.config
        if peak_learning_rate <= 0:
            return config.rho
        return config.rho_min + (config.rho - config.rho_min) * learning_rate / peak_learning_rate

    @torch.no_grad()
    def after_second_pass(self, sam_grads, *, finite, inverse_loss_scale):
        g, step_finite = self._take_first_pass(finite)
        dot = global_dot(g, sam_grads, self.process_group)
        coefficient = dot / global_norm(sam_grads, self.process_group).clamp_min(NORM_EPS) ** 2
        torch._foreach_sub_(g, _mul_by_tensor(sam_grads, coefficient))  # g_perp, in the unscaled g's place
        loss_scale = inverse_loss_scale.reciprocal() if inverse_loss_scale is not None else torch.ones(())
        factor = -self.config.gsam_alpha * loss_scale.to(coefficient.device) * step_finite.to(coefficient.device)
        foreach_mul_by_scalar_tensor_(g, factor)
        torch._foreach_add_(sam_grads, g)


class AESAM(SAMVariant):
    r"""
    AE-SAM, an adaptive policy to employ SAM (Jiang et al., ICLR 2023, https://huggingface.co/papers/2304.14647),
    Algorithm 1: SAM only where the loss is sharp, measured by the squared norm :math:`x_t = \|g_t\|^2` of the
    pass-1 gradient relative to its running mean and variance,

    .. math::
        \mu_t = \delta \mu_{t-1} + (1 - \delta) x_t, \qquad
        \sigma_t^2 = \delta \sigma_{t-1}^2 + (1 - \delta) (x_t - \mu_t)^2, \qquad
        c_t = \lambda_1 + (\lambda_2 - \lambda_1)\, t / T,

    and step :math:`t` (of :math:`T`, `max_steps`) is a SAM step when :math:`x_t \ge \mu_t + c_t \sigma_t`, else a
    plain step that applies :math:`g_t` (`aesam_delta`, `aesam_lambda1`, `aesam_lambda2`; :math:`\delta = 0.9`,
    :math:`\lambda_1 = -1`, :math:`\lambda_2 = 1` by default, so that for roughly normal :math:`x_t` about half of
    the steps are SAM steps, more early and fewer late). The statistics start at :math:`\mu_1 = x_1`,
    :math:`\sigma_1 = 0` (the first step is a SAM step); a step whose gradient is not finite leaves them alone and is
    not perturbed. The perturbation is SAM's (ASAM's and USAM's scalings apply).

    Cost: pass 1 of every step is kept until the decision (as for any SAM step), a SAM step costs two passes and a
    plain step one; the decision reads one boolean on the host per step (it is control flow: whether pass 2 runs),
    the only host read a method adds. The statistics (`mu`, `var`, two numbers) are checkpointed.
    """

    name = "aesam"
    display_name = "AE-SAM"
    paper = ("Jiang et al., 2023", "https://huggingface.co/papers/2304.14647")
    config_fields = {
        "aesam_delta": NumberField(0.0, 1.0),
        "aesam_lambda1": NumberField(None),
        "aesam_lambda2": NumberField(None),
    }
    state_key = "statistics"
    state_description = "AE-SAM running mean and variance of the squared gradient norm"
    unsupported = {
        "local_sync": "its decision takes the whole step's gradient, which local mode never forms before pass 2",
    }

    def __init__(self, config) -> None:
        super().__init__(config)
        self.mean: torch.Tensor | None = None  # 0-d float32, NaN until the first finite step
        self.var: torch.Tensor | None = None

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if config.interval != 1:
            raise ValueError(
                f"`interval` must be 1 with `method='aesam'`: its policy decides which steps perturb, got "
                f"{config.interval!r}."
            )

    @torch.no_grad()
    def perturbs(self, unscaled_grad_norm, global_step, max_steps):
        x = unscaled_grad_norm().square()
        if self.mean is None:
            self.mean = torch.full((), float("nan"), device=x.device)
            self.var = torch.zeros((), device=x.device)
        finite, first = torch.isfinite(x), torch.isnan(self.mean)
        delta = self.config.aesam_delta
        mean = torch.where(first, x, delta * self.mean + (1 - delta) * x)
        var = torch.where(first, 0.0, delta * self.var + (1 - delta) * (x - mean).square())
        self.mean, self.var = torch.where(finite, mean, self.mean), torch.where(finite, var, self.var)
        progress = global_step / max_steps if max_steps > 0 else 0.0
        c = self.config.aesam_lambda1 + (self.config.aesam_lambda2 - self.config.aesam_lambda1) * progress
        # A non-finite gradient takes the two-pass path with e = 0, as with every method: pass 2 recomputes the
        # gradient at w, instead of the one-pass path applying the non-finite pass-1 gradient.
        return bool(~finite | (x >= self.mean + c * self.var.sqrt()))  # the one host read of the policy

    def state_dict(self):
        """`{"statistics": tensor([mu, var])}`: one tensor, not per parameter."""
        if self.mean is None:
            return {"statistics": None}
        return {"statistics": torch.stack([self.mean, self.var]).detach().clone()}

    def load_state_dict(self, state):
        statistics = state.get("statistics")
        self.mean, self.var = (None, None) if statistics is None else (statistics[0].clone(), statistics[1].clone())


class LookSAM(_DecomposesAgainstFirstPass):
    r"""
    LookSAM (Liu et al., CVPR 2022, https://huggingface.co/papers/2203.02714), Algorithm 1 with global vectors.

    Every :math:`k`-th optimizer step (`looksam_k`) is a SAM step. From its gradients :math:`g = \nabla L(w)` (pass 1)
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

    name = "looksam"
    display_name = "LookSAM"
    paper = ("Liu et al., 2022", "https://huggingface.co/papers/2203.02714")
    config_fields = {"looksam_alpha": NumberField(), "looksam_k": NumberField(1, integer=True)}
    state_key = "orthogonal"
    state_description = "LookSAM orthogonal gradient component"
    unsupported = {
        "local_sync": "its gradient decomposition needs the all-reduced gradient",
    }

    @classmethod
    def upgrade_config(cls, config) -> None:
        """`interval=k` was LookSAM's k before `looksam_k` (hf_sam 0.1.0.dev0): read as `looksam_k=k`, with a warning."""
        if config.interval == 1 or isinstance(config.interval, bool) or not isinstance(config.interval, int):
            return
        if config.looksam_k not in (1, config.interval):
            raise ValueError(
                f"`interval` ({config.interval}) and `looksam_k` ({config.looksam_k}) both set with `method='looksam'`:"
                " set `looksam_k` alone (LookSAM's k; `interval` is the plain-step schedule of the other methods)."
            )
        warnings.warn(
            f"`interval={config.interval}` with `method='looksam'` is deprecated: LookSAM's k is `looksam_k`. Read as "
            f"`looksam_k={config.interval}`, `interval=1`.",
            FutureWarning,
            stacklevel=4,
        )
        config.looksam_k, config.interval = config.interval, 1

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if config.interval != 1:
            raise ValueError(
                f"`interval` must be 1 with `method='looksam'`: LookSAM's k is `looksam_k`, got {config.interval!r}."
            )

    def is_sam_step(self, global_step: int) -> bool:
        """A SAM step every `looksam_k`-th optimizer step; the steps in between reuse :math:`g_v`."""
        return global_step % self.config.looksam_k == 0

    def __init__(self, config) -> None:
        super().__init__(config)
        self.orthogonal: list[torch.Tensor] | None = None
        self._orthogonal_norm: torch.Tensor | None = None

    @torch.no_grad()
    def after_second_pass(self, sam_grads, *, finite, inverse_loss_scale):
        g, step_finite = self._take_first_pass(finite)
        dot = global_dot(g, sam_grads, self.process_group)
        coefficient = dot / global_norm(g, self.process_group).clamp_min(NORM_EPS) ** 2
        torch._foreach_mul_(g, coefficient.to(g[0].dtype))  # the projection of g_s on g
        new = torch._foreach_sub(sam_grads, g)
        new_norm = global_norm(new, self.process_group)
        keep = step_finite & torch.isfinite(new_norm)
        if self.orthogonal is None:
            self.orthogonal = [torch.zeros_like(v) for v in new]
        if self._orthogonal_norm is None:  # new (0), or loaded from a checkpoint: over every process's shards
            self._orthogonal_norm = global_norm(self.orthogonal, self.process_group)
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
        if self._orthogonal_norm is None:  # loaded from a checkpoint: the norm spans every process's shards
            self._orthogonal_norm = global_norm(self.orthogonal, self.process_group)
        # g_v = 0 (no finite SAM step yet) adds exactly 0: alpha ||g|| / eps * 0.
        scale = self.config.looksam_alpha * grad_norm / self._orthogonal_norm.clamp_min(NORM_EPS)
        torch._foreach_add_(grads, _mul_by_tensor(self.orthogonal, scale))

    def state_dict(self):
        return {"orthogonal": None if self.orthogonal is None else [v.detach().clone() for v in self.orthogonal]}

    def load_state_dict(self, state):
        orthogonal = state.get("orthogonal")
        self.orthogonal = None if orthogonal is None else list(orthogonal)
        self._orthogonal_norm = None  # computed at the next plain step, over the shards' process group
        self._first_pass, self._step_finite = None, None


# The registry: `SAMConfig.method` -> method class. Filled by `register_method`, read by everything else.
METHODS: dict[str, type[SAMVariant]] = {}


class MethodNames(Sequence):
    """The registered method names, read live (the `choices` of `SAMConfig.method` on the command line)."""

    def __getitem__(self, index):
        return list(METHODS)[index]

    def __len__(self) -> int:
        return len(METHODS)

    def __repr__(self) -> str:
        return repr(list(METHODS))


def register_method(cls: type[SAMVariant]) -> type[SAMVariant]:
    """
    Add the method class `cls` to `METHODS` under `cls.name` (usable as a class decorator). Its `config_fields` must
    be `SAMConfig` fields owned by no other method (but the methods it subclasses), and its `unsupported` keys among
    `FEATURES`.
    """
    from dataclasses import fields

    from .sam_config import GENERIC_FIELDS, SAMConfig

    if not (isinstance(cls, type) and issubclass(cls, SAMVariant)):
        raise TypeError(f"A method must be a subclass of `SAMVariant`, got {cls!r}.")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"A method named {cls.name!r} is already registered ({METHODS[cls.name].__name__}).")
    known = {f.name for f in fields(SAMConfig)} - set(GENERIC_FIELDS)
    others = [other for other in METHODS.values() if not issubclass(cls, other)]  # a subclass shares its base's
    owned = {name: other.name for other in others for name in other.config_fields}
    for name in cls.config_fields:
        if name not in known or name in owned:
            why = f"owned by {owned[name]!r}" if name in owned else "not a method-specific `SAMConfig` field"
            raise ValueError(f"{cls.__name__} cannot own the field `{name}`: it is {why}.")
    bad = sorted(set(cls.unsupported) - set(FEATURES))
    if bad:
        raise ValueError(f"{cls.__name__}.unsupported has unknown features {bad}; known: {list(FEATURES)}.")
    METHODS[cls.name] = cls
    return cls


# The built-in methods (their fields are checked against `SAMConfig` by tests/test_sam_config.py: `register_method`
# cannot import `sam_config` while it is being imported).
METHODS.update({cls.name: cls for cls in (SAMVariant, FriendlySAM, VaSSO, GSAM, AESAM, LookSAM)})


def method_class(name: str) -> type[SAMVariant]:
    """The registered class of `SAMConfig.method` `name` (a `ValueError` listing the registered ones otherwise)."""
    if name not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}, got {name!r}.")
    return METHODS[name]


def variant_for(config) -> SAMVariant:
    """A fresh method object for `config` (a `SAMConfig`), as at the start of training."""
    return method_class(config.method)(config)


def _mul_by_tensor(tensors: list[torch.Tensor], scale: torch.Tensor) -> list[torch.Tensor]:
    """`tensors * scale` (new tensors) for a 0-d float tensor, in each tensor's dtype and device, without a host sync."""
    products = [torch.empty_like(t) for t in tensors]
    torch._foreach_copy_(products, tensors)
    foreach_mul_by_scalar_tensor_(products, scale)
    return products
