"""
SAM steps on a model sharded with FSDP2's `fully_shard`, in each process of a `torchrun` launch (CPU, gloo), for
tests/test_distributed.py and tests/test_scale_out.py. Accelerate does not shard on the CPU, so the model is sharded
by hand (`--mesh fsdp`: a 1-D mesh over all processes; `--mesh hsdp`: 2 replicas x the rest, a 2-D replicate x shard
mesh) and the Trainer's accumulation loop is written out: each micro-batch of 8 // world_size examples goes through
`SAMTrainer.training_step` with `sync_gradients` set at the last one and, before it, FSDP2's gradient sync off (what
Accelerate's `no_sync` does under FSDP2), then a plain SGD step (lr 0.1). Every case of `--cases` (see `CASES`) runs
in the same launch; rank 0 saves, per case, the full final parameters, whether each process's shards were restored
bitwise after every SAM step, whether the replicas (processes holding the same shards) ended bitwise equal and
whether FSDP2 ever held an unsharded gradient between micro-batches.
"""

import argparse
import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from hf_sam import SAMConfig, SAMTrainer
from tests.testing_utils import TinyDataset, launch_layout, tiny_args, tiny_model


GLOBAL_MICRO_BATCH = 8
CASES = {
    "sam": dict(method="sam", rho=0.1),
    "fsam": dict(method="fsam", rho=0.1, fsam_sigma=0.7, fsam_lambda=0.6),
    "vasso": dict(method="vasso", rho=0.1, vasso_theta=0.6),
    "asam": dict(method="sam", rho=0.5, adaptive=True, adaptive_eta=0.1),
    "rho0": dict(method="sam", rho=0.0),
    "sam_bf16": dict(method="sam", rho=0.1),  # FSDP2's MixedPrecisionPolicy: bf16 compute, fp32 shards and reduction
    "looksam": dict(method="looksam", rho=0.1, looksam_k=2, looksam_alpha=0.7),
    "gsam": dict(method="gsam", rho=0.1, gsam_alpha=0.3, rho_min=0.05),
    "aesam": dict(method="aesam", rho=0.1, aesam_delta=0.5, aesam_lambda1=-0.5, aesam_lambda2=1.5),
}


@contextlib.contextmanager
def fsdp2_no_sync(model):
    """Accelerate's `no_sync` under FSDP2 (`Accelerator.no_sync`): no gradient reduction for this micro-batch."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def holds_unsharded_gradient(model) -> bool:
    """Whether FSDP2 keeps an unsharded gradient (what its `no_sync` accumulates) of some parameter of `model`."""
    from torch.distributed.fsdp import FSDPModule

    groups = [g for m in model.modules() if isinstance(m, FSDPModule) for g in m._get_fsdp_state()._fsdp_param_groups]
    params = [param for group in groups for param in group.fsdp_params]
    return any(
        p.unsharded_accumulated_grad is not None
        or getattr(p, "_unsharded_param", None) is not None
        and p._unsharded_param.grad is not None
        for p in params
    )


def run_case(name: str, mesh, grad_accum: int, steps: int, output_dir: str) -> dict:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = tiny_model()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in (model.fc1, model.fc2, model):
        fully_shard(module, mesh=mesh, **({"mp_policy": policy} if name.endswith("_bf16") else {}))
    trainer = SAMTrainer(
        model=model,
        args=tiny_args(os.path.join(output_dir, name), gradient_accumulation_steps=grad_accum, max_steps=steps),
        train_dataset=TinyDataset(),
        sam_config=SAMConfig(**CASES[name]),
    )
    trainer.current_gradient_accumulation_steps = grad_accum
    trainer.state.max_steps = steps
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    per_process = GLOBAL_MICRO_BATCH // world_size
    batches = TinyDataset().batches(GLOBAL_MICRO_BATCH)
    restored, unsharded_kept = True, False
    for step in range(steps):
        before = [p.to_local().clone() for p in model.parameters()]
        for micro in range(grad_accum):
            batch = batches[step * grad_accum + micro]
            shard = {key: value[rank * per_process : (rank + 1) * per_process] for key, value in batch.items()}
            last = micro == grad_accum - 1
            trainer.accelerator.gradient_state._set_sync_gradients(last)
            with contextlib.nullcontext() if last else fsdp2_no_sync(model):
                trainer.training_step(model, shard)
            unsharded_kept |= holds_unsharded_gradient(model)
        restored &= all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainer.state.global_step = step + 1

    # Replicas: the processes at the same coordinate of the shard dimension hold the same shards.
    shard_index = mesh.get_local_rank(mesh.ndim - 1)
    local = torch.cat([p.to_local().detach().reshape(-1) for p in model.parameters()])
    gathered = [None] * world_size
    dist.all_gather_object(gathered, (shard_index, local))
    replicas_equal = all(torch.equal(t, local_t) for i, t in gathered for j, local_t in gathered if i == j)
    return {
        "params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
        "restored_bitwise": restored,
        "replicas_bitwise_equal": replicas_equal,
        "unsharded_gradient_kept": unsharded_kept,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="sam", help="comma-separated names of `CASES`")
    parser.add_argument("--mesh", default="fsdp", choices=["fsdp", "hsdp"])
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world_size = dist.get_world_size()
    if args.mesh == "hsdp":
        mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("shard",))
    results = {
        name: run_case(name, mesh, args.grad_accum, args.steps, args.output_dir) for name in args.cases.split(",")
    }
    layout = launch_layout()
    if dist.get_rank() == 0:
        torch.save({"cases": results, "world_size": world_size, "layout": layout}, args.result)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's gloo teardown, which can hang at exit on these machines


if __name__ == "__main__":
    main()
