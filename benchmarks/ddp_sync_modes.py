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
Step time of `perturbation_sync="local"` against `"global"` (and plain training) under DDP, measured side by side.

Run on 2 CPU processes (gloo):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/ddp_sync_modes.py

Every repetition runs one optimizer step of each mode on the same batch, in rotating order, on the same DDP-wrapped
small BERT (built from a config); the step time is the slowest process's, between barriers. Prints medians and ratios.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from hf_sam import SAMConfig, SAMTrainer


MODES = {
    "plain": SAMConfig(rho=0.0),
    "global": SAMConfig(rho=0.05, perturbation_sync="global"),
    "local": SAMConfig(rho=0.05, perturbation_sync="local"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=16, help="per process")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        intermediate_size=4 * args.hidden_size,
        max_position_embeddings=args.seq_len,
    )
    model = BertForSequenceClassification(config)
    trainer = SAMTrainer(
        model=model,
        args=TrainingArguments(output_dir="/tmp/hf_sam_bench", use_cpu=True, report_to="none", max_steps=1),
        sam_config=MODES["global"],
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    ddp_model, optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.current_gradient_accumulation_steps = 1
    generator = torch.Generator().manual_seed(rank)
    batch = {
        "input_ids": torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator),
        "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (args.batch_size,), generator=generator),
    }

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    names = list(MODES)
    for repeat in range(args.warmup + args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for mode in order:
            trainer.sam_config = MODES[mode]
            dist.barrier()
            start = time.perf_counter()
            trainer.training_step(ddp_model, batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if repeat >= args.warmup:
                times[mode].append(elapsed.item())

    if rank == 0:
        median = {mode: statistics.median(values) for mode, values in times.items()}
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{world_size} processes (gloo, CPU, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), BERT "
            f"{args.layers}x{args.hidden_size} ({params / 1e6:.1f}M params), batch {args.batch_size}x{args.seq_len} "
            f"per process, {args.repeats} repeats after {args.warmup} warm-up, medians:"
        )
        for mode in MODES:
            print(f"  {mode:>6}: {median[mode] * 1e3:8.1f} ms/step")
        print(f"  global / plain = {median['global'] / median['plain']:.3f}")
        print(f"  local  / plain = {median['local'] / median['plain']:.3f}")
        print(f"  local  / global = {median['local'] / median['global']:.3f}")
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's gloo teardown, which can hang at exit on CPU


if __name__ == "__main__":
    main()
