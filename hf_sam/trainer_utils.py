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
What the two-pass SAM step needs from around the wrapped `Trainer`: the fp16 loss scale as a tensor, the loss
normalization check (transformers issue #47688), snapshots of state that pass 2 must not change (BatchNorm running
statistics, TRL's per-step metrics), and the one-time check that `e` survives rounding to half-precision weights.
"""

import contextlib
import copy

import torch
import torch.distributed as dist
from accelerate.logging import get_logger
from torch import nn
from torch.distributed.tensor import DTensor

from .perturbation import foreach_mul_by_scalar_tensor_, global_norm, zero_unless_


logger = get_logger(__name__)


def inverse_loss_scale(accelerator) -> torch.Tensor | None:
    """`1 / scale` of the accelerator's fp16 GradScaler as a 0-d tensor on its device (`None` without one); no sync."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
    if scale is None:  # not initialized yet (no `scale()` call so far)
        scale = torch.tensor(scaler.get_scale())
    return scale.double().reciprocal().float()


def unscale_and_check_(
    grads: list[torch.Tensor],
    inverse_scale: torch.Tensor | None,
    extra_scale: float,
    process_group=None,
    agree_across_processes: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Unscale the pass-1 `grads` in place (times `inverse_scale`, the fp16 loss scale's inverse, and `extra_scale`);
    return their norm and whether they are finite (with `agree_across_processes`, on every process: a MIN
    all-reduce, a collective rather than a host read), after zeroing them when not. No host synchronization.
    """
    if inverse_scale is not None:
        foreach_mul_by_scalar_tensor_(grads, inverse_scale * extra_scale)
    elif extra_scale != 1.0:
        torch._foreach_mul_(grads, extra_scale)
    grad_norm = global_norm(grads, process_group)
    finite = torch.isfinite(grad_norm)
    if agree_across_processes:
        flag = finite.to(torch.int32)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag.bool().to(grad_norm.device)
    zero_unless_(grads, finite)
    return grad_norm, finite


def correct_loss_normalization(trainer, model: nn.Module, inputs: dict, num_items_in_batch) -> bool:
    """
    When `trainer` would take the loss as normalized by `num_items_in_batch` (so it neither divides it by the
    accumulation steps and multiplies it by the number of processes) but the loss ignores it (transformers issue
    #47688, e.g. BERT sequence classification), set `trainer.model_accepts_loss_kwargs = False`: the loss is then the
    global batch's mean in every split. Nothing to correct with one micro-batch on one process, or when the user set
    `loss_is_scaled_for_ga` or passed a `compute_loss_func`. Returns whether it is decided (`False`: this batch could
    not tell, e.g. every label was masked; try again at the next step).
    """
    if (
        num_items_in_batch is None
        or not getattr(trainer, "model_accepts_loss_kwargs", False)
        or getattr(trainer, "loss_is_scaled_for_ga", None) is not None
        or getattr(trainer, "compute_loss_func", None) is not None
        or (trainer.args.gradient_accumulation_steps == 1 and trainer.accelerator.num_processes == 1)
    ):
        return True
    ignores = loss_ignores_num_items_in_batch(trainer, model, inputs, num_items_in_batch)
    if ignores is None:
        return False
    if ignores:
        trainer.model_accepts_loss_kwargs = False
        logger.info(
            "hf_sam: this model's loss ignores `num_items_in_batch` although its `forward` takes `**kwargs` "
            "(transformers issue #47688): set `model_accepts_loss_kwargs=False`, so the loss is divided by the "
            "accumulation steps (and not multiplied by the number of processes) like a per-batch mean loss.",
            main_process_only=True,
        )
    return True


def loss_ignores_num_items_in_batch(trainer, model: nn.Module, inputs: dict, num_items_in_batch) -> bool | None:
    """
    Whether `trainer.compute_loss` ignores `num_items_in_batch`: two no-grad evaluations in eval mode on `inputs`,
    with it and with twice it (TRL's per-step metrics protected). A loss that honours it halves; one that ignores it
    stays. Each process votes (a zero or non-finite loss cannot tell); the votes are summed over processes, so all
    decide alike: `None` when no process could tell. A loss that ignores it while the model's `forward` takes
    `**kwargs` is what transformers issue #47688 describes.
    """
    was_training = model.training
    probe_inputs = trainer._prepare_inputs(inputs)
    model.eval()
    try:
        with torch.no_grad(), protect_trainer_metrics(trainer), trainer.compute_loss_context_manager():
            once = trainer.compute_loss(model, dict(probe_inputs), num_items_in_batch=num_items_in_batch)
            twice = trainer.compute_loss(model, dict(probe_inputs), num_items_in_batch=2 * num_items_in_batch)
    finally:
        model.train(was_training)
    once, twice = once.detach().float(), twice.detach().float()
    conclusive = torch.isfinite(once) & torch.isfinite(twice) & (once != 0)
    stays = (twice - once).abs() < (twice - once / 2).abs()
    votes = torch.stack([conclusive & stays, conclusive & ~stays]).to(trainer.args.device).to(torch.int32)
    if trainer.accelerator.num_processes > 1:
        votes = trainer.accelerator.reduce(votes, reduction="sum")
    ignores, honours = votes.tolist()  # one host read, at the first step(s) only
    if honours:
        return False
    return True if ignores else None


@contextlib.contextmanager
def protect_trainer_metrics(trainer):
    """
    Keep TRL's per-step metrics (`trainer._metrics[mode]` for every mode, e.g. SFT's `entropy`,
    `mean_token_accuracy`, `num_tokens`) and its counter `trainer._total_train_tokens` as they were before the block:
    a second pass at `w + e` would count every micro-batch twice and average values at `w + e` into those at `w`, and
    the loss-normalization probe (in eval mode) would add training batches to the evaluation metrics.
    """
    metrics = getattr(trainer, "_metrics", None)
    saved_metrics = None
    if isinstance(metrics, dict):
        saved_metrics = {
            mode: {key: copy.copy(value) for key, value in values.items()}
            for mode, values in metrics.items()
            if isinstance(values, dict)
        }
    saved_tokens = getattr(trainer, "_total_train_tokens", None)
    try:
        yield
    finally:
        if saved_metrics is not None:
            for mode, values in saved_metrics.items():
                metrics[mode].clear()
                metrics[mode].update(values)
        if saved_tokens is not None:
            trainer._total_train_tokens = saved_tokens


def norm_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The running statistics of the BatchNorm-like layers of `model` (what pass 2 must not update)."""
    return [
        buffer
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
        for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
        if buffer is not None
    ]


def warn_if_perturbation_rounded_away(
    params: list[torch.Tensor],
    saved_params: list[torch.Tensor],
    perturbation_norm: torch.Tensor,
    rho: float,
    process_group=None,
) -> None:
    """
    For bf16/fp16 weights: measure how much of `e` the weights really moved by (`w + e` is rounded to the weight
    dtype) and warn when most of it was lost, i.e. `rho` is too small for the weights' precision. It reads two values
    on the host: call it once per run.
    """
    if all(p.dtype not in (torch.bfloat16, torch.float16) for p in params):
        return
    realized = global_norm(torch._foreach_sub(params, saved_params), process_group).item()
    intended = float(perturbation_norm)
    if intended > 0 and realized < 0.5 * intended:
        logger.warning(
            f"SAM: with {params[0].dtype} weights only {realized:.3g} of the perturbation norm {intended:.3g} "
            f"survived rounding (rho={rho}): pass 2 runs at nearly the same weights, so SAM degenerates to plain "
            "training. Use a larger `rho`, or fp32 master weights with bf16 autocast (`--bf16` on an fp32 model). "
            "`sam/sharpness` near 0 is the symptom.",
            main_process_only=True,
        )


def unscaled_norm(grads: list[torch.Tensor], inverse_scale: torch.Tensor | None, process_group=None) -> torch.Tensor:
    """The norm of `grads` divided by the fp16 loss scale (`inverse_scale` its inverse, `None`: no scaler); no sync."""
    norm = global_norm(grads, process_group)
    return norm if inverse_scale is None else norm * inverse_scale.to(norm.device)


def local_shards(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This process's shard of each FSDP2 DTensor (sharing its storage), or the tensor itself."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def grads_or_zeros(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's `.grad`, or zeros for a parameter the loss did not reach."""
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """New tensors equal to `tensors` (one fused copy)."""
    saved = [torch.empty_like(t) for t in tensors]
    if saved:
        torch._foreach_copy_(saved, tensors)
    return saved
