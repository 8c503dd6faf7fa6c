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
Symmetric label noise, and a callback that shows a model memorising it.

SAM's largest published gains are under label noise (Foret et al. 2021, https://huggingface.co/papers/2010.01412,
section 3.3; Baek, Kolter & Raghunathan 2024, https://huggingface.co/papers/2402.09553: SAM slows down the fitting of
the mislabelled examples, and its accuracy at the best epoch is far above SGD's). `flip_labels` makes that setting:
of N examples with K classes, exactly n = round(rate * N) (Python's `round`, half to even) chosen uniformly without
replacement get a label drawn uniformly from the K - 1 *other* classes (symmetric noise: P(noisy = j | true = i) =
rate / (K - 1) for every j != i). `MemorisationCallback` logs, at each evaluation, how many flipped training examples
the model predicts with their noisy label (memorised) and with their true label, and its accuracy on the clean ones.
"""

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback


logger = logging.getLogger(__name__)


def check_label_noise_rate(rate: float, flag: str = "--label_noise") -> None:
    """A `ValueError` naming `flag` unless 0 <= `rate` < 1."""
    if not (isinstance(rate, int | float) and 0.0 <= rate < 1.0):
        raise ValueError(f"`{flag}` is the fraction of training labels to flip: it must be in [0, 1), got {rate!r}.")


def flip_labels(labels, num_classes: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """
    `(noisy_labels, flipped_indices)`: a copy of the class ids `labels` (0..`num_classes`-1) where exactly
    round(`rate` * N) examples, chosen without replacement, get a label drawn uniformly from the other classes, and
    the sorted indices of those examples. Deterministic for a `seed` on every platform: numpy's `Generator` with the
    PCG64 bit generator, first `choice` of the indices, then one `integers(1, K)` offset per flipped example (its new
    label is (true + offset) mod K, uniform over the K - 1 others).
    """
    check_label_noise_rate(rate)
    labels = np.asarray(labels, dtype=np.int64)
    if num_classes < 2:
        raise ValueError(f"`--label_noise` needs at least 2 classes to flip a label between, got {num_classes}.")
    if labels.ndim != 1 or (len(labels) and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"`labels` must be a 1-D array of class ids 0..{num_classes - 1}.")
    rng = np.random.Generator(np.random.PCG64(seed))
    count = round(rate * len(labels))
    flipped = np.sort(rng.choice(len(labels), size=count, replace=False))
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, size=count)) % num_classes
    return noisy, flipped


def memorisation_subset(
    noisy_labels, true_labels, max_per_group: int = 512, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """
    `(flipped, clean)`: sorted indices of at most `max_per_group` examples whose noisy label differs from the true
    one, and of at most `max_per_group` whose labels agree, each a uniform draw without replacement (PCG64, `seed`).
    """
    noisy_labels, true_labels = np.asarray(noisy_labels), np.asarray(true_labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    groups = []
    for mask in (noisy_labels != true_labels, noisy_labels == true_labels):
        indices = np.flatnonzero(mask)
        if len(indices) > max_per_group:
            indices = np.sort(rng.choice(indices, size=max_per_group, replace=False))
        groups.append(indices)
    return groups[0], groups[1]


class MemorisationCallback(TrainerCallback):
    """
    At each evaluation, logs how far the model has memorised the flipped labels of its training data, on a fixed
    random subset of the training examples (`memorisation_subset`: up to `max_per_group` flipped and as many clean
    ones, not the whole training set, to keep it cheap), fed without augmentation (pass the training data with the
    evaluation transform):

    - `memorisation/flipped_noisy_accuracy`: the fraction of the flipped examples predicted as their noisy
      (training) label, i.e. memorised;
    - `memorisation/flipped_true_accuracy`: the fraction of them still predicted as their true label;
    - `memorisation/clean_accuracy`: the accuracy on the examples whose label was not flipped.

    `dataset[i]` must be one example the `collate_fn` batches (its `labels`/`label` key is ignored: `noisy_labels` and
    `true_labels`, aligned with `dataset`, are the labels). The values go through `trainer.log` (so they reach
    `trainer_state.json` and the reporting integrations) when `trainer` is set, else to `state.log_history`. Every
    process computes the same values on the whole subset.
    """

    PREFIX = "memorisation/"

    def __init__(
        self,
        dataset: Any,
        noisy_labels,
        true_labels,
        collate_fn: Callable[[list], dict],
        *,
        max_per_group: int = 512,
        batch_size: int = 256,
        seed: int = 0,
        trainer: Any = None,
    ):
        self.noisy_labels, self.true_labels = np.asarray(noisy_labels), np.asarray(true_labels)
        if not len(self.noisy_labels) == len(self.true_labels) == len(dataset):
            raise ValueError(
                f"`dataset`, `noisy_labels` and `true_labels` must have one entry per example, got {len(dataset)}, "
                f"{len(self.noisy_labels)} and {len(self.true_labels)}."
            )
        self.flipped, self.clean = memorisation_subset(self.noisy_labels, self.true_labels, max_per_group, seed)
        self.dataset, self.collate_fn, self.batch_size, self.trainer = dataset, collate_fn, batch_size, trainer
        self._last_step: int | None = None
        logger.info(
            f"Memorisation of the flipped labels: measured at each evaluation on a fixed random subset of "
            f"{len(self.flipped)} flipped and {len(self.clean)} clean training examples (of {len(dataset)})."
        )

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, indices: np.ndarray) -> np.ndarray:
        """The predicted class (argmax of the logits) of the examples `indices` of `dataset`, in eval mode."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        predictions = []
        try:
            for start in range(0, len(indices), self.batch_size):
                batch = self.collate_fn([self.dataset[int(i)] for i in indices[start : start + self.batch_size]])
                inputs = {
                    k: v.to(device) for k, v in batch.items() if k not in ("labels", "label") and torch.is_tensor(v)
                }
                logits = model(**inputs)["logits"]  # a `ModelOutput` or a dict
                predictions.append(logits.argmax(dim=-1).cpu().numpy())
        finally:
            model.train(was_training)
        return np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)

    def compute(self, model: torch.nn.Module) -> dict[str, float]:
        """The three accuracies now (a group with no example is left out)."""
        logs = {}
        if len(self.flipped):
            predicted = self.predict(model, self.flipped)
            logs[self.PREFIX + "flipped_noisy_accuracy"] = float((predicted == self.noisy_labels[self.flipped]).mean())
            logs[self.PREFIX + "flipped_true_accuracy"] = float((predicted == self.true_labels[self.flipped]).mean())
        if len(self.clean):
            predicted = self.predict(model, self.clean)
            logs[self.PREFIX + "clean_accuracy"] = float((predicted == self.true_labels[self.clean]).mean())
        return logs

    def on_evaluate(self, args, state, control, **kwargs):
        if self._last_step == state.global_step:
            return  # the recipe's final evaluation after training: measured at this step already
        self._last_step = state.global_step
        logs = self.compute(kwargs["model"])
        if self.trainer is not None:
            self.trainer.log(logs)
        else:
            state.log_history.append({**logs, "step": state.global_step})
