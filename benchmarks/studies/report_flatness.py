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
Flatness at 3 seeds (issue 28): each method minus AdamW, paired by seed, for every sharpness measure, at the end of
training and at a matched training loss (the AdamW measurement whose logged training loss is closest to the
method's final one).
"""

import statistics

from .report_sharpness import SHARPNESS_KEYS
from .setups import METHOD_ORDER
from .stats import paired_difference


# The studies that measured the stochastic grid's runs at the end of training, the first one preferred for a seed
# measured twice (seed 0's AdamW: `image`, and again along training in `image-flat-adamw`).
STOCHASTIC = ("image", "image-flat", "image-flat-adamw")
FULL_BATCH = ("image-full-batch",)
# Along training, AdamW's dense curve first.
MATCHING = ("image-flat-adamw", "image")
LOSS_WINDOW = 4  # logged training losses averaged (the logs every 20 steps: 80 steps, about an epoch of 79)
# Full batch: no augmentation and the whole 512-image set each step, so one log (the mean loss of its 20 steps) is
# the training loss itself, not a noisy minibatch estimate.
FULL_BATCH_LOSS_WINDOW = 1


def end_measurements(records: list[dict], studies: tuple[str, ...]) -> dict[tuple[str, float], dict[int, dict]]:
    """The runs of `studies` that measured sharpness, by (method, rho) and seed, the earlier study's for a seed run
    twice."""
    measured = [r for r in records if r["study"] in studies and r.get("sharpness_history")]
    by_run: dict[tuple[str, float], dict[int, dict]] = {}
    for record in sorted(measured, key=lambda r: studies.index(r["study"])):
        by_run.setdefault((record["method"], record["rho"]), {}).setdefault(record["seed"], record)
    return by_run


def devices(runs: list[dict]) -> str:
    """Where the runs ran, with their seeds: e.g. "CPU: 0; H100: 1, 2"."""
    by_device: dict[str, list[int]] = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        by_device.setdefault(run["device"], []).append(run["seed"])
    return "; ".join(f"{device}: {', '.join(map(str, seeds))}" for device, seeds in sorted(by_device.items()))


def paired_rows(by_run: dict[tuple[str, float], dict[int, dict]]) -> list[tuple[str, float, list[str]]]:
    """Each method minus AdamW at the end of training, paired by seed, for every measure, then where the pairs ran:
    (method, rho, cells)."""
    adamw = next((seeds for (method, _), seeds in by_run.items() if method == "AdamW"), {})
    rows = []
    for (method, rho), seeds in sorted(by_run.items(), key=lambda item: (METHOD_ORDER.index(item[0][0]), item[0][1])):
        if method == "AdamW":
            continue
        paired = [(adamw[seed], run) for seed, run in sorted(seeds.items()) if seed in adamw]
        cells = []
        for key, _, _ in SHARPNESS_KEYS:
            ends = [(a["sharpness_history"][-1], b["sharpness_history"][-1]) for a, b in paired]
            pairs = [(a[key], b[key]) for a, b in ends if key in a and key in b]
            cells.append(paired_difference(pairs, "{:+.3g}"))
        cells.append(f"{method} {devices([b for _, b in paired])}; AdamW {devices([a for a, _ in paired])}")
        rows.append((method, rho, cells))
    return rows


def loss_before(record: dict, step: int, window: int = LOSS_WINDOW) -> float | None:
    """The mean of the last `window` logged training losses at or before `step`; None before the first log."""
    losses = [log["loss"] for log in record.get("train_history", []) if "loss" in log and log["step"] <= step]
    return statistics.mean(losses[-window:]) if losses else None


def matched_measurement(adamw: dict, target: float, window: int = LOSS_WINDOW) -> tuple[dict, float] | None:
    """AdamW's sharpness measurement whose training loss (`loss_before` its step) is closest to `target`, with it."""
    candidates = [
        (log, loss)
        for log in adamw["sharpness_history"]
        if (loss := loss_before(adamw, log["step"], window)) is not None
    ]
    return min(candidates, key=lambda candidate: abs(candidate[1] - target)) if candidates else None


def matched_rows(
    records: list[dict], studies: tuple[str, ...], adamw_studies: tuple[str, ...], window: int
) -> list[list[str]]:
    """Each method of `studies` at the end minus AdamW (from `adamw_studies`, the first one's for a seed measured
    twice) at the matched training loss, paired by seed: [method, *cells, matches] per method."""
    adamw = {}
    for record in sorted(
        records, key=lambda r: adamw_studies.index(r["study"]) if r["study"] in adamw_studies else 99
    ):
        if record["study"] in adamw_studies and record["method"] == "AdamW" and record.get("sharpness_history"):
            adamw.setdefault(record["seed"], record)
    methods = [r for r in records if r["study"] in studies and r["method"] != "AdamW" and r.get("sharpness_history")]
    rows = []
    for method in [m for m in METHOD_ORDER if any(r["method"] == m for r in methods)]:
        pairs, matches = {key: [] for key, _, _ in SHARPNESS_KEYS}, []
        for record in sorted((r for r in methods if r["method"] == method), key=lambda r: r["seed"]):
            end = record["sharpness_history"][-1]
            target = loss_before(record, end["step"], window)
            found = (
                None
                if target is None or record["seed"] not in adamw
                else matched_measurement(adamw[record["seed"]], target, window)
            )
            if found is None:
                continue
            log, loss = found
            matches.append(
                f"seed {record['seed']}: {target:.3g} vs AdamW {loss:.3g} at step {log['step']} "
                f"({adamw[record['seed']]['study']})"
            )
            for key in pairs:
                if key in log and key in end:
                    pairs[key].append((log[key], end[key]))
        if matches:
            cells = [paired_difference(pairs[key], "{:+.3g}") for key, _, _ in SHARPNESS_KEYS]
            rows.append([method, *cells, "; ".join(matches)])
    return rows


def flatness_section(records: list[dict]) -> list[str]:
    """Paired intervals over seeds for every measure: stochastic and full-batch at the end, and at a matched loss."""
    rows = [("stochastic (batch 64)", row) for row in paired_rows(end_measurements(records, STOCHASTIC))]
    rows += [("full batch (512)", row) for row in paired_rows(end_measurements(records, FULL_BATCH))]
    if not rows:
        return []
    labels = " | ".join(label for _, label, _ in SHARPNESS_KEYS)
    lines = [
        "",
        "## Flatness at 3 seeds: each method minus AdamW, paired by seed",
        "",
        "Every sharpness measure at the end of training, the mean difference with its 95% t-interval over seeds "
        "(`stats.paired_difference`), whichever way it goes. Stochastic: the image grid's seed 0 (`image`) with "
        "seeds 1 and 2 rerun with the same measurement (`image-flat`; AdamW in `image-flat-adamw`); full batch: "
        "`image-full-batch`.",
        "",
        f"| set-up | method minus AdamW | rho | {labels} | ran on (seeds) |",
        "|---|---|---|" + "---|" * (len(SHARPNESS_KEYS) + 1),
    ]
    for setup, (method, rho, cells) in rows:
        lines.append(f"| {setup} | {method} | {rho:g} | " + " | ".join(cells) + " |")
    matched = [["stochastic (batch 64)", *row] for row in matched_rows(records, STOCHASTIC, MATCHING, LOSS_WINDOW)]
    matched += [
        ["full batch (512)", *row] for row in matched_rows(records, FULL_BATCH, FULL_BATCH, FULL_BATCH_LOSS_WINDOW)
    ]
    if matched:
        lines += [
            "",
            "At a matched training loss: the method at the end of training minus the AdamW measurement (along its "
            "training, same seed) whose training loss is closest to the method's final one; the closest measurement "
            "is picked, not interpolated. Stochastic: both losses the mean of the last "
            f"{LOSS_WINDOW} logged training losses (every 20 steps; the Trainer's minibatch loss at w, with the "
            "crop and flip, not the loss on the 256 measured images) at or before the measurement; AdamW measured "
            "every 395 steps in `image-flat-adamw`, every 1,580 in `image`. Full batch: the last logged loss at or "
            "before the measurement (the mean of the 20 full-batch steps it logs, on the 512 measured images, no "
            "augmentation); AdamW measured every 100 steps, so the match is coarse. The full-batch runs predate "
            "426b136 and have no loss log at a measured step (the measurement's log cancelled it), so the log 20 "
            "steps earlier stands in: where the loss still falls, as AdamW's does at step 200, the loss shown is above "
            "the one at the measurement.",
            "",
            f"| set-up | method minus AdamW | {labels} | final training loss vs AdamW's at the step matched |",
            "|---|---|" + "---|" * len(SHARPNESS_KEYS) + "---|",
        ] + ["| " + " | ".join(row) + " |" for row in matched]
    return lines + rerun_check(records)


def rerun_check(records: list[dict]) -> list[str]:
    """
    Whether the flatness reruns trained as the grid's runs of the same seed did: the measurement forks the RNG and
    must not change training, so the data order and the first steps must agree. On CPUs the logged losses can still
    part in the last digit (kernels need not give bitwise-equal sums from one machine or memory layout to the next)
    and training, chaotic, then drifts apart: the cell says for how many epochs the test accuracy stayed equal and at
    which step the logged gradient norms first differ by more than 0.1%.
    """
    grid = {(r["method"], r["rho"], r["seed"]): r for r in records if r["study"] == "image"}
    reruns = (r for r in records if r["study"] in ("image-flat", "image-flat-adamw"))
    cells = []
    for rerun in sorted(reruns, key=lambda r: (r["method"], r["seed"])):
        original = grid.get((rerun["method"], rerun["rho"], rerun["seed"]))
        if original is None:
            continue
        curves = [[log.get("eval_accuracy") for log in r["eval_history"]] for r in (rerun, original)]
        if curves[0] == curves[1]:
            same = "every epoch equal"
        else:
            equal_epochs = next(i for i, (a, b) in enumerate(zip(*curves, strict=False)) if a != b)
            # The gradient norm of a logged step depends on the weights and that step's batch only (the logged loss
            # is a mean over the steps since the last log, which two commits may window differently).
            norms = [
                {log["step"]: log["grad_norm"] for log in r["train_history"] if "grad_norm" in log}
                for r in (rerun, original)
            ]
            apart = [
                step
                for step in sorted(norms[0])
                if step in norms[1] and abs(norms[0][step] - norms[1][step]) > 1e-3 * abs(norms[1][step])
            ]
            same = f"curves differ (equal for the first {equal_epochs} epochs" + (
                f", gradient norms apart by > 0.1% from step {apart[0]})" if apart else ")"
            )
        cells.append(
            f"{rerun['method']} seed {rerun['seed']} {rerun['metrics']['eval_accuracy']:.3f} ({rerun['device']}) vs "
            f"{original['metrics']['eval_accuracy']:.3f} ({original['device']}), {same}"
        )
    if not cells:
        return []
    return [
        "",
        "The reruns against the grid's runs of the same seed (test accuracy at the end): " + "; ".join(cells) + ".",
    ]
