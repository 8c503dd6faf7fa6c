"""`SAMConfig.interval` (SAM every k-th step) and LookSAM against a hand-written reference."""

import pytest
import torch

from hf_sam import SAMConfig

from .test_sam_trainer import reference_sam_run
from .testing_utils import SequentialSAMTrainer, TinyDataset, tiny_args, tiny_model


STEPS, BATCH_SIZE, LR = 6, 8, 0.1


def reference_run(*, grad_accum, rho, interval, method, sigma=0.7, lam=0.6, alpha=0.7, theta=0.6, gsam_alpha=0.3):
    """
    Step t is a SAM step when t % interval == 0 (one perturbation from the gradient of all its micro-batches), else
    one plain pass. With g the step's mean gradient at w and
    g_s the applied gradient of a SAM step, LookSAM (Liu et al. 2022, Algorithm 1) stores
    g_v = g_s - (g . g_s / ||g||^2) g, and a plain step applies g + alpha ||g|| / ||g_v|| g_v instead of g.
    F-SAM's EMA is updated with g at every step, perturbed or not; so is VaSSO's average v, d = (1 - theta) v + theta g
    on a SAM step (d = g on the first step). GSAM's SAM steps apply g_s - gsam_alpha * (g - (g . g_s / ||g_s||^2) g_s)
    (its radius follows the constant learning rate: rho), its plain steps g.
    """
    model = tiny_model()
    model.train()
    params = list(model.parameters())
    batches = iter(TinyDataset(n=STEPS * grad_accum * BATCH_SIZE).batches(BATCH_SIZE))
    ema, orthogonal = None, None
    for step in range(STEPS):
        sam_step = step % interval == 0
        micro_batches = [next(batches) for _ in range(grad_accum)]
        mean_grad = [torch.zeros_like(p) for p in params]
        for batch in micro_batches:
            g = torch.autograd.grad(model(**batch)["loss"], params)
            mean_grad = [m + gi / grad_accum for m, gi in zip(mean_grad, g)]
        applied = mean_grad
        if sam_step:  # one perturbation from the whole batch's gradient, then its gradient at w + e
            g = mean_grad
            d = list(g) if (method != "fsam" or ema is None) else [gi - sigma * m for gi, m in zip(g, ema)]
            if method == "vasso" and ema is not None:
                d = [(1 - theta) * v + theta * gi for v, gi in zip(ema, g)]
            norm = torch.sqrt(sum((di**2).sum() for di in d))
            weights = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, di in zip(params, d):
                    p.add_(rho * di / (norm + 1e-12))
            applied = [torch.zeros_like(p) for p in params]
            for batch in micro_batches:
                g2 = torch.autograd.grad(model(**batch)["loss"], params)
                applied = [a + gi / grad_accum for a, gi in zip(applied, g2)]
            with torch.no_grad():
                for p, w in zip(params, weights):
                    p.copy_(w)
        if method == "gsam" and sam_step:
            coefficient = sum((m * a).sum() for m, a in zip(mean_grad, applied)) / sum((a**2).sum() for a in applied)
            applied = [a - gsam_alpha * (m - coefficient * a) for m, a in zip(mean_grad, applied)]
        if method == "looksam":
            if sam_step:
                dot = sum((a * m).sum() for a, m in zip(applied, mean_grad))
                g_norm_sq = sum((m**2).sum() for m in mean_grad)
                orthogonal = [a - dot / g_norm_sq * m for a, m in zip(applied, mean_grad)]
            elif orthogonal is not None:
                g_norm = torch.sqrt(sum((a**2).sum() for a in applied))
                v_norm = torch.sqrt(sum((v**2).sum() for v in orthogonal))
                applied = [a + alpha * g_norm / v_norm * v for a, v in zip(applied, orthogonal)]
        if method == "fsam":
            ema = mean_grad if ema is None else [lam * m + (1 - lam) * gi for m, gi in zip(ema, mean_grad)]
        if method == "vasso":
            ema = mean_grad if ema is None else [(1 - theta) * v + theta * gi for v, gi in zip(ema, mean_grad)]
        with torch.no_grad():
            for p, a in zip(params, applied):
                p.sub_(LR * a)
    return dict(model.named_parameters())


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize(
    ("method", "interval"), [("sam", 2), ("fsam", 3), ("vasso", 3), ("gsam", 2), ("looksam", 2), ("looksam", 3)]
)
def test_matches_reference(tmp_path, method, interval, grad_accum):
    """`interval` (or LookSAM's `looksam_k`): the reference's schedule, and one pass on the steps in between."""
    schedule = {"looksam_k": interval} if method == "looksam" else {"interval": interval}
    model = tiny_model()
    forwards = []
    model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(1), with_kwargs=True)
    SequentialSAMTrainer(
        model=model,
        args=tiny_args(tmp_path, max_steps=STEPS, gradient_accumulation_steps=grad_accum),
        train_dataset=TinyDataset(n=STEPS * grad_accum * BATCH_SIZE),
        sam_config=SAMConfig(
            method=method, rho=0.1, fsam_sigma=0.7, fsam_lambda=0.6, vasso_theta=0.6, gsam_alpha=0.3, **schedule
        ),
    ).train()
    expected = reference_run(grad_accum=grad_accum, rho=0.1, interval=interval, method=method)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, expected[name].detach(), rtol=1e-6, atol=1e-6, msg=name)
    sam_steps = len(range(0, STEPS, interval))
    assert len(forwards) == grad_accum * (2 * sam_steps + (STEPS - sam_steps)), "reuse steps must take one pass"


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_aesam_takes_two_passes_on_its_sam_steps_only(tmp_path, grad_accum):
    """AE-SAM against `reference_sam_run`'s policy (the paper's equations): same weights; a plain step is one pass."""
    model = tiny_model()
    forwards = []
    model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(1), with_kwargs=True)
    config = SAMConfig(method="aesam", rho=0.1, aesam_delta=0.5, aesam_lambda1=-0.5, aesam_lambda2=1.5)
    SequentialSAMTrainer(
        model=model,
        args=tiny_args(tmp_path, max_steps=STEPS, gradient_accumulation_steps=grad_accum),
        train_dataset=TinyDataset(n=STEPS * grad_accum * BATCH_SIZE),
        sam_config=config,
    ).train()
    expected = reference_sam_run(
        tiny_model(), TinyDataset(n=STEPS * grad_accum * BATCH_SIZE), steps=STEPS, grad_accum=grad_accum, rho=0.1,
        aesam=True, delta=0.5, lambda1=-0.5, lambda2=1.5,
    )  # fmt: skip
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)
    assert 0 < expected.sam_steps < STEPS, "the policy must take both kinds of steps here"
    assert len(forwards) == grad_accum * (2 * expected.sam_steps + (STEPS - expected.sam_steps))


def test_aesam_policy_perturbs_about_half_of_the_steps_more_early_than_late():
    """
    The policy alone on squared norms drawn from a normal law: with the paper's lambda1 = -1, lambda2 = 1 the
    threshold moves from mu - sigma to mu + sigma, so about half of the steps are SAM steps (P(z >= c) averaged over
    c in [-1, 1] is 0.5), most of them early. False-failure probability: the fraction of 4,000 steps has a standard
    deviation near sqrt(0.25 / 4000) = 0.008 (the running statistics make neighbouring decisions only weakly
    dependent), so the band +-0.05 is about 6 standard deviations (under 1e-8 for a normal law), and the early and
    late quarters (about 0.8 and 0.2 of 1,000 steps, sd 0.013) are 0.05-0.55 away from their bounds.
    """
    from hf_sam.variants import AESAM

    policy = AESAM(SAMConfig(method="aesam"))
    generator = torch.Generator().manual_seed(0)
    squared = 10.0 + torch.randn(4000, generator=generator)
    steps = len(squared)
    taken = [policy.perturbs(lambda x=x: x.sqrt(), t, steps) for t, x in enumerate(squared)]
    assert 0.45 < sum(taken) / steps < 0.55
    assert sum(taken[: steps // 4]) > 0.75 * (steps // 4) > 0.25 * (steps // 4) > sum(taken[-(steps // 4) :])
    # A non-finite gradient takes the two-pass path (with e = 0: pass 2 recomputes the gradient at w).
    assert policy.perturbs(lambda: torch.tensor(float("inf")), steps, steps)


def test_looksam_differs_from_plain_interval_sam(tmp_path):
    """The reused component matters: LookSAM is not SAM with `interval`, and the reference can tell them apart."""
    looksam = reference_run(grad_accum=1, rho=0.1, interval=2, method="looksam")
    sam = reference_run(grad_accum=1, rho=0.1, interval=2, method="sam")
    assert max((looksam[n] - sam[n]).abs().max().item() for n in sam) > 1e-4


def test_bad_interval_and_looksam_options_fail_clearly():
    with pytest.raises(ValueError, match="`interval`"):
        SAMConfig(interval=0)
    with pytest.raises(ValueError, match="`interval`"):
        SAMConfig(interval=2.5)
    with pytest.raises(ValueError, match="`looksam_alpha`"):
        SAMConfig(method="looksam", looksam_alpha=-1)
    with pytest.raises(ValueError, match="`perturbation_sync`"):
        SAMConfig(method="looksam", perturbation_sync="local")
    with pytest.raises(ValueError, match="`looksam_k`"):
        SAMConfig(method="looksam", looksam_k=0)
    with pytest.raises(ValueError, match="`interval` .* and `looksam_k` .* both set"):
        SAMConfig(method="looksam", interval=3, looksam_k=2)


def test_looksam_interval_is_read_as_looksam_k_with_a_deprecation_warning(tmp_path):
    """LookSAM's k was `interval` (one name for two ideas): old configs and `sam_config.json` files still load."""
    with pytest.warns(FutureWarning, match="`looksam_k`"):
        config = SAMConfig(method="looksam", interval=3)
    assert (config.looksam_k, config.interval) == (3, 1)
    (tmp_path / "sam_config.json").write_text('{"method": "looksam", "interval": 5, "hf_sam_version": "0.1.0.dev0"}')
    with pytest.warns(FutureWarning, match="`looksam_k`"):
        assert SAMConfig.from_pretrained(tmp_path) == SAMConfig(method="looksam", looksam_k=5)
    config.interval = 2  # changed after construction: refused when training starts, not reinterpreted
    with pytest.raises(ValueError, match="`interval` must be 1 with `method='looksam'`"):
        config.validate()


@pytest.mark.parametrize(
    ("method", "interval"), [("sam", 1), ("fsam", 2), ("vasso", 2), ("gsam", 1), ("aesam", 1), ("looksam", 2)]
)
def test_parameter_the_loss_never_reaches_is_left_alone(tmp_path, method, interval):
    """As in the plain Trainer, a parameter without a gradient gets no update (not even AdamW's weight decay)."""
    model = tiny_model()
    model.unused = torch.nn.Parameter(torch.ones(3))
    SequentialSAMTrainer(
        model=model,
        args=tiny_args(tmp_path, optim="adamw_torch", weight_decay=0.1, max_steps=4),
        train_dataset=TinyDataset(),
        sam_config=SAMConfig(
            method=method, **({"looksam_k": interval} if method == "looksam" else {"interval": interval})
        ),
    ).train()
    assert torch.equal(model.unused, torch.ones(3))
    assert model.unused.grad is None
