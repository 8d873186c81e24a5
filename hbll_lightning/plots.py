"""Plots of a ``hbll run`` report."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_depth_metric"]


def plot_depth_metric(report: dict, path: Path) -> Path:
    """Plot the test metric of every method against the number of modules in each level cut.

    A recurrent network's report has evaluation paths instead of level cuts, and gets
    one point per method and path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report["metric"]
    scale = 100.0 if metric == "accuracy" else 1.0
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    first = next(iter(report["methods"].values()))["test"]
    if first and "path" in first[0]:
        _plot_paths(ax, report, metric)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
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


def _plot_paths(ax, report: dict, metric: str) -> None:
    # A recurrent net has no level cuts, so each method gets one point per evaluation path.
    # Points on an axis that starts near the lowest value show gaps that bars from 0 hide.
    methods = list(report["methods"])
    paths = [row["path"] for row in report["methods"][methods[0]]["test"]]
    offset = 0.3 / max(len(paths) - 1, 1)
    for index, name in enumerate(paths):
        values = [
            next((row.get(metric, float("nan")) for row in report["methods"][m]["test"] if row["path"] == name), float("nan"))
            for m in methods
        ]
        positions = [k + (index - (len(paths) - 1) / 2) * offset for k in range(len(methods))]
        ax.plot(positions, values, marker="o", linestyle="none", label=f"{name} path")
        for x, y in zip(positions, values):
            ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlim(-0.5, len(methods) - 0.5)
    ax.margins(y=0.15)
    label = metric.replace("_", " ")
    better = "higher" if metric == "accuracy" else "lower"
    ax.set_ylabel(f"test {label}")
    ax.set_title(f"Test {label} of each method ({better} is better)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(paths), frameon=False)
