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
What the recipes of `recipes/` share, importable by the recipes, the tests and the benchmarks (as `trl.scripts`):

- `hf_sam.scripts.utils`: the command-line parser (`--config recipe.yaml`), logging, output-directory and checkpoint
  handling, and the train-and-evaluate tail of every recipe;
- `hf_sam.scripts.glue`: GLUE task metadata, the original GLUE TSV files, label checks and the GLUE metrics
  (scikit-learn and scipy: `pip install hf_sam[examples]`);
- `hf_sam.scripts.image`: image columns, the image processor's geometry, torch-only transforms and the image check.

Nothing here is imported by `import hf_sam`.
"""
