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
The label-noise study's part of the report (`tables.LABEL_NOISE*`): the rho sweep on the noisy held-out split, then
per method on the clean test set the accuracy at the last epoch and at the epoch the noisy held-out split chose, the
calibration before and after temperature scaling, how much of the flipped labels it memorised, paired differences to
AdamW and the CPU time; and `plot_memorisation`, the figure of the memorisation curves.
"""

import statistics
from functools import partial
from pathlib import Path

from .records import find, whole_time_known
from .setups import METHOD_ORDER, at_epoch, best_epoch
from .stats import gain_kept, mean_std, paired_difference
from .tables import (
    KEEPS_COST_TIE,
    KEEPS_MARGIN,
    LABEL_NOISE,
    LABEL_NOISE_EARLY,
    LABEL_NOISE_MORE,
    LABEL_NOISE_MORE_SWEEP,
    LABEL_NOISE_SWEEP,
    NOISE_EARLY_RHO,
    NOISE_RHO,
)


SWEEPS = (LABEL_NOISE_SWEEP.name, LABEL_NOISE_MORE_SWEEP.name)  # the held-out runs
GRIDS = (LABEL_NOISE.name, LABEL_NOISE_MORE.name)  # the test-set runs
MORE_METHODS = {arm.method for arm in LABEL_NOISE_MORE.arms}  # compared with full SAM as well


CALIBRATION = ("nll", "ece", "brier", "nll_ts", "ece_ts", "brier_ts", "temperature")
MEMORISED = "memorisation/flipped_noisy_accuracy"


def memorised(record: dict) -> float | None:
    """The fraction of the flipped training examples (the logged subset) predicted as their noisy label, at the end."""
    history = [log[MEMORISED] for log in record.get("memorisation_history") or [] if MEMORISED in log]
    return history[-1] if history else None


def _sweep_rows(sweep: list[dict]) -> list[str]:
    lines = [
        "| method | rho | held-out accuracy (noisy labels), last epoch | best epoch: accuracy | clean held-out "
        "accuracy, last / at the best epoch | memorised at the end |",
        "|---|---|---|---|---|---|",
    ]
    for record in sorted(sweep, key=lambda r: (METHOD_ORDER.index(r["method"]), r["rho"])):
        epoch = best_epoch(record)
        clean_last, clean_best = (
            record["metrics"].get("eval_clean_accuracy"),
            at_epoch(record, epoch, "eval_clean_accuracy"),
        )
        clean = " / ".join("–" if v is None else f"{v:.3f}" for v in (clean_last, clean_best))
        fraction = memorised(record)
        lines.append(
            f"| {record['method']} | {record['rho']:g} | {record['metrics']['eval_accuracy']:.3f} | "
            f"{epoch}: {at_epoch(record, epoch):.3f} | {clean} | {'–' if fraction is None else f'{fraction:.3f}'} |"
        )
    return lines


def _chosen_epochs(results: dict[str, dict]) -> dict[str, int]:
    """Per method, the best epoch of its held-out run at its chosen rho (AdamW: its sweep run; the methods of
    `label-noise-more`: their `label-noise-more-sweep` run at SAM's rho)."""
    rhos = {"AdamW": 0.0} | {method: rule(results) for method, rule in NOISE_RHO.items()}
    held_out = [(LABEL_NOISE_SWEEP.name, method, rho) for method, rho in rhos.items()]
    held_out += [(LABEL_NOISE_MORE_SWEEP.name, arm.method, rhos["SAM"]) for arm in LABEL_NOISE_MORE_SWEEP.arms]
    epochs = {}
    for study, method, rho in held_out:
        record = None if rho is None else find(results, study=study, method=method, rho=rho)
        if record is not None:
            epochs[method] = best_epoch(record)
    return epochs


def _pairs(runs: dict[int, dict], baseline: dict[int, dict], value, baseline_value=None) -> list[tuple[float, float]]:
    """(baseline, method) value pairs by seed; `baseline_value` reads the baseline's runs (default: `value`)."""
    baseline_value = value if baseline_value is None else baseline_value
    seeds = sorted(set(runs) & set(baseline))
    pairs = [(baseline_value(baseline[s]), value(runs[s])) for s in seeds]
    return [(a, b) for a, b in pairs if a is not None and b is not None]


def _cpu_ratios(runs: dict[int, dict], baseline: dict[int, dict]) -> list[float]:
    """The per-seed CPU-time ratios over the seeds both have (whole CPU time known, same device)."""
    return [
        runs[s]["cpu_s"] / baseline[s]["cpu_s"]
        for s in sorted(set(runs) & set(baseline))
        if whole_time_known(runs[s]) and whole_time_known(baseline[s]) and runs[s]["device"] == baseline[s]["device"]
    ]


def _cpu_ratio(ratios: list[float]) -> str:
    """ "1.72x (n=5)": the mean of per-seed CPU-time ratios (`_cpu_ratios`), or "–" without one."""
    return f"{statistics.mean(ratios):.2f}x (n={len(ratios)})" if ratios else "–"


def last(record: dict) -> float:
    """The test accuracy at the last epoch."""
    return record["metrics"]["eval_accuracy"]


def _metric(record: dict, key: str) -> float | None:
    return record["metrics"].get(key)


def _nothing(record: dict) -> None:
    return None


def stopped(epoch: int | None, key: str = "eval_accuracy"):
    """The reader of `key` at the end of `epoch` (a run's chosen epoch); one that reads nothing while it is None."""
    return _nothing if epoch is None else partial(at_epoch, epoch=epoch, key=key)


def _grid_rows(grid: list[dict], epochs: dict[str, int]) -> list[str]:
    by_method: dict[str, dict[int, dict]] = {}
    for record in grid:
        runs = by_method.setdefault(record["method"], {})
        if record["seed"] in runs:
            raise ValueError(f"two test-set records of {record['method']} seed {record['seed']}: {record['id']}")
        runs[record["seed"]] = record
    adamw = by_method.get("AdamW", {})
    # Each method stopped at its own chosen epoch: the baseline of the difference there is AdamW at AdamW's.
    adamw_epoch = epochs.get("AdamW")
    adamw_there = stopped(adamw_epoch)
    accuracy = [
        "| method | rho | test accuracy, last epoch | minus AdamW | epoch chosen on held-out | test accuracy there | "
        "minus AdamW at its own chosen epoch | memorised at the end | CPU time / AdamW |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in sorted(by_method, key=METHOD_ORDER.index):
        runs = by_method[method]
        rho = next(iter(runs.values()))["rho"]
        epoch = epochs.get(method)
        there = stopped(epoch)
        values_there = [v for v in map(there, runs.values()) if v is not None]
        fractions = [v for v in map(memorised, runs.values()) if v is not None]
        is_base = method == "AdamW"
        accuracy.append(
            f"| {method} | {rho:g} | {mean_std([last(r) for r in runs.values()])} | "
            f"{'–' if is_base else paired_difference(_pairs(runs, adamw, last))} | {'–' if epoch is None else epoch} | "
            f"{mean_std(values_there)} | {'–' if is_base else paired_difference(_pairs(runs, adamw, there, adamw_there))} | "
            f"{mean_std(fractions)} | {'1.00x' if is_base else _cpu_ratio(_cpu_ratios(runs, adamw))} |"
        )
    at_last = _calibration_rows(by_method, lambda method, key: partial(_metric, key=f"eval_{key}"))
    at_chosen = _calibration_rows(
        by_method,
        lambda method, key: stopped(epochs.get(method), f"eval_{key}"),
    )
    return (
        accuracy
        + ["", "Calibration on the test set at the last epoch (minus AdamW after the `;`):", ""]
        + at_last
        + [
            "",
            "Calibration on the test set with each method stopped at its own chosen epoch (the epoch column above; "
            "minus AdamW at AdamW's chosen epoch after the `;`): what early stopping, the alternative a user has, "
            "leaves of the difference.",
            "",
        ]
        + at_chosen
        + _against_sam_rows(by_method, epochs)
    )


def _calibration_rows(by_method: dict[str, dict[int, dict]], reader) -> list[str]:
    """The calibration table: per method and metric of `CALIBRATION`, mean ± std over seeds of `reader(method, key)`
    applied to each run, and (not AdamW, where the method logged it) the difference to AdamW's runs read by
    `reader("AdamW", key)`, paired by seed."""
    adamw = by_method.get("AdamW", {})
    lines = ["| method | " + " | ".join(CALIBRATION) + " |", "|---|" + "---|" * len(CALIBRATION)]
    for method in sorted(by_method, key=METHOD_ORDER.index):
        runs = by_method[method]
        cells = []
        for key in CALIBRATION:
            value = reader(method, key)
            if method == "AdamW":
                cells.append(mean_std([v for v in map(value, runs.values()) if v is not None]))
            else:
                cells.append(_against(runs, value, adamw, reader("AdamW", key)))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _against_sam_rows(by_method: dict[str, dict[int, dict]], epochs: dict[str, int]) -> list[str]:
    """
    The cheaper schedules and the later methods (`LABEL_NOISE_MORE`, at SAM's rho) against full SAM, paired by seed,
    at the last epoch and with each stopped at its own held-out-chosen epoch (`epochs`): whether a schedule keeps
    SAM's gain at a fraction of its cost is a comparison with SAM, not with AdamW. Each method's verdict by the rule
    fixed in advance (`_keeps_gain`) once all its seeds have finished, and the sentence that names the cheapest method
    that keeps the gain (`_cheapest_keeper`) once every method has one. Nothing while none of them or no SAM run has
    finished.
    """
    sam, adamw = by_method.get("SAM", {}), by_method.get("AdamW", {})
    others = [m for m in sorted(by_method, key=METHOD_ORDER.index) if m in MORE_METHODS]
    if not sam or not others:
        return []
    sam_there = stopped(epochs.get("SAM"))
    lines = [
        "",
        'Against full SAM (seeds in common, paired by seed; the rule: README, "When does SAM pay off?"):',
        "",
        "| method | test accuracy minus SAM, last epoch | minus SAM, each at its own chosen epoch | memorised minus "
        "SAM | CPU time / SAM | keeps SAM's gain (the rule) |",
        "|---|---|---|---|---|---|",
    ]
    verdicts, costs = {}, {}
    for method in others:
        runs = by_method[method]
        there = stopped(epochs.get(method))
        verdicts[method] = _keeps_gain(runs, adamw, sam)
        ratios = _cpu_ratios(runs, sam)
        costs[method] = statistics.mean(ratios) if ratios else None
        lines.append(
            f"| {method} | {paired_difference(_pairs(runs, sam, last))} | "
            f"{paired_difference(_pairs(runs, sam, there, sam_there))} | "
            f"{paired_difference(_pairs(runs, sam, memorised))} | {_cpu_ratio(ratios)} | {verdicts[method]} |"
        )
    return lines + ["", _cheapest_keeper(verdicts, costs, len(MORE_METHODS))]


def _keeps_gain(runs: dict[int, dict], adamw: dict[int, dict], sam: dict[int, dict]) -> str:
    """
    The rule: at the last epoch, the method's accuracy minus AdamW's and minus SAM's, paired by seed over all of
    `LABEL_NOISE_MORE`'s seeds, judged by `stats.gain_kept` with `KEEPS_MARGIN`; "– (n of N seeds)" until every one
    of those seeds has a run of the method, of AdamW and of SAM.
    """
    seeds = LABEL_NOISE_MORE.seeds
    have = [s for s in seeds if s in runs and s in adamw and s in sam]
    if len(have) < len(seeds):
        return f"– ({len(have)} of {len(seeds)} seeds)"
    pick = {s: runs[s] for s in seeds}
    over_adamw = [b - a for a, b in _pairs(pick, adamw, last)]
    over_sam = [b - a for a, b in _pairs(pick, sam, last)]
    return gain_kept(over_adamw, over_sam, KEEPS_MARGIN)


def _cheapest_keeper(verdicts: dict[str, str], costs: dict[str, float | None], expected: int) -> str:
    """
    The rule's conclusion: the cheapest method that keeps SAM's gain (with any others as cheap, `_as_cheap`), whether
    it is cheaper than SAM itself at all (1.00x), and any undecided method cheaper than it by more than
    `KEEPS_COST_TIE`; or that none keeps it, naming the undecided ones. While a method has no verdict, a line saying
    how many are judged; a method judged but without a CPU time to compare (no run with its whole time known on SAM's
    device) is named as such, since no further seed would give it one.
    """
    judged = [m for m, v in verdicts.items() if v in ("keeps", "loses", "undecided")]
    if len(judged) < expected:
        return f"By the rule: {len(judged)} of {expected} methods judged so far; the conclusion waits for all of their seeds."
    no_cost = [m for m in judged if costs[m] is None]
    if no_cost:
        return f"By the rule: no conclusion, as {', '.join(no_cost)} has no CPU time comparable with SAM's."

    def named(methods: list[str]) -> str:
        return ", ".join(f"{m} ({costs[m]:.2f}x SAM's CPU time)" for m in sorted(methods, key=lambda m: costs[m]))

    keepers = [m for m in judged if verdicts[m] == "keeps"]
    undecided = [m for m in judged if verdicts[m] == "undecided"]
    if not keepers:
        tail = f"; undecided: {named(undecided)}" if undecided else ""
        return f"By the rule, no cheaper schedule or later method keeps SAM's gain{tail}."
    cheapest = min(costs[m] for m in keepers)
    tied = [m for m in keepers if _as_cheap(costs[m], cheapest)]
    cheaper_undecided = [m for m in undecided if costs[m] < cheapest and not _as_cheap(costs[m], cheapest)]
    sam = (
        ""
        if cheapest < 1.0 and not _as_cheap(cheapest, 1.0)
        else f", not cheaper than SAM by more than {KEEPS_COST_TIE:g}x"
    )
    tail = f"; cheaper but undecided: {named(cheaper_undecided)}" if cheaper_undecided else ""
    return f"By the rule, the cheapest method that keeps SAM's gain: {named(tied)}{sam}{tail}."


def _as_cheap(cost: float, other: float) -> bool:
    """Two CPU times / SAM the rule counts as equally cheap: at most `KEEPS_COST_TIE` apart (to 1e-9, so that 0.85x
    is as cheap as SAM's 1.00x in floating point too)."""
    return round(abs(cost - other), 9) <= KEEPS_COST_TIE


def _against(runs: dict[int, dict], value, baseline: dict[int, dict], baseline_value) -> str:
    """ "mean ± std; difference": `value` of `runs` over seeds, minus `baseline_value` of `baseline`'s runs, paired by
    seed (`_pairs`); "–" when no run has the value."""
    values = [v for v in map(value, runs.values()) if v is not None]
    if not values:
        return "–"
    return f"{mean_std(values)}; {paired_difference(_pairs(runs, baseline, value, baseline_value))}"


def _early_stopping_rows(results: dict[str, dict], epochs: dict[str, int]) -> list[str]:
    """
    SAM at the rho chosen together with the stopping epoch (`tables.LABEL_NOISE_EARLY`), stopped at the best epoch of
    its held-out run at that rho, against AdamW at AdamW's chosen epoch and the grid's SAM at its own, paired by seed:
    whether a rho chosen for early stopping gives SAM a gain over early-stopped AdamW. A row per rho the records hold
    (read from them, not from today's rule). Nothing before such a run has finished, except a line when the two rules
    agree (nothing to run: the grid's SAM row is this comparison).
    """
    records = [r for r in results.values() if r["study"] == LABEL_NOISE_EARLY.name]
    if not records:
        early, at_last = NOISE_EARLY_RHO(results), NOISE_RHO["SAM"](results)
        if early is None or early != at_last:
            return []
        return [
            "",
            f"Early stopping with a rho chosen for it: chosen together with the stopping epoch, SAM's rho is {early:g}, "
            "the one chosen at the last epoch, so the grid's SAM row above is that comparison.",
        ]
    grid = [r for r in results.values() if r["study"] == LABEL_NOISE.name]
    adamw = {r["seed"]: r for r in grid if r["method"] == "AdamW"}
    sam = {r["seed"]: r for r in grid if r["method"] == "SAM"}
    sam_rho = "–" if not sam else f"{next(iter(sam.values()))['rho']:g}"
    lines = [
        "",
        "Early stopping with a rho chosen for it: SAM at the rho whose noisy held-out run peaked highest, stopped at "
        f"that run's best epoch; against AdamW at its chosen epoch and the grid's SAM (rho {sam_rho}) at its own, "
        "paired by seed (minus AdamW after the `;`):",
        "",
        "| method | rho | epoch chosen on held-out | test accuracy there | minus the grid's SAM, each at its chosen "
        "epoch | ece there | ece_ts there | test accuracy, last epoch | memorised at the end | CPU time / AdamW |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rho in sorted({r["rho"] for r in records}):
        runs: dict[int, dict] = {}
        for record in [r for r in records if r["rho"] == rho]:
            if record["seed"] in runs:
                raise ValueError(f"two {LABEL_NOISE_EARLY.name} records of seed {record['seed']}: {record['id']}")
            runs[record["seed"]] = record
        sweep_run = find(results, study=LABEL_NOISE_SWEEP.name, method="SAM", rho=rho)
        epoch = None if sweep_run is None else best_epoch(sweep_run)
        # accuracy, ECE and ECE after scaling at the chosen epoch, minus AdamW's at AdamW's chosen epoch
        accuracy, ece, ece_ts = (
            _against(runs, stopped(epoch, key), adamw, stopped(epochs.get("AdamW"), key))
            for key in ("eval_accuracy", "eval_ece", "eval_ece_ts")
        )
        cells = [
            "SAM",
            f"{rho:g}",
            "–" if epoch is None else str(epoch),
            accuracy,
            paired_difference(_pairs(runs, sam, stopped(epoch), stopped(epochs.get("SAM")))),
            ece,
            ece_ts,
            _against(runs, last, adamw, last),
            mean_std([v for v in map(memorised, runs.values()) if v is not None]),
            _cpu_ratio(_cpu_ratios(runs, adamw)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def label_noise_section(results: dict[str, dict]) -> list[str]:
    """The section, or nothing while the study has no record."""
    records = list(results.values())
    sweep = [r for r in records if r["study"] in SWEEPS]
    grid = [r for r in records if r["study"] in GRIDS]
    if not sweep and not grid:
        return []
    lines = [
        "",
        "## Label noise (40% of the CIFAR-10 subset's training labels flipped to another class)",
        "",
        "The image set-up without augmentation, `--label_noise 0.4 --label_noise_seed <seed>` (a seed's methods share "
        "their noisy labels; the held-out split is noisy too). rho is chosen on the noisy held-out accuracy at the "
        "last epoch (seed 0), as a user would; the epoch column picks, per method, the epoch of its sweep run's best "
        "noisy held-out accuracy, and reports the test accuracy of the grid's runs at that epoch (never chosen on "
        "test): early stopping, each method at its own epoch, so the difference there is against AdamW at AdamW's "
        "chosen epoch. The epoch, not the step, carries over: the sweep trains on 4,500 images (71 steps an epoch), "
        "the test-set runs on 5,000 (79). Memorised: the fraction of a fixed subset of up to 512 flipped training examples predicted as their "
        "noisy label (`hf_sam.label_noise.MemorisationCallback`). Calibration: NLL, top-label ECE (15 equal-width "
        "bins), multi-class Brier (summed over classes); `*_ts` after temperature scaling fitted by 2-fold "
        "cross-fitting on the test set (`hf_sam.calibration`), `temperature` the one fitted on all of it. The cheaper "
        "schedules and the later methods run at SAM's chosen rho; their held-out runs (`label-noise-more-sweep`, "
        "seed 0, listed in the sweep table) only choose the epoch each is stopped at.",
        "",
        "Sweep (held-out 10% of the noisy training set, seed 0): chosen rho " + _chosen_rhos(results) + ".",
        "",
    ]
    lines += _sweep_rows(sweep) if sweep else ["No sweep run has finished yet."]
    lines += [
        "",
        "Test set (clean labels, 2,000 images), mean ± sample std over seeds, minus AdamW paired by seed:",
        "",
    ]
    return lines + _test_set_tables(results, grid) + [""]


def _test_set_tables(results: dict[str, dict], grid: list[dict]) -> list[str]:
    """The test-set tables (the grid with its calibration, then the early-stopping row), for the section and README,
    with each method's held-out-chosen epoch computed once."""
    epochs = _chosen_epochs(results)
    lines = _grid_rows(grid, epochs) if grid else ["No test-set run has finished yet."]
    return lines + _early_stopping_rows(results, epochs)


def _chosen_rhos(results: dict[str, dict]) -> str:
    """Each method's rho chosen by the sweep, or that its sweep is incomplete."""
    chosen = {method: rule(results) for method, rule in NOISE_RHO.items()}
    return ", ".join(f"{m} {'not yet (sweep incomplete)' if rho is None else f'{rho:g}'}" for m, rho in chosen.items())


def readme_block(results: dict[str, dict]) -> list[str]:
    """
    What README.md's "When does SAM pay off?" shows between its generated-block markers: the chosen rhos and the
    test-set tables of `label_noise_section`, regenerated by `python -m benchmarks.studies --report`.
    """
    grid = [r for r in results.values() if r["study"] in GRIDS]
    lines = [
        "rho chosen on the noisy held-out split: "
        + _chosen_rhos(results)
        + f" ({sum(r['study'] in SWEEPS for r in results.values())} of "
        f"{len(LABEL_NOISE_SWEEP.arms) + len(LABEL_NOISE_MORE_SWEEP.arms)} held-out runs done). Test set (clean "
        "labels, 2,000 images), mean ± sample std over seeds, minus AdamW paired by seed with 95% t-intervals:",
        "",
    ]
    return lines + _test_set_tables(results, grid)


def plot_memorisation(results: dict[str, dict], path: str | Path) -> bool:
    """
    The figure of the study's runs on the test set: per method (mean over seeds, by epoch) the fraction of flipped
    training labels memorised and the clean test accuracy. Written to `path`; False (nothing written) without runs.
    """
    grid = [r for r in results.values() if r["study"] in GRIDS]
    if not grid:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method in sorted({r["method"] for r in grid}, key=METHOD_ORDER.index):
        runs = [r for r in grid if r["method"] == method]
        for axis, key, history in (
            (left, MEMORISED, "memorisation_history"),
            (right, "eval_accuracy", "eval_history"),
        ):
            by_epoch: dict[int, list[float]] = {}
            for run in runs:
                for log in run.get(history) or []:
                    if key in log:
                        by_epoch.setdefault(round(log["epoch"]), []).append(log[key])
            epochs = sorted(by_epoch)
            axis.plot(epochs, [statistics.mean(by_epoch[e]) for e in epochs], label=f"{method} (n={len(runs)})")
    left.set(xlabel="epoch", ylabel="flipped training labels memorised", title="Memorisation of the noisy labels")
    right.set(xlabel="epoch", ylabel="test accuracy (clean labels)", title="Test accuracy")
    left.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
