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
from typing import Any

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


def _grid(
    panels: Sequence[Sequence[Any]], *, dpi: int, bar_inches: float = 1.2
) -> tuple[Figure, np.ndarray]:
    """A figure of one axes per panel (rows: images, columns: samplers) with room for a colour
    bar of ``bar_inches``.

    Raises:
        ValueError: no panels, or rows of different lengths.
    """
    rows = len(panels)
    cols = len(panels[0]) if rows else 0
    if rows == 0 or cols == 0 or any(len(row) != cols for row in panels):
        raise ValueError("panels must be a non-empty grid with the same number of panels per row")
    fig = Figure(
        figsize=(cols * _PANEL_INCHES + bar_inches, rows * (_PANEL_INCHES + 0.4)),
        dpi=dpi,
        layout="constrained",
    )
    return fig, np.asarray(fig.subplots(rows, cols, squeeze=False))


def _label_rows(axes: np.ndarray, row_labels: Sequence[str]) -> None:
    """Each row's label left of its first panel (set_axis_off hides the y label: text instead)."""
    for r, label in enumerate(row_labels[: axes.shape[0]]):
        axes[r, 0].text(
            -0.04,
            0.5,
            label,
            transform=axes[r, 0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize="small",
        )


def sheet_figure(
    panels: Sequence[Sequence[Panel]], *, row_labels: Sequence[str] = (), dpi: int = 100
) -> Figure:
    """A grid of panels, one row per image and one column per sampler, with one colour bar.

    Raises:
        ValueError: no panels, or rows of different lengths.
    """
    fig, axes = _grid(panels, dpi=dpi)
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            draw_panel(axes[r, c], panel)
    _label_rows(axes, row_labels)
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


def coverage(boxes: Tensor | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The fraction of ``boxes`` that cover each pixel: where a sampler's picks lie.

    Args:
        boxes: ``float [N, 4]`` xyxy in pixels; a pixel is covered when its centre is inside.
        shape: ``(H, W)``.

    Returns:
        ``float64 [H, W]`` in [0, 1]; zeros without boxes.
    """
    height, width = shape
    b = np.asarray(boxes.detach().cpu() if isinstance(boxes, Tensor) else boxes, np.float64)
    b = b.reshape(-1, 4)
    out = np.zeros((height + 1, width + 1))
    if b.shape[0] == 0:
        return out[:height, :width]
    # Pixel x is covered when x1 <= x + 0.5 < x2: columns ceil(x1 - 0.5) .. ceil(x2 - 0.5) - 1.
    x1 = np.clip(np.ceil(b[:, 0] - 0.5), 0, width).astype(int)
    x2 = np.clip(np.ceil(b[:, 2] - 0.5), 0, width).astype(int)
    y1 = np.clip(np.ceil(b[:, 1] - 0.5), 0, height).astype(int)
    y2 = np.clip(np.ceil(b[:, 3] - 0.5), 0, height).astype(int)
    keep = (x2 > x1) & (y2 > y1)
    for ys, xs, sign in ((y1, x1, 1), (y1, x2, -1), (y2, x1, -1), (y2, x2, 1)):
        np.add.at(out, (ys[keep], xs[keep]), sign)
    return out.cumsum(0).cumsum(1)[:height, :width] / b.shape[0]


@dataclass(frozen=True)
class WherePanel:
    """Where one sampler's picked negatives lie on one image, against a reference sampler's.

    Attributes:
        image: ``float [3, H, W]`` in [0, 1].
        gt_boxes: ``float [G, 4]``.
        density: ``float [H, W]``: ``coverage`` of the sampler's picked negatives.
        reference: the reference sampler's (random's) ``density``; None in its own panel.
        title: the panel's title.
        lookalikes: ``float [D, 4]`` boxes of the image's look-alikes (built-in scenes), drawn
            dashed; None or empty when there are none.
    """

    image: Tensor
    gt_boxes: Tensor
    density: np.ndarray
    reference: np.ndarray | None
    title: str
    lookalikes: Tensor | np.ndarray | None = None


def _grey(image: Tensor) -> np.ndarray:
    """The image as dimmed grey, so that colours drawn over it stand out."""
    rgb = image.detach().permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    return 0.25 + 0.5 * grey


def _outline(ax: Axes, boxes: Tensor | np.ndarray | None, colour: str, style: str) -> None:
    if boxes is None:
        return
    b = np.asarray(boxes.detach().cpu() if isinstance(boxes, Tensor) else boxes, np.float64)
    if b.size:
        ax.add_collection(
            PolyCollection(
                _outlines(b.reshape(-1, 4)),
                closed=True,
                facecolors="none",
                edgecolors=colour,
                linewidths=1.5,
                linestyles=style,
            )
        )


def where_sheet(
    panels: Sequence[Sequence[WherePanel]],
    path: str | Path,
    *,
    row_labels: Sequence[str] = (),
    dpi: int = 100,
) -> Path:
    """Where each sampler's negatives go: one row per image, one column per sampler.

    The reference column (random) shows the fraction of its picked negatives covering each pixel;
    every other column the difference to it (red: this sampler puts more of its negatives there,
    blue: fewer), on one colour scale for the sheet. Ground truths are white, look-alikes dashed
    cyan. A sampler that draws like the reference shows an empty panel.

    Raises:
        ValueError: no panels, or rows of different lengths.
    """
    fig, axes = _grid(panels, dpi=dpi, bar_inches=1.6)
    densest = max((float(p.density.max()) for row in panels for p in row), default=0) or 1.0
    diffs = [p.density - p.reference for row in panels for p in row if p.reference is not None]
    widest = max((float(np.abs(d).max()) for d in diffs), default=0) or 1.0
    density_norm, diff_norm = Normalize(0, densest), Normalize(-widest, widest)
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            ax = axes[r, c]
            ax.imshow(_grey(panel.image), cmap="gray", vmin=0, vmax=1)
            if panel.reference is None:
                values, cmap, norm = panel.density, "magma", density_norm
            else:
                values, cmap, norm = panel.density - panel.reference, "RdBu_r", diff_norm
            ax.imshow(values, cmap=cmap, norm=norm, alpha=0.7)
            _outline(ax, panel.gt_boxes, _GT_COLOUR, "-")
            _outline(ax, panel.lookalikes, "cyan", "--")
            ax.set_axis_off()
            ax.set_title(panel.title, fontsize="small")
    _label_rows(axes, row_labels)
    fig.colorbar(
        ScalarMappable(density_norm, "magma"), ax=axes[:, 0], shrink=0.6, location="left"
    ).set_label("share of the reference's negatives covering a pixel")
    if axes.shape[1] > 1:
        fig.colorbar(ScalarMappable(diff_norm, "RdBu_r"), ax=axes[:, 1:], shrink=0.6).set_label(
            "difference of shares to the reference (red: more, blue: fewer)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


@dataclass(frozen=True)
class OverlapPanel:
    """One sampler's picked negatives that overlap a positive, on one image.

    Attributes:
        image: ``float [3, H, W]`` in [0, 1].
        gt_boxes: ``float [G, 4]``.
        boxes: ``float [N, 4]`` candidates.
        iou_pn: ``float [N]``: each candidate's IoU with the positives (IoU(p,n)).
        negative: ``bool [N]``: the candidates assigned negative.
        selection: the sampler's picks.
        title: the sampler's name.
    """

    image: Tensor
    gt_boxes: Tensor
    boxes: Tensor
    iou_pn: Tensor
    negative: Tensor
    selection: Selection
    title: str


#: Picked negatives overlapping a positive less than this are left out of ``overlap_sheet``: the
#: upper of the Overlap Sampler's two soft bins over [0, 0.7) (Chen et al., Table 2(b): K = 2).
MIN_IOU_PN = 0.35


def overlap_sheet(
    panels: Sequence[Sequence[OverlapPanel]],
    path: str | Path,
    *,
    row_labels: Sequence[str] = (),
    dpi: int = 100,
) -> Path:
    """Each sampler's picked negatives with IoU(p,n) >= ``MIN_IOU_PN`` only, coloured by it:
    the negatives the Overlap Sampler seeks, and how many of them each sampler takes.

    Raises:
        ValueError: no panels, or rows of different lengths.
    """
    fig, axes = _grid(panels, dpi=dpi)
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            ax = axes[r, c]
            ax.imshow(_grey(panel.image), cmap="gray", vmin=0, vmax=1)
            iou = panel.iou_pn.detach().cpu().double().numpy()
            picked = (panel.selection.mask & panel.negative).cpu().numpy()
            shown = np.flatnonzero(picked & (iou >= MIN_IOU_PN))
            shown = shown[np.argsort(iou[shown], kind="stable")]  # the most overlapping on top
            boxes = panel.boxes.detach().cpu().double().numpy()
            ax.add_collection(
                PolyCollection(
                    _outlines(boxes[shown]),
                    closed=True,
                    facecolors="none",
                    edgecolors=ScalarMappable(_NORM, COLORMAP).to_rgba(iou[shown]),
                    linewidths=1.0,
                )
            )
            _outline(ax, panel.gt_boxes, _GT_COLOUR, "-")
            height, width = panel.image.shape[-2:]
            ax.set_xlim(-0.5, width - 0.5)
            ax.set_ylim(height - 0.5, -0.5)
            ax.set_axis_off()
            ax.set_title(
                f"{panel.title}\n{len(shown)} of {int(picked.sum())} negatives "
                f"with IoU(p,n) ≥ {MIN_IOU_PN}",
                fontsize="small",
            )
    _label_rows(axes, row_labels)
    fig.colorbar(ScalarMappable(_NORM, COLORMAP), ax=axes, shrink=0.8, pad=0.01).set_label(
        "IoU(p,n): the picked negative's IoU with the positives"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
