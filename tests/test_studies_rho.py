"""benchmarks/studies, issue 28: the rho-robustness study (SAM vs USAM) and flatness at 3 seeds, on fake records."""

import math
import statistics
from pathlib import Path

from benchmarks.studies import tables
from benchmarks.studies.plan import plan
from benchmarks.studies.records import append_record
from benchmarks.studies.report import report
from benchmarks.studies.report_flatness import flatness_section, loss_before
from benchmarks.studies.report_rho import (
    FIGURES,
    diverged,
    main,
    paired_by_radius,
    paired_lines,
    pooled_seed_sd,
    radius_used,
    rho_figure,
    rho_section,
    robust_range,
)
from benchmarks.studies.runner import command

from .test_studies import H100, record_at, record_of


def test_rho_study_matches_sam_and_usam_at_the_radius_over_two_orders_of_magnitude():
    runs = plan(tables.IMAGE_RHO_ROBUSTNESS, [0, 1, 2], {})
    assert len(runs) == 2 * (1 + 7 + 7) and {run.seed for run in runs} == {0, 1}  # its own 2 seeds, not --seeds
    sam = sorted(run.rho for run in runs if run.method == "SAM" and run.seed == 0)
    usam = sorted(run.rho for run in runs if run.method == "USAM" and run.seed == 0)
    assert sam == [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5] and sam[-1] / sam[0] == 100
    assert usam == [0.00147, 0.00294, 0.00588, 0.0147, 0.0294, 0.0588, 0.147]  # SAM's / 3.40, 3 significant digits
    assert all(math.isclose(u * 3.40, s, rel_tol=3e-3) for u, s in zip(usam, sam, strict=True))
    (usam_run,) = [run for run in runs if run.id == "image-rho/cifar10/USAM/rho0.00588/seed1"]
    line = command(usam_run, "/data", "")
    assert "--method sam --normalize false --rho 0.00588" in line and "--train_val_split 0.1" in line
    assert "--logging_nan_inf_filter false" in line  # a non-finite loss is logged as it is
    # 30 epochs: the study's flag comes after the set-up's 60, and the recipe's parser keeps the last one.
    assert "test.parquet" not in line and line.rindex("--num_train_epochs 30") > line.index("--num_train_epochs 60")


def test_the_60_epoch_rerun_keeps_the_grid_and_maps_usam_through_its_own_schedules_gradient_norm():
    runs = plan(tables.IMAGE_RHO_60, [0, 1, 2], {})
    assert len(runs) == 2 * (1 + 7 + 7) and {run.seed for run in runs} == {0, 1}
    sam = sorted(run.rho for run in runs if run.method == "SAM" and run.seed == 1)
    usam = sorted(run.rho for run in runs if run.method == "USAM" and run.seed == 1)
    assert sam == [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
    assert usam == [0.00134, 0.00267, 0.00535, 0.0134, 0.0267, 0.0535, 0.134]  # SAM's / 3.74, 3 significant digits
    (usam_run,) = [run for run in runs if run.id == "image-rho-60/cifar10/USAM/rho0.00535/seed0"]
    line = command(usam_run, "/data", "")
    assert "--method sam --normalize false --rho 0.00535" in line and "--train_val_split 0.1" in line
    assert "--logging_nan_inf_filter false" in line and "--num_train_epochs 60" in line
    assert "--num_train_epochs 30" not in line and "test.parquet" not in line
    # The report: its own mapping (3.74), and AdamW's last-third gain shown without the shortened schedule's verdict.
    records = [record_at("image-rho-60", "cifar10", "AdamW", 0.0, 0, 0.5)]
    records[0]["eval_history"] = [
        {"epoch": float(e), "eval_accuracy": 0.50 if 39 <= e <= 41 else 0.53 if e >= 58 else 0.4} for e in range(1, 61)
    ]
    records.append(record_at("image-rho-60", "cifar10", "USAM", 0.00535, 0, 0.5))
    lines = rho_section(records)
    assert "## rho robustness: SAM vs USAM (CIFAR-10 subset, ViT from scratch, 60 epochs" in lines[1]
    assert "| USAM | 0.00535 | 0.02 | – | – | 0.500 (n=1) | 0 of 1 |" in lines  # radius 0.00535 x 3.74 = 0.0200
    assert (
        "AdamW's held-out score over the last third of training (means of 3 evaluations): seed 0 0.500 (epochs 39-41) "
        "-> 0.530 (epochs 58-60); mean gain +0.030 (the set-up's own schedule: no epoch rule to pass)."
    ) in lines
    assert not any(line.startswith("Epoch rule") for line in lines)


def test_the_radius_used_is_the_median_logged_perturbation_norm_in_epoch_1_and_the_last_third():
    def usam(seed, norms):  # a log every 0.5 epoch over 3 epochs: ||e|| = rho ||g||, logged as a window mean
        record = record_at("image-rho", "cifar10", "USAM", 0.00588, seed, 0.5)
        record["train_history"] = [
            {"epoch": 0.5 * (i + 1), "loss": 2.0, "sam/perturbation_norm": norm} for i, norm in enumerate(norms)
        ]
        return record

    # Epoch 1: logs at 0.5 and 1.0; the last third (epoch > 2): the logs at 2.5 and 3.0.
    runs = [usam(0, [0.03, 0.02, 0.9, 0.9, 0.01, 0.012]), usam(1, [0.025, 0.021, 0.9, 0.9, 0.008, 0.02])]
    assert math.isclose(radius_used(runs, until=1.0), 0.023)  # median of 0.03, 0.02, 0.025, 0.021
    assert math.isclose(radius_used(runs, after_fraction=2 / 3), 0.011)  # median of 0.01, 0.012, 0.008, 0.02
    assert radius_used([record_at("image-rho", "cifar10", "AdamW", 0.0, 0, 0.5)], until=1.0) is None
    assert "| USAM | 0.00588 | 0.02 | 0.023 | 0.011 | 0.500 ± 0.000 (n=2) | 0 of 2 |" in rho_section(runs)


def test_robust_range_and_divergences_are_counted_per_method(tmp_path):
    accuracies = {
        0.005: (0.53, 0.55),
        0.01: (0.555, 0.555),
        0.02: (0.56, 0.56),
        0.05: (0.54, 0.55),
        0.1: (0.552, 0.552),
    }
    records = [record_at("image-rho", "cifar10", "AdamW", 0.0, seed, 0.50 + 0.02 * seed) for seed in (0, 1)]
    records += [
        record_at("image-rho", "cifar10", "SAM", rho, seed, accuracy)
        for rho, pair in accuracies.items()
        for seed, accuracy in enumerate(pair)
    ]
    records += [
        record_at("image-rho", "cifar10", "USAM", rho, 0, acc) for rho, acc in [(0.00294, 0.1), (0.00588, 0.5)]
    ]
    for record in records:
        record["train_history"] = [{"step": 20, "loss": 2.3}, {"step": 40, "loss": 1.0}]
    records[2]["train_history"][-1]["loss"] = 2.5  # SAM rho 0.005 seed 0: ends above where it started
    records[-2]["train_history"][-1]["loss"] = float("nan")  # USAM rho 0.00294: non-finite
    assert diverged(records[2]) == "final training loss 2.5 above the first 2.3" and diverged(records[3]) is None
    assert diverged(records[-2]) == "non-finite loss"
    # What the Trainer's default `logging_nan_inf_filter` leaves visible: the gradient norm and the evaluation loss.
    hidden = records[3] | {"train_history": [{"loss": 2.3, "grad_norm": 1.0}, {"loss": 1.0, "grad_norm": math.inf}]}
    assert diverged(hidden) == "non-finite gradient norm"
    hidden = records[3] | {"eval_history": [{"epoch": 1.0, "eval_loss": 2.0}, {"epoch": 2.0, "eval_loss": math.nan}]}
    assert diverged(hidden) == "non-finite evaluation loss"
    # SAM means: 0.54, 0.555, 0.56 (best), 0.545, 0.552: within 0.01 of 0.56 are 0.01, 0.02 and 0.1, with 0.05 a hole.
    by_rho = {rho: list(pair) for rho, pair in accuracies.items()}
    assert robust_range(by_rho) == (0.01, 0.1, [0.05])
    assert robust_range({0.1: [float("nan")], 0.2: [0.3]}) == (0.2, 0.2, []) and robust_range({}) is None
    # An exact tie: 102/250 is 1/100 below 209/500 (scores are k/500), but in floats mean(0.408, 0.408) = 0.408 is
    # below mean(0.400, 0.436) - 0.01 = 0.40800000000000003; the tie is within, whatever the rounding.
    tie = {0.01: [0.400, 0.436], 0.02: [0.408, 0.408], 0.05: [0.3, 0.3]}
    assert not statistics.mean(tie[0.02]) >= statistics.mean(tie[0.01]) - 0.01  # the bare comparison's answer
    assert robust_range(tie) == (0.01, 0.02, [])

    lines = rho_section(records)
    assert "| SAM | 0.02 | 0.02 | – | – | 0.560 ± 0.000 (n=2) | 0 of 2 |" in lines
    assert "| SAM | 0.005 | 0.005 | – | – | 0.540 ± 0.014 (n=2) | 1 of 2 |" in lines
    assert "| USAM | 0.00588 | 0.02 | – | – | 0.500 (n=1) | 0 of 1 |" in lines  # radius 0.00588 x 3.40 = 0.0200
    assert (
        "- SAM: rho 0.01 to 0.1, a factor of 10 (1.00 decades) of the grid's 100; with 0.05 below it inside; runs so "
        "far at only 5 of the grid's 7 rhos."
    ) in lines
    assert (
        "- USAM: rho 0.00588 to 0.00588, a factor of 1 (0.00 decades) of the grid's 100; runs so far at only 2 of the "
        "grid's 7 rhos."
    ) in lines
    whole_grid = records + [record_at("image-rho", "cifar10", "SAM", rho, 0, 0.3) for rho in (0.2, 0.5)]
    assert (
        "- SAM: rho 0.01 to 0.1, a factor of 10 (1.00 decades) of the grid's 100; with 0.05 below it inside."
    ) in rho_section(whole_grid)
    best_at_edge = [r | {"metrics": {"eval_accuracy": 0.9}} if r["rho"] == 0.005 else r for r in records]
    sam_range = next(line for line in rho_section(best_at_edge) if line.startswith("- SAM: rho"))
    assert sam_range.endswith(
        "; reaches the grid's smallest rho, so the range may be wider; runs so far at only 5 of the grid's 7 rhos."
    )
    # Pooled seed sd: SAM's variances 0.0002, 0, 0, 0.00005, 0 over 5 degrees of freedom -> sqrt(0.00005) = 0.00707;
    # the difference of two 2-seed means has standard error 0.00707 x sqrt(2 / 2), under the range's 1 point.
    assert (
        "- SAM: sd 0.0071 (5 degrees of freedom); the difference of two 2-seed means has standard error 0.0071."
        in lines
    )
    assert "- USAM: fewer than 2 seeds at every rho." in lines
    noisy = [r | {"metrics": {"eval_accuracy": 0.6}} if r["id"].endswith("rho0.01/seed1") else r for r in records]
    # rho 0.01 now (0.555, 0.6): variance 0.0010125; pooled (0.0002 + 0.0010125 + 0.00005) / 5 = 0.0002525.
    assert (
        "- SAM: sd 0.0159 (5 degrees of freedom); the difference of two 2-seed means has standard error 0.0159, more "
        "than the range's 1 point."
    ) in rho_section(noisy)
    # Unequal seeds: (2 x 1 + 1 x 2) / (2 + 1) = 4/3; a rho with one score adds no degree of freedom.
    sd, df = pooled_seed_sd({0.1: [1.0, 2.0, 3.0], 0.2: [5.0, 7.0], 0.5: [4.0], 1.0: [2.0, math.nan]})
    assert df == 3 and math.isclose(sd, math.sqrt(4 / 3), rel_tol=1e-12)
    assert pooled_seed_sd({0.1: [1.0]}) is None
    assert "- AdamW: 0 of 2 finished runs (2 planned; a run that crashed has no record)." in lines
    assert next(line for line in lines if line.startswith("- USAM: 1 of 2 finished runs (14 planned")).endswith(
        ": `image-rho/cifar10/USAM/rho0.00294/seed0`: non-finite loss."
    )
    assert "AdamW: 0.510 ± 0.014 (n=2)" in lines[3]
    assert not any(line.startswith("Epoch rule") for line in lines)  # one evaluation each: nothing to judge
    # Means of 3 evaluations: epochs 19-21 and 28-30 (of 30). Seed 0: 0.50 -> 0.512, seed 1: 0.52 -> 0.536.
    for seed, (middle, end) in enumerate([(0.50, 0.512), (0.52, 0.536)]):
        records[seed]["eval_history"] = [
            {"epoch": float(e), "eval_accuracy": 0.4 if e < 19 else middle if e <= 21 else 0.45 if e < 28 else end}
            for e in range(1, 31)
        ]
    assert (
        "Epoch rule: AdamW's held-out score over the last third of training (means of 3 evaluations): seed 0 0.500 "
        "(epochs 19-21) -> 0.512 (epochs 28-30); seed 1 0.520 (epochs 19-21) -> 0.536 (epochs 28-30); mean gain "
        "+0.014, still rising: more epochs needed."
    ) in rho_section(records)
    for log in records[1]["eval_history"][-3:]:
        log["eval_accuracy"] = 0.524  # mean gain (0.012 + 0.004) / 2 = 0.008
    assert any(line.endswith("mean gain +0.008, under 0.01: long enough.") for line in rho_section(records))
    records[0]["train_history"] = [
        {"epoch": 0.3, "loss": 2.3, "grad_norm": 3.0},
        {"epoch": 0.6, "loss": 2.2, "grad_norm": 4.0},
        {"epoch": 0.9, "loss": 2.1, "grad_norm": 3.8},
        {"epoch": 1.2, "loss": 2.0, "grad_norm": 9.0},  # epoch 2: not counted
    ]
    assert (
        "Cross-check of the mapping (3.4): the first-epoch median of the gradient norms logged by the study's AdamW "
        "runs: seed 0 3.8."
    ) in rho_section(records)
    assert "## rho robustness" in report({r["id"]: r for r in records}, "/nonexistent")

    figure = rho_figure(records, tmp_path / "docs" / "rho.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sam_minus_usam_is_paired_by_seed_at_the_matched_radius_with_a_pooled_interval():
    scores = {
        ("SAM", 0.01): (0.50, 0.52, 0.51), ("USAM", 0.00294): (0.49, 0.50, 0.52),  # 0.00294 x 3.4 = 0.009996
        ("SAM", 0.02): (0.40, 0.46), ("USAM", 0.00588): (0.45, 0.47),  # 0.019992, 0.04% off
        ("USAM", 0.0059): (0.10, 0.10),  # 0.02006, 0.3% off: within 1% too, but not the nearest
        ("SAM", 0.05): (0.30, None), ("USAM", 0.0147): (None, 0.40),  # no seed in common: no pair
        ("SAM", 0.1): (0.20, None), ("USAM", 0.03): (0.20, None),  # 0.03 x 3.4 = 0.102, 2% off: no partner
    }  # fmt: skip
    records = [
        record_at("image-rho", "cifar10", method, rho, seed, score)
        for (method, rho), scores_by_seed in scores.items()
        for seed, score in enumerate(scores_by_seed)
        if score is not None
    ]
    pairs = paired_by_radius(records, 3.4)
    assert list(pairs) == [0.01, 0.02] and [list(by_seed) for by_seed in pairs.values()] == [[0, 1, 2], [0, 1]]
    expected = [0.01, 0.02, -0.01, -0.05, -0.01]
    got = [*pairs[0.01].values(), *pairs[0.02].values()]
    assert all(math.isclose(a, b, abs_tol=1e-12) for a, b in zip(got, expected, strict=True))
    # Variances 0.00023333 (3 seeds) and 0.0008 (2): s^2 = (2 x 0.00023333 + 0.0008) / 3 = 0.00042222 over 3 degrees
    # of freedom; t(0.975, 3) = 3.182446305284263 (tables); half-widths t s / sqrt(3) = 0.0378 and t s / sqrt(2) = 0.0462.
    s = math.sqrt((2 * 0.0007 / 3 + 0.0008) / 3)
    half = {3: 3.182446305284263 * s / math.sqrt(3), 2: 3.182446305284263 * s / math.sqrt(2)}
    lines = paired_lines(pairs)
    assert "(s = 0.0205, 3 degrees of freedom;" in lines[1]
    assert lines[3] == (
        f"- radius 0.01: +0.007 [{0.02 / 3 - half[3]:+.3f}, {0.02 / 3 + half[3]:+.3f}] "
        "(n=3; seed 0 +0.010, seed 1 +0.020, seed 2 -0.010)."
    )
    assert lines[4] == f"- radius 0.02: -0.030 [{-0.03 - half[2]:+.3f}, {-0.03 + half[2]:+.3f}] " + (
        "(n=2; seed 0 -0.050, seed 1 -0.010)."
    )
    assert (lines[3][:36], lines[4][:36]) == (
        "- radius 0.01: +0.007 [-0.031, +0.04",
        "- radius 0.02: -0.030 [-0.076, +0.01",
    )
    one_seed = paired_lines({0.01: {1: 0.01}})
    assert "no interval" in one_seed[1] and one_seed[3] == "- radius 0.01: +0.010 (n=1; seed 1 +0.010)."
    assert paired_lines({}) == [] and lines[3] in rho_section(records)


def test_each_rho_study_draws_its_own_figure_and_says_when_it_is_incomplete(tmp_path, monkeypatch, capsys):
    # Drawing the 60-epoch rerun without `--figure` once overwrote the committed 30-epoch figure.
    assert len(set(FIGURES.values())) == len(FIGURES) == 3
    results = tmp_path / "records.jsonl"
    for seed in (0, 1):
        append_record(results, record_at("image-rho-60", "cifar10", "SAM", 0.05, seed, 0.5))
    monkeypatch.chdir(tmp_path)
    written = main(["--results", str(results), "--study", "image-rho-60"])
    assert written == Path("docs/rho_robustness_60.png") and written.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["rho_robustness_60.png"]
    assert capsys.readouterr().err == "image-rho-60: the figure shows 2 of the 30 runs planned now\n"
    assert main(["--results", str(results), "--study", "image-rho-60", "--figure", "elsewhere.png"]).is_file()
    capsys.readouterr()
    complete = tmp_path / "complete.jsonl"
    for run in plan(tables.IMAGE_RHO_60, [], {}):
        append_record(complete, record_of(run, 0.5))
    assert main(["--results", str(complete), "--study", "image-rho-60"]).is_file() and capsys.readouterr().err == ""


def test_flatness_studies_rerun_seeds_1_and_2_at_the_grids_rhos_with_seed_0s_measurement():
    sweep = {
        run.id: record_of(run, 0.9 if run.rho in (0.02, 0.05) else 0.5) for run in plan(tables.IMAGE_SWEEP, [0], {})
    }
    assert plan(tables.IMAGE_FLAT, [0], {}) == []  # waits for the sweep's choices
    flat = plan(tables.IMAGE_FLAT, [0], sweep)
    assert [run.id for run in flat] == [
        "image-flat/cifar10/SAM/rho0.02/seed1", "image-flat/cifar10/F-SAM/rho0.02/seed1",
        "image-flat/cifar10/SAM/rho0.02/seed2", "image-flat/cifar10/F-SAM/rho0.02/seed2",
    ]  # fmt: skip
    (grid_sam,) = [run for run in plan(tables.IMAGE_GRID, [0], sweep) if run.method == "SAM"]
    assert flat[0].sharpness == grid_sam.sharpness and "--sharpness_every_n_steps" in " ".join(flat[0].extra_flags)
    adamw = plan(tables.IMAGE_FLAT_ADAMW, [5], {})
    assert [run.seed for run in adamw] == [0, 1, 2] and adamw[0].sharpness.every_n_steps == 395
    assert 4740 % 395 == 0 and 4740 % grid_sam.sharpness.every_n_steps == 0  # both end on the last step (60 x 79)


def _measured(study, method, rho, seed, history, losses, environment=None):
    record = record_at(study, "cifar10", method, rho, seed, 0.5, environment=environment)
    record["sharpness_history"] = [{"step": step, **values} for step, values in history]
    record["train_history"] = [{"step": step, "loss": loss} for step, loss in losses]
    return record


def test_flatness_pairs_every_measure_over_3_seeds_and_at_a_matched_training_loss():
    def measures(top, trace, ascent=0.1):
        return {"sharpness/top_eigenvalue": top, "sharpness/trace": trace, "sharpness/ascent": ascent}

    adamw_losses = [(s, 1.0) for s in (320, 340, 360, 380)] + [(s, 0.6) for s in (720, 740, 760, 780)]
    records = [_measured("image", "AdamW", 0.0, 0, [(790, measures(10.0, 100.0))], adamw_losses)]
    for seed in (0, 1, 2):  # seed 0 again along training: its end is `image`'s, its curve this one
        end = 99.0 if seed == 0 else 10.0 + seed
        history = [(0, measures(50.0, 500.0)), (395, measures(20.0, 200.0)), (790, measures(end, 100.0))]
        records.append(_measured("image-flat-adamw", "AdamW", 0.0, seed, history, adamw_losses))
    for seed in (0, 1, 2):
        sam_history = [(790, measures(5.0 + 2 * seed, 150.0 + seed) | {"sharpness/alignment": 0.5})]
        study, on = ("image", None) if seed == 0 else ("image-flat", H100)  # seeds 1-2 on a GPU, each device named
        records.append(_measured(study, "SAM", 0.02, seed, sam_history, [(790, 0.9)], on))
    assert loss_before(records[1], 0) is None and loss_before(records[1], 395) == 1.0
    assert loss_before(records[1], 790) == 0.6
    lines = flatness_section(records)
    # End: top eigenvalue -5, -4, -3 (std 1, half-width 4.3027 / sqrt(3) = 2.484); trace +50, +51, +52; ascent 0.
    assert (
        "| stochastic (batch 64) | SAM | 0.02 | -4 [-6.48, -1.52] (n=3) | +51 [+48.5, +53.5] (n=3) | "
        "+0 [+0, +0] (n=3) | – | SAM CPU: 0; H100: 1, 2; AdamW CPU: 0, 1, 2 |" in lines
    )
    # Matched: SAM's final loss 0.9 is closest to AdamW's 1.0 at step 395 (0.6 at 790): top 20, trace 200 there.
    (matched,) = [line for line in lines if line.startswith("| stochastic (batch 64) | SAM |") and "vs AdamW" in line]
    assert matched.startswith(
        "| stochastic (batch 64) | SAM | -13 [-18, -8.03] (n=3) | -49 [-51.5, -46.5] (n=3) | +0 [+0, +0] (n=3) | – |"
    )
    assert "seed 0: 0.9 vs AdamW 1 at step 395 (image-flat-adamw)" in matched
    (reruns,) = [line for line in lines if line.startswith("The reruns")]  # only AdamW seed 0 has a grid run
    assert reruns.endswith(": AdamW seed 0 0.500 (CPU) vs 0.500 (CPU), every epoch equal.")
    # The grid's own SAM runs of seeds 1 and 2 (unmeasured): seed 1 trained as its rerun did; seed 2's accuracy parts
    # after its first epoch, and its gradient norm at step 40 by more than 0.1% (the one at step 20 by less).
    sam_reruns = [r for r in records if r["study"] == "image-flat"]
    norms = [{"step": 20, "grad_norm": 2.0}, {"step": 40, "grad_norm": 3.0}]
    sam_reruns[1]["train_history"] = norms
    sam_reruns[1]["eval_history"] = [{"epoch": 1.0, "eval_accuracy": 0.3}, {"epoch": 2.0, "eval_accuracy": 0.5}]
    grid_runs = [r | {"study": "image", "id": "image/" + r["id"], "sharpness_history": []} for r in sam_reruns]
    grid_runs[1] = grid_runs[1] | {
        "eval_history": [{"epoch": 1.0, "eval_accuracy": 0.3}, {"epoch": 2.0, "eval_accuracy": 0.49}],
        "train_history": [{"step": 20, "grad_norm": 2.0019}, {"step": 40, "grad_norm": 3.004}],
    }
    assert flatness_section(records + grid_runs)[-1] == (
        "The reruns against the grid's runs of the same seed (test accuracy at the end): AdamW seed 0 0.500 (CPU) vs "
        "0.500 (CPU), every epoch equal; SAM seed 1 0.500 (H100) vs 0.500 (H100), every epoch equal; SAM seed 2 0.500 "
        "(H100) vs 0.500 (H100), curves differ (equal for the first 1 epochs, gradient norms apart by > 0.1% from step "
        "40)."
    )


def test_full_batch_differences_cover_every_measure_both_ways():
    def full(method, rho, seed, top, ascent):
        values = {"sharpness/top_eigenvalue": top, "sharpness/ascent": ascent}
        return _measured("image-full-batch", method, rho, seed, [(300, values)], [(300, 0.01)])

    records = [full("AdamW", 0.0, seed, 10.0, 0.001) for seed in range(3)]
    records += [full("SAM", 0.02, seed, 6.0 + seed, 0.0014 + 0.0001 * seed) for seed in range(3)]
    (row,) = [line for line in flatness_section(records) if line.startswith("| full batch (512) | SAM | 0.02 |")]
    # Top eigenvalue -4, -3, -2 (down); ascent +0.0004, +0.0005, +0.0006 (up): 0.0005 -+ 2.484e-4.
    assert (
        row
        == "| full batch (512) | SAM | 0.02 | -3 [-5.48, -0.516] (n=3) | – | +0.0005 [+0.000252, +0.000748] (n=3) | "
        "– | SAM CPU: 0, 1, 2; AdamW CPU: 0, 1, 2 |"
    )


def test_full_batch_matches_the_training_loss_on_the_last_log_not_a_window_of_four():
    # The full-batch AdamW curve falls steeply at step 200 (every loss logged every 20 steps): over the last 4 logs its
    # loss there would be 0.0627, over the last one 0.0047, SAM's final loss (0.0062 over 4, 0.0047 over 1).
    adamw_losses = [(120, 0.2), (140, 0.035), (160, 0.011), (180, 0.0047)] + [
        (s, 0.0024) for s in (220, 240, 260, 280)
    ]
    sam_losses = [(220, 0.0097), (240, 0.0055), (260, 0.0049), (280, 0.0047)]

    def values(top, ascent):
        return {"sharpness/top_eigenvalue": top, "sharpness/ascent": ascent}

    records = []
    for seed in range(3):
        adamw = [(200, values(11.0 + seed, 0.0011)), (300, values(9.0, 0.0006))]
        records.append(_measured("image-full-batch", "AdamW", 0.0, seed, adamw, adamw_losses))
        records.append(_measured("image-full-batch", "SAM", 0.02, seed, [(300, values(5.0, 0.0011))], sam_losses))
    (matched,) = [
        line
        for line in flatness_section(records)
        if line.startswith("| full batch (512) | SAM |") and "vs AdamW" in line
    ]
    # Against AdamW's step 200: top eigenvalue -6, -7, -8 (5 - 11, 12, 13); ascent 0 in every seed.
    assert matched == (
        "| full batch (512) | SAM | -7 [-9.48, -4.52] (n=3) | – | +0 [+0, +0] (n=3) | – | "
        "seed 0: 0.0047 vs AdamW 0.0047 at step 200 (image-full-batch); seed 1: 0.0047 vs AdamW 0.0047 at step 200 "
        "(image-full-batch); seed 2: 0.0047 vs AdamW 0.0047 at step 200 (image-full-batch) |"
    )


def test_stsb_maps_usam_through_its_own_adamw_runs_first_epoch_and_waits_for_it():
    waiting = plan(tables.STSB_RHO_ROBUSTNESS, [0, 1, 2], {})
    assert len(waiting) == 2 * 8 and not any(run.method == "USAM" for run in waiting)  # AdamW and SAM only, 2 seeds
    line = command(waiting[0], "/data", "")
    assert "--logging_steps 5" in line and "--validation_split_percentage 10" in line  # the held-out 10%
    (adamw,) = [run for run in waiting if run.id == tables.STSB_RHO_REFERENCE]
    reference = record_of(adamw, 0.8)
    # First epoch: 10, 30, 20 (median 20); the epoch-2 log is not in it. SAM's 0.02 -> USAM's 0.02 / 20 = 0.001.
    epochs = [(0.5, 10.0), (1.0, 30.0), (1.0, 20.0), (2.0, 100.0)]
    reference["train_history"] = [
        {"epoch": e, "grad_norm": g, "loss": 1.0, "step": 5 * i} for i, (e, g) in enumerate(epochs)
    ]
    results = {reference["id"]: reference}
    usam = sorted({run.rho for run in plan(tables.STSB_RHO_ROBUSTNESS, [0], results) if run.method == "USAM"})
    assert usam == [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01]  # 0.002 ... 0.2 over 20
    (usam_run,) = [run for run in plan(tables.STSB_RHO_ROBUSTNESS, [0], results) if run.id.endswith("rho0.001/seed0")]
    records = [reference, record_of(usam_run, 0.85) | {"train_history": [{"step": 5, "loss": 3.0}]}]
    lines = rho_section(records)
    assert (
        "| method | rho | radius | radius used: epoch 1 | radius used: last third | held-out score (mean of Pearson "
        "and Spearman) | diverged |"
    ) in lines
    assert "| USAM | 0.001 | 0.02 | – | – | 0.850 (n=1) | 0 of 1 |" in lines and "AdamW: 0.800 (n=1)" in lines[3]
    assert "- USAM: 0 of 1 finished runs (14 planned; a run that crashed has no record)." in lines
