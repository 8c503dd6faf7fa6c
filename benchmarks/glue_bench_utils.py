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
local TSV files, reusing the data loading and metrics of `recipes/run_glue.py` (no Hub, no copy of the data).
"""

import importlib.util
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE_DIR = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "glue"))
TASK_DIRS = {"mrpc": "MRPC", "rte": "RTE"}
MAJORITY = {"mrpc": 0.684, "rte": 0.527}  # dev-set majority-class accuracy (recipes/results.md)


def load_run_glue():
    """`recipes/run_glue.py` as a module (the recipes are scripts, not a package)."""
    path = os.path.join(REPO_ROOT, "recipes", "run_glue.py")
    spec = importlib.util.spec_from_file_location("hf_sam_recipe_run_glue", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class GlueData:
    task: str
    tokenizer: Any
    train: Any
    validation: Any
    collator: Any
    model_path: str
    num_labels: int

    def compute_metrics(self, prediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return RUN_GLUE.glue_metrics(self.task, np.argmax(logits, axis=1), prediction.label_ids)

    def new_model(self):
        """A fresh model: call `transformers.set_seed` first so the classifier head is the same in every run."""
        return AutoModelForSequenceClassification.from_pretrained(self.model_path, num_labels=self.num_labels)


RUN_GLUE = load_run_glue()


def load_glue(task: str, data_dir: str | None, max_train_samples: int | None, max_seq_length: int) -> GlueData:
    """Tokenized train (first `max_train_samples` rows) and full dev split of a GLUE task from its TSV files."""
    data_dir = data_dir or os.path.join(GLUE_DIR, TASK_DIRS[task])
    raw = RUN_GLUE.load_glue_tsv(task, data_dir)
    key1, key2 = RUN_GLUE.TASK_TO_KEYS[task]
    model_path = RUN_GLUE.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def tokenize(batch):
        return tokenizer(batch[key1], batch[key2], truncation=True, max_length=max_seq_length)

    columns = [c for c in raw["train"].column_names if c != "label"]
    data = raw.map(tokenize, batched=True, remove_columns=columns)
    train = data["train"]
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    num_labels = len(set(raw["train"]["label"]))
    return GlueData(
        task, tokenizer, train, data["validation"], DataCollatorWithPadding(tokenizer), model_path, num_labels
    )


def environment() -> str:
    return (
        f"{platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} thread(s)), "
        f"transformers {transformers.__version__}, {os.cpu_count()} CPU cores (shared with other jobs)"
    )
