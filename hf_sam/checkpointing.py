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

In a run of several processes the Trainer's process 0 writes `trainer_state.json` without waiting for the others, so
that file alone does not mean every process's files (`rng_state_{r}.pth`, `rank{r}-of-{W}-sam_state.pt`) are whole.
`SAMTrainer` therefore marks a checkpoint being written (`hf_sam_saving`), and once every process has written its
files (a barrier) process 0 writes `hf_sam_manifest.json`, last: the number of processes and the size of every file.
`checkpoint_problems` checks a checkpoint against its manifest; one written before manifests (neither file) gets the
older checks.

An output directory is owned by one run at a time (`lock_output_dir`): two runs writing into one folder would
overwrite each other's checkpoints, or one would resume from the other's half-written one.
"""

import datetime
import errno
import json
import logging
import os
import re
import socket
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints


logger = logging.getLogger(__name__)

SAM_CONFIG_NAME = "sam_config.json"
SAM_STATE_NAME = "sam_state.pt"
TRAINER_STATE_NAME = "trainer_state.json"
# Written last into a checkpoint, once every process has written its files (`write_checkpoint_manifest`).
MANIFEST_NAME = "hf_sam_manifest.json"
# Present while `SAMTrainer` writes a checkpoint: with it and without a manifest, the save was cut short.
SAVING_NAME = "hf_sam_saving"
# The lock file of an output directory (`lock_output_dir`); `push_to_hub` leaves out names starting with `_`.
LOCK_NAME = "_hf_sam.lock"
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


def checkpoint_problems(checkpoint_dir: str | os.PathLike) -> list[str]:
    """
    What `checkpoint_dir` lacks to resume a `SAMTrainer` run from it; an empty list when it is complete. A checkpoint
    with a manifest must hold every file it lists, of the size it lists; one being written (`hf_sam_saving`, no
    manifest yet) is incomplete; one written before manifests gets the file-by-file checks alone.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        return [f"{checkpoint_dir} is not a directory"]
    names = set(os.listdir(checkpoint_dir))
    problems = []
    if MANIFEST_NAME in names:
        problems += _manifest_problems(checkpoint_dir)
    elif SAVING_NAME in names:
        problems.append(
            f"no {MANIFEST_NAME} (written last, once every process has written its files: the save was cut short)"
        )
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
    world_size = int(rank_files[0].group(2)) if rank_files else None
    if rank_files:  # one state file per process: every process's must be there
        missing = sorted(set(range(world_size)) - {int(match.group(1)) for match in rank_files})
        if missing:
            problems.append(f"no {SAM_STATE_NAME} of process(es) {missing} of {world_size}")
    if MANIFEST_NAME not in names:  # an older checkpoint: each process's RNG state, as far as the names tell
        rng_ranks = {int(m.group(1)) for n in names if (m := re.match(r"^rng_state_(\d+)\.pth$", n))}
        expected = max(rng_ranks, default=-1) + 1 if world_size is None else world_size
        if rng_ranks or world_size:
            missing = sorted(set(range(expected)) - rng_ranks)
            if missing:
                problems.append(f"no RNG state (rng_state_{{r}}.pth) of process(es) {missing} of {expected}")
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
    return list(dict.fromkeys(problems))


def read_checkpoint_manifest(checkpoint_dir: str | os.PathLike) -> dict | None:
    """The `hf_sam_manifest.json` of a checkpoint (see `write_checkpoint_manifest`), or `None` when it has none."""
    path = os.path.join(checkpoint_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as reader:
        return json.load(reader)


def _manifest_problems(checkpoint_dir: str) -> list[str]:
    try:
        manifest = read_checkpoint_manifest(checkpoint_dir)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"{MANIFEST_NAME} cannot be read ({error})"]
    problems = []
    for name, size in sorted(files.items()):
        path = os.path.join(checkpoint_dir, name)
        owner = re.match(r"^(?:rng_state_(\d+)\.pth|rank(\d+)-of-\d+-.*)$", name)
        of_process = f" (process {owner.group(1) or owner.group(2)} of {manifest.get('world_size')})" if owner else ""
        if not os.path.isfile(path):
            problems.append(f"no {name}{of_process}, which the manifest lists")
        elif os.path.getsize(path) != size:
            problems.append(
                f"{name}{of_process} has {os.path.getsize(path)} bytes, the manifest {size}: cut short or overwritten"
            )
    return problems


def _checkpoint_files(checkpoint_dir: str) -> dict[str, int]:
    """Every file under `checkpoint_dir` (relative path -> size) but the manifest, the marker and temporary files."""
    files = {}
    for root, _, names in os.walk(checkpoint_dir):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, checkpoint_dir)
            if relative not in (MANIFEST_NAME, SAVING_NAME) and ".tmp" not in name:
                files[relative] = os.path.getsize(path)
    return files


def start_checkpoint(checkpoint_dir: str) -> None:
    """Main process, before any process writes into `checkpoint_dir`: drop an older manifest, mark the save begun."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    if os.path.isfile(os.path.join(checkpoint_dir, MANIFEST_NAME)):
        os.remove(os.path.join(checkpoint_dir, MANIFEST_NAME))  # a rewritten checkpoint: complete only once rewritten
    _write_json_atomically(os.path.join(checkpoint_dir, SAVING_NAME), {"pid": os.getpid(), "started": _now()})


def write_checkpoint_manifest(checkpoint_dir: str, run: dict) -> None:
    """
    Main process, once every process has written its files: `hf_sam_manifest.json` (`run`, e.g. the number of
    processes and the batch sizes, and the size of every file), written last; then the save marker is removed.
    """
    from . import __version__

    manifest = {**run, "hf_sam_version": __version__, "files": _checkpoint_files(checkpoint_dir)}
    _write_json_atomically(os.path.join(checkpoint_dir, MANIFEST_NAME), manifest)
    if os.path.exists(os.path.join(checkpoint_dir, SAVING_NAME)):
        os.remove(os.path.join(checkpoint_dir, SAVING_NAME))


def _write_json_atomically(path: str, value) -> None:
    """Write `value` to a temporary file beside `path`, flushed to disk, then rename it: `path` is whole or absent."""
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as writer:
        json.dump(value, writer, indent=2)
        writer.flush()
        os.fsync(writer.fileno())
    os.replace(temporary, path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


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


def checkpoint_for_resume_true(output_dir: str | os.PathLike) -> str | None:
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
    temporary = f"{path}.tmp{os.getpid()}"  # renamed when whole: a file cut short never bears the name
    torch.save(state, temporary)
    os.replace(temporary, path)


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
    if not os.path.isfile(os.path.join(checkpoint, SAM_CONFIG_NAME)):
        logger.warning(f"{checkpoint} has no {SAM_CONFIG_NAME}: its SAM settings cannot be compared with this run's.")
        return False
    changed = sam_config_changes(checkpoint, config)
    if not changed:
        return False
    listed = describe_changes(changed)
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
        notice, every_process = _missing_state_notice(
            checkpoint, path, config.method, variant.state_description, trainer
        )
        if trainer.args.process_index == 0 or not every_process:  # said once when every process lacks its file
            logger.warning(notice)
        return
    named = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    try:
        load_sam_state(path, variant, config.method, named)
    except ValueError as error:
        if not config.allow_state_reset:
            raise
        logger.warning(f"{error} `allow_state_reset` is set: the {variant.state_description} restarts empty.")


def _missing_state_notice(checkpoint: str, path: str, method: str, description: str, trainer) -> tuple[str, bool]:
    """
    Why `checkpoint` has no state file `path` for this process, and whether every process lacks its own: another
    number of processes saved it (every process), or this file is missing.
    """
    names = os.listdir(checkpoint)
    world_size = trainer.args.world_size
    sizes = {int(m.group(1)) for n in names if (m := re.match(rf"^rank\d+-of-(\d+)-{re.escape(SAM_STATE_NAME)}$", n))}
    saved = sorted(sizes - {world_size})
    if saved or (SAM_STATE_NAME in names and os.path.basename(path) != SAM_STATE_NAME):
        saved_by = (
            f"{saved[0]} processes (one rank*-of-{saved[0]}-{SAM_STATE_NAME} each)"
            if saved
            else f"1 process (one {SAM_STATE_NAME})"
        )
        return (
            f"Resuming {method} from {checkpoint} on {world_size} process(es), but its {description} was saved by "
            f"{saved_by}: the number of processes changed. Each process keeps its own {description} (local "
            "`perturbation_sync`: made from its own shard of each batch; FSDP: its own shards of the parameters), and "
            "with another number of processes the shards differ, so the saved states cannot be given to this run's "
            f"processes: the {description} restarts empty on every process, and this run will not equal an "
            "uninterrupted one. Resume on the checkpoint's number of processes to continue it exactly."
        ), True
    return (
        f"Resuming {method} from {checkpoint}, which has no {os.path.basename(path)}: the {description} restarts "
        "empty, so this run will not equal an uninterrupted one."
    ), False


def checkpoint_run_settings(trainer) -> dict:
    """What a checkpoint's manifest records of the run: what the data order of a resume depends on."""
    args = trainer.args
    return {
        "world_size": args.world_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
    }


def batch_change_notice(checkpoint: str, trainer) -> str | None:
    """
    When `checkpoint` was written with another number of examples per optimizer step than `trainer` takes (another
    per-device batch, gradient accumulation or number of processes), what that does to the data order; else `None`.
    Checkpoints without a manifest do not record it: `None`.
    """
    try:
        manifest = read_checkpoint_manifest(checkpoint)
    except (OSError, ValueError):
        return None
    keys = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")
    if manifest is None or any(key not in manifest for key in keys):
        return None
    saved, current = {k: manifest[k] for k in keys}, checkpoint_run_settings(trainer)
    if saved == current:
        return None
    listed = ", ".join(f"`{k}` {saved[k]} -> {current[k]}" for k in keys if saved[k] != current[k])
    old, new = (
        v["world_size"] * v["per_device_train_batch_size"] * v["gradient_accumulation_steps"] for v in (saved, current)
    )
    step = trainer.state.global_step
    notice = f"Resuming from {checkpoint} with {listed}: {old} examples per optimizer step before, {new} now. "
    if trainer.args.ignore_data_skip:
        return notice + "With `ignore_data_skip` the epoch restarts from its first batch, whatever was seen before."
    if old == new and saved["world_size"] == current["world_size"]:
        return notice + (
            "The Trainer skips the batches of the steps done in this run's batch sizes, which cover the same examples: "
            "the data order is unchanged, but each step's micro-batches (and the SAM perturbation made from them) differ."
        )
    if old == new:
        return notice + (
            "The Trainer skips the same number of examples, but each process now gets another shard of every batch: "
            "the examples of each step are the same, how they are split among processes (and per-process state) is not."
        )
    seen = "seen twice" if new < old else "never seen"
    return notice + (
        f"The Trainer finds its place in the data by counting the {step} steps done at this run's size: {step} x {new} "
        f"= {step * new} examples, where the saved run had read {step} x {old} = {step * old}; so examples are {seen} "
        f"(about {step * abs(old - new)} of the epoch it resumes in) and the data order after the resume is that of "
        "neither run: the run will not equal an uninterrupted one. Resume with the checkpoint's batch settings to "
        "keep the data order."
    )


def sam_config_changes(checkpoint: str, config) -> dict[str, tuple]:
    """The fields of `config` (a `SAMConfig`) that differ from `checkpoint`'s `sam_config.json`: `{field: (saved, now)}`."""
    from .sam_config import SAMConfig

    saved = SAMConfig.from_pretrained(checkpoint).to_dict()
    current = config.to_dict()
    return {k: (saved.get(k), current[k]) for k in current if k != "allow_state_reset" and saved.get(k) != current[k]}


def describe_changes(changed: dict[str, tuple]) -> str:
    return ", ".join(f"`{k}` {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))


# ---------------------------------------------------------------------------------------------- one run per folder
_HELD_LOCKS: dict[str, list] = {}  # real path of a lock file -> [open file, number of holders in this process]


class OutputDirInUseError(RuntimeError):
    """Another run (another process, maybe on another host) owns the output directory."""


def lock_output_dir(output_dir: str | os.PathLike | None, process_index: int = 0) -> None:
    """
    Make this run the owner of `output_dir` until `unlock_output_dir` (or until the process ends), before anything is
    written into it; every process of a launched run calls it (a collective when `torch.distributed` is set up).

    Process 0 alone takes an `fcntl.flock` on `output_dir/_hf_sam.lock` and writes its process id, host and start time
    there; the other processes take no lock (so they cannot deadlock on it) and raise the same error as process 0 when
    it fails. A lock this process already holds is taken again (a recipe holds it for the whole run, `SAMTrainer.train`
    again for the training). Another run's lock raises `OutputDirInUseError` at once, naming the directory and that run.
    A lock file left by a run that was killed is free (the system releases a lock with its process; on NFS, the server
    when the client's lease ends) and is taken over. A file system without locks gets a warning: two runs are then not
    detected.
    """
    if output_dir is None:
        return
    error = _lock(os.fspath(output_dir)) if process_index == 0 else None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error], from_process=0)[0]
    if error is not None:
        raise OutputDirInUseError(error)


def unlock_output_dir(output_dir: str | os.PathLike | None, process_index: int = 0) -> None:
    """Give up one hold of `lock_output_dir`'s lock; the last one of this process releases it."""
    if process_index != 0 or output_dir is None:
        return
    path = os.path.realpath(os.path.join(os.fspath(output_dir), LOCK_NAME))
    held = _HELD_LOCKS.get(path)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD_LOCKS[path]
        held[0].close()  # releases the flock; the file stays, free, for the next run


def _lock(output_dir: str) -> str | None:
    """Take the lock of `output_dir` in this process; the error message when another run holds it, else `None`."""
    import fcntl

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(output_dir, LOCK_NAME))
    if path in _HELD_LOCKS:
        _HELD_LOCKS[path][1] += 1
        return None
    file = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open until unlocked)
    deadline = time.monotonic() + 30
    while True:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                file.close()
                logger.warning(
                    f"Cannot lock {path} ({error}): this file system has no locks, so another run writing into "
                    f"{output_dir} at the same time would not be detected."
                )
                return None
        holder = _read_holder(path)
        # A killed run's data-loader workers (forked, so holding the lock too) outlive it by a few seconds.
        if (
            holder.get("host") == socket.gethostname()
            and not _alive(holder.get("pid"))
            and time.monotonic() < deadline
        ):
            time.sleep(0.5)
            continue
        file.close()
        return (
            f"The output directory {output_dir} is in use by another run: process {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, started {holder.get('started', '?')} (command: {holder.get('command', '?')}). "
            f"Two runs writing into one folder overwrite each other's checkpoints. Wait for that run to end (its lock "
            f"{path} is released when its process ends), or choose another `output_dir`."
        )
    earlier = _read_holder(path)
    if earlier:
        logger.info(
            f"Taking over {path}, left by a run that has ended (process {earlier.get('pid')} on "
            f"{earlier.get('host')}, started {earlier.get('started')})."
        )
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": " ".join(sys.argv)[:300]}
    file.seek(0)
    file.truncate()
    json.dump(holder, file)
    file.flush()
    os.fsync(file.fileno())
    _HELD_LOCKS[path] = [file, 1]
    return None


def _read_holder(path: str) -> dict:
    """The process id, host and start time a lock file names; `{}` when it names none (yet)."""
    for _ in range(10):  # the holder writes its details just after taking the lock
        try:
            with open(path, encoding="utf-8") as reader:
                return json.load(reader)
        except (OSError, ValueError):
            time.sleep(0.05)
    return {}


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class SafeCheckpointsMixin:
    """
    What `SAMTrainer` adds to the Trainer's checkpoints: the run owns `output_dir` while it trains (`train`), a
    checkpoint is complete only once every process has written its files (`_save_checkpoint`), and
    `train(resume_from_checkpoint=True)` resumes from the newest complete one.
    """

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """
        The wrapped trainer's `train`; `resume_from_checkpoint=True` resumes from the newest **complete** checkpoint
        of `output_dir` (`hf_sam.checkpointing.checkpoint_for_resume_true`): a save cut short is skipped with a warning
        instead of failing the resume or silently restarting the SAM state. Without any checkpoint it raises what
        `Trainer.train` raises; when every checkpoint is incomplete, the same error type and text, saying what each lacks.
        """
        if resume_from_checkpoint is True and not os.path.isdir(self.args.output_dir):
            return super().train(True, *args, **kwargs)  # nothing to resume from, nor to lock: the Trainer's own error
        # Owned by this run while it trains (`hf_sam.checkpointing.lock_output_dir`): another run writing checkpoints
        # into the same folder would overwrite them, or resume from them half-written. A recipe already holds it.
        lock_output_dir(self.args.output_dir, self.args.process_index)
        try:
            if resume_from_checkpoint is True:
                resume_from_checkpoint = checkpoint_for_resume_true(self.args.output_dir) or True
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            unlock_output_dir(self.args.output_dir, self.args.process_index)

    def _save_checkpoint(self, model, trial) -> None:
        """
        The Trainer's save, made safe with several processes: process 0 marks the checkpoint as being written and,
        once every process has written its files (a barrier), writes `hf_sam_manifest.json` last; only then are
        older checkpoints rotated out (`save_total_limit`), so the last complete one is never deleted for one that
        may not be complete yet.
        """
        checkpoint = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        if self.args.should_save:
            start_checkpoint(checkpoint)
        self.accelerator.wait_for_everyone()  # no process writes into a rewritten checkpoint while it has a manifest
        save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = save_total_limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            write_checkpoint_manifest(
                checkpoint, {"global_step": self.state.global_step, **checkpoint_run_settings(self)}
            )
            rotate_checkpoints(
                output_dir=os.path.dirname(checkpoint),
                save_total_limit=save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        notice = None if checkpoint is None else batch_change_notice(checkpoint, self)
        if notice is not None and self.args.process_index == 0:
            logger.warning(notice)
