"""`python -m hf_sam.plot`: what it says, and its exit code, when a run lacks what was asked for."""

import json
import math

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


def test_log_y_axes_and_a_log_y_key_that_is_not_plotted(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from hf_sam.plot import _band_ends, _log_scale, plot_runs

    positive, mixed = Figure().subplots(1, 2)
    _log_scale(positive, [2.05, 0.0024])
    _log_scale(mixed, [-63.3, 16960.0, 120.1])  # a Hutchinson trace can be negative early in training
    assert positive.get_yscale() == "log"
    assert mixed.get_yscale() == "symlog" and mixed.yaxis.get_transform().linthresh == 10.0
    # positive values whose stderr band reaches below 0 (a trace of 50 +- 96 at step 0): symlog, so the band shows
    assert _band_ends([50.0, 1016.0], [96.0, math.nan]) == [50.0, 1016.0, -46.0, 146.0]
    banded = Figure().subplots()
    _log_scale(banded, _band_ends([50.0, 1016.0], [96.0, math.nan]))
    assert banded.get_yscale() == "symlog" and banded.yaxis.get_transform().linthresh == 10.0

    run = _run(tmp_path / "run", [{"step": 0, "sharpness/trace": -63.3}, {"step": 1, "loss": 2.0}])
    out = tmp_path / "x.png"
    assert main([run, "--out", str(out), "--log_y", "loss", "sharpness/trace"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"log_y names \['eval_loss'\]"):
        plot_runs([run], out, log_y=["eval_loss"])
    with pytest.raises(SystemExit) as exit_info:
        main([run, "--keys", "loss", "--out", str(out), "--log_y", "sharpness/trace"])
    assert exit_info.value.code == 2
    assert "--log_y sharpness/trace: not a plotted key (loss)" in capsys.readouterr().err
