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
The records of finished runs: one JSON line per run in append-only files, one schema (`SCHEMA`), written by
`make_record` and read by `read_records`, which also maps the records written before the schema (their parameters
then lived only in the run id and the command).

A record holds the run's parameters as fields (`id`, `study`, `recipe`, `task`, `method`, `rho`, `seed`,
`learning_rate`, `label_noise` and `train_samples` (`None`: none / the whole training set), `held_out`, `sharpness`
(what the sharpness was measured on, or `None`), `device` ("CPU" or the GPU's model, e.g. "H100")), then what it gave
and cost: `command`, `metrics`, `eval_history`, `train_history`, `sharpness_history`, `memorisation_history`
(label-noise runs: `hf_sam.label_noise.MemorisationCallback`'s logs), `wall_s` and `cpu_s` (all
attempts; `None`: unknown), `attempt_wall_s`, `attempt_cpu_s`, `attempts`, `resumed_from`, `torch_threads`,
`finished` and `environment` (versions, machine, commit).
"""

import json
import os
import re
import shlex
from pathlib import Path


SCHEMA = 2  # records without `schema` are the first layout


def device_name(environment: dict) -> str:
    """Where a run ran: its GPU's model (e.g. "H100"), or "CPU"."""
    gpu = environment.get("gpu")
    if not gpu:
        return "CPU"
    match = re.search(r"\b([A-Z]+\d+\w*)\b", gpu)
    return match.group(1) if match else gpu


def make_record(parameters: dict, environment: dict, **outcome) -> dict:
    """The record of a finished run: its parameters (`plan.Run.parameters()`), its device, then `outcome`."""
    return {"schema": SCHEMA, **parameters, "device": device_name(environment), **outcome, "environment": environment}


def _flag(argv: list[str], name: str, default: str | None = None) -> str | None:
    """The value of the last `name` in a command's arguments (argparse keeps the last)."""
    at = [i for i, part in enumerate(argv) if part == name]
    return argv[at[-1] + 1] if at else default


def upgrade(record: dict) -> dict:
    """A record of the first layout in the current one: the parameters it kept only in its command, as fields."""
    if record.get("schema") == SCHEMA:
        return record
    argv = shlex.split(record["command"])
    rate, noise, samples = (_flag(argv, name) for name in ("--learning_rate", "--label_noise", "--max_train_samples"))
    sharpness = None
    if "--sharpness_every_n_steps" in argv:  # the recipes' defaults where a command did not set them
        sharpness = {
            "data": _flag(argv, "--sharpness_data", "eval"),
            "num_batches": int(_flag(argv, "--sharpness_num_batches", "4")),
            "batch_size": int(_flag(argv, "--sharpness_batch_size", "64")),
            "settings": json.loads(_flag(argv, "--sharpness_settings", "{}")),
        }
    held_out = "--validation_split_percentage" in argv or "--train_val_split" in argv
    parameters = {
        "learning_rate": None if rate is None else float(rate),
        "label_noise": None if noise is None else float(noise),
        "train_samples": None if samples is None else int(samples),
        "held_out": held_out,
        "sharpness": sharpness,
        "device": device_name(record["environment"]),
    }
    return {"schema": SCHEMA, **record, **parameters}


def read_records(*paths: Path | str) -> dict[str, dict]:
    """
    The finished runs of the JSON-lines files, by id, in the current layout (a torn last line, from a crash
    mid-write, is ignored). Within one file a later line replaces an earlier one; the same run in two files (two
    machines) is an error, since the report would otherwise show one of them silently.
    """
    records, source = {}, {}
    for path in {Path(path).resolve(): None for path in paths}:  # one file named twice is read once
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if source.get(record["id"], path) != path:
                raise ValueError(f"run {record['id']} is in both {source[record['id']]} and {path}; keep one of them")
            records[record["id"]], source[record["id"]] = upgrade(record), path
    return records


def append_record(path: Path | str, record: dict) -> None:
    """Append one record as a line and sync it to disk; after a torn last line, start a new line first."""
    with open(path, "a+b") as writer:
        writer.seek(0, os.SEEK_END)
        torn = False
        if writer.tell() > 0:
            writer.seek(-1, os.SEEK_END)
            torn = writer.read(1) != b"\n"
        writer.write(((b"\n" if torn else b"") + json.dumps(record, sort_keys=True).encode("utf-8")) + b"\n")
        writer.flush()
        os.fsync(writer.fileno())


def find(records: dict[str, dict], **fields) -> dict | None:
    """The one record whose fields have these values (e.g. `study="glue-sweep", task="rte", rho=0.02`), or None."""
    matches = [r for r in records.values() if all(r.get(key) == value for key, value in fields.items())]
    if len(matches) > 1:
        raise ValueError(f"{len(matches)} records match {fields}: {[r['id'] for r in matches]}")
    return matches[0] if matches else None


def whole_time_known(record: dict) -> bool:
    """A record's `wall_s` / `cpu_s` cover the whole run: not resumed, or resumed with the earlier attempts' time."""
    if record.get("wall_s") is None:
        return False
    return not record.get("resumed_from") or record.get("attempts") is not None
