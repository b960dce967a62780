"""FCOS trained with a hardmine assigner (FCOS + ATSS)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

from hardmine.assign.atss import ATSSAssigner, assign_atss
from hardmine.assign.max_iou import MaxIoUAssigner
from hardmine.models import AssignedFCOS, build, with_assigner
from hardmine.models.fcos import to_fcos_matches
from hardmine.sample import RandomSampler
from hardmine.structures import IGNORE, Assigner, Assignment

LOSSES = {"classification", "bbox_regression", "bbox_ctrness"}
STRIDES = (8, 16, 32)
# The batch is padded to the larger image, 160 x 128 (W x H), a multiple of 32 already.
NUM_PER_LEVEL = [16 * 20, 8 * 10, 4 * 5]
IGNORE_BOX = torch.tensor([[64.0, 0.0, 160.0, 64.0]])  # the top right, beside no object


@dataclass
class SpyAssigner:
    """Wraps an assigner and records what it received and returned."""

    assigner: Assigner
    candidates: list[Tensor] = field(default_factory=list)
    num_per_level: list[int] = field(default_factory=list)
    assignments: list[Assignment] = field(default_factory=list)

    def __call__(
        self, candidates, gt_boxes, gt_labels, *, ignore_boxes=None, num_per_level=None
    ) -> list[Assignment]:
        self.candidates = list(candidates)
        self.num_per_level = list(num_per_level)
        self.assignments = self.assigner(
            candidates,
            gt_boxes,
            gt_labels,
            ignore_boxes=ignore_boxes,
            num_per_level=num_per_level,
        )
        return self.assignments

    def ignored(self) -> Tensor:
        """``bool [B, N]``."""
        return torch.stack([a.label == IGNORE for a in self.assignments])


def record_head(model: AssignedFCOS, monkeypatch) -> dict[str, object]:
    """Record the head's outputs (their gradients retained) and the arguments of its loss."""
    seen: dict[str, object] = {}

    def keep_outputs(module, inputs, outputs):
        for value in outputs.values():
            value.retain_grad()
        seen["outputs"] = outputs

    model.head.register_forward_hook(keep_outputs)
    compute_loss = model.head.compute_loss

    def spy(targets, head_outputs, anchors, matched_idxs):
        seen.update(targets=targets, anchors=anchors, matched=matched_idxs)
        return compute_loss(targets, head_outputs, anchors, matched_idxs)

    monkeypatch.setattr(model.head, "compute_loss", spy)
    return seen


def with_ignore(batch, boxes: Tensor = IGNORE_BOX):
    """The batch with ``boxes`` as ignore regions of every image."""
    images, targets = batch
    return images, [t | {"ignore_boxes": boxes} for t in targets]


def test_training_step(batch):
    torch.manual_seed(0)
    model = build("atss_fcos_tiny", 3).train()
    images, targets = with_ignore(batch)
    everywhere = torch.tensor([[-512.0, -512.0, 640.0, 640.0]])  # covers every scaled anchor
    cases = {
        "batch": (images, targets),
        "no ground truth": (images[1:], targets[1:]),
        "only ignored": (images[1:], [targets[1] | {"ignore_boxes": everywhere}]),
    }
    for case, (case_images, case_targets) in cases.items():
        model.zero_grad()
        losses = model(case_images, case_targets)
        assert set(losses) == LOSSES, case
        assert all(bool(torch.isfinite(v)) for v in losses.values()), case
        sum(losses.values()).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads), case
    # Every location ignored: nothing to learn.
    assert all(bool(v == 0) for v in losses.values())
    assert all(bool((g == 0).all()) for g in grads)


def test_ignored_locations_get_no_gradient(batch, monkeypatch):
    torch.manual_seed(0)
    spy = SpyAssigner(ATSSAssigner(topk=9))
    model = with_assigner(build("fcos_tiny", 3), spy, anchor_scale=4).train()
    seen = record_head(model, monkeypatch)
    sum(model(*with_ignore(batch)).values()).backward()
    ignored = spy.ignored()  # [B, N]
    assert ignored.sum(dim=1).min() > 0  # in both images, the one without ground truth too
    for key, output in seen["outputs"].items():
        assert torch.all(output.grad[ignored] == 0), key
    # Every other location is a positive or a negative of the focal loss.
    assert torch.all(seen["outputs"]["cls_logits"].grad[~ignored].abs().sum(dim=-1) > 0)


def test_loss_equals_the_loss_without_ignored_locations(batch, monkeypatch):
    """One image: the losses are FCOS's own on the locations that are not ignored."""
    torch.manual_seed(0)
    spy = SpyAssigner(ATSSAssigner(topk=9))
    model = with_assigner(build("fcos_tiny", 3), spy, anchor_scale=4).train()
    seen = record_head(model, monkeypatch)
    images, targets = with_ignore(batch)
    actual = model(images[:1], targets[:1])
    keep = ~spy.ignored()[0]
    assert 0 < int(keep.sum()) < keep.numel()
    outputs, anchors, matched = seen["outputs"], seen["anchors"], seen["matched"]
    with torch.no_grad():
        expected = model.head.compute_loss(
            seen["targets"],
            {k: v[:, keep] for k, v in outputs.items()},
            [anchors[0][keep]],
            [matched[0][keep]],
        )
        # torchvision's loss as it is would count the ignored locations as background.
        as_negatives = model.head.compute_loss(seen["targets"], outputs, anchors, matched)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, msg=key)
    assert as_negatives["classification"] > actual["classification"].detach()


def test_assignment_is_atss_on_scaled_anchors(batch, monkeypatch):
    """The model keeps FCOS's anchors (one stride); ATSS sees them 8 strides wide (the paper)."""
    torch.manual_seed(0)
    spy = SpyAssigner(ATSSAssigner(topk=9))
    model = with_assigner(build("fcos_tiny", 3), spy).train()
    assert model.anchor_scale == 8
    seen = record_head(model, monkeypatch)
    images, targets = with_ignore(batch)
    model(images, targets)
    assert spy.num_per_level == NUM_PER_LEVEL

    stride = torch.cat(
        [torch.full((n,), float(s)) for n, s in zip(NUM_PER_LEVEL, STRIDES, strict=True)]
    )
    for anchors, candidates in zip(seen["anchors"], spy.candidates, strict=True):
        sizes = anchors[:, 2:] - anchors[:, :2]  # [N, 2]
        assert torch.equal(sizes, stride[:, None].expand(-1, 2))
        centers = (anchors[:, :2] + anchors[:, 2:]) / 2
        scaled = torch.cat([centers - 4 * stride[:, None], centers + 4 * stride[:, None]], dim=1)
        torch.testing.assert_close(candidates, scaled)

    expected = assign_atss(
        spy.candidates,
        [t["boxes"] for t in seen["targets"]],
        [t["labels"] for t in seen["targets"]],
        num_per_level=NUM_PER_LEVEL,
        topk=9,
        ignore_boxes=[t["ignore_boxes"] for t in seen["targets"]],
    )
    for a, matched in zip(expected, seen["matched"], strict=True):
        assert torch.equal(matched, torch.where(a.positive, a.gt_index, -1))
    assert int((seen["matched"][0] >= 0).sum()) >= 3  # every object has positives
    assert torch.all(seen["matched"][1] == -1)  # no ground truth, no positive


def test_tiny_atss_fcos_assigns_as_atss_tiny(batch):
    """``atss_fcos_tiny``'s anchor scale 4 gives its assigner the anchors of ``atss_tiny``."""
    spies = [SpyAssigner(ATSSAssigner(topk=9)), SpyAssigner(ATSSAssigner(topk=9))]
    for name, spy in zip(("atss_fcos_tiny", "atss_tiny"), spies, strict=True):
        build(name, 3, assigner=spy).train()(*with_ignore(batch))
    fcos, retina = spies
    assert fcos.num_per_level == retina.num_per_level
    for a, b in zip(fcos.candidates, retina.candidates, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(fcos.assignments, retina.assignments, strict=True):
        assert torch.equal(a.label, b.label) and torch.equal(a.gt_index, b.gt_index)


def test_positives_outside_their_ground_truth_are_ignored():
    """FCOS regresses distances to the sides: it cannot learn a location outside its object."""
    anchors = [torch.tensor([[0.0, 0, 8, 8], [8, 0, 16, 8], [16, 0, 24, 8], [24, 0, 32, 8]])]
    gt_boxes = [torch.tensor([[6.0, 0, 30, 8], [0, 0, 2, 2]])]  # centres 4, 12, 20, 28 on y = 4
    assignment = Assignment(
        label=torch.tensor([1, 1, -1, 0], dtype=torch.int8),
        gt_index=torch.tensor([0, 0, 0, 1]),
        max_iou=torch.zeros(4),
        gt_class=torch.tensor([1, 1, 0, 0]),
    )
    matched, ignored = to_fcos_matches(anchors, gt_boxes, [assignment])
    # The first's centre (x = 4) is left of its ground truth (x >= 6): ignored, not positive.
    assert matched[0].tolist() == [-1, 0, -1, -1]
    assert ignored.tolist() == [[True, False, True, False]]


def test_max_iou_positives_outside_the_object_give_finite_losses(monkeypatch):
    """Max-IoU's best anchors for a thin object may be centred beside it: without the rule above
    their centerness target would be the square root of a negative number."""
    torch.manual_seed(0)
    spy = SpyAssigner(MaxIoUAssigner(pos_thr=0.5, neg_thr=0.4, low_quality=True))
    model = with_assigner(build("fcos_tiny", 3), spy, anchor_scale=4).train()
    seen = record_head(model, monkeypatch)
    target = {"boxes": torch.tensor([[1.0, 4.0, 3.0, 12.0]]), "labels": torch.tensor([1])}
    losses = model([torch.rand(3, 128, 128)], [target])
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    sum(losses.values()).backward()
    positive = spy.assignments[0].positive
    assert int(positive.sum()) > 0  # the low-quality matches, all centred outside the object
    assert torch.all(seen["matched"][0] == -1)
    assert torch.all(seen["outputs"]["cls_logits"].grad[0, positive] == 0)


def test_eval_mode_is_untouched(batch):
    torch.manual_seed(0)
    model = build("fcos_tiny", 3, score_thresh=0.0)
    wrapped = with_assigner(model, ATSSAssigner(topk=9))
    assert wrapped.head is model.head and wrapped.backbone is model.backbone
    assert list(wrapped.state_dict()) == list(model.state_dict())
    model.eval()
    wrapped.eval()
    with torch.no_grad():
        expected, actual = model(batch[0]), wrapped(batch[0])
    assert len(expected[0]["boxes"]) > 0
    for e, a in zip(expected, actual, strict=True):
        assert set(a) == set(e)
        for key in e:
            assert torch.equal(a[key], e[key]), key


def test_with_assigner_errors():
    with pytest.raises(TypeError, match="RetinaNet or FCOS, got FasterRCNN"):
        with_assigner(build("faster_rcnn_tiny", 3), ATSSAssigner())
    fcos = build("fcos_tiny", 3)
    with pytest.raises(ValueError, match="anchors per location"):
        with_assigner(fcos, ATSSAssigner(anchors_per_location=9))
    with pytest.raises(ValueError, match="anchor_scale must be positive"):
        with_assigner(fcos, ATSSAssigner(), anchor_scale=0.0)
    with pytest.raises(ValueError, match="FCOS only"):
        with_assigner(build("atss_tiny", 3), ATSSAssigner(), anchor_scale=8.0)


def test_build_fcos():
    model = build("atss_fcos_tiny", 3)
    assert isinstance(model, AssignedFCOS)
    assert model.assigner == ATSSAssigner(topk=9) and model.anchor_scale == 4
    assert build("atss_fcos_tiny", 3, anchor_scale=8).anchor_scale == 8
    # Another assigner replaces ATSS and keeps the configuration's anchor scale.
    max_iou = MaxIoUAssigner(pos_thr=0.5, neg_thr=0.4)
    model = build("atss_fcos_tiny", 3, assigner=max_iou)
    assert model.assigner == max_iou and model.anchor_scale == 4
    # Plain FCOS takes one too, with the paper's scale.
    model = build("fcos_tiny", 3, assigner=ATSSAssigner())
    assert isinstance(model, AssignedFCOS) and model.anchor_scale == 8
    assert not isinstance(build("fcos_tiny", 3), AssignedFCOS)
    with pytest.raises(ValueError, match="takes no sampler"):
        build("fcos_tiny", 3, sampler=RandomSampler())
