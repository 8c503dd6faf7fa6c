"""
The global batch, not its split, decides the result: `perturbation_sync="global"` perturbs once per optimizer step
with the gradient of the whole global batch, and models whose loss ignores `num_items_in_batch` (transformers issue
#47688) are trained on the batch's mean loss. 1 x 8, 1 x 4 x 2 accumulation, 2 processes x 4 and 2 processes x 2 x 2
accumulation end at the same weights, for a BERT classifier and a Llama causal LM on padded sequences.
"""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from hf_sam import SAMConfig, SAMTrainer

from .split_worker import CONFIGS, CausalTextDataset, dataset, tiny_model, train_split
from .test_distributed import launch
from .testing_utils import SequentialSAMTrainer, tiny_args


SPLITS = {"1x4x2": (1, 4, 2), "2x4": (2, 4, 1), "2x2x2": (2, 2, 2)}  # processes, per-device batch, accumulation


@pytest.fixture(scope="module", params=["bert", "llama"])
def runs(request, tmp_path_factory):
    """Every config of `CONFIGS` trained in every split, for one kind of model."""
    kind, tmp_path = request.param, tmp_path_factory.mktemp(request.param)
    results = {"1x8": {name: train_split(kind, name, 8, 1, str(tmp_path / f"1x8-{name}")) for name in CONFIGS}}
    for split, (processes, per_device, grad_accum) in SPLITS.items():
        if processes == 1:
            results[split] = {
                name: train_split(kind, name, per_device, grad_accum, str(tmp_path / f"{split}-{name}"))
                for name in CONFIGS
            }
        else:
            results[split] = launch(
                tmp_path, split, worker="split_worker.py", kind=kind, per_device=per_device, grad_accum=grad_accum
            )
    return kind, results


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_split_ends_at_the_same_weights(runs, config, split):
    kind, results = runs
    expected, actual = results["1x8"][config]["params"], results[split][config]["params"]
    for name, p in expected.items():
        torch.testing.assert_close(actual[name], p, rtol=1e-6, atol=1e-6, msg=f"{kind} {config} {split}: {name}")


@pytest.mark.parametrize("split", list(SPLITS))
def test_logged_values_are_on_the_scale_of_one_batch(runs, split):
    """`loss`, `grad_norm` and `sam/*` are those of the global batch's mean loss in every split."""
    kind, results = runs
    for config in CONFIGS:
        expected = [log for log in results["1x8"][config]["log_history"] if "loss" in log]
        actual = [log for log in results[split][config]["log_history"] if "loss" in log]
        for key in ("loss", "grad_norm", "sam/grad_norm", "sam/perturbed_loss", "sam/perturbation_norm"):
            # A window of plain steps only (AE-SAM's choice) logs no `sam/*`: the same windows in every split.
            assert [key in log for log in actual] == [key in log for log in expected], f"{kind} {config} {split}"
            got, want = [log[key] for log in actual if key in log], [log[key] for log in expected if key in log]
            np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=f"{kind} {config} {split}: {key}")


def test_splits_differ_without_the_fixes(runs, tmp_path):
    """Control: the per-micro-batch perturbation (`perturbation_sync="local"`) is a different algorithm."""
    kind, results = runs
    expected = results["1x8"]["sam"]["params"]
    local = SAMConfig(rho=0.1, perturbation_sync="local")
    actual = train_split(kind, local, 4, 2, str(tmp_path))["params"]
    gap = max((actual[name] - p).abs().max().item() for name, p in expected.items())
    assert gap > 1e-5


# transformers' `TrainerIntegrationPrerunTest.test_gradient_accumulation`, with SAMTrainer: a regression model whose
# `forward` takes `**kwargs` but whose MSE loss ignores `num_items_in_batch`, batch 8 vs 4 x accumulation 2.


class RegressionDataset(Dataset):
    def __init__(self, a=2.0, b=3.0, length=64, seed=42):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(length,)).astype(np.float32)
        self.y = (a * self.x + b + rng.normal(scale=0.1, size=(length,))).astype(np.float32)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_x": self.x[i], "labels": self.y[i]}


class RegressionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.0))
        self.b = nn.Parameter(torch.tensor(0.0))

    def forward(self, input_x, labels=None, **kwargs):
        y = input_x * self.a + self.b
        return (y,) if labels is None else (nn.functional.mse_loss(y, labels), y)


def train_regression(output_dir, optim: str, batch: int, accumulation: int, sam_config: SAMConfig | None = None):
    """3 epochs of `RegressionModel` at lr 0.1 (seed 42), with `SAMTrainer` or, without `sam_config`, the plain
    `Trainer`; SGD runs without clipping, so a scale error would show. Returns the trained (a, b)."""
    model = RegressionModel()
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=0.1,
        optim=optim,
        max_grad_norm=1.0 if optim == "adamw_torch" else 0.0,
        num_train_epochs=3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=42,
    )
    if sam_config is None:
        Trainer(model=model, args=args, train_dataset=RegressionDataset()).train()
    else:
        SAMTrainer(model=model, args=args, train_dataset=RegressionDataset(), sam_config=sam_config).train()
    return model.a.detach(), model.b.detach()


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_transformers_gradient_accumulation_holds_for_sam(tmp_path, method, optim):
    config = SAMConfig(method=method, rho=0.05)
    batch8 = train_regression(tmp_path / "batch8", optim, 8, 1, config)
    batch4x2 = train_regression(tmp_path / "batch4x2", optim, 4, 2, config)
    for expected, actual in zip(batch8, batch4x2):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    # The plain Trainer with SGD shows the upstream behaviour (#47688) that SAMTrainer corrects also at rho = 0.
    if optim == "sgd" and method == "sam":
        plain8 = train_regression(tmp_path / "plain-batch8", "sgd", 8, 1)
        plain4x2 = train_regression(tmp_path / "plain-batch4x2", "sgd", 4, 2)
        assert not torch.allclose(plain8[0], plain4x2[0], rtol=1e-3)


class FirstExampleMaskedDataset(CausalTextDataset):
    """Like `CausalTextDataset`, with every label of the first example masked (e.g. a prompt truncated away)."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return item | {"labels": torch.full_like(item["labels"], -100)} if i == 0 else item


def test_loss_normalization_check_waits_for_a_batch_that_can_tell(tmp_path):
    """A first micro-batch with no label has loss 0 either way: undecided, checked again at the next one."""
    trainer = SequentialSAMTrainer(
        model=tiny_model("llama"),
        args=tiny_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=2),
        train_dataset=FirstExampleMaskedDataset(n=4),
        sam_config=SAMConfig(rho=0.1),
    )
    trainer.train()
    assert trainer._checked_loss_normalization
    assert trainer.model_accepts_loss_kwargs  # the causal LM's loss honours num_items_in_batch


def test_loss_normalization_check_finds_a_loss_that_ignores_num_items(tmp_path):
    trainer = SequentialSAMTrainer(
        model=tiny_model("bert"),
        args=tiny_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1),
        train_dataset=dataset("bert"),
        sam_config=SAMConfig(rho=0.0),
    )
    assert trainer.model_accepts_loss_kwargs  # what transformers decides from BERT's `**kwargs` (#47688)
    trainer.train()
    assert not trainer.model_accepts_loss_kwargs
