"""
The sharpness diagnostics in each process of a `torchrun --nproc_per_node 2` launch (CPU, gloo), for
tests/test_distributed.py: every process passes the same batches; rank 0 saves the six results.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

from tests.sharpness_cases import run_diagnostics


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    results = run_diagnostics()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        torch.save({"results": results, "ranks_equal": all(g == gathered[0] for g in gathered)}, args.result)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's gloo teardown, which can hang at exit on these machines


if __name__ == "__main__":
    main()
