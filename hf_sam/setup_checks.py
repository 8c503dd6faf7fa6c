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
"""The training set-ups where a two-pass SAM step cannot be exact, refused before training starts."""

from .sam_config import SAMConfig
from .variants import method_class


def check_trainer_setup(trainer, config: SAMConfig) -> None:
    """Refuse DeepSpeed, (Ada)LOMO, FSDP1, context and tensor parallelism; check FSDP2's limits. `trainer` is a `transformers.Trainer`."""
    if config.rho == 0:
        return
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise ValueError(
            "SAMTrainer does not support DeepSpeed: Accelerate's DeepSpeed engine steps the optimizer inside "
            "`backward`, so the first SAM pass would already update the weights. For a model that needs ZeRO-3-like "
            "sharding use FSDP2 (`fsdp_version: 2` in the Accelerate config; HSDP across nodes with "
            "`parallelism_config_dp_replicate_size`), or DDP, or set `rho=0`."
        )
    if str(trainer.args.optim).lower().endswith("lomo"):
        raise ValueError(
            f"SAMTrainer does not support `optim={trainer.args.optim}`: (Ada)LOMO fuses the update into `backward`, "
            "so the first SAM pass would already update the weights. Pick an optimizer that steps after backward "
            "(e.g. `adamw_torch`)."
        )
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    if parallelism is not None and getattr(parallelism, "cp_enabled", False):
        raise ValueError(
            "SAMTrainer does not support context parallelism: the Trainer shards each batch's sequences in place "
            "before the first pass, so the second pass would see them sharded twice. Disable `cp_size` or set `rho=0`."
        )
    if parallelism is not None and getattr(parallelism, "tp_enabled", False):
        raise ValueError(
            "SAMTrainer does not support tensor parallelism (`tp_size` > 1): a tensor-parallel model mixes sharded "
            "and replicated parameters, whose norms would need a different group each. Use FSDP2 or HSDP "
            "(`dp_shard_size`, `dp_replicate_size`) instead, or set `rho=0`."
        )
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        if getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "SAMTrainer supports FSDP2 only (`fsdp_version: 2` in the Accelerate config, or `fsdp_config="
                '{"fsdp_version": 2}`): FSDP1 flattens parameters, so the perturbation cannot be applied to them.'
            )
        check_sharded_setup(config)
    method = method_class(config.method)
    if "accumulation" in method.unsupported and trainer.args.gradient_accumulation_steps > 1:
        raise ValueError(
            f"`gradient_accumulation_steps` must be 1 with `method={config.method!r}`: "
            f"{method.unsupported['accumulation']}, got {trainer.args.gradient_accumulation_steps}."
        )


def check_sharded_setup(config: SAMConfig) -> None:
    """
    What a two-pass step under FSDP2 or HSDP (parameters sharded over processes) cannot do. Gradient accumulation and
    2-D (replicate x shard) meshes are supported: see `hf_sam.distributed.sharded_gradient_sync`.
    """
    if config.perturbation_sync == "local":
        raise ValueError(
            "`perturbation_sync` must be 'global' under FSDP: the weights are sharded over the processes, so "
            "they cannot take a different perturbation on each one, got 'local'."
        )
    method = method_class(config.method)
    if "fsdp" in method.unsupported:
        raise ValueError(f"`method={config.method!r}` is not supported under FSDP: {method.unsupported['fsdp']}.")
