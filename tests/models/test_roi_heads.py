"""Sampling RoI heads and RPN on torchvision's Faster / Mask R-CNN (tiny CPU configurations)."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.roi_heads import project_masks_on_boxes
from torchvision.ops import nms

from hardmine.assign import MaxIoUAssigner
from hardmine.boxes import box_iof
from hardmine.models import SamplingRoIHeads, build, with_sampler
from hardmine.models import read_only as roi_heads
from hardmine.models.read_only import run_read_only
from hardmine.sample import SAMPLERS, OHEMSampler, OverlapSampler, RandomSampler
from hardmine.structures import Assignment, Sampler, Selection

RCNNS = ["faster_rcnn_tiny", "mask_rcnn_tiny"]


@dataclass
class TorchvisionSampler:
    """torchvision's own random sampler behind the ``Sampler`` interface: the same RNG calls, so
    under the same seed it picks what torchvision's heads pick."""

    num: int
    pos_fraction: float
    needs_losses: bool = False

    def __call__(self, boxes, assignments, *, losses=None, generator=None) -> list[Selection]:
        labels = [torch.where(a.positive, 1, torch.where(a.negative, 0, -1)) for a in assignments]
        pos, neg = BalancedPositiveNegativeSampler(self.num, self.pos_fraction)(labels)
        return [
            Selection(mask=(p | n).bool(), weight=(p | n).float())
            for p, n in zip(pos, neg, strict=True)
        ]


@dataclass
class EveryThirdSampler:
    """Picks every third non-ignored candidate by index, with weights 1, 1.5, 2, 2.5 by index."""

    needs_losses: bool = False

    def __call__(self, boxes, assignments, *, losses=None, generator=None) -> list[Selection]:
        out = []
        for a in assignments:
            index = torch.arange(a.num_candidates)
            mask = (index % 3 == 0) & (a.label >= 0)
            out.append(Selection(mask=mask, weight=torch.where(mask, self.weight(index), 0.0)))
        return out

    def weight(self, index: Tensor) -> Tensor:
        return 1 + (index % 4) / 2


class DistinctWeightsSampler(EveryThirdSampler):
    """``EveryThirdSampler`` with a weight of its own for every pick: 1 + index / 1000."""

    def weight(self, index: Tensor) -> Tensor:
        return 1 + index / 1000


@dataclass
class Spy:
    """Wraps a sampler and records what it received and returned."""

    sampler: Sampler
    losses: list[Tensor] | None = None
    selections: list[Selection] = field(default_factory=list)

    @property
    def needs_losses(self) -> bool:
        return self.sampler.needs_losses

    def __call__(self, boxes, assignments, *, losses=None, generator=None) -> list[Selection]:
        self.losses = losses
        self.selections = self.sampler(boxes, assignments, losses=losses, generator=generator)
        return self.selections


def head_inputs(model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]):
    """What the RoI heads receive in training: features, proposals, image sizes, targets."""
    model.train()
    with torch.no_grad():
        image_list, targets = model.transform(images, targets)
        features = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, features, targets)
    return features, proposals, image_list.image_sizes, targets


def torchvision_targets(model, proposals, targets):
    """Proposals with GT appended, labels, matched indices and box targets, all by torchvision."""
    heads = model.roi_heads
    gt = [t["boxes"] for t in targets]
    rois = heads.add_gt_proposals(proposals, gt)
    matched, labels = heads.assign_targets_to_proposals(rois, gt, [t["labels"] for t in targets])
    # Images without GT regress to nothing; the dummy box only fills the (unused) rows.
    boxes = [g[m] if len(g) else r for g, m, r in zip(gt, matched, rois, strict=True)]
    return rois, labels, matched, heads.box_coder.encode(boxes, rois)


def plain_roi_losses(model, features, rois, sizes, labels, reg_targets, beta=1 / 9) -> Tensor:
    """Every RoI's CE + foreground smooth-L1, the plain way (with autograd, no batching tricks)."""
    heads = model.roi_heads
    logits, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, rois, sizes)))
    labels, reg_targets = torch.cat(labels), torch.cat(reg_targets)
    loss = F.cross_entropy(logits, labels, reduction="none")
    fg = torch.where(labels > 0)[0]
    deltas = deltas.reshape(len(labels), -1, 4)[fg, labels[fg]]
    box = F.smooth_l1_loss(deltas, reg_targets[fg], beta=beta, reduction="none").sum(1)
    return loss.index_add(0, fg, box)


def test_training_step_every_sampler_and_model_runs(batch):
    """Every sampler (RoI heads and RPN) on both R-CNNs: finite losses, finite gradients."""
    for model_name in RCNNS:
        for name, cls in SAMPLERS.items():
            torch.manual_seed(0)
            # PISA ranks by the box head's scores, which an RPN has not: random for its RPN.
            rpn = RandomSampler(num=128) if name == "pisa" else cls(num=128)
            model = with_sampler(build(model_name, 3), cls(num=64), rpn_sampler=rpn)
            model.train()
            losses = model(*batch)
            assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_objectness"}
            assert all(bool(torch.isfinite(v)) for v in losses.values()), (model_name, name)
            sum(losses.values()).backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and all(bool(torch.isfinite(g).all()) for g in grads), (model_name, name)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_images_without_ground_truth(name, batch):
    images, targets = batch
    model = with_sampler(build("mask_rcnn_tiny", 3), SAMPLERS[name](num=32))
    model.train()
    losses = model(images[1:], targets[1:])
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_mask"].item() == 0.0
    sum(losses.values()).backward()


@pytest.mark.parametrize("name", RCNNS)
def test_random_sampler_is_torchvision_s_own_draw(name, batch):
    """On the CPU, RandomSampler draws as torchvision's sampler does: from the same global RNG
    state, the RPN and the heads pick the same anchors and RoIs, so the losses are torchvision's."""
    torch.manual_seed(0)
    model = build(name, 3)
    wrapped = with_sampler(model, RandomSampler(128, 0.25), rpn_sampler=RandomSampler(256, 0.5))
    model.train()
    wrapped.train()
    torch.manual_seed(1)
    expected = model(*batch)
    torch.manual_seed(1)
    actual = wrapped(*batch)
    assert set(actual) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, msg=key)


@pytest.mark.parametrize("name", RCNNS)
def test_random_sampling_reproduces_torchvision(name, batch):
    """Fed torchvision's own picks, the sampling RPN and heads give torchvision's losses."""
    torch.manual_seed(0)
    model = build(name, 3)
    wrapped = with_sampler(
        model, TorchvisionSampler(128, 0.25), rpn_sampler=TorchvisionSampler(256, 0.5)
    )
    model.train()
    wrapped.train()
    torch.manual_seed(1)
    expected = model(*batch)
    torch.manual_seed(1)
    actual = wrapped(*batch)
    assert set(actual) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, msg=key)


def test_gradients_come_only_from_picked_rois(batch):
    """Moving every proposal that is not picked changes neither the loss nor any gradient."""
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 3)
    features, proposals, sizes, targets = head_inputs(model, *batch)
    heads = SamplingRoIHeads(model.roi_heads, sampler=EveryThirdSampler()).train()
    params = list(heads.box_head.parameters()) + list(heads.box_predictor.parameters())

    def loss_and_grads(props: list[Tensor]) -> tuple[Tensor, Sequence[Tensor]]:
        feats = {k: v.clone().requires_grad_() for k, v in features.items()}
        total = sum(heads(feats, props, sizes, targets)[1].values())
        return total, torch.autograd.grad(total, params + list(feats.values()))

    moved = []
    for p in proposals:
        unpicked = (torch.arange(len(p)) % 3 != 0)[:, None]
        moved.append(torch.where(unpicked, (p + 7).clamp(max=127), p))
    loss, grads = loss_and_grads(proposals)
    loss_moved, grads_moved = loss_and_grads(moved)
    assert not torch.equal(torch.cat(moved), torch.cat(proposals))
    torch.testing.assert_close(loss_moved, loss)
    for g, g_moved in zip(grads, grads_moved, strict=True):
        torch.testing.assert_close(g_moved, g)


def test_ohem_picks_equal_brute_force(batch):
    """OHEM's picks: all RoI losses computed plainly, NMS 0.7 by loss, the top B per image."""
    num = 32
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 3)
    features, proposals, sizes, targets = head_inputs(model, *batch)
    spy = Spy(OHEMSampler(num=num))
    # Scored in float32 (score_dtype None), against plain float32 losses.
    heads = SamplingRoIHeads(model.roi_heads, sampler=spy, score_dtype=None).train()
    heads(features, proposals, sizes, targets)

    rois, labels, _, reg_targets = torchvision_targets(model, proposals, targets)
    with torch.no_grad():
        losses = plain_roi_losses(model, features, rois, sizes, labels, reg_targets)
    losses = losses.split([len(r) for r in rois])
    for r, loss, got, selection in zip(rois, losses, spy.losses, spy.selections, strict=True):
        torch.testing.assert_close(got, loss)
        expected = torch.zeros(len(r), dtype=torch.bool)
        expected[nms(r, loss, 0.7)[:num]] = True
        assert torch.equal(selection.mask, expected)
        assert int(selection.mask.sum()) == min(num, len(nms(r, loss, 0.7)))


@pytest.mark.parametrize("beta", [1 / 9, 1.0])
def test_ohem_ranks_by_the_loss_it_trains_with(beta, batch):
    """The read-only pass's loss is the training loss, smooth-L1 beta included: torchvision's 1/9
    by default, Fast R-CNN's 1 (the OHEM paper's detector) by ``box_loss_beta``."""
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 3)
    features, proposals, sizes, targets = head_inputs(model, *batch)
    spy = Spy(OHEMSampler(num=32))
    heads = SamplingRoIHeads(model.roi_heads, sampler=spy, box_loss_beta=beta, score_dtype=None)
    heads = heads.train()  # scored in float32, as the plain computation
    _, out = heads(features, proposals, sizes, targets)
    rois, labels, _, reg_targets = torchvision_targets(model, proposals, targets)
    with torch.no_grad():
        plain = plain_roi_losses(model, features, rois, sizes, labels, reg_targets, beta=beta)
        other = plain_roi_losses(model, features, rois, sizes, labels, reg_targets, beta=1.5 - beta)
    torch.testing.assert_close(torch.cat(spy.losses), plain)
    assert not torch.allclose(plain, other)  # the beta matters for foreground RoIs
    # The training pass's losses on the picks, the same beta: their mean is the total.
    picked = torch.cat([s.mask for s in spy.selections])
    total = out["loss_classifier"] + out["loss_box_reg"]
    torch.testing.assert_close(total, plain[picked].mean(), rtol=1e-4, atol=1e-6)
    assert build("faster_rcnn_tiny", 3, box_loss_beta=beta).roi_heads.box_loss_beta == beta


def test_read_only_pass_holds_no_graph(batch):
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 3)
    features, proposals, sizes, targets = head_inputs(model, *batch)
    features = {k: v.requires_grad_() for k, v in features.items()}
    spy = Spy(OHEMSampler(num=16))
    _, losses = SamplingRoIHeads(model.roi_heads, sampler=spy).train()(
        features, proposals, sizes, targets
    )
    assert spy.losses is not None
    assert all(not loss.requires_grad and loss.grad_fn is None for loss in spy.losses)
    assert losses["loss_classifier"].grad_fn is not None  # the training pass does hold one


def test_read_only_pass_leaves_batch_norm_statistics_alone():
    """Batch statistics as in training, but the running statistics are not updated."""
    head = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).train()
    reference = copy.deepcopy(head)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    x = torch.randn(16, 4) * 3 + 1
    with torch.no_grad():
        out = run_read_only(head, x)
        torch.testing.assert_close(out, reference(x))
    for key, value in head.state_dict().items():
        assert torch.equal(value, before[key]), key


def expected_weighted_losses(model, features, proposals, sizes, targets, selections):
    """The losses of the picks weighted by hand: sum(w * loss) / num_picked per term."""
    rois, labels, matched, reg_targets = torchvision_targets(model, proposals, targets)
    picks = [torch.where(s.mask)[0] for s in selections]
    weight = torch.cat([s.weight[i] for s, i in zip(selections, picks, strict=True)])
    take = [
        [x[i] for x, i in zip(xs, picks, strict=True)]
        for xs in (rois, labels, matched, reg_targets)
    ]
    p_rois, p_labels, p_matched, p_reg = take
    heads = model.roi_heads
    logits, deltas = heads.box_predictor(
        heads.box_head(heads.box_roi_pool(features, p_rois, sizes))
    )
    lab = torch.cat(p_labels)
    n = len(lab)
    out = {"loss_classifier": (weight * F.cross_entropy(logits, lab, reduction="none")).sum() / n}
    fg = torch.where(lab > 0)[0]
    box = F.smooth_l1_loss(
        deltas.reshape(n, -1, 4)[fg, lab[fg]], torch.cat(p_reg)[fg], beta=1 / 9, reduction="none"
    ).sum(1)
    out["loss_box_reg"] = (weight[fg] * box).sum() / n
    if heads.has_mask():
        pos = [lb > 0 for lb in p_labels]
        m_rois = [r[p] for r, p in zip(p_rois, pos, strict=True)]
        logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, m_rois, sizes)))
        mask_targets = torch.cat(
            [
                project_masks_on_boxes(t["masks"], r, m[p], logits.shape[-1])
                for t, r, m, p in zip(targets, m_rois, p_matched, pos, strict=True)
            ]
        )
        per_roi = F.binary_cross_entropy_with_logits(
            logits[torch.arange(len(fg)), lab[fg]], mask_targets, reduction="none"
        ).mean((1, 2))
        out["loss_mask"] = (weight[fg] * per_roi).sum() / len(fg)
    return out


@pytest.mark.parametrize("name", RCNNS)
@pytest.mark.parametrize("sampler", ["every_third", "overlap"])
def test_weights_reach_the_loss(name, sampler, batch):
    torch.manual_seed(0)
    model = build(name, 3)
    features, proposals, sizes, targets = head_inputs(model, *batch)
    inner = EveryThirdSampler() if sampler == "every_third" else OverlapSampler(num=64, epsilon=3.0)
    spy = Spy(inner)
    _, losses = SamplingRoIHeads(model.roi_heads, sampler=spy).train()(
        features, proposals, sizes, targets
    )
    weights = torch.cat([s.weight[s.mask] for s in spy.selections])
    assert len(set(weights.tolist())) > 1  # non-trivial weights did reach the heads
    expected = expected_weighted_losses(model, features, proposals, sizes, targets, spy.selections)
    assert set(losses) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(losses[key], value, msg=key)
        assert math.isfinite(value.item()) and value.item() > 0


@pytest.mark.parametrize("name", RCNNS)
def test_eval_mode_is_untouched(name, batch):
    """Detections, parameters and the state_dict keys of the wrapped model are the original's."""
    torch.manual_seed(0)
    model = build(name, 3, box_score_thresh=0.0)
    wrapped = with_sampler(model, OHEMSampler(num=16), rpn_sampler=OverlapSampler(num=64))
    assert wrapped.roi_heads.box_head is model.roi_heads.box_head
    assert type(wrapped) is type(model) and model.roi_heads is not wrapped.roi_heads
    assert list(wrapped.state_dict()) == list(model.state_dict())
    model.eval()
    wrapped.eval()
    with torch.no_grad():
        expected, actual = model(batch[0]), wrapped(batch[0])
    assert len(expected[0]["boxes"]) > 0
    for e, a in zip(expected, actual, strict=True):
        assert set(e) == set(a)
        for key in e:
            assert torch.equal(a[key], e[key]), key


def test_assignment_is_torchvisions(batch):
    """The default assigner labels the proposals as torchvision's matcher does (fg 0.5, bg 0.5)."""
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 3)
    _, proposals, _, targets = head_inputs(model, *batch)
    heads = SamplingRoIHeads(model.roi_heads, sampler=EveryThirdSampler())
    rois, labels, matched, _ = torchvision_targets(model, proposals, targets)
    gt = [t["boxes"] for t in targets]
    assignments: list[Assignment] = heads.assigner(rois, gt, [t["labels"] for t in targets])
    for a, lab, m in zip(assignments, labels, matched, strict=True):
        assert torch.equal(torch.where(a.label < 0, -1, a.gt_class), lab)
        assert torch.equal(a.gt_index[a.positive], m[a.positive])


@dataclass
class RecordingAssigner:
    """Max-IoU assignment that remembers what it was given and what it decided."""

    seen: list[tuple[list[Tensor], list[Tensor], list[Assignment]]] = field(default_factory=list)

    def __call__(self, candidates, gt_boxes, gt_labels, *, ignore_boxes=None, num_per_level=None):
        out = MaxIoUAssigner()(candidates, gt_boxes, gt_labels, ignore_boxes=ignore_boxes)
        self.seen.append((list(candidates), list(ignore_boxes), out))
        return out


def test_ignore_regions_reach_the_assigner_resized_with_the_image(batch):
    images, targets = batch
    targets = copy.deepcopy(targets)
    region = torch.tensor([[0.0, 0.0, 40.0, 32.0]])
    targets[0]["ignore_boxes"] = region.clone()
    recorder = RecordingAssigner()
    model = with_sampler(
        build("faster_rcnn_tiny", num_classes=3), SAMPLERS["random"](num=64), assigner=recorder
    )
    model.transform.min_size = (192,)  # the 128-px-high images are upscaled by 1.5
    model.train()
    model(images, targets)
    proposals, ignore, assignments = recorder.seen[-1]
    torch.testing.assert_close(ignore[0], region * 1.5)
    assert ignore[1].shape == (0, 4)
    covered = box_iof(proposals[0], ignore[0]).amax(1) > 0.5
    assert covered.any()
    assert (assignments[0].label[covered & ~assignments[0].positive] == -1).all()


def test_read_only_pass_in_slices_gives_the_same_losses(batch, monkeypatch):
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 3)
    features, proposals, sizes, targets = head_inputs(model, *batch)
    losses = []
    for slice_bytes in (roi_heads.READ_ONLY_SLICE_BYTES, 100 * 64 * 7 * 7 * 4):  # 100 RoIs
        monkeypatch.setattr(roi_heads, "READ_ONLY_SLICE_BYTES", slice_bytes)
        spy = Spy(OHEMSampler(num=16))
        heads = SamplingRoIHeads(model.roi_heads, sampler=spy, score_dtype=None).train()
        heads(features, proposals, sizes, targets)
        losses.append(torch.cat(spy.losses))
    assert losses[0].numel() > 300  # several slices of 100
    torch.testing.assert_close(losses[1], losses[0])


def test_read_only_pass_in_bfloat16_ranks_nearly_alike(batch):
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 3)
    features, proposals, sizes, targets = head_inputs(model, *batch)
    picks, losses = [], []
    for dtype in (None, torch.bfloat16):
        spy = Spy(OHEMSampler(num=64))
        heads = SamplingRoIHeads(model.roi_heads, sampler=spy, score_dtype=dtype).train()
        heads(features, proposals, sizes, targets)
        losses.append(torch.cat(spy.losses))
        picks.append(torch.cat([s.mask for s in spy.selections]))
    assert losses[1].dtype == torch.float32 and losses[1].grad_fn is None
    assert not torch.equal(losses[1], losses[0])  # bfloat16 did run
    torch.testing.assert_close(losses[1], losses[0], rtol=0.05, atol=0.02)
    shared = int((picks[0] & picks[1]).sum()) / int(picks[0].sum())
    assert shared >= 0.8, shared


def test_read_only_pass_shares_no_weight_casts_with_an_enclosing_autocast(batch):
    """The pass casts the box head's weights once (autocast's cache), but an enclosing autocast
    of another type neither hands it its casts nor gets the pass's: the losses are those scored
    alone, and the enclosing autocast still computes in its own type afterwards."""
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 3)
    features, proposals, sizes, targets = head_inputs(model, *batch)
    boxes = [t["boxes"] for t in targets]
    assignments = MaxIoUAssigner()(proposals, boxes, [t["labels"] for t in targets])
    heads = model.roi_heads
    x = torch.randn(5, 64, 7, 7)
    with torch.no_grad():
        alone = roi_heads.score_rois(
            heads, features, proposals, sizes, boxes, assignments, score_dtype=torch.bfloat16
        )
        with torch.autocast("cpu", dtype=torch.float16):
            before = heads.box_head(x)  # fills the enclosing autocast's cache in float16
            enclosed = roi_heads.score_rois(
                heads, features, proposals, sizes, boxes, assignments, score_dtype=torch.bfloat16
            )
            after = heads.box_head(x)
    for a, b in zip(alone, enclosed, strict=True):
        assert torch.equal(a, b)
    assert before.dtype == after.dtype == torch.float16
    assert torch.equal(after, before)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_read_only_pass_with_no_rois(dtype):
    """No proposals and no ground truth: every field empty, predictions (PISA's) included."""
    heads = build("faster_rcnn_tiny", 3).train().roi_heads
    features = {k: torch.randn(1, 64, s, s) for k, s in (("0", 16), ("1", 8), ("2", 4))}
    none = [torch.zeros(0, 4)]
    (assignment,) = MaxIoUAssigner()(none, none, [torch.zeros(0, dtype=torch.int64)])
    with torch.no_grad():
        (scores,) = roi_heads.predict_rois(
            heads, features, none, [(128, 128)], none, [assignment], score_dtype=dtype
        )
        (losses,) = roi_heads.score_rois(
            heads, features, none, [(128, 128)], none, [assignment], score_dtype=dtype
        )
    assert losses.shape == scores.loss.shape == scores.score.shape == (0,)
    assert scores.box.shape == (0, 4) and scores.label.dtype == torch.int64


def test_keypoint_rcnn_reproduces_torchvision(keypoint_rcnn, keypoint_batch):
    """Fed torchvision's own picks, Keypoint R-CNN's losses (the keypoint loss too) are its own."""
    torch.manual_seed(0)
    model = keypoint_rcnn(3)
    wrapped = with_sampler(model, TorchvisionSampler(128, 0.25))
    model.train()
    wrapped.train()
    torch.manual_seed(1)
    expected = model(*keypoint_batch)
    torch.manual_seed(1)
    actual = wrapped(*keypoint_batch)
    assert "loss_keypoint" in expected and set(actual) == set(expected)
    assert expected["loss_keypoint"].item() > 0
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, msg=key)


def test_keypoint_loss_is_weighted_per_picked_positive(keypoint_rcnn, keypoint_batch):
    """sum(weight of the RoI * loss of each counted keypoint) / counted keypoints."""
    torch.manual_seed(0)
    model = keypoint_rcnn(3)
    features, proposals, sizes, targets = head_inputs(model, *keypoint_batch)
    spy = Spy(DistinctWeightsSampler())
    _, losses = SamplingRoIHeads(model.roi_heads, sampler=spy).train()(
        features, proposals, sizes, targets
    )
    rois, labels, matched, _ = torchvision_targets(model, proposals, targets)
    picks = [
        torch.where(s.mask & (lb > 0))[0] for s, lb in zip(spy.selections, labels, strict=True)
    ]
    pos_rois = [r[i] for r, i in zip(rois, picks, strict=True)]
    weight = torch.cat([s.weight[i] for s, i in zip(spy.selections, picks, strict=True)])
    assert len(set(weight.tolist())) > 1
    heads = model.roi_heads
    logits = heads.keypoint_predictor(
        heads.keypoint_head(heads.keypoint_roi_pool(features, pos_rois, sizes))
    )  # [P, K, S, S]
    total, counted = torch.zeros(()), 0
    for n, (image, index) in enumerate((image, int(i)) for image, p in enumerate(picks) for i in p):
        roi = rois[image][index]
        for k, (x, y, v) in enumerate(targets[image]["keypoints"][matched[image][index]].tolist()):
            side = logits.shape[-1]
            cx = side - 1 if x == roi[2] else math.floor((x - roi[0]) * side / (roi[2] - roi[0]))
            cy = side - 1 if y == roi[3] else math.floor((y - roi[1]) * side / (roi[3] - roi[1]))
            if v > 0 and 0 <= cx < side and 0 <= cy < side:
                ce = F.cross_entropy(logits[n, k].reshape(1, -1), torch.tensor([cy * side + cx]))
                total, counted = total + weight[n] * ce, counted + 1
    assert counted > 0
    torch.testing.assert_close(losses["loss_keypoint"], total / counted)


def test_with_sampler_says_what_to_pass(batch):
    model = build("faster_rcnn_tiny", 3)
    with pytest.raises(TypeError, match=r"got RetinaNet, .*with_assigner\(model, ATSSAssigner"):
        with_sampler(build("retinanet_tiny", 3), OHEMSampler())
    with pytest.raises(
        TypeError, match=r"sampler must be .* got the name 'ohem'.*SAMPLERS\['ohem'\]"
    ):
        with_sampler(model, "ohem")
    with pytest.raises(TypeError, match=r"got the class OHEMSampler; pass an instance"):
        with_sampler(model, OHEMSampler)
    with pytest.raises(TypeError, match=r"rpn_sampler must be"):
        with_sampler(model, OHEMSampler(), rpn_sampler="random")
    with pytest.raises(TypeError, match=r"assigner must be .* got the name 'max_iou'"):
        with_sampler(model, OHEMSampler(), assigner="max_iou")
    with pytest.raises(TypeError, match=r"Keypoint R-CNN .*, got Linear"):
        with_sampler(nn.Linear(2, 2), OHEMSampler())


def test_read_only_pass_is_bfloat16_by_default_where_the_cpu_has_it(batch):
    # score_dtype "auto": bfloat16 exactly where the hardware computes it natively.
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 3)
    features, proposals, sizes, targets = head_inputs(model, *batch)
    losses = {}
    for dtype in ("auto", None, torch.bfloat16):
        spy = Spy(OHEMSampler(num=64))
        SamplingRoIHeads(model.roi_heads, sampler=spy, score_dtype=dtype).train()(
            features, proposals, sizes, targets
        )
        losses[dtype] = torch.cat(spy.losses)
    native = roi_heads.native_bfloat16(torch.device("cpu"))
    assert torch.equal(losses["auto"], losses[torch.bfloat16 if native else None])
    assert roi_heads.resolve_score_dtype("auto", torch.device("meta")) is None
    with pytest.raises(ValueError, match="score_dtype must be"):
        roi_heads.resolve_score_dtype("float32", torch.device("cpu"))


def test_box_loss_beta_zero_is_the_l1_loss():
    """The configuration allows beta 0 and the heads refused it (the stranger's check): at 0 the
    box loss is L1, ``smooth_l1_loss``'s own reading of beta 0."""
    model = build("faster_rcnn_tiny", 3, box_loss_beta=0.0).train()
    image = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0))
    target = {"boxes": torch.tensor([[10.0, 10.0, 70.0, 90.0]]), "labels": torch.tensor([1])}
    losses = model([image], [target])
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="box_loss_beta"):
        build("faster_rcnn_tiny", 3, box_loss_beta=-1.0)
