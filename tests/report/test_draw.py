"""Drawings of picks: files are written, and panels differ exactly where the picks differ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hardmine.assign import assign_max_iou
from hardmine.report.draw import Panel, overview_sheet, panel_figure, render, write_panel
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
