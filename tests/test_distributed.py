"""
SAMTrainer in 2 real processes (torchrun, CPU, gloo): global mode is world-size invariant, local mode is per-shard SAM.

Note: `accelerate launch --cpu --num_processes 2` starts a single process on these machines; `torchrun` starts two.
"""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_sam import SAMConfig
from hf_sam.variants import METHODS

from .test_sam_trainer import reference_sam_run
from .testing_utils import NONFINITE_CASES, SequentialSAMTrainer, TinyDataset, free_port, tiny_args, tiny_model


REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
PER_DEVICE = 4
STEPS = 4
RHO, SIGMA, LAM, THETA, LR = 0.1, 0.7, 0.6, 0.6, 0.1


def launch(tmp_path, name, worker="ddp_worker.py", timeout=180, processes=WORLD_SIZE, **options) -> dict:
    """Run a worker script of tests/ in `processes` processes; return what rank 0 saved, and the output as `log`."""
    result = tmp_path / f"{name}.pt"
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
        f"--master_port={free_port()}", str(REPO / "tests" / worker),
        "--output_dir", str(tmp_path / name), "--result", str(result),
    ]  # fmt: skip
    if worker == "ddp_worker.py":
        command += ["--batch_size", str(PER_DEVICE), "--max_steps", str(options.pop("max_steps", STEPS))]
    for key, value in options.items():
        command += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    try:
        completed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{name}: {processes}-process run timed out\n{error.stdout}\n{error.stderr}")
    if completed.returncode != 0:
        (tmp_path / f"{name}.log").write_text(completed.stdout + completed.stderr)
    assert completed.returncode == 0, completed.stderr[-6000:]
    return {**torch.load(result, weights_only=False), "log": completed.stdout + completed.stderr}


def single_process(tmp_path, *, method, grad_accum, batch_size):
    model = tiny_model()
    SequentialSAMTrainer(
        model=model,
        args=tiny_args(
            tmp_path / "single", per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum
        ),
        train_dataset=TinyDataset(),
        sam_config=SAMConfig(
            method=method, rho=RHO, fsam_sigma=SIGMA, fsam_lambda=LAM, vasso_theta=THETA, gsam_alpha=0.3, rho_min=0.05
        ),
    ).train()
    return dict(model.named_parameters())


def per_shard_reference(*, method: str, grad_accum: int):
    """
    Local mode written out: process r perturbs with its own gradient (and, for F-SAM and VaSSO, its own average of
    it: d = g - sigma m for F-SAM, d = (1 - theta) v + theta g for VaSSO, d = g on the first step); the applied
    gradient is the average over processes (and the sum over micro-batches / grad_accum) of the pass-2 gradients.
    Process r gets batches r, r + W, r + 2W, ... of the sequential batches (Accelerate's sharding).
    """
    model = tiny_model()
    model.train()
    params = list(model.parameters())
    batches = TinyDataset().batches(PER_DEVICE)
    emas = [None] * WORLD_SIZE
    for step in range(STEPS):
        applied = [torch.zeros_like(p) for p in params]
        step_mean = [[torch.zeros_like(p) for p in params] for _ in range(WORLD_SIZE)]
        for micro in range(grad_accum):
            for rank in range(WORLD_SIZE):
                batch = batches[(step * grad_accum + micro) * WORLD_SIZE + rank]
                g = torch.autograd.grad(model(**batch)["loss"], params)
                d = list(g)
                if method == "fsam" and emas[rank] is not None:
                    d = [gi - SIGMA * m for gi, m in zip(g, emas[rank])]
                if method == "vasso" and emas[rank] is not None:
                    d = [(1 - THETA) * v + THETA * gi for gi, v in zip(g, emas[rank])]
                norm = torch.sqrt(sum((di**2).sum() for di in d))
                weights = [p.detach().clone() for p in params]
                with torch.no_grad():
                    for p, di in zip(params, d):
                        p.add_(RHO * di / (norm + 1e-12))
                g2 = torch.autograd.grad(model(**batch)["loss"], params)
                with torch.no_grad():
                    for p, w in zip(params, weights):
                        p.copy_(w)
                applied = [a + gi / (grad_accum * WORLD_SIZE) for a, gi in zip(applied, g2)]
                step_mean[rank] = [s + gi / grad_accum for s, gi in zip(step_mean[rank], g)]
        weight = 1 - LAM if method == "fsam" else THETA
        for rank in range(WORLD_SIZE):
            emas[rank] = (
                step_mean[rank]
                if emas[rank] is None
                else [(1 - weight) * m + weight * s for m, s in zip(emas[rank], step_mean[rank])]
            )
        with torch.no_grad():
            for p, a in zip(params, applied):
                p.sub_(LR * a)
    return dict(model.named_parameters())


def assert_params_close(actual: dict, expected: dict):
    for name, p in expected.items():
        torch.testing.assert_close(actual[name], p.detach(), rtol=1e-6, atol=1e-6, msg=f"{name} differs")


@pytest.mark.parametrize(("method", "grad_accum"), [("sam", 1), ("fsam", 2), ("vasso", 2), ("gsam", 2), ("aesam", 2)])
def test_global_mode_is_world_size_invariant(tmp_path, method, grad_accum):
    """2 processes x batch 4 == 1 process x batch 8 (with accumulation: the Trainer's no_sync micro-batches too)."""
    result = launch(tmp_path, "ddp", method=method, sync="global", grad_accum=grad_accum)
    assert result["ranks_bitwise_equal"]
    expected = single_process(tmp_path, method=method, grad_accum=grad_accum, batch_size=WORLD_SIZE * PER_DEVICE)
    assert_params_close(result["params"], expected)


@pytest.mark.parametrize(("method", "grad_accum"), [("sam", 1), ("fsam", 2), ("vasso", 2)])
def test_local_mode_matches_per_shard_reference(tmp_path, method, grad_accum):
    result = launch(tmp_path, "ddp", method=method, sync="local", grad_accum=grad_accum)
    assert result["ranks_bitwise_equal"]
    assert_params_close(result["params"], per_shard_reference(method=method, grad_accum=grad_accum))
    # ... and local mode is really a different algorithm from global mode.
    global_params = single_process(tmp_path, method=method, grad_accum=grad_accum, batch_size=8)
    assert any((result["params"][n] - p).abs().max() > 1e-5 for n, p in global_params.items())


@pytest.mark.parametrize(("method", "state_key"), [("fsam", "ema"), ("vasso", "average")])
def test_local_with_accumulation_resumes_bitwise(tmp_path, method, state_key):
    options = dict(method=method, sync="local", grad_accum=2, save_steps=2)
    full = launch(tmp_path, "full", **options)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "rank0-of-2-sam_state.pt").is_file() and (checkpoint / "rank1-of-2-sam_state.pt").is_file()
    ema = [torch.load(checkpoint / f"rank{r}-of-2-sam_state.pt")[state_key]["fc1.weight"] for r in range(2)]
    assert not torch.equal(ema[0], ema[1]), "local mode keeps one average per process"
    resumed = launch(tmp_path, "resumed", resume=checkpoint, **options)
    assert resumed["ranks_bitwise_equal"]
    for name, p in full["params"].items():
        assert torch.equal(resumed["params"][name], p), f"{name} differs after resume"


@pytest.fixture(scope="module")
def fsam_local_run(tmp_path_factory):
    """2 processes, local F-SAM, 6 steps, checkpoints 2, 4, 6 (each process's RNG and F-SAM state in each)."""
    tmp_path = tmp_path_factory.mktemp("fsam-local")
    options = dict(method="fsam", sync="local", save_steps=2, max_steps=6)
    return tmp_path, options, launch(tmp_path, "full", **options)


def test_a_checkpoint_missing_or_cutting_a_process_file_falls_back_to_a_complete_one(fsam_local_run, tmp_path):
    """
    Process 0 writes `trainer_state.json` without waiting for process 1: a checkpoint is complete only when the
    manifest, written after every process has saved, lists each process's files at their size. Here checkpoint-6 has
    process 1's F-SAM state cut short, checkpoint-4 lacks its RNG state: the resume falls back to checkpoint-2 and
    ends bitwise equal to the uninterrupted run.
    """
    from hf_sam.checkpointing import checkpoint_problems, read_checkpoint_manifest

    full_dir, options, full = fsam_local_run
    manifest = read_checkpoint_manifest(full_dir / "full" / "checkpoint-4")
    assert manifest["world_size"] == 2 and manifest["global_step"] == 4
    names = ("rng_state_0.pth", "rng_state_1.pth", "rank0-of-2-sam_state.pt", "rank1-of-2-sam_state.pt")
    assert all(manifest["files"][name] == (full_dir / "full" / "checkpoint-4" / name).stat().st_size for name in names)
    assert not (full_dir / "full" / "checkpoint-4" / "hf_sam_saving").exists()

    run = tmp_path / "resumed"
    shutil.copytree(full_dir / "full", run, ignore=shutil.ignore_patterns("_hf_sam.lock"))
    cut = run / "checkpoint-6" / "rank1-of-2-sam_state.pt"
    cut.write_bytes(cut.read_bytes()[:100])
    (run / "checkpoint-4" / "rng_state_1.pth").unlink()
    assert any("rank1-of-2-sam_state.pt (process 1 of 2) has 100 bytes" in p for p in checkpoint_problems(cut.parent))
    assert any("no rng_state_1.pth (process 1 of 2)" in p for p in checkpoint_problems(run / "checkpoint-4"))

    resumed = launch(tmp_path, "resumed", resume="latest", **options)
    assert f"Skipping the incomplete checkpoint {run}/checkpoint-6" in resumed["log"]
    assert f"Skipping the incomplete checkpoint {run}/checkpoint-4" in resumed["log"]
    assert resumed["ranks_bitwise_equal"]
    for name, p in full["params"].items():
        assert torch.equal(resumed["params"][name], p), f"{name} differs after resume"


def test_resuming_local_fsam_on_another_number_of_processes_says_so(fsam_local_run, tmp_path, caplog):
    """The per-process F-SAM states of 2 processes cannot go to 1: the notice says why, not "no sam_state.pt"."""
    full_dir, _, _ = fsam_local_run
    trainer = SequentialSAMTrainer(
        model=tiny_model(),
        args=tiny_args(tmp_path, per_device_train_batch_size=PER_DEVICE, max_steps=6),
        train_dataset=TinyDataset(),
        sam_config=SAMConfig(method="fsam", rho=RHO, fsam_sigma=SIGMA, fsam_lambda=LAM, perturbation_sync="local"),
    )
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=str(full_dir / "full" / "checkpoint-2"))
    assert "on 1 process(es), but its F-SAM" in caplog.text
    assert "saved by 2 processes (one rank*-of-2-sam_state.pt each): the number of processes changed" in caplog.text
    assert "has no sam_state.pt" not in caplog.text
    # ... and what the smaller global batch does to the data order.
    assert "`world_size` 2 -> 1: 8 examples per optimizer step before, 4 now" in caplog.text


def test_nonfinite_on_one_rank_skips_the_perturbation_on_every_rank(tmp_path):
    result = launch(tmp_path, "poisoned", method="fsam", sync="local", poison_rank=1)
    assert result["ranks_bitwise_equal"]
    logs = [log for log in result["log_history"] if "loss" in log]
    # Counted on each of the 2 ranks: both skipped, although only rank 1 saw inf.
    assert logs[0]["sam/nonfinite_micro_batches"] == 2
    assert all("sam/nonfinite_micro_batches" not in log for log in logs[1:])
    assert all(torch.isfinite(p).all() for p in result["params"].values())


@pytest.fixture(scope="module")
def nonfinite_bert_runs(tmp_path_factory):
    """One 2-process launch of tests/nonfinite_worker.py: every case of `NONFINITE_CASES`, both sync modes."""
    return launch(tmp_path_factory.mktemp("nonfinite"), "nonfinite", worker="nonfinite_worker.py", timeout=600)


NONFINITE_DDP_CASES = [
    (case, sync)
    for case, options in NONFINITE_CASES.items()
    for sync in ("global", "local")
    if not (sync == "local" and "local_sync" in METHODS[options["method"]].unsupported)
]


@pytest.mark.parametrize(("case", "sync"), NONFINITE_DDP_CASES, ids=[f"{c}-{s}" for c, s in NONFINITE_DDP_CASES])
def test_nan_first_pass_on_one_rank_is_an_unperturbed_step_on_every_rank(nonfinite_bert_runs, case, sync):
    """
    Tiny BERT, 2 processes: rank 1's pass-1 loss at step 0 is inf, so its gradient and norm are NaN. Global mode
    all-reduces the NaN into both ranks' gradient; local mode agrees on the decision by a MIN all-reduce. Either way
    every rank must take the stock Trainer's step at `w` (pass 2 at `w + 0`): bitwise the reference run
    (`UnperturbedFirstStepSAMTrainer`, 2 processes), the same finite weights on both ranks, and the skip counted on
    each rank in `sam/nonfinite_micro_batches` (2: both skipped their one micro-batch).
    """
    runs = nonfinite_bert_runs[(case, sync)]
    poisoned, reference = runs["poisoned"], runs["reference"]
    assert poisoned["ranks_bitwise_equal"] and reference["ranks_bitwise_equal"]
    for name, p in poisoned["params"].items():
        assert torch.isfinite(p).all(), f"{name} is not finite"
        torch.testing.assert_close(p, reference["params"][name], rtol=0, atol=0, msg=f"{name} differs")
    logs = [log for log in poisoned["log_history"] if "loss" in log]
    assert [log.get("sam/nonfinite_micro_batches", 0) for log in logs] == [2, 0, 0, 0]


FSDP_REFERENCES = {
    "sam": {"rho": 0.1},
    "fsam": {"rho": 0.1, "fsam": True, "sigma": 0.7, "lam": 0.6},
    "vasso": {"rho": 0.1, "vasso": True, "theta": 0.6},
    "asam": {"rho": 0.5, "adaptive": True, "eta": 0.1},
    "rho0": {"rho": 0.0},
}


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    """One 2-process launch of tests/fsdp_worker.py (1-D mesh, no accumulation): SAM, F-SAM, VaSSO and ASAM."""
    tmp_path = tmp_path_factory.mktemp("fsdp2")
    return launch(tmp_path, "fsdp", worker="fsdp_worker.py", cases="sam,fsam,vasso,asam")["cases"]


@pytest.mark.parametrize("case", ["sam", "fsam", "vasso", "asam"])
def test_fsdp2_sharded_step_equals_one_process(fsdp2_runs, case):
    """
    FSDP2 (`fully_shard`, 2 processes x batch 4): the norms span all shards, so the step equals one process x batch
    8, and each process's shards are restored bitwise. (Accelerate does not shard on the CPU: the worker shards the
    model by hand and drives `SAMTrainer.training_step`; the Accelerate FSDP2 path itself needs GPUs.)
    """
    result = fsdp2_runs[case]
    assert result["restored_bitwise"]
    expected = reference_sam_run(tiny_model(), TinyDataset(), steps=STEPS, grad_accum=1, **FSDP_REFERENCES[case])
    assert_params_close(result["params"], dict(expected.named_parameters()))


def test_sharpness_diagnostics_under_ddp_equal_one_process(tmp_path):
    """Each of 2 processes evaluates half of the batches; the all-reduced results equal one process's."""
    from .sharpness_cases import run_diagnostics

    result = launch(tmp_path, "sharpness", worker="sharpness_worker.py")
    assert result["ranks_equal"]
    expected = run_diagnostics()
    for name, value in expected.items():
        assert abs(result["results"][name] - value) <= 1e-8 * max(1.0, abs(value)), name
