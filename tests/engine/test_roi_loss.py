"""The loss over all RoIs: OHEM's sampler-independent measure, read-only."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from hardmine.assign import MaxIoUAssigner
from hardmine.data import SceneDataset, collate_fn
from hardmine.engine.roi_loss import ALL_ROIS_ASSIGNER, ALL_ROIS_BOX_BETA, mean_loss_all_rois
from hardmine.models import build
from hardmine.models.read_only import rcnn_heads, roi_batch, roi_losses, train_mode_proposals
from hardmine.sample import OHEMSampler
from hardmine.structures import IGNORE


@pytest.fixture(scope="module")
def scenes() -> SceneDataset:
    return SceneDataset(3, seed=0, image_size=64)  # the tiny detector resizes them to 128


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build("faster_rcnn_tiny", 4, sampler=OHEMSampler(num=32))


def test_mean_loss_is_the_mean_over_every_roi(scenes: SceneDataset, model: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    value = mean_loss_all_rois(model, scenes, device="cpu", batch_size=2)
    assert model.training  # mode restored
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())

    images, targets = collate_fn([scenes[i] for i in range(len(scenes))])
    batch = roi_batch(model, images, targets)
    losses = torch.cat(roi_losses(model, batch, score_dtype=None))  # the measure is float32
    counted = torch.cat([a.label for a in batch.assignments]) != IGNORE
    assert value == pytest.approx(float(losses[counted].mean()), rel=1e-5)
    assert math.isfinite(value) and value > 0

    loader = DataLoader(scenes, batch_size=3, collate_fn=collate_fn)
    assert mean_loss_all_rois(model, loader, device="cpu") == pytest.approx(value, rel=1e-5)
    first = mean_loss_all_rois(model, Subset(scenes, [0]), device="cpu")
    assert mean_loss_all_rois(model, loader, device="cpu", max_images=1) == pytest.approx(first)


def test_plain_torchvision_heads_give_the_same_value(
    scenes: SceneDataset, model: torch.nn.Module
) -> None:
    """The harness may pass a model without sampling heads (eval): its heads are wrapped."""
    plain = build("faster_rcnn_tiny", 4)
    plain.load_state_dict(model.state_dict())
    assert rcnn_heads(plain) is not None
    assert mean_loss_all_rois(plain, scenes, device="cpu") == pytest.approx(
        mean_loss_all_rois(model, scenes, device="cpu"), rel=1e-5
    )


def test_no_roi_heads_gives_none(scenes: SceneDataset) -> None:
    assert mean_loss_all_rois(build("retinanet_tiny", 4), scenes, device="cpu") is None


def test_rois_are_training_proposals_plus_ground_truths(
    scenes: SceneDataset, model: torch.nn.Module
) -> None:
    images, targets = collate_fn([scenes[0]])
    model.eval()
    image_list, _ = model.transform(images)
    features = model.backbone(image_list.tensors)
    with torch.no_grad():
        proposals = train_mode_proposals(model.rpn, image_list, features)
    assert not model.rpn.training  # restored
    num_gt = len(targets[0]["boxes"])
    batch = roi_batch(model, images, targets)
    assert batch.proposals[0].shape[0] == proposals[0].shape[0] + num_gt
    # The tiny detector keeps 500 proposals in training, 300 at test time.
    assert 300 < proposals[0].shape[0] <= 500
    assert batch.image_sizes == [(128, 128)] and batch.original_sizes == [(64, 64)]
    appended = batch.to_original(batch.proposals)[0][-num_gt:]
    assert torch.allclose(appended, targets[0]["boxes"], atol=1e-4)


def test_given_proposals_are_scaled_into_the_transformed_image(
    scenes: SceneDataset, model: torch.nn.Module
) -> None:
    images, targets = collate_fn([scenes[0]])
    given = torch.tensor([[0.0, 0.0, 32.0, 32.0], [10.0, 20.0, 30.0, 40.0]])
    batch = roi_batch(model, images, targets, proposals=[given])
    assert torch.allclose(batch.proposals[0][:2], 2 * given)
    assert torch.allclose(batch.to_original(batch.proposals)[0][:2], given)


def test_the_same_rois_whatever_the_runs_assigner(scenes: SceneDataset, model: torch.nn.Module):
    """Fast R-CNN's bg_lo = 0.1 ignores RoIs overlapping no ground truth by 0.1 in training; the
    measure still counts every RoI, labelled by ALL_ROIS_ASSIGNER, so two runs that differ only
    in their assigner are measured on the same set."""
    bg_lo = build(
        "faster_rcnn_tiny", 4, sampler=OHEMSampler(num=32),
        assigner=MaxIoUAssigner(neg_thr=(0.1, 0.5)),
    )  # fmt: skip
    bg_lo.load_state_dict(model.state_dict())
    value = mean_loss_all_rois(model, scenes, device="cpu")
    assert mean_loss_all_rois(bg_lo, scenes, device="cpu") == pytest.approx(value, rel=1e-6)
    # The training assignment does ignore some of them: the set would differ without the fix.
    images, targets = collate_fn([scenes[i] for i in range(len(scenes))])
    own = roi_batch(bg_lo, images, targets)
    assert bool((torch.cat([a.label for a in own.assignments]) == IGNORE).any())
    fixed = roi_batch(bg_lo, images, targets, assigner=ALL_ROIS_ASSIGNER)
    assert not bool((torch.cat([a.label for a in fixed.assignments]) == IGNORE).any())
    losses = torch.cat(roi_losses(bg_lo, fixed, score_dtype=None))  # the measure is float32
    assert value == pytest.approx(float(losses.mean()), rel=1e-5)


def test_the_same_settings_whatever_the_runs_beta_and_precision(
    scenes: SceneDataset, model: torch.nn.Module
) -> None:
    """D13: the measure uses torchvision's beta and float32 for every run: a run trained with
    Fast R-CNN's beta 1, a bfloat16 box head, or measured inside autocast gives the value of the
    same weights with the defaults."""
    value = mean_loss_all_rois(model, scenes, device="cpu")
    other = build(
        "faster_rcnn_tiny", 4, sampler=OHEMSampler(num=32), box_loss_beta=1.0,
        score_dtype="bfloat16",
    )  # fmt: skip
    other.load_state_dict(model.state_dict())
    assert mean_loss_all_rois(other, scenes, device="cpu") == pytest.approx(value, rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mean_loss_all_rois(model, scenes, device="cpu") == pytest.approx(value, rel=1e-6)
    # The run's own settings would change it: the fixed ones are what keeps it equal.
    images, targets = collate_fn([scenes[i] for i in range(len(scenes))])
    batch = roi_batch(other, images, targets, assigner=ALL_ROIS_ASSIGNER)
    own = float(torch.cat(roi_losses(other, batch, score_dtype=None)).mean())
    assert own != pytest.approx(value, rel=1e-3)
    fixed = roi_losses(other, batch, score_dtype=None, box_loss_beta=ALL_ROIS_BOX_BETA)
    assert float(torch.cat(fixed).mean()) == pytest.approx(value, rel=1e-5)
