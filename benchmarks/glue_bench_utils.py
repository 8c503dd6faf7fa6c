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
Shared by `benchmarks/sharpness_demo.py` and `benchmarks/looksam_accuracy.py`: a small GLUE fine-tuning set-up on the
local TSV files, with the data loading, tokenization and metrics of `recipes/run_glue.py` (`hf_sam.scripts.glue`; no
Hub, no copy of the data). The benchmarks run as scripts, so Python finds this module next to them.
"""

import os
import platform
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_sam.scripts.glue import TASK_TO_KEYS, default_model_path, glue_metrics, load_glue_tsv, tokenize_glue


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE_DIR = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "glue"))
TASK_DIRS = {"mrpc": "MRPC", "rte": "RTE"}
MAJORITY = {"mrpc": 0.684, "rte": 0.527}  # dev-set majority-class accuracy


@dataclass
class GlueData:
    """A tokenized GLUE task: its splits, tokenizer, collator, and the model to fine-tune (path, number of labels)."""

    task: str
    tokenizer: Any
    train: Any
    validation: Any
    collator: Any
    model_path: str
    num_labels: int

    def compute_metrics(self, prediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return glue_metrics(self.task, np.argmax(logits, axis=1), prediction.label_ids)

    def new_model(self):
        """A fresh model: call `transformers.set_seed` first so the classifier head is the same in every run."""
        return AutoModelForSequenceClassification.from_pretrained(self.model_path, num_labels=self.num_labels)

    def trainer_kwargs(self) -> dict[str, Any]:
        """The data arguments of a `SAMTrainer` on this task: datasets, tokenizer, collator, metrics."""
        return dict(
            train_dataset=self.train,
            eval_dataset=self.validation,
            processing_class=self.tokenizer,
            data_collator=self.collator,
            compute_metrics=self.compute_metrics,
        )


def load_glue(task: str, data_dir: str | None, max_train_samples: int | None, max_seq_length: int) -> GlueData:
    """Tokenized train (first `max_train_samples` rows) and full dev split of a GLUE task from its TSV files."""
    data_dir = data_dir or os.path.join(GLUE_DIR, TASK_DIRS[task])
    raw = load_glue_tsv(task, data_dir)
    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = tokenize_glue(raw, tokenizer, *TASK_TO_KEYS[task], max_seq_length)
    train = data["train"]
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    num_labels = len(set(raw["train"]["label"]))
    return GlueData(
        task, tokenizer, train, data["validation"], DataCollatorWithPadding(tokenizer), model_path, num_labels
    )


def environment() -> str:
    """The machine and versions a benchmark ran on, in one line."""
    return (
        f"{platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} thread(s)), "
        f"transformers {transformers.__version__}, {os.cpu_count()} CPU cores (shared with other jobs)"
    )
