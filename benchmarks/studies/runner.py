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
The runner: each planned run is one subprocess of a recipe (1 torch thread, from the checkout `--code_dir`), resumed
from its last complete checkpoint when started again, and recorded once it has finished.
"""

import argparse
import concurrent.futures
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from hf_sam.checkpointing import last_complete_checkpoint
from hf_sam.scripts.utils import read_run_cost

from .plan import Run, plan
from .records import append_record, make_record, read_records
from .setups import recipe_argv
from .tables import STUDIES


def child_env(code_dir: Path) -> dict:
    """The environment of a recipe run: one thread, offline, hf_sam and the recipes from `code_dir`."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=str(code_dir) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def environment(code_dir: Path) -> dict:
    """Versions, machine and commit that a run's numbers belong to."""
    code = (
        "import json, platform, torch, transformers, accelerate, datasets, hf_sam;"
        "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__,"
        "'accelerate': accelerate.__version__, 'datasets': datasets.__version__, 'hf_sam': hf_sam.__version__,"
        "'hf_sam_path': hf_sam.__file__, 'python': platform.python_version(),"
        "'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))"
    )
    versions = json.loads(subprocess.check_output([sys.executable, "-c", code], env=child_env(code_dir), text=True))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=code_dir, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=code_dir, capture_output=True, text=True).stdout
    return versions | {
        "git_commit": commit + ("-dirty" if dirty.strip() else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or 'unknown CPU'}"
        + (f", {versions['gpu']}" if versions.get("gpu") else ""),
        "host": platform.node(),
    }


def command(run: Run, data_dir: str, extra_flags: str = "") -> str:
    """The command line that reproduces a run (its `--output_dir` left to the reader), `--extra_flags` included."""
    argv = [*recipe_argv(run, data_dir), *extra_flags.split()]
    return shlex.join(["python", f"recipes/{run.recipe}.py", *argv]) + " --output_dir runs/<name>"


def execute(run: Run, args: argparse.Namespace, env_info: dict) -> dict | None:
    """Run one recipe subprocess to the end (resuming its last checkpoint) and return its record, or None on failure."""
    work_dir = Path(args.work_dir).resolve()
    output_dir, log_path = work_dir / run.id.replace("/", "-"), work_dir / (run.id.replace("/", "-") + ".log")
    argv = [
        sys.executable,
        str(Path(args.code_dir) / "recipes" / f"{run.recipe}.py"),
        *recipe_argv(run, args.data_dir),
    ]
    argv += args.extra_flags.split() + ["--output_dir", str(output_dir)]
    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint is None:
        argv += ["--overwrite_output_dir"]  # what a run killed before its first checkpoint left behind
    # Otherwise the recipe resumes from `checkpoint`, the last complete one, by itself (the same command).
    work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
        log.flush()
        process = subprocess.Popen(argv, cwd=args.code_dir, env=child_env(Path(args.code_dir)), stdout=log, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        print(f"FAILED {run.id} (exit {process.returncode}); log: {log_path}", flush=True)
        return None
    all_results = json.loads((output_dir / "all_results.json").read_text())
    # The time of the attempts before this one, up to the checkpoint this one resumed from, as the recipe kept it in
    # its checkpoints (`run_cost.json`; `None`: resumed from a checkpoint older than that file, so unknown).
    cost = read_run_cost(output_dir)
    earlier_wall, earlier_cpu = (
        (0.0, 0.0) if checkpoint is None else (cost.get("earlier_wall_s"), cost.get("earlier_cpu_s"))
    )
    attempt_cpu = usage.ru_utime + usage.ru_stime
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    record = make_record(
        run.parameters(),
        env_info,
        command=command(run, args.data_dir, args.extra_flags),
        metrics={k: v for k, v in all_results.items() if isinstance(v, (int, float))},
        eval_history=[log for log in history if any(k.startswith("eval_") for k in log)],
        train_history=[log for log in history if "loss" in log],
        sharpness_history=[log for log in history if any(k.startswith("sharpness/") for k in log)],
        memorisation_history=[log for log in history if any(k.startswith("memorisation/") for k in log)],
        # The whole run's time: this attempt's process, plus the earlier attempts' up to the resumed checkpoint.
        wall_s=None if earlier_wall is None else earlier_wall + wall,
        cpu_s=None if earlier_cpu is None else earlier_cpu + attempt_cpu,
        attempt_wall_s=wall,
        attempt_cpu_s=attempt_cpu,
        attempts=1 if checkpoint is None else cost.get("attempts"),
        resumed_from=None if checkpoint is None else os.path.basename(checkpoint),
        torch_threads=1,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    shutil.rmtree(output_dir, ignore_errors=True)  # the numbers are kept; the weights (87 MiB a run) are not
    return record


def planned_runs(args: argparse.Namespace, results: dict) -> list[Run]:
    """The runs of `args.study` that the finished `results` allow now, restricted to the ids that the regular
    expression `args.only` matches somewhere (`re.search`: plain text matches the ids containing it)."""
    runs = [run for name in args.study for run in plan(STUDIES[name], args.seeds, results)]
    return [run for run in runs if re.search(args.only, run.id)]


def waiting(names: list[str], seeds: list[int], results: dict) -> list[str]:
    """A line for each study of `names` that plans nothing yet, saying what it waits for (a sweep of fixed rhos
    always plans; one whose rho is another study's choice, like `label-noise-more-sweep`, may not)."""
    return [f"{n}: nothing to plan {STUDIES[n].waits_for}" for n in names if not plan(STUDIES[n], seeds, results)]


def _execute_or_report(run: Run, args: argparse.Namespace, env_info: dict) -> dict | None:
    print(f"start {run.id}: {command(run, args.data_dir, args.extra_flags)}", flush=True)
    try:
        return execute(run, args, env_info)
    except Exception:  # one broken run must not stop the others (nor lose their records)
        print(f"FAILED {run.id}:\n{traceback.format_exc()}", flush=True)
        return None


def run_studies(args: argparse.Namespace) -> None:
    """
    Run every planned run of `args.study` that `--results` does not hold, `--workers` at a time, appending each
    record to the first file of `--results`. The plan is redone each time a run ends, so the runs that depend on a
    sweep (the grid at the chosen rho) start as soon as the sweep is complete, while the runs that do not (AdamW,
    other studies) keep the workers busy meanwhile.
    """
    results_path, results = Path(args.results[0]), read_records(*args.results)
    env_info = environment(Path(args.code_dir))
    started, failed = set(), set()
    planned = planned_runs(args, results)
    print(f"{len(planned)} runs planned now, {sum(r.id in results for r in planned)} done", flush=True)
    for line in waiting(args.study, args.seeds, results):
        print(line, flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as pool:
        running = {}
        while True:
            todo = [
                run for run in planned_runs(args, results) if run.id not in results and run.id not in started | failed
            ]
            for run in todo[: args.workers - len(running)]:
                started.add(run.id)
                running[pool.submit(_execute_or_report, run, args, env_info)] = run
            if not running:
                break
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                run, record = running.pop(future), future.result()
                if record is None:
                    failed.add(run.id)
                    continue
                append_record(results_path, record)
                results[run.id] = record
                took = "unknown time" if record["wall_s"] is None else f"{record['wall_s']:.0f} s"
                print(f"done {run.id}: {took}, {record['metrics']}", flush=True)
    print(f"finished: {len(results)} runs in {results_path}; failed: {sorted(failed) or 'none'}", flush=True)
