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
The report's dev results: per task, metric, method and rho, the mean ± std over seeds, the paired difference to the
AdamW run of the same seed with a 95% t-interval, and the time against AdamW on the same kind of device.
"""

import os

import numpy as np

from .records import whole_time_known
from .setups import GLUE_TASKS, METHOD_ORDER, task_label, task_metrics
from .stats import mean_ratios, mean_std, paired_difference


def majority_baselines(data_dir: str) -> dict[str, dict[str, float]]:
    """Dev scores of always predicting the most frequent training label (STS-B: a constant has 0 correlation)."""
    from hf_sam.scripts.glue import glue_metrics, load_glue_tsv

    baselines = {}
    for task, (folder, _) in GLUE_TASKS.items():
        try:
            raw = load_glue_tsv(task, os.path.join(data_dir, "glue", folder))
        except (FileNotFoundError, ValueError):
            continue
        if task == "stsb":
            baselines[task] = {"pearson": 0.0, "spearmanr": 0.0}
            continue
        train, dev = raw["train"]["label"], np.asarray(raw["validation"]["label"])
        majority = max(set(train), key=train.count)
        baselines[task] = glue_metrics(task, np.full_like(dev, majority), dev)
    return baselines


def time_ratios(pairs: list[tuple[dict, dict]]) -> str:
    """Wall / CPU time of runs over their AdamW runs, averaged per device: "2.01x / 2.00x", or, where the seeds ran on
    two kinds of device, "H100 1.23x / 1.21x; CPU 2.01x / 2.00x" (a GPU shared by many runs and one CPU core do
    not cost the same, so their ratios are never averaged together)."""
    by_device: dict[str, list[tuple[float, float]]] = {}
    for run, adamw in pairs:
        by_device.setdefault(run["device"], []).append(
            (run["wall_s"] / adamw["wall_s"], run["cpu_s"] / adamw["cpu_s"])
        )
    ratios = {name: mean_ratios(values) for name, values in by_device.items()}
    if len(set(ratios.values())) <= 1:  # one device, or the same ratio on each (AdamW over itself)
        return next(iter(ratios.values()), "–")
    return "; ".join(f"{name} {ratio}" for name, ratio in ratios.items())


def devices(records: list[dict]) -> str:
    """The seeds of a cell by device, e.g. "H100: 0; CPU: 1, 2" (a seed's methods pair up on one device)."""
    by_device: dict[str, list[int]] = {}
    for record in records:
        by_device.setdefault(record["device"], []).append(record["seed"])
    return "; ".join(f"{name}: {', '.join(map(str, sorted(seeds)))}" for name, seeds in by_device.items())


def _rows(task: str, task_name: str, runs: list[dict], baselines: dict) -> list[str]:
    """One block of the table: a row per metric (and the loss), method and rho."""
    adamw = {r["seed"]: r for r in runs if r["method"] == "AdamW"}
    lines = []
    # The loss on the same split too: SAM may change it (over-confidence) where the metric does not move.
    for key, label in task_metrics(task) + [("loss", "loss (lower is better)")]:
        if any(f"eval_{key}" not in r["metrics"] for r in runs):
            continue  # a metric some runs did not record
        # One row per method and rho: runs at a rho that a later sweep no longer chooses are not pooled.
        for method, rho in sorted(
            {(r["method"], r["rho"]) for r in runs}, key=lambda m: (METHOD_ORDER.index(m[0]), m[1])
        ):
            mine = sorted((r for r in runs if (r["method"], r["rho"]) == (method, rho)), key=lambda r: r["seed"])
            paired = [r for r in mine if r["seed"] in adamw and method != "AdamW"]
            pairs = [(adamw[r["seed"]]["metrics"][f"eval_{key}"], r["metrics"][f"eval_{key}"]) for r in paired]
            crossed = sum(1 for r in paired if adamw[r["seed"]]["device"] != r["device"])
            crossed = f", {crossed} across devices" if crossed else ""
            # Cost against the AdamW run of the same seed on the same kind of machine only, without the runs that
            # also measured sharpness (its Hessian passes would pull the ratio towards 1) and the runs whose whole
            # time is unknown (resumed from a checkpoint that did not keep the time before it).
            timed = [
                (r, adamw[r["seed"]])
                for r in mine
                if r["seed"] in adamw
                and adamw[r["seed"]]["device"] == r["device"]
                and not (r.get("sharpness_history") or adamw[r["seed"]].get("sharpness_history"))
                and whole_time_known(r)
                and whole_time_known(adamw[r["seed"]])
            ]
            baseline = baselines.get(task, {}).get(key)
            lines.append(
                f"| {task_name} | {label} | {'–' if baseline is None else f'{baseline:.3f}'} | {method} "
                f"| {rho:g} | {mean_std([r['metrics'][f'eval_{key}'] for r in mine])} "
                f"| {paired_difference(pairs) if pairs else '–'}{crossed} | {time_ratios(timed)} | {devices(mine)} |"
            )
    return lines


def dev_section(records: list[dict], data_dir: str, on_gpu: bool) -> list[str]:
    """The grid, the cheaper schedules, the control and RTE at its chosen learning rate, on the dev / test sets."""
    baselines = majority_baselines(data_dir) | {"cifar10": {"accuracy": 0.1}}
    grid = [r for r in records if r["study"] in ("glue", "glue-cheap", "glue-peer", "image")]
    lines = [
        "",
        "## Dev results (full training sets; mean ± sample std over seeds; paired difference to AdamW over the same "
        "seeds, with a 95% t-interval)",
        "",
        "| task | metric | majority class | method | rho | score | minus AdamW | wall / CPU time vs AdamW | ran on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    blocks = [
        (task, task_label(task), [r for r in grid if r["task"] == task]) for task in ("rte", "mrpc", "stsb", "cola")
    ]
    rte_again = [r for r in records if r["study"] == "glue-rte"]
    if rte_again:  # RTE at the learning rate its held-out sweep chose, beside the grid's
        rates = sorted({r["learning_rate"] for r in rte_again})
        blocks.insert(1, ("rte", f"RTE (lr {', '.join(f'{lr:g}' for lr in rates)})", rte_again))
    blocks.append(("cifar10", task_label("cifar10"), [r for r in grid if r["task"] == "cifar10"]))
    for task, task_name, runs in blocks:
        lines += _rows(task, task_name, runs, baselines)
    lines += [
        "",
        "Time ratios are per seed (same task and seed as the AdamW run, on the same kind of device, neither run "
        "measuring sharpness), then averaged per kind of device; wall clock depends on what else ran on the "
        "machine, CPU time of the run's process is the steadier measure. A run resumed from a checkpoint counts "
        "each attempt up to the checkpoint the next one resumed from (`attempts` and `resumed_from` in the JSON; "
        "the recipes keep the time in each checkpoint's `run_cost.json`); runs resumed from an older checkpoint "
        "without it have no ratio. A paired difference marked `across devices` pairs some seeds' runs from two "
        "devices (TF32 and the fp16-rounded MiniLM on the GPU): a source of noise like another seed, not of bias "
        "we could measure (`sweep_adamw_on_cpu.jsonl`)."
        + (
            " On a GPU machine the runs share one GPU and its CPU cores, so these ratios measure contention as much "
            "as SAM's cost; the step cost of SAM is measured in `benchmarks/`."
            if on_gpu
            else ""
        ),
    ]
    return lines
