"""PNG plots of an eval summary: accuracy vs FLOPs and vs latency (with the Pareto front), tokens per layer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

PLOTS = ("accuracy_vs_flops.png", "accuracy_vs_latency.png", "tokens_per_layer.png")


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both cost (lower) and accuracy (higher), by increasing cost."""
    front, best = [], float("-inf")
    for cost, accuracy, label in sorted(points, key=lambda point: (point[0], -point[1])):
        if accuracy > best:
            front.append((cost, accuracy, label))
            best = accuracy
    return front


def _scatter(path: Path, points: list[tuple[float, float, str]], xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for cost, accuracy, label in points:
        axes.scatter([cost], [accuracy], s=36, zorder=3)
        axes.annotate(label, (cost, accuracy), textcoords="offset points", xytext=(5, 4), fontsize=7)
    front = pareto_front(points)
    axes.plot([p[0] for p in front], [p[1] for p in front], color="0.4", linewidth=1, linestyle="--",
              label="Pareto front", zorder=2)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_plots(directory: Path, summary: dict[str, Any], metric: str, metric_title: str) -> list[Path]:
    """Write :data:`PLOTS` for ``summary`` (the eval runner's); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [entry for entry in summary["results"] if entry["metrics"].get(metric) == entry["metrics"].get(metric)]
    written = []
    flops_points = [(entry["flops"]["full"]["total"] / 1e9, 100 * entry["metrics"][metric], entry["configuration"])
                    for entry in entries if entry.get("flops")]
    if flops_points:
        path = directory / PLOTS[0]
        _scatter(path, flops_points, "GFLOPs per image [full convention]", f"{metric_title} (%)",
                 f"{summary['config']['task']}: {metric_title} vs FLOPs")
        written.append(path)
    latency_points = [(1000 * entry["latency_s_per_image"], 100 * entry["metrics"][metric], entry["configuration"])
                      for entry in entries if entry.get("latency_s_per_image")]
    if latency_points:
        path = directory / PLOTS[1]
        _scatter(path, latency_points, f"ms per image ({summary['environment']['device']})", f"{metric_title} (%)",
                 f"{summary['config']['task']}: {metric_title} vs latency")
        written.append(path)
    layered = [entry for entry in summary["results"] if entry.get("tokens_per_layer")]
    if layered:
        figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
        for entry in layered:
            counts = entry["tokens_per_layer"]
            axes.step(range(len(counts) + 1), counts + counts[-1:], where="post", label=entry["configuration"])
        axes.set_xlabel("layer")
        axes.set_ylabel("tokens entering the layer")
        axes.set_title("tokens per layer", fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        path = directory / PLOTS[2]
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written
