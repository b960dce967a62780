"""Every sampler in SAMPLERS through the same invariants, edge cases and determinism."""

from __future__ import annotations

import pytest
import torch

from hardmine.boxes import box_iou
from hardmine.sample import SAMPLERS
from hardmine.structures import Assignment, RoIScores, Sampler

NUM, POS_FRACTION = 64, 0.25


def _make(name: str) -> Sampler:
    if name == "ohem":
        return SAMPLERS[name](num=NUM)
    return SAMPLERS[name](num=NUM, pos_fraction=POS_FRACTION)


def _extra(sampler: Sampler, boxes: list[torch.Tensor], seed: int = 0) -> dict:
    """``scores=`` for samplers with ``needs_scores`` (PISA): what a read-only pass would give,
    with foreground scores in [0, 0.07), so that some negatives fall below PISA's 0.05."""
    if not getattr(sampler, "needs_scores", False):
        return {}
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for b in boxes:
        n = b.shape[0]
        loss = torch.rand(n, generator=gen) + 0.1
        scores.append(
            RoIScores(
                loss=loss,
                cls_loss=loss,
                score=torch.rand(n, generator=gen) * 0.07,
                label=torch.ones(n, dtype=torch.int64),
                box=b + torch.rand(n, 4, generator=gen) * 4,
            )
        )
    return {"scores": scores}


def _assign(boxes: torch.Tensor, gts: torch.Tensor) -> Assignment:
    """Max-IoU assignment: positive >= 0.5, ignore in [0.4, 0.5), negative below."""
    if gts.shape[0] == 0 or boxes.shape[0] == 0:
        return Assignment.empty(boxes.shape[0])
    best, index = box_iou(gts, boxes).max(0)
    label = torch.where(best >= 0.5, 1, torch.where(best < 0.4, 0, -1)).to(torch.int8)
    return Assignment(label, index, best, torch.where(label == 1, index + 1, 0))


def _image(gen: torch.Generator, n: int, g: int):
    gts = torch.rand(g, 2, generator=gen) * 200
    gts = torch.cat([gts, gts + 20 + torch.rand(g, 2, generator=gen) * 60], 1)
    xy = torch.rand(n, 2, generator=gen) * 260 - 30  # some leave the image
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 80], 1)
    boxes = torch.cat([boxes, gts])  # ground-truth copies, as the model integration appends
    return boxes, _assign(boxes, gts)


def _batch(seed: int = 0):
    """A mixed batch: ordinary, no ground truth, no candidates, fewer than asked, degenerate."""
    gen = torch.Generator().manual_seed(seed)
    images = [_image(gen, 400, 4), _image(gen, 150, 0), _image(gen, 0, 0), _image(gen, 20, 2)]
    # All-equal IoUs, zero-area and far out-of-image boxes, with ignores.
    boxes = torch.tensor([[5.0, 5.0, 5.0, 5.0], [-100.0, -90.0, -50.0, -40.0]]).repeat(30, 1)
    label = torch.tensor([0, 0, 1, -1] * 15, dtype=torch.int8)
    degenerate = Assignment(
        label, torch.zeros(60, dtype=torch.long), torch.full((60,), 0.3), label.long()
    )
    images.append((boxes, degenerate))
    boxes = [b for b, _ in images]
    assignments = [a for _, a in images]
    losses = [torch.rand(b.shape[0], generator=gen) for b in boxes]
    return boxes, assignments, losses


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_invariants(name):
    sampler = _make(name)
    assert isinstance(sampler, Sampler)
    boxes, assignments, losses = _batch()
    gen = torch.Generator().manual_seed(0)
    extra = _extra(sampler, boxes)
    selections = sampler(boxes, assignments, losses=losses, generator=gen, **extra)
    assert len(selections) == len(assignments)
    for sel, a in zip(selections, assignments, strict=True):
        n = a.num_candidates
        assert sel.mask.dtype == torch.bool and sel.mask.shape == (n,)
        assert sel.weight.is_floating_point() and sel.weight.shape == (n,)
        pos, neg = int((sel.mask & a.positive).sum()), int((sel.mask & a.negative).sum())
        assert pos + neg == sel.num_picked  # ignored never picked; masks cannot repeat a pick
        assert sel.num_picked <= NUM
        if name != "ohem":  # OHEM has no fg/bg ratio by default, and NMS may leave fewer
            assert pos == min(int(a.positive.sum()), int(NUM * POS_FRACTION))
            assert neg == min(int(a.negative.sum()), NUM - pos)
        assert (sel.weight >= 0).all() and (sel.weight[~sel.mask] == 0).all()
        assert (sel.weight[sel.mask] > 0).all()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_seed_same_picks_and_seeds_differ(name):
    sampler = _make(name)
    boxes, assignments, losses = _batch()
    extra = _extra(sampler, boxes)

    def picks(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat(
            [s.mask for s in sampler(boxes, assignments, losses=losses, generator=gen, **extra)]
        )

    assert torch.equal(picks(1), picks(1))
    assert torch.equal(picks(1), picks(2)) == (name == "ohem")  # OHEM is deterministic


# What each sampler reads, and so must reject when non-finite.
READS = {
    "random": (),
    "ohem": ("boxes", "losses"),
    "iou_balanced": ("max_iou",),
    "overlap": ("boxes", "max_iou"),
    "pisa": ("scores",),
}


@pytest.mark.parametrize(
    ("name", "field"), [(name, field) for name in sorted(SAMPLERS) for field in READS[name]]
)
@pytest.mark.parametrize("image", [0, 3])
def test_non_finite_input_raises(name, field, image):
    boxes, assignments, losses = _batch()
    extra = _extra(_make(name), boxes)
    if field == "scores":
        old = extra["scores"][image]
        score = old.score.clone()
        score[3] = float("nan")
        extra["scores"][image] = RoIScores(old.loss, old.cls_loss, score, old.label, old.box)
    elif field == "boxes":
        boxes[image] = boxes[image].clone()
        boxes[image][3, 1] = float("inf")
    elif field == "losses":
        losses[image] = losses[image].clone()
        losses[image][3] = float("nan")
    else:
        a = assignments[image]
        max_iou = a.max_iou.clone()
        max_iou[3] = float("nan")
        assignments[image] = Assignment(a.label, a.gt_index, max_iou, a.gt_class)
    # The error names the image (the stranger's check: the samplers said only "boxes").
    named = rf"^{field}(\.score)?\[{image}\]: contains NaN or infinite"
    with pytest.raises(ValueError, match=named):
        _make(name)(boxes, assignments, losses=losses, **extra)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a_batch_of_empty_images(name):
    gen = torch.Generator().manual_seed(0)
    sampler = _make(name)
    sels = sampler(
        [torch.zeros(0, 4)] * 2,
        [Assignment.empty(0)] * 2,
        losses=[torch.zeros(0)] * 2,
        generator=gen,
        **_extra(sampler, [torch.zeros(0, 4)] * 2),
    )
    assert [s.mask.shape for s in sels] == [(0,), (0,)]
