r"""
Check a distributed set-up of `SAMTrainer` against one process on a tiny model, and count its communication.

Launch it the way the real run will be launched (same nodes, GPUs, backend), e.g.

    torchrun --nproc_per_node 8 benchmarks/check_distributed.py --mesh fsdp --grad_accum 2
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HOST:29500 \
        benchmarks/check_distributed.py --mesh hsdp --replicas 2 --grad_accum 2 --method fsam
    torchrun --nproc_per_node 2 benchmarks/check_distributed.py --mesh ddp      # CPU (gloo) works too

Every process builds the same tiny MLP (fp32), shards it with FSDP2's `fully_shard` (`--mesh fsdp`: one 1-D mesh;
`--mesh hsdp`: `--replicas` x the rest, replicate x shard) or wraps it in DDP (`--mesh ddp`), and runs `--steps`
optimizer steps of `SAMTrainer.training_step` as `Trainer` drives it: `--grad_accum` micro-batches per step, the
gradient sync off before the last one (Accelerate's `no_sync`), then SGD. Each process also runs the same steps on
an unsharded copy over the whole global batch, alone (the single-process result). Rank 0 prints the largest
difference (PASS when <= `--tolerance`), whether the replicas ended bitwise equal, and the collectives per optimizer
step of the SAM run and of the same run at `rho=0` (plain training): calls and volume in units of one full fp32
gradient of the model. Exit status 1 on FAIL.
"""

import argparse
import contextlib
import os
import sys
import tempfile
from collections import Counter

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from transformers import TrainingArguments


IN, HIDDEN, CLASSES, GLOBAL_MICRO_BATCH = 16, 32, 4, 16


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, CLASSES)

    def forward(self, x, labels):
        logits = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class CollectiveCounter:
    """Counts the `torch.distributed` collectives FSDP2 and hf_sam call (and DDP's bucket all-reduces, via a hook)."""

    NAMES = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor",
             "all_reduce", "broadcast")  # fmt: skip

    def __init__(self):
        self.calls, self.bytes, self.active = Counter(), Counter(), False
        for name in self.NAMES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, function):
        def counted(*args, **kwargs):
            if self.active:
                tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
                self.record(name, max((t.numel() * t.element_size() for t in tensors), default=0))
            return function(*args, **kwargs)

        return counted

    def record(self, name, size):
        self.calls[name] += 1
        self.bytes[name] += size

    def ddp_hook(self):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            active, self.active = self.active, False  # the bucket counted once, whatever the hook calls
            if active:
                self.record("all_reduce", bucket.buffer().numel() * bucket.buffer().element_size())
            try:
                return allreduce_hook(state, bucket)
            finally:
                self.active = active

        return hook


def build(mesh_kind, mesh, device, counter):
    torch.manual_seed(0)
    model = TinyMLP().to(device)
    if mesh_kind == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
        model.register_comm_hook(None, counter.ddp_hook())
        return model
    from torch.distributed.fsdp import fully_shard

    for module in (model.fc1, model.fc2, model.fc3, model):
        fully_shard(module, mesh=mesh)
    return model


@contextlib.contextmanager
def trainer_no_sync(model, mesh_kind):
    """What the Trainer's `accelerator.no_sync(model)` does before the last micro-batch."""
    if mesh_kind == "ddp":
        with model.no_sync():
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def train(model, sam_config, batches, args, *, distributed, mesh_kind, counter=None):
    """`args.steps` steps of `SAMTrainer.training_step` + SGD; returns the full parameters."""
    from hf_sam import SAMTrainer

    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    per_process = GLOBAL_MICRO_BATCH // world
    training_args = TrainingArguments(
        tempfile.mkdtemp(), per_device_train_batch_size=per_process, gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps, learning_rate=0.1, optim="sgd", report_to="none", use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )  # fmt: skip
    trainer = SAMTrainer(model=model, args=training_args, sam_config=sam_config)
    trainer.current_gradient_accumulation_steps, trainer.state.max_steps = args.grad_accum, args.steps
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(args.steps):
        for micro in range(args.grad_accum):
            x, labels = batches[step * args.grad_accum + micro]
            inputs = {"x": x[rank * per_process : (rank + 1) * per_process],
                      "labels": labels[rank * per_process : (rank + 1) * per_process]}  # fmt: skip
            last = micro == args.grad_accum - 1
            trainer.accelerator.gradient_state._set_sync_gradients(last)
            if counter is not None:
                counter.active = True
            with contextlib.nullcontext() if last or not distributed else trainer_no_sync(model, mesh_kind):
                trainer.training_step(model, inputs)
            if counter is not None:
                counter.active = False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainer.state.global_step = step + 1
    params = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in model.named_parameters()}
    return {n.removeprefix("module."): p.detach().float().cpu() for n, p in params.items()}, trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", choices=["fsdp", "hsdp", "ddp"], default="fsdp")
    parser.add_argument("--replicas", type=int, default=2, help="HSDP: the replicate dimension (e.g. the nodes)")
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--method", default="sam")
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()

    from hf_sam import SAMConfig

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    world, rank = dist.get_world_size(), dist.get_rank()
    if GLOBAL_MICRO_BATCH % world:
        sys.exit(f"{world} processes do not divide the global micro-batch of {GLOBAL_MICRO_BATCH}")
    mesh = None
    if args.mesh == "hsdp":
        mesh = init_device_mesh(device.type, (args.replicas, world // args.replicas), mesh_dim_names=("rep", "shard"))
    elif args.mesh == "fsdp":
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))

    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(GLOBAL_MICRO_BATCH, IN, generator=generator).to(device),
         torch.randint(0, CLASSES, (GLOBAL_MICRO_BATCH,), generator=generator).to(device))
        for _ in range(args.steps * args.grad_accum)
    ]  # fmt: skip
    counter = CollectiveCounter()
    report, ok = [], True
    for rho in (args.rho, 0.0):
        config = SAMConfig(method=args.method, rho=rho)
        model = build(args.mesh, mesh, device, counter)
        counter.calls.clear(), counter.bytes.clear()
        params, _ = train(model, config, batches, args, distributed=True, mesh_kind=args.mesh, counter=counter)
        calls, volume = dict(counter.calls), dict(counter.bytes)
        torch.manual_seed(0)
        expected, _ = train(TinyMLP().to(device), config, batches, args, distributed=False, mesh_kind=args.mesh)
        error = max((params[n] - p).abs().max().item() for n, p in expected.items())
        shards = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        local = torch.cat([t.detach().reshape(-1).float().cpu() for t in shards])
        coordinate = mesh.get_local_rank(mesh.ndim - 1) if mesh is not None else 0
        gathered = [None] * world
        dist.all_gather_object(gathered, (coordinate, local))
        replicas_equal = all(torch.equal(a, b) for i, a in gathered for j, b in gathered if i == j)
        ok &= error <= args.tolerance and replicas_equal
        report.append((rho, error, replicas_equal, calls, volume))
    if rank == 0:
        gradient_bytes = sum(p.numel() * 4 for p in TinyMLP().parameters())
        print(
            f"{args.mesh} x {world} processes, accumulation {args.grad_accum}, method {args.method}, {args.steps} steps"
        )
        for rho, error, replicas_equal, calls, volume in report:
            print(
                f"  rho={rho:g}: max |difference| to one process {error:.2e}, replicas bitwise equal: {replicas_equal}"
            )
            for name in sorted(calls):
                per_step, size = calls[name] / args.steps, volume[name] / args.steps / gradient_bytes
                print(f"    {name:28s} {per_step:6.1f} calls/step  {size:7.2f} full gradients/step")
        print("PASS" if ok else "FAIL")
    dist.barrier()
    sys.stdout.flush()
    os._exit(0 if ok else 1)  # skip the interpreter's process-group teardown, which can hang at exit on gloo


if __name__ == "__main__":
    main()
