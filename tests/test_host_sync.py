"""
The SAM step reads nothing on the host that the plain `Trainer.training_step` does not: on a GPU every `.item()`,
`bool()`, `float()` of a tensor is a device-to-host synchronization that stalls the queue between the two passes.
Counted on the CPU with a `TorchFunctionMode` that records those calls inside `training_step`.
"""

import pytest
from torch.overrides import TorchFunctionMode
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


class CountingMixin:
    """Records the host reads of every `training_step` call, after the first optimizer step (one-time checks)."""

    def training_step(self, *args, **kwargs):
        counter = HostReadCounter()
        with counter:
            loss = super().training_step(*args, **kwargs)
        if self.state.global_step >= 1:
            self.reads_per_call.append(counter.reads)
        return loss


class CountingTrainer(CountingMixin, Trainer):
    reads_per_call: list


class CountingSAMTrainer(CountingMixin, SAMTrainer):
    reads_per_call: list


def reads(tmp_path, trainer_class, *, grad_accum=1, fp16_scaler=False, poisoned=(), **kwargs) -> list[list[str]]:
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
        SAMConfig(method="looksam", rho=0.1, interval=2),
        SAMConfig(rho=0.1, perturbation_sync="local"),
    ],
    ids=["sam", "asam-usam", "fsam", "fsam-interval2", "looksam", "local"],
)
def test_sam_step_adds_no_host_reads(tmp_path, sam_config, grad_accum, fp16_scaler):
    plain = reads(tmp_path / "plain", CountingTrainer, grad_accum=grad_accum, fp16_scaler=fp16_scaler)
    sam = reads(
        tmp_path / "sam", CountingSAMTrainer, grad_accum=grad_accum, fp16_scaler=fp16_scaler, sam_config=sam_config
    )
    allowed = max(len(r) for r in plain)
    assert max(len(r) for r in sam) <= allowed, f"plain step: {plain[0]}; SAM steps: {sam}"


def test_nonfinite_step_adds_no_host_reads(tmp_path):
    """The non-finite guard is arithmetic on the device too (a poisoned pass-1 loss at forward call 6)."""
    plain = reads(tmp_path / "plain", CountingTrainer)
    sam = reads(tmp_path / "sam", CountingSAMTrainer, poisoned={6}, sam_config=SAMConfig(method="fsam", rho=0.1))
    assert max(len(r) for r in sam) <= max(len(r) for r in plain)


def test_counter_sees_host_reads(tmp_path):
    """Control: the counter fails a step that reads a value on the host."""

    class ReadingSAMTrainer(CountingSAMTrainer):
        def _perturbation_(self, *args, **kwargs):
            norm = super()._perturbation_(*args, **kwargs)
            norm.item()
            return norm

    plain = reads(tmp_path / "plain", CountingTrainer)
    sam = reads(tmp_path / "sam", ReadingSAMTrainer, sam_config=SAMConfig(rho=0.1))
    assert max(len(r) for r in sam) > max(len(r) for r in plain)
