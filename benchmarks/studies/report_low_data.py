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
The report's scarce-data and calibration sections (issue 29): the rho sweep on 1,000 training examples with AdamW's
held-out curve (does it plateau?), the dev results at 10 seeds with paired differences, what a null result rules out
and the seeds a cell would need, and the calibration metrics before / after temperature scaling. Each section appears
only when its records exist.
"""

import statistics

from .plan import sweep_rhos
from .records import find
from .setups import METHOD_ORDER, score_by_epoch, task_label, task_metrics, task_score
from .stats import equivalence, mean_std, paired_difference, seeds_for_power
from .tables import (
    GLUE_CALIBRATION,
    LOW_DATA,
    LOW_DATA_EPOCHS,
    LOW_DATA_FSAM,
    LOW_DATA_FSAM_SWEEP,
    LOW_DATA_RHO,
    LOW_DATA_SWEEP,
    PLATEAU_MEAN_GAIN,
    PLATEAU_TASK_GAIN,
    low_data_plateau,
)


EFFECT = 0.01  # 1 point of a score in [0, 1]: the difference the seeds are counted for
POWER_MOST = 100_000  # seeds counted up to this; more is written "> 100,000"
# The calibration metrics of `hf_sam.calibration` (lower is better), then the temperature fitted on all examples.
CALIBRATION = [
    ("nll", "NLL"), ("nll_ts", "NLL, TS"), ("ece", "ECE"), ("ece_ts", "ECE, TS"), ("brier", "Brier"),
    ("brier_ts", "Brier, TS"), ("temperature", "temperature"),
]  # fmt: skip


def plateau(results: dict[str, dict]) -> list[str]:
    """AdamW's held-out curve in the sweep per task (every 3rd epoch), and the epoch rule (`tables.low_data_plateau`)
    that gates the seed runs: per task the mean of 3 evaluations around two thirds of training and of the last 3."""
    curves = []
    for task in LOW_DATA_SWEEP.tasks:
        record = find(results, study=LOW_DATA_SWEEP.name, task=task, method="AdamW", seed=0)
        scores = score_by_epoch(record) if record else {}
        if scores:
            shown = [epoch for epoch in sorted(scores) if epoch % 3 == 0 or epoch == max(scores)]
            curves.append(f"| {task_label(task)} | {', '.join(f'{e}: {scores[e]:.3f}' for e in shown)} |")
    if not curves:
        return []
    lines = ["", "AdamW's held-out score after each epoch:", "", "| task | epoch: score |", "|---|---|", *curves]
    passed, gains = low_data_plateau(results)
    cells = [
        f"{task_label(task)} {before:.3f} (epochs {early[0]}-{early[-1]}) -> {after:.3f} ({late[0]}-{late[-1]})"
        for task, found in gains.items()
        if found is not None
        for before, after, early, late in [found]
    ]
    if not cells:
        return lines
    if passed is None:
        verdict = "not judged until every task's AdamW run is done; the seed runs wait for it"
    else:
        mean = sum(after - before for before, after, _, _ in gains.values()) / len(gains)
        bounds = f"mean gain {mean:+.3f} (must be < {PLATEAU_MEAN_GAIN:g}), each task's < {PLATEAU_TASK_GAIN:g}"
        verdict = f"{bounds}: " + (
            "passed, the seed runs go ahead" if passed else "failed: more epochs, the seed runs wait"
        )
    return lines + [
        "",
        f"Epoch rule, AdamW's held-out score over the last third of training: {'; '.join(cells)}; {verdict}.",
    ]


def sweep_section(results: dict[str, dict]) -> list[str]:
    """The scarce-data rho sweep: each method's held-out score at each rho, the rho chosen, AdamW's curve."""
    studies = (LOW_DATA_SWEEP.name, LOW_DATA_FSAM_SWEEP.name)
    if not any(r["study"] in studies for r in results.values()):
        return []
    arms = [(LOW_DATA_SWEEP.name, "AdamW", 0.0)]
    arms += [(LOW_DATA_SWEEP.name, "SAM", rho) for rho in sweep_rhos(LOW_DATA_SWEEP, "SAM")]
    arms += [(LOW_DATA_FSAM_SWEEP.name, "F-SAM", rho) for rho in sweep_rhos(LOW_DATA_FSAM_SWEEP, "F-SAM")]
    chosen = {method: rule(results) for method, rule in LOW_DATA_RHO.items()}
    lines = [
        "",
        f"## Scarce data: rho sweep (1,000 training examples, {LOW_DATA_EPOCHS} epochs; 250 held-out training "
        "examples, seed 0; the dev sets are not used)",
        "",
        "The held-out examples are the first 250 of the grid's held-out 10% (RTE: its 249), carved before the 1,000 "
        "training examples are drawn from the rest, so the two never overlap. Score: the task's GLUE metrics at the "
        "last epoch, averaged; the rho of each method is the one with the best score averaged over the four tasks "
        f"(now: SAM {chosen['SAM']}, F-SAM {chosen['F-SAM']}; `None` until the method's sweep is complete). One seed "
        "on 250 examples: the binomial standard error of an accuracy near 0.75 is sqrt(0.75 * 0.25 / 250) = 0.027.",
        "",
        "| task | AdamW | " + " | ".join(f"{m} rho={rho:g}" for _, m, rho in arms[1:]) + " |",
        "|---|" + "---|" * len(arms),
    ]
    for task in LOW_DATA_SWEEP.tasks:
        cells = []
        for study, method, rho in arms:
            record = find(results, study=study, task=task, method=method, rho=rho, seed=0)
            cells.append("–" if record is None else f"{task_score(task, record['metrics']):.3f}")
        lines.append(f"| {task_label(task)} | " + " | ".join(cells) + " |")
    lines += plateau(results)
    return lines


def _pairs(runs: list[dict], adamw: dict[int, dict], key: str) -> list[tuple[float, float]]:
    """(AdamW, run) values of `key` for the runs whose seed has an AdamW run that recorded it."""
    return [
        (adamw[r["seed"]]["metrics"][key], r["metrics"][key])
        for r in runs
        if r["seed"] in adamw and key in adamw[r["seed"]]["metrics"]
    ]


def dev_section(records: list[dict]) -> list[str]:
    """The 10-seed dev results: mean ± std, SAM / F-SAM minus AdamW by seed, the equivalence, the seeds needed."""
    runs = [r for r in records if r["study"] in (LOW_DATA.name, LOW_DATA_FSAM.name)]
    if not runs:
        return []
    lines = [
        "",
        "## Scarce data: dev results (1,000 training examples, a different random subset for each seed and the same "
        "for every method of a seed)",
        "",
        "Mean ± sample std over seeds; the paired difference to AdamW over the same seeds with its 95% t-interval; "
        "where that interval lies inside ±1 point, the largest difference it leaves (a null result that says "
        "something); and the seeds a two-sided paired t-test (5%) would need to detect a 1-point difference with 80% "
        "power at the cell's observed std of the differences (noncentral t, `scipy.stats.nct`).",
        "",
        "| task | metric | method | rho | score | minus AdamW | within ±1 point | seeds for 1 point at 80% power |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in LOW_DATA.tasks:
        mine = [r for r in runs if r["task"] == task]
        adamw = {r["seed"]: r for r in mine if r["method"] == "AdamW"}
        for key, label in task_metrics(task):
            metric = f"eval_{key}"
            if not any(metric in r["metrics"] for r in mine):
                continue  # a metric no run recorded
            for method, rho in sorted({(r["method"], r["rho"]) for r in mine}, key=lambda m: METHOD_ORDER.index(m[0])):
                cell = [r for r in mine if (r["method"], r["rho"]) == (method, rho) and metric in r["metrics"]]
                pairs = _pairs(cell, adamw, metric) if method != "AdamW" else []
                differences = [b - a for a, b in pairs]
                spread = statistics.stdev(differences) if len(differences) >= 2 else 0.0
                needed = seeds_for_power(spread, EFFECT, most=POWER_MOST) if spread > 0 else None
                needed = f"> {POWER_MOST:,}" if spread > 0 and needed is None else needed
                lines.append(
                    f"| {task_label(task)} | {label} | {method} | {rho:g} "
                    f"| {mean_std([r['metrics'][metric] for r in cell])} | {paired_difference(pairs)} "
                    f"| {equivalence(differences, EFFECT)} | {'–' if needed is None else needed} |"
                )
    return lines


def calibration_section(records: list[dict]) -> list[str]:
    """The calibration metrics of the scarce-data runs and the full-size reruns, with SAM / F-SAM minus AdamW."""
    groups = [
        ("1,000 examples", [r for r in records if r["study"] in (LOW_DATA.name, LOW_DATA_FSAM.name)]),
        ("full training set", [r for r in records if r["study"] == GLUE_CALIBRATION.name]),
    ]
    groups = [(name, [r for r in runs if "eval_nll" in r["metrics"]]) for name, runs in groups]
    if not any(runs for _, runs in groups):
        return []
    lines = [
        "",
        "## Calibration on GLUE (dev sets; classification tasks)",
        "",
        "NLL, ECE (top label, 15 equal-width bins) and the multi-class Brier score of the softmax probabilities on the "
        "dev set (lower is better), then the same after temperature scaling (TS). The TS metrics use 2-fold "
        "cross-fitting on the evaluation set itself (`hf_sam/calibration.py`): the dev set is split in two fixed "
        "random halves, each half is scored with the temperature fitted on the other, so no example is scored with "
        "a temperature fitted on it; `temperature` is the one fitted on the whole dev set. Mean ± sample std over "
        "seeds; the difference to AdamW paired by seed with its 95% t-interval.",
        "",
        "| training data | task | metric | method | rho | score | minus AdamW |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in groups:
        for task in [task for task in LOW_DATA.tasks if any(r["task"] == task for r in runs)]:
            mine = [r for r in runs if r["task"] == task]
            adamw = {r["seed"]: r for r in mine if r["method"] == "AdamW"}
            arms = sorted({(r["method"], r["rho"]) for r in mine}, key=lambda m: METHOD_ORDER.index(m[0]))
            for key, label in CALIBRATION:
                metric = f"eval_{key}"
                if not any(metric in r["metrics"] for r in mine):
                    continue  # a metric no run recorded
                for method, rho in arms:
                    cell = [r for r in mine if (r["method"], r["rho"]) == (method, rho) and metric in r["metrics"]]
                    pairs = _pairs(cell, adamw, metric) if method != "AdamW" else []
                    lines.append(
                        f"| {name} | {task_label(task)} | {label} | {method} | {rho:g} "
                        f"| {mean_std([r['metrics'][metric] for r in cell])} | {paired_difference(pairs)} |"
                    )
    return lines


def low_data_section(results: dict[str, dict]) -> list[str]:
    """The scarce-data sweep and dev results, then the calibration tables (each only when it has records)."""
    records = list(results.values())
    return sweep_section(results) + dev_section(records) + calibration_section(records)
