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
"""`SAMMixin` and `SAMTrainer`: the two-pass SAM step as a `transformers.Trainer.training_step`."""

import copy
import os

import torch
from torch import nn
from transformers import Trainer

from .checkpointing import (
    SafeCheckpointsMixin,
    check_resumed_config,
    load_trainer_sam_state,
    save_trainer_sam_state,
)
from .compat import RenamedWeightsMixin
from .distributed import micro_batch_sync, sharding_group
from .model_card import add_model_card_section, model_card_tags
from .perturbation import global_norm, perturb_, restore_, sam_perturbation_
from .sam_config import SAMConfig
from .sam_metrics import SAMMetrics
from .setup_checks import check_sharded_setup, check_trainer_setup
from .trainer_utils import (
    copies,
    correct_loss_normalization,
    grads_or_zeros,
    inverse_loss_scale,
    local_shards,
    norm_buffers,
    protect_trainer_metrics,
    unscale_and_check_,
    unscaled_norm,
    warn_if_perturbation_rounded_away,
)
from .variants import SAMVariant, variant_for


class SAMMixin(SafeCheckpointsMixin, RenamedWeightsMixin):
    r"""
    Turns any [`~transformers.Trainer`] subclass into a sharpness-aware one: `class MySAMTrainer(SAMMixin, SFTTrainer)`.

    A perturbed optimizer step (with `perturbation_sync="global"`, the default) over the global batch :math:`B` (all
    micro-batches of gradient accumulation, on all processes):

    1. pass 1 of every micro-batch at :math:`w`, as the wrapped trainer does it (FSDP2: reduce-scattered each time):
       :math:`g = \nabla L_B(w)` accumulates (all-reduced) in `.grad`; the micro-batches are kept;
    2. at the last micro-batch: unscale :math:`g` (fp16 loss scale), let the method (a registered class of
       `hf_sam.variants`) turn it into a direction, and that into the perturbation :math:`e` of radius
       :math:`\rho_t` (the method's `step_rho`);
    3. save :math:`w`, move to :math:`w + e`, run pass 2 over the kept micro-batches (`no_sync` but for the last):
       :math:`\nabla L_B(w + e)` is what the optimizer applies (after the method's `after_second_pass`, which may
       rewrite it); then copy :math:`w` back bitwise. BatchNorm-like running statistics keep their pass-1 values.

    So the result depends only on the global batch. `perturbation_sync="local"` perturbs every micro-batch on every
    process with its own gradient instead (m-sharpness). A gradient that is not finite gives :math:`e = 0` and leaves
    the method's state alone, decided on the device: no host read beyond the plain step's (but AE-SAM's decision).
    Steps the method does not perturb take the wrapped trainer's one pass (then the method's `plain_step`).

    The optimizer, LR schedule, clipping (of the applied gradient), mixed precision, evaluation, logging and
    checkpointing are the wrapped trainer's own; `sam/*` values are logged besides `loss` :math:`L(w)`. A loss that
    ignores `num_items_in_batch` (transformers #47688) is corrected at the first step. Overridden besides
    `training_step`: `log`, `save_model`, `create_model_card`, `_inner_training_loop`, `_save/_load_optimizer_and_scheduler` (`sam_state.pt`), and
    `hf_sam.checkpointing.SafeCheckpointsMixin`'s and `hf_sam.compat`'s.

    Papers: SAM https://huggingface.co/papers/2010.01412, ASAM https://huggingface.co/papers/2102.11600,
    USAM https://huggingface.co/papers/2305.15287; each method's own in its class (`hf_sam.variants`).
    """

    def __init__(self, *args, sam_config: SAMConfig | None = None, **kwargs):
        sam_config = SAMConfig() if sam_config is None else sam_config
        if not isinstance(sam_config, SAMConfig):
            raise TypeError(f"`sam_config` must be a `SAMConfig`, got {type(sam_config).__name__}.")
        sam_config.validate()
        super().__init__(*args, **kwargs)
        self.sam_config = sam_config
        check_trainer_setup(self, sam_config)
        self._checked_loss_normalization = False
        self._reset_sam_state()
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(["hf_sam", sam_config.method])

    def _reset_sam_state(self) -> None:
        """A fresh method object, metric sums, kept micro-batches and caches: a new training loop (or model)."""
        self.sam_variant: SAMVariant = variant_for(self.sam_config)
        self.sam_metrics = SAMMetrics()
        self._kept_micro_batches: list[tuple] = []
        self._sam_norm_buffers: list[torch.Tensor] | None = None
        self._sam_shard_group, self._sam_sharding_checked, self._checked_rounding = None, False, False

    def _trainable_params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _sharding_group(self, params: list[torch.Tensor]):
        """FSDP2's process group of the shards (`None` without sharding), checked once."""
        if not self._sam_sharding_checked:
            self._sam_shard_group = self.sam_variant.process_group = sharding_group(params)
            if self._sam_shard_group is not None:
                check_sharded_setup(self.sam_config)
            self._sam_sharding_checked = True
        return self._sam_shard_group

    # ------------------------------------------------------------------ the SAM step

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        if not self._checked_loss_normalization:
            self._checked_loss_normalization = correct_loss_normalization(self, model, inputs, num_items_in_batch)
        if self.sam_config.rho == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        if not self.sam_variant.is_sam_step(self.state.global_step):
            return self._plain_step(model, inputs, num_items_in_batch)
        if self.sam_config.perturbation_sync == "local":
            return self._micro_batch_sam_step(model, inputs, num_items_in_batch)
        return self._batch_sam_step(model, inputs, num_items_in_batch)

    def _batch_sam_step(self, model, inputs, num_items_in_batch) -> torch.Tensor:
        """`perturbation_sync="global"`: one perturbation per optimizer step, from the whole global batch's gradient."""
        # Pass 1 at w, accumulating (and, at the last micro-batch, all-reducing) the step's gradient in `.grad`.
        params, last = self._trainable_params(), self.accelerator.sync_gradients
        group = self._sharding_group(params)
        with micro_batch_sync(self, model, group, last_micro_batch=last, first_pass=True):
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._kept_micro_batches.append((copy.copy(inputs), num_items_in_batch, loss))
        if not last:
            return loss
        micro_batches, self._kept_micro_batches = self._kept_micro_batches, []
        grads, scale = local_shards(grads_or_zeros(params)), inverse_loss_scale(self.accelerator)
        steps = (self.state.global_step, self.state.max_steps)
        if not self.sam_variant.perturbs(lambda: unscaled_norm(grads, scale, group), *steps):
            return loss  # the method chose a plain step: pass 1's gradient, in `.grad`, is applied
        for p in params:
            p.grad = None  # pass-1 gradients are not applied
        self._perturbed_pass(model, params, grads, micro_batches, num_shares=1, last_micro_batch=True)
        return loss

    def _micro_batch_sam_step(self, model, inputs, num_items_in_batch) -> torch.Tensor:
        """
        `perturbation_sync="local"`: every micro-batch on every process is perturbed with its own gradient (pass 1
        under `no_sync`), put on the scale of one batch's mean gradient (times the accumulation steps).
        """
        params = self._trainable_params()
        accumulated = [p.grad for p in params]  # set aside: pass 1 sees this micro-batch alone
        for p in params:
            p.grad = None
        with self.accelerator.no_sync(model):
            loss = super().training_step(model, inputs, num_items_in_batch)
        grads = local_shards(grads_or_zeros(params))
        for p, acc in zip(params, accumulated, strict=True):
            p.grad = acc  # pass 2 accumulates onto the earlier micro-batches' gradients
        del accumulated
        shares = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        last, kept = self.accelerator.sync_gradients, [(inputs, num_items_in_batch, loss)]
        self._perturbed_pass(model, params, grads, kept, num_shares=shares, last_micro_batch=last)
        return loss

    def _perturbed_pass(self, model, params, grads, micro_batches, *, num_shares: int, last_micro_batch: bool) -> None:
        """
        From the pass-1 gradient `grads` (taken over; one of `num_shares` equal parts of a step's gradient, so times
        `num_shares`), the perturbation `e`; then pass 2 at `w + e` over `micro_batches` (`(inputs,
        num_items_in_batch, pass-1 loss)`), accumulating the applied gradient in `.grad`; `w` and the norm statistics
        are restored even when it raises (e.g. the out-of-memory error `auto_find_batch_size` retries after).
        """
        group = self._sharding_group(params)
        shards = local_shards(params)  # the parameters themselves, or this process's FSDP shards of them
        grads, taken = list(grads), grads
        taken.clear()  # the caller's list let go: `e` (made from `grads` in place) is freed before pass 2 ends
        weight = 1.0 / num_shares
        # Unscaled (fp16) and checked; in local mode every process agrees on `finite` (a collective, not a host read).
        agree = self.sam_config.perturbation_sync == "local" and self.accelerator.num_processes > 1
        scale = inverse_loss_scale(self.accelerator)
        grad_norm, finite = unscale_and_check_(grads, scale, float(num_shares), group, agree_across_processes=agree)
        direction, direction_norm = self.sam_variant.direction(
            grads, grad_norm, finite=finite, weight=weight, last_micro_batch=last_micro_batch
        )
        del grads
        lr = self._get_learning_rate() if self.lr_scheduler is not None else self.args.learning_rate
        rho = self.sam_variant.step_rho(self.state.global_step, lr, self.args.learning_rate)
        perturbation_norm = self._perturbation_(direction, shards, direction_norm, group, finite, rho)
        saved_params = perturb_(shards, direction)
        del direction
        perturbed_loss, saved_buffers = 0.0, []
        try:
            if not self._checked_rounding:
                self._checked_rounding = True
                warn_if_perturbation_rounded_away(shards, saved_params, perturbation_norm, rho, group)
            if self._sam_norm_buffers is None:
                self._sam_norm_buffers = norm_buffers(model)
            saved_buffers = copies(self._sam_norm_buffers)
            with protect_trainer_metrics(self):  # TRL's per-step metrics count pass 1 only
                for index, (kept_inputs, kept_num_items, _) in enumerate(micro_batches):
                    last = index == len(micro_batches) - 1
                    with micro_batch_sync(self, model, group, last_micro_batch=last, first_pass=False):
                        perturbed_loss += super().training_step(model, kept_inputs, kept_num_items).float()
        finally:
            restore_(shards, saved_params)
            if saved_buffers:
                restore_(self._sam_norm_buffers, saved_buffers)
        if last_micro_batch and self.sam_variant.needs_sam_grads:
            sam_grads = local_shards(grads_or_zeros(params))
            self.sam_variant.after_second_pass(sam_grads, finite=finite, inverse_loss_scale=scale)
        loss = sum(kept_loss.float() for _, _, kept_loss in micro_batches)
        self.sam_metrics.record(
            loss,
            perturbed_loss,
            grad_norm,
            perturbation_norm,
            finite,
            weight,
            skipped_micro_batches=len(micro_batches),
        )

    def _plain_step(self, model, inputs, num_items_in_batch) -> torch.Tensor:
        """
        A step the method does not perturb: the wrapped trainer's one-pass step at `w`. At its last micro-batch the
        method sees the step's whole gradient (`.grad`: summed over micro-batches, all-reduced) in `plain_step`.
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self.accelerator.sync_gradients or not self.sam_variant.needs_plain_step:
            return loss
        params = self._trainable_params()
        grads = local_shards(grads_or_zeros(params))
        grad_norm = global_norm(grads, self._sharding_group(params))
        scale = inverse_loss_scale(self.accelerator)
        self.sam_variant.plain_step(grads, grad_norm, finite=torch.isfinite(grad_norm), inverse_loss_scale=scale)
        return loss

    def _perturbation_(self, direction, shards, direction_norm, group, finite, rho) -> torch.Tensor:
        """Turn `direction` into `e` of radius `rho` in place (zero when not `finite`); returns `||e||`."""
        c = self.sam_config
        scalings = {"adaptive": c.adaptive, "adaptive_eta": c.adaptive_eta, "normalize": c.normalize}
        return sam_perturbation_(
            direction, shards, rho=rho, direction_norm=direction_norm, process_group=group, finite=finite, **scalings
        )

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update(self.sam_metrics.pop_logs(self.accelerator))
        return super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saving and resuming

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.sam_config.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)

    def create_model_card(self, *args, **kwargs) -> None:
        """The wrapped trainer's model card, tagged, plus a "Trained with hf_sam" section (`hf_sam.model_card`)."""
        kwargs["tags"] = model_card_tags(kwargs.get("tags"), self.sam_config)
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            add_model_card_section(os.path.join(self.args.output_dir, "README.md"), self.sam_config)

    def _inner_training_loop(self, *args, **kwargs):
        # A fresh SAM state per loop (`auto_find_batch_size` reruns it after an out-of-memory error; a resume then
        # loads the state inside the loop); a config changed since `__init__` is checked.
        self.sam_config.validate()
        self._reset_sam_state()
        return super()._inner_training_loop(*args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        save_trainer_sam_state(self, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if not check_resumed_config(checkpoint, self.sam_config):
            load_trainer_sam_state(self, checkpoint)


class SAMTrainer(SAMMixin, Trainer):
    r"""
    [`~transformers.Trainer`] with Sharpness-Aware Minimization: SAM, ASAM, USAM or any registered method (F-SAM,
    LookSAM, ...: `hf_sam.variants.METHODS`), set by a [`SAMConfig`]. The change w.r.t. `Trainer` is the two-pass
    `training_step` of [`SAMMixin`] (and its thin overrides for logging, saving and resuming, listed there).

    Example:

    ```python
    >>> from hf_sam import SAMConfig, SAMTrainer
    >>> config = SAMConfig(method="fsam", rho=0.05)
    >>> SAMTrainer(model=model, args=training_args, train_dataset=dataset, sam_config=config).train()
    ```
    """
