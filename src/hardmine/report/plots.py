"""Plots of runs: loss curves and AP bars, as PNG files.

Figures are made with ``matplotlib.figure.Figure`` rather than ``pyplot``: no global backend or
figure state, so plotting works without a display and from any thread.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

AP_KEYS = ("AP", "AP50", "AP75")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (empty if the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curve(rows: Sequence[Mapping[str, Any]], key: str = "loss") -> dict[int, float]:
    """Step -> ``key`` of the training rows of a metrics log."""
    return {r["step"]: r[key] for r in rows if key in r}


def mean_curve(curves: Sequence[Mapping[int, float]]) -> dict[int, float]:
    """The mean of several step -> value curves over the steps they all have (seeds of a method)."""
    if not curves:
        return {}
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return {s: sum(c[s] for c in curves) / len(curves) for s in steps}


def plot_loss_curves(
    curves: Mapping[str, Mapping[int, float]],
    path: str | Path,
    *,
    ylabel: str = "training loss",
) -> Path:
    """One line per label: a loss against step (points marked: evaluations may be few).

    Args:
        curves: label -> (step -> loss).
        path: the PNG to write (its folder is created).
        ylabel: what the loss is.
    """
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, curve in curves.items():
        steps = sorted(curve)
        marker = "o" if len(steps) < 20 else None
        ax.plot(steps, [curve[s] for s in steps], label=label, marker=marker)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_ap_bars(table: Mapping[str, Mapping[str, tuple[float, float]]], path: str | Path) -> Path:
    """Grouped bars of AP, AP50 and AP75 per method, with the standard deviation over seeds.

    Args:
        table: method -> metric -> (mean, std), AP values in [0, 1].
        path: the PNG to write (its folder is created).
    """
    methods = list(table)
    width = 0.8 / len(AP_KEYS)
    fig = Figure(figsize=(max(6.0, 1.2 * len(methods) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for k, key in enumerate(AP_KEYS):
        means = [100 * table[m].get(key, (float("nan"), 0.0))[0] for m in methods]
        stds = [100 * table[m].get(key, (0.0, 0.0))[1] for m in methods]
        xs = [i + (k - 1) * width for i in range(len(methods))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=key)
    ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right")
    ax.set_ylabel("COCO AP (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
