"""Plots of comparisons: mean curves over seeds and AP bars, as PNG files (a run's own loss plot
is ``hardmine.engine.rundir.plot_run``).

Figures are made with ``matplotlib.figure.Figure`` rather than ``pyplot``: no global backend or
figure state, so plotting works without a display and from any thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from hardmine.engine.rundir import save_figure

AP_KEYS = ("AP", "AP50", "AP75")


def mean_curve(curves: Sequence[Mapping[int, float]]) -> dict[int, float]:
    """The mean of several step -> value curves over the steps they all have (seeds of a method)."""
    if not curves:
        return {}
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return {s: sum(c[s] for c in curves) / len(curves) for s in steps}


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
    return save_figure(fig, path)
