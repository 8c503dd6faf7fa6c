"""
Tiny BERT runs in each process of a `torchrun --nproc_per_node 2` launch (CPU, gloo), for tests/test_distributed.py:
for every case of `NONFINITE_CASES` and both `perturbation_sync` modes, a run whose step 0 has an inf pass-1 loss on
rank 1 only (a NaN gradient and norm there) and its reference run (`UnperturbedFirstStepSAMTrainer`).

Rank 0 saves, per `(case, sync)`: both runs' final parameters, whether every rank ended with bitwise the same ones,
and the poisoned run's log history, to `--result`.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

from hf_sam import SAMConfig
from hf_sam.variants import METHODS
from tests.testing_utils import (
    NONFINITE_CASES,
    SequentialSAMTrainer,
    TinyTextDataset,
    UnperturbedFirstStepSAMTrainer,
    params_of,
    poison_training_forwards,
    text_args,
    tiny_bert,
)


POISONED_RANK = 1


def ranks_bitwise_equal(params: dict[str, torch.Tensor]) -> bool:
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    # NaN != NaN: compare the bytes, so that equal NaN weights still count as equal (and fail on finiteness).
    return all(torch.equal(g.view(torch.int32), gathered[0].view(torch.int32)) for g in gathered)


def main():
    dist.init_process_group("gloo")
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    results = {}
    for case, options in NONFINITE_CASES.items():
        for sync in ("global", "local"):
            if sync == "local" and "local_sync" in METHODS[options["method"]].unsupported:
                continue  # refused by SAMConfig (LookSAM, GSAM and AE-SAM need the global gradient)
            sam_config = SAMConfig(rho=0.1, perturbation_sync=sync, **options)
            runs = {}
            for name, trainer_class in [
                ("poisoned", SequentialSAMTrainer),
                ("reference", UnperturbedFirstStepSAMTrainer),
            ]:
                model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
                if name == "poisoned" and dist.get_rank() == POISONED_RANK:
                    poison_training_forwards(model, {0})
                trainer = trainer_class(
                    model=model,
                    args=text_args(os.path.join(args.output_dir, f"{case}-{sync}-{name}"), max_steps=4),
                    train_dataset=TinyTextDataset(),
                    sam_config=sam_config,
                )
                assert trainer.accelerator.num_processes == dist.get_world_size() > 1, "not a multi-process run"
                trainer.train()
                params = params_of(model)
                runs[name] = {
                    "params": params,
                    "ranks_bitwise_equal": ranks_bitwise_equal(params),
                    "log_history": trainer.state.log_history,
                }
            results[(case, sync)] = runs
    if dist.get_rank() == 0:
        torch.save(results, args.result)
    # As in ddp_worker.py: leave without the interpreter's teardown of DDP and gloo objects.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
