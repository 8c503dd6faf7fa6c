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
"""The command line of the study runner: `python -m benchmarks.studies --help`."""

import argparse
import json
import os
import re
from pathlib import Path

from . import __doc__ as PACKAGE_DOC
from .records import read_records
from .report import report, update_generated_blocks
from .report_label_noise import plot_memorisation, readme_block
from .runner import command, planned_runs, run_studies
from .tables import STUDIES


HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.studies",
        description=PACKAGE_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--study", nargs="+", default=["glue-sweep"], choices=list(STUDIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=1, help="Runs at once, each a 1-thread process.")
    parser.add_argument("--data_dir", default=os.environ.get("HF_SAM_DATA_DIR", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--code_dir", default=str(REPO), help="Checkout whose recipes and hf_sam the runs use.")
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "study"), help="Scratch outputs and logs.")
    parser.add_argument(
        "--results",
        nargs="+",
        default=[str(RESULTS / name) for name in ("study_cpu.jsonl", "study_gpu.jsonl")],
        help="JSON-lines files of finished runs: all are read (a run in any of them is done), new runs are appended "
        "to the first. The default keeps the CPU runs and the GPU runs apart.",
    )
    parser.add_argument(
        "--extra_flags", default="", help="Recipe flags added to every run (smoke tests: '--max_train_samples 64')."
    )
    parser.add_argument(
        "--only",
        default="",
        help="Run only the planned runs whose id this regular expression matches somewhere (plain text: the ids "
        "containing it), e.g. '/rte/' or '^(?!glue/rte/)' (all but the RTE grid).",
    )
    parser.add_argument("--dry_run", action="store_true", help="Print the planned commands and exit.")
    parser.add_argument("--report", action="store_true", help="Rewrite --markdown from --results; run nothing.")
    parser.add_argument("--markdown", default=str(RESULTS / "results.md"))
    parser.add_argument(
        "--readme",
        default=str(REPO / "README.md"),
        help="With --report: the markdown file whose generated blocks (`<!-- begin generated: NAME -->`) are rewritten.",
    )
    parser.add_argument(
        "--export_states",
        default=None,
        help="Write each finished run's log history as DIR/<run id>/trainer_state.json (for `python -m hf_sam.plot`); "
        "runs nothing.",
    )
    args = parser.parse_args(argv)
    try:
        re.compile(args.only)
    except re.error as error:
        parser.error(f"--only: {args.only!r} is not a regular expression ({error})")
    args.data_dir, args.code_dir = os.path.abspath(args.data_dir), os.path.abspath(args.code_dir)
    return args


def export_states(records: dict[str, dict], states_dir: Path) -> None:
    """Each record's histories as one `trainer_state.json` log history in step order, as the Trainer writes it."""
    for run_id, record in records.items():
        history = [
            log for key in ("train_history", "eval_history", "sharpness_history") for log in record.get(key, [])
        ]
        history.sort(key=lambda log: (log.get("step", 0), "loss" not in log))
        state_dir = states_dir / run_id.replace("/", "-")
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "trainer_state.json").write_text(json.dumps({"log_history": history}, indent=1))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    Path(args.results[0]).parent.mkdir(parents=True, exist_ok=True)
    if args.report:
        paths = " ".join(os.path.relpath(path, REPO) if Path(path).is_absolute() else path for path in args.results)
        results = read_records(*args.results)
        Path(args.markdown).write_text(report(results, args.data_dir, paths), encoding="utf-8")
        plot_memorisation(results, REPO / "docs" / "label_noise.png")  # once the label-noise study has runs
        update_generated_blocks(args.readme, {"label-noise": readme_block(results)})
    elif args.export_states:
        export_states(read_records(*args.results), Path(args.export_states))
    elif args.dry_run:
        results = read_records(*args.results)
        for run in planned_runs(args, results):
            done = "done  " if run.id in results else "to do "
            print(done + run.id + ": " + command(run, args.data_dir, args.extra_flags))
    else:
        run_studies(args)
