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

import contextlib
import copy
import os

import torch
from accelerate.logging import get_logger
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .checkpointing import (
    batch_change_notice,
    check_resumed_config,
    checkpoint_for_resume_true,
    checkpoint_run_settings,
    load_trainer_sam_state,
    lock_output_dir,
    restore_renamed_weights,
    save_trainer_sam_state,
    start_checkpoint,
    unlock_output_dir,
    write_checkpoint_manifest,
)
from .model_card import add_model_card_section, model_card_tags
from .perturbation import (
    global_norm,
    perturb_,
    restore_,
    sam_perturbation_,
)
from .sam_config import SAMConfig
from .sam_metrics import SAMMetrics
from .setup_checks import check_sharded_setup, check_trainer_setup, sharding_group
from .trainer_utils import (
    correct_loss_normalization,
    inverse_loss_scale,
    norm_buffers,
    protect_trainer_metrics,
    unscale_and_check_,
    warn_if_perturbation_rounded_away,
)
from .variants import SAMVariant, variant_for


logger = get_logger(__name__)


class SAMMixin:
    r"""
    Turns any [`~transformers.Trainer`] subclass into a sharpness-aware one: `class MySAMTrainer(SAMMixin, SFTTrainer)`.

    A perturbed optimizer step (with `perturbation_sync="global"`, the default) over the global batch :math:`B` (all
    micro-batches of gradient accumulation, on all processes):

    1. pass 1 of every micro-batch at :math:`w`, as the wrapped trainer does it: :math:`g = \nabla L_B(w)` accumulates
       (and is all-reduced) in `.grad`; the micro-batches are kept;
    2. at the last micro-batch: unscale :math:`g` (fp16 loss scale), let the variant ([`SAMVariant`]: SAM/ASAM/USAM,
       F-SAM, LookSAM) turn it into a direction, and that into the perturbation :math:`e` of [`SAMConfig`];
    3. save :math:`w`, move to :math:`w + e`, run pass 2 over the kept micro-batches (`no_sync` but for the last):
       :math:`\nabla L_B(w + e)` is what the optimizer applies; then copy :math:`w` back bitwise. Running statistics
       of BatchNorm-like layers keep their pass-1 values.

    So the result depends only on the global batch, not on how it is split into micro-batches and processes.
    `perturbation_sync="local"` perturbs every micro-batch on every process with its own gradient instead
    (m-sharpness). A gradient that is not finite gives :math:`e = 0` and leaves the variant's state alone, decided on
    the device: the step reads nothing on the host that the plain step does not.

    The optimizer, LR schedule, `max_grad_norm` clipping (of the applied gradient), mixed precision, evaluation,
    logging and checkpointing are the wrapped trainer's own. The logged `loss` is the pass-1 loss :math:`L(w)`; logged
    besides, averaged over the logging window and the processes: `sam/perturbed_loss` :math:`L(w+e)`, `sam/sharpness`
    :math:`L(w+e) - L(w)`, `sam/grad_norm` :math:`\|g\|`, `sam/perturbation_norm` :math:`\|e\|` and
    `sam/nonfinite_micro_batches` (micro-batches left unperturbed because their gradient was not finite).

    Loss normalization: for models whose `forward` takes `**kwargs` but whose loss ignores `num_items_in_batch` (e.g.
    BERT sequence classification; transformers issue #47688), the Trainer would multiply the loss by the accumulation
    steps and processes. At the first step (when accumulating or on several processes) the mixin checks whether the
    loss depends on `num_items_in_batch` and, if not, sets `model_accepts_loss_kwargs = False`, so every split trains
    on the mean loss of the global batch (also at `rho=0`).

    Trainer methods overridden: `training_step` (the step), `log` (adds `sam/*`), `save_model` (writes
    `sam_config.json`), `create_model_card` (tags and a "Trained with hf_sam" section), `_inner_training_loop` (fresh
    SAM state per loop, config validated), `_save_optimizer_and_scheduler` / `_load_optimizer_and_scheduler` (the
    variant's state in `sam_state.pt`, the checkpoint's `sam_config.json` compared on resume), `_save_checkpoint` (a
    checkpoint counts as complete once every process has written its files: `hf_sam_manifest.json`, written last),
    `train` (owns `output_dir` while training: a second run into it is refused; `True` resumes from the newest
    complete checkpoint).

    Papers: SAM https://huggingface.co/papers/2010.01412, ASAM https://huggingface.co/papers/2102.11600,
    USAM https://huggingface.co/papers/2305.15287, F-SAM https://huggingface.co/papers/2403.12350,
    LookSAM https://huggingface.co/papers/2203.02714.
    """

    def __init__(self, *args, sam_config: SAMConfig | None = None, **kwargs):
        if sam_config is None:
            sam_config = SAMConfig()
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
        """
        A fresh variant (F-SAM EMA, LookSAM component), metric sums, kept micro-batches and the caches of the model's
        buffers and sharding: a new training loop (perhaps with a new model, from `model_init`).
        """
        self.sam_variant: SAMVariant = variant_for(self.sam_config)
        self.sam_metrics = SAMMetrics()
        self._kept_micro_batches: list[tuple] = []
        self._sam_norm_buffers: list[torch.Tensor] | None = None
        self._sam_shard_group = None
        self._sam_sharding_checked = False
        self._checked_rounding = False

    def _trainable_params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _sharding_group(self, params: list[torch.Tensor]):
        """FSDP2's process group of the shards (`None` without sharding), checked once."""
        if not self._sam_sharding_checked:
            self._sam_shard_group = sharding_group(params)
            if self._sam_shard_group is not None:
                check_sharded_setup(self.sam_config, self.args.gradient_accumulation_steps)
            self._sam_sharding_checked = True
        return self._sam_shard_group

    # ------------------------------------------------------------------ the SAM step

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        if not self._checked_loss_normalization:
            self._check_loss_normalization(model, inputs, num_items_in_batch)
        if self.sam_config.rho == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        if not self.sam_variant.is_sam_step(self.state.global_step):
            return self._plain_step(model, inputs, num_items_in_batch)
        if self.sam_config.perturbation_sync == "local":
            return self._micro_batch_sam_step(model, inputs, num_items_in_batch)
        return self._batch_sam_step(model, inputs, num_items_in_batch)

    def _batch_sam_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor:
        """`perturbation_sync="global"`: one perturbation per optimizer step, from the whole global batch's gradient."""
        # Pass 1 at w, accumulating (and, at the last micro-batch, all-reducing) the step's gradient in `.grad`.
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._kept_micro_batches.append((copy.copy(inputs), num_items_in_batch, loss))
        if not self.accelerator.sync_gradients:
            return loss
        micro_batches, self._kept_micro_batches = self._kept_micro_batches, []
        params = self._trainable_params()
        grads = _local_shards(_grads_or_zeros(params))
        for p in params:
            p.grad = None  # pass-1 gradients are not applied
        self._perturbed_pass(model, params, grads, micro_batches, num_shares=1, last_micro_batch=True)
        return loss

    def _micro_batch_sam_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor:
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
        grads = _local_shards(_grads_or_zeros(params))
        for p, acc in zip(params, accumulated, strict=True):
            p.grad = acc  # pass 2 accumulates onto the earlier micro-batches' gradients
        del accumulated
        num_micro_batches = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        self._perturbed_pass(
            model,
            params,
            grads,
            [(inputs, num_items_in_batch, loss)],
            num_shares=num_micro_batches,
            last_micro_batch=self.accelerator.sync_gradients,
        )
        return loss

    def _perturbed_pass(
        self,
        model: nn.Module,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        micro_batches: list[tuple],
        *,
        num_shares: int,
        last_micro_batch: bool,
    ) -> None:
        """
        From the pass-1 gradient `grads` (taken over; one of `num_shares` equal parts of a step's gradient, so it is
        multiplied by `num_shares` to be on the scale of one batch's), the perturbation `e`; then pass 2 at
        `w + e` over `micro_batches` (`(inputs, num_items_in_batch, pass-1 loss)`, `no_sync` but for the last one),
        accumulating the applied gradient in `.grad`; `w` and the norm statistics are restored even when it raises
        (e.g. the out-of-memory error `auto_find_batch_size` retries after).
        """
        group = self._sharding_group(params)
        shards = _local_shards(params)  # the parameters themselves, or this process's FSDP shards of them
        grads, taken = list(grads), grads
        taken.clear()  # the caller's list let go: `e` (made from `grads` in place) is freed before pass 2 ends
        weight = 1.0 / num_shares
        grad_norm, finite = self._unscaled_grads_norm_(grads, group, extra_scale=float(num_shares))
        direction, direction_norm = self.sam_variant.direction(
            grads, grad_norm, finite=finite, weight=weight, last_micro_batch=last_micro_batch
        )
        del grads
        perturbation_norm = self._perturbation_(direction, shards, direction_norm, group, finite)
        saved_params = perturb_(shards, direction)
        del direction
        perturbed_loss, saved_buffers = 0.0, []
        try:  # w (and the norm statistics) restored whatever raises, e.g. the out-of-memory error auto_find_batch_size retries
            if not self._checked_rounding:
                self._checked_rounding = True
                warn_if_perturbation_rounded_away(shards, saved_params, perturbation_norm, self.sam_config.rho, group)
            saved_buffers = self._save_norm_buffers(model)
            with self._second_pass_context():
                for index, (kept_inputs, kept_num_items, _) in enumerate(micro_batches):
                    last = index == len(micro_batches) - 1
                    with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                        perturbed_loss += super().training_step(model, kept_inputs, kept_num_items).float()
        finally:
            restore_(shards, saved_params)
            if saved_buffers:
                restore_(self._sam_norm_buffers, saved_buffers)
        if last_micro_batch and self.sam_variant.needs_sam_grads:
            self.sam_variant.after_second_pass(_local_shards(_grads_or_zeros(params)), finite=finite)
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

    def _plain_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor:
        """
        A step between perturbed ones (`interval > 1`): the wrapped trainer's one-pass step at `w`. At its last
        micro-batch the variant sees the step's whole gradient (`.grad`: summed over micro-batches, all-reduced):
        F-SAM's EMA is updated, LookSAM adds its reused component. Parameters without a gradient keep `grad=None`.
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self.accelerator.sync_gradients or not self.sam_variant.needs_plain_step:
            return loss
        params = self._trainable_params()
        group = self._sharding_group(params)
        grads = _local_shards(_grads_or_zeros(params))
        grad_norm = global_norm(grads, group)
        finite = torch.isfinite(grad_norm)
        self.sam_variant.plain_step(
            grads, grad_norm, finite=finite, inverse_loss_scale=inverse_loss_scale(self.accelerator)
        )
        return loss

    def _unscaled_grads_norm_(self, grads: list[torch.Tensor], group, extra_scale: float = 1.0):
        """`unscale_and_check_` with this run's loss scale and, in local mode, the processes to agree with."""
        agree = self.sam_config.perturbation_sync == "local" and self.accelerator.num_processes > 1
        scale = inverse_loss_scale(self.accelerator)
        return unscale_and_check_(grads, scale, extra_scale, group, agree_across_processes=agree)

    def _perturbation_(self, direction, shards, direction_norm, group, finite) -> torch.Tensor:
        """Turn `direction` into `e` in place (zero when not `finite`); returns `||e||`."""
        config = self.sam_config
        return sam_perturbation_(
            direction,
            shards,
            rho=config.rho,
            adaptive=config.adaptive,
            adaptive_eta=config.adaptive_eta,
            normalize=config.normalize,
            direction_norm=direction_norm,
            process_group=group,
            finite=finite,
        )

    def _check_loss_normalization(self, model: nn.Module, inputs: dict, num_items_in_batch) -> None:
        """At the first step (until a batch can tell): `correct_loss_normalization` (transformers issue #47688)."""
        self._checked_loss_normalization = correct_loss_normalization(self, model, inputs, num_items_in_batch)

    def _second_pass_context(self):
        """What pass 2 must leave alone besides the weights: TRL's per-step metrics. Override to protect more."""
        return protect_trainer_metrics(self)

    def _save_norm_buffers(self, model: nn.Module) -> list[torch.Tensor]:
        """Copies of the running statistics of BatchNorm-like layers, to undo pass 2's update of them."""
        if self._sam_norm_buffers is None:
            self._sam_norm_buffers = norm_buffers(model)
        if not self._sam_norm_buffers:
            return []
        saved = [torch.empty_like(b) for b in self._sam_norm_buffers]
        torch._foreach_copy_(saved, self._sam_norm_buffers)
        return saved

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
        """
        The wrapped trainer's model card (`output_dir/README.md`, also what `push_to_hub` uploads), tagged `hf_sam`
        and with the method, plus a "Trained with hf_sam" section naming the method, `rho` and the whole `SAMConfig`.
        """
        kwargs["tags"] = model_card_tags(kwargs.get("tags"), self.sam_config)
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            add_model_card_section(os.path.join(self.args.output_dir, "README.md"), self.sam_config)

    def _inner_training_loop(self, *args, **kwargs):
        # Each training loop starts from a fresh SAM state: `auto_find_batch_size` reruns this loop after an
        # out-of-memory error, and the failed attempt's F-SAM EMA and metric sums must not leak into the retry.
        # `resume_from_checkpoint` then loads the state inside the loop. A config changed since `__init__` is checked.
        self.sam_config.validate()
        self._reset_sam_state()
        return super()._inner_training_loop(*args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """
        The wrapped trainer's `train`; `resume_from_checkpoint=True` resumes from the newest **complete** checkpoint
        of `output_dir` (`hf_sam.checkpointing.checkpoint_for_resume_true`): a save cut short is skipped with a warning
        instead of failing the resume or silently restarting the SAM state. Without any checkpoint it raises what
        `Trainer.train` raises; when every checkpoint is incomplete, the same error type and text, saying what each lacks.
        """
        if resume_from_checkpoint is True and not os.path.isdir(self.args.output_dir):
            return super().train(True, *args, **kwargs)  # nothing to resume from, nor to lock: the Trainer's own error
        # Owned by this run while it trains (`hf_sam.checkpointing.lock_output_dir`): another run writing checkpoints
        # into the same folder would overwrite them, or resume from them half-written. A recipe already holds it.
        lock_output_dir(self.args.output_dir, self.args.process_index)
        try:
            if resume_from_checkpoint is True:
                resume_from_checkpoint = checkpoint_for_resume_true(self.args.output_dir) or True
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            unlock_output_dir(self.args.output_dir, self.args.process_index)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        """
        The Trainer's save, made safe with several processes: process 0 marks the checkpoint as being written and,
        once every process has written its files (a barrier), writes `hf_sam_manifest.json` last; only then are
        older checkpoints rotated out (`save_total_limit`), so the last complete one is never deleted for one that
        may not be complete yet.
        """
        checkpoint = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        if self.args.should_save:
            start_checkpoint(checkpoint)
        self.accelerator.wait_for_everyone()  # no process writes into a rewritten checkpoint while it has a manifest
        save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = save_total_limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            write_checkpoint_manifest(
                checkpoint, {"global_step": self.state.global_step, **checkpoint_run_settings(self)}
            )
            rotate_checkpoints(
                output_dir=os.path.dirname(checkpoint),
                save_total_limit=save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Weights saved under legacy names (transformers#43701) are loaded through `from_pretrained`'s conversion;
        # sharded (FSDP) models keep the Trainer's own loading.
        model = model if model is not None else self.model
        if self.is_fsdp_enabled or not restore_renamed_weights(model, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled or not restore_renamed_weights(self.model, self.state.best_model_checkpoint):
            super()._load_best_model()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        save_trainer_sam_state(self, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        notice = batch_change_notice(checkpoint, self)
        if notice is not None and self.args.process_index == 0:
            logger.warning(notice)
        if not check_resumed_config(checkpoint, self.sam_config):
            load_trainer_sam_state(self, checkpoint)


class SAMTrainer(SAMMixin, Trainer):
    r"""
    [`~transformers.Trainer`] with Sharpness-Aware Minimization: SAM, ASAM, USAM, Friendly-SAM or LookSAM, set by a
    [`SAMConfig`]. The change w.r.t. `Trainer` is the two-pass `training_step` of [`SAMMixin`] (and its thin
    overrides for logging, saving and resuming, listed there).

    Example:

    ```python
    >>> from hf_sam import SAMConfig, SAMTrainer
    >>> trainer = SAMTrainer(
    ...     model=model, args=training_args, train_dataset=dataset, sam_config=SAMConfig(method="fsam", rho=0.05)
    ... )
    >>> trainer.train()
    ```
    """


def _local_shards(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This process's shard of each FSDP2 DTensor (sharing its storage), or the tensor itself."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _grads_or_zeros(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's `.grad`, or zeros for a parameter the loss did not reach."""
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
