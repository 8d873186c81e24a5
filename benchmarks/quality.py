"""Compare HBLL variants and backprop on Fashion-MNIST: validation accuracy at every level cut.

Every variant trains the same ConvResNet from the same seed on the same batches for the
same number of steps, with AdamW and a one-cycle learning-rate schedule. The script then
reports the validation accuracy of every level cut as mean ± std over seeds.

    python benchmarks/quality.py --steps 860 --seeds 0 \\
        --variant backprop '{"method": "backprop"}' \\
        --variant cw0.3 '{"consistency_weight": 0.3}'

A variant is a JSON object of these keys (all optional):

- ``method``: "hbll" (default) or "backprop";
- network: ``num_blocks`` (default 8), ``width``, ``exit_head``, ``shortcut_width``;
- any ``ObjectiveConfig`` field, including ``init_sigma``, ``learn_sigma`` and the
  schedules ``consistency_weight_final`` and ``consistency_lambda_final``;
- engine: ``consistency_sweeps``, ``sweeps_from``, ``chain_length``, ``chained_exit_weight``,
  ``chained_exit_trains_head``;
- optimizer: ``lr`` (the peak of the one-cycle schedule, default 4e-3) and ``level_lr_scale``.

Keys left out take the library defaults. ``--base`` contains keys shared by every variant.
``--results FILE`` appends every finished run to FILE as a JSON line, and
``--from-results FILE ...`` prints the table of saved runs, so the seeds of one
comparison can run in parallel processes.
Exploration reads the validation split (5,000 training images held out); the final
comparison reads the test split with ``--split test``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch
from tqdm import tqdm

from hbll import ConvResNet, ObjectiveConfig, Tree, build_engine, level_param_groups, train_step
from hbll_lightning.data import FashionMNISTDataModule

OBJECTIVE_KEYS = {field.name for field in dataclasses.fields(ObjectiveConfig)} - {"task_loss"}
NETWORK_KEYS = {"num_blocks", "width", "exit_head", "shortcut_width"}
ENGINE_KEYS = {"consistency_sweeps", "sweeps_from", "chain_length", "chained_exit_weight", "chained_exit_trains_head"}
OTHER_KEYS = {"method", "lr", "level_lr_scale"}
VALID_KEYS = OBJECTIVE_KEYS | NETWORK_KEYS | ENGINE_KEYS | OTHER_KEYS


def pick(variant: dict, keys: set[str]) -> dict:
    return {key: value for key, value in variant.items() if key in keys}


def train_variant(
    data: FashionMNISTDataModule, variant: dict, steps: int, seed: int, split: str
) -> tuple[list[float], float, int]:
    """Train one variant from ``seed``.

    Returns the accuracy of every level cut on ``split``, the seconds of training and the
    critical path of the last step.
    """
    unknown = set(variant) - VALID_KEYS
    if unknown:
        raise ValueError(f"unknown variant keys {sorted(unknown)}; valid keys are {sorted(VALID_KEYS)}")
    torch.manual_seed(seed)
    network = ConvResNet(**{"num_blocks": 8, **pick(variant, NETWORK_KEYS)}, in_channels=1, num_classes=10)
    objective = ObjectiveConfig(**pick(variant, OBJECTIVE_KEYS))
    model = network.build_model(init_sigma=objective.init_sigma, learn_sigma=objective.learn_sigma)
    engine = build_engine(variant.get("method", "hbll"), objective, **pick(variant, ENGINE_KEYS))
    lr = variant.get("lr", 4e-3)
    groups = level_param_groups(model, lr, variant.get("level_lr_scale", 1.0))
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[group["lr"] for group in groups], total_steps=steps, pct_start=0.1
    )

    # The loader's shuffle draws from a generator seeded alike for every variant.
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data.train_set, batch_size=128, shuffle=True, generator=generator, drop_last=True)
    batches = iter(loader)
    start = time.perf_counter()
    for step in tqdm(range(steps), desc=json.dumps(variant), leave=False):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        result = train_step(engine, model, optimizer, x, y, progress=step / max(steps - 1, 1))
        schedule.step()
    seconds = time.perf_counter() - start

    model.eval()
    x_eval, y_eval = (data.val_set if split == "val" else data.test_set).tensors
    accuracies = []
    with torch.no_grad():
        for depth in range(model.depth + 1):
            correct = sum(
                (model(x, depth=depth).argmax(-1) == y).sum().item() for x, y in zip(x_eval.split(500), y_eval.split(500))
            )
            accuracies.append(100.0 * correct / len(y_eval))
    return accuracies, seconds, result.critical_path


def format_table(records: list[dict]) -> str:
    """Render per-seed records as a Markdown table: one row per variant, mean ± std per depth."""
    names = list(dict.fromkeys(record["name"] for record in records))
    max_depth = max(len(record["accuracies"]) for record in records) - 1
    settings = sorted({(record["split"], record["steps"]) for record in records})
    seeds = sorted({record["seed"] for record in records})
    header = ", ".join(f"{split} split, {steps} steps" for split, steps in settings)
    lines = [
        f"Accuracy (%) on the {header}; mean ± std over seeds {seeds}",
        "| variant | seeds | " + " | ".join(f"depth {depth}" for depth in range(max_depth + 1))
        + " | critical path | seconds per run (ratio to first row) |",
        "|---" * (max_depth + 5) + "|",
    ]
    first_seconds = None
    for name in names:
        runs = [record for record in records if record["name"] == name]
        per_depth = list(zip(*(run["accuracies"] for run in runs)))
        cells = [
            f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"
            for values in per_depth
        ]
        cells += [""] * (max_depth + 1 - len(cells))
        seconds = statistics.mean(run["seconds"] for run in runs)
        first_seconds = first_seconds or seconds
        lines.append(
            f"| {name} | {len(runs)} | {' | '.join(cells)} | {runs[0]['critical_path']} | "
            f"{seconds:.0f} ({seconds / first_seconds:.2f}×) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=860, help="training steps per run (430 steps = one epoch at batch 128)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds; each variant runs once per seed")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), default=[], help="a named variant")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--base", default="{}", metavar="JSON", help="keys shared by every variant; a variant's own keys override them"
    )
    parser.add_argument("--split", choices=["val", "test"], default="val", help="the split the table reports")
    parser.add_argument("--results", metavar="FILE", help="append one JSON line per finished run to FILE")
    parser.add_argument(
        "--from-results", nargs="+", metavar="FILE", help="print the table of runs saved with --results; trains nothing"
    )
    args = parser.parse_args()
    if args.from_results:
        records = [json.loads(line) for path in args.from_results for line in open(path) if line.strip()]
        print(format_table(records))
        return
    if not args.variant:
        parser.error("give at least one --variant NAME JSON, or --from-results FILE")
    torch.set_num_threads(args.threads)

    data = FashionMNISTDataModule(batch_size=128)
    data.setup()
    base = json.loads(args.base)
    records = []
    for name, spec in args.variant:
        variant = {**base, **json.loads(spec)}
        for seed in args.seeds:
            accuracies, seconds, critical_path = train_variant(data, variant, args.steps, seed, args.split)
            record = {
                "name": name,
                "variant": variant,
                "seed": seed,
                "split": args.split,
                "steps": args.steps,
                "accuracies": accuracies,
                "seconds": seconds,
                "critical_path": critical_path,
            }
            records.append(record)
            if args.results:
                with open(args.results, "a") as results:
                    results.write(json.dumps(record) + "\n")
            print(f"{name} seed {seed}: " + " ".join(f"{a:.2f}" for a in accuracies), file=sys.stderr, flush=True)
    print(format_table(records))


if __name__ == "__main__":
    main()
