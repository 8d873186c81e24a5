"""Train the tiny model with ``Trainer(strategy="hbll")`` and save rank 0's parameters.

The launch-path tests run this file through the strategy's own launcher, ``torchrun`` and
``accelerate launch``:

    python train_script.py OUT [--devices P] [--tree-groups T] [--fail-rank R]
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hbll_lightning import HBLLModule, HBLLStrategy  # noqa: E402
from tests.conftest import TinyBlock  # noqa: E402

STEPS = 20


def build_module(chained_exit_weight: float = 3.0, method: str = "hbll") -> HBLLModule:
    torch.manual_seed(0)
    blocks = [TinyBlock(8) for _ in range(8)]
    return HBLLModule.from_modules(
        nn.Linear(5, 8), blocks, nn.Linear(8, 3), lr=1e-2, exit_heads="local",
        chained_exit_weight=chained_exit_weight, lr_schedule="constant", method=method,
    )


def loader(batch_size: int = 16, num_batches: int = STEPS) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_batches * batch_size, 5, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class FailAt(Callback):
    """Raise on one rank at one step, to test how the other ranks stop."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")


def make_trainer(
    root: str, devices: int, tree_groups=None, start_method="popen", fail_rank=None, timeout_s=60, max_steps=STEPS,
    gradient_clip_val=None,
) -> Trainer:
    callbacks = [ModelCheckpoint(dirpath=os.path.join(root, "checkpoints"), every_n_train_steps=1, save_top_k=-1)]
    if fail_rank is not None:
        callbacks.append(FailAt(fail_rank, 3))
    strategy = HBLLStrategy(tree_groups=tree_groups, start_method=start_method, timeout=timedelta(seconds=timeout_s))
    return Trainer(
        strategy=strategy, accelerator="cpu", devices=devices, max_steps=max_steps, default_root_dir=root,
        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        num_sanity_val_steps=0, gradient_clip_val=gradient_clip_val,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--tree-groups", type=int, default=None)
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--timeout", type=int, default=60, help="process group timeout in seconds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = build_module()
    trainer = make_trainer(
        os.path.dirname(args.out), args.devices, args.tree_groups, fail_rank=args.fail_rank, timeout_s=args.timeout
    )
    trainer.fit(module, loader())
    if trainer.global_rank == 0:
        torch.save({name: p.detach().clone() for name, p in module.model.named_parameters()}, args.out)


if __name__ == "__main__":
    main()
