"""benchmarks/studies: the label-noise study's plan, its rho and epoch choices, and its report section and figure."""

import pytest

from benchmarks.studies import tables
from benchmarks.studies.plan import plan
from benchmarks.studies.records import make_record
from benchmarks.studies.report_label_noise import _cheapest_keeper, label_noise_section, plot_memorisation
from benchmarks.studies.runner import waiting
from benchmarks.studies.setups import best_epoch
from benchmarks.studies.stats import gain_kept


ENVIRONMENT = {"machine": "test", "torch": "x", "git_commit": "abc"}


def noisy_record(
    run, curve: list[float], memorised: list[float], cpu: float = 100.0, by_epoch: dict | None = None, **metrics
) -> dict:
    """A finished run whose accuracy at epoch e (1-based) is curve[e - 1] and memorised fraction memorised[e - 1]
    (and each `by_epoch` key's value there its list's [e - 1])."""
    history = [{"epoch": float(e), "eval_accuracy": a, "eval_clean_accuracy": a + 0.1} for e, a in enumerate(curve, 1)]
    for key, values in (by_epoch or {}).items():
        for log, value in zip(history, values, strict=True):
            log[key] = value
    memorisation = [{"epoch": float(e), "memorisation/flipped_noisy_accuracy": m} for e, m in enumerate(memorised, 1)]
    final = {"eval_accuracy": curve[-1], "eval_clean_accuracy": curve[-1] + 0.1, **metrics}
    return make_record(
        run.parameters(), ENVIRONMENT, command="python recipes/run_image_classification.py", metrics=final,
        eval_history=history, memorisation_history=memorisation, wall_s=cpu, cpu_s=cpu,
    )  # fmt: skip


def test_the_study_plans_noisy_runs_with_the_seed_as_noise_seed_and_waits_for_its_sweep():
    runs = plan(
        tables.LABEL_NOISE, [7], {}
    )  # its own 5 seeds, whatever --seeds says; SAM and F-SAM wait for the sweep
    assert [(run.method, run.seed) for run in runs] == [("AdamW", seed) for seed in range(5)]
    adamw = runs[3]
    assert adamw.label_noise == 0.4 and adamw.method == "AdamW" and not adamw.held_out
    flags = list(adamw.extra_flags)
    assert flags[flags.index("--label_noise_seed") + 1] == "3" and flags[flags.index("--label_noise") + 1] == "0.4"
    assert flags[flags.index("--random_crop_padding") + 1] == "0"
    sweep = plan(tables.LABEL_NOISE_SWEEP, [5], {})
    assert {run.seed for run in sweep} == {0} and all(run.held_out for run in sweep) and len(sweep) == 1 + 5 + 4


def test_best_epoch_is_the_earliest_highest_noisy_held_out_accuracy():
    (run,) = [r for r in plan(tables.LABEL_NOISE_SWEEP, [0], {}) if r.method == "AdamW"]
    assert best_epoch(noisy_record(run, [0.2, 0.4, 0.3, 0.4], [0.1] * 4)) == 2


def complete_sweep() -> dict[str, dict]:
    """SAM's best held-out accuracy at the last epoch is at rho 0.1, F-SAM's at 0.05; AdamW peaks at epoch 2 of 3."""
    results = {}
    for run in plan(tables.LABEL_NOISE_SWEEP, [0], {}):
        last = {("SAM", 0.1): 0.50, ("F-SAM", 0.05): 0.45}.get((run.method, run.rho), 0.30)
        curve = [0.25, 0.40, 0.30] if run.method == "AdamW" else [0.2, 0.3, last]
        results[run.id] = noisy_record(run, curve, [0.1, 0.2, 0.3])
    return results


def test_section_reports_the_chosen_rho_the_held_out_epoch_and_paired_differences(tmp_path):
    results = complete_sweep()
    assert {m: rule(results) for m, rule in tables.NOISE_RHO.items()} == {"SAM": 0.1, "F-SAM": 0.05}
    test_accuracy = {"AdamW": (0.30, 0.32), "SAM": (0.36, 0.40), "F-SAM": (0.31, 0.35)}  # last epoch, seeds 0 and 1
    assert (
        len(plan(tables.LABEL_NOISE, [0], results)) == 3 * 5
        and len(plan(tables.LABEL_NOISE_MORE, [0], results)) == 5 * 3
    )
    for run in [run for run in plan(tables.LABEL_NOISE, [], results) if run.seed < 2]:
        final = test_accuracy[run.method][run.seed]
        curve = [0.2, 0.5 + 0.1 * run.seed if run.method == "AdamW" else 0.45, final]  # AdamW's epoch 2 is its best
        cpu = 200.0 if run.method != "AdamW" else 100.0
        results[run.id] = noisy_record(run, curve, [0.1, 0.3, 0.6], cpu=cpu, eval_nll=2.0, eval_ece=0.1)
    text = "\n".join(label_noise_section(results))
    assert "chosen rho SAM 0.1, F-SAM 0.05." in text
    test_rows = text.split("Test set (clean labels")[1].splitlines()
    sam_row = next(line for line in test_rows if line.startswith("| SAM | 0.1 |"))
    # last epoch: SAM 0.36 / 0.40 against AdamW 0.30 / 0.32: differences 0.06 and 0.08, mean +0.070, t-interval
    # 0.07 +- 12.706 * 0.01414 / sqrt(2) = +-0.127. SAM's sweep run peaks at its last epoch (3): the same values there.
    assert "| 0.380 ± 0.028 (n=2) | +0.070 [-0.057, +0.197] (n=2) | 3 | 0.380 ± 0.028 (n=2) |" in sam_row
    # At the chosen epochs, each method at its own: SAM at epoch 3 (0.36, 0.40) against AdamW at its epoch 2 (0.5,
    # 0.6): differences -0.14 and -0.20, mean -0.170, half-width 12.706 * 0.04243 / sqrt(2) = 0.381.
    assert "| 3 | 0.380 ± 0.028 (n=2) | -0.170 [-0.551, +0.211] (n=2) |" in sam_row
    assert sam_row.endswith("| 0.600 ± 0.000 (n=2) | 2.00x (n=2) |")
    adamw_row = next(line for line in test_rows if line.startswith("| AdamW | 0 |"))
    assert "| 2 | 0.550 ± 0.071 (n=2) |" in adamw_row  # AdamW's chosen epoch 2: test accuracy 0.5 and 0.6
    assert "| SAM | 2.000 ± 0.000 (n=2); +0.000 [+0.000, +0.000] (n=2) | 0.100 ± 0.000 (n=2)" in text
    assert plot_memorisation(results, tmp_path / "figure.png") and (tmp_path / "figure.png").stat().st_size > 0


def test_cheaper_schedules_are_stopped_at_their_own_held_out_epoch_and_compared_with_full_sam():
    results = complete_sweep()  # AdamW's chosen epoch is 2, SAM's (rho 0.1) 3
    runs = plan(tables.LABEL_NOISE, [], results) + plan(tables.LABEL_NOISE_MORE, [], results)
    grid = {  # test accuracy by epoch for seeds 0 and 1, memorised at the end, CPU seconds
        "AdamW": (([0.2, 0.3, 0.30], [0.2, 0.3, 0.32]), (0.9, 0.9), 100.0),
        "SAM": (([0.2, 0.3, 0.36], [0.2, 0.3, 0.40]), (0.6, 0.6), 200.0),
        "SAM-interval5": (([0.33, 0.3, 0.34], [0.35, 0.3, 0.41]), (0.8, 0.7), 110.0),
        "GSAM": (([0.2, 0.25, 0.33], [0.2, 0.25, 0.37]), (0.5, 0.5), 220.0),
    }
    for run in [run for run in runs if run.seed < 2 and run.method in grid]:
        curves, fraction, cpu = grid[run.method]
        results[run.id] = noisy_record(run, curves[run.seed], [0.1, 0.2, fraction[run.seed]], cpu=cpu)
    assert plan(tables.LABEL_NOISE_MORE_SWEEP, [7], {}) == []  # waits for SAM's rho
    assert waiting(["label-noise-more-sweep"], [7], {}) == [
        "label-noise-more-sweep: nothing to plan until SAM's rho sweep (label-noise-sweep) is complete"
    ]
    more_sweep = plan(tables.LABEL_NOISE_MORE_SWEEP, [7], results)
    assert [(r.method, r.rho, r.seed, r.held_out) for r in more_sweep] == [
        (arm.method, 0.1, 0, True) for arm in tables.LABEL_NOISE_MORE.arms
    ]
    assert waiting(["label-noise-more-sweep"], [7], results) == []
    held_out = {"SAM-interval5": [0.45, 0.40, 0.30], "GSAM": [0.2, 0.3, 0.45]}  # best epochs 1 and 3
    for run in [run for run in more_sweep if run.method in held_out]:
        results[run.id] = noisy_record(run, held_out[run.method], [0.1, 0.2, 0.3])
    text = "\n".join(label_noise_section(results))
    sweep_table, test_tables = text.split("Test set (clean")
    assert "| SAM-interval5 | 0.1 | 0.300 | 1: 0.450 | 0.400 / 0.550 | 0.300 |" in sweep_table
    rows = {
        line.split(" | ")[0][2:]: line for line in test_tables.split("Calibration on the test set")[0].splitlines()[4:]
    }
    # SAM-interval5 at its epoch 1: 0.33 and 0.35, against AdamW at its epoch 2 (0.3 and 0.3): +0.03 and +0.05,
    # mean +0.040, half-width 12.706 * 0.01414 / sqrt(2) = 0.127. GSAM at its epoch 3: 0.33 and 0.37, +0.03 and +0.07.
    assert "| 1 | 0.340 ± 0.014 (n=2) | +0.040 [-0.087, +0.167] (n=2) |" in rows["SAM-interval5"]
    assert "| 3 | 0.350 ± 0.028 (n=2) | +0.050 [-0.204, +0.304] (n=2) |" in rows["GSAM"]
    against_sam = {line.split(" | ")[0][2:]: line for line in test_tables.split("Against full SAM")[1].splitlines()}
    # Last epoch: -0.02 and +0.01 (mean -0.005, half-width 12.706 * 0.02121 / sqrt(2) = 0.1906). Each at its own
    # epoch, against SAM at its epoch 3 (0.36, 0.40): -0.03 and -0.05 (mean -0.040, half-width 0.127). Memorised:
    # +0.2 and +0.1 (mean +0.150, half-width 12.706 * 0.07071 / sqrt(2) = 0.6353). CPU time 110 / 200.
    assert against_sam["SAM-interval5"] == (
        "| SAM-interval5 | -0.005 [-0.196, +0.186] (n=2) | -0.040 [-0.167, +0.087] (n=2) | "
        "+0.150 [-0.485, +0.785] (n=2) | 0.55x (n=2) | – (2 of 3 seeds) |"
    )
    assert "By the rule: 0 of 5 methods judged so far; the conclusion waits for all of their seeds." in test_tables
    assert against_sam["GSAM"].startswith("| GSAM | -0.030 [-0.030, -0.030] (n=2) | -0.030 [-0.030, -0.030] (n=2) |")
    assert "SAM" not in against_sam and "F-SAM" not in against_sam  # the baseline; F-SAM is in the 5-seed grid
    for run in [run for run in more_sweep if run.method in held_out]:
        del results[run.id]
    # Without its held-out run, no chosen epoch. At the last epoch 0.34 and 0.41 against AdamW's 0.30 and 0.32: +0.04
    # and +0.09, mean +0.065, half-width 12.706 * 0.03536 / sqrt(2) = 0.318.
    text = "\n".join(label_noise_section(results))
    assert "| SAM-interval5 | 0.1 | 0.375 ± 0.049 (n=2) | +0.065 [-0.253, +0.383] (n=2) | – |" in text
    assert "| SAM-interval5 | -0.005 [-0.196, +0.186] (n=2) | – |" in text
    for run in [run for run in runs if run.method in ("SAM-interval5", "GSAM")]:
        results.pop(run.id, None)
    assert "Against full SAM" not in "\n".join(label_noise_section(results))


def test_gain_kept_is_the_three_way_rule_on_the_two_t_intervals():
    # Three differences with standard deviation 0.01 have a 95% t-interval of mean +- t(0.975, 2) * 0.01 / sqrt(3)
    # = mean +- 4.302653 * 0.005774 = mean +- 0.02484.
    over_adamw, level_with_sam = [0.05, 0.07, 0.06], [-0.01, 0.01, 0.0]  # [+0.035, +0.085]; [-0.025, +0.025]
    assert gain_kept(over_adamw, level_with_sam, margin=0.03) == "keeps"
    assert gain_kept(over_adamw, level_with_sam, margin=0.02) == "undecided"  # -0.025 is not above -0.02
    assert gain_kept(over_adamw, [-0.06, -0.05, -0.07], margin=0.03) == "loses"  # [-0.085, -0.035] below -0.03
    assert gain_kept([-0.04, -0.03, -0.02], level_with_sam, margin=0.03) == "loses"  # [-0.055, -0.005] at or below 0
    assert gain_kept([0.0, 0.0, 0.0], level_with_sam, margin=0.03) == "loses"  # [0, 0]: at 0 is no gain
    assert gain_kept([-0.01, 0.01, 0.0], [-0.04, -0.03, -0.02], margin=0.03) == "undecided"  # neither interval decides
    assert gain_kept([0.06], [0.0], margin=0.03) == gain_kept(over_adamw, [0.0], margin=0.03) == "–"  # no interval


def test_the_rule_names_the_cheapest_method_that_keeps_sams_gain_once_every_seed_is_in():
    results = complete_sweep()  # SAM's rho 0.1
    runs = plan(tables.LABEL_NOISE, [], results) + plan(tables.LABEL_NOISE_MORE, [], results)
    # Last-epoch test accuracy by seed 0, 1, 2 and CPU seconds. SAM gains +0.06 on AdamW at every seed. Minus SAM and
    # minus AdamW (95% t-intervals, half-width 0.02484 for a standard deviation of 0.01, 0.04968 for 0.02):
    # interval5 [-0.025, +0.025], [+0.035, +0.085]: keeps, 0.78x; LookSAM [-0.085, -0.035]: loses, 0.85x; GSAM
    # keeps, 0.90x (within 0.15x of interval5: as cheap); VaSSO minus SAM [-0.070, +0.030] and minus AdamW
    # [-0.010, +0.090]: undecided, 0.60x (cheaper than interval5 by more than 0.15x); AE-SAM keeps, 1.10x (dearer).
    sam = (0.36, 0.37, 0.38)
    grid = {
        "AdamW": ((0.30, 0.31, 0.32), 100.0),
        "SAM": (sam, 200.0),
        "SAM-interval5": (tuple(a + d for a, d in zip(sam, (-0.01, 0.0, 0.01))), 156.0),
        "LookSAM-k5-a0.1": (tuple(a + d for a, d in zip(sam, (-0.06, -0.05, -0.07))), 170.0),
        "GSAM": (tuple(a + d for a, d in zip(sam, (0.01, -0.01, 0.0))), 180.0),
        "VaSSO": (tuple(a + d for a, d in zip(sam, (-0.04, -0.02, 0.0))), 120.0),
        "AE-SAM": (sam, 220.0),
    }
    for run in [run for run in runs if run.seed < 3 and run.method in grid]:
        accuracy, cpu = grid[run.method]
        results[run.id] = noisy_record(run, [0.2, accuracy[run.seed]], [0.1, 0.5], cpu=cpu)
    against_sam = "\n".join(label_noise_section(results)).split("Against full SAM")[1]
    verdicts = {line.split(" | ")[0][2:]: line.split(" | ")[-1][:-2] for line in against_sam.splitlines()[4:9]}
    assert verdicts == {
        "SAM-interval5": "keeps", "LookSAM-k5-a0.1": "loses", "GSAM": "keeps", "VaSSO": "undecided", "AE-SAM": "keeps",
    }  # fmt: skip
    assert (
        "By the rule, the cheapest method that keeps SAM's gain: SAM-interval5 (0.78x SAM's CPU time), GSAM (0.90x "
        "SAM's CPU time); cheaper but undecided: VaSSO (0.60x SAM's CPU time)." in against_sam
    )
    del results[next(run.id for run in runs if run.method == "GSAM" and run.seed == 2)]
    against_sam = "\n".join(label_noise_section(results)).split("Against full SAM")[1]
    assert "| – (2 of 3 seeds) |" in against_sam and "By the rule: 4 of 5 methods judged so far" in against_sam
    # An undecided method within 0.15x of the cheapest keeper is as cheap, not cheaper; a keeper within 0.15x of SAM
    # (0.85x: 1 - 0.85 is 0.15000000000000002 in floating point) is no cheaper than SAM; one without a CPU time blocks.
    verdicts = {"a": "keeps", "b": "undecided", "c": "undecided", "d": "loses"}
    assert _cheapest_keeper(verdicts, {"a": 0.85, "b": 0.72, "c": 0.60, "d": 0.3}, 4) == (
        "By the rule, the cheapest method that keeps SAM's gain: a (0.85x SAM's CPU time), not cheaper than SAM by "
        "more than 0.15x; cheaper but undecided: c (0.60x SAM's CPU time)."
    )
    assert _cheapest_keeper({"a": "keeps", "b": "loses"}, {"a": 0.5, "b": None}, 2) == (
        "By the rule: no conclusion, as b has no CPU time comparable with SAM's."
    )
    # None keeps it: the undecided ones are named, cheapest first.
    assert _cheapest_keeper({"a": "loses", "b": "undecided", "c": "undecided"}, {"a": 0.5, "b": 1.2, "c": 0.9}, 3) == (
        "By the rule, no cheaper schedule or later method keeps SAM's gain; undecided: c (0.90x SAM's CPU time), "
        "b (1.20x SAM's CPU time)."
    )


def test_section_is_absent_without_records_and_says_what_is_missing_while_incomplete():
    assert label_noise_section({}) == [] and not plot_memorisation({}, "/nonexistent/figure.png")
    results = complete_sweep()
    del results["label-noise-sweep/cifar10/SAM/rho0.2/seed0"]
    text = "\n".join(label_noise_section(results))
    assert "SAM not yet (sweep incomplete), F-SAM 0.05" in text and "No test-set run has finished yet." in text


def test_readme_block_is_rewritten_between_its_markers_only(tmp_path):
    from benchmarks.studies.report import update_generated_blocks
    from benchmarks.studies.report_label_noise import readme_block

    results = complete_sweep()
    for run in [run for run in plan(tables.LABEL_NOISE, [], results) if run.seed < 2]:
        results[run.id] = noisy_record(run, [0.2, 0.4, 0.3 + 0.05 * run.seed], [0.1, 0.3, 0.6])
    block = readme_block(results)
    assert block[0].startswith(
        "rho chosen on the noisy held-out split: SAM 0.1, F-SAM 0.05 (10 of 15 held-out runs done)."
    )
    assert any(
        line.startswith("| SAM | 0.1 | 0.325 ± 0.035 (n=2) | +0.000 [+0.000, +0.000] (n=2) |") for line in block
    )

    readme = tmp_path / "README.md"
    before, after = "# Title\n\nprose kept\n", "\n## Next\nkept too\n"
    marker = (
        "<!-- begin generated: label-noise (do not edit by hand) -->\nold line\n<!-- end generated: label-noise -->"
    )
    readme.write_text(before + marker + after)
    assert update_generated_blocks(readme, {"label-noise": ["new", "lines"], "absent": ["x"]}) == ["label-noise"]
    text = readme.read_text()
    assert text == before + marker.replace("old line", "new\nlines") + after
    assert update_generated_blocks(readme, {"label-noise": ["new", "lines"]}) == ["label-noise"]
    assert readme.read_text() == text  # idempotent
    readme.write_text(before + "<!-- begin generated: label-noise -->\nno end marker\n")
    with pytest.raises(ValueError, match="has no `<!-- end generated: label-noise -->`"):
        update_generated_blocks(readme, {"label-noise": ["new"]})
    assert readme.read_text().endswith("no end marker\n")  # nothing written


def test_two_test_set_records_of_one_method_and_seed_are_refused():
    results = complete_sweep()
    (adamw,) = [run for run in plan(tables.LABEL_NOISE, [], results) if run.method == "AdamW" and run.seed == 0]
    record = noisy_record(adamw, [0.2, 0.3], [0.1, 0.2])
    results["copy"] = record | {"id": "copy"}
    results[adamw.id] = record
    with pytest.raises(ValueError, match="two test-set records of AdamW seed 0"):
        label_noise_section(results)


def four_epoch_sweep() -> dict[str, dict]:
    """
    A sweep whose chosen epochs all differ, none the last of 4: AdamW peaks at epoch 2; SAM's best rho at the last
    epoch is 0.1 (0.50), which peaks at epoch 3; SAM at 0.02 peaks highest of all (0.6, epoch 1), so the rho chosen
    with the stopping epoch is 0.02. F-SAM's best is 0.05.
    """
    curves = {("AdamW", 0.0): [0.25, 0.40, 0.30, 0.28], ("SAM", 0.1): [0.2, 0.3, 0.55, 0.50]}
    curves |= {("SAM", 0.02): [0.6, 0.3, 0.3, 0.3], ("F-SAM", 0.05): [0.2, 0.3, 0.45, 0.45]}
    results = {}
    for run in plan(tables.LABEL_NOISE_SWEEP, [0], {}):
        results[run.id] = noisy_record(run, curves.get((run.method, run.rho), [0.2, 0.3, 0.3, 0.3]), [0.1] * 4)
    return results


def add_grid_runs(results: dict, study, rho: float | None, table: dict) -> list:
    """Seeds 0 and 1 of `study`'s methods in `table` (at `rho` if given): method -> (accuracy by epoch per seed, ECE
    by epoch per seed, memorised at the end per seed, CPU seconds)."""
    runs = [r for r in plan(study, [], results) if r.seed < 2 and r.method in table and rho in (None, r.rho)]
    for run in runs:
        curves, ece, fraction, cpu = table[run.method]
        results[run.id] = noisy_record(
            run, curves[run.seed], [0.1, 0.2, 0.3, fraction[run.seed]], cpu=cpu,
            by_epoch={"eval_ece": ece[run.seed]}, eval_ece=ece[run.seed][-1],
        )  # fmt: skip
    return runs


def test_calibration_is_also_compared_with_each_method_stopped_at_its_own_chosen_epoch():
    results = four_epoch_sweep()  # chosen epochs: AdamW 2, SAM 3, of 4
    add_grid_runs(results, tables.LABEL_NOISE, None, {
        "AdamW": (([0.2] * 4,) * 2, ([0.3, 0.05, 0.4, 0.5], [0.3, 0.06, 0.4, 0.6]), (0.9, 0.9), 100.0),
        "SAM": (([0.2] * 4,) * 2, ([0.3, 0.2, 0.04, 0.10], [0.3, 0.2, 0.08, 0.12]), (0.3, 0.3), 200.0),
    })  # fmt: skip
    text = "\n".join(label_noise_section(results))
    last, chosen = text.split("Calibration on the test set")[1:3]
    # Last epoch: SAM 0.10 / 0.12 against AdamW 0.5 / 0.6: -0.40 and -0.48, mean -0.440, half-width
    # 12.706 * 0.05657 / sqrt(2) = 0.508. Stopped: SAM at its epoch 3 (0.04 / 0.08) against AdamW at its epoch 2
    # (0.05 / 0.06): -0.01 and +0.02, mean +0.005, half-width 12.706 * 0.02121 / sqrt(2) = 0.191.
    assert "| SAM | – | 0.110 ± 0.014 (n=2); -0.440 [-0.948, +0.068] (n=2) |" in last
    assert "| AdamW | – | 0.055 ± 0.007 (n=2) |" in chosen
    assert "| SAM | – | 0.060 ± 0.028 (n=2); +0.005 [-0.186, +0.196] (n=2) |" in chosen


EARLY_GRID = {  # accuracy by epoch, ECE by epoch, memorised at the end (seeds 0 and 1), CPU seconds
    "AdamW": (([0.2, 0.30, 0.26, 0.25], [0.2, 0.32, 0.27, 0.26]), ([0.3, 0.05, 0.3, 0.3], [0.3, 0.06, 0.3, 0.3]),
              (0.9, 0.9), 100.0),
    "SAM": (([0.2, 0.3, 0.33, 0.31], [0.2, 0.3, 0.35, 0.30]), ([0.3] * 4,) * 2, (0.3, 0.3), 200.0),
}  # fmt: skip
EARLY_RUNS = {  # SAM at the rho chosen with the stopping epoch
    "SAM": (([0.34, 0.3, 0.3, 0.30], [0.33, 0.3, 0.3, 0.31]), ([0.04, 0.3, 0.3, 0.3], [0.08, 0.3, 0.3, 0.3]),
            (0.4, 0.5), 180.0),
}  # fmt: skip


def test_sam_at_the_rho_chosen_with_the_stopping_epoch_is_compared_stopped_there():
    results = complete_sweep()  # SAM's best rho at the last epoch, 0.1, also peaks highest: nothing to run
    assert tables.NOISE_EARLY_RHO(results) == 0.1 and plan(tables.LABEL_NOISE_EARLY, [], results) == []
    assert "the grid's SAM row above is that comparison" in "\n".join(label_noise_section(results))
    results = four_epoch_sweep()
    assert (tables.NOISE_RHO["SAM"](results), tables.NOISE_EARLY_RHO(results)) == (0.1, 0.02)
    early = plan(tables.LABEL_NOISE_EARLY, [7], results)
    assert [(r.method, r.rho, r.seed) for r in early] == [("SAM", 0.02, seed) for seed in range(5)]
    assert "Early stopping with a rho" not in "\n".join(label_noise_section(results))
    add_grid_runs(results, tables.LABEL_NOISE, None, EARLY_GRID)
    add_grid_runs(results, tables.LABEL_NOISE_EARLY, 0.02, EARLY_RUNS)
    text = "\n".join(label_noise_section(results))
    (row,) = [line for line in text.split("Early stopping with a rho")[1].splitlines() if line.startswith("| SAM |")]
    # At its epoch 1: 0.34 and 0.33; minus AdamW at its epoch 2 (0.30, 0.32): +0.04 and +0.01, mean +0.025,
    # half-width 12.706 * 0.02121 / sqrt(2) = 0.191. Minus the grid's SAM (rho 0.1) at its epoch 3 (0.33, 0.35):
    # +0.01 and -0.02. ECE at epoch 1: 0.04 and 0.08 against AdamW's 0.05 and 0.06 at its epoch 2. Last epoch 0.30
    # and 0.31 against AdamW's 0.25 and 0.26. No ECE after scaling was logged.
    assert row == (
        "| SAM | 0.02 | 1 | 0.335 ± 0.007 (n=2); +0.025 [-0.166, +0.216] (n=2) | -0.005 [-0.196, +0.186] (n=2) | "
        "0.060 ± 0.028 (n=2); +0.005 [-0.186, +0.196] (n=2) | – | 0.305 ± 0.007 (n=2); +0.050 [+0.050, +0.050] (n=2) | "
        "0.450 ± 0.071 (n=2) | 1.80x (n=2) |"
    )


def test_early_stopping_rows_read_their_rho_from_the_records_and_survive_a_changed_sweep():
    results = four_epoch_sweep()
    add_grid_runs(results, tables.LABEL_NOISE, None, EARLY_GRID)
    early = add_grid_runs(results, tables.LABEL_NOISE_EARLY, 0.02, EARLY_RUNS)
    (peaky,) = [r for r in plan(tables.LABEL_NOISE_SWEEP, [0], {}) if (r.method, r.rho) == ("SAM", 0.02)]
    del results[peaky.id]  # a sweep in progress again (a rho added, say): the rule cannot choose, the report stands
    assert tables.NOISE_EARLY_RHO(results) is None
    rows = [line for line in "\n".join(label_noise_section(results)).splitlines() if line.startswith("| SAM | 0.02 |")]
    assert len(rows) == 1 and rows[0].startswith("| SAM | 0.02 | – | – | – | – | – | 0.305 ± 0.007 (n=2);")
    results[peaky.id] = noisy_record(peaky, [0.6, 0.3, 0.3, 0.3], [0.1] * 4)
    (other,) = [r for r in plan(tables.LABEL_NOISE_SWEEP, [0], {}) if (r.method, r.rho) == ("SAM", 0.05)]
    results[other.id] = noisy_record(other, [0.2, 0.65, 0.3, 0.3], [0.1] * 4)  # the rule now says 0.05, epoch 2
    add_grid_runs(results, tables.LABEL_NOISE_EARLY, 0.05, EARLY_RUNS)  # a second set, planned at the new rho
    text = "\n".join(label_noise_section(results))
    assert "| SAM | 0.02 | 1 | 0.335 ± 0.007 (n=2);" in text and "| SAM | 0.05 | 2 | 0.300 ± 0.000 (n=2);" in text
    duplicate = dict(results[early[0].id], id="a rerun")
    results["a rerun"] = duplicate
    with pytest.raises(ValueError, match="two label-noise-early records of seed 0"):
        label_noise_section(results)
