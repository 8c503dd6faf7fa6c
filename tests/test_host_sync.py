"""
The SAM step reads nothing on the host that the plain `Trainer.training_step` does not: on a GPU every `.item()`,
`bool()`, `float()` of a tensor is a device-to-host synchronization that stalls the queue between the two passes.
Counted on the CPU inside `training_step` twice: the Python calls, with a `TorchFunctionMode`, and every value copied to
the host by the dispatcher (`aten._local_scalar_dense`), with a `TorchDispatchMode`. The second also sees the reads
that no Python call makes: an op given a 0-d tensor where it takes a `Scalar` (`torch._foreach_lerp_` has no tensor
weight) reads it on the host, which the GPU check found as one sync per F-SAM step and the first count did not.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Trainer

from hf_sam import SAMConfig, SAMTrainer

from .test_precision import with_cpu_grad_scaler
from .testing_utils import PoisonedClassifier, TinyDataset, tiny_args


HOST_READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "__len__"}


class HostReadCounter(TorchFunctionMode):
    """Counts the tensor methods that copy a value to the host (and so wait for the device)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


class HostCopyCounter(TorchDispatchMode):
    """Counts the values the dispatcher copies to the host (`aten._local_scalar_dense`), whoever asks for them."""

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.copies += 1
        return func(*args, **(kwargs or {}))


class CountingMixin:
    """
    Records the host reads of every `training_step` call, after the first optimizer step (one-time checks), as
    (the Python calls by name, the number of the dispatcher's host copies).
    """

    def training_step(self, *args, **kwargs):
        counter, copies = HostReadCounter(), HostCopyCounter()
        with counter, copies:
            loss = super().training_step(*args, **kwargs)
        if self.state.global_step >= 1:
            self.reads_per_call.append((counter.reads, copies.copies))
        return loss


class CountingTrainer(CountingMixin, Trainer):
    reads_per_call: list


class CountingSAMTrainer(CountingMixin, SAMTrainer):
    reads_per_call: list


def reads(tmp_path, trainer_class, *, grad_accum=1, fp16_scaler=False, poisoned=(), **kwargs) -> list[tuple]:
    model = PoisonedClassifier(poisoned_calls=poisoned)
    trainer = trainer_class(
        model=model,
        args=tiny_args(tmp_path, gradient_accumulation_steps=grad_accum, max_steps=6, logging_steps=100),
        train_dataset=TinyDataset(),
        **kwargs,
    )
    if fp16_scaler:
        with_cpu_grad_scaler(trainer)
    trainer.reads_per_call = []
    trainer.train()
    assert trainer.reads_per_call, "no training_step was counted"
    return trainer.reads_per_call


@pytest.mark.parametrize("fp16_scaler", [False, True], ids=["fp32", "fp16-scaler"])
@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize(
    "sam_config",
    [
        SAMConfig(rho=0.1),
        SAMConfig(rho=0.1, adaptive=True, normalize=False),
        SAMConfig(method="fsam", rho=0.1),
        SAMConfig(method="fsam", rho=0.1, interval=2),
        SAMConfig(method="looksam", rho=0.1, looksam_k=2),
        SAMConfig(method="vasso", rho=0.1),
        SAMConfig(method="vasso", rho=0.1, interval=2),
        SAMConfig(method="gsam", rho=0.1, rho_min=0.01),
        SAMConfig(rho=0.1, perturbation_sync="local"),
    ],
    ids=["sam", "asam-usam", "fsam", "fsam-interval2", "looksam", "vasso", "vasso-interval2", "gsam", "local"],
)
def test_sam_step_adds_no_host_reads(tmp_path, sam_config, grad_accum, fp16_scaler):
    plain = reads(tmp_path / "plain", CountingTrainer, grad_accum=grad_accum, fp16_scaler=fp16_scaler)
    sam = reads(
        tmp_path / "sam", CountingSAMTrainer, grad_accum=grad_accum, fp16_scaler=fp16_scaler, sam_config=sam_config
    )
    assert no_more(sam, plain), f"plain step: {plain[0]}; SAM steps: {sam}"


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_aesam_adds_one_host_read_per_step(tmp_path, grad_accum):
    """AE-SAM's decision is control flow (whether pass 2 runs): one boolean read per step, documented, and no more."""
    plain = reads(tmp_path / "plain", CountingTrainer, grad_accum=grad_accum)
    config = SAMConfig(method="aesam", rho=0.1)
    sam = reads(tmp_path / "sam", CountingSAMTrainer, grad_accum=grad_accum, sam_config=config)
    (plain_reads, plain_copies), (sam_reads, sam_copies) = most(plain), most(sam)
    assert sam_reads <= plain_reads + 1 and sam_copies <= plain_copies + 1, f"plain step: {plain[0]}; SAM: {sam}"
    assert sam_reads + sam_copies > plain_reads + plain_copies, "the counters must see the decision's read"


def test_nonfinite_step_adds_no_host_reads(tmp_path):
    """The non-finite guard is arithmetic on the device too (a poisoned pass-1 loss at forward call 6)."""
    plain = reads(tmp_path / "plain", CountingTrainer)
    sam = reads(tmp_path / "sam", CountingSAMTrainer, poisoned={6}, sam_config=SAMConfig(method="fsam", rho=0.1))
    assert no_more(sam, plain), f"plain step: {plain[0]}; SAM steps: {sam}"


def most(reads_per_call: list[tuple[list[str], int]]) -> tuple[int, int]:
    """The most Python host reads and the most dispatcher host copies of any one call."""
    return max(len(names) for names, _ in reads_per_call), max(copies for _, copies in reads_per_call)


def no_more(sam: list[tuple[list[str], int]], plain: list[tuple[list[str], int]]) -> bool:
    """Whether SAM's calls make no more Python host reads and no more host copies than the plain step's, each."""
    return all(mine <= allowed for mine, allowed in zip(most(sam), most(plain)))


@pytest.mark.parametrize("read", ["item", "scalar argument"])
def test_counter_sees_host_reads(tmp_path, read):
    """Control: the counters fail a step that reads a value on the host, by a Python call or inside an op."""

    class ReadingSAMTrainer(CountingSAMTrainer):
        def _perturbation_(self, *args, **kwargs):
            norm = super()._perturbation_(*args, **kwargs)
            if read == "item":
                norm.item()
            else:  # no Python call reads it: the op turns the 0-d tensor into a Scalar
                torch._foreach_lerp_([norm.detach().clone()], [norm.detach()], norm.detach())
            return norm

    plain = reads(tmp_path / "plain", CountingTrainer)
    sam = reads(tmp_path / "sam", ReadingSAMTrainer, sam_config=SAMConfig(rho=0.1))
    assert not no_more(sam, plain)
    if read == "scalar argument":
        assert most(sam)[0] <= most(plain)[0]  # seen by the dispatcher's count alone
