"""Inference latency of every level cut: ``model(x, depth=ℓ)``, ``cut_network(ℓ)`` and its ``torch.compile``.

    python benchmarks/inference.py [--device cpu] [--batch-sizes 1 128] [--repeats 50]

For each network and batch size it prints the median latency of each level cut run
three ways, as a ratio to ``model(x, depth=ℓ)``:

- ``model``: ``HBLLModel.forward``, which checks every node's output shape;
- ``sequential``: ``model.cut_network(ℓ)``, an ``nn.Sequential`` of the same modules;
- ``compiled``: ``torch.compile`` of that ``nn.Sequential`` (the first call, which
  compiles, is not timed; its time is in the last column).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch
from tqdm import tqdm

from hbll import CausalTransformer, ConvResNet


def _networks(device: torch.device) -> dict:
    torch.manual_seed(0)
    conv = ConvResNet(num_blocks=16, in_channels=1, num_classes=10, width=32).build_model().to(device).eval()
    lm = CausalTransformer(num_blocks=16, vocab_size=256, max_positions=32, d_model=64, num_heads=4).build_model().to(device).eval()
    return {
        "ConvResNet N=16 (28×28 images)": (conv, lambda b: torch.randn(b, 1, 28, 28, device=device)),
        "CausalTransformer N=16, d 64 (32 tokens)": (lm, lambda b: torch.randint(0, 256, (b, 32), device=device)),
    }


def _median_time(fn, x, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    device = torch.device(options.device)
    print(
        f"Machine: {platform.machine()}, torch {torch.__version__}, device {device}, "
        f"{options.threads} thread(s), {date.today().isoformat()}; median of {options.repeats} calls"
    )
    for name, (model, make_input) in _networks(device).items():
        for batch_size in options.batch_sizes:
            x = make_input(batch_size)
            print(f"\n{name}, batch {batch_size}\n")
            print("| level cut (modules) | model (ms) | sequential ÷ model | compiled ÷ model | compile time (s) |")
            print("|---|---|---|---|---|")
            with torch.no_grad():
                for depth in tqdm(range(model.depth + 1), desc=f"{name.split()[0]} b{batch_size}", leave=False):
                    network = model.cut_network(depth)
                    base = _median_time(lambda inputs: model(inputs, depth=depth), x, options.repeats, device)
                    sequential = _median_time(network, x, options.repeats, device)
                    compiled_cell, compile_cell = "skipped", "skipped"
                    if not options.no_compile:
                        # Each cut is a new nn.Sequential of one code path: start dynamo afresh
                        # so that earlier cuts do not count towards its recompile limit.
                        torch._dynamo.reset()
                        compiled = torch.compile(network)
                        start = time.perf_counter()
                        compiled(x)
                        compile_cell = f"{time.perf_counter() - start:.1f}"
                        compiled_cell = f"{_median_time(compiled, x, options.repeats, device) / base:.2f}"
                    modules = len(model.tree.level_cut(depth))
                    print(f"| depth {depth} ({modules}) | {base * 1000:.2f} | {sequential / base:.2f} | {compiled_cell} | {compile_cell} |")


if __name__ == "__main__":
    main()
