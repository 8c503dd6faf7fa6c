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
Collectives over lists of tensors, shared by the SAM step and the sharpness diagnostics, and what the SAM step needs
to know about FSDP2 and HSDP: the process group a norm is summed over, and when gradients are reduced.
"""

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Replicate, Shard


def group_by_device_and_dtype(
    tensors: list[torch.Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """`tensors` split into lists of one device and dtype each (what fused and flattened ops need)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum `tensors` over all processes, in place: one flattened all-reduce per (device, dtype)."""
    for group in group_by_device_and_dtype(tensors).values():
        flat = torch._utils._flatten_dense_tensors(group)
        dist.all_reduce(flat)
        torch._foreach_copy_(group, torch._utils._unflatten_dense_tensors(flat, group))


def sharding_group(params: list[torch.Tensor]):
    """
    `None` for ordinary parameters; for FSDP2's (DTensors as `fully_shard` makes them) the process group whose shards
    make up each tensor: the whole 1-D mesh (FSDP), or the shard dimension of a 2-D replicate x shard mesh (HSDP:
    each replica holds every shard, so a norm summed over the shard group alone is the whole vector's, and the
    gradients FSDP2 all-reduces across replicas are the same on each). Other sharded layouts raise a `ValueError`.
    """
    sharded = [p for p in params if isinstance(p, DTensor)]
    if not sharded:
        return None
    mesh, placements = sharded[0].device_mesh, tuple(sharded[0].placements)
    shard_dims = [i for i, placement in enumerate(placements) if isinstance(placement, Shard)]
    if (
        len(sharded) != len(params)
        or mesh.ndim not in (1, 2)
        or shard_dims != [mesh.ndim - 1]
        or not all(isinstance(placement, Replicate) for placement in placements[:-1])
        or any(p.device_mesh != mesh or tuple(p.placements) != placements for p in sharded)
    ):
        raise ValueError(
            "SAMTrainer supports sharded parameters as FSDP2's `fully_shard` makes them: every trainable parameter "
            "sharded on one device mesh, 1-D (FSDP) or 2-D replicate x shard (HSDP); tensor parallelism, context "
            f"parallelism and mixed set-ups are not (got placements {placements} on a {mesh.ndim}-D mesh)."
        )
    return mesh.get_group(mesh_dim=mesh.ndim - 1)


def _fsdp_param_groups(model: torch.nn.Module) -> list:
    """The FSDP2 parameter groups of `model` (empty when it is not sharded with `fully_shard`)."""
    from torch.distributed.fsdp import FSDPModule

    return [
        group
        for module in model.modules()
        if isinstance(module, FSDPModule)
        for group in module._get_fsdp_state()._fsdp_param_groups
    ]


@contextlib.contextmanager
def sharded_gradient_sync(model: torch.nn.Module, *, last_micro_batch: bool):
    """
    One micro-batch of a SAM pass under FSDP2: its gradient is reduce-scattered into the sharded `.grad` (where the
    micro-batches accumulate) whatever the Trainer's `no_sync` asked, so each pass's gradient is in `.grad`, sharded,
    when the pass ends, and no unsharded gradient of the whole model is kept across micro-batches. With HSDP, the
    all-reduce across replicas waits for the last micro-batch (FSDP2 keeps the partial sums, sharded). The previous
    settings are put back after. Cost: one reduce-scatter per micro-batch and pass instead of one per pass.
    """
    groups = _fsdp_param_groups(model)
    saved = [(group.reduce_grads, group.all_reduce_grads) for group in groups]
    for group in groups:
        group.reduce_grads, group.all_reduce_grads = True, last_micro_batch
    try:
        yield
    finally:
        for group, (reduce_grads, all_reduce_grads) in zip(groups, saved, strict=True):
            group.reduce_grads, group.all_reduce_grads = reduce_grads, all_reduce_grads


def micro_batch_sync(trainer, model: torch.nn.Module, shard_group, *, last_micro_batch: bool, first_pass: bool):
    """
    The gradient synchronization of one micro-batch of a SAM pass. Sharded (FSDP2, HSDP: `shard_group` from
    `sharding_group` is not `None`): `sharded_gradient_sync`. Otherwise pass 1 keeps the Trainer's own (`no_sync`
    but for the last micro-batch), and pass 2 does the same.
    """
    if shard_group is not None:
        return sharded_gradient_sync(model, last_micro_batch=last_micro_batch)
    if first_pass or last_micro_batch:
        return contextlib.nullcontext()
    return trainer.accelerator.no_sync(model)
