"""Drawings of a sampler's picks: the image, its ground truths, and the picked candidates.

A panel shows one image under one sampler. Ground truths are white; picked positives are solid,
picked negatives dashed, both coloured by their IoU with the ground truth (one colour scale for
the whole sheet, shown by a colour bar) and drawn with a line width proportional to their loss
weight (the overlap sampler's ε shows as a thicker box). Higher-IoU boxes are drawn on top.

Figures use ``matplotlib.figure.Figure`` (Agg, no ``pyplot`` state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PolyCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import Tensor

from hardmine.structures import Assignment, Selection

#: IoU with the ground truth -> colour; perceptually ordered, readable on dark and light images.
COLORMAP = "plasma"
_NORM = Normalize(0.0, 1.0)
_GT_COLOUR = "white"
_PANEL_INCHES = 3.0


@dataclass(frozen=True)
class Panel:
    """One image under one sampler.

    Attributes:
        image: ``float [3, H, W]`` in [0, 1].
        gt_boxes: ``float [G, 4]`` in the image's pixels.
        boxes: ``float [N, 4]`` candidates in the image's pixels.
        assignment: the candidates' assignment.
        selection: the sampler's picks among them.
        title: shown above the panel (the sampler's name).
    """

    image: Tensor
    gt_boxes: Tensor
    boxes: Tensor
    assignment: Assignment
    selection: Selection
    title: str = ""


def _outlines(boxes: np.ndarray) -> np.ndarray:
    """``[N, 4]`` xyxy -> ``[N, 4, 2]`` rectangle corners."""
    x1, y1, x2, y2 = boxes.T
    return np.stack([np.stack(c, axis=1) for c in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))], 1)


def draw_panel(ax: Axes, panel: Panel, *, line_width: float = 1.0) -> None:
    """Draw ``panel`` on ``ax`` (see the module docstring for the encoding).

    Args:
        ax: the axes to draw on; its ticks are removed.
        panel: what to draw.
        line_width: points per unit of loss weight.
    """
    ax.imshow(panel.image.detach().permute(1, 2, 0).clamp(0, 1).cpu().numpy())
    ax.set_axis_off()
    mask = panel.selection.mask.cpu()
    positive = panel.assignment.positive.cpu()
    iou = panel.assignment.max_iou.detach().cpu().double().numpy()
    weight = panel.selection.weight.detach().cpu().double().numpy()
    boxes = panel.boxes.detach().cpu().double().numpy()
    for chosen, style in ((mask & ~positive, "--"), (mask & positive, "-")):
        index = np.flatnonzero(chosen.numpy())
        index = index[np.argsort(iou[index], kind="stable")]  # the best-overlapping on top
        ax.add_collection(
            PolyCollection(
                _outlines(boxes[index]),
                closed=True,
                facecolors="none",
                edgecolors=ScalarMappable(_NORM, COLORMAP).to_rgba(iou[index]),
                linewidths=line_width * weight[index],
                linestyles=style,
            )
        )
    gts = panel.gt_boxes.detach().cpu().double().numpy().reshape(-1, 4)
    ax.add_collection(
        PolyCollection(
            _outlines(gts),
            closed=True,
            facecolors="none",
            edgecolors=_GT_COLOUR,
            linewidths=2 * line_width,
        )
    )
    # Boxes may reach past the image; the image, not the boxes, sets the panel's extent.
    height, width = panel.image.shape[-2:]
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    num_pos = int((mask & positive).sum())
    num_neg = int((mask & panel.assignment.negative.cpu()).sum())
    ax.set_title(f"{panel.title}\n{num_pos} pos / {num_neg} neg", fontsize="small")


def _colour_bar(fig: Figure, axes: np.ndarray) -> None:
    bar = fig.colorbar(ScalarMappable(_NORM, COLORMAP), ax=axes, shrink=0.8, pad=0.01)
    bar.set_label("IoU with ground truth (solid: positive, dashed: negative; width: weight)")


def panel_figure(panel: Panel, *, dpi: int = 100) -> Figure:
    """A figure of one panel with the colour bar."""
    fig = Figure(figsize=(_PANEL_INCHES + 1.2, _PANEL_INCHES + 0.4), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    draw_panel(ax, panel)
    _colour_bar(fig, np.array([ax]))
    return fig


def render(fig: Figure) -> np.ndarray:
    """The pixels of ``fig``: ``uint8 [H, W, 4]`` RGBA."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def write_panel(panel: Panel, path: str | Path, *, dpi: int = 100) -> Path:
    """One panel as a PNG (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panel_figure(panel, dpi=dpi).savefig(path)
    return path


def sheet_figure(
    panels: Sequence[Sequence[Panel]], *, row_labels: Sequence[str] = (), dpi: int = 100
) -> Figure:
    """A grid of panels, one row per image and one column per sampler, with one colour bar.

    Raises:
        ValueError: no panels, or rows of different lengths.
    """
    rows = len(panels)
    cols = len(panels[0]) if rows else 0
    if rows == 0 or cols == 0 or any(len(row) != cols for row in panels):
        raise ValueError("panels must be a non-empty grid with the same number of panels per row")
    fig = Figure(
        figsize=(cols * _PANEL_INCHES + 1.2, rows * (_PANEL_INCHES + 0.4)),
        dpi=dpi,
        layout="constrained",
    )
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            draw_panel(axes[r, c], panel)
        if r < len(row_labels):
            # set_axis_off hides the y label, so the row label goes in as text.
            axes[r, 0].text(
                -0.04,
                0.5,
                row_labels[r],
                transform=axes[r, 0].transAxes,
                rotation=90,
                ha="right",
                va="center",
                fontsize="small",
            )
    _colour_bar(fig, axes)
    return fig


def overview_sheet(
    panels: Sequence[Sequence[Panel]],
    path: str | Path,
    *,
    row_labels: Sequence[str] = (),
    dpi: int = 100,
) -> Path:
    """``sheet_figure`` written as a PNG (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet_figure(panels, row_labels=row_labels, dpi=dpi).savefig(path)
    return path
