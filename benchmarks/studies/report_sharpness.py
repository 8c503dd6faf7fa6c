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
"""The report's sharpness section: the Hessian measures of the image runs that took them, at the end and along training."""

from .setups import METHOD_ORDER
from .stats import paired_difference


SHARPNESS_KEYS = (
    ("sharpness/top_eigenvalue", "top eigenvalue", "{:.4g}"),
    ("sharpness/trace", "trace", "{:.4g}"),
    ("sharpness/ascent", "ascent sharpness", "{:.3g}"),
    ("sharpness/alignment", "alignment cos(g, v_max)", "{:.3g}"),
)


def measured_on(record: dict) -> str:
    """What a run's sharpness was measured on (its `sharpness` field): e.g. "train 1 x 256, Hutch++ k=5 + 30 probes"."""
    setup = record["sharpness"] or {"data": "eval", "num_batches": 4, "batch_size": 64, "settings": {}}
    trace = setup["settings"].get("trace", {})
    samples, rank = trace.get("samples", 10), trace.get("deflation_rank", 0)
    estimator = f"Hutch++ k={rank} + {samples} probes" if rank else f"Hutchinson {samples} probes"
    return f"{setup['data']} {setup['num_batches']} x {setup['batch_size']}, {estimator}"


def _value(log: dict, key: str, form: str) -> str:
    """A measurement with its standard error after a ± when it has one; "–" when not measured."""
    if key not in log:
        return "–"
    text = form.format(log[key])
    stderr = log.get(f"{key}_stderr")
    return text if stderr is None else f"{text} ± {form.format(stderr)}"


def sharpness_section(records: list[dict]) -> list[str]:
    """The sharpness of the image runs that measured it: at the end of training, and along it."""
    measured = [r for r in records if r.get("sharpness_history") and r["study"] in ("image", "image-full-batch")]
    if not measured:
        return []
    measured.sort(key=lambda r: (r["study"] != "image", r["seed"], METHOD_ORDER.index(r["method"]), r["rho"]))
    lines = [
        "",
        "## Sharpness (Wen, Ma & Li 2023: stochastic SAM lowers the Hessian trace, full-batch SAM the top eigenvalue)",
        "",
        "Seed 0 of the image grid, and full-batch training (512 training images drawn with the run's seed, as one "
        "batch at every step, no augmentation); measured by `SharpnessCallback` in eval mode on the examples the "
        "`measured on` column names (each run's `sharpness` field: which data, batches x batch size; a fixed "
        "seed-0 random subset without augmentation), ascent sharpness at rho 0.05, the trace by Hutchinson or "
        "Hutch++ with its standard error after the ±. At the end of training:",
        "",
        "| study | seed | method | rho | step | "
        + " | ".join(label for _, label, _ in SHARPNESS_KEYS)
        + " | measured on | ran on |",
        "|---|---|---|---|---|" + "---|" * len(SHARPNESS_KEYS) + "---|---|",
    ]
    for record in measured:
        last = record["sharpness_history"][-1]
        cells = [_value(last, key, form) for key, _, form in SHARPNESS_KEYS]
        lines.append(
            f"| {record['study']} | {record['seed']} | {record['method']} | {record['rho']:g} | {last['step']} | "
            + " | ".join(cells)
            + f" | {measured_on(record)} | {record['device']} |"
        )
    lines += sharpness_differences(measured)
    lines += ["", "Along training (step: value):", "", "| study | seed | method | quantity | step: value |"]
    lines += ["|---|---|---|---|---|"]
    for record in measured:
        run = f"| {record['study']} | {record['seed']} | {record['method']} |"
        for key, label, form in SHARPNESS_KEYS[:2]:
            points = [f"{log['step']}: {_value(log, key, form)}" for log in record["sharpness_history"] if key in log]
            lines.append(f"{run} {label} | " + ", ".join(points) + " |")
        # The Hessian of cross-entropy shrinks as the loss goes to 0: read the sharpness with the loss it was at.
        losses = []
        for log in record["sharpness_history"]:
            before = [t["loss"] for t in record.get("train_history", []) if t["step"] <= log["step"]]
            losses.append(f"{log['step']}: {before[-1]:.3g}" if before else f"{log['step']}: –")
        lines.append(f"{run} training loss (last logged) | " + ", ".join(losses) + " |")
    return lines


def sharpness_differences(measured: list[dict]) -> list[str]:
    """
    Per study measured at more than one seed: each method minus AdamW at the end of training, paired by seed, for the
    top eigenvalue and the trace (mean with a 95% t-interval over seeds; the seeds' own Monte-Carlo errors are not
    in it), as the difference says more than one seed's pair.
    """
    lines = []
    for study_name in sorted({r["study"] for r in measured}):
        runs = [r for r in measured if r["study"] == study_name]
        if len({r["seed"] for r in runs}) < 2:
            continue
        adamw = {r["seed"]: r["sharpness_history"][-1] for r in runs if r["method"] == "AdamW"}
        for method in [m for m in METHOD_ORDER if m != "AdamW" and any(r["method"] == m for r in runs)]:
            cells = []
            for key, label, _ in SHARPNESS_KEYS[:2]:
                pairs = [
                    (adamw[r["seed"]][key], r["sharpness_history"][-1][key])
                    for r in runs
                    if r["method"] == method and r["seed"] in adamw
                    and key in adamw[r["seed"]] and key in r["sharpness_history"][-1]
                ]  # fmt: skip
                cells.append(f"{label} {paired_difference(pairs, '{:+.4g}')}")
            lines.append(f"- {study_name}, {method} minus AdamW at the end, paired by seed: " + "; ".join(cells) + ".")
    return [""] + lines if lines else []
