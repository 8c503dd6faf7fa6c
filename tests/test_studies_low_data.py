"""benchmarks/studies, issue 29: the scarce-data and calibration studies, their statistics and their report sections."""

import math

from benchmarks.studies import runner, tables
from benchmarks.studies.plan import plan
from benchmarks.studies.report import report
from benchmarks.studies.stats import equivalence, power_paired_t, seeds_for_power, t_interval

from .test_studies import record_at, record_of


def test_seeds_for_power_match_the_published_paired_t_sample_sizes():
    # Two-sided one-sample / paired t-test, alpha 0.05, power 0.8 (Cohen 1988; G*Power's "means: difference from
    # constant"): effect size d = difference / sd of 1.0 needs n = 10 (power 0.803), 0.8 needs 15 (0.821), 0.5 needs
    # 34 (0.808), 0.2 needs 199 (0.802).
    assert [seeds_for_power(0.01 / d) for d in (1.0, 0.8, 0.5, 0.2)] == [10, 15, 34, 199]
    assert math.isclose(power_paired_t(34, 0.01, 0.02), 0.8078, abs_tol=5e-5)
    assert math.isclose(power_paired_t(33, 0.01, 0.02), 0.7954, abs_tol=5e-5)  # one fewer: under 80%
    assert seeds_for_power(0.0) is None and seeds_for_power(1.0, most=50) is None  # no spread; d = 0.01: n ~ 78,500


def test_equivalence_names_the_largest_difference_an_interval_inside_one_point_leaves():
    # Differences 0, 0.004, 0.002, 0.006: mean 0.003, sample std sqrt(20e-6 / 3) = 0.0025820, t(0.975, 3) = 3.1824,
    # half-width 3.1824 * 0.0025820 / 2 = 0.0041085: [-0.0011085, +0.0071085], inside +-0.01; 0.711 points, up: 0.72.
    low, high = t_interval([0.0, 0.004, 0.002, 0.006])
    assert math.isclose(low, -0.0011085, abs_tol=1e-7) and math.isclose(high, 0.0071085, abs_tol=1e-7)
    assert equivalence([0.0, 0.004, 0.002, 0.006]) == "95% CI excludes differences beyond ±0.72 points"
    # Mean 0.03, same spread: [0.0259, 0.0341] is past +1 point, so nothing is ruled out at that margin.
    assert equivalence([0.028, 0.032, 0.030, 0.034, 0.026]) == "–"
    assert equivalence([0.001]) == "–"


def test_low_data_sweep_holds_out_250_examples_before_drawing_the_1000_and_chooses_rho():
    runs = plan(tables.LOW_DATA_SWEEP, [5, 6], {})
    assert len(runs) == 4 * 6 and {run.seed for run in runs} == {0}  # 4 tasks x (AdamW + 5 rhos), seed 0 only
    assert sorted({run.rho for run in runs if run.method == "SAM"}) == [0.005, 0.01, 0.02, 0.05, 0.1]
    argv = runner.command(runs[0], "/data")
    assert "--validation_split_percentage 10 --validation_split_seed 0 --max_train_samples 1000 --train_subset_seed 0 --num_train_epochs 18 --max_eval_samples 250" in argv  # fmt: skip
    # 18 epochs of ceil(1000 / 32) = 32 steps: 576, the full-size MRPC grid's 5 x ceil(3668 / 32) = 575 steps.
    assert tables.LOW_DATA_EPOCHS * math.ceil(1000 / 32) == 576
    assert record_of(runs[0], 0.5)["train_samples"] == 1000

    assert plan(tables.LOW_DATA, [0], {}) == []  # everything waits for the sweep's AdamW runs (the epoch rule)
    scores = {0.005: 0.60, 0.01: 0.62, 0.02: 0.65, 0.05: 0.64, 0.1: 0.50}
    sweep = {run.id: record_of(run, scores.get(run.rho, 0.6)) for run in runs}
    assert plan(tables.LOW_DATA, [0], sweep) == []  # one evaluation per AdamW run: the rule cannot be judged
    for record in sweep.values():
        if record["method"] == "AdamW":
            record["eval_history"] = [record["eval_history"][0] | {"epoch": float(e)} for e in range(1, 19)]  # flat
    adamw_sweep = {key: r for key, r in sweep.items() if r["method"] == "AdamW"}
    assert [run.method for run in plan(tables.LOW_DATA, [0], adamw_sweep)] == ["AdamW"] * 40  # SAM waits for rho
    grid = plan(tables.LOW_DATA, [0], sweep)
    assert len(grid) == 80 and {run.rho for run in grid if run.method == "SAM"} == {0.02}
    sam = next(run for run in grid if run.method == "SAM" and run.seed == 7)
    argv = runner.command(sam, "/data")
    assert "--max_train_samples 1000 --train_subset_seed 7 --num_train_epochs 18 --method sam --rho 0.02" in argv
    assert "--validation_split_percentage" not in argv and "--max_eval_samples" not in argv  # the dev set as test
    assert plan(tables.LOW_DATA_FSAM, [0], sweep) == []  # F-SAM waits for its own sweep
    rising = {key: r | {"eval_history": [log | {"eval_accuracy": 0.5 + 0.01 * log["epoch"]} for log in r["eval_history"]]}
              for key, r in sweep.items()}  # fmt: skip
    assert tables.low_data_plateau(rising)[0] is False and plan(tables.LOW_DATA, [0], rising) == []


def test_calibration_study_reruns_mrpc_and_cola_at_the_grid_rho():
    sweep = {run.id: record_of(run, 0.7 if run.rho == 0.05 else 0.6) for run in plan(tables.GLUE_SWEEP, [0], {})}
    runs = plan(tables.GLUE_CALIBRATION, [0, 1, 2, 3, 4], sweep)
    assert {(run.task, run.method, run.rho) for run in runs} == {
        (task, method, rho) for task in ("mrpc", "cola") for method, rho in (("AdamW", 0.0), ("SAM", 0.05))
    }
    assert sorted({run.seed for run in runs}) == [0, 1, 2] and "--num_train_epochs 5 " in runner.command(runs[0], "/d")


def _with(record: dict, **metrics) -> dict:
    return record | {"metrics": record["metrics"] | metrics}


def test_report_low_data_sections_appear_only_with_their_records():
    assert "Scarce data" not in report({}, "/nonexistent") and "Calibration on GLUE" not in report({}, "/nonexistent")

    # Nine seeds on MRPC. Accuracy: SAM - AdamW = 0.001 + (+-0.01 four times each, 0 once): mean 0.001, sample std
    # 0.01, t(0.975, 8) = 2.3060, half-width 2.3060 * 0.01 / 3 = 0.0076867: [-0.0066867, +0.0086867], within 1 point
    # (0.87 rounded up); d = 0.01 / 0.01 = 1: 10 seeds. F1: 0.005 + twice those: std 0.02, [-0.0104, +0.0204]: past
    # 1 point; d = 0.5: 34 seeds.
    spread = [0.01, -0.01] * 4 + [0.0]
    records = []
    for seed, dev in enumerate(spread):
        adamw = record_at("low-data", "mrpc", "AdamW", 0.0, seed, 0.8)
        records += [
            _with(adamw, eval_accuracy=0.8, eval_f1=0.8),
            _with(record_at("low-data", "mrpc", "SAM", 0.02, seed, 0.8), eval_accuracy=0.801 + dev, eval_f1=0.805 + 2 * dev),
        ]  # fmt: skip
    text = report({r["id"]: r for r in records}, "/nonexistent")
    rows = [line for line in text.splitlines() if line.startswith("| MRPC |") and "| SAM | 0.02 |" in line]
    assert rows[0].endswith("| +0.001 [-0.007, +0.009] (n=9) | 95% CI excludes differences beyond ±0.87 points | 10 |")
    assert rows[1].endswith("| +0.005 [-0.010, +0.020] (n=9) | – | 34 |")
    assert "## Scarce data: dev results" in text and "Scarce data: rho sweep" not in text
    assert "Calibration on GLUE" not in text  # these records have no calibration metrics

    # Calibration, full-size reruns: NLL 0.50, 0.52, 0.54 for AdamW and 0.04, 0.05, 0.06 lower for SAM: mean -0.05,
    # std 0.01, half-width 4.3027 * 0.01 / sqrt(3) = 0.0248: [-0.075, -0.025].
    calibration = []
    for seed in range(3):
        metrics = {"eval_nll_ts": 0.4, "eval_ece": 0.05, "eval_ece_ts": 0.03, "eval_brier": 0.3, "eval_brier_ts": 0.29}
        metrics |= {"eval_temperature": 1.2}
        adamw = _with(record_at("glue-calibration", "cola", "AdamW", 0.0, seed, 0.5), eval_nll=0.50 + 0.02 * seed)
        sam = _with(record_at("glue-calibration", "cola", "SAM", 0.02, seed, 0.5), eval_nll=0.46 + 0.01 * seed)
        calibration += [_with(adamw, **metrics), _with(sam, **metrics)]
    text = report({r["id"]: r for r in records + calibration}, "/nonexistent")
    assert "The TS metrics use 2-fold cross-fitting on the evaluation set itself (`hf_sam/calibration.py`)" in text
    assert "| full training set | CoLA | NLL | AdamW | 0 | 0.520 ± 0.020 (n=3) | – |" in text
    assert (
        "| full training set | CoLA | NLL | SAM | 0.02 | 0.470 ± 0.010 (n=3) | -0.050 [-0.075, -0.025] (n=3) |" in text
    )
    assert "| full training set | CoLA | temperature | SAM | 0.02 | 1.200 ± 0.000 (n=3) | +0.000 [+0.000, +0.000] (n=3) |" in text  # fmt: skip
    assert "| 1,000 examples |" not in text


def test_report_low_data_sweep_shows_the_chosen_rho_and_whether_adamw_plateaus():
    runs = [run for run in plan(tables.LOW_DATA_SWEEP, [0], {}) if run.method == "AdamW" or run.rho == 0.05]
    records = [record_of(run, 0.7) for run in runs]
    for record in records:
        if record["method"] == "AdamW":  # a score at each epoch; +0.005 from epoch 12 to 18 on every task
            record["eval_history"] = [
                {"epoch": float(epoch), "eval_accuracy": 0.6 + 0.005 * (epoch >= 18), "eval_f1": 0.6 + 0.005 * (epoch >= 18),
                 "eval_matthews_correlation": 0.3, "eval_pearson": 0.5, "eval_spearmanr": 0.5 + 0.01 * (epoch >= 18)}
                for epoch in range(1, 19)
            ]  # fmt: skip
    text = report({r["id"]: r for r in records}, "/nonexistent")
    assert "now: SAM None, F-SAM None" in text  # four of SAM's five rhos have not run
    assert "| MRPC | 0.700 | – | – | – | 0.700 | – | – | – | – | – | – |" in text
    # Means of epochs 11-13 and 16-18: MRPC, RTE and STS-B gain 0.005 / 3 = 0.00167, CoLA 0: mean +0.00125.
    assert (
        "MRPC 0.600 (epochs 11-13) -> 0.602 (16-18); RTE 0.600 (epochs 11-13) -> 0.602 (16-18); CoLA 0.300 "
        "(epochs 11-13) -> 0.300 (16-18); STS-B 0.500 (epochs 11-13) -> 0.502 (16-18); mean gain +0.001 (must be < "
        "0.01), each task's < 0.03: passed, the seed runs go ahead."
    ) in text
    assert "| RTE | 3: 0.600, 6: 0.600, 9: 0.600, 12: 0.600, 15: 0.600, 18: 0.605 |" in text
    for record in records[:4]:  # AdamW on every task: +0.03 at the last epoch
        record["eval_history"][-1] = {key: value + 0.03 for key, value in record["eval_history"][-1].items()} | {
            "epoch": 18.0
        }
    text = report({r["id"]: r for r in records}, "/nonexistent")
    # +0.03 at epoch 18: MRPC, RTE, STS-B gain 0.035 / 3 = 0.01167, CoLA 0.01: mean +0.01125, past 0.01.
    assert "mean gain +0.011 (must be < 0.01), each task's < 0.03: failed: more epochs, the seed runs wait." in text
    for record in records[:4]:  # flat on every task but MRPC, whose last 3 evaluations gain 0.036: mean 0.009
        metrics = ("eval_accuracy", "eval_f1", "eval_matthews_correlation", "eval_pearson", "eval_spearmanr")
        bump = 0.036 if record["task"] == "mrpc" else 0.0
        record["eval_history"] = [
            {"epoch": float(e)} | {key: 0.6 + bump * (e >= 16) for key in metrics} for e in range(1, 19)
        ]
    passed, gains = tables.low_data_plateau({r["id"]: r for r in records})
    by_task = {task: after - before for task, (before, after, _, _) in gains.items()}
    assert passed is False and math.isclose(by_task["mrpc"], 0.036) and math.isclose(sum(by_task.values()) / 4, 0.009)
