"""Drawings of picks: files are written, and panels differ exactly where the picks differ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hardmine.assign import assign_max_iou
from hardmine.report.draw import (
    OverlapPanel,
    Panel,
    WherePanel,
    coverage,
    overlap_sheet,
    overview_sheet,
    panel_figure,
    render,
    where_sheet,
    write_panel,
)
from hardmine.structures import Selection


def _panel(mask: list[bool], weight: float = 1.0, title: str = "random") -> Panel:
    gt = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    boxes = torch.tensor(
        [[10.0, 10.0, 40.0, 40.0], [30.0, 30.0, 60.0, 60.0], [2.0, 44.0, 20.0, 62.0], *gt.tolist()]
    )
    assignment = assign_max_iou([boxes], [gt], [torch.tensor([1])])[0]
    m = torch.tensor(mask)
    w = torch.where(m, torch.tensor([weight, 1.0, 1.0, 1.0]), 0.0)
    image = torch.linspace(0, 1, 3 * 64 * 64).reshape(3, 64, 64)
    return Panel(image, gt, boxes, assignment, Selection(m, w), title=title)


def test_panels_differ_where_picks_differ() -> None:
    base = render(panel_figure(_panel([True, True, False, True])))
    same = render(panel_figure(_panel([True, True, False, True])))
    other_negative = render(panel_figure(_panel([True, False, True, True])))
    heavier = render(panel_figure(_panel([True, True, False, True], weight=2.0)))
    assert np.array_equal(base, same)
    assert not np.array_equal(base, other_negative)
    assert not np.array_equal(base, heavier)  # ε's weight shows as a thicker box


def test_files_written(tmp_path: Path) -> None:
    panels = [
        [_panel([True, True, False, True]), _panel([True, False, True, True], title="overlap")],
        [_panel([False, True, True, True]), _panel([True, True, True, True], title="overlap")],
    ]
    one = write_panel(panels[0][0], tmp_path / "panels" / "a.png")
    sheet = overview_sheet(panels, tmp_path / "sheet.png", row_labels=["image 0", "image 1"])
    for path in (one, sheet):
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 5_000
    with pytest.raises(ValueError, match="grid"):
        overview_sheet([panels[0], panels[1][:1]], tmp_path / "bad.png")


def test_coverage_counts_the_boxes_over_each_pixel_centre() -> None:
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 4.0, 3.0], [2.6, 0.0, 3.4, 1.0]])
    expected = np.zeros((4, 5))
    expected[0:2, 0:2] += 1  # centres 0.5 and 1.5 inside [0, 2)
    expected[1:3, 1:4] += 1
    # The third box covers no pixel centre: 2.5 and 3.5 lie outside [2.6, 3.4).
    assert np.array_equal(coverage(boxes, (4, 5)), expected / 3)
    assert coverage(torch.zeros(0, 4), (3, 3)).sum() == 0


def test_where_and_overlap_sheets(tmp_path: Path) -> None:
    image = torch.linspace(0, 1, 3 * 64 * 64).reshape(3, 64, 64)
    gt = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    random = coverage(torch.tensor([[0.0, 0.0, 20.0, 20.0], [40.0, 40.0, 60.0, 60.0]]), (64, 64))
    other = coverage(torch.tensor([[30.0, 30.0, 60.0, 60.0]]), (64, 64))
    look = np.array([[44.0, 2.0, 60.0, 18.0]])

    def sheet(density: np.ndarray, name: str) -> bytes:
        row = [
            WherePanel(image, gt, random, None, "random", lookalikes=look),
            WherePanel(image, gt, density, random, "ohem − random", lookalikes=look),
        ]
        return where_sheet([row], tmp_path / name).read_bytes()

    assert sheet(other, "a.png") != sheet(random, "b.png")  # same as random: an empty panel
    panel = _panel([True, True, True, True])
    iou_pn = torch.tensor([0.0, 0.4, 0.05, 0.0])
    negative = panel.assignment.negative
    overlap = OverlapPanel(image, gt, panel.boxes, iou_pn, negative, panel.selection, "overlap")
    path = overlap_sheet([[overlap, overlap]], tmp_path / "overlaps.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="grid"):
        where_sheet([], tmp_path / "bad.png")
