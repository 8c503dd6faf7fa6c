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
"""Sharpness-Aware Minimization (SAM, ASAM, USAM), Friendly-SAM and LookSAM as a drop-in `transformers.Trainer`."""

__version__ = "0.1.0.dev0"

from .label_noise import MemorisationCallback, flip_labels
from .perturbation import global_norm, perturb_, restore_, sam_perturbation_
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
from .variants import VARIANTS, FriendlySAM, LookSAM, SAMVariant


__all__ = [
    "AlignmentResult",
    "FriendlySAM",
    "HessianEigenResult",
    "LookSAM",
    "MemorisationCallback",
    "SAMConfig",
    "SAMMixin",
    "SAMTrainer",
    "SAMVariant",
    "SharpnessCallback",
    "SharpnessResult",
    "VARIANTS",
    "ascent_sharpness",
    "average_sharpness",
    "flip_labels",
    "global_norm",
    "gradient_eigenvector_alignment",
    "hessian_trace",
    "perturb_",
    "restore_",
    "sam_perturbation_",
    "top_hessian_eigenvalue",
    "worst_case_sharpness",
]
