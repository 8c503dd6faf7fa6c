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
"""Sharpness-Aware Minimization (SAM, ASAM, USAM, F-SAM, VaSSO, GSAM, AE-SAM, LookSAM) as a `transformers.Trainer`."""

__version__ = "0.1.0.dev0"

from .label_noise import MemorisationCallback, flip_labels
from .sam_config import SAMConfig
from .sam_trainer import SAMMixin, SAMTrainer
from .sharpness import (
    AlignmentResult,
    HessianEigenResult,
    SharpnessResult,
    ascent_sharpness,
    average_sharpness,
    gradient_eigenvector_alignment,
    hessian_trace,
    top_hessian_eigenvalue,
    worst_case_sharpness,
)
from .sharpness_callback import SharpnessCallback
from .variants import AESAM, GSAM, METHODS, FriendlySAM, LookSAM, SAMVariant, VaSSO, register_method


__all__ = [
    "AESAM",
    "AlignmentResult",
    "FriendlySAM",
    "GSAM",
    "HessianEigenResult",
    "LookSAM",
    "METHODS",
    "MemorisationCallback",
    "SAMConfig",
    "SAMMixin",
    "SAMTrainer",
    "SAMVariant",
    "SharpnessCallback",
    "SharpnessResult",
    "VaSSO",
    "ascent_sharpness",
    "average_sharpness",
    "flip_labels",
    "gradient_eigenvector_alignment",
    "hessian_trace",
    "register_method",
    "top_hessian_eigenvalue",
    "worst_case_sharpness",
]


# Old top-level names: the step's internal helpers (now only in `hf_sam.perturbation`) and the registry's old name.
_MOVED = {
    "global_norm": ("hf_sam.perturbation", "global_norm"),
    "perturb_": ("hf_sam.perturbation", "perturb_"),
    "restore_": ("hf_sam.perturbation", "restore_"),
    "sam_perturbation_": ("hf_sam.perturbation", "sam_perturbation_"),
    "VARIANTS": ("hf_sam.variants", "METHODS"),
}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module 'hf_sam' has no attribute {name!r}")
    import importlib
    import warnings

    module, new = _MOVED[name]
    warnings.warn(
        f"`hf_sam.{name}` is deprecated and will be removed: use `{module}.{new}`.", FutureWarning, stacklevel=2
    )
    return getattr(importlib.import_module(module), new)
