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
The rho-robustness studies (`image-rho` at 30 epochs, `image-rho-60` at the image grid's 60, and `glue-rho` on
STS-B): the held-out score against rho for SAM and USAM, the width of the rho range within 1 point of each method's
best and the seed noise it is read against, SAM minus USAM at each matched radius (paired by seed), the divergences,
and the figure.

    python -m benchmarks.studies.report_rho                           # docs/rho_robustness.png from the records
    python -m benchmarks.studies.report_rho --study image-rho-60      # docs/rho_robustness_60.png
    python -m benchmarks.studies.report_rho --study glue-rho          # docs/rho_robustness_stsb.png

Each study has its own figure (`FIGURES`), so drawing one never overwrites another's; `--figure` writes elsewhere.
"""

import argparse
import math
import statistics
import sys
from pathlib import Path

from scipy import stats

from .plan import Study, first_epoch_grad_norm, plan
from .records import read_records
from .setups import last_third_gain, task_label, task_metrics, task_score
from .stats import mean_std
from .tables import (
    IMAGE_RHO_60,
    IMAGE_RHO_ROBUSTNESS,
    RHO_GRAD_NORMS,
    RHO_SHORTENED,
    STSB_RHO_REFERENCE,
    STSB_RHO_ROBUSTNESS,
)


METHODS = ("SAM", "USAM")
WITHIN = 0.01  # "within 1 point of the best": a mean held-out score at least the best mean minus 0.01
# Scores are exact fractions (k/500 correct), so a mean can sit exactly `WITHIN` below the best, and the float
# arithmetic of the means may put it 1e-16 either side: a tie is within, up to this tolerance, far below any score's
# resolution.
TIE_TOLERANCE = 1e-9
PLATEAU_GAIN = 0.01  # AdamW's held-out gain over the last third of training below this: the schedule is long enough
RULE_SPAN = 3  # evaluations averaged at each end of that last third
SETUPS = {
    IMAGE_RHO_ROBUSTNESS.name: "ViT from scratch, 30 epochs",
    IMAGE_RHO_60.name: "ViT from scratch, 60 epochs",
    STSB_RHO_ROBUSTNESS.name: "all-MiniLM-L6-v2",
}
RHO_STUDIES = (IMAGE_RHO_ROBUSTNESS, IMAGE_RHO_60, STSB_RHO_ROBUSTNESS)
FIGURES = {
    IMAGE_RHO_ROBUSTNESS.name: "docs/rho_robustness.png",
    IMAGE_RHO_60.name: "docs/rho_robustness_60.png",
    STSB_RHO_ROBUSTNESS.name: "docs/rho_robustness_stsb.png",
}


def diverged(record: dict) -> str | None:
    """Why a run diverged, or None: a non-finite logged or final training loss, logged gradient norm or evaluation
    loss, or a final training loss above the first one logged (`train_history`, the Trainer's logged `loss`; the
    Trainer hides a non-finite loss unless `--logging_nan_inf_filter false`, the norms and evaluations it never
    hides)."""
    train, evaluations = record.get("train_history", []), record.get("eval_history", [])
    losses = [log["loss"] for log in train if "loss" in log]
    final = record.get("metrics", {}).get("train_loss")
    if any(not math.isfinite(loss) for loss in losses) or (final is not None and not math.isfinite(final)):
        return "non-finite loss"
    if any(not math.isfinite(log["grad_norm"]) for log in train if "grad_norm" in log):
        return "non-finite gradient norm"
    if any(not math.isfinite(log["eval_loss"]) for log in evaluations if "eval_loss" in log):
        return "non-finite evaluation loss"
    if len(losses) >= 2 and losses[-1] > losses[0]:
        return f"final training loss {losses[-1]:.3g} above the first {losses[0]:.3g}"
    return None


def epoch_rule(runs: list[dict], judged: bool = True) -> list[str]:
    """
    Whether the schedule is long enough: AdamW's held-out score per seed, averaged over the `RULE_SPAN` evaluations
    centred on two thirds of training and over the last `RULE_SPAN` (one evaluation on a few hundred examples is
    noisy: 2 points of binomial sd on 500 images), and the mean gain over the seeds against `PLATEAU_GAIN`. A study
    on its set-up's own schedule (`judged=False`) shows the gain without a verdict: the rule is what a shortened
    schedule must pass.
    """
    cells, gains = [], []
    for record in sorted((r for r in runs if r["method"] == "AdamW"), key=lambda r: r["seed"]):
        found = last_third_gain(record, RULE_SPAN)
        if found is None:
            continue
        before, after, early, late = found
        gains.append(after - before)
        cells.append(
            f"seed {record['seed']} {before:.3f} (epochs {early[0]}-{early[-1]}) -> {after:.3f} "
            f"(epochs {late[0]}-{late[-1]})"
        )
    if not gains:
        return []
    mean = statistics.mean(gains)
    if not judged:
        return [
            "",
            f"AdamW's held-out score over the last third of training (means of {RULE_SPAN} evaluations): "
            f"{'; '.join(cells)}; mean gain {mean:+.3f} (the set-up's own schedule: no epoch rule to pass).",
        ]
    verdict = f"under {PLATEAU_GAIN:g}: long enough" if mean < PLATEAU_GAIN else "still rising: more epochs needed"
    return [
        "",
        f"Epoch rule: AdamW's held-out score over the last third of training (means of {RULE_SPAN} evaluations): "
        f"{'; '.join(cells)}; mean gain {mean:+.3f}, {verdict}.",
    ]


def grad_norm_check(runs: list[dict], norm: float | None) -> list[str]:
    """The first-epoch median gradient norm the study's own AdamW runs logged (every `logging_steps`), beside the
    constant USAM's grid was mapped by: a cross-check of the measurement, from a few logged steps only."""
    logged = {r["seed"]: first_epoch_grad_norm(r) for r in runs if r["method"] == "AdamW" and _logs_grad_norm(r)}
    if not logged or norm is None:
        return []
    cells = ", ".join(f"seed {seed} {value:.3g}" for seed, value in sorted(logged.items()))
    return ["", f"Cross-check of the mapping ({norm:.3g}): the first-epoch median of the gradient norms logged by "
            f"the study's AdamW runs: {cells}."]  # fmt: skip


def _logs_grad_norm(record: dict) -> bool:
    return any("grad_norm" in log and log.get("epoch", 2.0) <= 1.0 for log in record.get("train_history", []))


def score_by_rho(records: list[dict], method: str) -> dict[float, list[float]]:
    """The held-out scores at the last epoch (`setups.task_score`) of `method`'s runs by rho (a seed per value), rho
    in increasing order."""
    by_rho: dict[float, list[float]] = {}
    for record in sorted(records, key=lambda r: (r["rho"], r["seed"])):
        if record["method"] == method:
            by_rho.setdefault(record["rho"], []).append(task_score(record["task"], record["metrics"]))
    return by_rho


def radius_used(records: list[dict], until: float | None = None, after_fraction: float | None = None) -> float | None:
    """
    The perturbation radius the runs actually used: the median, over `records`' logged steps, of `sam/perturbation_norm`
    (||e||, each log the mean over its window), pooled over the runs: up to epoch `until`, or over the last
    `1 - after_fraction` of each run's epochs. SAM's is rho throughout; USAM's is rho ||g||, which follows the gradient
    norm after the first epoch the grids were matched on. None when nothing is logged there.
    """
    values = []
    for record in records:
        logs = [log for log in record.get("train_history", []) if "sam/perturbation_norm" in log and "epoch" in log]
        if not logs:
            continue
        last = max(log["epoch"] for log in logs)
        values += [
            log["sam/perturbation_norm"]
            for log in logs
            if (until is None or log["epoch"] <= until)
            and (after_fraction is None or log["epoch"] > after_fraction * last)
        ]
    return statistics.median(values) if values else None


def grad_norm(study: Study, results: dict[str, dict]) -> float | None:
    """The gradient norm USAM's grid was mapped by: the measured constant of an image study (`RHO_GRAD_NORMS`), or
    the first epoch's median of `glue-rho`'s own AdamW seed-0 run (None until it has run)."""
    if study.name in RHO_GRAD_NORMS:
        return RHO_GRAD_NORMS[study.name]
    return first_epoch_grad_norm(results[STSB_RHO_REFERENCE]) if STSB_RHO_REFERENCE in results else None


def radius(method: str, rho: float, norm: float) -> float:
    """The perturbation radius a rho means at the start: rho for SAM, rho times the gradient norm `norm` for USAM."""
    return rho * norm if method == "USAM" else rho


def robust_range(by_rho: dict[float, list[float]], within: float = WITHIN) -> tuple[float, float, list[float]] | None:
    """
    The smallest and largest rho whose mean score is within `within` of the best mean, and the rhos between them that
    are not (a range with holes); `None` without runs. A non-finite score is never within. A mean exactly `within`
    below the best is within: the comparison allows `TIE_TOLERANCE` for the rounding of the means.
    """
    means = {rho: statistics.mean(values) for rho, values in by_rho.items() if values}
    finite = {rho: mean for rho, mean in means.items() if math.isfinite(mean)}
    if not finite:
        return None
    best = max(finite.values())
    inside = sorted(rho for rho, mean in finite.items() if mean >= best - within - TIE_TOLERANCE)
    holes = [rho for rho in sorted(means) if inside[0] < rho < inside[-1] and rho not in inside]
    return inside[0], inside[-1], holes


def pooled_seed_sd(by_rho: dict[float, list[float]]) -> tuple[float, int] | None:
    """
    The seed-to-seed standard deviation at one rho, pooled over the grid, and its degrees of freedom:
    s^2 = sum_i (n_i - 1) s_i^2 / sum_i (n_i - 1) over the rhos with at least 2 finite scores. `None` without any.
    """
    groups = [[v for v in values if math.isfinite(v)] for values in by_rho.values()]
    groups = [values for values in groups if len(values) >= 2]
    df = sum(len(values) - 1 for values in groups)
    if not df:
        return None
    return math.sqrt(sum((len(values) - 1) * statistics.variance(values) for values in groups) / df), df


def paired_by_radius(runs: list[dict], norm: float) -> dict[float, dict[int, float]]:
    """
    SAM's score minus USAM's at the same matched radius, paired by seed: by SAM's rho (its radius), then by seed, the
    differences of the seeds both methods have run. A seed is a pair because the recipe seeds before it builds the
    model and neither method draws random numbers, so both start from the same weights and see the same batches.
    USAM's partner of SAM's rho is the one USAM rho whose radius `rho x norm` is nearest to it, if within 1% (the
    grids are matched to 3 significant digits).
    """
    sam = {(r["rho"], r["seed"]): task_score(r["task"], r["metrics"]) for r in runs if r["method"] == "SAM"}
    usam = {(r["rho"], r["seed"]): task_score(r["task"], r["metrics"]) for r in runs if r["method"] == "USAM"}
    pairs: dict[float, dict[int, float]] = {}
    for rho in sorted({rho for rho, _ in sam}):
        off = {u: abs(math.log(radius("USAM", u, norm) / rho)) for u, _ in usam}
        near = [u for u in off if off[u] < math.log(1.01)]
        if not near:
            continue
        partner = min(near, key=off.get)
        for seed in sorted(seed for r, seed in sam if r == rho and (partner, seed) in usam):
            pairs.setdefault(rho, {})[seed] = sam[rho, seed] - usam[partner, seed]
    return pairs


def paired_lines(pairs: dict[float, dict[int, float]]) -> list[str]:
    """
    The markdown of `paired_by_radius`: at each radius the mean difference over the seeds with a two-sided 95%
    Student-t interval whose sd is pooled over the radii (`pooled_seed_sd`: s^2 = sum_i (n_i - 1) s_i^2 /
    sum_i (n_i - 1), the interval mean +- t(0.975, df) s / sqrt(n_i)), which assumes one variance of the difference
    at every radius; with 2 seeds a radius alone would give an interval with 1 degree of freedom. Every radius of the
    family is listed, the intervals not adjusted for their number; a radius with one seed has no interval.
    """
    if not pairs:
        return []
    pooled = pooled_seed_sd({rho: list(by_seed.values()) for rho, by_seed in pairs.items()})
    lines = [
        "",
        "SAM minus USAM at the same matched radius, paired by seed (the same initial weights and batches): the "
        "mean over the seeds"
        + (
            f" with a 95% Student-t interval from the paired differences' sd pooled over the radii (s = "
            f"{pooled[0]:.4f}, {pooled[1]} degrees of freedom; it assumes one variance at every radius; each interval "
            "is 95%, not adjusted for their number; a radius with one seed has none)"
            if pooled
            else " (fewer than 2 seeds at every radius: no interval)"
        )
        + "; each seed's difference in brackets:",
        "",
    ]
    for rho, by_seed in pairs.items():
        mean = statistics.mean(by_seed.values())
        cell = f"{mean:+.3f}"
        if pooled and len(by_seed) >= 2:
            half = stats.t.ppf(0.975, pooled[1]) * pooled[0] / math.sqrt(len(by_seed))
            cell += f" [{mean - half:+.3f}, {mean + half:+.3f}]"
        seeds = ", ".join(f"seed {seed} {difference:+.3f}" for seed, difference in by_seed.items())
        lines.append(f"- radius {rho:g}: {cell} (n={len(by_seed)}; {seeds}).")
    return lines


def rho_section(records: list[dict]) -> list[str]:
    """The markdown of the rho-robustness studies that have runs."""
    results = {r["id"]: r for r in records}
    return [line for study in RHO_STUDIES for line in study_section(study, results)]


def study_section(study: Study, results: dict[str, dict]) -> list[str]:
    """
    One rho-robustness study: the score per rho, the range within 1 point of the best, its resolution (the pooled
    seed-to-seed sd), SAM minus USAM paired by seed at each matched radius, the divergences.
    """
    runs = [r for r in results.values() if r["study"] == study.name]
    if not runs:
        return []
    (task,) = study.tasks
    norm = grad_norm(study, results)
    metric = " and ".join(label for _, label in task_metrics(task))
    metric = f"held-out {metric}" if len(task_metrics(task)) == 1 else f"held-out score (mean of {metric})"
    adamw = [task_score(task, r["metrics"]) for r in runs if r["method"] == "AdamW"]
    mapping = "not yet measured" if norm is None else f"{norm:.3g}"
    lines = [
        "",
        f"## rho robustness: SAM vs USAM ({task_label(task)}, {SETUPS[study.name]}, held-out 10% of the training set)",
        "",
        "USAM (`SAMConfig(normalize=False)`, e = rho g) perturbs by rho ||g||, so its grid is SAM's divided by "
        f"{mapping}, the median gradient norm of AdamW's first epoch on this set-up "
        "(`benchmarks/studies/tables.py`); the radius column is rho for SAM and rho x "
        f"{mapping} for USAM. The radius used is the median of the logged ||e|| (`sam/perturbation_norm`, each log "
        "the mean over its logging window) over the first epoch and over the last third of training, pooled over the "
        f"seeds: SAM's is rho, USAM's follows ||g||. The {metric} at the last epoch, mean ± sample std over seeds. "
        f"AdamW: {mean_std(adamw)}. Figure: `python -m benchmarks.studies.report_rho --study {study.name}` "
        f"(`{FIGURES[study.name]}`).",
        "",
        f"| method | rho | radius | radius used: epoch 1 | radius used: last third | {metric} | diverged |",
        "|---|---|---|---|---|---|---|",
    ]
    scores = {method: score_by_rho(runs, method) for method in METHODS}
    for method in METHODS:
        for rho, values in scores[method].items():
            mine = [r for r in runs if r["method"] == method and r["rho"] == rho]
            count = sum(diverged(r) is not None for r in mine)
            at = "–" if norm is None else f"{radius(method, rho, norm):.3g}"
            used = [radius_used(mine, until=1.0), radius_used(mine, after_fraction=2 / 3)]
            used_cells = " | ".join("–" if value is None else f"{value:.3g}" for value in used)
            lines.append(f"| {method} | {rho:g} | {at} | {used_cells} | {mean_std(values)} | {count} of {len(mine)} |")
    lines += epoch_rule(runs, judged=study.name in RHO_SHORTENED) + grad_norm_check(runs, norm)
    planned = plan(study, [], results)
    lines += ["", f"Range of rho within {WITHIN * 100:g} point of the method's best mean score:", ""]
    for method in METHODS:
        by_rho = scores[method]
        found = robust_range(by_rho)
        grid = sorted({run.rho for run in planned if run.method == method})
        if found is None or not grid:
            lines.append(f"- {method}: no runs yet.")
            continue
        low, high, holes = found
        edge = [name for name, at in (("smallest", min(grid)), ("largest", max(grid))) if at in (low, high)]
        lines.append(
            f"- {method}: rho {low:g} to {high:g}, a factor of {high / low:.3g} ({math.log10(high / low):.2f} "
            f"decades) of the grid's {max(grid) / min(grid):.3g}"
            + (f"; with {', '.join(f'{rho:g}' for rho in holes)} below it inside" if holes else "")
            + (f"; reaches the grid's {' and '.join(edge)} rho, so the range may be wider" if edge else "")
            + (
                f"; runs so far at only {len(by_rho)} of the grid's {len(grid)} rhos"
                if len(by_rho) < len(grid)
                else ""
            )
            + "."
        )
    lines += [
        "",
        "Resolution: the seed-to-seed sample std at one rho, pooled over the grid, and what it implies for the "
        "range: the standard error of the difference between two rhos' means over n seeds, sd sqrt(2 / n):",
        "",
    ]
    for method in METHODS:
        by_rho = scores[method]
        pooled = pooled_seed_sd(by_rho)
        if pooled is None:
            lines.append(f"- {method}: fewer than 2 seeds at every rho.")
            continue
        sd, df = pooled
        seeds = max(len(values) for values in by_rho.values())
        difference = sd * math.sqrt(2 / seeds)
        lines.append(
            f"- {method}: sd {sd:.4f} ({df} degrees of freedom); the difference of two {seeds}-seed means has "
            f"standard error {difference:.4f}"
            + (f", more than the range's {WITHIN * 100:g} point" if difference > WITHIN else "")
            + "."
        )
    lines += [] if norm is None else paired_lines(paired_by_radius(runs, norm))
    lines += ["", "Divergences (a non-finite training loss, or a final training loss above the first logged):", ""]
    for method in ("AdamW",) + METHODS:
        mine = [r for r in runs if r["method"] == method]
        bad = [(r["id"], diverged(r)) for r in mine if diverged(r) is not None]
        expected = sum(run.method == method for run in planned)
        detail = "; ".join(f"`{run_id}`: {reason}" for run_id, reason in bad)
        lines.append(
            f"- {method}: {len(bad)} of {len(mine)} finished runs ({expected} planned; a run that crashed has no "
            "record)" + (f": {detail}" if detail else "") + "."
        )
    return lines


def rho_figure(records: list[dict], path: str | Path, study: Study = IMAGE_RHO_ROBUSTNESS) -> Path:
    """
    The held-out score of SAM and USAM against the perturbation radius (log scale), each seed a dot and the mean a
    line, AdamW's mean as a horizontal line; written to `path` (PNG). Left, against the radius each rho means at the
    start (the matched grid); right, against the radius used over the last third of training (`radius_used`, per run
    for the dots and pooled over the seeds for the line), since USAM's rho ||g|| moves away from the match.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {r["id"]: r for r in records}
    runs = [r for r in records if r["study"] == study.name]
    norm = grad_norm(study, results)
    (task,) = study.tasks
    figure, (at_start, late) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for method, color in zip(METHODS, ("tab:blue", "tab:orange"), strict=True):
        by_rho = score_by_rho(runs, method)
        if not by_rho or norm is None:
            continue
        radii = [radius(method, rho, norm) for rho in by_rho]
        at_start.plot(radii, [statistics.mean(v) for v in by_rho.values()], "-o", color=color, label=method)
        for at, values in zip(radii, by_rho.values(), strict=True):
            at_start.scatter([at] * len(values), values, color=color, alpha=0.4, s=12)
        line = []
        for rho, values in by_rho.items():
            mine = [r for r in runs if r["method"] == method and r["rho"] == rho]
            pooled = radius_used(mine, after_fraction=2 / 3)
            if pooled is not None:
                line.append((pooled, statistics.mean(values)))
            for run in mine:
                used = radius_used([run], after_fraction=2 / 3)
                if used is not None:
                    late.scatter([used], [task_score(task, run["metrics"])], color=color, alpha=0.4, s=12)
        if line:
            late.plot(*zip(*sorted(line), strict=True), "-o", color=color, label=method)
    adamw = [task_score(task, r["metrics"]) for r in runs if r["method"] == "AdamW"]
    for axes in (at_start, late):
        if adamw:
            axes.axhline(statistics.mean(adamw), color="gray", linestyle="--", label="AdamW")
        axes.set_xscale("log")
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    at_start.set_xlabel(f"radius at the start (SAM: rho; USAM: rho x {norm or float('nan'):.3g})")
    late.set_xlabel("radius used over the last third (median logged ||e||)")
    at_start.set_ylabel("held-out score (last epoch)")
    figure.suptitle(f"{task_label(task)}, {SETUPS[study.name]}")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> Path:
    """The command line: draw one study's figure from the records (default: the study's own path in `FIGURES`) and
    say on stderr how many of the runs planned now the figure shows when the study is not complete (`glue-rho`
    plans USAM's runs only once its AdamW seed-0 run is done)."""
    here = Path(__file__).resolve().parent / "results"
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.report_rho", description=__doc__)
    parser.add_argument(
        "--results", nargs="+", default=[str(here / n) for n in ("study_cpu.jsonl", "study_gpu.jsonl")]
    )
    parser.add_argument("--study", default=IMAGE_RHO_ROBUSTNESS.name, choices=list(SETUPS))
    parser.add_argument("--figure", default=None, help="where to write the PNG (default: the study's, see FIGURES)")
    args = parser.parse_args(argv)
    study = next(s for s in RHO_STUDIES if s.name == args.study)
    results = read_records(*args.results)
    planned = {run.id for run in plan(study, [], results)}
    done = planned & set(results)
    if done != planned:
        print(f"{study.name}: the figure shows {len(done)} of the {len(planned)} runs planned now", file=sys.stderr)
    return rho_figure(list(results.values()), args.figure or FIGURES[study.name], study)


if __name__ == "__main__":
    print(main())
