"""
Scale-out set-ups in real `torch.distributed.run` launches (CPU, gloo, 127.0.0.1 only), each equal to single-process
SAM on the same global batch (fp32, 1e-6): FSDP2 with gradient accumulation (2 processes), HSDP on a 2 x 2
replicate x shard mesh (4 processes), the registry's other methods under FSDP2, and a two-node launch (`torchrun
--nnodes 2` twice, one process each, c10d rendezvous on 127.0.0.1) training DDP and FSDP2.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hf_sam import SAMConfig

from .fsdp_worker import CASES
from .test_distributed import FSDP_REFERENCES, REPO, STEPS, assert_params_close, launch, single_process
from .test_sam_trainer import reference_sam_run
from .testing_utils import (
    SequentialSAMTrainer,
    TinyDataset,
    free_port,
    params_of,
    recipe_env,
    tiny_args,
    tiny_model,
)


GRAD_ACCUM = 2


def expected_params(case: str, grad_accum: int) -> dict:
    """The independent single-process reference (tests/test_sam_trainer.py): micro-batches of 8, in order."""
    model = reference_sam_run(tiny_model(), TinyDataset(), steps=STEPS, grad_accum=grad_accum, **FSDP_REFERENCES[case])
    return dict(model.named_parameters())


@pytest.fixture(scope="module")
def fsdp2_accumulation_runs(tmp_path_factory):
    """2 processes, 1-D mesh, accumulation 2 (micro-batches of 2 x 4): SAM, F-SAM, rho=0 and bf16 SAM in one launch."""
    tmp_path = tmp_path_factory.mktemp("fsdp2-accumulation")
    options = dict(worker="fsdp_worker.py", cases="sam,fsam,rho0,sam_bf16", grad_accum=GRAD_ACCUM)
    return launch(tmp_path, "fsdp_accumulation", **options)["cases"]


@pytest.mark.parametrize("case", ["sam", "fsam", "rho0"])
def test_fsdp2_with_accumulation_equals_one_process(fsdp2_accumulation_runs, case):
    """
    One perturbation per optimizer step from the gradient of both micro-batches on both processes, pass 2 over the
    kept micro-batches, the shards restored bitwise once: equal to one process x micro-batches of 8 x accumulation 2.
    The Trainer's `no_sync` (FSDP2's gradient sync off) is in force before the last micro-batch, as under Accelerate.
    """
    result = fsdp2_accumulation_runs[case]
    assert result["restored_bitwise"]
    assert_params_close(result["params"], expected_params(case, GRAD_ACCUM))
    # SAM's passes reduce-scatter every micro-batch: no unsharded gradient of the model is kept between them. Plain
    # training (rho=0) is the Trainer's own step, where FSDP2's no_sync keeps one (the probe sees it).
    assert result["unsharded_gradient_kept"] == (case == "rho0")


def test_fsdp2_bf16_mixed_precision_with_accumulation_is_sam(fsdp2_accumulation_runs):
    """
    FSDP2's `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: the fp32 shards are perturbed and restored
    bitwise, pass 2 all-gathers the perturbed weights in bf16. Within bf16 rounding of fp32 SAM (measured 1.2e-4),
    and clearly not plain training (3e-3 away).
    """
    result = fsdp2_accumulation_runs["sam_bf16"]
    assert result["restored_bitwise"]
    assert all(p.dtype == torch.float32 for p in result["params"].values())
    sam, plain = expected_params("sam", GRAD_ACCUM), expected_params("rho0", GRAD_ACCUM)
    for name, p in sam.items():
        torch.testing.assert_close(result["params"][name], p.detach(), rtol=0, atol=1e-3, msg=f"{name} differs")
    assert max((result["params"][n] - p.detach()).abs().max() for n, p in plain.items()) > 1e-3


@pytest.fixture(scope="module")
def hsdp_runs(tmp_path_factory):
    """4 processes, HSDP on a 2 x 2 (replicate x shard) mesh, accumulation 2: SAM, F-SAM and rho=0 in one launch."""
    tmp_path = tmp_path_factory.mktemp("hsdp")
    options = dict(worker="fsdp_worker.py", processes=4, mesh="hsdp", cases="sam,fsam,rho0", grad_accum=GRAD_ACCUM)
    return launch(tmp_path, "hsdp", timeout=300, **options)["cases"]


@pytest.mark.parametrize("case", ["sam", "fsam", "rho0"])
def test_hsdp_2x2_equals_one_process(hsdp_runs, case):
    """
    HSDP: the norms are summed over the shard group only (each replica holds the whole vector once), so `e` equals
    single-process SAM's; the replicas (processes holding the same shards) end bitwise equal.
    """
    result = hsdp_runs[case]
    assert result["restored_bitwise"]
    assert result["replicas_bitwise_equal"]
    assert_params_close(result["params"], expected_params(case, GRAD_ACCUM))


def single_process_params(case: str, grad_accum: int, tmp_path) -> dict:
    """`SequentialSAMTrainer` in this process on micro-batches of 8 (for the methods the written-out reference lacks)."""
    model = tiny_model()
    args = tiny_args(tmp_path / case, per_device_train_batch_size=8, gradient_accumulation_steps=grad_accum)
    SequentialSAMTrainer(
        model=model, args=args, train_dataset=TinyDataset(), sam_config=SAMConfig(**CASES[case])
    ).train()
    return params_of(model)


@pytest.fixture(scope="module")
def fsdp2_method_runs(tmp_path_factory):
    """2 processes, 1-D mesh, accumulation 2: the registry's other methods (VaSSO, ASAM, LookSAM, GSAM, AE-SAM)."""
    tmp_path = tmp_path_factory.mktemp("fsdp2-methods")
    cases = "vasso,asam,looksam,gsam,aesam"
    return launch(tmp_path, "fsdp_methods", worker="fsdp_worker.py", cases=cases, grad_accum=GRAD_ACCUM)["cases"]


@pytest.mark.parametrize("case", ["vasso", "asam", "looksam", "gsam", "aesam"])
def test_registry_methods_under_fsdp2_with_accumulation_equal_one_process(fsdp2_method_runs, case, tmp_path):
    """
    LookSAM's and GSAM's decompositions take their dot products and norms over the shards' process group; AE-SAM
    decides from the norm over all shards; VaSSO's average is kept per shard. Each equals one process.
    """
    result = fsdp2_method_runs[case]
    assert result["restored_bitwise"]
    if case in FSDP_REFERENCES:
        expected = expected_params(case, GRAD_ACCUM)
    else:
        expected = single_process_params(case, GRAD_ACCUM, tmp_path)
    assert_params_close(result["params"], expected)


def launch_two_nodes(tmp_path, name: str, worker: str, timeout: int = 240, per_node: int = 1, **options) -> dict:
    """
    `torchrun --nnodes 2 --nproc_per_node <per_node>` twice, as two nodes of one machine: a c10d rendezvous on 127.0.0.1
    (node 0 hosts its store), each node's address 127.0.0.1, gloo on the loopback interface. Returns what rank 0
    saved; each node's output is kept in `tmp_path/<name>-node<n>.log`.
    """
    port, result = free_port(), tmp_path / f"{name}.pt"
    env = {**recipe_env(), "GLOO_SOCKET_IFNAME": "lo"}
    arguments = [str(REPO / "tests" / worker), "--output_dir", str(tmp_path / name), "--result", str(result)]
    for key, value in options.items():
        arguments += [f"--{key}", str(value)]
    with contextlib.ExitStack() as stack:
        nodes = []
        for node in range(2):
            command = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc_per_node={per_node}",
                "--max_restarts=0",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={name}-{port}",
                f"--rdzv_conf=is_host={int(node == 0)}", "--local_addr=127.0.0.1", *arguments,
            ]  # fmt: skip
            log = stack.enter_context(open(tmp_path / f"{name}-node{node}.log", "w"))
            # A session of its own: on a timeout the node's agent and worker end together, by the agent's pid.
            nodes.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            codes = [process.wait(timeout=max(1.0, deadline - time.monotonic())) for process in nodes]
        except subprocess.TimeoutExpired:
            codes = None
        finally:
            for process in nodes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    logs = "\n".join((tmp_path / f"{name}-node{n}.log").read_text()[-4000:] for n in range(2))
    assert codes == [0, 0], f"two-node launch {name} failed or timed out ({codes}):\n{logs}"
    return torch.load(result, weights_only=False)


@pytest.fixture(scope="module")
def two_node_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("two-nodes")
    ddp = launch_two_nodes(tmp_path, "ddp", "ddp_worker.py", method="fsam", grad_accum=GRAD_ACCUM, batch_size=4)
    fsdp = launch_two_nodes(tmp_path, "fsdp", "fsdp_worker.py", cases="sam,fsam,rho0", grad_accum=GRAD_ACCUM)
    hsdp = launch_two_nodes(tmp_path, "hsdp", "fsdp_worker.py", per_node=2, mesh="hsdp", cases="sam,fsam")
    return tmp_path, ddp, fsdp, hsdp


@pytest.mark.slow  # about 30 s: two launches of two agents each
def test_two_node_loopback_launch_trains_ddp_and_fsdp2_like_one_process(two_node_runs):
    """
    Two nodes of one process each (`torchrun --nnodes 2`, c10d rendezvous, 127.0.0.1): the real Trainer under DDP
    (F-SAM, accumulation 2) and FSDP2 (SAM, F-SAM, rho=0, accumulation 2) end where one process ends on the same
    global batches, and the processes really sat on two nodes.
    """
    tmp_path, ddp, fsdp, _ = two_node_runs
    for run in (ddp, fsdp):
        assert sorted(run["layout"]) == [(0, 0, 1), (1, 0, 1)], run["layout"]
    assert ddp["ranks_bitwise_equal"]
    expected = single_process(tmp_path, method="fsam", grad_accum=GRAD_ACCUM, batch_size=8)
    assert_params_close(ddp["params"], expected)
    for case, result in fsdp["cases"].items():
        assert result["restored_bitwise"], case
        assert_params_close(result["params"], expected_params(case, GRAD_ACCUM))


def test_check_distributed_script_passes_on_fsdp2_with_accumulation(tmp_path):
    """benchmarks/check_distributed.py, the check the README tells users to run on a new set-up, in 2 processes."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        str(REPO / "benchmarks" / "check_distributed.py"), "--mesh", "fsdp", "--grad_accum", "2", "--steps", "2",
    ]  # fmt: skip
    completed = subprocess.run(command, env=recipe_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "PASS" in completed.stdout and "reduce_scatter_single" in completed.stdout


@pytest.mark.slow  # shares the two-node launches above
def test_hsdp_across_two_loopback_nodes_equals_one_process(two_node_runs):
    """
    HSDP as on a cluster: 2 nodes x 2 processes, sharded within a node, replicated across the nodes (rank r sits on
    node r // 2, and the 2 x 2 mesh's rows are the nodes). SAM and F-SAM equal one process; the nodes' replicas end
    bitwise equal.
    """
    _, _, _, hsdp = two_node_runs
    assert hsdp["layout"] == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)], hsdp["layout"]
    for case, result in hsdp["cases"].items():
        assert result["restored_bitwise"] and result["replicas_bitwise_equal"], case
        assert_params_close(result["params"], expected_params(case, 1))
