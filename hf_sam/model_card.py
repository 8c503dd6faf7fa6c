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
"""The "Trained with hf_sam" section that `SAMTrainer.create_model_card` adds to a model card, with the papers."""

import json
import os

from .sam_config import SAMConfig
from .variants import SAMVariant, method_class


MODEL_CARD_START = "<!-- hf_sam: start -->"
MODEL_CARD_END = "<!-- hf_sam: end -->"
# The papers of the scalings every method composes with (`adaptive`, `normalize=False`); a method's own paper is
# declared by its class (`hf_sam.variants`).
SCALING_PAPERS = {
    "ASAM": ("Kwon et al., 2021", "https://huggingface.co/papers/2102.11600"),
    "USAM": ("Dai, Ahn & Sra, 2023", "https://huggingface.co/papers/2305.15287"),
}


def model_card_tags(tags: str | list[str] | None, config: SAMConfig) -> list[str]:
    """`tags` (as `create_model_card` takes them) plus `hf_sam` and the method."""
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    return tags + [tag for tag in ("hf_sam", config.method) if tag not in tags]


def model_card_section(config: SAMConfig) -> str:
    """The section: the method(s) with their papers, `rho`, and the whole `SAMConfig` as JSON."""
    cls = method_class(config.method)
    papers = {cls.display_name: cls.paper}
    papers.update(
        {
            name: SCALING_PAPERS[name]
            for name, used in [("ASAM", config.adaptive), ("USAM", not config.normalize)]
            if used
        }
    )
    if len(papers) > 1 and cls is SAMVariant:
        del papers[cls.display_name]  # "ASAM", not "SAM + ASAM"
    method = " + ".join(f"{name} ([{cite}]({link}))" for name, (cite, link) in papers.items())
    interval = f", `interval={config.interval}`" if config.interval != 1 else ""
    return (
        f"{MODEL_CARD_START}\n## Trained with hf_sam\n\nThis model was trained with {method} through "
        f"[hf_sam](https://github.com/hf-sam/hf_sam) (`method={config.method!r}`, `rho={config.rho}`{interval}): "
        "its sharpness-aware steps apply the gradient taken at weights perturbed towards higher loss (radius "
        "`rho`). The `SAMConfig` (`sam_config.json`):\n\n"
        f"```json\n{json.dumps(config.to_dict(), indent=2, sort_keys=True)}\n```\n{MODEL_CARD_END}"
    )


def add_model_card_section(path: str | os.PathLike, config: SAMConfig) -> None:
    """Append the section to the model card at `path` (replacing the one an earlier call wrote); no-op without a card."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as reader:
        card = reader.read()
    start = card.find(MODEL_CARD_START)
    if start != -1:
        end = card.find(MODEL_CARD_END, start)
        card = card[:start] + (card[end + len(MODEL_CARD_END) :] if end != -1 else "")
    with open(path, "w", encoding="utf-8") as writer:
        writer.write(card.rstrip("\n") + "\n\n" + model_card_section(config) + "\n")
