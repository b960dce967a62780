"""RetinaNet trained with a hardmine assigner (ATSS)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn

from hardmine.assign import ASSIGNERS
from hardmine.assign.atss import ATSSAssigner
from hardmine.assign.max_iou import MaxIoUAssigner
from hardmine.engine.build import CountingAssigner, PickCounter
from hardmine.models import AssignedRetinaNet, build, with_assigner
from hardmine.structures import Assigner, Assignment


@dataclass
class SpyAssigner:
    """Wraps an assigner and records the ``num_per_level`` it received."""

    assigner: Assigner
    num_per_level: list[int] = field(default_factory=list)
    num_candidates: list[int] = field(default_factory=list)

    def __call__(
        self, candidates, gt_boxes, gt_labels, *, ignore_boxes=None, num_per_level=None
    ) -> list[Assignment]:
        self.num_per_level = list(num_per_level)
        self.num_candidates = [len(c) for c in candidates]
        return self.assigner(candidates, gt_boxes, gt_labels, num_per_level=num_per_level)


def test_atss_training_step(batch):
    torch.manual_seed(0)
    model = build("atss_tiny", 3)
    assert isinstance(model, AssignedRetinaNet) and isinstance(model.assigner, ATSSAssigner)
    model.train()
    for images, targets in (batch, (batch[0][1:], batch[1][1:])):  # the second: no ground truth
        model.zero_grad()
        losses = model(images, targets)
        assert set(losses) == {"classification", "bbox_regression"}
        assert all(bool(torch.isfinite(v)) for v in losses.values())
        sum(losses.values()).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_num_per_level_matches_the_feature_maps(batch):
    """ATSS gets anchors per level: one anchor per location of P3-P5 at strides 8, 16, 32."""
    torch.manual_seed(0)
    spy = SpyAssigner(ATSSAssigner(topk=9))
    model = build("atss_tiny", 3, assigner=spy).train()
    model(*batch)
    # The batch is padded to the larger image, 160 x 128 (W x H), a multiple of 32 already.
    assert spy.num_per_level == [16 * 20, 8 * 10, 4 * 5]
    assert spy.num_candidates == [sum(spy.num_per_level)] * 2


def test_max_iou_assigner_reproduces_torchvision(batch):
    """With torchvision's own rule (0.5 / 0.4, low-quality matches) the losses are RetinaNet's."""
    torch.manual_seed(0)
    model = build("retinanet_tiny", 3).train()
    wrapped = with_assigner(model, MaxIoUAssigner(pos_thr=0.5, neg_thr=0.4, low_quality=True))
    expected, actual = model(*batch), wrapped(*batch)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, msg=key)


def test_eval_mode_is_untouched(batch):
    torch.manual_seed(0)
    model = build("retinanet_tiny", 3, score_thresh=0.0)
    wrapped = with_assigner(model, ATSSAssigner(topk=9, anchors_per_location=9))
    assert wrapped.head is model.head and list(wrapped.state_dict()) == list(model.state_dict())
    model.eval()
    wrapped.eval()
    with torch.no_grad():
        expected, actual = model(batch[0]), wrapped(batch[0])
    assert len(expected[0]["boxes"]) > 0
    for e, a in zip(expected, actual, strict=True):
        for key in e:
            assert torch.equal(a[key], e[key]), key


def test_anchors_per_location_left_at_its_default_is_the_models():
    # ATSSAssigner() used to be refused on a 9-anchor RetinaNet: the README's own example failed.
    model = build("retinanet_tiny", 3)  # 9 anchors per location
    assert with_assigner(model, ATSSAssigner()).assigner == ATSSAssigner(anchors_per_location=9)
    assert with_assigner(model, ATSSAssigner(anchors_per_location=9)).assigner.topk == 9
    with pytest.raises(ValueError, match=r"anchors_per_location=3\) but the model's anchor "):
        with_assigner(model, ATSSAssigner(anchors_per_location=3))
    # Through a wrapper that holds the assigner in a field (the harness's counting one).
    counted = with_assigner(model, CountingAssigner(ATSSAssigner(topk=9), PickCounter()))
    assert counted.assigner.assigner == ATSSAssigner(topk=9, anchors_per_location=9)


def test_readme_example_on_torchvisions_retinanet(batch):
    """``with_assigner(retinanet, ATSSAssigner(topk=9))`` on torchvision's own RetinaNet."""
    torch.manual_seed(0)
    retinanet = retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=96
    )
    model = with_assigner(retinanet, ATSSAssigner(topk=9)).train()
    assert model.assigner.anchors_per_location == 9
    images, targets = batch
    losses = model(images[:1], targets[:1])
    assert all(bool(torch.isfinite(v)) for v in losses.values())


@pytest.mark.parametrize("name", ["retinanet_tiny", "atss_tiny", "fcos_tiny", "atss_fcos_tiny"])
@pytest.mark.parametrize("assigner", ["max_iou", "atss"])
@pytest.mark.parametrize("box", [[60.0, 50.0, 40.0, 40.0], [0.0, 0.0, 0.0, 0.0]])
def test_degenerate_boxes_are_refused_as_torchvision_does(name, assigner, box, batch):
    # An xywh box given as xyxy, and an empty box: the assigner would make them background.
    images, targets = batch
    targets = [{**targets[0], "boxes": torch.tensor([box, [10.0, 20.0, 60.0, 80.0]])}]
    targets[0]["labels"] = torch.tensor([1, 2])
    model = with_assigner(build(name, 3), ASSIGNERS[assigner]()).train()
    with pytest.raises(AssertionError, match="All bounding boxes should have positive height"):
        model(images[:1], targets)


def test_with_assigner_refuses_names_and_classes():
    model = build("retinanet_tiny", 3)
    with pytest.raises(TypeError, match=r"assigner must be .* got the name 'atss'.*ASSIGNERS"):
        with_assigner(model, "atss")
    with pytest.raises(TypeError, match=r"got the class ATSSAssigner; pass an instance"):
        with_assigner(model, ATSSAssigner)
