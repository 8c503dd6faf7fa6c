"""
SAM steps on a model sharded with FSDP2's `fully_shard`, in each process of a `torchrun --nproc_per_node 2` launch
(CPU, gloo), for tests/test_distributed.py. Accelerate does not shard on the CPU, so the model is sharded by hand and
`SAMTrainer.training_step` is driven directly, followed by a plain SGD step; rank 0 saves the full final parameters.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from hf_sam import SAMConfig, SAMTrainer
from tests.testing_utils import TinyDataset, params_of, tiny_args, tiny_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="sam")
    parser.add_argument("--adaptive", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()

    model = tiny_model()
    fully_shard(model.fc1)
    fully_shard(model.fc2)
    fully_shard(model)
    sam_config = SAMConfig(method=args.method, rho=0.5 if args.adaptive else 0.1, adaptive=args.adaptive,
                           adaptive_eta=0.1, fsam_sigma=0.7, fsam_lambda=0.6, vasso_theta=0.6)  # fmt: skip
    trainer = SAMTrainer(
        model=model, args=tiny_args(args.output_dir), train_dataset=TinyDataset(), sam_config=sam_config
    )
    trainer.current_gradient_accumulation_steps = 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    restored = True
    for step, batch in enumerate(TinyDataset().batches(8)[: args.steps]):
        shard = {key: value[rank * 4 : (rank + 1) * 4] for key, value in batch.items()}
        before = params_of(model)
        trainer.training_step(model, shard)
        restored &= all(torch.equal(p.to_local(), before[n].to_local()) for n, p in model.named_parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainer.state.global_step = step + 1

    full = {name: p.full_tensor() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save({"params": full, "restored_bitwise": restored, "world_size": world_size}, args.result)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's gloo teardown, which can hang at exit on these machines


if __name__ == "__main__":
    main()
