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
Workarounds for upstream bugs that are not about SAM, kept apart from the SAM step.

- huggingface/transformers#43701 (https://github.com/huggingface/transformers/issues/43701), transformers >= 5.0
  (unfixed in 5.24, the newest version tested): `save_pretrained` writes some models' weights under their legacy
  names (ViT), and the Trainer's resume (`_load_from_checkpoint`, `_load_best_model`) does not map them back, so
  those layers silently restart from their initialisation. `RenamedWeightsMixin` loads such checkpoints through
  `from_pretrained` (`restore_renamed_weights`); a checkpoint whose names match, and every
  sharded (FSDP) model, keeps the Trainer's own loading, so on versions without the bug nothing changes.
"""

import json
import logging
import os

import torch


logger = logging.getLogger(__name__)


def _checkpoint_weight_keys(checkpoint_dir: str) -> set[str] | None:
    """The tensor names of a checkpoint's safetensors weights (single file or sharded), or None when it has none."""
    from safetensors import safe_open

    single = os.path.join(checkpoint_dir, "model.safetensors")
    index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as file:
            return set(file.keys())
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as file:
            return set(json.load(file)["weight_map"])
    return None


def restore_renamed_weights(model: torch.nn.Module, checkpoint_dir: str) -> bool:
    """
    Load the weights of `checkpoint_dir` into `model` when transformers renamed them on save, which the Trainer's
    own loading does not undo; returns False (nothing done) when the names match and the Trainer's path is right.

    Since transformers 5, `save_pretrained` writes some models' weights under their legacy names (ViT:
    `vit.encoder.layer.0.attention.attention.query.weight` for `vit.layers.0.attention.q_proj.weight`), and only
    `from_pretrained` maps them back; the Trainer's resume path (`load_state_dict(..., strict=False)`) does not, so the
    renamed layers silently keep their fresh initialisation (a warning lists them) while the optimizer state and the
    schedule resume (upstream huggingface/transformers#43701). When the checkpoint's names do not cover the model's,
    the weights are loaded through `from_pretrained` (the conversion that loading the saved model applies) and copied
    into `model`; a weight that `from_pretrained` could not find or load is an error, never a warning.
    """
    from transformers import PreTrainedModel

    saved = _checkpoint_weight_keys(checkpoint_dir)
    if saved is None or not isinstance(model, PreTrainedModel) or getattr(model, "_hf_peft_config_loaded", False):
        return False  # adapters, FSDP/DeepSpeed layouts and `.bin` checkpoints: the Trainer's own path
    # A tied weight (an LM head sharing the embeddings) is saved once, under one of its names; the model's
    # `_keys_to_ignore_on_save` (exact names) are never saved.
    not_saved_on_purpose = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    names_of_tensor: dict[tuple, list[str]] = {}
    for name, tensor in model.state_dict().items():
        if name not in not_saved_on_purpose:
            names_of_tensor.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    unsaved = [names for names in names_of_tensor.values() if not saved.intersection(names)]
    if not unsaved:
        return False
    # Loaded in the model's dtype when it has one, else in fp32 (`load_state_dict` casts each tensor to its own).
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    try:
        reloaded, info = type(model).from_pretrained(
            checkpoint_dir, config=model.config, dtype=dtype, output_loading_info=True
        )
    except Exception as error:
        raise RuntimeError(
            f"{checkpoint_dir} stores {len(unsaved)} of {type(model).__name__}'s weights under other names (for "
            f"example {unsaved[0][0]!r}), which the Trainer's resume does not map back (transformers#43701), and "
            f"loading the checkpoint with `from_pretrained` to map them failed: {error}"
        ) from error
    tied = {name for names in names_of_tensor.values() if len(names) > 1 for name in names}
    missing = sorted(set(info["missing_keys"]) - tied - not_saved_on_purpose)
    if missing or info["mismatched_keys"]:
        raise RuntimeError(
            f"Could not restore {type(model).__name__} from {checkpoint_dir}: missing {missing[:3]}, mismatched "
            f"{sorted(info['mismatched_keys'])[:3]}. Resuming would train them from their initial values."
        )
    model.load_state_dict(reloaded.state_dict())
    logger.info(
        f"{checkpoint_dir} stores {len(unsaved)} weights under their legacy names, which `Trainer` does not "
        "map back (transformers#43701): loaded through `from_pretrained` instead."
    )
    return True


class RenamedWeightsMixin:
    """`Trainer` overrides that restore weights saved under legacy names (transformers#43701); see the module."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        if self.is_fsdp_enabled or not restore_renamed_weights(model, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled or not restore_renamed_weights(self.model, self.state.best_model_checkpoint):
            super()._load_best_model()
