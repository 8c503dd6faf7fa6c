"""
One SAMTrainer run in each process of a `torchrun --nproc_per_node N` launch (CPU, gloo), for tests/test_distributed.py.

Rank 0 saves the final parameters and whether every rank ended with bitwise the same ones to `--result`.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

from hf_sam import SAMConfig
from tests.testing_utils import PoisonedClassifier, SequentialSAMTrainer, TinyDataset, launch_layout, tiny_args


def main():
    dist.init_process_group("gloo")  # before the model is built, so a rank can depend on its index
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="sam")
    parser.add_argument("--sync", default="global")
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume", default=None, help="a checkpoint, or `latest`: the newest complete one")
    parser.add_argument("--poison_rank", type=int, default=None, help="make this rank's first pass-1 loss inf")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    poisoned = {0} if args.poison_rank == dist.get_rank() else set()
    model = PoisonedClassifier(poisoned_calls=poisoned)  # the same initial weights as tiny_model()
    save = {"save_strategy": "steps", "save_steps": args.save_steps} if args.save_steps else {}
    trainer = SequentialSAMTrainer(
        model=model,
        args=tiny_args(
            args.output_dir,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            max_steps=args.max_steps,
            **save,
        ),
        train_dataset=TinyDataset(),
        sam_config=SAMConfig(
            method=args.method,
            rho=0.1,
            fsam_sigma=0.7,
            fsam_lambda=0.6,
            vasso_theta=0.6,
            gsam_alpha=0.3,
            rho_min=0.05,
            perturbation_sync=args.sync,
        ),
    )
    assert trainer.accelerator.num_processes == dist.get_world_size() > 1, "not a multi-process run"
    trainer.train(resume_from_checkpoint=True if args.resume == "latest" else args.resume)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    layout = launch_layout()
    if dist.get_rank() == 0:
        torch.save(
            {
                "params": {name: p.detach().clone() for name, p in model.named_parameters()},
                "ranks_bitwise_equal": all(torch.equal(g, gathered[0]) for g in gathered),
                "log_history": trainer.state.log_history,
                "layout": layout,
            },
            args.result,
        )
    # Leave without the interpreter's teardown: freeing DDP and gloo objects at exit sometimes aborts ("terminate
    # called without an active exception") or hangs on these CPU machines, after all the work is done and saved.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
