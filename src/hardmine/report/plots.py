"""Plots of comparisons: mean curves over seeds and AP bars, as PNG files (a run's own loss plot
is ``hardmine.engine.rundir.plot_run``).

Figures are made with ``matplotlib.figure.Figure`` rather than ``pyplot``: no global backend or
figure state, so plotting works without a display and from any thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from hardmine.engine.rundir import save_figure
from hardmine.report.stats import Interval

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


def plot_curves(
    curves: Mapping[str, Mapping[int, float]],
    path: str | Path,
    *,
    ylabel: str,
    xlabel: str = "step",
) -> Path:
    """One line per label, on linear axes, points marked (evaluations are few).

    Args:
        curves: label -> (x -> y).
        path: the PNG to write (its folder is created).
        ylabel: what y is.
        xlabel: what x is.
    """
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, curve in curves.items():
        xs = sorted(curve)
        ax.plot(xs, [curve[x] for x in xs], label=label, marker="o")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_results(
    seeds: Mapping[str, Mapping[int, Mapping[str, float]]],
    deltas: Mapping[str, tuple[str, Interval]],
    errors: Mapping[str, Mapping[str, float]],
    path: str | Path,
) -> Path:
    """Three panels: AP and AP50 per method with each seed as a dot; each method's paired ΔAP to
    its baseline with the 95 % interval; where the AP50 goes (ΔAP50 from fixing each error type).

    Args:
        seeds: method -> seed -> metrics (AP values in [0, 1]).
        deltas: method -> (its baseline, the interval of ΔAP in [0, 1]).
        errors: method -> error type -> ΔAP50 in [0, 1] (``hardmine.report.run_errors``).
        path: the PNG to write (its folder is created).
    """
    methods = list(seeds)
    fig = Figure(figsize=(17, 5), layout="constrained")
    ax_ap, ax_delta, ax_err = fig.subplots(1, 3, width_ratios=[1.1, 0.9, 1.6])

    width = 0.38
    for k, key in enumerate(("AP50", "AP")):
        xs = np.arange(len(methods)) + (k - 0.5) * width
        means = [100 * np.mean([m[key] for m in seeds[name].values()]) for name in methods]
        ax_ap.bar(xs, means, width, label=key, alpha=0.75)
        for x, name in zip(xs, methods, strict=True):
            values = [100 * m[key] for m in seeds[name].values()]
            ax_ap.plot([x] * len(values), values, "k.", markersize=4)
    ax_ap.set_xticks(range(len(methods)), methods, rotation=25, ha="right")
    ax_ap.set_ylabel("COCO AP (%): bars the mean, dots the seeds")
    ax_ap.set_title("AP per method")
    ax_ap.grid(axis="y", alpha=0.3)
    ax_ap.legend(fontsize="small")

    rows = list(deltas)
    for y, name in enumerate(rows):
        interval = deltas[name][1]
        mean = 100 * interval.mean
        if interval.n > 1:
            err = [[mean - 100 * interval.low], [100 * interval.high - mean]]
            ax_delta.errorbar(mean, y, xerr=err, fmt="o", capsize=4, color="C0")
        else:
            ax_delta.plot(mean, y, "o", color="C0")
    ax_delta.axvline(0, color="0.4", linewidth=1)
    ax_delta.set_yticks(range(len(rows)), [f"{n}\nvs {deltas[n][0]}" for n in rows])
    ax_delta.invert_yaxis()
    ax_delta.set_xlabel("ΔAP (points), paired by seed, 95 % t-interval")
    ax_delta.set_title("Did it differ from its baseline?")
    ax_delta.grid(axis="x", alpha=0.3)

    types = list(dict.fromkeys(t for e in errors.values() for t in e))
    if types:
        bar = 0.8 / max(len(errors), 1)
        for i, (name, e) in enumerate(errors.items()):
            xs = np.arange(len(types)) + (i - (len(errors) - 1) / 2) * bar
            ax_err.bar(xs, [100 * e.get(t, np.nan) for t in types], bar, label=name)
        ax_err.set_xticks(range(len(types)), types, rotation=20, ha="right")
        ax_err.legend(fontsize="small")
    ax_err.set_ylabel("ΔAP50 from fixing the errors of a type (points)")
    ax_err.set_title("Where the AP50 goes (TIDE-style, mean over seeds)")
    ax_err.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)
