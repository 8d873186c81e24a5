"""Time per training step, saved activations and critical path of HBLL and backprop as N grows.

For every block family, block count N and method, the script builds the same network from
the same seed and times full training steps: ``engine.compute_losses``, one
``loss.backward()`` and one AdamW step. The methods are

- ``backprop``: ``BackpropEngine``, end-to-end backprop through stem, N blocks and head;
- ``hbll-reference``: ``ReferenceEngine``, the HBLL step with one module call at a time;
- ``hbll-fused``: ``FusedEngine(device_types=None)``, the HBLL step with the module calls
  of each round batched with ``torch.vmap`` on every device.

The block families are

- ``transformer``: ``DecoderBlock`` layers behind a token and position embedding, with a
  shared LM head that reads every boundary (``exit_heads="shared"``);
- ``residual``: ``ResidualConvBlock`` blocks behind a conv stem, with a pooled classifier
  head and the library's default local exit heads (target embedding).

Inputs are random tensors of the data's shape, because the step time does not depend on
the values.

    python benchmarks/step_time.py --quick                     # seconds, CPU
    python benchmarks/step_time.py --blocks 4 8 16 --steps 5   # CPU, smaller sweep
    python benchmarks/step_time.py --device cuda --json results/step_time.json

Each table row gives the median step time over ``--steps`` timed steps and its ratio to
backprop at the same N and family. It also gives the bytes of tensors saved for
backward, the peak CUDA memory on a GPU, and the counted critical path
(``StepResult.critical_path``). A second table gives the growth of the step time from
N = 8 to N = 64.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import signal
import statistics
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from tqdm import tqdm

from hbll import BackpropEngine, CausalTransformer, ConvResNet, FusedEngine, HBLLModel, ReferenceEngine

FAMILIES = ("transformer", "residual")
METHODS = ("backprop", "hbll-reference", "hbll-fused")
BLOCKS = (4, 8, 16, 32, 64, 128)
QUICK_BLOCKS = (4, 8)
GROWTH_BLOCKS = (8, 64)
QUICK_GROWTH_BLOCKS = (4, 8)
MIB = 2**20
LEARNING_RATE = 1e-3

# Growth targets on a GPU, as t(64) / t(8): HBLL-fused at most this factor ...
FUSED_GROWTH_TARGET = 2.0
# ... and backprop at least this factor, because its step is a chain of N blocks.
BACKPROP_GROWTH_TARGET = 6.0

_BATCHING_RULE = re.compile(r"batching rule for (\S+?)\.(?:\s|$)")


@dataclass(frozen=True)
class TransformerSize:
    d_model: int
    num_heads: int
    seq_len: int
    batch_size: int
    vocab_size: int

    def describe(self) -> str:
        return (
            f"DecoderBlock d_model {self.d_model}, {self.num_heads} heads, sequence {self.seq_len}, "
            f"batch {self.batch_size}, vocabulary {self.vocab_size}, shared exit heads"
        )


@dataclass(frozen=True)
class ResidualSize:
    width: int
    map_size: int
    batch_size: int
    in_channels: int
    num_classes: int

    def describe(self) -> str:
        return (
            f"ResidualConvBlock width {self.width} on {self.map_size}×{self.map_size} maps, "
            f"batch {self.batch_size}, {self.num_classes} classes, local target-embedding exit heads"
        )


SIZES = {
    "full": {
        "transformer": TransformerSize(d_model=64, num_heads=4, seq_len=32, batch_size=8, vocab_size=256),
        "residual": ResidualSize(width=16, map_size=8, batch_size=32, in_channels=3, num_classes=10),
    },
    "quick": {
        "transformer": TransformerSize(d_model=32, num_heads=2, seq_len=16, batch_size=4, vocab_size=64),
        "residual": ResidualSize(width=8, map_size=8, batch_size=8, in_channels=3, num_classes=10),
    },
}


def build_workload(
    family: str, num_blocks: int, size: TransformerSize | ResidualSize, device: torch.device, seed: int
) -> tuple[HBLLModel, torch.Tensor, torch.Tensor]:
    """Build the model of ``family`` with N blocks and one random batch, both from ``seed``.

    The model stays on the CPU; ``trained_parameters`` moves the parts a method trains.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if family == "transformer":
        spec = CausalTransformer(
            num_blocks=num_blocks,
            vocab_size=size.vocab_size,
            max_positions=size.seq_len,
            d_model=size.d_model,
            num_heads=size.num_heads,
        )
        shape = (size.batch_size, size.seq_len)
        x = torch.randint(0, size.vocab_size, shape, generator=generator)
        y = torch.randint(0, size.vocab_size, shape, generator=generator)
    elif family == "residual":
        spec = ConvResNet(
            num_blocks=num_blocks,
            in_channels=size.in_channels,
            num_classes=size.num_classes,
            width=size.width,
            downsample=1,
        )
        x = torch.randn(size.batch_size, size.in_channels, size.map_size, size.map_size, generator=generator)
        y = torch.randint(0, size.num_classes, (size.batch_size,), generator=generator)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return spec.build_model(), x.to(device), y.to(device)


def make_engine(method: str) -> ReferenceEngine | BackpropEngine:
    if method == "backprop":
        return BackpropEngine()
    if method == "hbll-reference":
        return ReferenceEngine()
    if method == "hbll-fused":
        return FusedEngine(device_types=None)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def trained_parameters(model: HBLLModel, method: str, device: torch.device) -> list[nn.Parameter]:
    """Move the modules that ``method`` trains to ``device`` and return their parameters.

    Backprop trains stem, blocks and head only, so its shortcuts and exit heads stay on
    the CPU and count towards neither its GPU memory nor its optimizer.
    """
    if method == "backprop":
        modules: list[nn.Module] = [model.stem, model.blocks, model.head]
        for module in modules:
            module.to(device)
        return [p for module in modules for p in module.parameters()]
    model.to(device)
    return list(model.parameters())


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _saved_tensors_of_graph(root: Optional[torch.autograd.graph.Node]) -> dict[tuple[int, int], int]:
    # Every autograd node exposes the tensors it saved for backward as ``_saved_*``
    # attributes; reading one before backward returns the saved tensor.
    found: dict[tuple[int, int], int] = {}
    seen: set = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            value = getattr(node, name)
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(item, torch.Tensor):
                    found[_storage_key(item)] = item.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def run_counting_saved_bytes(compute: Callable[[], Any], parameters: Iterable[torch.Tensor]) -> tuple[Any, int]:
    """Run ``compute()`` and return its result and the bytes of the tensors it saved for backward.

    Bytes are those of the distinct storages that the saved tensors live in, without
    the storages of ``parameters``.
    """
    excluded = {_storage_key(p) for p in parameters}
    saved: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in excluded:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = compute()
    return result, sum(saved.values())


def measure_saved_activations(
    engine: ReferenceEngine | BackpropEngine, model: HBLLModel, x: torch.Tensor, y: torch.Tensor, parameters: Iterable[torch.Tensor]
) -> tuple[Any, int, Optional[int]]:
    """Run ``compute_losses`` once and count the bytes of the tensors it saved for backward.

    Returns the step result, the bytes saved by the whole step, and the bytes saved by
    the largest local graph of one node. Bytes are those of the distinct storages that
    the saved tensors live in, without the parameters, which exist whatever the method.
    A saved view therefore counts the whole storage it keeps alive. The largest local
    graph is counted for the reference engine (walking each node's loss graph) and
    equals the whole step for backprop, whose network is one graph. It is None for the
    fused engine, whose stacked calls join the graphs of every node of a round.
    """
    parameters = list(parameters)
    result, total = run_counting_saved_bytes(lambda: engine.compute_losses(model, x, y), parameters)
    excluded = {_storage_key(p) for p in parameters}
    if isinstance(engine, FusedEngine):
        return result, total, None
    if isinstance(engine, BackpropEngine):
        return result, total, total
    largest = 0
    for local_loss in result.local_losses.values():
        node_saved = _saved_tensors_of_graph(local_loss.grad_fn)
        largest = max(largest, sum(nbytes for key, nbytes in node_saved.items() if key not in excluded))
    return result, total, largest


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_configuration(family: str, num_blocks: int, method: str, args: argparse.Namespace) -> dict:
    """Time one (family, N, method) configuration and return its result row."""
    device = torch.device(args.device)
    size = SIZES["quick" if args.quick else "full"][family]
    model, x, y = build_workload(family, num_blocks, size, device, args.seed)
    engine = make_engine(method)
    parameters = trained_parameters(model, method, device)
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE)

    def train_step() -> Any:
        optimizer.zero_grad(set_to_none=True)
        result = engine.compute_losses(model, x, y)
        result.loss.backward()
        optimizer.step()
        return result

    # The pipelined chained exits of an HBLL step run one more leaf per step until the
    # buffer contains an activation for every leaf, after N - 2 steps. Forward-only steps
    # fill it, so the timed steps do the work of steady-state training.
    if args.pipeline_fill and isinstance(engine, ReferenceEngine) and engine.chained_exit_weight > 0:
        with torch.no_grad():
            for _ in range(max(num_blocks - 2, 0)):
                engine.compute_losses(model, x, y)
    for _ in range(args.warmup):
        train_step()

    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        _synchronize(device)
        start = time.perf_counter()
        result = train_step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    peak_cuda_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    # One more step, untimed, under the saved-tensor hooks.
    optimizer.zero_grad(set_to_none=True)
    result, saved_bytes, largest_node_bytes = measure_saved_activations(engine, model, x, y, parameters)
    result.loss.backward()
    optimizer.step()

    # A group that FusedEngine could not batch ran one module at a time; the row names it.
    unfused = sorted({_module_type_name(key) for key in getattr(engine, "unfusable", ())})
    return {
        "family": family,
        "num_blocks": num_blocks,
        "method": method,
        "status": "ok",
        "step_time_s": statistics.median(times),
        "step_times_s": times,
        "saved_activation_bytes": saved_bytes,
        "largest_node_saved_bytes": largest_node_bytes,
        "peak_cuda_bytes": peak_cuda_bytes,
        "critical_path": result.critical_path,
        "unfused_modules": unfused,
    }


def _module_type_name(fusion_key: Any) -> str:
    # Keys of FusedEngine.unfusable: ("stacked", module class, ...) or ("same", id, function, ...).
    if fusion_key[0] == "stacked":
        return fusion_key[1].__name__
    function = fusion_key[2]
    return getattr(function, "__qualname__", repr(function))


def measure(family: str, num_blocks: int, method: str, args: argparse.Namespace) -> dict:
    """Run one configuration, recording vmap fallbacks and, on CUDA, running out of memory."""
    row: Optional[dict] = None
    out_of_memory = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            row = run_configuration(family, num_blocks, method, args)
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
    if out_of_memory:
        # The traceback that held the step's tensors is gone here, so the memory can be freed.
        gc.collect()
        torch.cuda.empty_cache()
        row = {
            "family": family,
            "num_blocks": num_blocks,
            "method": method,
            "status": "OOM",
            "step_time_s": None,
            "step_times_s": [],
            "saved_activation_bytes": None,
            "largest_node_saved_bytes": None,
            "peak_cuda_bytes": None,
            "critical_path": None,
            "unfused_modules": [],
        }
    fallback_ops = set()
    for warning in caught:
        match = _BATCHING_RULE.search(str(warning.message))
        if match:
            fallback_ops.add(match.group(1))
    row["vmap_fallback_ops"] = sorted(fallback_ops)
    return row


def add_ratios(rows: list[dict]) -> None:
    """Set ``ratio_to_backprop`` of every row: its step time over backprop's at the same family and N."""
    baselines = {
        (row["family"], row["num_blocks"]): row["step_time_s"]
        for row in rows
        if row["method"] == "backprop" and row["step_time_s"] is not None
    }
    for row in rows:
        baseline = baselines.get((row["family"], row["num_blocks"]))
        row["ratio_to_backprop"] = row["step_time_s"] / baseline if baseline and row["step_time_s"] is not None else None


def growth_rows(rows: list[dict], blocks_from: int, blocks_to: int, device: str) -> list[dict]:
    """Return, per family and method, the step times at ``blocks_from`` and ``blocks_to`` and their ratio."""
    times = {(row["family"], row["method"], row["num_blocks"]): row["step_time_s"] for row in rows}
    judged = device == "cuda" and (blocks_from, blocks_to) == GROWTH_BLOCKS
    growth = []
    for family in dict.fromkeys(row["family"] for row in rows):
        for method in dict.fromkeys(row["method"] for row in rows):
            time_from = times.get((family, method, blocks_from))
            time_to = times.get((family, method, blocks_to))
            ratio = time_to / time_from if time_from and time_to else None
            target = None
            if judged and method == "hbll-fused":
                target = {"max": FUSED_GROWTH_TARGET, "met": None if ratio is None else ratio <= FUSED_GROWTH_TARGET}
            elif judged and method == "backprop":
                target = {"min": BACKPROP_GROWTH_TARGET, "met": None if ratio is None else ratio >= BACKPROP_GROWTH_TARGET}
            growth.append(
                {
                    "family": family,
                    "method": method,
                    "blocks_from": blocks_from,
                    "blocks_to": blocks_to,
                    "step_time_from_s": time_from,
                    "step_time_to_s": time_to,
                    "growth": ratio,
                    "target": target,
                }
            )
    return growth


def describe_machine(args: argparse.Namespace) -> dict:
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    if args.device == "cuda":
        machine += f", {torch.cuda.get_device_name()}"
    return {
        "machine": machine,
        "torch": torch.__version__,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _format(value: Optional[float], pattern: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, pattern)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def format_tables(header: dict, rows: list[dict], growth: list[dict], args: argparse.Namespace) -> str:
    """Return the Markdown report: a header line, one table per family, the growth table and notes."""
    cuda = header["device"] == "cuda"
    sizes = SIZES["quick" if args.quick else "full"]
    settings = f"Median of {_count(args.steps, 'timed step')} after {_count(args.warmup, 'warm-up step')}"
    if args.pipeline_fill:
        settings += " and, for HBLL, N - 2 forward-only steps that fill the chained-exit pipeline"
    lines = [
        f"Machine: {header['machine']}; torch {header['torch']}; device {header['device']}; "
        f"threads: {header['threads']}; {header['date']}. {settings}.",
        "",
    ]
    columns = ["N", "method", "step (ms)", "ratio to backprop", "saved activations, whole step (MiB)", "saved activations, largest node (MiB)"]
    if cuda:
        columns.append("peak CUDA memory (MiB)")
    columns.append("critical path")
    for family in dict.fromkeys(row["family"] for row in rows):
        lines += [f"### {family}: {sizes[family].describe()}", ""]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "---|" * len(columns))
        for row in rows:
            if row["family"] != family:
                continue
            if row["status"] == "OOM":
                cells = [str(row["num_blocks"]), row["method"]] + ["OOM"] * (len(columns) - 2)
            else:
                cells = [
                    str(row["num_blocks"]),
                    row["method"],
                    f"{row['step_time_s'] * 1e3:.2f}",
                    _format(row["ratio_to_backprop"], ".2f"),
                    f"{row['saved_activation_bytes'] / MIB:.2f}",
                    _format(None if row["largest_node_saved_bytes"] is None else row["largest_node_saved_bytes"] / MIB, ".2f"),
                ]
                if cuda:
                    cells.append(f"{row['peak_cuda_bytes'] / MIB:.1f}")
                cells.append(str(row["critical_path"]))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    if growth:
        blocks_from, blocks_to = growth[0]["blocks_from"], growth[0]["blocks_to"]
        lines += [f"### Step time growth from N = {blocks_from} to N = {blocks_to}", ""]
        lines.append(f"| family | method | t({blocks_from}) (ms) | t({blocks_to}) (ms) | t({blocks_to}) / t({blocks_from}) | GPU target |")
        lines.append("|---|---|---|---|---|---|")
        for entry in growth:
            target = entry["target"]
            if target is None:
                target_text = "—"
            else:
                bound = f"≤ {target['max']:g}" if "max" in target else f"≥ {target['min']:g}"
                verdict = {True: "met", False: "missed", None: "not measured"}[target["met"]]
                target_text = f"{bound}: {verdict}"
            time_from = None if entry["step_time_from_s"] is None else entry["step_time_from_s"] * 1e3
            time_to = None if entry["step_time_to_s"] is None else entry["step_time_to_s"] * 1e3
            lines.append(
                f"| {entry['family']} | {entry['method']} | {_format(time_from, '.2f')} | "
                f"{_format(time_to, '.2f')} | {_format(entry['growth'], '.2f')} | {target_text} |"
            )
        lines.append("")

    lines += [
        "Saved activations are the bytes of the distinct storages of the tensors that",
        "compute_losses saves for backward, without parameters. The whole step counts every",
        "node of the tree in one process. The largest node counts one node's local graph,",
        "which is what one device keeps in memory when every node has its own device.",
        "Backprop's network is one graph, so its largest node is the whole step. The fused",
        "engine's stacked calls join the graphs of a round's nodes, so its largest node is n/a.",
        "The fused engine's count includes the stacked parameter copies that its batched calls save.",
    ]
    if cuda:
        lines.append("Peak CUDA memory is torch.cuda.max_memory_allocated over the timed steps, with parameters, gradients and optimizer state.")
    fallbacks = {}
    unfused = {}
    for row in rows:
        for op in row["vmap_fallback_ops"]:
            fallbacks.setdefault((row["family"], row["method"]), set()).add(op)
        for module in row["unfused_modules"]:
            unfused.setdefault((row["family"], row["method"]), set()).add(module)
    for (family, method), ops in fallbacks.items():
        lines.append(f"vmap had no batching rule, so it looped, for {', '.join(sorted(ops))} ({family}, {method}).")
    for (family, method), modules in unfused.items():
        lines.append(f"The fused engine ran {', '.join(sorted(modules))} one module at a time after a batched call failed ({family}, {method}).")
    return "\n".join(lines)


def write_json(path: str, header: dict, rows: list[dict], growth: list[dict], args: argparse.Namespace) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    sizes = SIZES["quick" if args.quick else "full"]
    report = {
        "header": header,
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "seed": args.seed,
            "pipeline_fill": args.pipeline_fill,
            "sizes": {family: vars(sizes[family]) for family in args.families},
        },
        "results": rows,
        "growth": growth,
    }
    with open(path, "w") as handle:
        json.dump(report, handle, indent=2)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device to train on (default cpu)")
    parser.add_argument("--blocks", type=int, nargs="+", help=f"block counts N to run (default {' '.join(map(str, BLOCKS))})")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="block families to run (default all)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="training methods to run (default all)")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default 10)")
    parser.add_argument("--warmup", type=int, help="untimed training steps before the timed ones (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch")
    parser.add_argument(
        "--growth-blocks",
        type=int,
        nargs=2,
        metavar=("FROM", "TO"),
        help=f"the two block counts of the growth table (default {GROWTH_BLOCKS[0]} {GROWTH_BLOCKS[1]})",
    )
    parser.add_argument(
        "--pipeline-fill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run N - 2 forward-only HBLL steps first, so the pipelined chained exits run for every leaf",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny run for tests: N {' '.join(map(str, QUICK_BLOCKS))}, 2 steps, 1 warm-up step, small widths",
    )
    parser.add_argument("--json", metavar="PATH", help="write the raw results as JSON to PATH, updated after every configuration")
    args = parser.parse_args(argv)

    args.blocks = args.blocks or list(QUICK_BLOCKS if args.quick else BLOCKS)
    if args.steps is None:
        args.steps = 2 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    args.growth_blocks = tuple(args.growth_blocks or (QUICK_GROWTH_BLOCKS if args.quick else GROWTH_BLOCKS))
    if min(args.blocks) < 1:
        parser.error(f"--blocks must all be at least 1, got {args.blocks}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device, and torch.cuda.is_available() is False")
    return args


class StopRequested(Exception):
    """Exception that the SIGTERM handler raises, so a run stopped by ``timeout`` still prints its tables."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise StopRequested(f"stopped by signal {signum}")


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark, print the Markdown report and return the raw results.

    On SIGTERM or Ctrl-C the run stops, prints the tables of the finished configurations
    and exits with status 1.
    """
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    header = describe_machine(args)
    configurations = [
        (family, num_blocks, method) for family in args.families for num_blocks in args.blocks for method in args.methods
    ]
    rows: list[dict] = []
    growth: list[dict] = []
    stopped = None
    previous_handler = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        bar = tqdm(configurations, desc="step_time", unit="config")
        for family, num_blocks, method in bar:
            bar.set_postfix_str(f"{family} N={num_blocks} {method}")
            rows.append(measure(family, num_blocks, method, args))
            add_ratios(rows)
            growth = growth_rows(rows, *args.growth_blocks, args.device)
            if args.json:
                write_json(args.json, header, rows, growth, args)
    except (StopRequested, KeyboardInterrupt) as error:
        stopped = f"{error or 'interrupted'}: {len(rows)} of {len(configurations)} configurations finished"
    finally:
        signal.signal(signal.SIGTERM, previous_handler)

    print(format_tables(header, rows, growth, args), flush=True)
    if stopped:
        print(f"\nRun {stopped}.", flush=True)
        raise SystemExit(1)
    return {"header": header, "results": rows, "growth": growth}


if __name__ == "__main__":
    main()
