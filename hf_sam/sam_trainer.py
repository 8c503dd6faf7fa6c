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
import torch.distributed as dist
from accelerate.logging import get_logger
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import Trainer

from .checkpointing import check_resumed_config, load_sam_state, sam_state_file, save_sam_state
from .model_card import add_model_card_section, model_card_tags
from .perturbation import (
    foreach_mul_by_scalar_tensor_,
    global_norm,
    perturb_,
    restore_,
    sam_perturbation_,
    zero_unless_,
)
from .sam_config import SAMConfig
from .setup_checks import check_sharded_setup, check_trainer_setup, sharding_group
from .variants import SAMVariant, variant_for


logger = get_logger(__name__)

# Order of the values summed in `SAMMixin._sam_metric_sums` after the weight.
_METRIC_KEYS = ("perturbed_loss", "sharpness", "grad_norm", "perturbation_norm")


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
    variant's state in `sam_state.pt`, the checkpoint's `sam_config.json` compared on resume).

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
        self._reset_sam_state()
        self._sam_norm_buffers: list[torch.Tensor] | None = None
        self._checked_rounding = False
        self._warned_nonfinite = False
        self._checked_loss_normalization = False
        self._sam_shard_group = None
        self._sam_sharding_checked = False
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(["hf_sam", sam_config.method])

    def _reset_sam_state(self) -> None:
        """A fresh variant (F-SAM EMA, LookSAM component), metric sums and kept micro-batches: a new training loop."""
        self.sam_variant: SAMVariant = variant_for(self.sam_config)
        self._sam_metric_sums: torch.Tensor | None = None
        self._kept_micro_batches: list[tuple] = []

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
        # 1. Pass 1 at w, accumulating (and, at the last micro-batch, all-reducing) the step's gradient in `.grad`.
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._kept_micro_batches.append((copy.copy(inputs), num_items_in_batch, loss))
        if not self.accelerator.sync_gradients:
            return loss
        micro_batches, self._kept_micro_batches = self._kept_micro_batches, []
        params = self._trainable_params()
        group = self._sharding_group(params)
        shards = _local_shards(params)  # the parameters themselves, or this process's FSDP shards of them

        # 2. The perturbation from the unscaled gradient of the whole batch.
        grads = _local_shards(_grads_or_zeros(params))
        grad_norm, finite = self._unscaled_grads_norm_(grads, group)
        direction, direction_norm = self.sam_variant.direction(grads, grad_norm, finite=finite)
        del grads
        perturbation_norm = self._perturbation_(direction, shards, direction_norm, group, finite)
        for p in params:
            p.grad = None  # pass-1 gradients are not applied
        saved_params = perturb_(shards, direction)
        del direction
        if not self._checked_rounding:
            self._check_perturbation_survives_rounding(shards, saved_params, perturbation_norm, group)

        # 3. Pass 2 at w + e over the kept micro-batches; restored even when it raises (e.g. out of memory).
        perturbed_loss = torch.zeros((), device=loss.device, dtype=torch.float32)
        saved_buffers = self._save_norm_buffers(model)
        try:
            with self._second_pass_context():
                for index, (kept_inputs, kept_num_items, _) in enumerate(micro_batches):
                    last = index == len(micro_batches) - 1
                    with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                        step_loss = super().training_step(model, kept_inputs, kept_num_items)
                    perturbed_loss = perturbed_loss + step_loss.float()
        finally:
            restore_(shards, saved_params)
            if saved_buffers:
                restore_(self._sam_norm_buffers, saved_buffers)
        self.sam_variant.after_second_pass(_local_shards(_grads_or_zeros(params)), finite=finite)
        batch_loss = sum(kept_loss.float() for _, _, kept_loss in micro_batches)
        self._record_sam_metrics(
            batch_loss,
            perturbed_loss,
            grad_norm,
            perturbation_norm,
            finite,
            1.0,
            skipped_micro_batches=len(micro_batches),
        )
        return loss

    def _micro_batch_sam_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor:
        """
        `perturbation_sync="local"`: every micro-batch on every process is perturbed with its own gradient (pass 1
        under `no_sync`), which is put on the scale of one batch's mean gradient (times the accumulation steps).
        """
        last_micro_batch = self.accelerator.sync_gradients
        num_micro_batches = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        params = self._trainable_params()
        group = self._sharding_group(params)
        shards = _local_shards(params)

        # 1. Pass 1 at w, on this micro-batch alone: set the accumulated gradients aside.
        accumulated = [p.grad for p in params]
        for p in params:
            p.grad = None
        with self.accelerator.no_sync(model):
            loss = super().training_step(model, inputs, num_items_in_batch)
        grads = _local_shards(_grads_or_zeros(params))
        for p, acc in zip(params, accumulated, strict=True):
            p.grad = acc  # pass 2 accumulates onto the earlier micro-batches' gradients
        del accumulated

        # 2. The perturbation.
        grad_norm, finite = self._unscaled_grads_norm_(grads, group, extra_scale=float(num_micro_batches))
        direction, direction_norm = self.sam_variant.direction(
            grads, grad_norm, finite=finite, weight=1.0 / num_micro_batches, last_micro_batch=last_micro_batch
        )
        del grads
        perturbation_norm = self._perturbation_(direction, shards, direction_norm, group, finite)
        saved_params = perturb_(shards, direction)
        del direction
        if not self._checked_rounding:
            self._check_perturbation_survives_rounding(shards, saved_params, perturbation_norm, group)

        # 3. Pass 2 at w + e (synced as the wrapped trainer syncs this micro-batch).
        saved_buffers = self._save_norm_buffers(model)
        try:
            with self._second_pass_context():
                perturbed_loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            restore_(shards, saved_params)
            if saved_buffers:
                restore_(self._sam_norm_buffers, saved_buffers)
        if last_micro_batch:
            self.sam_variant.after_second_pass(_local_shards(_grads_or_zeros(params)), finite=finite)
        self._record_sam_metrics(
            loss.float(), perturbed_loss.float(), grad_norm, perturbation_norm, finite, weight=1.0 / num_micro_batches
        )
        return loss

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
        self.sam_variant.plain_step(grads, grad_norm, finite=finite, inverse_loss_scale=self._inverse_loss_scale())
        return loss

    def _unscaled_grads_norm_(
        self, grads: list[torch.Tensor], group, extra_scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Unscale the pass-1 `grads` in place (fp16 loss scale, times `extra_scale`), take their norm and whether they
        are finite (on every process alike), and zero them when not. No host synchronization.
        """
        inverse_scale = self._inverse_loss_scale()
        if inverse_scale is not None:
            foreach_mul_by_scalar_tensor_(grads, inverse_scale * extra_scale)
        elif extra_scale != 1.0:
            torch._foreach_mul_(grads, extra_scale)
        grad_norm = global_norm(grads, group)
        finite = torch.isfinite(grad_norm)
        if self.sam_config.perturbation_sync == "local" and self.accelerator.num_processes > 1:
            flag = finite.to(device=self.args.device, dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # a collective, not a host read
            finite = flag.bool().to(grad_norm.device)
        zero_unless_(grads, finite)
        return grad_norm, finite

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

    def _inverse_loss_scale(self) -> torch.Tensor | None:
        """`1 / scale` of the fp16 GradScaler as a 0-d tensor on its device (`None` without one); no host sync."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
        if scale is None:  # not initialized yet (no `scale()` call so far)
            scale = torch.tensor(scaler.get_scale())
        return scale.double().reciprocal().float()

    def _check_loss_normalization(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None
    ) -> None:
        """
        Once, at the first step: when the Trainer would treat the loss as normalized by `num_items_in_batch` (it then
        neither divides it by the accumulation steps, and multiplies it by the number of processes), check that the
        loss really depends on it: two no-grad evaluations in eval mode, with `num_items_in_batch` and twice that. If
        they are equal the model ignores it (transformers issue #47688): set `model_accepts_loss_kwargs = False`, so the
        loss is the mean over the global batch in every split. Skipped (nothing to correct) with one micro-batch on one
        process, and when the user set `loss_is_scaled_for_ga` or passed a `compute_loss_func`.
        """
        self._checked_loss_normalization = True
        if (
            num_items_in_batch is None
            or not getattr(self, "model_accepts_loss_kwargs", False)
            or getattr(self, "loss_is_scaled_for_ga", None) is not None
            or getattr(self, "compute_loss_func", None) is not None
            or (self.args.gradient_accumulation_steps == 1 and self.accelerator.num_processes == 1)
        ):
            return
        was_training = model.training
        probe_inputs = self._prepare_inputs(inputs)
        model.eval()
        try:
            with torch.no_grad(), self._second_pass_context(), self.compute_loss_context_manager():
                once = self.compute_loss(model, dict(probe_inputs), num_items_in_batch=num_items_in_batch)
                twice = self.compute_loss(model, dict(probe_inputs), num_items_in_batch=2 * num_items_in_batch)
        finally:
            model.train(was_training)
        ignores = (once.detach().float() - twice.detach().float()).abs() <= 1e-6 * once.detach().float().abs()
        ignores = ignores.to(self.args.device).to(torch.int32)
        if self.accelerator.num_processes > 1:
            ignores = self.accelerator.reduce(ignores, reduction="sum") // self.accelerator.num_processes
        if bool(ignores):  # one host read, once per run
            self.model_accepts_loss_kwargs = False
            logger.info(
                "hf_sam: this model's loss ignores `num_items_in_batch` although its `forward` takes `**kwargs` "
                "(transformers issue #47688): set `model_accepts_loss_kwargs=False`, so the loss is divided by the "
                "accumulation steps (and not multiplied by the number of processes) like a per-batch mean loss.",
                main_process_only=True,
            )

    def _check_perturbation_survives_rounding(
        self,
        params: list[torch.Tensor],
        saved_params: list[torch.Tensor],
        perturbation_norm: torch.Tensor,
        process_group=None,
    ) -> None:
        """
        Once per run, for bf16/fp16 weights: measure how much of `e` the weights really moved by (`w + e` is rounded
        to the weight dtype) and warn when most of it was lost, i.e. `rho` is too small for the weights' precision.
        (Its host read happens once, at the first perturbed step, and only with half-precision weights.)
        """
        self._checked_rounding = True
        if all(p.dtype not in (torch.bfloat16, torch.float16) for p in params):
            return
        realized = global_norm(torch._foreach_sub(params, saved_params), process_group).item()
        intended = float(perturbation_norm)
        if intended > 0 and realized < 0.5 * intended:
            logger.warning(
                f"SAM: with {params[0].dtype} weights only {realized:.3g} of the perturbation norm {intended:.3g} "
                f"survived rounding (rho={self.sam_config.rho}): pass 2 runs at nearly the same weights, so SAM "
                "degenerates to plain training. Use a larger `rho`, or fp32 master weights with bf16 autocast "
                "(`--bf16` on an fp32 model). `sam/sharpness` near 0 is the symptom.",
                main_process_only=True,
            )

    @contextlib.contextmanager
    def _second_pass_context(self):
        """
        Pass 2 runs the wrapped trainer's `compute_loss` again, at `w + e`. TRL's trainers record per-step metrics
        there (`self._metrics["train"]`, e.g. SFT's `entropy`, `mean_token_accuracy`, `num_tokens`, and the counter
        `self._total_train_tokens`), which would then count every micro-batch twice and average values at `w + e`
        into those at `w`: keep pass 1's only, like the logged `loss`. Override to protect other such state.
        """
        metrics = getattr(self, "_metrics", None)
        train_metrics = metrics.get("train") if isinstance(metrics, dict) else None
        saved_metrics = None
        if isinstance(train_metrics, dict):
            saved_metrics = {key: copy.copy(value) for key, value in train_metrics.items()}
        saved_tokens = getattr(self, "_total_train_tokens", None)
        try:
            yield
        finally:
            if saved_metrics is not None:
                train_metrics.clear()
                train_metrics.update(saved_metrics)
            if saved_tokens is not None:
                self._total_train_tokens = saved_tokens

    def _save_norm_buffers(self, model: nn.Module) -> list[torch.Tensor]:
        """Copies of the running statistics of BatchNorm-like layers, to undo pass 2's update of them."""
        if self._sam_norm_buffers is None:
            self._sam_norm_buffers = [
                buffer
                for module in model.modules()
                if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
                for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
                if buffer is not None
            ]
        if not self._sam_norm_buffers:
            return []
        saved = [torch.empty_like(b) for b in self._sam_norm_buffers]
        torch._foreach_copy_(saved, self._sam_norm_buffers)
        return saved

    # ------------------------------------------------------------------ logging

    def _record_sam_metrics(
        self,
        loss: torch.Tensor,
        perturbed_loss: torch.Tensor,
        grad_norm: torch.Tensor,
        perturbation_norm: torch.Tensor,
        finite: torch.Tensor,
        weight: float,
        skipped_micro_batches: int = 1,
    ) -> None:
        """
        Add this step's (or micro-batch's) SAM metrics to on-device sums; `log` averages and clears them. A step that
        was not `finite` counts as `skipped_micro_batches` micro-batches without perturbation.
        """
        device = loss.device
        if self._sam_metric_sums is None:
            # [weight, perturbed loss, sharpness, weight * grad norm, weight * perturbation norm, non-finite count]
            self._sam_metric_sums = torch.zeros(6, dtype=torch.float32, device=device)
        finite = finite.to(device)
        values = torch.stack(
            [
                torch.ones((), device=device) * weight,
                perturbed_loss,
                perturbed_loss - loss,
                grad_norm.to(device) * weight,
                perturbation_norm.to(device) * weight,
            ]
        )
        self._sam_metric_sums[:5] += torch.where(finite, values, 0.0)
        self._sam_metric_sums[5] += (~finite).float() * skipped_micro_batches

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._sam_metric_sums is not None:
            sums = self._sam_metric_sums
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            sums = sums.tolist()
            if sums[0] > 0:
                for i, key in enumerate(_METRIC_KEYS, start=1):
                    logs[f"sam/{key}"] = round(sums[i] / sums[0], 6)
            if sums[5] > 0:
                logs["sam/nonfinite_micro_batches"] = int(sums[5])
                if not self._warned_nonfinite:
                    logger.warning(
                        f"SAM: the first-pass gradient was not finite for {int(sums[5])} micro-batch(es) since the "
                        "last log: they were not perturbed (and F-SAM's EMA / LookSAM's g_v were not updated); the "
                        "optimizer got the gradient at the unperturbed weights. Logged as `sam/nonfinite_micro_batches`.",
                        main_process_only=True,
                    )
                    self._warned_nonfinite = True
            self._sam_metric_sums.zero_()
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

    def _sam_state_is_per_process(self) -> bool:
        """Local mode (one state per process) and FSDP (each process holds its shards) save one file per process."""
        sharded = any(isinstance(p, DTensor) for p in self.model.parameters())
        return self.args.world_size > 1 and (self.sam_config.perturbation_sync == "local" or sharded)

    def _sam_state_file(self, directory: str) -> str:
        return sam_state_file(
            directory,
            per_process=self._sam_state_is_per_process(),
            process_index=self.args.process_index,
            world_size=self.args.world_size,
        )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.sam_variant.state_key is None or self.sam_config.rho == 0:
            return
        if not self._sam_state_is_per_process() and not self.args.should_save:
            return  # every process holds the same state: the main process writes it
        names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        save_sam_state(self._sam_state_file(output_dir), self.sam_variant, self.sam_config.method, names)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        check_resumed_config(checkpoint, self.sam_config)
        variant = self.sam_variant
        if variant.state_key is None or self.sam_config.rho == 0:
            return
        path = self._sam_state_file(checkpoint)
        if not os.path.isfile(path):
            reset = self.sam_config.allow_state_reset
            logger.warning(
                f"Resuming {self.sam_config.method} from {checkpoint}, which has no {os.path.basename(path)}: the "
                f"{variant.state_description} restarts empty, so this run will not equal an uninterrupted one"
                + (" (`allow_state_reset`)." if reset else "."),
                main_process_only=False,
            )
            return
        named = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        if self.sam_config.allow_state_reset:
            try:
                load_sam_state(path, variant, self.sam_config.method, named)
            except ValueError as error:
                logger.warning(
                    f"{error} `allow_state_reset` is set: the state restarts empty.", main_process_only=False
                )
            return
        load_sam_state(path, variant, self.sam_config.method, named)


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
