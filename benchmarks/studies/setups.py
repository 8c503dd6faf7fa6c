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
The recipe set-ups the studies run, as data: hyperparameters, tasks, the method names, and the command-line arguments
of one run of `recipes/run_glue.py`, `recipes/run_image_classification.py` or `recipes/peer_glue.py`.
"""

import json
import os
from dataclasses import dataclass


# task: (folder in the data folder's `glue/`, GLUE metrics as (key, label)); the first metric ranks a sweep with the
# others, and the report shows each.
GLUE_TASKS = {
    "rte": ("RTE", [("accuracy", "accuracy")]),
    "mrpc": ("MRPC", [("accuracy", "accuracy"), ("f1", "F1")]),
    "cola": ("CoLA", [("matthews_correlation", "Matthews corr.")]),
    "stsb": ("STS-B", [("pearson", "Pearson"), ("spearmanr", "Spearman")]),
}
# Every GLUE run: all-MiniLM-L6-v2 (the recipe's default model), dynamic padding. Flag name: value, in command order.
GLUE_SETUP = {
    "max_seq_length": "128", "per_device_train_batch_size": "32", "per_device_eval_batch_size": "128",
    "learning_rate": "5e-5", "warmup_steps": "0.1", "weight_decay": "0.01", "num_train_epochs": "5",
    "eval_strategy": "epoch", "logging_steps": "20",
}  # fmt: skip
GLUE_LR = float(GLUE_SETUP["learning_rate"])
GLUE_HELD_OUT = ["--validation_split_percentage", "10", "--validation_split_seed", "0"]

# Every image run: a small ViT from scratch on the CIFAR-10 subset (5,000 train / 2,000 test images) with the recipe's
# crop and flip augmentation.
VIT_CONFIG = {
    "image_size": 32, "patch_size": 4, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "intermediate_size": 256,
}  # fmt: skip
IMAGE_SETUP = {
    "model_type": "vit", "config_overrides": ",".join(f"{key}={value}" for key, value in VIT_CONFIG.items()),
    "per_device_train_batch_size": "64", "per_device_eval_batch_size": "256", "learning_rate": "1e-3",
    "weight_decay": "0.05", "warmup_steps": "0.1", "lr_scheduler_type": "cosine", "num_train_epochs": "60",
    "eval_strategy": "epoch", "logging_steps": "20",
}  # fmt: skip
IMAGE_HELD_OUT = ["--train_val_split", "0.1"]

# What every recipe run does besides training: evaluate, checkpoint every epoch (to resume), no loggers, no bars.
RUN_FLAGS = [
    "--do_train", "--do_eval", "--save_strategy", "epoch", "--save_total_limit", "1", "--report_to", "none",
    "--disable_tqdm", "true",
]  # fmt: skip

PEER_METHOD = "SAM-pytorch_optimizer"  # `recipes/peer_glue.py`: pytorch_optimizer's SAM in a plain loop
METHOD_ORDER = (
    "AdamW", "SAM", "F-SAM", "LookSAM-k5", "LookSAM-k5-a0.1", "SAM-interval5", "GSAM", "VaSSO", "AE-SAM", PEER_METHOD,
    "USAM",
)  # fmt: skip

# Sharpness (Wen, Ma & Li 2023) of the training loss: the trace by Hutch++ with the 5 largest directions deflated and
# 30 probes; power iteration up to 30 steps, its eigenvector reused for the alignment.
SHARPNESS_SETTINGS = {
    "top_eigenvalue": {"max_iterations": 30},
    "alignment": {"max_iterations": 30},
    "trace": {"samples": 30, "deflation_rank": 5},
}


@dataclass(frozen=True)
class Sharpness:
    """A `SharpnessCallback` set-up of the recipes: what is measured, on which examples, how often."""

    every_n_steps: int
    batch_size: int
    num_batches: int = 1
    data: str = "train"
    diagnostics: str = "top_eigenvalue,trace,ascent,alignment"
    settings: str = json.dumps(SHARPNESS_SETTINGS, separators=(",", ":"))

    def flags(self) -> list[str]:
        return [
            "--sharpness_every_n_steps", str(self.every_n_steps), "--sharpness_num_batches", str(self.num_batches),
            "--sharpness_batch_size", str(self.batch_size), "--sharpness_data", self.data,
            "--sharpness_diagnostics", self.diagnostics, "--sharpness_settings", self.settings,
        ]  # fmt: skip

    def measured_on(self) -> dict:
        """What the record keeps: the examples and the settings (the trace estimator's among them)."""
        return {
            "data": self.data,
            "num_batches": self.num_batches,
            "batch_size": self.batch_size,
            "settings": json.loads(self.settings),
        }


def method_flags(method: str, rho: float) -> list[str]:
    """The SAMConfig flags of a method name of the studies."""
    return {
        "AdamW": ["--method", "sam", "--rho", "0"],
        "SAM": ["--method", "sam", "--rho", str(rho)],
        "F-SAM": ["--method", "fsam", "--rho", str(rho)],
        "LookSAM-k5": ["--method", "looksam", "--interval", "5", "--rho", str(rho)],
        "SAM-interval5": ["--method", "sam", "--interval", "5", "--rho", str(rho)],
        # alpha 0.1: the paper's 0.7 stalled the ViT at batch 64, 0-0.1 trained (docs/sharpness.md)
        "LookSAM-k5-a0.1": ["--method", "looksam", "--looksam_k", "5", "--looksam_alpha", "0.1", "--rho", str(rho)],
        "GSAM": ["--method", "gsam", "--rho", str(rho)],  # the registry's defaults for alpha and rho_min
        "VaSSO": ["--method", "vasso", "--rho", str(rho)],
        "AE-SAM": ["--method", "aesam", "--rho", str(rho)],
        PEER_METHOD: ["--rho", str(rho)],
        "USAM": ["--method", "sam", "--normalize", "false", "--rho", str(rho)],  # e = rho * g (Dai, Ahn & Sra 2023)
    }[method]


def setup_flags(setup: dict[str, str], learning_rate: float | None = None) -> list[str]:
    """`--name value` of a set-up, its learning rate replaced by `learning_rate` when given."""
    if learning_rate is not None:
        setup = setup | {"learning_rate": f"{learning_rate:g}"}
    return [part for name, value in setup.items() for part in (f"--{name}", value)]


def recipe_argv(run, data_dir: str) -> list[str]:
    """The recipe arguments of a `plan.Run` (its `--output_dir` aside), with the data in `data_dir`."""
    if run.recipe == "peer_glue":  # a plain loop: no Trainer flags, evaluates every epoch by itself
        argv = ["--task_name", run.task, "--data_dir", os.path.join(data_dir, "glue", GLUE_TASKS[run.task][0])]
        setup = {name: value for name, value in GLUE_SETUP.items() if name != "eval_strategy"}
        return (
            argv
            + setup_flags(setup, run.learning_rate)
            + method_flags(run.method, run.rho)
            + ["--seed", str(run.seed)]
        )
    if run.recipe == "run_glue":
        argv = ["--task_name", run.task, "--data_dir", os.path.join(data_dir, "glue", GLUE_TASKS[run.task][0])]
        argv += setup_flags(GLUE_SETUP, run.learning_rate) + (GLUE_HELD_OUT if run.held_out else [])
    elif run.recipe == "run_image_classification":
        cifar = os.path.join(data_dir, "cifar10-small")
        argv = ["--train_file", os.path.join(cifar, "train.parquet")]
        argv += IMAGE_HELD_OUT if run.held_out else ["--validation_file", os.path.join(cifar, "test.parquet")]
        argv += setup_flags(IMAGE_SETUP, run.learning_rate)
    else:
        raise ValueError(f"unknown recipe {run.recipe!r}")
    argv += list(run.extra_flags) + method_flags(run.method, run.rho) + RUN_FLAGS + ["--seed", str(run.seed)]
    return argv


def default_learning_rate(recipe: str) -> float:
    """The learning rate a recipe's set-up runs at when a study does not choose one."""
    return float((IMAGE_SETUP if recipe == "run_image_classification" else GLUE_SETUP)["learning_rate"])


def task_metrics(task: str) -> list[tuple[str, str]]:
    """The task's metrics as (key, label): GLUE's, or accuracy for the CIFAR-10 subset."""
    return [("accuracy", "accuracy")] if task == "cifar10" else GLUE_TASKS[task][1]


def task_label(task: str) -> str:
    return "CIFAR-10 subset" if task == "cifar10" else GLUE_TASKS[task][0]


def task_score(task: str, metrics: dict) -> float:
    """The mean of the task's metrics (`eval_<key>` in `metrics`): what a sweep ranks."""
    keys = [key for key, _ in task_metrics(task)]
    return sum(metrics[f"eval_{key}"] for key in keys) / len(keys)


def score_by_epoch(record: dict) -> dict[int, float]:
    """The held-out score after each epoch of a run (the task's metrics averaged)."""
    scores = {}
    for log in record["eval_history"]:
        scores.setdefault(round(log["epoch"]), task_score(record["task"], log))
    return scores


def best_epoch(record: dict) -> int:
    """The epoch of a run's best score (`score_by_epoch`; a sweep run's: on its held-out split); a tie: the earliest."""
    scores = score_by_epoch(record)
    return max(scores, key=lambda epoch: (scores[epoch], -epoch))


def at_epoch(record: dict, epoch: int, key: str = "eval_accuracy") -> float | None:
    """`key` of the evaluation at the end of `epoch`, or None when the run did not log it."""
    values = [log[key] for log in record["eval_history"] if round(log["epoch"]) == epoch and key in log]
    return values[-1] if values else None


def last_third_gain(record: dict, span: int = 3) -> tuple[float, float, list[int], list[int]] | None:
    """
    Whether a run still learned at its end: its held-out score (`score_by_epoch`) averaged over the `span`
    evaluations centred on two thirds of training and over its last `span` (one evaluation on a few hundred examples
    is noisy): (mean there, mean at the end, those epochs, these epochs); None with fewer than 2 * `span` evaluations.
    """
    scores = score_by_epoch(record) if record.get("eval_history") else {}
    epochs = sorted(scores)
    if len(epochs) < 2 * span:
        return None
    middle = min(range(len(epochs)), key=lambda i: abs(epochs[i] - 2 * epochs[-1] / 3))
    start = min(max(middle - span // 2, 0), len(epochs) - 2 * span)
    early, late = epochs[start : start + span], epochs[-span:]
    return sum(scores[e] for e in early) / span, sum(scores[e] for e in late) / span, early, late
