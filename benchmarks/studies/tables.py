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
"""
The studies, as tables (`plan.Study`): AdamW vs SAM vs F-SAM (and the cheaper schedules) with the shipped recipes.

- `glue-sweep`: the rho sweep. MRPC and RTE, training on 90% of the training set and evaluating on the held-out 10%,
  seed 0; AdamW, SAM and F-SAM at each rho of the sweep. The dev sets are never used to choose anything.
- `glue`: the grid. RTE, MRPC, CoLA, STS-B, full training sets, evaluated on dev, AdamW vs SAM vs F-SAM at the rho
  each method won in the sweep (one rho per method for all tasks), every seed of `--seeds`.
- `glue-cheap`: LookSAM (k=5) and SAM with `interval=5` on MRPC at SAM's chosen rho, same seeds.
- `glue-peer`: the control, MRPC with `pytorch_optimizer`'s SAM in a plain loop (`recipes/peer_glue.py`), same seeds.
- `glue-rte-lr`: RTE's learning rate, chosen on the held-out 10% like rho (AdamW, seed 0): the grid's 5e-5 left
  AdamW's RTE dev accuracy near the majority class.
- `glue-rte`: RTE's grid rows again at the learning rate `glue-rte-lr` chose, if it is not the grid's (same seeds).
- `image-sweep`, `image`, `image-full-batch`: a small ViT from scratch on the CIFAR-10 subset, rho chosen on a
  held-out 10% of the training set; the grid measures the sharpness of seed 0's training loss along training, and
  full-batch AdamW vs SAM (512 images, one batch at every step) tests Wen, Ma & Li (2023).
- `label-noise-sweep`, `label-noise`, `label-noise-more`: the same ViT with 40% of the training labels flipped, rho
  chosen on the noisy held-out split; AdamW / SAM / F-SAM at 5 seeds, the cheaper schedules and the newer methods at 3
  (at SAM's rho; `label-noise-more-sweep`, their held-out runs, chooses the epoch each is stopped at);
  `label-noise-early`: SAM at the rho chosen together with the stopping epoch, 5 seeds.
- `image-rho`: SAM vs USAM (`normalize=False`) over a 100x rho grid matched at the radius, on the held-out split, 2
  seeds, 30 epochs (`docs/normalization.md`, `report_rho.py`); `image-rho-60`: the same on the grid's 60 epochs, since
  the 30-epoch schedule failed its epoch rule.
- `image-flat`, `image-flat-adamw`: the image grid's seeds 1-2 (and AdamW's 0-2, measured along training) with seed 0's
  sharpness measurement, for 3-seed paired intervals and a matched-loss comparison (`report_flatness.py`).
- `glue-rho` (optional): `image-rho`'s question on STS-B with MiniLM, USAM's grid mapped by its own AdamW run.
- `low-data-sweep`, `low-data`, `low-data-fsam-sweep`, `low-data-fsam`: scarce GLUE data (issue 29), 1,000 training
  examples drawn with the run's seed, rho chosen on 250 held-out training examples, then AdamW vs SAM at 10 seeds on
  the dev sets; F-SAM's sweep and seeds apart, to run if the budget allows.
- `glue-calibration`: full-size MRPC and CoLA again, AdamW vs SAM at the grid's rho, 3 seeds, for the calibration
  metrics the grid's records predate.
"""

from .plan import Arm, Study, best_learning_rate, best_rho, radius_matched
from .records import find
from .setups import GLUE_LR, PEER_METHOD, Sharpness, last_third_gain, score_by_epoch


def sweep_arms(order: tuple[float, ...], rhos: dict[str, tuple[float, ...]]) -> tuple[Arm, ...]:
    """AdamW, then each method at each of its rhos, rho by rho in `order` (the likely winners first, so that a
    partial sweep already tells something)."""
    arms = [Arm("AdamW")]
    for rho in order:
        arms += [Arm(method, rho) for method in rhos if rho in rhos[method]]
    return tuple(arms)


GLUE_SWEEP = Study(
    "glue-sweep", "run_glue", tasks=("mrpc", "rte"), seeds=(0,), held_out=True, order=("seed", "arm", "task"),
    arms=sweep_arms((0.01, 0.02, 0.05, 0.005), {"SAM": (0.005, 0.01, 0.02, 0.05), "F-SAM": (0.005, 0.01, 0.02, 0.05)}),
)  # fmt: skip
GLUE_RHO = {method: best_rho(GLUE_SWEEP, method) for method in ("SAM", "F-SAM")}

GLUE_GRID = Study(
    "glue", "run_glue", tasks=("mrpc", "rte", "stsb", "cola"),
    arms=(Arm("AdamW"), Arm("SAM", GLUE_RHO["SAM"]), Arm("F-SAM", GLUE_RHO["F-SAM"])),
)  # fmt: skip
GLUE_CHEAP = Study(
    "glue-cheap", "run_glue", tasks=("mrpc",),
    arms=(Arm("LookSAM-k5", GLUE_RHO["SAM"]), Arm("SAM-interval5", GLUE_RHO["SAM"])),
)  # fmt: skip
GLUE_PEER = Study("glue-peer", "peer_glue", tasks=("mrpc",), arms=(Arm(PEER_METHOD, GLUE_RHO["SAM"]),))

# RTE's learning rate, chosen like rho: with 5e-5 AdamW's dev accuracy on RTE stayed near the majority class while
# its held-out score was higher, so the grid's rate may be what keeps RTE from ranking the methods.
GLUE_RTE_LR = Study(
    "glue-rte-lr", "run_glue", tasks=("rte",), seeds=(0,), held_out=True, id_params=("learning_rate",),
    arms=tuple(Arm("AdamW", learning_rate=lr) for lr in (2e-5, 1e-5, 3e-5, 5e-5)),
)  # fmt: skip
RTE_LR = best_learning_rate(GLUE_RTE_LR, prefer=GLUE_LR)
RTE_LR_IF_NEW = best_learning_rate(GLUE_RTE_LR, prefer=GLUE_LR, only_if_not=GLUE_LR)
GLUE_RTE = Study(
    "glue-rte", "run_glue", tasks=("rte",), id_params=("rho", "learning_rate"),
    arms=tuple(Arm(m, rho, RTE_LR_IF_NEW) for m, rho in [("AdamW", 0.0), ("SAM", GLUE_RHO["SAM"]), ("F-SAM", GLUE_RHO["F-SAM"])]),
    waits_for="until RTE's learning-rate study is complete, or ever if it keeps the grid's 5e-5 (the grid has it)",
)  # fmt: skip

# SAM's 0.01 was added after the first sweep put its best held-out score at 0.02, the edge of its range.
IMAGE_SWEEP = Study(
    "image-sweep", "run_image_classification", tasks=("cifar10",), seeds=(0,), held_out=True,
    arms=sweep_arms((0.05, 0.1, 0.02, 0.2, 0.01), {"SAM": (0.01, 0.02, 0.05, 0.1, 0.2), "F-SAM": (0.02, 0.05, 0.1, 0.2)}),
)  # fmt: skip
IMAGE_RHO = {method: best_rho(IMAGE_SWEEP, method) for method in ("SAM", "F-SAM")}

# Seed 0 (a constant, not the smallest of `--seeds`: a run's id always means the same command) measures the sharpness
# of the training loss on 256 training images (a fixed random subset, no augmentation), every 1,580 steps (20 epochs).
IMAGE_GRID = Study(
    "image", "run_image_classification", tasks=("cifar10",),
    arms=(Arm("AdamW"), Arm("SAM", IMAGE_RHO["SAM"]), Arm("F-SAM", IMAGE_RHO["F-SAM"]), Arm("LookSAM-k5", IMAGE_RHO["SAM"])),
    sharpness=Sharpness(every_n_steps=1580, batch_size=256), sharpness_seeds=(0,),
)  # fmt: skip

# Full-batch SAM against full-batch AdamW: 512 training images drawn with the run's seed, as one batch at every step,
# 300 steps, no augmentation (every step sees the same batch); the sharpness of that full-batch loss every 100 steps.
IMAGE_FULL_BATCH = Study(
    "image-full-batch", "run_image_classification", tasks=("cifar10",), train_samples=512,
    arms=(Arm("AdamW"), Arm("SAM", IMAGE_RHO["SAM"])),
    extra_flags=(
        "--per_device_train_batch_size", "512", "--num_train_epochs", "300", "--random_crop_padding", "0",
        "--horizontal_flip", "false", "--eval_strategy", "steps", "--eval_steps", "25",
    ),
    sharpness=Sharpness(every_n_steps=100, batch_size=512),
)  # fmt: skip

# Label noise (issue 27; Foret et al. 2021, Baek, Kolter & Raghunathan 2024): 40% of the CIFAR-10 subset's training
# labels flipped to another class (`--label_noise_seed` = the run's seed, so a seed's methods share their noise, and
# the held-out split is noisy too, as a user's own would be). Without augmentation: the AdamW pilot with the grid's
# crop and flip barely memorised the flipped labels in 60 epochs (13% of them, training loss 1.80; clean held-out
# accuracy flat from epoch 36), while without it memorised 94% of them, its clean held-out accuracy falling from 0.336
# (epoch 28) to 0.244: the regime the question is about (the pilots' curves: `benchmarks/studies/README.md`).
# rho is chosen on the noisy held-out accuracy at the last epoch, as a user would choose it. SAM's and F-SAM's 0.5 were
# added when their first rhos put the best at the edge, 0.2 (SAM 0.222 against 0.196 at 0.1; F-SAM 0.178 against 0.174
# at 0.05 and 0.172 at 0.1, 2026-12-03), as the image sweep's 0.01 was.
NOISE_FLAGS = ("--label_noise_seed", "{seed}", "--random_crop_padding", "0", "--horizontal_flip", "false")
LABEL_NOISE_SWEEP = Study(
    "label-noise-sweep", "run_image_classification", tasks=("cifar10",), seeds=(0,), held_out=True,
    label_noise=0.4, extra_flags=NOISE_FLAGS,
    arms=sweep_arms((0.05, 0.1, 0.02, 0.2, 0.5), {"SAM": (0.02, 0.05, 0.1, 0.2, 0.5), "F-SAM": (0.05, 0.1, 0.2, 0.5)}),
)  # fmt: skip
NOISE_RHO = {method: best_rho(LABEL_NOISE_SWEEP, method) for method in ("SAM", "F-SAM")}
# The grid on the clean test set: AdamW, SAM and F-SAM at 5 seeds; the cheaper schedules and the methods added since
# (GSAM, VaSSO, AE-SAM, at SAM's rho) in `label-noise-more`, at 3 seeds (their own seeds, whatever `--seeds` says).
LABEL_NOISE = Study(
    "label-noise", "run_image_classification", tasks=("cifar10",), seeds=tuple(range(5)), label_noise=0.4,
    extra_flags=NOISE_FLAGS,
    arms=(Arm("AdamW"), Arm("SAM", NOISE_RHO["SAM"]), Arm("F-SAM", NOISE_RHO["F-SAM"])),
)  # fmt: skip
NOISE_MORE_ARMS = tuple(
    Arm(m, NOISE_RHO["SAM"]) for m in ("SAM-interval5", "LookSAM-k5-a0.1", "GSAM", "VaSSO", "AE-SAM")
)
LABEL_NOISE_MORE = Study(
    "label-noise-more", "run_image_classification", tasks=("cifar10",), seeds=(0, 1, 2), label_noise=0.4,
    extra_flags=NOISE_FLAGS, arms=NOISE_MORE_ARMS,
)  # fmt: skip
# The rule for "keeps SAM's gain" (README, "When does SAM pay off?"), fixed before their test runs finished: at the
# last epoch, all of LABEL_NOISE_MORE's seeds paired with the grid's AdamW and SAM runs of the same seeds,
# `stats.gain_kept` with this margin (half of SAM's 5-seed gain, +0.059); methods whose mean CPU time / SAM differ by
# at most KEEPS_COST_TIE count as equally cheap.
KEEPS_MARGIN = 0.030
KEEPS_COST_TIE = 0.15
# Their held-out runs (seed 0, SAM's rho only): the epoch each is stopped at in the report is chosen on its own noisy
# held-out curve, as AdamW's, SAM's and F-SAM's are on theirs, never on test.
LABEL_NOISE_MORE_SWEEP = Study(
    "label-noise-more-sweep", "run_image_classification", tasks=("cifar10",), seeds=(0,), held_out=True,
    label_noise=0.4, extra_flags=NOISE_FLAGS, arms=NOISE_MORE_ARMS,
    waits_for="until SAM's rho sweep (label-noise-sweep) is complete",
)  # fmt: skip

# Early stopping with a rho chosen for it. NOISE_RHO is chosen at the last epoch, the rho that best resists
# memorisation; a user who stops early chooses rho and epoch together, on the held-out accuracy at each sweep run's
# best epoch (SAM's sweep chose 0.05 that way, its best epoch 23, against 0.2 at the last epoch). SAM at that rho, at
# the grid's 5 seeds, paired with its AdamW runs; nothing to run when the two rules agree (`label-noise` has it). F-SAM's
# is not run (the budget; its joint choice, 0.1, beat 0.05 by 1 held-out image of 500).
NOISE_EARLY_RHO = best_rho(LABEL_NOISE_SWEEP, "SAM", score=lambda task, record: max(score_by_epoch(record).values()))


def early_rho_if_new(results: dict[str, dict]) -> float | None:
    """SAM's rho chosen with the stopping epoch, or None (nothing to run) when it is `NOISE_RHO`'s or not chosen."""
    early, last = NOISE_EARLY_RHO(results), NOISE_RHO["SAM"](results)
    return None if early is None or early == last else early


LABEL_NOISE_EARLY = Study(
    "label-noise-early", "run_image_classification", tasks=("cifar10",), seeds=LABEL_NOISE.seeds, label_noise=0.4,
    extra_flags=NOISE_FLAGS, arms=(Arm("SAM", early_rho_if_new),),
    waits_for="until SAM's rho sweep (label-noise-sweep) is complete, and only if the rho chosen with the stopping "
    "epoch differs from the one chosen at the last epoch",
)  # fmt: skip

# rho robustness (issue 28): SAM and USAM (`normalize=False`, e = rho * g) over a rho grid of two orders of magnitude.
# USAM's radius is rho * ||g||, so its grid is SAM's divided by the median gradient norm of AdamW's first epoch on this
# set-up: 3.40, the median of the 142 logged `grad_norm` (before clipping) of `recipes/run_image_classification.py`
# with this study's AdamW flags (held-out split, 30-epoch cosine schedule) and `--logging_steps 1 --eval_strategy no
# --save_strategy no`, seeds 0 and 1 (medians 3.369 and 3.476), each stopped at the end of epoch 1 (71 steps);
# measured on CPU (torch 2.13, 1 thread), 2026-12-03. (With the 60-epoch schedule's slower warmup: 3.74.)
# 30 epochs, half the grid's 60, to fit the budget (about 12 CPU-hours; 60 epochs would take about 28): the
# cosine schedule is annealed by its end, and the report shows AdamW's held-out gain over the last third of training
# (epoch 20 to 30, means of 3 evaluations at each end), which must stay under 1 point; if it does not, raise the
# epochs. The image sweep's 60-epoch AdamW run reached 0.530 on average over epochs 41-60 (`docs/normalization.md`).
RHO_EPOCHS = 30
# A diverged run must show it: the Trainer replaces a non-finite logged loss by the running mean
# (`logging_nan_inf_filter`, on by default), so the rho studies turn that off (`report_rho.diverged` also reads the
# logged gradient norms and the evaluation losses, which are never filtered).
NAN_VISIBLE = ("--logging_nan_inf_filter", "false")
FIRST_EPOCH_GRAD_NORM = 3.40
# SAM's grid, run in this order: the sweep's winner and its neighbours first.
RHO_GRID_SAM = (0.02, 0.05, 0.01, 0.1, 0.005, 0.2, 0.5)


def rho_robustness_arms(grad_norm: float) -> tuple[Arm, ...]:
    """AdamW, then SAM at `RHO_GRID_SAM` and USAM at the same radii: USAM's rho is SAM's / `grad_norm` (3 digits)."""
    return (Arm("AdamW"),) + tuple(
        Arm(method, value)
        for rho in RHO_GRID_SAM
        for method, value in (("SAM", rho), ("USAM", float(f"{rho / grad_norm:.3g}")))
    )


IMAGE_RHO_ROBUSTNESS = Study(
    "image-rho", "run_image_classification", tasks=("cifar10",), seeds=(0, 1), held_out=True, order=("seed", "arm", "task"),
    extra_flags=("--num_train_epochs", str(RHO_EPOCHS)) + NAN_VISIBLE, arms=rho_robustness_arms(FIRST_EPOCH_GRAD_NORM),
)  # fmt: skip
# `image-rho` failed its epoch rule (AdamW seed 0 gained 3.5 points of held-out accuracy over the last third of its 30
# epochs, and SAM's best rho was the grid's smallest), so, as designed, the epochs are raised: `image-rho-60` is the
# same study on the image grid's own 60-epoch schedule. Its USAM grid is mapped through the first-epoch median gradient
# norm of that schedule (its warmup is twice as long): 3.74, the median of the 142 logged `grad_norm` of AdamW with the
# study's flags and `--logging_steps 1 --eval_strategy no --save_strategy no`, seeds 0 and 1 (medians 3.642 and
# 3.907), each stopped after epoch 1 (71 steps); measured on CPU (torch 2.13, 1 thread), 2026-12-04.
FIRST_EPOCH_GRAD_NORM_60 = 3.74
IMAGE_RHO_60 = Study(
    "image-rho-60", "run_image_classification", tasks=("cifar10",), seeds=(0, 1), held_out=True,
    order=("seed", "arm", "task"), extra_flags=NAN_VISIBLE, arms=rho_robustness_arms(FIRST_EPOCH_GRAD_NORM_60),
)  # fmt: skip
# The gradient norm each rho study's USAM grid was mapped by (`glue-rho` measures its own: `STSB_RHO_REFERENCE`), and
# the studies whose schedule is shorter than their set-up's, so that the report judges the epoch rule.
RHO_GRAD_NORMS = {IMAGE_RHO_ROBUSTNESS.name: FIRST_EPOCH_GRAD_NORM, IMAGE_RHO_60.name: FIRST_EPOCH_GRAD_NORM_60}
RHO_SHORTENED = (IMAGE_RHO_ROBUSTNESS.name,)

# Flatness at 3 seeds (issue 28): the image grid's seeds 1 and 2 of SAM and F-SAM again at the grid's rhos, with seed 0's
# sharpness measurement (same images, settings and steps), and AdamW at seeds 0-2 measured every 395 steps (5 epochs,
# ending at the same step 4,740), so that the report can also compare SAM's end with the AdamW measurement at the
# closest training loss (`report_flatness.py`).
IMAGE_FLAT = Study(
    "image-flat", "run_image_classification", tasks=("cifar10",), seeds=(1, 2),
    arms=(Arm("SAM", IMAGE_RHO["SAM"]), Arm("F-SAM", IMAGE_RHO["F-SAM"])), sharpness=IMAGE_GRID.sharpness,
)  # fmt: skip
IMAGE_FLAT_ADAMW = Study(
    "image-flat-adamw", "run_image_classification", tasks=("cifar10",), seeds=(0, 1, 2), arms=(Arm("AdamW"),),
    sharpness=Sharpness(every_n_steps=395, batch_size=256),
)  # fmt: skip

# Optional (issue 28): the same question on STS-B with MiniLM, held-out 10% of its training set, 2 seeds, the training
# loss logged every 5 steps. USAM's grid is mapped through the median gradient norm of the first epoch of this study's
# own AdamW seed-0 run (`plan.radius_matched`), so USAM's runs wait for it.
STSB_RHO_REFERENCE = "glue-rho/stsb/AdamW/rho0/seed0"
STSB_RHO_ROBUSTNESS = Study(
    "glue-rho", "run_glue", tasks=("stsb",), seeds=(0, 1), held_out=True, order=("seed", "arm", "task"),
    extra_flags=("--logging_steps", "5") + NAN_VISIBLE,
    arms=(Arm("AdamW"),) + tuple(
        Arm(method, value) for rho in (0.02, 0.05, 0.01, 0.1, 0.005, 0.2, 0.002)
        for method, value in (("SAM", rho), ("USAM", radius_matched(STSB_RHO_REFERENCE, rho)))
    ),
)  # fmt: skip
# Scarce data (issue 29; Bahri, Mobahi & Tay 2022, https://huggingface.co/papers/2110.08529): 1,000 training
# examples, a different random subset per seed (`--train_subset_seed {seed}`), the same for every method of a seed.
# Epochs: the optimizer steps of the full-size MRPC grid (3,668 examples / batch 32 = 115 steps x 5 epochs = 575),
# so that the runs have as many steps to converge: 1,000 / 32 = 32 steps an epoch (the last batch of 8), 18 epochs =
# 576 steps, with the grid's warmup (10%) and linear decay. The epoch rule (`low_data_plateau` below) is checked on
# the sweep's AdamW runs before any seed run starts; if it fails, raise the epochs. rho is chosen on a held-out split carved BEFORE the 1,000 are drawn
# (the recipe splits, then subsamples what is left), so the two never overlap: the grid's 10% split (seed 0), its
# first 250 examples (RTE's 10% is 249). The seed runs evaluate on dev and draw their 1,000 from the whole training
# set. SAM's and F-SAM's ranges reach 0.1: in the full-size sweep MRPC's score still rose at 0.05, the edge.
LOW_DATA_TASKS = ("mrpc", "rte", "cola", "stsb")
LOW_DATA_EPOCHS = 18
LOW_DATA_FLAGS = ("--train_subset_seed", "{seed}", "--num_train_epochs", str(LOW_DATA_EPOCHS))
LOW_DATA_RHOS = (0.005, 0.01, 0.02, 0.05, 0.1)
LOW_DATA_SWEEP = Study(
    "low-data-sweep", "run_glue", tasks=LOW_DATA_TASKS, seeds=(0,), held_out=True, train_samples=1000,
    extra_flags=LOW_DATA_FLAGS + ("--max_eval_samples", "250"), order=("seed", "arm", "task"),
    arms=sweep_arms((0.02, 0.05, 0.01, 0.1, 0.005), {"SAM": LOW_DATA_RHOS}),
)  # fmt: skip
LOW_DATA_FSAM_SWEEP = Study(
    "low-data-fsam-sweep", "run_glue", tasks=LOW_DATA_TASKS, seeds=(0,), held_out=True, train_samples=1000,
    extra_flags=LOW_DATA_SWEEP.extra_flags, order=("seed", "arm", "task"),
    arms=tuple(Arm("F-SAM", rho) for rho in (0.02, 0.05, 0.01, 0.1, 0.005)),
)  # fmt: skip
LOW_DATA_RHO = {"SAM": best_rho(LOW_DATA_SWEEP, "SAM"), "F-SAM": best_rho(LOW_DATA_FSAM_SWEEP, "F-SAM")}
# The epoch rule, checked before any seed run starts (80 runs would be wasted if 18 epochs were too few): AdamW's
# held-out score in the sweep, the mean of its 3 evaluations around epoch 12 against the mean of its last 3 (epochs
# 16-18), must gain less than 1 point on average over the four tasks and less than 3 points on each (a task clearly
# still rising; one task's 250 examples are noisy, so the per-task bound is wider). Falling is not rising: that
# many epochs are enough.
PLATEAU_MEAN_GAIN, PLATEAU_TASK_GAIN = 0.01, 0.03


def low_data_plateau(results: dict[str, dict]) -> tuple[bool | None, dict[str, tuple | None]]:
    """The epoch rule's verdict (None until every task's AdamW sweep run is done) and, per task, `last_third_gain`
    of that run (None while it has not run)."""
    gains = {}
    for task in LOW_DATA_TASKS:
        record = find(results, study=LOW_DATA_SWEEP.name, task=task, method="AdamW", seed=0)
        gains[task] = None if record is None else last_third_gain(record)
    if any(found is None for found in gains.values()):
        return None, gains
    by_task = [after - before for before, after, _, _ in gains.values()]
    passed = sum(by_task) / len(by_task) < PLATEAU_MEAN_GAIN and max(by_task) < PLATEAU_TASK_GAIN
    return passed, gains


def once_epochs_confirmed(rho):
    """A choice rule: `rho` (a value or a rule) once `low_data_plateau` has passed, None (wait) until then."""

    def choose(results: dict[str, dict]) -> float | None:
        if not low_data_plateau(results)[0]:
            return None
        return rho(results) if callable(rho) else rho

    return choose


# Ten seeds (seed s: subset s, initialisation s), paired by seed; F-SAM pairs with `low-data`'s AdamW runs.
LOW_DATA = Study(
    "low-data", "run_glue", tasks=LOW_DATA_TASKS, seeds=tuple(range(10)), train_samples=1000,
    extra_flags=LOW_DATA_FLAGS,
    arms=(Arm("AdamW", once_epochs_confirmed(0.0)), Arm("SAM", once_epochs_confirmed(LOW_DATA_RHO["SAM"]))),
    waits_for="until the sweep's AdamW runs pass the epoch rule, and (SAM) its rho sweep is complete",
)  # fmt: skip
LOW_DATA_FSAM = Study(
    "low-data-fsam", "run_glue", tasks=LOW_DATA_TASKS, seeds=tuple(range(10)), train_samples=1000,
    extra_flags=LOW_DATA_FLAGS, arms=(Arm("F-SAM", once_epochs_confirmed(LOW_DATA_RHO["F-SAM"])),),
    waits_for="until the epoch rule passes and its rho sweep (low-data-fsam-sweep) is complete",
)  # fmt: skip
# Calibration on full-size GLUE: the grid's MRPC and CoLA rows again (same set-up, SAM at the grid's rho), now that
# every classification evaluation records eval_nll / ece / brier and their cross-fitted temperature-scaled *_ts.
GLUE_CALIBRATION = Study(
    "glue-calibration", "run_glue", tasks=("mrpc", "cola"), seeds=(0, 1, 2),
    arms=(Arm("AdamW"), Arm("SAM", GLUE_RHO["SAM"])),
)  # fmt: skip

STUDIES = {
    study.name: study
    for study in (
        GLUE_SWEEP, GLUE_GRID, GLUE_CHEAP, GLUE_PEER, GLUE_RTE_LR, GLUE_RTE, IMAGE_SWEEP, IMAGE_GRID, IMAGE_FULL_BATCH,
        LABEL_NOISE_SWEEP, LABEL_NOISE, LABEL_NOISE_MORE_SWEEP, LABEL_NOISE_MORE, LABEL_NOISE_EARLY,
        IMAGE_RHO_ROBUSTNESS, IMAGE_RHO_60,
        IMAGE_FLAT, IMAGE_FLAT_ADAMW, STSB_RHO_ROBUSTNESS,
        LOW_DATA_SWEEP, LOW_DATA, LOW_DATA_FSAM_SWEEP, LOW_DATA_FSAM, GLUE_CALIBRATION,
    )
}  # fmt: skip
