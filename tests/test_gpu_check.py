# Copyright 2026 The hf_sam contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
`benchmarks/gpu_check.py`: its plumbing on the CPU (`--smoke` in a subprocess, the targets, the pytest runs), and the
GPU-only `torch.compile` test it runs on a GPU machine (skipped without CUDA).
"""

import json
import subprocess
import sys

import pytest
import torch

from benchmarks.gpu_check import PLAIN, RUNNERS, check_targets, markdown, run_pytest
from hf_sam import SAMConfig

from .testing_utils import REPO, SequentialSAMTrainer, TinyTextDataset, params_of, tiny_args, tiny_bert


def test_smoke_report_has_every_runner(tmp_path):
    """`--smoke`: tiny BERT and ViT on the CPU, fp32; every runner has its step-time ratio and memory/sync fields."""
    pytest.importorskip("pytorch_optimizer")
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "complete", report["notes"]
    assert report["smoke"] and report["pytest"] == "skipped (--smoke)"
    assert report["machine"]["versions"]["hf_sam"] and report["machine"]["versions"]["transformers"]
    assert not report["packages"]["missing"]
    assert [(c["model"], c["precision"]) for c in report["benchmarks"]] == [("bert", "fp32"), ("vit", "fp32")]
    for config in report["benchmarks"]:
        assert config["repeats"] == 2 and config["param_bytes"] > 0
        assert list(config["runners"]) == list(RUNNERS)
        for name, values in config["runners"].items():
            assert values["ms_per_step"] > 0 and values["ratio"] > 0, name
            # No CUDA: the peak-memory and host-sync fields are there, empty.
            assert {"peak_over_plain", "peak_mib", "syncs_per_step"} <= values.keys(), name
        assert config["runners"][PLAIN]["ratio"] == 1.0
    assert {target["result"] for target in report["targets"]} <= {"PASS", "MISS", "n/a"}
    text = (tmp_path / "report.md").read_text()
    assert all(f"| {name} |" in text for name in RUNNERS)


def _config(model, precision, ratios, ms, syncs, pass_syncs) -> dict:
    runners = {
        name: {"ratio": ratio, "ms_per_step": ms[name], "syncs_per_step": syncs[name], "peak_over_plain": 0.0}
        for name, ratio in ratios.items()
    }
    return dict(model=model, precision=precision, shape="32x128", params=110_000_000, param_bytes=440e6, repeats=5,
                pass_syncs=pass_syncs, runners=runners, notes=[])  # fmt: skip


def test_targets_pass_and_miss():
    ratios = {"Trainer": 1.0, "hf_sam SAM": 2.01, "hf_sam F-SAM": 2.09}
    ms = {"Trainer": 10.0, "hf_sam SAM": 20.1, "hf_sam F-SAM": 20.9}
    ms |= {"pytorch_optimizer SAM": 21.0, "pytorch_optimizer FriendlySAM": 20.0}
    syncs = {"Trainer": 1.0, "hf_sam SAM": 2.0, "hf_sam F-SAM": 3.0}
    ratios |= {"pytorch_optimizer SAM": 2.1, "pytorch_optimizer FriendlySAM": 2.0}
    syncs |= {"pytorch_optimizer SAM": 0.0, "pytorch_optimizer FriendlySAM": 0.0}
    report = {"benchmarks": [_config("bert", "bf16", ratios, ms, syncs, pass_syncs=1)]}
    results = {target["target"]: target["result"] for target in check_targets(report)}
    assert results == {
        "hf_sam SAM / Trainer step, BERT-base bf16": "PASS",
        "hf_sam F-SAM / Trainer step, BERT-base bf16": "MISS",
        "hf_sam SAM / pytorch_optimizer SAM, BERT-base bf16": "PASS",
        "hf_sam F-SAM / pytorch_optimizer FriendlySAM, BERT-base bf16": "MISS",
        # one sync in the model's own forward/backward: the second pass may add it, nothing more
        "hf_sam SAM host syncs/step <= Trainer + one pass's, BERT-base bf16": "PASS",
        "hf_sam F-SAM host syncs/step <= Trainer + one pass's, BERT-base bf16": "MISS",
    }
    report |= {"status": "complete", "notes": [], "elapsed_s": 1.0, "budget_s": 450, "pytest": "skipped"}
    report["targets"] = check_targets(report)
    assert "| hf_sam F-SAM / Trainer step, BERT-base bf16 | 2.090 | 2.080 | MISS |" in markdown(report)


def test_pytest_runs_are_summarized_and_timed_out(tmp_path):
    """The pytest subprocess: outcomes from its JUnit XML, `ok` only without failures, killed at its timeout."""
    (tmp_path / "test_synthetic.py").write_text(
        "import time, pytest\n"
        "pytestmark = pytest.mark.gpu\n"
        "def test_passes(): pass\n"
        "def test_fails(): assert False, 'boom'\n"
        "@pytest.mark.skip(reason='no')\n"
        "def test_skipped(): pass\n"
        "def test_sleeps(): time.sleep(float(__import__('os').environ.get('SLEEP', 0)))\n"
    )
    with open(tmp_path / "pytest.log", "w") as log_file:
        run = run_pytest("gpu", [str(tmp_path / "test_synthetic.py")], timeout=120, log_file=log_file)
    assert run["counts"] == {"passed": 2, "failed": 1, "skipped": 1} and not run["ok"]
    assert "1 failed, 2 passed, 1 skipped" in run["summary"]
    # JUnit's classname depends on where the file sits relative to the rootdir: match on the end of the id.
    (failed,) = [test for name, test in run["tests"].items() if name.endswith("test_synthetic::test_fails")]
    assert "boom" in failed["message"]
    with open(tmp_path / "pytest.log", "a") as log_file, pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("SLEEP", "60")
        run = run_pytest("gpu", [str(tmp_path / "test_synthetic.py") + "::test_sleeps"], timeout=3, log_file=log_file)
    assert run["timed_out"] and not run["ok"] and run["seconds"] < 30


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor's Triton kernels)")
def test_gpu_torch_compile_inductor_equals_eager(tmp_path):
    """`torch_compile=True` with inductor on the GPU: F-SAM trains as in eager mode up to rounding (SGD, no dropout)"""
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    trained = {}
    for mode, extra in [("eager", {}), ("inductor", {"torch_compile": True, "torch_compile_backend": "inductor"})]:
        model = tiny_bert(**no_dropout)
        trainer = SequentialSAMTrainer(
            model=model,
            args=tiny_args(tmp_path / mode, use_cpu=False, max_steps=3, **extra),
            train_dataset=TinyTextDataset(),
            sam_config=SAMConfig(method="fsam", rho=0.1),
        )
        trainer.train()
        assert model.device.type == "cuda"
        trained[mode] = params_of(model)
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert any("sam/perturbed_loss" in log for log in trainer.state.log_history)
    for name, p in trained["eager"].items():
        torch.testing.assert_close(trained["inductor"][name], p, rtol=1e-4, atol=1e-5, msg=name)
