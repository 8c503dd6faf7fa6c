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
The studies behind `results/results.md`: AdamW vs SAM vs F-SAM (and the cheaper schedules) with the recipes of
`recipes/`, planned from tables, run as resumable subprocesses, recorded as JSON lines and reported in markdown.

    nohup nice -n 10 python -m benchmarks.studies --study glue-sweep glue glue-cheap --workers 2 > study.log 2>&1 &
    python -m benchmarks.studies --study glue --only /rte/ --dry_run    # what is planned, done and still to do
    python -m benchmarks.studies --report       # rewrite results/results.md from the records; runs nothing

Every run is one subprocess of a recipe (`python recipes/run_glue.py ...`, 1 torch thread) with its exact command
recorded; `--workers N` runs N at once. A finished run is appended as one JSON line to the first file of `--results`
(its parameters as fields, the command, versions, machine, commit, time, metrics, histories) and is skipped next time.
Runs save a checkpoint every epoch: stop the runner at any moment (kill its process group) and start it again with
the same flags, and unfinished runs resume from their last complete checkpoint. `--code_dir` runs the recipes and
hf_sam from another checkout (e.g. a `git worktree` of a fixed commit), so the repository can change while a study
runs; each record names the commit it ran.

The modules, one responsibility each: `setups` (the recipe set-ups and the arguments of one run), `plan` (what a study
is, the runs it plans, the choice rules), `tables` (the studies), `records` (the one record schema, read and
written), `runner` (subprocesses, resume), `stats` (scipy.stats), `report`, `report_grid`, `report_sharpness`,
`report_flatness`, `report_rho`, `report_low_data` and `report_label_noise` (the markdown), `cli`. `device_bundle.py`
and `study_on_gpu.sh` run the studies on a GPU machine without network.

Adding a study is one entry in `tables.STUDIES`, plus at most a choice rule. For example, training with label noise,
rho chosen on the held-out split of the CIFAR-10 subset, then three seeds on the test set at the chosen rho:

    NOISY_SWEEP = Study(
        "label-noise-sweep", "run_image_classification", tasks=("cifar10",), seeds=(0,), held_out=True,
        label_noise=0.4, extra_flags=("--label_noise_seed", "{seed}"),
        arms=sweep_arms((0.05, 0.1, 0.02), {"SAM": (0.02, 0.05, 0.1)}),
    )
    NOISY_RHO = best_rho(NOISY_SWEEP, "SAM")  # a choice rule: records -> the chosen rho, or None until complete
    NOISY = Study(
        "label-noise", "run_image_classification", tasks=("cifar10",), label_noise=0.4,
        extra_flags=("--label_noise_seed", "{seed}"), arms=(Arm("AdamW"), Arm("SAM", NOISY_RHO)),
    )

and both added to `STUDIES`. `label_noise` and `train_samples` (`--max_train_samples`, e.g. `train_samples=1000,
extra_flags=("--train_subset_seed", "{seed}")` for scarce GLUE data) become both recipe flags and record fields; a
parameter that tells the runs of one task, method and seed apart goes into `id_params` (e.g. `("rho",
"label_noise")`). A rule of another kind (the learning rate, see `best_learning_rate`) is a function of the finished
records returning the chosen value, or `None` while it cannot choose yet: the arms that use it wait until then. The
report reads the new records' fields; a new table of its own is a function in `report*.py`.
"""
