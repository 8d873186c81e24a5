"""Training steps per second of tree-parallel HBLL against DDP and pipelined backprop.

Every method trains the main job's network (the ConvResNet of configs/fashion_mnist.yaml,
N = 16 blocks of width 32) on batches of Fashion-MNIST's shape with AdamW, on P
processes of one machine:

- ``hbll``: the tree split over the P ranks (``TreeParallel``), every rank on the full batch;
- ``ddp``: backprop with ``DistributedDataParallel``, each rank on batch / P;
- ``gpipe`` and ``1f1b``: backprop pipelined with ``torch.distributed.pipelining``, the
  blocks split into P contiguous stages, the batch into ``--microbatches`` microbatches.

The global batch is the same for every method. Inputs are random tensors of the data's
shape: the step time does not depend on the values.

    python benchmarks/tree_parallel.py --processes 1 2                 # CPU, gloo
    python benchmarks/tree_parallel.py --device cuda --processes 1 2 4 8   # GPU, NCCL

The table gives steps/s and, as the measure to compare on a shared machine, each row's
ratio to ``ddp`` at P = 1 (plain backprop in one process) from the same run.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hbll import ConvResNet, ObjectiveConfig, ReferenceEngine
from hbll.distributed import TreeParallel

METHODS = ["hbll", "ddp", "gpipe", "1f1b"]


def build_model(num_blocks: int, width: int):
    torch.manual_seed(0)
    return ConvResNet(num_blocks=num_blocks, width=width, in_channels=1, num_classes=10).build_model()


def _pipeline_stage(model, rank: int, world_size: int) -> nn.Module:
    # Stage r runs a contiguous run of blocks; the first adds the stem, the last the head.
    bounds = [round(i * model.num_blocks / world_size) for i in range(world_size + 1)]
    layers = list(model.blocks[bounds[rank] : bounds[rank + 1]])
    if rank == 0:
        layers.insert(0, model.stem)
    if rank == world_size - 1:
        layers.append(model.head)
    return nn.Sequential(*layers)


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, method: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=5))
    try:
        torch.set_num_threads(args.threads)
        model = build_model(args.num_blocks, args.width).to(device)
        generator = torch.Generator().manual_seed(rank)
        batch = args.batch_size // world_size if method == "ddp" else args.batch_size
        x = torch.randn(batch, 1, 28, 28, generator=generator).to(device)
        y = torch.randint(0, 10, (batch,), generator=generator).to(device)
        step = _make_step(method, model, rank, world_size, device, args)
        for _ in range(args.warmup):
            step(x, y)
        times = []
        for _ in range(args.steps):
            dist.barrier()
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(x, y)
            if args.device == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            times.append(time.perf_counter() - start)
        if rank == 0:
            torch.save(times, out)
    finally:
        dist.destroy_process_group()


def _make_step(method: str, model, rank: int, world_size: int, device, args):
    objective = ObjectiveConfig()
    if method == "hbll":
        parallel = TreeParallel(model, device=device) if world_size > 1 else None
        engine = ReferenceEngine(objective, comm=parallel.comm if parallel else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if parallel:
            parallel.restrict_optimizer(optimizer)

        def step(x, y):
            optimizer.zero_grad(set_to_none=True)
            engine.compute_losses(model, x, y).loss.backward()
            if parallel:
                parallel.reduce_gradients()
            optimizer.step()

        return step
    if method == "ddp":
        # Backprop trains the plain network: stem, N blocks, head.
        network = nn.Sequential(model.stem, *model.blocks, model.head)
        wrapped = nn.parallel.DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)

        def step(x, y):
            optimizer.zero_grad(set_to_none=True)
            objective.task_loss(wrapped(x), y).backward()
            optimizer.step()

        return step
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage_module = _pipeline_stage(model, rank, world_size).to(device)
    stage = PipelineStage(stage_module, rank, world_size, device)
    schedule_class = ScheduleGPipe if method == "gpipe" else Schedule1F1B
    schedule = schedule_class(stage, n_microbatches=args.microbatches, loss_fn=nn.functional.cross_entropy)
    optimizer = torch.optim.AdamW(stage_module.parameters(), lr=1e-3)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and world_size == 1:
            schedule.step(x, target=y)
        elif rank == 0:
            schedule.step(x)
        elif rank == world_size - 1:
            schedule.step(target=y)
        else:
            schedule.step()
        optimizer.step()

    return step


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(method: str, processes: int, args: argparse.Namespace) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.spawn(_worker, args=(processes, _free_port(), args, method, out), nprocs=processes, join=True)
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--num-blocks", type=int, default=16)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    args = parser.parse_args()
    if args.device == "cuda" and max(args.processes) > torch.cuda.device_count():
        parser.error(f"--processes {max(args.processes)} needs that many GPUs, found {torch.cuda.device_count()}")

    rows = []
    for processes in args.processes:
        for method in args.methods:
            times = measure(method, processes, args)
            median = statistics.median(times)
            rows.append((method, processes, 1.0 / median, median))
            print(f"{method:6s} P={processes}: {1.0 / median:7.2f} steps/s", flush=True)

    baseline = next((r[2] for r in rows if r[0] == "ddp" and r[1] == 1), None)
    print()
    print(f"| Method | P | Steps/s | Median step (s) | Ratio to backprop, P = 1 |")
    print("|---|---|---|---|---|")
    for method, processes, rate, median in rows:
        ratio = f"{rate / baseline:.2f}" if baseline else "n/a"
        print(f"| {method} | {processes} | {rate:.2f} | {median:.4f} | {ratio} |")


if __name__ == "__main__":
    main()
