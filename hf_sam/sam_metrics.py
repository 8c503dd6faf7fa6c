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
"""The `sam/*` values a `SAMTrainer` logs: summed on the device at every step, averaged when the Trainer logs."""

import torch
from accelerate.logging import get_logger


logger = get_logger(__name__)

# The averaged values, in the order of `SAMMetrics.sums` after the weight.
METRIC_KEYS = ("perturbed_loss", "sharpness", "grad_norm", "perturbation_norm")


class SAMMetrics:
    r"""
    Sums over the logging window, kept on the device so that recording reads nothing on the host:
    `[weight, perturbed loss, sharpness, weight * grad norm, weight * perturbation norm, non-finite count]`.
    The losses are the (already accumulation-weighted) micro-batch losses; `weight` is each record's share of an
    optimizer step. `pop_logs` turns them into `sam/perturbed_loss` :math:`L(w+e)`, `sam/sharpness`
    :math:`L(w+e) - L(w)`, `sam/grad_norm` :math:`\|g\|`, `sam/perturbation_norm` :math:`\|e\|` (means over the
    window and the processes) and `sam/nonfinite_micro_batches` (a count).
    """

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self._warned_nonfinite = False

    def record(
        self,
        loss: torch.Tensor,
        perturbed_loss: torch.Tensor,
        grad_norm: torch.Tensor,
        perturbation_norm: torch.Tensor,
        finite: torch.Tensor,
        weight: float,
        skipped_micro_batches: int = 1,
    ) -> None:
        """Add one step's (or micro-batch's) values; a step that was not `finite` adds `skipped_micro_batches` only."""
        device = loss.device
        if self.sums is None:
            self.sums = torch.zeros(6, dtype=torch.float32, device=device)
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
        usable = finite & torch.isfinite(values).all()  # a non-finite pass-2 loss must not turn the window's means NaN
        self.sums[:5] += torch.where(usable, values, 0.0)
        self.sums[5] += (~finite).float() * skipped_micro_batches

    def pop_logs(self, accelerator) -> dict[str, float]:
        """The averaged values since the last call, summed over processes (a collective), and reset the sums."""
        if self.sums is None:
            return {}
        sums = self.sums
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        sums = sums.tolist()
        self.sums.zero_()
        logs = {}
        if sums[0] > 0:
            logs = {f"sam/{key}": round(sums[i] / sums[0], 6) for i, key in enumerate(METRIC_KEYS, start=1)}
        if sums[5] > 0:
            logs["sam/nonfinite_micro_batches"] = int(sums[5])
            if not self._warned_nonfinite:
                logger.warning(
                    f"SAM: the first-pass gradient was not finite for {int(sums[5])} micro-batch(es) since the last "
                    "log: they were not perturbed (and F-SAM's EMA / LookSAM's g_v were not updated); the optimizer "
                    "got the gradient at the unperturbed weights. Logged as `sam/nonfinite_micro_batches`.",
                    main_process_only=True,
                )
                self._warned_nonfinite = True
        return logs
