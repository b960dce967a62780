"""Picks of every sampler on the same candidates, and the IoU histograms of their negatives."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from hardmine.assign import assign_max_iou
from hardmine.report.picks import (
    ALL_NEGATIVES,
    collect_picks,
    iou_histograms,
    overlap_of_candidates,
    plot_histograms,
    write_histograms_csv,
)
from hardmine.sample import SAMPLERS
from hardmine.structures import RoIScores, Sampler

NUM = 16


def _samplers() -> dict[str, Sampler]:
    return {name: cls(num=NUM) for name, cls in SAMPLERS.items()}


def _batch(seed: int = 0):
    """Two images of random boxes around two ground truths (copies appended), and one without."""
    g = torch.Generator().manual_seed(seed)
    gts = [torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 20.0, 90.0, 80.0]]), torch.zeros(0, 4)]
    boxes = []
    for gt in gts:
        xy = torch.rand(60, 2, generator=g) * 80
        b = torch.cat([xy, xy + 10 + torch.rand(60, 2, generator=g) * 40], 1)
        boxes.append(torch.cat([b, gt]))
    labels = [torch.ones(len(gt), dtype=torch.int64) for gt in gts]
    assignments = assign_max_iou(boxes, gts, labels)
    losses = [torch.rand(len(b), generator=g) for b in boxes]
    return boxes, assignments, losses


def _scores(boxes, losses) -> list[RoIScores]:
    """A read-only pass's outputs for PISA (``needs_scores``): the losses as scores."""
    return [
        RoIScores(x, x, x, torch.ones(len(x), dtype=torch.int64), b)
        for x, b in zip(losses, boxes, strict=True)
    ]


def test_collect_picks_order_independent_and_generator_untouched() -> None:
    boxes, assignments, losses = _batch()
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    scores = _scores(boxes, losses)
    picks = collect_picks(
        boxes, assignments, _samplers(), losses=losses, scores=scores, generator=g
    )
    assert torch.equal(g.get_state(), state)
    reversed_samplers = dict(reversed(list(_samplers().items())))
    again = collect_picks(
        boxes, assignments, reversed_samplers, losses=losses, scores=scores, generator=g
    )
    assert set(picks) == set(SAMPLERS)
    for name, selections in picks.items():
        assert len(selections) == len(boxes)
        for a, b in zip(selections, again[name], strict=True):
            assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)


def test_collect_picks_needs_losses_for_ohem() -> None:
    boxes, assignments, _ = _batch()
    with pytest.raises(ValueError, match="ohem"):
        collect_picks(boxes, assignments, {"ohem": SAMPLERS["ohem"](num=NUM)})
    with pytest.raises(ValueError, match="pisa"):
        collect_picks(boxes, assignments, {"pisa": SAMPLERS["pisa"](num=NUM)})


def test_histogram_counts_equal_picked_negatives() -> None:
    boxes, assignments, losses = _batch()
    picks = collect_picks(
        boxes,
        assignments,
        _samplers(),
        losses=losses,
        scores=_scores(boxes, losses),
        generator=torch.Generator().manual_seed(0),
    )
    hist = iou_histograms(boxes, assignments, picks, num_bins=5)
    assert hist.edges.tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    negatives = sum(int(a.negative.sum()) for a in assignments)
    assert hist.total(ALL_NEGATIVES) == negatives
    for name, selections in picks.items():
        picked = sum(
            int((s.mask & a.negative).sum()) for s, a in zip(selections, assignments, strict=True)
        )
        for quantity in ("iou_gt", "iou_pn"):
            assert int(hist.counts[quantity][name].sum()) == picked > 0
    # The negatives' IoU with the ground truth lies below the assigner's threshold, 0.5.
    assert hist.counts["iou_gt"][ALL_NEGATIVES][3:].sum() == 0


def test_overlap_with_positives_exact() -> None:
    """One positive (a ground-truth copy) and a negative overlapping it by 0.6 and another by 0."""
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = [
        torch.tensor([[0.0, 0.0, 10.0, 6.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    ]
    assignments = assign_max_iou(boxes, [gt], [torch.tensor([1])], neg_thr=0.7, pos_thr=0.7)
    assert assignments[0].label.tolist() == [0, 0, 1]
    assert overlap_of_candidates(boxes, assignments)[0].tolist() == pytest.approx([0.6, 0.0, 1.0])
    picks = collect_picks(boxes, assignments, {"random": SAMPLERS["random"](num=3)})
    hist = iou_histograms(boxes, assignments, picks)
    assert np.flatnonzero(hist.counts["iou_pn"]["random"]).tolist() == [0, 6]
    assert hist.share("iou_pn", "random", 0.5) == pytest.approx(0.5)
    assert hist.share("iou_gt", "random", 0.4, 0.7) == pytest.approx(0.5)


def test_csv_and_plot_written(tmp_path: Path) -> None:
    boxes, assignments, losses = _batch()
    picks = collect_picks(
        boxes, assignments, _samplers(), losses=losses, scores=_scores(boxes, losses)
    )
    hist = iou_histograms(boxes, assignments, picks)
    path = write_histograms_csv(hist, tmp_path / "h.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (len(SAMPLERS) + 1) * 10
    for name in picks:
        counted = sum(
            int(r["count"]) for r in rows if r["sampler"] == name and r["quantity"] == "iou_pn"
        )
        assert counted == hist.total(name)
    png = plot_histograms(hist, tmp_path / "sub" / "h.png")
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
