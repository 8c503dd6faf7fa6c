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
import json
import os

import torch
import torch.distributed as dist
from accelerate.logging import get_logger
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import Trainer

from .distributed import all_reduce_sum_
from .perturbation import (
    FriendlySAMDirection,
    LookSAMGradient,
    global_norm,
    perturb_,
    restore_,
    sam_perturbation_,
)
from .sam_config import SAMConfig


logger = get_logger(__name__)

SAM_STATE_NAME = "sam_state.pt"
# Order of the values summed in `SAMMixin._sam_metric_sums`.
_METRIC_KEYS = ("perturbed_loss", "sharpness", "grad_norm", "perturbation_norm")
# The section `SAMMixin.create_model_card` adds to the model card, and the papers it cites.
_MODEL_CARD_START = "<!-- hf_sam: start -->"
_MODEL_CARD_END = "<!-- hf_sam: end -->"
_PAPERS = {
    "SAM": ("Foret et al., 2021", "https://huggingface.co/papers/2010.01412"),
    "ASAM": ("Kwon et al., 2021", "https://huggingface.co/papers/2102.11600"),
    "USAM": ("Dai, Ahn & Sra, 2023", "https://huggingface.co/papers/2305.15287"),
    "F-SAM": ("Li et al., 2024", "https://huggingface.co/papers/2403.12350"),
    "LookSAM": ("Liu et al., 2022", "https://huggingface.co/papers/2203.02714"),
}


class SAMMixin:
    r"""
    Turns any [`~transformers.Trainer`] subclass into a sharpness-aware one: `class MySAMTrainer(SAMMixin, SFTTrainer)`.

    The only change w.r.t. the trainer it is mixed into is `training_step`, which takes two forward/backward passes:

    1. set aside the gradients accumulated from earlier micro-batches, then compute this micro-batch's gradient
       :math:`g` at :math:`w` (pass 1; under DDP with `perturbation_sync="local"`, forward and backward run inside
       `no_sync`);
    2. unscale :math:`g` (fp16 loss scale, gradient accumulation) and turn it into the perturbation :math:`e` of
       [`SAMConfig`] (SAM, ASAM, USAM or F-SAM); if :math:`g` holds inf/NaN, :math:`e = 0` and the F-SAM EMA is
       left alone;
    3. save :math:`w`, move to :math:`w + e`, compute the gradient there (pass 2, accumulated onto the set-aside
       gradients; this is what the optimizer applies), then copy :math:`w` back bitwise. Running statistics of
       BatchNorm-like layers keep their pass-1 values.

    The optimizer, LR schedule, `max_grad_norm` clipping (applied to the pass-2 gradient only), gradient accumulation,
    mixed precision, evaluation, logging and checkpointing are the wrapped trainer's own. The returned (and logged)
    `loss` is the pass-1 loss :math:`L(w)`. Logged besides, averaged over the logging window and the processes:
    `sam/perturbed_loss` :math:`L(w+e)`, `sam/sharpness` :math:`L(w+e) - L(w)`, `sam/grad_norm` :math:`\|g\|` and
    `sam/perturbation_norm` :math:`\|e\|`. F-SAM's EMA (LookSAM's `g_v`) is saved in `sam_state.pt` next to `optimizer.pt` in every
    checkpoint and restored on resume; `sam_config.json` is written next to every saved model.

    Papers: SAM https://huggingface.co/papers/2010.01412, ASAM https://huggingface.co/papers/2102.11600,
    USAM https://huggingface.co/papers/2305.15287, F-SAM https://huggingface.co/papers/2403.12350.
    """

    def __init__(self, *args, sam_config: SAMConfig | None = None, **kwargs):
        if sam_config is None:
            sam_config = SAMConfig()
        if not isinstance(sam_config, SAMConfig):
            raise TypeError(f"`sam_config` must be a `SAMConfig`, got {type(sam_config).__name__}.")
        super().__init__(*args, **kwargs)
        self.sam_config = sam_config
        self._check_sam_setup()
        self._reset_sam_state()
        self._sam_metric_sums: torch.Tensor | None = None
        self._sam_norm_buffers: list[torch.Tensor] | None = None
        self._warned_nonfinite = False
        self._checked_rounding = False
        self._sam_shard_group = None
        self._sam_sharding_checked = False
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(["hf_sam", sam_config.method])

    def _reset_sam_state(self) -> None:
        """Fresh F-SAM EMA / LookSAM component, as at the start of training."""
        config = self.sam_config
        self._fsam = (
            FriendlySAMDirection(sigma=config.fsam_sigma, lam=config.fsam_lambda) if config.method == "fsam" else None
        )
        self._looksam = LookSAMGradient(alpha=config.looksam_alpha) if config.method == "looksam" else None

    def _check_sam_setup(self) -> None:
        """Refuse, before training starts, the set-ups where a two-pass step cannot be exact."""
        if self.sam_config.rho == 0:
            return
        if getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                "SAMTrainer does not support DeepSpeed: Accelerate's DeepSpeed engine steps the optimizer inside "
                "`backward`, so the first SAM pass would already update the weights. Use DDP or FSDP via "
                "`accelerate launch` instead, or set `rho=0`."
            )
        if str(self.args.optim).lower().endswith("lomo"):
            raise ValueError(
                f"SAMTrainer does not support `optim={self.args.optim}`: (Ada)LOMO fuses the update into `backward`, "
                "so the first SAM pass would already update the weights. Pick an optimizer that steps after backward "
                "(e.g. `adamw_torch`)."
            )
        if getattr(self, "is_fsdp_enabled", False):
            plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
            if getattr(plugin, "fsdp_version", 1) != 2:
                raise ValueError(
                    "SAMTrainer supports FSDP2 only (`fsdp_version: 2` in the Accelerate config, or `fsdp_config="
                    '{"fsdp_version": 2}`): FSDP1 flattens parameters, so the perturbation cannot be applied to them.'
                )
            self._check_sharded_setup()

    def _check_sharded_setup(self) -> None:
        """What a two-pass step under FSDP2 (parameters sharded over processes) cannot do."""
        if self.sam_config.perturbation_sync == "local":
            raise ValueError(
                "`perturbation_sync` must be 'global' under FSDP: the weights are sharded over the processes, so "
                "they cannot take a different perturbation on each one, got 'local'."
            )
        if self.args.gradient_accumulation_steps > 1:
            raise ValueError(
                "SAMTrainer under FSDP needs `gradient_accumulation_steps=1` (got "
                f"{self.args.gradient_accumulation_steps}): FSDP keeps unsynced micro-batch gradients unsharded and "
                "outside `.grad`, where the first pass cannot be set apart. Raise the per-device batch size instead."
            )
        if self.sam_config.method == "looksam":
            raise ValueError("`method='looksam'` is not supported under FSDP yet; use 'sam' or 'fsam'.")

    def _sharding_group(self, params: list[torch.Tensor]):
        """
        `None` for ordinary parameters; for FSDP2's (DTensors sharded over a 1-D mesh) the process group whose shards
        make up each tensor, after checking the set-up. Cached after the first step.
        """
        if self._sam_sharding_checked:
            return self._sam_shard_group
        sharded = [p for p in params if isinstance(p, DTensor)]
        group = None
        if sharded:
            mesh = sharded[0].device_mesh
            if (
                len(sharded) != len(params)
                or mesh.ndim != 1
                or any(p.device_mesh != mesh or not all(pl.is_shard() for pl in p.placements) for p in sharded)
            ):
                raise ValueError(
                    "SAMTrainer supports sharded parameters as FSDP2's `fully_shard` makes them: every trainable "
                    "parameter sharded on one 1-D device mesh (HSDP, tensor parallelism and mixed set-ups are not)."
                )
            self._check_sharded_setup()
            group = mesh.get_group()
        self._sam_shard_group, self._sam_sharding_checked = group, True
        return group

    # ------------------------------------------------------------------ the SAM step

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        config = self.sam_config
        if config.rho == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.state.global_step % config.interval != 0:
            return self._unperturbed_step(model, inputs, num_items_in_batch)

        last_micro_batch = self.accelerator.sync_gradients
        num_micro_batches = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        params = [p for p in self.model.parameters() if p.requires_grad]
        group = self._sharding_group(params)
        shards = _local_shards(params)  # the parameters themselves, or this process's FSDP shards of them

        # 1. Pass 1 at w, on this micro-batch alone: set the accumulated gradients aside.
        accumulated = [p.grad for p in params]
        for p in params:
            p.grad = None
        with self._first_pass_sync_context(model):
            loss = super().training_step(model, inputs, num_items_in_batch)
        grads = _local_shards(_grads_or_zeros(params))
        for p, acc in zip(params, accumulated, strict=True):
            p.grad = acc  # pass 2 accumulates onto the earlier micro-batches' gradients
        del accumulated

        # 2. The perturbation, from the unscaled gradient on the scale of a whole batch.
        if self._first_pass_needs_all_reduce(model):
            _all_reduce_mean_(grads)
        if self._looksam is not None:
            self._looksam.accumulate_first_pass(grads)
        unscale = num_micro_batches / self._loss_scale()
        if unscale != 1.0:
            torch._foreach_mul_(grads, unscale)
        grad_norm = global_norm(grads, group)
        if self._all_finite(grad_norm):
            if self._fsam is not None:
                direction = self._fsam.direction(
                    grads, accumulate_scale=1.0 / num_micro_batches, last_micro_batch=last_micro_batch
                )
                direction_norm = None
            else:
                direction, direction_norm = grads, grad_norm  # turned into e in place
            del grads
            perturbation_norm = sam_perturbation_(
                direction,
                shards,
                rho=config.rho,
                adaptive=config.adaptive,
                adaptive_eta=config.adaptive_eta,
                normalize=config.normalize,
                direction_norm=direction_norm,
                process_group=group,
            )
            saved_params = perturb_(shards, direction)
            del direction
            if not self._checked_rounding:
                self._check_perturbation_survives_rounding(shards, saved_params, perturbation_norm, group)
        else:
            del grads
            if self._fsam is not None:
                self._fsam.skip_ema_update(last_micro_batch=last_micro_batch)
            if self._looksam is not None:
                self._looksam.skip_step()
            saved_params = None
            if not self._warned_nonfinite:
                logger.warning(
                    "SAM: the first-pass gradient is not finite; this micro-batch is not perturbed (and F-SAM's EMA "
                    "is not updated). The optimizer still gets the gradient at the unperturbed weights.",
                    main_process_only=False,
                )
                self._warned_nonfinite = True

        # 3. Pass 2 at w + e; its gradient is what the optimizer applies. Then restore w and the norm statistics.
        # Restored even when pass 2 raises (e.g. the out-of-memory error `auto_find_batch_size` retries after).
        saved_buffers = self._save_norm_buffers(model)
        try:
            with self._second_pass_context():
                perturbed_loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            if saved_params is not None:
                restore_(shards, saved_params)
            if saved_buffers:
                restore_(self._sam_norm_buffers, saved_buffers)

        if self._looksam is not None and last_micro_batch:
            self._looksam.decompose(_grads_or_zeros(params))
        self._record_sam_metrics(
            loss, perturbed_loss, grad_norm, perturbation_norm if saved_params is not None else None, num_micro_batches
        )
        return loss

    def _unperturbed_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor:
        """
        A step between perturbed ones (`interval > 1`): the wrapped trainer's one-pass step at `w`. At its last
        micro-batch the step's whole gradient (`p.grad`: summed over micro-batches, all-reduced under DDP) feeds
        F-SAM's EMA (unscaled; in local mode it is the all-reduced gradient), or gets LookSAM's reused component.
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self.accelerator.sync_gradients or (self._fsam is None and self._looksam is None):
            return loss
        # A parameter the loss did not reach keeps `grad=None` (the optimizer skips it, as in the plain Trainer).
        params = [p for p in self.model.parameters() if p.requires_grad]
        group = self._sharding_group(params)
        grads = _local_shards(_grads_or_zeros(params))
        grad_norm = global_norm(grads, group)
        if not self._all_finite(grad_norm):
            return loss  # the GradScaler skips this step; the EMA and g_v stay as they are
        if self._looksam is not None:
            self._looksam.reuse_(grads, grad_norm)
        if self._fsam is not None:
            scale = self._loss_scale()
            self._fsam.observe_step(grads if scale == 1.0 else torch._foreach_mul(grads, 1.0 / scale))
        return loss

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

    def _first_pass_sync_context(self, model: nn.Module):
        """Local mode: pass 1 (forward and backward) runs inside `no_sync`, so its gradients stay per process."""
        if self.sam_config.perturbation_sync == "local":
            return self.accelerator.no_sync(model)
        return contextlib.nullcontext()

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

    def _first_pass_needs_all_reduce(self, model: nn.Module) -> bool:
        """Global mode under DDP inside the Trainer's own `no_sync` (non-final micro-batches): average by hand."""
        return (
            self.sam_config.perturbation_sync == "global"
            and isinstance(model, nn.parallel.DistributedDataParallel)
            and not model.require_backward_grad_sync
        )

    def _loss_scale(self) -> float:
        """The fp16 GradScaler's current scale (1 without one): pass-1 gradients are divided by it."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return float(scaler.get_scale())
        return 1.0

    def _all_finite(self, grad_norm: torch.Tensor) -> bool:
        """Whether the pass-1 gradient is finite, decided the same way on every process."""
        finite = torch.isfinite(grad_norm).to(torch.float32)
        if self.sam_config.perturbation_sync == "local" and self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite.to(self.args.device), reduction="sum")
            return bool(finite.item() == self.accelerator.num_processes)
        return bool(finite.item())

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
        perturbation_norm: torch.Tensor | None,
        num_micro_batches: int,
    ) -> None:
        """Sum this micro-batch's SAM metrics on the device (no host sync); `log` averages and clears them."""
        if self._sam_metric_sums is None:
            # [weight, perturbed loss, sharpness, weight * grad norm, weight * perturbation norm, non-finite count]
            self._sam_metric_sums = torch.zeros(6, dtype=torch.float32, device=loss.device)
        if perturbation_norm is None:
            self._sam_metric_sums[5] += 1
            return
        weight = 1.0 / num_micro_batches
        loss, perturbed_loss = loss.float(), perturbed_loss.float()
        values = torch.stack(
            [
                torch.tensor(weight, device=loss.device),
                perturbed_loss,
                perturbed_loss - loss,
                grad_norm.to(loss.device) * weight,
                perturbation_norm.to(loss.device) * weight,
                torch.zeros((), device=loss.device),
            ]
        )
        self._sam_metric_sums += values

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
        tags = kwargs.get("tags")
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        kwargs["tags"] = tags + [tag for tag in ("hf_sam", self.sam_config.method) if tag not in tags]
        super().create_model_card(*args, **kwargs)
        path = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as reader:
            card = reader.read()
        start = card.find(_MODEL_CARD_START)
        if start != -1:  # the section of an earlier call: replace it
            end = card.find(_MODEL_CARD_END, start)
            card = card[:start] + (card[end + len(_MODEL_CARD_END) :] if end != -1 else "")
        with open(path, "w", encoding="utf-8") as writer:
            writer.write(card.rstrip("\n") + "\n\n" + self._sam_model_card_section() + "\n")

    def _sam_model_card_section(self) -> str:
        config = self.sam_config
        names = [{"fsam": "F-SAM", "looksam": "LookSAM"}[config.method]] if config.method != "sam" else []
        names += (["ASAM"] if config.adaptive else []) + ([] if config.normalize else ["USAM"])
        method = " + ".join(f"{name} ([{_PAPERS[name][0]}]({_PAPERS[name][1]}))" for name in names or ["SAM"])
        interval = f", `interval={config.interval}`" if config.interval != 1 else ""
        return (
            f"{_MODEL_CARD_START}\n## Trained with hf_sam\n\nThis model was trained with {method} through "
            f"[hf_sam](https://github.com/hf-sam/hf_sam) (`method={config.method!r}`, `rho={config.rho}`{interval}): "
            "its sharpness-aware steps apply the gradient taken at weights perturbed towards higher loss (radius "
            "`rho`). The `SAMConfig` (`sam_config.json`):\n\n"
            f"```json\n{json.dumps(config.to_dict(), indent=2, sort_keys=True)}\n```\n{_MODEL_CARD_END}"
        )

    def _inner_training_loop(self, *args, **kwargs):
        # Each training loop starts from a fresh SAM state: `auto_find_batch_size` reruns this loop after an
        # out-of-memory error, and the failed attempt's F-SAM EMA and metric sums must not leak into the retry.
        # `resume_from_checkpoint` then loads the EMA inside the loop.
        self._reset_sam_state()
        self._sam_metric_sums = None
        return super()._inner_training_loop(*args, **kwargs)

    def _sam_state_file(self, directory: str) -> str:
        if self._sam_state_is_per_process():
            name = f"rank{self.args.process_index}-of-{self.args.world_size}-{SAM_STATE_NAME}"
        else:
            name = SAM_STATE_NAME
        return os.path.join(directory, name)

    def _sam_state_is_per_process(self) -> bool:
        """Local mode (one EMA per process) and FSDP (each process holds its shards) save one file per process."""
        sharded = any(isinstance(p, DTensor) for p in self.model.parameters())
        return self.args.world_size > 1 and (self.sam_config.perturbation_sync == "local" or sharded)

    def _trainable_parameter_names(self) -> list[str]:
        return [name for name, p in self.model.named_parameters() if p.requires_grad]

    def _stateful_sam_parts(self) -> dict:
        """The per-parameter state that a checkpoint must carry: F-SAM's EMA or LookSAM's orthogonal component."""
        parts = {}
        if self._fsam is not None:
            parts["ema"] = (self._fsam, "F-SAM gradient EMA")
        if self._looksam is not None:
            parts["orthogonal"] = (self._looksam, "LookSAM orthogonal gradient component")
        return parts

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        parts = self._stateful_sam_parts()
        if not parts:
            return
        if not self._sam_state_is_per_process() and not self.args.should_save:
            return  # every process holds the same state: the main process writes it
        names = self._trainable_parameter_names()
        state = {"method": self.sam_config.method}
        for key, (part, _) in parts.items():
            tensors = part.state_dict()[key]
            state[key] = None if tensors is None else {n: t.cpu() for n, t in zip(names, tensors, strict=True)}
        os.makedirs(output_dir, exist_ok=True)
        torch.save(state, self._sam_state_file(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        parts = self._stateful_sam_parts()
        if checkpoint is None or not parts:
            return
        path = self._sam_state_file(checkpoint)
        if not os.path.isfile(path):
            what = " and ".join(description for _, description in parts.values())
            logger.warning(
                f"Resuming {self.sam_config.method} from {checkpoint}, which has no {os.path.basename(path)}: the "
                f"{what} restarts empty, so this run will not equal an uninterrupted one.",
                main_process_only=False,
            )
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        named = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        for key, (part, description) in parts.items():
            saved = state.get(key)
            if saved is not None and set(named) != set(saved):
                raise ValueError(
                    f"{path} holds a {description} for other trainable parameters than this model's: missing "
                    f"{sorted(set(named) - set(saved))[:5]}, unexpected {sorted(set(saved) - set(named))[:5]}."
                )
            tensors = (
                None if saved is None else [saved[n].to(device=p.device, dtype=p.dtype) for n, p in named.items()]
            )
            part.load_state_dict({key: tensors})


class SAMTrainer(SAMMixin, Trainer):
    r"""
    [`~transformers.Trainer`] with Sharpness-Aware Minimization: SAM, ASAM, USAM or Friendly-SAM, set by a
    [`SAMConfig`]. The only change w.r.t. `Trainer` is the two-pass `training_step` of [`SAMMixin`].

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


def _all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average `tensors` over all processes in place."""
    all_reduce_sum_(tensors)
    torch._foreach_div_(tensors, float(dist.get_world_size()))
