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
"""SAM with the rest of the Hugging Face stack: PEFT, TRL, `Seq2SeqTrainer`, `Trainer` flags and the model card."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from torch import nn
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

import hf_sam.sam_trainer as sam_trainer_module
from hf_sam import SAMConfig, SAMMixin, SAMTrainer
from hf_sam.perturbation import perturb_

from .testing_utils import (
    SequentialSAMTrainer,
    TinyClassifier,
    TinyDataset,
    TinyTextDataset,
    _SequentialMixin,
    params_of,
    text_args,
    tiny_args,
    tiny_bert,
    tiny_llama,
    tiny_model,
)


SAM_KEYS = ("sam/perturbed_loss", "sam/sharpness", "sam/grad_norm", "sam/perturbation_norm")


def training_step(trainer, batch):
    """One micro-batch outside `train()`, as the Trainer's loop would run it without accumulation."""
    trainer.current_gradient_accumulation_steps = 1
    return trainer.training_step(trainer.model, batch)


def step_logs(trainer) -> list[dict]:
    return [log for log in trainer.state.log_history if "loss" in log]


def assert_sam_logged(trainer) -> None:
    logs = step_logs(trainer)
    assert logs, "nothing was logged"
    for log in logs:
        for key in SAM_KEYS:
            assert key in log, f"{key} missing from {log}"
        assert log["sam/perturbation_norm"] > 0


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class ParameterRecorder:
    """Snapshots every parameter of `model` as each forward pass sees it."""

    def __init__(self, model: nn.Module):
        self.seen: list[dict[str, torch.Tensor]] = []
        self.handle = model.register_forward_pre_hook(lambda module, args: self.seen.append(params_of(module)))


# ---------------------------------------------------------------------------------------------------- PEFT


def tiny_lora_bert(seed: int = 0):
    """A tiny BERT with LoRA on query/value. `init_lora_weights=False`: B is not zero, so A gets a gradient too."""
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False
    )
    model = tiny_bert(seed=seed)
    torch.manual_seed(seed)
    return get_peft_model(model, lora_config)


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_lora_perturbs_and_copies_only_the_adapter(tmp_path, monkeypatch, method):
    model = tiny_lora_bert()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(list(model.parameters()))
    perturbed_ids, saved_bytes = [], []

    def recording_perturb_(params, perturbation):
        saved = perturb_(params, perturbation)
        perturbed_ids.append({id(p) for p in params})
        saved_bytes.append(nbytes(saved))
        return saved

    monkeypatch.setattr(sam_trainer_module, "perturb_", recording_perturb_)
    trainer = SAMTrainer(
        model=model,
        args=tiny_args(tmp_path, per_device_train_batch_size=4),
        train_dataset=TinyTextDataset(),
        sam_config=SAMConfig(method=method, rho=0.1),
    )
    recorder = ParameterRecorder(model)
    before = params_of(model)
    batches = [TinyTextDataset()[slice(i, i + 4)] for i in (0, 4)]
    for batch in batches:
        training_step(trainer, batch)

    # Each step: pass 1 at w, pass 2 at w + e; only the trainable (adapter) weights moved, and they all did.
    assert len(recorder.seen) == 4
    for at_w, at_w_plus_e in zip(recorder.seen[0::2], recorder.seen[1::2]):
        for name, p in at_w.items():
            if name in trainable:
                assert not torch.equal(p, at_w_plus_e[name]), f"adapter weight {name} was not perturbed"
            else:
                assert torch.equal(p, at_w_plus_e[name]), f"frozen weight {name} was perturbed"
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} not restored bitwise"
        assert (p.grad is not None) == (name in trainable), name

    # The saved copies (and F-SAM's EMA) are exactly the adapter's size, a fraction of the model's.
    adapter = [p for p in model.parameters() if p.requires_grad]
    adapter_bytes, model_bytes = nbytes(adapter), nbytes(model.parameters())
    assert perturbed_ids == [{id(p) for p in adapter}] * 2
    assert saved_bytes == [adapter_bytes] * 2
    assert adapter_bytes < model_bytes / 4
    if method == "fsam":
        assert nbytes(trainer.sam_variant.ema) == adapter_bytes
    print(
        f"\nLoRA/{method}: perturb_ saved {saved_bytes[0]} B per step; adapter {adapter_bytes} B; model {model_bytes} B"
    )


def test_lora_adapter_saves_and_reloads(tmp_path):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    model = tiny_lora_bert()
    trainer = SAMTrainer(
        model=model,
        args=tiny_args(tmp_path / "out", max_steps=3, per_device_train_batch_size=4),
        train_dataset=TinyTextDataset(),
        sam_config=SAMConfig(method="fsam", rho=0.1),
    )
    trainer.train()
    assert_sam_logged(trainer)
    trainer.save_model()
    trainer.create_model_card()
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "sam_config.json").is_file()
    assert not (out / "model.safetensors").exists(), "the whole model was saved instead of the adapter"
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft"
    assert {"hf_sam", "fsam"} <= set(card.data.tags)
    assert "## Trained with hf_sam" in card.text

    reloaded = PeftModel.from_pretrained(tiny_bert(), str(out))
    trained_state, reloaded_state = get_peft_model_state_dict(model), get_peft_model_state_dict(reloaded)
    assert trained_state.keys() == reloaded_state.keys()
    for name, tensor in trained_state.items():
        assert torch.equal(tensor, reloaded_state[name]), name
    model.eval(), reloaded.eval()
    batch = TinyTextDataset()[slice(0, 4)]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    assert SAMConfig.from_pretrained(str(out)) == SAMConfig(method="fsam", rho=0.1)


# ---------------------------------------------------------------------------------------------------- TRL


def tiny_tokenizer():
    """A word-level tokenizer built in memory (`w0` ... `w28`, pad, eos, unk): nothing to download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(29)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_text_dataset(n: int = 16, seed: int = 0):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (n,), generator=generator).tolist()
    texts = [
        " ".join(f"w{int(i)}" for i in torch.randint(0, 29, (length,), generator=generator)) for length in lengths
    ]
    return Dataset.from_dict({"text": texts})


def run_sft(output_dir, sam_config: SAMConfig | None):
    from trl import SFTConfig, SFTTrainer

    class SAMSFTTrainer(SAMMixin, SFTTrainer):
        pass

    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=16,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kwargs = {} if sam_config is None else {"sam_config": sam_config}
    trainer_class = SFTTrainer if sam_config is None else SAMSFTTrainer
    trainer = trainer_class(
        model=tiny_llama(), args=args, train_dataset=tiny_text_dataset(), processing_class=tiny_tokenizer(), **kwargs
    )
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def plain_sft_logs(tmp_path_factory):
    return step_logs(run_sft(tmp_path_factory.mktemp("plain-sft"), sam_config=None))


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_sft_trainer(tmp_path, plain_sft_logs, method):
    trainer = run_sft(tmp_path, SAMConfig(method=method, rho=0.05))
    assert trainer.state.global_step == 3
    assert_sam_logged(trainer)
    logs = step_logs(trainer)
    # SFT's own metrics count pass 1 only: the token count equals the plain SFTTrainer's (not twice it), and the first
    # step's entropy and token accuracy, taken at the same weights on the same batch, are the plain run's exactly.
    assert [log["num_tokens"] for log in logs] == [log["num_tokens"] for log in plain_sft_logs]
    for key in ("entropy", "mean_token_accuracy", "loss"):
        assert logs[0][key] == plain_sft_logs[0][key], key

    trainer.create_model_card()  # TRL's own model card, plus the hf_sam section
    card = ModelCard.load(tmp_path / "README.md")
    assert {"trl", "sft", "hf_sam", method} <= set(card.data.tags)
    assert "TRL" in card.text and "## Trained with hf_sam" in card.text and "rho=0.05" in card.text


def tiny_t5(seed: int = 0, **overrides):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        **overrides,
        vocab_size=32,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


class TinySeq2SeqDataset(torch.utils.data.Dataset):
    """Copy the input sequence: random token ids in, the same ids out."""

    def __init__(self, n: int = 24, seq_len: int = 6, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(2, 32, (n, seq_len), generator=generator)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        ids = self.input_ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class SAMSeq2SeqTrainer(SAMMixin, Seq2SeqTrainer):
    pass


def test_seq2seq_trainer(tmp_path):
    model = tiny_t5()
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        predict_with_generate=True,
        generation_max_length=8,
    )
    dataset = TinySeq2SeqDataset()
    trainer = SAMSeq2SeqTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=dataset, sam_config=SAMConfig(method="fsam")
    )
    before = params_of(model)
    training_step(trainer, dataset[slice(0, 4)])
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} not restored bitwise"
    trainer.train()
    assert_sam_logged(trainer)
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


class SequentialSAMSeq2SeqTrainer(_SequentialMixin, SAMSeq2SeqTrainer):
    pass


def test_seq2seq_trainer_matches_a_hand_written_sam_loop(tmp_path):
    """The oracle: SAM written out on T5 (no dropout, SGD), batch by batch in order, against `Seq2SeqTrainer`."""
    rho, lr, steps, batch_size = 0.1, 0.1, 3, 4
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        optim="sgd",
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    dataset = TinySeq2SeqDataset()
    model = tiny_t5(dropout_rate=0.0)
    SequentialSAMSeq2SeqTrainer(model=model, args=args, train_dataset=dataset, sam_config=SAMConfig(rho=rho)).train()

    oracle = tiny_t5(dropout_rate=0.0)
    params = list(oracle.parameters())
    for step in range(steps):
        batch = dataset[slice(step * batch_size, (step + 1) * batch_size)]
        g = torch.autograd.grad(oracle(**batch).loss, params)
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        weights = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(rho * gi / (norm + 1e-12))
        g_perturbed = torch.autograd.grad(oracle(**batch).loss, params)
        with torch.no_grad():
            for p, w, gp in zip(params, weights, g_perturbed):
                p.copy_(w - lr * gp)
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------- Trainer flags


def train_bert(output_dir, sam_config=None, model=None, trainer_class=SequentialSAMTrainer, **overrides):
    model = tiny_bert() if model is None else model
    trainer = trainer_class(
        model=model,
        args=text_args(output_dir, **overrides.pop("args", {})),
        train_dataset=TinyTextDataset(),
        sam_config=sam_config or SAMConfig(method="fsam", rho=0.1),
        **overrides,
    )
    trainer.train()
    return trainer, params_of(model)


@pytest.fixture(scope="module")
def reference_bert_params(tmp_path_factory):
    """The weights after `train_bert` with its defaults, shared by the tests that must reproduce them."""
    return train_bert(tmp_path_factory.mktemp("reference-bert"))[1]


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("flag", ["gradient_checkpointing", "activation_checkpointing"])
def test_gradient_checkpointing_equals_the_plain_run(tmp_path, reference_bert_params, flag):
    """Pass 2's recomputation happens inside its backward, still at `w + e`: same updates (dropout on)."""
    if flag not in TrainingArguments.__dataclass_fields__:
        pytest.skip(f"this transformers has no `{flag}`")
    trainer, checkpointed = train_bert(tmp_path, args={flag: True})
    assert getattr(trainer.model, "is_activation_checkpointing", None) or trainer.model.is_gradient_checkpointing
    assert_sam_logged(trainer)
    for name, p in reference_bert_params.items():
        torch.testing.assert_close(checkpointed[name], p, rtol=0, atol=0, msg=name)


def _compiled_run_equals_eager(tmp_path, backend: str, atol: float) -> None:
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    _, reference = train_bert(tmp_path / "eager", model=tiny_bert(**no_dropout))
    compiled_args = dict(torch_compile=True, torch_compile_backend=backend)
    trainer, compiled = train_bert(tmp_path / backend, model=tiny_bert(**no_dropout), args=compiled_args)
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert_sam_logged(trainer)
    for name, p in reference.items():
        torch.testing.assert_close(compiled[name], p, rtol=0, atol=atol, msg=name)


def test_torch_compile_equals_eager(tmp_path):
    """`torch_compile=True` with the `aot_eager` backend (AOTAutograd, no codegen: seconds on CPU) is bitwise eager."""
    _compiled_run_equals_eager(tmp_path, "aot_eager", atol=0.0)


@pytest.mark.slow
def test_torch_compile_inductor(tmp_path):
    """The default inductor backend: 15-45 s of compilation on 2 CPU cores (cold cache); eager up to rounding."""
    _compiled_run_equals_eager(tmp_path, "inductor", atol=1e-5)


def test_label_smoothing_and_compute_loss_func(tmp_path):
    """`label_smoothing_factor` (the Trainer's `LabelSmoother`) equals the same loss as a custom `compute_loss_func`."""
    smoothed_trainer, smoothed = train_bert(tmp_path / "smoothing", args=dict(label_smoothing_factor=0.1))

    def smoothed_cross_entropy(outputs, labels, num_items_in_batch=None):
        return nn.functional.cross_entropy(outputs["logits"], labels, label_smoothing=0.1)

    func_trainer, custom = train_bert(tmp_path / "func", compute_loss_func=smoothed_cross_entropy)
    for trainer in (smoothed_trainer, func_trainer):
        assert_sam_logged(trainer)
    for a, b in zip(step_logs(smoothed_trainer), step_logs(func_trainer)):
        for key in ("loss", "sam/perturbed_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    for name, p in smoothed.items():
        torch.testing.assert_close(custom[name], p, rtol=1e-4, atol=1e-6, msg=name)


class TupleClassifier(TinyClassifier):
    """Returns `(loss, logits)`, like `return_dict=False`."""

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        return out["loss"], out["logits"]


def test_models_returning_tuples(tmp_path, reference_bert_params):
    trainer, with_tuple = train_bert(tmp_path / "tuple", model=tiny_bert(return_dict=False))
    assert_sam_logged(trainer)
    for name, p in reference_bert_params.items():
        assert torch.equal(with_tuple[name], p), name

    runs = []
    for model_class in (TinyClassifier, TupleClassifier):
        torch.manual_seed(0)
        model = model_class(batch_norm=True)
        trainer = SequentialSAMTrainer(
            model=model, args=tiny_args(tmp_path / model_class.__name__), train_dataset=TinyDataset()
        )
        trainer.train()
        assert_sam_logged(trainer)
        runs.append(params_of(model))
    for name, p in runs[0].items():
        assert torch.equal(runs[1][name], p), name


@pytest.mark.parametrize("mode", ["all", "non_padding"])
def test_num_input_tokens_seen_counts_each_batch_once(tmp_path, mode):
    trainer, _ = train_bert(tmp_path, args=dict(include_num_input_tokens_seen=mode))
    dataset = TinyTextDataset()
    seen = slice(0, 3 * 4)  # 3 steps of 4 examples, in order
    expected = dataset.input_ids[seen].numel() if mode == "all" else int(dataset.attention_mask[seen].sum())
    assert trainer.state.num_input_tokens_seen == expected
    assert step_logs(trainer)[-1]["num_input_tokens_seen"] == expected


class OutOfMemoryOnceClassifier(TinyClassifier):
    """Raises an out-of-memory error on its second forward call (the first pass 2) on a batch larger than `max_batch`."""

    def __init__(self, max_batch: int, **kwargs):
        super().__init__(**kwargs)
        self.max_batch = max_batch
        self.calls = 0

    def forward(self, x, labels=None):
        self.calls += 1
        if self.calls == 2 and x.shape[0] > self.max_batch:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated by the test)")
        return super().forward(x, labels)


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_auto_find_batch_size_retries_from_the_unperturbed_weights(tmp_path, method):
    """
    An out-of-memory error in pass 2 (weights at `w + e`, F-SAM's EMA already updated) must leave nothing behind:
    the retry with a smaller batch equals a run started at that batch size.
    """
    sam_config = SAMConfig(method=method, rho=0.3)
    torch.manual_seed(0)
    model = OutOfMemoryOnceClassifier(max_batch=7)
    trainer = SequentialSAMTrainer(
        model=model,
        args=tiny_args(tmp_path / "auto", per_device_train_batch_size=8, auto_find_batch_size=True),
        train_dataset=TinyDataset(),
        sam_config=sam_config,
    )
    trainer.train()
    assert trainer._train_batch_size == 7  # accelerate shrinks the batch by 10% per retry
    assert model.calls > 2

    reference = tiny_model()
    SequentialSAMTrainer(
        model=reference,
        args=tiny_args(tmp_path / "reference", per_device_train_batch_size=7),
        train_dataset=TinyDataset(),
        sam_config=sam_config,
    ).train()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    assert_sam_logged(trainer)


# ---------------------------------------------------------------------------------------------------- model card


@pytest.mark.parametrize(
    ("sam_config", "method_name"),
    [
        (SAMConfig(method="fsam", rho=0.07), "F-SAM"),
        (SAMConfig(rho=0.05), "SAM"),
        (SAMConfig(rho=1.0, adaptive=True), "ASAM"),
        (SAMConfig(rho=0.01, normalize=False), "USAM"),
        (SAMConfig(method="looksam", rho=0.05, looksam_k=5), "LookSAM"),
    ],
)
def test_model_card_names_hf_sam_the_method_and_rho(tmp_path, sam_config, method_name):
    trainer = SAMTrainer(
        model=tiny_bert(), args=tiny_args(tmp_path), train_dataset=TinyTextDataset(), sam_config=sam_config
    )
    trainer.create_model_card()
    trainer.create_model_card(tags="my-tag")  # a second card replaces the section, and keeps the caller's tags
    card = ModelCard.load(tmp_path / "README.md")
    assert {"hf_sam", sam_config.method, "my-tag"} <= set(card.data.tags)
    assert card.text.count("## Trained with hf_sam") == 1
    assert f"trained with {method_name} ([" in card.text
    assert f"rho={sam_config.rho}" in card.text
    assert (f"interval={sam_config.interval}" in card.text) == (sam_config.interval != 1)
    config_json = card.text.split("```json\n", 1)[1].split("```", 1)[0]
    assert SAMConfig(**json.loads(config_json)) == sam_config


def test_plain_trainer_model_card_is_untouched(tmp_path):
    """The control: the section comes from `SAMMixin`, not from anything the plain `Trainer` writes."""
    trainer = Trainer(model=tiny_bert(), args=tiny_args(tmp_path), train_dataset=TinyTextDataset())
    trainer.create_model_card()
    assert "hf_sam" not in (tmp_path / "README.md").read_text()
