"""The SAM step's contract: bitwise restore, non-finite gradients, `rho=0`, resume, refused set-ups."""

import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer

from hf_sam import SAMConfig, SAMTrainer
from hf_sam.perturbation import sam_perturbation_
from hf_sam.setup_checks import check_sharded_setup, check_trainer_setup
from hf_sam.trainer_utils import protect_trainer_metrics
from hf_sam.variants import METHODS, register_method

from .testing_utils import (
    NONFINITE_CASES,
    PoisonedClassifier,
    SequentialSAMTrainer,
    TinyClassifier,
    TinyDataset,
    TinyTextDataset,
    UnperturbedFirstStepSAMTrainer,
    params_of,
    poison_training_forwards,
    text_args,
    tiny_args,
    tiny_bert,
    tiny_model,
)


def training_step(trainer, batch):
    """One micro-batch outside `train()`, as the Trainer's loop would run it without accumulation."""
    trainer.current_gradient_accumulation_steps = 1
    return trainer.training_step(trainer.model, batch)


class WeightRecorder:
    """Records `fc1.weight` as each forward pass sees it."""

    def __init__(self, model):
        self.seen = []
        model.fc1.register_forward_pre_hook(lambda module, args: self.seen.append(module.weight.detach().clone()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["sam", "fsam"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_weights_bitwise_restored_after_training_step(tmp_path, dtype, method, adaptive):
    model = tiny_model(batch_norm=True).to(dtype)
    trainer = SAMTrainer(
        model=model,
        args=tiny_args(tmp_path),
        train_dataset=TinyDataset(),
        sam_config=SAMConfig(method=method, rho=0.3, adaptive=adaptive),
    )
    recorder = WeightRecorder(model)
    before = params_of(model)
    for batch in TinyDataset().batches(8)[:3]:
        batch["x"] = batch["x"].to(dtype)
        training_step(trainer, batch)
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]), f"{name} not restored bitwise"
    assert not torch.equal(recorder.seen[1], recorder.seen[0]), "pass 2 did not run at perturbed weights"
    assert torch.equal(recorder.seen[2], recorder.seen[0])


def test_batchnorm_statistics_are_those_of_pass_one(tmp_path):
    model = tiny_model(batch_norm=True)
    trainer = SAMTrainer(model=model, args=tiny_args(tmp_path), train_dataset=TinyDataset(), sam_config=SAMConfig())
    batch = TinyDataset().batches(8)[0]
    expected = tiny_model(batch_norm=True)
    expected.train()
    expected(**batch)  # one forward at w: the statistics pass 1 leaves
    training_step(trainer, batch)
    for (name, b), c in zip(model.named_buffers(), expected.buffers()):
        assert torch.equal(b, c), name


def test_nonfinite_first_pass_leaves_weights_and_ema_untouched(tmp_path, caplog):
    torch.manual_seed(0)
    model = PoisonedClassifier(poisoned_calls={2})
    trainer = SAMTrainer(
        model=model, args=tiny_args(tmp_path), train_dataset=TinyDataset(), sam_config=SAMConfig(method="fsam")
    )
    first, second = TinyDataset().batches(8)[:2]
    training_step(trainer, first)  # calls 0 and 1: a normal F-SAM step, the EMA now exists
    model.zero_grad(set_to_none=True)
    ema_before = [m.clone() for m in trainer.sam_variant.ema]
    weights_before = params_of(model)

    loss = training_step(trainer, second)  # call 2 (pass 1) is inf; call 3 is pass 2 at w
    logs = {"loss": 0.0}
    with caplog.at_level(logging.WARNING):
        trainer.log(logs)  # the step reads nothing on the host: the warning comes with the logs
    assert "not finite" in caplog.text
    assert logs["sam/nonfinite_micro_batches"] == 1
    assert not torch.isfinite(loss)
    for m, m_before in zip(trainer.sam_variant.ema, ema_before):
        assert torch.equal(m, m_before)
    for name, p in model.named_parameters():
        assert torch.equal(p, weights_before[name])
    # The gradient handed to the optimizer is the plain gradient at the unperturbed weights.
    expected = torch.autograd.grad(TinyClassifier.forward(model, **second)["loss"], list(model.parameters()))
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_training_continues_after_a_nonfinite_first_pass(tmp_path):
    torch.manual_seed(0)
    model = PoisonedClassifier(poisoned_calls={2})
    trainer = SequentialSAMTrainer(
        model=model, args=tiny_args(tmp_path), train_dataset=TinyDataset(), sam_config=SAMConfig(method="fsam")
    )
    trainer.train()
    assert trainer.state.global_step == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log.get("sam/nonfinite_micro_batches", 0) for log in logs] == [0, 1, 0, 0]
    assert "sam/sharpness" not in logs[1] and "sam/sharpness" in logs[2]


@pytest.mark.parametrize(("adaptive", "normalize"), [(False, True), (True, True), (False, False), (True, False)])
def test_nan_norm_of_a_nonfinite_gradient_gives_zero_perturbation(adaptive, normalize):
    """
    `finite=False`: the direction is already zeroed, but the pass-1 norm it comes with is NaN (0 * inf met in the
    backward). By hand: e = 0 and ||e|| = 0, not rho / (NaN + eps) * 0 = NaN.
    """
    direction = [torch.zeros(3, 2), torch.zeros(4)]
    params = [torch.randn(3, 2), torch.randn(4)]
    norm = sam_perturbation_(
        direction,
        params,
        rho=0.1,
        adaptive=adaptive,
        adaptive_eta=0.01,
        normalize=normalize,
        direction_norm=torch.tensor(float("nan")),
        finite=torch.tensor(False),
    )
    for e in direction:
        assert torch.equal(e, torch.zeros_like(e))
    assert torch.equal(norm, torch.tensor(0.0))


def _bert_without_dropout():
    """Tiny BERT, dropout off: pass 2 at `w + 0` then computes bitwise what the one-pass reference step computes."""
    return tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_poisoned_bert_pass_one_has_a_nan_gradient_norm():
    """Control for the tests below: on BERT, loss * inf gives a NaN gradient norm (a linear model gives inf)."""
    model = _bert_without_dropout()
    poison_training_forwards(model, {0})
    dataset = TinyTextDataset()
    batch = {key: torch.stack([dataset[i][key] for i in range(4)]) for key in dataset[0]}
    model(**batch)["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isnan(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    assert any((g == 0).any() for g in grads) and any(torch.isnan(g).any() for g in grads)


def test_every_registered_method_has_a_nonfinite_case():
    from hf_sam.variants import METHODS

    assert set(METHODS) <= {options["method"] for options in NONFINITE_CASES.values()}


@pytest.mark.parametrize("case", list(NONFINITE_CASES))
def test_nan_first_pass_on_bert_is_an_unperturbed_step(tmp_path, case):
    """
    Tiny BERT, AdamW, 4 steps; step 0's pass-1 loss is inf, so its gradient and gradient norm are NaN. The step must
    be the stock Trainer's step at `w` (pass 2 at `w + 0`), with the variant's state (F-SAM EMA, LookSAM g_v) left as
    it was: bitwise the run of `UnperturbedFirstStepSAMTrainer`, finite, and counted in `sam/nonfinite_micro_batches`.
    """
    sam_config = SAMConfig(rho=0.1, **NONFINITE_CASES[case])
    runs = {}
    for name, trainer_class in [("poisoned", SequentialSAMTrainer), ("reference", UnperturbedFirstStepSAMTrainer)]:
        model = _bert_without_dropout()
        if name == "poisoned":
            poison_training_forwards(model, {0})
        trainer = trainer_class(
            model=model,
            args=text_args(tmp_path / name, max_steps=4),
            train_dataset=TinyTextDataset(),
            sam_config=sam_config,
        )
        trainer.train()
        runs[name] = (params_of(model), [log for log in trainer.state.log_history if "loss" in log])
    (poisoned, logs), (reference, _) = runs["poisoned"], runs["reference"]
    for name, p in poisoned.items():
        assert torch.isfinite(p).all(), f"{name} is not finite"
        torch.testing.assert_close(p, reference[name], rtol=0, atol=0, msg=f"{name} differs from the reference")
    assert [log.get("sam/nonfinite_micro_batches", 0) for log in logs] == [1, 0, 0, 0]
    assert all(
        torch.isfinite(torch.tensor(log["sam/perturbation_norm"])) for log in logs if "sam/perturbation_norm" in log
    )


def _text_args(tmp_path, **overrides):
    """The usual fine-tuning set-up with 2 accumulated micro-batches, 6 steps."""
    return text_args(tmp_path, **{"gradient_accumulation_steps": 2, "max_steps": 6, **overrides})


class MeanLossTrainer(Trainer):
    """The stock `Trainer` told that the model's loss ignores `num_items_in_batch` (transformers issue #47688)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_rho_zero_is_the_stock_trainer_bitwise(tmp_path, grad_accum):
    """
    `rho=0`: same updates as `Trainer` (AdamW, schedule, clipping, accumulation, dropout), one pass each. With
    accumulation, BERT's loss ignores `num_items_in_batch` although its `forward` takes `**kwargs`: the stock Trainer
    then does not divide it by the accumulation steps (#47688) and `SAMTrainer` corrects that, also at `rho=0`, after
    a check of two extra no-grad forward calls: it equals the stock Trainer told `model_accepts_loss_kwargs=False`.
    """
    runs = {}
    reference = Trainer if grad_accum == 1 else MeanLossTrainer
    for name, trainer_class, kwargs in [
        ("trainer", reference, {}),
        ("stock", Trainer, {}),
        ("sam", SAMTrainer, {"sam_config": SAMConfig(method="fsam", rho=0.0)}),
    ]:
        model = tiny_bert()
        calls = []
        model.register_forward_pre_hook(lambda module, args, kwargs, calls=calls: calls.append(1), with_kwargs=True)
        args = _text_args(tmp_path / name, gradient_accumulation_steps=grad_accum)
        trainer = trainer_class(model=model, args=args, train_dataset=TinyTextDataset(), **kwargs)
        trainer.train()
        runs[name] = (params_of(model), len(calls), trainer.state.log_history)
    (trainer_params, trainer_calls, _), (sam_params, sam_calls, sam_logs) = runs["trainer"], runs["sam"]
    for name, p in trainer_params.items():
        assert torch.equal(p, sam_params[name]), name
    assert trainer_calls == 6 * grad_accum
    assert sam_calls == trainer_calls + (2 if grad_accum > 1 else 0)
    assert not any(key.startswith("sam/") for log in sam_logs for key in log)
    stock_params = runs["stock"][0]
    differs = any(not torch.equal(p, stock_params[name]) for name, p in trainer_params.items())
    assert differs == (grad_accum > 1)  # the upstream behaviour the correction removes


def _train_with_checkpoints(output_dir, sam_config, model, resume=None):
    """6 steps, a checkpoint every 2; resumed from `resume` when given. Returns the trained model."""
    SAMTrainer(
        model=model,
        args=_text_args(output_dir, save_strategy="steps", save_steps=2),
        train_dataset=TinyTextDataset(),
        sam_config=sam_config,
    ).train(resume_from_checkpoint=None if resume is None else str(resume))
    return model


@pytest.mark.parametrize(
    ("method", "interval"),
    [("fsam", 1), ("sam", 1), ("fsam", 3), ("looksam", 2), ("vasso", 1), ("vasso", 3), ("gsam", 1), ("aesam", 1)],
)
def test_resume_equals_uninterrupted_run_bitwise(tmp_path, method, interval):
    """
    Stopped after checkpoint 2 and resumed: F-SAM's EMA, VaSSO's d, LookSAM's g_v and AE-SAM's statistics come from
    `sam_state.pt`; GSAM keeps none, but its radius follows the resumed schedule (warmup, then linear decay).
    """
    schedule = {"looksam_k": interval} if method == "looksam" else {"interval": interval}
    sam_config = SAMConfig(method=method, rho=0.1, fsam_lambda=0.5, vasso_theta=0.5, rho_min=0.02, **schedule)
    uninterrupted = _train_with_checkpoints(tmp_path / "full", sam_config, tiny_bert())
    # Different initial weights: everything must come from the checkpoint.
    resumed = _train_with_checkpoints(
        tmp_path / "resumed", sam_config, tiny_bert(seed=1), resume=tmp_path / "full" / "checkpoint-2"
    )

    for (name, p), q in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), f"{name} differs after resume"


@pytest.mark.parametrize("method", ["fsam", "vasso"])
def test_resume_without_fsam_state_warns_and_changes_the_run(tmp_path, caplog, method):
    """The control for the test above: F-SAM's EMA (VaSSO's d) matters, and losing it is loud."""
    sam_config = SAMConfig(method=method, rho=0.1, fsam_lambda=0.5, vasso_theta=0.5)
    uninterrupted = _train_with_checkpoints(tmp_path / "full", sam_config, tiny_bert())
    checkpoint = tmp_path / "stripped"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", checkpoint)
    (checkpoint / "sam_state.pt").unlink()

    with caplog.at_level(logging.WARNING):
        resumed = _train_with_checkpoints(tmp_path / "resumed", sam_config, tiny_bert(), resume=checkpoint)
    assert "sam_state.pt" in caplog.text
    assert any(not torch.equal(p, q) for p, q in zip(uninterrupted.parameters(), resumed.parameters()))


def test_only_trainable_parameters_are_perturbed(tmp_path):
    model = tiny_model()
    model.fc1.requires_grad_(False)
    recorder = WeightRecorder(model)
    trainer = SAMTrainer(model=model, args=tiny_args(tmp_path), train_dataset=TinyDataset(), sam_config=SAMConfig())
    training_step(trainer, TinyDataset().batches(8)[0])
    assert torch.equal(recorder.seen[0], recorder.seen[1]), "a frozen layer was perturbed"
    assert model.fc1.weight.grad is None


@pytest.mark.parametrize("optim", ["lomo", "adalomo"])
def test_lomo_is_refused_before_training(tmp_path, optim):
    with pytest.raises(ValueError, match="LOMO"):
        SAMTrainer(
            model=tiny_model(),
            args=tiny_args(tmp_path, optim=optim),
            train_dataset=TinyDataset(),
            sam_config=SAMConfig(),
        )


@pytest.mark.parametrize(
    ("engine", "match"), [("is_deepspeed_enabled", "DeepSpeed.*use FSDP2"), ("is_fsdp_enabled", "FSDP")]
)
def test_engines_that_break_a_two_pass_step_are_refused(tmp_path, engine, match):
    """
    DeepSpeed and FSDP need several processes (and DeepSpeed its package) to switch on: the check that `__init__` runs
    is called on a real trainer with the engine's flag set (the recipes refuse `--deepspeed` before loading anything).
    """
    trainer = SAMTrainer(
        model=tiny_model(), args=tiny_args(tmp_path), train_dataset=TinyDataset(), sam_config=SAMConfig()
    )
    setattr(trainer, engine, True)
    with pytest.raises(ValueError, match=match):
        check_trainer_setup(trainer, trainer.sam_config)
    check_trainer_setup(trainer, SAMConfig(rho=0.0))  # plain training needs no second pass


@pytest.mark.parametrize(
    ("sam_config", "args", "match"),
    [
        (SAMConfig(perturbation_sync="local"), {}, "`perturbation_sync` must be 'global' under FSDP"),
    ],
)
def test_fsdp_limits_are_refused_clearly(tmp_path, sam_config, args, match):
    trainer = SAMTrainer(
        model=tiny_model(), args=tiny_args(tmp_path, **args), train_dataset=TinyDataset(), sam_config=sam_config
    )
    with pytest.raises(ValueError, match=match):
        check_sharded_setup(trainer.sam_config)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_builtin_method_is_refused_under_fsdp2(method):
    """No built-in method declares "fsdp" unsupported: tests/test_scale_out.py runs each one sharded."""
    assert "fsdp" not in METHODS[method].unsupported
    check_sharded_setup(SAMConfig(method=method))


def test_a_method_that_declares_fsdp_unsupported_is_refused_with_its_reason():
    from .test_methods import PreviousGradientSAM

    register_method(PreviousGradientSAM)
    try:
        with pytest.raises(ValueError, match="`method='test-previous'` is not supported under FSDP: a test method"):
            check_sharded_setup(SAMConfig(method="test-previous"))
    finally:
        METHODS.pop(PreviousGradientSAM.name)


@pytest.mark.parametrize(("setting", "match"), [("cp_enabled", "context parallelism"), ("tp_enabled", "`tp_size`")])
def test_context_and_tensor_parallelism_are_refused(tmp_path, setting, match):
    """
    Context parallelism shards sequences in place before pass 1 (pass 2 would shard them twice); tensor parallelism
    mixes sharded and replicated parameters. Both are refused by name; HSDP (`dp_replicate_size`) is not.
    """
    parallelism = SimpleNamespace(**{"cp_enabled": False, "tp_enabled": False, setting: True})  # needs GPUs to build
    trainer = SimpleNamespace(accelerator=SimpleNamespace(parallelism_config=parallelism), args=tiny_args(tmp_path))
    with pytest.raises(ValueError, match=match):
        check_trainer_setup(trainer, SAMConfig())
    check_trainer_setup(trainer, SAMConfig(rho=0.0))
    hsdp = SimpleNamespace(cp_enabled=False, tp_enabled=False, dp_replicate_enabled=True)
    check_trainer_setup(
        SimpleNamespace(accelerator=SimpleNamespace(parallelism_config=hsdp), args=trainer.args), SAMConfig()
    )


def test_second_pass_guard_keeps_every_metric_mode(tmp_path):
    """TRL keeps `_metrics["train"]` and `_metrics["eval"]`: neither pass 2 nor the probe may add to either."""
    trainer = SAMTrainer(model=tiny_model(), args=tiny_args(tmp_path), train_dataset=TinyDataset())
    trainer._metrics = {"train": {"entropy": [1.0]}, "eval": {"entropy": [2.0]}}
    with protect_trainer_metrics(trainer):
        trainer._metrics["train"]["entropy"].append(3.0)
        trainer._metrics["eval"]["entropy"].append(4.0)
        trainer._metrics["eval"]["new"] = [5.0]
    assert trainer._metrics == {"train": {"entropy": [1.0]}, "eval": {"entropy": [2.0]}}
