"""RoI-align by gathering: torchvision's forward values to the bit, its gradients to rounding."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from hardmine.models._pool import pool_flat
from hardmine.models._roi_align import GatherMultiScaleRoIAlign, roi_align_gather, to_rois
from hardmine.models.build import faster_rcnn_tiny, mask_rcnn_tiny


def _case(seed: int, dtype: torch.dtype = torch.float32):
    """A random map and RoIs: boxes partly or wholly off the map, zero-area and tiny ones."""
    g = torch.Generator().manual_seed(seed)
    h, w = (int(v) for v in torch.randint(1, 20, (2,), generator=g))
    scale = [1.0, 0.5, 0.125, 1 / 3][seed % 4]
    feature = torch.randn(2, 5, h, w, generator=g, dtype=dtype)
    n = 40
    extent = w / scale
    xy = torch.rand(n, 2, generator=g) * extent * 1.4 - extent * 0.2
    wh = torch.rand(n, 2, generator=g) * extent * torch.rand(n, 1, generator=g)
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[::7, 2:] = boxes[::7, :2]  # zero-area
    boxes[1::9] = torch.tensor([-50.0, -50.0, -20.0, -20.0])  # wholly outside
    image = torch.randint(0, 2, (n, 1), generator=g).float()
    return feature, torch.cat([image, boxes], 1).to(dtype), scale


@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_forward_equals_torchvision_bitwise(sampling_ratio, aligned):
    for seed in range(24):
        dtype = torch.float64 if seed % 5 == 0 else torch.float32
        feature, rois, scale = _case(seed, dtype)
        args = ((7, 7), scale, sampling_ratio, aligned)
        assert torch.equal(roi_align_gather(feature, rois, *args), roi_align(feature, rois, *args))


@pytest.mark.parametrize("sampling_ratio", [1, 2])
def test_gradient_equals_torchvision(sampling_ratio):
    for seed in range(12):
        feature, rois, scale = _case(seed, torch.float64)
        args = ((7, 7), scale, sampling_ratio, False)
        grad_out = torch.randn(rois.shape[0], 5, 7, 7, dtype=torch.float64)
        a = feature.clone().requires_grad_()
        b = feature.clone().requires_grad_()
        roi_align(a, rois, *args).backward(grad_out)
        roi_align_gather(b, rois, *args).backward(grad_out)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    feature, rois, scale = _case(3, torch.float64)
    feature = feature[:, :2].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f: roi_align_gather(f, rois[:8], (3, 3), scale, 2), (feature,)
    )


def test_no_rois_and_bad_sampling_ratio():
    feature = torch.randn(1, 4, 8, 8, requires_grad=True)
    out = roi_align_gather(feature, torch.zeros(0, 5), (7, 7), 1.0, 1)
    assert out.shape == (0, 4, 7, 7)
    out.sum().backward()
    assert torch.equal(feature.grad, torch.zeros_like(feature))
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align_gather(feature, torch.zeros(0, 5), (7, 7), 1.0, 0)


def _multiscale_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    sizes = [(320, 384), (320, 320)]
    features = {
        name: torch.randn(2, 6, 320 // s, 384 // s, generator=g)
        for name, s in (("0", 8), ("1", 16))
    }
    boxes = []
    for h, w in sizes:
        xy = torch.rand(50, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = 1 + torch.rand(50, 2, generator=g) * 400
        boxes.append(torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], 1))
    return features, boxes, sizes


def test_multiscale_pooler_equals_torchvisions():
    """Values to the bit, every level used, gradients to rounding; the RoI order is kept."""
    features, boxes, sizes = _multiscale_inputs(0)
    ours, theirs = GatherMultiScaleRoIAlign(["0", "1"], 7, 2), MultiScaleRoIAlign(["0", "1"], 7, 2)
    a = {k: v.clone().requires_grad_() for k, v in features.items()}
    b = {k: v.clone().requires_grad_() for k, v in features.items()}
    out_a, out_b = ours(a, boxes, sizes), theirs(b, boxes, sizes)
    assert set(ours.map_levels(boxes).tolist()) == {0, 1}
    assert torch.equal(out_a, out_b)
    grad = torch.randn_like(out_a)
    out_a.backward(grad)
    out_b.backward(grad)
    for name in features:
        torch.testing.assert_close(a[name].grad, b[name].grad, rtol=1e-5, atol=1e-5)


def test_multiscale_pooler_is_torchvisions_without_gradients(monkeypatch):
    """Inference (and OHEM's read-only pass, over the CPU's threads) pools with torchvision."""
    calls: list[int] = []
    original = roi_align_gather

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr("hardmine.models._roi_align.roi_align_gather", counting)
    features, boxes, sizes = _multiscale_inputs(1)
    ours, theirs = GatherMultiScaleRoIAlign(["0", "1"], 7, 2), MultiScaleRoIAlign(["0", "1"], 7, 2)
    with torch.no_grad():
        assert torch.equal(ours(features, boxes, sizes), theirs(features, boxes, sizes))
        flat = pool_flat(ours, features, to_rois(boxes), sizes)
        assert torch.equal(flat, theirs(features, boxes, sizes))
    assert calls == []
    grad_features = {k: v.clone().requires_grad_() for k, v in features.items()}
    ours(grad_features, boxes, sizes)
    assert calls  # with gradients: gathered
    calls.clear()
    half = {k: v.to(torch.bfloat16).requires_grad_() for k, v in features.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours(half, boxes, sizes), theirs(half, boxes, sizes))
    assert calls == []  # half precision: torchvision's


def test_tiny_rcnn_models_pool_by_gathering():
    rcnn = faster_rcnn_tiny(num_classes=3)
    mask = mask_rcnn_tiny(num_classes=3)
    assert isinstance(rcnn.roi_heads.box_roi_pool, GatherMultiScaleRoIAlign)
    assert isinstance(mask.roi_heads.mask_roi_pool, GatherMultiScaleRoIAlign)


def test_tiny_rcnn_gradients_equal_with_torchvisions_pooler():
    """One training step of the whole model: the same losses, the same gradients to rounding."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 128, generator=g) for _ in range(2)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 30.0, 120.0, 90.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.tensor([[0.0, 0.0, 127.0, 127.0]]), "labels": torch.tensor([3])},
    ]
    grads = []
    for pooler in (GatherMultiScaleRoIAlign, MultiScaleRoIAlign):
        torch.manual_seed(0)
        model = faster_rcnn_tiny(num_classes=4)
        model.roi_heads.box_roi_pool.__class__ = pooler
        torch.manual_seed(1)  # the same RPN / RoI sampling draws
        losses = model(images, targets)
        sum(losses.values()).backward()
        grads.append((losses, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (losses_a, grads_a), (losses_b, grads_b) = grads
    assert losses_a.keys() == losses_b.keys()
    for key in losses_a:
        assert torch.equal(losses_a[key], losses_b[key])  # forward values to the bit
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
