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
Train an image classifier with SAM / F-SAM: transformers' `run_image_classification.py`, plus the SAMConfig flags.

Data: a Hub dataset by name (`--dataset_name uoft-cs/cifar10`), `imagefolder` directories (`--train_dir`,
`--validation_dir`: one sub-folder per class), or parquet files (`--train_file`, `--validation_file`, e.g. a Hub
dataset's parquet export). The image and label columns are found by name (`image` or `img`, `label` or `labels`) or
given with `--image_column_name` / `--label_column_name`. Model: fine-tune any checkpoint
`AutoModelForImageClassification` loads (`--model_name_or_path`), or train one from scratch from a config
(`--model_type vit --config_overrides image_size=32,patch_size=4,...`).

Every image gets the image processor's geometry (resize, and centre crop where the processor has one) and
normalisation; training images also get the standard CIFAR augmentation (random crop with zero padding, horizontal
flip) in between. All are torch ops (no torchvision needed). Every image used is decoded once before the model is
loaded: one that does not decode stops the run with its row and file, or is dropped with `--skip_corrupt_images`.

Offline, on a CPU, a small ViT from scratch on the CIFAR-10 subset of ../shared/data:

    python recipes/run_image_classification.py --config recipes/configs/cifar10_vit_sam.yaml \
        --output_dir runs/cifar10-vit-sam

A pretrained ViT from the Hub, on one or many GPUs:

    accelerate launch recipes/run_image_classification.py --dataset_name uoft-cs/cifar10 \
        --model_name_or_path google/vit-base-patch16-224-in21k --method sam --rho 0.05 \
        --do_train --do_eval --bf16 --output_dir runs/cifar10-vit-base-sam

`--label_noise 0.4` flips 40% of the training labels (symmetric noise, before `--train_val_split` carves the
held-out split, whose accuracy against the true labels is logged as `eval_clean_accuracy`); the memorisation of the
flipped labels is logged at each evaluation as `memorisation/*` (`hf_sam.label_noise`). Every evaluation reports the
calibration metrics of `hf_sam.calibration` (`eval_nll`, `eval_ece`, `eval_brier`, and after temperature scaling).

`--config recipe.yaml` reads defaults from a YAML file; flags on the command line override them. Rerunning a
command whose `--output_dir` holds checkpoints resumes from the last complete one.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from datasets import DatasetDict, load_dataset
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    TrainingArguments,
    set_seed,
)

from hf_sam import SAMConfig, SAMTrainer
from hf_sam.checkpointing import lock_output_dir
from hf_sam.label_noise import MemorisationCallback
from hf_sam.scripts.image import (
    IMAGE_COLUMN_CANDIDATES,
    LABEL_COLUMN_CANDIDATES,
    VALIDATION_SPLIT_NAMES,
    build_image_processor,
    collate_fn,
    drop_undecodable_images,
    find_column,
    make_transforms,
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

    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset on the Hub (e.g. `uoft-cs/cifar10`), loaded with `load_dataset`."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    train_dir: str | None = field(
        default=None, metadata={"help": "An `imagefolder` directory with the training images (one folder per class)."}
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "An `imagefolder` directory with the evaluation images."}
    )
    train_file: str | None = field(default=None, metadata={"help": "A parquet file with the training data."})
    validation_file: str | None = field(default=None, metadata={"help": "A parquet file with the evaluation data."})
    image_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the images. Default: `image` or `img`, whichever exists."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the labels. Default: `label` or `labels`, whichever exists."}
    )
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of the training data held out when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N evaluation examples."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint to fine-tune (Hub id or path). Without it, `model_type`."}
    )
    model_type: str | None = field(
        default=None, metadata={"help": "Train this architecture from scratch (e.g. `vit`) from its default config."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "With `model_type`: comma-separated config overrides, e.g. "
            "`image_size=32,patch_size=4,hidden_size=192,num_hidden_layers=6`."
        },
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor to load. Default: the one of `model_name_or_path`."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Replace a pretrained classification head with a different number of labels."}
    )
    random_crop_padding: int = field(
        default=4, metadata={"help": "Training augmentation: zero-pad by this many pixels, then crop back (0: off)."}
    )
    horizontal_flip: bool = field(
        default=True, metadata={"help": "Training augmentation: flip images horizontally with probability 1/2."}
    )
    skip_corrupt_images: bool = field(
        default=False,
        metadata={
            "help": "Drop the images that do not decode (counted in a warning) instead of stopping with an error "
            "that lists them. Every image used is decoded once before training either way."
        },
    )

    def __post_init__(self):
        sources = [
            name
            for name, value in (
                ("dataset_name", self.dataset_name),
                ("train_dir", self.train_dir),
                ("train_file", self.train_file),
            )
            if value is not None
        ]
        if len(sources) != 1:
            raise ValueError(
                "Pass exactly one data source: `dataset_name` (Hub), `train_dir` (imagefolder) or `train_file` "
                f"(parquet); got {sources or 'none'}."
            )
        if self.validation_dir is not None and self.train_dir is None:
            raise ValueError("`validation_dir` needs `train_dir`.")
        if self.validation_file is not None and self.train_file is None:
            raise ValueError("`validation_file` needs `train_file`.")
        if (self.model_name_or_path is None) == (self.model_type is None):
            raise ValueError("Pass exactly one of `model_name_or_path` (fine-tune) and `model_type` (from scratch).")
        if self.config_overrides is not None and self.model_type is None:
            raise ValueError("`config_overrides` only applies to a model trained from scratch (`model_type`).")
        if self.model_type is not None and self.model_type not in CONFIG_MAPPING:
            raise ValueError(f"Unknown `model_type` {self.model_type!r}; e.g. `vit`.")
        if not 0.0 < self.train_val_split < 1.0:
            raise ValueError(f"`train_val_split` must be in (0, 1), got {self.train_val_split!r}.")
        check_positive(self, "max_train_samples", "max_eval_samples", *SHARPNESS_FLAGS)
        sharpness_diagnostics(self)  # a bad name, setting or JSON fails here, before any loading
        if self.random_crop_padding < 0:
            raise ValueError(f"`random_crop_padding` must be >= 0, got {self.random_crop_padding!r}.")
        self.check_label_noise()


def load_raw_datasets(args: ScriptArguments) -> DatasetDict:
    """Load the data (Hub, imagefolder or parquet) as a `DatasetDict` with a `train` and maybe a validation split."""
    if args.dataset_name is not None:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
    elif args.train_dir is not None:
        data_files = {"train": os.path.join(args.train_dir, "**")}
        if args.validation_dir is not None:
            data_files["validation"] = os.path.join(args.validation_dir, "**")
        for split, directory in (("train", args.train_dir), ("validation", args.validation_dir)):
            if directory is not None and not os.path.isdir(directory):
                raise FileNotFoundError(f"The {split} directory {directory} does not exist.")
        raw = load_dataset("imagefolder", data_files=data_files)
    else:
        data_files = {"train": args.train_file}
        if args.validation_file is not None:
            data_files["validation"] = args.validation_file
        for path in data_files.values():
            if not path.endswith(".parquet"):
                raise ValueError(f"`train_file` / `validation_file` must be parquet files, got {path!r}.")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found.")
        raw = load_dataset("parquet", data_files=data_files)
    if "train" not in raw:
        raise ValueError(f"The data has no `train` split; its splits are {list(raw)}.")
    return raw


def with_validation_split(raw: DatasetDict, train_val_split: float) -> DatasetDict:
    """`train` and `validation`: the data's validation split, or `train_val_split` of `train` held out (seed 0)."""
    validation = next((name for name in VALIDATION_SPLIT_NAMES if name in raw), None)
    if validation is None:
        split = raw["train"].train_test_split(test_size=train_val_split, seed=0)
        return DatasetDict(train=split["train"], validation=split["test"])
    return DatasetDict(train=raw["train"], validation=raw[validation])


def main(script_args: ScriptArguments, sam_config: SAMConfig, training_args: TrainingArguments) -> dict:
    setup_logging(training_args)
    lock_output_dir(training_args.output_dir, training_args.process_index)  # before anything is read or written there
    checkpoint = checkpoint_to_resume(training_args, script_args.overwrite_output_dir, sam_config)
    set_seed(training_args.seed)
    # The images are decoded and augmented on the fly by `with_transform`: the Trainer must keep the raw columns.
    training_args.remove_unused_columns = False

    # Data first, checked before any model is loaded.
    raw = load_raw_datasets(script_args)
    image_column = label_column = None
    for split in raw:
        columns = raw[split].column_names
        image_column = find_column(columns, script_args.image_column_name, IMAGE_COLUMN_CANDIDATES, "image", split)
        label_column = find_column(columns, script_args.label_column_name, LABEL_COLUMN_CANDIDATES, "label", split)
    labels, label_to_id = class_labels(raw, label_column)
    raw = DatasetDict({split: raw[split].select_columns([image_column, label_column]) for split in raw}).rename_column(
        label_column, "__label__"
    )
    to_id = int if label_to_id is None else label_to_id.__getitem__
    if script_args.label_noise > 0:  # on the training set as loaded, before a held-out split is carved from it
        from_id = int if label_to_id is None else dict(enumerate(label_to_id)).__getitem__
        raw["train"], noise_record = add_label_noise(
            raw["train"],
            "__label__",
            len(labels),
            script_args.label_noise,
            script_args.label_noise_seed,
            to_id,
            from_id,
        )
        if training_args.should_save:
            write_label_noise_json(training_args.output_dir, noise_record)
        logger.info(
            f"Label noise: flipped {noise_record['count']} of the {noise_record['num_examples']} training labels."
        )
    raw = with_validation_split(raw, script_args.train_val_split)
    train_dataset, eval_dataset = raw["train"], raw["validation"]
    # Shuffle before taking a subset (as transformers' recipe does): datasets such as CIFAR are often sorted by class.
    if script_args.max_train_samples is not None:
        train_dataset = train_dataset.shuffle(seed=training_args.seed)
        train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
    if script_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.shuffle(seed=training_args.seed)
        eval_dataset = eval_dataset.select(range(min(script_args.max_eval_samples, len(eval_dataset))))
    skip = script_args.skip_corrupt_images
    if training_args.do_train:
        train_dataset = drop_undecodable_images(train_dataset, image_column, "train", skip)
    if training_args.do_eval:
        eval_dataset = drop_undecodable_images(eval_dataset, image_column, "validation", skip)

    label2id = {name: i for i, name in enumerate(labels)}
    id2label = dict(enumerate(labels))
    if script_args.model_name_or_path is not None:
        config = AutoConfig.from_pretrained(
            script_args.model_name_or_path, num_labels=len(labels), label2id=label2id, id2label=id2label
        )
        model = AutoModelForImageClassification.from_pretrained(
            script_args.model_name_or_path, config=config, ignore_mismatched_sizes=script_args.ignore_mismatched_sizes
        )
        image_processor = AutoImageProcessor.from_pretrained(
            script_args.image_processor_name or script_args.model_name_or_path
        )
    else:
        config = CONFIG_MAPPING[script_args.model_type]()
        if script_args.config_overrides:
            config.update_from_string(script_args.config_overrides)
        config.num_labels, config.label2id, config.id2label = len(labels), label2id, id2label
        model = AutoModelForImageClassification.from_config(config)
        if script_args.image_processor_name is not None:
            image_processor = AutoImageProcessor.from_pretrained(script_args.image_processor_name)
        else:
            image_processor = build_image_processor(int(getattr(config, "image_size", 32)))
    logger.info("Model: %d parameters, %d labels.", sum(p.numel() for p in model.parameters()), len(labels))

    train_transform, eval_transform = make_transforms(
        image_processor,
        image_column,
        to_id,
        padding=script_args.random_crop_padding,
        flip=script_args.horizontal_flip,
    )
    # With label noise: the true labels of a held-out split carved from the training data (its `labels` are noisy),
    # and the memorisation of the flipped training labels, measured on un-augmented images.
    noisy = TRUE_LABEL_COLUMN in train_dataset.column_names
    eval_true_labels = None
    if noisy and TRUE_LABEL_COLUMN in eval_dataset.column_names:
        eval_true_labels = np.asarray(eval_dataset[TRUE_LABEL_COLUMN])
    memorisation = None
    if noisy and training_args.do_train:
        noisy_ids = [to_id(value) for value in train_dataset["__label__"]]
        memorisation = MemorisationCallback(
            train_dataset.with_transform(eval_transform),  # un-augmented
            noisy_ids,
            train_dataset[TRUE_LABEL_COLUMN],
            collate_fn,
            batch_size=training_args.per_device_eval_batch_size,
        )

    # `--sharpness_data train` measures the training loss on un-augmented images (the eval transform).
    sharpness_train_dataset = train_dataset.with_transform(eval_transform)
    train_dataset = train_dataset.with_transform(train_transform)
    eval_dataset = eval_dataset.with_transform(eval_transform)

    def compute_metrics(prediction):
        # The Trainer's evaluation loop keeps the order of the evaluation data, so `eval_true_labels` lines up.
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        true_labels = (
            eval_true_labels if eval_true_labels is not None and len(eval_true_labels) == len(logits) else None
        )
        return classification_metrics(logits, prediction.label_ids, true_labels)

    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=image_processor,
        data_collator=collate_fn,
        compute_metrics=compute_metrics,
        sam_config=sam_config,
    )
    if memorisation is not None:
        memorisation.trainer = trainer
        trainer.add_callback(memorisation)
    return train_and_evaluate(trainer, training_args, checkpoint, script_args, sharpness_train_dataset)


if __name__ == "__main__":
    main(*make_parser(ScriptArguments).parse_args_and_config(sys.argv[1:]))
