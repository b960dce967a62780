"""PISA in the RoI heads: the read-only pass's scores, one training step, each part's effect."""

from __future__ import annotations

import pytest
import torch

from hardmine.models import build, with_sampler
from hardmine.models.read_only import predict_rois, score_rois
from hardmine.sample import PISASampler, RandomSampler
from hardmine.structures import Assignment


def _losses(batch, sampler, seed: int = 0):
    torch.manual_seed(0)
    model = build(
        "faster_rcnn_tiny", 3, sampler=sampler, generator=torch.Generator().manual_seed(seed)
    )
    model.train()
    return model, model(*batch)


def test_one_training_step_with_pisa(batch) -> None:
    model, losses = _losses(batch, PISASampler(num=64))
    assert set(losses) == {
        "loss_classifier",
        "loss_box_reg",
        "loss_carl",
        "loss_objectness",
        "loss_rpn_box_reg",
    }
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    assert float(losses["loss_carl"].detach()) > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_carl_reaches_the_classifier(batch) -> None:
    """CARL's weights keep the gradient of the class probability (MMDetection's carl_loss)."""
    model, losses = _losses(batch, PISASampler(num=64, isr_n=False, isr_p=False))
    losses["loss_carl"].backward()
    cls_score = model.roi_heads.box_predictor.cls_score.weight.grad
    assert cls_score is not None and float(cls_score.abs().sum()) > 0


def test_all_parts_off_is_random_sampling(batch) -> None:
    _, pisa = _losses(batch, PISASampler(num=64, isr_n=False, isr_p=False, carl=False), seed=3)
    _, rand = _losses(batch, RandomSampler(num=64), seed=3)
    assert pisa.keys() == rand.keys()
    for key in rand:
        assert torch.equal(pisa[key], rand[key]), key


def test_isr_p_keeps_the_loss_value_and_changes_its_gradient(batch) -> None:
    """ISR-P's weights are scaled so the positives' classification loss sums as before: the
    value stays, the gradient moves (toward the prime positives)."""
    plain_model, plain = _losses(batch, RandomSampler(num=64), seed=3)
    isr_model, isr = _losses(batch, PISASampler(num=64, isr_n=False, carl=False), seed=3)
    assert torch.equal(isr["loss_box_reg"], plain["loss_box_reg"])
    assert isr["loss_classifier"].item() == pytest.approx(plain["loss_classifier"].item(), rel=1e-5)
    plain["loss_classifier"].backward()
    isr["loss_classifier"].backward()
    g_plain = plain_model.roi_heads.box_predictor.cls_score.weight.grad
    g_isr = isr_model.roi_heads.box_predictor.cls_score.weight.grad
    assert not torch.allclose(g_plain, g_isr)


def test_predict_rois_agrees_with_a_plain_computation() -> None:
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 3).eval()
    heads = model.roi_heads
    features = model.backbone(torch.rand(1, 3, 128, 128))
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 90
    proposals = torch.cat([xy, xy + 8 + torch.rand(40, 2, generator=g) * 30], 1)
    gt = torch.tensor([[10.0, 10.0, 50.0, 60.0]])
    label = torch.zeros(40, dtype=torch.int8)
    label[:5] = 1
    assignment = Assignment(label, torch.zeros(40).long(), torch.zeros(40), label.long())
    args = (heads, features, [proposals], [(128, 128)], [gt], [assignment])
    (pred,) = predict_rois(*args)
    (loss,) = score_rois(*args)
    logits, deltas = heads.box_predictor(
        heads.box_head(heads.box_roi_pool(features, [proposals], [(128, 128)]))
    )
    prob = logits.softmax(-1)
    score, cls = prob[:, 1:].max(-1)
    assert torch.allclose(pred.score, score, atol=1e-6)
    assert torch.equal(pred.label, cls + 1)
    boxes = heads.box_coder.decode_single(
        deltas.reshape(40, -1, 4)[torch.arange(40), cls + 1], proposals
    )
    assert torch.allclose(pred.box, boxes, atol=1e-4)
    ce = torch.nn.functional.cross_entropy(logits, label.long(), reduction="none")
    assert torch.allclose(pred.cls_loss, ce, atol=1e-5)
    assert torch.equal(pred.loss, loss)


def test_pisa_is_refused_for_the_rpn() -> None:
    with pytest.raises(ValueError, match="rpn_sampler"):
        with_sampler(build("faster_rcnn_tiny", 3), RandomSampler(), rpn_sampler=PISASampler())
