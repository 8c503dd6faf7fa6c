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
  `from_pretrained` (`hf_sam.checkpointing.restore_renamed_weights`); a checkpoint whose names match, and every
  sharded (FSDP) model, keeps the Trainer's own loading, so on versions without the bug nothing changes.
"""

from .checkpointing import restore_renamed_weights


class RenamedWeightsMixin:
    """`Trainer` overrides that restore weights saved under legacy names (transformers#43701); see the module."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        if self.is_fsdp_enabled or not restore_renamed_weights(model, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled or not restore_renamed_weights(self.model, self.state.best_model_checkpoint):
            super()._load_best_model()
