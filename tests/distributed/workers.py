"""Process entry points for the multi-process tests; importable so that spawn can find them."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from hbll import ObjectiveConfig, ReferenceEngine
from hbll.distributed import TreeParallel
from tests.conftest import make_tiny_model

NUM_BLOCKS = 8
BATCH = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def batches(steps: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 5, generator=generator), torch.randint(0, 3, (size,), generator=generator)) for _ in range(steps)]


def build_model():
    torch.manual_seed(0)
    return make_tiny_model(NUM_BLOCKS, width=6, exit_heads="local")


def build_engine(engine_options: dict, comm=None) -> ReferenceEngine:
    return ReferenceEngine(ObjectiveConfig(consistency_weight=0.3), comm=comm, **engine_options)


def reference_parameters(steps: int, replicas: int, engine_options: dict) -> dict[str, torch.Tensor]:
    """Train in one process on the replicas' batches put together."""
    model, engine = build_model(), build_engine(engine_options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step, (x, y) in enumerate(batches(steps, BATCH * replicas)):
        optimizer.zero_grad()
        engine.compute_losses(model, x, y, step / steps).loss.backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def tree_parallel_worker(rank: int, world_size: int, port: int, tree_groups: int, steps: int, engine_options: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        model = build_model()
        parallel = TreeParallel(model, tree_groups=tree_groups)
        engine = build_engine(engine_options, comm=parallel.comm)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        parallel.restrict_optimizer(optimizer)
        replicas = parallel.mesh.replicas
        for step, (x, y) in enumerate(batches(steps, BATCH * replicas)):
            shard = slice(parallel.mesh.replica * BATCH, (parallel.mesh.replica + 1) * BATCH)
            optimizer.zero_grad()
            engine.compute_losses(model, x[shard], y[shard], step / steps).loss.backward()
            parallel.reduce_gradients()
            optimizer.step()
        parallel.sync_parameters()
        if rank == 0:
            torch.save({name: p.detach().clone() for name, p in model.named_parameters()}, out)
    finally:
        dist.destroy_process_group()
