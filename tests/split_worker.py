"""
Training runs for tests/test_split_invariance.py: one global batch of 8 split as 1 x 8, 1 x 4 x accumulation 2,
2 processes x 4 or 2 processes x 2 x accumulation 2. Run in-process (`train_split`) or under `torchrun` (`main`).
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from hf_sam import SAMConfig
from tests.testing_utils import SequentialSAMTrainer, TinyTextDataset, params_of, tiny_args, tiny_bert, tiny_llama


GLOBAL_BATCH, STEPS = 8, 2
CONFIGS = {
    "sam": SAMConfig(rho=0.1),
    "usam": SAMConfig(rho=0.5, normalize=False),
    "fsam": SAMConfig(method="fsam", rho=0.1, fsam_sigma=0.7, fsam_lambda=0.6),
    "vasso": SAMConfig(method="vasso", rho=0.1, vasso_theta=0.6),
    "gsam": SAMConfig(method="gsam", rho=0.1, gsam_alpha=0.3),
    "aesam": SAMConfig(method="aesam", rho=0.1, aesam_delta=0.5, aesam_lambda1=-0.5, aesam_lambda2=1.5),
    "rho0": SAMConfig(rho=0.0),
}


class CausalTextDataset(TinyTextDataset):
    """Right-padded token sequences of different lengths; `labels` are the tokens, -100 on padding."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return item | {"labels": item["input_ids"].masked_fill(item["attention_mask"] == 0, -100)}


def tiny_model(kind: str):
    """A tiny BERT classifier or Llama causal LM, built from a config with dropout off (splits draw no other masks)."""
    if kind == "bert":
        return tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tiny_llama(vocab_size=64)


def dataset(kind: str) -> Dataset:
    n = GLOBAL_BATCH * STEPS
    return TinyTextDataset(n=n) if kind == "bert" else CausalTextDataset(n=n)


def train_split(kind: str, config: str | SAMConfig, per_device: int, grad_accum: int, output_dir: str) -> dict:
    """SGD (lr 0.1, fp32) for `STEPS` global batches of 8, in order, with `CONFIGS[config]` (or a `SAMConfig`)."""
    model = tiny_model(kind)
    trainer = SequentialSAMTrainer(
        model=model,
        args=tiny_args(
            output_dir,
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=grad_accum,
            max_steps=STEPS,
            logging_steps=1,
        ),
        train_dataset=dataset(kind),
        sam_config=CONFIGS[config] if isinstance(config, str) else config,
    )
    trainer.train()
    return {"params": params_of(model), "log_history": trainer.state.log_history}


def main():
    dist.init_process_group("gloo")
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", required=True)
    parser.add_argument("--per_device", type=int, required=True)
    parser.add_argument("--grad_accum", type=int, required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    results = {
        name: train_split(args.kind, name, args.per_device, args.grad_accum, os.path.join(args.output_dir, name))
        for name in CONFIGS
    }
    if dist.get_rank() == 0:
        torch.save(results, args.result)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/ddp_worker.py: gloo teardown at exit sometimes aborts on these machines


if __name__ == "__main__":
    main()
