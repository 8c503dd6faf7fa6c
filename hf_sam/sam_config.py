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
"""`SAMConfig`: the hyperparameters of a SAM / ASAM / USAM / F-SAM run, shareable like a PEFT config."""

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from transformers.utils import PushToHubMixin, cached_file

from .variants import METHODS, MethodNames, NumberField, method_class


logger = logging.getLogger(__name__)


SAM_CONFIG_NAME = "sam_config.json"

PERTURBATION_SYNC_MODES = ("global", "local")
# The fields every method reads; each other field is owned (and validated) by one method class (`hf_sam.variants`).
GENERIC_FIELDS = (
    "method", "rho", "adaptive", "adaptive_eta", "normalize", "interval", "perturbation_sync", "allow_state_reset"
)  # fmt: skip


@dataclass
class SAMConfig(PushToHubMixin):
    r"""
    Configuration of [`SAMTrainer`]: which sharpness-aware method to run and with which hyperparameters.

    Every step perturbs the trainable weights to `w + e` and applies the gradient taken there:

    - `method="sam"` (Foret et al. 2021, https://huggingface.co/papers/2010.01412): `e = rho * g / ||g||`.
    - `adaptive=True` (ASAM, Kwon et al. 2021, https://huggingface.co/papers/2102.11600):
      `e = rho * T^2 d / ||T d||` with `T = |w| + adaptive_eta`, element-wise.
    - `normalize=False` (USAM, the ablation of Dai, Ahn & Sra 2023, https://huggingface.co/papers/2305.15287):
      `e = rho * d` (or `rho * T^2 d` with `adaptive=True`).
    - `method="fsam"` (Friendly-SAM, Li et al. 2024, https://huggingface.co/papers/2403.12350): the direction is
      `d = g - fsam_sigma * m_{t-1}`, where `m` is an EMA of the raw minibatch gradients,
      `m_t = fsam_lambda * m_{t-1} + (1 - fsam_lambda) * g_t` and `m_0 = g_1` (the first step is plain SAM).
    - `method="vasso"` (VaSSO, Li & Giannakis 2023, https://huggingface.co/papers/2309.15639): the perturbation
      follows an average of the gradients, `e = rho * d_t / ||d_t||`, `d_t = (1 - vasso_theta) * d_{t-1} +
      vasso_theta * g_t` and `d_1 = g_1`.
    - `method="gsam"` (GSAM, Zhuang et al. 2022, https://huggingface.co/papers/2203.08065): the radius follows the
      learning rate, `rho_t = rho_min + (rho - rho_min) * lr_t / learning_rate`, and the applied gradient is
      `g_p - gsam_alpha * g_perp`, `g_perp` the part of the pass-1 gradient orthogonal to the pass-2 gradient `g_p`.
    - `method="aesam"` (AE-SAM, Jiang et al. 2023, https://huggingface.co/papers/2304.14647): a step is a SAM step
      only when its squared gradient norm is high relative to its running mean and variance (`aesam_delta`), above a
      threshold moving from `aesam_lambda1` to `aesam_lambda2` standard deviations; the others take one pass.
    - `interval=k`: only every k-th optimizer step is perturbed (Composer's SAM option); the others take one plain pass.
    - `method="looksam"` (Liu et al. 2022, https://huggingface.co/papers/2203.02714): every `looksam_k`-th step is SAM
      and stores `g_v`, the part of its gradient orthogonal to `g`; the steps in between apply
      `g + looksam_alpha * ||g|| / ||g_v|| * g_v` after one pass. (`interval=k` with LookSAM, the old spelling, is
      read as `looksam_k=k` with a `FutureWarning`.)

    This class is a dataclass: [`~transformers.HfArgumentParser`] parses it next to
    [`~transformers.TrainingArguments`]. It is saved as one `sam_config.json` ([`~SAMConfig.save_pretrained`]), loaded
    from a directory or a Hub repository id ([`~SAMConfig.from_pretrained`]) and pushed with `push_to_hub`.

    Example:

    ```python
    >>> from hf_sam import SAMConfig
    >>> config = SAMConfig(method="fsam", rho=0.05)
    >>> config.fsam_lambda
    0.9
    ```
    """

    # Parameters that choose the method
    method: str = field(
        default="sam",
        metadata={
            "help": "Sharpness-aware method, a name registered in `hf_sam.variants.METHODS`: `sam` (SAM, ASAM, "
            "USAM), `fsam` (Friendly-SAM), `vasso` (VaSSO), `gsam` (GSAM), `aesam` (AE-SAM) or `looksam` "
            "(LookSAM: full SAM every `looksam_k` steps, its orthogonal gradient component reused in between).",
            "choices": MethodNames(),
        },
    )

    # Parameters that control the perturbation
    rho: float = field(
        default=0.05,
        metadata={
            "help": "Radius of the perturbation. `0` trains exactly like the plain `Trainer` (one pass, no overhead). "
            "ASAM usually needs a larger rho (e.g. 0.5-2.0) than SAM (0.01-0.2)."
        },
    )
    adaptive: bool = field(
        default=False,
        metadata={"help": "ASAM: scale the perturbation element-wise by `T = |w| + adaptive_eta`."},
    )
    adaptive_eta: float = field(
        default=0.01,
        metadata={
            "help": "ASAM's `eta` in `T = |w| + eta`, so that zero weights are still perturbed (0.01 in Kwon et al.; "
            "0 reproduces davda54/sam and pytorch_optimizer)."
        },
    )
    normalize: bool = field(
        default=True,
        metadata={
            "help": "Divide the direction by its norm (SAM). `False` gives unnormalized SAM (USAM): e = rho * d."
        },
    )

    # Parameters of Friendly-SAM
    fsam_sigma: float = field(
        default=1.0,
        metadata={"help": "F-SAM: weight of the gradient EMA removed from the direction, d = g - sigma * m."},
    )
    fsam_lambda: float = field(
        default=0.9,
        metadata={"help": "F-SAM: decay of the EMA of raw minibatch gradients, m = lambda * m + (1 - lambda) * g."},
    )

    # Parameters of VaSSO
    vasso_theta: float = field(
        default=0.9,
        metadata={
            "help": "VaSSO: weight of the new gradient in the averaged direction, d = (1 - theta) * d + theta * g "
            "(d_1 = g_1; theta = 1 is SAM; 0.9 in the authors' training script)."
        },
    )

    # Parameters of GSAM
    gsam_alpha: float = field(
        default=0.1,
        metadata={
            "help": "GSAM: weight of the removed component, g_p - alpha * g_perp (g_perp: the part of the "
            "pass-1 gradient orthogonal to the pass-2 gradient g_p)."
        },
    )
    rho_min: float = field(
        default=0.0,
        metadata={
            "help": "GSAM: the radius at learning rate 0; rho_t = rho_min + (rho - rho_min) * lr_t / "
            "learning_rate follows the learning rate schedule (rho at the peak `learning_rate`)."
        },
    )

    # Parameters of AE-SAM
    aesam_delta: float = field(
        default=0.9,
        metadata={"help": "AE-SAM: decay of the running mean and variance of the squared gradient norm, in [0, 1)."},
    )
    aesam_lambda1: float = field(
        default=-1.0,
        metadata={"help": "AE-SAM: threshold c_t at the first step (a SAM step when ||g||^2 >= mean + c_t * std)."},
    )
    aesam_lambda2: float = field(
        default=1.0,
        metadata={"help": "AE-SAM: threshold c_t at the last step; c_t moves linearly from lambda1 to lambda2."},
    )

    # Parameters that make SAM cheaper
    interval: int = field(
        default=1,
        metadata={
            "help": "Perturb on every k-th optimizer step only (k >= 1), plain one-pass steps in between (Composer's "
            "SAM `interval`; F-SAM's EMA and VaSSO's average still see every step). Cost per step about 1 + 1/k "
            "passes. (LookSAM's own schedule is `looksam_k`.)"
        },
    )
    looksam_alpha: float = field(
        default=0.7,
        metadata={"help": "LookSAM: weight of the reused component, g_s = g + alpha * ||g|| / ||g_v|| * g_v."},
    )
    looksam_k: int = field(
        default=1,
        metadata={
            "help": "LookSAM's k: a SAM step (which stores g_v) every k-th optimizer step, the k - 1 steps in between "
            "reuse g_v after one pass (k = 5 in the paper; 1: every step is SAM). Replaces `interval` with LookSAM."
        },
    )

    # Parameters for many processes
    perturbation_sync: str = field(
        default="global",
        metadata={
            "help": "`global`: perturb with the gradient averaged over all processes (same algorithm as one process "
            "with the whole batch). `local`: each process perturbs with its own gradient (m-sharpness, the original "
            "JAX code's default); the first pass then skips the gradient all-reduce.",
            "choices": list(PERTURBATION_SYNC_MODES),
        },
    )

    # Parameters for resuming
    allow_state_reset: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint written with another `method` or `perturbation_sync`: drop its saved "
            "SAM state (F-SAM's EMA, LookSAM's g_v) and start this run's empty, with a warning. Without it such a "
            "resume is an error."
        },
    )

    def __post_init__(self):
        if isinstance(self.method, str) and self.method in METHODS:  # old spellings; an unknown method: `validate`
            METHODS[self.method].upgrade_config(self)
        self.validate()

    def validate(self) -> None:
        """
        Raise a `ValueError` naming the field and its allowed values if any field is invalid. Runs when the config is
        built and again when training starts (`SAMTrainer`), so a field changed after construction is checked too.
        """
        method = method_class(self.method)
        if self.perturbation_sync not in PERTURBATION_SYNC_MODES:
            raise ValueError(
                f"`perturbation_sync` must be one of {list(PERTURBATION_SYNC_MODES)}, got {self.perturbation_sync!r}."
            )
        for name in ("adaptive", "normalize", "allow_state_reset"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool (True or False), got {getattr(self, name)!r}.")
        NumberField().check("rho", self.rho)
        NumberField().check("adaptive_eta", self.adaptive_eta)
        NumberField(1, integer=True).check("interval", self.interval)
        for owner in METHODS.values():
            for name, rule in owner.config_fields.items():
                rule.check(name, getattr(self, name))
        method.check_config(self)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what `sam_config.json` holds)."""
        return asdict(self)

    def to_json_string(self) -> str:
        """`sam_config.json`'s text: the fields and the hf_sam version that wrote them (`hf_sam_version`)."""
        from . import __version__

        return json.dumps({**self.to_dict(), "hf_sam_version": __version__}, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write `sam_config.json` into `save_directory` (and push it with `push_to_hub=True`, like PEFT configs)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` ({save_directory}) should be a directory, not a file.")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, SAM_CONFIG_NAME)
        with open(f"{path}.tmp{os.getpid()}", "w", encoding="utf-8") as writer:  # renamed when whole
            writer.write(self.to_json_string())
        os.replace(f"{path}.tmp{os.getpid()}", path)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", str(save_directory).rstrip("/").split("/")[-1])
            self.push_to_hub(repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs
    ) -> "SAMConfig":
        """
        Load a `SAMConfig` from a directory or a Hub repository id holding `sam_config.json`.

        `kwargs` are forwarded to [`~transformers.utils.cached_file`] (`revision`, `token`, `cache_dir`, ...).
        """
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path):
            config_file = os.path.join(path, subfolder or "", SAM_CONFIG_NAME)
            if not os.path.isfile(config_file):
                raise FileNotFoundError(f"No {SAM_CONFIG_NAME} found in the directory {os.path.dirname(config_file)}.")
        elif os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path) or path.count("/") > 1:
            raise FileNotFoundError(
                f"{path} is not a directory: pass a directory holding {SAM_CONFIG_NAME}, or a Hub repository id."
            )
        else:
            config_file = cached_file(path, SAM_CONFIG_NAME, subfolder=subfolder or "", **kwargs)
        try:
            with open(config_file, encoding="utf-8") as reader:
                values = json.load(reader)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{config_file} is not valid JSON ({error}).") from None
        if not isinstance(values, dict):
            raise ValueError(
                f"{config_file} must hold a JSON object of SAMConfig fields, got {type(values).__name__}."
            )
        from . import __version__

        written_by = values.pop("hf_sam_version", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            logger.warning(
                f"{config_file} has keys that this `SAMConfig` (hf_sam {__version__}) does not know, ignored: "
                f"{unknown}. It was written by hf_sam {written_by or 'of an unknown version'}."
            )
        try:
            return cls(**{k: v for k, v in values.items() if k in known})
        except ValueError as error:
            raise ValueError(f"{config_file}: {error}") from None
