"""Half precision: every assigner, sampler and model path gives float32's answer for float16 and
bfloat16 boxes (DESIGN.md, "Errors, faults and precision").

The reference is always float32 on the *same* boxes: the half-precision values converted to
float32, so that the only difference is the precision of the arithmetic. Coordinates reach 1300 px
(an 800 px box's area overflows float16) and the scenes are large enough that IoUs fall within
float16's rounding of every threshold and bin edge.
"""

from __future__ import annotations

import pytest
import torch

from hardmine.assign import ATSSAssigner, MaxIoUAssigner, assign_atss, assign_max_iou
from hardmine.boxes import box_iou, nms_first
from hardmine.data import SceneDataset, collate_fn
from hardmine.mine.falsepos import ImageDetections, false_positives, fp_per_image_at_recall
from hardmine.models import build, with_sampler
from hardmine.sample import (
    SAMPLERS,
    IoUBalancedSampler,
    MinedNegativeSampler,
    OHEMSampler,
    OverlapSampler,
    RandomSampler,
)
from hardmine.structures import Assignment, RoIScores

HALF = [torch.float16, torch.bfloat16]


def _image(gen: torch.Generator, n: int, g: int, size: float = 1300.0):
    """Proposals (a quarter of them jittered ground truths), and ground truths appended."""
    gts = torch.rand(g, 2, generator=gen) * size * 0.6
    gts = torch.cat([gts, gts + 40 + torch.rand(g, 2, generator=gen) * 500], 1)
    xy = torch.rand(n, 2, generator=gen) * size
    boxes = torch.cat([xy, xy + 20 + torch.rand(n, 2, generator=gen) * 400], 1)
    near = gts[torch.randint(g, (n // 4,), generator=gen)]
    near = near + torch.randn(n // 4, 4, generator=gen) * 25
    return torch.cat([boxes, near, gts]), gts


def _scenes(dtype: torch.dtype, seed: int = 0, sizes=((1500, 6), (800, 3), (1200, 9))):
    """Per image: proposals in ``dtype``, the same values in float32, and ground truths."""
    gen = torch.Generator().manual_seed(seed)
    images = [_image(gen, n, g) for n, g in sizes]
    half = [b.to(dtype) for b, _ in images]
    gts = [g.to(dtype) for _, g in images]  # given in half too: both see the same values
    return half, [b.float() for b in half], gts, [g.float() for g in gts]


def _same_assignment(a: Assignment, b: Assignment) -> None:
    assert torch.equal(a.label, b.label)
    assert torch.equal(a.gt_index, b.gt_index)
    assert torch.equal(a.gt_class, b.gt_class)
    assert b.max_iou.dtype == torch.float32
    assert torch.equal(a.max_iou, b.max_iou)


def test_box_iou_of_a_large_box_with_itself_is_one() -> None:
    a = torch.tensor([[100.0, 100.0, 500.0, 500.0]])
    for dtype in HALF:
        assert box_iou(a.to(dtype), a.to(dtype)).tolist() == [[1.0]]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("ignore", [False, True])
def test_max_iou_assigner(dtype: torch.dtype, ignore: bool) -> None:
    half, full, gts_h, gts_f = _scenes(dtype)
    labels = [torch.arange(1, g.shape[0] + 1) for g in gts_f]
    ign_h = [g[:1] + 30 for g in gts_h] if ignore else None
    ign_f = [b.float() for b in ign_h] if ign_h else None
    for kwargs in ({}, {"low_quality": True, "neg_thr": (0.1, 0.5)}):
        ref = assign_max_iou(full, gts_f, labels, ignore_boxes=ign_f, **kwargs)
        got = assign_max_iou(half, gts_h, labels, ignore_boxes=ign_h, **kwargs)
        for a, b in zip(ref, got, strict=True):
            _same_assignment(a, b)


@pytest.mark.parametrize("dtype", HALF)
def test_max_iou_assigner_with_float32_ground_truths(dtype: torch.dtype) -> None:
    """Under autocast the candidates come in half and the ground truths stay float32: the ground
    truths must not be rounded to the candidates' type."""
    half, full, _, _ = _scenes(dtype)
    gen = torch.Generator().manual_seed(1)
    gts = [torch.rand(5, 4, generator=gen).sort(1).values[:, [0, 1, 2, 3]] for _ in half]
    gts = [torch.cat([g[:, :2] * 700, g[:, :2] * 700 + 101.37], 1) for g in gts]
    labels = [torch.ones(5, dtype=torch.int64) for _ in half]
    ref = assign_max_iou(full, gts, labels)
    got = assign_max_iou(half, gts, labels)
    for a, b in zip(ref, got, strict=True):
        _same_assignment(a, b)


def _anchors(dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    """Square anchors 8 strides wide on three levels of a 1300 px image."""
    levels = []
    for stride in (16, 32, 64):
        ys, xs = torch.meshgrid(
            torch.arange(0, 1300, stride), torch.arange(0, 1300, stride), indexing="ij"
        )
        centres = torch.stack([xs, ys], -1).reshape(-1, 2).float() + stride / 2
        levels.append(torch.cat([centres - 4 * stride, centres + 4 * stride], 1))
    return torch.cat(levels).to(dtype), [lv.shape[0] for lv in levels]


@pytest.mark.parametrize("dtype", HALF)
def test_atss_assigner_with_float32_ground_truths(dtype: torch.dtype) -> None:
    """RetinaNet / FCOS under autocast: anchors in half, ground truths float32 (not rounded)."""
    anchors, per_level = _anchors(dtype)
    gts = [g + 0.3 for g in _scenes(torch.float32, seed=1)[3]]
    labels = [torch.arange(1, g.shape[0] + 1) for g in gts]
    ref = assign_atss([anchors.float()] * 3, gts, labels, num_per_level=per_level)
    got = assign_atss([anchors] * 3, gts, labels, num_per_level=per_level)
    for a, b in zip(ref, got, strict=True):
        _same_assignment(a, b)


@pytest.mark.parametrize("dtype", HALF)
def test_atss_detector_under_autocast(dtype: torch.dtype) -> None:
    """atss_tiny trains under autocast, its assigner given half anchors and float32 boxes, and
    assigns them as float32 would."""
    scenes = SceneDataset(2, seed=0, image_size=64)
    images, targets = collate_fn([scenes[i] for i in range(2)])
    assigner = _RecordingAssigner(ATSSAssigner())
    torch.manual_seed(0)
    model = build("atss_tiny", 4, assigner=assigner).train()
    with torch.autocast("cpu", dtype=dtype):
        losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    anchors, gts, labels, ignore, per_level = assigner.calls[0]
    assert anchors[0].dtype == dtype and gts[0].dtype == torch.float32
    ref = assign_atss(
        [a.float() for a in anchors], gts, labels, num_per_level=per_level, ignore_boxes=ignore
    )
    got = assign_atss(anchors, gts, labels, num_per_level=per_level, ignore_boxes=ignore)
    for a, b in zip(ref, got, strict=True):
        _same_assignment(a, b)


@pytest.mark.parametrize("dtype", HALF)
def test_atss_assigner(dtype: torch.dtype) -> None:
    anchors, per_level = _anchors(dtype)
    _, _, gts_h, gts_f = _scenes(dtype)
    labels = [torch.arange(1, g.shape[0] + 1) for g in gts_f]
    ignore = [g[:1] + 30 for g in gts_f]
    for gts, kwargs in ((gts_h, {}), (gts_f, {}), (gts_h, {"ignore_boxes": ignore})):
        ref = assign_atss([anchors.float()] * 3, gts_f, labels, num_per_level=per_level, **kwargs)
        got = assign_atss([anchors] * 3, gts, labels, num_per_level=per_level, **kwargs)
        for a, b in zip(ref, got, strict=True):
            _same_assignment(a, b)
            assert int(b.positive.sum()) > 0


SAMPLER_CASES = [
    *(cls() for cls in SAMPLERS.values()),
    RandomSampler(pos_fraction=None),
    OHEMSampler(pos_fraction=0.25),
    IoUBalancedSampler(floor_thr=0.0, floor_fraction=0.5),
    OverlapSampler(strategy="hard", pos_strategy="hard"),
    OverlapSampler(strategy="linear", pos_strategy="linear"),
    OverlapSampler(bins="observed"),
    OverlapSampler(gt_copies_in_pe=True, epsilon_on="any_positive"),
    MinedNegativeSampler(OverlapSampler()),
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("sampler", SAMPLER_CASES, ids=repr)
def test_samplers_pick_as_in_float32(dtype: torch.dtype, sampler) -> None:
    half, full, _, gts_f = _scenes(dtype, sizes=((1200, 6), (900, 9)))
    labels = [torch.arange(1, g.shape[0] + 1) for g in gts_f]
    assignments = assign_max_iou(full, gts_f, labels)
    half_iou = [
        Assignment(a.label, a.gt_index, a.max_iou.to(dtype), a.gt_class) for a in assignments
    ]
    gen = torch.Generator().manual_seed(0)
    losses = [torch.rand(b.shape[0], generator=gen).to(dtype) for b in full]
    mined = [torch.arange(b.shape[0]) % 7 == 0 for b in full]
    extra = {"mined": mined} if isinstance(sampler, MinedNegativeSampler) else {}

    def picks(boxes, assigned, loss):
        scores = {}
        if getattr(sampler, "needs_scores", False):  # PISA: scores and boxes in the same type
            scores["scores"] = [
                RoIScores(x, x, x, torch.ones(x.shape[0], dtype=torch.int64), b)
                for x, b in zip(loss, boxes, strict=True)
            ]
        out = sampler(
            boxes,
            assigned,
            losses=loss,
            generator=torch.Generator().manual_seed(3),
            **extra,
            **scores,
        )
        return torch.cat([s.mask for s in out]), torch.cat([s.weight for s in out])

    # The IoUs given in half are compared with float32 on the same (rounded) values.
    rounded = [Assignment(a.label, a.gt_index, a.max_iou.float(), a.gt_class) for a in half_iou]
    for ref_iou, cases in (
        (assignments, [(half, assignments)]),
        (rounded, [(full, half_iou), (half, half_iou)]),
    ):
        ref_mask, ref_weight = picks(full, ref_iou, [x.float() for x in losses])
        for boxes, assigned in cases:
            mask, weight = picks(boxes, assigned, losses)
            assert torch.equal(mask, ref_mask)
            assert torch.equal(weight.float(), ref_weight)


@pytest.mark.parametrize("dtype", HALF)
def test_nms_first_suppresses_as_in_float32(dtype: torch.dtype) -> None:
    """OHEM's NMS: large near-duplicates overflow float16 areas; the survivors are float32's."""
    half, full, _, _ = _scenes(dtype)
    boxes_h, boxes_f = torch.cat(half), torch.cat(full)
    scores = torch.rand(boxes_f.shape[0], generator=torch.Generator().manual_seed(0))
    segment = torch.zeros(boxes_f.shape[0], dtype=torch.int64)
    ref = nms_first(boxes_f, scores, segment, 1, 0.7, 10_000)
    assert 0 < int(ref.sum()) < boxes_f.shape[0]  # some are suppressed
    assert torch.equal(nms_first(boxes_h, scores, segment, 1, 0.7, 10_000), ref)
    assert torch.equal(nms_first(boxes_h, scores, segment, 1, 0.7, 10_000, max_cells=1), ref)


@pytest.mark.parametrize("dtype", HALF)
def test_false_positives_as_in_float32(dtype: torch.dtype) -> None:
    """Detections in half, ground truths in float32 (not rounded to half)."""
    half, full, _, _ = _scenes(dtype)
    gen = torch.Generator().manual_seed(0)
    gts_f = [g + 0.3 for g in _scenes(torch.float32, seed=1)[3]]

    def images(boxes):
        return [
            ImageDetections(
                image_id=i,
                boxes=b,
                scores=torch.rand(b.shape[0], generator=gen.manual_seed(i)),
                labels=torch.ones(b.shape[0], dtype=torch.int64),
                gt_boxes=g,
                gt_labels=torch.ones(g.shape[0], dtype=torch.int64),
                ignore_boxes=g[:1] + 40,
            )
            for i, (b, g) in enumerate(zip(boxes, gts_f, strict=True))
        ]

    ref = false_positives(images(full))
    got = false_positives(images(half))
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    for recall in (0.3, 0.6, 0.9):
        ref_fp = fp_per_image_at_recall(images(full), recall=recall)
        assert fp_per_image_at_recall(images(half), recall=recall) == ref_fp


class _Recorder:
    """A sampler that records what it is given and picks as ``base``."""

    def __init__(self, base) -> None:
        self.base, self.calls = base, []
        self.needs_losses = base.needs_losses

    def __call__(self, boxes, assignments, *, losses=None, mined=None, generator=None):
        self.calls.append((boxes, assignments, losses))
        return self.base(boxes, assignments, losses=losses, generator=generator)


class _RecordingAssigner:
    """An assigner that records its input and assigns as ``base``."""

    def __init__(self, base) -> None:
        self.base, self.calls = base, []

    def __call__(self, candidates, gt_boxes, gt_labels, *, ignore_boxes=None, num_per_level=None):
        self.calls.append((candidates, gt_boxes, gt_labels, ignore_boxes, num_per_level))
        return self.base(
            candidates,
            gt_boxes,
            gt_labels,
            ignore_boxes=ignore_boxes,
            num_per_level=num_per_level,
        )


@pytest.mark.parametrize("dtype", HALF)
def test_rcnn_under_autocast_computes_its_geometry_in_float32(dtype: torch.dtype) -> None:
    """Under autocast the RPN decodes its anchors and proposals in half; the RoI heads and the
    RPN's sampler still see float32 boxes, the ground truths are not rounded to half, and their
    copies among the RoIs have IoU 1 (positive, unless an ignore region covers them)."""
    scenes = SceneDataset(2, seed=0, image_size=64)
    images, targets = collate_fn([scenes[i] for i in range(2)])
    heads, rpn = _Recorder(OHEMSampler(num=32)), _Recorder(RandomSampler(num=64))
    assigner = _RecordingAssigner(MaxIoUAssigner())
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 4)
    model = with_sampler(model, heads, rpn_sampler=rpn, assigner=assigner).train()
    with torch.autocast("cpu", dtype=dtype):
        losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    (boxes, assignments, roi_losses), (anchors, _, _) = heads.calls[0], rpn.calls[0]
    _, gts, _, ignore, _ = assigner.calls[0]
    assert all(b.dtype == torch.float32 for b in [*boxes, *anchors, *gts, *ignore])
    assert all(x.dtype == torch.float32 for x in roi_losses)
    for g, t in zip(gts, targets, strict=True):  # resized from 64 to 128 px, exactly
        assert torch.equal(g, t["boxes"] * 2)
    for b, a, g in zip(boxes, assignments, gts, strict=True):
        copies = slice(b.shape[0] - g.shape[0], None)  # the ground truths, appended
        assert (a.max_iou[copies] == 1).all() and (a.label[copies] != 0).all()
        assert a.positive[copies].any()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("score_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_trains_under_autocast(
    name: str, score_dtype: torch.dtype | None, dtype: torch.dtype
) -> None:
    """A training step under AMP's autocast, for every sampler and every scoring precision (also
    one other than the step's: OHEM's float16 AMP on CUDA with bfloat16 scoring crashed on the
    read-only pass's float16 loss buffer, then on autocast's cast cache)."""
    scenes = SceneDataset(2, seed=0, image_size=64)
    images, targets = collate_fn([scenes[i] for i in range(2)])
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 4, sampler=SAMPLERS[name]()).train()
    if hasattr(model.roi_heads, "score_dtype"):
        model.roi_heads.score_dtype = score_dtype
    with torch.autocast("cpu", dtype=dtype):
        losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


@pytest.mark.parametrize("name", ["fcos_tiny", "atss_fcos_tiny", "retinanet_tiny"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_boxes_train_the_dense_models_as_float32(
    name: str, dtype: torch.dtype
) -> None:
    """S12: float16 boxes gave fcos_tiny a NaN bbox_ctrness (torchvision's FCOS computes its
    centerness target in the boxes' dtype); the transform now takes them in float32, exactly."""
    boxes = torch.tensor([[10.3, 12.7, 50.1, 61.9], [20.0, 30.0, 80.0, 90.0]]).to(dtype)
    image = torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(0))
    losses = {}
    for given in (boxes, boxes.float()):  # the half boxes, and the same values in float32
        torch.manual_seed(0)
        model = build(name, 3, min_size=96, max_size=96).train()
        losses[given.dtype] = model([image], [{"boxes": given, "labels": torch.tensor([1, 2])}])
    assert all(torch.isfinite(v) for v in losses[dtype].values()), losses[dtype]
    for key, value in losses[torch.float32].items():
        assert torch.equal(losses[dtype][key], value), key
