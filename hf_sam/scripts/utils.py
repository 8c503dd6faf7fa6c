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
What every recipe does the same way: parse its flags (with `--config recipe.yaml` defaults), set up logging, decide
whether to resume or refuse a used `--output_dir`, and run the train-and-evaluate tail.
"""

import dataclasses
import enum
import json
import logging
import os
import resource
import shutil
import sys
import time
import types
import typing
from argparse import ArgumentTypeError
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import datasets
import torch
import transformers
from datasets import ClassLabel, DatasetDict
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from ..checkpointing import (
    CHECKPOINT_FOLDER_RE,
    LOCK_NAME,
    SAM_CONFIG_NAME,
    checkpoint_problems,
    describe_changes,
    last_complete_checkpoint,
    sam_config_changes,
)
from ..sam_config import SAMConfig


logger = logging.getLogger(__name__)


def _process_cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have ended (e.g. data-loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# The origin of a recipe's time measurements (`RunCostCallback`): this module is imported before data or model load.
_ATTEMPT_START_WALL = time.perf_counter()
_ATTEMPT_START_CPU = _process_cpu_seconds()

DEEPSPEED_REFUSED = (
    "SAMTrainer does not support DeepSpeed (`--deepspeed`, or an `accelerate` config with DeepSpeed): its engine steps "
    "the optimizer inside `backward`, which breaks SAM's two-pass step. Use DDP or FSDP2 instead "
    "(recipes/accelerate_configs)."
)
_TRUE = ("true", "latest")
_FALSE = ("false", "none", "")


class SAMArgumentParser(HfArgumentParser):
    """
    `HfArgumentParser` over the recipe's dataclasses, with `--config file.yaml` defaults (the layout of TRL's
    `TrlParser`, without depending on TRL).

    The YAML file is a flat mapping from flag names (any field of the dataclasses) to values; flags on the command line
    override it. A value from the file satisfies a required flag. A key no flag takes raises a `ValueError` naming
    it, so a typo in a recipe does not pass silently. Every value is converted and checked against its dataclass
    field's type before anything is built or loaded (`check_config_value`; argparse itself converts only string
    defaults, so `max_steps: 2.5` would otherwise reach the Trainer): a `ValueError` names the key, the value and the
    type the field takes. An `env:` mapping sets environment variables before parsing
    (for variables read when training starts, e.g. `WANDB_PROJECT`; those read at import time, such as
    `HF_HUB_OFFLINE`, must be exported in the shell). `--deepspeed` is refused before anything is loaded.
    """

    def __init__(self, dataclass_types: Sequence[type], **kwargs: Any):
        kwargs.setdefault(
            "epilog", "--config FILE.yaml: defaults for any of the flags above; flags on the command line override it."
        )
        super().__init__(tuple(dataclass_types), **kwargs)

    def parse_args_and_config(self, args: Sequence[str] | None = None) -> tuple:
        """Parse `args` (default: `sys.argv[1:]`) into one instance per dataclass, after applying `--config`."""
        args = list(sys.argv[1:] if args is None else args)
        config_path, args = _pop_config_flag(args)
        if config_path is not None:
            try:
                self.set_defaults_with_config(**load_yaml_config(config_path))
            except ValueError as error:
                raise ValueError(f"{config_path}: {error}") from None
        namespace, _ = self.parse_known_args(args)
        # Before the dataclasses are built: `TrainingArguments(deepspeed=...)` imports deepspeed, which may be absent.
        if getattr(namespace, "deepspeed", None) or _env_flag("ACCELERATE_USE_DEEPSPEED"):
            raise ValueError(DEEPSPEED_REFUSED)
        return self.parse_args_into_dataclasses(args)

    def set_defaults_with_config(self, **config: Any) -> None:
        """Make `config`'s values the flags' defaults (no longer required) and apply its `env:` mapping."""
        known = {action.dest: action for action in self._actions}
        if "env" in config and "env" not in known:
            env = config.pop("env")
            if not isinstance(env, dict):
                raise ValueError(f"`env` in the config must be a mapping of variable names to values, got {env!r}.")
            os.environ.update({str(name): str(value) for name, value in env.items()})
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ValueError(f"The config has keys no argument takes: {unknown}.")
        fields = _dataclass_fields(self.dataclass_types)
        typed_actions = {}
        for action in self._actions:  # a bool field's `--no_*` twin shares its dest but has no type: the first one
            typed_actions.setdefault(action.dest, action)
        config = {
            name: check_config_value(name, value, *fields[name], typed_actions[name]) if name in fields else value
            for name, value in config.items()
        }
        for name, value in config.items():
            known[name].default = value
            known[name].required = False
        self.set_defaults(**config)


def _dataclass_fields(dataclass_types: Sequence[type]) -> dict[str, tuple[str, Any, Any]]:
    """
    `{name: (owner, annotation, default)}` of every init field: `owner` is `Class.field`, `annotation` the resolved
    type as written (not `Field.type`, which `HfArgumentParser` narrows in place, e.g. `dict | str | None` to `str`).
    """
    fields = {}
    for dtype in dataclass_types:
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if f.init and f.name not in fields:
                fields[f.name] = (f"{dtype.__name__}.{f.name}", hints[f.name], f.default)
    return fields


class _Mismatch(Exception):
    """`value` is not of the annotation's type."""


def check_config_value(key: str, value: Any, owner: str, annotation: Any, default: Any, action) -> Any:
    """
    A `--config` YAML value as the dataclass field `owner` (type `annotation`, default `default`) takes it, or a
    `ValueError` naming `key`, `value` and the type.

    - A string is what the command line would give: converted by the flag's own argparse `type` (so `max_steps:
      "8"` is 8 and `"2.5"` is refused, as `--max_steps 2.5` is), one element of a list flag.
    - Other YAML values must be of the field's type: an int is a float (`num_train_epochs: 3`), but a float is not
      an int, even a whole one (`gradient_accumulation_steps: 2.0` is refused, as `--gradient_accumulation_steps
      2.0` is); a bool is not a number; a number or bool given to a string field is its text (`run_name: 1` is
      `"1"`); `null` only where the field is optional or defaults to None; lists and mappings element by element.
    - Then the flag's `choices` (a `choices` metadata, a `Literal` or an `Enum`), as argparse checks a flag's.
    """
    expected = _describe(annotation)
    if value is None and default is None:
        return None
    if isinstance(value, str):
        try:
            converted = action.type(value) if action.type is not None else value
        except (ValueError, TypeError, ArgumentTypeError):
            raise ValueError(f"`{key}` ({owner}) must be {expected}, got {value!r} (a string).") from None
        if action.nargs in ("+", "*") and not isinstance(converted, list):
            converted = [converted]
    else:
        try:
            converted = _convert(value, annotation)
        except _Mismatch:
            hint = ""
            if isinstance(value, float) and value.is_integer() and "int" in expected:
                hint = f"; write a whole number without a decimal point (`{key}: {int(value)}`)"
            raise ValueError(
                f"`{key}` ({owner}) must be {expected}, got {value!r} ({_yaml_type_name(value)}){hint}."
            ) from None
    choices = action.choices
    if choices is not None and converted is not None:
        for item in converted if isinstance(converted, list) else [converted]:
            if item not in choices:
                raise ValueError(f"`{key}` ({owner}) must be one of {list(choices)}, got {item!r}.")
    return converted


def _convert(value: Any, annotation: Any) -> Any:
    """`value` as an instance of `annotation`: an exact match first, then the lenient conversions, or `_Mismatch`."""
    try:
        return _convert_as(value, annotation, lenient=False)
    except _Mismatch:
        return _convert_as(value, annotation, lenient=True)


def _convert_as(value: Any, annotation: Any, lenient: bool) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if annotation is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is Union or origin is types.UnionType:
        for arg in args:  # strict matches over all members first: `str | bool` keeps `true` a bool
            try:
                return _convert_as(value, arg, lenient=False)
            except _Mismatch:
                pass
        if lenient:
            for arg in args:
                try:
                    return _convert_as(value, arg, lenient=True)
                except _Mismatch:
                    pass
        raise _Mismatch
    if origin is Literal:
        if any(type(value) is type(choice) and value == choice for choice in args):
            return value
        raise _Mismatch
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if isinstance(value, annotation) or any(type(value) is type(m.value) and value == m.value for m in annotation):
            return value
        raise _Mismatch
    if origin is list or annotation is list:
        if not isinstance(value, list):
            raise _Mismatch
        return [_convert_as(item, args[0], lenient) for item in value] if args else value
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        if not args:
            return value
        return {_convert_as(k, args[0], lenient): _convert_as(v, args[1], lenient) for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is float:
        if isinstance(value, float) or (lenient and isinstance(value, int) and not isinstance(value, bool)):
            return float(value)
        raise _Mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        if lenient and isinstance(value, bool):
            return "true" if value else "false"
        if lenient and isinstance(value, int | float):
            return str(value)
        raise _Mismatch
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _Mismatch
    return value  # a type this check does not know: left to the dataclass


def _describe(annotation: Any) -> str:
    """The type `annotation` in words, for messages: `an int`, `a float`, `a string or null`, ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union or origin is types.UnionType:
        words = [_describe(arg) for arg in args if arg is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if origin is Literal:
        return f"one of {list(args)}"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return f"one of {[member.value for member in annotation]}"
    if origin is list or annotation is list:
        return f"a list ({_describe(args[0])} each)" if args else "a list"
    if origin is dict or annotation is dict:
        return "a mapping"
    names = {bool: "a bool (true or false)", int: "an int", float: "a float", str: "a string"}
    if annotation in names:
        return names[annotation]
    return f"a {getattr(annotation, '__name__', annotation)}"


def _yaml_type_name(value: Any) -> str:
    """How YAML read `value`: `a float`, `a bool`, ..."""
    names = {bool: "a bool", int: "an int", float: "a float", list: "a list", dict: "a mapping", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


def make_parser(script_arguments: type) -> SAMArgumentParser:
    """The parser of a recipe: its `script_arguments` dataclass, `SAMConfig` and `TrainingArguments`, in that order."""
    return SAMArgumentParser((script_arguments, SAMConfig, TrainingArguments))


@dataclass
class RecipeArguments:
    """The flags every recipe's `ScriptArguments` takes (it subclasses this) besides those of its data and model."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train from scratch into a non-empty `output_dir` (its checkpoint-* folders are deleted). "
            "Without it, a run resumes from the last complete checkpoint there, or refuses to start."
        },
    )
    sharpness_every_n_steps: int | None = field(
        default=None,
        metadata={
            "help": "Measure sharpness (`hf_sam.SharpnessCallback`) at step 0, every N optimizer steps and at the "
            "end of training (not at each evaluation: with one every epoch the Hessian quantities could cost more "
            "than the training), on `sharpness_num_batches` batches of `sharpness_data`; logged as `sharpness/*`. "
            "Off by default (the Hessian quantities cost many passes)."
        },
    )
    sharpness_diagnostics: str = field(
        default="top_eigenvalue,trace,ascent,alignment",
        metadata={
            "help": "Comma-separated diagnostics of `SharpnessCallback`: worst_case, ascent, average, "
            "top_eigenvalue, trace, alignment."
        },
    )
    sharpness_settings: dict | str | None = field(
        default=None,
        metadata={
            "help": "JSON object of per-diagnostic settings of `SharpnessCallback` (keyword arguments of each "
            'function), e.g. \'{"trace": {"samples": 20, "deflation_rank": 10}}\' '
            "(Hutch++ with 10 deflated directions); the diagnostics it names are measured as well."
        },
    )
    sharpness_data: str = field(
        default="eval",
        metadata={
            "help": "Which examples the sharpness is measured on: `eval` (the evaluation data) or `train` (the "
            "training data, without augmentation: the loss SAM minimises). Either way a fixed random subset "
            "(shuffled with seed 0, the same in every run) of `sharpness_num_batches * sharpness_batch_size` "
            "examples.",
            "choices": ["eval", "train"],
        },
    )
    sharpness_num_batches: int = field(
        default=4, metadata={"help": "Batches (of `sharpness_data`) the sharpness is taken on."}
    )
    sharpness_batch_size: int = field(default=64, metadata={"help": "Examples per sharpness batch."})


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of flag names to values in the YAML file `path`."""
    import yaml

    with open(path, encoding="utf-8") as reader:
        config = yaml.safe_load(reader) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values.")
    return config


def _pop_config_flag(args: list[str]) -> tuple[str | None, list[str]]:
    for index, arg in enumerate(args):
        if arg == "--config":
            if index + 1 >= len(args):
                raise ValueError("`--config` needs a path to a YAML file.")
            return args[index + 1], args[:index] + args[index + 2 :]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], args[:index] + args[index + 1 :]
    return None, args


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def check_positive(arguments: Any, *names: str) -> None:
    """Raise a `ValueError` naming the flag if one of the fields `names` of `arguments` is set and not positive."""
    for name in names:
        value = getattr(arguments, name)
        if value is not None and value <= 0:
            raise ValueError(f"`--{name}` must be positive, got {value}.")


def setup_logging(training_args: TrainingArguments) -> None:
    """Log to stderr at the process's level (the main process at INFO), for the recipe, hf_sam, transformers, datasets."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    log_level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    logging.getLogger("hf_sam").setLevel(logging.INFO if training_args.should_log else log_level)


def checkpoint_to_resume(
    training_args: TrainingArguments, overwrite_output_dir: bool = False, sam_config: SAMConfig | None = None
) -> str | None:
    """
    The checkpoint a recipe resumes from, or `None` to train from scratch; refuses an `--output_dir` it would clobber.
    Call it once the run owns `--output_dir` (`hf_sam.checkpointing.lock_output_dir`).

    - `--resume_from_checkpoint PATH`: that checkpoint (a `ValueError` saying what it lacks if it is incomplete);
      `true` or `latest`: the last complete checkpoint of `--output_dir` (an error if there is none).
    - Without it, when training into an existing `--output_dir`: its last complete checkpoint (incomplete ones, from
      a save cut short, are skipped with a warning), so rerunning a killed command resumes it. With no complete
      checkpoint, a folder holding anything but incomplete `checkpoint-*` folders is refused with a `ValueError`
      naming `--overwrite_output_dir`. A checkpoint saved with other SAM settings than `sam_config` (an earlier,
      maybe finished, run with another `--rho`) is refused with a `ValueError` naming what differs: resuming it
      would mix the two runs (a finished run's weights beside this run's `sam_config.json`).
    - `--overwrite_output_dir`: train from scratch; the `checkpoint-*` folders already there are deleted, so that a
      later resume cannot pick up a checkpoint of the earlier run.
    """
    output_dir, value = training_args.output_dir, training_args.resume_from_checkpoint
    if isinstance(value, bool):
        value = str(value)
    if value is not None and value.lower() in _FALSE:
        value = None
    if value is not None:
        if value.lower() in _TRUE:
            checkpoint = last_complete_checkpoint(output_dir)
            if checkpoint is None:
                raise ValueError(f"`--resume_from_checkpoint {value}`: no complete checkpoint in {output_dir}.")
            return checkpoint
        problems = checkpoint_problems(value)
        if problems:
            raise ValueError(f"`--resume_from_checkpoint {value}` cannot be resumed from: {'; '.join(problems)}.")
        return value
    if not training_args.do_train or output_dir is None or not os.path.isdir(output_dir):
        return None
    if overwrite_output_dir:
        if training_args.local_process_index == 0:
            for name in sorted(os.listdir(output_dir)):
                if CHECKPOINT_FOLDER_RE.match(name):
                    logger.warning(f"--overwrite_output_dir: deleting {os.path.join(output_dir, name)}.")
                    shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
        return None
    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint is not None:
        changed = {}
        if sam_config is not None and os.path.isfile(os.path.join(checkpoint, SAM_CONFIG_NAME)):
            changed = sam_config_changes(checkpoint, sam_config)
        if changed:
            raise ValueError(
                f"The output directory {output_dir} holds a run with other SAM settings than this one ({checkpoint}: "
                f"{describe_changes(changed)}). Rerun with its settings to resume it, pass `--resume_from_checkpoint "
                f"{checkpoint}` to continue it with these settings, `--overwrite_output_dir` to train from scratch "
                "into it, or choose another `--output_dir`."
            )
        logger.info(f"Resuming from {checkpoint}, the last complete checkpoint in {output_dir}.")
        return checkpoint
    other = sorted(n for n in os.listdir(output_dir) if not CHECKPOINT_FOLDER_RE.match(n) and n != LOCK_NAME)
    if other:
        raise ValueError(
            f"The output directory {output_dir} is not empty ({', '.join(other[:5])}{', ...' if len(other) > 5 else ''})"
            " and holds no complete checkpoint to resume from. Pass `--overwrite_output_dir` to train into it from "
            "scratch, or choose another `--output_dir`."
        )
    return None


# The sharpness flags a recipe checks with `check_positive`.
SHARPNESS_FLAGS = ("sharpness_every_n_steps", "sharpness_num_batches", "sharpness_batch_size")


def sharpness_diagnostics(script_args: RecipeArguments) -> dict[str, dict | None]:
    """
    The `diagnostics` of the recipe's `SharpnessCallback`: the names of `--sharpness_diagnostics`, with the settings
    of `--sharpness_settings` (a JSON object, or a mapping in a YAML `--config`). A recipe calls it when parsing, so a
    bad name, setting or JSON is an error naming the flag before anything loads.
    """
    from hf_sam.sharpness_callback import _check_diagnostics

    names = [name.strip() for name in script_args.sharpness_diagnostics.split(",") if name.strip()]
    diagnostics: dict[str, dict | None] = dict.fromkeys(names)
    if script_args.sharpness_data not in ("eval", "train"):
        raise ValueError(f"`--sharpness_data` must be 'eval' or 'train', got {script_args.sharpness_data!r}.")
    settings = script_args.sharpness_settings
    if isinstance(settings, str) and settings:
        try:
            settings = json.loads(settings)
        except json.JSONDecodeError as error:
            raise ValueError(f"`--sharpness_settings` is not valid JSON ({error}): {settings}") from None
    if settings:  # a JSON object from the command line, or a mapping from a YAML `--config`
        if not isinstance(settings, dict):
            raise ValueError(f"`--sharpness_settings` must be a JSON object of diagnostics, got {settings!r}.")
        diagnostics |= settings
    try:
        _check_diagnostics(diagnostics)
    except ValueError as error:
        raise ValueError(f"`--sharpness_diagnostics` / `--sharpness_settings`: {error}") from None
    return diagnostics


def add_sharpness_callback(trainer: Trainer, script_args: RecipeArguments, train_dataset: Any = None) -> None:
    """
    With `--sharpness_every_n_steps`, a `SharpnessCallback` on a fixed random subset of the evaluation data or (with
    `--sharpness_data train`) of `train_dataset`: the training examples as the model sees them without augmentation
    (default: the trainer's training dataset). The subset is shuffled with seed 0 whatever the run's seed, so every
    run is measured on the same examples; datasets sorted by class (CIFAR) would otherwise give a few classes only.
    """
    if script_args.sharpness_every_n_steps is None:
        return
    if script_args.sharpness_data == "eval":
        dataset = trainer.eval_dataset
        if dataset is None:
            raise ValueError(
                "`--sharpness_data eval` measures on the evaluation data: pass `--do_eval` and its data (or "
                "`--sharpness_data train`)."
            )
    else:
        dataset = train_dataset if train_dataset is not None else trainer.train_dataset
        if dataset is None:
            raise ValueError("`--sharpness_data train` measures on the training data: pass `--do_train` and its data.")
    size = script_args.sharpness_num_batches * script_args.sharpness_batch_size
    if size > len(dataset):
        raise ValueError(
            f"`--sharpness_num_batches` * `--sharpness_batch_size` = {size} examples, but the "
            f"{script_args.sharpness_data} data has {len(dataset)}."
        )
    dataset = dataset.shuffle(seed=0).select(range(size))
    from hf_sam import SharpnessCallback

    diagnostics = sharpness_diagnostics(script_args)
    trainer.add_callback(
        SharpnessCallback(
            dataset=dataset,
            batch_size=script_args.sharpness_batch_size,
            num_batches=script_args.sharpness_num_batches,
            data_collator=trainer.data_collator,
            every_n_steps=script_args.sharpness_every_n_steps,
            on_evaluate=False,
            diagnostics=diagnostics,
            trainer=trainer,
        )
    )


# The time a recipe run has cost so far, in each checkpoint and at the end in `output_dir` (`RunCostCallback`).
RUN_COST_NAME = "run_cost.json"


def read_run_cost(folder: str | os.PathLike | None) -> dict | None:
    """
    The `run_cost.json` of a checkpoint or output folder: `{"wall_s", "cpu_s", "attempts"}` up to that save (an
    output folder's also has `earlier_wall_s` / `earlier_cpu_s`); `None` when `folder` is `None`. A folder without it
    (a checkpoint written before recipes kept their cost) gives `{"wall_s": None, "cpu_s": None, "attempts": None}`:
    the time spent before it is unknown.
    """
    if folder is None:
        return None
    path = os.path.join(folder, RUN_COST_NAME)
    if not os.path.isfile(path):
        return {"wall_s": None, "cpu_s": None, "attempts": None}
    with open(path, encoding="utf-8") as reader:
        return json.load(reader)


class RunCostCallback(TrainerCallback):
    """
    The time a run costs across resumes. Each checkpoint gets `run_cost.json`: the wall-clock and CPU seconds of the
    attempts so far, `{"wall_s", "cpu_s", "attempts"}`, i.e. this attempt's from the start of the recipe (the import
    of `hf_sam.scripts.utils`, before data and model are loaded) to the save, plus what the checkpoint it resumed
    from holds. An interrupted run thus counts each earlier attempt up to the checkpoint the next one resumed from:
    the work done after that save, lost with the process and redone, is not counted; the repeated start-up is.
    Unknown (`None`) when the resumed checkpoint has no `run_cost.json`. CPU time is this process's (rank 0's in a
    launched run). `finish(output_dir)` writes the totals at the end of the run, with `earlier_wall_s` /
    `earlier_cpu_s`, the part from before this attempt, for a caller that times the last attempt itself.
    """

    def __init__(self, resumed_from: str | None = None):
        self.earlier = read_run_cost(resumed_from) or {"wall_s": 0.0, "cpu_s": 0.0, "attempts": 0}

    def totals(self) -> dict[str, Any]:
        """The cost so far: the earlier attempts' (from the resumed checkpoint) plus this one's until now."""
        known = self.earlier["wall_s"] is not None
        return {
            "wall_s": self.earlier["wall_s"] + time.perf_counter() - _ATTEMPT_START_WALL if known else None,
            "cpu_s": self.earlier["cpu_s"] + _process_cpu_seconds() - _ATTEMPT_START_CPU if known else None,
            "attempts": self.earlier["attempts"] + 1 if known else None,
        }

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            _write_json_atomically(os.path.join(folder, RUN_COST_NAME), self.totals())

    def finish(self, output_dir: str) -> dict[str, Any]:
        """Write `output_dir/run_cost.json`: the totals and the earlier attempts' part; returns what it wrote."""
        cost = {**self.totals(), "earlier_wall_s": self.earlier["wall_s"], "earlier_cpu_s": self.earlier["cpu_s"]}
        _write_json_atomically(os.path.join(output_dir, RUN_COST_NAME), cost)
        return cost


def _write_json_atomically(path: str, value: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def train_and_evaluate(
    trainer: Trainer,
    training_args: TrainingArguments,
    checkpoint: str | None,
    script_args: RecipeArguments | None = None,
    sharpness_train_dataset: Any = None,
) -> dict[str, float]:
    """
    The tail of every recipe: add the sharpness callback if `script_args` asks for it, train (resuming from
    `checkpoint`), save the model and state, evaluate; write `train_results.json`, `eval_results.json` and
    `all_results.json`, and the run's time across resumes in `run_cost.json` (`RunCostCallback`). Returns the
    metrics of both, with the number of examples as `train_samples` / `eval_samples`.
    """
    if script_args is not None:
        add_sharpness_callback(trainer, script_args, sharpness_train_dataset)
    cost = RunCostCallback(checkpoint if training_args.do_train else None)
    trainer.add_callback(cost)
    metrics: dict[str, float] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        train_metrics = {**result.metrics, "train_samples": len(trainer.train_dataset)}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
    if training_args.do_eval:
        eval_metrics = {**trainer.evaluate(), "eval_samples": len(trainer.eval_dataset)}
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        cost.finish(training_args.output_dir)
    # A launched run tears its process group down itself: left to the interpreter's exit, gloo's threads can abort a
    # finished run ("terminate called without an active exception", seen once in 2 processes on a loaded machine).
    if torch.distributed.is_available() and torch.distributed.is_initialized() and "LOCAL_RANK" in os.environ:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


def class_labels(raw: DatasetDict, column: str) -> tuple[list[str], dict[Any, int] | None]:
    """
    The class names of the label `column` of `raw`, and the map from its values to class ids: `None` for a
    `ClassLabel` (its values are the ids), else the sorted distinct values of all splits (ints or strings) in order.
    """
    feature = raw["train"].features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names), None
    values = sorted({value for split in raw for value in raw[split].unique(column)})
    return [str(value) for value in values], {value: index for index, value in enumerate(values)}
