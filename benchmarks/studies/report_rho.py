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
The rho-robustness study (`image-rho`): held-out accuracy against rho for SAM and USAM, the width of the rho range
within 1 point of each method's best, the divergences, and the figure.

    python -m benchmarks.studies.report_rho --figure docs/rho_robustness.png   # the figure from the records
"""

import argparse
import math
import statistics
from pathlib import Path

from .records import read_records
from .stats import mean_std
from .tables import FIRST_EPOCH_GRAD_NORM, IMAGE_RHO_ROBUSTNESS


METHODS = ("SAM", "USAM")
WITHIN = 0.01  # "within 1 point of the best": mean held-out accuracy at least the best mean minus 0.01


def diverged(record: dict) -> str | None:
    """Why a run diverged, or None: a non-finite logged or final training loss, or a final training loss above the
    first one logged (both from `train_history`, the Trainer's logged `loss`)."""
    losses = [log["loss"] for log in record.get("train_history", []) if "loss" in log]
    final = record.get("metrics", {}).get("train_loss")
    if any(not math.isfinite(loss) for loss in losses) or (final is not None and not math.isfinite(final)):
        return "non-finite loss"
    if len(losses) >= 2 and losses[-1] > losses[0]:
        return f"final training loss {losses[-1]:.3g} above the first {losses[0]:.3g}"
    return None


def accuracy_by_rho(records: list[dict], method: str) -> dict[float, list[float]]:
    """The held-out accuracies at the last epoch of `method`'s runs by rho (a seed per value), rho in increasing order."""
    by_rho: dict[float, list[float]] = {}
    for record in sorted(records, key=lambda r: (r["rho"], r["seed"])):
        if record["method"] == method:
            by_rho.setdefault(record["rho"], []).append(record["metrics"]["eval_accuracy"])
    return by_rho


def radius(method: str, rho: float) -> float:
    """The perturbation radius a rho means: rho for SAM, rho times the first epoch's median gradient norm for USAM."""
    return rho * FIRST_EPOCH_GRAD_NORM if method == "USAM" else rho


def robust_range(by_rho: dict[float, list[float]], within: float = WITHIN) -> tuple[float, float, list[float]] | None:
    """
    The smallest and largest rho whose mean accuracy is within `within` of the best mean, and the rhos between them
    that are not (a range with holes); `None` without runs. A non-finite accuracy is never within.
    """
    means = {rho: statistics.mean(values) for rho, values in by_rho.items() if values}
    finite = {rho: mean for rho, mean in means.items() if math.isfinite(mean)}
    if not finite:
        return None
    best = max(finite.values())
    inside = sorted(rho for rho, mean in finite.items() if mean >= best - within)
    holes = [rho for rho in sorted(means) if inside[0] < rho < inside[-1] and rho not in inside]
    return inside[0], inside[-1], holes


def rho_section(records: list[dict]) -> list[str]:
    """The markdown of the rho-robustness study: accuracy per rho, robust range, divergences."""
    runs = [r for r in records if r["study"] == IMAGE_RHO_ROBUSTNESS.name]
    if not runs:
        return []
    adamw = [r["metrics"]["eval_accuracy"] for r in runs if r["method"] == "AdamW"]
    lines = [
        "",
        "## rho robustness: SAM vs USAM (CIFAR-10 subset, ViT from scratch, held-out 10% of the training set)",
        "",
        f"USAM (`SAMConfig(normalize=False)`, e = rho g) perturbs by rho ||g||, so its grid is SAM's divided by "
        f"{FIRST_EPOCH_GRAD_NORM:g}, the median gradient norm of AdamW's first epoch on this set-up "
        "(`benchmarks/studies/tables.py`); the radius column is rho for SAM and rho x "
        f"{FIRST_EPOCH_GRAD_NORM:g} for USAM. Held-out accuracy at the last epoch, mean ± sample std over seeds. "
        f"AdamW: {mean_std(adamw)}. Figure: `python -m benchmarks.studies.report_rho --figure "
        "docs/rho_robustness.png`.",
        "",
        "| method | rho | radius | held-out accuracy | diverged |",
        "|---|---|---|---|---|",
    ]
    for method in METHODS:
        for rho, values in accuracy_by_rho(runs, method).items():
            reasons = [diverged(r) for r in runs if r["method"] == method and r["rho"] == rho]
            count = sum(reason is not None for reason in reasons)
            lines.append(
                f"| {method} | {rho:g} | {radius(method, rho):.3g} | {mean_std(values)} | {count} of {len(reasons)} |"
            )
    lines += ["", f"Range of rho within {WITHIN * 100:g} point of the method's best mean accuracy:", ""]
    for method in METHODS:
        by_rho = accuracy_by_rho(runs, method)
        found = robust_range(by_rho)
        if found is None:
            lines.append(f"- {method}: no runs yet.")
            continue
        low, high, holes = found
        grid = [arm.rho for arm in IMAGE_RHO_ROBUSTNESS.arms if arm.method == method]
        edge = [name for name, at in (("smallest", min(grid)), ("largest", max(grid))) if at in (low, high)]
        lines.append(
            f"- {method}: rho {low:g} to {high:g}, a factor of {high / low:.3g} ({math.log10(high / low):.2f} "
            f"decades) of the grid's {max(grid) / min(grid):.3g}"
            + (f"; with {', '.join(f'{rho:g}' for rho in holes)} below it inside" if holes else "")
            + (f"; reaches the grid's {' and '.join(edge)} rho, so the range may be wider" if edge else "")
            + "."
        )
    planned = {(arm.method, arm.rho) for arm in IMAGE_RHO_ROBUSTNESS.arms if arm.method != "AdamW"}
    lines += ["", "Divergences (a non-finite training loss, or a final training loss above the first logged):", ""]
    for method in ("AdamW",) + METHODS:
        mine = [r for r in runs if r["method"] == method]
        bad = [(r["id"], diverged(r)) for r in mine if diverged(r) is not None]
        expected = len(IMAGE_RHO_ROBUSTNESS.seeds) * max(1, sum(m == method for m, _ in planned))
        detail = "; ".join(f"`{run_id}`: {reason}" for run_id, reason in bad)
        lines.append(
            f"- {method}: {len(bad)} of {len(mine)} finished runs ({expected} planned; a run that crashed has no "
            "record)" + (f": {detail}" if detail else "") + "."
        )
    return lines


def rho_figure(records: list[dict], path: str | Path) -> Path:
    """Held-out accuracy against the perturbation radius (log scale) for SAM and USAM, each seed a dot and the mean a
    line, AdamW's mean as a horizontal line; written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in records if r["study"] == IMAGE_RHO_ROBUSTNESS.name]
    figure, axes = plt.subplots(figsize=(6, 4))
    for method, color in zip(METHODS, ("tab:blue", "tab:orange"), strict=True):
        by_rho = accuracy_by_rho(runs, method)
        if not by_rho:
            continue
        radii = [radius(method, rho) for rho in by_rho]
        axes.plot(radii, [statistics.mean(v) for v in by_rho.values()], "-o", color=color, label=method)
        for at, values in zip(radii, by_rho.values(), strict=True):
            axes.scatter([at] * len(values), values, color=color, alpha=0.4, s=12)
    adamw = [r["metrics"]["eval_accuracy"] for r in runs if r["method"] == "AdamW"]
    if adamw:
        axes.axhline(statistics.mean(adamw), color="gray", linestyle="--", label="AdamW")
    axes.set_xscale("log")
    axes.set_xlabel(f"perturbation radius (SAM: rho; USAM: rho x {FIRST_EPOCH_GRAD_NORM:g})")
    axes.set_ylabel("held-out accuracy (last epoch)")
    axes.set_title("CIFAR-10 subset, ViT from scratch")
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


if __name__ == "__main__":
    here = Path(__file__).resolve().parent / "results"
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.report_rho", description=__doc__)
    parser.add_argument(
        "--results", nargs="+", default=[str(here / n) for n in ("study_cpu.jsonl", "study_gpu.jsonl")]
    )
    parser.add_argument("--figure", default="docs/rho_robustness.png")
    args = parser.parse_args()
    print(rho_figure(list(read_records(*args.results).values()), args.figure))
