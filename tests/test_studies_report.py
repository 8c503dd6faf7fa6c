"""benchmarks/studies: the statistics, the report's tables and the export of the histories for hf_sam.plot."""

import json

from benchmarks.studies import cli, tables
from benchmarks.studies.plan import plan
from benchmarks.studies.records import whole_time_known
from benchmarks.studies.report import report
from benchmarks.studies.report_sharpness import sharpness_differences
from benchmarks.studies.stats import mean_std, paired_difference

from .test_recipes import DATA_DIR
from .test_studies import H100, record_at, record_of


def test_paired_difference_is_the_student_t_interval():
    # Differences 0.02, -0.01, 0.04: mean 0.01667, sample std 0.02517, t(0.975, 2 dof) = 4.3027, so the half-width is
    # 4.3027 * 0.02517 / sqrt(3) = 0.06252.
    assert paired_difference([(0.70, 0.72), (0.71, 0.70), (0.69, 0.73)]) == "+0.017 [-0.046, +0.079] (n=3)"
    assert paired_difference([(0.5, 0.6)]) == "+0.100 (n=1)" and paired_difference([]) == "–"
    assert paired_difference([(1.0, 1.5), (2.0, 2.5)]) == "+0.500 [+0.500, +0.500] (n=2)"  # no spread, no width
    assert mean_std([0.72, 0.73, 0.74]) == "0.730 ± 0.010 (n=3)" and mean_std([0.5]) == "0.500 (n=1)"


def test_report_shows_every_method_with_its_difference_to_adamw():
    records = [record_at("glue", "mrpc", "AdamW", 0.0, seed, 0.70 + 0.01 * seed) for seed in range(3)]
    records += [record_at("glue", "mrpc", "SAM", 0.01, seed, 0.72 + 0.01 * seed, wall=200.0) for seed in range(3)]
    text = report({r["id"]: r for r in records}, str(DATA_DIR))
    sam_row = next(line for line in text.splitlines() if "| MRPC | accuracy" in line and "| SAM |" in line)
    assert "0.730 ± 0.010 (n=3)" in sam_row and "+0.020" in sam_row and "2.00x / 2.00x" in sam_row
    assert "loss (lower is better)" not in text  # these runs recorded no loss
    for record in records:
        record["metrics"]["eval_loss"] = 0.5 - (0.05 if record["method"] == "SAM" else 0.0) + 0.01 * record["seed"]
    text = report({r["id"]: r for r in records}, str(DATA_DIR))
    loss_row = next(line for line in text.splitlines() if "| MRPC | loss (lower is better) | – | SAM |" in line)
    assert "0.460 ± 0.010 (n=3)" in loss_row and "-0.050" in loss_row


def test_report_names_the_device_of_each_seed_and_times_only_within_one_device():
    """Seed 0 on an H100, seeds 1-2 on CPUs: the cell says so, and SAM's cost is never a CPU run over a GPU run."""
    on_gpu = {("AdamW", 0), ("SAM", 0), ("SAM", 2)}  # SAM seed 2 on the GPU, its AdamW on CPUs: no time ratio
    records = []
    for method, rho, walls in [("AdamW", 0.0, (10.0, 100.0, 100.0)), ("SAM", 0.02, (20.0, 250.0, 250.0))]:
        for seed, wall in enumerate(walls):
            environment = H100 if (method, seed) in on_gpu else None
            records.append(record_at("glue", "rte", method, rho, seed, 0.6, wall=wall, environment=environment))
    text = report({r["id"]: r for r in records}, "/nonexistent")
    sam_row = next(line for line in text.splitlines() if "| RTE | accuracy" in line and "| SAM |" in line)
    assert "| H100 2.00x / 2.00x; CPU 2.50x / 2.50x | H100: 0, 2; CPU: 1 |" in sam_row  # 20/10, 250/100: not averaged
    assert "(n=3), 1 across devices |" in sam_row
    assert "On a GPU machine (`bash benchmarks/studies/study_on_gpu.sh`)" in text


def test_report_tabulates_the_sharpness_of_the_runs_that_measured_it(tmp_path):
    history = [
        {"step": 0, "sharpness/top_eigenvalue": 100.0, "sharpness/trace": 50.0, "sharpness/trace_stderr": 5.0},
        {"step": 300, "sharpness/top_eigenvalue": 40.0, "sharpness/trace": 20.0, "sharpness/trace_stderr": 2.0,
         "sharpness/ascent": 0.5, "sharpness/alignment": 0.25},
    ]  # fmt: skip
    (run,) = [run for run in plan(tables.IMAGE_FULL_BATCH, [0], {}) if run.method == "AdamW"]
    record = record_of(run, 0.5) | {"sharpness_history": history}
    record["train_history"] = [{"step": 150, "loss": 0.2}, {"step": 300, "loss": 0.1}]
    record["eval_history"] = [{"step": 300, "eval_accuracy": 0.5}]
    text = report({record["id"]: record}, "/nonexistent")
    assert (
        "| image-full-batch | 0 | AdamW | 0 | 300 | 40 | 20 ± 2 | 0.5 | 0.25 | train 1 x 512, Hutch++ k=5 + 30 probes | CPU |"
        in text
    )
    assert "| image-full-batch | 0 | AdamW | top eigenvalue | 0: 100, 300: 40 |" in text
    assert "| image-full-batch | 0 | AdamW | training loss (last logged) | 0: –, 300: 0.1 |" in text

    results = tmp_path / "study.jsonl"
    results.write_text(json.dumps(record) + "\n")
    cli.main(["--export_states", str(tmp_path / "states"), "--results", str(results)])
    state = json.loads(
        (tmp_path / "states" / "image-full-batch-cifar10-AdamW-rho0-seed0" / "trainer_state.json").read_text()
    )
    # One history in step order, as the Trainer logs it (the training loss first at a step): what hf_sam.plot reads.
    assert [(log["step"], sorted(log)[0]) for log in state["log_history"]] == [
        (0, "sharpness/top_eigenvalue"), (150, "loss"), (300, "loss"), (300, "eval_accuracy"), (300, "sharpness/alignment")
    ]  # fmt: skip


def test_time_ratios_skip_runs_whose_whole_time_is_unknown():
    records = [record_at("glue", "mrpc", "AdamW", 0.0, seed, 0.70) for seed in range(2)]
    records += [record_at("glue", "mrpc", "SAM", 0.01, seed, 0.72, wall=200.0 + 100 * seed) for seed in range(2)]

    def sam_row() -> str:
        text = report({r["id"]: r for r in records}, str(DATA_DIR))
        return next(line for line in text.splitlines() if "| MRPC | accuracy" in line and "| SAM |" in line)

    records[3] |= {"resumed_from": "checkpoint-9", "attempts": 2}  # resumed, earlier attempts counted: kept
    assert "2.50x / 2.50x" in sam_row()
    records[3] |= {"attempts": None}  # resumed from a checkpoint without run_cost.json (or a record older than it)
    assert "2.00x / 2.00x" in sam_row()
    assert whole_time_known(records[0]) and not whole_time_known(records[3])
    assert not whole_time_known({**records[0], "wall_s": None})


def test_sharpness_differences_pair_the_seeds_of_a_study():
    def measured(method, rho, seed, top, trace):
        end = {"step": 300, "sharpness/top_eigenvalue": top, "sharpness/trace": trace}
        return record_at("image-full-batch", "cifar10", method, rho, seed, 0.5) | {"sharpness_history": [end]}

    records = [measured("AdamW", 0.0, seed, 10.0 + seed, 100.0) for seed in range(3)]
    records += [measured("SAM", 0.02, seed, 5.0 + 2 * seed, 150.0 + seed) for seed in range(3)]
    # Differences -5, -4, -3 and 50, 51, 52: sample std 1, half-width t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321 = 2.484.
    assert sharpness_differences(records) == [
        "",
        "- image-full-batch, SAM minus AdamW at the end, paired by seed: top eigenvalue -4 [-6.484, -1.516] (n=3); "
        "trace +51 [+48.52, +53.48] (n=3).",
    ]
    assert sharpness_differences(records[:1] + records[3:4]) == []  # one seed: the table says it all


def test_report_shows_rte_at_its_chosen_learning_rate_beside_the_grid():
    lr_runs = plan(tables.GLUE_RTE_LR, [0], {})
    results = {run.id: record_of(run, 0.6) for run in lr_runs[1:]}
    text = report(results, str(DATA_DIR))
    assert "## RTE learning rate" in text and "now: None" in text
    assert "| 2e-05 | – | – |" in text and "| 3e-05 | 5: 0.600 | CPU |" in text
    sweep = {run.id: record_of(run, 0.7) for run in plan(tables.GLUE_SWEEP, [0], {})}
    chosen = sweep | {run.id: record_of(run, 0.7 if run.learning_rate == 1e-5 else 0.6) for run in lr_runs}
    records = [record_of(run, 0.6 + 0.01 * run.seed) for run in plan(tables.GLUE_RTE, [0, 1, 2], chosen)]
    text = report({r["id"]: r for r in records}, str(DATA_DIR))
    row = next(
        line for line in text.splitlines() if line.startswith("| RTE (lr 1e-05) | accuracy |") and "| SAM |" in line
    )
    assert "0.610 ± 0.010 (n=3)" in row and "+0.000 [+0.000, +0.000] (n=3)" in row
