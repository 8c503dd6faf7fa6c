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
What a study is, and the runs it plans: a `Study` is a table (recipe, tasks, arms of method / rho / learning rate,
seeds, extra flags), and a value of an arm may be a choice rule that reads the finished runs (the rho a sweep chose),
so a study that depends on another is planned as soon as that one is complete.
"""

import itertools
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from .setups import Sharpness, default_learning_rate, task_score


# A choice rule: the finished records by id -> the chosen value, or None while it cannot be chosen yet.
Choice = Callable[[dict[str, dict]], float | None]


@dataclass(frozen=True)
class Arm:
    """One method of a study, at a rho and learning rate given or chosen (`None`: the recipe set-up's rate)."""

    method: str
    rho: float | Choice = 0.0
    learning_rate: float | Choice | None = None


@dataclass(frozen=True)
class Study:
    """
    A declarative table of runs: every combination of `seeds` (the command line's `--seeds` when `None`), `tasks`
    and `arms`, nested in `order` (outermost first: the order in which they start). `extra_flags` go to every run,
    with `{seed}` replaced by the run's seed; `label_noise` and `train_samples` become recipe flags and record fields.
    """

    name: str
    recipe: str
    tasks: tuple[str, ...]
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...] | None = None
    order: tuple[str, str, str] = ("seed", "task", "arm")
    held_out: bool = False  # evaluate on a held-out split of the training set, not on dev / test
    label_noise: float | None = None
    train_samples: int | None = None
    extra_flags: tuple[str, ...] = ()
    sharpness: Sharpness | None = None
    sharpness_seeds: tuple[int, ...] | None = None  # None: every seed measures sharpness
    id_params: tuple[str, ...] = ("rho",)  # what tells the runs of one task, method and seed apart in their ids
    waits_for: str = "until its rho sweep is complete"  # why it may plan nothing yet

    def flags(self, seed: int) -> tuple[str, ...]:
        flags = [] if self.label_noise is None else ["--label_noise", f"{self.label_noise:g}"]
        flags += [] if self.train_samples is None else ["--max_train_samples", str(self.train_samples)]
        flags += [flag.format(seed=seed) for flag in self.extra_flags]
        if self.sharpness is not None and (self.sharpness_seeds is None or seed in self.sharpness_seeds):
            flags += self.sharpness.flags()
        return tuple(flags)


@dataclass(frozen=True)
class Run:
    """One planned recipe run: its parameters, which become the fields of its record."""

    study: str
    recipe: str
    task: str
    method: str
    rho: float
    seed: int
    learning_rate: float | None = None  # None: the recipe set-up's
    label_noise: float | None = None
    train_samples: int | None = None
    held_out: bool = False
    sharpness: Sharpness | None = None
    extra_flags: tuple[str, ...] = field(default=(), repr=False)
    id_params: tuple[str, ...] = field(default=("rho",), repr=False)

    @property
    def id(self) -> str:
        """`study/task/method/<id params>/seed<seed>`, e.g. `glue/rte/SAM/rho0.02/seed1`: unique, never parsed."""
        names = {"rho": "rho", "learning_rate": "lr", "label_noise": "noise", "train_samples": "n"}
        params = [f"{names[name]}{getattr(self, name):g}" for name in self.id_params]
        return "/".join([self.study, self.task, self.method, *params, f"seed{self.seed}"])

    def parameters(self) -> dict:
        """The fields a record of this run carries (the learning rate always as a number)."""
        return {
            "id": self.id, "study": self.study, "recipe": self.recipe, "task": self.task, "method": self.method,
            "rho": self.rho, "seed": self.seed,
            "learning_rate": self.learning_rate if self.learning_rate is not None else default_learning_rate(self.recipe),
            "label_noise": self.label_noise, "train_samples": self.train_samples, "held_out": self.held_out,
            "sharpness": None if self.sharpness is None else self.sharpness.measured_on(),
        }  # fmt: skip


def _resolve(value, results: dict[str, dict]):
    return value(results) if callable(value) else value


def plan(study: Study, seeds: list[int], results: dict[str, dict]) -> list[Run]:
    """The runs of `study` that the finished `results` allow now: an arm waits until its choice rules have chosen."""
    arms = []
    for arm in study.arms:
        rho, learning_rate = _resolve(arm.rho, results), _resolve(arm.learning_rate, results)
        if rho is not None and (arm.learning_rate is None or learning_rate is not None):
            arms.append((arm.method, 0.0 if arm.method == "AdamW" else rho, learning_rate))
    axes = {"seed": study.seeds or tuple(seeds), "task": study.tasks, "arm": arms}
    runs = []
    for point in itertools.product(*(axes[axis] for axis in study.order)):
        at = dict(zip(study.order, point, strict=True))
        (method, rho, learning_rate), seed = at["arm"], at["seed"]
        with_sharpness = study.sharpness is not None and (
            study.sharpness_seeds is None or seed in study.sharpness_seeds
        )
        runs.append(
            Run(
                study=study.name, recipe=study.recipe, task=at["task"], method=method, rho=rho, seed=seed,
                learning_rate=learning_rate, label_noise=study.label_noise, train_samples=study.train_samples,
                held_out=study.held_out, sharpness=study.sharpness if with_sharpness else None,
                extra_flags=study.flags(seed), id_params=study.id_params,
            )
        )  # fmt: skip
    return runs


def sweep_rhos(study: Study, method: str) -> list[float]:
    """The rhos a sweep study tries for `method`, in increasing order."""
    return sorted({arm.rho for arm in study.arms if arm.method == method})


def best(scores: dict[float, float], prefer: float | None = None) -> float:
    """The value with the highest score; a tie goes to `prefer`, then to the smallest value."""
    return max(sorted(scores), key=lambda value: (scores[value], value == prefer))


def last_epoch_score(task: str, record: dict) -> float:
    """A run's score for choosing: the mean of its task's metrics at the last epoch (`setups.task_score`)."""
    return task_score(task, record["metrics"])


def best_rho(sweep: Study, method: str, score: Callable[[str, dict], float] = last_epoch_score) -> Choice:
    """
    The rule "the rho of `method` with the best score on `sweep` (seed 0, its held-out split), averaged over its
    tasks", a run's score being `score(task, record)` (default: at the last epoch); `None` until the method's sweep
    is complete.
    """

    def choose(results: dict[str, dict]) -> float | None:
        runs = [run for run in plan(sweep, [0], results) if run.method == method]
        if any(run.id not in results for run in runs):
            return None
        per_rho: dict[float, list[float]] = {}
        for run in runs:
            per_rho.setdefault(run.rho, []).append(score(run.task, results[run.id]))
        return best({rho: sum(scores) / len(scores) for rho, scores in per_rho.items()})

    return choose


def best_learning_rate(sweep: Study, prefer: float | None = None, only_if_not: float | None = None) -> Choice:
    """
    The rule "the learning rate of `sweep`'s runs with the best score at the last epoch" (ties to `prefer`, then to
    the smaller rate); `None` until every run is done, or when the choice is `only_if_not` (nothing new to run).
    """

    def choose(results: dict[str, dict]) -> float | None:
        runs = plan(sweep, [0], results)
        if any(run.id not in results for run in runs):
            return None
        chosen = best({run.learning_rate: last_epoch_score(run.task, results[run.id]) for run in runs}, prefer)
        return None if chosen == only_if_not else chosen

    return choose


def first_epoch_grad_norm(record: dict) -> float:
    """The median of the gradient norms (before clipping) a run logged in its first epoch."""
    return statistics.median(
        log["grad_norm"] for log in record["train_history"] if "grad_norm" in log and log["epoch"] <= 1.0
    )


def radius_matched(reference: str, rho: float) -> Choice:
    """
    The rule "USAM's rho whose radius rho ||g|| is SAM's `rho` at the start": `rho` over the median gradient norm of
    the first epoch of the run `reference` (an AdamW run's id), to 3 significant digits; `None` until it is done.
    """

    def choose(results: dict[str, dict]) -> float | None:
        return None if reference not in results else float(f"{rho / first_epoch_grad_norm(results[reference]):.3g}")

    return choose
