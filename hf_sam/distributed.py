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
"""Collectives over lists of tensors, shared by the SAM step and the sharpness diagnostics."""

import torch
import torch.distributed as dist


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
