"""Plots of a ``hbll run`` report."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_depth_metric"]


def plot_depth_metric(report: dict, path: Path) -> Path:
    """Plot the test metric of every method against the number of modules in each level cut."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report["metric"]
    scale = 100.0 if metric == "accuracy" else 1.0
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, result in report["methods"].items():
        rows = [row for row in result["test"] if metric in row]
        sizes = [row["num_modules"] for row in rows]
        values = [scale * row[metric] for row in rows]
        ax.plot(sizes, values, marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("modules in the level cut (depth of the subnetwork)")
    ax.set_ylabel("test accuracy (%)" if metric == "accuracy" else f"test {metric}")
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_title(f"Test {metric} at every level cut")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
