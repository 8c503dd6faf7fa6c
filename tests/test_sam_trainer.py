"""SAMTrainer against independent references: a hand-written two-pass loop and pytorch_optimizer's SAM."""

import dataclasses

import pytest
import torch

from hf_sam import METHODS, SAMConfig

from .testing_utils import SequentialSAMTrainer, TinyDataset, tiny_args, tiny_model


STEPS = 4
BATCH_SIZE = 8
LR = 0.1


def reference_sam_run(
    model,
    dataset,
    *,
    steps,
    grad_accum,
    rho,
    adaptive=False,
    eta=0.0,
    normalize=True,
    fsam=False,
    sigma=1.0,
    lam=0.9,
    vasso=False,
    theta=0.9,
    gsam=False,
    alpha=0.0,
    rho_min=0.0,
    linear_lr=False,
    aesam=False,
    delta=0.9,
    lambda1=-1.0,
    lambda2=1.0,
    max_grad_norm=0.0,
    per_micro_batch=False,
):
    """
    SAM / ASAM / USAM / F-SAM / VaSSO / GSAM written out from the papers, one tensor at a time, with plain SGD.

    Step t over K micro-batches with mean losses L_i (batch loss L = mean_i L_i): g = grad L(w), taken micro-batch
    by micro-batch (BatchNorm statistics updated by each); d = g (SAM) or g - sigma * m_{t-1} (F-SAM, d = g on the
    first step); T = |w| + eta (ASAM) or 1; e = rho T^2 d / ||T d|| (or rho T^2 d unnormalized); the applied gradient
    is grad L(w + e), after which weights and BatchNorm statistics are put back; m_t = g (first step) or
    lam * m_{t-1} + (1 - lam) * g; clip; w -= lr * applied. VaSSO (Li & Giannakis 2023, Algorithm 1): d = g on the
    first step, else (1 - theta) * v_{t-1} + theta * g, and v_t = d (the average of the step's g). GSAM (Zhuang et
    al. 2022, Algorithm 1): rho_t = rho_min + (rho - rho_min) * lr_t / lr, and the applied gradient g_p = grad L(w + e)
    becomes g_p - alpha * (g - (g . g_p / ||g_p||^2) g_p). `linear_lr`: lr_t = lr * (steps - t) / steps, the
    Trainer's linear schedule without warmup. AE-SAM (Jiang et al. 2023, Algorithm 1): with x = ||g||^2 of the step,
    mu = x and var = 0 at the first step, else mu = delta mu + (1 - delta) x and var = delta var + (1 - delta)
    (x - mu)^2; c = lambda1 + (lambda2 - lambda1) t / steps; the step is SAM when x >= mu + c sqrt(var), else it
    applies g (one pass). `model.sam_steps` counts the SAM steps.

    `per_micro_batch=True` (m-sharpness, `perturbation_sync="local"`): every micro-batch i takes its own
    e_i from g_i = grad L_i(w) (F-SAM: g_i - sigma * m_{t-1}; VaSSO: (1 - theta) * v_{t-1} + theta * g_i) and the
    applied gradient is mean_i grad L_i(w + e_i); v_t then averages the step's mean gradient.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(dataset.batches(BATCH_SIZE))
    ema = average = mean = var = None
    model.sam_steps = 0
    model.train()

    def perturbation(g):
        rho = rho_t
        d = list(g) if (not fsam or ema is None) else [gi - sigma * mi for gi, mi in zip(g, ema)]
        if vasso and average is not None:
            d = [(1 - theta) * vi + theta * gi for vi, gi in zip(average, g)]
        scaling = [p.detach().abs() + eta if adaptive else torch.ones_like(p) for p in params]
        if normalize:
            norm = torch.sqrt(sum(((t * di) ** 2).sum() for t, di in zip(scaling, d)))
            return [rho * t * t * di / (norm + 1e-12) for t, di in zip(scaling, d)]
        return [rho * t * t * di for t, di in zip(scaling, d)]

    def gradient_at(e, micro_batches):
        weights = [p.detach().clone() for p in params]
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        total = [torch.zeros_like(p) for p in params]
        for batch in micro_batches:
            g = torch.autograd.grad(model(**batch)["loss"] / grad_accum, params)
            total = [t + gi for t, gi in zip(total, g)]
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        return total

    for step in range(steps):
        lr_t = LR * (steps - step) / steps if linear_lr else LR
        rho_t = rho_min + (rho - rho_min) * lr_t / LR if gsam else rho
        micro_batches = [next(batches) for _ in range(grad_accum)]
        if per_micro_batch:
            applied = [torch.zeros_like(p) for p in params]
            mean_grad = [torch.zeros_like(p) for p in params]
            for batch in micro_batches:
                g = torch.autograd.grad(model(**batch)["loss"], params)
                applied = [a + gp for a, gp in zip(applied, gradient_at(perturbation(g), [batch]))]
                mean_grad = [mg + gi / grad_accum for mg, gi in zip(mean_grad, g)]
        else:
            mean_grad = [torch.zeros_like(p) for p in params]
            for batch in micro_batches:
                g = torch.autograd.grad(model(**batch)["loss"] / grad_accum, params)
                mean_grad = [mg + gi for mg, gi in zip(mean_grad, g)]
            perturbs = True
            if aesam:
                x = sum((g**2).sum() for g in mean_grad)
                mean = x if mean is None else delta * mean + (1 - delta) * x
                var = torch.zeros(()) if var is None else delta * var + (1 - delta) * (x - mean) ** 2
                perturbs = bool(x >= mean + (lambda1 + (lambda2 - lambda1) * step / steps) * var.sqrt())
            model.sam_steps += perturbs
            applied = gradient_at(perturbation(mean_grad), micro_batches) if perturbs else mean_grad
        if gsam:
            coefficient = sum((g * a).sum() for g, a in zip(mean_grad, applied)) / sum((a**2).sum() for a in applied)
            applied = [a - alpha * (g - coefficient * a) for g, a in zip(mean_grad, applied)]
        ema = mean_grad if ema is None else [lam * mi + (1 - lam) * gi for mi, gi in zip(ema, mean_grad)]
        average = mean_grad if average is None else [(1 - theta) * v + theta * g for v, g in zip(average, mean_grad)]
        if max_grad_norm > 0:
            total = torch.sqrt(sum((a**2).sum() for a in applied))
            coef = torch.clamp(max_grad_norm / (total + 1e-6), max=1.0)
            applied = [a * coef for a in applied]
        with torch.no_grad():
            for p, a in zip(params, applied):
                p.sub_(lr_t * a)
    return model


VARIANTS = {
    "sam": (SAMConfig(rho=0.1), {"rho": 0.1}),
    "sam_clipped": (SAMConfig(rho=0.1), {"rho": 0.1, "max_grad_norm": 0.2}),
    "asam": (SAMConfig(rho=0.5, adaptive=True, adaptive_eta=0.0), {"rho": 0.5, "adaptive": True, "eta": 0.0}),
    "asam_eta": (SAMConfig(rho=0.5, adaptive=True, adaptive_eta=0.1), {"rho": 0.5, "adaptive": True, "eta": 0.1}),
    "usam": (SAMConfig(rho=0.1, normalize=False), {"rho": 0.1, "normalize": False}),
    "fsam": (
        SAMConfig(method="fsam", rho=0.1, fsam_sigma=0.7, fsam_lambda=0.6),
        {"rho": 0.1, "fsam": True, "sigma": 0.7, "lam": 0.6},
    ),
    "fsam_asam_usam": (
        SAMConfig(method="fsam", rho=0.2, fsam_sigma=1.5, adaptive=True, normalize=False),
        {"rho": 0.2, "fsam": True, "sigma": 1.5, "adaptive": True, "eta": 0.01, "normalize": False},
    ),
    "vasso": (SAMConfig(method="vasso", rho=0.1, vasso_theta=0.4), {"rho": 0.1, "vasso": True, "theta": 0.4}),
    "vasso_asam_usam": (
        SAMConfig(method="vasso", rho=0.2, vasso_theta=0.6, adaptive=True, normalize=False),
        {"rho": 0.2, "vasso": True, "theta": 0.6, "adaptive": True, "eta": 0.01, "normalize": False},
    ),
    "gsam": (
        SAMConfig(method="gsam", rho=0.2, rho_min=0.05, gsam_alpha=0.3),
        {"rho": 0.2, "gsam": True, "alpha": 0.3, "rho_min": 0.05, "linear_lr": True},
    ),
    "gsam_adaptive_clipped": (  # the authors' adaptive GSAM: ASAM's T = |w| (eta 0)
        SAMConfig(method="gsam", rho=0.5, rho_min=0.1, gsam_alpha=0.5, adaptive=True, adaptive_eta=0.0),
        {
            "rho": 0.5,
            "gsam": True,
            "alpha": 0.5,
            "rho_min": 0.1,
            "linear_lr": True,
            "adaptive": True,
            "eta": 0.0,
            "max_grad_norm": 0.2,
        },
    ),  # fmt: skip
    "aesam": (
        SAMConfig(method="aesam", rho=0.1, aesam_delta=0.5, aesam_lambda1=-0.5, aesam_lambda2=1.5),
        {"rho": 0.1, "aesam": True, "delta": 0.5, "lambda1": -0.5, "lambda2": 1.5},
    ),
}


def trainer_args(reference_kwargs: dict) -> dict:
    """The `TrainingArguments` overrides a reference's options imply: clipping and the LR schedule."""
    schedule = "linear" if reference_kwargs.get("linear_lr") else "constant"
    return {"max_grad_norm": reference_kwargs.get("max_grad_norm", 0.0), "lr_scheduler_type": schedule}


def _train(tmp_path, sam_config, *, grad_accum, batch_norm, **args):
    model = tiny_model(batch_norm=batch_norm)
    trainer = SequentialSAMTrainer(
        model=model,
        args=tiny_args(tmp_path, gradient_accumulation_steps=grad_accum, max_steps=STEPS, **args),
        train_dataset=TinyDataset(),
        sam_config=sam_config,
    )
    trainer.train()
    return model


@pytest.mark.parametrize("batch_norm", [False, True], ids=["mlp", "batchnorm"])
@pytest.mark.parametrize(("grad_accum", "sync"), [(1, "global"), (2, "global"), (2, "local")])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_hand_written_reference(tmp_path, variant, grad_accum, sync, batch_norm):
    sam_config, reference_kwargs = VARIANTS[variant]
    if sync == "local" and "local_sync" in METHODS[sam_config.method].unsupported:
        with pytest.raises(ValueError, match="`perturbation_sync` must be 'global'"):
            dataclasses.replace(sam_config, perturbation_sync=sync)
        return
    sam_config = dataclasses.replace(sam_config, perturbation_sync=sync)
    model = _train(
        tmp_path, sam_config, grad_accum=grad_accum, batch_norm=batch_norm, **trainer_args(reference_kwargs)
    )
    reference = reference_sam_run(
        tiny_model(batch_norm=batch_norm),
        TinyDataset(),
        steps=STEPS,
        grad_accum=grad_accum,
        per_micro_batch=sync == "local",
        **reference_kwargs,
    )
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=f"{variant}: {name} differs")
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-6, msg=f"{variant}: buffer {name} differs")


def test_reference_is_sensitive(tmp_path):
    """The tolerance above is far below the differences between the variants, so the comparison can fail."""
    sam = reference_sam_run(tiny_model(), TinyDataset(), steps=STEPS, grad_accum=1, rho=0.1)
    fsam = reference_sam_run(tiny_model(), TinyDataset(), steps=STEPS, grad_accum=1, rho=0.1, fsam=True, sigma=0.7)
    vasso = reference_sam_run(tiny_model(), TinyDataset(), steps=STEPS, grad_accum=1, rho=0.1, vasso=True, theta=0.4)
    gsam = reference_sam_run(tiny_model(), TinyDataset(), steps=STEPS, grad_accum=1, rho=0.1, gsam=True, alpha=0.3)
    gsam_rho = reference_sam_run(
        tiny_model(), TinyDataset(), steps=STEPS, grad_accum=1, rho=0.1, gsam=True, rho_min=0.01, linear_lr=True
    )
    sam_linear = reference_sam_run(tiny_model(), TinyDataset(), steps=STEPS, grad_accum=1, rho=0.1, linear_lr=True)
    plain = reference_sam_run(tiny_model(), TinyDataset(), steps=STEPS, grad_accum=1, rho=0.0)
    for a, b in [(sam, fsam), (sam, vasso), (fsam, vasso), (sam, gsam), (sam_linear, gsam_rho), (sam, plain)]:
        gap = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
        assert gap > 1e-4


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_matches_pytorch_optimizer_sam(tmp_path, adaptive):
    """pytorch_optimizer's `SAM` (adaptive: ASAM with eta = 0) as an oracle, driven by a manual two-pass loop."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    rho = 0.5 if adaptive else 0.05
    model = _train(tmp_path, SAMConfig(rho=rho, adaptive=adaptive, adaptive_eta=0.0), grad_accum=1, batch_norm=False)

    oracle = tiny_model()
    optimizer = pytorch_optimizer.SAM(
        oracle.parameters(), base_optimizer=torch.optim.SGD, rho=rho, adaptive=adaptive, lr=LR
    )
    for batch in TinyDataset().batches(BATCH_SIZE)[:STEPS]:
        oracle(**batch)["loss"].backward()
        optimizer.first_step(zero_grad=True)
        oracle(**batch)["loss"].backward()
        optimizer.second_step(zero_grad=True)
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=f"{name} differs from pytorch_optimizer")
