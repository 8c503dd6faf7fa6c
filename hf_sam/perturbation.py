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


def global_dot(a: list[torch.Tensor], b: list[torch.Tensor], process_group=None) -> torch.Tensor:
    """
    The dot product of `a` and `b`, each seen as one vector, in float32. With a `process_group` the tensors are this
    process's shards (FSDP2, HSDP): the partial products are summed over the group.
    """
    dot = sum(torch.dot(x.reshape(-1).float(), y.reshape(-1).float()) for x, y in zip(a, b, strict=True))
    dot = torch.as_tensor(dot, dtype=torch.float32)
    if process_group is not None:
        torch.distributed.all_reduce(dot, group=process_group)
    return dot


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
    finite: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    Turn `direction` (:math:`d`) into the perturbation :math:`e`, **in place**, and return :math:`\|e\|`.

    - `normalize and not adaptive`: :math:`e = \rho\, d / (\|d\| + \epsilon)` (pass `direction_norm` if known);
    - `normalize and adaptive`: :math:`e = \rho\, T^2 d / (\|T d\| + \epsilon)`, :math:`T = |w| + \eta`;
    - `not normalize`: :math:`e = \rho\, d` or :math:`\rho\, T^2 d`.

    `params` are the weights :math:`w` (only read, for ASAM's :math:`T`). :math:`\epsilon` is `NORM_EPS`. With a
    `process_group`, the tensors are this process's shards (FSDP) and norms are taken over the whole vectors. With
    `finite` (a 0-d bool tensor), :math:`e = 0` and :math:`\|e\| = 0` when it is false: `direction` must then hold
    finite values (see `zero_unless_`), and nothing is read on the host. The norm is masked too: a NaN
    `direction_norm` (the pass-1 norm, where :math:`0 \cdot \infty` made an entry NaN) must not make
    :math:`\rho / (\mathrm{NaN} + \epsilon) \cdot 0 = \mathrm{NaN}`.
    """
    if finite is not None and direction_norm is not None:
        direction_norm = torch.where(finite.to(direction_norm.device), direction_norm, 0.0)
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
        scale = torch.full((), rho, dtype=torch.float32, device=direction[0].device if direction else None)
    if finite is not None:
        scale = torch.where(finite.to(scale.device), scale, 0.0)  # not `scale * finite`: NaN * 0 is NaN
    if adaptive:
        torch._foreach_mul_(direction, scaling)  # T^2 d
    foreach_mul_by_scalar_tensor_(direction, scale)
    if normalize and not adaptive:
        return scale * direction_norm
    return global_norm(direction, process_group)


@torch.no_grad()
def zero_unless_(tensors: list[torch.Tensor], finite: torch.Tensor) -> None:
    """Set every entry of `tensors` to 0 when the 0-d bool tensor `finite` is false (in place, no host sync)."""
    not_finite = ~finite
    for t in tensors:
        t.masked_fill_(not_finite.to(t.device), 0)


def foreach_mul_by_scalar_tensor_(tensors: list[torch.Tensor], scale: torch.Tensor) -> None:
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
