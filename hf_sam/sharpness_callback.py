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
"""`SharpnessCallback`: the diagnostics of `hf_sam.sharpness` on a fixed set of batches, logged during training."""

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from accelerate.logging import get_logger
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.data.data_collator import default_data_collator

from .sharpness import (
    SharpnessResult,
    ascent_sharpness,
    average_sharpness,
    gradient_eigenvector_alignment,
    hessian_trace,
    top_hessian_eigenvalue,
    worst_case_sharpness,
)


logger = get_logger(__name__)

# The diagnostics, in the order they are measured (top_eigenvalue before alignment, which can reuse its eigenvector).
FUNCTIONS: dict[str, Callable[..., SharpnessResult]] = {
    "worst_case": worst_case_sharpness,
    "ascent": ascent_sharpness,
    "average": average_sharpness,
    "top_eigenvalue": top_hessian_eigenvalue,
    "trace": hessian_trace,
    "alignment": gradient_eigenvector_alignment,
}
DIAGNOSTICS = tuple(FUNCTIONS)
DEFAULT_DIAGNOSTICS = ("ascent", "average", "top_eigenvalue", "trace")
# The keyword arguments of each function that can be set per diagnostic (`eval_mode` is shared, `eigenvector` internal).
SETTINGS: dict[str, tuple[str, ...]] = {
    "worst_case": ("rho", "steps", "step_size", "tol", "seed"),
    "ascent": ("rho",),
    "average": ("rho", "samples", "antithetic", "seed"),
    "top_eigenvalue": ("max_iterations", "tol", "which", "seed"),
    "trace": ("samples", "deflation_rank", "seed"),
    "alignment": ("max_iterations", "tol", "seed"),
}


class SharpnessCallback(TrainerCallback):
    r"""
    Measures sharpness diagnostics (see `hf_sam.sharpness`) on a fixed set of batches when training starts (before the
    first optimizer step), every `every_n_steps` optimizer steps, after every evaluation and when training ends (each
    of the four can be turned off; never twice at one step), and logs them as
    `sharpness/<name>` (plus `sharpness/<name>_stderr` for the Monte-Carlo ones) through the Trainer's own logging, so
    they reach `trainer_state.json`'s `log_history` and the reporting integrations (TensorBoard, W&B, ...).

    `diagnostics` names the quantities, among `"worst_case"` (`worst_case_sharpness`), `"ascent"`
    (`ascent_sharpness`), `"average"` (`average_sharpness`), `"top_eigenvalue"` (`top_hessian_eigenvalue`), `"trace"`
    (`hessian_trace`) and `"alignment"` (`gradient_eigenvector_alignment`, :math:`|\cos|` of the gradient and the top
    Hessian eigenvector). Each logged value is exactly what that function returns when called on the model and the
    batches with the diagnostic's settings: `callback.settings[name]`, built from

    1. the shared arguments below (`rho` for the three sharpnesses, `worst_case_steps` as `steps`, `max_iterations`
       and `tol` for the two power iterations, `samples` for `"average"` and `"trace"`, `seed` for all), overridden by
    2. per-diagnostic settings, when `diagnostics` is a mapping from names to keyword arguments of the function:

    ```python
    >>> SharpnessCallback(
    ...     batches,
    ...     every_n_steps=100,
    ...     diagnostics={"ascent": {"rho": 0.05}, "average": {"rho": 0.5, "samples": 8}, "trace": {"samples": 20}},
    ... )
    ```

    The keys each diagnostic accepts are in `SETTINGS` (e.g. `"which"` for `"top_eigenvalue"`, `"antithetic"` for
    `"average"`); `eval_mode` is shared. `"alignment"` reuses the eigenvector of `"top_eigenvalue"` when both are
    measured with the same `max_iterations`, `tol` and `seed` and `which="algebraic"` (the result is then the same
    as computing it again), and runs its own power iteration otherwise.

    The batches are either `batches` (a list of input dicts, with labels) or the first `num_batches * batch_size`
    examples of `dataset`, in order, collated by `data_collator` (default: the trainer's `data_collator` if a trainer
    is attached, else `transformers.default_data_collator`); they are built once and moved to the model's device.
    Use the same batches all along, so the numbers are comparable across steps and runs.

    The Trainer does not hand its callbacks the trainer itself, so attach it, as TRL's callbacks do:

    ```python
    >>> callback = SharpnessCallback(batches, every_n_steps=100)
    >>> trainer = SAMTrainer(model=model, args=args, train_dataset=train_dataset, callbacks=[callback])
    >>> callback.trainer = trainer  # or SharpnessCallback(..., trainer=trainer) and trainer.add_callback(callback)
    ```

    Without a trainer the values are still appended to `state.log_history` (with the `step`), but the reporting
    integrations do not see them. The model is put back exactly as it was (weights, buffers, modes, gradients, RNG
    states: see `hf_sam.sharpness`), so the callback does not change the training run. Under distributed training
    every process must run it (it does, in the callback hooks): the batches are sharded over the processes.

    Cost per measurement, with :math:`B` batches (per process), in passes over one batch (F a forward, FB a forward
    and backward, HVP a forward, a graph-building backward and a double backward, roughly 4-5 F):

    - `"ascent"`: :math:`B` FB + :math:`B` F;
    - `"worst_case"`: :math:`(1 + \text{steps})\, B` FB at most;
    - `"average"`: :math:`B\,(1 + 2\,\text{samples})` F (antithetic pairs);
    - `"top_eigenvalue"`: :math:`\text{max\_iterations}\, B` HVP at most (twice that if the dominant eigenvalue is
      negative; with :math:`B = 1` the forward and first backward are done once);
    - `"trace"`: :math:`B` (F + backward) + :math:`\text{samples}\, B` double backward; with Hutch++
      (`"deflation_rank"` :math:`k > 0`) twice the F + backward and :math:`2k\, B` more double backwards;
    - `"alignment"`: :math:`B` FB, plus the `"top_eigenvalue"` cost unless its eigenvector is reused.

    Args:
        batches: a list of batches (dicts of tensors the model accepts, with labels).
        dataset, batch_size, num_batches, data_collator: or build them from the start of `dataset`.
        every_n_steps: measure at every multiple of this `global_step` (`None`: never during training).
        on_train_begin: measure when training starts, before the first optimizer step (`global_step` 0). A run
            resumed from a checkpoint is not measured again where it restarts: interrupted or not, a run logs the
            same steps.
        on_evaluate: measure after each evaluation as well (once per step: not again if already done at this step).
            With an evaluation every epoch this is one measurement per epoch: turn it off and use `every_n_steps`
            where the Hessian quantities cost more than the training between two evaluations.
        on_train_end: measure at the last step (`max_steps`, before the final evaluation and checkpoint), so a run
            whose length is not a multiple of `every_n_steps` still ends with a measurement; a run stopped early
            (e.g. `EarlyStoppingCallback`) is measured in `on_train_end`, unless `load_best_model_at_end` has
            replaced its weights by then.
        diagnostics: which quantities to measure: a sequence of names, or a mapping from names to their settings.
        rho: radius of the worst-case, ascent and average sharpness.
        worst_case_steps: ascent steps of `worst_case_sharpness` (its `steps`).
        max_iterations, tol: power iteration of `top_hessian_eigenvalue` and `"alignment"` (stopped when the residual
            :math:`\|Hv - \lambda v\| \le \text{tol}\, |\lambda|`; the defaults here trade accuracy for cost).
        samples: Monte-Carlo samples of `average_sharpness` and Hutchinson probes of `hessian_trace`.
        seed: seed of all random directions (the same directions at every measurement).
        eval_mode: measure in eval mode (dropout off), as recommended.
        trainer: the trainer whose `log` to call (settable later as `callback.trainer`).
    """

    def __init__(
        self,
        batches: Iterable[dict[str, Any]] | None = None,
        *,
        dataset: Any = None,
        batch_size: int = 8,
        num_batches: int = 1,
        data_collator: Callable[[list[Any]], dict[str, Any]] | None = None,
        every_n_steps: int | None = None,
        on_train_begin: bool = True,
        on_evaluate: bool = True,
        on_train_end: bool = True,
        diagnostics: Sequence[str] | Mapping[str, Mapping[str, Any] | None] = DEFAULT_DIAGNOSTICS,
        rho: float = 0.05,
        worst_case_steps: int = 5,
        max_iterations: int = 20,
        tol: float = 1e-3,
        samples: int = 10,
        seed: int = 0,
        eval_mode: bool = True,
        trainer: Trainer | None = None,
    ):
        if (batches is None) == (dataset is None):
            raise ValueError("Pass exactly one of `batches` and `dataset`.")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be a positive integer or None, got {every_n_steps}.")
        if dataset is not None and (batch_size < 1 or num_batches < 1 or num_batches * batch_size > len(dataset)):
            raise ValueError(
                f"Need 1 <= num_batches * batch_size <= len(dataset), got {num_batches} * {batch_size} for "
                f"{len(dataset)} examples."
            )
        shared = {
            "worst_case": {"rho": rho, "steps": worst_case_steps, "seed": seed},
            "ascent": {"rho": rho},
            "average": {"rho": rho, "samples": samples, "seed": seed},
            "top_eigenvalue": {"max_iterations": max_iterations, "tol": tol, "seed": seed},
            "trace": {"samples": samples, "seed": seed},
            "alignment": {"max_iterations": max_iterations, "tol": tol, "seed": seed},
        }
        overrides = _check_diagnostics(diagnostics)
        self._batches = list(batches) if batches is not None else None
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.data_collator = data_collator
        self.every_n_steps = every_n_steps
        self.run_on_train_begin = on_train_begin  # not `self.on_train_begin` / `self.on_evaluate`: those are hooks
        self.run_on_evaluate = on_evaluate
        self.run_on_train_end = on_train_end
        self.diagnostics = tuple(name for name in DIAGNOSTICS if name in overrides)  # in measuring order
        self.settings: dict[str, dict[str, Any]] = {
            name: {**shared[name], **overrides[name]} for name in self.diagnostics
        }
        self.eval_mode = eval_mode
        self.trainer = trainer
        self._device_batches: tuple[torch.device, list[dict[str, Any]]] | None = None
        self._last_step: int | None = None
        self._warned_no_trainer = False

    # ------------------------------------------------------------------ hooks

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not self.run_on_train_begin:
            return
        if state.global_step != 0:
            return  # a resumed run: it logs what the uninterrupted run logs, not an extra point at its restart
        self._measure_and_log(state, kwargs["model"])

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        every = self.every_n_steps is not None and state.global_step % self.every_n_steps == 0
        # The last step is measured here, before the Trainer's final evaluation, checkpoint and `on_train_end` (by
        # then the reporting integrations have closed, and `load_best_model_at_end` has swapped the weights).
        last = self.run_on_train_end and state.max_steps > 0 and state.global_step >= state.max_steps
        if every or last:
            self._measure_and_log(state, kwargs["model"])

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.run_on_evaluate:
            self._measure_and_log(state, kwargs["model"])

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Only a run stopped before `max_steps` (early stopping) gets here unmeasured. Not with
        # `load_best_model_at_end`: the model is then the best checkpoint's, not the last step's.
        if not self.run_on_train_end or args.load_best_model_at_end:
            return
        keys = {f"sharpness/{name}" for name in self.diagnostics}
        if any(e.get("step") == state.global_step and keys & e.keys() for e in state.log_history):
            return  # measured at this step already (every_n_steps, an evaluation, or before a resume)
        self._measure_and_log(state, kwargs["model"])

    # ------------------------------------------------------------------ measuring

    def compute(self, model: nn.Module) -> dict[str, float]:
        """Measure the `diagnostics` on `model` now; returns `{"sharpness/<name>": value, ...}`."""
        batches = self._batches_on(_model_device(model))
        logs: dict[str, float] = {}
        eigenvector = None
        for name in self.diagnostics:  # top_eigenvalue before alignment
            kwargs = dict(self.settings[name])
            if name == "alignment" and eigenvector is not None and self._alignment_reuses_eigenvector():
                kwargs = {"eigenvector": eigenvector}
            result = FUNCTIONS[name](model, batches, eval_mode=self.eval_mode, **kwargs)
            if name == "top_eigenvalue":
                eigenvector = result.eigenvector
            logs[f"sharpness/{name}"] = result.value
            if result.stderr is not None:
                logs[f"sharpness/{name}_stderr"] = result.stderr
        return logs

    def _alignment_reuses_eigenvector(self) -> bool:
        """Whether `"alignment"` would compute the very eigenvector `"top_eigenvalue"` did."""
        top, alignment = self.settings["top_eigenvalue"], self.settings["alignment"]
        same = all(top[key] == alignment[key] for key in ("max_iterations", "tol", "seed"))
        return same and top.get("which", "algebraic") == "algebraic"

    def _measure_and_log(self, state: TrainerState, model: nn.Module) -> None:
        if self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        logs = self.compute(model)
        if self.trainer is not None:
            # `Trainer.log` clears `control.should_log` (`CallbackHandler.on_log`): from `on_step_end` at a logging
            # step, that would cancel the Trainer's own loss log for the step, whose window then runs on to the next.
            should_log = self.trainer.control.should_log
            self.trainer.log(logs)
            self.trainer.control.should_log = self.trainer.control.should_log or should_log
            return
        if not self._warned_no_trainer:
            logger.warning(
                "SharpnessCallback has no trainer attached: its values go to `state.log_history` only, not to the "
                "reporting integrations. Set `callback.trainer = trainer`."
            )
            self._warned_no_trainer = True
        state.log_history.append({**logs, "step": state.global_step})

    def _batches_on(self, device: torch.device) -> list[dict[str, Any]]:
        """The fixed batches on `device`, built and moved once."""
        if self._device_batches is None or self._device_batches[0] != device:
            if self._batches is None:
                self._batches = self._collate_from_dataset()
            moved = [
                {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in self._batches
            ]
            self._device_batches = (device, moved)
        return self._device_batches[1]

    def _collate_from_dataset(self) -> list[dict[str, Any]]:
        collator = self.data_collator
        if collator is None:
            collator = getattr(self.trainer, "data_collator", None) or default_data_collator
        return [
            collator([self.dataset[i] for i in range(start, start + self.batch_size)])
            for start in range(0, self.num_batches * self.batch_size, self.batch_size)
        ]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.requires_grad:
            return p.device
    return next(model.parameters()).device


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What each setting may hold, checked when the callback is built (before training), as (description, check).
_SETTING_VALUES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "rho": ("a number > 0", lambda v: _is_number(v) and v > 0),
    "steps": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "step_size": ("a number > 0", lambda v: _is_number(v) and v > 0),
    "tol": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "seed": ("an integer", _is_int),
    "samples": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "antithetic": ("true or false", lambda v: isinstance(v, bool)),
    "max_iterations": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "which": ("'algebraic' or 'magnitude'", lambda v: v in ("algebraic", "magnitude")),
    "deflation_rank": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
}


def _check_diagnostics(
    diagnostics: Sequence[str] | Mapping[str, Mapping[str, Any] | None],
) -> dict[str, dict[str, Any]]:
    """`{name: per-diagnostic settings}` from a sequence of names or a mapping; `ValueError` naming what is wrong."""
    if isinstance(diagnostics, str):
        raise ValueError(
            f"`diagnostics` must be a sequence or mapping of names among {DIAGNOSTICS}, got {diagnostics!r}."
        )
    items = diagnostics.items() if isinstance(diagnostics, Mapping) else [(name, None) for name in diagnostics]
    overrides: dict[str, dict[str, Any]] = {}
    for name, settings in items:
        if name not in DIAGNOSTICS:
            raise ValueError(f"`diagnostics` has an unknown name {name!r}: the names are {DIAGNOSTICS}.")
        if name in overrides:
            raise ValueError(f"`diagnostics` names {name!r} twice.")
        if settings is not None and not isinstance(settings, Mapping):
            raise ValueError(
                f"`diagnostics[{name!r}]` must be a mapping of settings (or None), got {type(settings).__name__}."
            )
        unknown = sorted(set(settings or {}) - set(SETTINGS[name]))
        if unknown:
            raise ValueError(
                f"`diagnostics[{name!r}]` has unknown settings {unknown}: {name!r} accepts {SETTINGS[name]}."
            )
        for key, value in (settings or {}).items():
            allowed, check = _SETTING_VALUES[key]
            if not check(value):
                raise ValueError(f"`diagnostics[{name!r}][{key!r}]` must be {allowed}, got {value!r}.")
        overrides[name] = dict(settings or {})
    if not overrides:
        raise ValueError(f"`diagnostics` must name at least one of {DIAGNOSTICS}.")
    return overrides
