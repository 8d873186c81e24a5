"""Compare HBLL variants and backprop on Fashion-MNIST: validation accuracy at every level cut.

Every variant trains the same ConvResNet from the same seed on the same batches for the
same number of steps, with AdamW and a one-cycle learning-rate schedule. The script then
reports the validation accuracy of every level cut as mean ± std over seeds.

    python benchmarks/quality.py --steps 860 --seeds 0 \\
        --variant backprop '{"method": "backprop"}' \\
        --variant cw0.3 '{"consistency_weight": 0.3}'

A variant is a JSON object. Its keys: ``method`` ("hbll" or "backprop"), any
``ObjectiveConfig`` field, ``consistency_sweeps``, and the network and optimizer keys
``num_blocks``, ``width``, ``lr``, ``init_sigma`` and ``learn_sigma``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
from tqdm import tqdm

from hbll import ConvResNet, ObjectiveConfig, Tree, build_engine, train_step
from hbll_lightning.data import FashionMNISTDataModule

OBJECTIVE_KEYS = {field.name for field in dataclasses.fields(ObjectiveConfig)} - {"task_loss", "init_sigma", "learn_sigma"}
OTHER_KEYS = {"method", "consistency_sweeps", "num_blocks", "width", "lr", "init_sigma", "learn_sigma"}


def train_variant(data: FashionMNISTDataModule, variant: dict, steps: int, seed: int) -> tuple[list[float], float]:
    """Train one variant from ``seed`` and return the validation accuracy per level cut and the seconds taken."""
    unknown = set(variant) - OBJECTIVE_KEYS - OTHER_KEYS
    if unknown:
        raise ValueError(f"unknown variant keys {sorted(unknown)}; valid keys are {sorted(OBJECTIVE_KEYS | OTHER_KEYS)}")
    torch.manual_seed(seed)
    network = ConvResNet(num_blocks=variant.get("num_blocks", 8), in_channels=1, num_classes=10, width=variant.get("width", 32))
    model = network.build_model(init_sigma=variant.get("init_sigma", 1.0), learn_sigma=variant.get("learn_sigma", True))
    objective = ObjectiveConfig(**{key: value for key, value in variant.items() if key in OBJECTIVE_KEYS})
    engine = build_engine(variant.get("method", "hbll"), objective, variant.get("consistency_sweeps", 0))
    lr = variant.get("lr", 2e-3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)

    # The loader's shuffle draws from a generator seeded alike for every variant.
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data.train_set, batch_size=128, shuffle=True, generator=generator, drop_last=True)
    batches = iter(loader)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=json.dumps(variant), leave=False):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        train_step(engine, model, optimizer, x, y)
        schedule.step()
    seconds = time.perf_counter() - start

    model.eval()
    x_val, y_val = data.val_set.tensors
    accuracies = []
    with torch.no_grad():
        for depth in range(model.depth + 1):
            correct = sum((model(x, depth=depth).argmax(-1) == y).sum().item() for x, y in zip(x_val.split(500), y_val.split(500)))
            accuracies.append(100.0 * correct / len(y_val))
    return accuracies, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=860, help="training steps per run (430 steps = one epoch at batch 128)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds; each variant runs once per seed")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), required=True, help="a named variant")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = FashionMNISTDataModule(batch_size=128)
    data.setup()
    variants = [(name, json.loads(spec)) for name, spec in args.variant]
    max_depth = max(Tree(variant.get("num_blocks", 8)).depth for _, variant in variants)
    depth_columns = " | ".join(f"depth {depth}" for depth in range(max_depth + 1))
    print(f"| variant | {depth_columns} | seconds per run (ratio to first) |")
    print("|---" * (max_depth + 3) + "|")
    first_seconds = None
    for name, variant in variants:
        runs = [train_variant(data, variant, args.steps, seed) for seed in args.seeds]
        per_depth = list(zip(*(accuracies for accuracies, _ in runs)))
        cells = [
            f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"
            for values in per_depth
        ]
        cells += [""] * (max_depth + 1 - len(cells))
        seconds = statistics.mean(s for _, s in runs)
        first_seconds = first_seconds or seconds
        print(f"| {name} | {' | '.join(cells)} | {seconds:.0f} ({seconds / first_seconds:.2f}×) |", flush=True)


if __name__ == "__main__":
    main()
