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
`--label_noise` in the recipes: the flags, flipping the labels of a `datasets.Dataset` (keeping the true ones in a
column), `label_noise.json`, and the evaluation metrics of a classifier (accuracy against the labels it is evaluated
on and, on a held-out split carved from noisy training data, against the true labels; calibration).
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, Value

from ..calibration import calibration_metrics, cross_fitted_temperature_metrics
from ..label_noise import check_label_noise_rate, flip_labels


TRUE_LABEL_COLUMN = "__true_label__"
LABEL_NOISE_FILE = "label_noise.json"


@dataclass
class LabelNoiseArguments:
    """The label-noise flags of the recipes (mixed into their `ScriptArguments`)."""

    label_noise: float = field(
        default=0.0,
        metadata={
            "help": "Symmetric label noise: this fraction (in [0, 1)) of the training examples, as loaded and before "
            "any held-out split is carved from them, get a label drawn uniformly from the other classes. "
            "Classification only; the evaluation (dev/test) data is never touched. Recorded in "
            "`label_noise.json`, with the flipped examples' indices."
        },
    )
    label_noise_seed: int = field(default=0, metadata={"help": "Seed of `label_noise` (which labels, and to what)."})

    def check_label_noise(self) -> None:
        check_label_noise_rate(self.label_noise)


def add_label_noise(
    dataset: Dataset,
    column: str,
    num_classes: int,
    rate: float,
    seed: int,
    to_id: Callable[[Any], int] = int,
    from_id: Callable[[int], Any] = int,
) -> tuple[Dataset, dict]:
    """
    `(dataset, record)`: `dataset` with the label `column` flipped by `hf_sam.label_noise.flip_labels` (its values
    mapped to class ids by `to_id` and back by `from_id`; the column keeps its feature) and the true class ids in a
    `TRUE_LABEL_COLUMN` column; `record` is what `label_noise.json` holds: `rate`, `seed`, `count`, `num_examples`,
    `num_classes`, `rng` and `flipped_indices` (indices into `dataset`).
    """
    if num_classes < 2:
        raise ValueError(
            f"`--label_noise {rate}` needs at least 2 classes to flip labels between; the data has {num_classes}."
        )
    true_ids = np.array([to_id(value) for value in dataset[column]], dtype=np.int64)
    noisy_ids, flipped = flip_labels(true_ids, num_classes, rate, seed)
    feature = dataset.features[column]
    noisy = dataset.add_column("__noisy__", [from_id(int(i)) for i in noisy_ids], feature=feature)
    noisy = noisy.remove_columns(column).rename_column("__noisy__", column).select_columns(dataset.column_names)
    noisy = noisy.add_column(TRUE_LABEL_COLUMN, true_ids.tolist(), feature=Value("int64"))
    record = {
        "rate": rate,
        "seed": seed,
        "count": len(flipped),
        "num_examples": len(dataset),
        "num_classes": num_classes,
        "rng": "numpy.random.Generator(PCG64(seed))",
        "flipped_indices": flipped.tolist(),
    }
    return noisy, record


def write_label_noise_json(output_dir: str, record: dict) -> str:
    """Write `record` to `output_dir/label_noise.json`; returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LABEL_NOISE_FILE)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return path


def classification_metrics(logits, labels, true_labels=None) -> dict[str, float]:
    """
    `accuracy` of the argmax of `logits` against `labels`; with `true_labels` (the clean labels of evaluation data
    whose `labels` are noisy, aligned with them), `clean_accuracy` against those; then the calibration metrics
    against `labels` (`hf_sam.calibration`: `nll`, `ece`, `brier`, and `temperature`, `nll_ts`, `ece_ts`, `brier_ts`
    by 2-fold cross-fitted temperature scaling on these same examples, none scored with a temperature fitted on it).
    """
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    predictions = np.argmax(logits, axis=1)
    metrics = {"accuracy": float((predictions == labels).mean())}
    if true_labels is not None:
        true_labels = np.asarray(true_labels)
        if len(true_labels) != len(labels):
            raise ValueError(f"{len(true_labels)} true labels for {len(labels)} evaluated examples.")
        metrics["clean_accuracy"] = float((predictions == true_labels).mean())
    return {**metrics, **calibration_metrics(logits, labels), **cross_fitted_temperature_metrics(logits, labels)}
