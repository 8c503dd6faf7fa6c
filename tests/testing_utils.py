"""Tiny models, data and a trainer with a fixed data order, shared by the tests; helpers to run the recipes."""

import os
import runpy
import socket
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainingArguments

from hf_sam import SAMTrainer


class TinyClassifier(nn.Module):
    """A 2-layer MLP (optionally with BatchNorm) that returns `{"loss", "logits"}` like a Hugging Face model."""

    def __init__(self, in_features: int = 6, hidden: int = 8, num_classes: int = 3, batch_norm: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.norm = nn.BatchNorm1d(hidden) if batch_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.tanh(self.norm(self.fc1(x))))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


class PoisonedClassifier(TinyClassifier):
    """Multiplies the loss by inf on the forward calls listed in `poisoned_calls` (counting from 0)."""

    def __init__(self, poisoned_calls=(), **kwargs):
        super().__init__(**kwargs)
        self.poisoned_calls = set(poisoned_calls)
        self.calls = 0

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if self.calls in self.poisoned_calls:
            out["loss"] = out["loss"] * float("inf")
        self.calls += 1
        return out


class TinyDataset(Dataset):
    def __init__(self, n: int = 64, in_features: int = 6, num_classes: int = 3, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, in_features, generator=generator)
        self.labels = torch.randint(0, num_classes, (n,), generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.labels[i]}

    def batches(self, batch_size: int):
        """The batches a sequential sampler yields, in order."""
        return [
            {"x": self.x[i : i + batch_size], "labels": self.labels[i : i + batch_size]}
            for i in range(0, len(self), batch_size)
        ]


class _SequentialMixin:
    """Fixed data order (no shuffling), so a hand-written loop can see the same batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class SequentialSAMTrainer(_SequentialMixin, SAMTrainer):
    pass


class SequentialTrainer(_SequentialMixin, Trainer):
    pass


def tiny_args(output_dir, **overrides) -> TrainingArguments:
    """Plain SGD at a constant LR, no clipping, no weight decay, nothing reported: an update easy to write by hand."""
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def text_args(output_dir, **overrides) -> TrainingArguments:
    """AdamW, warmup, clipping, weight decay: the usual fine-tuning set-up, 3 steps of 4 examples."""
    values = dict(
        optim="adamw_torch",
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=1,
        weight_decay=0.01,
        max_grad_norm=1.0,
        per_device_train_batch_size=4,
        max_steps=3,
    )
    values.update(overrides)
    return tiny_args(output_dir, **values)


def tiny_model(seed: int = 0, **kwargs) -> TinyClassifier:
    torch.manual_seed(seed)
    return TinyClassifier(**kwargs)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def tiny_bert(seed: int = 0, num_labels: int = 2, **overrides):
    """A 2-layer, 16-wide BERT classifier built from a config (dropout on): a real Hugging Face model, nothing fetched."""
    from transformers import BertConfig, BertForSequenceClassification

    values = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
    )
    values.update(overrides)
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**values))


# The methods and schedules the non-finite guard is tested on (tests/test_sam_step.py, tests/nonfinite_worker.py).
NONFINITE_CASES = {
    "sam": {"method": "sam"},
    "asam": {"method": "sam", "adaptive": True},
    "usam": {"method": "sam", "normalize": False},
    "fsam": {"method": "fsam", "fsam_lambda": 0.5},
    "sam-interval2": {"method": "sam", "interval": 2},
    "fsam-interval2": {"method": "fsam", "fsam_lambda": 0.5, "interval": 2},
    "looksam-k2": {"method": "looksam", "looksam_k": 2},
    "vasso": {"method": "vasso", "vasso_theta": 0.5},
    "gsam": {"method": "gsam"},
    "aesam": {"method": "aesam"},
}  # every method of the registry (`test_every_registered_method_has_a_nonfinite_case`)


def poison_training_forwards(model: nn.Module, calls) -> None:
    """
    Multiply the loss by inf on the training-mode forward calls listed in `calls` (counting from 0; eval-mode calls,
    e.g. the loss-normalization probe, are not counted). On BERT the backward then meets 0 * inf: the gradient and
    its norm are NaN, not inf.
    """
    calls, count = set(calls), [0]

    def hook(module, args, output):
        if module.training:
            if count[0] in calls:
                output["loss"] = output["loss"] * float("inf")
            count[0] += 1
        return output

    model.register_forward_hook(hook)


class UnperturbedFirstStepSAMTrainer(SequentialSAMTrainer):
    """
    The reference for a run whose step 0 has a non-finite pass-1 gradient: step 0 is the stock `Trainer`'s one-pass
    step at `w` (what pass 2 at `w + 0` computes) and the SAM variant never sees it; later steps are SAM's. The loss
    is a per-batch mean, as `SAMTrainer` decides for BERT (transformers issue #47688) at its first step.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 0:
            return Trainer.training_step(self, model, inputs, num_items_in_batch)
        return super().training_step(model, inputs, num_items_in_batch)


class TinyTextDataset(Dataset):
    """Random token ids with padding and binary labels, shaped like a tokenized GLUE task."""

    def __init__(self, n: int = 48, seq_len: int = 12, vocab_size: int = 64, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, vocab_size, (n, seq_len), generator=generator)
        lengths = torch.randint(4, seq_len + 1, (n,), generator=generator)
        self.attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        self.input_ids = self.input_ids * self.attention_mask
        self.labels = torch.randint(0, 2, (n,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


# ---------------------------------------------------------------------------------------------- recipes

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("HF_SAM_DATA_DIR", REPO.parent / "shared" / "data"))
requires_glue = pytest.mark.skipif(
    not (DATA_DIR / "glue").is_dir(),
    reason=f"GLUE TSV files not found at {DATA_DIR / 'glue'} (set HF_SAM_DATA_DIR; CI has ../shared/data)",
)


def free_port() -> int:
    """A TCP port of 127.0.0.1 free right now, for a `torch.distributed` rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_layout() -> list[tuple[int, int, int]]:
    """In a `torchrun` worker: every process's (node, local rank, processes on its node), from torchrun's variables."""
    import torch.distributed as dist

    mine = tuple(int(os.environ[name]) for name in ("GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    layout = [None] * dist.get_world_size()
    dist.all_gather_object(layout, mine)
    return layout


def recipe_command(recipe: str, argv: list[str], processes: int = 1) -> list[str]:
    """The command line of `recipes/<recipe>.py argv`: plain python, or torchrun with `processes` CPU processes."""
    script = [str(REPO / "recipes" / f"{recipe}.py"), *argv]
    if processes == 1:
        return [sys.executable, *script]
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
    return [sys.executable, *launcher, *script]


def recipe_env() -> dict[str, str]:
    """The environment of a recipe subprocess: offline, one torch thread per process, this checkout's hf_sam."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def run_recipe(log_dir: Path, recipe: str, argv: list[str], processes: int = 1, timeout: int = 240):
    """
    Run `recipes/<recipe>.py argv` in a subprocess (with `processes` > 1: torchrun, gloo; `accelerate launch --cpu
    --num_processes 2` starts a single process on these machines), assert it exits 0 and return the completed process.
    Its output is kept in `log_dir/<recipe>.log`.
    """
    try:
        completed = subprocess.run(
            recipe_command(recipe, argv, processes),
            env=recipe_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{recipe}: did not exit within {timeout} s\n{error.stdout}\n{error.stderr}")
    (log_dir / f"{recipe}.log").write_text(completed.stdout + completed.stderr)
    assert completed.returncode == 0, completed.stderr[-6000:]
    return completed


def run_recipe_in_process(recipe: str, argv: list[str], monkeypatch) -> None:
    """Run `recipes/<recipe>.py argv` in this process, as `python recipes/<recipe>.py argv` runs it (`__main__`)."""
    script = REPO / "recipes" / f"{recipe}.py"
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    runpy.run_path(str(script), run_name="__main__")


def save_tiny_text_model(path: Path) -> Path:
    """
    A 2-layer, 16-wide BERT encoder with a character-level WordPiece tokenizer (any English text tokenizes), saved in
    `path` for `--model_name_or_path`: the recipe adds a classification head of the task's size.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer, 16-wide Llama causal LM built from a config (vocabulary of 32 unless overridden)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dict(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    values.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**values))
