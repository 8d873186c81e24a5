"""HBLL over time against backprop through time: step time, critical path and tree-path inference.

Three measurements:

``step-time``: for every sequence length T, the same GRU language model trains one step
with each method: HBLL over time (``RecurrentEngine``), full backprop through time and
truncated backprop through time over k steps. A step is ``engine.compute_losses``, one
``loss.backward()`` and one AdamW step, on random tokens (the time does not depend on
the values). Each row gives the median step time, its ratio to full BPTT at the same T,
the bytes of tensors saved for backward and the counted critical path.

    python benchmarks/rnn.py step-time --lengths 16 32 64 128 256 512

``copy-task``: a GRU learns to output the token from ``lag`` steps back, which needs
memory. It shows what the lookahead heads and exact messages add to HBLL over time.

    python benchmarks/rnn.py copy-task

``inference``: a trained checkpoint (``hbll run --config configs/shakespeare_rnn.yaml``
writes one) reads long validation prefixes in three ways, and then predicts the text
that follows from the state it reached:

- exactly, one cell step per character;
- through the coarse tree path: level cut ℓ of every window of ``max_steps`` characters,
  ``|C_ℓ|`` evaluations per window instead of ``max_steps``;
- from the initial state, which ignores the prefix.

It reports the relative error of each approximate state against the exact one, the bits
per character of the continuation, and the sequential evaluations and time it took. A
second table gives the error of the tree's estimates of every step's state (the
training messages) against the number of Jacobi sweeps.

    python benchmarks/rnn.py inference --checkpoint outputs/shakespeare_rnn/checkpoint \\
        --config configs/shakespeare_rnn.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Optional

import torch
import yaml
from torch import nn
from tqdm import tqdm

from hbll.checkpoint import load_checkpoint
from hbll.networks import CharRNN
from hbll.recurrent import RecurrentHBLL, build_recurrent_engine, flat_state
from step_time import describe_machine, run_counting_saved_bytes

METHODS = ("hbll", "backprop", "tbptt16", "tbptt32")
LENGTHS = (16, 32, 64, 128, 256, 512)


# Step time ------------------------------------------------------------------------------


def time_steps(length: int, method: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    network = CharRNN(length, args.vocab, args.cell, args.embedding_dim, args.hidden_size, args.lookahead, args.leaf_steps)
    model = network.build_model()
    engine = build_recurrent_engine(method)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch_size, length), generator=generator)
    y = torch.randint(0, args.vocab, (args.batch_size, length), generator=generator)
    _, saved = run_counting_saved_bytes(lambda: engine.compute_losses(model, x, y), model.parameters())
    times = []
    for step in range(args.warmup + args.repeats):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        result = engine.compute_losses(model, x, y)
        result.loss.backward()
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {
        "length": length,
        "method": method,
        "step_time_s": statistics.median(times),
        "saved_mib": saved / 2**20,
        "critical_path": result.critical_path,
    }


def step_time(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    jobs = [(length, method) for length in args.lengths for method in args.methods]
    rows = [time_steps(length, method, args) for length, method in tqdm(jobs, desc="steps", unit="config")]
    baseline = {row["length"]: row["step_time_s"] for row in rows if row["method"] == "backprop"}
    for row in rows:
        row["ratio_to_bptt"] = row["step_time_s"] / baseline[row["length"]] if row["length"] in baseline else None
    header = {**describe_machine(args), "batch_size": args.batch_size, "cell": args.cell, "hidden_size": args.hidden_size}
    lines = [
        f"Step time, {header['machine']}, torch {header['torch']}, {header['threads']} threads, {header['date']}",
        f"{args.cell.upper()} cell, hidden {args.hidden_size}, embedding {args.embedding_dim}, batch {args.batch_size}, "
        f"lookahead {args.lookahead}, {args.leaf_steps} steps per leaf, median of {args.repeats} steps",
        "",
        "| T | method | step time ÷ BPTT | saved activations (MiB) | critical path |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = "n/a" if row["ratio_to_bptt"] is None else f"{row['ratio_to_bptt']:.2f}"
        lines.append(f"| {row['length']} | {row['method']} | {ratio} | {row['saved_mib']:.1f} | {row['critical_path']} |")
    print("\n".join(lines))
    return {"header": header, "rows": rows}


# Memory: the copy task ------------------------------------------------------------------


def copy_accuracy(method: str, lag: int, lookahead: int, sweeps: int, args: argparse.Namespace) -> float:
    """Train a GRU to output the token from ``lag`` steps back; return the sequential RNN's accuracy."""
    torch.manual_seed(0)
    vocab, length = args.vocab, args.length
    model = RecurrentHBLL(
        nn.Embedding(vocab, 6), nn.GRUCell(6, args.hidden_size), nn.Linear(args.hidden_size, vocab),
        max_steps=length, lookahead=lookahead,
    )
    engine = build_recurrent_engine(method, consistency_sweeps=sweeps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)

    def copy_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, vocab, (size, length), generator=generator)
        return x, torch.cat([torch.zeros(size, lag, dtype=torch.long), x[:, :-lag]], dim=1)

    for _ in range(args.train_steps):
        optimizer.zero_grad()
        engine.compute_losses(model, *copy_batch(32)).loss.backward()
        optimizer.step()
    x, y = copy_batch(256)
    with torch.no_grad():
        return float((model(x).argmax(-1)[:, lag:] == y[:, lag:]).float().mean())


def copy_task(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    variants = [("backprop", 0, 0)] + [("hbll", h, k) for h in args.lookaheads for k in (0, args.length)]
    jobs = [(lag, variant) for lag in args.lags for variant in variants]
    rows = [
        {"lag": lag, "method": method, "lookahead": h, "sweeps": k, "accuracy": copy_accuracy(method, lag, h, k, args)}
        for lag, (method, h, k) in tqdm(jobs, desc="copy task", unit="run")
    ]
    header = describe_machine(args)
    lines = [
        f"Copy task, {header['machine']}, torch {header['torch']}, {header['date']}",
        f"GRU hidden {args.hidden_size}, vocabulary {args.vocab}, T = {args.length}, {args.train_steps} steps of batch 32; "
        f"accuracy of the sequential RNN on 256 fresh sequences (chance {1 / args.vocab:.2f})",
        "",
        "| lag | method | lookahead heads | sweeps K | accuracy |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['lag']} | {row['method']} | {row['lookahead']} | {row['sweeps']} | {row['accuracy']:.3f} |")
    print("\n".join(lines))
    return {"header": header, "rows": rows}


# Inference ------------------------------------------------------------------------------


def validation_stream(config_path: str) -> torch.Tensor:
    """Return the validation characters as one id stream, built from the data section of a job config."""
    from hbll_lightning.data import LMDataModule

    with open(config_path) as file:
        config = yaml.safe_load(file)
    data = LMDataModule(**config["data"]["init_args"])
    data.setup("validate")
    inputs, labels = data.val_dataloader().dataset.tensors
    # Blocks are consecutive slices of block_size + 1 ids: inputs plus the last label restore them.
    return torch.cat([inputs, labels[:, -1:]], dim=1).flatten()


def windows(stream: torch.Tensor, length: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - length, (count,), generator=generator)
    return torch.stack([stream[start : start + length] for start in starts.tolist()])


def bits_per_char(model: RecurrentHBLL, continuation: torch.Tensor, state) -> float:
    logits = model(continuation[:, :-1], state=state)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), continuation[:, 1:].reshape(-1))
    return float(loss) / math.log(2)


def relative_error(estimate, exact) -> float:
    estimate, exact = flat_state(estimate), flat_state(exact)
    return float((estimate - exact).norm(dim=1).mean() / exact.norm(dim=1).mean())


def cut_evaluations(model: RecurrentHBLL, length: int, depth: int) -> int:
    """Count the sequential evaluations of ``model.cut_state`` at ``depth`` over ``length`` steps."""
    count = 0
    for start in range(0, length, model.max_steps):
        window = min(model.max_steps, length - start)
        tree = model.tree_for(window)
        count += model.sequential_evaluations(tree.level_cut(min(depth, tree.depth)), window)
    return count


def timed(call):
    start = time.perf_counter()
    value = call()
    return value, time.perf_counter() - start


@torch.no_grad()
def inference(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint)
    if not isinstance(model, RecurrentHBLL):
        raise SystemExit(f"{args.checkpoint} contains a {type(model).__name__}, not a recurrent model; pass a checkpoint of a CharRNN run")
    stream = validation_stream(args.config)
    window = model.max_steps
    rows = []
    for horizon in tqdm(args.horizons, desc="horizons"):
        sample = windows(stream, horizon + args.continuation + 1, args.sequences, seed=horizon)
        prefix, continuation = sample[:, :horizon], sample[:, horizon:]
        exact, exact_time = timed(lambda: model.sequence_states(prefix)[-1])
        paths = [("exact", exact, exact_time, horizon)]
        for depth in range(model.depth + 1):
            state, seconds = timed(lambda: model.cut_state(prefix, depth=depth))
            evaluations = cut_evaluations(model, horizon, depth)
            paths.append((f"tree depth {depth}", state, seconds, evaluations))
        paths.append(("initial state", model.initial_state(prefix.shape[0], model.stem(prefix)), 0.0, 0))
        for name, state, seconds, evaluations in paths:
            rows.append(
                {
                    "horizon": horizon,
                    "path": name,
                    "evaluations": evaluations,
                    "relative_error": relative_error(state, exact),
                    "bits_per_char": bits_per_char(model, continuation, state),
                    "time_ratio": seconds / exact_time if name != "initial state" else 0.0,
                }
            )

    sample = windows(stream, window + 1, args.sequences, seed=0)
    x, y = sample[:, :-1], sample[:, 1:]
    exact_states = model.sequence_states(x)
    sweep_rows = []
    for sweeps in args.sweeps:
        estimates = model.approximate_states(x, sweeps=sweeps)
        errors = [relative_error(e, s) for e, s in zip(estimates, exact_states)]
        logits = model.head(torch.stack([model.readout(e) for e in estimates], dim=1))
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        sweep_rows.append(
            {
                "sweeps": sweeps,
                "rounds": model.depth + (sweeps + 1) * model.leaf_steps,
                "mean_relative_error": statistics.mean(errors),
                "last_step_relative_error": errors[-1],
                "bits_per_char": float(loss) / math.log(2),
            }
        )

    header = {**describe_machine(args), "checkpoint": args.checkpoint, "sequences": args.sequences, "continuation": args.continuation}
    lines = [
        f"Inference, {header['machine']}, torch {header['torch']}, {header['threads']} threads, {header['date']}",
        f"{args.sequences} validation sequences per horizon; the continuation is the next {args.continuation} characters",
        "",
        "| prefix length | path | sequential evaluations | state error | continuation bits/char | time ÷ exact |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['horizon']} | {row['path']} | {row['evaluations']} | {row['relative_error']:.3f} | "
            f"{row['bits_per_char']:.3f} | {row['time_ratio']:.3f} |"
        )
    lines += [
        "",
        f"Tree estimates of every step's state over {window} steps (the messages, then every leaf's "
        f"{model.leaf_steps} cell steps)",
        "",
        "| sweeps K | rounds | mean state error | last-step state error | bits/char from the estimates |",
        "|---|---|---|---|---|",
    ]
    for row in sweep_rows:
        lines.append(
            f"| {row['sweeps']} | {row['rounds']} | {row['mean_relative_error']:.3f} | "
            f"{row['last_step_relative_error']:.3f} | {row['bits_per_char']:.3f} |"
        )
    print("\n".join(lines))
    return {"header": header, "rows": rows, "sweeps": sweep_rows}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    steps = commands.add_parser("step-time", help="time one training step per method and sequence length")
    steps.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="sequence lengths T to time")
    steps.add_argument("--methods", nargs="+", default=list(METHODS), help="hbll, backprop or tbptt<k>")
    steps.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    steps.add_argument("--vocab", type=int, default=80, help="token ids of the random inputs")
    steps.add_argument("--cell", choices=("gru", "lstm"), default="gru")
    steps.add_argument("--embedding-dim", type=int, default=64, help="width of the cell input")
    steps.add_argument("--hidden-size", type=int, default=256, help="width of the cell state")
    steps.add_argument("--lookahead", type=int, default=0, help="lookahead heads of the HBLL model")
    steps.add_argument("--leaf-steps", type=int, default=1, help="time steps per HBLL leaf")
    steps.add_argument("--repeats", type=int, default=5, help="timed steps; the table gives their median")
    steps.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    copy = commands.add_parser("copy-task", help="memory: learn to output the token from a few steps back")
    copy.add_argument("--lags", type=int, nargs="+", default=[1, 2, 3], help="how many steps back the target lies")
    copy.add_argument("--lookaheads", type=int, nargs="+", default=[0, 1, 2, 3], help="lookahead heads to compare")
    copy.add_argument("--length", type=int, default=16, help="sequence length T")
    copy.add_argument("--vocab", type=int, default=11, help="token ids")
    copy.add_argument("--hidden-size", type=int, default=16, help="width of the GRU state")
    copy.add_argument("--train-steps", type=int, default=300, help="training steps of batch 32 per run")
    infer = commands.add_parser("inference", help="approximate states of a trained checkpoint")
    infer.add_argument("--checkpoint", required=True)
    infer.add_argument("--config", required=True, help="the job config whose data section built the checkpoint's vocabulary")
    infer.add_argument("--horizons", type=int, nargs="+", default=[128, 512, 2048], help="prefix lengths to read")
    infer.add_argument("--continuation", type=int, default=64, help="characters scored after each prefix")
    infer.add_argument("--sequences", type=int, default=64, help="validation prefixes per length")
    infer.add_argument(
        "--sweeps", type=int, nargs="+", default=[0, 1, 2, 4, 8],
        help="Jacobi sweeps for the tree estimates; the number of leaves minus one gives the exact states",
    )
    for command in (steps, copy, infer):
        command.add_argument("--threads", type=int, default=1)
        command.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    args.device = "cpu"
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    commands = {"step-time": step_time, "copy-task": copy_task, "inference": inference}
    result = commands[args.command](args)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
            file.write("\n")
    return result


if __name__ == "__main__":
    main()
