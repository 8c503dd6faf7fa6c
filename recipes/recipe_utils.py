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
"""Helpers shared by the recipes: command-line parsing with `--config recipe.yaml` defaults."""

from collections.abc import Sequence

from transformers import HfArgumentParser


def parse_args_with_config(dataclass_types: Sequence[type], argv: list[str]) -> tuple:
    """
    Parse `argv` into `dataclass_types` with `HfArgumentParser`; `--config file.yaml` gives defaults that flags override.

    The YAML file is a flat mapping from argument names (any field of the dataclasses) to values. A key that no
    argument takes raises a `ValueError` naming it, so a typo in a recipe does not pass silently.
    """
    parser = HfArgumentParser(tuple(dataclass_types))
    argv = list(argv)
    config_path = None
    for index, arg in enumerate(argv):
        if arg == "--config":
            if index + 1 >= len(argv):
                raise ValueError("`--config` needs a path to a YAML file.")
            config_path = argv[index + 1]
            argv = argv[:index] + argv[index + 2 :]
            break
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
            argv = argv[:index] + argv[index + 1 :]
            break
    if config_path is not None:
        import yaml

        with open(config_path, encoding="utf-8") as reader:
            defaults = yaml.safe_load(reader) or {}
        if not isinstance(defaults, dict):
            raise ValueError(f"{config_path} must hold a mapping of argument names to values.")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise ValueError(f"{config_path} has keys no argument takes: {unknown}.")
        parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(argv)
