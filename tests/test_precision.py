"""
Mixed precision: fp16 loss scaling driven by a real `torch.amp.GradScaler` on the CPU, bf16 rounding, and the
GPU-only paths (fp16 autocast with the Trainer's own scaler, bf16 autocast), which skip without CUDA.
"""

import logging

import pytest
import torch
from transformers import TrainerCallback

from hf_sam import SAMConfig, SAMTrainer

from .test_sam_trainer import STEPS, VARIANTS, reference_sam_run, trainer_args
from .testing_utils import (
    PoisonedClassifier,
    SequentialSAMTrainer,
    TinyDataset,
    TinyTextDataset,
    params_of,
    tiny_args,
    tiny_bert,
    tiny_model,
)


INIT_SCALE = 2.0**12


def with_cpu_grad_scaler(trainer, init_scale=INIT_SCALE, growth_interval=2000):
    """
    Give the trainer's Accelerator a real GradScaler, as `fp16=True` does on a GPU: `accelerator.backward` then scales
    the loss, and the prepared optimizer unscales, skips on inf/NaN and updates the scale.
    """
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    return trainer.accelerator.scaler


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize(
    "variant",
    ["usam", "asam_eta", "fsam", "fsam_asam_usam", "vasso", "vasso_asam_usam", "gsam", "aesam"],
)
def test_loss_scaled_gradients_are_unscaled_before_the_perturbation(tmp_path, variant, grad_accum):
    """
    USAM's step scales with the gradient (a missed unscale is 4096x too large), F-SAM's EMA mixes steps taken
    under different loss scales, and GSAM subtracts an unscaled component from the loss-scaled pass-2 gradient: the
    scale doubles after every step here (growth_interval=1).
    """
    sam_config, reference_kwargs = VARIANTS[variant]
    model = tiny_model()
    trainer = SequentialSAMTrainer(
        model=model,
        args=tiny_args(tmp_path, gradient_accumulation_steps=grad_accum, **trainer_args(reference_kwargs)),
        train_dataset=TinyDataset(),
        sam_config=sam_config,
    )
    scaler = with_cpu_grad_scaler(trainer, growth_interval=1)
    trainer.train()
    assert scaler.get_scale() == INIT_SCALE * 2**STEPS  # no step was skipped, and the scale changed at every step
    reference = reference_sam_run(tiny_model(), TinyDataset(), steps=STEPS, grad_accum=grad_accum, **reference_kwargs)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=f"{variant}: {name} differs")


@pytest.mark.parametrize("method", ["fsam", "vasso"])
def test_nonfinite_step_is_skipped_by_the_scaler_and_leaves_the_ema(tmp_path, method):
    """Both passes of step 2 overflow: no perturbation, no EMA update, the scaler skips the step and backs off."""
    torch.manual_seed(0)
    model = PoisonedClassifier(poisoned_calls={2, 3})
    trainer = SequentialSAMTrainer(
        model=model, args=tiny_args(tmp_path, max_steps=2), train_dataset=TinyDataset(), sam_config=SAMConfig(method)
    )
    scaler = with_cpu_grad_scaler(trainer)
    ema_and_weights = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ema_and_weights[state.global_step] = ([m.clone() for m in trainer.sam_variant.ema], params_of(model))

    trainer.add_callback(Snapshot())
    trainer.train()
    assert scaler.get_scale() == INIT_SCALE / 2
    ema_1, weights_1 = ema_and_weights[1]
    ema_2, weights_2 = ema_and_weights[2]
    assert all(torch.equal(a, b) for a, b in zip(ema_1, ema_2))
    assert all(torch.equal(weights_1[name], weights_2[name]) for name in weights_1)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert logs[1]["sam/nonfinite_micro_batches"] == 1


def test_bf16_rounding_that_swallows_the_perturbation_warns(tmp_path, caplog):
    batch = TinyDataset().batches(8)[0]
    batch["x"] = batch["x"].bfloat16()
    for rho, expect_warning in [(1e-5, True), (0.05, False)]:
        caplog.clear()
        model = tiny_model().bfloat16()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(4.0)  # weights around 4: bf16's spacing there is 2^-5, far above rho / sqrt(#weights)
        trainer = SAMTrainer(
            model=model, args=tiny_args(tmp_path), train_dataset=TinyDataset(), sam_config=SAMConfig(rho=rho)
        )
        trainer.current_gradient_accumulation_steps = 1
        with caplog.at_level(logging.WARNING):
            trainer.training_step(trainer.model, batch)
        assert ("survived rounding" in caplog.text) == expect_warning, rho


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16/bf16 autocast)")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_gpu_mixed_precision_trains_and_restores_bitwise(tmp_path, precision, method):
    model = tiny_bert()
    trainer = SAMTrainer(
        model=model,
        args=tiny_args(
            tmp_path, use_cpu=False, optim="adamw_torch", learning_rate=1e-3, max_steps=6, **{precision: True}
        ),
        train_dataset=TinyTextDataset(),
        sam_config=SAMConfig(method=method, rho=0.05, normalize=method == "sam"),
    )
    if precision == "fp16":
        assert trainer.accelerator.scaler is not None
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(torch.isfinite(torch.tensor(log["sam/perturbed_loss"])) for log in logs)
    before = params_of(model)
    trainer.current_gradient_accumulation_steps = 1
    data = TinyTextDataset()
    batch = {key: torch.stack([data[i][key] for i in range(8)]).cuda() for key in data[0]}
    trainer.training_step(trainer.model, batch)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@requires_cuda
@pytest.mark.gpu
def test_gpu_bf16_weights_restore_bitwise(tmp_path):
    model = tiny_bert().cuda().bfloat16()
    trainer = SAMTrainer(
        model=model,
        args=tiny_args(tmp_path, use_cpu=False, optim="adamw_torch"),
        train_dataset=TinyTextDataset(),
        sam_config=SAMConfig(rho=0.5),
    )
    trainer.current_gradient_accumulation_steps = 1
    data = TinyTextDataset()
    batch = {key: torch.stack([data[i][key] for i in range(8)]).cuda() for key in data[0]}
    before = params_of(model)
    for _ in range(3):
        trainer.training_step(trainer.model, batch)
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]), name


def _train_bert_sgd(tmp_path, *, use_cpu, sam_config, **precision):
    """6 SGD steps of a tiny BERT without dropout, in order; returns its final parameters on the CPU."""
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    SequentialSAMTrainer(
        model=model,
        args=tiny_args(tmp_path, use_cpu=use_cpu, learning_rate=0.05, max_steps=6, **precision),
        train_dataset=TinyTextDataset(),
        sam_config=sam_config,
    ).train()
    return {name: p.detach().float().cpu() for name, p in model.named_parameters()}


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_gpu_fp32_matches_cpu_and_mixed_precision_stays_close_to_fp32(tmp_path, method):
    """
    The reference: fp32 on the GPU equals fp32 on the CPU (where the step is checked against hand-written loops)
    to 1e-5; bf16 autocast and fp16 with the Trainer's GradScaler end within mixed-precision rounding of it (the
    update is 6 x lr x gradient, so a relative 5% of the weight change bounds the difference).
    """
    config = SAMConfig(method=method, rho=0.05)
    cpu = _train_bert_sgd(tmp_path / "cpu", use_cpu=True, sam_config=config)
    gpu = _train_bert_sgd(tmp_path / "gpu", use_cpu=False, sam_config=config)
    initial = {name: p.detach().float() for name, p in tiny_bert().named_parameters()}
    for name, p in cpu.items():
        torch.testing.assert_close(gpu[name], p, rtol=1e-5, atol=1e-5, msg=f"fp32 GPU vs CPU: {name}")
    for precision in ("bf16", "fp16"):
        mixed = _train_bert_sgd(tmp_path / precision, use_cpu=False, sam_config=config, **{precision: True})
        change = max((cpu[name] - initial[name]).abs().max().item() for name in cpu)
        gap = max((mixed[name] - cpu[name]).abs().max().item() for name in cpu)
        assert gap <= 0.05 * change, f"{precision}: {gap} vs a weight change of {change}"


@pytest.mark.parametrize("method", ["fsam", "vasso"])
def test_overflow_on_a_plain_interval_step_leaves_the_fsam_ema(tmp_path, method):
    """
    fp16, F-SAM (VaSSO) with `interval=2`: step 1 is a plain one-pass step whose gradient overflows (inf). The scaler
    skips it and backs off; the average must stay as it was (lerp with weight 0 against inf would make it NaN).
    """
    model = PoisonedClassifier(poisoned_calls={2})  # calls 0, 1: SAM step 0; call 2: plain step 1
    trainer = SequentialSAMTrainer(
        model=model,
        args=tiny_args(tmp_path, max_steps=4),
        train_dataset=TinyDataset(),
        sam_config=SAMConfig(method=method, rho=0.1, interval=2),
    )
    scaler = with_cpu_grad_scaler(trainer)
    emas = {}

    class RecordEMA(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            emas[state.global_step] = [m.clone() for m in trainer.sam_variant.ema]

    trainer.add_callback(RecordEMA())
    trainer.train()
    assert scaler.get_scale() == INIT_SCALE / 2  # the overflowed step was skipped once
    for m, m_before in zip(emas[2], emas[1]):
        assert torch.equal(m, m_before)
    assert all(torch.isfinite(m).all() for m in emas[4])
    logs = [log for log in trainer.state.log_history if "sam/perturbed_loss" in log]
    assert all(torch.isfinite(torch.tensor(log["sam/perturbed_loss"])) for log in logs)
