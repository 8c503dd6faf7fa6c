"""`python -m hf_sam.plot`: what it says, and its exit code, when a run lacks what was asked for."""

import json

import pytest

from hf_sam.plot import logged_keys, main


def _run(path, history):
    path.mkdir()
    (path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return str(path)


def test_missing_keys_list_what_each_run_logged_and_exit_2(tmp_path, capsys):
    first = _run(tmp_path / "first", [{"step": 1, "epoch": 0.5, "loss": 0.7, "sam/sharpness": 0.01}])
    second = _run(tmp_path / "second", [{"step": 2, "eval_accuracy": 0.5, "note": "text"}])
    assert logged_keys(second) == ["eval_accuracy"]
    out = str(tmp_path / "x.png")

    with pytest.raises(SystemExit) as exit_info:
        main([first, "--keys", "sharpness/trace", "--out", out])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "sharpness/trace not logged by any run" in error and f"{first}: loss sam/sharpness" in error
    assert "Traceback" not in error

    with pytest.raises(SystemExit) as exit_info:  # the default keys: the second run has none of them
        main([first, second, "--out", out])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"none of loss eval_loss sam/sharpness or sharpness/* in {second}" in error
    assert f"{second}: eval_accuracy" in error

    with pytest.raises(SystemExit) as exit_info:  # no trainer_state.json at all
        main([str(tmp_path / "nowhere"), "--out", out])
    assert exit_info.value.code == 2 and "No trainer_state.json" in capsys.readouterr().err
