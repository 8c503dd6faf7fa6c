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
Checkpoints of `SAMTrainer`: which ones are complete, and where to resume.

A `checkpoint-N` folder is written by `Trainer._save_checkpoint` in this order: the model (and, from
`SAMTrainer.save_model`, `sam_config.json`), the optimizer and scheduler (and `sam_state.pt`, the variant's state), the
scaler and RNG states, and `trainer_state.json` last. A save cut short (an interrupt, a full disk, a killed job) leaves
a folder without some of these; resuming from it would fail, or worse, resume with a state silently reset.
"""

import json
import logging
import os
import re

import torch
from torch.distributed.tensor import DTensor
from transformers.trainer_utils import get_last_checkpoint


logger = logging.getLogger(__name__)

SAM_CONFIG_NAME = "sam_config.json"
SAM_STATE_NAME = "sam_state.pt"
TRAINER_STATE_NAME = "trainer_state.json"
# The time a recipe run has cost so far, in each checkpoint and at the end in `output_dir` (`RunCostCallback`).
RUN_COST_NAME = "run_cost.json"
# The folders `Trainer._save_checkpoint` writes, `checkpoint-<global step>`.
CHECKPOINT_FOLDER_RE = re.compile(r"^checkpoint-(\d+)$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


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


def checkpoint_problems(checkpoint_dir: str | os.PathLike) -> list[str]:
    """What `checkpoint_dir` lacks to resume a `SAMTrainer` run from it; an empty list when it is complete."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        return [f"{checkpoint_dir} is not a directory"]
    names = set(os.listdir(checkpoint_dir))
    problems = []
    if TRAINER_STATE_NAME not in names:
        problems.append(f"no {TRAINER_STATE_NAME} (the Trainer writes it last: the save was cut short)")
    else:
        try:
            with open(os.path.join(checkpoint_dir, TRAINER_STATE_NAME), encoding="utf-8") as reader:
                json.load(reader)
        except (OSError, ValueError) as error:
            problems.append(f"{TRAINER_STATE_NAME} cannot be read ({error})")
    if not any(name in names for name in _WEIGHT_FILES) and not any(n.startswith("pytorch_model_fsdp") for n in names):
        problems.append("no model weights")
    if not any(name.startswith(("optimizer.", "optimizer_")) for name in names):
        problems.append("no optimizer state")
    rank_files = [re.match(rf"^rank(\d+)-of-(\d+)-{re.escape(SAM_STATE_NAME)}$", n) for n in names]
    rank_files = [match for match in rank_files if match]
    if rank_files:  # one state file per process: every process's must be there
        world_size = int(rank_files[0].group(2))
        missing = sorted(set(range(world_size)) - {int(match.group(1)) for match in rank_files})
        if missing:
            problems.append(f"no {SAM_STATE_NAME} of process(es) {missing} of {world_size}")
    if SAM_CONFIG_NAME in names:  # a plain Trainer's checkpoint has none, and needs none
        try:
            with open(os.path.join(checkpoint_dir, SAM_CONFIG_NAME), encoding="utf-8") as reader:
                config = json.load(reader)
        except (OSError, ValueError) as error:
            problems.append(f"{SAM_CONFIG_NAME} cannot be read ({error})")
        else:
            stateful = _is_stateful(config.get("method")) and config.get("rho", 0) != 0
            if stateful and not any(name.endswith(SAM_STATE_NAME) for name in names):
                problems.append(f"no {SAM_STATE_NAME} (the {config.get('method')} state)")
    return problems


def _is_stateful(method) -> bool:
    """Whether a checkpoint of `method` must carry its per-parameter state in `sam_state.pt` (`hf_sam.variants`)."""
    from .variants import METHODS

    return method in METHODS and METHODS[method].state_key is not None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """
    The newest `checkpoint-N` in `output_dir` that `checkpoint_problems` finds complete, or `None`. Newer incomplete
    ones are skipped with a warning that says what they lack.
    """
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := CHECKPOINT_FOLDER_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        problems = checkpoint_problems(path)
        if not problems:
            return path
        logger.warning(f"Skipping the incomplete checkpoint {path}: {'; '.join(problems)}.")
    return None


def checkpoint_to_resume(output_dir: str | os.PathLike) -> str | None:
    """
    What `train(resume_from_checkpoint=True)` resumes from: the newest complete checkpoint of `output_dir`, or `None`
    when it has no `checkpoint-N` folder at all, so that `Trainer.train` raises its own error ("No valid checkpoint
    found in output directory"). When it has some and none is complete, a `ValueError` with the Trainer's text
    followed by what each one lacks: code that matches the Trainer's error keeps working.
    """
    complete = last_complete_checkpoint(output_dir)
    if complete is not None or not os.path.isdir(output_dir) or get_last_checkpoint(output_dir) is None:
        return complete
    folders = [os.path.join(output_dir, n) for n in os.listdir(output_dir) if CHECKPOINT_FOLDER_RE.match(n)]
    lacks = "; ".join(
        f"{os.path.basename(f)}: {', '.join(checkpoint_problems(f))}" for f in sorted(folders) if os.path.isdir(f)
    )
    raise ValueError(
        f"No valid checkpoint found in output directory ({os.fspath(output_dir)}): every checkpoint there is "
        f"incomplete, a save cut short ({lacks}). Delete them to start afresh, or resume from an earlier copy."
    )


# ---------------------------------------------------------------------------------------------------- the SAM state
# Fields whose change between a checkpoint and the resumed run changes what the saved state means.
STATE_FIELDS = ("method", "perturbation_sync")


def sam_state_file(directory: str, *, per_process: bool, process_index: int, world_size: int) -> str:
    """`sam_state.pt` in `directory`, or this process's `rank{r}-of-{W}-sam_state.pt` when each process has its own."""
    name = f"rank{process_index}-of-{world_size}-{SAM_STATE_NAME}" if per_process else SAM_STATE_NAME
    return os.path.join(directory, name)


def save_sam_state(path: str, variant, method: str, parameter_names: list[str]) -> None:
    """
    Write `variant`'s state (on the CPU) with the method and hf_sam version: per-parameter tensors by parameter name,
    a single tensor (a method's own statistics, e.g. AE-SAM's) as it is.
    """
    from . import __version__

    state = {"method": method, "hf_sam_version": __version__}
    for key, tensors in variant.state_dict().items():
        if isinstance(tensors, torch.Tensor):
            state[key] = tensors.cpu()
            continue
        state[key] = None if tensors is None else {n: t.cpu() for n, t in zip(parameter_names, tensors, strict=True)}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(state, path)


def load_sam_state(path: str, variant, method: str, named_parameters: dict) -> None:
    """
    Load `save_sam_state`'s file into `variant`. A file that cannot be read, holds another method's state or other
    parameters raises a `ValueError` naming the file (it is only ever loaded with `weights_only=True`).
    """
    key, description = variant.state_key, variant.state_description
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip, a pickle with other objects, a file of another kind
        raise ValueError(
            f"{path} cannot be read as an hf_sam state file ({type(error).__name__}): it is truncated, corrupt or not "
            f"written by hf_sam. Resume from an earlier checkpoint, or delete this file to restart the {description} "
            "empty (the run will then differ from an uninterrupted one)."
        ) from None
    if not isinstance(state, dict) or key not in state:
        saved = state.get("method") if isinstance(state, dict) else None
        raise ValueError(
            f"{path} holds no {description} (`{key}`): it was written by method {saved!r}, this run is {method!r}."
        )
    saved = state[key]
    if isinstance(saved, torch.Tensor):  # not per parameter: the method's own statistics
        device = next(iter(named_parameters.values())).device
        variant.load_state_dict({key: saved.to(device)})
        return
    if saved is not None and set(named_parameters) != set(saved):
        raise ValueError(
            f"{path} holds a {description} for other trainable parameters than this model's: missing "
            f"{sorted(set(named_parameters) - set(saved))[:5]}, unexpected {sorted(set(saved) - set(named_parameters))[:5]}."
        )
    tensors = None
    if saved is not None:
        tensors = [saved[n].to(device=p.device, dtype=p.dtype) for n, p in named_parameters.items()]
    variant.load_state_dict({key: tensors})


def check_resumed_config(checkpoint: str, config) -> bool:
    """
    Compare the `sam_config.json` of `checkpoint` with the resumed run's `config` (a `SAMConfig`). A change of a
    `STATE_FIELDS` field raises a `ValueError` unless `config.allow_state_reset` (then a warning says the state
    restarts, and this returns `True`: do not load it); other changes are listed in a warning. Returns `False` when
    the checkpoint's state is to be loaded.
    """
    from .sam_config import SAMConfig

    if not os.path.isfile(os.path.join(checkpoint, SAM_CONFIG_NAME)):
        logger.warning(f"{checkpoint} has no {SAM_CONFIG_NAME}: its SAM settings cannot be compared with this run's.")
        return False
    saved = SAMConfig.from_pretrained(checkpoint).to_dict()
    current = config.to_dict()
    changed = {k: (saved[k], current[k]) for k in current if k != "allow_state_reset" and saved.get(k) != current[k]}
    if not changed:
        return False
    listed = ", ".join(f"`{k}` {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
    state_changes = [k for k in STATE_FIELDS if k in changed]
    if state_changes and not config.allow_state_reset:
        raise ValueError(
            f"Resuming from {checkpoint} with other SAM settings that change the meaning of its saved state: {listed}. "
            "Resume with the checkpoint's settings, or set `allow_state_reset=True` in the SAMConfig "
            "(`--allow_state_reset` in the recipes) to drop the saved state and start the new method's state empty."
        )
    if state_changes:
        logger.warning(
            f"Resuming from {checkpoint} with {listed}: `allow_state_reset` is set, so the checkpoint's SAM state is "
            "dropped and this run's state (F-SAM's EMA, LookSAM's g_v) starts empty."
        )
        return True
    logger.warning(f"Resuming from {checkpoint} with changed SAM settings: {listed}.")
    return False


def _trainer_sam_state_file(trainer, directory: str) -> str:
    """Local mode (one state per process) and FSDP (each process holds its shards) write one file per process."""
    sharded = any(isinstance(p, DTensor) for p in trainer.model.parameters())
    per_process = trainer.args.world_size > 1 and (trainer.sam_config.perturbation_sync == "local" or sharded)
    return sam_state_file(
        directory,
        per_process=per_process,
        process_index=trainer.args.process_index,
        world_size=trainer.args.world_size,
    )


def save_trainer_sam_state(trainer, output_dir: str) -> None:
    """Write a `SAMTrainer`'s variant state into the checkpoint folder `output_dir` (once, or once per process)."""
    variant, config = trainer.sam_variant, trainer.sam_config
    if variant.state_key is None or config.rho == 0:
        return
    path = _trainer_sam_state_file(trainer, output_dir)
    if os.path.basename(path) == SAM_STATE_NAME and not trainer.args.should_save:
        return  # every process holds the same state: the main process writes it
    names = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    save_sam_state(path, variant, config.method, names)


def load_trainer_sam_state(trainer, checkpoint: str) -> None:
    """
    Load a `SAMTrainer`'s variant state from `checkpoint`. A missing file warns (the state restarts empty); an
    unreadable or mismatched one raises, unless `allow_state_reset` (then it warns and the state restarts empty).
    """
    variant, config = trainer.sam_variant, trainer.sam_config
    if variant.state_key is None or config.rho == 0:
        return
    path = _trainer_sam_state_file(trainer, checkpoint)
    if not os.path.isfile(path):
        logger.warning(
            f"Resuming {config.method} from {checkpoint}, which has no {os.path.basename(path)}: the "
            f"{variant.state_description} restarts empty, so this run will not equal an uninterrupted one."
        )
        return
    named = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    try:
        load_sam_state(path, variant, config.method, named)
    except ValueError as error:
        if not config.allow_state_reset:
            raise
        logger.warning(f"{error} `allow_state_reset` is set: the {variant.state_description} restarts empty.")


def _checkpoint_weight_keys(checkpoint_dir: str) -> set[str] | None:
    """The tensor names of a checkpoint's safetensors weights (single file or sharded), or None when it has none."""
    from safetensors import safe_open

    single = os.path.join(checkpoint_dir, "model.safetensors")
    index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as file:
            return set(file.keys())
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as file:
            return set(json.load(file)["weight_map"])
    return None


def restore_renamed_weights(model: torch.nn.Module, checkpoint_dir: str) -> bool:
    """
    Load the weights of `checkpoint_dir` into `model` when transformers renamed them on save, which the Trainer's
    own loading does not undo; returns False (nothing done) when the names match and the Trainer's path is right.

    Since transformers 5, `save_pretrained` writes some models' weights under their legacy names (ViT:
    `vit.encoder.layer.0.attention.attention.query.weight` for `vit.layers.0.attention.q_proj.weight`), and only
    `from_pretrained` maps them back; the Trainer's resume path (`load_state_dict(..., strict=False)`) does not, so the
    renamed layers silently keep their fresh initialisation (a warning lists them) while the optimizer state and the
    schedule resume (upstream huggingface/transformers#43701). When the checkpoint's names do not cover the model's,
    the weights are loaded through `from_pretrained` (the conversion that loading the saved model applies) and copied
    into `model`; a weight that `from_pretrained` could not find or load is an error, never a warning.
    """
    from transformers import PreTrainedModel

    saved = _checkpoint_weight_keys(checkpoint_dir)
    if saved is None or not isinstance(model, PreTrainedModel) or getattr(model, "_hf_peft_config_loaded", False):
        return False  # adapters, FSDP/DeepSpeed layouts and `.bin` checkpoints: the Trainer's own path
    # A tied weight (an LM head sharing the embeddings) is saved once, under one of its names; the model's
    # `_keys_to_ignore_on_save` (exact names) are never saved.
    not_saved_on_purpose = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    names_of_tensor: dict[tuple, list[str]] = {}
    for name, tensor in model.state_dict().items():
        if name not in not_saved_on_purpose:
            names_of_tensor.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    unsaved = [names for names in names_of_tensor.values() if not saved.intersection(names)]
    if not unsaved:
        return False
    # Loaded in the model's dtype when it has one, else in fp32 (`load_state_dict` casts each tensor to its own).
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    try:
        reloaded, info = type(model).from_pretrained(
            checkpoint_dir, config=model.config, dtype=dtype, output_loading_info=True
        )
    except Exception as error:
        raise RuntimeError(
            f"{checkpoint_dir} stores {len(unsaved)} of {type(model).__name__}'s weights under other names (for "
            f"example {unsaved[0][0]!r}), which the Trainer's resume does not map back (transformers#43701), and "
            f"loading the checkpoint with `from_pretrained` to map them failed: {error}"
        ) from error
    tied = {name for names in names_of_tensor.values() if len(names) > 1 for name in names}
    missing = sorted(set(info["missing_keys"]) - tied - not_saved_on_purpose)
    if missing or info["mismatched_keys"]:
        raise RuntimeError(
            f"Could not restore {type(model).__name__} from {checkpoint_dir}: missing {missing[:3]}, mismatched "
            f"{sorted(info['mismatched_keys'])[:3]}. Resuming would train them from their initial values."
        )
    model.load_state_dict(reloaded.state_dict())
    logger.info(
        f"{checkpoint_dir} stores {len(unsaved)} weights under their legacy names, which `Trainer` does not "
        "map back (transformers#43701): loaded through `from_pretrained` instead."
    )
    return True
