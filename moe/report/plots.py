"""PNG plots for the run report: loss per task, validation perplexity per task, expert usage
heatmaps, drop rate and load balance per MoE layer, throughput and step time.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, so no pyplot state or
display is touched. Each function takes already-parsed metrics, writes one PNG and returns
True, or returns False without writing when there is nothing to plot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from moe.runfiles import EvalLine, TrainLine


def number(x: Any) -> float | None:
    """``x`` as a finite float, or None (missing, null, nan, inf, not a number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def series(lines: Sequence[TrainLine], get: Callable[[TrainLine], Any]):
    """``(steps, values)`` of ``get(line)`` over the lines where it is a number."""
    steps, values = [], []
    for line in lines:
        step, value = number(line.step), number(get(line))
        if step is not None and value is not None:
            steps.append(step)
            values.append(value)
    return steps, values


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 3.6):
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save(fig: Figure, path: Path) -> bool:
    fig.savefig(path, dpi=100)
    return True


def loss_curves(train: Sequence[TrainLine], tasks: Sequence[str], path: Path) -> bool:
    """Training loss per task (and the total) against step."""
    fig, axes = new_figure()
    ax, drawn = axes[0, 0], 0
    for name in tasks:
        steps, values = series(train, lambda x, n=name: getattr(x.tasks.get(n), "loss", None))
        if steps:
            ax.plot(steps, values, label=name)
            drawn += 1
    steps, values = series(train, lambda x: x.loss)
    if steps:
        ax.plot(steps, values, label="total", color="black", linewidth=1, alpha=0.6)
        drawn += 1
    if not drawn:
        return False
    ax.set(xlabel="step", ylabel="training loss (nats/token)", title="Loss per task")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return save(fig, path)


def validation_curves(evals: Sequence[EvalLine], tasks: Sequence[str], path: Path) -> bool:
    """Perplexity of each task on the validation split against step (the evaluations made
    during training, and any `moe eval --split valid`)."""
    valid = sorted((e for e in evals if e.split == "valid"), key=lambda e: e.step or 0)
    fig, axes = new_figure()
    ax = axes[0, 0]
    for name in tasks:
        get = lambda e, n=name: getattr(e.tasks.get(n), "perplexity", None)  # noqa: E731
        steps, values = series(valid, get)
        if steps:
            ax.plot(steps, values, marker=".", label=name)
    if not ax.lines:
        return False
    ax.set(xlabel="step", ylabel="perplexity", title="Validation perplexity per task")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return save(fig, path)


def expert_usage(usage: dict[str, dict[str, Sequence[float]]], path: Path) -> bool:
    """Heatmaps of the fraction of each task's tokens sent to each expert: one panel per MoE
    layer, tasks as rows, experts as columns."""
    layers = [name for name, by_task in usage.items() if by_task]
    if not layers:
        return False
    ncols = min(len(layers), 3)
    nrows = math.ceil(len(layers) / ncols)
    fig, axes = new_figure(ncols, nrows, width=5.0, height=0.6 + 0.45 * _max_tasks(usage) + 1.2)
    for ax in axes.flat[len(layers) :]:
        ax.set_visible(False)
    for ax, layer in zip(axes.flat, layers):
        tasks = list(usage[layer])
        width = max(len(v) for v in usage[layer].values())
        grid = np.full((len(tasks), width), np.nan)  # [tasks, E]
        for row, task in enumerate(tasks):
            values = [number(v) for v in usage[layer][task]]
            grid[row, : len(values)] = [np.nan if v is None else v for v in values]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_yticks(range(len(tasks)), tasks, fontsize="small")
        ax.set(xlabel="expert", title=layer)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax, label="fraction of tokens")
    return save(fig, path)


def _max_tasks(usage: dict[str, dict[str, Sequence[float]]]) -> int:
    return max((len(by_task) for by_task in usage.values()), default=1)


def routing_curves(train: Sequence[TrainLine], layers: Sequence[str], path: Path) -> bool:
    """Fraction of token choices dropped (over capacity) and load CV (std/mean of the tokens
    per expert) against step, one line per MoE layer."""
    fig, axes = new_figure(ncols=2)
    drawn = 0
    for ax, stat, label, title in (
        (axes[0, 0], "dropped_fraction", "dropped fraction", "Tokens dropped (over capacity)"),
        (axes[0, 1], "load_cv", "load CV (std/mean)", "Load balance (CV of expert load)"),
    ):
        for layer in layers:
            steps, values = series(train, lambda x, m=layer, s=stat: x.layer_stat(m, s))
            if steps:
                ax.plot(steps, values, label=layer)
                drawn += 1
        ax.set(xlabel="step", ylabel=label, title=title)
        ax.grid(alpha=0.3)
        if ax.lines and len(layers) <= 12:
            ax.legend(fontsize="x-small")
    return save(fig, path) if drawn else False


def throughput(train: Sequence[TrainLine], path: Path) -> bool:
    """Tokens per second and step time (ms) of each logging window, steady state: the window
    of the compiling step and the time of evaluations and checkpoints are left out."""
    fig, axes = new_figure(ncols=2)
    drawn = 0
    for ax, key, label in (
        (axes[0, 0], "tokens_per_second", "tokens / s"),
        (axes[0, 1], "step_time_ms", "step time (ms)"),
    ):
        steps, values = series(train, lambda x, k=key: getattr(x, k))
        if steps:
            ax.plot(steps, values, marker=".", linewidth=1)
            drawn += 1
        ax.set(xlabel="step", ylabel=label, title=label)
        ax.grid(alpha=0.3)
    return save(fig, path) if drawn else False
